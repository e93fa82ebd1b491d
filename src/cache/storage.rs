//! The one interface between the bookkeeping and the pages, wherever they live, and the
//! engine-facing cache that joins the two.

use crate::cache::writes::LayerWrites;
use crate::cache::{
    page_identity, Admission, BlockManager, CacheConfig, PagedLayout, PrefixStats, SeqId, StepPlan,
};
use crate::error::{Error, Result};
use crate::fp8::KvScales;

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

    /// The scales `layer`'s stored values are read under, for storage that has them (fp8
    /// pages); `None` (the default) for storage without. They key the prefix cache's page
    /// identity ([`page_identity`]).
    fn kv_scales(&self, layer: usize) -> Option<KvScales> {
        let _ = layer;
        None
    }

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
///
/// **Prefix caching** (on unless the configuration turns it off:
/// [`CacheConfig::with_prefix_caching`]): a sequence added with its prompt's token ids
/// ([`add_sequence_with_prompt`](PagedCache::add_sequence_with_prompt)) takes over the cached
/// K/V of the longest prefix of full blocks another sequence wrote before, and the engine
/// computes only the rest. The full prompt blocks a plan completes become findable when the
/// backend's `write` of the last of its layers not yet written returns (every layer written
/// under that plan), and blocks filled by decoded tokens when their sequence is freed: a step
/// that fails or is abandoned before makes nothing findable. Neither that commit nor
/// [`append_tokens`](PagedCache::append_tokens) changes the plan's validity.
pub struct PagedCache<S: PageStorage> {
    manager: BlockManager,
    storage: S,
    /// The layers written under the current plan.
    writes: LayerWrites,
}

impl<S: PageStorage> PagedCache<S> {
    /// A cache over `storage`, all blocks free.
    pub fn new(storage: S) -> Result<Self> {
        let config = storage.config();
        let mut manager = BlockManager::new(storage.num_blocks(), config.block_size())?;
        if let Some(window_left) = config.reclaim_window() {
            manager = manager.reclaiming(window_left);
        }
        let mut cache = Self {
            manager: manager.with_prefix_caching(config.prefix_caching()),
            writes: LayerWrites::new(config.num_layers()),
            storage,
        };
        cache.scales_changed();
        Ok(cache)
    }

    /// Keys the prefix cache on the storage's dtypes and current scales: called at creation
    /// and by every `set_scales`, so that blocks written under other scales are never found.
    pub(crate) fn scales_changed(&mut self) {
        let config = *self.storage.config();
        let scales: Vec<Option<KvScales>> = (0..config.num_layers())
            .map(|layer| self.storage.kv_scales(layer))
            .collect();
        self.manager
            .set_page_identity(page_identity(&config, &scales));
    }

    /// Marks `layer` written under `plan` (checked); the write of the plan's last unwritten
    /// layer commits it: its full blocks become findable. Backends call it after each write.
    pub(crate) fn layer_written(&mut self, layer: usize, plan: &StepPlan) {
        if self.writes.mark(layer, plan.stamp()) {
            self.manager
                .commit(plan)
                .expect("the backend checked the plan before writing");
        }
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

    /// A new sequence for a prompt of token ids `prompt` under `salt` (a tenant, an adapter;
    /// empty for none), holding the cached K/V of its longest cached prefix of full blocks
    /// already: plan the other `prompt.len() - computed` tokens. Never the whole prompt (the
    /// last token's logits are needed). See
    /// [`BlockManager::add_sequence_with_prompt`], and
    /// [`append_tokens`](PagedCache::append_tokens) for the tokens it decodes.
    pub fn add_sequence_with_prompt(&mut self, prompt: &[u32], salt: &[u8]) -> Result<Admission> {
        self.manager.add_sequence_with_prompt(prompt, salt)
    }

    /// Token ids `seq` will hold next (each sampled token, before the plan that computes it);
    /// see [`BlockManager::append_tokens`].
    pub fn append_tokens(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()> {
        self.manager.append_tokens(seq, tokens)
    }

    /// Declares `plan`'s K/V written for every layer (see [`BlockManager::commit`]): for an
    /// engine that writes pages other than through this cache's `write` (which commits by
    /// itself). Errors: a stale plan.
    pub fn commit(&mut self, plan: &S::Plan) -> Result<()> {
        self.manager.commit(plan.as_ref())
    }

    /// The prefix cache's counters: prompt tokens, hits, evictions, cached blocks.
    pub fn prefix_stats(&self) -> PrefixStats {
        self.manager.prefix_stats()
    }

    /// Forgets every cached block (after a weight reload, say); see
    /// [`BlockManager::clear_prefix_cache`].
    pub fn clear_prefix_cache(&mut self) {
        self.manager.clear_prefix_cache()
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
