//! The candle ops on CUDA (feature `candle-cuda`): candle's `CudaStorage` slices and its
//! device's stream, handed to the crate's launch layer ([`crate::launch`]) with no copy.
//!
//! Streams: everything launches on `CudaDevice::cuda_stream()` of the tensors' one candle device
//! (candle 0.11's `Device::new_cuda` is the per-thread stream, `new_cuda_with_stream` a stream
//! of its own; both work). Device pointers come from cudarc's `device_ptr(&stream)` and their
//! guards are held until the launch is enqueued, so in cudarc's multi-stream mode the stream
//! waits for other streams' writes and the launch is recorded for them.
//!
//! Per step, the tables go up once: a [`PagedMetadata`](super::PagedMetadata) uploads its block
//! tables, lengths and work lists (and its slot mapping) the first time a layer needs them on
//! a device, through candle's `CudaDevice::clone_htod` (so candle's CUDA-graph host-to-device
//! cache applies to them when enabled); every later layer only launches: no allocation but the
//! outputs (`alloc_zeros` on the stream), no host-to-device copy, no host synchronisation.
//! Build the metadata before a graph capture begins (or under candle's
//! `enable_cuda_graph_htod_cache`); the per-layer launches can be captured.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{CudaDevice, CudaStorage, DType as CandleDType, Layout};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut};

use crate::batch::SeqLens;
use crate::cache::{CacheConfig, PagedLayout};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::launch::attend::launch_attend;
use crate::launch::params::{self, AttendTables, AttendTensors};
use crate::launch::{Backend, Launch};
use crate::plan::{AttendSchedule, KernelChoice};
use crate::variants::AttendOptions;

use super::CandleElement;

/// A metadata's uploads, per candle device and geometry.
#[derive(Default)]
pub(crate) struct DeviceTables {
    attention: Mutex<Vec<Arc<AttentionTables>>>,
    slots: Mutex<Vec<Arc<SlotTable>>>,
}

/// One step's attention tables on one device, for one geometry.
struct AttentionTables {
    device: DeviceId,
    layout: PagedLayout,
    schedule: AttendSchedule,
    /// [batch, max_blocks] i32
    block_tables: CudaSlice<i32>,
    /// [batch] i32
    context_lens: CudaSlice<i32>,
    /// [batch + 1] i32
    query_starts: CudaSlice<i32>,
    /// [num_work, 2] i32, the CUDA-core kernel's work items
    work: CudaSlice<i32>,
    /// [num_mma_work, 2] i32, the tensor-core kernel's work items (wide layout)
    mma_work: CudaSlice<i32>,
    /// [num_narrow_work, 2] i32, the tensor-core kernel's work items (narrow layout)
    narrow_work: CudaSlice<i32>,
    /// The split-KV partials of the schedule (f32).
    workspace: CudaSlice<f32>,
}

/// One step's slot mapping on one device, for one page geometry.
struct SlotTable {
    device: DeviceId,
    num_blocks: usize,
    block_size: usize,
    /// [num_tokens] i64
    slots: CudaSlice<i64>,
}

/// Uploads `values`, or one `fill` element when empty (an allocation needs a length).
fn upload<V: cudarc::driver::DeviceRepr + 'static>(
    dev: &CudaDevice,
    values: &[V],
    fill: V,
) -> candle_core::Result<CudaSlice<V>> {
    let fill = [fill];
    dev.clone_htod(if values.is_empty() { &fill[..] } else { values })
}

impl DeviceTables {
    /// The step's attention tables on `dev` for `layout`: `block_tables` `[batch, max_blocks]`
    /// (checked against `layout`), the lengths of `lens` and the work lists of its schedule
    /// (uploaded by the first call for this device and layout).
    fn attention(
        &self,
        dev: &CudaDevice,
        stream: &Arc<CudaStream>,
        layout: PagedLayout,
        lens: &SeqLens,
        block_tables: &[i32],
    ) -> candle_core::Result<Arc<AttentionTables>> {
        let mut uploaded = self.attention.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = uploaded
            .iter()
            .find(|t| t.device == dev.id() && t.layout == layout)
        {
            return Ok(found.clone());
        }
        let shape = layout.shape();
        let choice = Backend::kernels(stream, KernelChoice::Auto)?;
        let schedule =
            AttendSchedule::with_kernels(Backend::sm_count(stream)?, lens, shape, choice);
        let floats = schedule.workspace_floats(lens.num_tokens(), shape).max(4);
        let tables = Arc::new(AttentionTables {
            device: dev.id(),
            layout,
            block_tables: upload(dev, block_tables, -1)?,
            context_lens: upload(dev, &lens.context_lens_i32(), 0)?,
            query_starts: upload(dev, &params::query_starts(lens), 0)?,
            work: upload(dev, bytemuck::cast_slice(&schedule.cuda_cores.work), 0)?,
            mma_work: upload(dev, bytemuck::cast_slice(&schedule.tensor_cores.work), 0)?,
            narrow_work: upload(
                dev,
                bytemuck::cast_slice(&schedule.narrow_tensor_cores.work),
                0,
            )?,
            workspace: dev.alloc_zeros::<f32>(floats)?,
            schedule,
        });
        uploaded.push(tables.clone());
        Ok(tables)
    }

    /// The step's slot mapping on `dev` for a cache of `num_blocks` pages of `block_size`
    /// tokens: `slot_mapping` `[num_tokens]`, derived from the block tables checked against
    /// that geometry (uploaded by the first call for this device and geometry).
    fn slots(
        &self,
        dev: &CudaDevice,
        num_blocks: usize,
        block_size: usize,
        slot_mapping: &[i64],
    ) -> candle_core::Result<Arc<SlotTable>> {
        let mut uploaded = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let key = (dev.id(), num_blocks, block_size);
        if let Some(found) = uploaded
            .iter()
            .find(|t| (t.device, t.num_blocks, t.block_size) == key)
        {
            return Ok(found.clone());
        }
        let table = Arc::new(SlotTable {
            device: dev.id(),
            num_blocks,
            block_size,
            slots: upload(dev, slot_mapping, -1)?,
        });
        uploaded.push(table.clone());
        Ok(table)
    }
}

/// The address of a CUDA storage's buffer (for the aliasing check), for the dtypes the ops
/// take.
pub(crate) fn base(storage: &CudaStorage) -> candle_core::Result<Option<usize>> {
    fn address<T: CudaDType>(storage: &CudaStorage) -> candle_core::Result<Option<usize>> {
        let slice = storage.as_cuda_slice::<T>()?;
        let (ptr, _sync) = slice.device_ptr(slice.stream());
        Ok(Some(ptr as usize))
    }
    match storage.dtype() {
        CandleDType::F32 => address::<f32>(storage),
        CandleDType::F16 => address::<half::f16>(storage),
        CandleDType::BF16 => address::<half::bf16>(storage),
        CandleDType::I64 => address::<i64>(storage),
        CandleDType::I32 => address::<i32>(storage),
        CandleDType::U32 => address::<u32>(storage),
        _ => Ok(None),
    }
}

/// The `len` elements of a contiguous tensor from its storage and layout.
fn view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
    name: &'static str,
    len: usize,
) -> candle_core::Result<CudaView<'a, T>> {
    let slice = storage.as_cuda_slice::<T>()?;
    let start = layout.start_offset();
    Ok(slice
        .try_slice(start..start + len)
        .ok_or(Error::BufferLength {
            name,
            expected: start + len,
            actual: slice.len(),
        })?)
}

/// `Err(TensorDevice)` unless `storage` is on `dev` (the op's tensors were checked to share one
/// candle device; this guards the stream the launch uses).
fn check_stream(
    name: &'static str,
    storage: &CudaStorage,
    stream: &CudaStream,
) -> candle_core::Result<()> {
    let theirs = storage.device.cuda_stream();
    if theirs.cu_stream() != stream.cu_stream() {
        Err(Error::TensorDevice {
            name,
            reference: "the launch",
            expected: format!("stream {:p}", stream.cu_stream()),
            actual: format!("stream {:p}", theirs.cu_stream()),
        })?;
    }
    Ok(())
}

/// What an attention launch needs of its step and its caches, all checked by the caller.
pub(crate) struct AttentionArgs<'a> {
    /// One cache tensor's geometry, with the query heads (`n_heads`).
    pub layout: PagedLayout,
    /// The element type of `q`, the caches and `out`.
    pub dtype: DType,
    /// Keys and query rows per sequence (`num_tokens` rows of `q`).
    pub lens: &'a SeqLens,
    /// Columns of `block_tables`.
    pub max_blocks: usize,
    /// [batch, max_blocks] i32: every entry a sequence uses is a block of the caches (checked
    /// against `layout`); the others may be -1
    pub block_tables: &'a [i32],
    /// [batch]: leading pages of each sequence a sliding window reclaimed (-1 entries)
    pub reclaimed: &'a [usize],
    /// The step's uploads: `block_tables`, the lengths and the work lists go up with the
    /// step's first attention on a device for `layout`.
    pub uploads: &'a DeviceTables,
    /// The variants, validated by the launch.
    pub options: &'a AttendOptions,
}

/// Attention on CUDA: returns `out` `[num_tokens, n_heads, head_dim]` and `lse`
/// `[num_tokens, n_heads]` f32.
pub(crate) fn attention(
    args: &AttentionArgs<'_>,
    q: (&CudaStorage, &Layout),
    k_cache: (&CudaStorage, &Layout),
    v_cache: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, CudaStorage)> {
    match args.dtype {
        DType::F16 => attention_as::<half::f16>(args, q, k_cache, v_cache),
        DType::BF16 => attention_as::<half::bf16>(args, q, k_cache, v_cache),
        dtype @ (DType::F32 | DType::F8E4M3 | DType::F8E5M2) => Err(Error::UnsupportedDType {
            kernel: "attention",
            dtype,
        }
        .into()),
    }
}

fn attention_as<T: CandleElement + CudaDType>(
    args: &AttentionArgs<'_>,
    q: (&CudaStorage, &Layout),
    k_cache: (&CudaStorage, &Layout),
    v_cache: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, CudaStorage)> {
    let dev = &q.0.device;
    let stream = dev.cuda_stream();
    check_stream("k_cache", k_cache.0, &stream)?;
    check_stream("v_cache", v_cache.0, &stream)?;
    let layout = args.layout;
    let shape = layout.shape();
    let rows = args.lens.num_tokens() * shape.n_heads();
    let q_len = rows * shape.head_dim();
    let tables = args
        .uploads
        .attention(dev, &stream, layout, args.lens, args.block_tables)?;
    let q_view = view::<T>(q.0, q.1, "q", q_len)?;
    let k_view = view::<T>(k_cache.0, k_cache.1, "k_cache", layout.cache_len())?;
    let v_view = view::<T>(v_cache.0, v_cache.1, "v_cache", layout.cache_len())?;
    // Outputs are the only allocations of a layer (stream-ordered; one element at least).
    let mut out = dev.alloc_zeros::<T>(q_len.max(1))?;
    let mut lse = dev.alloc_zeros::<f32>(rows.max(1))?;
    {
        let (q_ptr, _q) = q_view.device_ptr(&stream);
        let (k_ptr, _k) = k_view.device_ptr(&stream);
        let (v_ptr, _v) = v_view.device_ptr(&stream);
        let (out_ptr, _out) = out.device_ptr_mut(&stream);
        let (lse_ptr, _lse) = lse.device_ptr_mut(&stream);
        let (block_tables, _bt) = tables.block_tables.device_ptr(&stream);
        let (context_lens, _cl) = tables.context_lens.device_ptr(&stream);
        let (query_starts, _qs) = tables.query_starts.device_ptr(&stream);
        let (work, _w) = tables.work.device_ptr(&stream);
        let (mma_work, _mw) = tables.mma_work.device_ptr(&stream);
        let (narrow_work, _nw) = tables.narrow_work.device_ptr(&stream);
        let (split_workspace, _ws) = tables.workspace.device_ptr(&stream);
        let launch_tables = AttendTables {
            layout,
            lens: args.lens,
            reclaimed: args.reclaimed,
            max_blocks: args.max_blocks,
            schedule: &tables.schedule,
            block_tables,
            context_lens,
            query_starts,
            work,
            mma_work,
            narrow_work,
            split_workspace,
        };
        let tensors = AttendTensors {
            k_cache: k_ptr,
            v_cache: v_ptr,
            kv_dtype: <T as Element>::DTYPE,
            k_scale: 0,
            v_scale: 0,
            q: (q_ptr, q_len),
            out: (out_ptr, q_len),
            lse: (lse_ptr, rows),
        };
        // The options reach the kernels here (and the CPU attention in attention.rs). Sinks and
        // ALiBi slopes, when set, are uploaded for the call.
        launch_attend(
            &stream,
            &launch_tables,
            &tensors,
            <T as Element>::DTYPE,
            args.options,
        )?;
        // The guards drop here, after the launch is enqueued.
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        CudaStorage::wrap_cuda_slice(lse, dev.clone()),
    ))
}

/// The caches of a CUDA write, locked: one storage holding both (with the element offsets of
/// K and V in it) or two (each with its offset).
pub(crate) enum Caches<'a> {
    Shared(&'a mut CudaStorage, usize, usize),
    Split((&'a mut CudaStorage, usize), (&'a mut CudaStorage, usize)),
}

/// What a write launch needs, all checked by the caller.
pub(crate) struct WriteArgs<'a> {
    /// One layer of the caches: the K/V heads, `block_size` and the element type of the caches,
    /// `k` and `v`.
    pub config: CacheConfig,
    /// One cache tensor's geometry (`num_blocks`).
    pub layout: PagedLayout,
    /// Rows of `k` and `v`.
    pub num_tokens: usize,
    /// [num_tokens] i64, each < num_blocks * block_size (negative: skipped)
    pub slots: &'a [i64],
    /// The step's uploads when `slots` is a metadata's slot mapping for `layout` (uploaded by
    /// the step's first write on a device for that geometry); `None` for given slots, uploaded
    /// for this call.
    pub uploads: Option<&'a DeviceTables>,
}

/// The write on CUDA: one `pgqa_write_kv` launch for K and V.
pub(crate) fn write(
    args: &WriteArgs<'_>,
    caches: Caches<'_>,
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
) -> candle_core::Result<()> {
    match args.config.dtype() {
        DType::F16 => write_as::<half::f16>(args, caches, k, v),
        DType::BF16 => write_as::<half::bf16>(args, caches, k, v),
        DType::F32 => write_as::<f32>(args, caches, k, v),
        dtype @ (DType::F8E4M3 | DType::F8E5M2) => Err(Error::UnsupportedDType {
            kernel: "candle write_kv",
            dtype,
        }
        .into()),
    }
}

fn write_as<T: CandleElement + CudaDType>(
    args: &WriteArgs<'_>,
    caches: Caches<'_>,
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
) -> candle_core::Result<()> {
    let dev = k.0.device.clone();
    let stream = dev.cuda_stream();
    check_stream("v", v.0, &stream)?;
    let layout = args.layout;
    let rows = args.num_tokens * args.config.shape().kv_row_len();
    let len = layout.cache_len();
    let elem = std::mem::size_of::<T>() as u64;
    let k_view = view::<T>(k.0, k.1, "k", rows)?;
    let v_view = view::<T>(v.0, v.1, "v", rows)?;
    // The metadata's slots went up with its first write of the step; given slots go up now.
    let (metadata_slots, given_slots);
    let slots: &CudaSlice<i64> = match args.uploads {
        Some(uploads) => {
            metadata_slots =
                uploads.slots(&dev, layout.num_blocks(), layout.block_size(), args.slots)?;
            &metadata_slots.slots
        }
        None => {
            given_slots = upload(&dev, args.slots, -1)?;
            &given_slots
        }
    };
    let in_range = |name: &'static str, slice_len: usize, offset: usize| -> Result<()> {
        if offset + len > slice_len {
            return Err(Error::BufferLength {
                name,
                expected: offset + len,
                actual: slice_len,
            });
        }
        Ok(())
    };
    let (k_ptr, _k) = k_view.device_ptr(&stream);
    let (v_ptr, _v) = v_view.device_ptr(&stream);
    let (slots_ptr, _s) = slots.device_ptr(&stream);
    let launch = |k_cache: u64, v_cache: u64| -> Result<()> {
        let Some(params) = params::write_kv_params(
            &args.config,
            layout.num_blocks(),
            args.num_tokens,
            (k_ptr, rows),
            (v_ptr, rows),
            k_cache,
            v_cache,
            slots_ptr,
            (0, 0),
        )?
        else {
            return Ok(());
        };
        // SAFETY: k and v hold num_tokens rows (checked above and by write_kv_params); both
        // caches hold num_blocks * block_size rows from their offsets (checked); every slot is
        // below that (checked on the host before the op; the kernel skips any other); all are
        // allocations of this stream's context, kept alive and locked until the launch is
        // enqueued.
        unsafe { Backend::launch(&stream, Launch::WriteKv(&params)) }
    };
    match caches {
        Caches::Shared(storage, k_offset, v_offset) => {
            check_stream("k_cache", storage, &stream)?;
            let pages = storage.as_cuda_slice_mut::<T>()?;
            in_range("k_cache", pages.len(), k_offset)?;
            in_range("v_cache", pages.len(), v_offset)?;
            let (base, _pages) = pages.device_ptr_mut(&stream);
            launch(base + k_offset as u64 * elem, base + v_offset as u64 * elem)?;
        }
        Caches::Split((k_storage, k_offset), (v_storage, v_offset)) => {
            check_stream("k_cache", k_storage, &stream)?;
            check_stream("v_cache", v_storage, &stream)?;
            let k_pages = k_storage.as_cuda_slice_mut::<T>()?;
            in_range("k_cache", k_pages.len(), k_offset)?;
            let v_pages = v_storage.as_cuda_slice_mut::<T>()?;
            in_range("v_cache", v_pages.len(), v_offset)?;
            let (k_base, _kp) = k_pages.device_ptr_mut(&stream);
            let (v_base, _vp) = v_pages.device_ptr_mut(&stream);
            launch(
                k_base + k_offset as u64 * elem,
                v_base + v_offset as u64 * elem,
            )?;
        }
    }
    Ok(())
}

/// The copy-on-write copies of a [`CandleStorage`](super::CandleStorage) step: one upload of
/// the pairs, one `pgqa_copy_blocks` launch over every layer's K and V.
///
/// `pages` `[num_layers, 2, num_blocks, block_size, n_kv_heads, head_dim]` of `config`'s dtype
/// from `layout`'s start offset; `block_copies` `[num_copies]` (src block, dst block), made by
/// the bookkeeping.
pub(crate) fn copy_blocks(
    config: &CacheConfig,
    num_blocks: usize,
    block_copies: &[[i32; 2]],
    pages: &mut CudaStorage,
    layout: &Layout,
) -> candle_core::Result<()> {
    match config.dtype() {
        DType::F16 => copy_blocks_as::<half::f16>(config, num_blocks, block_copies, pages, layout),
        DType::BF16 => {
            copy_blocks_as::<half::bf16>(config, num_blocks, block_copies, pages, layout)
        }
        DType::F32 => copy_blocks_as::<f32>(config, num_blocks, block_copies, pages, layout),
        dtype @ (DType::F8E4M3 | DType::F8E5M2) => Err(Error::UnsupportedDType {
            kernel: "candle copy_blocks",
            dtype,
        }
        .into()),
    }
}

fn copy_blocks_as<T: CandleElement + CudaDType>(
    config: &CacheConfig,
    num_blocks: usize,
    block_copies: &[[i32; 2]],
    pages: &mut CudaStorage,
    layout: &Layout,
) -> candle_core::Result<()> {
    let dev = pages.device.clone();
    let stream = dev.cuda_stream();
    let pairs = upload(
        &dev,
        bytemuck::cast_slice::<[i32; 2], i32>(block_copies),
        -1,
    )?;
    let slice = pages.as_cuda_slice_mut::<T>()?;
    let total =
        2 * config.num_layers() * num_blocks * config.block_size() * config.shape().kv_row_len();
    let start = layout.start_offset();
    if start + total > slice.len() {
        Err(Error::BufferLength {
            name: "pages",
            expected: start + total,
            actual: slice.len(),
        })?;
    }
    let (pairs_ptr, _pairs) = pairs.device_ptr(&stream);
    let (base, _pages) = slice.device_ptr_mut(&stream);
    let params = params::copy_blocks_params(
        config,
        num_blocks,
        base + (start * std::mem::size_of::<T>()) as u64,
        pairs_ptr,
        block_copies.len(),
    );
    // SAFETY: the pages hold 2 * num_layers tensors of num_blocks blocks from `start`
    // (checked); the pairs were made by the bookkeeping (ids < num_blocks, fresh destinations;
    // the kernel skips any other) and uploaded above; both stay alive and locked until the
    // launch is enqueued.
    unsafe { Backend::launch(&stream, Launch::CopyBlocks(&params)) }?;
    Ok(())
}
