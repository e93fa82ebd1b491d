//! The merge of two attention states over disjoint key sets (a shared prefix's keys and each
//! request's own, say), and the conversions between the LSE bases engines use.

use crate::error::{Error, Result};
use crate::state::AttentionState;

/// Merges two attention results over disjoint key sets of the same rows into `merged`:
/// per row, with `m = max(lse_a, lse_b)`, `w_a = exp(lse_a - m)`, `w_b = exp(lse_b - m)`,
/// `out = (w_a out_a + w_b out_b) / (w_a + w_b)` and `lse = m + ln(w_a + w_b)`.
///
/// Rows are `(token, head)` pairs (see [`AttentionState`]: outputs `[num_rows, head_dim]`, LSE
/// `[num_rows]` in **natural log**; FlashInfer's base-2 LSE converts with [`lse_log2_to_ln`]). An
/// empty key set is `(0, -inf)`; merging two gives `(0, -inf)`. The result is attention over the
/// union, up to rounding.
///
/// ```
/// use paged_gqa::{cpu::merge_states, AttentionState};
/// let (mut out, mut lse) = (vec![0.0; 2], vec![0.0; 1]);
/// // Two halves with equal weight: the mean of their outputs, lse + ln 2.
/// let a = AttentionState::new(&[1.0, 0.0][..], &[0.5][..]);
/// let b = AttentionState::new(&[0.0, 1.0][..], &[0.5][..]);
/// merge_states(2, a, b, AttentionState::new(&mut out[..], &mut lse[..]))?;
/// assert_eq!(out, [0.5, 0.5]);
/// assert!((lse[0] - (0.5 + 2f32.ln())).abs() < 1e-6);
/// # Ok::<(), paged_gqa::Error>(())
/// ```
pub fn merge_states(
    head_dim: usize,
    a: AttentionState<&[f32], &[f32]>,
    b: AttentionState<&[f32], &[f32]>,
    merged: AttentionState<&mut [f32], &mut [f32]>,
) -> Result<()> {
    let (a, b) = ((a.out, a.lse_ln), (b.out, b.lse_ln));
    let (out, lse) = (merged.out, merged.lse_ln);
    let rows = a.1.len();
    Error::check_len("out_a", a.0.len(), rows * head_dim)?;
    Error::check_len("lse_b", b.1.len(), rows)?;
    Error::check_len("out_b", b.0.len(), rows * head_dim)?;
    Error::check_len("out", out.len(), rows * head_dim)?;
    Error::check_len("lse", lse.len(), rows)?;
    for row in 0..rows {
        let (la, lb) = (a.1[row], b.1[row]);
        let m = la.max(lb);
        let dst = &mut out[row * head_dim..][..head_dim];
        if m == f32::NEG_INFINITY {
            dst.fill(0.0); // both sets empty
            lse[row] = f32::NEG_INFINITY;
            continue;
        }
        let (wa, wb) = ((la - m).exp(), (lb - m).exp()); // 0 for an empty set
        let inv = 1.0 / (wa + wb);
        let (xa, xb) = (
            &a.0[row * head_dim..][..head_dim],
            &b.0[row * head_dim..][..head_dim],
        );
        for ((o, &x), &y) in dst.iter_mut().zip(xa).zip(xb) {
            *o = (wa * x + wb * y) * inv;
        }
        lse[row] = m + (wa + wb).ln();
    }
    Ok(())
}

/// A natural-log LSE (this crate's) as base 2 (FlashInfer's): `lse / ln 2`.
pub fn lse_ln_to_log2(lse: f32) -> f32 {
    lse * std::f32::consts::LOG2_E
}

/// A base-2 LSE (FlashInfer's) as natural log (this crate's): `lse * ln 2`.
pub fn lse_log2_to_ln(lse: f32) -> f32 {
    lse * std::f32::consts::LN_2
}
