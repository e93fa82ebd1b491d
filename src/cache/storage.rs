//! The one interface between the bookkeeping and the pages, wherever they live, and the
//! engine-facing cache that joins the two.

use crate::cache::{BlockManager, CacheConfig, PagedLayout, SeqId, StepPlan};
use crate::error::{Error, Result};

/// Pages of every layer, K and V, on some backend (CPU memory or a GPU).
///
/// Layout: one tensor `[num_blocks, block_size, n_kv_heads, head_dim]` per (layer, K or V),
/// tensor `2 * layer` for K and `2 * layer + 1` for V, in one allocation; element offsets are
/// 64-bit.
pub trait PageStorage {
    /// A step plan in the form this backend's kernels read (host tables, or device copies).
    type Plan: AsRef<StepPlan>;

    /// The geometry the pages were sized for.
    fn config(&self) -> &CacheConfig;

    /// Pages per tensor.
    fn num_blocks(&self) -> usize;

    /// Runs the plan's copy-on-write block copies on every layer and makes its tables,
    /// lengths and slot mapping available to this backend's kernels. Called once per step.
    fn prepare(&mut self, plan: StepPlan) -> Result<Self::Plan>;

    /// The geometry of one layer's K (or V) tensor.
    fn layout(&self) -> PagedLayout {
        let config = self.config();
        PagedLayout::new(config.shape(), self.num_blocks(), config.block_size())
            .expect("validated when the storage was made")
    }
}

/// A paged K/V cache: the bookkeeping of sequences and blocks ([`BlockManager`]) over pages
/// on some backend ([`PageStorage`]).
///
/// Once per engine step, [`plan`](PagedCache::plan) reserves slots for the batch and prepares
/// the storage; per layer, the backend's `write` (and attention) take that plan and only
/// launch kernels. A plan is valid until the cache changes (the next plan, fork, free, or
/// add): using it after is [`Error::StalePlan`].
pub struct PagedCache<S: PageStorage> {
    manager: BlockManager,
    storage: S,
}

impl<S: PageStorage> PagedCache<S> {
    /// A cache over `storage`, all blocks free.
    pub fn new(storage: S) -> Result<Self> {
        let config = storage.config();
        let mut manager = BlockManager::new(storage.num_blocks(), config.block_size())?;
        if let Some(window_left) = config.reclaim_window() {
            manager = manager.reclaiming(window_left);
        }
        Ok(Self { manager, storage })
    }

    /// The bookkeeping (read-only: changes go through this cache).
    pub fn manager(&self) -> &BlockManager {
        &self.manager
    }

    /// The pages.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The geometry.
    pub fn config(&self) -> &CacheConfig {
        self.storage.config()
    }

    /// A new, empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        self.manager.add_sequence()
    }

    /// A sequence sharing every block of `parent` (copy-on-write).
    pub fn fork(&mut self, parent: SeqId) -> Result<SeqId> {
        self.manager.fork(parent)
    }

    /// Releases the blocks of `seq`.
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        self.manager.free(seq)
    }

    /// Pages nobody holds.
    pub fn num_free_blocks(&self) -> usize {
        self.manager.num_free_blocks()
    }

    /// How many more tokens `seq` can take with the blocks free now.
    pub fn capacity(&self, seq: SeqId) -> Result<usize> {
        self.manager.capacity(seq)
    }

    /// Reserves slots for one step (`(sequence, new tokens)` each, every sequence once), runs
    /// the copy-on-write copies, and returns the plan every layer's calls take. On
    /// `OutOfBlocks` nothing changes.
    pub fn plan(&mut self, batch: &[(SeqId, usize)]) -> Result<S::Plan> {
        let plan = self.manager.plan(batch)?;
        self.storage.prepare(plan)
    }

    /// Checks that `plan` belongs to this cache's current state and `layer` exists; the
    /// backends call it first in every per-layer call.
    pub fn check(&self, layer: usize, plan: &S::Plan) -> Result<()> {
        self.manager.check_plan(plan.as_ref())?;
        let num_layers = self.config().num_layers();
        if layer >= num_layers {
            return Err(Error::LayerOutOfRange { layer, num_layers });
        }
        Ok(())
    }

    /// The storage, for the backends' per-layer calls (after [`check`](PagedCache::check)).
    pub(crate) fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
    }
}

impl AsRef<StepPlan> for StepPlan {
    fn as_ref(&self) -> &StepPlan {
        self
    }
}
