//! The naive baseline on the GPU (gather, repeat_kv, per-head attention) against the oracle,
//! for decode and for prompts and chunks, so that the benchmarks compare the fused kernels with
//! a correct baseline. Skips (printing why) without a GPU; fails instead with
//! PAGED_GQA_REQUIRE_GPU=1.

mod common;

use common::PagedCase;
use half::{bf16, f16};
use paged_gqa::cuda::NaiveAttention;
use paged_gqa::{Element, GqaShape};

fn check<T: Element>(test: &str, shape: GqaShape, block_size: usize, lens: &[usize], bound: f64) {
    check_queries::<T>(test, shape, block_size, lens, &vec![1; lens.len()], bound);
}

fn check_queries<T: Element>(
    test: &str,
    shape: GqaShape,
    block_size: usize,
    lens: &[usize],
    query_lens: &[usize],
    bound: f64,
) {
    let Some(ctx) = common::gpu_or_skip(test) else {
        return;
    };
    let mut rng = common::rng(test);
    let case = PagedCase::random(&mut rng, shape, block_size, lens, query_lens);
    let common::Typed {
        q,
        k_cache: k,
        v_cache: v,
        oracle,
    } = case.typed::<T>();

    let stream = ctx.new_stream().unwrap();
    let mut naive = NaiveAttention::<T>::new(
        &stream,
        case.layout,
        &case.lens,
        &case.tables,
        case.max_blocks,
    )
    .unwrap();
    let (k_dev, v_dev, q_dev) = (
        stream.clone_htod(&k).unwrap(),
        stream.clone_htod(&v).unwrap(),
        stream.clone_htod(&q).unwrap(),
    );
    let mut out = stream.clone_htod(&common::poison::<T>(q.len())).unwrap();
    naive
        .run(&stream, &k_dev, &v_dev, &q_dev, &mut out, None)
        .unwrap();
    let out = common::download_f64(&stream, &out);
    assert!(
        out.iter().all(|x| x.is_finite()),
        "{test}: unwritten output"
    );
    let rel = common::rel_l2(&out, &oracle.out);
    assert!(rel < bound, "{test}: relative L2 {:e}", rel);
}

#[test]
fn gpu_naive_decode_matches_oracle_llama3_8b_bf16() {
    let shape = GqaShape::new(32, 8, 128).unwrap();
    check::<bf16>(
        "gpu_naive_decode_matches_oracle_llama3_8b_bf16",
        shape,
        16,
        &[1, 16, 37, 2000],
        1e-2,
    );
}

#[test]
fn gpu_naive_decode_matches_oracle_falcon_and_gemma_f16() {
    let falcon = GqaShape::new(71, 1, 64).unwrap();
    check::<f16>(
        "gpu_naive_decode_matches_oracle_falcon_f16",
        falcon,
        1,
        &[1, 5, 130],
        2e-3,
    );
    let gemma = GqaShape::new(16, 8, 256).unwrap();
    check::<f16>(
        "gpu_naive_decode_matches_oracle_gemma_f16",
        gemma,
        256,
        &[300, 1, 256],
        2e-3,
    );
}

#[test]
fn gpu_naive_prefill_matches_oracle_on_prompts_and_chunks() {
    let test = "gpu_naive_prefill_matches_oracle_on_prompts_and_chunks";
    let llama = GqaShape::new(32, 8, 128).unwrap();
    // A prompt, a chunk on cached keys, a decode token and speculation, in one batch.
    check_queries::<bf16>(
        test,
        llama,
        16,
        &[700, 1100, 33, 90],
        &[700, 100, 1, 5],
        1e-2,
    );
    let qwen = GqaShape::new(28, 4, 128).unwrap();
    check_queries::<f16>(test, qwen, 1, &[17, 300], &[17, 300], 2e-3);
}
