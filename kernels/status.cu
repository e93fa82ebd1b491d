// status.cu: host-side helpers of the C contract that belong to no kernel.

#include "common.cuh"

extern "C" const char *pgqa_cuda_error_name(int32_t cuda_error) {
  return cudaGetErrorName(static_cast<cudaError_t>(cuda_error));
}
