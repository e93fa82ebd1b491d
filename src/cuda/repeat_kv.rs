//! Safe launcher of the `repeat_kv` kernel.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::cuda::{check_aligned, launch, to_i32};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ffi;
use crate::shape::GqaShape;

/// `repeat_kv` on the GPU, the Llama reference semantics: `dst` head `h` is a copy of `src`
/// head `h / group` for every token.
///
/// - `src`: `[num_tokens, n_kv_heads, head_dim]`
/// - `dst`: `[num_tokens, n_heads, head_dim]`
///
/// Enqueued on `stream`; returns once launched. Errors: lengths that do not match the shape,
/// buffers not 16-byte aligned, a refused launch, or no CUDA.
pub fn repeat_kv<T: Element>(
    stream: &CudaStream,
    shape: GqaShape,
    num_tokens: usize,
    src: &impl DevicePtr<T>,
    dst: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    Error::check_len("src", src.len(), num_tokens * shape.kv_row_len())?;
    Error::check_len("dst", dst.len(), num_tokens * shape.q_row_len())?;
    if num_tokens == 0 {
        return Ok(());
    }
    let (src_ptr, _src_sync) = src.device_ptr(stream);
    let (dst_ptr, _dst_sync) = dst.device_ptr_mut(stream);
    check_aligned("src", src_ptr)?;
    check_aligned("dst", dst_ptr)?;
    let params = ffi::pgqa_repeat_kv_params {
        src: src_ptr as *const _,
        dst: dst_ptr as *mut _,
        num_tokens: num_tokens as i64,
        n_kv_heads: to_i32("n_kv_heads", shape.n_kv_heads())?,
        n_rep: to_i32("group", shape.group())?,
        head_dim: to_i32("head_dim", shape.head_dim())?,
        dtype: launch::dtype(T::DTYPE),
    };
    // SAFETY: lengths were checked against the shape above; both pointers are live device
    // allocations until the launched work completes (the SyncOnDrop guards order later uses
    // after it).
    unsafe { launch::repeat_kv(&params, stream) }
}
