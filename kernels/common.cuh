// common.cuh: small pieces every kernel file shares.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "paged_gqa.h"

namespace pgqa {

// Size in bytes of one element of `dtype`, or 0 for a value outside the enum.
__host__ __device__ inline int dtype_bytes(pgqa_dtype dtype) {
  switch (dtype) {
    case PGQA_DTYPE_F32: return 4;
    case PGQA_DTYPE_F16: return 2;
    case PGQA_DTYPE_BF16: return 2;
  }
  return 0;
}

// True when `ptr` may be read or written with 16-byte vector accesses.
inline bool aligned16(const void *ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// Reads the launch status after `kernel<<<...>>>` and turns it into the launcher's result.
inline pgqa_status launch_status(int32_t *cuda_error) {
  const cudaError_t err = cudaGetLastError();
  if (cuda_error != nullptr) *cuda_error = static_cast<int32_t>(err);
  return err == cudaSuccess ? PGQA_STATUS_OK : PGQA_STATUS_CUDA_ERROR;
}

}  // namespace pgqa
