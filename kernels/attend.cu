// attend.cu: pgqa_attend (see paged_gqa.h), the entry point of fused paged GQA attention for any
// query lengths: it validates the parameters once, prepares both kernels (nothing launches when
// either refuses), launches the CUDA-core kernel over params.work (attend_cuda_cores.cuh), the
// tensor-core kernel's two layouts over params.mma_work and params.narrow_work
// (attend_tensor_cores.cu), and the merge of the splits (merge.cu).

#include "attend_cuda_cores.cuh"
#include "attend_tensor_cores_launch.cuh"
#include "common.cuh"
#include "merge.cuh"

namespace {

bool is_power_of_two(int x) { return x > 0 && (x & (x - 1)) == 0; }

// Both kernels prepared (nothing launched when either refuses), then the CUDA-core kernel, the
// tensor-core kernel, and the merge of the splits.
template <typename T, typename KV>
pgqa_status launch_all(const pgqa_attend_params &p, cudaStream_t stream, int32_t *cuda_error) {
  pgqa_status status = PGQA_STATUS_OK;
  for (const pgqa::Phase phase : {pgqa::Phase::kPrepare, pgqa::Phase::kLaunch}) {
    if (status == PGQA_STATUS_OK && p.num_work > 0)
      status = launch_cuda_cores<T, KV>(p, stream, cuda_error, phase);
    if (status == PGQA_STATUS_OK) status = pgqa::launch_tensor_cores(p, stream, cuda_error, phase);
  }
  if (status != PGQA_STATUS_OK || p.num_splits == 1) return status;
  const cudaError_t err = pgqa::merge_splits(
      p.partial_out, p.partial_lse, p.sinks, p.n_heads, p.out, p.lse,
      static_cast<int64_t>(p.num_tokens) * p.n_heads, p.num_splits, p.head_dim, p.dtype, stream);
  if (cuda_error != nullptr) *cuda_error = static_cast<int32_t>(err);
  return err == cudaSuccess ? PGQA_STATUS_OK : PGQA_STATUS_CUDA_ERROR;
}

}  // namespace

extern "C" pgqa_status pgqa_attend(const pgqa_attend_params *params, pgqa_stream stream,
                                   int32_t *cuda_error) {
  if (cuda_error != nullptr) *cuda_error = 0;
  if (params == nullptr) return PGQA_STATUS_INVALID_ARGUMENT;
  const pgqa_attend_params &p = *params;
  if (p.num_work < 0 || p.num_mma_work < 0 || p.num_narrow_work < 0 || p.num_tokens < 0 || p.n_heads <= 0 || p.n_kv_heads <= 0 ||
      p.n_heads % p.n_kv_heads != 0 || p.head_dim <= 0 || !is_power_of_two(p.block_size) ||
      p.max_blocks < 0 || p.num_blocks <= 0 || p.tokens_per_work < 1 ||
      (p.num_mma_work > 0 && p.mma_tokens_per_work < 1) ||
      (p.num_narrow_work > 0 && p.narrow_tokens_per_work < 1) || p.num_splits < 1 ||
      p.num_splits > PGQA_ATTEND_MAX_SPLITS || p.keys_per_split < 1 || p.window_left < -1 ||
      (p.causal != 0 && p.causal != 1) || !(p.logit_softcap >= 0.0f && p.logit_softcap < INFINITY))
    return PGQA_STATUS_INVALID_ARGUMENT;
  if ((p.num_work == 0 && p.num_mma_work == 0 && p.num_narrow_work == 0) || p.num_tokens == 0)
    return PGQA_STATUS_OK;
  if (p.q == nullptr || p.k_cache == nullptr || p.v_cache == nullptr || p.block_tables == nullptr ||
      p.context_lens == nullptr || p.query_starts == nullptr ||
      (p.num_work > 0 && p.work == nullptr) || (p.num_mma_work > 0 && p.mma_work == nullptr) ||
      (p.num_narrow_work > 0 && p.narrow_work == nullptr) ||
      p.out == nullptr || p.lse == nullptr ||
      (p.num_splits > 1 && (p.partial_out == nullptr || p.partial_lse == nullptr)) ||
      (pgqa::is_fp8(p.kv_dtype) && (p.k_scale == nullptr || p.v_scale == nullptr)))
    return PGQA_STATUS_INVALID_ARGUMENT;
  if (!pgqa::aligned16(p.q) || !pgqa::aligned16(p.k_cache) || !pgqa::aligned16(p.v_cache) ||
      !pgqa::aligned16(p.out) || (p.num_splits > 1 && !pgqa::aligned16(p.partial_out)))
    return PGQA_STATUS_MISALIGNED;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (p.dtype != PGQA_DTYPE_BF16 && p.dtype != PGQA_DTYPE_F16) return PGQA_STATUS_UNSUPPORTED;
  const bool bf16 = p.dtype == PGQA_DTYPE_BF16;
  if (p.kv_dtype == p.dtype)
    return bf16 ? launch_all<__nv_bfloat16, __nv_bfloat16>(p, s, cuda_error)
                : launch_all<__half, __half>(p, s, cuda_error);
  switch (p.kv_dtype) {
    case PGQA_DTYPE_F8_E4M3:
      return bf16 ? launch_all<__nv_bfloat16, pgqa::fp8_e4m3>(p, s, cuda_error)
                  : launch_all<__half, pgqa::fp8_e4m3>(p, s, cuda_error);
    case PGQA_DTYPE_F8_E5M2:
      return bf16 ? launch_all<__nv_bfloat16, pgqa::fp8_e5m2>(p, s, cuda_error)
                  : launch_all<__half, pgqa::fp8_e5m2>(p, s, cuda_error);
    default: return PGQA_STATUS_UNSUPPORTED;
  }
}
