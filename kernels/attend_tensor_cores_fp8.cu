// attend_tensor_cores_fp8.cu: the tensor-core kernel over fp8 pages (the kernel:
// attend_tensor_cores.cuh), for bf16 and f16 queries and e4m3fn and e5m2 pages.

#include "attend_tensor_cores.cuh"

namespace pgqa {

pgqa_status launch_tensor_cores_fp8(const pgqa_attend_params &p, cudaStream_t stream, int32_t *cuda_error,
                               Phase phase) {
  const bool bf16 = p.dtype == PGQA_DTYPE_BF16;
  switch (p.kv_dtype) {
    case PGQA_DTYPE_F8_E4M3:
      return bf16 ? launch_for_dim<__nv_bfloat16, fp8_e4m3>(p, stream, cuda_error, phase)
                  : launch_for_dim<__half, fp8_e4m3>(p, stream, cuda_error, phase);
    case PGQA_DTYPE_F8_E5M2:
      return bf16 ? launch_for_dim<__nv_bfloat16, fp8_e5m2>(p, stream, cuda_error, phase)
                  : launch_for_dim<__half, fp8_e5m2>(p, stream, cuda_error, phase);
    default: return PGQA_STATUS_UNSUPPORTED;
  }
}

}  // namespace pgqa
