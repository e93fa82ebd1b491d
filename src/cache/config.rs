//! What a cache holds: heads, layers, page size, compute and page element types, and the memory
//! arithmetic.

use crate::cache::PagedLayout;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shape::GqaShape;

/// Largest page size the kernels are built and tested for.
pub const MAX_BLOCK_SIZE: usize = 256;

/// The fixed geometry of a paged K/V cache for a whole model.
///
/// Every layer has a K and a V tensor `[num_blocks, block_size, n_kv_heads, head_dim]` of the
/// page dtype. Bytes per token = `2 * num_layers * n_kv_heads * head_dim * page dtype size`.
/// The compute dtype ([`dtype`](CacheConfig::dtype)) is that of the queries, outputs and new
/// K/V rows; the pages hold it too unless [`with_page_dtype`](CacheConfig::with_page_dtype)
/// chose fp8 (half the bytes of bf16).
///
/// ```
/// use paged_gqa::{cache::CacheConfig, DType, GqaShape};
/// // Llama-3-70B: 80 layers, 8 K/V heads of 128, bf16.
/// let config = CacheConfig::new(GqaShape::new(64, 8, 128)?, 80, 16, DType::BF16)?;
/// assert_eq!(config.bytes_per_token(), 2 * 80 * 8 * 128 * 2); // 320 KiB
/// let blocks = config.blocks_for_budget(40 << 30)?;
/// assert_eq!(blocks * 16, 131_072); // tokens that fit in 40 GiB
/// // The same model over fp8 pages: 160 KiB a token, twice the tokens.
/// let fp8 = config.with_page_dtype(DType::F8E4M3)?;
/// assert_eq!(fp8.bytes_per_token(), 2 * 80 * 8 * 128);
/// assert_eq!(fp8.blocks_for_budget(40 << 30)? * 16, 262_144);
/// # Ok::<(), paged_gqa::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    shape: GqaShape,
    num_layers: usize,
    block_size: usize,
    dtype: DType,
    page_dtype: DType,
    reclaim_window: Option<usize>,
    prefix_caching: bool,
}

impl CacheConfig {
    /// Validates: at least one layer, `block_size` a power of two from 1 to 256, a compute
    /// `dtype` that is not fp8 (fp8 is a page type:
    /// [`with_page_dtype`](CacheConfig::with_page_dtype)).
    pub fn new(
        shape: GqaShape,
        num_layers: usize,
        block_size: usize,
        dtype: DType,
    ) -> Result<Self> {
        if num_layers == 0 {
            return Err(Error::ZeroLayers);
        }
        if dtype.is_fp8() {
            return Err(Error::InvalidPageDType {
                dtype,
                page_dtype: dtype,
            });
        }
        if !block_size.is_power_of_two() || block_size > MAX_BLOCK_SIZE {
            return Err(Error::InvalidBlockSize { block_size });
        }
        Ok(Self {
            shape,
            num_layers,
            block_size,
            dtype,
            page_dtype: dtype,
            reclaim_window: None,
            prefix_caching: true,
        })
    }

    /// The pages' element type: the compute dtype (the default), or fp8 ([`DType::F8E4M3`],
    /// [`DType::F8E5M2`]) under an f16, bf16 or f32 compute dtype, K/V then stored under
    /// per-(layer, K/V head) scales (see [`crate::fp8`]). Errors:
    /// [`Error::InvalidPageDType`] for any other pair, [`Error::Fp8HeadDim`] for fp8 pages
    /// whose head_dim is not a multiple of 16.
    pub fn with_page_dtype(mut self, page_dtype: DType) -> Result<Self> {
        let fp8_under = matches!(self.dtype, DType::F16 | DType::BF16 | DType::F32);
        if page_dtype != self.dtype && !(page_dtype.is_fp8() && fp8_under) {
            return Err(Error::InvalidPageDType {
                dtype: self.dtype,
                page_dtype,
            });
        }
        if page_dtype.is_fp8() && self.shape.head_dim() % 16 != 0 {
            return Err(Error::Fp8HeadDim {
                head_dim: self.shape.head_dim(),
            });
        }
        self.page_dtype = page_dtype;
        Ok(self)
    }

    /// Declares that every layer attends with a sliding window of `window_left` (all of
    /// Mistral-7B-v0.1's: 4095): a [`PagedCache`](crate::cache::PagedCache) over storage of
    /// this configuration then gives pages back once the window cannot see them (see
    /// [`BlockManager::reclaiming`](crate::cache::BlockManager::reclaiming)). Models with any
    /// global layer (Gemma-2/3, gpt-oss) must not set it.
    pub fn with_reclaim_window(mut self, window_left: usize) -> Self {
        self.reclaim_window = Some(window_left);
        self
    }

    /// The window pages are reclaimed for, if any.
    pub fn reclaim_window(&self) -> Option<usize> {
        self.reclaim_window
    }

    /// Switches prefix caching on (the default) or off for a
    /// [`PagedCache`](crate::cache::PagedCache) over storage of this configuration: see
    /// [`PagedCache::add_sequence_with_prompt`](crate::cache::PagedCache::add_sequence_with_prompt).
    pub fn with_prefix_caching(mut self, enabled: bool) -> Self {
        self.prefix_caching = enabled;
        self
    }

    /// Whether prefix caching is on.
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    /// The attention heads the cache serves.
    pub fn shape(&self) -> GqaShape {
        self.shape
    }

    /// Layers of the model.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Tokens per page.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The compute dtype: that of the queries, outputs and new K/V rows (and of the pages,
    /// unless [`page_dtype`](CacheConfig::page_dtype) says fp8).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Element type of the pages: [`dtype`](CacheConfig::dtype), or an fp8 type.
    pub fn page_dtype(&self) -> DType {
        self.page_dtype
    }

    /// Bytes one token occupies over all layers, K and V (in the page dtype).
    pub fn bytes_per_token(&self) -> u64 {
        2 * self.num_layers as u64
            * self.shape.kv_row_len() as u64
            * self.page_dtype.size_bytes() as u64
    }

    /// Bytes one block occupies over all layers, K and V.
    pub fn bytes_per_block(&self) -> u64 {
        self.bytes_per_token() * self.block_size as u64
    }

    /// Element counts of a storage with `num_blocks` pages of `elem_bytes`-byte elements:
    /// one (layer, K or V) tensor, and all `2 * num_layers` of them. Errors: zero blocks, or a
    /// total that no allocation could hold.
    pub fn page_lens(&self, num_blocks: usize, elem_bytes: usize) -> Result<(usize, usize)> {
        if num_blocks == 0 {
            return Err(Error::ZeroBlocks);
        }
        let tensor_len = PagedLayout::new(self.shape, num_blocks, self.block_size)?.cache_len();
        let total = tensor_len as u128 * 2 * self.num_layers as u128;
        let limit = isize::MAX as u128 / elem_bytes.max(1) as u128;
        Error::check_at_most("cache elements", total, limit)?;
        Ok((tensor_len, total as usize))
    }

    /// The most blocks that fit in `budget_bytes`. Errors when not even one fits.
    pub fn blocks_for_budget(&self, budget_bytes: u64) -> Result<usize> {
        let blocks = budget_bytes / self.bytes_per_block();
        if blocks == 0 {
            return Err(Error::BudgetTooSmall {
                budget_bytes,
                block_bytes: self.bytes_per_block(),
            });
        }
        // Block ids travel as i32 in block tables.
        Ok(blocks.min(i32::MAX as u64) as usize)
    }
}
