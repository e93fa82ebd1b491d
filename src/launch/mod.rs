//! What the two backends that run the crate's kernels share: the GPU ([`crate::cuda`]) and the
//! kernel emulator ([`crate::sim`]).
//!
//! Both run the same C entry points of `paged_gqa.h` (nvcc-built, or the emulator's host build
//! of the same sources), so everything above the launch is written once, here, over the
//! [`Backend`] trait: the parameter structs ([`params`]), the attention launch state
//! ([`attend::AttendState`]), the pages of a [`crate::cache::PagedCache`] ([`storage`]) and the
//! naive baseline ([`naive`]). The backends add only their own memory and their own tensor types.

pub(crate) mod attend;
pub(crate) mod naive;
pub(crate) mod params;
pub(crate) mod storage;

pub use crate::dtype::DeviceValue;
use crate::error::{Error, Result};
use crate::ffi;
use crate::plan::KernelChoice;

/// One launcher of `paged_gqa.h` with its parameters.
pub(crate) enum Launch<'a> {
    Attend(&'a ffi::pgqa_attend_params),
    MergeStates(&'a ffi::pgqa_merge_states_params),
    WriteKv(&'a ffi::pgqa_write_kv_params),
    CopyBlocks(&'a ffi::pgqa_copy_blocks_params),
    RepeatKv(&'a ffi::pgqa_repeat_kv_params),
    GatherKv(&'a ffi::pgqa_gather_kv_params),
    NaiveDecode(&'a ffi::pgqa_naive_decode_params),
}

impl Launch<'_> {
    /// The kernel's name, as errors give it.
    pub(crate) fn kernel(&self) -> &'static str {
        match self {
            Launch::Attend(_) => "attend",
            Launch::MergeStates(_) => "merge_states",
            Launch::WriteKv(_) => "write_kv",
            Launch::CopyBlocks(_) => "copy_blocks",
            Launch::RepeatKv(_) => "repeat_kv",
            Launch::GatherKv(_) => "gather_kv",
            Launch::NaiveDecode(_) => "naive_decode",
        }
    }
}

/// A place the kernels run: device memory, the device's properties, and the launchers.
pub(crate) trait Backend: Clone {
    /// An owned allocation of device memory.
    type Buffer<T: DeviceValue>;

    /// Multiprocessors (the planner sizes splits from them).
    fn sm_count(&self) -> Result<usize>;
    /// `requested` as this device can run it (tensor cores need sm_80 and a build with them).
    fn kernels(&self, requested: KernelChoice) -> Result<KernelChoice>;
    /// `len` zeros.
    fn alloc_zeros<T: DeviceValue>(&self, len: usize) -> Result<Self::Buffer<T>>;
    /// A copy of `values`.
    fn upload<T: DeviceValue>(&self, values: &[T]) -> Result<Self::Buffer<T>>;
    /// Copies `values` into the start of `dst` (which is at least as long).
    fn write<T: DeviceValue>(&self, values: &[T], dst: &mut Self::Buffer<T>) -> Result<()>;
    /// The device address of the first element (used in this backend's stream order only).
    fn address<T: DeviceValue>(&self, buffer: &Self::Buffer<T>) -> u64;
    /// Elements of `buffer`.
    fn len<T: DeviceValue>(buffer: &Self::Buffer<T>) -> usize;
    /// Whether `other` is this device and stream (buffers and tables made on one are only
    /// ever used on it).
    fn same(&self, other: &Self) -> bool;
    /// Runs one launcher.
    ///
    /// # Safety
    /// Every pointer in the parameters is a live allocation of this backend, large enough for
    /// the sizes they give, until the launched work completes.
    unsafe fn launch(&self, call: Launch<'_>) -> Result<()>;
}

/// Uploads `values`, or one `fill` element when empty (a zero-length allocation has no address).
pub(crate) fn upload_nonempty<B: Backend, V: DeviceValue>(
    backend: &B,
    values: &[V],
    fill: V,
) -> Result<B::Buffer<V>> {
    let fill = [fill];
    backend.upload(if values.is_empty() { &fill[..] } else { values })
}

/// `Err(DeviceMismatch)` unless `used` is the backend `what` was made on.
pub(crate) fn check_same<B: Backend>(what: &'static str, made_on: &B, used: &B) -> Result<()> {
    if !made_on.same(used) {
        return Err(Error::DeviceMismatch { what });
    }
    Ok(())
}

/// Turns what a launcher returned into a `Result`; `cuda_detail` says what the runtime refused
/// (a `PGQA_STATUS_CUDA_ERROR`).
pub(crate) fn check_status(
    kernel: &'static str,
    status: ffi::pgqa_status,
    cuda_detail: impl FnOnce() -> String,
) -> Result<()> {
    let detail = match status {
        ffi::pgqa_status::PGQA_STATUS_OK => return Ok(()),
        ffi::pgqa_status::PGQA_STATUS_INVALID_ARGUMENT => {
            "the launcher rejected its arguments".to_string()
        }
        ffi::pgqa_status::PGQA_STATUS_MISALIGNED => {
            "a pointer or row is not 16-byte aligned".to_string()
        }
        ffi::pgqa_status::PGQA_STATUS_CUDA_ERROR => cuda_detail(),
        ffi::pgqa_status::PGQA_STATUS_UNSUPPORTED => {
            "no kernel is built for this head_dim or dtype".to_string()
        }
        other => format!("unknown status {}", other.0),
    };
    Err(Error::Launch { kernel, detail })
}
