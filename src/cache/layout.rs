//! Page geometry of a paged K/V cache.

use crate::error::{Error, Result};
use crate::shape::GqaShape;

/// Geometry of one layer's K (or V) cache: `[num_blocks, block_size, n_kv_heads, head_dim]`,
/// row-major. Token slot `slot` of block `block` holds K/V head `kv_head` at element offset
/// [`offset(block, slot, kv_head)`](PagedLayout::offset).
///
/// ```
/// use paged_gqa::{GqaShape, PagedLayout};
/// let layout = PagedLayout::new(GqaShape::new(32, 8, 128)?, 1024, 16)?;
/// assert_eq!(layout.cache_len(), 1024 * 16 * 8 * 128);
/// assert_eq!(layout.offset(2, 3, 1), ((2 * 16 + 3) * 8 + 1) * 128);
/// # Ok::<(), paged_gqa::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedLayout {
    shape: GqaShape,
    num_blocks: usize,
    block_size: usize,
    /// Elements of one K (or V) cache tensor; checked not to overflow.
    cache_len: usize,
}

impl PagedLayout {
    /// Validates: `block_size > 0`, and the cache's element count fits in `usize` and `i64`.
    pub fn new(shape: GqaShape, num_blocks: usize, block_size: usize) -> Result<Self> {
        if block_size == 0 {
            return Err(Error::ZeroBlockSize);
        }
        let cache_len = (num_blocks as u128) * (block_size as u128) * (shape.kv_row_len() as u128);
        Error::check_at_most("cache elements", cache_len, i64::MAX as u128)?;
        Ok(Self {
            shape,
            num_blocks,
            block_size,
            cache_len: cache_len as usize,
        })
    }

    /// The heads this cache serves.
    pub fn shape(&self) -> GqaShape {
        self.shape
    }

    /// Pages in the cache.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Tokens per page.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Elements of one K (or V) cache tensor.
    pub fn cache_len(&self) -> usize {
        self.cache_len
    }

    /// Elements of one page: `block_size * n_kv_heads * head_dim`.
    pub fn block_len(&self) -> usize {
        self.block_size * self.shape.kv_row_len()
    }

    /// Element offset of `(block, slot, kv_head, 0)`.
    pub fn offset(&self, block: usize, slot: usize, kv_head: usize) -> usize {
        ((block * self.block_size + slot) * self.shape.n_kv_heads() + kv_head)
            * self.shape.head_dim()
    }
}
