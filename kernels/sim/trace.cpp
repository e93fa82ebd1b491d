// trace.cpp: the tracer of the emulator's traced launches (see trace.h) and the hooks GCC's
// thread-sanitizer instrumentation calls from the traced copy of the kernels.
//
// The sm_90 rules applied (sources and which of them are models: docs/emulator.md, "Profiling the
// kernels"):
//   - a warp instruction is one request; its lanes are the lanes that reached the same site the
//     same number of times since the warp last stopped (SIMT reconvergence, as the emulator runs
//     a warp's lanes one after another between synchronisation points);
//   - shared memory: 32 banks of 4 bytes; lanes are served in phases of 32 (accesses of up to 4
//     bytes), 16 (8 bytes) or 8 (16 bytes) lanes; a phase costs as many wavefronts as the most
//     distinct 4-byte words any one bank holds (the same word is a broadcast), at least one;
//     ideal: ceil(active lanes x bytes / 128), at least one; ldmatrix: one phase per 8x8 matrix
//     (8 rows of 16 bytes), ideal one wavefront per matrix; cp.async's shared side as a store;
//   - global memory: sectors are the distinct aligned 32-byte blocks the active lanes' bytes
//     touch; ideal: the distinct bytes the lanes request, packed: ceil(distinct bytes / 32).

#include "trace.h"

#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <cstring>
#include <unordered_map>

#include "sanitize.h"

namespace pgqa_sim::trace {

namespace {

thread_local BlockTracer *t_tracer __attribute__((tls_model("initial-exec"))) = nullptr;

// The static TLS block of the executable (where `__shared__ static thread_local` arrays live):
// [thread pointer - size, thread pointer) on x86-64 (TLS variant II).
size_t g_tls_size = 0;
int tls_callback(struct dl_phdr_info *info, size_t, void *) {
  for (int i = 0; i < info->dlpi_phnum; ++i)
    if (info->dlpi_phdr[i].p_type == PT_TLS) {
      const size_t align = std::max<size_t>(info->dlpi_phdr[i].p_align, 1);
      g_tls_size = (info->dlpi_phdr[i].p_memsz + align - 1) / align * align;
    }
  return 1;  // the executable is the first object
}

uint64_t site_key(uintptr_t pc, Op op, Space space) {
  return static_cast<uint64_t>(pc) | (static_cast<uint64_t>(op) << 52) | (static_cast<uint64_t>(space) << 58);
}

// Wavefronts of one shared-memory phase: the most distinct 4-byte words in any one bank.
int phase_wavefronts(uint32_t *words, int n) {
  if (n == 0) return 0;
  std::sort(words, words + n);
  n = static_cast<int>(std::unique(words, words + n) - words);
  int per_bank[32] = {};
  int most = 0;
  for (int i = 0; i < n; ++i) most = std::max(most, ++per_bank[words[i] & 31]);
  return most;
}

}  // namespace

const char *op_name(Op op) {
  switch (op) {
    case Op::kLoad: return "load";
    case Op::kStore: return "store";
    case Op::kCpAsync: return "cp.async";
    case Op::kLdmatrix: return "ldmatrix";
    case Op::kShuffle: return "shuffle";
    case Op::kMma: return "mma";
    case Op::kBallot: return "ballot";
    case Op::kSyncWarp: return "syncwarp";
  }
  return "?";
}

const char *space_name(Space space) {
  switch (space) {
    case Space::kShared: return "shared";
    case Space::kKv: return "kv";
    case Space::kGlobal: return "global";
    case Space::kNone: return "none";
  }
  return "?";
}

void set_tracer(BlockTracer *tracer) { t_tracer = tracer; }
BlockTracer *tracer() { return t_tracer; }

BlockTracer::BlockTracer(LaunchProfile *profile, std::mutex *profile_mutex, std::vector<Range> buffers,
                         std::vector<Range> watches, bool profiling, Sanitizer *sanitizer)
    : profile_(profile),
      profile_mutex_(profile_mutex),
      profiling_(profiling),
      buffers_(std::move(buffers)),
      watches_(std::move(watches)),
      sanitizer_(sanitizer) {
  static std::once_flag once;
  std::call_once(once, [] { dl_iterate_phdr(tls_callback, nullptr); });
  const uintptr_t tp = reinterpret_cast<uintptr_t>(__builtin_thread_pointer());
  tls_end_ = tp;
  tls_start_ = tp - g_tls_size;
}

BlockTracer::~BlockTracer() {
  std::lock_guard<std::mutex> lock(*profile_mutex_);
  LaunchProfile &p = *profile_;
  p.blocks += blocks_;
  p.max_block_inflight = std::max(p.max_block_inflight, max_block_inflight_);
  p.sum_block_inflight += sum_block_inflight_;
  for (const SiteCounters &s : sites_) {
    auto found = std::find_if(p.sites.begin(), p.sites.end(), [&](const SiteCounters &o) {
      return o.pc == s.pc && o.op == s.op && o.space == s.space;
    });
    if (found == p.sites.end()) {
      p.sites.push_back(s);
      continue;
    }
    found->bytes = std::max(found->bytes, s.bytes);
    found->requests += s.requests;
    found->lanes += s.lanes;
    found->wavefronts += s.wavefronts;
    found->ideal_wavefronts += s.ideal_wavefronts;
    found->sectors += s.sectors;
    found->ideal_sectors += s.ideal_sectors;
  }
  for (const PhaseCounters &ph : phases_) {
    auto found = std::find_if(p.phases.begin(), p.phases.end(),
                              [&](const PhaseCounters &o) { return o.from == ph.from && o.to == ph.to; });
    if (found == p.phases.end()) {
      p.phases.push_back(ph);
      continue;
    }
    found->occurrences += ph.occurrences;
    found->warps += ph.warps;
    found->busy_warps += ph.busy_warps;
  }
}

void BlockTracer::begin_block(uint64_t block, int threads, const unsigned char *smem, size_t smem_bytes) {
  threads_ = threads;
  smem_ = smem;
  smem_bytes_ = smem_bytes;
  events_.resize(threads);
  for (auto &e : events_) e.clear();
  warp_busy_.assign((threads + 31) / 32, 0);
  phase_from_ = "entry";
  inflight_.assign(threads, 0);
  peak_inflight_.assign(threads, 0);
  if (sanitizer_) sanitizer_->begin_block(block, threads, smem, smem_bytes);
}

Space BlockTracer::classify(uintptr_t a, int bytes) const {
  const uintptr_t s = reinterpret_cast<uintptr_t>(smem_);
  if (a >= s && a < s + smem_bytes_) return Space::kShared;
  if (a >= tls_start_ && a < tls_end_) {
    // The runtime's own thread-locals the kernels read (threadIdx, blockIdx) are not memory of
    // the emulated device.
    const uintptr_t idx = reinterpret_cast<uintptr_t>(&tls_thread_idx);
    const uintptr_t blk = reinterpret_cast<uintptr_t>(&tls_block);
    if ((a >= idx && a < idx + sizeof(void *)) || (a >= blk && a < blk + sizeof(void *))) return Space::kNone;
    return Space::kShared;
  }
  if (a >= cached_.start && a < cached_.start + cached_.size) return cached_space_;
  auto it = std::upper_bound(buffers_.begin(), buffers_.end(), a,
                             [](uintptr_t x, const Range &r) { return x < r.start; });
  if (it == buffers_.begin()) return Space::kNone;
  --it;
  if (a >= it->start + it->size) return Space::kNone;
  // A buffer wholly inside one watched range, or outside all, has one space: remember it.
  bool inside = false, partly = false;
  for (const Range &w : watches_) {
    const bool overlaps = w.start < it->start + it->size && it->start < w.start + w.size;
    inside |= w.start <= it->start && it->start + it->size <= w.start + w.size;
    partly |= overlaps;
  }
  if (inside || !partly) {
    cached_ = *it;
    cached_space_ = inside ? Space::kKv : Space::kGlobal;
    return cached_space_;
  }
  for (const Range &w : watches_)
    if (a >= w.start && a + bytes <= w.start + w.size) return Space::kKv;
  return Space::kGlobal;
}

void BlockTracer::access(uintptr_t address, int bytes, bool write, uintptr_t pc) {
  const Space space = classify(address, bytes);
  if (space == Space::kNone) return;
  if (profiling_) {
    events_[thread_].push_back({pc, address, static_cast<uint16_t>(bytes), write ? Op::kStore : Op::kLoad, space});
    warp_busy_[thread_ / 32] = 1;
  }
  if (sanitizer_) sanitizer_->access(thread_, address, bytes, write, space, pc);
}

void BlockTracer::cp_async(uintptr_t dst, uintptr_t src, int bytes, uintptr_t pc) {
  const Space from = classify(src, bytes);
  if (profiling_) {
    events_[thread_].push_back({pc, src, static_cast<uint16_t>(bytes), Op::kCpAsync, from});
    events_[thread_].push_back({pc, dst, static_cast<uint16_t>(bytes), Op::kCpAsync, Space::kShared});
    warp_busy_[thread_ / 32] = 1;
  }
  inflight_[thread_] += bytes;
  peak_inflight_[thread_] = std::max(peak_inflight_[thread_], inflight_[thread_]);
  if (sanitizer_) {
    sanitizer_->access(thread_, src, bytes, false, from, pc);
    sanitizer_->cp_async_issued(thread_, dst, bytes, pc);
  }
}

void BlockTracer::cp_async_landed(uintptr_t dst, int bytes) {
  inflight_[thread_] -= std::min<uint64_t>(inflight_[thread_], bytes);
  if (sanitizer_) sanitizer_->cp_async_landed(thread_, dst, bytes);
}

SiteCounters &BlockTracer::site(uintptr_t pc, Op op, Space space, int bytes) {
  const uint64_t key = site_key(pc, op, space);
  auto it = std::lower_bound(site_index_.begin(), site_index_.end(), std::make_pair(key, size_t{0}));
  if (it == site_index_.end() || it->first != key) {
    SiteCounters s;
    s.pc = pc;
    s.op = op;
    s.space = space;
    it = site_index_.insert(it, {key, sites_.size()});
    sites_.push_back(s);
  }
  SiteCounters &s = sites_[it->second];
  s.bytes = std::max(s.bytes, bytes);
  return s;
}

void BlockTracer::count_request(SiteCounters &s, const uintptr_t *addresses, unsigned mask, int bytes) {
  const int active = __builtin_popcount(mask);
  s.requests += 1;
  s.lanes += active;
  if (s.space == Space::kShared) {
    const int group = bytes <= 4 ? 32 : bytes <= 8 ? 16 : 8;
    uint64_t wavefronts = 0;
    for (int g0 = 0; g0 < 32; g0 += group) {
      uint32_t words[64];
      int n = 0;
      for (int l = g0; l < g0 + group; ++l) {
        if (((mask >> l) & 1u) == 0) continue;
        for (uintptr_t w = addresses[l] >> 2; w <= (addresses[l] + bytes - 1) >> 2 && n < 64; ++w)
          words[n++] = static_cast<uint32_t>(w);
      }
      wavefronts += phase_wavefronts(words, n);
    }
    s.wavefronts += std::max<uint64_t>(wavefronts, 1);
    s.ideal_wavefronts += std::max<uint64_t>((static_cast<uint64_t>(active) * bytes + 127) / 128, 1);
  } else if (s.space == Space::kKv || s.space == Space::kGlobal) {
    // Sectors: the distinct 32-byte blocks touched. Ideal: the distinct bytes requested (lanes
    // reading one address share it), packed into sectors.
    uintptr_t sectors[64], starts[32];
    int n = 0, m = 0;
    for (int l = 0; l < 32; ++l) {
      if (((mask >> l) & 1u) == 0) continue;
      starts[m++] = addresses[l];
      for (uintptr_t sec = addresses[l] >> 5; sec <= (addresses[l] + bytes - 1) >> 5 && n < 64; ++sec)
        sectors[n++] = sec;
    }
    std::sort(sectors, sectors + n);
    s.sectors += std::unique(sectors, sectors + n) - sectors;
    std::sort(starts, starts + m);
    uint64_t distinct = 0;
    uintptr_t covered = 0;  // bytes below this are counted
    for (int k = 0; k < m; ++k) {
      const uintptr_t from = std::max(starts[k], covered), to = starts[k] + bytes;
      if (to > from) distinct += to - from;
      covered = std::max(covered, to);
    }
    s.ideal_sectors += (distinct + 31) / 32;
  }
}

void BlockTracer::warp_stopped(int warp) {
  if (!profiling_) return;
  // (site, occurrence) -> request, in the order the lanes issued them.
  request_index_.clear();
  requests_.clear();
  request_sites_.clear();
  const int first = 32 * warp, last = std::min(threads_, first + 32);
  for (int t = first; t < last; ++t) {
    if (events_[t].empty()) continue;
    occurrence_.clear();
    const int lane = t - first;
    for (const Event &e : events_[t]) {
      const uint64_t site = site_key(e.pc, e.op, e.space);
      const uint64_t k = occurrence_[site]++;
      const uint64_t key = site * 0x9e3779b97f4a7c15ull ^ k;
      auto found = request_index_.find(key);
      size_t r;
      // A hash collision of two (site, occurrence) pairs would merge requests: checked.
      if (found == request_index_.end() || request_sites_[found->second] != site) {
        r = requests_.size();
        request_index_[key] = r;
        requests_.push_back(Request{e.op, e.space, e.bytes, 0, {}});
        request_sites_.push_back(site);
      } else {
        r = found->second;
      }
      Request &req = requests_[r];
      req.mask |= 1u << lane;
      req.address[lane] = e.address;
      req.bytes = std::max<int>(req.bytes, e.bytes);
    }
    events_[t].clear();
  }
  for (size_t r = 0; r < requests_.size(); ++r) {
    const Request &req = requests_[r];
    const uintptr_t pc = static_cast<uintptr_t>(request_sites_[r] & ((uint64_t{1} << 52) - 1));
    count_request(site(pc, req.op, req.space, req.bytes), req.address, req.mask, req.bytes);
  }
}

void BlockTracer::collective(int warp, Op op, unsigned mask, uintptr_t pc, const uintptr_t *rows) {
  warp_busy_[warp] = 1;
  if (!profiling_) {
    if (sanitizer_) {
      if (op == Op::kLdmatrix)
        for (int l = 0; l < 32; ++l) sanitizer_->access(32 * warp + l, rows[l], 16, false, Space::kShared, pc);
      sanitizer_->collective(warp, mask);
    }
    return;
  }
  if (op == Op::kLdmatrix) {
    SiteCounters &s = site(pc, op, Space::kShared, 16);
    s.requests += 1;
    s.lanes += 32;
    for (int m = 0; m < 4; ++m) {
      uint32_t words[32];
      int n = 0;
      for (int l = 8 * m; l < 8 * m + 8; ++l)
        for (int w = 0; w < 4; ++w) words[n++] = static_cast<uint32_t>((rows[l] >> 2) + w);
      s.wavefronts += std::max(phase_wavefronts(words, n), 1);
      s.ideal_wavefronts += 1;
    }
    if (sanitizer_)
      for (int l = 0; l < 32; ++l) sanitizer_->access(32 * warp + l, rows[l], 16, false, Space::kShared, pc);
  } else {
    SiteCounters &s = site(pc, op, Space::kNone, 4);
    s.requests += 1;
    s.lanes += __builtin_popcount(mask);
  }
  if (sanitizer_) sanitizer_->collective(warp, mask);
}

void BlockTracer::close_phase(const std::string &to, int live_warps) {
  auto found = std::find_if(phases_.begin(), phases_.end(),
                            [&](const PhaseCounters &o) { return o.from == phase_from_ && o.to == to; });
  if (found == phases_.end()) {
    PhaseCounters ph;
    ph.from = phase_from_;
    ph.to = to;
    phases_.push_back(ph);
    found = phases_.end() - 1;
  }
  found->occurrences += 1;
  found->warps += live_warps;
  for (char &busy : warp_busy_) {
    found->busy_warps += busy != 0;
    busy = 0;
  }
  phase_from_ = to;
}

void BlockTracer::barrier(const char *site, int live_warps) {
  const char *slash = strrchr(site, '/');
  close_phase(slash != nullptr ? slash + 1 : site, live_warps);
  if (sanitizer_) sanitizer_->barrier();
}

void BlockTracer::end_block() {
  close_phase("exit", static_cast<int>(warp_busy_.size()));
  ++blocks_;
  // The threads of a block run one pipeline, but the emulator runs them one after another: a
  // block's bytes in flight are the sum of its threads' peaks (model).
  uint64_t block_inflight = 0;
  for (uint64_t peak : peak_inflight_) block_inflight += peak;
  max_block_inflight_ = std::max(max_block_inflight_, block_inflight);
  sum_block_inflight_ += block_inflight;
  if (sanitizer_) sanitizer_->end_block();
}

}  // namespace pgqa_sim::trace

// ---------------------------------------------------------------------------------------------
// The thread-sanitizer hooks (GCC -fsanitize=thread with no sanitizer runtime linked): every
// load and store of the traced kernels, with the caller's address naming the site.

using pgqa_sim::trace::t_tracer;

#define PGQA_TRACE_HOOKS(n)                                                                  \
  extern "C" void __tsan_read##n(void *a) {                                                  \
    if (auto *t = t_tracer)                                                                  \
      t->access(reinterpret_cast<uintptr_t>(a), n, false,                                    \
                reinterpret_cast<uintptr_t>(__builtin_return_address(0)));                   \
  }                                                                                          \
  extern "C" void __tsan_write##n(void *a) {                                                 \
    if (auto *t = t_tracer)                                                                  \
      t->access(reinterpret_cast<uintptr_t>(a), n, true,                                     \
                reinterpret_cast<uintptr_t>(__builtin_return_address(0)));                   \
  }                                                                                          \
  extern "C" void __tsan_unaligned_read##n(void *a) {                                        \
    if (auto *t = t_tracer)                                                                  \
      t->access(reinterpret_cast<uintptr_t>(a), n, false,                                    \
                reinterpret_cast<uintptr_t>(__builtin_return_address(0)));                   \
  }                                                                                          \
  extern "C" void __tsan_unaligned_write##n(void *a) {                                       \
    if (auto *t = t_tracer)                                                                  \
      t->access(reinterpret_cast<uintptr_t>(a), n, true,                                     \
                reinterpret_cast<uintptr_t>(__builtin_return_address(0)));                   \
  }

PGQA_TRACE_HOOKS(1)
PGQA_TRACE_HOOKS(2)
PGQA_TRACE_HOOKS(4)
PGQA_TRACE_HOOKS(8)
PGQA_TRACE_HOOKS(16)

extern "C" void __tsan_read_range(void *a, unsigned long size) {
  if (auto *t = t_tracer)
    t->access(reinterpret_cast<uintptr_t>(a), static_cast<int>(size), false,
              reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
}
extern "C" void __tsan_write_range(void *a, unsigned long size) {
  if (auto *t = t_tracer)
    t->access(reinterpret_cast<uintptr_t>(a), static_cast<int>(size), true,
              reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
}
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void *) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_update(void **, void *) {}
extern "C" void __tsan_vptr_read(void **) {}
