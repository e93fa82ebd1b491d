//! Host views of K/V: contiguous per sequence, or paged. Both answer "the K (or V) row of
//! this sequence, position and K/V head", which is all the reference attention needs, and the
//! scales its stored values are read with (fp8 pages: see [`crate::fp8`]).

use crate::batch::SeqLens;
use crate::cache::{BlockTables, PagedLayout};
use crate::error::{Error, Result};
use crate::fp8::KvScales;
use crate::shape::GqaShape;
use crate::variants::KeyMask;

/// Where the reference attention reads K/V rows from. A row holds stored values: the value
/// of element `i` of K/V head `h`'s key row is `key(..)[i] * scales(h).0` (the value row's,
/// `value(..)[i] * scales(h).1`); the scales are 1 except for fp8 pages read under theirs.
pub trait KvSource<T> {
    /// The heads K/V are stored for.
    fn shape(&self) -> GqaShape;
    /// K row `[head_dim]` of position `pos` of sequence `seq`, K/V head `kv_head`.
    fn key(&self, seq: usize, pos: usize, kv_head: usize) -> &[T];
    /// V row `[head_dim]`, same indexing as [`key`](KvSource::key).
    fn value(&self, seq: usize, pos: usize, kv_head: usize) -> &[T];
    /// The lengths this source was validated for.
    fn lens(&self) -> &SeqLens;
    /// `(k_scale, v_scale)` of K/V head `kv_head`: the factors its stored values are read
    /// with. `(1, 1)` unless the source was given [`KvScales`].
    fn scales(&self, kv_head: usize) -> (f32, f32) {
        let _ = kv_head;
        (1.0, 1.0)
    }
    /// Checks that every key a query row sees under `mask` is stored (pages reclaimed by a
    /// sliding window are not).
    fn check_visible(&self, mask: KeyMask) -> Result<()> {
        let _ = mask;
        Ok(())
    }
}

/// K and V stored contiguously, sequences concatenated: `[total_keys, n_kv_heads, head_dim]`
/// where sequence `s` owns rows `sum(context_lens[..s]) ..` of length `context_lens[s]`.
#[derive(Debug, Clone)]
pub struct ContiguousKv<'a, T> {
    shape: GqaShape,
    lens: &'a SeqLens,
    /// [total_keys, n_kv_heads, head_dim]
    k: &'a [T],
    /// [total_keys, n_kv_heads, head_dim]
    v: &'a [T],
    /// First row of each sequence.
    key_starts: Vec<usize>,
    /// The stored values' scales, `[n_kv_heads]` for K and V (none: 1).
    scales: Option<&'a KvScales>,
}

impl<'a, T> ContiguousKv<'a, T> {
    /// Validates the lengths of `k` and `v` against `shape` and `lens`.
    pub fn new(shape: GqaShape, lens: &'a SeqLens, k: &'a [T], v: &'a [T]) -> Result<Self> {
        let expected = lens.total_keys() * shape.kv_row_len();
        Error::check_len("k", k.len(), expected)?;
        Error::check_len("v", v.len(), expected)?;
        let key_starts = lens
            .context_lens()
            .iter()
            .scan(0, |start, &len| {
                let this = *start;
                *start += len;
                Some(this)
            })
            .collect();
        Ok(Self {
            shape,
            lens,
            k,
            v,
            key_starts,
            scales: None,
        })
    }

    /// The same K/V read under `scales` (one K and one V scale per K/V head): stored fp8
    /// values, say. Errors: scales for another number of K/V heads.
    pub fn with_scales(mut self, scales: &'a KvScales) -> Result<Self> {
        scales.check_heads(self.shape.n_kv_heads())?;
        self.scales = Some(scales);
        Ok(self)
    }

    fn row(&self, data: &'a [T], seq: usize, pos: usize, kv_head: usize) -> &'a [T] {
        let d = self.shape.head_dim();
        let offset = ((self.key_starts[seq] + pos) * self.shape.n_kv_heads() + kv_head) * d;
        &data[offset..offset + d]
    }
}

impl<T> KvSource<T> for ContiguousKv<'_, T> {
    fn shape(&self) -> GqaShape {
        self.shape
    }
    fn key(&self, seq: usize, pos: usize, kv_head: usize) -> &[T] {
        self.row(self.k, seq, pos, kv_head)
    }
    fn value(&self, seq: usize, pos: usize, kv_head: usize) -> &[T] {
        self.row(self.v, seq, pos, kv_head)
    }
    fn lens(&self) -> &SeqLens {
        self.lens
    }
    fn scales(&self, kv_head: usize) -> (f32, f32) {
        self.scales
            .map_or((1.0, 1.0), |s| (s.k()[kv_head], s.v()[kv_head]))
    }
}

/// A paged K/V cache on the host, `[num_blocks, block_size, n_kv_heads, head_dim]` each, with
/// validated block tables; fp8 pages ([`Fp8E4M3`](crate::fp8::Fp8E4M3),
/// [`Fp8E5M2`](crate::fp8::Fp8E5M2)) come with their scales
/// ([`with_scales`](PagedKv::with_scales)).
#[derive(Debug, Clone)]
pub struct PagedKv<'a, T> {
    layout: PagedLayout,
    tables: BlockTables<'a>,
    lens: &'a SeqLens,
    /// [num_blocks, block_size, n_kv_heads, head_dim]
    k_cache: &'a [T],
    /// [num_blocks, block_size, n_kv_heads, head_dim]
    v_cache: &'a [T],
    /// The stored values' scales, `[n_kv_heads]` for K and V (none: 1).
    scales: Option<&'a KvScales>,
}

impl<'a, T> PagedKv<'a, T> {
    /// Validates the cache lengths against `layout`, and the block tables
    /// (`[lens.batch(), max_blocks]`) against `layout` and `lens`.
    pub fn new(
        layout: PagedLayout,
        lens: &'a SeqLens,
        block_tables: &'a [i32],
        max_blocks: usize,
        k_cache: &'a [T],
        v_cache: &'a [T],
    ) -> Result<Self> {
        Error::check_len("k_cache", k_cache.len(), layout.cache_len())?;
        Error::check_len("v_cache", v_cache.len(), layout.cache_len())?;
        let tables = BlockTables::new(block_tables, max_blocks, &layout, lens)?;
        Ok(Self {
            layout,
            tables,
            lens,
            k_cache,
            v_cache,
            scales: None,
        })
    }

    /// The same pages read under `scales` (one K and one V scale per K/V head): fp8 pages,
    /// whose stored value `x` of head `h` stands for `x * k_scale[h]` (V: `v_scale[h]`).
    /// Errors: scales for another number of K/V heads.
    pub fn with_scales(mut self, scales: &'a KvScales) -> Result<Self> {
        scales.check_heads(self.layout.shape().n_kv_heads())?;
        self.scales = Some(scales);
        Ok(self)
    }

    /// The scales the pages are read under, if any.
    pub fn kv_scales(&self) -> Option<&'a KvScales> {
        self.scales
    }

    /// The validated block tables.
    pub fn tables(&self) -> &BlockTables<'a> {
        &self.tables
    }

    /// The page geometry.
    pub fn layout(&self) -> PagedLayout {
        self.layout
    }

    fn row(&self, data: &'a [T], seq: usize, pos: usize, kv_head: usize) -> &'a [T] {
        let block_size = self.layout.block_size();
        let block = self.tables.block(seq, pos / block_size);
        let offset = self.layout.offset(block, pos % block_size, kv_head);
        &data[offset..offset + self.layout.shape().head_dim()]
    }
}

impl<T> KvSource<T> for PagedKv<'_, T> {
    fn shape(&self) -> GqaShape {
        self.layout.shape()
    }
    fn key(&self, seq: usize, pos: usize, kv_head: usize) -> &[T] {
        self.row(self.k_cache, seq, pos, kv_head)
    }
    fn value(&self, seq: usize, pos: usize, kv_head: usize) -> &[T] {
        self.row(self.v_cache, seq, pos, kv_head)
    }
    fn lens(&self) -> &SeqLens {
        self.lens
    }
    fn check_visible(&self, mask: KeyMask) -> Result<()> {
        self.tables.check_visible(self.lens, mask)
    }
    fn scales(&self, kv_head: usize) -> (f32, f32) {
        self.scales
            .map_or((1.0, 1.0), |s| (s.k()[kv_head], s.v()[kv_head]))
    }
}
