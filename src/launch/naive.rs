//! The naive GQA path the benchmarks compare against, on any backend, as an engine without
//! GQA-aware kernels runs it: gather the pages into contiguous K/V, materialise `repeat_kv`,
//! then attention with one K/V head per query head. Decode batches use the per-head decode
//! kernel (`baseline.cu`); prompts and chunks run this crate's attention kernels with the MHA
//! shape over the repeated K/V (each sequence padded to pages of 16 in the contiguous buffers).

use crate::batch::SeqLens;
use crate::cache::PagedLayout;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ffi;
use crate::launch::attend::AttendState;
use crate::launch::params::{self, check_aligned, to_i32, AttendTensors};
use crate::launch::{check_same, upload_nonempty, Backend, Launch};
use crate::plan::KernelChoice;
use crate::variants::AttendOptions;

/// Keys per page of the contiguous buffers when they are read as pages (prompts, chunks).
const NAIVE_PAGE: usize = 16;

/// The naive path's buffers for one batch.
pub(crate) struct NaiveState<B: Backend, T: Element> {
    pub layout: PagedLayout,
    pub lens: SeqLens,
    max_blocks: usize,
    /// The device and stream the buffers live on; every call must use it.
    backend: B,
    /// Rows of the contiguous buffers (every sequence padded to NAIVE_PAGE).
    keys: usize,
    /// Whether every sequence brings one query row: the per-head decode kernel serves the batch
    /// (unless attention variants need the MHA batch).
    decode_only: bool,
    /// The MHA attention batch over the repeated K/V, for prompts and chunks, and for decode with
    /// attention variants; `None` for a decode batch of a shape the attention kernels lack.
    mha: Option<AttendState<B>>,
    /// [num_tokens, n_heads] (the MHA batch's lse)
    lse: B::Buffer<f32>,
    block_tables: B::Buffer<i32>,
    context_lens: B::Buffer<i32>,
    /// [batch]: first row of each sequence in the contiguous buffers
    key_starts: B::Buffer<i64>,
    /// [keys, n_kv_heads, head_dim]
    k: B::Buffer<T>,
    v: B::Buffer<T>,
    /// [keys, n_heads, head_dim]
    k_repeated: B::Buffer<T>,
    v_repeated: B::Buffer<T>,
}

impl<B: Backend, T: Element> NaiveState<B, T> {
    /// Validates the tables against `layout` and `lens` and allocates every buffer.
    pub fn new(
        backend: &B,
        layout: PagedLayout,
        lens: &SeqLens,
        block_tables: &[i32],
        max_blocks: usize,
    ) -> Result<Self> {
        let reclaimed = params::check_tables(
            "naive attention",
            &layout,
            T::DTYPE,
            lens,
            block_tables,
            max_blocks,
        )?;
        // The gather copies every key: none may lie in a page a sliding window gave back.
        crate::cache::block_tables::check_reclaimed_invisible(
            &reclaimed,
            layout.block_size(),
            lens,
            crate::variants::KeyMask {
                causal: false,
                window_left: None,
            },
        )?;
        if layout.shape().head_dim() > 256 {
            return Err(Error::UnsupportedHeadDim {
                kernel: "naive decode",
                head_dim: layout.shape().head_dim(),
                supported: "up to 256",
            });
        }
        Error::check_at_most("batch (naive gather)", lens.batch() as u128, 65535)?;
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
        // The MHA batch serves prompts and chunks, and decode with attention variants (the per-head
        // decode kernel has only the scale).
        let decode_only = (0..lens.batch()).all(|s| lens.query_len(s) == 1);
        let mha = (|| {
            let mha_layout = PagedLayout::new(shape.repeated(), keys / NAIVE_PAGE, NAIVE_PAGE)?;
            let mha_max_blocks = pages.iter().copied().max().unwrap_or(0).max(1);
            let mut table = vec![-1i32; lens.batch() * mha_max_blocks];
            for (seq, (&n, &start)) in pages.iter().zip(&starts).enumerate() {
                let first = start as usize / NAIVE_PAGE;
                for (i, entry) in table[seq * mha_max_blocks..][..n].iter_mut().enumerate() {
                    *entry = (first + i) as i32;
                }
            }
            AttendState::new(
                backend,
                mha_layout,
                T::DTYPE,
                lens,
                &table,
                mha_max_blocks,
                KernelChoice::Auto,
            )
        })();
        // Decode batches keep the decode kernel when the attention kernels lack the shape.
        let mha = match mha {
            Ok(state) => Some(state),
            Err(_) if decode_only => None,
            Err(e) => return Err(e),
        };
        let lse_len = (lens.num_tokens() * shape.n_heads()).max(1);
        Ok(Self {
            layout,
            lens: lens.clone(),
            max_blocks,
            backend: backend.clone(),
            keys,
            decode_only,
            mha,
            lse: backend.alloc_zeros(lse_len)?,
            block_tables: upload_nonempty(backend, block_tables, -1)?,
            context_lens: upload_nonempty(backend, &lens.context_lens_i32(), 0)?,
            key_starts: upload_nonempty(backend, &starts, 0)?,
            k: backend.alloc_zeros(keys * shape.kv_row_len())?,
            v: backend.alloc_zeros(keys * shape.kv_row_len())?,
            k_repeated: backend.alloc_zeros(keys * shape.q_row_len())?,
            v_repeated: backend.alloc_zeros(keys * shape.q_row_len())?,
        })
    }

    /// Step 1: the pages of every sequence (`k_cache`, `v_cache`: `(address, elements)` of one
    /// layer) into the contiguous K/V buffers.
    pub fn gather(&self, backend: &B, k_cache: (u64, usize), v_cache: (u64, usize)) -> Result<()> {
        check_same("the naive batch", &self.backend, backend)?;
        Error::check_len("k_cache", k_cache.1, self.layout.cache_len())?;
        Error::check_len("v_cache", v_cache.1, self.layout.cache_len())?;
        check_aligned("k_cache", k_cache.0)?;
        check_aligned("v_cache", v_cache.0)?;
        let shape = self.layout.shape();
        let params = ffi::pgqa_gather_kv_params {
            k_cache: k_cache.0 as *const _,
            v_cache: v_cache.0 as *const _,
            block_tables: backend.address(&self.block_tables) as *const i32,
            context_lens: backend.address(&self.context_lens) as *const i32,
            key_starts: backend.address(&self.key_starts) as *const i64,
            k_out: backend.address(&self.k) as *mut _,
            v_out: backend.address(&self.v) as *mut _,
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
            dtype: params::dtype(T::DTYPE),
        };
        // SAFETY: tables validated against the layout and lengths in new(); the contiguous
        // buffers hold total_keys rows; the caches have the layout's length (checked).
        unsafe { backend.launch(Launch::GatherKv(&params)) }
    }

    /// Step 2: repeat_kv of the gathered K and V.
    pub fn repeat(&self, backend: &B) -> Result<()> {
        check_same("the naive batch", &self.backend, backend)?;
        let shape = self.layout.shape();
        for (src, dst) in [(&self.k, &self.k_repeated), (&self.v, &self.v_repeated)] {
            let params = params::repeat_kv_params(
                shape,
                T::DTYPE,
                self.keys,
                (backend.address(src), self.keys * shape.kv_row_len()),
                (backend.address(dst), self.keys * shape.q_row_len()),
            )?;
            if let Some(params) = params {
                // SAFETY: both buffers hold `keys` rows of their shapes (allocated in new()).
                unsafe { backend.launch(Launch::RepeatKv(&params))? };
            }
        }
        Ok(())
    }

    /// Step 3 alone (after gather and repeat_kv): per-head attention over the repeated K/V, with
    /// the variants of `options`; `q`, `out` `(address, elements)` `[num_tokens, n_heads,
    /// head_dim]`. Decode batches with plain options (a scale at most) run the per-head decode
    /// kernel, everything else the fused kernels with the MHA shape.
    pub fn attention(
        &self,
        backend: &B,
        q: (u64, usize),
        out: (u64, usize),
        options: &AttendOptions,
    ) -> Result<()> {
        options.validate(self.layout.shape())?;
        let plain = AttendOptions::new().with_scale_opt(options.scale());
        check_same("the naive batch", &self.backend, backend)?;
        let shape = self.layout.shape();
        let rows = self.lens.num_tokens() * shape.n_heads();
        Error::check_len("q", q.1, rows * shape.head_dim())?;
        Error::check_len("out", out.1, rows * shape.head_dim())?;
        let (k, v) = (
            backend.address(&self.k_repeated),
            backend.address(&self.v_repeated),
        );
        if !self.decode_only || *options != plain {
            let Some(mha) = &self.mha else {
                // The MHA shape has no attention kernel: say why, with the numbers.
                params::check_supported("naive attention with variants", shape, T::DTYPE)?;
                return Err(Error::Launch {
                    kernel: "naive attention with variants",
                    detail: "its MHA batch could not be made when the batch was".into(),
                });
            };
            let repeated_len = self.keys * shape.q_row_len();
            let tensors = AttendTensors {
                k_cache: k,
                v_cache: v,
                kv_dtype: T::DTYPE,
                k_scale: 0,
                v_scale: 0,
                q,
                out,
                lse: (backend.address(&self.lse), rows),
            };
            return mha.run(
                backend,
                T::DTYPE,
                &tensors,
                (repeated_len, repeated_len),
                options,
            );
        }
        let scale = options.scale_for(shape) as f32;
        let params = ffi::pgqa_naive_decode_params {
            q: q.0 as *const _,
            k: k as *const _,
            v: v as *const _,
            context_lens: backend.address(&self.context_lens) as *const i32,
            key_starts: backend.address(&self.key_starts) as *const i64,
            out: out.0 as *mut _,
            batch: to_i32("batch", self.lens.batch())?,
            n_heads: to_i32("n_heads", shape.n_heads())?,
            head_dim: to_i32("head_dim", shape.head_dim())?,
            scale,
            dtype: params::dtype(T::DTYPE),
        };
        // SAFETY: q and out have batch * n_heads rows (checked); the repeated buffers hold
        // total_keys rows of n_heads heads, and key_starts/context_lens index inside them.
        unsafe { backend.launch(Launch::NaiveDecode(&params)) }
    }
}
