//! The cache kernels (write_kv, copy_blocks) against the CPU backend: the same operations on a
//! CUDA cache and a CPU cache must leave bit-identical pages. Skips (printing why) without a
//! GPU; fails instead with PAGED_GQA_REQUIRE_GPU=1. Every `gpu_xxx` test has a twin `sim_xxx`
//! running the same body on the kernel emulator.

use crate::common;
use crate::setup::{same_bits, CachePair};

use half::{bf16, f16};
use paged_gqa::cache::{CacheConfig, PagedCache, SeqId};
use paged_gqa::sim::SimDevice;
use paged_gqa::{Element, Error, GqaShape};
use rand::rngs::StdRng;

use common::{twins, Device};

const LAYERS: usize = 3;
const BLOCKS: usize = 32;

/// The caches, and the random rows both are fed.
struct Pair<D: Device, T: Element> {
    caches: CachePair<D, T>,
    rng: StdRng,
}

impl<D: Device, T: Element> Pair<D, T> {
    fn new(dev: &D, test: &str, block_size: usize) -> Self {
        let config = CacheConfig::new(
            GqaShape::new(32, 8, 128).unwrap(),
            LAYERS,
            block_size,
            T::DTYPE,
        )
        .unwrap();
        let mut rng = common::rng(test);
        let caches = CachePair::new(dev, config, BLOCKS, |len| random(&mut rng, len));
        Self { caches, rng }
    }

    /// Plans `batch` on both, writes the same random rows to every layer, compares the pages.
    fn step(&mut self, batch: &[(SeqId, usize)]) {
        let (device_plan, cpu_plan) = self.caches.plan(batch);
        let n = cpu_plan.num_new_tokens() * self.caches.cpu.config().shape().kv_row_len();
        for layer in 0..LAYERS {
            let (k, v) = (random::<T>(&mut self.rng, n), random::<T>(&mut self.rng, n));
            let (k_dev, v_dev) = (self.caches.dev.upload(&k), self.caches.dev.upload(&v));
            D::write_kv(&mut self.caches.device, layer, &device_plan, &k_dev, &v_dev).unwrap();
            self.caches.cpu.write(layer, &cpu_plan, &k, &v).unwrap();
        }
        let differ = self.caches.differing_pages(same_bits);
        assert_eq!(
            differ, 0,
            "after step {batch:?}: {differ} page elements differ from the CPU cache"
        );
    }
}

/// `n` random values in [-1, 1) as `T`.
fn random<T: Element>(rng: &mut StdRng, n: usize) -> Vec<T> {
    common::uniform(rng, n)
        .into_iter()
        .map(T::from_f32)
        .collect()
}

fn scenario<D: Device, T: Element, const BLOCK_SIZE: usize>(dev: &D, test: &str) {
    let block_size = BLOCK_SIZE;
    let mut pair = Pair::<D, T>::new(dev, test, block_size);
    let (a, b) = (pair.caches.add(), pair.caches.add());
    pair.step(&[(a, 37), (b, block_size)]); // prefill: partial page, exact page
    for _ in 0..5 {
        pair.step(&[(a, 1), (b, 1)]); // decode
    }
    let c = pair.caches.fork(a);
    pair.step(&[(a, 1), (c, 3)]); // a copies the shared partial page (copy_blocks), c writes in place
    pair.step(&[(c, 2)]);
    pair.caches.free(b);
    let d = pair.caches.add();
    pair.step(&[(d, 3 * block_size + 5), (a, 1)]); // reuses b's pages
}
twins!(
    gpu_cache_matches_cpu_bf16_pages_of_16,
    sim_cache_matches_cpu_bf16_pages_of_16,
    scenario::<_, bf16, 16>
);
twins!(
    gpu_cache_matches_cpu_f16_pages_of_8,
    sim_cache_matches_cpu_f16_pages_of_8,
    scenario::<_, f16, 8>
);

/// The small cache of the refusal tests: 2 layers of 8/2 heads of 64, pages of 16, bf16.
fn small_config() -> CacheConfig {
    CacheConfig::new(
        GqaShape::new(8, 2, 64).unwrap(),
        2,
        16,
        paged_gqa::DType::BF16,
    )
    .unwrap()
}

/// The refusals that need no view into a buffer: short rows, a layer out of range, a stale
/// plan, a storage of the wrong element type.
fn rejects_bad_rows_and_stale_plans<D: Device>(dev: &D) {
    let config = small_config();
    let mut cache = PagedCache::new(dev.storage::<bf16>(config, 8).unwrap()).unwrap();
    let a = cache.add_sequence();
    let plan = cache.plan(&[(a, 2)]).unwrap();
    let exact = dev.upload(&[bf16::ZERO; 256]);
    let short = dev.upload(&[bf16::ZERO; 255]);
    assert!(matches!(
        D::write_kv(&mut cache, 0, &plan, &short, &exact),
        Err(Error::BufferLength { name: "k_new", .. })
    ));
    assert!(matches!(
        D::write_kv(&mut cache, 2, &plan, &exact, &exact),
        Err(Error::LayerOutOfRange { .. })
    ));
    D::write_kv(&mut cache, 1, &plan, &exact, &exact).unwrap();
    cache.fork(a).unwrap();
    assert!(matches!(
        D::write_kv(&mut cache, 0, &plan, &exact, &exact),
        Err(Error::StalePlan { .. })
    ));
    // A storage whose element type differs from the configuration is refused.
    assert!(matches!(
        dev.storage::<f16>(config, 8),
        Err(Error::DTypeMismatch { .. })
    ));
}

#[test]
fn gpu_cache_write_rejects_bad_rows_and_stale_plans() {
    let test = "gpu_cache_write_rejects_bad_rows_and_stale_plans";
    let Some(stream) = common::gpu_stream(test) else {
        return;
    };
    // Views into one buffer: one element short, and one element (2 bytes) in, which is not
    // 16-byte aligned.
    let mut cache = PagedCache::new(stream.storage::<bf16>(small_config(), 8).unwrap()).unwrap();
    let a = cache.add_sequence();
    let plan = cache.plan(&[(a, 2)]).unwrap();
    let rows = stream.alloc_zeros::<bf16>(2 * 128 + 8).unwrap();
    let (exact, shifted) = (rows.slice(..256), rows.slice(1..257));
    assert!(matches!(
        cache.write(0, &plan, &rows.slice(..255), &exact),
        Err(Error::BufferLength { name: "k_new", .. })
    ));
    assert!(matches!(
        cache.write(0, &plan, &shifted, &exact),
        Err(Error::Misaligned { name: "k_new", .. })
    ));
    rejects_bad_rows_and_stale_plans(&stream);
}

#[test]
fn sim_cache_write_rejects_bad_rows_and_stale_plans() {
    // The misaligned case needs a view into a device buffer, which emulator buffers do not
    // have (both backends run the same alignment check, crate::launch::params): GPU only.
    rejects_bad_rows_and_stale_plans(&SimDevice::new());
}
