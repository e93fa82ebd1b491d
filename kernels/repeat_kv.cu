// repeat_kv.cu: materialise the K/V heads of GQA for every query head (the naive baseline's
// first step). dst head h = src head h / n_rep, as in the Llama reference code.
//
// The copy is dtype-agnostic: rows are moved as 16-byte vectors. Each thread reads one source
// vector once and writes its n_rep copies, so the source is read exactly once.

#include "common.cuh"

namespace {

constexpr int kThreads = 256;

// src: [num_tokens, n_kv_heads, row_vecs] 16-byte vectors
// dst: [num_tokens, n_kv_heads * n_rep, row_vecs] 16-byte vectors
__global__ void __launch_bounds__(kThreads) repeat_kv_kernel(const uint4 *__restrict__ src,
                                                             uint4 *__restrict__ dst,
                                                             int64_t num_src_vecs, int n_kv_heads,
                                                             int n_rep, int row_vecs) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_src_vecs;
       i += stride) {
    const int vec = static_cast<int>(i % row_vecs);
    const int64_t token_head = i / row_vecs;  // token * n_kv_heads + kv_head
    const int kv_head = static_cast<int>(token_head % n_kv_heads);
    const int64_t token = token_head / n_kv_heads;
    const uint4 value = src[i];
    // First destination head of this kv_head: kv_head * n_rep (heads h with h / n_rep == kv_head).
    const int64_t n_heads = static_cast<int64_t>(n_kv_heads) * n_rep;
    int64_t out = (token * n_heads + static_cast<int64_t>(kv_head) * n_rep) * row_vecs + vec;
    for (int r = 0; r < n_rep; ++r, out += row_vecs) dst[out] = value;
  }
}

}  // namespace

extern "C" pgqa_status pgqa_repeat_kv(const pgqa_repeat_kv_params *params, pgqa_stream stream,
                                      int32_t *cuda_error) {
  if (cuda_error != nullptr) *cuda_error = 0;
  if (params == nullptr) return PGQA_STATUS_INVALID_ARGUMENT;
  const pgqa_repeat_kv_params &p = *params;
  const int elem_bytes = pgqa::dtype_bytes(p.dtype);
  if (elem_bytes == 0 || p.num_tokens < 0 || p.n_kv_heads <= 0 || p.n_rep <= 0 ||
      p.head_dim <= 0)
    return PGQA_STATUS_INVALID_ARGUMENT;
  if (p.num_tokens == 0) return PGQA_STATUS_OK;
  if (p.src == nullptr || p.dst == nullptr) return PGQA_STATUS_INVALID_ARGUMENT;
  const int64_t row_bytes = static_cast<int64_t>(p.head_dim) * elem_bytes;
  if (row_bytes % 16 != 0 || !pgqa::aligned16(p.src) || !pgqa::aligned16(p.dst))
    return PGQA_STATUS_MISALIGNED;

  const int row_vecs = static_cast<int>(row_bytes / 16);
  const int64_t num_src_vecs = p.num_tokens * p.n_kv_heads * row_vecs;
  // Grid-stride loop: enough blocks to fill any current GPU, never more than the work needs.
  const int64_t wanted = (num_src_vecs + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(wanted < 65536 ? wanted : 65536);
  PGQA_LAUNCH(repeat_kv_kernel, blocks, kThreads, 0, reinterpret_cast<cudaStream_t>(stream),
      static_cast<const uint4 *>(p.src), static_cast<uint4 *>(p.dst), num_src_vecs, p.n_kv_heads,
      p.n_rep, row_vecs);
  return pgqa::launch_status(cuda_error);
}
