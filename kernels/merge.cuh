// merge.cuh: the split-KV merge, called by the decode launcher (decode.cu).
#pragma once

#include "common.cuh"

namespace pgqa {

// Combines num_splits partial results per (sequence, head) row:
//   w_s = exp2(lse_s - max_lse), out = sum(w_s * out_s) / sum(w_s),
//   lse = (max_lse + log2(sum(w_s))) * ln 2.
// Splits with lse -inf (no key) weigh 0; a row with no key at all gives 0 and -inf.
// partial_out: [rows, num_splits, head_dim] f32; partial_lse: [rows, num_splits] (log2 domain);
// out: [rows, head_dim] (dtype); lse: [rows] natural log.
cudaError_t merge_splits(const float *partial_out, const float *partial_lse, void *out, float *lse,
                         int64_t rows, int num_splits, int head_dim, pgqa_dtype dtype,
                         cudaStream_t stream);

}  // namespace pgqa
