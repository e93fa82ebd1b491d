//! The cache kernels (write_kv, copy_blocks) against the CPU backend: the same operations on a
//! CUDA cache and a CPU cache must leave bit-identical pages. Skips (printing why) without a
//! GPU; fails instead with PAGED_GQA_REQUIRE_GPU=1. Every `gpu_xxx` test has a twin `sim_xxx`
//! running the same body on the kernel emulator.

use crate::common;

use half::{bf16, f16};
use paged_gqa::cache::{CacheConfig, PagedCache, SeqId, StepPlan};
use paged_gqa::cpu::CpuStorage;
use paged_gqa::sim::SimDevice;
use paged_gqa::{Element, Error, GqaShape};
use rand::rngs::StdRng;

use common::Device;

const LAYERS: usize = 3;
const BLOCKS: usize = 32;

struct Pair<D: Device, T: Element> {
    dev: D,
    device: PagedCache<D::Storage<T>>,
    cpu: PagedCache<CpuStorage<T>>,
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
        // Both caches start with the same random pages, not zeros: a block copy that misses
        // part of a block (an unused slot included) then leaves the two caches different.
        let mut rng = common::rng(test);
        let mut device_storage = dev.storage::<T>(config, BLOCKS).unwrap();
        let mut cpu_storage = CpuStorage::<T>::new(config, BLOCKS).unwrap();
        let pages: Vec<T> = common::uniform(&mut rng, cpu_storage.pages_mut().len())
            .into_iter()
            .map(T::from_f32)
            .collect();
        dev.fill_pages(&mut device_storage, &pages);
        cpu_storage.pages_mut().copy_from_slice(&pages);
        Self {
            dev: dev.clone(),
            device: PagedCache::new(device_storage).unwrap(),
            cpu: PagedCache::new(cpu_storage).unwrap(),
            rng,
        }
    }

    fn add(&mut self) -> SeqId {
        let id = self.device.add_sequence();
        assert_eq!(self.cpu.add_sequence(), id);
        id
    }

    fn fork(&mut self, parent: SeqId) -> SeqId {
        let id = self.device.fork(parent).unwrap();
        assert_eq!(self.cpu.fork(parent).unwrap(), id);
        id
    }

    fn free(&mut self, seq: SeqId) {
        self.device.free(seq).unwrap();
        self.cpu.free(seq).unwrap();
    }

    /// Plans `batch` on both, writes the same random rows to every layer, compares the pages.
    fn step(&mut self, batch: &[(SeqId, usize)]) {
        let device_plan = self.device.plan(batch).unwrap();
        let cpu_plan = self.cpu.plan(batch).unwrap();
        let (g, c): (&StepPlan, &StepPlan) = (device_plan.as_ref(), &cpu_plan);
        assert_eq!(
            (g.slot_mapping(), g.block_tables(), g.block_copies()),
            (c.slot_mapping(), c.block_tables(), c.block_copies())
        );
        let n = c.num_new_tokens() * self.cpu.config().shape().kv_row_len();
        for layer in 0..LAYERS {
            let k: Vec<T> = common::uniform(&mut self.rng, n)
                .into_iter()
                .map(T::from_f32)
                .collect();
            let v: Vec<T> = common::uniform(&mut self.rng, n)
                .into_iter()
                .map(T::from_f32)
                .collect();
            let (k_dev, v_dev) = (self.dev.upload(&k), self.dev.upload(&v));
            D::write_kv(&mut self.device, layer, &device_plan, &k_dev, &v_dev).unwrap();
            self.cpu.write(layer, &cpu_plan, &k, &v).unwrap();
        }
        self.compare(batch);
    }

    fn compare(&self, batch: &[(SeqId, usize)]) {
        let device_pages: Vec<T> = self.dev.download(D::pages(self.device.storage()));
        let cpu_pages: Vec<T> = (0..LAYERS)
            .flat_map(|l| {
                let (k, v) = self.cpu.storage().layer(l);
                k.iter().chain(v).copied().collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(device_pages.len(), cpu_pages.len());
        let differ = device_pages
            .iter()
            .zip(&cpu_pages)
            .filter(|(g, c)| bytemuck::bytes_of(*g) != bytemuck::bytes_of(*c))
            .count();
        assert_eq!(
            differ, 0,
            "after step {batch:?}: {differ} page elements differ from the CPU cache"
        );
    }
}

fn scenario<D: Device, T: Element>(dev: &D, test: &str, block_size: usize) {
    let mut pair = Pair::<D, T>::new(dev, test, block_size);
    let (a, b) = (pair.add(), pair.add());
    pair.step(&[(a, 37), (b, block_size)]); // prefill: partial page, exact page
    for _ in 0..5 {
        pair.step(&[(a, 1), (b, 1)]); // decode
    }
    let c = pair.fork(a);
    pair.step(&[(a, 1), (c, 3)]); // a copies the shared partial page (copy_blocks), c writes in place
    pair.step(&[(c, 2)]);
    pair.free(b);
    let d = pair.add();
    pair.step(&[(d, 3 * block_size + 5), (a, 1)]); // reuses b's pages
}

#[test]
fn gpu_cache_matches_cpu_bf16_pages_of_16() {
    let test = "gpu_cache_matches_cpu_bf16_pages_of_16";
    if let Some(gpu) = common::gpu_stream(test) {
        scenario::<_, bf16>(&gpu, test, 16);
    }
}

#[test]
fn sim_cache_matches_cpu_bf16_pages_of_16() {
    let test = "sim_cache_matches_cpu_bf16_pages_of_16";
    scenario::<_, bf16>(&SimDevice::new(), test, 16);
}

#[test]
fn gpu_cache_matches_cpu_f16_pages_of_8() {
    let test = "gpu_cache_matches_cpu_f16_pages_of_8";
    if let Some(gpu) = common::gpu_stream(test) {
        scenario::<_, f16>(&gpu, test, 8);
    }
}

#[test]
fn sim_cache_matches_cpu_f16_pages_of_8() {
    let test = "sim_cache_matches_cpu_f16_pages_of_8";
    scenario::<_, f16>(&SimDevice::new(), test, 8);
}

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
