//! The prefix cache's index: which block holds the K/V of which named full block
//! ([`BlockHash`]), each sequence's progress along its chain of names, and the counters.
//!
//! The index only names blocks; the [`BlockAllocator`](crate::cache::BlockAllocator) keeps the
//! named blocks nobody holds in least-recently-used order and evicts them, and the
//! [`BlockManager`](crate::cache::BlockManager) ties the two together.

use std::collections::HashMap;

use crate::cache::block_hash::BlockHash;

/// Counters of a cache's prefix caching (see [`BlockManager::prefix_stats`](crate::cache::BlockManager::prefix_stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Prompt tokens of the sequences added with their token ids.
    pub prompt_tokens: u64,
    /// Of those, tokens whose K/V were found cached (not computed again).
    pub hit_tokens: u64,
    /// Cached blocks evicted to make room.
    pub evictions: u64,
    /// Blocks that hold findable K/V now, held by a sequence or not.
    pub cached_blocks: usize,
    /// Of those, the blocks nobody holds (evicted least recently used first).
    pub parked_blocks: usize,
}

impl PrefixStats {
    /// `hit_tokens / prompt_tokens` (0 before any prompt).
    pub fn hit_rate(&self) -> f64 {
        if self.prompt_tokens == 0 {
            0.0
        } else {
            self.hit_tokens as f64 / self.prompt_tokens as f64
        }
    }
}

/// Name -> block, block -> name, and the counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PrefixIndex {
    /// Whether sequences added with their tokens look up and name blocks at all.
    pub(crate) enabled: bool,
    /// What the pages' bytes mean (dtypes, scales): keys every chain's root.
    pub(crate) identity: BlockHash,
    by_name: HashMap<BlockHash, u32>,
    /// [num_blocks]: the name of the K/V each block holds, if findable.
    name_of: Vec<Option<BlockHash>>,
    pub(crate) prompt_tokens: u64,
    pub(crate) hit_tokens: u64,
    pub(crate) evictions: u64,
}

impl PrefixIndex {
    /// Nothing cached, over blocks `0..num_blocks`.
    pub(crate) fn new(num_blocks: usize) -> Self {
        Self {
            enabled: true,
            identity: BlockHash([0; 32]),
            by_name: HashMap::new(),
            name_of: vec![None; num_blocks],
            prompt_tokens: 0,
            hit_tokens: 0,
            evictions: 0,
        }
    }

    /// The block holding the K/V named `name`, if any.
    pub(crate) fn lookup(&self, name: &BlockHash) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// The name of `block`'s K/V, if findable.
    pub(crate) fn name_of(&self, block: u32) -> Option<BlockHash> {
        self.name_of.get(block as usize).copied().flatten()
    }

    /// Whether `block` holds findable K/V.
    pub(crate) fn is_cached(&self, block: u32) -> bool {
        self.name_of[block as usize].is_some()
    }

    /// Makes `block` findable as `name`, unless another block already is (the first block
    /// named wins; a duplicate stays private to its holders and is freed, not parked).
    pub(crate) fn insert(&mut self, name: BlockHash, block: u32) {
        debug_assert!(
            self.name_of[block as usize].is_none_or(|n| n == name),
            "block {block} named twice"
        );
        if let std::collections::hash_map::Entry::Vacant(slot) = self.by_name.entry(name) {
            slot.insert(block);
            self.name_of[block as usize] = Some(name);
        }
    }

    /// Forgets `block`'s K/V (evicted, reclaimed by a sliding window, cleared).
    pub(crate) fn forget(&mut self, block: u32) {
        if let Some(name) = self.name_of[block as usize].take() {
            self.by_name.remove(&name);
        }
    }

    /// Forgets everything; returns the blocks that were named.
    pub(crate) fn clear(&mut self) -> Vec<u32> {
        let named: Vec<u32> = self.by_name.drain().map(|(_, b)| b).collect();
        for &b in &named {
            self.name_of[b as usize] = None;
        }
        named
    }

    /// Blocks named now.
    pub(crate) fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Checks that the two maps agree.
    pub(crate) fn audit(&self) -> std::result::Result<(), String> {
        for (name, &b) in &self.by_name {
            if self.name_of.get(b as usize).copied().flatten() != Some(*name) {
                return Err(format!(
                    "index maps {name:?} to block {b}, which is not named so"
                ));
            }
        }
        let named = self.name_of.iter().filter(|n| n.is_some()).count();
        if named != self.by_name.len() {
            return Err(format!(
                "{named} blocks are named, the index has {}",
                self.by_name.len()
            ));
        }
        Ok(())
    }
}

/// A sequence's progress along its chain of names (sequences added with their token ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SeqPrefix {
    /// The name of its block `named - 1` (the chain's root when `named` is 0).
    pub(crate) chain: BlockHash,
    /// Its leading full blocks named so far (found in the cache, or written and committed).
    pub(crate) named: usize,
    /// The token ids it is known to hold or to be given, from position
    /// `named * block_size` on (the prompt's rest, then tokens appended).
    pub(crate) tokens: Vec<u32>,
}

impl SeqPrefix {
    /// Tokens whose ids are known: every position below this one.
    pub(crate) fn known(&self, block_size: usize) -> usize {
        self.named * block_size + self.tokens.len()
    }
}
