//! The naive GQA path on the GPU, the benchmarks' baseline: gather the pages, materialise
//! repeat_kv, per-head attention (kernels/baseline.cu and repeat_kv.cu; for batches with more
//! than one query row per sequence, the attention kernels with every query head its own K/V
//! head).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::batch::SeqLens;
use crate::cache::PagedLayout;
use crate::cuda::attend::{check_batch, upload, AttendBatch};
use crate::cuda::{check_aligned, launch, repeat_kv, to_i32};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ffi;

/// Sequences start at multiples of this many rows in the contiguous buffers, so that the
/// repeated K/V can also be read as pages of this size by the attention kernels.
const NAIVE_PAGE: usize = 16;

/// A batch run the naive way, with every buffer it needs allocated once: contiguous K/V
/// `[keys, n_kv_heads, head_dim]` and their repeat_kv copies `[keys, n_heads, head_dim]`
/// (`keys`: each sequence's keys, each sequence starting at a multiple of 16 rows).
///
/// Step 3 is the per-head decode kernel when every sequence has one query row; otherwise
/// (prompts, chunks, speculation) it is this crate's attention over the repeated K/V with the
/// MHA shape (`GqaShape::repeated`): the same kernels, each K/V byte read once per query head.
pub struct NaiveAttention<T: Element> {
    layout: PagedLayout,
    lens: SeqLens,
    max_blocks: usize,
    /// Rows of the contiguous buffers (sequences padded to NAIVE_PAGE rows).
    keys: usize,
    /// The attention over the repeated K/V read as pages, when not every query_len is 1.
    mha: Option<AttendBatch>,
    /// [num_tokens, n_heads]: the lse the attention kernels write (not part of the result)
    lse: CudaSlice<f32>,
    /// [batch, max_blocks]
    block_tables: CudaSlice<i32>,
    /// [batch]
    context_lens: CudaSlice<i32>,
    /// [batch]: first row of each sequence in the contiguous buffers
    key_starts: CudaSlice<i64>,
    /// [total_keys, n_kv_heads, head_dim]
    k: CudaSlice<T>,
    v: CudaSlice<T>,
    /// [total_keys, n_heads, head_dim]
    k_repeated: CudaSlice<T>,
    v_repeated: CudaSlice<T>,
}

impl<T: Element> NaiveAttention<T> {
    /// Validates the tables and allocates the buffers.
    pub fn new(
        stream: &Arc<CudaStream>,
        layout: PagedLayout,
        lens: &SeqLens,
        block_tables: &[i32],
        max_blocks: usize,
    ) -> Result<Self> {
        check_batch(
            "naive attention",
            &layout,
            T::DTYPE,
            lens,
            block_tables,
            max_blocks,
        )?;
        if layout.shape().head_dim() > 256 {
            return Err(Error::UnsupportedHeadDim {
                kernel: "naive decode",
                head_dim: layout.shape().head_dim(),
                supported: "up to 256",
            });
        }
        if lens.batch() > 65535 {
            return Err(Error::TooLarge {
                what: "batch (naive gather)",
                value: lens.batch() as u128,
                limit: 65535,
            });
        }
        let shape = layout.shape();
        let pages: Vec<usize> = (0..lens.batch())
            .map(|s| lens.context_len(s).div_ceil(NAIVE_PAGE))
            .collect();
        let starts: Vec<i64> = pages
            .iter()
            .scan(0i64, |at, &n| {
                let this = *at;
                *at += (n * NAIVE_PAGE) as i64;
                Some(this)
            })
            .collect();
        let keys = (pages.iter().sum::<usize>() * NAIVE_PAGE).max(NAIVE_PAGE);
        let context_lens = lens.context_lens_i32();
        let mha = if (0..lens.batch()).all(|s| lens.query_len(s) == 1) {
            None
        } else {
            // The repeated K/V as pages: sequence s owns pages starts[s] / 16 onwards.
            let mha_layout = PagedLayout::new(shape.repeated(), keys / NAIVE_PAGE, NAIVE_PAGE)?;
            let mha_max_blocks = pages.iter().copied().max().unwrap_or(0).max(1);
            let mut table = vec![-1i32; lens.batch() * mha_max_blocks];
            for (seq, (&n, &start)) in pages.iter().zip(&starts).enumerate() {
                let first = start as usize / NAIVE_PAGE;
                for (i, entry) in table[seq * mha_max_blocks..][..n].iter_mut().enumerate() {
                    *entry = (first + i) as i32;
                }
            }
            Some(AttendBatch::new(
                stream,
                mha_layout,
                T::DTYPE,
                lens,
                &table,
                mha_max_blocks,
            )?)
        };
        // The decode kernel writes no lse; the attention kernels need one per row.
        let lse_len = match mha {
            Some(_) => (lens.num_tokens() * shape.n_heads()).max(1),
            None => 1,
        };
        Ok(Self {
            layout,
            lens: lens.clone(),
            max_blocks,
            keys,
            mha,
            lse: stream.alloc_zeros(lse_len)?,
            block_tables: upload(stream, block_tables, -1)?,
            context_lens: upload(stream, &context_lens, 0)?,
            key_starts: upload(stream, &starts, 0)?,
            k: stream.alloc_zeros(keys * shape.kv_row_len())?,
            v: stream.alloc_zeros(keys * shape.kv_row_len())?,
            k_repeated: stream.alloc_zeros(keys * shape.q_row_len())?,
            v_repeated: stream.alloc_zeros(keys * shape.q_row_len())?,
        })
    }

    /// The whole naive path: gather, repeat_kv of K and V, per-head attention. `q`, `out`
    /// `[num_tokens, n_heads, head_dim]`; `k_cache`, `v_cache` one layer's pages.
    pub fn run(
        &mut self,
        stream: &CudaStream,
        k_cache: &impl DevicePtr<T>,
        v_cache: &impl DevicePtr<T>,
        q: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        scale: Option<f32>,
    ) -> Result<()> {
        self.gather(stream, k_cache, v_cache)?;
        let (shape, keys) = (self.layout.shape(), self.keys);
        repeat_kv(
            stream,
            shape,
            keys,
            &self.k.slice(..keys * shape.kv_row_len()),
            &mut self.k_repeated.slice_mut(..keys * shape.q_row_len()),
        )?;
        repeat_kv(
            stream,
            shape,
            keys,
            &self.v.slice(..keys * shape.kv_row_len()),
            &mut self.v_repeated.slice_mut(..keys * shape.q_row_len()),
        )?;
        self.attention(stream, q, out, scale)
    }

    /// Step 1: the pages of every sequence into the contiguous K/V buffers.
    pub fn gather(
        &mut self,
        stream: &CudaStream,
        k_cache: &impl DevicePtr<T>,
        v_cache: &impl DevicePtr<T>,
    ) -> Result<()> {
        Error::check_len("k_cache", k_cache.len(), self.layout.cache_len())?;
        Error::check_len("v_cache", v_cache.len(), self.layout.cache_len())?;
        let shape = self.layout.shape();
        let (k_ptr, _k) = k_cache.device_ptr(stream);
        let (v_ptr, _v) = v_cache.device_ptr(stream);
        check_aligned("k_cache", k_ptr)?;
        check_aligned("v_cache", v_ptr)?;
        let (tables, _t) = self.block_tables.device_ptr(stream);
        let (lens, _l) = self.context_lens.device_ptr(stream);
        let (starts, _s) = self.key_starts.device_ptr(stream);
        let (k_out, _ko) = self.k.device_ptr_mut(stream);
        let (v_out, _vo) = self.v.device_ptr_mut(stream);
        let params = ffi::pgqa_gather_kv_params {
            k_cache: k_ptr as *const _,
            v_cache: v_ptr as *const _,
            block_tables: tables as *const i32,
            context_lens: lens as *const i32,
            key_starts: starts as *const i64,
            k_out: k_out as *mut _,
            v_out: v_out as *mut _,
            batch: to_i32("batch", self.lens.batch())?,
            max_context_len: to_i32(
                "max_context_len",
                self.lens.context_lens().iter().copied().max().unwrap_or(0),
            )?,
            n_kv_heads: to_i32("n_kv_heads", shape.n_kv_heads())?,
            head_dim: to_i32("head_dim", shape.head_dim())?,
            block_size: to_i32("block_size", self.layout.block_size())?,
            max_blocks: to_i32("max_blocks", self.max_blocks)?,
            num_blocks: to_i32("num_blocks", self.layout.num_blocks())?,
            dtype: launch::dtype(T::DTYPE),
        };
        // SAFETY: tables validated against the layout and lengths in new(); the contiguous
        // buffers hold total_keys rows; the caches have the layout's length (checked).
        unsafe { launch::gather_kv(&params, stream) }
    }

    /// Step 3 alone (after gather and repeat_kv): per-head attention over the repeated K/V.
    pub fn attention(
        &mut self,
        stream: &CudaStream,
        q: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        scale: Option<f32>,
    ) -> Result<()> {
        let shape = self.layout.shape();
        let rows = self.lens.num_tokens() * shape.n_heads();
        Error::check_len("q", q.len(), rows * shape.head_dim())?;
        Error::check_len("out", out.len(), rows * shape.head_dim())?;
        if let Some(mha) = &self.mha {
            return mha.run(
                stream,
                &self.k_repeated,
                &self.v_repeated,
                q,
                out,
                &mut self.lse.slice_mut(..rows),
                scale,
            );
        }
        let scale = scale.unwrap_or(shape.default_scale() as f32);
        if !scale.is_finite() {
            return Err(Error::InvalidScale {
                scale: scale as f64,
            });
        }
        let (q_ptr, _q) = q.device_ptr(stream);
        let (out_ptr, _o) = out.device_ptr_mut(stream);
        let (k, _k) = self.k_repeated.device_ptr(stream);
        let (v, _v) = self.v_repeated.device_ptr(stream);
        let (lens, _l) = self.context_lens.device_ptr(stream);
        let (starts, _s) = self.key_starts.device_ptr(stream);
        let params = ffi::pgqa_naive_decode_params {
            q: q_ptr as *const _,
            k: k as *const _,
            v: v as *const _,
            context_lens: lens as *const i32,
            key_starts: starts as *const i64,
            out: out_ptr as *mut _,
            batch: to_i32("batch", self.lens.batch())?,
            n_heads: to_i32("n_heads", shape.n_heads())?,
            head_dim: to_i32("head_dim", shape.head_dim())?,
            scale,
            dtype: launch::dtype(T::DTYPE),
        };
        // SAFETY: q and out have batch * n_heads rows (checked); the repeated buffers hold
        // total_keys rows of n_heads heads, and key_starts/context_lens index inside them.
        unsafe { launch::naive_decode(&params, stream) }
    }
}
