//! fp8 KV caches on the CPU paths: the memory arithmetic (Llama-3-70B in 40 GiB), page dtype and
//! scale validation, the quantizing write against the `float8` crate (CUDA's saturating
//! conversion), the oracle over fp8 pages against one over the dequantized values built
//! independently, the f32 fallback and the naive path against the oracle (with every attention
//! variant), and the accuracy of fp8 attention against unquantized attention on model shapes
//! with realistic K/V (the table in `src/fp8.rs`).

mod common;

use float8::{F8E4M3, F8E5M2};
use paged_gqa::cache::{CacheConfig, PagedCache};
use paged_gqa::cpu::{self, CpuStorage, PagedKv};
use paged_gqa::fp8::{self, Fp8E4M3, Fp8E5M2, Fp8Element, Fp8Format, KvScales};
use paged_gqa::variants::alibi_slopes;
use paged_gqa::{AttendOptions, DType, Error, GqaShape};
use rand::rngs::{SmallRng, StdRng};
use rand::{Rng, SeedableRng};

use common::PagedCase;

#[test]
fn llama_3_70b_in_40_gib_holds_twice_the_tokens_in_fp8() {
    let shape = GqaShape::new(64, 8, 128).unwrap();
    let bf16 = CacheConfig::new(shape, 80, 16, DType::BF16).unwrap();
    let budget = 40u64 << 30;
    assert_eq!(bf16.bytes_per_token(), 327_680);
    assert_eq!(bf16.blocks_for_budget(budget).unwrap() * 16, 131_072);
    for page in [DType::F8E4M3, DType::F8E5M2] {
        let fp8 = bf16.with_page_dtype(page).unwrap();
        assert_eq!((fp8.dtype(), fp8.page_dtype()), (DType::BF16, page));
        assert_eq!(fp8.bytes_per_token(), 163_840);
        assert_eq!(fp8.bytes_per_block(), 16 * 163_840);
        assert_eq!(fp8.blocks_for_budget(budget).unwrap() * 16, 262_144);
    }
}

#[test]
fn page_dtypes_are_the_compute_dtype_or_fp8_over_rows_of_16() {
    let shape = GqaShape::new(8, 2, 64).unwrap();
    let bf16 = CacheConfig::new(shape, 2, 16, DType::BF16).unwrap();
    assert_eq!(bf16.page_dtype(), DType::BF16);
    assert_eq!(bf16.with_page_dtype(DType::BF16).unwrap(), bf16);
    assert_eq!(
        bf16.with_page_dtype(DType::F16).unwrap_err(),
        Error::InvalidPageDType {
            dtype: DType::BF16,
            page_dtype: DType::F16
        }
    );
    let f32_config = CacheConfig::new(shape, 2, 16, DType::F32).unwrap();
    assert!(f32_config.with_page_dtype(DType::F8E5M2).is_ok());
    let err = CacheConfig::new(shape, 2, 16, DType::F8E4M3).unwrap_err();
    assert!(matches!(err, Error::InvalidPageDType { .. }), "{err}");
    let d72 = CacheConfig::new(GqaShape::new(8, 2, 72).unwrap(), 2, 16, DType::F16).unwrap();
    let err = d72.with_page_dtype(DType::F8E4M3).unwrap_err();
    assert_eq!(err, Error::Fp8HeadDim { head_dim: 72 });
    assert!(err.to_string().contains("72"), "{err}");
    assert_eq!(DType::F8E4M3.size_bytes(), 1);
    assert_eq!(DType::F8E5M2.fp8_format(), Some(Fp8Format::E5M2));
    assert_eq!(DType::BF16.fp8_format(), None);
}

#[test]
fn scales_must_be_positive_finite_and_one_per_head() {
    for (bad, name) in [
        (0.0, "k_scale"),
        (-1.0, "k_scale"),
        (f32::NAN, "k_scale"),
        (f32::INFINITY, "k_scale"),
    ] {
        let err = KvScales::new(vec![1.0, bad], vec![1.0, 1.0]).unwrap_err();
        assert!(
            matches!(err, Error::InvalidKvScale { name: n, head: 1, .. } if n == name),
            "{err}"
        );
        assert!(err.to_string().contains("k_scale[1]"), "{err}");
        let err = KvScales::new(vec![1.0, 1.0], vec![bad, 1.0]).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidKvScale {
                    name: "v_scale",
                    head: 0,
                    ..
                }
            ),
            "{err}"
        );
    }
    assert!(matches!(
        KvScales::new(vec![1.0; 3], vec![1.0; 2]),
        Err(Error::BufferLength {
            expected: 3,
            actual: 2,
            ..
        })
    ));
    assert!(KvScales::new(vec![], vec![]).is_err());
    // Calibration: amax per head, NaN anywhere in a head refused.
    let rows = [
        1.0, -3.0, 0.5, 0.25, /* token 2 */ -7.0, 2.0, 0.0, -0.5,
    ];
    assert_eq!(fp8::head_amax(&rows, 2, 2).unwrap(), vec![7.0, 0.5]);
    let scales = KvScales::from_amax(Fp8Format::E4M3, &[7.0, 0.5], &[448.0, 0.0]).unwrap();
    assert_eq!(scales.k(), &[7.0 / 448.0, 0.5 / 448.0]);
    assert_eq!(scales.v(), &[1.0, 1.0]); // amax 0: scale 1
    let nan = fp8::head_amax(&[1.0, f32::NAN, 0.0, 1.0], 2, 2).unwrap();
    assert!(nan[0].is_nan() && nan[1] == 1.0);
    assert!(matches!(
        KvScales::from_amax(Fp8Format::E5M2, &nan, &[1.0, 1.0]),
        Err(Error::InvalidAmax { .. })
    ));
    assert!(fp8::head_amax(&[1.0; 5], 2, 2).is_err());
    assert_eq!(
        KvScales::per_layer(3, 0.5, 2.0).unwrap(),
        KvScales::new(vec![0.5; 3], vec![2.0; 3]).unwrap()
    );
}

/// The float8 crate's saturating conversion of `x` (CUDA's `__NV_SATFINITE`).
fn float8_bits(format: Fp8Format, x: f32) -> u8 {
    match format {
        Fp8Format::E4M3 => F8E4M3::from_f32(x).to_bits(),
        Fp8Format::E5M2 => F8E5M2::from_f32(x).to_bits(),
    }
}

/// Writes bf16 rows (in range, past the range, infinities, NaNs) through `write_quantized`
/// and checks every stored value against float8's conversion of `x / scale[head]`.
fn write_stores_what_float8_stores<F: Fp8Element + Default>() {
    let mut rng = common::rng("write_stores_what_float8_stores");
    let shape = GqaShape::new(4, 2, 16).unwrap();
    let config = CacheConfig::new(shape, 2, 4, DType::BF16)
        .unwrap()
        .with_page_dtype(<F as paged_gqa::PageElement>::PAGE_DTYPE)
        .unwrap();
    let mut cache = PagedCache::new(CpuStorage::<F>::new(config, 8).unwrap()).unwrap();
    let scales = KvScales::new(vec![0.37, 3.0e-3], vec![1.5, 1e-6]).unwrap();
    cache.set_scales(1, &scales).unwrap();
    let seq = cache.add_sequence();
    let plan = cache.plan(&[(seq, 6)]).unwrap();
    let n = 6 * shape.kv_row_len();
    let row = |rng: &mut StdRng| -> Vec<half::bf16> {
        let mut x: Vec<f32> = common::uniform(rng, n).iter().map(|v| 200.0 * v).collect();
        x[3] = f32::INFINITY;
        x[40] = f32::NEG_INFINITY;
        x[77] = f32::NAN;
        x[78] = 1e30;
        x[79] = 1e-30;
        x.into_iter().map(half::bf16::from_f32).collect()
    };
    let (k, v) = (row(&mut rng), row(&mut rng));
    cache.write_quantized(1, &plan, &k, &v).unwrap();
    let (k_pages, v_pages) = cache.storage().layer(1);
    let d = shape.head_dim();
    for (pages, rows, scale) in [(k_pages, &k, scales.k()), (v_pages, &v, scales.v())] {
        for (token, &slot) in plan.slot_mapping().iter().enumerate() {
            for i in 0..shape.kv_row_len() {
                let x = f32::from(rows[token * shape.kv_row_len() + i]);
                let stored = pages[slot as usize * shape.kv_row_len() + i].to_bits();
                let want = float8_bits(F::FORMAT, x / scale[i / d]);
                assert!(
                    stored == want || (F::FORMAT.is_nan(stored) && F::FORMAT.is_nan(want)),
                    "{:?}: {x} / {} stored as {stored:#04x}, float8 gives {want:#04x}",
                    F::FORMAT,
                    scale[i / d]
                );
            }
        }
    }
    // Layer 0's scales are still 1.0.
    assert_eq!(cache.storage().scales(0).unwrap(), &KvScales::ones(2));
}

#[test]
fn write_quantized_stores_what_float8_stores_e4m3() {
    write_stores_what_float8_stores::<Fp8E4M3>();
}

#[test]
fn write_quantized_stores_what_float8_stores_e5m2() {
    write_stores_what_float8_stores::<Fp8E5M2>();
}

#[test]
fn scales_are_refused_for_another_head_count_or_layer() {
    let config = CacheConfig::new(GqaShape::new(4, 2, 16).unwrap(), 2, 4, DType::F32)
        .unwrap()
        .with_page_dtype(DType::F8E4M3)
        .unwrap();
    let mut storage = CpuStorage::<Fp8E4M3>::new(config, 4).unwrap();
    assert!(matches!(
        storage.set_scales(0, &KvScales::ones(3)),
        Err(Error::BufferLength {
            expected: 2,
            actual: 3,
            ..
        })
    ));
    assert!(matches!(
        storage.set_scales(2, &KvScales::ones(2)),
        Err(Error::LayerOutOfRange { layer: 2, .. })
    ));
    assert!(storage.scales(2).is_err());
    let mut cache = PagedCache::new(storage).unwrap();
    let seq = cache.add_sequence();
    let plan = cache.plan(&[(seq, 1)]).unwrap();
    assert!(matches!(
        cache.write_quantized(0, &plan, &[0.0f32; 31], &[0.0f32; 32]),
        Err(Error::BufferLength { name: "k_new", .. })
    ));
    let kv = cache.paged_kv(0, &plan).unwrap();
    let wrong = KvScales::ones(4);
    assert!(kv.with_scales(&wrong).is_err());
}

/// A case's K/V quantized to `F` under per-head amax scales (heads of different magnitudes).
fn quantized<F: Fp8Element>(case: &PagedCase, scales: &KvScales) -> (Vec<F>, Vec<F>) {
    let shape = case.layout.shape();
    let d = shape.head_dim();
    let q = |x: &[f32], s: &[f32]| -> Vec<F> {
        x.iter()
            .enumerate()
            .map(|(i, &v)| F::quantize(v, s[(i / d) % shape.n_kv_heads()]))
            .collect()
    };
    (q(&case.k_cache, scales.k()), q(&case.v_cache, scales.v()))
}

fn mixed(rng: &mut StdRng) -> PagedCase {
    let shape = GqaShape::new(8, 2, 32).unwrap();
    let mut case = PagedCase::random(
        rng,
        shape,
        16,
        &[1, 16, 23, 300, 40, 70, 33],
        &[1, 1, 1, 1, 40, 13, 3],
    );
    case.scale_heads(&[4.0, 0.3], &[0.25, 2.5]);
    case
}

fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    common::rel_l2(a, b)
}

fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// The oracle over fp8 pages with scales equals the oracle over f32 pages holding the values
/// dequantized one by one with `fp8::dequantize` (an independent construction: no scales in
/// the view; the two differ only by the f32 rounding of each dequantized value).
fn oracle_reads_dequantized_values<F: Fp8Element>() {
    let mut rng = common::rng("oracle_reads_dequantized_values");
    let case = mixed(&mut rng);
    let scales = case.amax_scales::<F>();
    let (k, v) = quantized::<F>(&case, &scales);
    let kv = PagedKv::new(
        case.layout,
        &case.lens,
        &case.tables,
        case.max_blocks,
        &k,
        &v,
    )
    .unwrap()
    .with_scales(&scales)
    .unwrap();
    let d = case.layout.shape().head_dim();
    let n_kv = case.layout.shape().n_kv_heads();
    let dequantize = |x: &[F], s: &[f32]| -> Vec<f32> {
        x.iter()
            .enumerate()
            .map(|(i, &b)| fp8::dequantize(F::FORMAT, b.to_bits(), s[(i / d) % n_kv]))
            .collect()
    };
    let (k32, v32) = (dequantize(&k, scales.k()), dequantize(&v, scales.v()));
    let plain = PagedKv::new(
        case.layout,
        &case.lens,
        &case.tables,
        case.max_blocks,
        &k32,
        &v32,
    )
    .unwrap();
    let options = AttendOptions::new();
    let fp8_oracle = cpu::attention(&case.q, &kv, &options).unwrap();
    let f32_oracle = cpu::attention(&case.q, &plain, &options).unwrap();
    let rel = rel_l2(&fp8_oracle.out, &f32_oracle.out);
    assert!(rel < 1e-6, "{:?}: relative L2 {rel:e}", F::FORMAT);
    assert!(max_abs(&fp8_oracle.lse, &f32_oracle.lse) < 1e-5);
    // Without the scales the stored values give another result entirely.
    let unscaled = PagedKv::new(
        case.layout,
        &case.lens,
        &case.tables,
        case.max_blocks,
        &k,
        &v,
    )
    .unwrap();
    let wrong = cpu::attention(&case.q, &unscaled, &options).unwrap();
    assert!(rel_l2(&wrong.out, &f32_oracle.out) > 0.1);
}

#[test]
fn oracle_over_e4m3_pages_reads_the_dequantized_values() {
    oracle_reads_dequantized_values::<Fp8E4M3>();
}

#[test]
fn oracle_over_e5m2_pages_reads_the_dequantized_values() {
    oracle_reads_dequantized_values::<Fp8E5M2>();
}

/// The f32 fallback and the naive path (gather, repeat_kv with the scales, per-head attention)
/// over fp8 pages against the oracle, with every attention variant.
fn fallback_matches_oracle<F: Fp8Element>() {
    let mut rng = common::rng("fallback_matches_oracle");
    let case = mixed(&mut rng);
    let shape = case.layout.shape();
    let scales = case.amax_scales::<F>();
    let (k, v) = quantized::<F>(&case, &scales);
    let kv = PagedKv::new(
        case.layout,
        &case.lens,
        &case.tables,
        case.max_blocks,
        &k,
        &v,
    )
    .unwrap()
    .with_scales(&scales)
    .unwrap();
    let sinks: Vec<f32> = (0..shape.n_heads())
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let variants = [
        AttendOptions::new(),
        AttendOptions::new().with_window_left(5),
        AttendOptions::new().with_logit_softcap(3.0),
        AttendOptions::new().with_sinks(sinks),
        AttendOptions::new().with_alibi_slopes(alibi_slopes(shape.n_heads())),
        AttendOptions::new().with_causal(false).with_window_left(20),
    ];
    let rows = case.lens.num_tokens() * shape.n_heads();
    for options in &variants {
        let oracle = cpu::attention(&case.q, &kv, options).unwrap();
        let naive = cpu::attention_naive(&case.q, &kv, options).unwrap();
        assert!(max_abs(&naive.out, &oracle.out) < 1e-12, "{options:?}");
        let (mut out, mut lse) = (
            vec![f32::NAN; rows * shape.head_dim()],
            vec![f32::NAN; rows],
        );
        cpu::attend(&case.q, &kv, options, &mut out, &mut lse).unwrap();
        let out: Vec<f64> = out.iter().map(|&x| f64::from(x)).collect();
        let lse: Vec<f64> = lse.iter().map(|&x| f64::from(x)).collect();
        assert!(rel_l2(&out, &oracle.out) < 1e-5, "{options:?}");
        assert!(max_abs(&lse, &oracle.lse) < 1e-4, "{options:?}");
        let (mut out2, mut lse2) = (
            vec![f32::NAN; rows * shape.head_dim()],
            vec![f32::NAN; rows],
        );
        cpu::attend_naive(&case.q, &kv, options, &mut out2, &mut lse2).unwrap();
        let out2: Vec<f64> = out2.iter().map(|&x| f64::from(x)).collect();
        assert!(rel_l2(&out2, &oracle.out) < 1e-5, "{options:?}");
    }
}

#[test]
fn fallback_over_e4m3_pages_matches_oracle_with_every_variant() {
    fallback_matches_oracle::<Fp8E4M3>();
}

#[test]
fn fallback_over_e5m2_pages_matches_oracle_with_every_variant() {
    fallback_matches_oracle::<Fp8E5M2>();
}

/// An fp8 CPU cache through prompts, decode and a fork: its attention (fallback and oracle)
/// equals attention over a bf16 cache of the same rows, dequantized, within fp8's error.
#[test]
fn fp8_cpu_cache_attends_like_its_dequantized_rows() {
    let mut rng = common::rng("fp8_cpu_cache_attends_like_its_dequantized_rows");
    let shape = GqaShape::new(8, 2, 64).unwrap();
    let config = CacheConfig::new(shape, 1, 16, DType::F32).unwrap();
    let fp8_config = config.with_page_dtype(DType::F8E4M3).unwrap();
    let mut fp8 = PagedCache::new(CpuStorage::<Fp8E4M3>::new(fp8_config, 16).unwrap()).unwrap();
    let mut exact = PagedCache::new(CpuStorage::<f32>::new(config, 16).unwrap()).unwrap();
    // Rows are in [-1, 1): scales of 1/448 and more keep them in range (no saturation).
    let scales = KvScales::new(
        vec![1.0 / 448.0, 4.0 / 448.0],
        vec![2.0 / 448.0, 1.5 / 448.0],
    )
    .unwrap();
    fp8.set_scales(0, &scales).unwrap();
    let (a, b) = (fp8.add_sequence(), fp8.add_sequence());
    assert_eq!((exact.add_sequence(), exact.add_sequence()), (a, b));
    let mut batches = vec![vec![(a, 30), (b, 5)], vec![(a, 1), (b, 1)]];
    batches.push(vec![(a, 3)]);
    for (step, batch) in batches.iter().enumerate() {
        if step == 2 {
            assert_eq!(fp8.fork(b).unwrap(), exact.fork(b).unwrap());
        }
        let plan = fp8.plan(batch).unwrap();
        let exact_plan = exact.plan(batch).unwrap();
        let n = plan.num_new_tokens() * shape.kv_row_len();
        let (k, v) = (common::uniform(&mut rng, n), common::uniform(&mut rng, n));
        fp8.write_quantized(0, &plan, &k, &v).unwrap();
        exact.write(0, &exact_plan, &k, &v).unwrap();
        let q = common::uniform(&mut rng, plan.num_new_tokens() * shape.q_row_len());
        let options = AttendOptions::new();
        let oracle = fp8.reference(0, &plan, &q, &options).unwrap();
        let unquantized = exact.reference(0, &exact_plan, &q, &options).unwrap();
        let rows = plan.num_new_tokens() * shape.n_heads();
        let (mut out, mut lse) = (vec![0.0f32; rows * 64], vec![0.0f32; rows]);
        fp8.attend(0, &plan, &q, &mut out, &mut lse, &options)
            .unwrap();
        let out: Vec<f64> = out.iter().map(|&x| f64::from(x)).collect();
        assert!(rel_l2(&out, &oracle.out) < 1e-5, "step {step}");
        // e4m3 keeps 3 mantissa bits: a few per cent of the output.
        let err = rel_l2(&oracle.out, &unquantized.out);
        assert!(err < 0.08, "step {step}: fp8 against unquantized: {err:e}");
    }
}

/// `n` standard normal values (Box-Muller), from a small generator seeded by `rng`.
fn normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let mut fast = SmallRng::seed_from_u64(rng.random());
    (0..n)
        .map(|_| {
            let (u, v): (f64, f64) = (1.0 - fast.random::<f64>(), fast.random::<f64>());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

/// Realistic K/V for one layer: unit-variance normal values, each K/V head with its own
/// magnitude (from 1/2 to 2, evenly in log scale over the heads) and a few outlier channels
/// (K: 4 random channels of each head 8 times larger, V: 2 channels 4 times larger), the
/// pattern of real models' K (RoPE'd outlier channels) and V; unit-variance queries. Logits
/// then have a standard deviation of about 0.9 to 3.4 at head_dim 128 (4.4 at 64): attention
/// from diffuse to peaked.
fn realistic_case(rng: &mut StdRng, shape: GqaShape, lens: &[usize]) -> PagedCase {
    let mut case = PagedCase::random(rng, shape, 16, lens, &vec![1; lens.len()]);
    let (n_kv, d) = (shape.n_kv_heads(), shape.head_dim());
    // Per head: a magnitude, and the channels that are outliers.
    let mut heads = |outliers: usize| -> (Vec<f32>, Vec<Vec<usize>>) {
        let magnitude = (0..n_kv)
            .map(|h| 2f32.powf(2.0 * h as f32 / (n_kv - 1).max(1) as f32 - 1.0))
            .collect();
        let channels = (0..n_kv)
            .map(|_| (0..outliers).map(|_| rng.random_range(0..d)).collect())
            .collect();
        (magnitude, channels)
    };
    let (k_mag, k_out) = heads(4);
    let (v_mag, v_out) = heads(2);
    let len = case.k_cache.len();
    let (k, v) = (normal(rng, len), normal(rng, len));
    let shape_of = |i: usize| ((i / d) % n_kv, i % d);
    case.k_cache = k
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let (h, c) = shape_of(i);
            x * k_mag[h] * if k_out[h].contains(&c) { 8.0 } else { 1.0 }
        })
        .collect();
    case.v_cache = v
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let (h, c) = shape_of(i);
            x * v_mag[h] * if v_out[h].contains(&c) { 4.0 } else { 1.0 }
        })
        .collect();
    case.q = normal(rng, case.q.len());
    case
}

/// How the scales were chosen in the accuracy table.
#[derive(Debug, Clone, Copy)]
enum Scales {
    /// amax / max of each K/V head.
    PerHead,
    /// amax / max of the whole layer, every head the same.
    PerLayer,
    /// 1.0 (uncalibrated).
    One,
}

fn scales_for<F: Fp8Element>(case: &PagedCase, how: Scales) -> KvScales {
    let n_kv = case.layout.shape().n_kv_heads();
    let per_head = case.amax_scales::<F>();
    match how {
        Scales::PerHead => per_head,
        Scales::PerLayer => {
            let max = |s: &[f32]| s.iter().copied().fold(0.0f32, f32::max);
            KvScales::per_layer(n_kv, max(per_head.k()), max(per_head.v())).unwrap()
        }
        Scales::One => KvScales::ones(n_kv),
    }
}

/// An accuracy case and the oracle's attention over its unquantized f32 K/V.
struct Accuracy {
    case: PagedCase,
    exact: cpu::Attention,
}

impl Accuracy {
    fn new(case: PagedCase) -> Self {
        let exact = cpu::attention(&case.q, &case.kv(), &AttendOptions::new()).unwrap();
        Self { case, exact }
    }

    /// (relative L2 of out, max |lse error|) of attention over `F` pages under `how` against
    /// unquantized attention, both by the f64 oracle.
    fn fp8<F: Fp8Element>(&self, how: Scales) -> (f64, f64) {
        let case = &self.case;
        let scales = scales_for::<F>(case, how);
        let (k, v) = quantized::<F>(case, &scales);
        let kv = PagedKv::new(
            case.layout,
            &case.lens,
            &case.tables,
            case.max_blocks,
            &k,
            &v,
        )
        .unwrap()
        .with_scales(&scales)
        .unwrap();
        self.error_of(&cpu::attention(&case.q, &kv, &AttendOptions::new()).unwrap())
    }

    /// The same of bf16 pages (K/V rounded to bf16), for comparison.
    fn bf16(&self) -> (f64, f64) {
        let case = &self.case;
        let round =
            |x: &[f32]| -> Vec<half::bf16> { x.iter().map(|&v| half::bf16::from_f32(v)).collect() };
        let (k, v) = (round(&case.k_cache), round(&case.v_cache));
        let kv = PagedKv::new(
            case.layout,
            &case.lens,
            &case.tables,
            case.max_blocks,
            &k,
            &v,
        )
        .unwrap();
        self.error_of(&cpu::attention(&case.q, &kv, &AttendOptions::new()).unwrap())
    }

    fn error_of(&self, got: &cpu::Attention) -> (f64, f64) {
        (
            rel_l2(&got.out, &self.exact.out),
            max_abs(&got.lse, &self.exact.lse),
        )
    }
}

/// Decode contexts of the accuracy cases: 4 sequences from 256 to 2500 keys.
const ACCURACY_CONTEXTS: [usize; 4] = [256, 700, 1500, 2500];

/// The accuracy table of `src/fp8.rs`: fp8 attention against unquantized attention (f64 oracle
/// both) on four model shapes, decode of 4 sequences of 256 to 2500 keys, realistic K/V; per
/// format and scale choice the worst over the shapes, with bf16 pages beside them. Each bound
/// is the worst measured over repeated runs with a margin (the values are fresh each run).
/// Then K/V 64 times larger (amax about 4000): past e4m3's 448, where scale 1.0 saturates.
#[test]
fn fp8_attention_error_on_model_shapes_is_within_the_documented_bounds() {
    let mut rng = common::rng("fp8_attention_error");
    let shapes = [
        ("Llama-3-8B", GqaShape::new(32, 8, 128).unwrap()),
        ("Qwen2-7B", GqaShape::new(28, 4, 128).unwrap()),
        ("Qwen2.5-0.5B", GqaShape::new(14, 2, 64).unwrap()),
        ("Gemma-2-9B", GqaShape::new(16, 8, 256).unwrap()),
    ];
    let cases: Vec<(&str, Accuracy)> = shapes
        .iter()
        .map(|&(name, shape)| {
            let case = realistic_case(&mut rng, shape, &ACCURACY_CONTEXTS);
            (name, Accuracy::new(case))
        })
        .collect();
    println!("| pages | scales | shape | relative L2 of out | max lse error |");
    println!("|---|---|---|---|---|");
    let mut bf16_worst = (0.0f64, 0.0f64);
    for (name, case) in &cases {
        let (rel, lse) = case.bf16();
        println!("| bf16 | - | {name} | {rel:.4} | {lse:.4} |");
        bf16_worst = (bf16_worst.0.max(rel), bf16_worst.1.max(lse));
    }
    assert!(
        bf16_worst.0 < BF16_BOUNDS.0 && bf16_worst.1 < BF16_BOUNDS.1,
        "bf16 pages: {bf16_worst:?}"
    );
    for (format, how, rel_bound, lse_bound) in ACCURACY_BOUNDS {
        let mut worst = (0.0f64, 0.0f64);
        for (name, case) in &cases {
            let (rel, lse) = match format {
                Fp8Format::E4M3 => case.fp8::<Fp8E4M3>(how),
                Fp8Format::E5M2 => case.fp8::<Fp8E5M2>(how),
            };
            println!("| {format:?} | {how:?} | {name} | {rel:.4} | {lse:.4} |");
            worst = (worst.0.max(rel), worst.1.max(lse));
        }
        assert!(
            worst.0 < rel_bound && worst.1 < lse_bound,
            "{format:?} {how:?}: worst {worst:?} against bounds ({rel_bound}, {lse_bound})"
        );
    }
    // K/V 64 times larger (q 64 times smaller: the same logits): scale 1.0 saturates e4m3 at
    // 448, per-head scales see the same values as before.
    let (name, small) = &cases[0];
    let case = &small.case;
    let large = Accuracy::new(PagedCase {
        layout: case.layout,
        lens: case.lens.clone(),
        tables: case.tables.clone(),
        max_blocks: case.max_blocks,
        k_cache: case.k_cache.iter().map(|x| 64.0 * x).collect(),
        v_cache: case.v_cache.iter().map(|x| 64.0 * x).collect(),
        q: case.q.iter().map(|x| x / 64.0).collect(),
    });
    let one = large.fp8::<Fp8E4M3>(Scales::One);
    let per_head = large.fp8::<Fp8E4M3>(Scales::PerHead);
    println!(
        "| E4M3, K/V x64 | One | {name} | {:.4} | {:.4} |",
        one.0, one.1
    );
    println!(
        "| E4M3, K/V x64 | PerHead | {name} | {:.4} | {:.4} |",
        per_head.0, per_head.1
    );
    assert!(one.0 > SATURATED_REL_AT_LEAST, "saturated: {one:?}");
    assert!(per_head.0 < ACCURACY_BOUNDS[0].2, "per head: {per_head:?}");
}

// The bounds: the worst of 12 runs (fresh values each) with a margin (1.4 to 1.8; the max lse
// error is heavy-tailed). Worst measured (relative L2 of out / max lse error): bf16 0.0098 /
// 0.047; e4m3 per head 0.156 / 0.79, per layer 0.156 / 0.79, scale 1.0 0.166 / 0.72; e5m2 per
// head 0.349 / 1.81, per layer 0.349 / 1.81, scale 1.0 0.315 / 1.01; e4m3 under scale 1.0
// with K/V 64 times larger: at least 0.73.

/// Bounds on bf16 pages' relative L2 and lse errors in the accuracy cases.
const BF16_BOUNDS: (f64, f64) = (0.015, 0.08);
/// Scale 1.0 over K/V of amax about 4000 in e4m3: at least this relative L2 error.
const SATURATED_REL_AT_LEAST: f64 = 0.5;
/// (format, scales, bound on relative L2 of out, bound on lse error).
const ACCURACY_BOUNDS: [(Fp8Format, Scales, f64, f64); 6] = [
    (Fp8Format::E4M3, Scales::PerHead, 0.24, 1.5),
    (Fp8Format::E4M3, Scales::PerLayer, 0.24, 1.5),
    (Fp8Format::E4M3, Scales::One, 0.25, 1.5),
    (Fp8Format::E5M2, Scales::PerHead, 0.5, 3.0),
    (Fp8Format::E5M2, Scales::PerLayer, 0.5, 3.0),
    (Fp8Format::E5M2, Scales::One, 0.5, 3.0),
];
