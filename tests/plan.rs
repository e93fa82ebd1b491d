//! The attention planner: which rows each block serves, when to split the keys, how, and how
//! much workspace that takes.

use paged_gqa::plan::{max_rows_per_block, AttendSchedule, MAX_SPLITS, MIN_KEYS_PER_SPLIT};
use paged_gqa::{GqaShape, SeqLens};
use rand::Rng;

const H200_SMS: usize = 132;

fn llama3_8b() -> GqaShape {
    GqaShape::new(32, 8, 128).unwrap()
}

fn decode(sms: usize, batch: usize, context: usize, shape: GqaShape) -> AttendSchedule {
    AttendSchedule::new(sms, &SeqLens::decode(&vec![context; batch]).unwrap(), shape)
}

/// Every key in exactly one split, no trailing empty split.
fn assert_covers(s: &AttendSchedule, max_len: usize) {
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

/// Every query row of every sequence in exactly one work item, in order.
fn assert_rows_covered(s: &AttendSchedule, lens: &SeqLens) {
    let mut next = vec![0usize; lens.batch()];
    for &[seq, j0] in &s.work {
        let (seq, j0) = (seq as usize, j0 as usize);
        assert_eq!(
            j0, next[seq],
            "work items of sequence {seq} out of order or overlapping"
        );
        next[seq] = (j0 + s.tokens_per_work).min(lens.query_len(seq));
    }
    for (seq, &covered) in next.iter().enumerate() {
        assert_eq!(
            covered,
            lens.query_len(seq),
            "rows of sequence {seq} not covered"
        );
    }
}

#[test]
fn a_batch_that_fills_the_gpu_is_not_split() {
    let s = decode(H200_SMS, 128, 8192, llama3_8b());
    assert_eq!(s.num_splits, 1);
    assert!(s.keys_per_split >= 8192);
    assert_eq!(s.workspace_floats(128, llama3_8b()), 0);
    assert_eq!(s.work.len(), 128, "one work item per decoding sequence");
}

#[test]
fn one_long_request_is_split_to_fill_the_gpu() {
    let s = decode(H200_SMS, 1, 32_768, llama3_8b());
    // 8 blocks (one per K/V head) for 132 SMs: about 4 blocks per SM wanted, 66 splits, rounded
    // to 64-key boundaries: 512 keys each, 64 splits.
    assert_eq!((s.num_splits, s.keys_per_split), (64, 512));
    assert_covers(&s, 32_768);
}

#[test]
fn short_contexts_are_not_split_below_the_minimum() {
    let s = decode(H200_SMS, 1, 300, llama3_8b());
    assert_eq!(
        s.num_splits, 2,
        "300 keys hold two splits of at least {MIN_KEYS_PER_SPLIT} / 2"
    );
    let s = decode(H200_SMS, 1, 200, llama3_8b());
    assert_eq!(s.num_splits, 1);
    assert_covers(&s, 200);
}

#[test]
fn an_empty_batch_plans_no_work_and_one_split() {
    let s = decode(H200_SMS, 0, 0, llama3_8b());
    assert!(s.work.is_empty());
    assert_eq!(s.num_splits, 1);
    assert!(s.keys_per_split >= 1);
}

#[test]
fn large_groups_are_served_in_chunks_of_heads() {
    assert_eq!(max_rows_per_block(64), 96);
    assert_eq!(max_rows_per_block(128), 48);
    assert_eq!(max_rows_per_block(256), 24);
    let falcon_7b = GqaShape::new(71, 1, 64).unwrap();
    let s = decode(H200_SMS, 1, 100, falcon_7b);
    assert_eq!((s.head_chunks, s.tokens_per_work), (1, 1));
    let wide = GqaShape::new(71, 1, 128).unwrap();
    assert_eq!(decode(H200_SMS, 1, 100, wide).head_chunks, 2);
}

#[test]
fn prompts_pack_several_query_rows_per_block() {
    // Group 4, d128: 48 rows = 12 query rows x 4 heads.
    let lens = SeqLens::new(&[4096, 30, 7], &[4096, 17, 1]).unwrap();
    let s = AttendSchedule::new(H200_SMS, &lens, llama3_8b());
    assert_eq!(s.tokens_per_work, 12);
    assert_eq!(s.work.len(), 4096_usize.div_ceil(12) + 2 + 1);
    assert_rows_covered(&s, &lens);
}

#[test]
fn sequences_without_query_rows_get_no_work() {
    let lens = SeqLens::new(&[50, 9000, 3], &[1, 0, 2]).unwrap();
    let s = AttendSchedule::new(H200_SMS, &lens, llama3_8b());
    assert!(s.work.iter().all(|&[seq, _]| seq != 1));
    // The idle long sequence does not stretch the splits.
    assert!(s.num_splits * s.keys_per_split < 9000);
}

#[test]
fn workspace_holds_partial_outputs_and_lse() {
    let s = decode(H200_SMS, 2, 16_384, llama3_8b());
    assert!(s.num_splits > 1);
    assert_eq!(
        s.workspace_floats(2, llama3_8b()),
        2 * 32 * s.num_splits * (128 + 1)
    );
}

#[test]
fn random_plans_cover_every_key_and_row() {
    let mut rng = rand::rng();
    for _ in 0..5_000 {
        let group = rng.random_range(1..=16);
        let n_kv = rng.random_range(1..=16);
        let shape = GqaShape::new(
            group * n_kv,
            n_kv,
            [64, 80, 96, 128, 256][rng.random_range(0..5)],
        )
        .unwrap();
        let batch = rng.random_range(1..=40);
        let context: Vec<usize> = (0..batch).map(|_| rng.random_range(1..50_000)).collect();
        let query: Vec<usize> = context
            .iter()
            .map(|&c| {
                if rng.random_bool(0.7) {
                    1
                } else {
                    rng.random_range(0..=c.min(600))
                }
            })
            .collect();
        let lens = SeqLens::new(&context, &query).unwrap();
        let s = AttendSchedule::new(rng.random_range(1..=200), &lens, shape);
        let max_len = (0..batch)
            .filter(|&b| query[b] > 0)
            .map(|b| context[b])
            .max()
            .unwrap_or(0);
        assert_covers(&s, max_len);
        assert_rows_covered(&s, &lens);
        assert_eq!(s.keys_per_split % 64, 0);
        assert!(
            s.tokens_per_work * shape.group().min(max_rows_per_block(shape.head_dim()))
                <= max_rows_per_block(shape.head_dim())
        );
    }
}
