//! The prefix cache's index: which block holds the K/V of which named full block
//! ([`BlockHash`]), each sequence's progress along its chain of names, and the counters.
//!
//! The index only names blocks; the [`BlockAllocator`](crate::cache::BlockAllocator) keeps the
//! named blocks nobody holds in least-recently-used order and evicts them, and the
//! [`BlockManager`](crate::cache::BlockManager) ties the two together.

use std::collections::hash_map::Entry;
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
///
/// `name_of` is the truth. `by_name` may keep stale entries (a name whose block was evicted or
/// renamed since): forgetting a block, which every eviction does, then bumps the block's
/// epoch instead of touching a random bucket of a large map. An entry records the epoch it was
/// made in and holds only while the block's epoch is still that one; once stale entries could
/// outnumber the blocks, one sweep drops them all (amortized O(1) per name, reading only the
/// small epoch array).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PrefixIndex {
    /// Whether sequences added with their tokens look up and name blocks at all.
    pub(crate) enabled: bool,
    /// What the pages' bytes mean (dtypes, scales): keys every chain's root.
    pub(crate) identity: BlockHash,
    /// name -> (block, the block's epoch when named).
    by_name: HashMap<BlockHash, (u32, u64)>,
    /// [num_blocks]: bumped whenever a block forgets its name (64 bits: never wraps, so a
    /// stale entry never holds again).
    epoch: Vec<u64>,
    /// [num_blocks]: the name of the K/V each block holds, if findable.
    name_of: Vec<Option<BlockHash>>,
    /// Blocks named now (the `Some`s of `name_of`).
    named: usize,
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
            epoch: vec![0; num_blocks],
            name_of: vec![None; num_blocks],
            named: 0,
            prompt_tokens: 0,
            hit_tokens: 0,
            evictions: 0,
        }
    }

    /// The block holding the K/V named `name`, if any.
    pub(crate) fn lookup(&self, name: &BlockHash) -> Option<u32> {
        let &(block, epoch) = self.by_name.get(name)?;
        (self.epoch[block as usize] == epoch).then_some(block)
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
        match self.by_name.entry(name) {
            Entry::Occupied(mut entry) => {
                let (holder, epoch) = *entry.get();
                if self.epoch[holder as usize] == epoch {
                    return; // a duplicate
                }
                entry.insert((block, self.epoch[block as usize])); // a stale entry
            }
            Entry::Vacant(entry) => {
                entry.insert((block, self.epoch[block as usize]));
            }
        }
        if self.name_of[block as usize].replace(name).is_none() {
            self.named += 1;
        }
        if self.by_name.len() > 2 * self.name_of.len() + 64 {
            let epochs = &self.epoch;
            self.by_name
                .retain(|_, &mut (b, epoch)| epochs[b as usize] == epoch);
        }
    }

    /// Forgets `block`'s K/V (evicted, reclaimed by a sliding window, cleared).
    pub(crate) fn forget(&mut self, block: u32) {
        if self.name_of[block as usize].take().is_some() {
            self.named -= 1;
            self.epoch[block as usize] += 1;
        }
    }

    /// Forgets everything; returns the blocks that were named.
    pub(crate) fn clear(&mut self) -> Vec<u32> {
        self.by_name.clear();
        self.named = 0;
        (0..self.name_of.len() as u32)
            .filter(|&b| {
                let named = self.name_of[b as usize].take().is_some();
                if named {
                    self.epoch[b as usize] += 1;
                }
                named
            })
            .collect()
    }

    /// Blocks named now.
    pub(crate) fn len(&self) -> usize {
        self.named
    }

    /// Checks that the two maps agree: every named block is found by its name, the count is
    /// right, and stale entries are bounded.
    pub(crate) fn audit(&self) -> std::result::Result<(), String> {
        let mut named = 0;
        for (b, name) in self.name_of.iter().enumerate() {
            if let Some(name) = name {
                named += 1;
                if self.lookup(name) != Some(b as u32) {
                    return Err(format!(
                        "block {b} is named {name:?}, which finds {:?}",
                        self.lookup(name)
                    ));
                }
            }
        }
        if named != self.named {
            return Err(format!(
                "{named} blocks are named, the index counts {}",
                self.named
            ));
        }
        if self.by_name.len() > 2 * self.name_of.len() + 64 {
            return Err(format!(
                "{} names kept for {} blocks",
                self.by_name.len(),
                self.name_of.len()
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
    /// Full blocks of its prompt: named when committed; those after, when it is freed.
    pub(crate) prompt_blocks: usize,
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
