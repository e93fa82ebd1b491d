//! The CUDA backend's pages: device memory behind [`PageStorage`], and the per-layer write.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::cache::{CacheConfig, PageStorage, PagedCache, StepPlan};
use crate::cuda::attend::{device_kernels, query_starts, sm_count, AttendTables};
use crate::cuda::{check_aligned, launch, to_i32, KERNELS_BUILT};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ffi;
use crate::plan::{AttendSchedule, KernelChoice};

/// Pages of every layer on the GPU, `[num_layers, 2 (K, V), num_blocks, block_size,
/// n_kv_heads, head_dim]` in one allocation, and a workspace for each step's tables.
///
/// Everything runs on the engine's `stream`, given once here: the step's upload and block
/// copies in [`PagedCache::plan`], the writes in [`PagedCache::write`].
pub struct CudaStorage<T: Element> {
    config: CacheConfig,
    num_blocks: usize,
    /// Elements of one (layer, K or V) tensor.
    tensor_len: usize,
    stream: Arc<CudaStream>,
    /// [num_layers, 2, num_blocks, block_size, n_kv_heads, head_dim]
    pages: CudaSlice<T>,
    /// The current step's tables (see [`CudaStepPlan`]); grows, never shrinks.
    workspace: CudaSlice<u8>,
    /// The current step's split-KV partials (sized by the attention schedule); grows.
    split_workspace: CudaSlice<f32>,
    /// Multiprocessors of the device, for the attention schedule.
    sm_count: usize,
    /// The attention kernels the device runs.
    kernels: KernelChoice,
}

impl<T: Element> CudaStorage<T> {
    /// `num_blocks` zero-filled pages per tensor on `stream`'s device.
    pub fn new(stream: Arc<CudaStream>, config: CacheConfig, num_blocks: usize) -> Result<Self> {
        if !KERNELS_BUILT {
            return Err(crate::cuda::built_without_kernels());
        }
        if config.dtype() != T::DTYPE {
            return Err(Error::DTypeMismatch {
                expected: config.dtype(),
                actual: T::DTYPE,
            });
        }
        to_i32("num_blocks", num_blocks)?;
        // copy_blocks runs one grid row per (layer, K or V) tensor: grid y is at most 65535.
        if 2 * config.num_layers() > 65535 {
            return Err(Error::TooLarge {
                what: "2 * num_layers",
                value: 2 * config.num_layers() as u128,
                limit: 65535,
            });
        }
        let (tensor_len, total) = config.page_lens(num_blocks, std::mem::size_of::<T>())?;
        let pages = stream.alloc_zeros::<T>(total)?;
        let workspace = stream.alloc_zeros::<u8>(4096)?;
        let split_workspace = stream.alloc_zeros::<f32>(1024)?;
        let sm_count = sm_count(&stream)?;
        let kernels = device_kernels(&stream, KernelChoice::Auto)?;
        Ok(Self {
            config,
            num_blocks,
            tensor_len,
            stream,
            pages,
            workspace,
            split_workspace,
            sm_count,
            kernels,
        })
    }

    /// The most pages that fit in `budget_bytes` of device memory.
    pub fn with_budget(
        stream: Arc<CudaStream>,
        config: CacheConfig,
        budget_bytes: u64,
    ) -> Result<Self> {
        let blocks = config.blocks_for_budget(budget_bytes)?;
        Self::new(stream, config, blocks)
    }

    /// All pages, `[num_layers, 2, num_blocks, block_size, n_kv_heads, head_dim]`.
    pub fn pages(&self) -> &CudaSlice<T> {
        &self.pages
    }

    /// The stream every operation of this cache runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Device address of the first element of `layer`'s K (`v = false`) or V tensor.
    fn tensor_ptr(&self, layer: usize, v: bool) -> u64 {
        // The pages are only touched on `self.stream`, so stream order is the synchronisation.
        let (base, _sync) = self.pages.device_ptr(&self.stream);
        base + ((2 * layer + v as usize) * self.tensor_len * std::mem::size_of::<T>()) as u64
    }

    /// One layer's K and V addresses and the plan's attention tables.
    pub(crate) fn attend_tables<'a>(
        &self,
        layer: usize,
        plan: &'a CudaStepPlan,
    ) -> (u64, u64, AttendTables<'a>) {
        let tables = AttendTables {
            layout: self.layout(),
            num_tokens: plan.plan.num_new_tokens(),
            max_blocks: plan.plan.max_blocks(),
            schedule: &plan.schedule,
            block_tables: plan.block_tables,
            context_lens: plan.context_lens,
            query_starts: plan.query_starts,
            work: plan.work,
            mma_work: plan.mma_work,
            split_workspace: plan.split_workspace,
        };
        (
            self.tensor_ptr(layer, false),
            self.tensor_ptr(layer, true),
            tables,
        )
    }
}

/// A [`StepPlan`] whose tables are on the device, in the storage's workspace:
/// block tables `[batch, max_blocks]` i32, context lengths `[batch]` i32, query starts
/// `[batch + 1]` i32, slot mapping `[num_new_tokens]` i64, block copies `[num_copies, 2]` i32.
/// Valid until the cache changes (then [`PagedCache`] rejects it as stale).
#[derive(Debug, Clone)]
pub struct CudaStepPlan {
    plan: StepPlan,
    /// Device addresses of the sections in the workspace.
    block_tables: u64,
    context_lens: u64,
    query_starts: u64,
    slot_mapping: u64,
    /// The attention launch plan, its two work lists and its split workspace.
    schedule: AttendSchedule,
    work: u64,
    mma_work: u64,
    split_workspace: u64,
}

impl CudaStepPlan {
    /// Device address of the block tables, `[batch, max_blocks]` i32.
    pub fn block_tables_ptr(&self) -> u64 {
        self.block_tables
    }
    /// Device address of the context lengths, `[batch]` i32.
    pub fn context_lens_ptr(&self) -> u64 {
        self.context_lens
    }
    /// Device address of the query row starts, `[batch + 1]` i32.
    pub fn query_starts_ptr(&self) -> u64 {
        self.query_starts
    }
    /// Device address of the slot mapping, `[num_new_tokens]` i64.
    pub fn slot_mapping_ptr(&self) -> u64 {
        self.slot_mapping
    }
    /// How attention over this step is launched.
    pub fn schedule(&self) -> &AttendSchedule {
        &self.schedule
    }
}

impl AsRef<StepPlan> for CudaStepPlan {
    fn as_ref(&self) -> &StepPlan {
        &self.plan
    }
}

/// Appends `values` to `bytes` at a 16-byte aligned offset; returns that offset.
fn push_section<V: bytemuck::Pod>(bytes: &mut Vec<u8>, values: &[V]) -> usize {
    bytes.resize(bytes.len().next_multiple_of(16), 0);
    let at = bytes.len();
    bytes.extend_from_slice(bytemuck::cast_slice(values));
    at
}

impl<T: Element> PageStorage for CudaStorage<T> {
    type Plan = CudaStepPlan;

    fn config(&self) -> &CacheConfig {
        &self.config
    }

    fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// One host-to-device copy of the step's tables, then one launch for all block copies.
    fn prepare(&mut self, plan: StepPlan) -> Result<CudaStepPlan> {
        let lens = plan.lens();
        let context_lens = lens.context_lens_i32();
        let schedule =
            AttendSchedule::with_kernels(self.sm_count, lens, self.config.shape(), self.kernels);
        let mut bytes = Vec::new();
        let offsets = [
            push_section(&mut bytes, plan.block_tables()),
            push_section(&mut bytes, &context_lens),
            push_section(&mut bytes, &query_starts(lens)),
            push_section(&mut bytes, plan.slot_mapping()),
            push_section(&mut bytes, plan.block_copies()),
            push_section(&mut bytes, &schedule.cuda_cores.work),
            push_section(&mut bytes, &schedule.tensor_cores.work),
        ];
        if bytes.len() > self.workspace.len() {
            self.workspace = self
                .stream
                .alloc_zeros::<u8>(bytes.len().next_power_of_two())?;
        }
        if !bytes.is_empty() {
            self.stream
                .memcpy_htod(&bytes, &mut self.workspace.slice_mut(..bytes.len()))?;
        }
        let base = {
            let (ptr, _sync) = self.workspace.device_ptr(&self.stream);
            ptr
        };
        let [block_tables, context_lens, query_starts, slot_mapping, block_copies, work, mma_work] =
            offsets.map(|o| base + o as u64);

        if !plan.block_copies().is_empty() {
            let (pages, _sync) = self.pages.device_ptr_mut(&self.stream);
            let params = ffi::pgqa_copy_blocks_params {
                pages: pages as *mut _,
                block_copies: block_copies as *const i32,
                num_copies: plan.block_copies().len() as i64,
                block_len: (self.config.block_size() * self.config.shape().kv_row_len()) as i64,
                num_tensors: (2 * self.config.num_layers()) as i32,
                num_blocks: self.num_blocks as i32,
                dtype: launch::dtype(T::DTYPE),
            };
            // SAFETY: the pages hold num_tensors * num_blocks blocks of block_len elements; the
            // copy pairs were made by the bookkeeping (ids < num_blocks, fresh destinations)
            // and were uploaded above to the workspace, which lives as long as this storage.
            unsafe { launch::copy_blocks(&params, &self.stream)? };
        }
        let floats = schedule.workspace_floats(lens.num_tokens(), self.config.shape());
        if floats > self.split_workspace.len() {
            self.split_workspace = self.stream.alloc_zeros::<f32>(floats.next_power_of_two())?;
        }
        let (split_workspace, _sync) = self.split_workspace.device_ptr(&self.stream);
        Ok(CudaStepPlan {
            plan,
            block_tables,
            context_lens,
            query_starts,
            slot_mapping,
            schedule,
            work,
            mma_work,
            split_workspace,
        })
    }
}

impl<T: Element> PagedCache<CudaStorage<T>> {
    /// Writes the plan's new tokens of `layer` on the cache's stream: `k_new`, `v_new` are
    /// `[plan.num_new_tokens(), n_kv_heads, head_dim]` device buffers, rows in batch order.
    /// One kernel launch; no allocation, no host synchronisation.
    pub fn write(
        &mut self,
        layer: usize,
        plan: &CudaStepPlan,
        k_new: &impl DevicePtr<T>,
        v_new: &impl DevicePtr<T>,
    ) -> Result<()> {
        self.check(layer, plan)?;
        let shape = self.config().shape();
        let num_tokens = plan.plan.num_new_tokens();
        Error::check_len("k_new", k_new.len(), num_tokens * shape.kv_row_len())?;
        Error::check_len("v_new", v_new.len(), num_tokens * shape.kv_row_len())?;
        if num_tokens == 0 {
            return Ok(());
        }
        let storage = self.storage_mut();
        let stream = storage.stream.clone();
        let tensor_len = storage.tensor_len as u64 * std::mem::size_of::<T>() as u64;
        let num_slots = (storage.num_blocks * storage.config.block_size()) as i64;
        let (k_ptr, _k_sync) = k_new.device_ptr(&stream);
        let (v_ptr, _v_sync) = v_new.device_ptr(&stream);
        check_aligned("k_new", k_ptr)?;
        check_aligned("v_new", v_ptr)?;
        let (pages, _pages_sync) = storage.pages.device_ptr_mut(&stream);
        let k_cache = pages + 2 * layer as u64 * tensor_len;
        let params = ffi::pgqa_write_kv_params {
            k_new: k_ptr as *const _,
            v_new: v_ptr as *const _,
            k_cache: k_cache as *mut _,
            v_cache: (k_cache + tensor_len) as *mut _,
            slot_mapping: plan.slot_mapping as *const i64,
            num_tokens: num_tokens as i64,
            num_slots,
            n_kv_heads: to_i32("n_kv_heads", shape.n_kv_heads())?,
            head_dim: to_i32("head_dim", shape.head_dim())?,
            dtype: launch::dtype(T::DTYPE),
        };
        // SAFETY: the plan is this cache's current one (checked), so its slot mapping in the
        // workspace holds num_tokens validated slots < num_slots; k_new / v_new hold
        // num_tokens rows (checked); the layer's K and V tensors lie inside the pages.
        unsafe { launch::write_kv(&params, &stream) }
    }
}
