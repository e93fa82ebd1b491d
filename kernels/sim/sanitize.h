// sanitize.h: racecheck and initcheck on the access trace of a traced launch (compute-sanitizer's
// semantics, on the emulator).
//
// racecheck, shared memory: two accesses to one byte by two threads of a block, at least one a
// write, with no __syncthreads between them. Lanes of one warp count as ordered only through a
// warp collective both took part in (__syncwarp, a shuffle, a ballot, ldmatrix, mma) after the
// earlier access: the emulator runs a warp's lanes one after another, so an exchange through
// shared memory without one is seen even when its value would come out right.
// racecheck, global memory: one byte written by one block and read or written by another block
// of the same launch.
// initcheck: a read of global bytes nothing wrote since their allocation (the host's writes
// count: SimBuffer marks what it hands out for writing), or of shared bytes nothing wrote since
// the block started (a cp.async writes when its wait_group retires it), whether or not the
// value read is used.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "trace.h"

namespace pgqa_sim::trace {

// The sanitizers' view of a device's buffers allocated while sanitizing: which bytes hold a
// written value (kept from allocation to free), and, per byte, which blocks of the current
// launch wrote and read it.
class DeviceShadow {
 public:
  // Which blocks of launch `launch` touched a byte last (entries of older launches are empty).
  struct Touch {
    uint32_t launch = 0;
    int32_t writer = -1, reader = -1;  // blocks
    uintptr_t write_pc = 0, read_pc = 0;
  };
  void allocated(uintptr_t start, size_t size) { buffers_[start].written.assign(size, 0); }
  void freed(uintptr_t start) { buffers_.erase(start); }
  // Marks [address, address + size) written (the part inside a buffer).
  void written(uintptr_t address, size_t size);
  // The first byte of [address, address + size) never written, or 0 when all were (or when the
  // range is in no buffer this shadow knows).
  uintptr_t first_unwritten(uintptr_t address, size_t size) const;
  // The touch entries of [address, address + size) for launch `launch` (stale ones reset), at
  // most up to the end of the buffer holding `address`; {nullptr, 0} outside every buffer.
  std::pair<Touch *, size_t> touches(uintptr_t address, size_t size, uint32_t launch);
  // A new launch: returns its stamp.
  uint32_t next_launch() { return ++launch_; }

 private:
  struct Buffer {
    std::vector<uint8_t> written;
    std::vector<Touch> touches;  // allocated at the first traced access
  };
  std::map<uintptr_t, Buffer> buffers_;  // by start
  uint32_t launch_ = 0;
};

// The sanitizers of one launch (its first schedule, on one worker).
class Sanitizer {
 public:
  Sanitizer(std::string kernel, DeviceShadow *shadow);

  void begin_block(uint64_t block, int threads, const unsigned char *smem, size_t smem_bytes);
  void access(int thread, uintptr_t address, int bytes, bool write, Space space, uintptr_t pc);
  void cp_async_issued(int thread, uintptr_t dst, int bytes, uintptr_t pc);
  void cp_async_landed(int thread, uintptr_t dst, int bytes);
  void collective(int warp, unsigned mask);
  void barrier();
  void end_block();

  // The reports (at most a few per kind, each naming kernel, sites, address and threads).
  const std::vector<std::string> &reports() const { return reports_; }
  // Reports found, all kinds, before deduplication.
  uint64_t hazards() const { return hazards_; }

 private:
  struct Touch {
    int32_t thread = -1;
    uint32_t epoch = 0;  // barriers passed in the block when it happened
    uint32_t sync = 0;   // the warp's collectives executed when it happened
    int32_t pc = 0;      // the site, as an offset from kPcBase (code is within +-2 GiB of it)
  };
  struct SharedByte {
    uint32_t block = ~0u;  // the block (mod 2^32) these entries belong to (others are stale)
    bool written = false;  // initcheck
    Touch write, first_read, last_read;
  };
  static int32_t pc_offset(uintptr_t pc);
  static uintptr_t pc_of(int32_t offset);
  bool ordered(const Touch &earlier, int thread) const;
  void hazard(const char *what, const Touch &earlier, bool earlier_write, int thread, bool write, uintptr_t pc,
              uintptr_t address);
  // Counts a hazard of kind `key`; true while that kind has had fewer than a few reports.
  bool wanted(const std::string &key);
  void shared_access(int thread, uintptr_t address, int bytes, bool write, uintptr_t pc);
  void global_access(int thread, uintptr_t address, int bytes, bool write, uintptr_t pc);

  std::string kernel_;
  DeviceShadow *shadow_;
  uint32_t launch_;
  uint64_t block_ = 0;
  const unsigned char *smem_ = nullptr;
  size_t smem_bytes_ = 0;
  uint32_t epoch_ = 0;
  std::vector<SharedByte> shared_;                      // dynamic shared memory, by offset
  uint32_t stamp_ = 0;                                  // blocks begun (SharedByte::block)
  std::unordered_map<uintptr_t, SharedByte> static_;    // static __shared__ arrays
  std::vector<uint32_t> warp_sync_;                     // per warp: collectives executed
  std::vector<uint32_t> lane_sync_;                     // per thread: its warp's count at its last
  std::vector<std::string> reports_;
  std::map<std::string, int> seen_;
  uint64_t hazards_ = 0;
};

// "file:line (function)" of a code address, through addr2line on the binary that holds it;
// "0x..." when that fails.
std::string describe_pc(uintptr_t pc);

}  // namespace pgqa_sim::trace
