//! The CUDA backend: safe launchers over cudarc buffers and streams.
//!
//! Three layers, as in cudarc: [`crate::ffi`] (bindgen of `paged_gqa.h`, nothing else) ->
//! `launch` (turns a launcher's status into a `Result`) -> the safe functions here, which
//! validate shapes, lengths and alignment before anything reaches a kernel.
//!
//! Every entry point returns [`Error::CudaUnavailable`] when the crate was built without nvcc,
//! when libcuda is missing, or when there is no device; none of them panics.

mod attend;
mod baseline;
mod cache;
mod launch;
mod repeat_kv;

use std::sync::Arc;

pub use attend::{AttendBatch, ATTEND_HEAD_DIMS};
pub use baseline::NaiveAttention;
pub use cache::{CudaStepPlan, CudaStorage};
pub use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut};
pub use repeat_kv::repeat_kv;

use crate::error::{Error, Result};

/// True when this build contains the CUDA kernels (nvcc was found at build time).
pub const KERNELS_BUILT: bool = cfg!(paged_gqa_kernels);

/// Opens CUDA device `ordinal` (its primary context), or says why it cannot.
///
/// ```
/// match paged_gqa::cuda::context(0) {
///     Ok(ctx) => println!("GPU: {}", ctx.name().unwrap_or_default()),
///     Err(e) => println!("CPU only: {e}"),
/// }
/// ```
pub fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    if !KERNELS_BUILT {
        return Err(built_without_kernels());
    }
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::CudaUnavailable {
            reason: "libcuda.so (the NVIDIA driver) is not installed".into(),
        });
    }
    let count = CudaContext::device_count().map_err(|e| Error::CudaUnavailable {
        reason: format!("the CUDA driver found no device: {e}"),
    })?;
    if ordinal >= count.max(0) as usize {
        return Err(Error::CudaUnavailable {
            reason: format!("device {ordinal} requested, {count} present"),
        });
    }
    Ok(CudaContext::new(ordinal)?)
}

/// The error of every CUDA entry point in a build without kernels.
pub(crate) fn built_without_kernels() -> Error {
    Error::CudaUnavailable {
        reason: "paged-gqa was built without nvcc (run scripts/install-toolchain, or set NVCC / CUDA_HOME, then rebuild)"
            .into(),
    }
}

/// A size the C contract carries as `int32_t`, checked.
pub(crate) fn to_i32(what: &'static str, value: usize) -> Result<i32> {
    i32::try_from(value).map_err(|_| Error::TooLarge {
        what,
        value: value as u128,
        limit: i32::MAX as u128,
    })
}

/// Bytes of 16-byte vector alignment every kernel's tensors need.
pub(crate) const VECTOR_BYTES: u64 = 16;

/// Checks that a device address can take 16-byte vector accesses.
pub(crate) fn check_aligned(name: &'static str, address: u64) -> Result<()> {
    if address % VECTOR_BYTES != 0 {
        return Err(Error::Misaligned { name, address });
    }
    Ok(())
}
