//! The naive baseline and repeat_kv on the emulator.

use std::rc::Rc;

use crate::batch::SeqLens;
use crate::cache::PagedLayout;
use crate::dtype::Element;
use crate::error::Result;
use crate::launch::naive::NaiveState;
use crate::launch::{params, Backend, Launch};
use crate::shape::GqaShape;
use crate::sim::{SimBuffer, SimDevice};
use crate::variants::AttendOptions;

/// [`cuda::NaiveAttention`](crate::cuda::NaiveAttention) on the emulator: gather, repeat_kv,
/// per-head attention, with the real kernels.
pub struct NaiveAttention<T: Element> {
    state: NaiveState<Rc<SimDevice>, T>,
}

impl<T: Element> NaiveAttention<T> {
    /// Validates the tables and allocates the buffers.
    pub fn new(
        device: &Rc<SimDevice>,
        layout: PagedLayout,
        lens: &SeqLens,
        block_tables: &[i32],
        max_blocks: usize,
    ) -> Result<Self> {
        Ok(Self {
            state: NaiveState::new(device, layout, lens, block_tables, max_blocks)?,
        })
    }

    /// The whole naive path: gather, repeat_kv of K and V, per-head attention. `q`, `out`
    /// `[num_tokens, n_heads, head_dim]`; `k_cache`, `v_cache` one layer's pages; the attention
    /// variants of `options`.
    pub fn run(
        &mut self,
        device: &Rc<SimDevice>,
        k_cache: &SimBuffer<T>,
        v_cache: &SimBuffer<T>,
        q: &SimBuffer<T>,
        out: &mut SimBuffer<T>,
        options: &AttendOptions,
    ) -> Result<()> {
        self.state.gather(
            device,
            (k_cache.address_on("k_cache", device)?, k_cache.len()),
            (v_cache.address_on("v_cache", device)?, v_cache.len()),
        )?;
        self.state.repeat(device)?;
        self.state.attention(
            device,
            (q.address_on("q", device)?, q.len()),
            (out.address_on("out", device)?, out.len()),
            options,
        )
    }
}

/// [`cuda::repeat_kv`](crate::cuda::repeat_kv) on the emulator: `src` `[num_tokens,
/// n_kv_heads, head_dim]` to `dst` `[num_tokens, n_heads, head_dim]`.
pub fn repeat_kv<T: Element>(
    device: &Rc<SimDevice>,
    shape: GqaShape,
    num_tokens: usize,
    src: &SimBuffer<T>,
    dst: &mut SimBuffer<T>,
) -> Result<()> {
    let Some(params) = params::repeat_kv_params(
        shape,
        T::DTYPE,
        num_tokens,
        (src.address_on("src", device)?, src.len()),
        (dst.address_on("dst", device)?, dst.len()),
    )?
    else {
        return Ok(());
    };
    // SAFETY: lengths checked against the shape; both buffers are live on the device.
    unsafe { device.launch(Launch::RepeatKv(&params)) }
}
