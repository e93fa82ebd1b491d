//! Criterion benches of decode: the fused kernel against the naive repeat_kv path.
//!
//! - GPU (when there is one): time per step from CUDA events (`iter_custom`), inputs rotated
//!   among sets larger than L2. Llama-3-8B heads, batch 16, context 4096, bf16.
//! - CPU: the f32 fallback against the CPU naive path, batch 2, context 2048.
//!
//! Without a GPU the GPU group prints that it skipped.

use paged_gqa::AttendOptions;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaStream};
use half::bf16;
use paged_gqa::cpu::{self, PagedKv};
use paged_gqa::cuda::{AttendBatch, NaiveAttention};
use paged_gqa::{DType, GqaShape, PagedLayout, SeqLens};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const SHAPE: (usize, usize, usize) = (32, 8, 128); // Llama-3-8B
const PAGE: usize = 16;

struct Batch {
    layout: PagedLayout,
    lens: SeqLens,
    tables: Vec<i32>,
    max_blocks: usize,
}

fn batch(rng: &mut StdRng, batch: usize, context: usize) -> Batch {
    let shape = GqaShape::new(SHAPE.0, SHAPE.1, SHAPE.2).unwrap();
    let max_blocks = context.div_ceil(PAGE);
    let layout = PagedLayout::new(shape, batch * max_blocks, PAGE).unwrap();
    let mut tables: Vec<i32> = (0..(batch * max_blocks) as i32).collect();
    tables.shuffle(rng);
    Batch {
        layout,
        lens: SeqLens::decode(&vec![context; batch]).unwrap(),
        tables,
        max_blocks,
    }
}

fn random(rng: &mut StdRng, n: usize) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
        .collect()
}

/// Time for `iters` calls of `f(i)`, from CUDA events.
fn gpu_time(
    ctx: &Arc<CudaContext>,
    stream: &CudaStream,
    iters: u64,
    mut f: impl FnMut(usize),
) -> Duration {
    let start = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .unwrap();
    let end = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .unwrap();
    start.record(stream).unwrap();
    for i in 0..iters as usize {
        f(i);
    }
    end.record(stream).unwrap();
    end.synchronize().unwrap();
    Duration::from_secs_f64(start.elapsed_ms(&end).unwrap() as f64 * 1e-3)
}

fn gpu(c: &mut Criterion) {
    let ctx = match paged_gqa::cuda::context(0) {
        Ok(ctx) => ctx,
        Err(why) => {
            eprintln!("SKIPPED decode GPU benches: {why}");
            return;
        }
    };
    let mut rng = StdRng::seed_from_u64(rand::rng().random());
    let stream = ctx.new_stream().unwrap();
    let b = batch(&mut rng, 16, 4096);
    // Two input sets of 268 MB each (K and V of the batch): well past any L2.
    let sets: Vec<_> = (0..2)
        .map(|_| {
            let k = stream
                .clone_htod(&random(&mut rng, b.layout.cache_len()))
                .unwrap();
            let v = stream
                .clone_htod(&random(&mut rng, b.layout.cache_len()))
                .unwrap();
            let q = stream
                .clone_htod(&random(&mut rng, 16 * b.layout.shape().q_row_len()))
                .unwrap();
            (k, v, q)
        })
        .collect();
    let mut out = stream
        .alloc_zeros::<bf16>(16 * b.layout.shape().q_row_len())
        .unwrap();
    let mut lse = stream.alloc_zeros::<f32>(16 * SHAPE.0).unwrap();
    let fused = AttendBatch::new(
        &stream,
        b.layout,
        DType::BF16,
        &b.lens,
        &b.tables,
        b.max_blocks,
    )
    .unwrap();
    let mut naive =
        NaiveAttention::<bf16>::new(&stream, b.layout, &b.lens, &b.tables, b.max_blocks).unwrap();

    let mut group = c.benchmark_group("decode_gpu_llama3_8b_b16_ctx4096_bf16");
    group.bench_function("fused", |bench| {
        bench.iter_custom(|iters| {
            gpu_time(&ctx, &stream, iters, |i| {
                let (k, v, q) = &sets[i % 2];
                fused
                    .run(
                        &stream,
                        k,
                        v,
                        q,
                        &mut out,
                        &mut lse,
                        &AttendOptions::default(),
                    )
                    .unwrap();
            })
        })
    });
    group.bench_function("naive_repeat_kv", |bench| {
        bench.iter_custom(|iters| {
            gpu_time(&ctx, &stream, iters, |i| {
                let (k, v, q) = &sets[i % 2];
                naive
                    .run(&stream, k, v, q, &mut out, &AttendOptions::default())
                    .unwrap();
            })
        })
    });
    group.finish();
}

fn cpu(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(rand::rng().random());
    let b = batch(&mut rng, 2, 2048);
    let (k, v) = (
        random(&mut rng, b.layout.cache_len()),
        random(&mut rng, b.layout.cache_len()),
    );
    let q = random(&mut rng, 2 * b.layout.shape().q_row_len());
    let kv = PagedKv::new(b.layout, &b.lens, &b.tables, b.max_blocks, &k, &v).unwrap();
    let (mut out, mut lse) = (vec![0.0f32; q.len()], vec![0.0f32; 2 * SHAPE.0]);

    let mut group = c.benchmark_group("decode_cpu_llama3_8b_b2_ctx2048_bf16");
    group.sample_size(10);
    group.bench_function("fused", |bench| {
        bench.iter(|| cpu::attend(&q, &kv, &AttendOptions::default(), &mut out, &mut lse).unwrap())
    });
    group.bench_function("naive_repeat_kv", |bench| {
        bench.iter(|| {
            cpu::attend_naive(&q, &kv, &AttendOptions::default(), &mut out, &mut lse).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, gpu, cpu);
criterion_main!(benches);
