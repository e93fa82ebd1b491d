//! The CPU fallback attention (f32, each K/V row read once per group) against the f64 oracle:
//! decode on the shapes of real models with mixed context lengths and page sizes 1 to 256, and
//! prompts, varlen batches, chunked prefill and speculative verification.

mod common;

use common::PagedCase;
use half::bf16;
use paged_gqa::cache::{CacheConfig, PagedCache};
use paged_gqa::cpu::{self, CpuStorage, PagedKv};
use paged_gqa::AttendOptions;
use paged_gqa::{DType, Error, GqaShape};

use common::MODELS;

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    (diff / norm).sqrt()
}

/// CPU decode of a random bf16 case equals the oracle within f32 rounding.
fn check(test: &str, model: &str, shape: GqaShape, block_size: usize, context_lens: &[usize]) {
    check_queries(
        test,
        model,
        shape,
        block_size,
        context_lens,
        &vec![1; context_lens.len()],
    );
}

/// CPU attention of a random bf16 case (any query lengths) equals the oracle.
fn check_queries(
    test: &str,
    model: &str,
    shape: GqaShape,
    block_size: usize,
    context_lens: &[usize],
    query_lens: &[usize],
) {
    check_sampled(test, model, shape, block_size, context_lens, query_lens, 1);
}

/// [`check_queries`] with the oracle at every `stride`-th query row (and each sequence's first
/// and last 16): long cases. Every output element must still be written.
fn check_sampled(
    test: &str,
    model: &str,
    shape: GqaShape,
    block_size: usize,
    context_lens: &[usize],
    query_lens: &[usize],
    stride: usize,
) {
    let mut rng = common::rng(test);
    let case = PagedCase::random(&mut rng, shape, block_size, context_lens, query_lens);
    let keep = common::sample_tokens(&case.lens, stride);
    let common::Typed {
        q,
        k_cache: k,
        v_cache: v,
        oracle,
    } = case.typed_at::<bf16>(&keep);
    let kv = PagedKv::new(
        case.layout,
        &case.lens,
        &case.tables,
        case.max_blocks,
        &k,
        &v,
    )
    .unwrap();

    let rows = case.lens.num_tokens() * shape.n_heads();
    let mut out = vec![f32::NAN; rows * shape.head_dim()]; // poisoned: every element must be written
    let mut lse = vec![f32::NAN; rows];
    cpu::attend(&q, &kv, &AttendOptions::default(), &mut out, &mut lse).unwrap();
    assert!(
        out.iter().all(|x| x.is_finite()) && lse.iter().all(|x| x.is_finite()),
        "{model}: an output element was not written"
    );
    let (row_len, n_heads) = (shape.q_row_len(), shape.n_heads());
    let out = common::kept_rows(&out, &keep, row_len);
    let lse = common::kept_rows(&lse, &keep, n_heads);
    let (oracle_out, oracle_lse) = (
        common::kept_rows(&oracle.out, &keep, row_len),
        common::kept_rows(&oracle.lse, &keep, n_heads),
    );
    let err = rel_l2(&out, &oracle_out);
    assert!(
        err < 1e-5,
        "{model} block {block_size}: relative L2 {err:e}"
    );
    let lse_err = lse
        .iter()
        .zip(&oracle_lse)
        .map(|(&g, &w)| (g as f64 - w).abs())
        .fold(0.0, f64::max);
    assert!(
        lse_err < 1e-4,
        "{model} block {block_size}: lse error {lse_err:e}"
    );
}

#[test]
fn cpu_decode_matches_the_oracle_on_real_model_shapes() {
    for (i, &(model, n_heads, n_kv_heads, head_dim)) in MODELS.iter().enumerate() {
        let shape = GqaShape::new(n_heads, n_kv_heads, head_dim).unwrap();
        let block_size = [16, 1, 256][i % 3];
        // 1 key, exactly one page, a partial last page, several pages.
        let lens = [
            1,
            block_size,
            block_size + block_size / 2 + 1,
            3 * block_size + 5,
        ];
        check(
            "cpu_decode_matches_the_oracle_on_real_model_shapes",
            model,
            shape,
            block_size,
            &lens,
        );
    }
}

#[test]
fn cpu_decode_matches_the_oracle_at_32k_context() {
    let shape = GqaShape::new(32, 8, 128).unwrap();
    check(
        "cpu_decode_matches_the_oracle_at_32k_context",
        "Llama-3-8B",
        shape,
        16,
        &[1, 32_768, 17],
    );
}

#[test]
fn cpu_attend_matches_the_oracle_on_a_long_prompt() {
    let shape = GqaShape::new(32, 8, 128).unwrap();
    check_queries(
        "cpu_attend_matches_the_oracle_on_a_long_prompt",
        "Llama-3-8B",
        shape,
        16,
        &[1024],
        &[1024],
    );
}

#[test]
fn cpu_attend_matches_the_oracle_on_a_varlen_batch() {
    let shape = GqaShape::new(28, 4, 128).unwrap();
    check_queries(
        "cpu_attend_matches_the_oracle_on_a_varlen_batch",
        "Qwen2-7B",
        shape,
        16,
        &[1, 17, 500, 300],
        &[1, 17, 500, 4],
    );
}

#[test]
fn cpu_attend_matches_the_oracle_on_chunked_prefill_and_speculation() {
    let test = "cpu_attend_matches_the_oracle_on_chunked_prefill_and_speculation";
    // A chunk of 128 on 1000 cached keys, and speculative verification of 2..8 tokens.
    let falcon = GqaShape::new(71, 1, 64).unwrap();
    check_queries(test, "Falcon-7B", falcon, 32, &[1128, 40, 90], &[128, 2, 8]);
    let gemma = GqaShape::new(16, 8, 256).unwrap();
    check_queries(test, "Gemma-2-9B", gemma, 1, &[300, 7], &[64, 5]);
}

// Issue 6's long cases. Each keeps its model's group and head_dim but serves one K/V head
// (K/V heads are independent in every path), so that the f32 CPU path runs them in seconds;
// the oracle is checked at a sample of rows.

#[test]
fn cpu_attend_matches_the_oracle_on_an_8k_prompt() {
    let test = "cpu_attend_matches_the_oracle_on_an_8k_prompt";
    let llama_group = GqaShape::new(4, 1, 128).unwrap();
    check_sampled(
        test,
        "Llama-3-8B group",
        llama_group,
        16,
        &[8192],
        &[8192],
        127,
    );
}

#[test]
fn cpu_attend_matches_the_oracle_on_a_varlen_batch_up_to_4096() {
    let test = "cpu_attend_matches_the_oracle_on_a_varlen_batch_up_to_4096";
    let qwen_group = GqaShape::new(7, 1, 128).unwrap();
    let lens = [1, 17, 500, 4096];
    check_sampled(test, "Qwen2-7B group", qwen_group, 16, &lens, &lens, 61);
}

#[test]
fn cpu_attend_matches_the_oracle_on_a_chunk_of_512_on_10k_cached() {
    let test = "cpu_attend_matches_the_oracle_on_a_chunk_of_512_on_10k_cached";
    let llama_group = GqaShape::new(4, 1, 128).unwrap();
    check_sampled(
        test,
        "Llama-3-8B group",
        llama_group,
        16,
        &[10_512, 9],
        &[512, 1],
        7,
    );
}

#[test]
fn cpu_attend_matches_the_oracle_on_speculation_on_model_shapes() {
    let test = "cpu_attend_matches_the_oracle_on_speculation_on_model_shapes";
    for (i, &(model, n_heads, n_kv_heads, head_dim)) in MODELS.iter().enumerate() {
        let shape = GqaShape::new(n_heads, n_kv_heads, head_dim).unwrap();
        let block_size = [16, 1, 256][i % 3];
        let contexts = [300, 33, 129, 17, 64, 7, 8];
        check_queries(
            test,
            model,
            shape,
            block_size,
            &contexts,
            &[2, 3, 4, 5, 6, 7, 8],
        );
    }
}

#[test]
fn cpu_decode_rejects_outputs_of_the_wrong_length() {
    let mut rng = common::rng("cpu_decode_rejects_outputs_of_the_wrong_length");
    let case = PagedCase::random(
        &mut rng,
        GqaShape::new(4, 2, 8).unwrap(),
        4,
        &[5, 6],
        &[1, 1],
    );
    let (mut out, mut lse) = (vec![0.0; 2 * 32 - 1], vec![0.0; 8]);
    let err = cpu::attend(
        &case.q,
        &case.kv(),
        &AttendOptions::default(),
        &mut out,
        &mut lse,
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::BufferLength { name: "out", .. }),
        "{err}"
    );
}

#[test]
fn cache_attend_after_writes_matches_the_oracle_for_prefill_and_decode() {
    let mut rng =
        common::rng("cache_attend_after_writes_matches_the_oracle_for_prefill_and_decode");
    let shape = GqaShape::new(8, 2, 64).unwrap();
    let config = CacheConfig::new(shape, 2, 16, DType::F32).unwrap();
    let mut cache = PagedCache::new(CpuStorage::<f32>::new(config, 16).unwrap()).unwrap();
    let (a, b) = (cache.add_sequence(), cache.add_sequence());
    for (step, batch) in [[(a, 20), (b, 3)], [(a, 1), (b, 1)], [(a, 1), (b, 1)]]
        .iter()
        .enumerate()
    {
        let plan = cache.plan(batch).unwrap();
        let n = plan.num_new_tokens();
        for layer in 0..2 {
            let (k, v) = (
                common::uniform(&mut rng, n * 128),
                common::uniform(&mut rng, n * 128),
            );
            cache.write(layer, &plan, &k, &v).unwrap();
        }
        let q = common::uniform(&mut rng, n * 8 * 64);
        let (mut out, mut lse) = (vec![f32::NAN; n * 8 * 64], vec![f32::NAN; n * 8]);
        cache
            .attend(1, &plan, &q, &mut out, &mut lse, &AttendOptions::default())
            .unwrap();
        let oracle = cache
            .reference(1, &plan, &q, &AttendOptions::default())
            .unwrap();
        assert!(rel_l2(&out, &oracle.out) < 1e-5, "step {step}");
    }
}

#[test]
fn cpu_naive_attend_agrees_with_the_fused_one() {
    let mut rng = common::rng("cpu_naive_attend_agrees_with_the_fused_one");
    let shape = GqaShape::new(28, 4, 128).unwrap(); // group 7
    let case = PagedCase::random(&mut rng, shape, 16, &[1, 16, 45, 300], &[1; 4]);
    let rows = 4 * 28;
    let (mut fused, mut fused_lse) = (vec![f32::NAN; rows * 128], vec![f32::NAN; rows]);
    let (mut naive, mut naive_lse) = (vec![f32::NAN; rows * 128], vec![f32::NAN; rows]);
    cpu::attend(
        &case.q,
        &case.kv(),
        &AttendOptions::default(),
        &mut fused,
        &mut fused_lse,
    )
    .unwrap();
    cpu::attend_naive(
        &case.q,
        &case.kv(),
        &AttendOptions::default(),
        &mut naive,
        &mut naive_lse,
    )
    .unwrap();
    let oracle = cpu::attention(&case.q, &case.kv(), &AttendOptions::default()).unwrap();
    assert!(rel_l2(&naive, &oracle.out) < 1e-5);
    let max_diff = fused
        .iter()
        .zip(&naive)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff < 1e-5, "fused and naive differ by {max_diff}");
}
