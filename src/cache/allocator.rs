//! The block allocator: a free list and a reference count per block.

use crate::error::{Error, Result};

/// Hands out blocks `0..num_blocks` and counts how many sequences hold each one.
///
/// A block is free exactly when its count is 0. `allocate` is all-or-nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockAllocator {
    /// Free block ids; popped from the end.
    free: Vec<u32>,
    /// Holders of each block.
    ref_counts: Vec<u32>,
}

impl BlockAllocator {
    /// All `num_blocks` blocks free (num_blocks at most `i32::MAX`: ids travel as i32).
    pub fn new(num_blocks: usize) -> Result<Self> {
        if num_blocks == 0 {
            return Err(Error::ZeroBlocks);
        }
        if num_blocks > i32::MAX as usize {
            return Err(Error::TooLarge {
                what: "num_blocks",
                value: num_blocks as u128,
                limit: i32::MAX as u128,
            });
        }
        // Reversed so that blocks are handed out in increasing order at first.
        Ok(Self {
            free: (0..num_blocks as u32).rev().collect(),
            ref_counts: vec![0; num_blocks],
        })
    }

    /// Blocks in the cache.
    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks nobody holds.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Holders of `block`.
    pub fn ref_count(&self, block: u32) -> u32 {
        self.ref_counts[block as usize]
    }

    /// `n` blocks, each with one holder, or `OutOfBlocks` and no change.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<u32>> {
        if n > self.free.len() {
            return Err(Error::OutOfBlocks {
                needed: n,
                free: self.free.len(),
            });
        }
        let blocks = self.free.split_off(self.free.len() - n);
        for &b in &blocks {
            self.ref_counts[b as usize] = 1;
        }
        Ok(blocks)
    }

    /// One more holder of a held block (a fork sharing it).
    pub(crate) fn retain(&mut self, block: u32) {
        debug_assert!(
            self.ref_counts[block as usize] > 0,
            "retain of free block {block}"
        );
        self.ref_counts[block as usize] += 1;
    }

    /// One holder fewer; the block is free again when none is left.
    pub(crate) fn release(&mut self, block: u32) {
        let count = &mut self.ref_counts[block as usize];
        debug_assert!(*count > 0, "release of free block {block}");
        *count -= 1;
        if *count == 0 {
            self.free.push(block);
        }
    }

    /// Checks the allocator's own invariants: every block is either free (count 0, listed once)
    /// or held (count > 0, not listed).
    pub fn audit(&self) -> std::result::Result<(), String> {
        let mut listed = vec![false; self.ref_counts.len()];
        for &b in &self.free {
            let slot = listed
                .get_mut(b as usize)
                .ok_or(format!("free list holds block {b} past the end"))?;
            if std::mem::replace(slot, true) {
                return Err(format!("block {b} is on the free list twice"));
            }
        }
        for (b, (&count, &is_free)) in self.ref_counts.iter().zip(&listed).enumerate() {
            if (count == 0) != is_free {
                return Err(format!(
                    "block {b}: ref count {count} but free-listed {is_free}"
                ));
            }
        }
        Ok(())
    }
}
