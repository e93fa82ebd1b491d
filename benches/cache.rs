//! Criterion benches of one engine step's cache work for 64 decoding sequences of Llama-3-8B
//! heads: plan (reserve slots, build tables) plus the write of 4 layers on the CPU backend,
//! and on the GPU (when there is one) the per-layer write kernel, timed with CUDA events.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use cudarc::driver::sys::CUevent_flags;
use half::bf16;
use paged_gqa::cache::{CacheConfig, PageStorage, PagedCache, SeqId};
use paged_gqa::cpu::CpuStorage;
use paged_gqa::cuda::CudaStorage;
use paged_gqa::{DType, GqaShape};

const BATCH: usize = 64;
const LAYERS: usize = 4;
/// Blocks per sequence: room for 1000 prefilled tokens and about 280 decode steps.
const BLOCKS_PER_SEQ: usize = 80;

fn config() -> CacheConfig {
    CacheConfig::new(GqaShape::new(32, 8, 128).unwrap(), LAYERS, 16, DType::BF16).unwrap()
}

/// Frees every sequence and prefills BATCH new ones with 1000 tokens; returns the decode batch.
fn refill<S: PageStorage>(cache: &mut PagedCache<S>) -> Vec<(SeqId, usize)> {
    let old: Vec<SeqId> = cache.manager().sequences().collect();
    for seq in old {
        cache.free(seq).unwrap();
    }
    let seqs: Vec<SeqId> = (0..BATCH).map(|_| cache.add_sequence()).collect();
    let prefill: Vec<(SeqId, usize)> = seqs.iter().map(|&s| (s, 1000)).collect();
    cache.plan(&prefill).unwrap();
    seqs.into_iter().map(|s| (s, 1)).collect()
}

fn cpu(c: &mut Criterion) {
    let mut cache =
        PagedCache::new(CpuStorage::<bf16>::new(config(), BATCH * BLOCKS_PER_SEQ).unwrap())
            .unwrap();
    let mut step = refill(&mut cache);
    let rows = vec![bf16::from_f32(0.5); BATCH * config().shape().kv_row_len()];
    let mut group = c.benchmark_group("cache_cpu_llama3_8b_b64");
    group.bench_function("plan_and_write_4_layers", |bench| {
        bench.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                if cache.num_free_blocks() < BATCH {
                    step = refill(&mut cache); // not timed
                }
                let start = Instant::now();
                let plan = cache.plan(&step).unwrap();
                for layer in 0..LAYERS {
                    cache.write(layer, &plan, &rows, &rows).unwrap();
                }
                timed += start.elapsed();
            }
            timed
        })
    });
    group.finish();
}

fn gpu(c: &mut Criterion) {
    let ctx = match paged_gqa::cuda::context(0) {
        Ok(ctx) => ctx,
        Err(why) => {
            eprintln!("SKIPPED cache GPU benches: {why}");
            return;
        }
    };
    let stream = ctx.new_stream().unwrap();
    let storage =
        CudaStorage::<bf16>::new(stream.clone(), config(), BATCH * BLOCKS_PER_SEQ).unwrap();
    let mut cache = PagedCache::new(storage).unwrap();
    let step = refill(&mut cache);
    let rows = stream
        .clone_htod(&vec![
            bf16::from_f32(0.5);
            BATCH * config().shape().kv_row_len()
        ])
        .unwrap();
    let plan = cache.plan(&step).unwrap();
    let mut group = c.benchmark_group("cache_gpu_llama3_8b_b64");
    group.bench_function("write_one_layer", |bench| {
        bench.iter_custom(|iters| {
            let start = ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .unwrap();
            let end = ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .unwrap();
            start.record(&stream).unwrap();
            for _ in 0..iters {
                cache.write(0, &plan, &rows, &rows).unwrap();
            }
            end.record(&stream).unwrap();
            end.synchronize().unwrap();
            Duration::from_secs_f64(start.elapsed_ms(&end).unwrap() as f64 * 1e-3)
        })
    });
    group.finish();
}

criterion_group!(benches, cpu, gpu);
criterion_main!(benches);
