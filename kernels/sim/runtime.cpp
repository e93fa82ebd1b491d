// runtime.cpp: the kernel emulator's runtime. Runs a launch's blocks on worker threads (one
// block at a time per worker) and every CUDA thread of a block as a fiber with its own stack,
// switched only at synchronisation points, one warp at a time (each warp runs to its next
// barrier before the next warp starts):
//   - __syncthreads: released when every live thread has arrived at the same call site
//     (exited threads count as arrived, the sm_70+ rule);
//   - warp collectives (shuffles, ldmatrix, mma.sync): computed when every lane of the mask has
//     arrived at the same collective (ldmatrix and mma need all 32 lanes);
//   - anything else (a lane exited or waiting elsewhere) is divergence, reported with the sites.
// cp.async copies land when the wait_group that retires their group executes (the destination
// reads as poison until then); with the race check on, every launch runs twice, the second time
// in reverse thread and block order with copies landing at issue, and every buffer of the device
// must come out bit-identical. Device memory, shared memory and fiber stacks have guard pages:
// an access past them faults, and the fault becomes a report naming kernel, block, thread and
// buffer. See docs/emulator.md.

#undef _FORTIFY_SOURCE
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "sim.h"
#include "sanitize.h"
#include "trace.h"
// The 16-bit float types and conversions the kernels see.
#include "include/cuda_bf16.h"
#include "include/cuda_fp16.h"

namespace pgqa_sim {

thread_local const uint3 *tls_thread_idx __attribute__((tls_model("initial-exec"))) = nullptr;
thread_local const BlockCoords *tls_block __attribute__((tls_model("initial-exec"))) = nullptr;

namespace {

constexpr unsigned char kPoison = 0xff;  // NaN in f32, f16 and bf16
constexpr size_t kPage = 4096;
constexpr size_t kBufferGuard = 1 << 20;  // PROT_NONE before and after every buffer
constexpr size_t kStackBytes = 256 * 1024;
constexpr int kCudaSuccess = 0, kInvalidValue = 1, kInvalidConfiguration = 9,
              kIllegalAddress = 700, kLaunchOutOfResources = 701, kLaunchFailure = 719;

size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

std::string format(const char *fmt, ...) {
  va_list args;
  va_start(args, fmt);
  char buffer[1024];
  vsnprintf(buffer, sizeof buffer, fmt, args);
  va_end(args);
  return buffer;
}

// ---------------------------------------------------------------------------------------------
// Device memory: each buffer ends where its last page ends (rounded to 16 bytes) and has guard
// pages on both sides; contents start poisoned.

struct Buffer {
  uintptr_t map_base = 0;  // the whole mapping, guards included
  size_t map_len = 0;
  uintptr_t pages = 0;  // first readable byte (the poisoned slack before `start` begins here)
  uintptr_t start = 0;  // what the caller got
  size_t size = 0;      // what the caller asked for
  size_t rounded = 0;   // size rounded to 16 bytes: start + rounded is the end of the pages
  uint64_t id = 0;
  bool contains(uintptr_t a) const { return a >= start && a < start + size; }
};

}  // namespace

struct Device {
  std::mutex launch_mutex;  // one launch at a time
  std::mutex buffers_mutex;
  std::map<uintptr_t, Buffer> buffers;  // by start
  uint64_t next_id = 1;
  bool race_check = true;
  std::vector<std::pair<uintptr_t, size_t>> watches;
  std::atomic<uint64_t> watched_bytes{0};
  uint64_t launches = 0;
  std::string last_report;
  // Traced launches (the PGQA_SIM_TRACED copy of the kernels): kTraceProfile keeps each launch's
  // profile, kTraceSanitize runs racecheck and initcheck on it.
  int tracing = 0;
  trace::DeviceProfile profile;
  trace::DeviceShadow init;  // the buffers allocated while sanitizing: written bytes, races
};

constexpr int kTraceProfile = 1, kTraceSanitize = 2;

namespace {

std::mutex g_attr_mutex;
std::map<const void *, int> g_max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize
thread_local int t_last_error = kCudaSuccess;

// ---------------------------------------------------------------------------------------------
// Kernel names (from the binary's symbol table: kernels live in anonymous namespaces, so their
// symbols are local) and their __launch_bounds__.

// Function-local statics: the kernel files register their bounds during static initialisation,
// in an order the linker chooses, so these must exist before their first use.
struct KernelTables {
  std::mutex mutex;
  std::map<const void *, std::string> names;  // kernel address -> "cuda_core_attend_kernel<__half, 128>"
  std::map<std::string, int> bounds;          // unqualified kernel name -> max threads
  std::map<std::string, std::vector<std::pair<uint64_t, std::string>>> symtabs;  // file -> functions
};
KernelTables &tables() {
  static KernelTables t;
  return t;
}

// The function symbols (offset from the load base for position-independent objects) of `path`.
const std::vector<std::pair<uint64_t, std::string>> &symbols_of(const std::string &path) {
  auto found = tables().symtabs.find(path);
  if (found != tables().symtabs.end()) return found->second;
  std::vector<std::pair<uint64_t, std::string>> &out = tables().symtabs[path];
  const int fd = open(path.c_str(), O_RDONLY);
  if (fd < 0) return out;
  struct stat st;
  if (fstat(fd, &st) != 0 || st.st_size < static_cast<off_t>(sizeof(Elf64_Ehdr))) {
    close(fd);
    return out;
  }
  const size_t size = static_cast<size_t>(st.st_size);
  void *map = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) return out;
  const char *base = static_cast<const char *>(map);
  const Elf64_Ehdr *eh = reinterpret_cast<const Elf64_Ehdr *>(base);
  if (memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0 && eh->e_ident[EI_CLASS] == ELFCLASS64 &&
      eh->e_shoff + static_cast<uint64_t>(eh->e_shnum) * sizeof(Elf64_Shdr) <= size) {
    const Elf64_Shdr *sections = reinterpret_cast<const Elf64_Shdr *>(base + eh->e_shoff);
    for (int i = 0; i < eh->e_shnum; ++i) {
      if (sections[i].sh_type != SHT_SYMTAB || sections[i].sh_link >= eh->e_shnum) continue;
      const Elf64_Shdr &strtab = sections[sections[i].sh_link];
      if (sections[i].sh_offset + sections[i].sh_size > size || strtab.sh_offset + strtab.sh_size > size) continue;
      const Elf64_Sym *syms = reinterpret_cast<const Elf64_Sym *>(base + sections[i].sh_offset);
      const size_t count = sections[i].sh_size / sizeof(Elf64_Sym);
      for (size_t k = 0; k < count; ++k) {
        if (ELF64_ST_TYPE(syms[k].st_info) != STT_FUNC || syms[k].st_name >= strtab.sh_size) continue;
        out.emplace_back(syms[k].st_value, std::string(base + strtab.sh_offset + syms[k].st_name));
      }
    }
  }
  munmap(map, size);
  return out;
}

// The demangled name of the function at `address`, without its parameters and namespaces of
// the emulator's making; "" when the binary has no symbol for it.
std::string function_name(const void *address) {
  Dl_info info;
  if (dladdr(address, &info) == 0) return "";
  std::string mangled;
  if (info.dli_sname != nullptr && info.dli_saddr == address) {
    mangled = info.dli_sname;
  } else {
    const Elf64_Ehdr *eh = static_cast<const Elf64_Ehdr *>(info.dli_fbase);
    const uint64_t offset = eh->e_type == ET_DYN ? reinterpret_cast<uintptr_t>(address) -
                                                       reinterpret_cast<uintptr_t>(info.dli_fbase)
                                                 : reinterpret_cast<uintptr_t>(address);
    std::string path = info.dli_fname != nullptr ? info.dli_fname : "";
    const auto *symbols = &symbols_of(path);
    if (symbols->empty()) symbols = &symbols_of("/proc/self/exe");
    for (const auto &s : *symbols)
      if (s.first == offset) mangled = s.second;
  }
  if (mangled.empty()) return "";
  int status = 0;
  char *demangled = abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status);
  std::string name = status == 0 && demangled != nullptr ? demangled : mangled;
  free(demangled);
  for (const char *noise : {"(anonymous namespace)::", "pgqa_sim_cuda_traced::", "pgqa_sim_cuda::", "pgqa_emulated::", "pgqa_traced::"}) {
    for (size_t at; (at = name.find(noise)) != std::string::npos;) name.erase(at, strlen(noise));
  }
  // Drop the parameter list: the last top-level "(...)".
  int depth = 0;
  for (size_t i = 0; i < name.size(); ++i) {
    if (name[i] == '<') ++depth;
    if (name[i] == '>') --depth;
    if (name[i] == '(' && depth == 0) {
      name.resize(i);
      break;
    }
  }
  return name;
}

// The kernel's display name, once per kernel.
const std::string &kernel_name(const void *kernel_id, const char *fallback) {
  std::lock_guard<std::mutex> lock(tables().mutex);
  auto found = tables().names.find(kernel_id);
  if (found != tables().names.end()) return found->second;
  std::string name = function_name(kernel_id);
  return tables().names[kernel_id] = name.empty() ? fallback : name;
}

// "cuda_core_attend_kernel<__half, 128>" -> "cuda_core_attend_kernel".
std::string unqualified(const std::string &name) {
  const size_t end = name.find('<');
  std::string base = name.substr(0, end);
  const size_t colon = base.rfind("::");
  return colon == std::string::npos ? base : base.substr(colon + 2);
}

int bound_of(const void *kernel_id, const char *fallback) {
  const std::string base = unqualified(kernel_name(kernel_id, fallback));
  std::lock_guard<std::mutex> lock(tables().mutex);
  auto found = tables().bounds.find(base);
  return found == tables().bounds.end() || found->second <= 0 ? kMaxThreadsPerBlock : found->second;
}

// ---------------------------------------------------------------------------------------------
// Fibers.

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack pointer in *save,
// switches to `to` and restores the registers saved there.
extern "C" void pgqa_sim_switch(void **save, void *to);
asm(R"(
  .text
  .p2align 4
  .type pgqa_sim_switch,@function
pgqa_sim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pgqa_sim_switch,.-pgqa_sim_switch
)");
#endif

struct Stack {
  void *map = nullptr;  // guard page, then the stack
  size_t len = 0;
  char *top() const { return static_cast<char *>(map) + len; }
};

std::mutex g_stack_mutex;
std::vector<Stack> g_stacks;  // free stacks

Stack take_stack() {
  {
    std::lock_guard<std::mutex> lock(g_stack_mutex);
    if (!g_stacks.empty()) {
      Stack s = g_stacks.back();
      g_stacks.pop_back();
      return s;
    }
  }
  Stack s;
  s.len = kStackBytes + kPage;
  s.map = mmap(nullptr, s.len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (s.map == MAP_FAILED) {
    perror("pgqa_sim: mmap of a fiber stack");
    abort();
  }
  mprotect(s.map, kPage, PROT_NONE);  // overflow faults
  return s;
}
void give_stack(Stack s) {
  std::lock_guard<std::mutex> lock(g_stack_mutex);
  g_stacks.push_back(s);
}

enum class State { kRunnable, kBarrier, kCollective, kExited };
enum class Coll { kShuffle, kSyncWarp, kBallot, kLdmatrix, kMma };

struct Copy {
  unsigned char *dst;
  unsigned char data[16];
  int bytes;  // 0: landed at issue (early schedule), kept for the group accounting
};

struct Fiber {
  void *sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t context;
#endif
  Stack stack;
  uint3 thread_idx{};
  int linear = 0, warp = 0, lane = 0;
  State state = State::kRunnable;
  Site site{nullptr, 0};
  // The collective this lane waits at, its inputs and outputs.
  Coll coll = Coll::kSyncWarp;
  int sub = 0;  // shuffle kind, ldmatrix .trans, mma bf16
  unsigned mask = 0;
  uint32_t in[8] = {};
  int lane_arg = 0, width = 32;
  const void *address = nullptr;
  uintptr_t pc = 0;  // the collective's caller (the traced profile's site)
  uint32_t out[4] = {};
  float acc[4] = {};
  // cp.async: copies not yet committed, and committed groups not yet retired.
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> groups;
};

struct Launch {
  Device *device = nullptr;
  const char *kernel = nullptr;
  const char *launcher = nullptr;
  dim3 grid, block;
  size_t smem = 0;
  Body body = nullptr;
  const void *closure = nullptr;
  std::vector<Buffer> buffers;  // sorted by start
  bool reverse = false;         // threads and blocks in reverse order
  bool late_copies = true;      // cp.async lands at the wait_group
  bool count_traffic = true;
  // A traced launch's first schedule: the profile its workers' tracers fill, and the sanitizers.
  bool trace = false;
  trace::LaunchProfile *profile = nullptr;
  std::mutex profile_mutex;
  trace::Sanitizer *sanitizer = nullptr;
  std::atomic<int64_t> next_block{0};
  std::atomic<bool> failed{false};
  std::mutex report_mutex;
  std::string report;
  int error = kCudaSuccess;

  void fail(int err, const std::string &text) {
    std::lock_guard<std::mutex> lock(report_mutex);
    if (!failed.exchange(true)) {
      error = err;
      report = text;
    }
  }
  const Buffer *find(uintptr_t address) const {
    auto it = std::upper_bound(buffers.begin(), buffers.end(), address,
                               [](uintptr_t a, const Buffer &b) { return a < b.start; });
    if (it == buffers.begin()) return nullptr;
    --it;
    return it->contains(address) ? &*it : nullptr;
  }
};

struct SharedArena {
  void *map = nullptr;
  size_t len = 0;  // guard page, kMaxSharedOptin rounded to pages, guard region
  char *end() const { return static_cast<char *>(map) + len - kBufferGuard; }
};

struct Worker {
  Launch *launch = nullptr;
  void *sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_context;
#endif
  std::vector<std::unique_ptr<Fiber>> fibers;
  BlockCoords coords{};
  Fiber *current = nullptr;
  unsigned char *smem = nullptr;
  size_t smem_bytes = 0;
  unsigned char *smem_page = nullptr;  // the readable page the shared memory starts in
  SharedArena arena;
  bool failed = false;
  bool in_block = false;
  sigjmp_buf fault_env;
  volatile uintptr_t fault_address = 0;
  volatile bool fault_write = false;
  uint64_t watched = 0;
  std::vector<int> run_list;  // the scheduler's scratch (run_block)
  trace::BlockTracer *tracer = nullptr;  // a traced launch's first schedule
  stack_t alt_stack{};
  stack_t old_alt_stack{};
};

thread_local Worker *t_worker __attribute__((tls_model("initial-exec"))) = nullptr;

std::string where(const Worker &w, const Fiber *f) {
  const uint3 b = w.coords.block_idx;
  std::string s = format("kernel %s (launched from %s), block (%u,%u,%u)", w.launch->kernel,
                         w.launch->launcher, b.x, b.y, b.z);
  if (f) s += format(", thread (%u,%u,%u) (warp %d, lane %d)", f->thread_idx.x, f->thread_idx.y,
                     f->thread_idx.z, f->warp, f->lane);
  return s;
}

std::string site_text(Site s) { return s.file ? format("%s:%d", s.file, s.line) : "?"; }

// Stops the block: the scheduler sees w.failed and abandons its fibers.
void fail_here(int err, const std::string &what) {
  Worker &w = *t_worker;
  w.launch->fail(err, what + "\n  at " + where(w, w.current));
  w.failed = true;
}

void to_scheduler(Fiber *f) {
  Worker &w = *t_worker;
#if defined(__x86_64__)
  pgqa_sim_switch(&f->sp, w.sched_sp);
#else
  swapcontext(&f->context, &w.sched_context);
#endif
}

// A fiber's first frame: runs the kernel for its thread, then exits.
extern "C" void pgqa_sim_fiber_main() {
  Worker &w = *t_worker;
  Fiber *f = w.current;
  w.launch->body(w.launch->closure);
  size_t pending = f->open.size();
  for (const auto &g : f->groups) pending += g.size();
  if (pending > 0 && !w.failed)
    fail_here(kLaunchFailure, format("thread exited with %zu cp.async copies not retired by a wait_group",
                                     pending));
  f->state = State::kExited;
  to_scheduler(f);
  abort();  // never resumed
}

#if defined(__x86_64__)
void init_fiber(Fiber &f) {
  // pgqa_sim_switch pops mxcsr/fpu control, six registers, then returns into fiber_main with
  // the stack aligned as after a call.
  uint64_t *sp = reinterpret_cast<uint64_t *>(f.stack.top());
  *--sp = 0;                                                   // fiber_main's return address
  *--sp = reinterpret_cast<uint64_t>(&pgqa_sim_fiber_main);    // ret target
  for (int i = 0; i < 6; ++i) *--sp = 0;                       // rbp rbx r12 r13 r14 r15
  uint32_t control[2];
  asm volatile("stmxcsr %0" : "=m"(control[0]));
  asm volatile("fnstcw %0" : "=m"(control[1]));
  *--sp = static_cast<uint64_t>(control[0]) | (static_cast<uint64_t>(control[1] & 0xffff) << 32);
  f.sp = sp;
}
#else
void init_fiber(Fiber &f) {
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = static_cast<char *>(f.stack.map) + kPage;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, pgqa_sim_fiber_main, 0);
}
#endif

void resume(Worker &w, Fiber &f) {
  w.current = &f;
  if (w.tracer) w.tracer->set_thread(f.linear);
  tls_thread_idx = &f.thread_idx;
#if defined(__x86_64__)
  pgqa_sim_switch(&w.sched_sp, f.sp);
#else
  swapcontext(&w.sched_context, &f.context);
#endif
  w.current = nullptr;
}

// ---------------------------------------------------------------------------------------------
// Collectives.

const char *coll_name(const Fiber &f) {
  switch (f.coll) {
    case Coll::kShuffle: return "a shuffle";
    case Coll::kSyncWarp: return "__syncwarp";
    case Coll::kBallot: return "__ballot_sync";
    case Coll::kLdmatrix: return f.sub ? "ldmatrix.x4.trans" : "ldmatrix.x4";
    case Coll::kMma: return f.sub ? "mma.sync m16n8k16 bf16" : "mma.sync m16n8k16 f16";
  }
  return "?";
}

std::string state_text(const Fiber &f) {
  switch (f.state) {
    case State::kExited: return "has exited";
    case State::kBarrier: return "waits at __syncthreads at " + site_text(f.site);
    case State::kCollective:
      return format("waits at %s (mask 0x%08x) at %s", coll_name(f), f.mask, site_text(f.site).c_str());
    case State::kRunnable: return "is running";
  }
  return "?";
}

void arrive(Coll coll, int sub, unsigned mask, Site site) {
  Worker &w = *t_worker;
  Fiber *f = w.current;
  if (((mask >> f->lane) & 1u) == 0) {
    fail_here(kLaunchFailure, format("lane %d calls a warp collective whose mask 0x%08x leaves it out (%s)",
                                     f->lane, mask, site_text(site).c_str()));
  }
  f->coll = coll;
  f->sub = sub;
  f->mask = mask;
  f->site = site;
  f->state = State::kCollective;
  to_scheduler(f);
}

// Element `element` (16-bit) of the row whose address `lane_fiber` gave to ldmatrix.
uint16_t half_at(const Fiber &lane_fiber, int element) {
  uint16_t v;
  memcpy(&v, static_cast<const unsigned char *>(lane_fiber.address) + 2 * element, 2);
  return v;
}

// A 16-bit operand element as f32, exactly (the shims' conversions).
float to_f32(uint16_t bits, bool bf16) {
  return bf16 ? pgqa_sim_cuda::__bfloat162float(pgqa_sim_cuda::__nv_bfloat16{bits})
              : pgqa_sim_cuda::__half2float(pgqa_sim_cuda::__half{bits});
}

// Executes the collective the lanes of `mask` in `warp` wait at (all checked to be the same).
void execute(Worker &w, Fiber **lanes, unsigned mask) {
  Fiber &first = *lanes[__builtin_ctz(mask)];
  switch (first.coll) {
    case Coll::kSyncWarp: break;
    case Coll::kBallot: {
      unsigned bits = 0;
      for (int l = 0; l < 32; ++l)
        if ((mask >> l) & 1u) bits |= (lanes[l]->in[0] ? 1u : 0u) << l;
      for (int l = 0; l < 32; ++l)
        if ((mask >> l) & 1u) lanes[l]->out[0] = bits;
      break;
    }
    case Coll::kShuffle: {
      for (int l = 0; l < 32; ++l) {
        if (((mask >> l) & 1u) == 0) continue;
        Fiber &f = *lanes[l];
        const int width = f.width;
        const int base = l & ~(width - 1);
        int src = l;
        switch (static_cast<ShuffleKind>(f.sub)) {
          case kShflIdx: src = base + (f.lane_arg & (width - 1)); break;
          case kShflUp: src = l - f.lane_arg >= base ? l - f.lane_arg : l; break;
          case kShflDown: src = l + f.lane_arg < base + width ? l + f.lane_arg : l; break;
          case kShflXor: src = (l ^ f.lane_arg) < base + width ? (l ^ f.lane_arg) : l; break;
        }
        if (src < 0 || src > 31 || ((mask >> src) & 1u) == 0) {
          w.current = &f;
          fail_here(kLaunchFailure, format("lane %d shuffles from lane %d, which is not in the mask 0x%08x (%s)",
                                           l, src, mask, site_text(f.site).c_str()));
          return;
        }
        f.out[0] = lanes[src]->in[0];
      }
      break;
    }
    case Coll::kLdmatrix: {
      const bool trans = first.sub != 0;
      for (int l = 0; l < 32; ++l) {
        const uintptr_t a = reinterpret_cast<uintptr_t>(lanes[l]->address);
        const uintptr_t s = reinterpret_cast<uintptr_t>(w.smem);
        if (a < s || a + 16 > s + w.smem_bytes || (a & 15u) != 0) {
          w.current = lanes[l];
          fail_here(kIllegalAddress,
                    format("ldmatrix row address %p of lane %d is %s (dynamic shared memory %p, %zu bytes; %s)",
                           lanes[l]->address, l, (a & 15u) ? "not 16-byte aligned" : "outside the block's shared memory",
                           static_cast<void *>(w.smem), w.smem_bytes, site_text(first.site).c_str()));
          return;
        }
      }
      // Matrix i's row r is the 16 bytes at the address of lane 8 i + r. Lane l receives, in
      // register i, elements (row l/4, cols 2 (l%4) and 2 (l%4) + 1), or transposed
      // (rows 2 (l%4) and 2 (l%4) + 1, col l/4); the lower-indexed element in the low half.
      for (int l = 0; l < 32; ++l) {
        for (int i = 0; i < 4; ++i) {
          uint16_t lo, hi;
          if (!trans) {
            const Fiber &row = *lanes[8 * i + l / 4];
            lo = half_at(row, 2 * (l % 4));
            hi = half_at(row, 2 * (l % 4) + 1);
          } else {
            lo = half_at(*lanes[8 * i + 2 * (l % 4)], l / 4);
            hi = half_at(*lanes[8 * i + 2 * (l % 4) + 1], l / 4);
          }
          lanes[l]->out[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
        }
      }
      break;
    }
    case Coll::kMma: {
      // Fragments of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating
      // point type"): g = lane >> 2, t = lane % 4.
      //   A (16x16) element a_i (i = 0..7, register i / 2, half i % 2):
      //     row g for i in {0,1,4,5}, else g + 8; col 2t + (i & 1), + 8 for i >= 4.
      //   B (16x8) element b_i (i = 0..3): row (k) 2t + (i & 1), + 8 for i >= 2; col (n) g.
      //   C, D (16x8 f32) element c_i: row g for i < 2, else g + 8; col 2t + (i & 1).
      const bool bf16 = first.sub != 0;
      float a[16][16], b[16][8], d[16][8];
      for (int l = 0; l < 32; ++l) {
        const Fiber &f = *lanes[l];
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 8; ++i) {
          const uint16_t bits = static_cast<uint16_t>(f.in[i / 2] >> (16 * (i % 2)));
          const int row = (i == 0 || i == 1 || i == 4 || i == 5) ? g : g + 8;
          const int col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
          a[row][col] = to_f32(bits, bf16);
        }
        for (int i = 0; i < 4; ++i) {
          const uint16_t bits = static_cast<uint16_t>(f.in[4 + i / 2] >> (16 * (i % 2)));
          b[2 * t + (i & 1) + (i >= 2 ? 8 : 0)][g] = to_f32(bits, bf16);
        }
        for (int i = 0; i < 4; ++i) d[i < 2 ? g : g + 8][2 * t + (i & 1)] = f.acc[i];
      }
      // D = C + A B: products of 16-bit floats are exact in f32; they are added to the f32
      // accumulator in k order.
      for (int k = 0; k < 16; ++k)
        for (int row = 0; row < 16; ++row) {
          const float x = a[row][k];
          for (int col = 0; col < 8; ++col) d[row][col] += x * b[k][col];
        }
      for (int l = 0; l < 32; ++l) {
        Fiber &f = *lanes[l];
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; ++i) f.acc[i] = d[i < 2 ? g : g + 8][2 * t + (i & 1)];
      }
      break;
    }
  }
  if (w.tracer) {
    static constexpr trace::Op kOps[] = {trace::Op::kShuffle, trace::Op::kSyncWarp, trace::Op::kBallot,
                                         trace::Op::kLdmatrix, trace::Op::kMma};
    uintptr_t rows[32] = {};
    if (first.coll == Coll::kLdmatrix)
      for (int l = 0; l < 32; ++l) rows[l] = reinterpret_cast<uintptr_t>(lanes[l]->address);
    w.tracer->collective(first.warp, kOps[static_cast<int>(first.coll)], mask, first.pc, rows);
  }
  for (int l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) lanes[l]->state = State::kRunnable;
}

bool same_site(Site a, Site b) {
  return a.line == b.line && (a.file == b.file || strcmp(a.file, b.file) == 0);
}

// Completes the collectives the lanes of `warp` wait at, once every lane has stopped; appends the
// lanes it releases to `released`. Sets w.failed on divergence.
void resolve_warp(Worker &w, int warp, int threads, std::vector<int> &released) {
  Fiber *lanes[32] = {};
  const int lane_count = std::min(32, threads - 32 * warp);
  for (int l = 0; l < lane_count; ++l) lanes[l] = w.fibers[32 * warp + l].get();
  unsigned done = 0;
  for (int l = 0; l < lane_count; ++l) {
    Fiber &f = *lanes[l];
    if (f.state != State::kCollective || ((done >> l) & 1u)) continue;
    const unsigned mask = f.mask;
    const bool all_lanes = f.coll == Coll::kLdmatrix || f.coll == Coll::kMma;
    if (all_lanes && mask != 0xffffffffu) {
      w.current = &f;
      fail_here(kLaunchFailure, format("%s needs all 32 lanes; mask 0x%08x (%s)", coll_name(f), mask,
                                       site_text(f.site).c_str()));
      return;
    }
    for (int j = 0; j < 32; ++j) {
      if (((mask >> j) & 1u) == 0) continue;
      std::string problem;
      if (j >= lane_count) {
        problem = format("lane %d of the mask does not exist (the block has %d threads)", j, threads);
      } else {
        const Fiber &o = *lanes[j];
        if (o.state != State::kCollective || o.coll != f.coll || o.sub != f.sub || o.mask != mask ||
            !same_site(o.site, f.site))
          problem = format("lane %d %s", j, state_text(o).c_str());
      }
      if (!problem.empty()) {
        w.current = &f;
        fail_here(kLaunchFailure, format("divergent warp collective: lane %d %s, but %s", l,
                                         state_text(f).c_str(), problem.c_str()));
        return;
      }
    }
    execute(w, lanes, mask);
    if (w.failed) return;
    done |= mask;
    for (int j = 0; j < lane_count; ++j)
      if ((mask >> j) & 1u) released.push_back(32 * warp + j);
  }
}

// ---------------------------------------------------------------------------------------------
// Faults: an access to a guard page inside a fiber ends the block with a report.

struct sigaction g_old_segv, g_old_bus;
std::once_flag g_handlers_once;

void on_fault(int sig, siginfo_t *info, void *context) {
  Worker *w = t_worker;
  if (w != nullptr && w->in_block && w->current != nullptr) {
    w->fault_address = reinterpret_cast<uintptr_t>(info->si_addr);
#if defined(__x86_64__)
    w->fault_write = (static_cast<ucontext_t *>(context)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#endif
    siglongjmp(w->fault_env, 1);
  }
  const struct sigaction &old = sig == SIGSEGV ? g_old_segv : g_old_bus;
  if ((old.sa_flags & SA_SIGINFO) && old.sa_sigaction) {
    old.sa_sigaction(sig, info, context);
  } else if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN) {
    old.sa_handler(sig);
  } else {
    signal(sig, SIG_DFL);  // the access repeats and takes the default action
  }
}

void install_handlers() {
  std::call_once(g_handlers_once, [] {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
  });
}

std::string describe_address(const Worker &w, uintptr_t a) {
  for (const Buffer &b : w.launch->buffers) {
    if (a < b.map_base || a >= b.map_base + b.map_len) continue;
    if (a >= b.start + b.size)
      return format("%zu bytes past the end of device buffer #%llu (%zu bytes at %p)",
                    static_cast<size_t>(a - (b.start + b.size)), static_cast<unsigned long long>(b.id), b.size,
                    reinterpret_cast<void *>(b.start));
    if (a < b.start)
      return format("%zu bytes before the start of device buffer #%llu (%zu bytes at %p)",
                    static_cast<size_t>(b.start - a), static_cast<unsigned long long>(b.id), b.size,
                    reinterpret_cast<void *>(b.start));
  }
  const uintptr_t arena = reinterpret_cast<uintptr_t>(w.arena.map);
  if (a >= arena && a < arena + w.arena.len) {
    const uintptr_t s = reinterpret_cast<uintptr_t>(w.smem);
    if (a >= s + w.smem_bytes)
      return format("%zu bytes past the end of the block's %zu bytes of dynamic shared memory",
                    static_cast<size_t>(a - s - w.smem_bytes), w.smem_bytes);
    return format("%zu bytes before the block's %zu bytes of dynamic shared memory", static_cast<size_t>(s - a),
                  w.smem_bytes);
  }
  for (const auto &f : w.fibers) {
    const uintptr_t s = reinterpret_cast<uintptr_t>(f->stack.map);
    if (a >= s && a < s + kPage) return format("the stack of thread %d overflowed", f->linear);
  }
  return "not in any buffer of the device";
}

// ---------------------------------------------------------------------------------------------
// Running a launch.

void prepare_arena(Worker &w, size_t bytes) {
  if (w.arena.map == nullptr) {
    w.arena.len = kPage + round_up(kMaxSharedOptin, kPage) + kBufferGuard;
    w.arena.map = mmap(nullptr, w.arena.len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (w.arena.map == MAP_FAILED) {
      perror("pgqa_sim: mmap of shared memory");
      abort();
    }
  }
  const size_t rounded = round_up(std::max<size_t>(bytes, 16), 16);
  char *start = w.arena.end() - rounded;
  char *first_page = reinterpret_cast<char *>(reinterpret_cast<uintptr_t>(start) & ~(kPage - 1));
  char *base = static_cast<char *>(w.arena.map);
  mprotect(base, w.arena.len, PROT_NONE);
  mprotect(first_page, w.arena.end() - first_page, PROT_READ | PROT_WRITE);
  w.smem = reinterpret_cast<unsigned char *>(start);
  w.smem_bytes = bytes;
  w.smem_page = reinterpret_cast<unsigned char *>(first_page);
}

// The poisoned bytes beside the block's shared memory (before it in its first page, and its
// rounding to 16 bytes) that no thread may write; "" when intact.
std::string check_shared_slack(const Worker &w) {
  for (const unsigned char *p = w.smem_page; p < w.smem; ++p)
    if (*p != kPoison)
      return format("out-of-bounds write %zu bytes before the block's %zu bytes of dynamic shared memory",
                    static_cast<size_t>(w.smem - p), w.smem_bytes);
  const unsigned char *end = reinterpret_cast<const unsigned char *>(w.arena.end());
  for (const unsigned char *p = w.smem + w.smem_bytes; p < end; ++p)
    if (*p != kPoison)
      return format("out-of-bounds write %zu bytes past the end of the block's %zu bytes of dynamic shared memory",
                    static_cast<size_t>(p - w.smem - w.smem_bytes), w.smem_bytes);
  return "";
}

// Runs block `linear` on this worker; false when it failed (the report is in the launch).
bool run_block(Worker &w, int64_t linear, int threads) {
  Launch &l = *w.launch;
  w.coords.block_idx = {static_cast<unsigned>(linear % l.grid.x),
                        static_cast<unsigned>((linear / l.grid.x) % l.grid.y),
                        static_cast<unsigned>(linear / (static_cast<int64_t>(l.grid.x) * l.grid.y))};
  tls_block = &w.coords;
  memset(w.smem_page, kPoison, reinterpret_cast<unsigned char *>(w.arena.end()) - w.smem_page);
  for (int i = 0; i < threads; ++i) {
    Fiber &f = *w.fibers[i];
    f.state = State::kRunnable;
    f.open.clear();
    f.groups.clear();
    init_fiber(f);
  }
  w.failed = false;
  if (w.tracer) w.tracer->begin_block(static_cast<uint64_t>(linear), threads, w.smem, w.smem_bytes);
  if (sigsetjmp(w.fault_env, 1) != 0) {
    w.in_block = false;
    Fiber *f = w.current;
    w.current = nullptr;
    l.fail(kIllegalAddress, format("out-of-bounds %s at address %p: %s\n  at %s", w.fault_write ? "write" : "read",
                                   reinterpret_cast<void *>(w.fault_address),
                                   describe_address(w, w.fault_address).c_str(), where(w, f).c_str()));
    return false;
  }
  w.in_block = true;
  // Warps run one at a time, each to its next __syncthreads (or its exit), its own collectives
  // completed as soon as its lanes arrive: a warp races ahead of the others as far as the
  // barriers let it. The first warp goes first (last in the reverse schedule), so a value one
  // warp reads across a warp collective while another writes it differs between the schedules.
  const int warps = (threads + 31) / 32;
  int exited = 0, at_barrier = 0;
  std::vector<int> &released = w.run_list;
  auto stop = [&] {
    w.in_block = false;
    w.current = nullptr;
    return false;
  };
  for (;;) {
    for (int k = 0; k < warps; ++k) {
      const int warp = l.reverse ? warps - 1 - k : k;
      const int lanes = std::min(32, threads - 32 * warp);
      for (;;) {
        for (int j = 0; j < lanes; ++j) {
          Fiber &f = *w.fibers[32 * warp + (l.reverse ? lanes - 1 - j : j)];
          if (f.state != State::kRunnable) continue;
          resume(w, f);
          if (w.failed) return stop();
          exited += f.state == State::kExited;
          at_barrier += f.state == State::kBarrier;
        }
        released.clear();
        if (w.tracer) w.tracer->warp_stopped(warp);
        resolve_warp(w, warp, threads, released);
        if (w.failed) return stop();
        if (released.empty()) break;  // every lane waits at a barrier or has exited
      }
    }
    if (exited == threads) break;
    // Every live thread waits: the barrier is released when they all wait at the same one.
    const Fiber *first = nullptr;
    std::string problem;
    for (int i = 0; i < threads && problem.empty(); ++i) {
      const Fiber &f = *w.fibers[i];
      if (f.state == State::kExited) continue;
      if (f.state != State::kBarrier) {
        problem = format("thread %d %s", i, state_text(f).c_str());
      } else if (first == nullptr) {
        first = &f;
      } else if (!same_site(f.site, first->site)) {
        problem = format("thread %d waits at __syncthreads at %s", i, site_text(f.site).c_str());
      }
    }
    if (first != nullptr && problem.empty() && at_barrier + exited == threads) {
      if (w.tracer) {
        int live_warps = 0;
        for (int k = 0; k < warps; ++k)
          for (int j = 32 * k; j < std::min(threads, 32 * k + 32); ++j)
            if (w.fibers[j]->state != State::kExited) {
              ++live_warps;
              break;
            }
        w.tracer->barrier(site_text(first->site).c_str(), live_warps);
      }
      for (int i = 0; i < threads; ++i)
        if (w.fibers[i]->state == State::kBarrier) w.fibers[i]->state = State::kRunnable;
      at_barrier = 0;
      continue;
    }
    const Fiber *culprit = first;
    if (culprit == nullptr)
      for (int i = 0; i < threads && !culprit; ++i)
        if (w.fibers[i]->state != State::kExited) culprit = w.fibers[i].get();
    w.in_block = false;
    l.fail(kLaunchFailure, format("divergent barrier: thread %d %s, but %s\n  at %s", culprit->linear,
                                  state_text(*culprit).c_str(), problem.c_str(), where(w, nullptr).c_str()));
    return false;
  }
  w.in_block = false;
  if (w.tracer) w.tracer->end_block();
  const std::string slack = check_shared_slack(w);
  if (!slack.empty()) {
    l.fail(kIllegalAddress, slack + "\n  at " + where(w, nullptr));
    return false;
  }
  return true;
}

void run_worker(Launch &l, int threads) {
  Worker w;
  w.launch = &l;
  t_worker = &w;
  // Our own signal stack, so a fault on a full fiber stack can still be handled.
  w.alt_stack.ss_size = 256 * 1024;
  w.alt_stack.ss_sp = malloc(w.alt_stack.ss_size);
  w.alt_stack.ss_flags = 0;
  sigaltstack(&w.alt_stack, &w.old_alt_stack);
  prepare_arena(w, l.smem);
  w.coords.block_dim = l.block;
  w.coords.grid_dim = l.grid;
  for (int i = 0; i < threads; ++i) {
    auto f = std::make_unique<Fiber>();
    f->stack = take_stack();
    f->linear = i;
    f->warp = i / 32;
    f->lane = i % 32;
    f->thread_idx = {static_cast<unsigned>(i % l.block.x), static_cast<unsigned>((i / l.block.x) % l.block.y),
                     static_cast<unsigned>(i / (l.block.x * l.block.y))};
    w.fibers.push_back(std::move(f));
  }
  std::unique_ptr<trace::BlockTracer> tracer;
  if (l.trace && !l.reverse) {
    std::vector<trace::Range> buffers, watches;
    for (const Buffer &b : l.buffers) buffers.push_back({b.start, b.size});
    for (const auto &range : l.device->watches) watches.push_back({range.first, range.second});
    tracer = std::make_unique<trace::BlockTracer>(l.profile, &l.profile_mutex, std::move(buffers),
                                                  std::move(watches), (l.device->tracing & kTraceProfile) != 0,
                                                  l.sanitizer);
    w.tracer = tracer.get();
    trace::set_tracer(w.tracer);
  }
  const int64_t blocks = static_cast<int64_t>(l.grid.x) * l.grid.y * l.grid.z;
  while (!l.failed.load()) {
    const int64_t k = l.next_block.fetch_add(1);
    if (k >= blocks) break;
    if (!run_block(w, l.reverse ? blocks - 1 - k : k, threads)) break;
  }
  if (l.count_traffic && w.watched) l.device->watched_bytes += w.watched;
  trace::set_tracer(nullptr);
  w.tracer = nullptr;
  tracer.reset();  // merges its counters into the launch's profile
  for (auto &f : w.fibers) give_stack(f->stack);
  munmap(w.arena.map, w.arena.len);
  sigaltstack(&w.old_alt_stack, nullptr);
  free(w.alt_stack.ss_sp);
  tls_block = nullptr;
  tls_thread_idx = nullptr;
  t_worker = nullptr;
}

int worker_count(int64_t blocks) {
  int n = static_cast<int>(std::thread::hardware_concurrency());
  if (const char *env = getenv("PAGED_GQA_SIM_WORKERS")) n = atoi(env);
  n = std::max(1, n);
  return static_cast<int>(std::min<int64_t>(n, blocks));
}

void run_schedule(Launch &l) {
  const int threads = static_cast<int>(l.block.x * l.block.y * l.block.z);
  const int64_t blocks = static_cast<int64_t>(l.grid.x) * l.grid.y * l.grid.z;
  // The sanitizers' shadow state is one launch-wide picture: one worker.
  const int n = l.sanitizer != nullptr && !l.reverse ? 1 : worker_count(blocks);
  std::vector<std::thread> helpers;
  for (int i = 1; i < n; ++i) helpers.emplace_back([&] { run_worker(l, threads); });
  run_worker(l, threads);
  for (auto &t : helpers) t.join();
}

// Pages before and after every buffer's data that no kernel may write (they stay poisoned).
std::string check_slack(const Launch &l) {
  for (const Buffer &b : l.buffers) {
    const unsigned char *p = reinterpret_cast<const unsigned char *>(b.pages);
    for (uintptr_t a = b.pages; a < b.start; ++a)
      if (p[a - b.pages] != kPoison)
        return format("out-of-bounds write %zu bytes before the start of device buffer #%llu (%zu bytes)",
                      static_cast<size_t>(b.start - a), static_cast<unsigned long long>(b.id), b.size);
    for (uintptr_t a = b.start + b.size; a < b.start + b.rounded; ++a)
      if (p[a - b.pages] != kPoison)
        return format("out-of-bounds write %zu bytes past the end of device buffer #%llu (%zu bytes)",
                      static_cast<size_t>(a - b.start - b.size), static_cast<unsigned long long>(b.id), b.size);
  }
  return "";
}

using Snapshot = std::vector<std::vector<unsigned char>>;
Snapshot snapshot(const std::vector<Buffer> &buffers) {
  Snapshot s;
  for (const Buffer &b : buffers) {
    const unsigned char *p = reinterpret_cast<const unsigned char *>(b.start);
    s.emplace_back(p, p + b.size);
  }
  return s;
}
void restore(const std::vector<Buffer> &buffers, const Snapshot &s) {
  for (size_t i = 0; i < buffers.size(); ++i)
    memcpy(reinterpret_cast<void *>(buffers[i].start), s[i].data(), buffers[i].size);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The interface of sim.h.

void sync_threads(Site site) {
  Worker &w = *t_worker;
  Fiber *f = w.current;
  f->site = site;
  f->state = State::kBarrier;
  to_scheduler(f);
}

uint32_t shuffle(ShuffleKind kind, unsigned mask, uint32_t value, int lane_arg, int width, Site site) {
  Fiber *f = t_worker->current;
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail_here(kLaunchFailure, format("shuffle width %d is not a power of two up to 32 (%s)", width,
                                     site_text(site).c_str()));
    to_scheduler(f);
  }
  f->pc = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
  f->in[0] = value;
  f->lane_arg = lane_arg;
  f->width = width;
  arrive(Coll::kShuffle, kind, mask, site);
  return f->out[0];
}

void sync_warp(unsigned mask, Site site) {
  t_worker->current->pc = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
  arrive(Coll::kSyncWarp, 0, mask, site);
}

unsigned vote_ballot(unsigned mask, bool predicate, Site site) {
  Fiber *f = t_worker->current;
  f->pc = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
  f->in[0] = predicate;
  arrive(Coll::kBallot, 0, mask, site);
  return f->out[0];
}

void ldmatrix_x4(uint32_t (&r)[4], const void *row, bool trans, Site site) {
  Fiber *f = t_worker->current;
  f->address = row;
  f->pc = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
  arrive(Coll::kLdmatrix, trans, 0xffffffffu, site);
  for (int i = 0; i < 4; ++i) r[i] = f->out[i];
}

void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16, Site site) {
  Fiber *f = t_worker->current;
  for (int i = 0; i < 4; ++i) {
    f->in[i] = a[i];
    f->acc[i] = c[i];
  }
  f->pc = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
  f->in[4] = b0;
  f->in[5] = b1;
  arrive(Coll::kMma, bf16, 0xffffffffu, site);
  for (int i = 0; i < 4; ++i) c[i] = f->acc[i];
}

void cp_async(void *shared_dst, const void *global_src, int bytes, Site site) {
  Worker &w = *t_worker;
  Fiber *f = w.current;
  Launch &l = *w.launch;
  const uintptr_t dst = reinterpret_cast<uintptr_t>(shared_dst);
  const uintptr_t src = reinterpret_cast<uintptr_t>(global_src);
  const uintptr_t smem = reinterpret_cast<uintptr_t>(w.smem);
  std::string problem;
  const Buffer *buffer = l.find(src);
  if (bytes != 4 && bytes != 8 && bytes != 16) {
    problem = format("cp.async of %d bytes (4, 8 or 16)", bytes);
  } else if (dst % bytes != 0 || src % bytes != 0) {
    problem = format("cp.async of %d bytes from %p to %p is not %d-byte aligned", bytes, global_src, shared_dst, bytes);
  } else if (dst < smem || dst + bytes > smem + w.smem_bytes) {
    problem = format("cp.async destination %p is outside the block's %zu bytes of dynamic shared memory at %p",
                     shared_dst, w.smem_bytes, static_cast<void *>(w.smem));
  } else if (buffer == nullptr) {
    problem = format("cp.async source %p is %s", global_src, describe_address(w, src).c_str());
  } else if (src + bytes > buffer->start + buffer->size) {
    problem = format("cp.async reads %d bytes at %p, %zu bytes past the end of device buffer #%llu (%zu bytes)",
                     bytes, global_src, static_cast<size_t>(src + bytes - buffer->start - buffer->size),
                     static_cast<unsigned long long>(buffer->id), buffer->size);
  }
  if (!problem.empty()) {
    fail_here(kIllegalAddress, problem + " (" + site_text(site) + ")");
    to_scheduler(f);
  }
  if (l.count_traffic)
    for (const auto &range : l.device->watches)
      if (src >= range.first && src < range.first + range.second) w.watched += bytes;
  if (w.tracer) w.tracer->cp_async(dst, src, bytes, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
  Copy copy;
  copy.dst = static_cast<unsigned char *>(shared_dst);
  if (l.late_copies) {
    memcpy(copy.data, global_src, bytes);
    memset(shared_dst, kPoison, bytes);  // reads before the wait_group see poison
    copy.bytes = bytes;
  } else {
    memcpy(shared_dst, global_src, bytes);
    copy.bytes = 0;
  }
  f->open.push_back(copy);
}

void cp_async_commit() {
  Fiber *f = t_worker->current;
  f->groups.push_back(std::move(f->open));
  f->open.clear();
}

void cp_async_wait(int pending) {
  Worker &w = *t_worker;
  Fiber *f = w.current;
  while (static_cast<int>(f->groups.size()) > pending) {
    for (const Copy &c : f->groups.front()) {
      if (c.bytes > 0) memcpy(c.dst, c.data, c.bytes);
      if (w.tracer) w.tracer->cp_async_landed(reinterpret_cast<uintptr_t>(c.dst), c.bytes);
    }
    f->groups.pop_front();
  }
}

unsigned char *dynamic_shared() { return t_worker->smem; }

void trap(Site site) {
  Worker &w = *t_worker;
  fail_here(kLaunchFailure, "__trap() at " + site_text(site));
  to_scheduler(w.current);
  abort();
}

bool register_launch_bounds(const char *kernel, int max_threads) {
  std::lock_guard<std::mutex> lock(tables().mutex);
  auto inserted = tables().bounds.emplace(kernel, max_threads);
  if (!inserted.second && inserted.first->second != max_threads) inserted.first->second = -1;  // ambiguous
  return true;
}

int max_threads_per_block(const void *kernel_id) { return bound_of(kernel_id, ""); }

int get_last_error(bool clear) {
  const int e = t_last_error;
  if (clear) t_last_error = kCudaSuccess;
  return e;
}

int func_set_max_dynamic_smem(const void *kernel_id, int bytes) {
  if (bytes < 0 || bytes > kMaxSharedOptin) {
    t_last_error = kInvalidValue;
    return kInvalidValue;
  }
  std::lock_guard<std::mutex> lock(g_attr_mutex);
  g_max_dynamic_smem[kernel_id] = bytes;
  return kCudaSuccess;
}

int func_max_dynamic_smem(const void *kernel_id) {
  std::lock_guard<std::mutex> lock(g_attr_mutex);
  auto it = g_max_dynamic_smem.find(kernel_id);
  return it == g_max_dynamic_smem.end() ? kDefaultSharedLimit : it->second;
}

const char *error_name(int error) {
  switch (error) {
    case kCudaSuccess: return "cudaSuccess";
    case kInvalidValue: return "cudaErrorInvalidValue";
    case kInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case kIllegalAddress: return "cudaErrorIllegalAddress";
    case kLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case kLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

int launch_grid(const char *kernel_text, const char *launcher, const void *kernel_id, bool traced, dim3 grid,
                dim3 block,
                size_t dynamic_smem, void *stream, Body body, const void *closure) {
  auto refuse = [](int error) {
    t_last_error = error;
    return error;
  };
  Device *device = reinterpret_cast<Device *>(stream);
  if (device == nullptr) return refuse(kInvalidValue);  // the emulator has no default stream
  const char *kernel = kernel_name(kernel_id, kernel_text).c_str();
  // Launch limits as the driver checks them.
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > static_cast<uint64_t>(kMaxThreadsPerBlock) || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    std::lock_guard<std::mutex> lock(device->launch_mutex);
    device->last_report = format("launch of %s refused: grid (%u,%u,%u), block (%u,%u,%u)", kernel, grid.x, grid.y,
                                 grid.z, block.x, block.y, block.z);
    return refuse(kInvalidConfiguration);
  }
  const int bound = bound_of(kernel_id, kernel_text);
  if (threads > static_cast<uint64_t>(bound)) {
    std::lock_guard<std::mutex> lock(device->launch_mutex);
    device->last_report = format("launch of %s refused: %llu threads per block, its __launch_bounds__ allows %d",
                                 kernel, static_cast<unsigned long long>(threads), bound);
    return refuse(kLaunchOutOfResources);
  }
  if (dynamic_smem > static_cast<size_t>(func_max_dynamic_smem(kernel_id))) {
    std::lock_guard<std::mutex> lock(device->launch_mutex);
    device->last_report = format("launch of %s refused: %zu bytes of dynamic shared memory, the kernel's limit is %d "
                                 "(cudaFuncAttributeMaxDynamicSharedMemorySize)",
                                 kernel, dynamic_smem, func_max_dynamic_smem(kernel_id));
    return refuse(kInvalidValue);
  }
  install_handlers();
  std::lock_guard<std::mutex> lock(device->launch_mutex);
  Launch l;
  l.device = device;
  l.kernel = kernel;
  l.launcher = launcher;
  l.grid = grid;
  l.block = block;
  l.smem = dynamic_smem;
  l.body = body;
  l.closure = closure;
  {
    std::lock_guard<std::mutex> buffers_lock(device->buffers_mutex);
    for (const auto &entry : device->buffers) l.buffers.push_back(entry.second);
  }
  ++device->launches;
  Snapshot before;
  if (device->race_check) before = snapshot(l.buffers);
  trace::LaunchProfile profile;
  std::unique_ptr<trace::Sanitizer> sanitizer;
  if (device->tracing != 0 && traced) {
    l.trace = true;
    profile.kernel = kernel;
    profile.launcher = launcher;
    profile.grid = grid;
    profile.block = block;
    profile.dynamic_smem = dynamic_smem;
    l.profile = &profile;
    if (device->tracing & kTraceSanitize) {
      sanitizer = std::make_unique<trace::Sanitizer>(kernel, &device->init);
      l.sanitizer = sanitizer.get();
    }
  }
  const uint64_t watched_before = device->watched_bytes.load();
  run_schedule(l);
  profile.kv_bytes_fetched = device->watched_bytes.load() - watched_before;
  std::string report;
  if (!l.failed && sanitizer != nullptr && !sanitizer->reports().empty()) {
    l.error = kLaunchFailure;
    report = format("%llu sanitizer report(s) in kernel %s (launched from %s):",
                    static_cast<unsigned long long>(sanitizer->hazards()), kernel, launcher);
    for (const std::string &r : sanitizer->reports()) report += "\n  " + r;
  }
  if (!l.failed && device->tracing & kTraceProfile) {
    std::lock_guard<std::mutex> profile_lock(device->profile.mutex);
    device->profile.launches.push_back(std::move(profile));
  }
  if (!report.empty()) {
    // reported below
  } else if (l.failed) {
    report = l.report;
  } else if (device->race_check) {
    Snapshot first = snapshot(l.buffers);
    restore(l.buffers, before);
    l.reverse = true;
    l.late_copies = false;
    l.count_traffic = false;
    l.next_block = 0;
    run_schedule(l);
    if (l.failed) {
      report = l.report + "\n  (under the second schedule: reverse thread and block order, cp.async landing at issue)";
    } else {
      for (size_t i = 0; i < l.buffers.size() && report.empty(); ++i) {
        const unsigned char *now = reinterpret_cast<const unsigned char *>(l.buffers[i].start);
        for (size_t k = 0; k < l.buffers[i].size; ++k) {
          if (now[k] != first[i][k]) {
            l.error = kLaunchFailure;
            report = format("data race in kernel %s (launched from %s): device buffer #%llu (%zu bytes) differs at byte "
                            "%zu between two schedules (forward order with cp.async landing at the wait_group: 0x%02x; "
                            "reverse order with cp.async landing at issue: 0x%02x)",
                            kernel, launcher, static_cast<unsigned long long>(l.buffers[i].id), l.buffers[i].size, k,
                            first[i][k], now[k]);
            break;
          }
        }
      }
    }
  }
  if (report.empty()) {
    report = check_slack(l);
    if (!report.empty()) {
      l.error = kIllegalAddress;
      report += format(" by kernel %s (launched from %s)", kernel, launcher);
    }
  }
  if (!report.empty()) {
    device->last_report = report;
    return refuse(l.error == kCudaSuccess ? kLaunchFailure : l.error);
  }
  return kCudaSuccess;
}

}  // namespace pgqa_sim

// ---------------------------------------------------------------------------------------------
// The C interface the Rust backend (src/sim) calls.

using pgqa_sim::Device;

extern "C" {

void *pgqa_sim_device_new(void) {
  Device *d = new Device;
  if (const char *env = getenv("PAGED_GQA_SIM_RACE_CHECK")) d->race_check = strcmp(env, "0") != 0;
  if (const char *env = getenv("PAGED_GQA_SIM_SANITIZE")) d->tracing = strcmp(env, "1") == 0 ? pgqa_sim::kTraceSanitize : 0;
  return d;
}

void pgqa_sim_device_free(void *device) {
  Device *d = static_cast<Device *>(device);
  for (auto &entry : d->buffers) munmap(reinterpret_cast<void *>(entry.second.map_base), entry.second.map_len);
  delete d;
}

void *pgqa_sim_malloc(void *device, size_t bytes) {
  using namespace pgqa_sim;
  Device *d = static_cast<Device *>(device);
  pgqa_sim::Buffer b;
  b.size = bytes;
  b.rounded = round_up(std::max<size_t>(bytes, 1), 16);
  const size_t data_pages = round_up(b.rounded, kPage);
  b.map_len = kBufferGuard + data_pages + kBufferGuard;
  void *map = mmap(nullptr, b.map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (map == MAP_FAILED) return nullptr;
  b.map_base = reinterpret_cast<uintptr_t>(map);
  b.pages = b.map_base + kBufferGuard;
  if (mprotect(reinterpret_cast<void *>(b.pages), data_pages, PROT_READ | PROT_WRITE) != 0) {
    munmap(map, b.map_len);
    return nullptr;
  }
  b.start = b.pages + data_pages - b.rounded;
  memset(reinterpret_cast<void *>(b.pages), kPoison, data_pages);
  std::lock_guard<std::mutex> lock(d->buffers_mutex);
  b.id = d->next_id++;
  d->buffers[b.start] = b;
  if (d->tracing & pgqa_sim::kTraceSanitize) d->init.allocated(b.start, b.size);
  return reinterpret_cast<void *>(b.start);
}

int pgqa_sim_free(void *device, void *ptr) {
  Device *d = static_cast<Device *>(device);
  std::lock_guard<std::mutex> launch(d->launch_mutex);  // not while a launch snapshots it
  std::lock_guard<std::mutex> lock(d->buffers_mutex);
  auto it = d->buffers.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == d->buffers.end()) return 1;
  munmap(reinterpret_cast<void *>(it->second.map_base), it->second.map_len);
  d->init.freed(it->first);
  d->buffers.erase(it);
  return 0;
}

void pgqa_sim_set_race_check(void *device, int on) { static_cast<Device *>(device)->race_check = on != 0; }
int pgqa_sim_race_check(void *device) { return static_cast<Device *>(device)->race_check; }

// The report of the device's last failed launch ("" when none failed); valid until the next.
const char *pgqa_sim_last_report(void *device) { return static_cast<Device *>(device)->last_report.c_str(); }

// The multiprocessors of the emulated device (the planner sizes splits from them).
int pgqa_sim_sm_count(void) { return pgqa_sim::kMultiProcessors; }

// Counts the bytes cp.async brings from [ptr, ptr + len) in later launches (first schedule only).
void pgqa_sim_watch(void *device, const void *ptr, size_t len) {
  Device *d = static_cast<Device *>(device);
  std::lock_guard<std::mutex> lock(d->launch_mutex);
  d->watches.emplace_back(reinterpret_cast<uintptr_t>(ptr), len);
}
void pgqa_sim_unwatch_all(void *device) {
  Device *d = static_cast<Device *>(device);
  std::lock_guard<std::mutex> lock(d->launch_mutex);
  d->watches.clear();
  d->watched_bytes = 0;
}
uint64_t pgqa_sim_watched_bytes(void *device) { return static_cast<Device *>(device)->watched_bytes.load(); }
uint64_t pgqa_sim_launches(void *device) { return static_cast<Device *>(device)->launches; }

// Traced launches from now on (flags: 1 keeps each launch's profile, 2 runs racecheck and
// initcheck; the caller launches the pgqa_trace_* entry points). Buffers allocated while 2 is on
// start unwritten for initcheck.
void pgqa_sim_set_tracing(void *device, int flags) {
  Device *d = static_cast<Device *>(device);
  std::lock_guard<std::mutex> lock(d->launch_mutex);
  d->tracing = flags;
}
int pgqa_sim_tracing(void *device) { return static_cast<Device *>(device)->tracing; }

// The host wrote [ptr, ptr + len) of a device buffer (initcheck counts those bytes as written).
void pgqa_sim_mark_written(void *device, const void *ptr, size_t len) {
  Device *d = static_cast<Device *>(device);
  if ((d->tracing & pgqa_sim::kTraceSanitize) == 0) return;
  std::lock_guard<std::mutex> lock(d->buffers_mutex);
  d->init.written(reinterpret_cast<uintptr_t>(ptr), len);
}

// The profiles of the traced launches since the last call, as text (malloc'd: free it with
// pgqa_sim_free_text), one line per record, fields separated by tabs:
//   launch  kernel launcher grid.x grid.y grid.z block.x block.y block.z dynamic_smem blocks
//           kv_bytes_fetched max_block_inflight sum_block_inflight
//   site    where op space bytes requests lanes wavefronts ideal_wavefronts sectors ideal_sectors
//   phase   from to occurrences warps busy_warps
char *pgqa_sim_take_profile(void *device) {
  Device *d = static_cast<Device *>(device);
  std::vector<pgqa_sim::trace::LaunchProfile> launches;
  {
    std::lock_guard<std::mutex> lock(d->profile.mutex);
    launches.swap(d->profile.launches);
  }
  using pgqa_sim::format;
  std::string text;
  for (const auto &l : launches) {
    text += format("launch\t%s\t%s\t%u\t%u\t%u\t%u\t%u\t%u\t%zu\t%llu\t%llu\t%llu\t%llu\n", l.kernel.c_str(),
                   l.launcher.c_str(), l.grid.x, l.grid.y, l.grid.z, l.block.x, l.block.y, l.block.z, l.dynamic_smem,
                   static_cast<unsigned long long>(l.blocks), static_cast<unsigned long long>(l.kv_bytes_fetched),
                   static_cast<unsigned long long>(l.max_block_inflight),
                   static_cast<unsigned long long>(l.sum_block_inflight));
    for (const auto &s : l.sites)
      text += format("site\t%s\t%s\t%s\t%d\t%llu\t%llu\t%llu\t%llu\t%llu\t%llu\n",
                     pgqa_sim::trace::describe_pc(s.pc).c_str(), pgqa_sim::trace::op_name(s.op),
                     pgqa_sim::trace::space_name(s.space), s.bytes, static_cast<unsigned long long>(s.requests),
                     static_cast<unsigned long long>(s.lanes), static_cast<unsigned long long>(s.wavefronts),
                     static_cast<unsigned long long>(s.ideal_wavefronts), static_cast<unsigned long long>(s.sectors),
                     static_cast<unsigned long long>(s.ideal_sectors));
    for (const auto &p : l.phases)
      text += format("phase\t%s\t%s\t%llu\t%llu\t%llu\n", p.from.c_str(), p.to.c_str(),
                     static_cast<unsigned long long>(p.occurrences), static_cast<unsigned long long>(p.warps),
                     static_cast<unsigned long long>(p.busy_warps));
  }
  return strdup(text.c_str());
}
void pgqa_sim_free_text(char *text) { free(text); }

}  // extern "C"
