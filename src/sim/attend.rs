//! The attention kernels on the emulator, over pages the caller manages.

use std::rc::Rc;

use crate::batch::SeqLens;
use crate::cache::{PagedCache, PagedLayout};
use crate::dtype::{DType, Element, PageElement};
use crate::error::Result;
use crate::fp8::{Fp8Element, KvScales};
use crate::launch::attend::{AttendState, UploadedScales};
use crate::launch::params::AttendTensors;
use crate::plan::{AttendSchedule, KernelChoice};
use crate::sim::{SimBuffer, SimDevice, SimStepPlan, SimStorage};
use crate::variants::AttendOptions;

/// [`cuda::AttendBatch`](crate::cuda::AttendBatch) on the emulator: tables validated and
/// uploaded once, then [`run`](AttendBatch::run) launches the real kernels.
pub struct AttendBatch {
    state: AttendState<Rc<SimDevice>>,
}

impl AttendBatch {
    /// Validates `block_tables` (`[lens.batch(), max_blocks]`) against `layout` and `lens`,
    /// plans the launch (for the emulated H200) and uploads everything.
    pub fn new(
        device: &Rc<SimDevice>,
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
        device: &Rc<SimDevice>,
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
    /// `[num_blocks, block_size, n_kv_heads, head_dim]`; the variants of `options` (see
    /// [`crate::variants`]).
    #[allow(clippy::too_many_arguments)]
    pub fn run<T: Element>(
        &self,
        device: &Rc<SimDevice>,
        k_cache: &SimBuffer<T>,
        v_cache: &SimBuffer<T>,
        q: &SimBuffer<T>,
        out: &mut SimBuffer<T>,
        lse: &mut SimBuffer<f32>,
        options: &AttendOptions,
    ) -> Result<()> {
        self.launch(device, k_cache, v_cache, None, q, out, lse, options)
    }

    /// [`run`](AttendBatch::run) over fp8 caches read under `scales` (see
    /// [`cuda::AttendBatch::run_fp8`](crate::cuda::AttendBatch::run_fp8)).
    #[allow(clippy::too_many_arguments)]
    pub fn run_fp8<T: Element, F: Fp8Element>(
        &self,
        device: &Rc<SimDevice>,
        k_cache: &SimBuffer<F>,
        v_cache: &SimBuffer<F>,
        scales: &DeviceKvScales,
        q: &SimBuffer<T>,
        out: &mut SimBuffer<T>,
        lse: &mut SimBuffer<f32>,
        options: &AttendOptions,
    ) -> Result<()> {
        self.launch(device, k_cache, v_cache, Some(scales), q, out, lse, options)
    }

    /// [`run`](AttendBatch::run) (no `scales`) and [`run_fp8`](AttendBatch::run_fp8).
    #[allow(clippy::too_many_arguments)]
    fn launch<T: Element, P: PageElement>(
        &self,
        device: &Rc<SimDevice>,
        k_cache: &SimBuffer<P>,
        v_cache: &SimBuffer<P>,
        scales: Option<&DeviceKvScales>,
        q: &SimBuffer<T>,
        out: &mut SimBuffer<T>,
        lse: &mut SimBuffer<f32>,
        options: &AttendOptions,
    ) -> Result<()> {
        let tensors = AttendTensors {
            k_cache: k_cache.address_on("k_cache", device)?,
            v_cache: v_cache.address_on("v_cache", device)?,
            kv_dtype: P::PAGE_DTYPE,
            k_scale: 0,
            v_scale: 0,
            q: (q.address_on("q", device)?, q.len()),
            out: (out.address_on("out", device)?, out.len()),
            lse: (lse.address_on("lse", device)?, lse.len()),
        };
        let cache_lens = (k_cache.len(), v_cache.len());
        match scales {
            None => self
                .state
                .run(device, T::DTYPE, &tensors, cache_lens, options),
            Some(scales) => self.state.run_fp8(
                device,
                T::DTYPE,
                tensors,
                cache_lens,
                &scales.uploaded,
                options,
            ),
        }
    }
}

/// [`cuda::DeviceKvScales`](crate::cuda::DeviceKvScales) on the emulator.
pub struct DeviceKvScales {
    uploaded: UploadedScales<Rc<SimDevice>>,
}

impl DeviceKvScales {
    /// Uploads `scales` to `device`.
    pub fn new(device: &Rc<SimDevice>, scales: &KvScales) -> Result<Self> {
        Ok(Self {
            uploaded: UploadedScales::new(device, scales)?,
        })
    }

    /// The scales, as uploaded.
    pub fn scales(&self) -> &KvScales {
        &self.uploaded.scales
    }
}

impl<P: PageElement> PagedCache<SimStorage<P>> {
    /// Fused GQA attention of `layer` for the plan's batch on the emulator: `q`, `out`
    /// `[plan.num_new_tokens(), n_heads, head_dim]` of the compute dtype `T` (fp8 pages read
    /// under the layer's scales), `lse` `[plan.num_new_tokens(), n_heads]` (natural log), with
    /// the variants of `options`.
    pub fn attend<T: Element>(
        &self,
        layer: usize,
        plan: &SimStepPlan,
        q: &SimBuffer<T>,
        out: &mut SimBuffer<T>,
        lse: &mut SimBuffer<f32>,
        options: &AttendOptions,
    ) -> Result<()> {
        self.check(layer, plan)?;
        let device = self.storage().device();
        self.storage().pages.attend(
            layer,
            plan,
            T::DTYPE,
            (q.address_on("q", device)?, q.len()),
            (out.address_on("out", device)?, out.len()),
            (lse.address_on("lse", device)?, lse.len()),
            options,
        )
    }
}
