//! The emulator's pages behind [`PageStorage`], and the per-layer write.

use std::rc::Rc;

use crate::cache::{CacheConfig, PageStorage, PagedCache, StepPlan};
use crate::dtype::{Element, PageElement};
use crate::error::Result;
use crate::fp8::KvScales;
use crate::launch::storage::{DeviceStepPlan, Pages};
use crate::sim::{SimBuffer, SimDevice};

/// A [`StepPlan`] whose tables are in emulated device memory (see
/// [`DeviceStepPlan`](crate::DeviceStepPlan)).
pub type SimStepPlan = DeviceStepPlan;

/// [`CudaStorage`](crate::cuda::CudaStorage) on the emulator: every layer's pages,
/// `[num_layers, 2 (K, V), num_blocks, block_size, n_kv_heads, head_dim]` of `P` (the compute
/// dtype, or a stored fp8 value), in one emulated allocation, written and read by the real
/// cache and attention kernels.
pub struct SimStorage<P: PageElement> {
    pub(crate) pages: Pages<Rc<SimDevice>, P>,
}

impl<P: PageElement> SimStorage<P> {
    /// `num_blocks` zero-filled pages per tensor on `device` (the config's page dtype must be
    /// `P`'s).
    pub fn new(device: Rc<SimDevice>, config: CacheConfig, num_blocks: usize) -> Result<Self> {
        Ok(Self {
            pages: Pages::new(device, config, num_blocks)?,
        })
    }

    /// All pages, `[num_layers, 2, num_blocks, block_size, n_kv_heads, head_dim]`.
    pub fn pages(&self) -> &SimBuffer<P> {
        &self.pages.pages
    }

    /// All pages, to fill before a [`PagedCache`] takes the storage.
    pub fn pages_mut(&mut self) -> &mut SimBuffer<P> {
        &mut self.pages.pages
    }

    /// Sets `layer`'s fp8 scales (see
    /// [`CudaStorage::set_scales`](crate::cuda::CudaStorage::set_scales)).
    pub fn set_scales(&mut self, layer: usize, scales: &KvScales) -> Result<()> {
        self.pages.set_scales(layer, scales)
    }

    /// `layer`'s fp8 scales, as last set.
    pub fn scales(&self, layer: usize) -> Result<KvScales> {
        self.pages.scales(layer)
    }

    /// The device every operation of this cache runs on.
    pub fn device(&self) -> &Rc<SimDevice> {
        &self.pages.backend
    }

    /// Device address and bytes of `layer`'s K and V tensors (adjacent): the range to
    /// [`SimDevice::watch`] for the K/V traffic of that layer's attention.
    pub fn kv_range(&self, layer: usize) -> (u64, usize) {
        (
            self.pages.tensor_ptr(layer, false),
            2 * self.pages.tensor_len * std::mem::size_of::<P>(),
        )
    }
}

impl<P: PageElement> PageStorage for SimStorage<P> {
    type Plan = SimStepPlan;

    fn config(&self) -> &CacheConfig {
        &self.pages.config
    }

    fn num_blocks(&self) -> usize {
        self.pages.num_blocks
    }

    fn kv_scales(&self, layer: usize) -> Option<KvScales> {
        self.pages.scales(layer).ok()
    }

    /// The step's tables into the workspace, then one launch for all block copies.
    fn prepare(&mut self, plan: StepPlan) -> Result<SimStepPlan> {
        self.pages.prepare(plan)
    }
}

impl<P: PageElement> PagedCache<SimStorage<P>> {
    /// Writes the plan's new tokens of `layer` with the real write kernel: `k_new`, `v_new`
    /// `[plan.num_new_tokens(), n_kv_heads, head_dim]` of the compute dtype `T`, rows in batch
    /// order (quantized under the layer's scales for fp8 pages).
    pub fn write<T: Element>(
        &mut self,
        layer: usize,
        plan: &SimStepPlan,
        k_new: &SimBuffer<T>,
        v_new: &SimBuffer<T>,
    ) -> Result<()> {
        self.check(layer, plan)?;
        let device = self.storage().device().clone();
        self.storage_mut().pages.write(
            layer,
            plan,
            T::DTYPE,
            (k_new.address_on("k_new", &device)?, k_new.len()),
            (v_new.address_on("v_new", &device)?, v_new.len()),
        )?;
        self.layer_written(layer, plan.as_ref());
        Ok(())
    }
}

impl<P: PageElement> PagedCache<SimStorage<P>> {
    /// Sets `layer`'s fp8 scales (see [`SimStorage::set_scales`]). Blocks cached under other
    /// scales are not found while these hold.
    pub fn set_scales(&mut self, layer: usize, scales: &KvScales) -> Result<()> {
        self.storage_mut().pages.set_scales(layer, scales)?;
        self.scales_changed();
        Ok(())
    }
}
