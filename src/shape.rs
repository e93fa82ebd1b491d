//! The shape of a GQA attention layer and the query-head to K/V-head mapping.

use crate::error::{Error, Result};

/// Head counts and head size of one attention layer.
///
/// `n_heads` query heads share `n_kv_heads` K/V heads in groups of
/// [`group()`](GqaShape::group) consecutive query heads: query head `h` reads K/V head
/// `h / group` (the `repeat_kv` semantics of the Llama reference code, not `h % n_kv_heads`).
///
/// ```
/// use paged_gqa::GqaShape;
/// let llama3_8b = GqaShape::new(32, 8, 128)?;
/// assert_eq!(llama3_8b.group(), 4);
/// assert_eq!(llama3_8b.kv_head(5)?, 1);
/// # Ok::<(), paged_gqa::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GqaShape {
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl GqaShape {
    /// Validates and builds a shape. Errors: a zero head count or head_dim, a head_dim that is
    /// not a multiple of 8, or `n_heads` not a multiple of `n_kv_heads`.
    pub fn new(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Result<Self> {
        if n_heads == 0 || n_kv_heads == 0 {
            return Err(Error::ZeroHeads {
                n_heads,
                n_kv_heads,
            });
        }
        if head_dim == 0 {
            return Err(Error::ZeroHeadDim);
        }
        if head_dim % 8 != 0 {
            return Err(Error::HeadDimNotMultipleOf8 { head_dim });
        }
        if n_heads % n_kv_heads != 0 {
            return Err(Error::HeadsNotDivisible {
                n_heads,
                n_kv_heads,
            });
        }
        Ok(Self {
            n_heads,
            n_kv_heads,
            head_dim,
        })
    }

    /// Number of query heads.
    pub fn n_heads(&self) -> usize {
        self.n_heads
    }

    /// Number of K/V heads.
    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_heads
    }

    /// Elements per head vector.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Query heads per K/V head (`n_rep` in the Llama code): `n_heads / n_kv_heads`.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// The K/V head that query head `q_head` reads: `q_head / group()`.
    pub fn kv_head(&self, q_head: usize) -> Result<usize> {
        if q_head >= self.n_heads {
            return Err(Error::QueryHeadOutOfRange {
                q_head,
                n_heads: self.n_heads,
            });
        }
        Ok(q_head / self.group())
    }

    /// The same heads with every K/V head materialised per query head (multi-head attention):
    /// the shape of K/V after `repeat_kv`.
    pub fn repeated(&self) -> Self {
        Self {
            n_kv_heads: self.n_heads,
            ..*self
        }
    }

    /// Elements of one token's query (or output) row: `n_heads * head_dim`.
    pub fn q_row_len(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Elements of one token's K (or V) row: `n_kv_heads * head_dim`.
    pub fn kv_row_len(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// The default softmax scale, `1 / sqrt(head_dim)`.
    pub fn default_scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }
}
