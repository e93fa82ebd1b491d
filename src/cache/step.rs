//! The bookkeeping result of one engine step: what the kernels of every layer need.

use crate::batch::SeqLens;
use crate::cache::SeqId;

/// Which cache state a plan was made for: a plan is valid only while the cache that made it
/// has not changed since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanStamp {
    pub(crate) cache: u64,
    pub(crate) generation: u64,
}

/// One step's batch after its slots were reserved: block tables, lengths, slot mapping and the
/// copy-on-write block copies, all validated against the cache that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPlan {
    pub(crate) stamp: PlanStamp,
    pub(crate) seqs: Vec<SeqId>,
    /// context_lens (new tokens included) and query_lens (the new tokens).
    pub(crate) lens: SeqLens,
    /// [batch, max_blocks], -1 past each sequence's blocks.
    pub(crate) block_tables: Vec<i32>,
    pub(crate) max_blocks: usize,
    /// [num_new_tokens]: slot `block * block_size + offset` of each new token, in batch order.
    pub(crate) slot_mapping: Vec<i64>,
    /// [num_copies] (src block, dst block): copy-on-write copies to run before any write.
    pub(crate) block_copies: Vec<[i32; 2]>,
    /// [batch]: leading table entries of each sequence the sliding window reclaimed (-1).
    pub(crate) reclaimed: Vec<usize>,
}

impl StepPlan {
    /// The sequences of the batch, in order.
    pub fn seqs(&self) -> &[SeqId] {
        &self.seqs
    }

    /// Keys per sequence (new tokens included) and new tokens per sequence.
    pub fn lens(&self) -> &SeqLens {
        &self.lens
    }

    /// Block tables `[batch, max_blocks]`, `-1` past each sequence's blocks and for the pages
    /// a sliding window reclaimed ([`reclaimed`](StepPlan::reclaimed) leading ones).
    pub fn block_tables(&self) -> &[i32] {
        &self.block_tables
    }

    /// Leading reclaimed (`-1`) pages of each sequence's table row, `[batch]`.
    pub fn reclaimed(&self) -> &[usize] {
        &self.reclaimed
    }

    /// Columns of [`block_tables`](StepPlan::block_tables).
    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// Slot of every new token, `[num_new_tokens]`, in batch order.
    pub fn slot_mapping(&self) -> &[i64] {
        &self.slot_mapping
    }

    /// Copy-on-write copies `(src, dst)` the storage runs for every layer before any write.
    pub fn block_copies(&self) -> &[[i32; 2]] {
        &self.block_copies
    }

    /// New tokens of the whole batch (rows of `k_new`, `v_new`, `q`).
    pub fn num_new_tokens(&self) -> usize {
        self.slot_mapping.len()
    }

    /// The cache state this plan belongs to.
    pub fn stamp(&self) -> PlanStamp {
        self.stamp
    }
}
