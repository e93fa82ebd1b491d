// attend_tensor_cores_launch.cuh: the launchers of the tensor-core half of pgqa_attend
// (attend_tensor_cores.cu, attend_tensor_cores_fp8.cu), called by its entry point (attend.cu).
#pragma once

#include "common.cuh"

namespace pgqa {

// The tensor-core kernel, wide over params.mma_work and narrow over params.narrow_work (nothing
// for an empty list). kPrepare checks the launches (sm_80 device, a kernel built for sm_80+,
// rows per block, grid) and raises the shared memory limit; kLaunch launches. The caller has validated the common arguments and runs the
// split merge.
pgqa_status launch_tensor_cores(const pgqa_attend_params &params, cudaStream_t stream,
                           int32_t *cuda_error, Phase phase);

// launch_tensor_cores for fp8 pages (kv_dtype F8_E4M3 or F8_E5M2; dtype F16 or BF16), in its own
// translation unit (attend_tensor_cores_fp8.cu).
pgqa_status launch_tensor_cores_fp8(const pgqa_attend_params &params, cudaStream_t stream,
                               int32_t *cuda_error, Phase phase);

}  // namespace pgqa
