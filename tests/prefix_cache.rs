//! Prefix caching one behaviour at a time, after vLLM's tests/v1/core/test_prefix_caching.py:
//! exact block ids and names, reference counts, eviction order (a chain's tail first, least
//! recently used first), salt and page-identity isolation (each paired with the same-key
//! case, so that "caching off" cannot pass), partial blocks never cached, only committed
//! blocks found, and failed allocations without side effects.

use paged_gqa::cache::{
    page_identity, BlockHash, BlockManager, CacheConfig, PagedCache, SeqId, StepPlan,
};
use paged_gqa::cpu::CpuStorage;
use paged_gqa::fp8::{Fp8E4M3, KvScales};
use paged_gqa::{DType, Error, GqaShape};

/// Token ids `start..start + n`.
fn ids(start: u32, n: usize) -> Vec<u32> {
    (start..start + n as u32).collect()
}

/// Plans all of `seq`'s unplanned prompt tokens and commits them (their K/V written).
fn prefill(cache: &mut BlockManager, seq: SeqId, n: usize) -> StepPlan {
    let plan = cache.plan(&[(seq, n)]).unwrap();
    cache.commit(&plan).unwrap();
    plan
}

/// How many of `prompt`'s tokens (unsalted) a new sequence finds cached; the sequence stays.
fn found(cache: &mut BlockManager, prompt: &[u32]) -> usize {
    cache
        .add_sequence_with_prompt(prompt, b"")
        .unwrap()
        .computed
}

fn chain(identity: &BlockHash, salt: &[u8], tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    let mut parent = BlockHash::root(identity, salt);
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            parent = BlockHash::block(&parent, block);
            parent
        })
        .collect()
}

#[test]
fn a_shared_prefix_reuses_exactly_the_cached_blocks() {
    // vLLM's test_prefill: blocks of 16, a 55-token prompt, then one sharing 48 tokens.
    let mut cache = BlockManager::new(10, 16).unwrap();
    let common = ids(0, 48);
    let mut p1 = common.clone();
    p1.extend(ids(1000, 7));
    let a = cache.add_sequence_with_prompt(&p1, b"").unwrap();
    assert_eq!(a.computed, 0);
    prefill(&mut cache, a.seq, 55);
    let table_a = cache.block_table(a.seq).unwrap().to_vec();
    assert_eq!(table_a.len(), 4);
    let names = chain(&cache.page_identity(), b"", &p1, 16);
    for (i, name) in names.iter().enumerate() {
        assert_eq!(cache.block_name(table_a[i]), Some(*name), "block {i}");
        assert_eq!(cache.cached_block(name), Some(table_a[i]));
        assert_eq!(cache.ref_count(table_a[i]), 1);
    }
    assert_eq!(
        cache.block_name(table_a[3]),
        None,
        "the partial block has no name"
    );

    let mut p2 = common.clone();
    p2.extend(ids(2000, 7));
    let b = cache.add_sequence_with_prompt(&p2, b"").unwrap();
    assert_eq!(b.computed, 48);
    assert_eq!(cache.block_table(b.seq).unwrap(), &table_a[..3]);
    for &block in &table_a[..3] {
        assert_eq!(cache.ref_count(block), 2);
    }
    prefill(&mut cache, b.seq, 7);
    let table_b = cache.block_table(b.seq).unwrap().to_vec();
    assert!(!table_a.contains(&table_b[3]));
    let stats = cache.prefix_stats();
    assert_eq!((stats.prompt_tokens, stats.hit_tokens), (110, 48));
    assert_eq!((stats.cached_blocks, stats.parked_blocks), (3, 0));
    assert!((stats.hit_rate() - 48.0 / 110.0).abs() < 1e-12);

    // Freed, the cached blocks are parked, a chain's last block first; the partial ones are
    // free. A 10-block miss takes the 7 free blocks, then evicts the chain tail first.
    cache.free(a.seq).unwrap();
    assert!(cache.parked_blocks().is_empty(), "b still holds them");
    cache.free(b.seq).unwrap();
    let parked = [table_a[2], table_a[1], table_a[0]];
    assert_eq!(cache.parked_blocks(), parked);
    assert_eq!(cache.num_free_blocks(), 10);
    let c = cache
        .add_sequence_with_prompt(&ids(5000, 160), b"")
        .unwrap();
    assert_eq!(c.computed, 0);
    prefill(&mut cache, c.seq, 160);
    assert_eq!(&cache.block_table(c.seq).unwrap()[7..], &parked);
    let stats = cache.prefix_stats();
    assert_eq!(stats.evictions, 3);
    assert_eq!(stats.cached_blocks, 10, "c's ten full blocks");
    assert_eq!(
        cache.cached_block(&names[0]),
        None,
        "evicted names are forgotten"
    );
    cache.audit().unwrap();
}

#[test]
fn eviction_takes_the_least_recently_used_chain_tail_first_and_never_a_held_block() {
    let mut cache = BlockManager::new(6, 4).unwrap();
    let x = cache.add_sequence_with_prompt(&ids(0, 9), b"").unwrap();
    prefill(&mut cache, x.seq, 9); // x0 x1 named, x2 partial
    let y = cache.add_sequence_with_prompt(&ids(100, 9), b"").unwrap();
    prefill(&mut cache, y.seq, 9);
    let (tx, ty) = (
        cache.block_table(x.seq).unwrap().to_vec(),
        cache.block_table(y.seq).unwrap().to_vec(),
    );
    cache.free(x.seq).unwrap();
    cache.free(y.seq).unwrap();
    assert_eq!(cache.parked_blocks(), [tx[1], tx[0], ty[1], ty[0]]);

    // A hit on x's first block holds it again (and makes it the most recent once freed).
    let z = cache.add_sequence_with_prompt(&ids(0, 6), b"").unwrap();
    assert_eq!(z.computed, 4);
    assert_eq!(cache.parked_blocks(), [tx[1], ty[1], ty[0]]);
    // 2 free blocks (the partial ones) + 3 parked: z's 2 more tokens fit in its new block...
    prefill(&mut cache, z.seq, 2);
    assert_eq!(cache.num_free_blocks(), 4);
    // ...and a 3-block miss takes the free one, then evicts x1, then y1, never the x0 z holds.
    let w = cache.add_sequence_with_prompt(&ids(500, 12), b"").unwrap();
    prefill(&mut cache, w.seq, 12);
    let tw = cache.block_table(w.seq).unwrap();
    assert_eq!(&tw[1..], &[tx[1], ty[1]]);
    assert!(!tw.contains(&tx[0]));
    assert_eq!(cache.parked_blocks(), [ty[0]]);
    assert_eq!(cache.prefix_stats().evictions, 2);
    // y0 is still found (its child is gone, so only one block).
    assert_eq!(found(&mut cache, &ids(100, 9)), 4);
    cache.audit().unwrap();
}

#[test]
fn a_referenced_block_is_never_evicted_and_a_failed_plan_changes_nothing() {
    let mut cache = BlockManager::new(4, 4).unwrap();
    let a = cache.add_sequence_with_prompt(&ids(0, 9), b"").unwrap();
    prefill(&mut cache, a.seq, 9); // 3 blocks, 2 cached
    let b = cache.add_sequence_with_prompt(&ids(0, 12), b"").unwrap();
    assert_eq!(b.computed, 8);
    let held = cache.block_table(b.seq).unwrap().to_vec();
    cache.free(a.seq).unwrap(); // a's partial block is free, its 2 cached ones b holds
    assert_eq!(cache.num_free_blocks(), 2);
    let before = cache.clone();
    // b needs 1 block for its last 4 tokens; a new sequence wants 8 more: 3 blocks.
    let c = cache.add_sequence();
    let before_c = cache.clone();
    let err = cache.plan(&[(b.seq, 4), (c, 8)]).unwrap_err();
    assert!(
        matches!(err, Error::OutOfBlocks { needed: 3, free: 2 }),
        "{err}"
    );
    assert_eq!(cache, before_c, "OutOfBlocks changed the bookkeeping");
    for &block in &held {
        assert_eq!(cache.ref_count(block), 1);
        assert!(cache.block_name(block).is_some());
    }
    cache.free(c).unwrap();
    assert_eq!(
        cache.block_table(b.seq).unwrap(),
        before.block_table(b.seq).unwrap()
    );
    cache.audit().unwrap();
}

#[test]
fn a_failed_allocation_after_a_hit_evicts_nothing_and_keeps_the_hit() {
    // vLLM's test_prefill_not_enough_free_blocks_with_computed_blocks.
    let mut cache = BlockManager::new(5, 4).unwrap();
    let a = cache.add_sequence_with_prompt(&ids(0, 13), b"").unwrap();
    prefill(&mut cache, a.seq, 13); // 4 blocks, 3 cached
    cache.free(a.seq).unwrap();
    let b = cache.add_sequence_with_prompt(&ids(0, 30), b"").unwrap();
    assert_eq!(b.computed, 12);
    let before = cache.clone();
    let err = cache.plan(&[(b.seq, 18)]).unwrap_err(); // 5 more blocks, 2 free
    assert!(
        matches!(err, Error::OutOfBlocks { needed: 5, free: 2 }),
        "{err}"
    );
    assert_eq!(cache, before);
    assert_eq!(cache.prefix_stats().evictions, 0);
    // Freed, the hit blocks are parked again, still findable.
    cache.free(b.seq).unwrap();
    assert_eq!(cache.prefix_stats().parked_blocks, 3);
    assert_eq!(found(&mut cache, &ids(0, 13)), 12);
}

#[test]
fn salts_keep_tenants_apart() {
    // vLLM's test_cache_key_salting: the salt keys the first block, and through it the chain.
    let mut cache = BlockManager::new(16, 4).unwrap();
    let prompt = ids(0, 13);
    let a = cache
        .add_sequence_with_prompt(&prompt, b"tenant-a")
        .unwrap();
    prefill(&mut cache, a.seq, 13);
    let table = cache.block_table(a.seq).unwrap().to_vec();
    let names = chain(&cache.page_identity(), b"tenant-a", &prompt, 4);
    assert_eq!(cache.block_name(table[0]), Some(names[0]));
    assert_ne!(names, chain(&cache.page_identity(), b"", &prompt, 4));
    // The same salt finds all three full blocks; another, or none, finds nothing.
    let same = cache
        .add_sequence_with_prompt(&prompt, b"tenant-a")
        .unwrap();
    assert_eq!(same.computed, 12);
    for salt in [&b"tenant-b"[..], b"", b"tenant-a\0"] {
        let other = cache.add_sequence_with_prompt(&prompt, salt).unwrap();
        assert_eq!(other.computed, 0, "salt {salt:?}");
    }
}

#[test]
fn partial_blocks_are_never_cached_and_decode_filled_ones_are_once_freed() {
    // vLLM's test_decode: a block is named once its tokens fill it (and are committed); here a
    // block filled by decoded tokens is named when its sequence is freed, off the decode steps.
    let mut cache = BlockManager::new(8, 4).unwrap();
    let prompt = ids(0, 6);
    let a = cache.add_sequence_with_prompt(&prompt, b"").unwrap();
    prefill(&mut cache, a.seq, 6);
    let last = cache.block_table(a.seq).unwrap()[1];
    assert_eq!(cache.block_name(last), None);
    assert_eq!(cache.prefix_stats().cached_blocks, 1);
    // Planning past the known token ids is an error naming them; appending makes it fine.
    let err = cache.plan(&[(a.seq, 1)]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnknownTokens {
                needed: 7,
                known: 6,
                ..
            }
        ),
        "{err}"
    );
    for token in [70u32, 71] {
        cache.append_tokens(a.seq, &[token]).unwrap();
        prefill(&mut cache, a.seq, 1);
    }
    assert_eq!(cache.block_name(last), None, "full, but filled by decode");
    // One more token, planned but never written: freeing names what was committed only.
    cache.append_tokens(a.seq, &[72, 73, 74, 75]).unwrap();
    cache.plan(&[(a.seq, 4)]).unwrap();
    cache.free(a.seq).unwrap();
    assert!(cache.block_name(last).is_some(), "named when freed");
    assert_eq!(
        cache.prefix_stats().cached_blocks,
        2,
        "not the uncommitted third block"
    );
    // The next turn of the chat (prompt, reply, more) finds both blocks.
    let mut next_turn = prompt.clone();
    next_turn.extend([70, 71, 9, 9, 9]);
    let b = cache.add_sequence_with_prompt(&next_turn, b"").unwrap();
    assert_eq!(b.computed, 8);
    // A reply that differs in its last token finds only the first block.
    next_turn[7] = 72;
    assert_eq!(found(&mut cache, &next_turn), 4);
    cache.audit().unwrap();
}

#[test]
fn a_whole_cached_prompt_still_computes_its_last_block() {
    let mut cache = BlockManager::new(8, 4).unwrap();
    let a = cache.add_sequence_with_prompt(&ids(0, 8), b"").unwrap();
    prefill(&mut cache, a.seq, 8);
    assert_eq!(cache.prefix_stats().cached_blocks, 2);
    // 8 tokens, all cached: the block of the last token is computed again.
    assert_eq!(found(&mut cache, &ids(0, 8)), 4);
    assert_eq!(found(&mut cache, &ids(0, 9)), 8);
    for n in [0, 1, 4] {
        let admitted = cache.add_sequence_with_prompt(&ids(0, n), b"").unwrap();
        assert_eq!(admitted.computed, 0, "a {n}-token prompt");
    }
}

#[test]
fn only_committed_plans_make_blocks_findable() {
    let config = CacheConfig::new(GqaShape::new(2, 1, 8).unwrap(), 3, 4, DType::F32).unwrap();
    let mut cache = PagedCache::new(CpuStorage::<f32>::new(config, 16).unwrap()).unwrap();
    let rows = |plan: &StepPlan| vec![0.5f32; plan.num_new_tokens() * 8];
    let prompt = ids(0, 9);
    let a = cache.add_sequence_with_prompt(&prompt, b"").unwrap();
    let plan = cache.plan(&[(a.seq, 9)]).unwrap();
    // Planned, not written: nothing found.
    assert_eq!(cache.prefix_stats().cached_blocks, 0);
    // Layers 0 and 2 written, twice for 0: still not every layer.
    for layer in [0, 2, 0] {
        cache
            .write(layer, &plan, &rows(&plan), &rows(&plan))
            .unwrap();
    }
    assert_eq!(cache.prefix_stats().cached_blocks, 0);
    // A failed write of layer 1 (wrong length) is no write.
    assert!(cache.write(1, &plan, &[0.0], &[0.0]).is_err());
    assert_eq!(cache.prefix_stats().cached_blocks, 0);
    // The last layer's write makes both full blocks findable, and the plan stays valid.
    cache.write(1, &plan, &rows(&plan), &rows(&plan)).unwrap();
    assert_eq!(cache.prefix_stats().cached_blocks, 2);
    let (mut out, mut lse) = (vec![0.0f32; 9 * 16], vec![0.0f32; 9 * 2]);
    cache
        .attend(
            1,
            &plan,
            &vec![0.1f32; 9 * 16],
            &mut out,
            &mut lse,
            &Default::default(),
        )
        .unwrap();
    let again = cache.add_sequence_with_prompt(&prompt, b"").unwrap();
    assert_eq!(again.computed, 8);

    // An abandoned step: b's plan is written for one layer only, then the cache changes.
    let b = cache.add_sequence_with_prompt(&ids(100, 9), b"").unwrap();
    let plan = cache.plan(&[(b.seq, 9)]).unwrap();
    cache.write(0, &plan, &rows(&plan), &rows(&plan)).unwrap();
    let c = cache.add_sequence(); // the plan is stale now
    assert!(matches!(
        cache.write(1, &plan, &rows(&plan), &rows(&plan)),
        Err(Error::StalePlan { .. })
    ));
    assert_eq!(cache.prefix_stats().cached_blocks, 2);
    // b goes on (its first 9 slots were never written): it names nothing more, ever.
    cache.append_tokens(b.seq, &ids(109, 8)).unwrap();
    let plan = cache.plan(&[(b.seq, 8), (c, 1)]).unwrap();
    for layer in 0..3 {
        cache
            .write(layer, &plan, &rows(&plan), &rows(&plan))
            .unwrap();
    }
    assert_eq!(cache.prefix_stats().cached_blocks, 2);
    let mut probe = ids(100, 17);
    probe.push(0);
    let probed = cache.add_sequence_with_prompt(&probe, b"").unwrap();
    assert_eq!(probed.computed, 0);
    cache.manager().audit().unwrap();
}

#[test]
fn blocks_written_under_other_dtypes_or_scales_are_never_found() {
    let shape = GqaShape::new(4, 2, 16).unwrap();
    let config = CacheConfig::new(shape, 2, 4, DType::BF16)
        .unwrap()
        .with_page_dtype(DType::F8E4M3)
        .unwrap();
    let mut cache = PagedCache::new(CpuStorage::<Fp8E4M3>::new(config, 16).unwrap()).unwrap();
    let prompt = ids(0, 9);
    let write_prompt = |cache: &mut PagedCache<CpuStorage<Fp8E4M3>>| {
        let a = cache.add_sequence_with_prompt(&prompt, b"").unwrap();
        let n = 9 - a.computed;
        let plan = cache.plan(&[(a.seq, n)]).unwrap();
        let rows = vec![0.25f32; n * shape.kv_row_len()];
        for layer in 0..2 {
            cache.write_quantized(layer, &plan, &rows, &rows).unwrap();
        }
        a.computed
    };
    assert_eq!(write_prompt(&mut cache), 0);
    assert_eq!(write_prompt(&mut cache), 8, "same scales: found");
    let calibrated = KvScales::per_layer(2, 0.5, 0.25).unwrap();
    cache.set_scales(1, &calibrated).unwrap();
    assert_eq!(write_prompt(&mut cache), 0, "layer 1's scales changed");
    assert_eq!(write_prompt(&mut cache), 8, "written under the new scales");
    cache.set_scales(1, &KvScales::ones(2)).unwrap();
    assert_eq!(
        write_prompt(&mut cache),
        8,
        "the first blocks again, scales as then"
    );
    cache.manager().audit().unwrap();

    // Every dtype pair and every layer's scales key the identity.
    let bf16_pages = CacheConfig::new(shape, 2, 4, DType::BF16).unwrap();
    let identities: Vec<BlockHash> = [
        page_identity(&bf16_pages, &[None, None]),
        page_identity(
            &CacheConfig::new(shape, 2, 4, DType::F16).unwrap(),
            &[None, None],
        ),
        page_identity(&config, &[None, None]),
        page_identity(
            &bf16_pages.with_page_dtype(DType::F8E5M2).unwrap(),
            &[None, None],
        ),
        page_identity(&config, &[Some(KvScales::ones(2)), None]),
        page_identity(&config, &[None, Some(KvScales::ones(2))]),
        page_identity(&config, &[None, Some(calibrated.clone())]),
        page_identity(
            &CacheConfig::new(shape, 2, 8, DType::BF16).unwrap(),
            &[None, None],
        ),
    ]
    .into();
    for i in 0..identities.len() {
        for j in 0..i {
            assert_ne!(identities[i], identities[j], "identities {i} and {j}");
        }
    }
}

#[test]
fn with_caching_off_nothing_is_found_and_prompts_are_still_counted() {
    let config = CacheConfig::new(GqaShape::new(2, 1, 8).unwrap(), 1, 4, DType::F32)
        .unwrap()
        .with_prefix_caching(false);
    let mut cache = PagedCache::new(CpuStorage::<f32>::new(config, 16).unwrap()).unwrap();
    assert!(!cache.manager().prefix_caching());
    for _ in 0..2 {
        let a = cache.add_sequence_with_prompt(&ids(0, 9), b"").unwrap();
        assert_eq!(a.computed, 0);
        let plan = cache.plan(&[(a.seq, 9)]).unwrap();
        cache.write(0, &plan, &[1.0; 72], &[1.0; 72]).unwrap();
        cache.append_tokens(a.seq, &[5]).unwrap(); // accepted, ignored
        cache.plan(&[(a.seq, 1)]).unwrap(); // no UnknownTokens: nothing is named
        cache.free(a.seq).unwrap();
    }
    let stats = cache.prefix_stats();
    assert_eq!((stats.prompt_tokens, stats.hit_tokens), (18, 0));
    assert_eq!((stats.cached_blocks, stats.parked_blocks), (0, 0));
    assert_eq!(cache.num_free_blocks(), 16);
}

#[test]
fn forks_share_named_blocks_and_copy_the_partial_one() {
    let mut cache = BlockManager::new(8, 4).unwrap();
    let a = cache.add_sequence_with_prompt(&ids(0, 6), b"").unwrap();
    prefill(&mut cache, a.seq, 6);
    let b = cache.fork(a.seq).unwrap();
    let table = cache.block_table(a.seq).unwrap().to_vec();
    assert!(table.iter().all(|&x| cache.ref_count(x) == 2));
    // Each samples its own tokens; both fill the block they shared, a in a copy of it.
    cache.append_tokens(a.seq, &[60, 61]).unwrap();
    cache.append_tokens(b, &[60, 62]).unwrap();
    let plan = cache.plan(&[(a.seq, 2), (b, 2)]).unwrap();
    assert_eq!(plan.block_copies().len(), 1);
    cache.commit(&plan).unwrap();
    let (ta, tb) = (
        cache.block_table(a.seq).unwrap().to_vec(),
        cache.block_table(b).unwrap().to_vec(),
    );
    assert_eq!(ta[0], tb[0]);
    assert_ne!(ta[1], tb[1]);
    // Filled by decoded tokens: named when each is freed.
    assert!(cache.block_name(ta[1]).is_none() && cache.block_name(tb[1]).is_none());
    cache.free(a.seq).unwrap();
    cache.free(b).unwrap();
    assert!(cache.block_name(ta[1]).is_some() && cache.block_name(tb[1]).is_some());
    assert_ne!(cache.block_name(ta[1]), cache.block_name(tb[1]));
    assert_eq!(cache.block_name(ta[0]), cache.block_name(tb[0]));
    let mut probe = ids(0, 6);
    probe.extend([60, 62, 0]);
    assert_eq!(found(&mut cache, &probe), 8);
    let probe_seq = cache.sequences().last().unwrap();
    assert_eq!(cache.block_table(probe_seq).unwrap(), &tb[..]);
    cache.free(probe_seq).unwrap();
    assert!((0..8).all(|x| cache.ref_count(x) == 0));
    assert_eq!(cache.parked_blocks().len(), 3);
    cache.audit().unwrap();
}

#[test]
fn a_duplicate_block_stays_private_and_is_freed_not_parked() {
    let mut cache = BlockManager::new(8, 4).unwrap();
    let a = cache.add_sequence_with_prompt(&ids(0, 5), b"").unwrap();
    let b = cache.add_sequence_with_prompt(&ids(0, 5), b"").unwrap();
    let plan = cache.plan(&[(a.seq, 5), (b.seq, 5)]).unwrap(); // computed twice, in one step
    cache.commit(&plan).unwrap();
    let (a0, b0) = (
        cache.block_table(a.seq).unwrap()[0],
        cache.block_table(b.seq).unwrap()[0],
    );
    assert_ne!(a0, b0);
    assert!(cache.block_name(a0).is_some(), "the first one named wins");
    assert_eq!(cache.block_name(b0), None);
    cache.free(b.seq).unwrap();
    cache.free(a.seq).unwrap();
    assert_eq!(cache.parked_blocks(), [a0]);
    cache.audit().unwrap();
}

#[test]
fn reclaimed_window_blocks_are_never_found() {
    let mut cache = BlockManager::new(16, 4).unwrap().reclaiming(3); // a window of 4 keys
    let prompt = ids(0, 13);
    let a = cache.add_sequence_with_prompt(&prompt, b"").unwrap();
    prefill(&mut cache, a.seq, 13);
    assert_eq!(cache.prefix_stats().cached_blocks, 3);
    // Found while held...
    let b = cache.add_sequence_with_prompt(&prompt, b"").unwrap();
    assert_eq!(b.computed, 12);
    cache.free(b.seq).unwrap();
    // ...not once a's window let go of them (the plan of its next token reclaims 0..2).
    cache.append_tokens(a.seq, &[99]).unwrap();
    prefill(&mut cache, a.seq, 1);
    assert_eq!(cache.reclaimed_blocks(a.seq).unwrap(), 2);
    assert_eq!(found(&mut cache, &prompt), 0);
    cache.audit().unwrap();
}

#[test]
fn clearing_forgets_every_block_and_live_sequences_name_no_more() {
    let mut cache = BlockManager::new(8, 4).unwrap();
    let a = cache.add_sequence_with_prompt(&ids(0, 9), b"").unwrap();
    prefill(&mut cache, a.seq, 9);
    let b = cache.add_sequence_with_prompt(&ids(50, 5), b"").unwrap();
    prefill(&mut cache, b.seq, 5);
    cache.free(a.seq).unwrap();
    assert_eq!(cache.prefix_stats().parked_blocks, 2);
    cache.clear_prefix_cache();
    let stats = cache.prefix_stats();
    assert_eq!((stats.cached_blocks, stats.parked_blocks), (0, 0));
    assert_eq!(cache.num_free_blocks(), 6);
    // b needs no token ids any more and names nothing.
    prefill(&mut cache, b.seq, 7);
    assert_eq!(cache.prefix_stats().cached_blocks, 0);
    cache.audit().unwrap();
}

#[test]
fn bad_inputs_are_clear_errors() {
    let mut cache = BlockManager::new(4, 4).unwrap();
    assert!(matches!(
        cache.append_tokens(SeqId(7), &[1]),
        Err(Error::UnknownSequence { seq: 7 })
    ));
    let a = cache.add_sequence_with_prompt(&[1, 2], b"").unwrap();
    cache.free(a.seq).unwrap();
    assert!(matches!(
        cache.append_tokens(a.seq, &[1]),
        Err(Error::FreedSequence { .. })
    ));
    assert_eq!(cache.block_name(1_000_000), None);
    // A plan made before a change cannot be committed.
    let b = cache.add_sequence_with_prompt(&[1, 2], b"").unwrap();
    let plan = cache.plan(&[(b.seq, 2)]).unwrap();
    cache.add_sequence();
    assert!(matches!(cache.commit(&plan), Err(Error::StalePlan { .. })));
    let err = Error::UnknownTokens {
        seq: 3,
        needed: 10,
        known: 8,
    }
    .to_string();
    assert!(
        err.contains("sequence 3") && err.contains("10") && err.contains("8"),
        "{err}"
    );
}
