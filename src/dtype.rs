//! Element types the kernels take, and the element types of KV cache pages. A foundation:
//! imports nothing of the crate (the fp8 page elements implement [`PageElement`] in
//! [`crate::fp8`]).

use half::{bf16, f16};

/// Values the backends move between host and device memory.
pub trait DeviceValue:
    bytemuck::Pod + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Send + Sync + 'static
{
}
impl<T> DeviceValue for T where
    T: bytemuck::Pod
        + cudarc::driver::DeviceRepr
        + cudarc::driver::ValidAsZeroBits
        + Send
        + Sync
        + 'static
{
}

/// Element type of a tensor on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// OCP fp8 e4m3fn ([`Fp8Format::E4M3`](crate::fp8::Fp8Format::E4M3)): a page type only
    /// (queries, outputs and new K/V rows stay 16-bit), each value stored under a per-head
    /// scale.
    F8E4M3,
    /// OCP fp8 e5m2 ([`Fp8Format::E5M2`](crate::fp8::Fp8Format::E5M2)): a page type only, as [`F8E4M3`](DType::F8E4M3).
    F8E5M2,
}

impl DType {
    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 | DType::F8E5M2 => 1,
        }
    }

    /// Whether this is an fp8 page type (its format:
    /// [`Fp8Format::of`](crate::fp8::Fp8Format::of)).
    pub fn is_fp8(self) -> bool {
        matches!(self, DType::F8E4M3 | DType::F8E5M2)
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

/// An element of KV cache pages on a device: every [`Element`] (pages of the compute type,
/// holding K/V as they are), and the stored fp8 values
/// [`Fp8E4M3`](crate::fp8::Fp8E4M3) and [`Fp8E5M2`](crate::fp8::Fp8E5M2) (pages that hold K/V
/// quantized under per-head scales: see [`crate::fp8`]).
pub trait PageElement: DeviceValue + Copy {
    /// The page dtype ([`CacheConfig::page_dtype`](crate::cache::CacheConfig::page_dtype)).
    const PAGE_DTYPE: DType;
}

impl<T: Element> PageElement for T {
    const PAGE_DTYPE: DType = T::DTYPE;
}
