//! CPU benches of the f64 reference: fused GQA indexing against the naive path that gathers
//! the pages and materialises repeat_kv. (The GPU benches arrive with the decode kernel.)

use criterion::{criterion_group, criterion_main, Criterion};
use paged_gqa::{cpu, GqaShape, PagedLayout, SeqLens};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn decode(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(rand::rng().random());
    let shape = GqaShape::new(32, 8, 128).unwrap(); // Llama-3-8B heads
    let (block_size, context_lens) = (16, [512usize, 300, 77, 1]);
    let lens = SeqLens::decode(&context_lens).unwrap();
    let max_blocks = 512 / block_size;
    let layout = PagedLayout::new(shape, context_lens.len() * max_blocks, block_size).unwrap();
    let tables: Vec<i32> = (0..(context_lens.len() * max_blocks) as i32).collect();
    let mut random = |n| {
        (0..n)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect::<Vec<_>>()
    };
    let (k, v) = (random(layout.cache_len()), random(layout.cache_len()));
    let q = random(lens.num_tokens() * shape.q_row_len());
    let kv = cpu::PagedKv::new(layout, &lens, &tables, max_blocks, &k, &v).unwrap();

    let mut group = c.benchmark_group("cpu_reference_decode_llama3_8b");
    group.sample_size(10);
    group.bench_function("fused", |b| {
        b.iter(|| cpu::attention(&q, &kv, None).unwrap())
    });
    group.bench_function("naive_repeat_kv", |b| {
        b.iter(|| cpu::attention_naive(&q, &kv, None).unwrap())
    });
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
