//! Paged GQA attention on [candle](https://docs.rs/candle-core) tensors (feature `candle`; the
//! CUDA path with feature `candle-cuda`).
//!
//! Two levels:
//!
//! - **Ops** with the names engine authors know from vLLM and mistral.rs, over caches the
//!   engine owns: [`write_kv`] (alias [`reshape_and_cache`]) writes a step's new K/V rows into
//!   their slots, in place; [`paged_attention`] attends any mix of decode and prefill rows over
//!   the pages and returns `(out, lse)`. For the layers of one step, build a [`PagedMetadata`]
//!   once and call its [`write_kv`](PagedMetadata::write_kv) and
//!   [`attention`](PagedMetadata::attention): the tables are read, checked and (on CUDA)
//!   uploaded once per step, and each layer only launches.
//! - **A cache** that owns the bookkeeping: [`PagedCache`](crate::cache::PagedCache) over a
//!   [`CandleStorage`] (its pages one candle tensor on the model's device and dtype), whose
//!   `plan` / `write` / `attend` take and return candle tensors.
//!
//! **Cache layout**: every K and V cache is `[num_blocks, block_size, n_kv_heads, head_dim]`,
//! row-major (NHD: the layout of FlashAttention's and FlashInfer's paged caches).
//! vLLM's split layout (key `[num_blocks, n_kv_heads, head_dim / x, block_size, x]`, value
//! `[num_blocks, n_kv_heads, head_dim, block_size]`, used by mistral.rs's paged attention) is
//! **not** supported. Pages are powers of two from 1 to 256 tokens; `n_heads` is a multiple of
//! `n_kv_heads` and query head `h` reads K/V head `h / (n_heads / n_kv_heads)`.
//!
//! **Devices and dtypes**: on candle's CPU device, f32, f16 and bf16 (the crate's f32 CPU
//! attention, [`crate::cpu::attend`]); on CUDA (feature `candle-cuda`), f16 and bf16 with
//! head_dim in [`ATTEND_HEAD_DIMS`](crate::cuda::ATTEND_HEAD_DIMS), on the tensors' own
//! `CudaSlice`s and on the device's stream (`CudaDevice::cuda_stream()`), with no copies.
//!
//! **Checks**: before anything is read, written or launched: one device for every tensor of a
//! call (the same candle `Device`: on CUDA the same ordinal and stream), dtypes, ranks and
//! shapes, contiguity (row-major; any start offset, so a view of one layer of a larger tensor is
//! fine; strided tensors are refused, not honoured: call `.contiguous()`), every block id a
//! sequence uses and every slot inside the cache, and no cache written in place that shares
//! memory with another tensor of the call. A failure is a `candle_core::Error` carrying this
//! crate's [`crate::Error`] message with the numbers.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use paged_gqa::candle::{AttendOptions, PagedMetadata};
//!
//! let dev = Device::Cpu;
//! let (n_heads, n_kv_heads, head_dim, block_size) = (8, 2, 64, 16);
//! let k_cache = Tensor::zeros((4, block_size, n_kv_heads, head_dim), DType::F32, &dev)?;
//! let v_cache = Tensor::zeros((4, block_size, n_kv_heads, head_dim), DType::F32, &dev)?;
//!
//! // One step: a 5-token prompt in page 2.
//! let meta = PagedMetadata::new(
//!     &Tensor::new(&[[2u32]], &dev)?,      // block_tables [batch, max_blocks]
//!     &Tensor::new(&[5u32], &dev)?,        // context_lens [batch]
//!     Some(&Tensor::new(&[5u32], &dev)?),  // query_lens [batch]
//! )?;
//! let k = Tensor::randn(0f32, 1., (5, n_kv_heads, head_dim), &dev)?;
//! let v = Tensor::randn(0f32, 1., (5, n_kv_heads, head_dim), &dev)?;
//! let q = Tensor::randn(0f32, 1., (5, n_heads, head_dim), &dev)?;
//! meta.write_kv(&k, &v, &k_cache, &v_cache)?; // per layer
//! let (out, lse) = meta.attention(&q, &k_cache, &v_cache, &AttendOptions::default())?;
//! assert_eq!(out.dims(), &[5, n_heads, head_dim]);
//! # Ok::<(), candle_core::Error>(())
//! ```
//!
//! **cudarc and linking** (`candle-cuda`): candle-core 0.10.2 and 0.11 depend on cudarc 0.19
//! (0.19.4 and 0.19.10 at least), as this crate does, so one cudarc serves both and candle's
//! `CudaSlice`s and `Arc<CudaStream>` reach the kernels as they are. candle turns on cudarc's
//! `dynamic-linking`, which unifies with this crate's `fallback-dynamic-loading`: the binary
//! then links `libcuda` (and candle's cuBLAS, cuRAND, NVRTC) directly instead of loading the
//! driver at run time. candle-core's `cuda` feature builds candle-kernels with nvcc
//! (`CUDA_COMPUTE_CAP` must be set on a machine without a GPU), and cudarc's
//! `cuda-version-from-build-system` reads `nvcc --version`: cudarc 0.19.10 accepts toolkits
//! 11.4 to 13.4 (13.0 is what this repository installs), or set `CUDARC_CUDA_VERSION`.

mod attention;
mod cache;
#[cfg(feature = "candle-cuda")]
mod cuda;
mod metadata;
mod validate;
mod write;

pub use attention::paged_attention;
pub use cache::{CandleStepPlan, CandleStorage};
pub use metadata::PagedMetadata;
pub use write::{reshape_and_cache, write_kv};

/// The candle-core this crate was built against (its tensors are the ones the ops take).
pub use candle_core;

use candle_core::{CpuStorage, Layout};

use crate::dtype::Element;
use crate::error::{Error, Result};

/// The attention variants of [`paged_attention`] and [`PagedMetadata::attention`]: the crate's
/// [`AttendOptions`] (scale, causal, sliding window, soft-cap, sinks, ALiBi),
/// re-exported here.
///
/// ```
/// use paged_gqa::candle::AttendOptions;
/// let options = AttendOptions::new().with_scale(0.125).with_window_left(4095);
/// # let _ = options;
/// ```
pub use crate::variants::AttendOptions;

/// A `candle_core::Error` carrying this crate's error and its message.
impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// The element types the candle ops take, and their place in candle's CPU storage.
pub(crate) trait CandleElement: Element + Into<f32> + candle_core::WithDType {
    /// The storage's buffer, when it holds this type.
    fn vec_mut<'a>(storage: &'a mut CpuStorage, name: &'static str) -> Result<&'a mut Vec<Self>>;

    /// A CPU storage holding `values`.
    fn storage(values: Vec<Self>) -> CpuStorage;

    /// The `len` elements of a contiguous tensor from its storage and layout.
    fn slice<'a>(
        storage: &'a CpuStorage,
        layout: &Layout,
        name: &'static str,
        len: usize,
    ) -> Result<&'a [Self]> {
        let values = storage
            .as_slice::<Self>()
            .map_err(|_| wrong_storage::<Self>(name))?;
        let start = layout.start_offset();
        values.get(start..start + len).ok_or(Error::BufferLength {
            name,
            expected: start + len,
            actual: values.len(),
        })
    }
}

/// The error for a storage that does not hold `T` (the tensors were checked: never seen).
fn wrong_storage<T: Element>(name: &'static str) -> Error {
    Error::TensorDType {
        name,
        expected: format!("{:?}", T::DTYPE),
        actual: "another storage".into(),
    }
}

macro_rules! candle_element {
    ($t:ty, $variant:ident) => {
        impl CandleElement for $t {
            fn vec_mut<'a>(
                storage: &'a mut CpuStorage,
                name: &'static str,
            ) -> Result<&'a mut Vec<Self>> {
                match storage {
                    CpuStorage::$variant(values) => Ok(values),
                    _ => Err(wrong_storage::<Self>(name)),
                }
            }

            fn storage(values: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(values)
            }
        }
    };
}

candle_element!(f32, F32);
candle_element!(half::f16, F16);
candle_element!(half::bf16, BF16);
