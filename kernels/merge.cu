// merge.cu: log-sum-exp merge of split-KV partial results (see merge.cuh).

#include "merge.cuh"

namespace {

constexpr int kThreads = 128;

// One thread block per (sequence, head) row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(const float *__restrict__ partial_out, const float *__restrict__ partial_lse,
                 T *__restrict__ out, float *__restrict__ lse, int num_splits, int head_dim) {
  const int64_t row = blockIdx.x;
  const float *row_lse = partial_lse + row * num_splits;
  float max_lse = -INFINITY;
  for (int s = 0; s < num_splits; ++s) max_lse = fmaxf(max_lse, row_lse[s]);
  T *row_out = out + row * head_dim;
  if (max_lse == -INFINITY) {  // no split saw a key
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) pgqa::store(row_out + d, 0.0f);
    if (threadIdx.x == 0) lse[row] = -INFINITY;
    return;
  }
  float denom = 0.0f;
  for (int s = 0; s < num_splits; ++s) denom += exp2f(row_lse[s] - max_lse);
  const float *row_partial = partial_out + row * num_splits * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float sum = 0.0f;
    for (int s = 0; s < num_splits; ++s)
      sum += exp2f(row_lse[s] - max_lse) * row_partial[static_cast<int64_t>(s) * head_dim + d];
    pgqa::store(row_out + d, sum / denom);
  }
  if (threadIdx.x == 0) lse[row] = (max_lse + log2f(denom)) * pgqa::kLn2;
}

}  // namespace

namespace pgqa {

cudaError_t merge_splits(const float *partial_out, const float *partial_lse, void *out, float *lse,
                         int64_t rows, int num_splits, int head_dim, pgqa_dtype dtype,
                         cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows));
  if (dtype == PGQA_DTYPE_BF16) {
    PGQA_LAUNCH(merge_kernel<__nv_bfloat16>, grid, kThreads, 0, stream, partial_out, partial_lse,
                static_cast<__nv_bfloat16 *>(out), lse, num_splits, head_dim);
  } else {
    PGQA_LAUNCH(merge_kernel<__half>, grid, kThreads, 0, stream, partial_out, partial_lse,
                static_cast<__half *>(out), lse, num_splits, head_dim);
  }
  return cudaGetLastError();
}

}  // namespace pgqa
