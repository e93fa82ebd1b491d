//! The pages of a [`PagedCache`](crate::cache::PagedCache) in a backend's memory, and what each
//! engine step and layer launches over them: one upload of the step's tables, one launch for
//! every copy-on-write copy, one write and one attention per layer.

use std::marker::PhantomData;

use crate::cache::{CacheConfig, PagedLayout, StepPlan};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::kernels::params::{self, AttendTables, AttendTensors};
use crate::kernels::{attend, Backend, Launch};
use crate::plan::{AttendSchedule, KernelChoice};
use crate::variants::AttendOptions;

/// A [`StepPlan`] whose tables are in device memory, in the storage's workspace:
/// block tables `[batch, max_blocks]` i32, context lengths `[batch]` i32, query starts
/// `[batch + 1]` i32, slot mapping `[num_new_tokens]` i64, block copies `[num_copies, 2]` i32.
/// Valid until the cache changes (then the cache rejects it as stale).
#[derive(Debug, Clone)]
pub struct DeviceStepPlan {
    pub(crate) plan: StepPlan,
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

impl DeviceStepPlan {
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

impl AsRef<StepPlan> for DeviceStepPlan {
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

/// Pages of every layer, `[num_layers, 2 (K, V), num_blocks, block_size, n_kv_heads,
/// head_dim]` in one allocation, and the workspaces of each step's tables and splits.
pub(crate) struct Pages<B: Backend, T: Element> {
    pub config: CacheConfig,
    pub num_blocks: usize,
    /// Elements of one (layer, K or V) tensor.
    pub tensor_len: usize,
    pub backend: B,
    /// [num_layers, 2, num_blocks, block_size, n_kv_heads, head_dim]
    pub pages: B::Buffer<T>,
    /// The current step's tables; grows, never shrinks.
    workspace: B::Buffer<u8>,
    /// The current step's split-KV partials (sized by the attention schedule); grows.
    split_workspace: B::Buffer<f32>,
    sm_count: usize,
    kernels: KernelChoice,
    element: PhantomData<T>,
}

impl<B: Backend, T: Element> Pages<B, T> {
    /// `num_blocks` zero-filled pages per tensor.
    pub fn new(backend: B, config: CacheConfig, num_blocks: usize) -> Result<Self> {
        if config.dtype() != T::DTYPE {
            return Err(Error::DTypeMismatch {
                expected: config.dtype(),
                actual: T::DTYPE,
            });
        }
        params::to_i32("num_blocks", num_blocks)?;
        // copy_blocks runs one grid row per (layer, K or V) tensor: grid y is at most 65535.
        if 2 * config.num_layers() > 65535 {
            return Err(Error::TooLarge {
                what: "2 * num_layers",
                value: 2 * config.num_layers() as u128,
                limit: 65535,
            });
        }
        let (tensor_len, total) = config.page_lens(num_blocks, std::mem::size_of::<T>())?;
        Ok(Self {
            pages: backend.alloc_zeros::<T>(total)?,
            workspace: backend.alloc_zeros::<u8>(4096)?,
            split_workspace: backend.alloc_zeros::<f32>(1024)?,
            sm_count: backend.sm_count()?,
            kernels: backend.kernels(KernelChoice::Auto)?,
            config,
            num_blocks,
            tensor_len,
            backend,
            element: PhantomData,
        })
    }

    /// The geometry of one layer's K (or V) tensor.
    pub fn layout(&self) -> PagedLayout {
        PagedLayout::new(
            self.config.shape(),
            self.num_blocks,
            self.config.block_size(),
        )
        .expect("validated when the storage was made")
    }

    /// Device address of the first element of `layer`'s K (`v = false`) or V tensor.
    pub fn tensor_ptr(&self, layer: usize, v: bool) -> u64 {
        self.backend.address(&self.pages)
            + ((2 * layer + v as usize) * self.tensor_len * std::mem::size_of::<T>()) as u64
    }

    /// One host-to-device copy of the step's tables, then one launch for all block copies.
    pub fn prepare(&mut self, plan: StepPlan) -> Result<DeviceStepPlan> {
        let lens = plan.lens();
        let schedule =
            AttendSchedule::with_kernels(self.sm_count, lens, self.config.shape(), self.kernels);
        let mut bytes = Vec::new();
        let offsets = [
            push_section(&mut bytes, plan.block_tables()),
            push_section(&mut bytes, &lens.context_lens_i32()),
            push_section(&mut bytes, &params::query_starts(lens)),
            push_section(&mut bytes, plan.slot_mapping()),
            push_section(&mut bytes, plan.block_copies()),
            push_section(&mut bytes, &schedule.cuda_cores.work),
            push_section(&mut bytes, &schedule.tensor_cores.work),
        ];
        if bytes.len() > B::len(&self.workspace) {
            self.workspace = self
                .backend
                .alloc_zeros::<u8>(bytes.len().next_power_of_two())?;
        }
        if !bytes.is_empty() {
            self.backend.write(&bytes, &mut self.workspace)?;
        }
        let base = self.backend.address(&self.workspace);
        let [block_tables, context_lens, query_starts, slot_mapping, block_copies, work, mma_work] =
            offsets.map(|o| base + o as u64);

        if !plan.block_copies().is_empty() {
            let params = params::copy_blocks_params(
                &self.config,
                self.num_blocks,
                self.backend.address(&self.pages),
                block_copies,
                plan.block_copies().len(),
            );
            // SAFETY: the pages hold num_tensors * num_blocks blocks of block_len elements; the
            // copy pairs were made by the bookkeeping (ids < num_blocks, fresh destinations)
            // and were uploaded above to the workspace, which lives as long as this storage.
            unsafe { self.backend.launch(Launch::CopyBlocks(&params))? };
        }
        let floats = schedule.workspace_floats(lens.num_tokens(), self.config.shape());
        if floats > B::len(&self.split_workspace) {
            self.split_workspace = self
                .backend
                .alloc_zeros::<f32>(floats.next_power_of_two())?;
        }
        Ok(DeviceStepPlan {
            plan,
            block_tables,
            context_lens,
            query_starts,
            slot_mapping,
            schedule,
            work,
            mma_work,
            split_workspace: self.backend.address(&self.split_workspace),
        })
    }

    /// Writes the plan's new tokens of `layer`: `k_new`, `v_new` `(address, elements)`
    /// `[plan.num_new_tokens(), n_kv_heads, head_dim]`. One launch.
    pub fn write(
        &mut self,
        layer: usize,
        plan: &DeviceStepPlan,
        k_new: (u64, usize),
        v_new: (u64, usize),
    ) -> Result<()> {
        let Some(params) = params::write_kv_params(
            &self.config,
            self.num_blocks,
            plan.plan.num_new_tokens(),
            k_new,
            v_new,
            self.tensor_ptr(layer, false),
            self.tensor_ptr(layer, true),
            plan.slot_mapping,
        )?
        else {
            return Ok(());
        };
        // SAFETY: the plan is this cache's current one (checked by the caller), so its slot
        // mapping in the workspace holds num_tokens validated slots < num_slots; k_new / v_new
        // hold num_tokens rows (checked); the layer's K and V tensors lie inside the pages.
        unsafe { self.backend.launch(Launch::WriteKv(&params)) }
    }

    /// Attention of `layer` over the plan's batch: `q`, `out` `[num_new_tokens, n_heads,
    /// head_dim]`, `lse` `[num_new_tokens, n_heads]`, each `(address, elements)`.
    pub fn attend(
        &self,
        layer: usize,
        plan: &DeviceStepPlan,
        q: (u64, usize),
        out: (u64, usize),
        lse: (u64, usize),
        options: &AttendOptions,
    ) -> Result<()> {
        params::check_supported("attention", self.config.shape(), T::DTYPE)?;
        let tables = AttendTables {
            layout: self.layout(),
            lens: plan.plan.lens(),
            reclaimed: &plan.plan.reclaimed,
            max_blocks: plan.plan.max_blocks(),
            schedule: &plan.schedule,
            block_tables: plan.block_tables,
            context_lens: plan.context_lens,
            query_starts: plan.query_starts,
            work: plan.work,
            mma_work: plan.mma_work,
            split_workspace: plan.split_workspace,
        };
        let tensors = AttendTensors {
            k_cache: self.tensor_ptr(layer, false),
            v_cache: self.tensor_ptr(layer, true),
            q,
            out,
            lse,
        };
        attend::launch_attend(&self.backend, &tables, &tensors, T::DTYPE, options)
    }
}
