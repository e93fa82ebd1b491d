//! The CUDA backend: safe launchers over cudarc buffers and streams.
//!
//! Three layers, as in cudarc: [`crate::ffi`] (bindgen of `paged_gqa.h`, nothing else) ->
//! `launch` (turns a launcher's status into a `Result`) -> the safe functions here, which
//! validate shapes, lengths and alignment before anything reaches a kernel. What the CUDA
//! backend shares with the kernel emulator ([`crate::sim`]) lives in `crate::launch`; this
//! module adds cudarc's memory and streams.
//!
//! Every entry point returns [`Error::CudaUnavailable`] when the crate was built without nvcc,
//! when libcuda is missing, or when there is no device; none of them panics.

mod attend;
mod backend;
mod baseline;
mod cache;
mod launch;
mod merge;
mod repeat_kv;

use std::sync::Arc;

pub use crate::launch::params::ATTEND_HEAD_DIMS;
pub use attend::{AttendBatch, DeviceKvScales};
pub use baseline::NaiveAttention;
pub use cache::{CudaStepPlan, CudaStorage};
pub use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut};
pub use merge::merge_states;
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
    if !driver_present() {
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

/// Whether the driver library (libcuda) can be loaded, before cudarc is asked (it panics when
/// it cannot load it). cudarc's own probe, `is_culib_present`, exists only in its
/// dynamic-loading mode; under `dynamic-linking` (which candle's `cuda` feature turns on) the
/// binary links libcuda, and this finds it already loaded.
fn driver_present() -> bool {
    let names: &[&str] = if cfg!(windows) {
        &["nvcuda.dll"]
    } else {
        &["libcuda.so.1", "libcuda.so"]
    };
    names.iter().any(|name| {
        // SAFETY: loads the driver library (running its initialisers), as cudarc itself does.
        unsafe { libloading::Library::new(*name) }.is_ok()
    })
}

/// The error of every CUDA entry point in a build without kernels.
pub(crate) fn built_without_kernels() -> Error {
    Error::CudaUnavailable {
        reason: "paged-gqa was built without nvcc (run scripts/install-toolchain, or set NVCC / CUDA_HOME, then rebuild)"
            .into(),
    }
}

/// `Err(CudaUnavailable)` in a build without kernels.
pub(crate) fn check_built() -> Result<()> {
    if !KERNELS_BUILT {
        return Err(built_without_kernels());
    }
    Ok(())
}
