//! The cache API one behaviour at a time: slots, copy-on-write, capacity, budgets, and every
//! bad input as a clear error.

use std::collections::BTreeMap;

use paged_gqa::cache::{BlockManager, CacheConfig, PagedCache, SeqId, StepPlan};
use paged_gqa::cpu::CpuStorage;
use paged_gqa::{DType, Error, GqaShape};

fn config(block_size: usize) -> CacheConfig {
    CacheConfig::new(GqaShape::new(4, 2, 8).unwrap(), 3, block_size, DType::F32).unwrap()
}

fn cpu_cache(num_blocks: usize, block_size: usize) -> PagedCache<CpuStorage<f32>> {
    PagedCache::new(CpuStorage::new(config(block_size), num_blocks).unwrap()).unwrap()
}

/// `n` token rows `[n, n_kv_heads, head_dim]` filled with `value`.
fn rows(n: usize, value: f32) -> Vec<f32> {
    vec![value; n * 16]
}

#[test]
fn slots_are_block_times_block_size_plus_offset() {
    let mut cache = BlockManager::new(8, 4).unwrap();
    let a = cache.add_sequence();
    let plan = cache.plan(&[(a, 6)]).unwrap();
    let table = cache.block_table(a).unwrap().to_vec();
    assert_eq!(table.len(), 2);
    let expected: Vec<i64> = (0..6)
        .map(|t| table[t / 4] as i64 * 4 + (t % 4) as i64)
        .collect();
    assert_eq!(plan.slot_mapping(), expected.as_slice());
    assert_eq!(plan.lens().context_len(0), 6);
    assert_eq!(plan.block_tables(), &[table[0] as i32, table[1] as i32]);
}

#[test]
fn decode_steps_fill_the_last_block_before_taking_a_new_one() {
    let mut cache = BlockManager::new(8, 4).unwrap();
    let a = cache.add_sequence();
    cache.plan(&[(a, 3)]).unwrap();
    assert_eq!(cache.num_free_blocks(), 7);
    cache.plan(&[(a, 1)]).unwrap(); // fills slot 3
    assert_eq!(cache.num_free_blocks(), 7);
    cache.plan(&[(a, 1)]).unwrap(); // token 4: a new block
    assert_eq!(cache.num_free_blocks(), 6);
}

/// K element `e` of K/V head `h` of the token with id `uid` in `layer` (3 layers, 2 heads,
/// head_dim 8): unique per (uid, layer, head, element), so a row, element or layer out of
/// place is caught. V is its complement.
fn unique_k(uid: u32, layer: usize, head: usize, e: usize) -> u32 {
    (uid << 8) | ((layer as u32) << 4) | ((head as u32) << 3) | e as u32
}

/// The K and V rows `[uids.len(), n_kv_heads, head_dim]` of the tokens `uids` in `layer`.
fn unique_rows(uids: &[u32], layer: usize) -> (Vec<u32>, Vec<u32>) {
    let k: Vec<u32> = uids
        .iter()
        .flat_map(|&uid| (0..2).flat_map(move |h| (0..8).map(move |e| unique_k(uid, layer, h, e))))
        .collect();
    let v = k.iter().map(|x| !x).collect();
    (k, v)
}

/// Plans `batch`, writes fresh token ids (`next_uid` onwards, in batch order) in every layer,
/// and appends them to the model. Returns the plan.
fn write_unique(
    cache: &mut PagedCache<CpuStorage<u32>>,
    model: &mut BTreeMap<SeqId, Vec<u32>>,
    next_uid: &mut u32,
    batch: &[(SeqId, usize)],
) -> StepPlan {
    let plan = cache.plan(batch).unwrap();
    let mut uids = Vec::new();
    for &(seq, n) in batch {
        let new: Vec<u32> = (*next_uid..*next_uid + n as u32).collect();
        *next_uid += n as u32;
        model.get_mut(&seq).unwrap().extend(&new);
        uids.extend(new);
    }
    for layer in 0..3 {
        let (k, v) = unique_rows(&uids, layer);
        cache.write(layer, &plan, &k, &v).unwrap();
    }
    plan
}

/// Every element of K and V of every layer of every live sequence is the model's: read from
/// the pages through each sequence's block table (indexed here), and through
/// `paged_kv` + `gather_paged`.
fn check_unique(
    cache: &mut PagedCache<CpuStorage<u32>>,
    model: &BTreeMap<SeqId, Vec<u32>>,
    step: &str,
) {
    cache.manager().audit().unwrap();
    assert_eq!(
        cache.manager().sequences().collect::<Vec<_>>(),
        model.keys().copied().collect::<Vec<_>>(),
        "{step}: live sequences"
    );
    let block_size = cache.config().block_size();
    let row = 16;
    for (&seq, uids) in model {
        assert_eq!(
            cache.manager().len(seq).unwrap(),
            uids.len(),
            "{step}: seq {seq} length"
        );
        let table = cache.manager().block_table(seq).unwrap().to_vec();
        assert_eq!(
            table.len(),
            uids.len().div_ceil(block_size),
            "{step}: seq {seq} table"
        );
        for layer in 0..3 {
            let (k, v) = cache.storage().layer(layer);
            let (want_k, want_v) = unique_rows(uids, layer);
            for t in 0..uids.len() {
                let at = (table[t / block_size] as usize * block_size + t % block_size) * row;
                assert_eq!(
                    &k[at..at + row],
                    &want_k[t * row..][..row],
                    "{step}: seq {seq} token {t} layer {layer} K"
                );
                assert_eq!(
                    &v[at..at + row],
                    &want_v[t * row..][..row],
                    "{step}: seq {seq} token {t} layer {layer} V"
                );
            }
        }
    }
    // The same through the library's read path (every live sequence in one plan).
    let batch: Vec<(SeqId, usize)> = model.keys().map(|&s| (s, 0)).collect();
    let plan = cache.plan(&batch).unwrap();
    assert!(plan.block_copies().is_empty());
    let all: Vec<u32> = model.values().flatten().copied().collect();
    for layer in 0..3 {
        let kv = cache.paged_kv(layer, &plan).unwrap();
        let (k, v) = paged_gqa::cpu::gather_paged(&kv).unwrap();
        let (want_k, want_v) = unique_rows(&all, layer);
        assert!(
            k == want_k && v == want_v,
            "{step}: gather_paged of layer {layer}"
        );
    }
}

#[test]
fn fork_shares_full_blocks_and_copies_the_partial_one_on_write() {
    let config = CacheConfig::new(GqaShape::new(4, 2, 8).unwrap(), 3, 4, DType::F32).unwrap();
    let mut cache = PagedCache::new(CpuStorage::<u32>::new(config, 8).unwrap()).unwrap();
    let mut model = BTreeMap::new();
    let mut next_uid = 0;

    let parent = cache.add_sequence();
    model.insert(parent, Vec::new());
    // One full block, one with 2 of 4 tokens.
    write_unique(&mut cache, &mut model, &mut next_uid, &[(parent, 6)]);
    check_unique(&mut cache, &model, "parent's prompt");

    let child = cache.fork(parent).unwrap();
    model.insert(child, model[&parent].clone());
    assert_eq!(cache.num_free_blocks(), 6, "a fork takes no block");
    let shared = cache.manager().block_table(parent).unwrap().to_vec();
    assert!(shared.iter().all(|&b| cache.manager().ref_count(b) == 2));
    check_unique(&mut cache, &model, "fork");

    // The child writes first: it gets a copy of the partial block; the full one stays shared.
    let plan = write_unique(&mut cache, &mut model, &mut next_uid, &[(child, 1)]);
    assert_eq!(
        plan.block_copies(),
        &[[shared[1] as i32, plan.block_tables()[1]]]
    );
    let child_table = cache.manager().block_table(child).unwrap().to_vec();
    assert_eq!(child_table[0], shared[0]);
    assert_ne!(child_table[1], shared[1]);
    assert_eq!(cache.manager().ref_count(shared[0]), 2);
    assert_eq!(cache.manager().ref_count(shared[1]), 1);
    check_unique(&mut cache, &model, "child's copy-on-write");

    // The parent now owns its partial block alone and writes in place.
    let plan = write_unique(&mut cache, &mut model, &mut next_uid, &[(parent, 1)]);
    assert!(plan.block_copies().is_empty());
    assert_eq!(cache.manager().block_table(parent).unwrap(), shared);
    check_unique(&mut cache, &model, "parent's write in place");

    // A fork of the child; in one step the child fills its shared partial block (a copy) and
    // opens another, then the grandchild writes in place into the block it now owns alone.
    let grandchild = cache.fork(child).unwrap();
    model.insert(grandchild, model[&child].clone());
    check_unique(&mut cache, &model, "second fork");
    let plan = write_unique(
        &mut cache,
        &mut model,
        &mut next_uid,
        &[(child, 3), (grandchild, 2)],
    );
    assert_eq!(plan.block_copies().len(), 1);
    assert_eq!(plan.block_copies()[0][0], child_table[1] as i32);
    assert_eq!(
        cache.manager().block_table(grandchild).unwrap()[1],
        child_table[1]
    );
    check_unique(&mut cache, &model, "child and grandchild in one step");

    // Frees: what the others share stays, what was freed is handed out again.
    for (seq, what) in [(parent, "parent freed"), (child, "child freed")] {
        cache.free(seq).unwrap();
        model.remove(&seq);
        check_unique(&mut cache, &model, what);
    }
    assert_eq!(cache.manager().ref_count(shared[0]), 1);
    write_unique(&mut cache, &mut model, &mut next_uid, &[(grandchild, 9)]);
    check_unique(&mut cache, &model, "grandchild reuses freed blocks");
}

#[test]
fn two_forks_writing_in_one_step_copy_once() {
    let mut cache = BlockManager::new(8, 4).unwrap();
    let a = cache.add_sequence();
    cache.plan(&[(a, 2)]).unwrap();
    let b = cache.fork(a).unwrap();
    let plan = cache.plan(&[(a, 1), (b, 1)]).unwrap();
    assert_eq!(
        plan.block_copies().len(),
        1,
        "the second writer owns the block alone by then"
    );
    cache.audit().unwrap();
}

#[test]
fn capacity_counts_the_room_in_the_last_block() {
    let mut cache = BlockManager::new(4, 4).unwrap();
    let a = cache.add_sequence();
    cache.plan(&[(a, 5)]).unwrap(); // 2 blocks, 3 free slots in the second
    assert_eq!(cache.capacity(a).unwrap(), 2 * 4 + 3);
    let b = cache.fork(a).unwrap();
    // b's next write copies the shared partial block (1 token in it) into a free block.
    assert_eq!(cache.capacity(b).unwrap(), 2 * 4 - 1);
    assert!(cache.plan(&[(b, cache.capacity(b).unwrap())]).is_ok());
}

#[test]
fn out_of_blocks_changes_nothing() {
    let mut cache = BlockManager::new(4, 4).unwrap();
    let a = cache.add_sequence();
    let b = cache.add_sequence();
    cache.plan(&[(a, 9)]).unwrap(); // 3 blocks
    let before = cache.clone();
    let err = cache.plan(&[(a, 3), (b, 5)]).unwrap_err(); // a fits in its blocks, b needs 2
    assert_eq!(err, Error::OutOfBlocks { needed: 2, free: 1 });
    assert_eq!(cache, before);
}

#[test]
fn the_llama3_70b_budget_holds_131072_tokens_in_40_gib() {
    let config = CacheConfig::new(GqaShape::new(64, 8, 128).unwrap(), 80, 16, DType::BF16).unwrap();
    assert_eq!(config.bytes_per_token(), 327_680);
    assert_eq!(config.blocks_for_budget(40 << 30).unwrap(), 8192);
    // MHA (64 K/V heads) would fit 8 times fewer.
    let mha = CacheConfig::new(GqaShape::new(64, 64, 128).unwrap(), 80, 16, DType::BF16).unwrap();
    assert_eq!(mha.blocks_for_budget(40 << 30).unwrap(), 1024);
}

#[test]
fn storage_sized_from_a_budget_has_that_many_blocks() {
    let config = config(16); // 3 layers * 2 * 16 tokens * 16 elements * 4 bytes = 6144 B a block
    let storage = CpuStorage::<f32>::with_budget(config, 10 * 6144 + 100).unwrap();
    let cache = PagedCache::new(storage).unwrap();
    assert_eq!(cache.num_free_blocks(), 10);
}

// Bad inputs, one each.

#[test]
fn an_unknown_sequence_is_an_error() {
    let mut cache = BlockManager::new(4, 4).unwrap();
    assert_eq!(
        cache.plan(&[(SeqId(7), 1)]).unwrap_err(),
        Error::UnknownSequence { seq: 7 }
    );
    assert_eq!(
        cache.fork(SeqId(7)).unwrap_err(),
        Error::UnknownSequence { seq: 7 }
    );
    assert_eq!(
        cache.free(SeqId(7)).unwrap_err(),
        Error::UnknownSequence { seq: 7 }
    );
}

#[test]
fn a_freed_sequence_is_an_error() {
    let mut cache = BlockManager::new(4, 4).unwrap();
    let a = cache.add_sequence();
    cache.free(a).unwrap();
    assert_eq!(
        cache.free(a).unwrap_err(),
        Error::FreedSequence { seq: a.0 }
    );
    assert_eq!(
        cache.capacity(a).unwrap_err(),
        Error::FreedSequence { seq: a.0 }
    );
    assert_eq!(
        cache.plan(&[(a, 1)]).unwrap_err(),
        Error::FreedSequence { seq: a.0 }
    );
}

#[test]
fn a_sequence_twice_in_a_batch_is_an_error() {
    let mut cache = BlockManager::new(4, 4).unwrap();
    let a = cache.add_sequence();
    assert_eq!(
        cache.plan(&[(a, 1), (a, 2)]).unwrap_err(),
        Error::DuplicateSequence { seq: a.0 }
    );
}

#[test]
fn a_plan_is_stale_after_the_cache_changes() {
    let mut cache = cpu_cache(8, 4);
    let a = cache.add_sequence();
    let plan = cache.plan(&[(a, 2)]).unwrap();
    cache.fork(a).unwrap();
    let err = cache
        .write(0, &plan, &rows(2, 1.0), &rows(2, 1.0))
        .unwrap_err();
    assert!(matches!(err, Error::StalePlan { .. }), "{err}");
    let _newer = cache.plan(&[(a, 1)]).unwrap();
    assert!(matches!(
        cache.write(0, &plan, &rows(2, 1.0), &rows(2, 1.0)),
        Err(Error::StalePlan { .. })
    ));
}

#[test]
fn a_plan_from_another_cache_is_stale() {
    let mut one = cpu_cache(8, 4);
    let mut other = cpu_cache(8, 4);
    let (a, b) = (one.add_sequence(), other.add_sequence());
    let plan = one.plan(&[(a, 1)]).unwrap();
    other.plan(&[(b, 1)]).unwrap();
    assert!(matches!(
        other.write(0, &plan, &rows(1, 1.0), &rows(1, 1.0)),
        Err(Error::StalePlan { .. })
    ));
}

#[test]
fn new_rows_of_the_wrong_length_are_an_error() {
    let mut cache = cpu_cache(8, 4);
    let a = cache.add_sequence();
    let plan = cache.plan(&[(a, 3)]).unwrap();
    // (K rows, V rows): the first of the wrong length is named, with its length in elements.
    for (k, v, name, actual) in [(2, 3, "k_new", 32), (3, 4, "v_new", 64)] {
        assert_eq!(
            cache.write(0, &plan, &rows(k, 1.0), &rows(v, 1.0)),
            Err(Error::BufferLength {
                name,
                expected: 48,
                actual
            })
        );
    }
}

#[test]
fn a_layer_out_of_range_is_an_error() {
    let mut cache = cpu_cache(8, 4);
    let a = cache.add_sequence();
    let plan = cache.plan(&[(a, 1)]).unwrap();
    assert_eq!(
        cache
            .write(3, &plan, &rows(1, 1.0), &rows(1, 1.0))
            .unwrap_err(),
        Error::LayerOutOfRange {
            layer: 3,
            num_layers: 3
        }
    );
}

#[test]
fn a_budget_below_one_block_is_an_error() {
    for budget in [0, 6143] {
        assert_eq!(
            config(16).blocks_for_budget(budget).unwrap_err(),
            Error::BudgetTooSmall {
                budget_bytes: budget,
                block_bytes: 6144
            }
        );
    }
}

#[test]
fn a_block_size_that_is_not_a_power_of_two_up_to_256_is_an_error() {
    let shape = GqaShape::new(4, 2, 8).unwrap();
    for block_size in [0, 3, 24, 512] {
        assert_eq!(
            CacheConfig::new(shape, 1, block_size, DType::BF16).unwrap_err(),
            Error::InvalidBlockSize { block_size }
        );
    }
}

#[test]
fn zero_layers_and_zero_blocks_are_errors() {
    let shape = GqaShape::new(4, 2, 8).unwrap();
    assert_eq!(
        CacheConfig::new(shape, 0, 16, DType::BF16).unwrap_err(),
        Error::ZeroLayers
    );
    assert_eq!(
        CpuStorage::<f32>::new(config(16), 0).unwrap_err(),
        Error::ZeroBlocks
    );
    assert_eq!(BlockManager::new(0, 16).unwrap_err(), Error::ZeroBlocks);
}

#[test]
fn a_plan_past_the_kernels_32_bit_lengths_is_refused_and_changes_nothing() {
    use paged_gqa::batch::MAX_CONTEXT_LEN;
    let mut cache = BlockManager::new(8, 256).unwrap();
    let (a, b) = (cache.add_sequence(), cache.add_sequence());
    cache.plan(&[(a, 3)]).unwrap();
    let before = (cache.num_free_blocks(), cache.capacity(a).unwrap());
    for (batch, what) in [
        (vec![(a, MAX_CONTEXT_LEN)], "sequence length"),
        (
            vec![
                (a, MAX_CONTEXT_LEN / 2 + 200),
                (b, MAX_CONTEXT_LEN / 2 + 200),
            ],
            "new tokens of the step",
        ),
    ] {
        match cache.plan(&batch) {
            Err(Error::TooLarge { what: got, .. }) => assert_eq!(got, what),
            other => panic!("{what}: expected TooLarge, got {other:?}"),
        }
        cache.audit().unwrap();
        assert_eq!(
            (cache.num_free_blocks(), cache.capacity(a).unwrap()),
            before,
            "{what}: the refusal changed the cache"
        );
    }
}
