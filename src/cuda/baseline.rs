//! The naive GQA path on the GPU, the benchmarks' baseline: gather the pages, materialise
//! repeat_kv, per-head attention (kernels/baseline.cu and repeat_kv.cu).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::batch::SeqLens;
use crate::cache::PagedLayout;
use crate::cuda::attend::{check_batch, upload};
use crate::cuda::{check_aligned, launch, repeat_kv, to_i32};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ffi;

/// A decode batch run the naive way, with every buffer it needs allocated once: contiguous
/// K/V `[total_keys, n_kv_heads, head_dim]` and their repeat_kv copies
/// `[total_keys, n_heads, head_dim]`.
pub struct NaiveDecode<T: Element> {
    layout: PagedLayout,
    lens: SeqLens,
    max_blocks: usize,
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

impl<T: Element> NaiveDecode<T> {
    /// Validates the tables (one query row per sequence) and allocates the buffers.
    pub fn new(
        stream: &Arc<CudaStream>,
        layout: PagedLayout,
        lens: &SeqLens,
        block_tables: &[i32],
        max_blocks: usize,
    ) -> Result<Self> {
        check_batch(
            "naive decode",
            &layout,
            T::DTYPE,
            lens,
            block_tables,
            max_blocks,
        )?;
        if let Some(seq) = (0..lens.batch()).find(|&s| lens.query_len(s) != 1) {
            return Err(Error::NotDecode {
                seq,
                query_len: lens.query_len(seq),
            });
        }
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
        let keys = lens.total_keys().max(1);
        let starts: Vec<i64> = (0..lens.batch())
            .scan(0i64, |at, s| {
                let this = *at;
                *at += lens.context_len(s) as i64;
                Some(this)
            })
            .collect();
        let context_lens: Vec<i32> = lens.context_lens().iter().map(|&l| l as i32).collect();
        Ok(Self {
            layout,
            lens: lens.clone(),
            max_blocks,
            block_tables: upload(stream, block_tables, -1)?,
            context_lens: upload(stream, &context_lens, 0)?,
            key_starts: upload(stream, &starts, 0)?,
            k: stream.alloc_zeros(keys * shape.kv_row_len())?,
            v: stream.alloc_zeros(keys * shape.kv_row_len())?,
            k_repeated: stream.alloc_zeros(keys * shape.q_row_len())?,
            v_repeated: stream.alloc_zeros(keys * shape.q_row_len())?,
        })
    }

    /// The whole naive path: gather, repeat_kv of K and V, per-head decode. `q`, `out`
    /// `[batch, n_heads, head_dim]`; `k_cache`, `v_cache` one layer's pages.
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
        let (shape, keys) = (self.layout.shape(), self.lens.total_keys());
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
        &self,
        stream: &CudaStream,
        q: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        scale: Option<f32>,
    ) -> Result<()> {
        let shape = self.layout.shape();
        let rows = self.lens.batch() * shape.n_heads();
        Error::check_len("q", q.len(), rows * shape.head_dim())?;
        Error::check_len("out", out.len(), rows * shape.head_dim())?;
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
