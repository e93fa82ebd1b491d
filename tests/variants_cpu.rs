//! The attention variants on the CPU: the oracle against independent constructions of each
//! variant's definition (a window is attention over the window's keys alone, a sink is one more
//! softmax term, a soft-cap of a huge cap is no cap, ALiBi on two keys by hand), the f32
//! fallback against the oracle with every variant, the state merge, the helpers' conventions
//! (Press et al. slopes, the sliding-window off-by-one), every validation error, and a cache that
//! reclaims pages behind its window attending exactly like one that keeps them.

mod common;

use common::{max_abs, PagedCase};
use paged_gqa::cache::{CacheConfig, PagedCache};
use paged_gqa::cpu::{self, ContiguousKv, CpuStorage};
use paged_gqa::variants::{alibi_slopes, window_left_from_sliding_window};
use paged_gqa::{AttendOptions, AttentionState, DType, Error, GqaShape, KeyMask, SeqLens};
use rand::rngs::StdRng;
use rand::Rng;

fn shape() -> GqaShape {
    GqaShape::new(8, 2, 32).unwrap()
}

/// Decode rows (one key, a page, a partial page, 300 keys), a prompt, a chunk, speculation.
fn mixed(rng: &mut StdRng) -> PagedCase {
    PagedCase::random(
        rng,
        shape(),
        16,
        &[1, 16, 23, 300, 40, 70, 33],
        &[1, 1, 1, 1, 40, 13, 3],
    )
}

/// One decode row over `context` random keys, contiguous: (lens, k, v, q).
fn decode_row(
    rng: &mut StdRng,
    shape: GqaShape,
    context: usize,
) -> (SeqLens, Vec<f32>, Vec<f32>, Vec<f32>) {
    let lens = SeqLens::decode(&[context]).unwrap();
    let k = common::uniform(rng, context * shape.kv_row_len());
    let v = common::uniform(rng, context * shape.kv_row_len());
    (lens, k, v, common::uniform(rng, shape.q_row_len()))
}

#[test]
fn a_window_is_attention_over_the_windows_keys_alone() {
    let mut rng = common::rng("a_window_is_attention_over_the_windows_keys_alone");
    let (shape, context, window_left) = (shape(), 50, 9);
    let (lens, k, v, q) = decode_row(&mut rng, shape, context);
    let kv = ContiguousKv::new(shape, &lens, &k, &v).unwrap();
    let options = AttendOptions::new().with_window_left(window_left as i32);
    let windowed = cpu::attention(&q, &kv, &options).unwrap();
    // The last window_left + 1 keys alone, plain causal attention.
    let first = (context - 1 - window_left) * shape.kv_row_len();
    let short = SeqLens::decode(&[window_left + 1]).unwrap();
    let kv = ContiguousKv::new(shape, &short, &k[first..], &v[first..]).unwrap();
    let alone = cpu::attention(&q, &kv, &AttendOptions::new()).unwrap();
    assert!(max_abs(&windowed.out, &alone.out) < 1e-12);
    assert!(max_abs(&windowed.lse, &alone.lse) < 1e-12);
    // A window as wide as the context is no window.
    let kv = ContiguousKv::new(shape, &lens, &k, &v).unwrap();
    let wide = AttendOptions::new().with_window_left(context as i32 - 1);
    assert_eq!(
        cpu::attention(&q, &kv, &wide).unwrap(),
        cpu::attention(&q, &kv, &AttendOptions::new()).unwrap()
    );
}

#[test]
fn a_sink_is_one_more_softmax_term_with_no_value() {
    let mut rng = common::rng("a_sink_is_one_more_softmax_term_with_no_value");
    let case = mixed(&mut rng);
    let plain = cpu::attention(&case.q, &case.kv(), &AttendOptions::new()).unwrap();
    let sinks: Vec<f32> = (0..8).map(|_| rng.random_range(-2.0..3.0)).collect();
    let options = AttendOptions::new().with_sinks(sinks.clone());
    let sunk = cpu::attention(&case.q, &case.kv(), &options).unwrap();
    let d = shape().head_dim();
    for (row, (&lse, &plain_lse)) in sunk.lse.iter().zip(&plain.lse).enumerate() {
        let sink = f64::from(sinks[row % 8]);
        let want = (plain_lse.exp() + sink.exp()).ln();
        assert!(
            (lse - want).abs() < 1e-12,
            "row {row}: lse {lse}, want {want}"
        );
        let keep = (plain_lse - want).exp(); // the keys' share of the softmax
        for e in 0..d {
            let (got, want) = (sunk.out[row * d + e], plain.out[row * d + e] * keep);
            assert!((got - want).abs() < 1e-12, "row {row}");
        }
    }
}

#[test]
fn softcap_saturates_without_nan_and_a_huge_cap_is_no_cap() {
    let mut rng = common::rng("softcap_saturates_without_nan_and_a_huge_cap_is_no_cap");
    let mut case = mixed(&mut rng);
    let plain = cpu::attention(&case.q, &case.kv(), &AttendOptions::new()).unwrap();
    let loose = AttendOptions::new().with_logit_softcap(1e9);
    let capped = cpu::attention(&case.q, &case.kv(), &loose).unwrap();
    assert!(max_abs(&plain.out, &capped.out) < 1e-9);
    // Logits near 1e30 (f32 q and k of 1e15): capped to +-cap, finite, and the fallback agrees.
    for x in case.q.iter_mut().chain(&mut case.k_cache) {
        *x *= 1e15;
    }
    let options = AttendOptions::new().with_logit_softcap(30.0);
    check_fallback("soft-cap 30, logits ~1e30", &case, &options);
    // One key: the lse is the capped score itself.
    let shape = GqaShape::new(1, 1, 8).unwrap();
    let lens = SeqLens::decode(&[1]).unwrap();
    let (k, v, q) = (vec![10.0f32; 8], vec![1.0f32; 8], vec![10.0f32; 8]);
    let kv = ContiguousKv::new(shape, &lens, &k, &v).unwrap();
    let one = cpu::attention(
        &q,
        &kv,
        &AttendOptions::new().with_scale(1.0).with_logit_softcap(5.0),
    )
    .unwrap();
    assert!((one.lse[0] - 5.0 * (800.0f64 / 5.0).tanh()).abs() < 1e-12);
}

#[test]
fn alibi_adds_slope_times_distance_to_each_score() {
    // Two keys, q . k = 0 for both: scores are the biases alone, slope * (k - p) = (-slope, 0).
    let shape = GqaShape::new(2, 1, 8).unwrap();
    let lens = SeqLens::decode(&[2]).unwrap();
    let k = vec![0.0f32; 16];
    let v: Vec<f32> = [vec![1.0f32; 8], vec![3.0f32; 8]].concat();
    let kv = ContiguousKv::new(shape, &lens, &k, &v).unwrap();
    let q = vec![0.5f32; 16];
    let slopes = vec![0.5f32, 2.0];
    let att = cpu::attention(
        &q,
        &kv,
        &AttendOptions::new().with_alibi_slopes(slopes.clone()),
    )
    .unwrap();
    for (head, &slope) in slopes.iter().enumerate() {
        let slope = f64::from(slope);
        let p_old = (-slope).exp() / ((-slope).exp() + 1.0); // weight of the older key
        let want = p_old * 1.0 + (1.0 - p_old) * 3.0;
        assert!((att.out[head * 8] - want).abs() < 1e-12, "head {head}");
        assert!((att.lse[head] - ((-slope).exp() + 1.0).ln()).abs() < 1e-12);
    }
}

#[test]
fn non_causal_rows_see_every_key_and_decode_is_unchanged() {
    let mut rng = common::rng("non_causal_rows_see_every_key_and_decode_is_unchanged");
    let case = mixed(&mut rng);
    let causal = cpu::attention(&case.q, &case.kv(), &AttendOptions::new()).unwrap();
    let options = AttendOptions::new().with_causal(false);
    let open = cpu::attention(&case.q, &case.kv(), &options).unwrap();
    let row = shape().q_row_len();
    // Decode rows (the first four tokens) see every key either way.
    assert_eq!(&open.out[..4 * row], &causal.out[..4 * row]);
    // The prompt's first row sees its 40 keys, not one: it differs.
    assert!(max_abs(&open.out[4 * row..5 * row], &causal.out[4 * row..5 * row]) > 1e-3);
    assert_eq!(
        KeyMask {
            causal: false,
            window_left: None
        }
        .visible_keys(40, 40, 0),
        0..40
    );
}

/// The f32 fallback's out and lse, widened.
fn fallback(case: &PagedCase, options: &AttendOptions) -> (Vec<f64>, Vec<f64>) {
    let rows = case.lens.num_tokens() * case.layout.shape().n_heads();
    let mut out = vec![f32::NAN; rows * case.layout.shape().head_dim()];
    let mut lse = vec![f32::NAN; rows];
    cpu::attend(&case.q, &case.kv(), options, &mut out, &mut lse).unwrap();
    let widen = |x: Vec<f32>| x.into_iter().map(f64::from).collect::<Vec<f64>>();
    (widen(out), widen(lse))
}

/// The f32 fallback against the oracle with `options`: every output element and lse finite
/// and within its own forward-error bound. Returns the oracle.
fn check_fallback(what: &str, case: &PagedCase, options: &AttendOptions) -> cpu::Attention {
    let keep = vec![true; case.lens.num_tokens()];
    let (oracle, cond) =
        cpu::attention_with_conditioning(&case.q, &case.kv(), options, &keep).unwrap();
    let (out, lse) = fallback(case, options);
    common::check::compare(
        what,
        case.layout.shape(),
        &out,
        &lse,
        &oracle,
        &cond,
        &keep,
        cpu::RoundingModel::f32_weights(paged_gqa::DType::F32),
    );
    oracle
}

#[test]
fn fallback_matches_oracle_with_every_variant() {
    let mut rng = common::rng("fallback_matches_oracle_with_every_variant");
    let case = mixed(&mut rng);
    let sinks: Vec<f32> = (0..8).map(|_| rng.random_range(-2.0..3.0)).collect();
    let variants = [
        ("window 0", AttendOptions::new().with_window_left(0)),
        ("window 5", AttendOptions::new().with_window_left(5)),
        ("window 100", AttendOptions::new().with_window_left(100)),
        (
            "window 10000",
            AttendOptions::new().with_window_left(10_000),
        ),
        ("soft-cap 2", AttendOptions::new().with_logit_softcap(2.0)),
        ("sinks", AttendOptions::new().with_sinks(sinks.clone())),
        (
            "sinks, window 7",
            AttendOptions::new().with_sinks(sinks).with_window_left(7),
        ),
        (
            "ALiBi",
            AttendOptions::new().with_alibi_slopes(alibi_slopes(8)),
        ),
        ("non-causal", AttendOptions::new().with_causal(false)),
        (
            "non-causal, window 3",
            AttendOptions::new().with_causal(false).with_window_left(3),
        ),
        (
            "scale 0.3, cap 1, window 20",
            AttendOptions::new()
                .with_scale(0.3)
                .with_logit_softcap(1.0)
                .with_window_left(20),
        ),
    ];
    for (what, options) in variants {
        let oracle = check_fallback(what, &case, &options);
        // The naive path (repeat_kv, one head per query head) agrees too.
        let naive = cpu::attention_naive(&case.q, &case.kv(), &options).unwrap();
        assert!(
            common::rel_l2(&naive.out, &oracle.out) < 1e-12,
            "{what}: naive"
        );
    }
}

#[test]
fn merging_two_key_sets_equals_attention_over_their_union() {
    let mut rng = common::rng("merging_two_key_sets_equals_attention_over_their_union");
    let (shape, context, split) = (shape(), 90, 37);
    let (lens, k, v, q) = decode_row(&mut rng, shape, context);
    let (full, cond) = cpu::attention_with_conditioning(
        &q,
        &ContiguousKv::new(shape, &lens, &k, &v).unwrap(),
        &AttendOptions::new(),
        &[true],
    )
    .unwrap();
    let part = |keys: std::ops::Range<usize>| {
        let lens = SeqLens::decode(&[keys.len()]).unwrap();
        let r = shape.kv_row_len();
        let kv = ContiguousKv::new(
            shape,
            &lens,
            &k[keys.start * r..keys.end * r],
            &v[keys.start * r..keys.end * r],
        )
        .unwrap();
        let a = cpu::attention(&q, &kv, &AttendOptions::new()).unwrap();
        let f32s = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
        (f32s(&a.out), f32s(&a.lse))
    };
    let (a, b) = (part(0..split), part(split..context));
    let d = shape.head_dim();
    let (mut out, mut lse) = (vec![f32::NAN; a.0.len()], vec![f32::NAN; a.1.len()]);
    cpu::merge_states(
        d,
        AttentionState::new(&a.0[..], &a.1[..]),
        AttentionState::new(&b.0[..], &b.1[..]),
        AttentionState::new(&mut out[..], &mut lse[..]),
    )
    .unwrap();
    let widen = |x: &[f32]| x.iter().map(|&y| f64::from(y)).collect::<Vec<f64>>();
    // Parts exact in f64, stored in f32, merged in f32: each element within its bound.
    let model = cpu::RoundingModel::f32_weights(paged_gqa::DType::F32)
        .with_rounded_partials(2f64.powi(-24));
    let (got_out, got_lse) = (widen(&out), widen(&lse));
    common::check::compare(
        "merged",
        shape,
        &got_out,
        &got_lse,
        &full,
        &cond,
        &[true],
        model,
    );
    // Order does not matter; an empty set (0, -inf) changes nothing.
    let (mut swapped, mut swapped_lse) = (vec![0.0; out.len()], vec![0.0; lse.len()]);
    cpu::merge_states(
        d,
        AttentionState::new(&b.0[..], &b.1[..]),
        AttentionState::new(&a.0[..], &a.1[..]),
        AttentionState::new(&mut swapped[..], &mut swapped_lse[..]),
    )
    .unwrap();
    assert_eq!((&swapped, &swapped_lse), (&out, &lse));
    let empty = (vec![0.0f32; out.len()], vec![f32::NEG_INFINITY; lse.len()]);
    cpu::merge_states(
        d,
        AttentionState::new(&a.0[..], &a.1[..]),
        AttentionState::new(&empty.0[..], &empty.1[..]),
        AttentionState::new(&mut swapped[..], &mut swapped_lse[..]),
    )
    .unwrap();
    assert_eq!((&swapped, &swapped_lse), (&a.0, &a.1));
    // Base conversions are inverse.
    let x = 3.25f32;
    assert!((cpu::lse_log2_to_ln(cpu::lse_ln_to_log2(x)) - x).abs() < 1e-6);
    assert!((cpu::lse_ln_to_log2(std::f32::consts::LN_2) - 1.0).abs() < 1e-7);
}

#[test]
fn alibi_slopes_follow_press_et_al_for_any_head_count() {
    // 8 heads: 2^-1 .. 2^-8.
    let eight: Vec<f32> = (1..=8).map(|i| 2f32.powi(-i)).collect();
    assert_eq!(alibi_slopes(8), eight);
    // 12 heads: the 8 above, then the odd powers of the 16-head sequence 2^(-k/2): k = 1, 3, 5, 7.
    let mut twelve = eight.clone();
    twelve.extend([1, 3, 5, 7].map(|k| 2f64.powf(-(k as f64) / 2.0) as f32));
    assert_eq!(alibi_slopes(12), twelve);
    // 40 heads: 32 of 2^(-8 i / 32), then 8 odd powers of the 64-head sequence.
    let forty = alibi_slopes(40);
    assert_eq!(forty.len(), 40);
    assert!((forty[0] - 2f32.powf(-0.25)).abs() < 1e-7);
    assert!((forty[31] - 2f32.powi(-8)).abs() < 1e-9);
    assert!((forty[32] - 2f32.powf(-0.125)).abs() < 1e-7);
    assert!((forty[39] - 2f32.powf(-15.0 / 8.0)).abs() < 1e-7);
}

#[test]
fn sliding_window_w_is_window_left_w_minus_1() {
    assert_eq!(window_left_from_sliding_window(4096).unwrap(), 4095);
    assert_eq!(window_left_from_sliding_window(1).unwrap(), 0);
    assert!(matches!(
        window_left_from_sliding_window(0),
        Err(Error::InvalidOption { .. })
    ));
    // W = 128 (gpt-oss): a decode token at position 1000 sees keys 873..=1000, 128 of them.
    let mask = KeyMask {
        causal: true,
        window_left: Some(window_left_from_sliding_window(128).unwrap() as usize),
    };
    assert_eq!(mask.visible_keys(1001, 1, 0), 873..1001);
}

#[test]
fn invalid_options_are_errors_with_the_offending_values() {
    let mut rng = common::rng("invalid_options_are_errors_with_the_offending_values");
    let case = mixed(&mut rng);
    let cases = [
        (
            AttendOptions::new().with_window_left(-2),
            "window_left = -2",
        ),
        (
            AttendOptions::new().with_logit_softcap(-1.0),
            "logit_softcap = -1",
        ),
        (
            AttendOptions::new().with_logit_softcap(f32::NAN),
            "logit_softcap = NaN",
        ),
        (
            AttendOptions::new().with_logit_softcap(f32::INFINITY),
            "logit_softcap = inf",
        ),
        (
            AttendOptions::new().with_sinks(vec![0.0; 7]),
            "sinks (one per query head) has 7 elements, expected 8",
        ),
        (
            AttendOptions::new().with_sinks([vec![0.0; 7], vec![f32::NAN]].concat()),
            "sinks = NaN (head 7)",
        ),
        (
            AttendOptions::new().with_sinks([vec![f32::INFINITY], vec![0.0; 7]].concat()),
            "sinks = inf (head 0)",
        ),
        (
            AttendOptions::new().with_alibi_slopes(alibi_slopes(40)),
            "alibi_slopes (one per query head) has 40 elements, expected 8",
        ),
        (
            AttendOptions::new().with_alibi_slopes([vec![f32::INFINITY], vec![0.0; 7]].concat()),
            "alibi_slopes = inf (head 0)",
        ),
        (AttendOptions::new().with_scale(f64::NAN), "scale NaN"),
    ];
    for (options, message) in cases {
        let rows = case.lens.num_tokens() * 8;
        let (mut out, mut lse) = (vec![0.0; rows * 32], vec![0.0; rows]);
        let err = cpu::attend(&case.q, &case.kv(), &options, &mut out, &mut lse).unwrap_err();
        assert!(err.to_string().contains(message), "{err} (want {message})");
        let err = cpu::attention(&case.q, &case.kv(), &options).unwrap_err();
        assert!(err.to_string().contains(message), "{err} (want {message})");
    }
}

/// Steps of one long sequence (a prompt, then decode and chunks): (new tokens, k, v, q).
type Steps = Vec<(usize, Vec<f32>, Vec<f32>, Vec<f32>)>;

fn steps(test: &str, shape: GqaShape) -> Steps {
    let mut rng = common::rng(test);
    [40, 1, 1, 1, 9, 1, 1, 30, 1]
        .into_iter()
        .map(|new| {
            let row = shape.kv_row_len();
            let (k, v) = (
                common::uniform(&mut rng, new * row),
                common::uniform(&mut rng, new * row),
            );
            (
                new,
                k,
                v,
                common::uniform(&mut rng, new * shape.q_row_len()),
            )
        })
        .collect()
}

/// A cache of `config` running `steps` on one sequence: every step's attention output with
/// `options`, and the pages reclaimed at the end.
fn run_cache(
    config: CacheConfig,
    options: &AttendOptions,
    steps: &Steps,
) -> paged_gqa::Result<(Vec<Vec<f32>>, usize)> {
    let mut cache = PagedCache::new(CpuStorage::<f32>::new(config, 24)?)?;
    let seq = cache.add_sequence();
    let mut outs = Vec::new();
    for (new, k, v, q) in steps {
        let plan = cache.plan(&[(seq, *new)])?;
        cache.write(0, &plan, k, v)?;
        let (mut out, mut lse) = (vec![f32::NAN; q.len()], vec![f32::NAN; new * 8]);
        cache.attend(0, &plan, q, &mut out, &mut lse, options)?;
        outs.push(out);
    }
    Ok((outs, cache.manager().reclaimed_blocks(seq)?))
}

#[test]
fn a_reclaiming_cache_attends_like_one_that_keeps_every_page() {
    let steps = steps(
        "a_reclaiming_cache_attends_like_one_that_keeps_every_page",
        shape(),
    );
    let config = CacheConfig::new(shape(), 1, 4, DType::F32).unwrap();
    let options = AttendOptions::new().with_window_left(10);
    let (kept, none) = run_cache(config, &options, &steps).unwrap();
    let (reclaimed, pages) = run_cache(config.with_reclaim_window(10), &options, &steps).unwrap();
    assert_eq!(none, 0);
    // The last step's token sits at 84 and sees keys 74..=84: pages 0..18 are gone.
    assert_eq!(pages, (84 - 10) / 4);
    assert_eq!(kept, reclaimed);
    // Attention that would see a reclaimed page is an error, not a read of page -1.
    let err = run_cache(
        config.with_reclaim_window(10),
        &AttendOptions::new(),
        &steps,
    )
    .unwrap_err();
    assert!(matches!(err, Error::ReclaimedBlockVisible { .. }), "{err}");
    let wider = AttendOptions::new().with_window_left(30);
    let err = run_cache(config.with_reclaim_window(10), &wider, &steps).unwrap_err();
    assert!(err.to_string().contains("reclaimed"), "{err}");
}
