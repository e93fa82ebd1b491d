// common.cuh: small pieces every kernel file shares.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "paged_gqa.h"

// The emulator's seams (kernels/sim/include/cuda_runtime.h defines its own): a kernel launch,
// exactly the triple-chevron launch here, and a kernel's dynamic shared memory.
#ifndef PGQA_LAUNCH
#define PGQA_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif
#ifndef PGQA_DYNAMIC_SHARED
#define PGQA_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace pgqa {

// Size in bytes of one element of `dtype`, or 0 for a value outside the enum.
__host__ __device__ inline int dtype_bytes(pgqa_dtype dtype) {
  switch (dtype) {
    case PGQA_DTYPE_F32: return 4;
    case PGQA_DTYPE_F16: return 2;
    case PGQA_DTYPE_BF16: return 2;
    case PGQA_DTYPE_F8_E4M3: return 1;
    case PGQA_DTYPE_F8_E5M2: return 1;
  }
  return 0;
}

// True for the fp8 page types.
__host__ __device__ inline bool is_fp8(pgqa_dtype dtype) {
  return dtype == PGQA_DTYPE_F8_E4M3 || dtype == PGQA_DTYPE_F8_E5M2;
}

// True when `ptr` may be read or written with 16-byte vector accesses.
inline bool aligned16(const void *ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// Lets `kernel` take `bytes` of dynamic shared memory. The limit is one value per kernel for the
// whole process, so it is raised to the most any launch of the kernel asks (`max_bytes`): two
// host threads launching with different sizes then never lower it under each other. Devices
// with less shared memory get `bytes`. A refusal is cleared from the runtime's last error (it
// would otherwise fail the next, unrelated launcher) and returned.
template <typename Kernel>
pgqa_status allow_shared_memory(Kernel kernel, size_t max_bytes, size_t bytes, int32_t *cuda_error) {
  if (bytes <= 48 * 1024) return PGQA_STATUS_OK;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(max_bytes)) == cudaSuccess)
    return PGQA_STATUS_OK;
  cudaGetLastError();
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) return PGQA_STATUS_OK;
  cudaGetLastError();
  if (cuda_error != nullptr) *cuda_error = static_cast<int32_t>(err);
  return PGQA_STATUS_CUDA_ERROR;
}

// A launcher's two steps: check everything and set the kernel up (kPrepare), then launch
// (kLaunch). An entry point that launches several kernels prepares them all first, so a refusal
// never leaves part of the work launched (or captured in a graph).
enum class Phase { kPrepare, kLaunch };

// The head sizes the attention kernels are built for: calls
// launch(std::integral_constant<int, D>{}) with D = head_dim, or returns UNSUPPORTED.
template <typename Launch>
pgqa_status for_head_dim(int head_dim, Launch &&launch) {
  switch (head_dim) {
    case 64: return launch(std::integral_constant<int, 64>{});
    case 80: return launch(std::integral_constant<int, 80>{});
    case 96: return launch(std::integral_constant<int, 96>{});
    case 128: return launch(std::integral_constant<int, 128>{});
    case 256: return launch(std::integral_constant<int, 256>{});
  }
  return PGQA_STATUS_UNSUPPORTED;
}

// Reads the launch status after `kernel<<<...>>>` and turns it into the launcher's result.
inline pgqa_status launch_status(int32_t *cuda_error) {
  const cudaError_t err = cudaGetLastError();
  if (cuda_error != nullptr) *cuda_error = static_cast<int32_t>(err);
  return err == cudaSuccess ? PGQA_STATUS_OK : PGQA_STATUS_CUDA_ERROR;
}

}  // namespace pgqa

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace pgqa {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// One vector access of sizeof(V) bytes (uint4 and float4: 16, uint2 and float2: 8): one
// instruction on the GPU (LDG/LDS/STG/STS.128 or .64). Under the emulator it is one host access
// of that width through a GCC vector type, so the traced copy sees one request of that width
// where the optimiser would split a struct copy into 4-byte accesses (kernels/sim/trace.cpp).
template <typename V>
__device__ __forceinline__ V load_vec(const void *p) {
#if defined(PGQA_SIM)
  typedef unsigned Raw __attribute__((vector_size(sizeof(V)), may_alias));
  const Raw raw = *static_cast<const Raw *>(p);
  V v;
  __builtin_memcpy(&v, &raw, sizeof(V));
  return v;
#else
  return *static_cast<const V *>(p);
#endif
}
template <typename V>
__device__ __forceinline__ void store_vec(void *p, const V &v) {
#if defined(PGQA_SIM)
  typedef unsigned Raw __attribute__((vector_size(sizeof(V)), may_alias));
  Raw raw;
  __builtin_memcpy(&raw, &v, sizeof(V));
  *static_cast<Raw *>(p) = raw;
#else
  *static_cast<V *>(p) = v;
#endif
}

// Eight 2-byte elements (one 16-byte vector) to floats, and back.
__device__ inline void to_float8(const uint4 &v, float (&f)[8], const __nv_bfloat16 *) {
  const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __bfloat1622float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}
__device__ inline void to_float8(const uint4 &v, float (&f)[8], const __half *) {
  const __half2 *h = reinterpret_cast<const __half2 *>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __half22float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}
__device__ inline uint4 from_float8(const float (&f)[8], const __nv_bfloat16 *) {
  uint4 v;
  __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return v;
}
__device__ inline uint4 from_float8(const float (&f)[8], const __half *) {
  uint4 v;
  __half2 *h = reinterpret_cast<__half2 *>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
  return v;
}
__device__ inline float to_float(float x) { return x; }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ inline float to_float(__half x) { return __half2float(x); }
__device__ inline void store(float *p, float x) { *p = x; }
__device__ inline void store(__nv_bfloat16 *p, float x) { *p = __float2bfloat16_rn(x); }
__device__ inline void store(__half *p, float x) { *p = __float2half_rn(x); }

// The end of one row's online softmax: running max m and sum l of its keys (log2 domain; m is
// -inf and l 0 when it saw none) and a sink sink2 (log2 domain; -inf for none), one more term of
// the denominator with no value. factor multiplies the row's accumulated sum of p * v into its
// output; lse_log2 is the log2-sum-exp of keys and sink. No key and no sink: 0 and -inf.
struct Finish {
  float factor;
  float lse_log2;
};
__device__ inline Finish finish_row(float m, float l, float sink2) {
  const float top = fmaxf(m, sink2);
  if (top == -INFINITY) return {0.0f, -INFINITY};
  const float keys = l > 0.0f ? exp2f(m - top) : 0.0f;  // the keys' sum is l * 2^(m - top)
  const float z = l * keys + exp2f(sink2 - top);
  return {keys / z, top + log2f(z)};
}

// The keys of one attention block (see pgqa_attend in paged_gqa.h). Query row j of its work item
// sits at position(j) and sees keys [lo(j), hi(j)): hi is position + 1 (causal, bottom-right) or
// the context length; lo is position - window_left (may be negative: from 0) or 0. The block
// reads [start, end): this split's keys_per_split of its range, which runs from its first row's
// window start to its last row's limit (tiles left of the window or above the diagonal are never
// loaded).
struct BlockKeys {
  int first_pos;  // position of the item's query row 0
  int first_lo;   // lo(0)
  int first_hi;   // hi(0)
  int lo_step;    // 1 with a window, else 0
  int hi_step;    // 1 when causal, else 0
  int start;
  int end;
  __device__ int position(int j) const { return first_pos + j; }
  __device__ int lo(int j) const { return first_lo + lo_step * j; }
  __device__ int hi(int j) const { return first_hi + hi_step * j; }
};

// The keys of the block serving query rows j0 .. j0 + tokens - 1 of a sequence with context_len
// keys and query_len query rows, for split `split`.
__device__ inline BlockKeys block_keys(const pgqa_attend_params &p, int context_len, int query_len,
                                       int j0, int tokens, int split) {
  BlockKeys k;
  const bool windowed = p.window_left >= 0;
  k.first_pos = context_len - query_len + j0;
  k.first_lo = windowed ? k.first_pos - p.window_left : 0;
  k.first_hi = p.causal ? k.first_pos + 1 : context_len;
  k.lo_step = windowed ? 1 : 0;
  k.hi_step = p.causal ? 1 : 0;
  const int lo = max(k.first_lo, 0);
  const int hi = min(context_len, k.hi(tokens - 1));
  // 64-bit: lo + (split + 1) * keys_per_split can pass 2^31.
  const int64_t split_start = static_cast<int64_t>(lo) + static_cast<int64_t>(split) * p.keys_per_split;
  k.start = static_cast<int>(min(split_start, static_cast<int64_t>(hi)));
  k.end = static_cast<int>(min(static_cast<int64_t>(hi), split_start + p.keys_per_split));
  return k;
}

// Warp-wide reductions; every lane of the warp must call them.
__device__ inline float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}
__device__ inline float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// 16-byte global -> shared copy: asynchronous (cp.async, sm_80+) or plain on older GPUs.
__device__ inline void copy16_async(void *smem, const void *gmem) {
#if defined(PGQA_SIM)
  ::pgqa_sim::cp_async(smem, gmem, 16, PGQA_SIM_SITE);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
#else
  *static_cast<uint4 *>(smem) = *static_cast<const uint4 *>(gmem);
#endif
}
// Closes the group of copies issued since the last commit.
__device__ inline void copy_async_commit() {
#if defined(PGQA_SIM)
  ::pgqa_sim::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most N committed groups are still in flight (this thread's copies only:
// a __syncthreads() must follow before other threads read them).
template <int N>
__device__ inline void copy_async_wait() {
#if defined(PGQA_SIM)
  ::pgqa_sim::cp_async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace pgqa
