//! The attention variants on both kernels against the f64 oracle computed with the same
//! variants: sliding windows (smaller than a page, larger than the context, `window_left = 0`,
//! with splits), soft-cap (huge logits in f16 and bf16), sinks (with splits and windows), ALiBi
//! (40 heads, not a power of two; MPT's 32/32), non-causal passes, the models' combinations
//! (Gemma-2, gpt-oss), the state merge, a shared prefix merged with each request's own keys,
//! and the traffic of windowed decode (emulator only: the tiles left of the window are never
//! fetched). Decode, prompts, chunks and speculation in each; every kernel choice. Outputs are
//! poisoned first.
//!
//! Each `gpu_xxx` test skips (printing why) without a GPU, or fails with
//! PAGED_GQA_REQUIRE_GPU=1; its twin `sim_xxx` runs the same body on the kernel emulator.

use crate::common;
use crate::setup::{fetched, span};

use half::{bf16, f16};
use paged_gqa::cache::{CacheConfig, PagedCache};
use paged_gqa::plan::KernelChoice;
use paged_gqa::sim::{AttendBatch, SimDevice};
use paged_gqa::variants::{alibi_slopes, window_left_from_sliding_window};
use paged_gqa::{AttendOptions, AttentionState, Element, GqaShape, KeyMask};
use rand::Rng;

use common::check::{self, check_variant, model};
use common::{Device, PagedCase};

use common::twins;

/// [`common::MIXED_BATCH`] on pages of 16.
fn mixed_batch(rng: &mut rand::rngs::StdRng, shape: GqaShape) -> PagedCase {
    let (contexts, queries) = common::MIXED_BATCH;
    PagedCase::random(rng, shape, 16, &contexts, &queries)
}

fn windows<D: Device>(dev: &D, test: &str) {
    let mut rng = common::rng(test);
    let shape = GqaShape::new(8, 2, 64).unwrap();
    let case = mixed_batch(&mut rng, shape);
    // 0: each row sees its own key only; 5: less than a page; 100; 10 000: more than any context.
    for window_left in [0, 5, 100, 10_000] {
        let options = AttendOptions::new().with_window_left(window_left);
        check_variant::<D, bf16>(dev, &format!("window_left {window_left}"), &case, &options);
    }
    // A chunk whose blocks read 16 rows' windows of 300 keys: the range is split.
    let case = PagedCase::random(
        &mut rng,
        GqaShape::new(4, 1, 64).unwrap(),
        16,
        &[700],
        &[96],
    );
    let options = AttendOptions::new().with_window_left(300);
    let splits = check_variant::<D, f16>(dev, "chunk, window 300", &case, &options);
    assert!(
        splits.iter().all(|&s| s > 1),
        "the windowed range must split ({splits:?})"
    );
}
twins!(
    gpu_sliding_windows_match_oracle,
    sim_sliding_windows_match_oracle,
    windows
);

fn softcap<D: Device>(dev: &D, test: &str) {
    let mut rng = common::rng(test);
    let shape = GqaShape::new(8, 2, 64).unwrap();
    let mut case = mixed_batch(&mut rng, shape);
    // f16: values up to 200 make logits near 10^5 (scale 1/8): tanh saturates, no inf or NaN.
    for x in case.q.iter_mut().chain(&mut case.k_cache) {
        *x *= 200.0;
    }
    let options = AttendOptions::new().with_logit_softcap(50.0);
    check_variant::<D, f16>(dev, "soft-cap 50, logits ~1e5, f16", &case, &options);
    // bf16: logits near 10^30, finite in f32, capped to +-30.
    for x in case.q.iter_mut().chain(&mut case.k_cache) {
        *x *= 1e13;
    }
    let options = AttendOptions::new().with_logit_softcap(30.0);
    check_variant::<D, bf16>(dev, "soft-cap 30, logits ~1e30, bf16", &case, &options);
}
twins!(
    gpu_softcap_matches_oracle_on_huge_logits,
    sim_softcap_matches_oracle_on_huge_logits,
    softcap
);

fn sinks<D: Device>(dev: &D, test: &str) {
    let mut rng = common::rng(test);
    // gpt-oss-20b heads: 64/8, d64; sinks of either sign, one -inf (no sink for that head).
    let shape = GqaShape::new(64, 8, 64).unwrap();
    let mut sinks: Vec<f32> = (0..64).map(|_| rng.random_range(-3.0..4.0)).collect();
    sinks[5] = f32::NEG_INFINITY;
    let case = PagedCase::random(&mut rng, shape, 16, &[1, 130, 700, 48], &[1, 1, 1, 8]);
    let full = AttendOptions::new().with_sinks(sinks.clone());
    let splits = check_variant::<D, bf16>(dev, "sinks", &case, &full);
    assert!(
        splits.iter().all(|&s| s > 1),
        "the merge must add the sinks ({splits:?})"
    );
    let windowed = full.clone().with_window_left(127);
    check_variant::<D, bf16>(dev, "sinks, window 128", &case, &windowed);
    // Sinks with splits of a windowed range (a chunk of 96 rows, window 300).
    let case = PagedCase::random(
        &mut rng,
        GqaShape::new(8, 8, 64).unwrap(),
        16,
        &[800],
        &[96],
    );
    let options = AttendOptions::new()
        .with_sinks(sinks[..8].to_vec())
        .with_window_left(300);
    let splits = check_variant::<D, bf16>(dev, "sinks, window 300, split", &case, &options);
    assert!(splits.iter().all(|&s| s > 1), "{splits:?}");
    // One split (no range past one split's keys): each kernel adds the sinks itself, with no
    // merge to do it.
    let case = PagedCase::random(&mut rng, shape, 16, &[1, 40, 64, 20], &[1, 1, 1, 8]);
    let splits = check_variant::<D, bf16>(dev, "sinks, one split", &case, &full);
    assert!(
        splits.iter().all(|&s| s == 1),
        "the kernels must add the sinks ({splits:?})"
    );
}
twins!(
    gpu_sinks_are_counted_once_across_splits_and_windows,
    sim_sinks_are_counted_once_across_splits_and_windows,
    sinks
);

fn alibi<D: Device>(dev: &D, test: &str) {
    let mut rng = common::rng(test);
    // 40 heads (Phi-3-medium's shape): not a power of two.
    let shape = GqaShape::new(40, 10, 128).unwrap();
    let case = PagedCase::random(&mut rng, shape, 16, &[1, 50, 600, 70], &[1, 1, 1, 20]);
    let options = AttendOptions::new().with_alibi_slopes(alibi_slopes(40));
    check_variant::<D, bf16>(dev, "ALiBi, 40 heads", &case, &options);
    // MPT-7B: 32/32 heads (group 1), d128; a prompt and decode.
    let shape = GqaShape::new(32, 32, 128).unwrap();
    let case = PagedCase::random(&mut rng, shape, 16, &[300, 33], &[1, 33]);
    let options = AttendOptions::new().with_alibi_slopes(alibi_slopes(32));
    check_variant::<D, f16>(dev, "ALiBi, MPT-7B", &case, &options);
}
twins!(
    gpu_alibi_matches_oracle_on_40_and_32_heads,
    sim_alibi_matches_oracle_on_40_and_32_heads,
    alibi
);

fn non_causal<D: Device>(dev: &D, test: &str) {
    let mut rng = common::rng(test);
    let shape = GqaShape::new(8, 2, 64).unwrap();
    let case = mixed_batch(&mut rng, shape);
    let options = AttendOptions::new().with_causal(false);
    check_variant::<D, bf16>(dev, "non-causal", &case, &options);
    // A window without causality: keys from position - 20 to the end.
    let options = options.with_window_left(20);
    check_variant::<D, bf16>(dev, "non-causal, window 21", &case, &options);
}
twins!(
    gpu_non_causal_passes_match_oracle,
    sim_non_causal_passes_match_oracle,
    non_causal
);

fn model_combinations<D: Device>(dev: &D, test: &str) {
    let mut rng = common::rng(test);
    // Gemma-2-9B's sliding layer, its window shrunk to 64 keys to fit the emulator: soft-cap 50,
    // scale 256^-0.5 (its query_pre_attn_scalar), d256.
    let shape = GqaShape::new(16, 8, 256).unwrap();
    let case = PagedCase::random(&mut rng, shape, 16, &[200, 30], &[1, 30]);
    let options = AttendOptions::new()
        .with_window_left(window_left_from_sliding_window(64).unwrap())
        .with_logit_softcap(50.0)
        .with_scale(1.0 / 16.0);
    check_variant::<D, bf16>(dev, "Gemma-2-9B sliding layer", &case, &options);
    // gpt-oss-20b: sinks on every layer, window 128 on even ones, with ALiBi-free scores.
    let shape = GqaShape::new(64, 8, 64).unwrap();
    let case = PagedCase::random(&mut rng, shape, 16, &[400, 20], &[1, 20]);
    let sinks: Vec<f32> = (0..64).map(|_| rng.random_range(-1.0..2.0)).collect();
    let options = AttendOptions::new().with_sinks(sinks).with_window_left(127);
    check_variant::<D, f16>(dev, "gpt-oss sliding layer", &case, &options);
}
twins!(
    gpu_model_variant_combinations_match_oracle,
    sim_model_variant_combinations_match_oracle,
    model_combinations
);

/// Random merge inputs: outputs in `[-1, 1)`, lse in `[-4, 4)`, every 7th row of `a` and every
/// 5th of `b` an empty set (0, -inf).
fn merge_inputs(
    rng: &mut rand::rngs::StdRng,
    rows: usize,
    d: usize,
    empty: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut out = common::uniform(rng, rows * d);
    let mut lse: Vec<f32> = (0..rows).map(|_| rng.random_range(-4.0..4.0)).collect();
    for row in (0..rows).step_by(empty) {
        lse[row] = f32::NEG_INFINITY;
        out[row * d..][..d].fill(0.0);
    }
    (out, lse)
}

fn merge<D: Device>(dev: &D, test: &str) {
    let mut rng = common::rng(test);
    let (rows, d) = (3 * 28, 96);
    let (a_out, a_lse) = merge_inputs(&mut rng, rows, d, 7);
    let (b_out, b_lse) = merge_inputs(&mut rng, rows, d, 5);
    let (mut want, mut want_lse) = (vec![0.0; rows * d], vec![0.0; rows]);
    paged_gqa::cpu::merge_states(
        d,
        AttentionState::new(&a_out[..], &a_lse[..]),
        AttentionState::new(&b_out[..], &b_lse[..]),
        AttentionState::new(&mut want[..], &mut want_lse[..]),
    )
    .unwrap();
    fn check<D: Device, T: Element>(
        dev: &D,
        d: usize,
        a: (&[f32], &[f32]),
        b: (&[f32], &[f32]),
        want: (&[f32], &[f32]),
    ) {
        let to_t = |x: &[f32]| x.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>();
        let (a_out, b_out) = (dev.upload(&to_t(a.0)), dev.upload(&to_t(b.0)));
        let (a_lse, b_lse) = (dev.upload(a.1), dev.upload(b.1));
        let rows = a.1.len();
        let mut out = dev.alloc_poisoned::<T>(rows * d);
        let mut lse = dev.alloc_poisoned::<f32>(rows);
        dev.merge_states(d, (&a_out, &a_lse), (&b_out, &b_lse), &mut out, &mut lse)
            .unwrap();
        let (out, lse) = (dev.download_f64(&out), dev.download_f64(&lse));
        for (row, (&got, &w)) in lse.iter().zip(want.1).enumerate() {
            let w = f64::from(w);
            assert!(
                got == w || (got - w).abs() < 1e-5,
                "{:?} row {row}: lse {got} against {w}",
                T::DTYPE
            );
        }
        // Per element: both merges are f32 arithmetic on the same inputs (a few roundings of
        // each weighted part, w_p = exp(lse_p - lse), the weights' exp off by u |lse_p - lse|),
        // then the device rounds to T: u_T |want|. The parts are stored in T first (the device
        // reads T outputs): u_T w_p |o_p| each.
        let (u32, u_t) = (
            2f64.powi(-24),
            model::<D, T>(KernelChoice::CudaCores).out_unit,
        );
        for (i, &got) in out.iter().enumerate() {
            let row = i / d;
            let lse = f64::from(want.1[row]);
            let part = |(o, l): (&[f32], &[f32])| {
                let gap = f64::from(l[row]) - lse;
                if gap.is_nan() || gap == f64::NEG_INFINITY {
                    return 0.0; // an empty set (both: the merged row must be 0 exactly)
                }
                gap.exp() * f64::from(o[i].abs()) * (1.0 + gap.abs())
            };
            let parts = part(a) + part(b);
            let want_o = f64::from(want.0[i]);
            let bound = u_t * (want_o.abs() + parts) + 64.0 * u32 * parts + 1e-30;
            assert!(
                (got - want_o).abs() <= bound,
                "{:?} element {i}: merged {got:e}, reference {want_o:e}, bound {bound:e}",
                T::DTYPE
            );
        }
    }
    let (a, b, w) = (
        (&a_out[..], &a_lse[..]),
        (&b_out[..], &b_lse[..]),
        (&want[..], &want_lse[..]),
    );
    check::<D, f32>(dev, d, a, b, w);
    check::<D, bf16>(dev, d, a, b, w);
    check::<D, f16>(dev, d, a, b, w);
    // Both sets empty in row 0 (a's every 7th, b's every 5th): (0, -inf).
    assert_eq!((want[0], want_lse[0]), (0.0, f32::NEG_INFINITY));
}
twins!(
    gpu_merge_states_matches_the_cpu_merge,
    sim_merge_states_matches_the_cpu_merge,
    merge
);

/// A shared prefix of 48 keys (3 pages) and three requests with their own keys: one
/// non-causal pass over the prefix's pages for every request's query rows, one causal pass over
/// each request's own pages, merged: equal to causal attention over prefix + own keys.
fn shared_prefix<D: Device>(dev: &D, test: &str) {
    let mut rng = common::rng(test);
    let shape = GqaShape::new(8, 2, 64).unwrap();
    let own = [5usize, 17, 30]; // keys of each request after the prefix, its query rows included
    let queries = [1usize, 1, 12];
    let prefix = 48;
    let full = PagedCase::random(&mut rng, shape, 16, &own.map(|n| prefix + n), &queries);
    // The same pages, viewed as the prefix (first 3 pages of request 0) and as the suffixes.
    let (p, max) = (prefix / 16, full.max_blocks);
    let prefix_tables: Vec<i32> = (0..3)
        .flat_map(|_| {
            let pages = full.tables[..p].iter().copied();
            pages
                .chain(std::iter::repeat_n(-1, max - p))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut full = full;
    // Every request shares request 0's prefix pages.
    for seq in 1..3 {
        let (src, dst) = (0, seq * max);
        for i in 0..p {
            let (from, to) = (full.tables[src + i] as usize, full.tables[dst + i] as usize);
            let n = full.layout.block_size() * shape.kv_row_len();
            let (k, v) = (
                full.k_cache[from * n..][..n].to_vec(),
                full.v_cache[from * n..][..n].to_vec(),
            );
            full.k_cache[to * n..][..n].copy_from_slice(&k);
            full.v_cache[to * n..][..n].copy_from_slice(&v);
        }
    }
    let suffix_tables: Vec<i32> = (0..3)
        .flat_map(|seq| {
            let row = &full.tables[seq * max..][..max];
            row[p..]
                .iter()
                .copied()
                .chain(std::iter::repeat_n(-1, p))
                .collect::<Vec<_>>()
        })
        .collect();
    let typed = full.typed::<bf16>();
    let rows = full.lens.num_tokens() * shape.n_heads();
    let (k, v, q) = (
        dev.upload(&typed.k_cache),
        dev.upload(&typed.v_cache),
        dev.upload(&typed.q),
    );
    let pass = |lens: paged_gqa::SeqLens, tables: &[i32], options: AttendOptions| {
        let batch = dev
            .attend_batch(
                full.layout,
                bf16::DTYPE,
                &lens,
                tables,
                max,
                KernelChoice::Auto,
            )
            .unwrap();
        let mut out = dev.alloc_poisoned::<bf16>(rows * shape.head_dim());
        let mut lse = dev.alloc_poisoned::<f32>(rows);
        dev.run_attend(&batch, &k, &v, &q, &mut out, &mut lse, &options)
            .unwrap();
        (out, lse)
    };
    // Prefix pass: every query row sees all 48 prefix keys.
    let prefix_lens = paged_gqa::SeqLens::new(&[prefix; 3], &queries).unwrap();
    let (pre_out, pre_lse) = pass(
        prefix_lens,
        &prefix_tables,
        AttendOptions::new().with_causal(false),
    );
    // Suffix pass: causal over each request's own keys.
    let suffix_lens = paged_gqa::SeqLens::new(&own, &queries).unwrap();
    let (suf_out, suf_lse) = pass(suffix_lens, &suffix_tables, AttendOptions::new());
    let mut out = dev.alloc_poisoned::<bf16>(rows * shape.head_dim());
    let mut lse = dev.alloc_poisoned::<f32>(rows);
    dev.merge_states(
        shape.head_dim(),
        (&pre_out, &pre_lse),
        (&suf_out, &suf_lse),
        &mut out,
        &mut lse,
    )
    .unwrap();
    // Each pass wrote its output in bf16 before the merge: the bound allows that rounding.
    let auto = check::model::<D, bf16>(KernelChoice::Auto);
    let model = auto.with_rounded_partials(auto.out_unit);
    check::compare(
        "merged shared prefix",
        shape,
        &dev.download_f64(&out),
        &dev.download_f64(&lse),
        &typed.oracle,
        &typed.cond,
        &vec![true; full.lens.num_tokens()],
        model,
    );
}
twins!(
    gpu_shared_prefix_merged_equals_full_attention,
    sim_shared_prefix_merged_equals_full_attention,
    shared_prefix
);

/// gpt-oss-20b decode at 32k keys with its 128-key window: the kernels fetch the window's K/V
/// rows, not the context's (each exactly once per K/V head), on either kernel.
#[test]
fn sim_windowed_decode_fetches_only_the_window() {
    let device = SimDevice::new();
    device.set_race_check(false);
    let mut rng = common::rng("sim_windowed_decode_fetches_only_the_window");
    let shape = GqaShape::new(64, 8, 64).unwrap();
    let context = 32 * 1024;
    let case = PagedCase::random(&mut rng, shape, 16, &[context, context - 5], &[1, 1]);
    let typed = case.typed::<bf16>();
    let k = device.upload(&typed.k_cache).unwrap();
    let v = device.upload(&typed.v_cache).unwrap();
    let q = device.upload(&typed.q).unwrap();
    let rows = 2 * shape.n_heads();
    let options = AttendOptions::new().with_window_left(127);
    // 2 sequences x 128 keys x K and V x 2 bytes.
    let window_bytes = 2 * 128 * 2 * shape.kv_row_len() * 2;
    for choice in [
        KernelChoice::CudaCores,
        KernelChoice::TensorCores,
        KernelChoice::NarrowTensorCores,
    ] {
        let batch = AttendBatch::with_kernels(
            &device,
            case.layout,
            bf16::DTYPE,
            &case.lens,
            &case.tables,
            case.max_blocks,
            choice,
        )
        .unwrap();
        let mut out = device.alloc::<bf16>(rows * shape.head_dim()).unwrap();
        let mut lse = device.alloc::<f32>(rows).unwrap();
        let in_window = fetched(&device, &[span(&k), span(&v)], || {
            batch
                .run(&device, &k, &v, &q, &mut out, &mut lse, &options)
                .unwrap();
        });
        let full = AttendOptions::new();
        let mask = KeyMask {
            causal: true,
            window_left: Some(127),
        };
        // The splits are sized from the window, not the 32k context: two of 64 keys at most.
        assert!(batch.schedule().splits(&case.lens, mask).num_splits <= 2);
        assert_eq!(
            in_window, window_bytes,
            "{choice:?}: {in_window} bytes fetched, the window holds {window_bytes}"
        );
        // Without the window the same batch reads every key (K watched alone here).
        let whole_k = fetched(&device, &[span(&k)], || {
            batch
                .run(&device, &k, &v, &q, &mut out, &mut lse, &full)
                .unwrap();
        });
        assert_eq!(
            whole_k,
            (2 * context - 5) * shape.kv_row_len() * 2,
            "{choice:?}"
        );
        println!(
            "gpt-oss-20b decode, keys {context} and {}, {choice:?}: window 128 fetched {in_window} B \
             of K and V; without the window {} B",
            context - 5,
            2 * whole_k
        );
    }
}

/// One sequence (a prompt, decode steps and chunks) through a cache that reclaims pages behind
/// a 10-key window and through one that keeps them: every step's windowed attention equal, the
/// reclaiming cache holding only the window's pages, and unwindowed attention over it refused.
fn reclaiming_cache<D: Device>(dev: &D, test: &str) {
    let mut rng = common::rng(test);
    let shape = GqaShape::new(8, 2, 64).unwrap();
    // (new tokens, k, v, q) of each step.
    type Step = (usize, Vec<bf16>, Vec<bf16>, Vec<bf16>);
    let steps: Vec<Step> = [40, 1, 1, 9, 1, 30, 1]
        .into_iter()
        .map(|new| {
            let mut values = |n: usize| {
                let x = common::uniform(&mut rng, n);
                x.into_iter().map(bf16::from_f32).collect::<Vec<_>>()
            };
            let row = shape.kv_row_len();
            (
                new,
                values(new * row),
                values(new * row),
                values(new * shape.q_row_len()),
            )
        })
        .collect();
    let options = AttendOptions::new().with_window_left(10);
    // Each step's (out, lse): the reclaiming cache must reproduce both bit for bit.
    type Steps = Vec<(Vec<f64>, Vec<f64>)>;
    let run = |config: CacheConfig, options: &AttendOptions| -> paged_gqa::Result<Steps> {
        let mut cache = PagedCache::new(dev.storage::<bf16>(config, 32)?)?;
        let seq = cache.add_sequence();
        let mut outs = Vec::new();
        for (new, k, v, q) in &steps {
            let plan = cache.plan(&[(seq, *new)])?;
            D::write_kv(&mut cache, 0, &plan, &dev.upload(k), &dev.upload(v))?;
            let mut out = dev.alloc_poisoned::<bf16>(q.len());
            let mut lse = dev.alloc_poisoned::<f32>(new * shape.n_heads());
            D::attend_cache(
                &cache,
                0,
                &plan,
                &dev.upload(q),
                &mut out,
                &mut lse,
                options,
            )?;
            outs.push((dev.download_f64(&out), dev.download_f64(&lse)));
        }
        Ok(outs)
    };
    let config = CacheConfig::new(shape, 1, 4, bf16::DTYPE).unwrap();
    let kept = run(config, &options).unwrap();
    let reclaimed = run(config.with_reclaim_window(10), &options).unwrap();
    assert_eq!(kept, reclaimed);
    let err = run(config.with_reclaim_window(10), &AttendOptions::new()).unwrap_err();
    assert!(
        matches!(err, paged_gqa::Error::ReclaimedBlockVisible { .. }),
        "{err}"
    );
}
twins!(
    gpu_reclaiming_cache_attends_like_one_that_keeps_every_page,
    sim_reclaiming_cache_attends_like_one_that_keeps_every_page,
    reclaiming_cache
);

/// The naive baseline (gather, repeat_kv, per-head attention) with the variants: decode runs
/// the MHA kernels over the repeated K/V instead of the plain decode kernel, and agrees with the
/// oracle.
fn naive_with_variants<D: Device>(dev: &D, test: &str) {
    let mut rng = common::rng(test);
    let shape = GqaShape::new(8, 2, 64).unwrap();
    let case = PagedCase::random(&mut rng, shape, 16, &[1, 40, 300], &[1, 1, 1]);
    let sinks: Vec<f32> = (0..8).map(|_| rng.random_range(-1.0..2.0)).collect();
    for options in [
        AttendOptions::new().with_window_left(20).with_sinks(sinks),
        AttendOptions::new()
            .with_alibi_slopes(alibi_slopes(8))
            .with_logit_softcap(3.0),
    ] {
        let typed = case.typed_with::<bf16>(&vec![true; case.lens.num_tokens()], &options);
        let mut naive = dev
            .naive::<bf16>(case.layout, &case.lens, &case.tables, case.max_blocks)
            .unwrap();
        let (k, v, q) = (
            dev.upload(&typed.k_cache),
            dev.upload(&typed.v_cache),
            dev.upload(&typed.q),
        );
        let mut out = dev.alloc_poisoned::<bf16>(typed.q.len());
        dev.run_naive(&mut naive, &k, &v, &q, &mut out, &options)
            .unwrap();
        // With variants the naive path runs the attention kernels over the repeated K/V.
        check::check_bounds(
            &format!("naive with {options:?}"),
            shape,
            &dev.download_f64(&out),
            None,
            &typed.oracle,
            &typed.cond,
            &vec![true; case.lens.num_tokens()],
            check::model::<D, bf16>(KernelChoice::Auto),
        );
    }
}
twins!(
    gpu_naive_baseline_runs_the_variants,
    sim_naive_baseline_runs_the_variants,
    naive_with_variants
);

/// Options that do not fit the batch are refused before anything is uploaded or launched.
#[test]
fn sim_invalid_options_launch_nothing() {
    let device = SimDevice::new();
    let mut rng = common::rng("sim_invalid_options_launch_nothing");
    let case = mixed_batch(&mut rng, GqaShape::new(8, 2, 64).unwrap());
    let typed = case.typed::<bf16>();
    let batch = AttendBatch::new(
        &device,
        case.layout,
        bf16::DTYPE,
        &case.lens,
        &case.tables,
        case.max_blocks,
    )
    .unwrap();
    let (k, v, q) = (
        device.upload(&typed.k_cache).unwrap(),
        device.upload(&typed.v_cache).unwrap(),
        device.upload(&typed.q).unwrap(),
    );
    let mut out = device.alloc::<bf16>(typed.q.len()).unwrap();
    let mut lse = device.alloc::<f32>(case.lens.num_tokens() * 8).unwrap();
    for options in [
        AttendOptions::new().with_sinks(vec![0.0; 7]),
        AttendOptions::new().with_alibi_slopes(alibi_slopes(40)),
        AttendOptions::new().with_window_left(-3),
        AttendOptions::new().with_logit_softcap(-2.0),
    ] {
        let before = device.launches();
        let err = batch
            .run(&device, &k, &v, &q, &mut out, &mut lse, &options)
            .unwrap_err();
        assert_eq!(device.launches(), before, "{options:?} launched");
        assert!(
            matches!(
                err,
                paged_gqa::Error::InvalidOption { .. } | paged_gqa::Error::BufferLength { .. }
            ),
            "{err}"
        );
    }
}
