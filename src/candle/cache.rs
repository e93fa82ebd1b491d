//! A [`PagedCache`] whose pages are one candle tensor: the crate keeps the bookkeeping
//! (sequences, blocks, copy-on-write), the engine passes and gets candle tensors.

use candle_core::{CpuStorage, Device, InplaceOp1, Layout, Tensor};

use crate::cache::{CacheConfig, PageStorage, PagedCache, StepPlan};
use crate::dtype::DType;
use crate::error::{Error, Result};

use super::metadata::PagedMetadata;
use super::validate;
use super::{AttendOptions, CandleElement};

/// Pages of every layer, K and V, in one candle tensor on the model's device:
/// `[num_layers, 2 (K, V), num_blocks, block_size, n_kv_heads, head_dim]`, so layer `l`'s K
/// and V caches are the views `pages.get(l)?.get(0)?` and `.get(1)?`
/// (`[num_blocks, block_size, n_kv_heads, head_dim]` each, see [`layer`](Self::layer)).
///
/// ```
/// use candle_core::{DType as CandleDType, Device, Tensor};
/// use paged_gqa::cache::{CacheConfig, PagedCache};
/// use paged_gqa::candle::{CandleStorage, AttendOptions};
/// use paged_gqa::{DType, GqaShape};
///
/// let dev = Device::Cpu;
/// let config = CacheConfig::new(GqaShape::new(8, 2, 64)?, 2, 16, DType::F32)?; // 2 layers
/// let mut cache = PagedCache::new(CandleStorage::new(config, 8, &dev)?)?;
/// let seq = cache.add_sequence();
/// let plan = cache.plan(&[(seq, 5)])?; // a 5-token prompt
/// for layer in 0..2 {
///     let k = Tensor::randn(0f32, 1., (5, 2, 64), &dev)?; // [new tokens, n_kv_heads, head_dim]
///     let v = Tensor::randn(0f32, 1., (5, 2, 64), &dev)?;
///     let q = Tensor::randn(0f32, 1., (5, 8, 64), &dev)?; // [new tokens, n_heads, head_dim]
///     cache.write(layer, &plan, &k, &v)?;
///     let (out, _lse) = cache.attend(layer, &plan, &q, &AttendOptions::default())?;
///     assert_eq!(out.dims(), &[5, 8, 64]);
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct CandleStorage {
    config: CacheConfig,
    num_blocks: usize,
    /// [num_layers, 2, num_blocks, block_size, n_kv_heads, head_dim]
    pages: Tensor,
}

impl CandleStorage {
    /// `num_blocks` zero-filled pages per tensor on `device`, in the config's dtype.
    pub fn new(config: CacheConfig, num_blocks: usize, device: &Device) -> Result<Self> {
        config.page_lens(num_blocks, config.dtype().size_bytes())?;
        crate::launch::params::check_cache_limits(&config, num_blocks)?;
        let shape = config.shape();
        let dims = (
            config.num_layers(),
            2,
            num_blocks,
            config.block_size(),
            shape.n_kv_heads(),
            shape.head_dim(),
        );
        // fp8 pages are not wired to candle tensors yet: the storage holds the compute dtype.
        if config.page_dtype() != config.dtype() {
            return Err(Error::UnsupportedDType {
                kernel: "candle cache storage (pages of the compute dtype only)",
                dtype: config.page_dtype(),
            });
        }
        let pages = Tensor::zeros(dims, validate::candle_dtype(config.dtype())?, device)
            .map_err(candle_error)?;
        Ok(Self {
            config,
            num_blocks,
            pages,
        })
    }

    /// The most pages that fit in `budget_bytes`.
    pub fn with_budget(config: CacheConfig, budget_bytes: u64, device: &Device) -> Result<Self> {
        Self::new(config, config.blocks_for_budget(budget_bytes)?, device)
    }

    /// All pages, `[num_layers, 2, num_blocks, block_size, n_kv_heads, head_dim]`.
    pub fn pages(&self) -> &Tensor {
        &self.pages
    }

    /// The device the pages are on.
    pub fn device(&self) -> &Device {
        self.pages.device()
    }

    /// Layer `layer`'s K and V caches, `[num_blocks, block_size, n_kv_heads, head_dim]` each:
    /// views of the pages (no copy), usable with the ops of [`crate::candle`].
    pub fn layer(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        let num_layers = self.config.num_layers();
        if layer >= num_layers {
            return Err(Error::LayerOutOfRange { layer, num_layers });
        }
        let pair = self.pages.get(layer).map_err(candle_error)?;
        Ok((
            pair.get(0).map_err(candle_error)?,
            pair.get(1).map_err(candle_error)?,
        ))
    }
}

fn candle_error(e: candle_core::Error) -> Error {
    Error::Candle(e.to_string())
}

/// A [`StepPlan`] with its [`PagedMetadata`], which every layer's write and attention use.
pub struct CandleStepPlan {
    plan: StepPlan,
    metadata: PagedMetadata,
}

impl CandleStepPlan {
    /// The step's tables as the candle ops take them (for an engine that calls
    /// [`PagedMetadata::attention`] on [`CandleStorage::layer`]'s views itself).
    pub fn metadata(&self) -> &PagedMetadata {
        &self.metadata
    }
}

impl AsRef<StepPlan> for CandleStepPlan {
    fn as_ref(&self) -> &StepPlan {
        &self.plan
    }
}

impl PageStorage for CandleStorage {
    type Plan = CandleStepPlan;

    fn config(&self) -> &CacheConfig {
        &self.config
    }

    fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Runs the copy-on-write block copies (one in-place op on the pages; on CUDA one upload of
    /// the pairs and one launch) and makes the step's metadata.
    fn prepare(&mut self, plan: StepPlan) -> Result<CandleStepPlan> {
        if !plan.block_copies().is_empty() {
            let op = CopyBlocks {
                config: self.config,
                num_blocks: self.num_blocks,
                block_copies: plan.block_copies(),
            };
            self.pages.inplace_op1(&op).map_err(candle_error)?;
        }
        let metadata =
            PagedMetadata::from_host(plan.lens().clone(), plan.block_tables(), plan.max_blocks())?;
        Ok(CandleStepPlan { plan, metadata })
    }
}

impl PagedCache<CandleStorage> {
    /// Writes the plan's new tokens of `layer`: `k`, `v` `[plan.num_new_tokens(), n_kv_heads,
    /// head_dim]` candle tensors on the cache's device and dtype, rows in batch order.
    pub fn write(
        &mut self,
        layer: usize,
        plan: &CandleStepPlan,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<()> {
        self.check(layer, plan)?;
        let (k_cache, v_cache) = self.storage().layer(layer)?;
        plan.metadata.write_kv(k, v, &k_cache, &v_cache)?;
        self.layer_written(layer, plan.as_ref());
        Ok(())
    }

    /// Fused GQA attention of `layer` for the plan's batch (decode tokens and prompt chunks
    /// alike; their K/V written first): `q` `[plan.num_new_tokens(), n_heads, head_dim]` on the
    /// cache's device and dtype. Returns `out` (`q`'s shape and dtype) and `lse`
    /// `[plan.num_new_tokens(), n_heads]` f32.
    pub fn attend(
        &self,
        layer: usize,
        plan: &CandleStepPlan,
        q: &Tensor,
        options: &AttendOptions,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        self.check(layer, plan)?;
        let (k_cache, v_cache) = self.storage().layer(layer)?;
        plan.metadata.attention(q, &k_cache, &v_cache, options)
    }
}

/// The copy-on-write copies of a step over every (layer, K or V) tensor of the pages.
struct CopyBlocks<'a> {
    pub config: CacheConfig,
    pub num_blocks: usize,
    /// [num_copies] (src block, dst block), made by the bookkeeping
    pub block_copies: &'a [[i32; 2]],
}

impl CopyBlocks<'_> {
    fn cpu<T: CandleElement>(&self, pages: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let block_len = self.config.block_size() * self.config.shape().kv_row_len();
        let tensor_len = block_len * self.num_blocks;
        let total = tensor_len * 2 * self.config.num_layers();
        let values = T::vec_mut(pages, "pages")?;
        let (start, actual) = (layout.start_offset(), values.len());
        let pages = values
            .get_mut(start..start + total)
            .ok_or(Error::BufferLength {
                name: "pages",
                expected: start + total,
                actual,
            })?;
        crate::cpu::copy_blocks(pages, tensor_len, block_len, self.block_copies);
        Ok(())
    }
}

impl InplaceOp1 for CopyBlocks<'_> {
    fn name(&self) -> &'static str {
        "paged-gqa-copy-blocks"
    }

    fn cpu_fwd(&self, pages: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        Ok(match self.config.dtype() {
            DType::F32 => self.cpu::<f32>(pages, layout),
            DType::F16 => self.cpu::<half::f16>(pages, layout),
            DType::BF16 => self.cpu::<half::bf16>(pages, layout),
            dtype @ (DType::F8E4M3 | DType::F8E5M2) => Err(crate::Error::UnsupportedDType {
                kernel: "candle copy_blocks",
                dtype,
            }),
        }?)
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        pages: &mut candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<()> {
        super::cuda::copy_blocks(
            &self.config,
            self.num_blocks,
            self.block_copies,
            pages,
            layout,
        )
    }
}
