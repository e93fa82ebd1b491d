//! Element types the kernels take.

use half::{bf16, f16};

/// Element type of a tensor on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// A type the kernels take (`f32`, [`half::f16`], [`half::bf16`]): plain data on the host and the device,
/// exactly convertible to `f64` for the reference.
pub trait Element:
    Copy
    + Default
    + Into<f64>
    + bytemuck::Pod
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + Send
    + Sync
    + 'static
{
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Rounds an `f32` to this type.
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
