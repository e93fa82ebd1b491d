//! Criterion benches of one engine step's cache work for 64 decoding sequences of Llama-3-8B
//! heads: plan (reserve slots, build tables) plus the write of 4 layers on the CPU backend,
//! and on the GPU (when there is one) the per-layer write kernel, timed with CUDA events.
//!
//! And the bookkeeping prefix caching adds, caching on and off: a decode step of 256 sequences
//! (append each sampled token, plan, commit), and admitting a request whose first 2,000 tokens
//! are cached (add it with its prompt, plan the rest).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use cudarc::driver::sys::CUevent_flags;
use half::bf16;
use paged_gqa::cache::{BlockManager, CacheConfig, PageStorage, PagedCache, SeqId};
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

/// Sequences of the decode step that prefix caching must not slow down.
const DECODE_BATCH: usize = 256;
/// Their prompts' tokens.
const PROMPT: usize = 1000;

/// A prompt of `len` token ids, distinct for each `id` from its first token on.
fn prompt(id: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|t| id.wrapping_mul(100_003) ^ t)
        .collect()
}

/// Frees every sequence and prefills DECODE_BATCH new ones with prompts never seen before
/// (committed, as after their K/V were written); returns the decode batch.
fn refill_manager(cache: &mut BlockManager, next_prompt: &mut u32) -> Vec<(SeqId, usize)> {
    let old: Vec<SeqId> = cache.sequences().collect();
    for seq in old {
        cache.free(seq).unwrap();
    }
    let seqs: Vec<SeqId> = (0..DECODE_BATCH)
        .map(|_| {
            *next_prompt += 1;
            let admitted = cache
                .add_sequence_with_prompt(&prompt(*next_prompt, PROMPT), b"")
                .unwrap();
            assert_eq!(admitted.computed, 0);
            admitted.seq
        })
        .collect();
    let prefill: Vec<(SeqId, usize)> = seqs.iter().map(|&s| (s, PROMPT)).collect();
    let plan = cache.plan(&prefill).unwrap();
    cache.commit(&plan).unwrap();
    seqs.into_iter().map(|s| (s, 1)).collect()
}

/// A decode step's bookkeeping for 256 sequences: each sampled token appended (a no-op with
/// caching off, where no sequence names blocks), the plan, the commit (which names nothing:
/// blocks filled by decoded tokens are hashed and named when their sequence is freed, here in
/// the untimed refill). With caching on, the blocks of the sequences freed by each refill stay
/// cached, so the steps after it evict them: the steady state of a full cache.
fn prefix_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("prefix_cache_decode_b256");
    let mut caches = [false, true].map(DecodeBench::new);
    for bench in &mut caches {
        let name = if bench.caching {
            "caching_on"
        } else {
            "caching_off"
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| (0..iters).map(|_| bench.step()[0]).sum())
        });
    }
    group.finish();
    interleaved_ratio(&mut caches);
}

/// The decode-step bench of one cache.
struct DecodeBench {
    caching: bool,
    cache: BlockManager,
    next_prompt: u32,
    step: Vec<(SeqId, usize)>,
    token: u32,
}

impl DecodeBench {
    fn new(caching: bool) -> Self {
        let blocks = DECODE_BATCH * (PROMPT / 16 + 20);
        let mut cache = BlockManager::new(blocks, 16)
            .unwrap()
            .with_prefix_caching(caching);
        let mut next_prompt = 0;
        let step = refill_manager(&mut cache, &mut next_prompt);
        Self {
            caching,
            cache,
            next_prompt,
            step,
            token: 0,
        }
    }

    /// One timed decode step (after an untimed refill when the cache is full): the time of
    /// the whole step's bookkeeping, and of its plan alone.
    fn step(&mut self) -> [Duration; 2] {
        if self.cache.num_free_blocks() < DECODE_BATCH {
            self.step = refill_manager(&mut self.cache, &mut self.next_prompt);
        }
        self.token += 1;
        let start = Instant::now();
        for &(seq, _) in &self.step {
            self.cache.append_tokens(seq, &[self.token]).unwrap();
        }
        let planning = Instant::now();
        let plan = self.cache.plan(&self.step).unwrap();
        let planned = planning.elapsed();
        self.cache.commit(&plan).unwrap();
        [start.elapsed(), planned]
    }
}

/// On a shared, loaded machine the two benches above run seconds apart under different loads:
/// this alternates rounds of 100 steps of each (the order swapped every round) and prints the
/// median of the rounds' on/off ratios, of the whole step and of its plan alone.
fn interleaved_ratio(caches: &mut [DecodeBench; 2]) {
    let mut ratios: [Vec<f64>; 2] = Default::default();
    for round in 0..30 {
        let mut mean = [[0.0; 2]; 2];
        for k in [round % 2, 1 - round % 2] {
            for _ in 0..100 {
                let [step, plan] = caches[k].step();
                mean[k][0] += step.as_secs_f64() / 100.0;
                mean[k][1] += plan.as_secs_f64() / 100.0;
            }
        }
        for (what, ratio) in ratios.iter_mut().enumerate() {
            ratio.push(mean[1][what] / mean[0][what]);
        }
    }
    for (what, mut ratio) in ["whole step", "plan alone"].into_iter().zip(ratios) {
        ratio.sort_by(f64::total_cmp);
        eprintln!(
            "prefix_cache_decode_b256 interleaved, {what}: caching on / off = {:.3} (median of 30 \
             rounds of 100 steps; quartiles {:.3}..{:.3})",
            ratio[15], ratio[7], ratio[22]
        );
    }
}

/// Cached prefix of the request admitted, and its own tokens.
const CACHED: usize = 2000;
const OWN: usize = 48;

/// Admitting one request whose first 2,000 tokens another request computed (caching on: 125
/// blocks found by 125 chained hashes, 48 tokens planned; off: 2,048 tokens planned), then
/// freeing it (not timed).
fn prefix_admit(c: &mut Criterion) {
    let mut group = c.benchmark_group("prefix_cache_admit_2000_cached");
    for caching in [false, true] {
        let mut cache = BlockManager::new(1024, 16)
            .unwrap()
            .with_prefix_caching(caching);
        let system = prompt(7, CACHED);
        let first = cache.add_sequence_with_prompt(&system, b"").unwrap();
        let plan = cache.plan(&[(first.seq, CACHED)]).unwrap();
        cache.commit(&plan).unwrap(); // its K/V written: 125 blocks cached, held by `first`
        let mut request = system.clone();
        request.extend(prompt(8, OWN));
        let name = if caching { "caching_on" } else { "caching_off" };
        group.bench_function(name, |bench| {
            bench.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let admitted = cache.add_sequence_with_prompt(&request, b"").unwrap();
                    let plan = cache
                        .plan(&[(admitted.seq, request.len() - admitted.computed)])
                        .unwrap();
                    timed += start.elapsed();
                    assert_eq!(admitted.computed, if caching { CACHED } else { 0 });
                    assert!(plan.num_new_tokens() > 0);
                    cache.free(admitted.seq).unwrap();
                }
                timed
            })
        });
    }
    group.finish();
}

criterion_group!(benches, cpu, gpu, prefix_decode, prefix_admit);
criterion_main!(benches);
