//! Prefix caching on the block manager: a sequence added with its prompt's token ids takes
//! over the cached blocks of its longest cached prefix; its full blocks become findable once
//! committed; token ids appended as they are sampled let decode-filled blocks be found too.

use crate::batch::MAX_CONTEXT_LEN;
use crate::cache::block_hash::BlockHash;
use crate::cache::manager::Sequence;
use crate::cache::prefix::{PrefixStats, SeqPrefix};
use crate::cache::{BlockManager, SeqId, StepPlan};
use crate::error::{Error, Result};

/// A sequence added with its prompt: its id, and how many of the prompt's tokens are already
/// computed (their K/V found in the cache). Plan the other `prompt.len() - computed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// The new sequence.
    pub seq: SeqId,
    /// Leading prompt tokens whose K/V it holds already: a multiple of the block size, and
    /// always less than the prompt's length (its last token's logits must be computed).
    pub computed: usize,
}

impl BlockManager {
    /// Switches prefix caching on (the default) or off. Off, sequences added with their
    /// prompts find nothing and name nothing; the prompt tokens are still counted.
    pub fn with_prefix_caching(mut self, enabled: bool) -> Self {
        self.prefix.enabled = enabled;
        self
    }

    /// Whether prefix caching is on.
    pub fn prefix_caching(&self) -> bool {
        self.prefix.enabled
    }

    /// What the pages' bytes mean for the same tokens (see
    /// [`page_identity`](crate::cache::page_identity)): it keys every chain, so blocks written
    /// under another identity are never found. A [`PagedCache`](crate::cache::PagedCache)
    /// sets it from its storage's dtypes and scales, again whenever the scales change. A
    /// change leaves the cached blocks cached (found again if the identity comes back), and
    /// the live sequences name no more blocks: their K/V were written under the old one.
    pub fn set_page_identity(&mut self, identity: BlockHash) {
        if identity != self.prefix.identity {
            self.prefix.identity = identity;
            self.stop_naming();
        }
    }

    /// The page identity chains are keyed on.
    pub fn page_identity(&self) -> BlockHash {
        self.prefix.identity
    }

    /// Live sequences name no more blocks; the pending plan will name nothing.
    fn stop_naming(&mut self) {
        self.pending = None;
        for s in self.sequences.values_mut() {
            s.prefix = None;
        }
    }

    /// A new sequence for a prompt of token ids `prompt`, under `salt` (a tenant, a LoRA
    /// adapter, a model revision: anything else that changes K/V; empty for none): it takes
    /// over the longest run of cached full blocks that match the prompt's leading blocks
    /// (their reference counts go up) and reports how many tokens they hold. Those are never
    /// the whole prompt: the block holding its last token is computed again, since that
    /// token's logits are needed. Plan the rest (`prompt.len() - computed` tokens); the
    /// sequence's full blocks become findable by later prompts once committed
    /// ([`commit`](BlockManager::commit)).
    ///
    /// It allocates nothing, so it cannot run out of blocks; the plan of the rest can (and
    /// then changes nothing, as every plan). A prompt of 0 tokens is a sequence with nothing
    /// cached. Errors: a prompt longer than [`MAX_CONTEXT_LEN`].
    ///
    /// ```
    /// use paged_gqa::cache::BlockManager;
    /// let mut cache = BlockManager::new(8, 4)?; // 8 blocks of 4 tokens
    /// let system: Vec<u32> = (100..110).collect(); // 10 tokens: 2 full blocks
    /// let first = cache.add_sequence_with_prompt(&system, b"tenant-a")?;
    /// assert_eq!(first.computed, 0);
    /// let plan = cache.plan(&[(first.seq, 10)])?;
    /// cache.commit(&plan)?; // its K/V written for every layer: blocks 0 and 1 findable
    ///
    /// let mut prompt = system.clone();
    /// prompt.extend([7, 8, 9]);
    /// let second = cache.add_sequence_with_prompt(&prompt, b"tenant-a")?;
    /// assert_eq!(second.computed, 8); // computes only its last 5 tokens
    /// assert_eq!(cache.block_table(second.seq)?, &cache.block_table(first.seq)?[..2]);
    /// // Another tenant's salt finds nothing.
    /// assert_eq!(cache.add_sequence_with_prompt(&prompt, b"tenant-b")?.computed, 0);
    /// assert_eq!(cache.prefix_stats().hit_tokens, 8);
    /// # Ok::<(), paged_gqa::Error>(())
    /// ```
    pub fn add_sequence_with_prompt(&mut self, prompt: &[u32], salt: &[u8]) -> Result<Admission> {
        Error::check_at_most(
            "prompt length",
            prompt.len() as u128,
            MAX_CONTEXT_LEN as u128,
        )?;
        self.prefix.prompt_tokens += prompt.len() as u64;
        if !self.prefix.enabled {
            let seq = self.add_sequence();
            return Ok(Admission { seq, computed: 0 });
        }
        let bs = self.block_size;
        let mut chain = BlockHash::root(&self.prefix.identity, salt);
        let mut blocks = Vec::new();
        // At most the blocks before the one holding the last token.
        for tokens in prompt[..prompt.len().saturating_sub(1)].chunks_exact(bs) {
            let name = BlockHash::block(&chain, tokens);
            let Some(block) = self.prefix.lookup(&name) else {
                break;
            };
            self.allocator.retain(block);
            blocks.push(block);
            chain = name;
        }
        let computed = blocks.len() * bs;
        self.prefix.hit_tokens += computed as u64;
        let seq = self.insert_sequence(Sequence {
            len: computed,
            reclaimed: 0,
            prefix: Some(SeqPrefix {
                chain,
                named: blocks.len(),
                prompt_blocks: prompt.len() / bs,
                tokens: prompt[computed..].to_vec(),
            }),
            blocks,
        });
        Ok(Admission { seq, computed })
    }

    /// Token ids `seq` will hold next, after those it knows (its prompt, then those appended
    /// before): a decoding engine appends each sampled token before the plan that computes
    /// it, so that the blocks decode fills are found by later prompts (the next turn of a
    /// chat). A sequence that names blocks must know the ids of every token it plans
    /// ([`Error::UnknownTokens`] otherwise); one that does not (added without its prompt,
    /// caching off, or no longer naming blocks) ignores them. Errors: an unknown or freed
    /// sequence, more than [`MAX_CONTEXT_LEN`] known tokens.
    pub fn append_tokens(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()> {
        let bs = self.block_size;
        // One lookup: engines call this for every sequence of every decode step.
        let Some(s) = self.sequences.get_mut(&seq) else {
            return Err(self.missing(seq));
        };
        let Some(prefix) = &mut s.prefix else {
            return Ok(());
        };
        let known = prefix.known(bs) + tokens.len();
        Error::check_at_most(
            "known tokens of the sequence",
            known as u128,
            MAX_CONTEXT_LEN as u128,
        )?;
        prefix.tokens.extend_from_slice(tokens);
        Ok(())
    }

    /// Declares `plan`'s K/V written for every layer: the full blocks of prompts its new
    /// tokens completed become findable (a [`PagedCache`](crate::cache::PagedCache) calls it
    /// itself when the write of a plan's last unwritten layer returns). Blocks filled past a
    /// prompt (by decoded tokens) become findable when their sequence is freed, which keeps
    /// hashing off decode steps; the next turn of a chat comes after that. A plan never
    /// committed (the step failed or was abandoned: the cache changed first) makes nothing
    /// findable, and the sequences it gave new tokens name no more blocks. Committing twice
    /// does nothing more. The plan stays valid. Errors: a stale plan ([`Error::StalePlan`]).
    pub fn commit(&mut self, plan: &StepPlan) -> Result<()> {
        self.check_plan(plan)?;
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        for seq in pending.filling {
            if let Some(s) = self.sequences.get_mut(&seq) {
                let prompt_blocks = s.prefix.as_ref().map_or(0, |p| p.prompt_blocks);
                let upto = (s.len / self.block_size).min(prompt_blocks);
                s.name_blocks(&mut self.prefix, self.block_size, upto);
            }
        }
        Ok(())
    }

    /// Forgets every cached block (after a weight reload, say): the parked ones are free
    /// again, and the live sequences name no more blocks (their K/V predate the clear).
    pub fn clear_prefix_cache(&mut self) {
        for block in self.prefix.clear() {
            self.allocator.unpark(block);
        }
        self.stop_naming();
    }

    /// The prefix cache's counters.
    pub fn prefix_stats(&self) -> PrefixStats {
        PrefixStats {
            prompt_tokens: self.prefix.prompt_tokens,
            hit_tokens: self.prefix.hit_tokens,
            evictions: self.prefix.evictions,
            cached_blocks: self.prefix.len(),
            parked_blocks: self.allocator.num_parked(),
        }
    }

    /// The block holding the K/V named `name`, if cached.
    pub fn cached_block(&self, name: &BlockHash) -> Option<u32> {
        self.prefix.lookup(name)
    }

    /// The name of the K/V `block` holds, if cached (`None` too for a block out of range).
    pub fn block_name(&self, block: u32) -> Option<BlockHash> {
        self.prefix.name_of(block)
    }

    /// The cached blocks nobody holds, in eviction order (least recently used first).
    pub fn parked_blocks(&self) -> Vec<u32> {
        self.allocator.parked().collect()
    }
}
