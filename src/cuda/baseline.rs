//! The naive GQA path on the GPU, the benchmarks' baseline: gather the pages, materialise
//! repeat_kv, per-head attention (kernels/baseline.cu and repeat_kv.cu; for batches with more
//! than one query row per sequence, the attention kernels with every query head its own K/V
//! head).

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::batch::SeqLens;
use crate::cache::PagedLayout;
use crate::cuda::check_built;
use crate::dtype::Element;
use crate::error::Result;
use crate::launch::naive::NaiveState;
use crate::variants::AttendOptions;

/// A batch run the naive way, with every buffer it needs allocated once: contiguous K/V
/// `[keys, n_kv_heads, head_dim]` and their repeat_kv copies `[keys, n_heads, head_dim]`
/// (`keys`: each sequence's keys, each sequence starting at a multiple of 16 rows).
///
/// Step 3 is the per-head decode kernel when every sequence has one query row; otherwise
/// (prompts, chunks, speculation) it is this crate's attention over the repeated K/V with the
/// MHA shape (`GqaShape::repeated`): the same kernels, each K/V byte read once per query head.
pub struct NaiveAttention<T: Element> {
    state: NaiveState<Arc<CudaStream>, T>,
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
        check_built()?;
        Ok(Self {
            state: NaiveState::new(stream, layout, lens, block_tables, max_blocks)?,
        })
    }

    /// The whole naive path: gather, repeat_kv of K and V, per-head attention. `q`, `out`
    /// `[num_tokens, n_heads, head_dim]`; `k_cache`, `v_cache` one layer's pages; the attention
    /// variants of `options`.
    pub fn run(
        &mut self,
        stream: &Arc<CudaStream>,
        k_cache: &impl DevicePtr<T>,
        v_cache: &impl DevicePtr<T>,
        q: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        options: &AttendOptions,
    ) -> Result<()> {
        self.gather(stream, k_cache, v_cache)?;
        self.state.repeat(stream)?;
        self.attention(stream, q, out, options)
    }

    /// Step 1: the pages of every sequence into the contiguous K/V buffers.
    pub fn gather(
        &mut self,
        stream: &Arc<CudaStream>,
        k_cache: &impl DevicePtr<T>,
        v_cache: &impl DevicePtr<T>,
    ) -> Result<()> {
        let (k_ptr, _k) = k_cache.device_ptr(stream);
        let (v_ptr, _v) = v_cache.device_ptr(stream);
        self.state
            .gather(stream, (k_ptr, k_cache.len()), (v_ptr, v_cache.len()))
    }

    /// Step 3 alone (after gather and repeat_kv): per-head attention over the repeated K/V.
    pub fn attention(
        &mut self,
        stream: &Arc<CudaStream>,
        q: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        options: &AttendOptions,
    ) -> Result<()> {
        let (q_ptr, _q) = q.device_ptr(stream);
        let out_len = out.len();
        let (out_ptr, _o) = out.device_ptr_mut(stream);
        self.state
            .attention(stream, (q_ptr, q.len()), (out_ptr, out_len), options)
    }
}
