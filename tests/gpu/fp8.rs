//! Attention over fp8 pages (e4m3fn and e5m2) on both kernels against the f64 oracle over the
//! dequantized K/V: decode on model shapes (pages of 1, 16, 32 and 256), a mixed batch with
//! prompts, chunks, speculation and splits, chunked prefill, the attention variants (windows,
//! soft-cap, sinks with splits, ALiBi, non-causal passes), the cache path (the write kernel's
//! quantization bit for bit against the host's, saturation and NaN included; copy-on-write of
//! fp8 blocks after forks; attention over the cache against the CPU cache's oracle), refusals,
//! and the traffic of fp8 decode (emulator only: exactly half the bytes of bf16 pages). K/V
//! heads have different magnitudes (so their scales differ, K's from V's too) and every kernel
//! choice runs; outputs are poisoned first.
//!
//! Each `gpu_xxx` test skips (printing why) without a GPU, or fails with
//! PAGED_GQA_REQUIRE_GPU=1; its twin `sim_xxx` runs the same body on the kernel emulator.

use crate::common;
use crate::setup::{fetched, span, CachePair};

use half::{bf16, f16};
use paged_gqa::cache::{CacheConfig, PagedCache, SeqId, StepPlan};
use paged_gqa::fp8::{Fp8E4M3, Fp8E5M2, Fp8Element, KvScales};
use paged_gqa::plan::KernelChoice;
use paged_gqa::sim::{AttendBatch, SimDevice};
use paged_gqa::variants::alibi_slopes;
use paged_gqa::{AttendOptions, DType, Element, Error, GqaShape};
use rand::rngs::StdRng;
use rand::Rng;

use common::check::{check_fp8, compare, model};
use common::{Device, PagedCase, MODELS};

use common::twins;

/// Per-head factors of K and of V for `n_kv` heads: magnitudes from 1/4 to 4 (K's and V's
/// different), so each head's amax scale differs from its neighbours' and K's from V's.
fn head_factors(rng: &mut StdRng, n_kv: usize) -> (Vec<f32>, Vec<f32>) {
    let mut factor = || 2f32.powf(rng.random_range(-2.0..2.0));
    let k = (0..n_kv).map(|_| factor()).collect();
    let v = (0..n_kv).map(|_| factor()).collect();
    (k, v)
}

/// A random case with per-head magnitudes (see [`head_factors`]).
fn fp8_case(
    rng: &mut StdRng,
    shape: GqaShape,
    block_size: usize,
    context_lens: &[usize],
    query_lens: &[usize],
) -> PagedCase {
    let mut case = PagedCase::random(rng, shape, block_size, context_lens, query_lens);
    let (k, v) = head_factors(rng, shape.n_kv_heads());
    case.scale_heads(&k, &v);
    case
}

/// [`check_fp8`] over every row with per-head amax scales, e4m3 pages then e5m2 pages.
fn check_both<D: Device, T: Element>(
    dev: &D,
    what: &str,
    case: &PagedCase,
    options: &AttendOptions,
) -> Vec<usize> {
    let keep = vec![true; case.lens.num_tokens()];
    let (e4m3, e5m2) = (case.amax_scales::<Fp8E4M3>(), case.amax_scales::<Fp8E5M2>());
    let mut splits = check_fp8::<D, T, Fp8E4M3>(dev, what, case, &e4m3, &keep, options);
    splits.extend(check_fp8::<D, T, Fp8E5M2>(
        dev, what, case, &e5m2, &keep, options,
    ));
    splits
}

/// Decode on every model shape over pages of 16, 1, 256 and 32, contexts of 1 key, a page, a
/// partial page and 500 keys; e4m3 and e5m2 pages, bf16 and f16 queries in turn.
fn models<D: Device>(dev: &D, test: &str) {
    let mut rng = common::rng(test);
    for (i, &(model, n_heads, n_kv_heads, head_dim)) in MODELS.iter().enumerate() {
        let shape = GqaShape::new(n_heads, n_kv_heads, head_dim).unwrap();
        let block_size = [16, 1, 256, 32][i % 4];
        let lens = [1, block_size, block_size + block_size / 2 + 1, 500];
        let case = fp8_case(&mut rng, shape, block_size, &lens, &[1; 4]);
        let what = format!("{model} decode, pages of {block_size}");
        if i % 2 == 0 {
            check_both::<D, bf16>(dev, &what, &case, &AttendOptions::new());
        } else {
            check_both::<D, f16>(dev, &what, &case, &AttendOptions::new());
        }
    }
}
twins!(
    gpu_fp8_decode_matches_oracle_on_model_shapes,
    sim_fp8_decode_matches_oracle_on_model_shapes,
    models
);

/// [`common::MIXED_BATCH`] on pages of 16, with per-head magnitudes.
fn mixed_batch(rng: &mut StdRng, shape: GqaShape) -> PagedCase {
    let (contexts, queries) = common::MIXED_BATCH;
    fp8_case(rng, shape, 16, &contexts, &queries)
}

/// The mixed batch on both kernels (splits on every choice), prompts and chunks on pages of 1
/// and 256, a chunk far behind its cache on Llama-3-70B's heads, prompts at d256 and d80.
/// Sized for the emulator (about 0.75 us per query row, key and head at d128, two schedules
/// each): 20 s.
fn prompts_chunks_and_splits<D: Device>(dev: &D, test: &str) {
    let mut rng = common::rng(test);
    let case = mixed_batch(&mut rng, GqaShape::new(8, 2, 64).unwrap());
    let splits = check_both::<D, bf16>(dev, "mixed batch", &case, &AttendOptions::new());
    assert!(splits.iter().all(|&s| s > 1), "splits {splits:?}");
    check_both::<D, f16>(dev, "mixed batch", &case, &AttendOptions::new());
    for block_size in [1, 256] {
        let shape = GqaShape::new(32, 8, 128).unwrap();
        let case = fp8_case(&mut rng, shape, block_size, &[48, 150, 5], &[48, 21, 2]);
        let what = format!("prompt and chunk, pages of {block_size}");
        check_both::<D, bf16>(dev, &what, &case, &AttendOptions::new());
    }
    let shape = GqaShape::new(64, 8, 128).unwrap();
    let case = fp8_case(&mut rng, shape, 16, &[232, 9], &[32, 2]);
    check_both::<D, bf16>(
        dev,
        "Llama-3-70B chunk of 32 on 200",
        &case,
        &AttendOptions::new(),
    );
    // d256 (Gemma-2-9B) and d80 in the tensor-core kernel's staging.
    for (n_heads, n_kv, d) in [(16, 8, 256), (32, 8, 80)] {
        let shape = GqaShape::new(n_heads, n_kv, d).unwrap();
        let case = fp8_case(&mut rng, shape, 16, &[100, 3], &[40, 3]);
        check_both::<D, f16>(dev, &format!("prompt, d{d}"), &case, &AttendOptions::new());
    }
}
twins!(
    gpu_fp8_prompts_chunks_and_splits_match_oracle,
    sim_fp8_prompts_chunks_and_splits_match_oracle,
    prompts_chunks_and_splits
);

/// Windows (0, under a page, more than any context), soft-cap on large logits, sinks across
/// splits and windows, ALiBi on 40 heads, non-causal passes: each over fp8 pages.
fn variants<D: Device>(dev: &D, test: &str) {
    let mut rng = common::rng(test);
    let shape = GqaShape::new(8, 2, 64).unwrap();
    let case = mixed_batch(&mut rng, shape);
    for window_left in [0, 5, 10_000] {
        let options = AttendOptions::new().with_window_left(window_left);
        check_both::<D, bf16>(dev, &format!("window_left {window_left}"), &case, &options);
    }
    // Soft-cap: q values up to 50 make logits of several hundred, capped to +-30.
    let capped = scaled_q(&case, 50.0);
    let options = AttendOptions::new().with_logit_softcap(30.0);
    check_both::<D, f16>(dev, "soft-cap 30", &capped, &options);
    // Sinks (gpt-oss heads), split and windowed.
    let shape = GqaShape::new(64, 8, 64).unwrap();
    let mut sinks: Vec<f32> = (0..64).map(|_| rng.random_range(-3.0..4.0)).collect();
    sinks[5] = f32::NEG_INFINITY;
    let case = fp8_case(&mut rng, shape, 16, &[1, 130, 700, 48], &[1, 1, 1, 8]);
    let options = AttendOptions::new().with_sinks(sinks.clone());
    let splits = check_both::<D, bf16>(dev, "sinks", &case, &options);
    assert!(splits.iter().all(|&s| s > 1), "splits {splits:?}");
    let options = options.with_window_left(127);
    check_both::<D, bf16>(dev, "sinks, window 128", &case, &options);
    // ALiBi on 40 heads; a non-causal pass with a window.
    let shape = GqaShape::new(40, 10, 128).unwrap();
    let case = fp8_case(&mut rng, shape, 16, &[1, 50, 300, 70], &[1, 1, 1, 20]);
    let options = AttendOptions::new().with_alibi_slopes(alibi_slopes(40));
    check_both::<D, bf16>(dev, "ALiBi, 40 heads", &case, &options);
    let options = AttendOptions::new().with_causal(false).with_window_left(20);
    check_both::<D, f16>(dev, "non-causal, window 21", &case, &options);
}
twins!(
    gpu_fp8_variants_match_oracle,
    sim_fp8_variants_match_oracle,
    variants
);

/// A copy of `case` with every query value multiplied by `factor`.
fn scaled_q(case: &PagedCase, factor: f32) -> PagedCase {
    PagedCase {
        layout: case.layout,
        lens: case.lens.clone(),
        tables: case.tables.clone(),
        max_blocks: case.max_blocks,
        k_cache: case.k_cache.clone(),
        v_cache: case.v_cache.clone(),
        q: case.q.iter().map(|x| x * factor).collect(),
    }
}

const LAYERS: usize = 2;

/// Pages enough for the scenario's sequences (about 50 tokens each after its forks).
fn blocks(block_size: usize) -> usize {
    (200 / block_size).max(24)
}

/// A device cache and a CPU cache over fp8 pages of `F` with the same per-layer scales, fed the
/// same steps.
struct Pair<D: Device, F: Fp8Element + Default> {
    caches: CachePair<D, F>,
    rng: StdRng,
}

impl<D: Device, F: Fp8Element + Default> Pair<D, F> {
    fn new(dev: &D, test: &str, block_size: usize) -> Self {
        let shape = GqaShape::new(32, 8, 128).unwrap();
        let config = CacheConfig::new(shape, LAYERS, block_size, DType::BF16)
            .unwrap()
            .with_page_dtype(F::PAGE_DTYPE)
            .unwrap();
        let mut rng = common::rng(test);
        // Both caches start with the same random stored bits.
        let mut caches = CachePair::new(dev, config, blocks(block_size), |len| {
            (0..len).map(|_| F::from_bits(rng.random())).collect()
        });
        for layer in 0..LAYERS {
            // Amax-style scales of rows in [-4, 4): 4 / max, per head, times a per-head factor.
            let (k, v) = head_factors(&mut rng, shape.n_kv_heads());
            let scale =
                |f: Vec<f32>| -> Vec<f32> { f.iter().map(|x| x * 4.0 / F::FORMAT.max()).collect() };
            let scales = KvScales::new(scale(k), scale(v)).unwrap();
            D::set_scales(&mut caches.device, layer, &scales).unwrap();
            caches.cpu.set_scales(layer, &scales).unwrap();
        }
        Self { caches, rng }
    }

    /// Rows in [-4, 4) (about the range the scales were made for), every 97th value far past
    /// it (+-10^4: past the fp8 range at its scale in e4m3, saturating to +-max; not always in
    /// e5m2); with `special`, also infinities and NaNs.
    fn rows(&mut self, n: usize, special: bool) -> Vec<bf16> {
        let mut x: Vec<f32> = common::uniform(&mut self.rng, n)
            .into_iter()
            .map(|v| 4.0 * v)
            .collect();
        for i in (0..n).step_by(97) {
            x[i] = if i % 2 == 0 { 1e4 } else { -1e4 };
        }
        if special {
            for i in (5..n).step_by(301) {
                x[i] = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN][(i / 301) % 4];
            }
        }
        x.into_iter().map(bf16::from_f32).collect()
    }

    /// Plans `batch` on both, writes the same random bf16 rows to every layer (the device
    /// quantizing with its kernel, the CPU with the host conversions), compares the pages bit
    /// for bit (NaNs as NaNs); then, unless the rows had infinities and NaNs (`special`),
    /// attention over every layer of the device cache against the CPU cache's oracle.
    fn step(&mut self, batch: &[(SeqId, usize)], special: bool) {
        let (device_plan, cpu_plan) = self.caches.plan(batch);
        let shape = self.caches.cpu.config().shape();
        let n = cpu_plan.num_new_tokens() * shape.kv_row_len();
        for layer in 0..LAYERS {
            let (k, v) = (self.rows(n, special), self.rows(n, special));
            let (k_dev, v_dev) = (self.caches.dev.upload(&k), self.caches.dev.upload(&v));
            D::write_kv(&mut self.caches.device, layer, &device_plan, &k_dev, &v_dev).unwrap();
            self.caches
                .cpu
                .write_quantized(layer, &cpu_plan, &k, &v)
                .unwrap();
        }
        self.compare_pages(batch);
        if !special {
            self.attend(&device_plan, &cpu_plan);
        }
    }

    fn attend(&mut self, device_plan: &D::Plan, cpu_plan: &StepPlan) {
        let CachePair { dev, device, cpu } = &self.caches;
        let shape = cpu.config().shape();
        let tokens = cpu_plan.num_new_tokens();
        for layer in 0..LAYERS {
            let q: Vec<bf16> = common::uniform(&mut self.rng, tokens * shape.q_row_len())
                .into_iter()
                .map(|v| bf16::from_f32(0.05 * v))
                .collect();
            let keep = vec![true; tokens];
            let (oracle, cond) = paged_gqa::cpu::attention_with_conditioning(
                &q,
                &cpu.paged_kv(layer, cpu_plan).unwrap(),
                &AttendOptions::new(),
                &keep,
            )
            .unwrap();
            let mut out = dev.alloc_poisoned::<bf16>(q.len());
            let mut lse = dev.alloc_poisoned::<f32>(tokens * shape.n_heads());
            D::attend_cache(
                device,
                layer,
                device_plan,
                &dev.upload(&q),
                &mut out,
                &mut lse,
                &AttendOptions::new(),
            )
            .unwrap();
            let (out, lse) = (dev.download_f64(&out), dev.download_f64(&lse));
            let what = format!("{:?} cache, layer {layer}", F::FORMAT);
            let model = model::<D, bf16>(KernelChoice::Auto);
            compare(&what, shape, &out, &lse, &oracle, &cond, &keep, model);
        }
    }

    fn compare_pages(&self, batch: &[(SeqId, usize)]) {
        // A NaN is a NaN: the GPU's cvt may not encode it as 0x7F as the host does.
        let differ = self.caches.differing_pages(|g, c| {
            let (g, c) = (g.to_bits(), c.to_bits());
            g == c || (F::FORMAT.is_nan(g) && F::FORMAT.is_nan(c))
        });
        assert_eq!(
            differ, 0,
            "after step {batch:?}: {differ} fp8 page values differ from the CPU cache's"
        );
    }
}

/// Prompts, decode steps, forks of partly filled blocks (copy-on-write of fp8 blocks) and more
/// steps on both, pages compared after every step and attention checked.
fn cache_scenario<D: Device, F: Fp8Element + Default, const BLOCK_SIZE: usize>(
    dev: &D,
    test: &str,
) {
    let mut pair = Pair::<D, F>::new(dev, test, BLOCK_SIZE);
    // Infinities and NaNs through the write kernel (pages compared only), then given back.
    let z = pair.caches.add();
    pair.step(&[(z, 9)], true);
    pair.caches.free(z);
    let (a, b) = (pair.caches.add(), pair.caches.add());
    pair.step(&[(a, 21), (b, 3)], false);
    pair.step(&[(a, 1), (b, 1)], false);
    let c = pair.caches.fork(a); // shares a's partly filled last block
    pair.step(&[(c, 2), (a, 1)], false); // both write into it: copy-on-write
    let d = pair.caches.fork(c);
    pair.step(&[(d, 5), (b, 1), (c, 1)], false);
    pair.step(&[(a, 1), (b, 1), (c, 1), (d, 1)], false);
}

fn cache_e4m3<D: Device>(dev: &D, test: &str) {
    cache_scenario::<D, Fp8E4M3, 16>(dev, test);
    cache_scenario::<D, Fp8E4M3, 1>(dev, test);
}
twins!(
    gpu_fp8_e4m3_cache_matches_cpu_cache,
    sim_fp8_e4m3_cache_matches_cpu_cache,
    cache_e4m3
);
twins!(
    gpu_fp8_e5m2_cache_matches_cpu_cache,
    sim_fp8_e5m2_cache_matches_cpu_cache,
    cache_scenario::<_, Fp8E5M2, 8>
);

/// What the fp8 paths refuse: a storage whose page type differs from the configuration's,
/// scales for 16-bit pages or of the wrong length, rows or queries of another dtype than the
/// configuration's, fp8 caches without scales of the right length in the caller-managed batch.
fn refusals<D: Device>(dev: &D, _test: &str) {
    let shape = GqaShape::new(8, 2, 64).unwrap();
    let bf16_config = CacheConfig::new(shape, 2, 16, DType::BF16).unwrap();
    let config = bf16_config.with_page_dtype(DType::F8E4M3).unwrap();
    assert!(matches!(
        dev.storage::<Fp8E5M2>(config, 4),
        Err(Error::DTypeMismatch {
            expected: DType::F8E4M3,
            actual: DType::F8E5M2
        })
    ));
    assert!(matches!(
        dev.storage::<bf16>(config, 4),
        Err(Error::DTypeMismatch { .. })
    ));
    let mut plain = PagedCache::new(dev.storage::<bf16>(bf16_config, 4).unwrap()).unwrap();
    assert!(matches!(
        D::set_scales(&mut plain, 0, &KvScales::ones(2)),
        Err(Error::InvalidOption { .. })
    ));
    let mut cache = PagedCache::new(dev.storage::<Fp8E4M3>(config, 4).unwrap()).unwrap();
    assert!(matches!(
        D::set_scales(&mut cache, 0, &KvScales::ones(3)),
        Err(Error::BufferLength {
            expected: 2,
            actual: 3,
            ..
        })
    ));
    assert!(matches!(
        D::set_scales(&mut cache, 2, &KvScales::ones(2)),
        Err(Error::LayerOutOfRange { layer: 2, .. })
    ));
    let seq = cache.add_sequence();
    let plan = cache.plan(&[(seq, 2)]).unwrap();
    let f16_rows = dev.upload(&[f16::ZERO; 256]);
    assert!(matches!(
        D::write_kv(&mut cache, 0, &plan, &f16_rows, &f16_rows),
        Err(Error::DTypeMismatch {
            expected: DType::BF16,
            actual: DType::F16
        })
    ));
    let q = dev.upload(&[f16::ZERO; 2 * 8 * 64]);
    let mut out = dev.alloc_poisoned::<f16>(2 * 8 * 64);
    let mut lse = dev.alloc_poisoned::<f32>(2 * 8);
    assert!(matches!(
        D::attend_cache(
            &cache,
            0,
            &plan,
            &q,
            &mut out,
            &mut lse,
            &AttendOptions::new()
        ),
        Err(Error::DTypeMismatch { .. })
    ));
    // The caller-managed batch: scales for 3 heads of a 2-head cache.
    let mut rng = common::rng("fp8 refusals");
    let case = PagedCase::random(&mut rng, shape, 16, &[20], &[1]);
    let typed = case.fp8_typed::<bf16, Fp8E4M3>(
        &case.amax_scales::<Fp8E4M3>(),
        &[true],
        &AttendOptions::new(),
    );
    let batch = dev
        .attend_batch(
            case.layout,
            DType::BF16,
            &case.lens,
            &case.tables,
            case.max_blocks,
            KernelChoice::Auto,
        )
        .unwrap();
    let (k, v, q) = (
        dev.upload(&typed.k_cache),
        dev.upload(&typed.v_cache),
        dev.upload(&typed.q),
    );
    let mut out = dev.alloc_poisoned::<bf16>(8 * 64);
    let mut lse = dev.alloc_poisoned::<f32>(8);
    let err = dev
        .run_attend_fp8(
            &batch,
            &k,
            &v,
            &KvScales::ones(3),
            &q,
            &mut out,
            &mut lse,
            &AttendOptions::new(),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::BufferLength {
                expected: 2,
                actual: 3,
                ..
            }
        ),
        "{err}"
    );
}
twins!(gpu_fp8_refusals, sim_fp8_refusals, refusals);

/// Llama-3-8B decode of 4 sequences on the emulator, bf16 pages against e4m3 and e5m2 pages of
/// the same batch: each kernel fetches every visible K and V byte once, so fp8 pages cost
/// exactly half the bytes.
#[test]
fn sim_fp8_decode_fetches_half_the_bytes_of_bf16() {
    let device = SimDevice::new();
    device.set_race_check(false);
    let mut rng = common::rng("sim_fp8_decode_fetches_half_the_bytes_of_bf16");
    let shape = GqaShape::new(32, 8, 128).unwrap();
    let lens = [2000, 517, 33, 1];
    let case = fp8_case(&mut rng, shape, 16, &lens, &[1; 4]);
    let keys: usize = lens.iter().sum();
    let bf16_bytes = 2 * keys * shape.kv_row_len() * 2; // K and V, 2 bytes each
    let typed = case.typed::<bf16>();
    let rows = 4 * shape.n_heads();
    let q = device.upload(&typed.q).unwrap();
    for choice in [
        KernelChoice::CudaCores,
        KernelChoice::TensorCores,
        KernelChoice::NarrowTensorCores,
    ] {
        let batch = AttendBatch::with_kernels(
            &device,
            case.layout,
            DType::BF16,
            &case.lens,
            &case.tables,
            case.max_blocks,
            choice,
        )
        .unwrap();
        let mut out = device.alloc::<bf16>(rows * shape.head_dim()).unwrap();
        let mut lse = device.alloc::<f32>(rows).unwrap();
        let (k, v) = (
            device.upload(&typed.k_cache).unwrap(),
            device.upload(&typed.v_cache).unwrap(),
        );
        let bf16_fetched = fetched(&device, &[span(&k), span(&v)], || {
            let options = AttendOptions::new();
            batch
                .run(&device, &k, &v, &q, &mut out, &mut lse, &options)
                .unwrap();
        });
        assert_eq!(bf16_fetched, bf16_bytes, "{choice:?}: bf16 pages");
        for format in ["e4m3", "e5m2"] {
            let fetched = if format == "e4m3" {
                fp8_fetched::<Fp8E4M3>(&device, &batch, &case, &q, &mut out, &mut lse)
            } else {
                fp8_fetched::<Fp8E5M2>(&device, &batch, &case, &q, &mut out, &mut lse)
            };
            assert_eq!(
                2 * fetched,
                bf16_fetched,
                "{choice:?}, {format}: {fetched} bytes fetched against {bf16_fetched} for bf16"
            );
            println!(
                "Llama-3-8B decode, {keys} keys, {choice:?}: bf16 pages {bf16_fetched} B of K \
                 and V fetched, fp8 {format} pages {fetched} B"
            );
        }
    }
}

/// Bytes of K and V the batch fetches over the case's K/V stored as `F`.
fn fp8_fetched<F: Fp8Element>(
    device: &std::rc::Rc<SimDevice>,
    batch: &AttendBatch,
    case: &PagedCase,
    q: &paged_gqa::sim::SimBuffer<bf16>,
    out: &mut paged_gqa::sim::SimBuffer<bf16>,
    lse: &mut paged_gqa::sim::SimBuffer<f32>,
) -> usize {
    let scales = case.amax_scales::<F>();
    let typed = case.fp8_typed::<bf16, F>(&scales, &[false; 4], &AttendOptions::new());
    let scales = paged_gqa::sim::DeviceKvScales::new(device, &scales).unwrap();
    let (k, v) = (
        device.upload(&typed.k_cache).unwrap(),
        device.upload(&typed.v_cache).unwrap(),
    );
    fetched(device, &[span(&k), span(&v)], || {
        let options = AttendOptions::new();
        batch
            .run_fp8(device, &k, &v, &scales, q, out, lse, &options)
            .unwrap();
    })
}
