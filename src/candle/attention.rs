//! `paged_attention`: fused GQA attention of a step's query rows over paged K/V caches, as a
//! candle op. The CPU path runs [`crate::cpu::attend`]; the CUDA path the crate's kernels.

use std::sync::Mutex;

use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};

use crate::cpu::PagedKv;
use crate::dtype::DType;
use crate::error::{Error, Result};

use super::metadata::{CheckedTables, PagedMetadata};
use super::validate::{self, Geometry};
use super::{AttendOptions, CandleElement};

/// Paged GQA attention, vLLM's `paged_attention` for any mix of decode and prefill rows.
///
/// - `q`: `[num_tokens, n_heads, head_dim]`, the new query rows of every sequence in batch
///   order (`num_tokens = sum(query_lens)`); f32, f16 or bf16 (f16 or bf16 on CUDA).
/// - `k_cache`, `v_cache`: `[num_blocks, block_size, n_kv_heads, head_dim]` each (NHD, the
///   layout of FlashAttention's and FlashInfer's paged caches; vLLM's 5-d
///   `[num_blocks, n_kv_heads, head_dim / x, block_size, x]` key layout is not supported),
///   `q`'s dtype, `n_heads % n_kv_heads == 0`, block_size a power of two up to 256.
/// - `block_tables`: `[batch, max_blocks]` u32 or i32; `context_lens`: `[batch]` keys per
///   sequence, new tokens included; `query_lens`: `[batch]` new rows per sequence (`None`:
///   decode, one each); u32, i32 or i64.
///
/// Returns `out` `[num_tokens, n_heads, head_dim]` in `q`'s dtype and `lse`
/// `[num_tokens, n_heads]` f32 (natural log of each row's softmax denominator; `-inf` for a
/// row that sees no key). Query head `h` reads K/V head `h / (n_heads / n_kv_heads)`.
///
/// Every tensor must be on one device and contiguous (a start offset is fine: a layer's view of
/// a larger cache tensor works). All checks run before anything is read or launched; each
/// failure is a `candle_core::Error` with the numbers. This builds a [`PagedMetadata`] per
/// call, which on CUDA reads the tables to the host and uploads them again: for the layers of
/// one step, build the metadata once and call [`PagedMetadata::attention`].
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use paged_gqa::candle::{paged_attention, AttendOptions};
///
/// let dev = Device::Cpu;
/// let (n_heads, n_kv_heads, head_dim) = (8, 2, 64);
/// let k_cache = Tensor::randn(0f32, 1., (4, 16, n_kv_heads, head_dim), &dev)?;
/// let v_cache = Tensor::randn(0f32, 1., (4, 16, n_kv_heads, head_dim), &dev)?;
/// let q = Tensor::randn(0f32, 1., (2, n_heads, head_dim), &dev)?; // two decode rows
/// let block_tables = Tensor::new(&[[3u32, 1], [0, 0]], &dev)?;
/// let context_lens = Tensor::new(&[20u32, 5], &dev)?;
/// let (out, lse) = paged_attention(
///     &q, &k_cache, &v_cache, &block_tables, &context_lens, None,
///     &AttendOptions::default(),
/// )?;
/// assert_eq!(out.dims(), &[2, n_heads, head_dim]);
/// assert_eq!(lse.dims(), &[2, n_heads]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_tables: &Tensor,
    context_lens: &Tensor,
    query_lens: Option<&Tensor>,
    options: &AttendOptions,
) -> candle_core::Result<(Tensor, Tensor)> {
    validate::same_device(block_tables, "block_tables", q, "q")?;
    let metadata = PagedMetadata::new(block_tables, context_lens, query_lens)?;
    metadata.attention(q, k_cache, v_cache, options)
}

impl PagedMetadata {
    /// Attention of this step's query rows at one layer: `q` `[num_tokens, n_heads,
    /// head_dim]` over `k_cache`, `v_cache` `[num_blocks, block_size, n_kv_heads, head_dim]`.
    /// Returns `out` (`q`'s shape and dtype) and `lse` `[num_tokens, n_heads]` f32. See
    /// [`paged_attention`] for the rules; on CUDA this only launches (the tables were uploaded
    /// by the first call of the step), with no host synchronisation.
    pub fn attention(
        &self,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        options: &AttendOptions,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let geometry = validate::attention(q, k_cache, v_cache)?;
        let (num_tokens, n_heads) = (q.dims()[0], geometry.shape.n_heads());
        if num_tokens != self.num_tokens() {
            Err(Error::TensorShape {
                name: "q",
                expected: format!(
                    "[{}, n_heads, head_dim] (num_tokens = the sum of query_lens)",
                    self.num_tokens()
                ),
                actual: q.dims().to_vec(),
            })?;
        }
        let tables = self.checked(&geometry.layout)?;
        let op = AttentionOp {
            geometry,
            metadata: self,
            tables: &tables,
            options,
            lse: Mutex::new(None),
        };
        let out = q.apply_op3_no_bwd(k_cache, v_cache, &op)?;
        let lse = op
            .lse
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .ok_or_else(|| candle_core::Error::msg("paged-attention: the op produced no lse"))?;
        let lse = Tensor::from_storage(lse, (num_tokens, n_heads), BackpropOp::none(), false);
        Ok((out, lse))
    }
}

/// The candle op: inputs (q, k_cache, v_cache), output `out`; `lse` comes back through
/// [`lse`](AttentionOp::lse).
struct AttentionOp<'a> {
    pub geometry: Geometry,
    pub metadata: &'a PagedMetadata,
    pub tables: &'a CheckedTables,
    pub options: &'a AttendOptions,
    /// `[num_tokens, n_heads]` f32, set by the forward pass.
    pub lse: Mutex<Option<Storage>>,
}

impl AttentionOp<'_> {
    fn set_lse(&self, lse: Storage) {
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
    }

    fn out_shape(&self) -> Shape {
        let shape = self.geometry.shape;
        Shape::from((
            self.metadata.num_tokens(),
            shape.n_heads(),
            shape.head_dim(),
        ))
    }

    fn cpu<T: CandleElement>(
        &self,
        q: (&CpuStorage, &Layout),
        k_cache: (&CpuStorage, &Layout),
        v_cache: (&CpuStorage, &Layout),
    ) -> Result<CpuStorage> {
        let layout = self.geometry.layout;
        let shape = layout.shape();
        let rows = self.metadata.num_tokens() * shape.n_heads();
        let q = T::slice(q.0, q.1, "q", rows * shape.head_dim())?;
        let k_cache = T::slice(k_cache.0, k_cache.1, "k_cache", layout.cache_len())?;
        let v_cache = T::slice(v_cache.0, v_cache.1, "v_cache", layout.cache_len())?;
        let kv = PagedKv::new(
            layout,
            self.metadata.lens(),
            &self.tables.block_tables,
            self.metadata.max_blocks(),
            k_cache,
            v_cache,
        )?;
        let mut out = vec![0.0f32; rows * shape.head_dim()];
        let mut lse = vec![0.0f32; rows];
        // The options reach the CPU attention here (and the kernels in cuda::attention).
        crate::cpu::attend(q, &kv, self.options, &mut out, &mut lse)?;
        self.set_lse(Storage::Cpu(CpuStorage::F32(lse)));
        Ok(T::storage(out.into_iter().map(T::from_f32).collect()))
    }
}

impl CustomOp3 for AttentionOp<'_> {
    fn name(&self) -> &'static str {
        "paged-gqa-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k_cache: &CpuStorage,
        k_layout: &Layout,
        v_cache: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let args = ((q, q_layout), (k_cache, k_layout), (v_cache, v_layout));
        let out = match self.geometry.dtype {
            DType::F32 => self.cpu::<f32>(args.0, args.1, args.2),
            DType::F16 => self.cpu::<half::f16>(args.0, args.1, args.2),
            DType::BF16 => self.cpu::<half::bf16>(args.0, args.1, args.2),
            dtype @ (DType::F8E4M3 | DType::F8E5M2) => Err(crate::Error::UnsupportedDType {
                kernel: "candle attention",
                dtype,
            }),
        }?;
        Ok((out, self.out_shape()))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_layout: &Layout,
        k_cache: &candle_core::CudaStorage,
        k_layout: &Layout,
        v_cache: &candle_core::CudaStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let args = super::cuda::AttentionArgs {
            layout: self.geometry.layout,
            dtype: self.geometry.dtype,
            lens: self.metadata.lens(),
            max_blocks: self.metadata.max_blocks(),
            block_tables: &self.tables.block_tables,
            reclaimed: &self.tables.reclaimed,
            uploads: &self.metadata.device,
            options: self.options,
        };
        let (out, lse) = super::cuda::attention(
            &args,
            (q, q_layout),
            (k_cache, k_layout),
            (v_cache, v_layout),
        )?;
        self.set_lse(Storage::Cuda(lse));
        Ok((out, self.out_shape()))
    }
}
