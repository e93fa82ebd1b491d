/*
 * paged_gqa.h: the contract between the CUDA kernels and their callers (Rust through bindgen,
 * or C/C++ directly).
 *
 * Plain C: parameter structs, enums and launcher prototypes; no CUDA headers. Every launcher
 * takes the stream to launch on (a CUstream / cudaStream_t: the same handle), checks its
 * parameters, launches asynchronously and returns a pgqa_status. Nothing here exits or aborts.
 * Device pointers are annotated with the shape of the array they point to, row-major.
 */
#ifndef PAGED_GQA_H
#define PAGED_GQA_H

#include <stdint.h>

/**
 * The version of this contract. 2: pgqa_attend_params gained narrow_work, num_narrow_work and
 * narrow_tokens_per_work at its end (the narrow tensor-core layout) and PGQA_ATTEND_MMA_ROWS
 * became 128; a caller built against version 1 must zero-fill the new fields and be rebuilt.
 */
#define PGQA_ABI_VERSION 2

#ifdef __cplusplus
extern "C" {
#endif

/** The CUDA stream type. Identical to CUstream and cudaStream_t, declared here without them. */
typedef struct CUstream_st *pgqa_stream;

/**
 * Element type of a tensor. The two fp8 types are page types only (KV cache pages: queries,
 * outputs and new K/V rows stay F16 or BF16): OCP e4m3fn (largest finite 448, no infinities)
 * and e5m2 (largest finite 57344), each value stored as sat_finite(x / scale) rounded to nearest
 * even (NaN stays NaN) and read as stored * scale, with one f32 scale per K/V head for K
 * (k_scale) and one for V (v_scale).
 */
typedef enum pgqa_dtype {
  PGQA_DTYPE_F32 = 0,
  PGQA_DTYPE_F16 = 1,
  PGQA_DTYPE_BF16 = 2,
  PGQA_DTYPE_F8_E4M3 = 3,
  PGQA_DTYPE_F8_E5M2 = 4
} pgqa_dtype;

/**
 * What a launcher returns. PGQA_STATUS_OK means the kernel was enqueued (it has not run yet).
 * PGQA_STATUS_CUDA_ERROR means the CUDA runtime refused the launch: the launcher also writes the
 * cudaError_t value to *cuda_error when that pointer is not null.
 */
typedef enum pgqa_status {
  PGQA_STATUS_OK = 0,
  PGQA_STATUS_INVALID_ARGUMENT = 1, /**< null pointer, zero or negative size, bad dtype */
  PGQA_STATUS_MISALIGNED = 2, /**< a pointer or row is not 16-byte aligned */
  PGQA_STATUS_CUDA_ERROR = 3, /**< the launch failed: see cuda_error */
  PGQA_STATUS_UNSUPPORTED = 4 /**< a head_dim or dtype no kernel is built for */
} pgqa_status;

/**
 * repeat_kv, exactly the Llama reference:
 *   x[:, :, :, None, :].expand(b, s, n_kv, n_rep, d).reshape(b, s, n_kv * n_rep, d)
 * so dst head h is a copy of src head h / n_rep. Batch and sequence are flattened into tokens.
 * Requires head_dim * sizeof(dtype) to be a multiple of 16 and both pointers 16-byte aligned.
 */
typedef struct pgqa_repeat_kv_params {
  const void *src; /**< [num_tokens, n_kv_heads, head_dim] */
  void *dst; /**< [num_tokens, n_kv_heads * n_rep, head_dim] */
  int64_t num_tokens; /**< batch * seq_len */
  int32_t n_kv_heads;
  int32_t n_rep; /**< n_heads / n_kv_heads */
  int32_t head_dim;
  pgqa_dtype dtype;
} pgqa_repeat_kv_params;

pgqa_status pgqa_repeat_kv(const pgqa_repeat_kv_params *params, pgqa_stream stream,
                           int32_t *cuda_error);

/**
 * Writes the K and V rows of a step's new tokens into their slots of one layer's pages, the
 * whole batch in one launch. Slot s is token s % block_size of block s / block_size; a slot
 * outside [0, num_slots) is skipped (the host validates slots; this is a second guard).
 * Pages of cache_dtype == dtype get the rows as they are (any dtype). fp8 pages (cache_dtype
 * F8_E4M3 or F8_E5M2, dtype F16 or BF16) get each value x of K/V head h quantized:
 * sat_finite(x / k_scale[h]) (v_scale[h] for V), the quotient an IEEE division, rounded to
 * nearest even; head_dim must then be a multiple of 16 and the scales non-null.
 */
typedef struct pgqa_write_kv_params {
  const void *k_new;           /**< [num_tokens, n_kv_heads, head_dim] (dtype) */
  const void *v_new;           /**< [num_tokens, n_kv_heads, head_dim] (dtype) */
  void *k_cache;               /**< [num_blocks, block_size, n_kv_heads, head_dim] (cache_dtype) */
  void *v_cache;               /**< [num_blocks, block_size, n_kv_heads, head_dim] (cache_dtype) */
  const int64_t *slot_mapping; /**< [num_tokens] */
  int64_t num_tokens;
  int64_t num_slots; /**< num_blocks * block_size */
  int32_t n_kv_heads;
  int32_t head_dim;
  pgqa_dtype dtype;
  pgqa_dtype cache_dtype;  /**< the pages' element type: dtype, or an fp8 type */
  const float *k_scale;    /**< [n_kv_heads] for fp8 pages (ignored otherwise; may be null) */
  const float *v_scale;    /**< [n_kv_heads] for fp8 pages (ignored otherwise; may be null) */
} pgqa_write_kv_params;

pgqa_status pgqa_write_kv(const pgqa_write_kv_params *params, pgqa_stream stream,
                          int32_t *cuda_error);

/**
 * Copies whole blocks (the copy-on-write step) in every tensor of the cache, all pairs and all
 * layers in one launch. Pairs whose ids fall outside [0, num_blocks) are skipped. Pairs run in
 * parallel: no dst block may be the src or dst of another pair.
 */
typedef struct pgqa_copy_blocks_params {
  void *pages;                 /**< [num_tensors, num_blocks, block_size, n_kv_heads, head_dim] */
  const int32_t *block_copies; /**< [num_copies, 2]: (src block, dst block) */
  int64_t num_copies;
  int64_t block_len; /**< elements per block: block_size * n_kv_heads * head_dim */
  int32_t num_tensors; /**< 2 * num_layers (every layer's K and V); at most 65535 */
  int32_t num_blocks;
  pgqa_dtype dtype; /**< the pages' element type (fp8 pages included: 1 byte) */
} pgqa_copy_blocks_params;

pgqa_status pgqa_copy_blocks(const pgqa_copy_blocks_params *params, pgqa_stream stream,
                             int32_t *cuda_error);

/** Attention kernel geometry, shared with the planner (src/plan.rs). */
enum {
  PGQA_ATTEND_THREADS = 128, /**< threads per block */
  PGQA_ATTEND_ACC_ITEMS = 6, /**< 8-element output accumulators per thread */
  PGQA_ATTEND_MMA_ROWS = 128, /**< most rows of a wide tensor-core block (a warp per 16) */
  PGQA_ATTEND_NARROW_ROWS = 16, /**< rows of a narrow tensor-core block (4 warps on the keys) */
  PGQA_ATTEND_MAX_SPLITS = 65535
};

/**
 * Fused paged GQA attention for any mix of query lengths (decode, speculative verification,
 * chunked prefill, prompts). Query row j of a sequence with L keys and n query rows sits at
 * position p = L - n + j (bottom-right) and sees the keys k with
 *   k <= p                    when causal (else every key up to L - 1), and
 *   k >= p - window_left      when window_left >= 0 (a sliding window of window_left + 1 keys).
 * Scores, in this order: s = scale * q . k; s = cap * tanh(s / cap) when logit_softcap = cap > 0;
 * s += alibi_slopes[h] * (k - p) when alibi_slopes is not null; then the mask. Softmax over the
 * visible keys, plus exp(sinks[h]) in the denominator (no value) when sinks is not null: the
 * sink is counted once per row whatever the splits, and the returned lse includes it.
 *
 * Three kernel paths share the call; the caller (src/plan.rs) hands each its own work list, and
 * every query row of every sequence must be in exactly one of them:
 * - `work`: the CUDA-core kernel, for items with few rows (decode, speculation). Its rows are
 *   (query row, query head) pairs, at most PGQA_ATTEND_ACC_ITEMS * PGQA_ATTEND_THREADS * 8 /
 *   head_dim of them (tokens_per_work query rows times the group, or a chunk of the group).
 * - `mma_work`: the tensor-core kernel's wide layout (mma.sync m16n8k16, sm_80 or newer), for
 *   items with many rows (prompts, chunks, groups above 16): mma_tokens_per_work query rows
 *   times the group (or a chunk of PGQA_ATTEND_MMA_ROWS of its heads), at most
 *   PGQA_ATTEND_MMA_ROWS rows per block, a warp per 16 of them.
 * - `narrow_work`: its narrow layout (sm_80 or newer), for items of at most
 *   PGQA_ATTEND_NARROW_ROWS rows (decode, short speculative items): narrow_tokens_per_work
 *   query rows times the group (or a chunk of 16 of its heads) in one 16-row fragment, the
 *   block's 4 warps splitting the keys of each tile and merging their states at the end.
 *
 * Either kernel's block serves one work item, one K/V head (or a chunk of its query heads) and
 * one split of its key range; it reads each K and V row of the range once for all its rows, and
 * masks inside. The range runs from its first row's window start (0 without a window) to its
 * last row's causal limit (L when not causal): tiles above the diagonal or left of the window
 * are never loaded, and block table entries there are never read (they may be -1).
 * Query head h reads K/V head h / (n_heads / n_kv_heads). fp32 softmax. With num_splits > 1
 * each split writes partial outputs and log2-sum-exp to the workspace and the launcher merges
 * them (adding the sinks). A row with no visible key gives 0 and lse sinks[h] (-inf without).
 * head_dim: 64, 80, 96, 128 or 256; dtype: F16 or BF16. Returns PGQA_STATUS_UNSUPPORTED when
 * mma_work or narrow_work is not empty on a GPU older than sm_80.
 *
 * Pages (kv_dtype): dtype, or fp8 (F8_E4M3, F8_E5M2) with k_scale and v_scale: attention is
 * then exactly attention over the dequantized K/V (stored * scale of the row's K/V head). Both
 * kernels fold the scales instead of dequantizing: the block serves one K/V head, so k_scale is
 * one factor of every score (multiplied into scale, before the soft-cap) and v_scale one factor
 * of every output (multiplied in at the normalisation, split partials included). The 8-bit
 * values cross memory once; the CUDA-core kernel converts them in its dot products, the
 * tensor-core kernel widens each tile to dtype in shared memory before ldmatrix.
 */
typedef struct pgqa_attend_params {
  const void *q;               /**< [num_tokens, n_heads, head_dim] */
  const void *k_cache;         /**< [num_blocks, block_size, n_kv_heads, head_dim] (one layer) */
  const void *v_cache;         /**< [num_blocks, block_size, n_kv_heads, head_dim] (one layer) */
  const int32_t *block_tables; /**< [batch, max_blocks] */
  const int32_t *context_lens; /**< [batch]: keys per sequence, at most max_blocks * block_size
                                    and at most INT32_MAX - 256 */
  const int32_t *query_starts; /**< [batch + 1]: sequence b's query rows are [starts[b], starts[b+1]) */
  const int32_t *work;         /**< [num_work, 2]: (sequence, its first query row of the item) */
  const int32_t *mma_work;     /**< [num_mma_work, 2]: the same, for the tensor-core kernel */
  void *out;                   /**< [num_tokens, n_heads, head_dim] */
  float *lse;                  /**< [num_tokens, n_heads], natural log */
  float *partial_out;          /**< [num_tokens, n_heads, num_splits, head_dim] when num_splits > 1 */
  float *partial_lse;          /**< [num_tokens, n_heads, num_splits] when num_splits > 1 */
  int32_t num_work;
  int32_t num_mma_work;
  int32_t num_tokens;
  int32_t n_heads;
  int32_t n_kv_heads;
  int32_t head_dim;
  int32_t block_size; /**< a power of two */
  int32_t max_blocks;
  int32_t num_blocks; /**< block ids outside [0, num_blocks) are never read */
  int32_t tokens_per_work; /**< query rows per work item; 1 when the group exceeds a block */
  int32_t mma_tokens_per_work; /**< query rows per mma_work item (times min(group, 128) <= 128) */
  int32_t num_splits;
  int32_t keys_per_split; /**< split s of a block covers keys [lo + s * keys_per_split,
                               lo + (s + 1) * keys_per_split) of its range [lo, hi) */
  float scale;
  pgqa_dtype dtype;
  const float *sinks;        /**< [n_heads] natural log, not scaled; or null (no sinks) */
  const float *alibi_slopes; /**< [n_heads]; or null (no ALiBi) */
  int32_t causal;            /**< 1: keys <= p; 0: every key of the sequence */
  int32_t window_left;       /**< -1: no window; else keys >= p - window_left */
  float logit_softcap;       /**< 0: off; > 0: s = cap * tanh(s / cap) */
  pgqa_dtype kv_dtype;       /**< element type of k_cache and v_cache: dtype, or an fp8 type */
  const float *k_scale;      /**< [n_kv_heads] for fp8 pages (ignored otherwise; may be null) */
  const float *v_scale;      /**< [n_kv_heads] for fp8 pages (ignored otherwise; may be null) */
  /* Since PGQA_ABI_VERSION 2: */
  const int32_t *narrow_work;     /**< [num_narrow_work, 2]: the same, for the narrow layout */
  int32_t num_narrow_work;
  int32_t narrow_tokens_per_work; /**< query rows per narrow_work item (times min(group, 16) <= 16) */
} pgqa_attend_params;

pgqa_status pgqa_attend(const pgqa_attend_params *params, pgqa_stream stream,
                        int32_t *cuda_error);

/**
 * Merges two attention results over disjoint key sets of the same query rows (a shared prefix
 * and each request's own keys, say): per row, with m = max(lse_a, lse_b),
 *   w_a = exp(lse_a - m), w_b = exp(lse_b - m),
 *   out = (w_a out_a + w_b out_b) / (w_a + w_b),   lse = m + ln(w_a + w_b).
 * LSE in natural log (this crate's convention; FlashInfer's is base 2: multiply by ln 2 first).
 * An empty key set is (0, -inf); two empty sets give (0, -inf). lse values must be finite or -inf.
 * out may be out_a or out_b, and lse may be lse_a or lse_b (in place); no other overlap.
 * dtype: F32, F16 or BF16 (out_a, out_b and out alike).
 */
typedef struct pgqa_merge_states_params {
  const void *out_a;  /**< [num_rows, head_dim]: rows are (token, head) pairs */
  const float *lse_a; /**< [num_rows] natural log */
  const void *out_b;  /**< [num_rows, head_dim] */
  const float *lse_b; /**< [num_rows] natural log */
  void *out;          /**< [num_rows, head_dim] */
  float *lse;         /**< [num_rows] natural log */
  int64_t num_rows;   /**< num_tokens * n_heads; at most 2^31 - 1 */
  int32_t head_dim;
  pgqa_dtype dtype;
} pgqa_merge_states_params;

pgqa_status pgqa_merge_states(const pgqa_merge_states_params *params, pgqa_stream stream,
                              int32_t *cuda_error);

/**
 * The naive baseline, step 1: gathers each sequence's K and V rows out of the pages into
 * contiguous tensors, sequences concatenated (sequence s owns rows key_starts[s] ..
 * key_starts[s] + context_lens[s]).
 */
typedef struct pgqa_gather_kv_params {
  const void *k_cache;         /**< [num_blocks, block_size, n_kv_heads, head_dim] */
  const void *v_cache;         /**< [num_blocks, block_size, n_kv_heads, head_dim] */
  const int32_t *block_tables; /**< [batch, max_blocks] */
  const int32_t *context_lens; /**< [batch] */
  const int64_t *key_starts;   /**< [batch]: first row of each sequence in k_out, v_out */
  void *k_out;                 /**< [total_keys, n_kv_heads, head_dim] */
  void *v_out;                 /**< [total_keys, n_kv_heads, head_dim] */
  int32_t batch;               /**< at most 65535 */
  int32_t max_context_len;
  int32_t n_kv_heads;
  int32_t head_dim;
  int32_t block_size; /**< a power of two */
  int32_t max_blocks;
  int32_t num_blocks;
  pgqa_dtype dtype;
} pgqa_gather_kv_params;

pgqa_status pgqa_gather_kv(const pgqa_gather_kv_params *params, pgqa_stream stream,
                           int32_t *cuda_error);

/**
 * The naive baseline, step 3 (after repeat_kv): plain multi-head decode attention over
 * contiguous K/V with one K/V head per query head. One thread block per (sequence, head), no
 * sharing between heads: each K/V byte is read once per query head.
 */
typedef struct pgqa_naive_decode_params {
  const void *q;             /**< [batch, n_heads, head_dim] */
  const void *k;             /**< [total_keys, n_heads, head_dim] (repeat_kv output) */
  const void *v;             /**< [total_keys, n_heads, head_dim] */
  const int32_t *context_lens; /**< [batch] */
  const int64_t *key_starts;   /**< [batch] */
  void *out;                 /**< [batch, n_heads, head_dim] */
  int32_t batch;
  int32_t n_heads;
  int32_t head_dim; /**< at most 256 */
  float scale;
  pgqa_dtype dtype;
} pgqa_naive_decode_params;

pgqa_status pgqa_naive_decode(const pgqa_naive_decode_params *params, pgqa_stream stream,
                              int32_t *cuda_error);

/** The name of a cudaError_t value ("cudaErrorInvalidValue"); a static string, never null. */
const char *pgqa_cuda_error_name(int32_t cuda_error);

#ifdef __cplusplus
}
#endif

#endif /* PAGED_GQA_H */
