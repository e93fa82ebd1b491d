//! The CPU fallback attention (f32, each K/V row read once per group) against the f64 oracle:
//! decode on the shapes of real models with mixed context lengths and page sizes 1 to 256, and
//! prompts, varlen batches, chunked prefill and speculative verification.

mod common;

use common::PagedCase;
use half::bf16;
use std::collections::BTreeMap;

use paged_gqa::cache::{CacheConfig, PagedCache, SeqId};
use paged_gqa::cpu::{self, CpuStorage};
use paged_gqa::AttendOptions;
use paged_gqa::{DType, Error, GqaShape};

use common::MODELS;

/// f32 results as f64, for the bound checks.
fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
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
        cond,
    } = case.typed_at::<bf16>(&keep);
    let kv = case.kv_of(&k, &v);

    let rows = case.lens.num_tokens() * shape.n_heads();
    let mut out = vec![f32::NAN; rows * shape.head_dim()]; // poisoned: every element must be written
    let mut lse = vec![f32::NAN; rows];
    cpu::attend(&q, &kv, &AttendOptions::default(), &mut out, &mut lse).unwrap();
    assert!(
        out.iter().all(|x| x.is_finite()) && lse.iter().all(|x| x.is_finite()),
        "{model}: an output element was not written"
    );
    // f32 weights, f32 output: each element within its own forward-error bound.
    common::check::check_bounds(
        &format!("{model} block {block_size}"),
        shape,
        &widen(&out),
        Some(&widen(&lse)),
        &oracle,
        &cond,
        &keep,
        cpu::RoundingModel::f32_weights(DType::F32),
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

/// [`check_sampled`] on Llama-3-8B's group (4 query heads to 1 K/V head, head_dim 128), pages
/// of 16.
fn check_llama_group(test: &str, context_lens: &[usize], query_lens: &[usize], stride: usize) {
    let (model, shape) = ("Llama-3-8B group", GqaShape::new(4, 1, 128).unwrap());
    check_sampled(test, model, shape, 16, context_lens, query_lens, stride);
}

#[test]
fn cpu_attend_matches_the_oracle_on_an_8k_prompt() {
    let test = "cpu_attend_matches_the_oracle_on_an_8k_prompt";
    check_llama_group(test, &[8192], &[8192], 127);
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
    check_llama_group(test, &[10_512, 9], &[512, 1], 7);
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

/// The cache's attention after prompt, decode, fork and mixed steps, against the oracle over
/// the rows this test wrote, held here contiguously per sequence (not read back from the
/// pages): a row written to a wrong slot, layer or sequence, or a copy-on-write gone wrong,
/// changes the cache's result but not the reference.
#[test]
fn cache_attend_after_writes_matches_the_oracle_for_prefill_and_decode() {
    let mut rng =
        common::rng("cache_attend_after_writes_matches_the_oracle_for_prefill_and_decode");
    let shape = GqaShape::new(8, 2, 64).unwrap();
    let (kv_row, q_row, n_heads) = (shape.kv_row_len(), shape.q_row_len(), shape.n_heads());
    let config = CacheConfig::new(shape, 2, 16, DType::F32).unwrap();
    let mut cache = PagedCache::new(CpuStorage::<f32>::new(config, 16).unwrap()).unwrap();
    let (a, b) = (cache.add_sequence(), cache.add_sequence());
    // The K and V rows written, per (layer, sequence): [len, n_kv_heads, head_dim].
    let mut written: BTreeMap<(usize, SeqId), (Vec<f32>, Vec<f32>)> = BTreeMap::new();
    for layer in 0..2 {
        for seq in [a, b] {
            written.insert((layer, seq), (Vec::new(), Vec::new()));
        }
    }
    let mut c = None; // a fork of a, after step 1
    let steps: [&[(usize, usize)]; 5] = [
        &[(0, 20), (1, 3)], // prompts: a fills a page and starts another
        &[(0, 1), (1, 1)],
        &[(2, 1), (1, 2), (0, 1)], // the fork writes first: copy-on-write of a's partial page
        &[(0, 12), (2, 13)],       // both cross a page boundary
        &[(1, 1), (2, 1), (0, 1)],
    ];
    for (step, batch) in steps.iter().enumerate() {
        if step == 2 {
            let child = cache.fork(a).unwrap();
            for layer in 0..2 {
                let rows = written[&(layer, a)].clone();
                written.insert((layer, child), rows);
            }
            c = Some(child);
        }
        let seqs = [Some(a), Some(b), c];
        let batch: Vec<(SeqId, usize)> =
            batch.iter().map(|&(s, n)| (seqs[s].unwrap(), n)).collect();
        let plan = cache.plan(&batch).unwrap();
        let n = plan.num_new_tokens();
        for layer in 0..2 {
            let (k, v) = (
                common::uniform(&mut rng, n * kv_row),
                common::uniform(&mut rng, n * kv_row),
            );
            cache.write(layer, &plan, &k, &v).unwrap();
            let mut first = 0;
            for &(seq, len) in &batch {
                let rows = written.get_mut(&(layer, seq)).unwrap();
                rows.0
                    .extend_from_slice(&k[first * kv_row..(first + len) * kv_row]);
                rows.1
                    .extend_from_slice(&v[first * kv_row..(first + len) * kv_row]);
                first += len;
            }
        }
        for layer in 0..2 {
            // The reference: the rows written, sequences concatenated in batch order.
            let (mut k, mut v) = (Vec::new(), Vec::new());
            for (i, &(seq, _)) in batch.iter().enumerate() {
                let rows = &written[&(layer, seq)];
                assert_eq!(plan.lens().context_len(i), rows.0.len() / kv_row);
                k.extend_from_slice(&rows.0);
                v.extend_from_slice(&rows.1);
            }
            let q = common::uniform(&mut rng, n * q_row);
            let kv = cpu::ContiguousKv::new(shape, plan.lens(), &k, &v).unwrap();
            let keep = vec![true; n];
            let (oracle, cond) =
                cpu::attention_with_conditioning(&q, &kv, &AttendOptions::default(), &keep)
                    .unwrap();

            let (mut out, mut lse) = (vec![f32::NAN; n * q_row], vec![f32::NAN; n * n_heads]);
            cache
                .attend(
                    layer,
                    &plan,
                    &q,
                    &mut out,
                    &mut lse,
                    &AttendOptions::default(),
                )
                .unwrap();
            // Every element and every lse within its own forward-error bound.
            common::check::compare(
                &format!("step {step} layer {layer}"),
                shape,
                &widen(&out),
                &widen(&lse),
                &oracle,
                &cond,
                &keep,
                cpu::RoundingModel::f32_weights(DType::F32),
            );
        }
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
    let keep = vec![true; case.lens.num_tokens()];
    let (oracle, cond) =
        cpu::attention_with_conditioning(&case.q, &case.kv(), &AttendOptions::default(), &keep)
            .unwrap();
    common::check::compare(
        "naive",
        shape,
        &widen(&naive),
        &widen(&naive_lse),
        &oracle,
        &cond,
        &keep,
        cpu::RoundingModel::f32_weights(DType::F32),
    );
    let max_diff = fused
        .iter()
        .zip(&naive)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff < 1e-5, "fused and naive differ by {max_diff}");
}
