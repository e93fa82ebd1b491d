//! The naive baseline on the GPU (gather, repeat_kv, per-head attention) against the oracle,
//! for decode and for prompts and chunks, so that the benchmarks compare the fused kernels with
//! a correct baseline. Skips (printing why) without a GPU; fails instead with
//! PAGED_GQA_REQUIRE_GPU=1. Every `gpu_xxx` test has a twin `sim_xxx` (`sim_full_xxx`: slow)
//! running the same body on the kernel emulator.

use crate::common;

use common::{twins, Device, PagedCase};
use half::{bf16, f16};
use paged_gqa::{Element, GqaShape};

fn check<D: Device, T: Element>(
    dev: &D,
    test: &str,
    shape: GqaShape,
    block_size: usize,
    lens: &[usize],
) {
    let queries = vec![1; lens.len()];
    check_queries::<D, T>(dev, test, shape, block_size, lens, &queries);
}

fn check_queries<D: Device, T: Element>(
    dev: &D,
    test: &str,
    shape: GqaShape,
    block_size: usize,
    lens: &[usize],
    query_lens: &[usize],
) {
    let mut rng = common::rng(test);
    let case = PagedCase::random(&mut rng, shape, block_size, lens, query_lens);
    let common::Typed {
        q,
        k_cache: k,
        v_cache: v,
        oracle,
        cond,
    } = case.typed::<T>();

    let mut naive = dev
        .naive::<T>(case.layout, &case.lens, &case.tables, case.max_blocks)
        .unwrap();
    let (k_dev, v_dev, q_dev) = (dev.upload(&k), dev.upload(&v), dev.upload(&q));
    let mut out = dev.alloc_poisoned::<T>(q.len());
    dev.run_naive(
        &mut naive,
        &k_dev,
        &v_dev,
        &q_dev,
        &mut out,
        &paged_gqa::AttendOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{test}: {e}"));
    let out = dev.download_f64(&out);
    assert!(
        out.iter().all(|x| x.is_finite()),
        "{test}: unwritten output"
    );
    // Decode: the per-head kernel keeps its scores and weights in f32, as the CUDA-core kernel
    // does; prompts and chunks run the attention kernels over the repeated K/V, either of them.
    let keep = vec![true; case.lens.num_tokens()];
    let model = common::check::model::<D, T>(paged_gqa::plan::KernelChoice::Auto);
    common::check::check_bounds(test, shape, &out, None, &oracle, &cond, &keep, model);
}

fn naive_decode_llama<D: Device>(dev: &D, test: &str) {
    let shape = GqaShape::new(32, 8, 128).unwrap();
    check::<D, bf16>(dev, test, shape, 16, &[1, 16, 37, 2000]);
}
twins!(
    gpu_naive_decode_matches_oracle_llama3_8b_bf16,
    sim_naive_decode_matches_oracle_llama3_8b_bf16,
    naive_decode_llama
);

fn naive_decode_falcon_and_gemma<D: Device>(dev: &D, test: &str) {
    let falcon = GqaShape::new(71, 1, 64).unwrap();
    let what = format!("{test} (Falcon-7B)");
    check::<D, f16>(dev, &what, falcon, 1, &[1, 5, 130]);
    let gemma = GqaShape::new(16, 8, 256).unwrap();
    let what = format!("{test} (Gemma-2-9B)");
    check::<D, f16>(dev, &what, gemma, 256, &[300, 1, 256]);
}
twins!(
    gpu_naive_decode_matches_oracle_falcon_and_gemma_f16,
    sim_naive_decode_matches_oracle_falcon_and_gemma_f16,
    naive_decode_falcon_and_gemma
);

fn naive_prefill<D: Device>(dev: &D, test: &str) {
    let llama = GqaShape::new(32, 8, 128).unwrap();
    // A prompt, a chunk on cached keys, a decode token and speculation, in one batch.
    check_queries::<D, bf16>(
        dev,
        test,
        llama,
        16,
        &[700, 1100, 33, 90],
        &[700, 100, 1, 5],
    );
    let qwen = GqaShape::new(28, 4, 128).unwrap();
    check_queries::<D, f16>(dev, test, qwen, 1, &[17, 300], &[17, 300]);
}
twins!(
    gpu_naive_prefill_matches_oracle_on_prompts_and_chunks,
    sim_full_naive_prefill_matches_oracle_on_prompts_and_chunks,
    naive_prefill
);
