// sanitize.cpp: racecheck and initcheck (see sanitize.h).

#include "sanitize.h"

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <mutex>

namespace pgqa_sim::trace {

namespace {

constexpr int kReportsPerKind = 4;

std::string hex(uintptr_t x) {
  char buffer[32];
  snprintf(buffer, sizeof buffer, "0x%llx", static_cast<unsigned long long>(x));
  return buffer;
}

std::string symbolize(uintptr_t pc);

}  // namespace

std::string describe_pc(uintptr_t pc) {
  static std::mutex mutex;
  static std::map<uintptr_t, std::string> cache;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto found = cache.find(pc);
    if (found != cache.end()) return found->second;
  }
  std::string text = symbolize(pc);
  std::lock_guard<std::mutex> lock(mutex);
  return cache.emplace(pc, text).first->second;
}

namespace {
std::string symbolize(uintptr_t pc) {
  Dl_info info;
  if (pc == 0 || dladdr(reinterpret_cast<void *>(pc), &info) == 0 || info.dli_fname == nullptr) return hex(pc);
  // Position-independent binaries: addr2line takes the offset from the load base.
  const uintptr_t offset = pc - 1 - reinterpret_cast<uintptr_t>(info.dli_fbase);
  std::string path = info.dli_fname;
  if (path.empty() || path.find('\'') != std::string::npos) return hex(pc);
  const std::string command = "addr2line -C -f -i -e '" + path + "' " + hex(offset) + " 2>/dev/null";
  FILE *pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return hex(pc);
  std::vector<std::string> lines;
  char buffer[4096];
  while (fgets(buffer, sizeof buffer, pipe) != nullptr) {
    std::string line = buffer;
    while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
    lines.push_back(line);
  }
  pclose(pipe);
  // Pairs of (function, file:line), innermost first.
  std::string text;
  for (size_t i = 0; i + 1 < lines.size(); i += 2) {
    std::string where = lines[i + 1];
    const size_t slash = where.rfind('/');
    if (slash != std::string::npos) where = where.substr(slash + 1);
    const size_t paren = where.find(" (discriminator");
    if (paren != std::string::npos) where.resize(paren);
    if (where.rfind("??", 0) == 0) continue;
    // GCC's line table names a few instructions of a kernel file after the build's wrapper
    // translation unit (sim-merge.cu.cpp, which only includes merge.cu) with merge.cu's line
    // numbers: name them after the kernel file.
    if (where.rfind("sim-", 0) == 0) {
      const size_t cpp = where.find(".cpp:");
      if (cpp != std::string::npos) where = where.substr(4, cpp - 4) + where.substr(cpp + 4);
    }
    text += text.empty() ? where : " < " + where;
  }
  return text.empty() ? hex(pc) : text;
}
}  // namespace

void DeviceShadow::written(uintptr_t address, size_t size) {
  auto it = buffers_.upper_bound(address);
  if (it == buffers_.begin()) return;
  --it;
  std::vector<uint8_t> &b = it->second.written;
  if (address >= it->first + b.size()) return;
  const size_t from = address - it->first;
  const size_t to = std::min(b.size(), from + size);
  memset(b.data() + from, 1, to - from);
}

uintptr_t DeviceShadow::first_unwritten(uintptr_t address, size_t size) const {
  auto it = buffers_.upper_bound(address);
  if (it == buffers_.begin()) return 0;
  --it;
  const std::vector<uint8_t> &b = it->second.written;
  if (address >= it->first + b.size()) return 0;
  const size_t from = address - it->first;
  const size_t to = std::min(b.size(), from + size);
  for (size_t k = from; k < to; ++k)
    if (!b[k]) return it->first + k;
  return 0;
}

std::pair<DeviceShadow::Touch *, size_t> DeviceShadow::touches(uintptr_t address, size_t size, uint32_t launch) {
  auto it = buffers_.upper_bound(address);
  if (it == buffers_.begin()) return {nullptr, 0};
  --it;
  Buffer &b = it->second;
  if (address >= it->first + b.written.size()) return {nullptr, 0};
  if (b.touches.empty()) b.touches.resize(b.written.size());
  const size_t from = address - it->first;
  const size_t n = std::min(size, b.written.size() - from);
  Touch *t = b.touches.data() + from;
  for (size_t k = 0; k < n; ++k)
    if (t[k].launch != launch) {
      t[k] = Touch();
      t[k].launch = launch;
    }
  return {t, n};
}

Sanitizer::Sanitizer(std::string kernel, DeviceShadow *shadow)
    : kernel_(std::move(kernel)), shadow_(shadow), launch_(shadow->next_launch()) {}

int32_t Sanitizer::pc_offset(uintptr_t pc) {
  return static_cast<int32_t>(static_cast<int64_t>(pc) - static_cast<int64_t>(reinterpret_cast<uintptr_t>(&describe_pc)));
}
uintptr_t Sanitizer::pc_of(int32_t offset) {
  return offset == 0 ? 0 : reinterpret_cast<uintptr_t>(&describe_pc) + static_cast<int64_t>(offset);
}

void Sanitizer::begin_block(uint64_t block, int threads, const unsigned char *smem, size_t smem_bytes) {
  block_ = block;
  ++stamp_;
  smem_ = smem;
  smem_bytes_ = smem_bytes;
  epoch_ = 0;
  if (shared_.size() < smem_bytes) shared_.resize(smem_bytes);
  static_.clear();
  warp_sync_.assign((threads + 31) / 32, 0);
  lane_sync_.assign(threads, 0);
}


// Whether `thread` is ordered after the access `earlier` (same block epoch assumed): lanes of one
// warp, both of which took part in a collective of that warp since.
bool Sanitizer::ordered(const Touch &earlier, int thread) const {
  if (earlier.thread / 32 != thread / 32) return false;
  return lane_sync_[thread] > earlier.sync && lane_sync_[earlier.thread] > earlier.sync;
}

bool Sanitizer::wanted(const std::string &key) {
  ++hazards_;
  return seen_[key]++ < kReportsPerKind;
}

void Sanitizer::hazard(const char *what, const Touch &earlier, bool earlier_write, int thread, bool write,
                       uintptr_t pc, uintptr_t address) {
  const uintptr_t s = reinterpret_cast<uintptr_t>(smem_);
  const std::string where = address >= s && address < s + smem_bytes_
                                ? "shared byte " + std::to_string(address - s)
                                : "static shared " + hex(address);
  if (!wanted(std::string(what) + std::to_string(earlier.pc) + hex(pc))) return;
  char text[512];
  snprintf(text, sizeof text,
           "racecheck: shared-memory %s hazard in kernel %s, block %llu, %s: thread %d (warp %d, lane %d) %s at ",
           what, kernel_.c_str(), static_cast<unsigned long long>(block_), where.c_str(), earlier.thread,
           earlier.thread / 32, earlier.thread % 32, earlier_write ? "wrote" : "read");
  std::string line = text;
  line += describe_pc(pc_of(earlier.pc));
  snprintf(text, sizeof text, ", then thread %d (warp %d, lane %d) %s at ", thread, thread / 32, thread % 32,
           write ? "wrote" : "read");
  line += text;
  line += describe_pc(pc);
  line += " with no __syncthreads (or, within a warp, no warp collective of both lanes) between them";
  reports_.push_back(line);
}

void Sanitizer::shared_access(int thread, uintptr_t address, int bytes, bool write, uintptr_t pc) {
  const Touch now{thread, epoch_, warp_sync_[thread / 32], pc_offset(pc)};
  const uintptr_t s = reinterpret_cast<uintptr_t>(smem_);
  const bool dynamic = address >= s && address + bytes <= s + smem_bytes_;
  for (int k = 0; k < bytes; ++k) {
    SharedByte &b = dynamic ? shared_[address - s + k] : static_[address + k];
    if (b.block != stamp_) {
      b = SharedByte();
      b.block = stamp_;
    }
    if (!write && !b.written) {
      if (wanted("init-shared" + hex(pc))) {
        char text[256];
        snprintf(text, sizeof text,
                 "initcheck: kernel %s, block %llu, thread %d reads %s never written in this block at ",
                 kernel_.c_str(), static_cast<unsigned long long>(block_), thread,
                 dynamic ? ("shared byte " + std::to_string(address + k - s)).c_str()
                         : ("static shared " + hex(address + k)).c_str());
        reports_.push_back(text + describe_pc(pc));
      }
      b.written = true;  // one report per byte
    }
    const Touch &w = b.write;
    if (w.thread >= 0 && w.thread != thread && w.epoch == epoch_ && !ordered(w, thread)) {
      hazard(write ? "write-after-write" : "read-after-write", w, true, thread, write, pc, address + k);
      b.write.thread = -1;  // one report per pair
    }
    if (write) {
      for (const Touch *r : {&b.first_read, &b.last_read})
        if (r->thread >= 0 && r->thread != thread && r->epoch == epoch_ && !ordered(*r, thread)) {
          hazard("write-after-read", *r, false, thread, true, pc, address + k);
          break;
        }
      b.write = now;
      b.written = true;
      b.first_read = Touch();
      b.last_read = Touch();
    } else {
      if (b.first_read.thread < 0 || b.first_read.epoch != epoch_) b.first_read = now;
      b.last_read = now;
    }
  }
}

void Sanitizer::global_access(int thread, uintptr_t address, int bytes, bool write, uintptr_t pc) {
  if (!write) {
    const uintptr_t unwritten = shadow_->first_unwritten(address, bytes);
    if (unwritten != 0 && wanted("init-global" + hex(pc))) {
      char text[256];
      snprintf(text, sizeof text,
               "initcheck: kernel %s, block %llu, thread %d reads global %s (%d bytes from %s), never written since "
               "its allocation, at ",
               kernel_.c_str(), static_cast<unsigned long long>(block_), thread, hex(unwritten).c_str(), bytes,
               hex(address).c_str());
      reports_.push_back(text + describe_pc(pc));
    }
  }
  if (write) shadow_->written(address, bytes);
  const int32_t block = static_cast<int32_t>(block_);
  const auto span = shadow_->touches(address, bytes, launch_);
  for (size_t k = 0; k < span.second; ++k) {
    DeviceShadow::Touch &g = span.first[k];
    const char *what = nullptr;
    int32_t other = -1;
    uintptr_t other_pc = 0;
    bool other_write = false;
    if (g.writer >= 0 && g.writer != block) {
      what = write ? "write-after-write" : "read-after-write";
      other = g.writer;
      other_pc = g.write_pc;
      other_write = true;
    } else if (write && g.reader >= 0 && g.reader != block) {
      what = "write-after-read";
      other = g.reader;
      other_pc = g.read_pc;
    }
    if (what != nullptr && wanted(std::string("global") + what + hex(other_pc) + hex(pc))) {
      char text[512];
      snprintf(text, sizeof text,
               "racecheck: global-memory %s hazard between blocks in kernel %s: block %lld %s %s at ", what,
               kernel_.c_str(), static_cast<long long>(other), other_write ? "wrote" : "read",
               hex(address + k).c_str());
      std::string line = text + describe_pc(other_pc);
      snprintf(text, sizeof text, ", block %lld (thread %d) %s it at ", static_cast<long long>(block), thread,
               write ? "wrote" : "read");
      line += text + describe_pc(pc);
      reports_.push_back(line);
    }
    if (write) {
      g.writer = block;
      g.write_pc = pc;
    } else if (g.reader < 0 || g.reader == block) {
      g.reader = block;
      g.read_pc = pc;
    }
  }
}

void Sanitizer::access(int thread, uintptr_t address, int bytes, bool write, Space space, uintptr_t pc) {
  if (space == Space::kShared) {
    shared_access(thread, address, bytes, write, pc);
  } else if (space == Space::kGlobal || space == Space::kKv) {
    global_access(thread, address, bytes, write, pc);
  }
}

void Sanitizer::cp_async_issued(int thread, uintptr_t dst, int bytes, uintptr_t pc) {
  // The copy may land at any time until its wait_group: a write now (against what came before)
  // and again when it lands (against what came between); the bytes count as written only then.
  const uintptr_t s = reinterpret_cast<uintptr_t>(smem_);
  if (dst < s || dst + bytes > s + smem_bytes_) return;  // the emulator refuses it
  std::vector<char> was_written(bytes);
  for (int k = 0; k < bytes; ++k) {
    const SharedByte &b = shared_[dst - s + k];
    was_written[k] = b.block == stamp_ && b.written;
  }
  shared_access(thread, dst, bytes, true, pc);
  for (int k = 0; k < bytes; ++k) shared_[dst - s + k].written = was_written[k];
}

void Sanitizer::cp_async_landed(int thread, uintptr_t dst, int bytes) {
  const uintptr_t s = reinterpret_cast<uintptr_t>(smem_);
  if (dst < s || dst + bytes > s + smem_bytes_) return;
  const SharedByte &first = shared_[dst - s];
  const uintptr_t pc = first.block == stamp_ && first.write.thread == thread ? pc_of(first.write.pc) : 0;
  shared_access(thread, dst, bytes, true, pc);
}

void Sanitizer::collective(int warp, unsigned mask) {
  const uint32_t count = ++warp_sync_[warp];
  for (int l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && 32 * warp + l < static_cast<int>(lane_sync_.size())) lane_sync_[32 * warp + l] = count;
}

void Sanitizer::barrier() { ++epoch_; }

void Sanitizer::end_block() {}

}  // namespace pgqa_sim::trace
