//! Launch planning for the attention kernel, in plain Rust so it is unit-tested on the CPU:
//! which query rows each thread block serves, how many blocks serve each K/V head, and into how
//! many splits (flash-decoding) the keys are cut when the batch alone cannot fill the GPU.

use crate::batch::SeqLens;
use crate::ffi;
use crate::shape::GqaShape;

/// Threads of an attention block (kernels/attend.cu).
pub const ATTEND_THREADS: usize = ffi::PGQA_ATTEND_THREADS.0 as usize;
/// 8-element output accumulators per thread.
const ATTEND_ACC_ITEMS: usize = ffi::PGQA_ATTEND_ACC_ITEMS.0 as usize;
/// The most splits a launch takes (grid z).
pub const MAX_SPLITS: usize = ffi::PGQA_ATTEND_MAX_SPLITS.0 as usize;
/// A split covers at least this many keys: below it, the merge costs more than it gains.
pub const MIN_KEYS_PER_SPLIT: usize = 256;
/// Split boundaries fall on multiples of this many keys (every tile size divides it).
pub const SPLIT_ALIGN: usize = 64;
/// Resident blocks per SM to aim for: enough loads in flight to cover HBM latency.
pub const BLOCKS_PER_SM: usize = 4;

/// Rows (query row, query head) one attention block computes for `head_dim`.
pub fn max_rows_per_block(head_dim: usize) -> usize {
    ATTEND_ACC_ITEMS * ATTEND_THREADS * 8 / head_dim
}

/// How one attention launch is cut into thread blocks.
///
/// ```
/// use paged_gqa::{plan::AttendSchedule, GqaShape, SeqLens};
/// let llama3_8b = GqaShape::new(32, 8, 128)?;
/// // One long request decoding on a 132-SM GPU: 8 blocks cannot fill it, so the keys are split.
/// let one = AttendSchedule::new(132, &SeqLens::decode(&[32_768])?, llama3_8b);
/// assert!(one.num_splits > 1);
/// // 128 requests of 8k: 1024 blocks fill it already; splitting would only add the merge.
/// assert_eq!(AttendSchedule::new(132, &SeqLens::decode(&[8192; 128])?, llama3_8b).num_splits, 1);
/// // A 100-token prompt: 12 query rows (x 4 heads = 48 rows) per block.
/// let prompt = AttendSchedule::new(132, &SeqLens::new(&[100], &[100])?, llama3_8b);
/// assert_eq!((prompt.tokens_per_work, prompt.work.len()), (12, 9));
/// # Ok::<(), paged_gqa::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttendSchedule {
    /// Blocks per K/V head: `ceil(group / max_rows_per_block(head_dim))`.
    pub head_chunks: usize,
    /// Query rows of one sequence per block (each with all the group's heads of the chunk).
    pub tokens_per_work: usize,
    /// The grid's x dimension: (sequence, first query row of the sequence) per block row.
    pub work: Vec<[i32; 2]>,
    /// Splits of the keys (1: no split, no merge).
    pub num_splits: usize,
    /// Keys per split: split `s` covers keys `[s * keys_per_split, (s + 1) * keys_per_split)`.
    pub keys_per_split: usize,
}

impl AttendSchedule {
    /// Plans attention for the batch `lens` on a GPU with `sm_count` multiprocessors.
    pub fn new(sm_count: usize, lens: &SeqLens, shape: GqaShape) -> Self {
        let max_rows = max_rows_per_block(shape.head_dim());
        let head_chunks = shape.group().div_ceil(max_rows);
        let tokens_per_work = (max_rows / shape.group().min(max_rows)).max(1);
        let mut work = Vec::new();
        let mut max_context_len = 0;
        for seq in 0..lens.batch() {
            if lens.query_len(seq) > 0 {
                max_context_len = max_context_len.max(lens.context_len(seq));
            }
            for j0 in (0..lens.query_len(seq)).step_by(tokens_per_work) {
                work.push([seq as i32, j0 as i32]);
            }
        }
        let blocks = work.len() * shape.n_kv_heads() * head_chunks;
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
            tokens_per_work,
            work,
            num_splits,
            keys_per_split,
        }
    }

    /// f32 elements of the split workspace: partial outputs `[num_tokens, n_heads, num_splits,
    /// head_dim]` then partial log-sum-exps `[num_tokens, n_heads, num_splits]`; 0 without splits.
    pub fn workspace_floats(&self, num_tokens: usize, shape: GqaShape) -> usize {
        if self.num_splits == 1 {
            return 0;
        }
        num_tokens * shape.n_heads() * self.num_splits * (shape.head_dim() + 1)
    }
}
