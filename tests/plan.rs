//! The attention planner: which rows each block serves, when to split the keys, how, and how
//! much workspace that takes.

mod common;

use paged_gqa::plan::{
    max_rows_per_block, AttendSchedule, KernelChoice, KernelWork, MAX_SPLITS, MMA_PACK_ROWS,
    MMA_ROWS, NARROW_ROWS,
};
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

/// Every query row of every sequence in exactly one work item of one kernel.
fn assert_rows_covered(s: &AttendSchedule, lens: &SeqLens) {
    let mut next = vec![0usize; lens.batch()];
    let mut kernel_of = vec![None; lens.batch()];
    for (name, kernel) in [
        ("cuda", &s.cuda_cores),
        ("mma", &s.tensor_cores),
        ("narrow", &s.narrow_tensor_cores),
    ] {
        let mut work = kernel.work.clone();
        work.sort();
        for [seq, j0] in work {
            let (seq, j0) = (seq as usize, j0 as usize);
            let first_kernel = *kernel_of[seq].get_or_insert(name);
            assert_eq!(
                first_kernel, name,
                "sequence {seq} is split between two kernels"
            );
            assert_eq!(
                j0, next[seq],
                "work items of sequence {seq} leave a gap or overlap"
            );
            next[seq] = (j0 + kernel.tokens_per_work).min(lens.query_len(seq));
        }
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
    assert_eq!(
        s.narrow_tensor_cores.work.len(),
        128,
        "one work item per decoding sequence"
    );
    assert!(s.tensor_cores.work.is_empty(), "group 4 decode: 4 rows");
    assert!(s.cuda_cores.work.is_empty(), "group 4 decode: 4 rows");
    assert_eq!(
        s.narrow_tensor_cores.tokens_per_work, 1,
        "a decode block serves one query row"
    );
}

#[test]
fn one_long_request_is_split_to_fill_the_gpu() {
    let s = decode(H200_SMS, 1, 32_768, llama3_8b());
    // 8 blocks (one per K/V head) for 132 SMs: the model's cheapest cut is 14 splits of 2368
    // keys (112 blocks, enough bytes in flight; more would only add partials to merge).
    assert_eq!((s.num_splits, s.keys_per_split), (14, 2368));
    assert_covers(&s, 32_768);
}

#[test]
fn short_contexts_are_not_split_below_the_minimum() {
    let s = decode(H200_SMS, 1, 64, llama3_8b());
    assert_eq!(s.num_splits, 1);
    assert_covers(&s, 64);
}

#[test]
fn the_model_splits_small_grids_for_bytes_in_flight_and_leaves_full_ones_whole() {
    // Llama-3-8B, one request of 8k: 8 blocks; 15 splits of 576 keys make 120, each with a
    // 32 KiB tile in flight: 29 KiB per SM, over twice Little's law at H200 bandwidth.
    let s = decode(H200_SMS, 1, 8192, llama3_8b());
    assert_eq!((s.num_splits, s.keys_per_split), (15, 576));
    // Qwen2.5-0.5B (2 K/V heads, head_dim 64: 16 KiB tiles) needs more: 128 splits of 64.
    let qwen = GqaShape::new(14, 2, 64).unwrap();
    assert_eq!(decode(H200_SMS, 1, 8192, qwen).num_splits, 128);
    // 64 requests fill the GPU: no split, no merge.
    assert_eq!(decode(H200_SMS, 64, 8192, llama3_8b()).num_splits, 1);
    // Falcon-7B's 71 rows make every split's partials heavy, and still 64 requests take 4.
    let falcon = GqaShape::new(71, 1, 64).unwrap();
    assert_eq!(decode(H200_SMS, 64, 8192, falcon).num_splits, 4);
}

#[test]
fn an_empty_batch_plans_no_work_and_one_split() {
    let s = decode(H200_SMS, 0, 0, llama3_8b());
    assert!(s.is_empty());
    assert_eq!(s.num_splits, 1);
    assert!(s.keys_per_split >= 1);
}

#[test]
fn large_groups_are_served_in_chunks_of_heads() {
    assert_eq!(max_rows_per_block(64), 96);
    assert_eq!(max_rows_per_block(128), 48);
    assert_eq!(max_rows_per_block(256), 24);
    let falcon_7b = GqaShape::new(71, 1, 64).unwrap();
    let lens = SeqLens::decode(&[100]).unwrap();
    let s = AttendSchedule::with_kernels(H200_SMS, &lens, falcon_7b, KernelChoice::CudaCores);
    assert_eq!(
        (s.cuda_cores.head_chunks, s.cuda_cores.tokens_per_work),
        (1, 1)
    );
    let wide = GqaShape::new(71, 1, 128).unwrap();
    let s = AttendSchedule::with_kernels(H200_SMS, &lens, wide, KernelChoice::CudaCores);
    assert_eq!(s.cuda_cores.head_chunks, 2);
    // Tensor cores, wide: all 71 heads in one block (5 warps), each K/V byte read once.
    let s = AttendSchedule::new(H200_SMS, &lens, wide);
    assert_eq!(
        (s.tensor_cores.head_chunks, s.tensor_cores.tokens_per_work),
        (1, 1)
    );
    // Narrow: chunks of 16 heads.
    let s = AttendSchedule::with_kernels(H200_SMS, &lens, wide, KernelChoice::NarrowTensorCores);
    assert_eq!(
        (
            s.narrow_tensor_cores.head_chunks,
            s.narrow_tensor_cores.tokens_per_work
        ),
        (5, 1)
    );
    // Above 128 heads, chunks of 128.
    let huge = GqaShape::new(200, 1, 64).unwrap();
    let s = AttendSchedule::new(H200_SMS, &lens, huge);
    assert_eq!(s.tensor_cores.head_chunks, 2);
}

#[test]
fn auto_sends_up_to_16_rows_to_the_narrow_layout_and_more_to_the_wide_one() {
    // Group 4: decode (4 rows) and speculation of 4 (16 rows) narrow; 5 query rows (20 rows)
    // and prompts wide; nothing on CUDA cores.
    let lens = SeqLens::new(&[900, 900, 900, 900], &[1, 4, 5, 500]).unwrap();
    let s = AttendSchedule::new(H200_SMS, &lens, llama3_8b());
    let seqs = |k: &KernelWork| {
        let mut v: Vec<i32> = k.work.iter().map(|&[seq, _]| seq).collect();
        v.dedup();
        v
    };
    assert_eq!(seqs(&s.narrow_tensor_cores), [0, 1]);
    assert_eq!(seqs(&s.tensor_cores), [2, 3]);
    assert!(s.cuda_cores.work.is_empty());
    assert_eq!(NARROW_ROWS, 16);
    assert_eq!(s.narrow_tensor_cores.tokens_per_work, 4);
    // Falcon-7B decodes on the wide layout: 71 rows per token.
    let falcon_7b = GqaShape::new(71, 1, 64).unwrap();
    let s = decode(H200_SMS, 3, 100, falcon_7b);
    assert!(s.cuda_cores.work.is_empty() && s.narrow_tensor_cores.work.is_empty());
    assert_eq!(s.tensor_cores.work.len(), 3);
}

#[test]
fn a_forced_choice_puts_every_sequence_on_one_kernel() {
    let lens = SeqLens::new(&[900, 900, 40], &[1, 500, 40]).unwrap();
    let cuda = AttendSchedule::with_kernels(H200_SMS, &lens, llama3_8b(), KernelChoice::CudaCores);
    assert!(cuda.tensor_cores.work.is_empty() && cuda.narrow_tensor_cores.work.is_empty());
    assert_rows_covered(&cuda, &lens);
    let mma = AttendSchedule::with_kernels(H200_SMS, &lens, llama3_8b(), KernelChoice::TensorCores);
    assert!(mma.cuda_cores.work.is_empty() && mma.narrow_tensor_cores.work.is_empty());
    assert_rows_covered(&mma, &lens);
    let narrow = AttendSchedule::with_kernels(
        H200_SMS,
        &lens,
        llama3_8b(),
        KernelChoice::NarrowTensorCores,
    );
    assert!(narrow.cuda_cores.work.is_empty() && narrow.tensor_cores.work.is_empty());
    assert_eq!(narrow.narrow_tensor_cores.tokens_per_work, 4);
    assert_rows_covered(&narrow, &lens);
}

#[test]
fn tensor_core_blocks_pack_whole_groups_into_64_rows() {
    assert_eq!((MMA_PACK_ROWS, MMA_ROWS), (64, 128));
    for (group, tokens) in [(1, 64), (4, 16), (5, 12), (7, 9), (8, 8), (64, 1), (71, 1)] {
        let shape = GqaShape::new(group * 2, 2, 128).unwrap();
        let lens = SeqLens::new(&[1000], &[1000]).unwrap();
        let s = AttendSchedule::new(H200_SMS, &lens, shape);
        assert_eq!(s.tensor_cores.tokens_per_work, tokens, "group {group}");
        assert_eq!(
            s.tensor_cores.head_chunks,
            group.div_ceil(128),
            "group {group}"
        );
        assert_eq!(s.tensor_cores.work.len(), 1000_usize.div_ceil(tokens));
    }
}

#[test]
fn prompts_pack_several_query_rows_per_block() {
    // Group 4, d128, CUDA cores: 48 rows = 12 query rows x 4 heads.
    let lens = SeqLens::new(&[4096, 30, 7], &[4096, 17, 1]).unwrap();
    let s = AttendSchedule::with_kernels(H200_SMS, &lens, llama3_8b(), KernelChoice::CudaCores);
    assert_eq!(s.cuda_cores.tokens_per_work, 12);
    assert_eq!(s.cuda_cores.work.len(), 4096_usize.div_ceil(12) + 2 + 1);
    assert_rows_covered(&s, &lens);
    // Tensor cores: 64 rows = 16 query rows x 4 heads; the decode token goes narrow.
    let s = AttendSchedule::new(H200_SMS, &lens, llama3_8b());
    assert_eq!(s.tensor_cores.tokens_per_work, 16);
    assert_eq!(s.tensor_cores.work.len(), 4096 / 16 + 2);
    assert_eq!(s.narrow_tensor_cores.work, [[2, 0]]);
    assert_rows_covered(&s, &lens);
}

#[test]
fn sequences_without_query_rows_get_no_work() {
    let lens = SeqLens::new(&[50, 9000, 3], &[1, 0, 2]).unwrap();
    let s = AttendSchedule::new(H200_SMS, &lens, llama3_8b());
    assert!(s.cuda_cores.work.iter().all(|&[seq, _]| seq != 1));
    assert!(s.tensor_cores.work.iter().all(|&[seq, _]| seq != 1));
    assert!(s.narrow_tensor_cores.work.iter().all(|&[seq, _]| seq != 1));
    // The idle long sequence does not stretch the splits.
    assert!(s.num_splits * s.keys_per_split < 9000);
}

#[test]
fn workspace_holds_partial_outputs_and_lse() {
    let s = decode(H200_SMS, 2, 16_384, llama3_8b());
    assert!(s.num_splits > 1 && s.max_splits() >= s.num_splits);
    assert_eq!(
        s.workspace_floats(2, llama3_8b()),
        2 * 32 * s.max_splits() * (128 + 1)
    );
}

#[test]
fn random_plans_cover_every_key_and_row() {
    let mut rng = common::rng("random_plans_cover_every_key_and_row");
    for _ in 0..5_000 {
        let group = [1, 2, 4, 5, 7, 8, 16, 64, 71][rng.random_range(0..9)];
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
        let choice = [
            KernelChoice::Auto,
            KernelChoice::CudaCores,
            KernelChoice::TensorCores,
            KernelChoice::NarrowTensorCores,
        ][rng.random_range(0..4)];
        let s = AttendSchedule::with_kernels(rng.random_range(1..=200), &lens, shape, choice);
        let max_len = (0..batch)
            .filter(|&b| query[b] > 0)
            .map(|b| context[b])
            .max()
            .unwrap_or(0);
        assert_covers(&s, max_len);
        assert_rows_covered(&s, &lens);
        assert_eq!(s.keys_per_split % 64, 0);
        let rows_fit = |k: &KernelWork, rows_per_block: usize| {
            k.tokens_per_work * shape.group().min(rows_per_block) <= rows_per_block
        };
        assert!(rows_fit(
            &s.cuda_cores,
            max_rows_per_block(shape.head_dim())
        ));
        assert!(rows_fit(&s.tensor_cores, MMA_ROWS));
        assert!(rows_fit(&s.narrow_tensor_cores, NARROW_ROWS));
        for kernel in [&s.cuda_cores, &s.tensor_cores, &s.narrow_tensor_cores] {
            let last_keys: Vec<usize> = kernel
                .work
                .iter()
                .map(|&[seq, j0]| {
                    let (seq, j0) = (seq as usize, j0 as usize);
                    let last = (j0 + kernel.tokens_per_work).min(lens.query_len(seq)) - 1;
                    lens.position(seq, last)
                })
                .collect();
            assert!(
                last_keys.windows(2).all(|w| w[0] >= w[1]),
                "blocks not ordered by keys seen: {last_keys:?}"
            );
        }
    }
}

#[test]
fn the_gpu_small_varlen_case_is_split_on_an_h200() {
    // tests/gpu/attend.rs relies on this to put the split path under compute-sanitizer.
    let lens = SeqLens::new(&[1, 40, 70, 33, 600], &[1, 40, 13, 3, 20]).unwrap();
    let shape = GqaShape::new(8, 2, 64).unwrap();
    for choice in [
        KernelChoice::Auto,
        KernelChoice::CudaCores,
        KernelChoice::TensorCores,
        KernelChoice::NarrowTensorCores,
    ] {
        let s = AttendSchedule::with_kernels(H200_SMS, &lens, shape, choice);
        assert!(s.num_splits > 1, "{choice:?}: {s:?}");
    }
}

#[test]
fn blocks_that_see_the_most_keys_come_first() {
    // A causal prompt: its last rows see the most keys; a long decode beside it.
    let lens = SeqLens::new(&[1000, 5000, 20], &[1000, 1, 1]).unwrap();
    let s = AttendSchedule::new(H200_SMS, &lens, llama3_8b());
    let first_rows: Vec<i32> = s.tensor_cores.work.iter().map(|&[_, j0]| j0).collect();
    let mut descending = first_rows.clone();
    descending.sort_by(|a, b| b.cmp(a));
    assert_eq!(first_rows, descending);
    assert_eq!(s.narrow_tensor_cores.work, [[1, 0], [2, 0]]);
    assert_rows_covered(&s, &lens);
    // Ordered by the keys of the last row, not by sequence or by first row.
    let decode = AttendSchedule::new(
        H200_SMS,
        &SeqLens::decode(&[20, 5000]).unwrap(),
        llama3_8b(),
    );
    assert_eq!(decode.narrow_tensor_cores.work, [[1, 0], [0, 0]]);
    // A prompt of 98 (last block's rows see up to 98 keys) and a chunk of 16 on 94 cached (its
    // one block sees 110): the chunk first.
    let lens = SeqLens::new(&[98, 110], &[98, 16]).unwrap();
    let s = AttendSchedule::new(H200_SMS, &lens, llama3_8b());
    assert_eq!(s.tensor_cores.work[0], [1, 0]);
}
