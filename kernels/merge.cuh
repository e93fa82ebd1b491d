// merge.cuh: the split-KV merge, called by the attention launcher (attend.cu).
#pragma once

#include "common.cuh"

namespace pgqa {

// Combines num_splits partial results per (token, head) row, with the row's sink (natural log,
// sinks[row % n_heads]; none when sinks is null) as one more term of the denominator:
//   M = max(max_s lse_s, sink2), w_s = exp2(lse_s - M), z = sum(w_s) + exp2(sink2 - M),
//   out = sum(w_s * out_s) / z, lse = (M + log2(z)) * ln 2,   sink2 = sink * log2 e.
// Splits with lse -inf (no key) weigh 0; a row with no key gives 0 and lse sink (-inf without).
// partial_out: [rows, num_splits, head_dim] f32; partial_lse: [rows, num_splits] (log2 domain);
// out: [rows, head_dim] (dtype); lse: [rows] natural log.
cudaError_t merge_splits(const float *partial_out, const float *partial_lse, const float *sinks,
                         int n_heads, void *out, float *lse, int64_t rows, int num_splits,
                         int head_dim, pgqa_dtype dtype, cudaStream_t stream);

}  // namespace pgqa
