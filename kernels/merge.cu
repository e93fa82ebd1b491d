// merge.cu: log-sum-exp merges: the split-KV merge of pgqa_attend (see merge.cuh) and the public
// merge of two attention states, pgqa_merge_states (see paged_gqa.h).

#include "merge.cuh"

namespace {

constexpr int kThreads = 128;

// One thread block per (token, head) row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(const float *__restrict__ partial_out, const float *__restrict__ partial_lse,
                 const float *__restrict__ sinks, int n_heads, T *__restrict__ out,
                 float *__restrict__ lse, int num_splits, int head_dim) {
  const int64_t row = blockIdx.x;
  const float *row_lse = partial_lse + row * num_splits;
  // The sink, in the partials' log2 domain: one more term of the denominator, no value.
  const float sink2 = sinks != nullptr ? sinks[row % n_heads] * pgqa::kLog2e : -INFINITY;
  float max_lse = sink2;
  for (int s = 0; s < num_splits; ++s) max_lse = fmaxf(max_lse, row_lse[s]);
  T *row_out = out + row * head_dim;
  if (max_lse == -INFINITY) {  // no split saw a key, and no sink
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) pgqa::store(row_out + d, 0.0f);
    if (threadIdx.x == 0) lse[row] = -INFINITY;
    return;
  }
  float denom = exp2f(sink2 - max_lse);  // 0 without a sink
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

// One thread block per row. Every thread reads both lse values before any thread writes lse:
// lse may be lse_a or lse_b (in place), and out may be out_a or out_b (each element is read and
// written by the same thread).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    merge_states_kernel(const T *out_a, const float *lse_a, const T *out_b, const float *lse_b,
                        T *out, float *lse, int head_dim) {
  const int64_t row = blockIdx.x;
  const float la = lse_a[row];
  const float lb = lse_b[row];
  __syncthreads();  // both read by every thread before thread 0 may overwrite one of them
  const float m = fmaxf(la, lb);
  const int64_t base = row * head_dim;
  if (m == -INFINITY) {  // both key sets empty
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) pgqa::store(out + base + d, 0.0f);
    if (threadIdx.x == 0) lse[row] = -INFINITY;
    return;
  }
  const float wa = expf(la - m);  // 0 for an empty set
  const float wb = expf(lb - m);
  const float inv = 1.0f / (wa + wb);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    const float a = pgqa::to_float(out_a[base + d]);
    const float b = pgqa::to_float(out_b[base + d]);
    pgqa::store(out + base + d, (wa * a + wb * b) * inv);
  }
  if (threadIdx.x == 0) lse[row] = m + logf(wa + wb);
}

template <typename T>
pgqa_status launch_merge_states(const pgqa_merge_states_params &p, cudaStream_t stream,
                                int32_t *cuda_error) {
  const dim3 grid(static_cast<unsigned>(p.num_rows));
  PGQA_LAUNCH(merge_states_kernel<T>, grid, kThreads, 0, stream, static_cast<const T *>(p.out_a),
              p.lse_a, static_cast<const T *>(p.out_b), p.lse_b, static_cast<T *>(p.out), p.lse,
              p.head_dim);
  return pgqa::launch_status(cuda_error);
}

}  // namespace

namespace pgqa {

cudaError_t merge_splits(const float *partial_out, const float *partial_lse, const float *sinks,
                         int n_heads, void *out, float *lse, int64_t rows, int num_splits,
                         int head_dim, pgqa_dtype dtype, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows));
  if (dtype == PGQA_DTYPE_BF16) {
    PGQA_LAUNCH(merge_kernel<__nv_bfloat16>, grid, kThreads, 0, stream, partial_out, partial_lse,
                sinks, n_heads, static_cast<__nv_bfloat16 *>(out), lse, num_splits, head_dim);
  } else {
    PGQA_LAUNCH(merge_kernel<__half>, grid, kThreads, 0, stream, partial_out, partial_lse, sinks,
                n_heads, static_cast<__half *>(out), lse, num_splits, head_dim);
  }
  return cudaGetLastError();
}

}  // namespace pgqa

extern "C" pgqa_status pgqa_merge_states(const pgqa_merge_states_params *params,
                                         pgqa_stream stream, int32_t *cuda_error) {
  if (cuda_error != nullptr) *cuda_error = 0;
  if (params == nullptr) return PGQA_STATUS_INVALID_ARGUMENT;
  const pgqa_merge_states_params &p = *params;
  if (p.num_rows < 0 || p.num_rows > INT32_MAX || p.head_dim <= 0) return PGQA_STATUS_INVALID_ARGUMENT;
  if (p.num_rows == 0) return PGQA_STATUS_OK;
  if (p.out_a == nullptr || p.lse_a == nullptr || p.out_b == nullptr || p.lse_b == nullptr ||
      p.out == nullptr || p.lse == nullptr)
    return PGQA_STATUS_INVALID_ARGUMENT;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case PGQA_DTYPE_F32: return launch_merge_states<float>(p, s, cuda_error);
    case PGQA_DTYPE_F16: return launch_merge_states<__half>(p, s, cuda_error);
    case PGQA_DTYPE_BF16: return launch_merge_states<__nv_bfloat16>(p, s, cuda_error);
  }
  return PGQA_STATUS_UNSUPPORTED;
}
