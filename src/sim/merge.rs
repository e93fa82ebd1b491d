//! The attention-state merge on the emulator.

use std::rc::Rc;

use crate::dtype::Element;
use crate::error::Result;
use crate::launch::{params, Backend, Launch};
use crate::sim::{SimBuffer, SimDevice};
use crate::state::AttentionState;

/// [`cuda::merge_states`](crate::cuda::merge_states) on the emulator: outputs `[num_rows,
/// head_dim]`, LSE `[num_rows]` (natural log), `a` and `b` over disjoint key sets.
pub fn merge_states<T: Element>(
    device: &Rc<SimDevice>,
    head_dim: usize,
    a: AttentionState<&SimBuffer<T>, &SimBuffer<f32>>,
    b: AttentionState<&SimBuffer<T>, &SimBuffer<f32>>,
    merged: AttentionState<&mut SimBuffer<T>, &mut SimBuffer<f32>>,
) -> Result<()> {
    let (a, b) = ((a.out, a.lse_ln), (b.out, b.lse_ln));
    let (out, lse) = (merged.out, merged.lse_ln);
    let Some(params) = params::merge_states_params(
        head_dim,
        T::DTYPE,
        (
            (a.0.address_on("out_a", device)?, a.0.len()),
            (a.1.address_on("lse_a", device)?, a.1.len()),
        ),
        (
            (b.0.address_on("out_b", device)?, b.0.len()),
            (b.1.address_on("lse_b", device)?, b.1.len()),
        ),
        (
            (out.address_on("out", device)?, out.len()),
            (lse.address_on("lse", device)?, lse.len()),
        ),
    )?
    else {
        return Ok(());
    };
    // SAFETY: lengths checked; every buffer is live on this device.
    unsafe { device.launch(Launch::MergeStates(&params)) }
}
