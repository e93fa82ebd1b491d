//! Checks of candle tensors before an op touches their storage: device, dtype, rank and shape,
//! contiguity, aliasing. Each failure is an [`Error`] with the numbers; nothing has been
//! launched or written when one is returned.

use std::ops::Range;

use candle_core::{DType as CandleDType, Device, Storage, Tensor};

use crate::cache::{CacheConfig, PagedLayout};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shape::GqaShape;

/// The dims of `t`, which must have rank `N`; `expected` names them for the error.
pub(crate) fn dims<const N: usize>(
    t: &Tensor,
    name: &'static str,
    expected: &str,
) -> Result<[usize; N]> {
    <[usize; N]>::try_from(t.dims()).map_err(|_| Error::TensorShape {
        name,
        expected: expected.to_string(),
        actual: t.dims().to_vec(),
    })
}

/// `Err(TensorShape)` unless `t` has exactly the dims `expected`.
pub(crate) fn exact_dims(t: &Tensor, name: &'static str, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(Error::TensorShape {
            name,
            expected: format!("{expected:?}"),
            actual: t.dims().to_vec(),
        });
    }
    Ok(())
}

/// The crate's element type of a float tensor (f32, f16, bf16).
pub(crate) fn float_dtype(t: &Tensor, name: &'static str) -> Result<DType> {
    match t.dtype() {
        CandleDType::F32 => Ok(DType::F32),
        CandleDType::F16 => Ok(DType::F16),
        CandleDType::BF16 => Ok(DType::BF16),
        other => Err(Error::TensorDType {
            name,
            expected: "f32, f16 or bf16".into(),
            actual: other.as_str().into(),
        }),
    }
}

/// candle's dtype for one of ours (f32, f16, bf16; the fp8 page types have none here).
pub(crate) fn candle_dtype(dtype: DType) -> Result<CandleDType> {
    match dtype {
        DType::F32 => Ok(CandleDType::F32),
        DType::F16 => Ok(CandleDType::F16),
        DType::BF16 => Ok(CandleDType::BF16),
        DType::F8E4M3 | DType::F8E5M2 => Err(Error::UnsupportedDType {
            kernel: "candle integration",
            dtype,
        }),
    }
}

/// `Err(TensorDType)` unless `t` has the dtype of `reference`.
pub(crate) fn same_dtype(
    t: &Tensor,
    name: &'static str,
    reference: &Tensor,
    reference_name: &str,
) -> Result<()> {
    if t.dtype() != reference.dtype() {
        return Err(Error::TensorDType {
            name,
            expected: format!(
                "{} (the dtype of {reference_name})",
                reference.dtype().as_str()
            ),
            actual: t.dtype().as_str().into(),
        });
    }
    Ok(())
}

/// `Err(NotContiguous)` unless `t` is row-major contiguous (its start offset may be anything:
/// a view such as one layer of a larger tensor is fine).
pub(crate) fn contiguous(t: &Tensor, name: &'static str) -> Result<()> {
    if !t.is_contiguous() {
        return Err(Error::NotContiguous {
            name,
            shape: t.dims().to_vec(),
            stride: t.stride().to_vec(),
        });
    }
    Ok(())
}

/// How a device reads in an error message: `Cpu`, `Cuda { gpu_id: 0 }`.
pub(crate) fn describe(device: &Device) -> String {
    format!("{:?}", device.location())
}

/// `Err(TensorDevice)` unless `t` is on the candle device of `reference` (on CUDA: the same
/// `Device`, hence the same GPU ordinal and the same stream).
pub(crate) fn same_device(
    t: &Tensor,
    name: &'static str,
    reference: &Tensor,
    reference_name: &'static str,
) -> Result<()> {
    if t.device().same_device(reference.device()) {
        return Ok(());
    }
    let (expected, mut actual) = (describe(reference.device()), describe(t.device()));
    if expected == actual {
        actual.push_str(" (another candle Device of the same GPU, with its own stream)");
    }
    Err(Error::TensorDevice {
        name,
        reference: reference_name,
        expected,
        actual,
    })
}

/// `Err(CudaUnavailable)` for a CUDA tensor in a build without the `candle-cuda` feature, and
/// for devices the crate has no path for (Metal).
pub(crate) fn supported_device(t: &Tensor, name: &'static str) -> Result<()> {
    match t.device() {
        Device::Cpu => Ok(()),
        Device::Cuda(_) if cfg!(feature = "candle-cuda") => Ok(()),
        Device::Cuda(_) => Err(Error::CudaUnavailable {
            reason: format!(
                "{name} is a CUDA tensor and paged-gqa was built without its `candle-cuda` feature"
            ),
        }),
        other => Err(Error::CudaUnavailable {
            reason: format!(
                "{name} is on {}: paged-gqa's candle ops run on the CPU and on CUDA",
                describe(other)
            ),
        }),
    }
}

/// An integer tensor of rank `rank` read to the host (`[batch]` lengths, `[batch, max_blocks]`
/// tables, `[num_tokens]` slots), widened to i64. On CUDA this is one device-to-host copy,
/// which waits for the device.
pub(crate) fn host_ints(
    t: &Tensor,
    name: &'static str,
    expected: &str,
    rank: usize,
    dtypes: &[CandleDType],
) -> candle_core::Result<Vec<i64>> {
    if t.rank() != rank {
        Err(Error::TensorShape {
            name,
            expected: expected.to_string(),
            actual: t.dims().to_vec(),
        })?;
    }
    if !dtypes.contains(&t.dtype()) {
        let names: Vec<&str> = dtypes.iter().map(|d| d.as_str()).collect();
        Err(Error::TensorDType {
            name,
            expected: names.join(" or "),
            actual: t.dtype().as_str().into(),
        })?;
    }
    supported_device(t, name)?;
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        CandleDType::U32 => flat.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
        CandleDType::I32 => flat.to_vec1::<i32>()?.into_iter().map(i64::from).collect(),
        _ => flat.to_vec1::<i64>()?,
    })
}

/// The checked geometry of a pair of caches `[num_blocks, block_size, n_kv_heads, head_dim]`
/// and the tensors that go with them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    /// The heads (for a write: `n_heads = n_kv_heads`, only the K/V rows matter).
    pub shape: GqaShape,
    /// One cache tensor's geometry.
    pub layout: PagedLayout,
    pub dtype: DType,
}

#[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
impl Geometry {
    /// One layer of a cache with this geometry, for the launch parameters that need it.
    pub fn config(&self) -> Result<CacheConfig> {
        CacheConfig::new(self.shape, 1, self.layout.block_size(), self.dtype)
    }
}

/// Checks a K and a V cache (same shape, dtype and device as each other, contiguous,
/// `[num_blocks, block_size, n_kv_heads, head_dim]`, block_size a power of two up to 256),
/// with `n_heads` query heads. Returns their geometry.
pub(crate) fn caches(
    k_cache: &Tensor,
    v_cache: &Tensor,
    n_heads: Option<usize>,
) -> Result<Geometry> {
    const CACHE: &str = "[num_blocks, block_size, n_kv_heads, head_dim]";
    let [num_blocks, block_size, n_kv_heads, head_dim] = dims(k_cache, "k_cache", CACHE)?;
    supported_device(k_cache, "k_cache")?;
    let dtype = float_dtype(k_cache, "k_cache")?;
    same_device(v_cache, "v_cache", k_cache, "k_cache")?;
    same_dtype(v_cache, "v_cache", k_cache, "k_cache")?;
    exact_dims(v_cache, "v_cache", k_cache.dims())?;
    contiguous(k_cache, "k_cache")?;
    contiguous(v_cache, "v_cache")?;
    let shape = GqaShape::new(n_heads.unwrap_or(n_kv_heads), n_kv_heads, head_dim)?;
    // The page rule of the kernels (powers of two up to 256) holds on every device, so a model
    // that runs on the CPU runs on the GPU.
    CacheConfig::new(shape, 1, block_size, dtype)?;
    let layout = PagedLayout::new(shape, num_blocks, block_size)?;
    if num_blocks == 0 {
        return Err(Error::ZeroBlocks);
    }
    if k_cache.device().is_cuda() {
        crate::launch::params::check_supported("attention", shape, dtype)?;
    }
    Ok(Geometry {
        shape,
        layout,
        dtype,
    })
}

/// Checks the query of an attention call against its caches: `q` `[num_tokens, n_heads,
/// head_dim]`, the caches' dtype and device, contiguous. Returns the geometry.
pub(crate) fn attention(q: &Tensor, k_cache: &Tensor, v_cache: &Tensor) -> Result<Geometry> {
    let [_, n_heads, head_dim] = dims(q, "q", "[num_tokens, n_heads, head_dim]")?;
    supported_device(q, "q")?;
    float_dtype(q, "q")?;
    same_device(k_cache, "k_cache", q, "q")?;
    same_dtype(k_cache, "k_cache", q, "q")?;
    contiguous(q, "q")?;
    let geometry = caches(k_cache, v_cache, Some(n_heads))?;
    if head_dim != geometry.shape.head_dim() {
        return Err(Error::TensorShape {
            name: "q",
            expected: format!(
                "[num_tokens, n_heads, {}] (the head_dim of k_cache)",
                geometry.shape.head_dim()
            ),
            actual: q.dims().to_vec(),
        });
    }
    Ok(geometry)
}

/// Checks the new rows of a write against their caches: `k`, `v` `[num_tokens, n_kv_heads,
/// head_dim]` with the caches' dtype and device, contiguous. Returns the geometry and
/// `num_tokens`.
pub(crate) fn write(
    k: &Tensor,
    v: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
) -> Result<(Geometry, usize)> {
    let geometry = caches(k_cache, v_cache, None)?;
    let (n_kv_heads, head_dim) = (geometry.shape.n_kv_heads(), geometry.shape.head_dim());
    let expected =
        format!("[num_tokens, {n_kv_heads}, {head_dim}] (n_kv_heads, head_dim of k_cache)");
    let [num_tokens, kv, d] = dims(k, "k", &expected)?;
    if (kv, d) != (n_kv_heads, head_dim) {
        return Err(Error::TensorShape {
            name: "k",
            expected,
            actual: k.dims().to_vec(),
        });
    }
    for (t, name) in [(k, "k"), (v, "v")] {
        same_device(t, name, k_cache, "k_cache")?;
        same_dtype(t, name, k_cache, "k_cache")?;
        contiguous(t, name)?;
    }
    exact_dims(v, "v", k.dims())?;
    Ok((geometry, num_tokens))
}

/// Where a tensor's elements live: its storage's base address and the byte range it covers.
/// Two tensors alias when they share a base (one candle storage); distinct storages are
/// distinct allocations.
pub(crate) struct Memory {
    base: usize,
    bytes: Range<usize>,
}

impl Memory {
    /// The memory of a contiguous tensor (takes and releases a read lock on its storage).
    pub fn of(t: &Tensor) -> candle_core::Result<Self> {
        let (storage, layout) = t.storage_and_layout();
        let base = match &*storage {
            Storage::Cpu(cpu) => cpu_base(cpu),
            #[cfg(feature = "candle-cuda")]
            Storage::Cuda(cuda) => super::cuda::base(cuda)?,
            _ => None,
        };
        let elem = t.dtype().size_in_bytes();
        let start = layout.start_offset() * elem;
        Ok(Self {
            // An unknown storage gets a base of its own: the tensor's address (never shared).
            base: base.unwrap_or(t as *const Tensor as usize),
            bytes: start..start + t.elem_count() * elem,
        })
    }

    /// Both in one candle storage.
    pub fn same_storage(&self, other: &Self) -> bool {
        self.base == other.base
    }

    /// In one storage with overlapping bytes.
    pub fn overlaps(&self, other: &Self) -> bool {
        self.same_storage(other)
            && self.bytes.start < other.bytes.end
            && other.bytes.start < self.bytes.end
    }
}

/// The address of a CPU storage's buffer, for the dtypes the ops take.
fn cpu_base(storage: &candle_core::CpuStorage) -> Option<usize> {
    use candle_core::CpuStorage as S;
    Some(match storage {
        S::F32(v) => v.as_ptr() as usize,
        S::F16(v) => v.as_ptr() as usize,
        S::BF16(v) => v.as_ptr() as usize,
        S::I64(v) => v.as_ptr() as usize,
        S::I32(v) => v.as_ptr() as usize,
        S::U32(v) => v.as_ptr() as usize,
        _ => return None,
    })
}
