//! The CUDA backend's pages: device memory behind [`PageStorage`], and the per-layer write.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::cache::{CacheConfig, PageStorage, PagedCache, StepPlan};
use crate::cuda::check_built;
use crate::dtype::{Element, PageElement};
use crate::error::Result;
use crate::fp8::KvScales;
use crate::launch::storage::{DeviceStepPlan, Pages};

/// A [`StepPlan`] whose tables are on the device (see [`DeviceStepPlan`](crate::DeviceStepPlan)).
pub type CudaStepPlan = DeviceStepPlan;

/// Pages of every layer on the GPU, `[num_layers, 2 (K, V), num_blocks, block_size,
/// n_kv_heads, head_dim]` of `P` in one allocation, and a workspace for each step's tables.
///
/// `P` is the page element: the compute dtype itself (`CudaStorage<bf16>`), or a stored fp8
/// value (`CudaStorage<Fp8E4M3>` under a bf16 or f16 [`CacheConfig`] whose
/// [`page_dtype`](CacheConfig::page_dtype) is fp8): rows are then quantized as they are
/// written and read under each layer's [`KvScales`] ([`set_scales`](Self::set_scales); 1.0
/// until set).
///
/// Everything runs on the engine's `stream`, given once here: the step's upload and block
/// copies in [`PagedCache::plan`], the writes in [`PagedCache::write`].
///
/// [`Fp8E4M3`]: crate::fp8::Fp8E4M3
pub struct CudaStorage<P: PageElement> {
    pub(crate) pages: Pages<Arc<CudaStream>, P>,
}

impl<P: PageElement> CudaStorage<P> {
    /// `num_blocks` zero-filled pages per tensor on `stream`'s device. Errors: a config whose
    /// page dtype is not `P`'s.
    pub fn new(stream: Arc<CudaStream>, config: CacheConfig, num_blocks: usize) -> Result<Self> {
        check_built()?;
        Ok(Self {
            pages: Pages::new(stream, config, num_blocks)?,
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
    pub fn pages(&self) -> &CudaSlice<P> {
        &self.pages.pages
    }

    /// All pages, to fill (on [`stream`](Self::stream)) before a [`PagedCache`] takes the
    /// storage.
    pub fn pages_mut(&mut self) -> &mut CudaSlice<P> {
        &mut self.pages.pages
    }

    /// Sets `layer`'s fp8 scales (`[n_kv_heads]` for K and for V), on the stream: rows written
    /// and attention launched after this use them. Set them before the layer's first write:
    /// stored values are read under the scales of the moment. Errors: pages that are not fp8,
    /// a layer out of range, scales for another number of K/V heads.
    pub fn set_scales(&mut self, layer: usize, scales: &KvScales) -> Result<()> {
        self.pages.set_scales(layer, scales)
    }

    /// `layer`'s fp8 scales, as last set.
    pub fn scales(&self, layer: usize) -> Result<KvScales> {
        self.pages.scales(layer)
    }

    /// The stream every operation of this cache runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.pages.backend
    }
}

impl<P: PageElement> PageStorage for CudaStorage<P> {
    type Plan = CudaStepPlan;

    fn config(&self) -> &CacheConfig {
        &self.pages.config
    }

    fn num_blocks(&self) -> usize {
        self.pages.num_blocks
    }

    fn kv_scales(&self, layer: usize) -> Option<KvScales> {
        self.pages.scales(layer).ok()
    }

    /// One host-to-device copy of the step's tables, then one launch for all block copies.
    fn prepare(&mut self, plan: StepPlan) -> Result<CudaStepPlan> {
        self.pages.sync_write();
        let plan = self.pages.prepare(plan)?;
        self.pages.sync_write();
        Ok(plan)
    }
}

impl<P: PageElement> PagedCache<CudaStorage<P>> {
    /// Writes the plan's new tokens of `layer` on the cache's stream: `k_new`, `v_new` are
    /// `[plan.num_new_tokens(), n_kv_heads, head_dim]` device buffers of the compute dtype `T`
    /// ([`CacheConfig::dtype`]), rows in batch order, stored as they are or, for fp8 pages,
    /// quantized under the layer's scales. One kernel launch; no allocation, no host
    /// synchronisation.
    pub fn write<T: Element>(
        &mut self,
        layer: usize,
        plan: &CudaStepPlan,
        k_new: &impl DevicePtr<T>,
        v_new: &impl DevicePtr<T>,
    ) -> Result<()> {
        self.check(layer, plan)?;
        let pages = &mut self.storage_mut().pages;
        let stream = pages.backend.clone();
        let (k_ptr, _k_sync) = k_new.device_ptr(&stream);
        let (v_ptr, _v_sync) = v_new.device_ptr(&stream);
        pages.sync_write();
        pages.write(
            layer,
            plan,
            T::DTYPE,
            (k_ptr, k_new.len()),
            (v_ptr, v_new.len()),
        )?;
        pages.sync_write();
        self.layer_written(layer, plan.as_ref());
        Ok(())
    }

    /// Sets `layer`'s fp8 scales (see [`CudaStorage::set_scales`]). Blocks cached under other
    /// scales are not found while these hold.
    pub fn set_scales(&mut self, layer: usize, scales: &KvScales) -> Result<()> {
        self.storage_mut().set_scales(layer, scales)?;
        self.scales_changed();
        Ok(())
    }
}

impl<P: PageElement> Pages<Arc<CudaStream>, P> {
    /// cudarc's event tracking for a write of the pages, around the launches that write them:
    /// before, the stream waits for what other streams were doing with the pages (through
    /// [`CudaStorage::pages`]); after, the write is recorded for them to wait on.
    fn sync_write(&mut self) {
        let _ = self.pages.device_ptr_mut(&self.backend);
    }
}
