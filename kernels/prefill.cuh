// prefill.cuh: the tensor-core half of pgqa_attend (prefill.cu), called by its entry point.
#pragma once

#include "common.cuh"

namespace pgqa {

// Launches the tensor-core kernel over params.mma_work (nothing when it is empty). The caller
// has validated the common arguments; the split merge is the caller's too.
pgqa_status launch_prefill(const pgqa_attend_params &params, cudaStream_t stream,
                           int32_t *cuda_error);

}  // namespace pgqa
