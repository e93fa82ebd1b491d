//! Block tables: for each sequence, the pages that hold its tokens in order.

use crate::batch::SeqLens;
use crate::cache::PagedLayout;
use crate::error::{Error, Result};
use crate::variants::KeyMask;

/// Block tables `[batch, max_blocks]` (i32, row-major), checked against a cache layout and a
/// batch: every entry a sequence uses (`ceil(context_len / block_size)` of them) is a block id
/// in `0..num_blocks`, except a leading run of `-1` (never the last page): pages a sliding
/// window no longer sees,
/// reclaimed (see [`CacheConfig::with_reclaim_window`](crate::cache::CacheConfig::with_reclaim_window)).
/// Attention checks that no query row sees keys of a reclaimed page
/// ([`check_visible`](BlockTables::check_visible)). Entries past those are padding, never read.
///
/// Token `t` of sequence `s` lives in block `block(s, t / block_size)`, slot `t % block_size`.
///
/// ```
/// use paged_gqa::{BlockTables, GqaShape, PagedLayout, SeqLens};
/// let layout = PagedLayout::new(GqaShape::new(8, 2, 64)?, 4, 16)?;
/// let lens = SeqLens::decode(&[20, 3])?;
/// let tables = BlockTables::new(&[2, 0, 3, -1], 2, &layout, &lens)?;
/// assert_eq!(tables.block(0, 1), 0);
/// assert!(BlockTables::new(&[2, 9, 3, -1], 2, &layout, &lens).is_err()); // block 9 of 4
/// # Ok::<(), paged_gqa::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct BlockTables<'a> {
    /// [batch, max_blocks]
    table: &'a [i32],
    max_blocks: usize,
    block_size: usize,
    /// [batch]: leading -1 entries (reclaimed pages) of each sequence's row.
    reclaimed: Vec<usize>,
}

impl<'a> BlockTables<'a> {
    /// Validates `table` (`[lens.batch(), max_blocks]`) against `layout` and `lens`.
    pub fn new(
        table: &'a [i32],
        max_blocks: usize,
        layout: &PagedLayout,
        lens: &SeqLens,
    ) -> Result<Self> {
        let expected = lens.batch() * max_blocks;
        Error::check_len("block_tables", table.len(), expected)?;
        let block_size = layout.block_size();
        let mut reclaimed = Vec::with_capacity(lens.batch());
        for seq in 0..lens.batch() {
            let context_len = lens.context_len(seq);
            let needed_blocks = context_len.div_ceil(block_size);
            if needed_blocks > max_blocks {
                return Err(Error::ContextExceedsBlockTable {
                    seq,
                    context_len,
                    block_size,
                    needed_blocks,
                    max_blocks,
                });
            }
            let row = &table[seq * max_blocks..][..needed_blocks];
            // Reclaimed pages lead; the last page holds the newest key, which some row always
            // sees, so it is never one of them.
            let leading = row
                .iter()
                .take_while(|&&b| b == -1)
                .count()
                .min(needed_blocks.saturating_sub(1));
            reclaimed.push(leading);
            for (index, &block_id) in row.iter().enumerate().skip(leading) {
                if block_id < 0 || block_id as usize >= layout.num_blocks() {
                    return Err(Error::BlockIdOutOfRange {
                        seq,
                        index,
                        block_id: block_id.into(),
                        num_blocks: layout.num_blocks(),
                    });
                }
            }
        }
        Ok(Self {
            table,
            max_blocks,
            block_size,
            reclaimed,
        })
    }

    /// Leading reclaimed (`-1`) pages of each sequence, `[batch]`.
    pub fn reclaimed(&self) -> &[usize] {
        &self.reclaimed
    }

    /// Checks that no query row of `lens` sees a key of a reclaimed page under `mask`.
    pub fn check_visible(&self, lens: &SeqLens, mask: KeyMask) -> Result<()> {
        check_reclaimed_invisible(&self.reclaimed, self.block_size, lens, mask)
    }

    /// Entries per sequence row.
    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// The whole table, `[batch, max_blocks]`.
    pub fn as_slice(&self) -> &'a [i32] {
        self.table
    }

    /// Block id of the `index`-th page of sequence `seq` (validated when `index` is a page the
    /// sequence uses and not reclaimed).
    pub fn block(&self, seq: usize, index: usize) -> usize {
        self.table[seq * self.max_blocks + index] as usize
    }
}

/// `Err(ReclaimedBlockVisible)` when a query row of `lens` would see a key of one of the
/// `reclaimed[seq]` leading pages (of `block_size` keys) of its sequence under `mask`.
pub(crate) fn check_reclaimed_invisible(
    reclaimed: &[usize],
    block_size: usize,
    lens: &SeqLens,
    mask: KeyMask,
) -> Result<()> {
    for (seq, &pages) in reclaimed.iter().enumerate() {
        if pages == 0 || lens.query_len(seq) == 0 {
            continue;
        }
        let first_visible_key = mask.first_visible_key(lens.context_len(seq), lens.query_len(seq));
        if first_visible_key < pages * block_size {
            return Err(Error::ReclaimedBlockVisible {
                seq,
                index: first_visible_key / block_size,
                block_size,
                first_visible_key,
            });
        }
    }
    Ok(())
}
