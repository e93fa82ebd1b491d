//! Sequences, their block tables, fork with copy-on-write, and the per-step reservation.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::batch::{SeqLens, MAX_CONTEXT_LEN, MAX_TOKENS};
use crate::cache::block_hash::BlockHash;
use crate::cache::prefix::{PrefixIndex, SeqPrefix};
use crate::cache::{BlockAllocator, PlanStamp, StepPlan};
use crate::error::{Error, Result};

/// Identifies a sequence of one cache. Ids are never reused, so a freed id stays an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Sequence {
    /// Tokens written (or reserved by the last plan).
    pub(super) len: usize,
    /// Leading pages given back because the sliding window no longer sees them.
    pub(super) reclaimed: usize,
    /// The pages it holds, in token order: token t lives in blocks[t / block_size - reclaimed].
    pub(super) blocks: Vec<u32>,
    /// Its chain of block names, for a sequence added with its token ids while prefix caching
    /// is on; `None` otherwise, and once it can no longer name blocks safely (a plan of it was
    /// abandoned, the page identity changed, the window reclaimed its first pages).
    pub(super) prefix: Option<SeqPrefix>,
}

impl Sequence {
    /// Names its full blocks from its first unnamed one up to block `upto` (their K/V written
    /// and committed) in `index`, if it names blocks at all (`bs`: the block size).
    pub(super) fn name_blocks(&mut self, index: &mut PrefixIndex, bs: usize, upto: usize) {
        let Some(prefix) = &mut self.prefix else {
            return;
        };
        let first = prefix.named;
        if upto <= first {
            return;
        }
        for (i, tokens) in (first..upto).zip(prefix.tokens.chunks_exact(bs)) {
            let name = BlockHash::block(&prefix.chain, tokens);
            // Sequences that name blocks have reclaimed none: block i is blocks[i].
            index.insert(name, self.blocks[i]);
            prefix.chain = name;
        }
        prefix.named = upto;
        prefix.tokens.drain(..(upto - first) * bs);
    }
}

impl Sequence {
    /// Pages its tokens span, reclaimed ones included.
    fn spanned_blocks(&self) -> usize {
        self.reclaimed + self.blocks.len()
    }
}

/// The sequences of the last plan, until its K/V are written for every layer
/// ([`BlockManager::commit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PendingCommit {
    /// The generation the plan was made in.
    pub(super) generation: u64,
    /// Sequences that name blocks and got new tokens, with their length before: should the
    /// plan be abandoned, they hold unwritten slots past it and name nothing more.
    pub(super) touched: Vec<(SeqId, usize)>,
    /// Of those, the ones whose new tokens fill a block of their prompt: named when the plan
    /// is committed.
    pub(super) filling: Vec<SeqId>,
}

/// Unique id of each manager, so a plan from one cache is rejected by another.
static NEXT_CACHE_ID: AtomicU64 = AtomicU64::new(1);

/// The bookkeeping of a paged cache: which blocks each sequence holds, shared blocks' counts,
/// and the reservation of slots for each step. Knows nothing of where the pages live.
///
/// It is also the prefix cache (on unless [`with_prefix_caching`](BlockManager::with_prefix_caching)
/// turns it off): a sequence added with its prompt's token ids
/// ([`add_sequence_with_prompt`](BlockManager::add_sequence_with_prompt)) takes over the
/// blocks of its longest cached prefix; the full prompt blocks of a plan become findable when
/// it is [`commit`](BlockManager::commit)ted, those filled by decoded tokens when their
/// sequence is freed; a freed sequence's cached blocks are parked, and
/// evicted least recently used first once no free block is left.
///
/// ```
/// use paged_gqa::cache::BlockManager;
/// let mut cache = BlockManager::new(8, 16)?; // 8 blocks of 16 tokens
/// let a = cache.add_sequence();
/// let plan = cache.plan(&[(a, 20)])?; // prefill 20 tokens: 2 blocks
/// assert_eq!(plan.slot_mapping()[16], plan.block_tables()[1] as i64 * 16);
/// let b = cache.fork(a)?; // shares both blocks
/// assert_eq!(cache.num_free_blocks(), 6);
/// let plan = cache.plan(&[(a, 1), (b, 1)])?; // a copies the shared partial block
/// assert_eq!(plan.block_copies().len(), 1);
/// cache.free(a)?;
/// assert!(cache.plan(&[(a, 1)]).is_err()); // freed
/// # Ok::<(), paged_gqa::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockManager {
    id: u64,
    generation: u64,
    pub(super) block_size: usize,
    pub(super) allocator: BlockAllocator,
    pub(super) sequences: BTreeMap<SeqId, Sequence>,
    pub(super) next_seq: u64,
    /// Every query attends with this window_left: pages it can no longer see are reclaimed.
    reclaim_window: Option<usize>,
    /// The prefix cache's names and counters.
    pub(super) prefix: PrefixIndex,
    /// The last plan, until committed.
    pub(super) pending: Option<PendingCommit>,
}

impl BlockManager {
    /// `num_blocks` free pages of `block_size` tokens (any positive size here; storage
    /// configurations restrict it to the sizes kernels take).
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self> {
        if block_size == 0 {
            return Err(Error::ZeroBlockSize);
        }
        Ok(Self {
            id: NEXT_CACHE_ID.fetch_add(1, Ordering::Relaxed),
            generation: 0,
            block_size,
            allocator: BlockAllocator::new(num_blocks)?,
            sequences: BTreeMap::new(),
            next_seq: 0,
            reclaim_window: None,
            prefix: PrefixIndex::new(num_blocks),
            pending: None,
        })
    }

    /// Gives pages back once no query can see them: for a cache whose every layer attends with
    /// a sliding window of `window_left` (Mistral-7B-v0.1: 4095), each plan releases the pages
    /// of a sequence that lie wholly before its first new token's window start,
    /// `position - window_left`. Their block table entries become `-1` (never read), shared pages
    /// are released by each holder in turn, and plans stay all-or-nothing (pages the plan
    /// reclaims count as free for it). Attention with a wider window, or none, over such a
    /// sequence is then an error ([`Error::ReclaimedBlockVisible`]).
    ///
    /// ```
    /// use paged_gqa::cache::BlockManager;
    /// let mut cache = BlockManager::new(8, 16)?.reclaiming(15); // window of 16 keys
    /// let a = cache.add_sequence();
    /// cache.plan(&[(a, 48)])?; // 3 pages
    /// let plan = cache.plan(&[(a, 1)])?; // position 48 sees keys 33..=48: pages 2 and 3
    /// assert_eq!(&plan.block_tables()[..2], &[-1, -1]);
    /// assert_eq!(cache.num_free_blocks(), 6);
    /// # Ok::<(), paged_gqa::Error>(())
    /// ```
    pub fn reclaiming(mut self, window_left: usize) -> Self {
        self.reclaim_window = Some(window_left);
        self
    }

    /// The window pages are reclaimed for, if any.
    pub fn reclaim_window(&self) -> Option<usize> {
        self.reclaim_window
    }

    /// Leading pages of `seq` the window no longer sees, already given back.
    pub fn reclaimed_blocks(&self, seq: SeqId) -> Result<usize> {
        Ok(self.sequence(seq)?.reclaimed)
    }

    /// Leading pages of `s` a step starting at its current length may reclaim.
    fn reclaimable(&self, s: &Sequence) -> usize {
        self.reclaim_window.map_or(0, |window| {
            (s.len.saturating_sub(window) / self.block_size).saturating_sub(s.reclaimed)
        })
    }

    /// Tokens per page.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Pages in the cache.
    pub fn num_blocks(&self) -> usize {
        self.allocator.num_blocks()
    }

    /// Pages nobody holds.
    pub fn num_free_blocks(&self) -> usize {
        self.allocator.num_free()
    }

    /// Sequences holding `block` (0 when free).
    pub fn ref_count(&self, block: u32) -> u32 {
        self.allocator.ref_count(block)
    }

    /// The live sequences, in id order.
    pub fn sequences(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.sequences.keys().copied()
    }

    /// The current state; plans carry the one they were made in.
    pub fn stamp(&self) -> PlanStamp {
        PlanStamp {
            cache: self.id,
            generation: self.generation,
        }
    }

    /// `Ok` when `plan` was made by this manager in its current state.
    pub fn check_plan(&self, plan: &StepPlan) -> Result<()> {
        let now = self.stamp();
        if plan.stamp != now {
            return Err(Error::StalePlan {
                plan_cache: plan.stamp.cache,
                plan_generation: plan.stamp.generation,
                cache: now.cache,
                generation: now.generation,
            });
        }
        Ok(())
    }

    /// Every change but a commit: the last plan, if not committed, is abandoned.
    pub(super) fn changed(&mut self) {
        self.settle();
        self.generation += 1;
    }

    /// Abandons the pending plan, if any: the sequences it gave new tokens may hold slots
    /// never written, so they name their blocks written before it and no more.
    pub(super) fn settle(&mut self) {
        if let Some(pending) = self.pending.take() {
            for (seq, committed) in pending.touched {
                if let Some(s) = self.sequences.get_mut(&seq) {
                    // What was committed before the plan is written: its full blocks count.
                    s.name_blocks(
                        &mut self.prefix,
                        self.block_size,
                        committed / self.block_size,
                    );
                    s.prefix = None;
                }
            }
        }
    }

    /// `n` blocks with one holder each, evicting cached ones if need be (all-or-nothing).
    pub(super) fn allocate(&mut self, n: usize) -> Result<Vec<u32>> {
        let prefix = &mut self.prefix;
        self.allocator.allocate(n, |b| {
            prefix.forget(b);
            prefix.evictions += 1;
        })
    }

    /// One holder fewer of `block`; parked (still findable) when it holds cached K/V.
    pub(super) fn release(&mut self, block: u32) {
        let cached = self.prefix.is_cached(block);
        self.allocator.release(block, cached);
    }

    pub(super) fn sequence(&self, seq: SeqId) -> Result<&Sequence> {
        self.sequences.get(&seq).ok_or_else(|| self.missing(seq))
    }

    /// The error for `seq`, which is not live: freed, or never handed out.
    pub(super) fn missing(&self, seq: SeqId) -> Error {
        if seq.0 < self.next_seq {
            Error::FreedSequence { seq: seq.0 }
        } else {
            Error::UnknownSequence { seq: seq.0 }
        }
    }

    /// A new, empty sequence (which names no blocks for the prefix cache: see
    /// [`add_sequence_with_prompt`](BlockManager::add_sequence_with_prompt)).
    pub fn add_sequence(&mut self) -> SeqId {
        self.insert_sequence(Sequence {
            len: 0,
            reclaimed: 0,
            blocks: Vec::new(),
            prefix: None,
        })
    }

    /// Adds `s` under a new id.
    pub(super) fn insert_sequence(&mut self, s: Sequence) -> SeqId {
        self.changed();
        let id = SeqId(self.next_seq);
        self.next_seq += 1;
        self.sequences.insert(id, s);
        id
    }

    /// Tokens in `seq`.
    pub fn len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.sequence(seq)?.len)
    }

    /// The pages `seq` holds, in token order (after its
    /// [`reclaimed_blocks`](BlockManager::reclaimed_blocks) leading pages, if any).
    pub fn block_table(&self, seq: SeqId) -> Result<&[u32]> {
        Ok(&self.sequence(seq)?.blocks)
    }

    /// A new sequence sharing every block of `parent` (parallel sampling, beam search). The
    /// partially filled last block is copied later, by the first plan that writes into it.
    /// A forked sequence names blocks as its parent does, from the parent's chain on.
    pub fn fork(&mut self, parent: SeqId) -> Result<SeqId> {
        self.sequence(parent)?;
        self.settle(); // first: the child inherits whether the parent can name blocks
        let child = self.sequences[&parent].clone();
        for &b in &child.blocks {
            self.allocator.retain(b);
        }
        Ok(self.insert_sequence(child))
    }

    /// Releases every block of `seq`; its id becomes an error. Its full blocks not yet named
    /// (filled by decoded tokens) are named first, if its K/V are all committed; its cached
    /// blocks stay findable, parked, last block first: the deepest block of a chain is evicted
    /// before its parents.
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        self.sequence(seq)?;
        self.changed(); // an uncommitted plan of it: it names nothing
        let mut removed = self.sequences.remove(&seq).unwrap();
        let full = removed.len / self.block_size;
        removed.name_blocks(&mut self.prefix, self.block_size, full);
        for &b in removed.blocks.iter().rev() {
            self.release(b);
        }
        Ok(())
    }

    /// Whether the next token of `seq` goes into a partially filled block others share.
    fn needs_copy(&self, seq: &Sequence, pending_releases: &HashMap<u32, u32>) -> bool {
        let Some(&last) = seq.blocks.last() else {
            return false;
        };
        seq.len % self.block_size != 0
            && self.allocator.ref_count(last) - pending_releases.get(&last).copied().unwrap_or(0)
                > 1
    }

    /// How many more tokens `seq` can take with the blocks free now.
    pub fn capacity(&self, seq: SeqId) -> Result<usize> {
        let s = self.sequence(seq)?;
        let free_tokens = self.allocator.num_free() * self.block_size;
        let filled = s.len % self.block_size;
        Ok(if self.needs_copy(s, &HashMap::new()) {
            // The shared partial block is replaced by a private copy holding `filled` tokens.
            free_tokens.saturating_sub(filled)
        } else if filled == 0 {
            free_tokens
        } else {
            free_tokens + self.block_size - filled
        })
    }

    /// Reserves slots for one step: `batch` lists each sequence once with the number of new
    /// tokens it brings. All-or-nothing: on `OutOfBlocks` (or any error) nothing changes.
    pub fn plan(&mut self, batch: &[(SeqId, usize)]) -> Result<StepPlan> {
        // 1. Validate and count the blocks needed, changing nothing.
        let mut seen = HashSet::with_capacity(batch.len());
        let mut pending_releases: HashMap<u32, u32> = HashMap::new();
        // Pages the window lets go of this step, with how many holders let go of each.
        let mut reclaims: HashMap<u32, u32> = HashMap::new();
        let mut needed = 0usize;
        let mut new_rows = 0usize;
        for &(seq, new_tokens) in batch {
            if !seen.insert(seq) {
                return Err(Error::DuplicateSequence { seq: seq.0 });
            }
            let s = self.sequence(seq)?;
            let total = s
                .len
                .checked_add(new_tokens)
                .filter(|&t| t <= MAX_CONTEXT_LEN)
                .ok_or(Error::TooLarge {
                    what: "sequence length",
                    value: s.len as u128 + new_tokens as u128,
                    limit: MAX_CONTEXT_LEN as u128,
                })?;
            if let Some(prefix) = &s.prefix {
                let known = prefix.known(self.block_size);
                if total > known {
                    return Err(Error::UnknownTokens {
                        seq: seq.0,
                        needed: total,
                        known,
                    });
                }
            }
            new_rows += new_tokens;
            if new_tokens > 0 {
                for &b in &s.blocks[..self.reclaimable(s)] {
                    *reclaims.entry(b).or_default() += 1;
                }
            }
            if new_tokens > 0 && self.needs_copy(s, &pending_releases) {
                *pending_releases
                    .entry(*s.blocks.last().unwrap())
                    .or_default() += 1;
                needed += 1;
            }
            needed += total.div_ceil(self.block_size) - s.spanned_blocks();
        }
        // A reclaimed page is free once every holder let go (never a page being copied: those
        // are partial last pages, and reclaimed pages are full).
        let reclaimed_free = reclaims
            .iter()
            .filter(|&(&b, &n)| self.allocator.ref_count(b) == n)
            .count();
        // The step's SeqLens (built below, where nothing may fail any more) takes these limits.
        Error::check_at_most(
            "new tokens of the step",
            new_rows as u128,
            MAX_TOKENS as u128,
        )?;
        if needed > self.allocator.num_free() + reclaimed_free {
            return Err(Error::OutOfBlocks {
                needed,
                free: self.allocator.num_free() + reclaimed_free,
            });
        }

        // 2. Reserve: cannot fail from here on.
        let mut block_copies = Vec::new();
        let mut slot_mapping = Vec::new();
        let (mut context_lens, mut query_lens) = (
            Vec::with_capacity(batch.len()),
            Vec::with_capacity(batch.len()),
        );
        // The last plan, if not committed, is abandoned now.
        self.settle();
        // Reclaimed pages first, so the allocations below can take them. They are never found
        // again (nor are the blocks after them: a chain is looked up from its first block).
        for &(seq, new_tokens) in batch {
            let s = &self.sequences[&seq];
            let n = if new_tokens > 0 {
                self.reclaimable(s)
            } else {
                0
            };
            if n == 0 {
                continue;
            }
            let mut s = self.sequences.remove(&seq).unwrap();
            for b in s.blocks.drain(..n) {
                self.prefix.forget(b);
                self.release(b);
            }
            s.reclaimed += n;
            s.prefix = None;
            self.sequences.insert(seq, s);
        }
        let mut touched = Vec::with_capacity(if self.prefix.enabled { batch.len() } else { 0 });
        let mut filling = Vec::new();
        for &(seq, new_tokens) in batch {
            let mut s = self.sequences.remove(&seq).unwrap();
            if new_tokens > 0 && self.needs_copy(&s, &HashMap::new()) {
                let old = s.blocks.pop().unwrap();
                let new = self.allocate(1).expect("counted above")[0];
                self.release(old);
                block_copies.push([old as i32, new as i32]);
                s.blocks.push(new);
            }
            let (committed, total) = (s.len, s.len + new_tokens);
            let more = total.div_ceil(self.block_size) - s.spanned_blocks();
            s.blocks.extend(self.allocate(more).expect("counted above"));
            for pos in s.len..total {
                let block = s.blocks[pos / self.block_size - s.reclaimed] as i64;
                slot_mapping.push(block * self.block_size as i64 + (pos % self.block_size) as i64);
            }
            s.len = total;
            if let (Some(prefix), true) = (&s.prefix, new_tokens > 0) {
                touched.push((seq, committed));
                if (total / self.block_size).min(prefix.prompt_blocks) > prefix.named {
                    filling.push(seq);
                }
            }
            context_lens.push(total);
            query_lens.push(new_tokens);
            self.sequences.insert(seq, s);
        }
        self.changed();
        if !touched.is_empty() {
            self.pending = Some(PendingCommit {
                generation: self.generation,
                touched,
                filling,
            });
        }

        let max_blocks = batch
            .iter()
            .map(|(seq, _)| self.sequences[seq].spanned_blocks())
            .max()
            .unwrap_or(0);
        let mut block_tables = vec![-1i32; batch.len() * max_blocks];
        let reclaimed: Vec<usize> = batch
            .iter()
            .map(|(seq, _)| self.sequences[seq].reclaimed)
            .collect();
        for (row, (seq, _)) in block_tables.chunks_mut(max_blocks.max(1)).zip(batch) {
            let s = &self.sequences[seq];
            for (entry, &b) in row[s.reclaimed..].iter_mut().zip(&s.blocks) {
                *entry = b as i32;
            }
        }
        Ok(StepPlan {
            stamp: self.stamp(),
            seqs: batch.iter().map(|&(seq, _)| seq).collect(),
            lens: SeqLens::new(&context_lens, &query_lens)?,
            block_tables,
            max_blocks,
            slot_mapping,
            block_copies,
            reclaimed,
        })
    }

    /// Checks every invariant: the allocator's own, each block's count equals the number of
    /// sequences holding it, each sequence holds exactly the blocks its length needs, a block
    /// is parked exactly when it is cached and nobody holds it, and the prefix index agrees
    /// with itself.
    pub fn audit(&self) -> std::result::Result<(), String> {
        self.allocator.audit()?;
        let mut holders = vec![0u32; self.allocator.num_blocks()];
        for (id, s) in &self.sequences {
            if s.spanned_blocks() != s.len.div_ceil(self.block_size) {
                return Err(format!(
                    "sequence {id}: {} tokens in {} blocks ({} reclaimed)",
                    s.len,
                    s.spanned_blocks(),
                    s.reclaimed
                ));
            }
            if let Some(window) = self.reclaim_window {
                // Every page a future query could see is held.
                let first_needed = s.len.saturating_sub(window) / self.block_size;
                if s.reclaimed > first_needed {
                    return Err(format!(
                        "sequence {id}: {} pages reclaimed, but its next query sees page {first_needed}",
                        s.reclaimed
                    ));
                }
            }
            for &b in &s.blocks {
                holders[b as usize] += 1;
            }
            if let Some(prefix) = &s.prefix {
                let known = prefix.known(self.block_size);
                if s.reclaimed > 0 || prefix.named * self.block_size > s.len || known < s.len {
                    return Err(format!(
                        "sequence {id}: {} tokens ({} reclaimed pages), {} blocks named, {known} token ids known",
                        s.len, s.reclaimed, prefix.named
                    ));
                }
            }
        }
        for (b, &n) in holders.iter().enumerate() {
            let count = self.allocator.ref_count(b as u32);
            if count != n {
                return Err(format!(
                    "block {b}: ref count {count}, held by {n} sequences"
                ));
            }
            // Parked exactly when cached and held by nobody.
            let (parked, cached) = (
                self.allocator.is_parked(b as u32),
                self.prefix.is_cached(b as u32),
            );
            if parked != (cached && n == 0) {
                return Err(format!(
                    "block {b}: parked {parked}, cached {cached}, held by {n} sequences"
                ));
            }
        }
        self.prefix.audit()
    }
}
