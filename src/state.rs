//! An attention result as the merge reads it: outputs and their log-sum-exp, in natural log.

/// The attention of some rows over one key set: `out` `[num_rows, head_dim]` (rows are
/// `(token, head)` pairs, so `[num_tokens, n_heads, head_dim]`) and `lse_ln` `[num_rows]`, the
/// log-sum-exp of each row's scores in **natural log**, this crate's convention (FlashInfer's is
/// base 2: convert with [`cpu::lse_log2_to_ln`](crate::cpu::lse_log2_to_ln)). An empty key set is
/// `(0, -inf)`. `O` and `L` are host slices or device buffers.
///
/// ```
/// use paged_gqa::{cpu, AttentionState};
/// let (out, lse) = (vec![1.0f32, 2.0], vec![0.0f32]);
/// let empty = (vec![0.0f32; 2], vec![f32::NEG_INFINITY]);
/// let (mut merged, mut merged_lse) = (vec![0.0; 2], vec![0.0; 1]);
/// cpu::merge_states(
///     2,
///     AttentionState::new(&out[..], &lse[..]),
///     AttentionState::new(&empty.0[..], &empty.1[..]),
///     AttentionState::new(&mut merged[..], &mut merged_lse[..]),
/// )?;
/// assert_eq!((merged, merged_lse), (out, lse)); // the empty set changes nothing
/// # Ok::<(), paged_gqa::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionState<O, L> {
    /// `[num_rows, head_dim]`
    pub out: O,
    /// `[num_rows]`, natural log
    pub lse_ln: L,
}

impl<O, L> AttentionState<O, L> {
    /// The state of outputs `out` with natural-log LSE `lse_ln`.
    pub fn new(out: O, lse_ln: L) -> Self {
        Self { out, lse_ln }
    }
}
