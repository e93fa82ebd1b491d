//! The block allocator: a reference count per block, the free blocks, and the cached blocks
//! nobody holds, queued least recently used first.

use crate::cache::lru::Lru;
use crate::error::{Error, Result};

/// Hands out blocks `0..num_blocks` and counts how many sequences hold each one.
///
/// A block nobody holds (count 0) is either *free* or *parked*: parked blocks hold K/V the
/// prefix cache can still hand to a new sequence, and wait in least-recently-used order.
/// [`allocate`](BlockAllocator::allocate) takes free blocks first, then evicts parked ones,
/// oldest first, and is all-or-nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockAllocator {
    /// Free block ids (holding nothing worth keeping); popped from the end.
    free: Vec<u32>,
    /// Cached blocks nobody holds, least recently used first.
    parked: Lru,
    /// Holders of each block.
    ref_counts: Vec<u32>,
}

impl BlockAllocator {
    /// All `num_blocks` blocks free (num_blocks at most `i32::MAX`: ids travel as i32).
    pub fn new(num_blocks: usize) -> Result<Self> {
        if num_blocks == 0 {
            return Err(Error::ZeroBlocks);
        }
        Error::check_at_most("num_blocks", num_blocks as u128, i32::MAX as u128)?;
        // Reversed so that blocks are handed out in increasing order at first.
        Ok(Self {
            free: (0..num_blocks as u32).rev().collect(),
            parked: Lru::new(num_blocks),
            ref_counts: vec![0; num_blocks],
        })
    }

    /// Blocks in the cache.
    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks nobody holds, free or parked: what an allocation can take.
    pub fn num_free(&self) -> usize {
        self.free.len() + self.parked.len()
    }

    /// Cached blocks nobody holds (evicted by allocation once no free block is left).
    pub fn num_parked(&self) -> usize {
        self.parked.len()
    }

    /// The parked blocks, the next one evicted first.
    pub fn parked(&self) -> impl Iterator<Item = u32> + '_ {
        self.parked.iter()
    }

    /// Holders of `block`.
    pub fn ref_count(&self, block: u32) -> u32 {
        self.ref_counts[block as usize]
    }

    /// `n` blocks, each with one holder: free blocks first, then parked ones, least recently
    /// used first (`evicted` is called with each: the caller forgets what they held). Or
    /// `OutOfBlocks` and no change.
    pub fn allocate(&mut self, n: usize, mut evicted: impl FnMut(u32)) -> Result<Vec<u32>> {
        if n > self.num_free() {
            return Err(Error::OutOfBlocks {
                needed: n,
                free: self.num_free(),
            });
        }
        let from_free = n.min(self.free.len());
        let mut blocks = self.free.split_off(self.free.len() - from_free);
        while blocks.len() < n {
            let b = self.parked.pop_front().expect("counted above");
            evicted(b);
            blocks.push(b);
        }
        for &b in &blocks {
            self.ref_counts[b as usize] = 1;
        }
        Ok(blocks)
    }

    /// One more holder of a held or parked block (a fork sharing it, a prefix-cache hit).
    pub(crate) fn retain(&mut self, block: u32) {
        let count = &mut self.ref_counts[block as usize];
        if *count == 0 {
            debug_assert!(self.parked.contains(block), "retain of free block {block}");
            self.parked.remove(block);
        }
        *count += 1;
    }

    /// One holder fewer; once none is left the block is parked (`cached`: its K/V may be
    /// found again) as the most recently used, or free.
    pub(crate) fn release(&mut self, block: u32, cached: bool) {
        let count = &mut self.ref_counts[block as usize];
        debug_assert!(*count > 0, "release of free block {block}");
        *count -= 1;
        if *count == 0 {
            if cached {
                self.parked.push_back(block);
            } else {
                self.free.push(block);
            }
        }
    }

    /// A block whose K/V were forgotten: free if it was parked (held blocks are unaffected).
    pub(crate) fn unpark(&mut self, block: u32) {
        if self.parked.contains(block) {
            self.parked.remove(block);
            self.free.push(block);
        }
    }

    /// Whether `block` is parked.
    pub(crate) fn is_parked(&self, block: u32) -> bool {
        self.parked.contains(block)
    }

    /// Checks the allocator's own invariants: every block is either free or parked (count 0,
    /// listed once, in one of the two) or held (count > 0, listed in neither).
    pub fn audit(&self) -> std::result::Result<(), String> {
        let mut listed = vec![false; self.ref_counts.len()];
        for b in self.free.iter().copied().chain(self.parked.iter()) {
            let slot = listed
                .get_mut(b as usize)
                .ok_or(format!("free list holds block {b} past the end"))?;
            if std::mem::replace(slot, true) {
                return Err(format!("block {b} is free or parked twice"));
            }
        }
        if self.parked.iter().count() != self.parked.len() {
            return Err(format!(
                "parked queue walks {} blocks but counts {}",
                self.parked.iter().count(),
                self.parked.len()
            ));
        }
        for (b, (&count, &is_free)) in self.ref_counts.iter().zip(&listed).enumerate() {
            if (count == 0) != is_free {
                return Err(format!(
                    "block {b}: ref count {count} but free or parked {is_free}"
                ));
            }
        }
        Ok(())
    }
}
