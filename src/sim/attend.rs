//! The attention kernels on the emulator, over pages the caller manages.

use std::sync::Arc;

use crate::batch::SeqLens;
use crate::cache::{PagedCache, PagedLayout};
use crate::dtype::{DType, Element};
use crate::error::Result;
use crate::kernels::attend::AttendState;
use crate::kernels::params::AttendTensors;
use crate::plan::{AttendSchedule, KernelChoice};
use crate::sim::{SimBuffer, SimDevice, SimStepPlan, SimStorage};

/// [`cuda::AttendBatch`](crate::cuda::AttendBatch) on the emulator: tables validated and
/// uploaded once, then [`run`](AttendBatch::run) launches the real kernels.
pub struct AttendBatch {
    state: AttendState<Arc<SimDevice>>,
}

impl AttendBatch {
    /// Validates `block_tables` (`[lens.batch(), max_blocks]`) against `layout` and `lens`,
    /// plans the launch (for the emulated H200) and uploads everything.
    pub fn new(
        device: &Arc<SimDevice>,
        layout: PagedLayout,
        dtype: DType,
        lens: &SeqLens,
        block_tables: &[i32],
        max_blocks: usize,
    ) -> Result<Self> {
        Self::with_kernels(
            device,
            layout,
            dtype,
            lens,
            block_tables,
            max_blocks,
            KernelChoice::Auto,
        )
    }

    /// [`new`](AttendBatch::new) with the kernel choice made by the caller.
    pub fn with_kernels(
        device: &Arc<SimDevice>,
        layout: PagedLayout,
        dtype: DType,
        lens: &SeqLens,
        block_tables: &[i32],
        max_blocks: usize,
        choice: KernelChoice,
    ) -> Result<Self> {
        Ok(Self {
            state: AttendState::new(
                device,
                layout,
                dtype,
                lens,
                block_tables,
                max_blocks,
                choice,
            )?,
        })
    }

    /// The launch plan.
    pub fn schedule(&self) -> &AttendSchedule {
        &self.state.schedule
    }

    /// Attention: `q` `[num_tokens, n_heads, head_dim]`, `out` the same, `lse`
    /// `[num_tokens, n_heads]` (natural log); `k_cache`, `v_cache` one layer's
    /// `[num_blocks, block_size, n_kv_heads, head_dim]`. `scale` defaults to `1/sqrt(head_dim)`.
    #[allow(clippy::too_many_arguments)]
    pub fn run<T: Element>(
        &self,
        device: &Arc<SimDevice>,
        k_cache: &SimBuffer<T>,
        v_cache: &SimBuffer<T>,
        q: &SimBuffer<T>,
        out: &mut SimBuffer<T>,
        lse: &mut SimBuffer<f32>,
        scale: Option<f32>,
    ) -> Result<()> {
        let tensors = AttendTensors {
            k_cache: k_cache.address(),
            v_cache: v_cache.address(),
            q: (q.address(), q.len()),
            out: (out.address(), out.len()),
            lse: (lse.address(), lse.len()),
        };
        self.state.run(
            device,
            T::DTYPE,
            &tensors,
            (k_cache.len(), v_cache.len()),
            scale,
        )
    }
}

impl<T: Element> PagedCache<SimStorage<T>> {
    /// Fused GQA attention of `layer` for the plan's batch on the emulator: `q`, `out`
    /// `[plan.num_new_tokens(), n_heads, head_dim]`, `lse` `[plan.num_new_tokens(), n_heads]`
    /// (natural log).
    pub fn attend(
        &self,
        layer: usize,
        plan: &SimStepPlan,
        q: &SimBuffer<T>,
        out: &mut SimBuffer<T>,
        lse: &mut SimBuffer<f32>,
        scale: Option<f32>,
    ) -> Result<()> {
        self.check(layer, plan)?;
        self.storage().pages.attend(
            layer,
            plan,
            (q.address(), q.len()),
            (out.address(), out.len()),
            (lse.address(), lse.len()),
            scale,
        )
    }
}
