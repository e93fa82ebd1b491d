// sim.h: the kernel emulator's interface to the code it runs.
//
// The emulator compiles the unchanged kernels/*.cu with the host C++ compiler; the shim headers
// in sim/include (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h) stand in for the CUDA toolkit's and
// call the functions declared here. The runtime (runtime.cpp) runs every CUDA thread of a block
// as a fiber, switched only at synchronisation points (barriers, warp collectives), with the
// strict semantics listed in docs/emulator.md ("Running the kernels").
#pragma once

#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

// The renames that keep the emulated builds apart from the nvcc build in one binary: the C
// entry points become pgqa_sim_* (pgqa_trace_* in the traced copy, PGQA_SIM_TRACED, built with
// GCC's thread-sanitizer instrumentation for the profiler and the sanitizers: trace.cpp), the
// kernels' C++ namespace pgqa becomes pgqa_emulated (pgqa_traced), and the shims' namespace
// pgqa_sim_cuda becomes pgqa_sim_cuda_traced in the traced copy, so that no inline function of
// one copy stands in for the other's at link time.
#if defined(PGQA_SIM_TRACED)
#define pgqa pgqa_traced
#define pgqa_repeat_kv pgqa_trace_repeat_kv
#define pgqa_write_kv pgqa_trace_write_kv
#define pgqa_copy_blocks pgqa_trace_copy_blocks
#define pgqa_attend pgqa_trace_attend
#define pgqa_merge_states pgqa_trace_merge_states
#define pgqa_gather_kv pgqa_trace_gather_kv
#define pgqa_naive_decode pgqa_trace_naive_decode
#define pgqa_cuda_error_name pgqa_trace_cuda_error_name
#define pgqa_sim_cuda pgqa_sim_cuda_traced
#else
#define pgqa pgqa_emulated
#define pgqa_repeat_kv pgqa_sim_repeat_kv
#define pgqa_write_kv pgqa_sim_write_kv
#define pgqa_copy_blocks pgqa_sim_copy_blocks
#define pgqa_attend pgqa_sim_attend
#define pgqa_merge_states pgqa_sim_merge_states
#define pgqa_gather_kv pgqa_sim_gather_kv
#define pgqa_naive_decode pgqa_sim_naive_decode
#define pgqa_cuda_error_name pgqa_sim_cuda_error_name
#endif

// The launch geometry types the runtime's interface takes (the same in both copies).
namespace pgqa_sim_types {
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
}  // namespace pgqa_sim_types

namespace pgqa_sim_cuda {
using ::pgqa_sim_types::dim3;
using ::pgqa_sim_types::uint3;
}  // namespace pgqa_sim_cuda

namespace pgqa_sim {

using pgqa_sim_types::dim3;
using pgqa_sim_types::uint3;

// A source location: where a thread waits (barrier, collective) or went wrong.
struct Site {
  const char *file;
  int line;
};
#define PGQA_SIM_SITE (::pgqa_sim::Site{__FILE__, __LINE__})

// The running CUDA thread's coordinates (set by the scheduler before it resumes a fiber).
struct BlockCoords {
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern thread_local const uint3 *tls_thread_idx __attribute__((tls_model("initial-exec")));
extern thread_local const BlockCoords *tls_block __attribute__((tls_model("initial-exec")));

// Block-wide barrier: every live thread of the block, at the same call site.
void sync_threads(Site site);

// Warp collectives: every lane of `mask` (which must contain the caller), the same collective at
// the same call site. Shuffle kinds follow shfl.sync's modes.
enum ShuffleKind { kShflIdx, kShflUp, kShflDown, kShflXor };
uint32_t shuffle(ShuffleKind kind, unsigned mask, uint32_t value, int lane_arg, int width, Site site);
void sync_warp(unsigned mask, Site site);
unsigned vote_ballot(unsigned mask, bool predicate, Site site);

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16 and mma.sync.aligned.m16n8k16.row.col.f32.
// {bf16,f16}.{bf16,f16}.f32: all 32 lanes.
void ldmatrix_x4(uint32_t (&r)[4], const void *row, bool trans, Site site);
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16,
                  Site site);

// cp.async (cp-size bytes, global -> shared), commit_group, wait_group n.
void cp_async(void *shared_dst, const void *global_src, int bytes, Site site);
void cp_async_commit();
void cp_async_wait(int pending);

// The block's dynamic shared memory (poisoned when the block starts).
unsigned char *dynamic_shared();

// __trap(): the launch fails with the call site in the report.
[[noreturn]] void trap(Site site);

// A launch: validates it as the driver does, then runs every block (see runtime.cpp). Returns a
// cudaError value and sets the thread's last error. `traced`: the kernel is of the traced copy
// (its loads and stores reach the tracer), so a device that profiles or sanitizes traces it.
using Body = void (*)(const void *closure);
int launch_grid(const char *kernel, const char *launcher, const void *kernel_id, bool traced,
                dim3 grid, dim3 block, size_t dynamic_smem, void *stream, Body body,
                const void *closure);

template <typename... P, typename... A>
int launch(void (*kernel)(P...), const char *name, const char *launcher, bool traced, dim3 grid,
           dim3 block, size_t dynamic_smem, void *stream, A &&...args) {
  struct Closure {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> params;
  };
  const Closure closure{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  const Body body = [](const void *c) {
    const Closure &cl = *static_cast<const Closure *>(c);
    std::apply(cl.kernel, cl.params);
  };
  return launch_grid(name, launcher, reinterpret_cast<const void *>(kernel), traced, grid, block,
                     dynamic_smem, stream, body, &closure);
}

// Records the `__launch_bounds__` maximum of the kernel named `kernel` (its unqualified name, the
// same for every template instance); the emulator's build calls it for every kernel it finds.
bool register_launch_bounds(const char *kernel, int max_threads);
// The kernel's __launch_bounds__ maximum, or the device's 1024 when it has none.
int max_threads_per_block(const void *kernel_id);

// The runtime API calls the launchers make.
int get_last_error(bool clear);
int func_set_max_dynamic_smem(const void *kernel_id, int bytes);
int func_max_dynamic_smem(const void *kernel_id);
const char *error_name(int error);

// The device the emulator presents: an H200.
constexpr int kComputeMajor = 9;
constexpr int kComputeMinor = 0;
constexpr int kMultiProcessors = 132;
constexpr int kMaxSharedOptin = 232448;  // 227 KiB per block with the attribute raised
constexpr int kDefaultSharedLimit = 48 * 1024;
constexpr int kMaxThreadsPerBlock = 1024;

}  // namespace pgqa_sim
