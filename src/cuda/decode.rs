//! Safe launchers of the fused paged decode kernel.

use std::sync::Arc;

use cudarc::driver::{sys, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::batch::SeqLens;
use crate::cache::{BlockTables, PagedCache, PagedLayout};
use crate::cuda::{check_aligned, launch, to_i32, CudaStepPlan, CudaStorage};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::ffi;
use crate::plan::DecodeSchedule;
use crate::shape::GqaShape;

/// Head sizes the decode kernel is built for.
pub const DECODE_HEAD_DIMS: [usize; 5] = [64, 80, 96, 128, 256];

/// Multiprocessors of the stream's device (the planner sizes splits from it).
pub(crate) fn sm_count(stream: &CudaStream) -> Result<usize> {
    let count = stream
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    Ok(count.max(1) as usize)
}

/// Checks that the decode kernel exists for this shape and element type, and that every
/// sequence brings exactly one query row.
pub(crate) fn check_decodable(shape: GqaShape, dtype: DType, lens: &SeqLens) -> Result<()> {
    if !DECODE_HEAD_DIMS.contains(&shape.head_dim()) {
        return Err(Error::UnsupportedHeadDim {
            kernel: "decode",
            head_dim: shape.head_dim(),
            supported: "64, 80, 96, 128, 256",
        });
    }
    if dtype == DType::F32 {
        return Err(Error::UnsupportedDType {
            kernel: "decode",
            dtype,
        });
    }
    if let Some(seq) = (0..lens.batch()).find(|&s| lens.query_len(s) != 1) {
        return Err(Error::NotDecode {
            seq,
            query_len: lens.query_len(seq),
        });
    }
    Ok(())
}

/// Everything one decode launch needs besides the engine's tensors, already validated:
/// device addresses of the tables and the split workspace.
pub(crate) struct DecodeTables {
    pub layout: PagedLayout,
    pub batch: usize,
    pub max_blocks: usize,
    pub schedule: DecodeSchedule,
    /// [batch, max_blocks] i32
    pub block_tables: u64,
    /// [batch] i32
    pub context_lens: u64,
    /// [batch, n_heads, num_splits, head_dim] f32 then [batch, n_heads, num_splits] f32
    pub split_workspace: u64,
}

/// Checks the engine's tensors against the tables and launches (decode, then merge).
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_decode<T: Element>(
    stream: &CudaStream,
    tables: &DecodeTables,
    k_cache: u64,
    v_cache: u64,
    q: &impl DevicePtr<T>,
    out: &mut impl DevicePtrMut<T>,
    lse: &mut impl DevicePtrMut<f32>,
    scale: Option<f32>,
) -> Result<()> {
    let shape = tables.layout.shape();
    let rows = tables.batch * shape.n_heads();
    Error::check_len("q", q.len(), rows * shape.head_dim())?;
    Error::check_len("out", out.len(), rows * shape.head_dim())?;
    Error::check_len("lse", lse.len(), rows)?;
    let scale = scale.unwrap_or(shape.default_scale() as f32);
    if !scale.is_finite() {
        return Err(Error::InvalidScale {
            scale: scale as f64,
        });
    }
    if tables.batch == 0 {
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
    let schedule = tables.schedule;
    let partial_lse =
        tables.split_workspace + (rows * schedule.num_splits * shape.head_dim() * 4) as u64;
    let params = ffi::pgqa_decode_params {
        q: q_ptr as *const _,
        k_cache: k_cache as *const _,
        v_cache: v_cache as *const _,
        block_tables: tables.block_tables as *const i32,
        context_lens: tables.context_lens as *const i32,
        out: out_ptr as *mut _,
        lse: lse_ptr as *mut f32,
        partial_out: tables.split_workspace as *mut f32,
        partial_lse: partial_lse as *mut f32,
        batch: to_i32("batch", tables.batch)?,
        n_heads: to_i32("n_heads", shape.n_heads())?,
        n_kv_heads: to_i32("n_kv_heads", shape.n_kv_heads())?,
        head_dim: to_i32("head_dim", shape.head_dim())?,
        block_size: to_i32("block_size", tables.layout.block_size())?,
        max_blocks: to_i32("max_blocks", tables.max_blocks)?,
        num_blocks: to_i32("num_blocks", tables.layout.num_blocks())?,
        num_splits: to_i32("num_splits", schedule.num_splits)?,
        keys_per_split: to_i32("keys_per_split", schedule.keys_per_split)?,
        scale,
        dtype: launch::dtype(T::DTYPE),
    };
    // SAFETY: q, out and lse have the lengths the tables' batch implies (checked); the caches
    // are one layer's [num_blocks, block_size, n_kv_heads, head_dim] tensors; the block tables
    // were validated on the host against the same layout and context lengths, and cover every
    // key; the split workspace holds workspace_floats of the same schedule.
    unsafe { launch::decode(&params, stream) }
}

/// A decode batch over pages the caller manages (replaying a case, tests): block tables and
/// context lengths validated on the host and uploaded once, the split workspace allocated
/// once; [`run`](DecodeBatch::run) then only launches.
///
/// For a cache this crate manages, use `PagedCache::<CudaStorage<T>>::decode` instead.
pub struct DecodeBatch {
    layout: PagedLayout,
    batch: usize,
    max_blocks: usize,
    schedule: DecodeSchedule,
    /// [batch, max_blocks]
    block_tables: CudaSlice<i32>,
    /// [batch]
    context_lens: CudaSlice<i32>,
    /// partial outputs and lse of the splits
    workspace: CudaSlice<f32>,
}

impl DecodeBatch {
    /// Validates `block_tables` (`[lens.batch(), max_blocks]`) against `layout` and `lens`
    /// (one query row per sequence) and uploads them on `stream`.
    pub fn new(
        stream: &Arc<CudaStream>,
        layout: PagedLayout,
        dtype: DType,
        lens: &SeqLens,
        block_tables: &[i32],
        max_blocks: usize,
    ) -> Result<Self> {
        if !crate::cuda::KERNELS_BUILT {
            return Err(crate::cuda::built_without_kernels());
        }
        BlockTables::new(block_tables, max_blocks, &layout, lens)?;
        check_decodable(layout.shape(), dtype, lens)?;
        let max_len = lens.context_lens().iter().copied().max().unwrap_or(0);
        let schedule =
            DecodeSchedule::new(sm_count(stream)?, lens.batch(), layout.shape(), max_len);
        let context_lens: Vec<i32> = lens.context_lens().iter().map(|&l| l as i32).collect();
        let floats = schedule
            .workspace_floats(lens.batch(), layout.shape())
            .max(4);
        Ok(Self {
            layout,
            batch: lens.batch(),
            max_blocks,
            schedule,
            // Never empty: a zero-length allocation has no address to pass.
            block_tables: stream.clone_htod(if block_tables.is_empty() {
                &[-1][..]
            } else {
                block_tables
            })?,
            context_lens: stream.clone_htod(if context_lens.is_empty() {
                &[0][..]
            } else {
                &context_lens[..]
            })?,
            workspace: stream.alloc_zeros::<f32>(floats)?,
        })
    }

    /// The split plan.
    pub fn schedule(&self) -> DecodeSchedule {
        self.schedule
    }

    /// Decode attention: `q` `[batch, n_heads, head_dim]`, `out` the same, `lse`
    /// `[batch, n_heads]` (natural log); `k_cache`, `v_cache` one layer's
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
        let (block_tables, _t_sync) = self.block_tables.device_ptr(stream);
        let (context_lens, _c_sync) = self.context_lens.device_ptr(stream);
        let (split_workspace, _w_sync) = self.workspace.device_ptr(stream);
        let tables = DecodeTables {
            layout: self.layout,
            batch: self.batch,
            max_blocks: self.max_blocks,
            schedule: self.schedule,
            block_tables,
            context_lens,
            split_workspace,
        };
        launch_decode(stream, &tables, k_ptr, v_ptr, q, out, lse, scale)
    }
}

impl<T: Element> PagedCache<CudaStorage<T>> {
    /// Fused GQA decode of `layer` for the plan's batch (one new token per sequence, written
    /// with [`write`](PagedCache::write) first): `q`, `out` `[batch, n_heads, head_dim]`, `lse`
    /// `[batch, n_heads]` f32 (natural log), on the cache's stream. Launches only: no
    /// allocation, no host synchronisation, so a step can be captured in a CUDA graph (with
    /// cudarc's event tracking off, `CudaContext::disable_event_tracking`, as any capture
    /// through cudarc needs, since its cross-stream waits would reach outside the capture).
    pub fn decode(
        &self,
        layer: usize,
        plan: &CudaStepPlan,
        q: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        lse: &mut impl DevicePtrMut<f32>,
        scale: Option<f32>,
    ) -> Result<()> {
        self.check(layer, plan)?;
        let storage = self.storage();
        check_decodable(self.config().shape(), T::DTYPE, plan.as_ref().lens())?;
        let (k_cache, v_cache, tables) = storage.decode_tables(layer, plan);
        launch_decode(
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
