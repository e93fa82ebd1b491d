// cuda_runtime.h for the kernel emulator: the CUDA surface kernels/*.cu use, on the host C++
// compiler, over the emulator's runtime (../sim.h). Found before any toolkit's header because the
// emulator's build puts this folder first on the include path; the nvcc build never sees it.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <cmath>

#ifndef PGQA_SIM
#define PGQA_SIM 1
#endif
#include "../sim.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static shared arrays: one per worker thread (a block runs on one worker), not poisoned.
#define __shared__ static thread_local

#define threadIdx (*::pgqa_sim::tls_thread_idx)
#define blockIdx (::pgqa_sim::tls_block->block_idx)
#define blockDim (::pgqa_sim::tls_block->block_dim)
#define gridDim (::pgqa_sim::tls_block->grid_dim)
#define warpSize 32

#define __syncthreads() ::pgqa_sim::sync_threads(PGQA_SIM_SITE)
#define __syncwarp(...) ::pgqa_sim::sync_warp(::pgqa_sim_cuda::syncwarp_mask(__VA_ARGS__), PGQA_SIM_SITE)
#define __shfl_sync(mask, v, lane, ...) \
  ::pgqa_sim_cuda::shfl(::pgqa_sim::kShflIdx, mask, v, lane, ##__VA_ARGS__, PGQA_SIM_SITE)
#define __shfl_up_sync(mask, v, delta, ...) \
  ::pgqa_sim_cuda::shfl(::pgqa_sim::kShflUp, mask, v, delta, ##__VA_ARGS__, PGQA_SIM_SITE)
#define __shfl_down_sync(mask, v, delta, ...) \
  ::pgqa_sim_cuda::shfl(::pgqa_sim::kShflDown, mask, v, delta, ##__VA_ARGS__, PGQA_SIM_SITE)
#define __shfl_xor_sync(mask, v, lane_mask, ...) \
  ::pgqa_sim_cuda::shfl(::pgqa_sim::kShflXor, mask, v, lane_mask, ##__VA_ARGS__, PGQA_SIM_SITE)
#define __ballot_sync(mask, predicate) ::pgqa_sim::vote_ballot(mask, predicate, PGQA_SIM_SITE)
#define __trap() ::pgqa_sim::trap(PGQA_SIM_SITE)

// The seams of common.cuh: a launch, and the dynamic shared memory of a kernel.
#if defined(PGQA_SIM_TRACED)
#define PGQA_SIM_IS_TRACED true
#else
#define PGQA_SIM_IS_TRACED false
#endif
#define PGQA_LAUNCH(kernel, grid, block, smem, stream, ...)                                      \
  ::pgqa_sim::launch(kernel, #kernel, __PRETTY_FUNCTION__, PGQA_SIM_IS_TRACED, grid, block, smem, \
                     stream, __VA_ARGS__)
#define PGQA_DYNAMIC_SHARED(name) unsigned char *const name = ::pgqa_sim::dynamic_shared()

typedef struct CUstream_st *cudaStream_t;

namespace pgqa_sim_cuda {

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }

// CUDA's integer and float min/max overloads (same-type arguments).
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

// IEEE division rounded to nearest even: the host's `/` (the emulator is built without fast-math).
inline float __fdiv_rn(float a, float b) { return a / b; }

inline unsigned syncwarp_mask(unsigned mask = 0xffffffffu) { return mask; }

// Shuffles of any 4-byte value (float, int, unsigned).
template <typename T>
inline T shfl(::pgqa_sim::ShuffleKind kind, unsigned mask, T value, int lane, int width,
              ::pgqa_sim::Site site) {
  static_assert(sizeof(T) == 4, "the emulator shuffles 32-bit values");
  uint32_t bits;
  memcpy(&bits, &value, 4);
  bits = ::pgqa_sim::shuffle(kind, mask, bits, lane, width, site);
  memcpy(&value, &bits, 4);
  return value;
}
template <typename T>
inline T shfl(::pgqa_sim::ShuffleKind kind, unsigned mask, T value, int lane, ::pgqa_sim::Site site) {
  return shfl(kind, mask, value, lane, 32, site);
}

inline size_t __cvta_generic_to_shared(const void *ptr) { return reinterpret_cast<size_t>(ptr); }

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
  cudaErrorIllegalInstruction = 715,
};
typedef enum cudaError cudaError_t;

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  size_t constSizeBytes;
  size_t localSizeBytes;
  int maxThreadsPerBlock;
  int numRegs;
  int ptxVersion;
  int binaryVersion;
  int cacheModeCA;
  int maxDynamicSharedSizeBytes;
  int preferredShmemCarveout;
};

inline cudaError_t cudaGetLastError() { return static_cast<cudaError_t>(::pgqa_sim::get_last_error(true)); }
inline cudaError_t cudaPeekAtLastError() {
  return static_cast<cudaError_t>(::pgqa_sim::get_last_error(false));
}
inline const char *cudaGetErrorName(cudaError_t error) { return ::pgqa_sim::error_name(error); }
inline const char *cudaGetErrorString(cudaError_t error) { return ::pgqa_sim::error_name(error); }
inline cudaError_t cudaGetDevice(int *device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = ::pgqa_sim::kMaxThreadsPerBlock; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = ::pgqa_sim::kDefaultSharedLimit; break;
    case cudaDevAttrMultiProcessorCount: *value = ::pgqa_sim::kMultiProcessors; break;
    case cudaDevAttrComputeCapabilityMajor: *value = ::pgqa_sim::kComputeMajor; break;
    case cudaDevAttrComputeCapabilityMinor: *value = ::pgqa_sim::kComputeMinor; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = ::pgqa_sim::kMaxSharedOptin; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return static_cast<cudaError_t>(
      ::pgqa_sim::func_set_max_dynamic_smem(reinterpret_cast<const void *>(kernel), value));
}
template <typename Kernel>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *attributes, Kernel kernel) {
  memset(attributes, 0, sizeof(*attributes));
  attributes->maxThreadsPerBlock = ::pgqa_sim::max_threads_per_block(reinterpret_cast<const void *>(kernel));
  attributes->ptxVersion = 10 * ::pgqa_sim::kComputeMajor + ::pgqa_sim::kComputeMinor;
  attributes->binaryVersion = attributes->ptxVersion;
  attributes->maxDynamicSharedSizeBytes =
      ::pgqa_sim::func_max_dynamic_smem(reinterpret_cast<const void *>(kernel));
  return cudaSuccess;
}

}  // namespace pgqa_sim_cuda

using namespace pgqa_sim_cuda;
