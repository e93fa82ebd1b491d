//! The pages of a [`PagedCache`](crate::cache::PagedCache) in a backend's memory, and what each
//! engine step and layer launches over them: one upload of the step's tables, one launch for
//! every copy-on-write copy, one write and one attention per layer.

use std::marker::PhantomData;

use crate::cache::{CacheConfig, PagedLayout, StepPlan};
use crate::dtype::{DType, PageElement};
use crate::error::{Error, Result};
use crate::fp8::KvScales;
use crate::launch::params::{self, AttendTables, AttendTensors};
use crate::launch::{attend, Backend, Launch};
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
    /// The attention launch plan, its three work lists and its split workspace.
    schedule: AttendSchedule,
    work: u64,
    mma_work: u64,
    narrow_work: u64,
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
/// head_dim]` of `P` in one allocation, their fp8 scales, and the workspaces of each step's
/// tables and splits.
pub(crate) struct Pages<B: Backend, P: PageElement> {
    pub config: CacheConfig,
    pub num_blocks: usize,
    /// Elements of one (layer, K or V) tensor.
    pub tensor_len: usize,
    pub backend: B,
    /// [num_layers, 2, num_blocks, block_size, n_kv_heads, head_dim]
    pub pages: B::Buffer<P>,
    /// [num_layers, 2 (K, V), n_kv_heads]: the fp8 scales (1.0 until set; unused by 16-bit
    /// pages), and their host copy.
    scales: B::Buffer<f32>,
    host_scales: Vec<f32>,
    /// The current step's tables; grows, never shrinks.
    workspace: B::Buffer<u8>,
    /// The current step's split-KV partials (sized by the attention schedule); grows.
    split_workspace: B::Buffer<f32>,
    sm_count: usize,
    kernels: KernelChoice,
    element: PhantomData<P>,
}

impl<B: Backend, P: PageElement> Pages<B, P> {
    /// `num_blocks` zero-filled pages per tensor (of the config's page dtype, which must be
    /// `P`'s), every fp8 scale 1.0.
    pub fn new(backend: B, config: CacheConfig, num_blocks: usize) -> Result<Self> {
        if config.page_dtype() != P::PAGE_DTYPE {
            return Err(Error::DTypeMismatch {
                expected: config.page_dtype(),
                actual: P::PAGE_DTYPE,
            });
        }
        params::check_cache_limits(&config, num_blocks)?;
        let (tensor_len, total) = config.page_lens(num_blocks, std::mem::size_of::<P>())?;
        let host_scales = vec![1.0f32; 2 * config.num_layers() * config.shape().n_kv_heads()];
        Ok(Self {
            pages: backend.alloc_zeros::<P>(total)?,
            scales: backend.upload(&host_scales)?,
            host_scales,
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
            + ((2 * layer + v as usize) * self.tensor_len * std::mem::size_of::<P>()) as u64
    }

    /// Sets `layer`'s fp8 scales (one upload of every layer's, in stream order: launches
    /// already queued read the old ones). Errors: pages that are not fp8, a layer out of
    /// range, scales for another number of K/V heads.
    pub fn set_scales(&mut self, layer: usize, scales: &KvScales) -> Result<()> {
        let page_dtype = self.config.page_dtype();
        if !page_dtype.is_fp8() {
            return Err(Error::InvalidOption {
                option: "fp8 scales",
                value: format!("scales for {page_dtype:?} pages"),
                expected: "fp8 pages (16-bit pages hold K/V as they are, without scales)",
            });
        }
        let num_layers = self.config.num_layers();
        if layer >= num_layers {
            return Err(Error::LayerOutOfRange { layer, num_layers });
        }
        let n_kv = self.config.shape().n_kv_heads();
        scales.check_heads(n_kv)?;
        self.host_scales[2 * layer * n_kv..][..2 * n_kv].copy_from_slice(&scales.concat());
        self.backend.write(&self.host_scales, &mut self.scales)
    }

    /// `layer`'s fp8 scales, as last set (1.0 until then).
    pub fn scales(&self, layer: usize) -> Result<KvScales> {
        let num_layers = self.config.num_layers();
        if layer >= num_layers {
            return Err(Error::LayerOutOfRange { layer, num_layers });
        }
        let n_kv = self.config.shape().n_kv_heads();
        let at = &self.host_scales[2 * layer * n_kv..][..2 * n_kv];
        KvScales::new(at[..n_kv].to_vec(), at[n_kv..].to_vec())
    }

    /// Device addresses of `layer`'s K and V scales (`[n_kv_heads]` f32 each) for fp8 pages,
    /// `(0, 0)` for 16-bit pages (the kernels ignore them).
    fn scale_ptrs(&self, layer: usize) -> (u64, u64) {
        if !self.config.page_dtype().is_fp8() {
            return (0, 0);
        }
        let n_kv = self.config.shape().n_kv_heads();
        let k = self.backend.address(&self.scales) + (2 * layer * n_kv * 4) as u64;
        (k, k + (n_kv * 4) as u64)
    }

    /// `Err(DTypeMismatch)` unless `dtype` (of the caller's rows) is the compute dtype.
    fn check_dtype(&self, dtype: DType) -> Result<()> {
        if dtype != self.config.dtype() {
            return Err(Error::DTypeMismatch {
                expected: self.config.dtype(),
                actual: dtype,
            });
        }
        Ok(())
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
            push_section(&mut bytes, &schedule.narrow_tensor_cores.work),
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
        let [block_tables, context_lens, query_starts, slot_mapping, block_copies, work, mma_work, narrow_work] =
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
            narrow_work,
            split_workspace: self.backend.address(&self.split_workspace),
        })
    }

    /// Writes the plan's new tokens of `layer`: `k_new`, `v_new` `(address, elements)`
    /// `[plan.num_new_tokens(), n_kv_heads, head_dim]` of `dtype` (the compute dtype), into
    /// the pages as they are, or quantized under the layer's scales (fp8 pages). One launch.
    pub fn write(
        &mut self,
        layer: usize,
        plan: &DeviceStepPlan,
        dtype: DType,
        k_new: (u64, usize),
        v_new: (u64, usize),
    ) -> Result<()> {
        self.check_dtype(dtype)?;
        let Some(params) = params::write_kv_params(
            &self.config,
            self.num_blocks,
            plan.plan.num_new_tokens(),
            k_new,
            v_new,
            self.tensor_ptr(layer, false),
            self.tensor_ptr(layer, true),
            plan.slot_mapping,
            self.scale_ptrs(layer),
        )?
        else {
            return Ok(());
        };
        // SAFETY: the plan is this cache's current one (checked by the caller), so its slot
        // mapping in the workspace holds num_tokens validated slots < num_slots; k_new / v_new
        // hold num_tokens rows (checked); the layer's K and V tensors lie inside the pages, and
        // so do its scales for fp8 pages (n_kv_heads each).
        unsafe { self.backend.launch(Launch::WriteKv(&params)) }
    }

    /// Attention of `layer` over the plan's batch: `q`, `out` `[num_new_tokens, n_heads,
    /// head_dim]` of `dtype` (the compute dtype), `lse` `[num_new_tokens, n_heads]`, each
    /// `(address, elements)`.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        layer: usize,
        plan: &DeviceStepPlan,
        dtype: DType,
        q: (u64, usize),
        out: (u64, usize),
        lse: (u64, usize),
        options: &AttendOptions,
    ) -> Result<()> {
        self.check_dtype(dtype)?;
        params::check_supported("attention", self.config.shape(), dtype)?;
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
            narrow_work: plan.narrow_work,
            split_workspace: plan.split_workspace,
        };
        let (k_scale, v_scale) = self.scale_ptrs(layer);
        let tensors = AttendTensors {
            k_cache: self.tensor_ptr(layer, false),
            v_cache: self.tensor_ptr(layer, true),
            kv_dtype: self.config.page_dtype(),
            k_scale,
            v_scale,
            q,
            out,
            lse,
        };
        attend::launch_attend(&self.backend, &tables, &tensors, dtype, options)
    }
}
