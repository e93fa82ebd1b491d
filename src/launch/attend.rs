//! An attention batch over pages the caller manages, on any backend: block tables, lengths and
//! the schedule validated on the host and uploaded once, the split workspace allocated once;
//! each run then only launches.

use crate::batch::SeqLens;
use crate::cache::{block_tables::check_reclaimed_invisible, PagedLayout};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::fp8::KvScales;
use crate::launch::params::{self, AttendTables, AttendTensors, LaunchVariants};
use crate::launch::{check_same, upload_nonempty, Backend, Launch};
use crate::plan::{AttendSchedule, KernelChoice};
use crate::variants::AttendOptions;

/// The uploaded state of one attention batch.
pub(crate) struct AttendState<B: Backend> {
    pub layout: PagedLayout,
    pub dtype: DType,
    pub lens: SeqLens,
    /// [batch]: leading reclaimed (-1) pages of each sequence's table row
    pub reclaimed: Vec<usize>,
    pub max_blocks: usize,
    pub schedule: AttendSchedule,
    /// The device and stream the tables live on; every run must use it.
    backend: B,
    /// [batch, max_blocks]
    block_tables: B::Buffer<i32>,
    /// [batch]
    context_lens: B::Buffer<i32>,
    /// [batch + 1]
    query_starts: B::Buffer<i32>,
    /// [num_work, 2]: the CUDA-core kernel's work items
    work: B::Buffer<i32>,
    /// [num_mma_work, 2]: the tensor-core kernel's work items (wide layout)
    mma_work: B::Buffer<i32>,
    /// [num_narrow_work, 2]: the tensor-core kernel's work items (narrow layout)
    narrow_work: B::Buffer<i32>,
    /// partial outputs and lse of the splits
    workspace: B::Buffer<f32>,
}

impl<B: Backend> AttendState<B> {
    /// Validates `block_tables` (`[lens.batch(), max_blocks]`) against `layout` and `lens`, plans
    /// the launch for `choice` (as the device can run it) and uploads everything.
    pub fn new(
        backend: &B,
        layout: PagedLayout,
        dtype: DType,
        lens: &SeqLens,
        block_tables: &[i32],
        max_blocks: usize,
        choice: KernelChoice,
    ) -> Result<Self> {
        let reclaimed =
            params::check_tables("attention", &layout, dtype, lens, block_tables, max_blocks)?;
        let choice = backend.kernels(choice)?;
        let schedule =
            AttendSchedule::with_kernels(backend.sm_count()?, lens, layout.shape(), choice);
        let floats = schedule
            .workspace_floats(lens.num_tokens(), layout.shape())
            .max(4);
        Ok(Self {
            layout,
            dtype,
            lens: lens.clone(),
            reclaimed,
            max_blocks,
            block_tables: upload_nonempty(backend, block_tables, -1)?,
            context_lens: upload_nonempty(backend, &lens.context_lens_i32(), 0)?,
            query_starts: upload_nonempty(backend, &params::query_starts(lens), 0)?,
            work: upload_nonempty(backend, bytemuck::cast_slice(&schedule.cuda_cores.work), 0)?,
            mma_work: upload_nonempty(
                backend,
                bytemuck::cast_slice(&schedule.tensor_cores.work),
                0,
            )?,
            narrow_work: upload_nonempty(
                backend,
                bytemuck::cast_slice(&schedule.narrow_tensor_cores.work),
                0,
            )?,
            workspace: backend.alloc_zeros::<f32>(floats)?,
            schedule,
            backend: backend.clone(),
        })
    }

    /// Attention over `tensors` (the caches checked to be one layer of the layout).
    pub fn run(
        &self,
        backend: &B,
        dtype: DType,
        tensors: &AttendTensors,
        cache_lens: (usize, usize),
        options: &AttendOptions,
    ) -> Result<()> {
        check_same("the attention batch", &self.backend, backend)?;
        Error::check_len("k_cache", cache_lens.0, self.layout.cache_len())?;
        Error::check_len("v_cache", cache_lens.1, self.layout.cache_len())?;
        if dtype != self.dtype {
            return Err(Error::DTypeMismatch {
                expected: self.dtype,
                actual: dtype,
            });
        }
        let tables = AttendTables {
            layout: self.layout,
            lens: &self.lens,
            reclaimed: &self.reclaimed,
            max_blocks: self.max_blocks,
            schedule: &self.schedule,
            block_tables: backend.address(&self.block_tables),
            context_lens: backend.address(&self.context_lens),
            query_starts: backend.address(&self.query_starts),
            work: backend.address(&self.work),
            mma_work: backend.address(&self.mma_work),
            narrow_work: backend.address(&self.narrow_work),
            split_workspace: backend.address(&self.workspace),
        };
        launch_attend(backend, &tables, tensors, dtype, options)
    }

    /// [`run`](Self::run) over fp8 caches (`tensors.kv_dtype`) read under `scales` (one K and
    /// one V scale per K/V head, on this backend).
    pub fn run_fp8(
        &self,
        backend: &B,
        dtype: DType,
        tensors: AttendTensors,
        cache_lens: (usize, usize),
        scales: &UploadedScales<B>,
        options: &AttendOptions,
    ) -> Result<()> {
        check_same("the fp8 scales", &scales.backend, backend)?;
        scales
            .scales
            .check_heads(self.layout.shape().n_kv_heads())?;
        if !tensors.kv_dtype.is_fp8() {
            return Err(Error::InvalidPageDType {
                dtype,
                page_dtype: tensors.kv_dtype,
            });
        }
        let (k_scale, v_scale) = scales.addresses();
        let tensors = AttendTensors {
            k_scale,
            v_scale,
            ..tensors
        };
        self.run(backend, dtype, &tensors, cache_lens, options)
    }
}

/// fp8 scales in a backend's memory: `[2 (K, V), n_kv_heads]` f32, validated on the host
/// ([`KvScales`]) and uploaded once.
pub(crate) struct UploadedScales<B: Backend> {
    pub scales: KvScales,
    buffer: B::Buffer<f32>,
    backend: B,
}

impl<B: Backend> UploadedScales<B> {
    /// Uploads `scales`.
    pub fn new(backend: &B, scales: &KvScales) -> Result<Self> {
        Ok(Self {
            buffer: backend.upload(&scales.concat())?,
            scales: scales.clone(),
            backend: backend.clone(),
        })
    }

    /// Device addresses of the K scales and of the V scales.
    pub fn addresses(&self) -> (u64, u64) {
        let k = self.backend.address(&self.buffer);
        (k, k + (4 * self.scales.n_kv_heads()) as u64)
    }
}

/// Checks the options and the engine's tensors against the tables and launches (attention,
/// then merge). Sinks and ALiBi slopes, when the options have them, are uploaded for this
/// launch (`n_heads` floats each); nothing is uploaded without them. fp8 caches carry their
/// scales' addresses in `tensors`.
pub(crate) fn launch_attend<B: Backend>(
    backend: &B,
    tables: &AttendTables<'_>,
    tensors: &AttendTensors,
    dtype: DType,
    options: &AttendOptions,
) -> Result<()> {
    let shape = tables.layout.shape();
    options.validate(shape)?;
    let mask = options.mask();
    check_reclaimed_invisible(
        tables.reclaimed,
        tables.layout.block_size(),
        tables.lens,
        mask,
    )?;
    let splits = tables.schedule.splits(tables.lens, mask);
    let upload = |values: Option<&[f32]>| values.map(|v| backend.upload(v)).transpose();
    let (sinks, slopes) = (upload(options.sinks())?, upload(options.alibi_slopes())?);
    let address =
        |buffer: &Option<B::Buffer<f32>>| buffer.as_ref().map_or(0, |b| backend.address(b));
    let variants = LaunchVariants::new(options, shape, splits, address(&sinks), address(&slopes))?;
    let Some(params) = params::attend_params(tables, tensors, dtype, &variants)? else {
        return Ok(());
    };
    // SAFETY: q, out and lse have the lengths num_tokens implies (checked); the caches are one
    // layer's [num_blocks, block_size, n_kv_heads, head_dim] tensors; the block tables were
    // validated on the host against the same layout and lengths, and no row sees a reclaimed
    // page under this mask (checked); query_starts and the work list come from the same
    // lengths; the split workspace holds workspace_floats of the schedule, which bounds the
    // splits of any mask; sinks and slopes hold n_heads floats (validated) and are freed in
    // stream order after the launch; fp8 caches come with n_kv_heads K and V scales each
    // (their callers checked or made them).
    unsafe { backend.launch(Launch::Attend(&params)) }
}
