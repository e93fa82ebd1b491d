//! Property test of prefix caching over the CPU pages: 10^5 random operations (add with
//! prompts drawn from a few shared prefixes and salts, add without, plan + write in chunks and
//! decode steps, steps abandoned part-written, fork, free, clear, eviction under pressure,
//! OutOfBlocks), checked after every one against a plain model; and 4 x 10^4 more over caches
//! whose sliding window reclaims pages.
//!
//! The K/V written for a token is a function of everything that determines it in a real model:
//! the salt (an adapter), every token up to it, its position, and the layer. So a block matched
//! under the wrong salt, after the wrong prefix, or before all its layers were written reads back
//! wrong. After every operation: each live sequence's pages hold exactly its own tokens' K/V
//! (but for slots of abandoned steps, never written), the bookkeeping's invariants hold (no
//! block leaked, reference counts equal the holders, a block parked exactly when cached and
//! unheld), the counters agree with the model, and OutOfBlocks changes nothing.

mod common;

use std::collections::BTreeMap;

use paged_gqa::cache::{PagedCache, SeqId};
use paged_gqa::cpu::CpuStorage;
use paged_gqa::{Error, GqaShape};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, IteratorRandom};
use rand::Rng;

const OPERATIONS: usize = 100_000;
const NUM_BLOCKS: usize = 32;
const NUM_LAYERS: usize = 2;
const MAX_LIVE: usize = 8;
const SALTS: [&[u8]; 3] = [b"", b"tenant-a", b"tenant-b"];
/// Token ids are drawn from a small vocabulary, so unrelated prompts share blocks too.
const VOCAB: u32 = 4;

fn shape() -> GqaShape {
    GqaShape::new(4, 2, 8).unwrap()
}

/// A 32-bit mix (splitmix64's finaliser).
fn mix(a: u32, b: u32) -> u32 {
    let mut z = ((a as u64) << 32 | b as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32
}

/// The K row of the token whose prefix (salt and every token up to it) digests to `prefix`, at
/// `layer`: `[n_kv_heads, head_dim]`. V is its complement.
fn k_row(prefix: u32, layer: usize) -> impl Iterator<Item = u32> {
    let row = shape().kv_row_len() as u32;
    (0..row).map(move |e| mix(prefix, (layer as u32) << 16 | e))
}

/// A live sequence as the model sees it.
#[derive(Clone)]
struct Model {
    /// The salt's index in SALTS.
    salt: usize,
    /// Digest of (salt, tokens[..=t]) for each token t planned so far.
    prefix: Vec<u32>,
    /// Token ids known but not yet planned (the prompt's rest, then sampled tokens).
    pending: Vec<u32>,
    /// Whether each planned token's slot was written for every layer.
    written: Vec<bool>,
}

impl Model {
    fn new(salt: usize) -> Self {
        Self {
            salt,
            prefix: Vec::new(),
            pending: Vec::new(),
            written: Vec::new(),
        }
    }

    /// Plans the next `n` pending tokens; returns their prefix digests.
    fn plan(&mut self, n: usize) -> Vec<u32> {
        let new: Vec<u32> = self.pending.drain(..n).collect();
        let start = self.prefix.len();
        for token in new {
            let last = self
                .prefix
                .last()
                .copied()
                .unwrap_or(mix(0xdead, self.salt as u32));
            self.prefix.push(mix(last, token));
            self.written.push(true);
        }
        self.prefix[start..].to_vec()
    }
}

struct Harness {
    cache: PagedCache<CpuStorage<u32>>,
    model: BTreeMap<SeqId, Model>,
    /// The shared prompt prefixes (token ids) prompts start with.
    prefixes: Vec<Vec<u32>>,
    prompt_tokens: u64,
    out_of_blocks: usize,
    abandoned: usize,
    steps: usize,
}

impl Harness {
    fn new(rng: &mut StdRng, block_size: usize, window: Option<usize>) -> Self {
        let cache = common::property_cache(shape(), NUM_LAYERS, block_size, NUM_BLOCKS, window);
        // A system prompt of a few blocks, a shorter one, one ending mid-block, and none.
        let prefixes = [
            3 * block_size,
            block_size,
            2 * block_size + block_size / 2,
            0,
        ]
        .iter()
        .map(|&n| (0..n).map(|_| rng.random_range(0..VOCAB)).collect())
        .collect();
        Self {
            cache,
            model: BTreeMap::new(),
            prefixes,
            prompt_tokens: 0,
            out_of_blocks: 0,
            abandoned: 0,
            steps: 0,
        }
    }

    fn step(&mut self, rng: &mut StdRng) {
        let block_size = self.cache.config().block_size();
        let full = self.model.len() >= MAX_LIVE;
        match rng.random_range(0..100) {
            0..20 if !full => self.add_with_prompt(rng, block_size),
            20..24 if !full => {
                let seq = self.cache.add_sequence();
                self.model.insert(seq, Model::new(0));
            }
            24..32 if !full => common::fork_random(&mut self.cache, &mut self.model, rng),
            32..45 => common::free_random(&mut self.cache, &mut self.model, rng),
            45 if rng.random_bool(0.1) => self.cache.clear_prefix_cache(),
            _ => self.plan_and_write(rng, block_size),
        }
    }

    fn add_with_prompt(&mut self, rng: &mut StdRng, block_size: usize) {
        let salt = rng.random_range(0..SALTS.len());
        let mut prompt = self.prefixes.choose(rng).unwrap().clone();
        let suffix = rng.random_range(0..=2 * block_size + 1);
        prompt.extend((0..suffix).map(|_| rng.random_range(0..VOCAB)));
        let admitted = self
            .cache
            .add_sequence_with_prompt(&prompt, SALTS[salt])
            .unwrap();
        self.prompt_tokens += prompt.len() as u64;
        let computed = admitted.computed;
        assert_eq!(computed % block_size, 0);
        assert!(computed < prompt.len().max(1), "the last token is computed");
        assert_eq!(self.cache.manager().len(admitted.seq).unwrap(), computed);
        let mut m = Model::new(salt);
        m.pending = prompt;
        m.plan(computed); // the K/V it found must be exactly these
        self.model.insert(admitted.seq, m);
    }

    fn plan_and_write(&mut self, rng: &mut StdRng, block_size: usize) {
        let n = rng.random_range(1..=self.model.len().max(1));
        let seqs: Vec<SeqId> = self.model.keys().copied().choose_multiple(rng, n);
        let mut batch = Vec::new();
        for seq in seqs {
            let m = self.model.get_mut(&seq).unwrap();
            if m.pending.is_empty() && rng.random_bool(0.8) {
                // Decode: sampled tokens (usually one) are appended before they are planned.
                let k = if rng.random_bool(0.8) {
                    1
                } else {
                    rng.random_range(1..=2 * block_size)
                };
                let sampled: Vec<u32> = (0..k).map(|_| rng.random_range(0..VOCAB)).collect();
                self.cache.append_tokens(seq, &sampled).unwrap();
                m.pending.extend(sampled);
            }
            // The whole rest, a chunk of it, or nothing this step.
            let new = match rng.random_range(0..10) {
                0 => 0,
                1..4 => rng.random_range(0..=m.pending.len()),
                _ => m.pending.len(),
            };
            batch.push((seq, new));
        }
        let before = self.cache.manager().clone();
        let stats = self.cache.prefix_stats();
        let plan = match self.cache.plan(&batch) {
            Ok(plan) => plan,
            Err(Error::OutOfBlocks { needed, free }) => {
                assert!(needed > free);
                assert!(
                    self.cache.manager() == &before,
                    "OutOfBlocks changed the bookkeeping"
                );
                assert_eq!(self.cache.prefix_stats(), stats);
                self.out_of_blocks += 1;
                // The engine preempts a request now and then to make room.
                if rng.random_bool(0.3) {
                    let (seq, _) = batch.choose(rng).unwrap();
                    self.cache.free(*seq).unwrap();
                    self.model.remove(seq);
                }
                return;
            }
            Err(e) => panic!("plan {batch:?}: {e}"),
        };
        self.steps += 1;
        let mut prefixes = Vec::new();
        for &(seq, n) in &batch {
            prefixes.extend(self.model.get_mut(&seq).unwrap().plan(n));
        }
        // Now and then the step fails part-way: some layers never written.
        let layers: Vec<usize> = if rng.random_bool(0.03) && !prefixes.is_empty() {
            self.abandoned += 1;
            for &(seq, n) in &batch {
                let written = &mut self.model.get_mut(&seq).unwrap().written;
                let len = written.len();
                written[len - n..].fill(false);
            }
            let k = rng.random_range(0..NUM_LAYERS);
            (0..NUM_LAYERS).choose_multiple(rng, k)
        } else {
            (0..NUM_LAYERS).collect()
        };
        for layer in layers {
            let k: Vec<u32> = prefixes.iter().flat_map(|&p| k_row(p, layer)).collect();
            let v: Vec<u32> = k.iter().map(|x| !x).collect();
            self.cache.write(layer, &plan, &k, &v).unwrap();
        }
    }

    /// Every invariant, the counters, and every sequence's K/V.
    fn check(&self) {
        let manager = self.cache.manager();
        common::audit_live(manager, &self.model);
        let stats = self.cache.prefix_stats();
        assert_eq!(stats.prompt_tokens, self.prompt_tokens);
        assert!(stats.hit_tokens <= stats.prompt_tokens);
        assert!(stats.parked_blocks <= stats.cached_blocks);
        assert!(stats.parked_blocks <= manager.num_free_blocks());
        let block_size = manager.block_size();
        let row = shape().kv_row_len();
        for (&seq, m) in &self.model {
            assert_eq!(manager.len(seq).unwrap(), m.prefix.len(), "seq {seq}");
            let table = manager.block_table(seq).unwrap();
            // Pages a sliding window gave back are not read (nor ever found again).
            let reclaimed = manager.reclaimed_blocks(seq).unwrap();
            for layer in 0..NUM_LAYERS {
                let (k, v) = self.cache.storage().layer(layer);
                for (t, &prefix) in m.prefix.iter().enumerate() {
                    if !m.written[t] || t < reclaimed * block_size {
                        continue;
                    }
                    let page = table[t / block_size - reclaimed] as usize;
                    let at = (page * block_size + t % block_size) * row;
                    let want: Vec<u32> = k_row(prefix, layer).collect();
                    assert_eq!(
                        &k[at..at + row],
                        want,
                        "seq {seq} token {t} layer {layer} K"
                    );
                    let want_v: Vec<u32> = want.iter().map(|x| !x).collect();
                    assert_eq!(
                        &v[at..at + row],
                        want_v,
                        "seq {seq} token {t} layer {layer} V"
                    );
                }
            }
        }
    }
}

#[test]
fn random_operations_with_prefix_caching_read_back_each_sequences_own_kv() {
    let mut rng =
        common::rng("random_operations_with_prefix_caching_read_back_each_sequences_own_kv");
    let block_sizes = [1, 2, 4, 8, 16];
    let (mut out_of_blocks, mut abandoned) = (0, 0);
    let (mut hits, mut evictions) = (0, 0);
    for &block_size in &block_sizes {
        let mut harness = Harness::new(&mut rng, block_size, None);
        for _ in 0..OPERATIONS / block_sizes.len() {
            harness.step(&mut rng);
            harness.check();
        }
        let stats = harness.cache.prefix_stats();
        println!(
            "block size {block_size}: {stats:?}, {} steps, {} OutOfBlocks",
            harness.steps, harness.out_of_blocks
        );
        out_of_blocks += harness.out_of_blocks;
        abandoned += harness.abandoned;
        hits += stats.hit_tokens;
        evictions += stats.evictions;
    }
    // The run must have exercised each path, or it proved nothing about it.
    assert!(out_of_blocks > 100, "only {out_of_blocks} OutOfBlocks");
    assert!(abandoned > 100, "only {abandoned} abandoned steps");
    assert!(hits > 10_000, "only {hits} tokens found cached");
    assert!(evictions > 1000, "only {evictions} evictions");
}

#[test]
fn random_operations_with_prefix_caching_and_window_reclamation_read_back_what_windows_see() {
    let mut rng = common::rng(
        "random_operations_with_prefix_caching_and_window_reclamation_read_back_what_windows_see",
    );
    let configs = [(1, 0), (4, 9), (8, 40), (16, 5)];
    let (mut hits, mut out_of_blocks) = (0, 0);
    for &(block_size, window) in &configs {
        let mut harness = Harness::new(&mut rng, block_size, Some(window));
        for _ in 0..OPERATIONS / 10 {
            harness.step(&mut rng);
            harness.check();
        }
        hits += harness.cache.prefix_stats().hit_tokens;
        out_of_blocks += harness.out_of_blocks;
    }
    assert!(hits > 1000, "only {hits} tokens found cached");
    assert!(out_of_blocks > 100, "only {out_of_blocks} OutOfBlocks");
}
