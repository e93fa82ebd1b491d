//! Safe launchers of the fused paged attention (any mix of query lengths): the CUDA-core and
//! tensor-core kernels, each over the sequences the plan gives it, in one call.

use std::sync::Arc;

use cudarc::driver::{sys, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::batch::SeqLens;
use crate::cache::{BlockTables, PagedCache, PagedLayout};
use crate::cuda::{check_aligned, launch, to_i32, CudaStepPlan, CudaStorage};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::ffi;
use crate::plan::{AttendSchedule, KernelChoice};
use crate::shape::GqaShape;

/// Head sizes the attention kernel is built for.
pub const ATTEND_HEAD_DIMS: [usize; 5] = [64, 80, 96, 128, 256];

/// Multiprocessors of the stream's device (the planner sizes splits from it).
pub(crate) fn sm_count(stream: &CudaStream) -> Result<usize> {
    let count = stream
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    Ok(count.max(1) as usize)
}

/// The tensor-core kernel was compiled with a body (some target architecture is sm_80+).
const TENSOR_CORES_BUILT: bool = cfg!(paged_gqa_mma);

/// `requested` as the stream's device can run it: the tensor-core kernel needs sm_80 or newer
/// (and a build for such a GPU), so there `Auto` means CUDA cores only and `TensorCores` is an
/// error.
pub(crate) fn device_kernels(stream: &CudaStream, requested: KernelChoice) -> Result<KernelChoice> {
    let context = stream.context();
    let major =
        context.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor =
        context.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let tensor_cores = major >= 8 && TENSOR_CORES_BUILT;
    match requested {
        KernelChoice::Auto if !tensor_cores => Ok(KernelChoice::CudaCores),
        KernelChoice::TensorCores if !tensor_cores => Err(Error::NoTensorCoreKernel {
            compute_capability: format!("{major}.{minor}"),
            built: TENSOR_CORES_BUILT,
        }),
        choice => Ok(choice),
    }
}

/// Checks that the attention kernel exists for this shape and element type.
pub(crate) fn check_supported(kernel: &'static str, shape: GqaShape, dtype: DType) -> Result<()> {
    if !ATTEND_HEAD_DIMS.contains(&shape.head_dim()) {
        return Err(Error::UnsupportedHeadDim {
            kernel,
            head_dim: shape.head_dim(),
            supported: "64, 80, 96, 128, 256",
        });
    }
    if dtype == DType::F32 {
        return Err(Error::UnsupportedDType { kernel, dtype });
    }
    Ok(())
}

/// The checks every caller-managed batch (`AttendBatch`, `NaiveAttention`) starts with: kernels
/// built, block tables valid for the layout and lengths, a kernel for this shape and dtype.
pub(crate) fn check_batch(
    kernel: &'static str,
    layout: &PagedLayout,
    dtype: DType,
    lens: &SeqLens,
    block_tables: &[i32],
    max_blocks: usize,
) -> Result<()> {
    if !crate::cuda::KERNELS_BUILT {
        return Err(crate::cuda::built_without_kernels());
    }
    BlockTables::new(block_tables, max_blocks, layout, lens)?;
    check_supported(kernel, layout.shape(), dtype)
}

/// `query_starts` `[batch + 1]` as the kernel reads them.
pub(crate) fn query_starts(lens: &SeqLens) -> Vec<i32> {
    (0..lens.batch())
        .map(|s| lens.query_rows(s).start as i32)
        .chain([lens.num_tokens() as i32])
        .collect()
}

/// Everything one launch needs besides the engine's tensors, already validated: the
/// schedule, and device addresses of the tables and the split workspace.
pub(crate) struct AttendTables<'a> {
    pub layout: PagedLayout,
    pub num_tokens: usize,
    pub max_blocks: usize,
    pub schedule: &'a AttendSchedule,
    /// [batch, max_blocks] i32
    pub block_tables: u64,
    /// [batch] i32
    pub context_lens: u64,
    /// [batch + 1] i32
    pub query_starts: u64,
    /// [num_work, 2] i32: the CUDA-core kernel's work items
    pub work: u64,
    /// [num_mma_work, 2] i32: the tensor-core kernel's work items
    pub mma_work: u64,
    /// [num_tokens, n_heads, num_splits, head_dim] f32 then [num_tokens, n_heads, num_splits] f32
    pub split_workspace: u64,
}

/// Checks the engine's tensors against the tables and launches (attention, then merge).
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_attend<T: Element>(
    stream: &CudaStream,
    tables: &AttendTables<'_>,
    k_cache: u64,
    v_cache: u64,
    q: &impl DevicePtr<T>,
    out: &mut impl DevicePtrMut<T>,
    lse: &mut impl DevicePtrMut<f32>,
    scale: Option<f32>,
) -> Result<()> {
    let shape = tables.layout.shape();
    let rows = tables.num_tokens * shape.n_heads();
    Error::check_len("q", q.len(), rows * shape.head_dim())?;
    Error::check_len("out", out.len(), rows * shape.head_dim())?;
    Error::check_len("lse", lse.len(), rows)?;
    let scale = scale.unwrap_or(shape.default_scale() as f32);
    if !scale.is_finite() {
        return Err(Error::InvalidScale {
            scale: scale as f64,
        });
    }
    let schedule = tables.schedule;
    if schedule.is_empty() {
        return Ok(());
    }
    let (q_ptr, _q_sync) = q.device_ptr(stream);
    let (out_ptr, _out_sync) = out.device_ptr_mut(stream);
    let (lse_ptr, _lse_sync) = lse.device_ptr_mut(stream);
    for (name, ptr) in [
        ("q", q_ptr),
        ("out", out_ptr),
        ("k_cache", k_cache),
        ("v_cache", v_cache),
    ] {
        check_aligned(name, ptr)?;
    }
    let partial_lse =
        tables.split_workspace + (rows * schedule.num_splits * shape.head_dim() * 4) as u64;
    let params = ffi::pgqa_attend_params {
        q: q_ptr as *const _,
        k_cache: k_cache as *const _,
        v_cache: v_cache as *const _,
        block_tables: tables.block_tables as *const i32,
        context_lens: tables.context_lens as *const i32,
        query_starts: tables.query_starts as *const i32,
        work: tables.work as *const i32,
        mma_work: tables.mma_work as *const i32,
        out: out_ptr as *mut _,
        lse: lse_ptr as *mut f32,
        partial_out: tables.split_workspace as *mut f32,
        partial_lse: partial_lse as *mut f32,
        num_work: to_i32("work items", schedule.cuda_cores.work.len())?,
        num_mma_work: to_i32("tensor-core work items", schedule.tensor_cores.work.len())?,
        num_tokens: to_i32("num_tokens", tables.num_tokens)?,
        n_heads: to_i32("n_heads", shape.n_heads())?,
        n_kv_heads: to_i32("n_kv_heads", shape.n_kv_heads())?,
        head_dim: to_i32("head_dim", shape.head_dim())?,
        block_size: to_i32("block_size", tables.layout.block_size())?,
        max_blocks: to_i32("max_blocks", tables.max_blocks)?,
        num_blocks: to_i32("num_blocks", tables.layout.num_blocks())?,
        tokens_per_work: to_i32("tokens_per_work", schedule.cuda_cores.tokens_per_work)?,
        mma_tokens_per_work: to_i32("mma_tokens_per_work", schedule.tensor_cores.tokens_per_work)?,
        num_splits: to_i32("num_splits", schedule.num_splits)?,
        keys_per_split: to_i32("keys_per_split", schedule.keys_per_split)?,
        scale,
        dtype: launch::dtype(T::DTYPE),
    };
    // SAFETY: q, out and lse have the lengths num_tokens implies (checked); the caches are one
    // layer's [num_blocks, block_size, n_kv_heads, head_dim] tensors; the block tables were
    // validated on the host against the same layout and lengths; query_starts and the work list
    // come from the same lengths; the split workspace holds workspace_floats of the schedule.
    unsafe { launch::attend(&params, stream) }
}

/// An attention batch over pages the caller manages (replaying a case, tests): block tables,
/// lengths and the schedule validated on the host and uploaded once, the split workspace
/// allocated once; [`run`](AttendBatch::run) then only launches.
///
/// For a cache this crate manages, use `PagedCache::<CudaStorage<T>>::attend` instead.
pub struct AttendBatch {
    layout: PagedLayout,
    num_tokens: usize,
    max_blocks: usize,
    schedule: AttendSchedule,
    /// [batch, max_blocks]
    block_tables: CudaSlice<i32>,
    /// [batch]
    context_lens: CudaSlice<i32>,
    /// [batch + 1]
    query_starts: CudaSlice<i32>,
    /// [num_work, 2]: the CUDA-core kernel's work items
    work: CudaSlice<i32>,
    /// [num_mma_work, 2]: the tensor-core kernel's work items
    mma_work: CudaSlice<i32>,
    /// partial outputs and lse of the splits
    workspace: CudaSlice<f32>,
}

/// Uploads `values`, or one `fill` element when empty (a zero-length allocation has no address).
pub(crate) fn upload<V: cudarc::driver::DeviceRepr + Copy>(
    stream: &Arc<CudaStream>,
    values: &[V],
    fill: V,
) -> Result<CudaSlice<V>> {
    let fill = [fill];
    Ok(stream.clone_htod(if values.is_empty() { &fill[..] } else { values })?)
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
    /// `Auto` runs CUDA cores only and `TensorCores` is [`Error::NoTensorCoreKernel`].
    pub fn with_kernels(
        stream: &Arc<CudaStream>,
        layout: PagedLayout,
        dtype: DType,
        lens: &SeqLens,
        block_tables: &[i32],
        max_blocks: usize,
        choice: KernelChoice,
    ) -> Result<Self> {
        check_batch("attention", &layout, dtype, lens, block_tables, max_blocks)?;
        let choice = device_kernels(stream, choice)?;
        let schedule =
            AttendSchedule::with_kernels(sm_count(stream)?, lens, layout.shape(), choice);
        let context_lens = lens.context_lens_i32();
        let floats = schedule
            .workspace_floats(lens.num_tokens(), layout.shape())
            .max(4);
        Ok(Self {
            layout,
            num_tokens: lens.num_tokens(),
            max_blocks,
            block_tables: upload(stream, block_tables, -1)?,
            context_lens: upload(stream, &context_lens, 0)?,
            query_starts: upload(stream, &query_starts(lens), 0)?,
            work: upload(stream, bytemuck::cast_slice(&schedule.cuda_cores.work), 0)?,
            mma_work: upload(stream, bytemuck::cast_slice(&schedule.tensor_cores.work), 0)?,
            workspace: stream.alloc_zeros::<f32>(floats)?,
            schedule,
        })
    }

    /// The launch plan.
    pub fn schedule(&self) -> &AttendSchedule {
        &self.schedule
    }

    /// Attention: `q` `[num_tokens, n_heads, head_dim]`, `out` the same, `lse`
    /// `[num_tokens, n_heads]` (natural log); `k_cache`, `v_cache` one layer's
    /// `[num_blocks, block_size, n_kv_heads, head_dim]`. `scale` defaults to `1/sqrt(head_dim)`.
    #[allow(clippy::too_many_arguments)]
    pub fn run<T: Element>(
        &self,
        stream: &CudaStream,
        k_cache: &impl DevicePtr<T>,
        v_cache: &impl DevicePtr<T>,
        q: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        lse: &mut impl DevicePtrMut<f32>,
        scale: Option<f32>,
    ) -> Result<()> {
        Error::check_len("k_cache", k_cache.len(), self.layout.cache_len())?;
        Error::check_len("v_cache", v_cache.len(), self.layout.cache_len())?;
        let (k_ptr, _k_sync) = k_cache.device_ptr(stream);
        let (v_ptr, _v_sync) = v_cache.device_ptr(stream);
        let (block_tables, _t) = self.block_tables.device_ptr(stream);
        let (context_lens, _c) = self.context_lens.device_ptr(stream);
        let (query_starts, _s) = self.query_starts.device_ptr(stream);
        let (work, _w) = self.work.device_ptr(stream);
        let (mma_work, _mw) = self.mma_work.device_ptr(stream);
        let (split_workspace, _ws) = self.workspace.device_ptr(stream);
        let tables = AttendTables {
            layout: self.layout,
            num_tokens: self.num_tokens,
            max_blocks: self.max_blocks,
            schedule: &self.schedule,
            block_tables,
            context_lens,
            query_starts,
            work,
            mma_work,
            split_workspace,
        };
        launch_attend(stream, &tables, k_ptr, v_ptr, q, out, lse, scale)
    }
}

impl<T: Element> PagedCache<CudaStorage<T>> {
    /// Fused GQA attention of `layer` for the plan's batch, any mix of decode tokens and prompt
    /// chunks (their K/V written with [`write`](PagedCache::write) first): `q`, `out`
    /// `[plan.num_new_tokens(), n_heads, head_dim]`, `lse` `[plan.num_new_tokens(), n_heads]`
    /// f32 (natural log), on the cache's stream. Launches only: no allocation, no host
    /// synchronisation, so a step can be captured in a CUDA graph (with cudarc's event tracking
    /// off, `CudaContext::disable_event_tracking`, as any capture through cudarc needs, since
    /// its cross-stream waits would reach outside the capture).
    pub fn attend(
        &self,
        layer: usize,
        plan: &CudaStepPlan,
        q: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        lse: &mut impl DevicePtrMut<f32>,
        scale: Option<f32>,
    ) -> Result<()> {
        self.check(layer, plan)?;
        check_supported("attention", self.config().shape(), T::DTYPE)?;
        let storage = self.storage();
        let (k_cache, v_cache, tables) = storage.attend_tables(layer, plan);
        launch_attend(
            storage.stream(),
            &tables,
            k_cache,
            v_cache,
            q,
            out,
            lse,
            scale,
        )
    }
}
