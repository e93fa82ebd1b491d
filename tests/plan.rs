//! The decode planner: when to split the context, how, and how much workspace that takes.

use paged_gqa::plan::{max_heads_per_block, DecodeSchedule, MAX_SPLITS, MIN_KEYS_PER_SPLIT};
use paged_gqa::GqaShape;
use rand::Rng;

const H200_SMS: usize = 132;

fn llama3_8b() -> GqaShape {
    GqaShape::new(32, 8, 128).unwrap()
}

/// Every key in exactly one split, no trailing empty split.
fn assert_covers(s: &DecodeSchedule, max_len: usize) {
    assert!(s.num_splits >= 1 && s.num_splits <= MAX_SPLITS);
    assert!(
        s.num_splits * s.keys_per_split >= max_len,
        "{s:?} misses keys of {max_len}"
    );
    assert!(
        (s.num_splits - 1) * s.keys_per_split < max_len.max(1),
        "{s:?} has an empty last split for {max_len}"
    );
}

#[test]
fn a_batch_that_fills_the_gpu_is_not_split() {
    let s = DecodeSchedule::new(H200_SMS, 128, llama3_8b(), 8192);
    assert_eq!(s.num_splits, 1);
    assert!(s.keys_per_split >= 8192);
    assert_eq!(s.workspace_floats(128, llama3_8b()), 0);
}

#[test]
fn one_long_request_is_split_to_fill_the_gpu() {
    let s = DecodeSchedule::new(H200_SMS, 1, llama3_8b(), 32_768);
    // 8 blocks (one per K/V head) for 132 SMs: about 4 blocks per SM wanted, 66 splits, rounded
    // to 64-key boundaries: 512 keys each, 64 splits.
    assert_eq!((s.num_splits, s.keys_per_split), (64, 512));
    assert_covers(&s, 32_768);
}

#[test]
fn short_contexts_are_not_split_below_the_minimum() {
    let s = DecodeSchedule::new(H200_SMS, 1, llama3_8b(), 300);
    assert_eq!(
        s.num_splits, 2,
        "300 keys hold two splits of at least {MIN_KEYS_PER_SPLIT} / 2"
    );
    let s = DecodeSchedule::new(H200_SMS, 1, llama3_8b(), 200);
    assert_eq!(s.num_splits, 1);
    assert_covers(&s, 200);
}

#[test]
fn an_empty_batch_or_context_plans_one_split() {
    let s = DecodeSchedule::new(H200_SMS, 0, llama3_8b(), 0);
    assert_eq!(s.num_splits, 1);
    assert!(s.keys_per_split >= 1);
}

#[test]
fn large_groups_are_served_in_chunks_of_heads() {
    assert_eq!(max_heads_per_block(64), 96);
    assert_eq!(max_heads_per_block(128), 48);
    assert_eq!(max_heads_per_block(256), 24);
    let falcon_7b = GqaShape::new(71, 1, 64).unwrap();
    assert_eq!(
        DecodeSchedule::new(H200_SMS, 1, falcon_7b, 100).head_chunks,
        1
    );
    let wide = GqaShape::new(71, 1, 128).unwrap();
    assert_eq!(DecodeSchedule::new(H200_SMS, 1, wide, 100).head_chunks, 2);
}

#[test]
fn workspace_holds_partial_outputs_and_lse() {
    let s = DecodeSchedule::new(H200_SMS, 2, llama3_8b(), 16_384);
    assert!(s.num_splits > 1);
    assert_eq!(
        s.workspace_floats(2, llama3_8b()),
        2 * 32 * s.num_splits * (128 + 1)
    );
}

#[test]
fn random_plans_cover_every_key() {
    let mut rng = rand::rng();
    for _ in 0..10_000 {
        let group = rng.random_range(1..=16);
        let n_kv = rng.random_range(1..=16);
        let shape = GqaShape::new(
            group * n_kv,
            n_kv,
            [64, 80, 96, 128, 256][rng.random_range(0..5)],
        )
        .unwrap();
        let max_len = rng.random_range(0..200_000);
        let s = DecodeSchedule::new(
            rng.random_range(1..=200),
            rng.random_range(1..=300),
            shape,
            max_len,
        );
        assert_covers(&s, max_len);
        assert_eq!(s.keys_per_split % 64, 0);
        assert!(
            s.num_splits == 1 || s.keys_per_split >= MIN_KEYS_PER_SPLIT / 2,
            "{s:?}"
        );
    }
}
