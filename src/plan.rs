//! Launch planning for the attention kernels, in plain Rust so it is unit-tested on the CPU:
//! how many thread blocks serve each K/V head, and into how many splits (flash-decoding) each
//! sequence's context is cut when the batch alone cannot fill the GPU.

use crate::ffi;
use crate::shape::GqaShape;

/// Threads of a decode block (kernels/decode.cu).
pub const DECODE_THREADS: usize = ffi::PGQA_DECODE_THREADS.0 as usize;
/// 8-element output accumulators per decode thread.
const DECODE_ACC_ITEMS: usize = ffi::PGQA_DECODE_ACC_ITEMS.0 as usize;
/// The most splits a decode launch takes (grid z).
pub const MAX_SPLITS: usize = ffi::PGQA_DECODE_MAX_SPLITS.0 as usize;
/// A split covers at least this many keys: below it, the merge costs more than it gains.
pub const MIN_KEYS_PER_SPLIT: usize = 256;
/// Split boundaries fall on multiples of this many keys (every tile size divides it).
pub const SPLIT_ALIGN: usize = 64;
/// Resident decode blocks per SM to aim for: enough loads in flight to cover HBM latency.
pub const BLOCKS_PER_SM: usize = 4;

/// Query heads one decode block computes for `head_dim`.
pub fn max_heads_per_block(head_dim: usize) -> usize {
    DECODE_ACC_ITEMS * DECODE_THREADS * 8 / head_dim
}

/// How a decode step is cut into thread blocks.
///
/// ```
/// use paged_gqa::{plan::DecodeSchedule, GqaShape};
/// let llama3_8b = GqaShape::new(32, 8, 128)?;
/// // One long request on a 132-SM GPU: 8 blocks cannot fill it, so the context is split.
/// let one = DecodeSchedule::new(132, 1, llama3_8b, 32_768);
/// assert!(one.num_splits > 1);
/// // 128 requests of 8k: 1024 blocks fill it already; splitting would only add the merge.
/// assert_eq!(DecodeSchedule::new(132, 128, llama3_8b, 8192).num_splits, 1);
/// # Ok::<(), paged_gqa::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeSchedule {
    /// Blocks per K/V head: `ceil(group / max_heads_per_block(head_dim))`.
    pub head_chunks: usize,
    /// Splits of each context (1: no split, no merge).
    pub num_splits: usize,
    /// Keys per split: split `s` covers keys `[s * keys_per_split, (s + 1) * keys_per_split)`.
    pub keys_per_split: usize,
}

impl DecodeSchedule {
    /// Plans a decode of `batch` sequences whose longest context is `max_context_len`, on a GPU
    /// with `sm_count` multiprocessors.
    pub fn new(sm_count: usize, batch: usize, shape: GqaShape, max_context_len: usize) -> Self {
        let head_chunks = shape
            .group()
            .div_ceil(max_heads_per_block(shape.head_dim()));
        let blocks = batch * shape.n_kv_heads() * head_chunks;
        let target = sm_count.max(1) * BLOCKS_PER_SM;
        let wanted = if blocks == 0 {
            1
        } else {
            target.div_ceil(blocks)
        };
        let most_useful = max_context_len.div_ceil(MIN_KEYS_PER_SPLIT).max(1);
        let num_splits = wanted.min(most_useful).clamp(1, MAX_SPLITS);
        let keys_per_split = max_context_len
            .div_ceil(num_splits)
            .next_multiple_of(SPLIT_ALIGN)
            .max(SPLIT_ALIGN);
        // Rounding up may leave trailing splits empty: drop them.
        let num_splits = max_context_len.div_ceil(keys_per_split).max(1);
        Self {
            head_chunks,
            num_splits,
            keys_per_split,
        }
    }

    /// f32 elements of the split workspace: partial outputs `[batch, n_heads, num_splits,
    /// head_dim]` then partial log-sum-exps `[batch, n_heads, num_splits]`; 0 without splits.
    pub fn workspace_floats(&self, batch: usize, shape: GqaShape) -> usize {
        if self.num_splits == 1 {
            return 0;
        }
        batch * shape.n_heads() * self.num_splits * (shape.head_dim() + 1)
    }
}
