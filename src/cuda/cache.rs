//! The CUDA backend's pages: device memory behind [`PageStorage`], and the per-layer write.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::cache::{CacheConfig, PageStorage, PagedCache, StepPlan};
use crate::cuda::check_built;
use crate::dtype::Element;
use crate::error::Result;
use crate::kernels::storage::{DeviceStepPlan, Pages};

/// A [`StepPlan`] whose tables are on the device (see [`DeviceStepPlan`](crate::DeviceStepPlan)).
pub type CudaStepPlan = DeviceStepPlan;

/// Pages of every layer on the GPU, `[num_layers, 2 (K, V), num_blocks, block_size,
/// n_kv_heads, head_dim]` in one allocation, and a workspace for each step's tables.
///
/// Everything runs on the engine's `stream`, given once here: the step's upload and block
/// copies in [`PagedCache::plan`], the writes in [`PagedCache::write`].
pub struct CudaStorage<T: Element> {
    pub(crate) pages: Pages<Arc<CudaStream>, T>,
}

impl<T: Element> CudaStorage<T> {
    /// `num_blocks` zero-filled pages per tensor on `stream`'s device.
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
    pub fn pages(&self) -> &CudaSlice<T> {
        &self.pages.pages
    }

    /// All pages, to fill (on [`stream`](Self::stream)) before a [`PagedCache`] takes the
    /// storage.
    pub fn pages_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.pages.pages
    }

    /// The stream every operation of this cache runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.pages.backend
    }
}

impl<T: Element> PageStorage for CudaStorage<T> {
    type Plan = CudaStepPlan;

    fn config(&self) -> &CacheConfig {
        &self.pages.config
    }

    fn num_blocks(&self) -> usize {
        self.pages.num_blocks
    }

    /// One host-to-device copy of the step's tables, then one launch for all block copies.
    fn prepare(&mut self, plan: StepPlan) -> Result<CudaStepPlan> {
        self.pages.sync_write();
        let plan = self.pages.prepare(plan)?;
        self.pages.sync_write();
        Ok(plan)
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
        let pages = &mut self.storage_mut().pages;
        let stream = pages.backend.clone();
        let (k_ptr, _k_sync) = k_new.device_ptr(&stream);
        let (v_ptr, _v_sync) = v_new.device_ptr(&stream);
        pages.sync_write();
        pages.write(layer, plan, (k_ptr, k_new.len()), (v_ptr, v_new.len()))?;
        pages.sync_write();
        Ok(())
    }
}

impl<T: Element> Pages<Arc<CudaStream>, T> {
    /// cudarc's event tracking for a write of the pages, around the launches that write them:
    /// before, the stream waits for what other streams were doing with the pages (through
    /// [`CudaStorage::pages`]); after, the write is recorded for them to wait on.
    fn sync_write(&mut self) {
        let _ = self.pages.device_ptr_mut(&self.backend);
    }
}
