// attend_tensor_cores.cuh: the tensor-core kernel of pgqa_attend (see paged_gqa.h), for work items
// with many rows: prompts, prompt chunks, and large groups, and its launcher, as templates over
// the MMA type T, the page type KV and head_dim D. Instantiated by attend_tensor_cores.cu (16-bit
// pages, KV = T) and attend_tensor_cores_fp8.cu (fp8 pages): two translation units, so that
// adding the fp8 kernels leaves the 16-bit kernels' code generation (registers) as it was.
//
// One thread block = one (work item, K/V head or chunk of its query heads, split of the keys).
// Its rows are (query row, query head) pairs packed as in attend_cuda_cores.cuh: row r is query row
// j0 + r / heads, head head0 + r % heads; rows from tokens * heads on are padding (their Q is
// zero and they are never stored). Two layouts of the block's warps (template kKeyWarps):
// - wide (kKeyWarps = 1; prompts, chunks, groups above 16): one warp per 16 rows, up to
//   kWideRows = 128 rows (8 warps; the launcher starts ceil(rows / 16) of them, so a group of
//   71 takes 5 warps and reads each K/V byte once); warp w owns rows 16 w .. 16 w + 15 and
//   every key of each tile;
// - narrow (kKeyWarps = 4; decode and short items of up to 16 rows): the rows fit one 16-row
//   fragment, and the 4 warps split the KEYS of each 64-key tile instead, warp w computing
//   keys 16 w .. 16 w + 15 with its own running max, sum and output (FlashInfer's NUM_WARPS_KV
//   idea); the four states are merged once, at the end, through shared memory, every warp
//   normalising and storing a quarter of the output columns. No warp computes padding rows
//   only, and each K/V byte is read once for the group.
// In the MMA fragments (mma.cuh) lane 4 g + t holds rows g and g + 8 of its warp's 16. Per tile
// of kKeys keys:
//   0. cp.async brings the tile's K and V rows into shared memory (two buffers: the next tile's
//      copies, issued just after the tile's one barrier, fly while this one is computed). Rows
//      past the range are zero-filled: P V must never multiply a zero probability by stale bits
//      that happen to be NaN;
//   1. S = Q K^T on tensor cores (ldmatrix of Q and of K rows, m16n8k16, f32), then in the
//      log2 domain S *= scale * log2 e (or, soft-capped, S = (cap log2 e) tanh(scale S / cap)),
//      plus the ALiBi bias (slope log2 e) (key - position), -inf outside each row's visible keys
//      (causal limit, window);
//   2. online softmax in registers: running max m (a quad of lanes shares a row: max over the
//      quad by shuffles), P = exp2(S - m), alpha = exp2(m_old - m_new); a row that has seen no
//      key keeps m = -inf and uses 0 as the base, so P = 0 and alpha = 0, never NaN;
//   3. O = alpha O + P V: P re-packed from the S accumulators as the A operand, V by
//      ldmatrix.trans as the B operand.
// The sum l of P stays per lane (its columns) and is summed over the quad at the end, where the
// sink (one split) joins the denominator. The block's key range runs from its first row's window
// start to its last row's causal limit: tiles left of the window or above the diagonal are never
// loaded or computed. Each K and V byte of the range crosses HBM once for all 64 rows.
//
// Pages of fp8 (KV = pgqa::fp8_e4m3 or fp8_e5m2; T, the MMA operand type, stays q's 16-bit
// type): step 0 brings the tile's 8-bit rows into a staging buffer (a ring of kStageBuffers:
// the next tile's copies fly while this one is computed; the narrow layout at head_dim <= 128
// keeps the next TWO tiles in flight, so that a block of 8-bit pages has as many bytes in flight
// as one of 16-bit pages), then, after the barrier that makes them visible,
// every thread widens 8 values at a time (exact: each fp8 value is a T value) into the one
// 16-bit K and V tile, and a second barrier makes that visible to ldmatrix (narrow: each warp
// widens only the 16 keys it computes, and __syncwarp suffices): the K/V bytes cross global
// memory once, as 8-bit values. The scales are folded as in attend_cuda_cores.cuh: k_scale into the
// score scale (before the soft-cap), v_scale into the normalisation factor.

#pragma once

#include "fp8.cuh"
#include "mma.cuh"
#include "attend_tensor_cores_launch.cuh"

namespace {

constexpr int kWideRows = PGQA_ATTEND_MMA_ROWS;       // the most rows of a wide block (8 warps)
constexpr int kNarrowRows = PGQA_ATTEND_NARROW_ROWS;  // rows of a narrow block (one fragment)
constexpr int kNarrowKeyWarps = 4;                    // warps of a narrow block, along the keys
constexpr int kMaxThreads = 32 * (kWideRows / 16);
static_assert(kNarrowRows == 16, "a narrow block's rows are one m16 fragment");

// The layout kKeyWarps (1: wide, kNarrowKeyWarps: narrow), the pages' element type KV (the MMA
// type T itself, or an fp8 tag) and head_dim D.
template <int kKeyWarps, typename KV, int D>
struct TileGeometry {
  static_assert(D % 16 == 0, "head_dim must be a multiple of 16 for m16n8k16");
  static constexpr bool kNarrow = kKeyWarps > 1;
  static constexpr bool kFp8 = sizeof(KV) == 1;
  static constexpr int kChunks = D / 8;  // 16-byte vectors per 16-bit row
  // Keys per tile: wide, 64 (32 at head_dim 256); narrow, 16 per warp.
  static constexpr int kKeys = kNarrow ? 16 * kKeyWarps : (D <= 128 ? 64 : 32);
  static constexpr int kWarpKeys = kKeys / kKeyWarps;  // keys of a tile one warp computes
  // Rows the block's heads come in chunks of (a chunk per block).
  static constexpr int kChunkRows = kNarrow ? kNarrowRows : kWideRows;
  // Row stride in elements: 16 bytes of padding move consecutive rows by 4 banks, so the 8 row
  // addresses of an ldmatrix (or of a quarter warp's 16-byte copies) hit distinct banks.
  static constexpr int kStride = D + 8;
  static constexpr int kTileElems = kKeys * kStride;
  // 16-bit K and V tiles: two buffers each that cp.async fills; fp8: one each, filled by the
  // widening, and a ring of kStageBuffers 8-bit staging buffers each ([kKeys][D] bytes,
  // unpadded) that cp.async fills.
  static constexpr int kBuffers = kFp8 ? 1 : 2;
  static constexpr int kStageBytes = kFp8 ? kKeys * D : 0;
  // Tiles whose copies fly while one is computed: one, or two for narrow fp8 blocks up to
  // head_dim 128 (2 x 64 keys x D bytes of K and V: the bytes of one 16-bit tile; 86 KiB of
  // shared memory at D = 128, under the 99 KiB of sm_86/89; at D = 256 one 8-bit tile is
  // already 32 KiB, and a third buffer would pass sm_80's 163 KiB).
  static constexpr int kAhead = kFp8 && kNarrow && D <= 128 ? 2 : 1;
  static constexpr int kStageBuffers = kFp8 ? kAhead + 1 : 0;
  // Narrow: the warps' final states for the merge, over the same memory after the loop:
  // outputs [kKeyWarps][D / 8][32 lanes][4] then (m lo, m hi, l lo, l hi) [kKeyWarps][32][4].
  static constexpr int kMergeFloats = kNarrow ? kKeyWarps * (D / 8 + 1) * 32 * 4 : 0;
};

// Shared memory of a block with `row_warps` 16-row fragments: Q [16 row_warps][kStride], K tiles
// [kBuffers][kKeys][kStride], V tiles the same (T); fp8: then K staging [kStageBuffers][kKeys][D],
// V staging the same (bytes). Narrow: at least the merge's floats.
template <typename T, typename KV, int D, int kKeyWarps>
constexpr size_t smem_bytes(int row_warps) {
  using G = TileGeometry<kKeyWarps, KV, D>;
  const size_t loop = (static_cast<size_t>(16 * row_warps) * G::kStride + 2 * G::kBuffers * G::kTileElems) *
                          sizeof(T) +
                      2 * static_cast<size_t>(G::kStageBuffers) * G::kStageBytes;
  const size_t merge = G::kMergeFloats * sizeof(float);
  return loop > merge ? loop : merge;
}

// Stores two adjacent output columns (d, d + 1) of output row `row`: the final output (one
// split) or this split's f32 partial.
template <typename T>
__device__ inline void store_pair(const pgqa_attend_params &p, int64_t row, int split, int d, float x0,
                                  float x1, int D) {
  if (p.num_splits == 1) {
    T *out = static_cast<T *>(p.out) + row * D + d;
    *reinterpret_cast<uint32_t *>(out) = pgqa::pack2(x0, x1, out);
  } else {
    float *out = p.partial_out + (row * p.num_splits + split) * D + d;
    pgqa::store_vec<float2>(out, make_float2(x0, x1));
  }
}

// The block's work list is `work` ([num_work, 2]: sequence, first query row), with
// `tokens_per_work` query rows per item; wide blocks have blockDim.x / 32 warps of 16 rows,
// narrow blocks kKeyWarps warps over one 16-row fragment.
template <typename T, typename KV, int D, int kKeyWarps>
__global__ void __launch_bounds__(kMaxThreads, 1)
    tensor_core_attend_kernel(const pgqa_attend_params p, const int32_t *work, int tokens_per_work, int block_shift,
                   int group, int head_chunks) {
#if PGQA_MMA_CODE
  using G = TileGeometry<kKeyWarps, KV, D>;
  const int threads = blockDim.x;
  const int row_warps = G::kNarrow ? 1 : threads / 32;
  PGQA_DYNAMIC_SHARED(smem);
  T *q_s = reinterpret_cast<T *>(smem);                        // [16 row_warps][kStride]
  T *k_tiles = q_s + 16 * row_warps * G::kStride;              // [kBuffers][kKeys][kStride]
  T *v_tiles = k_tiles + G::kBuffers * G::kTileElems;          // [kBuffers][kKeys][kStride]
  // fp8 only: [kStageBuffers][kKeys][D] each (empty otherwise).
  uint8_t *k_stage = reinterpret_cast<uint8_t *>(v_tiles + G::kBuffers * G::kTileElems);
  uint8_t *v_stage = k_stage + G::kStageBuffers * G::kStageBytes;

  const int seq = work[2 * static_cast<int64_t>(blockIdx.x)];
  const int j0 = work[2 * static_cast<int64_t>(blockIdx.x) + 1];  // first query row
  const int kv_head = blockIdx.y / head_chunks;
  const int chunk = blockIdx.y % head_chunks;
  const int split = blockIdx.z;
  const int head0 = kv_head * group + chunk * G::kChunkRows;  // first query head served
  const int heads = min(G::kChunkRows, group - chunk * G::kChunkRows);
  const int q_begin = p.query_starts[seq];
  const int query_len = p.query_starts[seq + 1] - q_begin;
  const int tokens = min(tokens_per_work, query_len - j0);
  const int rows = tokens * heads;  // <= 16 row_warps (checked by the launcher)

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

  // Q rows of the block (zero for padding rows), in the same copy group as tile 0.
  const T *q = static_cast<const T *>(p.q);
  for (int i = threadIdx.x; i < 16 * row_warps * G::kChunks; i += threads) {
    const int r = i / G::kChunks;
    const int c = i % G::kChunks;
    T *dst = q_s + r * G::kStride + c * 8;
    if (r < rows) {
      const int64_t token = q_begin + j0 + r / heads;
      pgqa::copy16_async(dst, q + (token * p.n_heads + head0 + r % heads) * D + c * 8);
    } else {
      pgqa::store_vec<uint4>(dst, make_uint4(0, 0, 0, 0));
    }
  }

  // Issues the copies of tile `tile` into buffer tile % 2 (fp8: staging buffer tile %
  // kStageBuffers) as one copy group; rows past `end` become zeros.
  auto load_tile = [&](int tile) {
    const int base = start + tile * G::kKeys;
    const int valid = min(G::kKeys, end - base);
    if constexpr (!G::kFp8) {
      T *k_dst = k_tiles + (tile & 1) * G::kTileElems;
      T *v_dst = v_tiles + (tile & 1) * G::kTileElems;
      for (int i = threadIdx.x; i < G::kKeys * G::kChunks; i += threads) {
        const int row = i / G::kChunks;
        const int c = i % G::kChunks;
        T *k_row = k_dst + row * G::kStride + c * 8;
        T *v_row = v_dst + row * G::kStride + c * 8;
        const int pos = base + row;
        const int block = row < valid ? block_table[pos >> block_shift] : -1;
        if (block >= 0 && block < p.num_blocks) {  // ids were validated on the host
          const int slot = pos & (p.block_size - 1);
          const int64_t offset =
              ((static_cast<int64_t>(block) * p.block_size + slot) * p.n_kv_heads + kv_head) * D +
              c * 8;
          pgqa::copy16_async(k_row, k_cache + offset);
          pgqa::copy16_async(v_row, v_cache + offset);
        } else {
          pgqa::store_vec<uint4>(k_row, make_uint4(0, 0, 0, 0));
          pgqa::store_vec<uint4>(v_row, make_uint4(0, 0, 0, 0));
        }
      }
    } else {
      // 16 fp8 values per copy into the unpadded staging rows [kKeys][D].
      uint8_t *k_dst = k_stage + (tile % G::kStageBuffers) * G::kStageBytes;
      uint8_t *v_dst = v_stage + (tile % G::kStageBuffers) * G::kStageBytes;
      for (int i = threadIdx.x; i < G::kKeys * (D / 16); i += threads) {
        const int row = i / (D / 16);
        const int c = (i % (D / 16)) * 16;
        uint8_t *k_row = k_dst + row * D + c;
        uint8_t *v_row = v_dst + row * D + c;
        const int pos = base + row;
        const int block = row < valid ? block_table[pos >> block_shift] : -1;
        if (block >= 0 && block < p.num_blocks) {  // ids were validated on the host
          const int slot = pos & (p.block_size - 1);
          const int64_t offset =
              ((static_cast<int64_t>(block) * p.block_size + slot) * p.n_kv_heads + kv_head) * D + c;
          pgqa::copy16_async(k_row, k_cache + offset);
          pgqa::copy16_async(v_row, v_cache + offset);
        } else {
          pgqa::store_vec<uint4>(k_row, make_uint4(0, 0, 0, 0));  // +0 in either format
          pgqa::store_vec<uint4>(v_row, make_uint4(0, 0, 0, 0));
        }
      }
    }
    pgqa::copy_async_commit();
  };

  // The first kAhead tiles, a copy group each (the Q copies join the first; an empty group
  // stands for a tile past the range, so that the group count stays one per tile).
#pragma unroll
  for (int tile = 0; tile < G::kAhead; ++tile) {
    if (tile < num_tiles) {
      load_tile(tile);
    } else {
      pgqa::copy_async_commit();
    }
  }

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int row_warp = G::kNarrow ? 0 : warp;  // the warp's 16 rows
  const int key0 = G::kNarrow ? warp * G::kWarpKeys : 0;  // the first key of a tile it computes
  const int quad_lane = lane % 4;                 // t: this lane's column pair in a fragment
  const int row_lo = row_warp * 16 + lane / 4;    // block row of c0, c1 (and a0, a2)
  const int row_hi = row_lo + 8;                  // block row of c2, c3
  const bool warp_has_rows = row_warp * 16 < rows;  // all-padding warps skip the arithmetic
  const int j_lo = row_lo / heads;                // query rows (of the item) of row_lo, row_hi
  const int j_hi = row_hi / heads;
  // Keys in [low, limit) are visible to the row.
  const int limit_lo = min(keys.hi(j_lo), end);
  const int limit_hi = min(keys.hi(j_hi), end);
  const int low_lo = keys.lo(j_lo);
  const int low_hi = keys.lo(j_hi);
  const int pos_lo = keys.position(j_lo);
  const int pos_hi = keys.position(j_hi);
  // ALiBi slopes of the rows' heads, log2 domain (0 without ALiBi). Padding rows read a slope
  // of a real head of the chunk (r % heads < heads) and are never stored.
  const float bias_lo = p.alibi_slopes != nullptr ? p.alibi_slopes[head0 + row_lo % heads] * pgqa::kLog2e : 0.0f;
  const float bias_hi = p.alibi_slopes != nullptr ? p.alibi_slopes[head0 + row_hi % heads] * pgqa::kLog2e : 0.0f;
  // Soft-cap: S = (cap log2 e) tanh(S * scale / cap), tanhf saturating to +-1 (no NaN for huge
  // or infinite S); else S * scale * log2 e.
  // fp8 pages: k_scale joins the scale (one factor of every score of this K/V head).
  const bool capped = p.logit_softcap > 0.0f;
  float s_scale = capped ? p.scale / p.logit_softcap : p.scale * pgqa::kLog2e;
  if constexpr (G::kFp8) s_scale *= p.k_scale[kv_head];
  const float cap_log2 = p.logit_softcap * pgqa::kLog2e;
  const T *tag = nullptr;  // selects the dtype's overloads

  float o[D / 8][4];  // O rows (lo, hi) x D columns: 8-column tiles in the C layout
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[n][e] = 0.0f;
  float m_lo = -INFINITY, m_hi = -INFINITY;  // running max (log2 domain, scaled)
  float l_lo = 0.0f, l_hi = 0.0f;            // this lane's part of the running sum

  for (int tile = 0; tile < num_tiles; ++tile) {
    // This thread's copies of tile `tile`: groups up to tile + kAhead - 1 are committed, and
    // all but the newest kAhead - 1 are complete.
    pgqa::copy_async_wait<G::kAhead - 1>();
    // One barrier per tile: tile `tile` (and, the first time, Q) is visible to every thread, and
    // every warp is done with tile `tile - 1`, whose buffer the next copies fill while this tile
    // is computed (fp8: whose staging buffer they fill, and whose widened tile this one
    // overwrites).
    __syncthreads();
    if (tile + G::kAhead < num_tiles) {
      load_tile(tile + G::kAhead);
    } else if (G::kAhead > 1) {
      pgqa::copy_async_commit();  // an empty group keeps the count for the wait above
    }

    if constexpr (G::kFp8) {
      // Widen the staged 8-bit rows into the 16-bit tiles, 8 values per step. The previous
      // tile's reads of them ended before this iteration's barrier. Narrow: each warp
      // widens the keys it computes (a warp's own ldmatrix reads them: __syncwarp suffices);
      // wide: the block widens the tile for every warp.
      const uint8_t *k_src = k_stage + (tile % G::kStageBuffers) * G::kStageBytes;
      const uint8_t *v_src = v_stage + (tile % G::kStageBuffers) * G::kStageBytes;
      const KV *fp8_tag = nullptr;
      const int first = G::kNarrow ? lane : threadIdx.x;
      const int stride = G::kNarrow ? 32 : threads;
      for (int i = first; i < G::kWarpKeys * G::kChunks; i += stride) {
        const int row = key0 + i / G::kChunks;
        const int c = (i % G::kChunks) * 8;
        pgqa::store_vec<uint4>(k_tiles + row * G::kStride + c, pgqa::widen8(pgqa::load_vec<uint2>(k_src + row * D + c), fp8_tag, tag));
        pgqa::store_vec<uint4>(v_tiles + row * G::kStride + c, pgqa::widen8(pgqa::load_vec<uint2>(v_src + row * D + c), fp8_tag, tag));
      }
      if constexpr (G::kNarrow) {
        __syncwarp();  // the warp's widened keys visible to its ldmatrix
      } else {
        __syncthreads();  // the widened tile visible to every warp's ldmatrix
      }
    }

    const int base = start + tile * G::kKeys + key0;  // the first key this warp computes
    const T *k_tile = k_tiles + (G::kFp8 ? 0 : (tile & 1)) * G::kTileElems + key0 * G::kStride;
    const T *v_tile = v_tiles + (G::kFp8 ? 0 : (tile & 1)) * G::kTileElems + key0 * G::kStride;

    if (warp_has_rows) {
      // 1. S = Q K^T: 16 rows x kWarpKeys keys per warp.
      float s[G::kWarpKeys / 8][4];
#pragma unroll
      for (int n = 0; n < G::kWarpKeys / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = 0.0f;
#pragma unroll
      for (int kt = 0; kt < D / 16; ++kt) {
        uint32_t a[4];  // Q rows 16 w .. 16 w + 15, dims 16 kt .. 16 kt + 15
        pgqa::ldmatrix_x4(a, q_s + (row_warp * 16 + (lane & 15)) * G::kStride + kt * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int np = 0; np < G::kWarpKeys / 16; ++np) {
          // Matrices: keys 16 np + (0-7 | 8-15) x dims (0-7 | 8-15) of the k-step; registers
          // 0, 1 are b0, b1 of key tile 2 np and 2, 3 those of key tile 2 np + 1.
          uint32_t b[4];
          pgqa::ldmatrix_x4(b, k_tile + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * G::kStride +
                                   kt * 16 + ((lane >> 3) & 1) * 8);
          pgqa::mma_16816(s[2 * np], a, b[0], b[1], tag);
          pgqa::mma_16816(s[2 * np + 1], a, b[2], b[3], tag);
        }
      }

      // 2. Scale (soft-cap), bias, mask, online softmax. Key of s[n][e]: base + 8 n + 2 t + (e & 1).
      float max_lo = -INFINITY, max_hi = -INFINITY;
#pragma unroll
      for (int n = 0; n < G::kWarpKeys / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = base + 8 * n + 2 * quad_lane + e;
          float x_lo = s[n][e] * s_scale;
          float x_hi = s[n][2 + e] * s_scale;
          if (capped) {
            x_lo = cap_log2 * tanhf(x_lo);
            x_hi = cap_log2 * tanhf(x_hi);
          }
          x_lo += bias_lo * static_cast<float>(key - pos_lo);
          x_hi += bias_hi * static_cast<float>(key - pos_hi);
          s[n][e] = key < limit_lo && key >= low_lo ? x_lo : -INFINITY;
          s[n][2 + e] = key < limit_hi && key >= low_hi ? x_hi : -INFINITY;
          max_lo = fmaxf(max_lo, s[n][e]);
          max_hi = fmaxf(max_hi, s[n][2 + e]);
        }
      }
#pragma unroll
      for (int offset = 1; offset < 4; offset *= 2) {  // over the quad that shares the rows
        max_lo = fmaxf(max_lo, __shfl_xor_sync(0xffffffffu, max_lo, offset));
        max_hi = fmaxf(max_hi, __shfl_xor_sync(0xffffffffu, max_hi, offset));
      }
      const float m_new_lo = fmaxf(m_lo, max_lo);
      const float m_new_hi = fmaxf(m_hi, max_hi);
      const float base_lo = m_new_lo == -INFINITY ? 0.0f : m_new_lo;  // no key yet: P = 0
      const float base_hi = m_new_hi == -INFINITY ? 0.0f : m_new_hi;
      const float alpha_lo = exp2f(m_lo - base_lo);  // m_lo = -inf: 0 (O and l are 0 anyway)
      const float alpha_hi = exp2f(m_hi - base_hi);
      m_lo = m_new_lo;
      m_hi = m_new_hi;
      float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
      for (int n = 0; n < G::kWarpKeys / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          s[n][e] = exp2f(s[n][e] - base_lo);
          s[n][2 + e] = exp2f(s[n][2 + e] - base_hi);
          sum_lo += s[n][e];
          sum_hi += s[n][2 + e];
        }
      }
      l_lo = l_lo * alpha_lo + sum_lo;
      l_hi = l_hi * alpha_hi + sum_hi;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][0] *= alpha_lo;
        o[n][1] *= alpha_lo;
        o[n][2] *= alpha_hi;
        o[n][3] *= alpha_hi;
      }

      // 3. O += P V, 16 keys per step.
#pragma unroll
      for (int kk = 0; kk < G::kWarpKeys / 16; ++kk) {
        // A = P rows x keys 16 kk .. 16 kk + 15: key tiles 2 kk (a0, a1) and 2 kk + 1 (a2, a3).
        const uint32_t a[4] = {pgqa::pack2(s[2 * kk][0], s[2 * kk][1], tag),
                               pgqa::pack2(s[2 * kk][2], s[2 * kk][3], tag),
                               pgqa::pack2(s[2 * kk + 1][0], s[2 * kk + 1][1], tag),
                               pgqa::pack2(s[2 * kk + 1][2], s[2 * kk + 1][3], tag)};
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          // Matrices (transposed): keys (0-7 | 8-15) x dims 16 dp + (0-7 | 8-15); registers
          // 0, 1 are b0, b1 of dim tile 2 dp and 2, 3 those of dim tile 2 dp + 1.
          uint32_t b[4];
          pgqa::ldmatrix_x4_trans(b, v_tile + (kk * 16 + (lane & 15)) * G::kStride + dp * 16 +
                                         (lane >> 4) * 8);
          pgqa::mma_16816(o[2 * dp], a, b[0], b[1], tag);
          pgqa::mma_16816(o[2 * dp + 1], a, b[2], b[3], tag);
        }
      }
    }
  }
  pgqa::copy_async_wait<0>();  // the Q copies when there was no tile (and any empty group)

#pragma unroll
  for (int offset = 1; offset < 4; offset *= 2) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, offset);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, offset);
  }

  // Output row of block row r: (token q_begin + j0 + r / heads, head head0 + r % heads).
  auto out_row = [&](int r) {
    return (static_cast<int64_t>(q_begin) + j0 + r / heads) * p.n_heads + head0 + r % heads;
  };
  // One split: the final result, with the sink (if any) in the denominator. Several: this
  // split's partial, without it (the merge adds it once).
  auto finish = [&](int r, float m, float l) {
    const float sink2 =
        p.num_splits == 1 && p.sinks != nullptr ? p.sinks[head0 + r % heads] * pgqa::kLog2e : -INFINITY;
    pgqa::Finish f = pgqa::finish_row(m, l, sink2);
    if constexpr (G::kFp8) f.factor *= p.v_scale[kv_head];  // v_scale: one factor of every output
    return f;
  };
  auto store_lse = [&](int64_t row, float lse_log2) {
    if (p.num_splits == 1) {
      p.lse[row] = lse_log2 * pgqa::kLn2;
    } else {
      p.partial_lse[row * p.num_splits + split] = lse_log2;
    }
  };

  if constexpr (!G::kNarrow) {
    // Normalise and store: the final output, or this split's partial for the merge.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = half == 0 ? row_lo : row_hi;
      if (r >= rows) continue;
      const pgqa::Finish f = finish(r, half == 0 ? m_lo : m_hi, half == 0 ? l_lo : l_hi);
      const int64_t row = out_row(r);
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        store_pair<T>(p, row, split, 8 * n + 2 * quad_lane, o[n][2 * half] * f.factor,
                      o[n][2 * half + 1] * f.factor, D);
      if (quad_lane == 0) store_lse(row, f.lse_log2);
    }
  } else {
    // Merge the warps' states: every warp publishes its outputs and (m, l) per lane, then warp w
    // combines the four for output tiles n = w, w + 4, ...: with M = max_w m_w, each warp's
    // weight is 2^(m_w - M) (0 for a warp that saw no key of the row), l = sum_w weight l_w.
    float *o_s = reinterpret_cast<float *>(smem);              // [kKeyWarps][D / 8][32][4]
    float *state_s = o_s + kKeyWarps * (D / 8) * 32 * 4;       // [kKeyWarps][32][4]
    __syncthreads();  // every warp is done with the tiles and Q (the memory the merge reuses)
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      pgqa::store_vec<float4>(o_s + ((warp * (D / 8) + n) * 32 + lane) * 4,
                              make_float4(o[n][0], o[n][1], o[n][2], o[n][3]));
    pgqa::store_vec<float4>(state_s + (warp * 32 + lane) * 4, make_float4(m_lo, m_hi, l_lo, l_hi));
    __syncthreads();

    float4 state[kKeyWarps];
    float top_lo = -INFINITY, top_hi = -INFINITY;
#pragma unroll
    for (int w = 0; w < kKeyWarps; ++w) {
      state[w] = pgqa::load_vec<float4>(state_s + (w * 32 + lane) * 4);
      top_lo = fmaxf(top_lo, state[w].x);
      top_hi = fmaxf(top_hi, state[w].y);
    }
    float weight_lo[kKeyWarps], weight_hi[kKeyWarps];
    float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
    for (int w = 0; w < kKeyWarps; ++w) {
      weight_lo[w] = state[w].x == -INFINITY ? 0.0f : exp2f(state[w].x - top_lo);
      weight_hi[w] = state[w].y == -INFINITY ? 0.0f : exp2f(state[w].y - top_hi);
      sum_lo += weight_lo[w] * state[w].z;
      sum_hi += weight_hi[w] * state[w].w;
    }
    const pgqa::Finish f_lo = finish(row_lo, top_lo, sum_lo);
    const pgqa::Finish f_hi = finish(row_hi, top_hi, sum_hi);
    for (int n = warp; n < D / 8; n += kKeyWarps) {
      float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
      for (int w = 0; w < kKeyWarps; ++w) {
        const float4 ow = pgqa::load_vec<float4>(o_s + ((w * (D / 8) + n) * 32 + lane) * 4);
        x.x += weight_lo[w] * ow.x;
        x.y += weight_lo[w] * ow.y;
        x.z += weight_hi[w] * ow.z;
        x.w += weight_hi[w] * ow.w;
      }
      const int d = 8 * n + 2 * quad_lane;
      if (row_lo < rows) store_pair<T>(p, out_row(row_lo), split, d, x.x * f_lo.factor, x.y * f_lo.factor, D);
      if (row_hi < rows) store_pair<T>(p, out_row(row_hi), split, d, x.z * f_hi.factor, x.w * f_hi.factor, D);
    }
    if (warp == 0 && quad_lane == 0) {
      if (row_lo < rows) store_lse(out_row(row_lo), f_lo.lse_log2);
      if (row_hi < rows) store_lse(out_row(row_hi), f_hi.lse_log2);
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built for a GPU without bf16/f16 mma.sync; the launcher refuses before this
#endif
}

// OK when the current device runs mma.sync m16n8k16 on bf16 and f16 (sm_80 or newer).
pgqa_status check_device_has_mma(int32_t *cuda_error) {
  int device = 0;
  int major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    if (cuda_error != nullptr) *cuda_error = static_cast<int32_t>(err);
    return PGQA_STATUS_CUDA_ERROR;
  }
  return major >= 8 ? PGQA_STATUS_OK : PGQA_STATUS_UNSUPPORTED;
}

// One layout's launch over its work list (nothing when it is empty): wide over mma_work, narrow
// over narrow_work.
template <typename T, typename KV, int D, int kKeyWarps>
pgqa_status launch(const pgqa_attend_params &p, cudaStream_t stream, int32_t *cuda_error,
                   pgqa::Phase phase) {
  using G = TileGeometry<kKeyWarps, KV, D>;
  const int32_t *work = G::kNarrow ? p.narrow_work : p.mma_work;
  const int num_work = G::kNarrow ? p.num_narrow_work : p.num_mma_work;
  const int tokens_per_work = G::kNarrow ? p.narrow_tokens_per_work : p.mma_tokens_per_work;
  if (num_work == 0) return PGQA_STATUS_OK;
  const int group = p.n_heads / p.n_kv_heads;
  const int head_chunks = (group + G::kChunkRows - 1) / G::kChunkRows;
  const int64_t grid_y = static_cast<int64_t>(p.n_kv_heads) * head_chunks;
  const int64_t max_rows = static_cast<int64_t>(tokens_per_work) * min(group, G::kChunkRows);
  // Wide: a warp per 16 rows; narrow: kKeyWarps warps over one fragment.
  const int64_t fragments = (max_rows + 15) / 16;
  const int row_warps = G::kNarrow ? 1 : static_cast<int>(fragments < kWideRows / 16 ? fragments : kWideRows / 16);
  const int threads = G::kNarrow ? 32 * kKeyWarps : 32 * row_warps;
  const size_t smem = smem_bytes<T, KV, D, kKeyWarps>(row_warps);
  auto kernel = tensor_core_attend_kernel<T, KV, D, kKeyWarps>;
  if (phase == pgqa::Phase::kPrepare) {
    if (work == nullptr || tokens_per_work < 1 || grid_y > 65535 || max_rows > G::kChunkRows)
      return PGQA_STATUS_INVALID_ARGUMENT;
    const pgqa_status device_status = check_device_has_mma(cuda_error);
    if (device_status != PGQA_STATUS_OK) return device_status;
    // The image the driver picked for this device must come from sm_80+ code: a build for
    // older GPUs only (PAGED_GQA_CUDA_ARCHS=75) has an empty kernel here.
    cudaFuncAttributes attributes;
    const cudaError_t err = cudaFuncGetAttributes(&attributes, kernel);
    if (err != cudaSuccess) {
      cudaGetLastError();
      if (cuda_error != nullptr) *cuda_error = static_cast<int32_t>(err);
      return PGQA_STATUS_CUDA_ERROR;
    }
    if (attributes.ptxVersion < 80) return PGQA_STATUS_UNSUPPORTED;
    const size_t most = smem_bytes<T, KV, D, kKeyWarps>(G::kNarrow ? 1 : kWideRows / 16);
    return pgqa::allow_shared_memory(kernel, most, smem, cuda_error);
  }
  const dim3 grid(static_cast<unsigned>(num_work), static_cast<unsigned>(grid_y),
                  static_cast<unsigned>(p.num_splits));
  const int block_shift = __builtin_ctz(static_cast<unsigned>(p.block_size));
  PGQA_LAUNCH(kernel, grid, threads, smem, stream, p, work, tokens_per_work, block_shift, group,
              head_chunks);
  return pgqa::launch_status(cuda_error);
}

// Both layouts of the tensor-core kernel (each over its own work list).
template <typename T, typename KV>
pgqa_status launch_for_dim(const pgqa_attend_params &p, cudaStream_t stream, int32_t *cuda_error,
                           pgqa::Phase phase) {
  return pgqa::for_head_dim(p.head_dim, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    pgqa_status status = launch<T, KV, D, 1>(p, stream, cuda_error, phase);
    if (status == PGQA_STATUS_OK) status = launch<T, KV, D, kNarrowKeyWarps>(p, stream, cuda_error, phase);
    return status;
  });
}

}  // namespace
