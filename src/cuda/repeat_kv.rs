//! Safe launcher of the `repeat_kv` kernel.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::cuda::launch;
use crate::dtype::Element;
use crate::error::Result;
use crate::launch::params;
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
    let (src_len, dst_len) = (src.len(), dst.len());
    let (src_ptr, _src_sync) = src.device_ptr(stream);
    let (dst_ptr, _dst_sync) = dst.device_ptr_mut(stream);
    let Some(params) = params::repeat_kv_params(
        shape,
        T::DTYPE,
        num_tokens,
        (src_ptr, src_len),
        (dst_ptr, dst_len),
    )?
    else {
        return Ok(());
    };
    // SAFETY: lengths were checked against the shape; both pointers are live device
    // allocations until the launched work completes (the SyncOnDrop guards order later uses
    // after it).
    unsafe { launch::repeat_kv(&params, stream) }
}
