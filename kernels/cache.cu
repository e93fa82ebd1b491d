// cache.cu: the cache kernels: write new tokens' K/V into their slots, copy blocks.
//
// The copies move rows as 16-byte vectors and are dtype-agnostic (fp8 pages included); the
// quantizing write turns each 8 values of a new 16-bit row into 8 fp8 bytes. Offsets are 64-bit.

#include "common.cuh"
#include "fp8.cuh"

namespace {

constexpr int kThreads = 128;

// One thread block per new token: copies its K and V rows (all K/V heads) into its slot.
// k_new, v_new: [num_tokens, row_vecs]; k_cache, v_cache: [num_slots, row_vecs] (vectors).
__global__ void __launch_bounds__(kThreads)
    write_kv_kernel(const uint4 *__restrict__ k_new, const uint4 *__restrict__ v_new,
                    uint4 *__restrict__ k_cache, uint4 *__restrict__ v_cache,
                    const int64_t *__restrict__ slot_mapping, int64_t num_slots, int row_vecs) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0 || slot >= num_slots) return;  // uniform over the block
  const int64_t src = token * row_vecs;
  const int64_t dst = slot * row_vecs;
  for (int i = threadIdx.x; i < row_vecs; i += blockDim.x) {
    k_cache[dst + i] = k_new[src + i];
    v_cache[dst + i] = v_new[src + i];
  }
}

// One thread block per new token: quantizes its K and V rows (all K/V heads) into its slot of
// fp8 pages, 8 values (16 bytes in, 8 bytes out) per step: value x of K/V head h is stored as
// sat_finite(x / k_scale[h]) (v_scale[h] for V). k_new, v_new: [num_tokens, row_len] of T;
// k_cache, v_cache: [num_slots, row_len] fp8 (F's format); head_dim a multiple of 8.
template <typename T, typename F>
__global__ void __launch_bounds__(kThreads)
    write_kv_fp8_kernel(const T *__restrict__ k_new, const T *__restrict__ v_new,
                        uint8_t *__restrict__ k_cache, uint8_t *__restrict__ v_cache,
                        const int64_t *__restrict__ slot_mapping, int64_t num_slots, int row_len,
                        int head_dim, const float *__restrict__ k_scale,
                        const float *__restrict__ v_scale) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0 || slot >= num_slots) return;  // uniform over the block
  const int64_t src = token * row_len;
  const int64_t dst = slot * row_len;
  const F *tag = nullptr;
  for (int i = threadIdx.x * 8; i < row_len; i += blockDim.x * 8) {
    const int head = i / head_dim;
    float k[8], v[8];
    pgqa::to_float8(pgqa::load_vec<uint4>(k_new + src + i), k, k_new);
    pgqa::to_float8(pgqa::load_vec<uint4>(v_new + src + i), v, v_new);
    pgqa::store_vec<uint2>(k_cache + dst + i, pgqa::quantize8(k, k_scale[head], tag));
    pgqa::store_vec<uint2>(v_cache + dst + i, pgqa::quantize8(v, v_scale[head], tag));
  }
}

template <typename T>
pgqa_status launch_write_fp8(const pgqa_write_kv_params &p, cudaStream_t stream, int32_t *cuda_error) {
  const int row_len = p.n_kv_heads * p.head_dim;
  const dim3 grid(static_cast<unsigned>(p.num_tokens));
  const T *k_new = static_cast<const T *>(p.k_new);
  const T *v_new = static_cast<const T *>(p.v_new);
  uint8_t *k_cache = static_cast<uint8_t *>(p.k_cache);
  uint8_t *v_cache = static_cast<uint8_t *>(p.v_cache);
  auto kernel = p.cache_dtype == PGQA_DTYPE_F8_E4M3 ? write_kv_fp8_kernel<T, pgqa::fp8_e4m3>
                                                    : write_kv_fp8_kernel<T, pgqa::fp8_e5m2>;
  PGQA_LAUNCH(kernel, grid, kThreads, 0, stream, k_new, v_new, k_cache, v_cache, p.slot_mapping,
              p.num_slots, row_len, p.head_dim, p.k_scale, p.v_scale);
  return pgqa::launch_status(cuda_error);
}

// grid (num_copies, num_tensors): one thread block copies one block of one tensor.
// pages: [num_tensors, num_blocks, block_vecs] vectors; block_copies: [num_copies, 2].
__global__ void __launch_bounds__(256)
    copy_blocks_kernel(uint4 *__restrict__ pages, const int32_t *__restrict__ block_copies,
                       int num_blocks, int64_t block_vecs) {
  const int32_t src = block_copies[2 * static_cast<int64_t>(blockIdx.x)];
  const int32_t dst = block_copies[2 * static_cast<int64_t>(blockIdx.x) + 1];
  if (src < 0 || src >= num_blocks || dst < 0 || dst >= num_blocks) return;
  uint4 *tensor = pages + static_cast<int64_t>(blockIdx.y) * num_blocks * block_vecs;
  const uint4 *from = tensor + static_cast<int64_t>(src) * block_vecs;
  uint4 *to = tensor + static_cast<int64_t>(dst) * block_vecs;
  for (int64_t i = threadIdx.x; i < block_vecs; i += blockDim.x) to[i] = from[i];
}

}  // namespace

extern "C" pgqa_status pgqa_write_kv(const pgqa_write_kv_params *params, pgqa_stream stream,
                                     int32_t *cuda_error) {
  if (cuda_error != nullptr) *cuda_error = 0;
  if (params == nullptr) return PGQA_STATUS_INVALID_ARGUMENT;
  const pgqa_write_kv_params &p = *params;
  const int elem_bytes = pgqa::dtype_bytes(p.dtype);
  if (elem_bytes == 0 || p.num_tokens < 0 || p.num_slots < 0 || p.n_kv_heads <= 0 ||
      p.head_dim <= 0 || p.num_tokens > 0x7fffffff)
    return PGQA_STATUS_INVALID_ARGUMENT;
  const bool fp8 = pgqa::is_fp8(p.cache_dtype);
  if (!fp8 && p.cache_dtype != p.dtype) return PGQA_STATUS_INVALID_ARGUMENT;
  if (fp8 && p.dtype != PGQA_DTYPE_F16 && p.dtype != PGQA_DTYPE_BF16) return PGQA_STATUS_UNSUPPORTED;
  if (fp8 && (p.head_dim % 16 != 0 || static_cast<int64_t>(p.n_kv_heads) * p.head_dim > 0x7fffffff))
    return PGQA_STATUS_INVALID_ARGUMENT;
  if (p.num_tokens == 0) return PGQA_STATUS_OK;
  if (p.k_new == nullptr || p.v_new == nullptr || p.k_cache == nullptr || p.v_cache == nullptr ||
      p.slot_mapping == nullptr || (fp8 && (p.k_scale == nullptr || p.v_scale == nullptr)))
    return PGQA_STATUS_INVALID_ARGUMENT;
  if (fp8) {
    if (!pgqa::aligned16(p.k_new) || !pgqa::aligned16(p.v_new) || !pgqa::aligned16(p.k_cache) ||
        !pgqa::aligned16(p.v_cache))
      return PGQA_STATUS_MISALIGNED;
    const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    return p.dtype == PGQA_DTYPE_BF16 ? launch_write_fp8<__nv_bfloat16>(p, s, cuda_error)
                                      : launch_write_fp8<__half>(p, s, cuda_error);
  }
  const int64_t row_bytes = static_cast<int64_t>(p.n_kv_heads) * p.head_dim * elem_bytes;
  if (row_bytes % 16 != 0 || !pgqa::aligned16(p.k_new) || !pgqa::aligned16(p.v_new) ||
      !pgqa::aligned16(p.k_cache) || !pgqa::aligned16(p.v_cache))
    return PGQA_STATUS_MISALIGNED;
  PGQA_LAUNCH(write_kv_kernel, static_cast<unsigned>(p.num_tokens), kThreads, 0,
              reinterpret_cast<cudaStream_t>(stream),
      static_cast<const uint4 *>(p.k_new), static_cast<const uint4 *>(p.v_new),
      static_cast<uint4 *>(p.k_cache), static_cast<uint4 *>(p.v_cache), p.slot_mapping,
      p.num_slots, static_cast<int>(row_bytes / 16));
  return pgqa::launch_status(cuda_error);
}

extern "C" pgqa_status pgqa_copy_blocks(const pgqa_copy_blocks_params *params,
                                        pgqa_stream stream, int32_t *cuda_error) {
  if (cuda_error != nullptr) *cuda_error = 0;
  if (params == nullptr) return PGQA_STATUS_INVALID_ARGUMENT;
  const pgqa_copy_blocks_params &p = *params;
  const int elem_bytes = pgqa::dtype_bytes(p.dtype);
  if (elem_bytes == 0 || p.num_copies < 0 || p.num_copies > 0x7fffffff || p.block_len <= 0 ||
      p.num_tensors <= 0 || p.num_tensors > 65535 || p.num_blocks <= 0)
    return PGQA_STATUS_INVALID_ARGUMENT;
  if (p.num_copies == 0) return PGQA_STATUS_OK;
  if (p.pages == nullptr || p.block_copies == nullptr) return PGQA_STATUS_INVALID_ARGUMENT;
  const int64_t block_bytes = p.block_len * elem_bytes;
  if (block_bytes % 16 != 0 || !pgqa::aligned16(p.pages)) return PGQA_STATUS_MISALIGNED;
  const dim3 grid(static_cast<unsigned>(p.num_copies), static_cast<unsigned>(p.num_tensors));
  PGQA_LAUNCH(copy_blocks_kernel, grid, 256, 0, reinterpret_cast<cudaStream_t>(stream),
      static_cast<uint4 *>(p.pages), p.block_copies, p.num_blocks, block_bytes / 16);
  return pgqa::launch_status(cuda_error);
}
