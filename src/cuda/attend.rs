//! Safe launchers of the fused paged attention (any mix of query lengths): the CUDA-core and
//! tensor-core kernels, each over the sequences the plan gives it, in one call.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::batch::SeqLens;
use crate::cache::{PagedCache, PagedLayout};
use crate::cuda::{check_built, CudaStepPlan, CudaStorage};
use crate::dtype::{DType, Element, PageElement};
use crate::error::Result;
use crate::fp8::{Fp8Element, KvScales};
use crate::launch::attend::{AttendState, UploadedScales};
use crate::launch::params::AttendTensors;
use crate::plan::{AttendSchedule, KernelChoice};
use crate::variants::AttendOptions;

/// An attention batch over pages the caller manages (replaying a case, tests): block tables,
/// lengths and the schedule validated on the host and uploaded once, the split workspace
/// allocated once; [`run`](AttendBatch::run) then only launches.
///
/// For a cache this crate manages, use `PagedCache::<CudaStorage<T>>::attend` instead.
pub struct AttendBatch {
    state: AttendState<Arc<CudaStream>>,
}

impl AttendBatch {
    /// Validates `block_tables` (`[lens.batch(), max_blocks]`) against `layout` and `lens`,
    /// plans the launch and uploads everything on `stream`.
    pub fn new(
        stream: &Arc<CudaStream>,
        layout: PagedLayout,
        dtype: DType,
        lens: &SeqLens,
        block_tables: &[i32],
        max_blocks: usize,
    ) -> Result<Self> {
        Self::with_kernels(
            stream,
            layout,
            dtype,
            lens,
            block_tables,
            max_blocks,
            KernelChoice::Auto,
        )
    }

    /// [`new`](AttendBatch::new) with the kernel choice made by the caller (tests, benchmarks:
    /// one kernel against the other). On a GPU older than sm_80 (or a build without sm_80 code)
    /// `Auto` runs CUDA cores only and `TensorCores` is [`Error::NoTensorCoreKernel`](crate::Error::NoTensorCoreKernel).
    pub fn with_kernels(
        stream: &Arc<CudaStream>,
        layout: PagedLayout,
        dtype: DType,
        lens: &SeqLens,
        block_tables: &[i32],
        max_blocks: usize,
        choice: KernelChoice,
    ) -> Result<Self> {
        check_built()?;
        let state = AttendState::new(
            stream,
            layout,
            dtype,
            lens,
            block_tables,
            max_blocks,
            choice,
        )?;
        Ok(Self { state })
    }

    /// The launch plan.
    pub fn schedule(&self) -> &AttendSchedule {
        &self.state.schedule
    }

    /// Attention: `q` `[num_tokens, n_heads, head_dim]`, `out` the same, `lse`
    /// `[num_tokens, n_heads]` (natural log); `k_cache`, `v_cache` one layer's
    /// `[num_blocks, block_size, n_kv_heads, head_dim]`; the variants of `options` (see
    /// [`crate::variants`]). `T` must be the dtype given to [`new`](AttendBatch::new).
    #[allow(clippy::too_many_arguments)]
    pub fn run<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        k_cache: &impl DevicePtr<T>,
        v_cache: &impl DevicePtr<T>,
        q: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        lse: &mut impl DevicePtrMut<f32>,
        options: &AttendOptions,
    ) -> Result<()> {
        self.launch(stream, k_cache, v_cache, None, q, out, lse, options)
    }

    /// [`run`](AttendBatch::run) over fp8 caches: `k_cache`, `v_cache` one layer's
    /// `[num_blocks, block_size, n_kv_heads, head_dim]` of stored fp8 values ([`Fp8E4M3`] or
    /// [`Fp8E5M2`]), read under `scales` (one K and one V scale per K/V head, uploaded on this
    /// stream once: [`DeviceKvScales::new`]); `q`, `out` of the dtype given to
    /// [`new`](AttendBatch::new). The result is attention over the dequantized K/V (see
    /// [`crate::fp8`]). Launches only, as [`run`](AttendBatch::run).
    ///
    /// [`Fp8E4M3`]: crate::fp8::Fp8E4M3
    /// [`Fp8E5M2`]: crate::fp8::Fp8E5M2
    #[allow(clippy::too_many_arguments)]
    pub fn run_fp8<T: Element, F: Fp8Element>(
        &self,
        stream: &Arc<CudaStream>,
        k_cache: &impl DevicePtr<F>,
        v_cache: &impl DevicePtr<F>,
        scales: &DeviceKvScales,
        q: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        lse: &mut impl DevicePtrMut<f32>,
        options: &AttendOptions,
    ) -> Result<()> {
        self.launch(stream, k_cache, v_cache, Some(scales), q, out, lse, options)
    }

    /// [`run`](AttendBatch::run) (no `scales`) and [`run_fp8`](AttendBatch::run_fp8): the
    /// caches' and tensors' device addresses, held for the launch.
    #[allow(clippy::too_many_arguments)]
    fn launch<T: Element, P: PageElement>(
        &self,
        stream: &Arc<CudaStream>,
        k_cache: &impl DevicePtr<P>,
        v_cache: &impl DevicePtr<P>,
        scales: Option<&DeviceKvScales>,
        q: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        lse: &mut impl DevicePtrMut<f32>,
        options: &AttendOptions,
    ) -> Result<()> {
        let (k_ptr, _k_sync) = k_cache.device_ptr(stream);
        let (v_ptr, _v_sync) = v_cache.device_ptr(stream);
        let (q_ptr, _q_sync) = q.device_ptr(stream);
        let (out_len, lse_len) = (out.len(), lse.len());
        let (out_ptr, _out_sync) = out.device_ptr_mut(stream);
        let (lse_ptr, _lse_sync) = lse.device_ptr_mut(stream);
        let tensors = AttendTensors {
            k_cache: k_ptr,
            v_cache: v_ptr,
            kv_dtype: P::PAGE_DTYPE,
            k_scale: 0,
            v_scale: 0,
            q: (q_ptr, q.len()),
            out: (out_ptr, out_len),
            lse: (lse_ptr, lse_len),
        };
        let cache_lens = (k_cache.len(), v_cache.len());
        match scales {
            None => self
                .state
                .run(stream, T::DTYPE, &tensors, cache_lens, options),
            Some(scales) => self.state.run_fp8(
                stream,
                T::DTYPE,
                tensors,
                cache_lens,
                &scales.uploaded,
                options,
            ),
        }
    }
}

/// fp8 scales on the GPU for [`AttendBatch::run_fp8`]: one K and one V scale per K/V head
/// (`[n_kv_heads]` f32 each), validated ([`KvScales`]) and uploaded once.
pub struct DeviceKvScales {
    uploaded: UploadedScales<Arc<CudaStream>>,
}

impl DeviceKvScales {
    /// Uploads `scales` on `stream` (the stream the batch runs on).
    pub fn new(stream: &Arc<CudaStream>, scales: &KvScales) -> Result<Self> {
        check_built()?;
        Ok(Self {
            uploaded: UploadedScales::new(stream, scales)?,
        })
    }

    /// The scales, as uploaded.
    pub fn scales(&self) -> &KvScales {
        &self.uploaded.scales
    }
}

impl<P: PageElement> PagedCache<CudaStorage<P>> {
    /// Fused GQA attention of `layer` for the plan's batch, any mix of decode tokens and prompt
    /// chunks (their K/V written with [`write`](PagedCache::write) first): `q`, `out`
    /// `[plan.num_new_tokens(), n_heads, head_dim]` of the compute dtype `T`
    /// ([`CacheConfig::dtype`](crate::cache::CacheConfig::dtype); fp8 pages are read under the
    /// layer's scales), `lse` `[plan.num_new_tokens(), n_heads]`
    /// f32 (natural log), on the cache's stream, with the variants of `options` (see
    /// [`crate::variants`]). Launches only: no allocation, no host synchronisation, so a step can
    /// be captured in a CUDA graph (with cudarc's event tracking off,
    /// `CudaContext::disable_event_tracking`, as any capture through cudarc needs, since its
    /// cross-stream waits would reach outside the capture). The exception: options with sinks
    /// or ALiBi slopes upload them (`n_heads` floats each) for the call.
    pub fn attend<T: Element>(
        &self,
        layer: usize,
        plan: &CudaStepPlan,
        q: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        lse: &mut impl DevicePtrMut<f32>,
        options: &AttendOptions,
    ) -> Result<()> {
        self.check(layer, plan)?;
        let pages = &self.storage().pages;
        let stream = &pages.backend;
        let (q_ptr, _q_sync) = q.device_ptr(stream);
        let (out_len, lse_len) = (out.len(), lse.len());
        let (out_ptr, _out_sync) = out.device_ptr_mut(stream);
        let (lse_ptr, _lse_sync) = lse.device_ptr_mut(stream);
        pages.attend(
            layer,
            plan,
            T::DTYPE,
            (q_ptr, q.len()),
            (out_ptr, out_len),
            (lse_ptr, lse_len),
            options,
        )
    }
}
