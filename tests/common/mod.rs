//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

pub mod backend;
pub mod check;

#[allow(unused_imports)] // as above
pub use backend::{gpu_stream, Device};

/// Declares `gpu_$name` (on a CUDA stream, skipping without one) and `sim_$name` (on a fresh
/// emulated device) running `$body(device, test name)`. The test binary must declare `common`
/// at its root (`mod common;`).
#[allow(unused_macros)] // as above
macro_rules! twins {
    ($gpu:ident, $sim:ident, $body:path) => {
        #[test]
        fn $gpu() {
            let test = stringify!($gpu);
            if let Some(gpu) = $crate::common::gpu_stream(test) {
                $body(&gpu, test);
            }
        }

        #[test]
        fn $sim() {
            $body(&paged_gqa::sim::SimDevice::new(), stringify!($sim));
        }
    };
}
#[allow(unused_imports)] // as above
pub(crate) use twins;

/// A mixed batch's (context lengths, query lengths), for pages of 16: decode rows (1 key, a
/// page, a partial page, 600 keys: split), a prompt of 40, a chunk of 13 rows on 70 keys and
/// speculation of 3 on 33.
pub const MIXED_BATCH: ([usize; 7], [usize; 7]) =
    ([1, 16, 23, 600, 40, 70, 33], [1, 1, 1, 1, 40, 13, 3]);

use paged_gqa::AttendOptions;
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use paged_gqa::cache::{BlockManager, CacheConfig, PagedCache, SeqId};
use paged_gqa::cpu::{CpuStorage, PagedKv};
use paged_gqa::cuda::CudaContext;
use paged_gqa::fp8::Fp8Format;
use paged_gqa::{DType, GqaShape, PagedLayout, SeqLens};
use rand::rngs::{SmallRng, StdRng};
use rand::seq::{IteratorRandom, SliceRandom};
use rand::{Rng, SeedableRng};

/// A fresh random generator; its seed is printed so a failure can be replayed with
/// `PAGED_GQA_SEED=<seed>`.
pub fn rng(test: &str) -> StdRng {
    let seed = std::env::var("PAGED_GQA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("{test}: seed {seed} (replay with PAGED_GQA_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

/// `n` values uniform in [-1, 1), never all zero. They come from a small generator seeded from
/// `rng` (so the printed seed still replays them): `StdRng`'s ChaCha is a dependency, built
/// unoptimised in test builds, and takes seconds per ten million values (a 32k-key cache).
pub fn uniform(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let mut fast = SmallRng::seed_from_u64(rng.random());
    (0..n).map(|_| fast.random_range(-1.0f32..1.0)).collect()
}

/// The GPU for a GPU test, or `None` after printing why the test skips. With
/// `PAGED_GQA_REQUIRE_GPU=1` a missing GPU fails the test instead of skipping it.
pub fn gpu_or_skip(test: &str) -> Option<Arc<CudaContext>> {
    match paged_gqa::cuda::context(0) {
        Ok(ctx) => Some(ctx),
        Err(why) => {
            if std::env::var("PAGED_GQA_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{test}: PAGED_GQA_REQUIRE_GPU=1 but no GPU: {why}");
            }
            // Straight to stderr, past the test harness's capture, so the skip is visible.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: no GPU ({why}); set PAGED_GQA_REQUIRE_GPU=1 to fail instead"
            );
            None
        }
    }
}

/// Whether a test that needs nvcc at build time must fail (not skip) when it is missing.
pub fn require_nvcc() -> bool {
    std::env::var("PAGED_GQA_REQUIRE_NVCC").is_ok_and(|v| v == "1")
}

/// nvcc as build.rs found it, or None (printed) when the crate was built without one; fails
/// instead under `PAGED_GQA_REQUIRE_NVCC=1`.
pub fn nvcc(test: &str) -> Option<&'static str> {
    let nvcc = option_env!("PAGED_GQA_NVCC");
    if nvcc.is_none() {
        assert!(
            !require_nvcc(),
            "{test}: PAGED_GQA_REQUIRE_NVCC=1 but the crate was built without nvcc"
        );
        eprintln!("SKIPPED {test}: built without nvcc");
    }
    nvcc
}

/// The `float8` crate's conversion of `x` to `format` (CUDA's saturating `__NV_SATFINITE`): the
/// independent reference of the fp8 tests.
pub fn float8_encode(format: Fp8Format, x: f32) -> u8 {
    match format {
        Fp8Format::E4M3 => float8::F8E4M3::from_f32(x).to_bits(),
        Fp8Format::E5M2 => float8::F8E5M2::from_f32(x).to_bits(),
    }
}

/// The `float8` crate's value of the `format` code `bits`.
pub fn float8_decode(format: Fp8Format, bits: u8) -> f32 {
    match format {
        Fp8Format::E4M3 => float8::F8E4M3::from_bits(bits).to_f32(),
        Fp8Format::E5M2 => float8::F8E5M2::from_bits(bits).to_f32(),
    }
}

/// Positive f32 values whose quotient by `scale` lies within 4 f32 ulps of a midpoint between
/// neighbouring `format` values (9 per midpoint, ascending): there the quotient's rounding (an
/// IEEE division, not a multiplication by 1 / scale) decides the stored code.
pub fn near_scaled_midpoints(format: Fp8Format, scale: f32) -> Vec<f32> {
    (0..format.max_bits())
        .flat_map(|code| {
            let mid = (f64::from(float8_decode(format, code))
                + f64::from(float8_decode(format, code + 1)))
                / 2.0;
            let near = (mid * f64::from(scale)) as f32;
            (0..9).map(move |k| f32::from_bits(near.to_bits() + k - 4))
        })
        .collect()
}

/// A random paged batch: pages handed out in shuffled order, tables padded with -1.
pub struct PagedCase {
    pub layout: PagedLayout,
    pub lens: SeqLens,
    /// [batch, max_blocks], -1 padded
    pub tables: Vec<i32>,
    pub max_blocks: usize,
    /// [num_blocks, block_size, n_kv_heads, head_dim]
    pub k_cache: Vec<f32>,
    pub v_cache: Vec<f32>,
    /// [num_tokens, n_heads, head_dim]
    pub q: Vec<f32>,
}

impl PagedCase {
    pub fn random(
        rng: &mut StdRng,
        shape: GqaShape,
        block_size: usize,
        context_lens: &[usize],
        query_lens: &[usize],
    ) -> Self {
        let lens = SeqLens::new(context_lens, query_lens).unwrap();
        let pages: Vec<usize> = context_lens
            .iter()
            .map(|l| l.div_ceil(block_size))
            .collect();
        let max_blocks = pages.iter().copied().max().unwrap_or(0) + 1; // one padding entry
        let num_blocks = pages.iter().sum::<usize>() + 2; // two pages nobody uses
        let layout = PagedLayout::new(shape, num_blocks, block_size).unwrap();
        let mut free: Vec<i32> = (0..num_blocks as i32).collect();
        free.shuffle(rng);
        let mut tables = vec![-1; context_lens.len() * max_blocks];
        for (seq, &n) in pages.iter().enumerate() {
            for index in 0..n {
                tables[seq * max_blocks + index] = free.pop().unwrap();
            }
        }
        let (mut k_cache, mut v_cache) = (
            uniform(rng, layout.cache_len()),
            uniform(rng, layout.cache_len()),
        );
        // Every slot no sequence holds (pages nobody uses, slots past each context in its last
        // page) is NaN: a kernel that reads one, even to multiply it by a zero weight, fails.
        let row_len = shape.kv_row_len();
        let mut held = vec![false; num_blocks * block_size];
        for (seq, &n) in context_lens.iter().enumerate() {
            for pos in 0..n {
                let block = tables[seq * max_blocks + pos / block_size] as usize;
                held[block * block_size + pos % block_size] = true;
            }
        }
        for (slot, _) in held.iter().enumerate().filter(|(_, &h)| !h) {
            k_cache[slot * row_len..][..row_len].fill(f32::NAN);
            v_cache[slot * row_len..][..row_len].fill(f32::NAN);
        }
        Self {
            k_cache,
            v_cache,
            q: uniform(rng, lens.num_tokens() * shape.q_row_len()),
            layout,
            lens,
            tables,
            max_blocks,
        }
    }

    pub fn kv(&self) -> PagedKv<'_, f32> {
        self.kv_of(&self.k_cache, &self.v_cache)
    }

    /// The case's block tables over other pages `k` and `v` (its K/V as another element type,
    /// quantized, dequantized...), laid out as `k_cache` and `v_cache`.
    pub fn kv_of<'a, P>(&'a self, k: &'a [P], v: &'a [P]) -> PagedKv<'a, P> {
        PagedKv::new(self.layout, &self.lens, &self.tables, self.max_blocks, k, v).unwrap()
    }
}

/// A case's values rounded to an element type, and the f64 oracle's attention over them.
pub struct Typed<T> {
    pub q: Vec<T>,
    pub k_cache: Vec<T>,
    pub v_cache: Vec<T>,
    pub oracle: paged_gqa::cpu::Attention,
    /// What the error bounds of a kernel against `oracle` need from these inputs.
    pub cond: paged_gqa::cpu::Conditioning,
}

impl PagedCase {
    /// The values as `T` (what a kernel sees) and the oracle computed from exactly those.
    pub fn typed<T: paged_gqa::Element>(&self) -> Typed<T> {
        self.typed_at(&vec![true; self.lens.num_tokens()])
    }

    /// [`typed`](Self::typed) with the oracle computed at the query rows `keep` only (NaN
    /// elsewhere): long cases are checked at a sample of rows (see [`sample_tokens`]).
    pub fn typed_at<T: paged_gqa::Element>(&self, keep: &[bool]) -> Typed<T> {
        self.typed_with(keep, &AttendOptions::default())
    }

    /// [`typed_at`](Self::typed_at) with the oracle computed with the variants of `options`.
    pub fn typed_with<T: paged_gqa::Element>(
        &self,
        keep: &[bool],
        options: &AttendOptions,
    ) -> Typed<T> {
        let to_t = |x: &[f32]| x.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>();
        let (q, k_cache, v_cache) = (to_t(&self.q), to_t(&self.k_cache), to_t(&self.v_cache));
        let kv = self.kv_of(&k_cache, &v_cache);
        let (oracle, cond) =
            paged_gqa::cpu::attention_with_conditioning(&q, &kv, options, keep).unwrap();
        Typed {
            q,
            k_cache,
            v_cache,
            oracle,
            cond,
        }
    }
}

/// A case's q rounded to `T` and its K/V stored in fp8 (`F`) under `scales`, with the f64
/// oracle's attention over exactly those (the dequantized K/V: stored value times scale).
pub struct Fp8Typed<T, F> {
    pub q: Vec<T>,
    pub k_cache: Vec<F>,
    pub v_cache: Vec<F>,
    pub scales: paged_gqa::fp8::KvScales,
    pub oracle: paged_gqa::cpu::Attention,
    /// What the error bounds of a kernel against `oracle` need from these inputs.
    pub cond: paged_gqa::cpu::Conditioning,
}

impl PagedCase {
    /// Multiplies K/V head `h`'s values by `k[h]` (K) and `v[h]` (V): heads of different
    /// magnitudes, so per-head scales differ and a kernel reading another head's is caught.
    pub fn scale_heads(&mut self, k: &[f32], v: &[f32]) {
        let (n_kv, d) = (
            self.layout.shape().n_kv_heads(),
            self.layout.shape().head_dim(),
        );
        for (cache, factors) in [(&mut self.k_cache, k), (&mut self.v_cache, v)] {
            for (i, x) in cache.iter_mut().enumerate() {
                *x *= factors[(i / d) % n_kv];
            }
        }
    }

    /// Per-head scales from the case's own K/V maxima (`amax / max` of `F`'s format).
    pub fn amax_scales<F: paged_gqa::fp8::Fp8Element>(&self) -> paged_gqa::fp8::KvScales {
        let shape = self.layout.shape();
        // Over the slots sequences hold: the others are NaN (see `random`).
        let amax = |x: &[f32]| {
            let held: Vec<f32> = x
                .iter()
                .map(|v| if v.is_nan() { 0.0 } else { *v })
                .collect();
            paged_gqa::fp8::head_amax(&held, shape.n_kv_heads(), shape.head_dim()).unwrap()
        };
        paged_gqa::fp8::KvScales::from_amax(F::FORMAT, &amax(&self.k_cache), &amax(&self.v_cache))
            .unwrap()
    }

    /// K and V quantized to `F` under `scales` (head `h`'s values divided by its scale).
    pub fn quantized<F: paged_gqa::fp8::Fp8Element>(
        &self,
        scales: &paged_gqa::fp8::KvScales,
    ) -> (Vec<F>, Vec<F>) {
        let shape = self.layout.shape();
        let (d, n_kv) = (shape.head_dim(), shape.n_kv_heads());
        let quantize = |x: &[f32], s: &[f32]| -> Vec<F> {
            x.iter()
                .enumerate()
                .map(|(i, &v)| F::quantize(v, s[(i / d) % n_kv]))
                .collect()
        };
        (
            quantize(&self.k_cache, scales.k()),
            quantize(&self.v_cache, scales.v()),
        )
    }

    /// q as `T`, K/V quantized to `F` under `scales` (head `h`'s values divided by its scale),
    /// and the oracle over the dequantized K/V at the query rows `keep`, with `options`.
    pub fn fp8_typed<T: paged_gqa::Element, F: paged_gqa::fp8::Fp8Element>(
        &self,
        scales: &paged_gqa::fp8::KvScales,
        keep: &[bool],
        options: &AttendOptions,
    ) -> Fp8Typed<T, F> {
        let q: Vec<T> = self.q.iter().map(|&v| T::from_f32(v)).collect();
        let (k_cache, v_cache) = self.quantized::<F>(scales);
        let kv = self.kv_of(&k_cache, &v_cache).with_scales(scales).unwrap();
        let (oracle, cond) =
            paged_gqa::cpu::attention_with_conditioning(&q, &kv, options, keep).unwrap();
        Fp8Typed {
            q,
            k_cache,
            v_cache,
            scales: scales.clone(),
            oracle,
            cond,
        }
    }
}

/// The CPU cache the property tests drive: `num_blocks` pages of u32 (values that name the token
/// they were written for; f32 the nominal compute dtype), pages given back behind `window` if
/// any.
pub fn property_cache(
    shape: GqaShape,
    num_layers: usize,
    block_size: usize,
    num_blocks: usize,
    window: Option<usize>,
) -> PagedCache<CpuStorage<u32>> {
    let mut config = CacheConfig::new(shape, num_layers, block_size, DType::F32).unwrap();
    if let Some(window) = window {
        config = config.with_reclaim_window(window);
    }
    PagedCache::new(CpuStorage::new(config, num_blocks).unwrap()).unwrap()
}

/// Forks a random live sequence of `model`, if any, in `cache` and in `model` (the child's
/// entry a copy of its parent's).
pub fn fork_random<M: Clone>(
    cache: &mut PagedCache<CpuStorage<u32>>,
    model: &mut BTreeMap<SeqId, M>,
    rng: &mut StdRng,
) {
    if let Some(parent) = model.keys().copied().choose(rng) {
        let child = cache.fork(parent).unwrap();
        let entry = model[&parent].clone();
        model.insert(child, entry);
    }
}

/// Frees a random live sequence of `model`, if any, in `cache` and in `model`.
pub fn free_random<M>(
    cache: &mut PagedCache<CpuStorage<u32>>,
    model: &mut BTreeMap<SeqId, M>,
    rng: &mut StdRng,
) {
    if let Some(seq) = model.keys().copied().choose(rng) {
        cache.free(seq).unwrap();
        model.remove(&seq);
    }
}

/// The bookkeeping's invariants hold and its live sequences are exactly the model's.
pub fn audit_live<M>(manager: &BlockManager, model: &BTreeMap<SeqId, M>) {
    manager.audit().unwrap();
    assert_eq!(
        manager.sequences().collect::<Vec<_>>(),
        model.keys().copied().collect::<Vec<_>>()
    );
}

/// Query rows (tokens) to check a long case at: each sequence's first and last 16 rows, and
/// every `stride`-th row between (every row when `stride` is 1). `[num_tokens]`.
pub fn sample_tokens(lens: &SeqLens, stride: usize) -> Vec<bool> {
    let mut keep = vec![false; lens.num_tokens()];
    for seq in 0..lens.batch() {
        let rows = lens.query_rows(seq);
        let n = rows.len();
        for (j, token) in rows.enumerate() {
            keep[token] = j < 16 || j + 16 >= n || j % stride.max(1) == 0;
        }
    }
    keep
}

/// The rows of `values` (`[num_tokens, row_len]`) where `keep` is true, concatenated.
pub fn kept_rows<V: Copy>(values: &[V], keep: &[bool], row_len: usize) -> Vec<V> {
    assert_eq!(values.len(), keep.len() * row_len);
    values
        .chunks(row_len)
        .zip(keep)
        .filter(|(_, &k)| k)
        .flat_map(|(row, _)| row.iter().copied())
        .collect()
}

/// `n` NaNs of a 2-byte element type (all-ones bits are NaN in f16 and bf16): outputs are
/// filled with them before a kernel runs, so an element it does not write fails the check.
pub fn poison<T: paged_gqa::Element>(n: usize) -> Vec<T> {
    vec![bytemuck::pod_read_unaligned(&[0xffu8; 2]); n]
}

/// The largest `|a[i] - b[i]|` (`a` and `b` of one length).
pub fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// `||got - want|| / ||want||`.
pub fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    (diff / norm).sqrt()
}

/// Attention shapes of real models: (name, n_heads, n_kv_heads, head_dim).
pub const MODELS: [(&str, usize, usize, usize); 9] = [
    ("Llama-3-8B", 32, 8, 128),
    ("Llama-3-70B", 64, 8, 128),
    ("Qwen2-7B", 28, 4, 128),
    ("Qwen2.5-0.5B", 14, 2, 64),
    ("Gemma-2-9B", 16, 8, 256),
    ("Falcon-7B", 71, 1, 64),
    ("Phi-3-medium", 40, 10, 128),
    ("Phi-3-mini-like d96", 32, 8, 96),
    ("MHA", 16, 16, 128),
];
