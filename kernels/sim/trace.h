// trace.h: what the runtime (runtime.cpp) tells the tracer (trace.cpp) about a traced launch.
//
// The traced copy of the kernels (PGQA_SIM_TRACED: compiled with GCC's thread-sanitizer
// instrumentation, no sanitizer runtime) calls __tsan_read{1,2,4,8,16} / __tsan_write* before
// every load and store; trace.cpp defines those hooks. The runtime reports the rest: which CUDA
// thread runs, cp.async, warp collectives, barriers, block and launch boundaries. From that the
// tracer builds warp-level requests (the 32 lanes' accesses of one instruction: same site, same
// dynamic occurrence in each lane since the warp last stopped) and the profile's counters, and
// hands every access to the sanitizers (sanitize.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "sim.h"

namespace pgqa_sim::trace {

// What an access or a warp collective is.
enum class Op : uint8_t { kLoad, kStore, kCpAsync, kLdmatrix, kShuffle, kMma, kBallot, kSyncWarp };
// Where its bytes are: shared memory, a K/V page (a watched range: the kv_bytes_fetched
// counter's), other global memory, or none (thread-private: a fiber's stack, the parameters).
enum class Space : uint8_t { kShared, kKv, kGlobal, kNone };

const char *op_name(Op op);
const char *space_name(Space space);

// A byte range of device memory.
struct Range {
  uintptr_t start;
  size_t size;
};

// The counters of one source site (one instruction address of the traced code, or the caller of
// a runtime call such as cp.async) in one space, summed over the launch.
struct SiteCounters {
  uintptr_t pc = 0;
  Op op = Op::kLoad;
  Space space = Space::kNone;
  int bytes = 0;               // per lane
  uint64_t requests = 0;       // warp-level instructions
  uint64_t lanes = 0;          // active lanes, summed over requests
  uint64_t wavefronts = 0;     // shared: L1 wavefronts (sm_90 bank rules)
  uint64_t ideal_wavefronts = 0;
  uint64_t sectors = 0;        // global: distinct 32-byte sectors
  uint64_t ideal_sectors = 0;  // the distinct bytes requested, packed into sectors
};

// One phase of a block: from one __syncthreads (or the kernel's entry) to the next (or the
// exit), summed over its occurrences.
struct PhaseCounters {
  std::string from, to;  // "file:line" of the barriers, "entry" / "exit"
  uint64_t occurrences = 0;
  uint64_t warps = 0;       // warps alive at its start, summed
  uint64_t busy_warps = 0;  // warps that made any access or collective in it, summed
};

// A traced launch's profile (the first schedule only).
struct LaunchProfile {
  std::string kernel, launcher;
  dim3 grid, block;
  size_t dynamic_smem = 0;
  uint64_t blocks = 0;
  uint64_t kv_bytes_fetched = 0;  // the watched cp.async bytes, as the device counter counts them
  // Most cp.async bytes one block had issued and not waited for: the sum of its threads' peaks.
  uint64_t max_block_inflight = 0;
  uint64_t sum_block_inflight = 0;  // per-block maxima, summed (mean = sum / blocks)
  std::vector<SiteCounters> sites;
  std::vector<PhaseCounters> phases;
};

// The profiles of a device's traced launches since it last handed them over.
struct DeviceProfile {
  std::mutex mutex;
  std::vector<LaunchProfile> launches;
};

class Sanitizer;

// The tracer of one worker thread while it runs blocks of one traced launch.
class BlockTracer {
 public:
  // `buffers`: the device's buffers (sorted by start); `watches`: the K/V ranges; `profiling`:
  // count requests (else only the sanitizer, if any, sees the accesses); `sanitizer`: the
  // launch's, or null.
  BlockTracer(LaunchProfile *profile, std::mutex *profile_mutex, std::vector<Range> buffers,
              std::vector<Range> watches, bool profiling, Sanitizer *sanitizer);
  ~BlockTracer();  // merges this worker's counters into the launch profile

  // A block starts: `threads` CUDA threads, dynamic shared memory [smem, smem + smem_bytes).
  void begin_block(uint64_t block, int threads, const unsigned char *smem, size_t smem_bytes);
  // The fiber of CUDA thread `linear` (of the block) runs now.
  void set_thread(int linear) { thread_ = linear; }
  int thread() const { return thread_; }
  // A load or store of the traced code (`pc`: its return address into the kernel).
  void access(uintptr_t address, int bytes, bool write, uintptr_t pc);
  // cp.async: `bytes` from global `src` to shared `dst`.
  void cp_async(uintptr_t dst, uintptr_t src, int bytes, uintptr_t pc);
  // wait_group retired `bytes` of this thread's copies (they land in shared memory now).
  void cp_async_landed(uintptr_t dst, int bytes);
  // A warp collective executed for the lanes of `mask` of `warp`; ldmatrix passes the lanes'
  // row addresses (32 entries).
  void collective(int warp, Op op, unsigned mask, uintptr_t pc, const uintptr_t *rows);
  // Every lane of `warp` has stopped (at a barrier, a collective or its exit): its accesses
  // since it last stopped become requests.
  void warp_stopped(int warp);
  // A __syncthreads at `site` released the block; `live_warps`: warps with a live thread.
  void barrier(const char *site, int live_warps);
  // The block ended (every thread exited).
  void end_block();

 private:
  struct Event {
    uintptr_t pc;
    uintptr_t address;
    uint16_t bytes;
    Op op;
    Space space;
  };
  Space classify(uintptr_t address, int bytes) const;
  SiteCounters &site(uintptr_t pc, Op op, Space space, int bytes);
  void count_request(SiteCounters &s, const uintptr_t *addresses, unsigned mask, int bytes);
  void close_phase(const std::string &to, int live_warps);

  struct Request {
    Op op;
    Space space;
    int bytes;
    unsigned mask;
    uintptr_t address[32];
  };

  LaunchProfile *profile_;
  std::mutex *profile_mutex_;
  bool profiling_;
  std::vector<Range> buffers_, watches_;
  Sanitizer *sanitizer_;
  const unsigned char *smem_ = nullptr;
  size_t smem_bytes_ = 0;
  uintptr_t tls_start_ = 0, tls_end_ = 0;  // the worker's static __shared__ (thread_local) arrays
  mutable Range cached_{0, 0};  // the last buffer classify found with a single space
  mutable Space cached_space_ = Space::kNone;
  int threads_ = 0, thread_ = 0;
  std::vector<std::vector<Event>> events_;  // per thread of the block, since its warp last stopped
  // warp_stopped's scratch: occurrences per site of one lane, (site, occurrence) -> request.
  std::unordered_map<uint64_t, uint32_t> occurrence_;
  std::unordered_map<uint64_t, size_t> request_index_;
  std::vector<Request> requests_;
  std::vector<uint64_t> request_sites_;
  std::vector<char> warp_busy_;             // per warp, in the current phase
  std::string phase_from_;
  std::vector<uint64_t> inflight_, peak_inflight_;  // per thread: cp.async bytes not waited for
  // This worker's counters (merged at destruction).
  std::vector<SiteCounters> sites_;
  std::vector<std::pair<uint64_t, size_t>> site_index_;  // (key, index into sites_), sorted
  std::vector<PhaseCounters> phases_;
  uint64_t blocks_ = 0, max_block_inflight_ = 0, sum_block_inflight_ = 0;
};

// The worker's tracer while it runs a traced launch (null otherwise): the hooks record into it.
void set_tracer(BlockTracer *tracer);
BlockTracer *tracer();

}  // namespace pgqa_sim::trace
