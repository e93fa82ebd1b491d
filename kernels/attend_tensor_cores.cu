// attend_tensor_cores.cu: the tensor-core kernel over 16-bit pages, both layouts (the kernel:
// attend_tensor_cores.cuh), and pgqa::launch_tensor_cores, which dispatches on the query and
// page types (fp8 pages: attend_tensor_cores_fp8.cu).

#include "attend_tensor_cores.cuh"

namespace {

template <typename T>
pgqa_status launch_for_pages(const pgqa_attend_params &p, cudaStream_t stream, int32_t *cuda_error,
                             pgqa::Phase phase) {
  if (p.kv_dtype == p.dtype) return launch_for_dim<T, T>(p, stream, cuda_error, phase);
  if (pgqa::is_fp8(p.kv_dtype)) return pgqa::launch_tensor_cores_fp8(p, stream, cuda_error, phase);
  return PGQA_STATUS_UNSUPPORTED;
}

}  // namespace

namespace pgqa {

pgqa_status launch_tensor_cores(const pgqa_attend_params &p, cudaStream_t stream, int32_t *cuda_error,
                           Phase phase) {
  if (p.num_mma_work == 0 && p.num_narrow_work == 0) return PGQA_STATUS_OK;
  switch (p.dtype) {
    case PGQA_DTYPE_BF16: return launch_for_pages<__nv_bfloat16>(p, stream, cuda_error, phase);
    case PGQA_DTYPE_F16: return launch_for_pages<__half>(p, stream, cuda_error, phase);
    default: return PGQA_STATUS_UNSUPPORTED;
  }
}

}  // namespace pgqa
