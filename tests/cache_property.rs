//! Property test of the cache bookkeeping and the CPU pages: 10^5 random operations (add,
//! plan + write, fork, free) checked after every one against a plain Vec model: no block
//! leaked or owned twice without a matching count, every sequence reads back exactly its
//! tokens, and OutOfBlocks changes nothing. The same with sliding-window reclamation: every
//! plan gives back exactly the pages its first new token's window no longer sees, and every
//! token a window can still see reads back.

mod common;

use std::collections::BTreeMap;

use paged_gqa::cache::{PagedCache, SeqId};
use paged_gqa::cpu::CpuStorage;
use paged_gqa::{Error, GqaShape};
use rand::rngs::StdRng;
use rand::seq::IteratorRandom;
use rand::Rng;

const OPERATIONS: usize = 100_000;
const NUM_BLOCKS: usize = 32;
const NUM_LAYERS: usize = 2;
const MAX_LIVE: usize = 8;

fn shape() -> GqaShape {
    GqaShape::new(4, 2, 8).unwrap()
}

/// The K row element `e` of K/V head `h` of the token with id `uid` in `layer`: unique per
/// (uid, layer, head, element), so a misplaced row or element is caught. V is its complement.
fn k_value(uid: u32, layer: usize, head: usize, e: usize) -> u32 {
    (uid << 8) | ((layer as u32) << 7) | ((head as u32) << 3) | e as u32
}

fn rows(uids: &[u32], layer: usize) -> (Vec<u32>, Vec<u32>) {
    let shape = shape();
    let k: Vec<u32> = uids
        .iter()
        .flat_map(|&uid| {
            (0..shape.n_kv_heads())
                .flat_map(move |h| (0..shape.head_dim()).map(move |e| k_value(uid, layer, h, e)))
        })
        .collect();
    let v = k.iter().map(|x| !x).collect();
    (k, v)
}

struct Harness {
    cache: PagedCache<CpuStorage<u32>>,
    /// The model: token ids of each live sequence, in order.
    model: BTreeMap<SeqId, Vec<u32>>,
    next_uid: u32,
    out_of_blocks: usize,
    /// The reclamation window (window_left), if any.
    window: Option<usize>,
    /// Pages reclaimed over the run.
    reclaimed: usize,
}

impl Harness {
    fn new(block_size: usize, window: Option<usize>) -> Self {
        let cache = common::property_cache(shape(), NUM_LAYERS, block_size, NUM_BLOCKS, window);
        Self {
            cache,
            model: BTreeMap::new(),
            next_uid: 0,
            out_of_blocks: 0,
            window,
            reclaimed: 0,
        }
    }

    fn step(&mut self, rng: &mut StdRng) {
        let block_size = self.cache.config().block_size();
        match rng.random_range(0..100) {
            0..15 if self.model.len() < MAX_LIVE => {
                let seq = self.cache.add_sequence();
                self.model.insert(seq, Vec::new());
            }
            15..30 if self.model.len() < MAX_LIVE => {
                common::fork_random(&mut self.cache, &mut self.model, rng)
            }
            30..42 => common::free_random(&mut self.cache, &mut self.model, rng),
            _ => {
                let n = rng.random_range(1..=self.model.len().max(1));
                let seqs: Vec<SeqId> = self.model.keys().copied().choose_multiple(rng, n);
                let batch: Vec<(SeqId, usize)> = seqs
                    .into_iter()
                    .map(|s| {
                        (
                            s,
                            if rng.random_bool(0.7) {
                                rng.random_range(0..=2)
                            } else {
                                rng.random_range(1..=3 * block_size)
                            },
                        )
                    })
                    .collect();
                self.plan_and_write(&batch);
            }
        }
    }

    fn plan_and_write(&mut self, batch: &[(SeqId, usize)]) {
        let before = self.cache.manager().clone();
        let block_size = before.block_size();
        let plan = match self.cache.plan(batch) {
            Ok(plan) => plan,
            Err(Error::OutOfBlocks { needed, free }) => {
                assert!(needed > free);
                assert_eq!(
                    self.cache.manager(),
                    &before,
                    "OutOfBlocks changed the bookkeeping"
                );
                self.out_of_blocks += 1;
                return;
            }
            Err(e) => panic!("plan {batch:?}: {e}"),
        };
        // Reclaimed: exactly the pages wholly before the first new token's window.
        for (row, &(seq, n)) in batch.iter().enumerate() {
            let was = before.reclaimed_blocks(seq).unwrap();
            let want = match self.window {
                Some(w) if n > 0 => {
                    was.max(before.len(seq).unwrap().saturating_sub(w) / block_size)
                }
                _ => was,
            };
            let now = self.cache.manager().reclaimed_blocks(seq).unwrap();
            assert_eq!(
                now, want,
                "seq {seq}: reclaimed pages (window {:?})",
                self.window
            );
            assert_eq!(plan.reclaimed()[row], now);
            let table = &plan.block_tables()[row * plan.max_blocks()..][..plan.max_blocks()];
            assert!(
                table[..now].iter().all(|&b| b == -1),
                "reclaimed entries are -1"
            );
            self.reclaimed += now - was;
        }
        let mut uids = Vec::new();
        for &(seq, n) in batch {
            let new: Vec<u32> = (0..n as u32).map(|i| self.next_uid + i).collect();
            self.next_uid += n as u32;
            self.model.get_mut(&seq).unwrap().extend(&new);
            uids.extend(new);
        }
        for layer in 0..NUM_LAYERS {
            let (k, v) = rows(&uids, layer);
            self.cache.write(layer, &plan, &k, &v).unwrap();
        }
    }

    /// Every invariant and every sequence's tokens.
    fn check(&self) {
        let manager = self.cache.manager();
        common::audit_live(manager, &self.model);
        let block_size = manager.block_size();
        let row = shape().kv_row_len();
        for (&seq, uids) in &self.model {
            assert_eq!(manager.len(seq).unwrap(), uids.len());
            let table = manager.block_table(seq).unwrap();
            let reclaimed = manager.reclaimed_blocks(seq).unwrap();
            // The next token's window must still be held (what a query can see reads back).
            if let Some(w) = self.window {
                assert!(reclaimed * block_size <= uids.len().saturating_sub(w));
            } else {
                assert_eq!(reclaimed, 0);
            }
            let first = reclaimed * block_size; // the first token still held
            for layer in 0..NUM_LAYERS {
                let (k, v) = self.cache.storage().layer(layer);
                let (want_k, want_v) = rows(&uids[first..], layer);
                for t in first..uids.len() {
                    let page = table[t / block_size - reclaimed] as usize;
                    let at = (page * block_size + t % block_size) * row;
                    assert_eq!(
                        &k[at..at + row],
                        &want_k[(t - first) * row..][..row],
                        "seq {seq} token {t} layer {layer} K"
                    );
                    assert_eq!(
                        &v[at..at + row],
                        &want_v[(t - first) * row..][..row],
                        "seq {seq} token {t} layer {layer} V"
                    );
                }
            }
        }
    }
}

#[test]
fn random_operations_keep_blocks_and_tokens_consistent() {
    let mut rng = common::rng("random_operations_keep_blocks_and_tokens_consistent");
    let block_sizes = [1, 2, 4, 8, 16];
    let mut out_of_blocks = 0;
    for &block_size in &block_sizes {
        let mut harness = Harness::new(block_size, None);
        for _ in 0..OPERATIONS / block_sizes.len() {
            harness.step(&mut rng);
            harness.check();
        }
        out_of_blocks += harness.out_of_blocks;
    }
    // The run must have exercised the failure path, or it proved nothing about it.
    assert!(
        out_of_blocks > 100,
        "only {out_of_blocks} OutOfBlocks in {OPERATIONS} operations"
    );
}

#[test]
fn random_operations_with_window_reclamation_keep_what_windows_see() {
    let mut rng = common::rng("random_operations_with_window_reclamation_keep_what_windows_see");
    let (mut out_of_blocks, mut reclaimed) = (0, 0);
    // Windows of one key, under a page, of pages, and larger than most sequences.
    for (block_size, window) in [(1, 0), (2, 1), (4, 9), (8, 3), (16, 40), (16, 5)] {
        let mut harness = Harness::new(block_size, Some(window));
        for _ in 0..OPERATIONS / 6 {
            harness.step(&mut rng);
            harness.check();
        }
        out_of_blocks += harness.out_of_blocks;
        reclaimed += harness.reclaimed;
    }
    assert!(out_of_blocks > 100, "only {out_of_blocks} OutOfBlocks");
    assert!(reclaimed > 1000, "only {reclaimed} pages reclaimed");
}
