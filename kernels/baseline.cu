// baseline.cu: the naive GQA path the benchmarks compare against, as an engine without
// GQA-aware kernels runs it: gather the pages into contiguous K/V (pgqa_gather_kv),
// materialise repeat_kv (repeat_kv.cu), then per-head attention (pgqa_naive_decode).

#include "common.cuh"

namespace {

constexpr int kThreads = 128;
constexpr int kMaxHeadDim = 256;

// grid (max_context_len, batch): one block copies one token's K and V rows (all K/V heads).
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const uint4 *__restrict__ k_cache, const uint4 *__restrict__ v_cache,
                  const int32_t *__restrict__ block_tables, const int32_t *__restrict__ context_lens,
                  const int64_t *__restrict__ key_starts, uint4 *__restrict__ k_out,
                  uint4 *__restrict__ v_out, int block_shift, int block_size, int max_blocks,
                  int num_blocks, int row_vecs) {
  const int seq = blockIdx.y;
  const int pos = blockIdx.x;
  if (pos >= context_lens[seq]) return;
  const int block = block_tables[static_cast<int64_t>(seq) * max_blocks + (pos >> block_shift)];
  if (block < 0 || block >= num_blocks) return;  // validated on the host
  const int64_t src = (static_cast<int64_t>(block) * block_size + (pos & (block_size - 1))) * row_vecs;
  const int64_t dst = (key_starts[seq] + pos) * row_vecs;
  for (int i = threadIdx.x; i < row_vecs; i += blockDim.x) {
    k_out[dst + i] = k_cache[src + i];
    v_out[dst + i] = v_cache[src + i];
  }
}

// One block per (sequence, head): keys in chunks of kThreads, one key per thread for the
// score, then every thread accumulates its output elements over the chunk.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    naive_decode_kernel(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
                        const int32_t *__restrict__ context_lens,
                        const int64_t *__restrict__ key_starts, T *__restrict__ out, int n_heads,
                        int head_dim, float scale_log2) {
  __shared__ float q_s[kMaxHeadDim];
  __shared__ float p_s[kThreads];
  __shared__ float reduce_s[kThreads / 32];
  const int seq = blockIdx.x / n_heads;
  const int head = blockIdx.x % n_heads;
  const int len = context_lens[seq];
  const int64_t row_stride = static_cast<int64_t>(n_heads) * head_dim;  // between keys
  const T *k_seq = k + key_starts[seq] * row_stride + static_cast<int64_t>(head) * head_dim;
  const T *v_seq = v + key_starts[seq] * row_stride + static_cast<int64_t>(head) * head_dim;
  const int64_t q_row = static_cast<int64_t>(blockIdx.x) * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += kThreads) q_s[d] = pgqa::to_float(q[q_row + d]) * scale_log2;

  // Each thread owns output elements d = threadIdx.x + j * kThreads.
  constexpr int kPerThread = kMaxHeadDim / kThreads;
  float acc[kPerThread] = {};
  float m = -INFINITY, l = 0.0f;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int base = 0; base < len; base += kThreads) {
    __syncthreads();  // q_s ready (first chunk); p_s and reduce_s free (later chunks)
    const int t = base + threadIdx.x;
    float s = -INFINITY;
    if (t < len) {
      s = 0.0f;
      for (int d = 0; d < head_dim; ++d) s += q_s[d] * pgqa::to_float(k_seq[t * row_stride + d]);
    }
    float chunk_max = pgqa::warp_max(s);
    if (lane == 0) reduce_s[warp] = chunk_max;
    __syncthreads();
    chunk_max = reduce_s[0];
    for (int w = 1; w < kThreads / 32; ++w) chunk_max = fmaxf(chunk_max, reduce_s[w]);
    const float m_new = fmaxf(m, chunk_max);  // finite: the chunk has a key
    const float p = exp2f(s - m_new);
    p_s[threadIdx.x] = p;
    const float alpha = exp2f(m - m_new);
    __syncthreads();  // p_s complete; everyone has read reduce_s
    float chunk_sum = pgqa::warp_sum(p);
    if (lane == 0) reduce_s[warp] = chunk_sum;
    __syncthreads();
    chunk_sum = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) chunk_sum += reduce_s[w];
    l = l * alpha + chunk_sum;
    m = m_new;
    const int n = min(kThreads, len - base);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int d = threadIdx.x + j * kThreads;
      if (d < head_dim) {
        float sum = acc[j] * alpha;
        for (int i = 0; i < n; ++i) sum += p_s[i] * pgqa::to_float(v_seq[(base + i) * row_stride + d]);
        acc[j] = sum;
      }
    }
  }
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int d = threadIdx.x + j * kThreads;
    if (d < head_dim) pgqa::store(out + q_row + d, acc[j] * inv);
  }
}

bool is_power_of_two(int x) { return x > 0 && (x & (x - 1)) == 0; }

}  // namespace

extern "C" pgqa_status pgqa_gather_kv(const pgqa_gather_kv_params *params, pgqa_stream stream,
                                      int32_t *cuda_error) {
  if (cuda_error != nullptr) *cuda_error = 0;
  if (params == nullptr) return PGQA_STATUS_INVALID_ARGUMENT;
  const pgqa_gather_kv_params &p = *params;
  const int elem_bytes = pgqa::dtype_bytes(p.dtype);
  if (elem_bytes == 0 || p.batch < 0 || p.batch > 65535 || p.max_context_len < 0 ||
      p.n_kv_heads <= 0 || p.head_dim <= 0 || !is_power_of_two(p.block_size) || p.max_blocks < 0 ||
      p.num_blocks <= 0)
    return PGQA_STATUS_INVALID_ARGUMENT;
  if (p.batch == 0 || p.max_context_len == 0) return PGQA_STATUS_OK;
  if (p.k_cache == nullptr || p.v_cache == nullptr || p.block_tables == nullptr ||
      p.context_lens == nullptr || p.key_starts == nullptr || p.k_out == nullptr || p.v_out == nullptr)
    return PGQA_STATUS_INVALID_ARGUMENT;
  const int64_t row_bytes = static_cast<int64_t>(p.n_kv_heads) * p.head_dim * elem_bytes;
  if (row_bytes % 16 != 0 || !pgqa::aligned16(p.k_cache) || !pgqa::aligned16(p.v_cache) ||
      !pgqa::aligned16(p.k_out) || !pgqa::aligned16(p.v_out))
    return PGQA_STATUS_MISALIGNED;
  const dim3 grid(static_cast<unsigned>(p.max_context_len), static_cast<unsigned>(p.batch));
  PGQA_LAUNCH(gather_kernel, grid, kThreads, 0, reinterpret_cast<cudaStream_t>(stream),
      static_cast<const uint4 *>(p.k_cache), static_cast<const uint4 *>(p.v_cache), p.block_tables,
      p.context_lens, p.key_starts, static_cast<uint4 *>(p.k_out), static_cast<uint4 *>(p.v_out),
      __builtin_ctz(static_cast<unsigned>(p.block_size)), p.block_size, p.max_blocks, p.num_blocks,
      static_cast<int>(row_bytes / 16));
  return pgqa::launch_status(cuda_error);
}

extern "C" pgqa_status pgqa_naive_decode(const pgqa_naive_decode_params *params,
                                         pgqa_stream stream, int32_t *cuda_error) {
  if (cuda_error != nullptr) *cuda_error = 0;
  if (params == nullptr) return PGQA_STATUS_INVALID_ARGUMENT;
  const pgqa_naive_decode_params &p = *params;
  if (p.batch < 0 || p.n_heads <= 0 || p.head_dim <= 0 || p.head_dim > kMaxHeadDim)
    return PGQA_STATUS_INVALID_ARGUMENT;
  if (p.batch == 0) return PGQA_STATUS_OK;
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.context_lens == nullptr ||
      p.key_starts == nullptr || p.out == nullptr)
    return PGQA_STATUS_INVALID_ARGUMENT;
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.n_heads;
  if (blocks > 0x7fffffff) return PGQA_STATUS_INVALID_ARGUMENT;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const float scale_log2 = p.scale * pgqa::kLog2e;
  switch (p.dtype) {
    case PGQA_DTYPE_BF16:
      PGQA_LAUNCH(naive_decode_kernel<__nv_bfloat16>, static_cast<unsigned>(blocks), kThreads, 0, s,
          static_cast<const __nv_bfloat16 *>(p.q), static_cast<const __nv_bfloat16 *>(p.k),
          static_cast<const __nv_bfloat16 *>(p.v), p.context_lens, p.key_starts,
          static_cast<__nv_bfloat16 *>(p.out), p.n_heads, p.head_dim, scale_log2);
      break;
    case PGQA_DTYPE_F16:
      PGQA_LAUNCH(naive_decode_kernel<__half>, static_cast<unsigned>(blocks), kThreads, 0, s,
          static_cast<const __half *>(p.q), static_cast<const __half *>(p.k),
          static_cast<const __half *>(p.v), p.context_lens, p.key_starts,
          static_cast<__half *>(p.out), p.n_heads, p.head_dim, scale_log2);
      break;
    default: return PGQA_STATUS_UNSUPPORTED;
  }
  return pgqa::launch_status(cuda_error);
}
