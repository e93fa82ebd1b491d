// attend_cuda_cores.cuh: the CUDA-core kernel of pgqa_attend (see paged_gqa.h), for work items
// with few rows (decode, speculation) on any GPU, and its launcher; included by attend.cu, the
// entry point, which also launches the tensor-core kernel (attend_tensor_cores.cu) and the merge.
//
// One thread block = one (work item: a sequence and up to tokens_per_work of its query rows,
// K/V head or chunk of its query heads, split of the keys). Its rows are (query row, query
// head) pairs: row r is query row j0 + r / heads, head head0 + r % heads. Per tile of kKeys
// keys it
//   0. brings the tile's K and V rows into shared memory with cp.async, the next tile's copies
//      in flight while this one is computed (two buffers);
//   1. scores s[r][t] for every (row, key) pair, in the log2 domain: (scale * log2 e) q_r . k_t,
//      or with a soft-cap (cap log2 e) tanh(scale q_r . k_t / cap); plus the ALiBi bias
//      (slope log2 e) (key - position); -inf outside the row's visible keys (causal limit,
//      window);
//   2. per row, one warp: online softmax in the log2 domain (running max m, sum l), the tile's
//      probabilities written back over the scores, alpha = exp2(m_old - m_new) (a row that has
//      seen no key yet keeps m = -inf, p = 0: no NaN from -inf - -inf);
//   3. every thread owns up to kAccItems 8-element slices of the rows' outputs and adds
//      sum_t p[r][t] * v_t to them (after scaling them by alpha); with fewer slices than
//      threads, several threads share a slice, each over its part of the keys, and add their
//      sums at the end.
// Each K and V byte of the block's range is read from global memory once for all its rows;
// the range starts at the first row's window start and ends at the last row's causal limit, so
// tiles left of the window or above the diagonal are never loaded. Sinks enter at the end (one
// split) or in the merge (several).
//
// Pages of fp8 (KV = pgqa::fp8_e4m3 or fp8_e5m2; T stays the 16-bit type of q and out): the
// tiles hold the 8-bit values as they are in memory (16 per 16-byte copy), converted to f32 in
// the dot products and the P V loop. The scales are folded, not applied per value: the block
// serves one K/V head, so k_scale multiplies the pre-scaled q (every score carries it once) and
// v_scale the normalisation factor (every output carries it once); attention over the stored
// values is then exactly attention over the dequantized ones.

#pragma once

#include "common.cuh"
#include "fp8.cuh"

namespace {

constexpr int kThreads = PGQA_ATTEND_THREADS;
constexpr int kWarps = kThreads / 32;
constexpr int kAccItems = PGQA_ATTEND_ACC_ITEMS;

// KV: the pages' element type (T itself, or an fp8 tag); D: head_dim.
template <typename KV, int D>
struct Geometry {
  static constexpr bool kFp8 = sizeof(KV) == 1;
  static constexpr int kChunks = D / 8;  // 8-element slices per row (16 bytes of 16-bit K/V)
  // Keys per tile: about 4096 elements of K (and of V) per buffer.
  static constexpr int kKeys = 4096 / D >= 64 ? 64 : (4096 / D >= 32 ? 32 : 16);
  // Score row stride in floats: one more than the keys, so the lanes of a warp reading key t of
  // different rows in P.V (prob[t]) hit different banks (rows kKeys floats apart would share
  // one).
  static constexpr int kScoreStride = kKeys + 1;
  // Elements per 16-byte copy, and copies per row.
  static constexpr int kCopyElems = 16 / static_cast<int>(sizeof(KV));
  static constexpr int kCopyChunks = D / kCopyElems;
  // Shared-memory row stride in elements: an odd number of 16-byte bank groups, so the 8
  // threads of a quarter warp reading 16 bytes each of 8 different rows never collide. 16-bit:
  // 16 bytes of padding (2 D + 16 bytes: D / 8 + 1 groups, odd for every head_dim built);
  // fp8: D bytes when D / 16 is odd (80), else 16 more.
  static constexpr int kRowStride = !kFp8 ? D + 8 : ((D / 16) % 2 == 1 ? D : D + 16);
  static constexpr int kTileElems = kKeys * kRowStride;
  // Rows one block serves: kAccItems slices of 8 per thread.
  static constexpr int kMaxRows = kAccItems * kThreads / kChunks;
};

// Shared memory of a block serving `rows` rows: K and V tiles (two buffers each) of KV,
// then q [rows][D] f32, scores [rows][kScoreStride] f32, m, l, alpha, bias [rows] f32.
template <typename KV, int D>
size_t smem_bytes(int rows) {
  using G = Geometry<KV, D>;
  return 4 * G::kTileElems * sizeof(KV) + static_cast<size_t>(rows) * (D + G::kScoreStride + 4) * sizeof(float);
}

// Eight K/V elements of a shared row (a 16-byte or, for fp8, an 8-byte vector) as floats.
__device__ inline void load8(const __nv_bfloat16 *row, float (&f)[8]) {
  pgqa::to_float8(pgqa::load_vec<uint4>(row), f, row);
}
__device__ inline void load8(const __half *row, float (&f)[8]) {
  pgqa::to_float8(pgqa::load_vec<uint4>(row), f, row);
}
__device__ inline void load8(const pgqa::fp8_e4m3 *row, float (&f)[8]) {
  pgqa::fp8_to_float8(pgqa::load_vec<uint2>(row), f, row);
}
__device__ inline void load8(const pgqa::fp8_e5m2 *row, float (&f)[8]) {
  pgqa::fp8_to_float8(pgqa::load_vec<uint2>(row), f, row);
}

// q_h . k over D elements: q from shared f32 (pre-scaled), k a shared row of KV.
template <typename KV, int D>
__device__ inline float dot(const float *q, const KV *k) {
  float sum = 0.0f;
  if constexpr (sizeof(KV) == 2) {
#pragma unroll
    for (int c = 0; c < D / 8; ++c) {
      float kf[8];
      pgqa::to_float8(pgqa::load_vec<uint4>(k + c * 8), kf, k);
      const float4 q0 = pgqa::load_vec<float4>(q + c * 8);
      const float4 q1 = pgqa::load_vec<float4>(q + c * 8 + 4);
      sum += q0.x * kf[0] + q0.y * kf[1] + q0.z * kf[2] + q0.w * kf[3] + q1.x * kf[4] + q1.y * kf[5] +
             q1.z * kf[6] + q1.w * kf[7];
    }
  } else {
    // 16 stored values per 16-byte read (a quarter warp's reads of 8 rows hit distinct banks).
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
      float kf[16];
      pgqa::fp8_to_float16(pgqa::load_vec<uint4>(k + c * 16), kf, k);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float4 q0 = pgqa::load_vec<float4>(q + c * 16 + 8 * h);
        const float4 q1 = pgqa::load_vec<float4>(q + c * 16 + 8 * h + 4);
        const float *x = kf + 8 * h;
        sum += q0.x * x[0] + q0.y * x[1] + q0.z * x[2] + q0.w * x[3] + q1.x * x[4] + q1.y * x[5] +
               q1.z * x[6] + q1.w * x[7];
      }
    }
  }
  return sum;
}

template <typename T, typename KV, int D>
__global__ void __launch_bounds__(kThreads, 1)
    cuda_core_attend_kernel(const pgqa_attend_params p, int block_shift, int group, int head_chunks) {
  using G = Geometry<KV, D>;
  PGQA_DYNAMIC_SHARED(smem);
  KV *k_tiles = reinterpret_cast<KV *>(smem);  // [2][kKeys][kRowStride]
  KV *v_tiles = k_tiles + 2 * G::kTileElems;    // [2][kKeys][kRowStride]

  const int seq = p.work[2 * static_cast<int64_t>(blockIdx.x)];
  const int j0 = p.work[2 * static_cast<int64_t>(blockIdx.x) + 1];  // first query row (of seq)
  const int kv_head = blockIdx.y / head_chunks;
  const int chunk = blockIdx.y % head_chunks;
  const int split = blockIdx.z;
  const int head0 = kv_head * group + chunk * G::kMaxRows;  // first query head served
  const int heads = min(G::kMaxRows, group - chunk * G::kMaxRows);
  const int q_begin = p.query_starts[seq];
  const int query_len = p.query_starts[seq + 1] - q_begin;
  const int tokens = min(p.tokens_per_work, query_len - j0);
  const int rows = tokens * heads;

  float *q_s = reinterpret_cast<float *>(v_tiles + 2 * G::kTileElems);  // [rows][D]
  float *scores = q_s + rows * D;                                         // [rows][kScoreStride]
  float *m_s = scores + rows * G::kScoreStride;                           // [rows]
  float *l_s = m_s + rows;                                                // [rows]
  float *alpha_s = l_s + rows;                                            // [rows]
  float *bias_s = alpha_s + rows;  // [rows]: ALiBi slope of the row's head, times log2 e

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int context_len = p.context_lens[seq];
  // Query row j of the item (row r: j = r / heads) sees keys [keys.lo(j), keys.hi(j)); the block
  // reads [start, end), this split's share of its range.
  const pgqa::BlockKeys keys = pgqa::block_keys(p, context_len, query_len, j0, tokens, split);
  const int start = keys.start;
  const int end = keys.end;
  const int num_tiles = end > start ? (end - start + G::kKeys - 1) / G::kKeys : 0;

  const KV *k_cache = static_cast<const KV *>(p.k_cache);
  const KV *v_cache = static_cast<const KV *>(p.v_cache);
  const int32_t *block_table = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks;

  // Issues the copies of tile `tile` into buffer tile % 2 (rows past `end` are not loaded;
  // they are never read).
  auto load_tile = [&](int tile) {
    const int base = start + tile * G::kKeys;
    const int valid = min(G::kKeys, end - base);
    KV *k_dst = k_tiles + (tile & 1) * G::kTileElems;
    KV *v_dst = v_tiles + (tile & 1) * G::kTileElems;
    for (int i = threadIdx.x; i < valid * G::kCopyChunks; i += kThreads) {
      const int row = i / G::kCopyChunks;
      const int c = (i % G::kCopyChunks) * G::kCopyElems;  // first element of the copy
      const int pos = base + row;
      const int block = block_table[pos >> block_shift];
      if (block < 0 || block >= p.num_blocks) continue;  // validated on the host; never read
      const int slot = pos & (p.block_size - 1);
      const int64_t offset =
          ((static_cast<int64_t>(block) * p.block_size + slot) * p.n_kv_heads + kv_head) * D + c;
      pgqa::copy16_async(k_dst + row * G::kRowStride + c, k_cache + offset);
      pgqa::copy16_async(v_dst + row * G::kRowStride + c, v_cache + offset);
    }
    pgqa::copy_async_commit();
  };

  if (num_tiles > 0) load_tile(0);

  // Soft-cap: q pre-scaled by scale, then s = (cap log2 e) tanh(q.k / cap); else by
  // scale * log2 e. tanhf saturates to +-1 for any large or infinite argument: no NaN.
  // fp8 pages: k_scale joins the scale (one factor of every score of this K/V head).
  const bool capped = p.logit_softcap > 0.0f;
  float q_scale = capped ? p.scale : p.scale * pgqa::kLog2e;
  if constexpr (G::kFp8) q_scale *= p.k_scale[kv_head];
  const float inv_cap = capped ? 1.0f / p.logit_softcap : 0.0f;
  const float cap_log2 = p.logit_softcap * pgqa::kLog2e;
  const T *q = static_cast<const T *>(p.q);
  for (int i = threadIdx.x; i < rows * D; i += kThreads) {
    const int r = i / D;
    const int64_t token = q_begin + j0 + r / heads;
    q_s[i] = pgqa::to_float(q[(token * p.n_heads + head0 + r % heads) * D + i % D]) * q_scale;
  }
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    m_s[r] = -INFINITY;
    l_s[r] = 0.0f;
    bias_s[r] = p.alibi_slopes != nullptr ? p.alibi_slopes[head0 + r % heads] * pgqa::kLog2e : 0.0f;
  }

  // P.V: item = (row, 8-element slice). When the block has fewer items than threads, `parts`
  // threads share each item, part p taking keys p, p + parts, ... of every tile (item0, part:
  // this thread's); their partial sums are added at the end. Otherwise parts = 1 and thread t
  // owns items t, t + kThreads, ... (kAccItems of them at most).
  const int items = rows * G::kChunks;
  const int parts = items >= kThreads ? 1 : kThreads / items;
  const int part = parts > 1 ? threadIdx.x / items : 0;
  // An idle thread (part >= parts) gets item `items`, past the last row: it skips every item.
  const int item0 = parts == 1 ? threadIdx.x : (part < parts ? threadIdx.x % items : items);

  float acc[kAccItems][8];
#pragma unroll
  for (int k = 0; k < kAccItems; ++k)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[k][j] = 0.0f;

  for (int tile = 0; tile < num_tiles; ++tile) {
    if (tile + 1 < num_tiles) {
      load_tile(tile + 1);  // its buffer was last read before the previous iteration's end barrier
      pgqa::copy_async_wait<1>();
    } else {
      pgqa::copy_async_wait<0>();
    }
    __syncthreads();  // tile `tile` (and, first time, q_s, m_s, l_s) visible to every thread

    const int base = start + tile * G::kKeys;
    const int valid = min(G::kKeys, end - base);  // >= 1
    const KV *k_tile = k_tiles + (tile & 1) * G::kTileElems;
    const KV *v_tile = v_tiles + (tile & 1) * G::kTileElems;

    // 1. Scores; keys past the tile or outside the row's visible keys are masked.
    for (int i = threadIdx.x; i < rows * G::kKeys; i += kThreads) {
      const int r = i / G::kKeys;
      const int t = i % G::kKeys;
      const int key = base + t;
      const int j = r / heads;
      const bool visible = t < valid && key < keys.hi(j) && key >= keys.lo(j);
      float score = -INFINITY;
      if (visible) {
        score = dot<KV, D>(q_s + r * D, k_tile + t * G::kRowStride);
        if (capped) score = cap_log2 * tanhf(score * inv_cap);
        score += bias_s[r] * static_cast<float>(key - keys.position(j));
      }
      scores[r * G::kScoreStride + t] = score;
    }
    __syncthreads();

    // 2. Online softmax, one warp per row. A row whose keys all lie past its limit so far has
    //    m = -inf: its probabilities are 0 and alpha is irrelevant (its accumulators are 0).
    for (int r = warp; r < rows; r += kWarps) {
      float *row = scores + r * G::kScoreStride;
      float tile_max = -INFINITY;
      for (int t = lane; t < G::kKeys; t += 32) tile_max = fmaxf(tile_max, row[t]);
      tile_max = pgqa::warp_max(tile_max);
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, tile_max);
      float sum = 0.0f;
      for (int t = lane; t < G::kKeys; t += 32) {
        const float e = row[t] == -INFINITY ? 0.0f : exp2f(row[t] - m_new);
        row[t] = e;
        sum += e;
      }
      sum = pgqa::warp_sum(sum);
      if (lane == 0) {
        const float alpha = m_old == -INFINITY ? 0.0f : exp2f(m_old - m_new);
        alpha_s[r] = alpha;
        l_s[r] = l_s[r] * alpha + sum;
        m_s[r] = m_new;
      }
    }
    __syncthreads();

    // 3. Outputs: this thread's items, its part of the tile's keys.
#pragma unroll
    for (int k = 0; k < kAccItems; ++k) {
      const int item = k == 0 ? item0 : threadIdx.x + k * kThreads;
      const int r = item / G::kChunks;
      const int c = item % G::kChunks;
      if (r < rows) {
        const float alpha = alpha_s[r];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[k][j] *= alpha;
        const float *prob = scores + r * G::kScoreStride;
        for (int t = part; t < valid; t += parts) {
          float vf[8];
          load8(v_tile + t * G::kRowStride + c * 8, vf);
          const float pt = prob[t];
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[k][j] += pt * vf[j];
        }
      }
    }
    __syncthreads();  // this tile's buffers, scores and alpha are free for the next iteration
  }
  __syncthreads();  // m_s, l_s final (also when this split has no key); the K/V tiles are free

  if (parts > 1) {
    // Parts 1.. hand their partial sums to part 0 through the K/V tiles' memory (at most
    // (kThreads - items) x 8 floats: 4 KiB; the tiles hold 20 KiB or more).
    // [parts - 1][2 halves][items][4]: a warp's 16-byte accesses are contiguous (no conflict).
    float *partial_s = reinterpret_cast<float *>(smem);
    if (part > 0 && part < parts) {
      float *dst = partial_s + ((part - 1) * 2 * items + item0) * 4;
      pgqa::store_vec<float4>(dst, make_float4(acc[0][0], acc[0][1], acc[0][2], acc[0][3]));
      pgqa::store_vec<float4>(dst + items * 4, make_float4(acc[0][4], acc[0][5], acc[0][6], acc[0][7]));
    }
    __syncthreads();
    if (part == 0) {
      for (int q = 1; q < parts; ++q) {
        const float *src = partial_s + ((q - 1) * 2 * items + item0) * 4;
        const float4 lo = pgqa::load_vec<float4>(src);
        const float4 hi = pgqa::load_vec<float4>(src + items * 4);
        acc[0][0] += lo.x;
        acc[0][1] += lo.y;
        acc[0][2] += lo.z;
        acc[0][3] += lo.w;
        acc[0][4] += hi.x;
        acc[0][5] += hi.y;
        acc[0][6] += hi.z;
        acc[0][7] += hi.w;
      }
    }
  }

  // Row r's output row is (token q_begin + j0 + r / heads, head head0 + r % heads).
  auto out_row = [&](int r) {
    return (static_cast<int64_t>(q_begin) + j0 + r / heads) * p.n_heads + head0 + r % heads;
  };
  // Per row: the factor of its accumulators (into alpha_s) and its lse. One split: the final
  // result, the sink (if any) one more term of the denominator. Several: this split's partial,
  // without the sink (the merge adds it once). fp8 pages: v_scale joins the factor (one factor
  // of every output of this K/V head, partials included: the merge is linear in them).
  float out_scale = 1.0f;
  if constexpr (G::kFp8) out_scale = p.v_scale[kv_head];
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    const float m = m_s[r];
    const float l = l_s[r];
    const float sink2 = p.num_splits == 1 && p.sinks != nullptr
                            ? p.sinks[head0 + r % heads] * pgqa::kLog2e
                            : -INFINITY;
    const pgqa::Finish f = pgqa::finish_row(m, l, sink2);
    if constexpr (G::kFp8) {
      alpha_s[r] = f.factor * out_scale;
    } else {
      alpha_s[r] = f.factor;
    }
    const int64_t row = out_row(r);
    if (p.num_splits == 1) {
      p.lse[row] = f.lse_log2 * pgqa::kLn2;
    } else {
      p.partial_lse[row * p.num_splits + split] = f.lse_log2;
    }
  }
  __syncthreads();

  // Normalise and store (part 0 of each item): the final output, or this split's partial for
  // the merge.
#pragma unroll
  for (int k = 0; k < kAccItems; ++k) {
    const int item = k == 0 ? item0 : threadIdx.x + k * kThreads;
    const int r = item / G::kChunks;
    const int c = item % G::kChunks;
    if (r < rows && part == 0) {
      const float inv = alpha_s[r];
      float o[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) o[j] = acc[k][j] * inv;
      const int64_t row = out_row(r);
      if (p.num_splits == 1) {
        T *out = static_cast<T *>(p.out) + row * D + c * 8;
        pgqa::store_vec<uint4>(out, pgqa::from_float8(o, out));
      } else {
        float *out = p.partial_out + (row * p.num_splits + split) * D + c * 8;
        pgqa::store_vec<float4>(out, make_float4(o[0], o[1], o[2], o[3]));
        pgqa::store_vec<float4>(out + 4, make_float4(o[4], o[5], o[6], o[7]));
      }
    }
  }
}

// The CUDA-core kernel over params.work (nothing when it is empty): kPrepare checks the launch
// and raises the shared-memory limit, kLaunch launches.
template <typename T, typename KV, int D>
pgqa_status launch(const pgqa_attend_params &p, cudaStream_t stream, int32_t *cuda_error,
                   pgqa::Phase phase) {
  if (p.num_work == 0) return PGQA_STATUS_OK;
  using G = Geometry<KV, D>;
  const int group = p.n_heads / p.n_kv_heads;
  const int head_chunks = (group + G::kMaxRows - 1) / G::kMaxRows;
  const int heads = min(group, G::kMaxRows);
  const int64_t grid_y = static_cast<int64_t>(p.n_kv_heads) * head_chunks;
  const int64_t max_rows = static_cast<int64_t>(p.tokens_per_work) * heads;
  const size_t smem = smem_bytes<KV, D>(static_cast<int>(max_rows));
  auto kernel = cuda_core_attend_kernel<T, KV, D>;
  if (phase == pgqa::Phase::kPrepare) {
    if (grid_y > 65535 || max_rows > G::kMaxRows) return PGQA_STATUS_INVALID_ARGUMENT;
    return pgqa::allow_shared_memory(kernel, smem_bytes<KV, D>(G::kMaxRows), smem, cuda_error);
  }
  const dim3 grid(static_cast<unsigned>(p.num_work), static_cast<unsigned>(grid_y),
                  static_cast<unsigned>(p.num_splits));
  const int block_shift = __builtin_ctz(static_cast<unsigned>(p.block_size));
  PGQA_LAUNCH(kernel, grid, kThreads, smem, stream, p, block_shift, group, head_chunks);
  return pgqa::launch_status(cuda_error);
}

// The CUDA-core kernel at the head_dim of `p` (nothing when params.work is empty).
template <typename T, typename KV>
pgqa_status launch_cuda_cores(const pgqa_attend_params &p, cudaStream_t stream, int32_t *cuda_error,
                           pgqa::Phase phase) {
  return pgqa::for_head_dim(p.head_dim, [&](auto dim) {
    return launch<T, KV, decltype(dim)::value>(p, stream, cuda_error, phase);
  });
}

}  // namespace
