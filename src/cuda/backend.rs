//! The CUDA device as a [`Backend`]: a cudarc stream, its memory, and the nvcc-built launchers.

use std::sync::Arc;

use cudarc::driver::{sys, CudaSlice, CudaStream, DevicePtr};

use crate::error::{Error, Result};
use crate::launch::{Backend, DeviceValue, Launch};
use crate::plan::KernelChoice;

use super::launch;

/// The tensor-core kernel was compiled with a body (some target architecture is sm_80+).
const TENSOR_CORES_BUILT: bool = cfg!(paged_gqa_mma);

impl Backend for Arc<CudaStream> {
    type Buffer<T: DeviceValue> = CudaSlice<T>;

    fn sm_count(&self) -> Result<usize> {
        let count = self
            .context()
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        Ok(count.max(1) as usize)
    }

    /// The tensor-core kernel needs sm_80 or newer (and a build for such a GPU): elsewhere
    /// `Auto` means CUDA cores only and either tensor-core layout is an error.
    fn kernels(&self, requested: KernelChoice) -> Result<KernelChoice> {
        let context = self.context();
        let major = context
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = context
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let tensor_cores = major >= 8 && TENSOR_CORES_BUILT;
        match requested {
            KernelChoice::Auto if !tensor_cores => Ok(KernelChoice::CudaCores),
            KernelChoice::TensorCores | KernelChoice::NarrowTensorCores if !tensor_cores => {
                Err(Error::NoTensorCoreKernel {
                    compute_capability: format!("{major}.{minor}"),
                    built: TENSOR_CORES_BUILT,
                })
            }
            choice => Ok(choice),
        }
    }

    fn alloc_zeros<T: DeviceValue>(&self, len: usize) -> Result<CudaSlice<T>> {
        Ok(CudaStream::alloc_zeros::<T>(self, len)?)
    }

    fn upload<T: DeviceValue>(&self, values: &[T]) -> Result<CudaSlice<T>> {
        Ok(self.clone_htod(values)?)
    }

    fn write<T: DeviceValue>(&self, values: &[T], dst: &mut CudaSlice<T>) -> Result<()> {
        Ok(self.memcpy_htod(values, &mut dst.slice_mut(..values.len()))?)
    }

    fn address<T: DeviceValue>(&self, buffer: &CudaSlice<T>) -> u64 {
        // The crate's own buffers are only touched on the stream they were made on (the
        // batches check it), so stream order is the synchronisation; the pages' writes are
        // recorded for other streams by CudaStorage.
        let (ptr, _sync) = buffer.device_ptr(self);
        ptr
    }

    fn len<T: DeviceValue>(buffer: &CudaSlice<T>) -> usize {
        buffer.len()
    }

    fn same(&self, other: &Self) -> bool {
        self.cu_stream() == other.cu_stream()
    }

    unsafe fn launch(&self, call: Launch<'_>) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe {
            match call {
                Launch::Attend(p) => launch::attend(p, self),
                Launch::MergeStates(p) => launch::merge_states(p, self),
                Launch::WriteKv(p) => launch::write_kv(p, self),
                Launch::CopyBlocks(p) => launch::copy_blocks(p, self),
                Launch::RepeatKv(p) => launch::repeat_kv(p, self),
                Launch::GatherKv(p) => launch::gather_kv(p, self),
                Launch::NaiveDecode(p) => launch::naive_decode(p, self),
            }
        }
    }
}
