//! Safe launcher of the attention-state merge.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::cuda::launch;
use crate::dtype::Element;
use crate::error::Result;
use crate::launch::params;
use crate::state::AttentionState;

/// [`cpu::merge_states`](crate::cpu::merge_states) on the GPU: merges two attention results over
/// disjoint key sets of the same rows, `a` and `b`, into `merged`. Rows are `(token, head)`
/// pairs: outputs `[num_rows, head_dim]`, LSE `[num_rows]` f32 in **natural log** (see
/// [`AttentionState`]); an empty key set is `(0, -inf)`. `T` is f32, f16 or bf16. Enqueued on
/// `stream`.
pub fn merge_states<T: Element>(
    stream: &CudaStream,
    head_dim: usize,
    a: AttentionState<&impl DevicePtr<T>, &impl DevicePtr<f32>>,
    b: AttentionState<&impl DevicePtr<T>, &impl DevicePtr<f32>>,
    merged: AttentionState<&mut impl DevicePtrMut<T>, &mut impl DevicePtrMut<f32>>,
) -> Result<()> {
    let (a, b) = ((a.out, a.lse_ln), (b.out, b.lse_ln));
    let (out, lse) = (merged.out, merged.lse_ln);
    let (out_len, lse_len) = (out.len(), lse.len());
    let (a_out, _a_out_sync) = a.0.device_ptr(stream);
    let (a_lse, _a_lse_sync) = a.1.device_ptr(stream);
    let (b_out, _b_out_sync) = b.0.device_ptr(stream);
    let (b_lse, _b_lse_sync) = b.1.device_ptr(stream);
    let (out_ptr, _out_sync) = out.device_ptr_mut(stream);
    let (lse_ptr, _lse_sync) = lse.device_ptr_mut(stream);
    let Some(params) = params::merge_states_params(
        head_dim,
        T::DTYPE,
        ((a_out, a.0.len()), (a_lse, a.1.len())),
        ((b_out, b.0.len()), (b_lse, b.1.len())),
        ((out_ptr, out_len), (lse_ptr, lse_len)),
    )?
    else {
        return Ok(());
    };
    // SAFETY: every buffer holds the rows its length says (checked); Rust's borrows keep out
    // and lse apart from the inputs; all live until the work completes (the sync guards).
    unsafe { launch::merge_states(&params, stream) }
}
