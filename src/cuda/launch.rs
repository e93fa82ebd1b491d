//! The thin layer between `ffi` and the safe API: one `unsafe fn` per launcher, turning its
//! status into a `Result`. In a build without kernels each returns `CudaUnavailable` (and no
//! launcher symbol is referenced, so the crate still links).

use cudarc::driver::CudaStream;

use crate::error::Result;
use crate::ffi;

/// Declares `unsafe fn $name(params, stream) -> Result<()>` calling launcher `$launcher`.
/// Safety of each: every pointer in `params` is a live device allocation of the stream's
/// context, large enough for the sizes in `params`, until the launched work completes.
macro_rules! launcher {
    ($(#[$doc:meta])* $name:ident, $launcher:ident, $params:ty) => {
        $(#[$doc])*
        pub(crate) unsafe fn $name(params: &$params, stream: &CudaStream) -> Result<()> {
            #[cfg(paged_gqa_kernels)]
            {
                stream.context().bind_to_thread()?;
                let mut cuda_error = 0i32;
                let status = unsafe { ffi::$launcher(params, stream.cu_stream() as _, &mut cuda_error) };
                check(stringify!($name), status, cuda_error)
            }
            #[cfg(not(paged_gqa_kernels))]
            {
                let _ = (params, stream);
                Err(crate::cuda::built_without_kernels())
            }
        }
    };
}

launcher!(
    /// `pgqa_repeat_kv`.
    repeat_kv, pgqa_repeat_kv, ffi::pgqa_repeat_kv_params
);
launcher!(
    /// `pgqa_write_kv`.
    write_kv, pgqa_write_kv, ffi::pgqa_write_kv_params
);
launcher!(
    /// `pgqa_copy_blocks`.
    copy_blocks, pgqa_copy_blocks, ffi::pgqa_copy_blocks_params
);

launcher!(
    /// `pgqa_attend` (the CUDA-core and tensor-core attention kernels, then the split merge
    /// when there are splits).
    attend, pgqa_attend, ffi::pgqa_attend_params
);

launcher!(
    /// `pgqa_merge_states`.
    merge_states, pgqa_merge_states, ffi::pgqa_merge_states_params
);

launcher!(
    /// `pgqa_gather_kv`.
    gather_kv, pgqa_gather_kv, ffi::pgqa_gather_kv_params
);
launcher!(
    /// `pgqa_naive_decode`.
    naive_decode, pgqa_naive_decode, ffi::pgqa_naive_decode_params
);

/// Turns what a launcher returned into a `Result`.
#[cfg_attr(not(paged_gqa_kernels), allow(dead_code))]
fn check(kernel: &'static str, status: ffi::pgqa_status, cuda_error: i32) -> Result<()> {
    crate::launch::check_status(kernel, status, || cuda_error_detail(cuda_error))
}

#[cfg(paged_gqa_kernels)]
fn cuda_error_detail(cuda_error: i32) -> String {
    // SAFETY: the library returns a static, NUL-terminated string for any value.
    let name = unsafe { std::ffi::CStr::from_ptr(ffi::pgqa_cuda_error_name(cuda_error)) };
    format!("CUDA error {cuda_error} ({})", name.to_string_lossy())
}

#[cfg(not(paged_gqa_kernels))]
fn cuda_error_detail(cuda_error: i32) -> String {
    format!("CUDA error {cuda_error}")
}
