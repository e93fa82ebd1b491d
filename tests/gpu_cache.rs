//! The cache kernels (write_kv, copy_blocks) against the CPU backend: the same operations on a
//! CUDA cache and a CPU cache must leave bit-identical pages. Skips (printing why) without a
//! GPU; fails instead with PAGED_GQA_REQUIRE_GPU=1.

mod common;

use std::sync::Arc;

use half::{bf16, f16};
use paged_gqa::cache::{CacheConfig, PagedCache, SeqId, StepPlan};
use paged_gqa::cpu::CpuStorage;
use paged_gqa::cuda::{CudaContext, CudaStorage};
use paged_gqa::{Element, Error, GqaShape};
use rand::rngs::StdRng;

const LAYERS: usize = 3;
const BLOCKS: usize = 32;

struct Pair<T: Element> {
    gpu: PagedCache<CudaStorage<T>>,
    cpu: PagedCache<CpuStorage<T>>,
    rng: StdRng,
}

impl<T: Element + PartialEq + std::fmt::Debug> Pair<T> {
    fn new(ctx: &Arc<CudaContext>, test: &str, block_size: usize) -> Self {
        let config = CacheConfig::new(
            GqaShape::new(32, 8, 128).unwrap(),
            LAYERS,
            block_size,
            T::DTYPE,
        )
        .unwrap();
        let stream = ctx.new_stream().unwrap();
        Self {
            gpu: PagedCache::new(CudaStorage::new(stream, config, BLOCKS).unwrap()).unwrap(),
            cpu: PagedCache::new(CpuStorage::new(config, BLOCKS).unwrap()).unwrap(),
            rng: common::rng(test),
        }
    }

    fn add(&mut self) -> SeqId {
        let id = self.gpu.add_sequence();
        assert_eq!(self.cpu.add_sequence(), id);
        id
    }

    fn fork(&mut self, parent: SeqId) -> SeqId {
        let id = self.gpu.fork(parent).unwrap();
        assert_eq!(self.cpu.fork(parent).unwrap(), id);
        id
    }

    fn free(&mut self, seq: SeqId) {
        self.gpu.free(seq).unwrap();
        self.cpu.free(seq).unwrap();
    }

    /// Plans `batch` on both, writes the same random rows to every layer, compares the pages.
    fn step(&mut self, batch: &[(SeqId, usize)]) {
        let gpu_plan = self.gpu.plan(batch).unwrap();
        let cpu_plan = self.cpu.plan(batch).unwrap();
        let (g, c): (&StepPlan, &StepPlan) = (gpu_plan.as_ref(), &cpu_plan);
        assert_eq!(
            (g.slot_mapping(), g.block_tables(), g.block_copies()),
            (c.slot_mapping(), c.block_tables(), c.block_copies())
        );
        let stream = self.gpu.storage().stream().clone();
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
            let (k_dev, v_dev) = (
                stream.clone_htod(&k).unwrap(),
                stream.clone_htod(&v).unwrap(),
            );
            self.gpu.write(layer, &gpu_plan, &k_dev, &v_dev).unwrap();
            self.cpu.write(layer, &cpu_plan, &k, &v).unwrap();
        }
        self.compare(batch);
    }

    fn compare(&self, batch: &[(SeqId, usize)]) {
        let stream = self.gpu.storage().stream();
        let gpu_pages: Vec<T> = stream.clone_dtoh(self.gpu.storage().pages()).unwrap();
        let cpu_pages: Vec<T> = (0..LAYERS)
            .flat_map(|l| {
                let (k, v) = self.cpu.storage().layer(l);
                k.iter().chain(v).copied().collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(gpu_pages.len(), cpu_pages.len());
        let differ = gpu_pages
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

fn scenario<T: Element + PartialEq + std::fmt::Debug>(test: &str, block_size: usize) {
    let Some(ctx) = common::gpu_or_skip(test) else {
        return;
    };
    let mut pair = Pair::<T>::new(&ctx, test, block_size);
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
    scenario::<bf16>("gpu_cache_matches_cpu_bf16_pages_of_16", 16);
}

#[test]
fn gpu_cache_matches_cpu_f16_pages_of_8() {
    scenario::<f16>("gpu_cache_matches_cpu_f16_pages_of_8", 8);
}

#[test]
fn gpu_cache_write_rejects_bad_rows_and_stale_plans() {
    let test = "gpu_cache_write_rejects_bad_rows_and_stale_plans";
    let Some(ctx) = common::gpu_or_skip(test) else {
        return;
    };
    let config = CacheConfig::new(
        GqaShape::new(8, 2, 64).unwrap(),
        2,
        16,
        paged_gqa::DType::BF16,
    )
    .unwrap();
    let stream = ctx.new_stream().unwrap();
    let mut cache =
        PagedCache::new(CudaStorage::<bf16>::new(stream.clone(), config, 8).unwrap()).unwrap();
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
    assert!(matches!(
        cache.write(2, &plan, &exact, &exact),
        Err(Error::LayerOutOfRange { .. })
    ));
    cache.write(1, &plan, &exact, &exact).unwrap();
    cache.fork(a).unwrap();
    assert!(matches!(
        cache.write(0, &plan, &exact, &exact),
        Err(Error::StalePlan { .. })
    ));
    // A storage whose element type differs from the configuration is refused.
    assert!(matches!(
        CudaStorage::<f16>::new(stream, config, 8),
        Err(Error::DTypeMismatch { .. })
    ));
}
