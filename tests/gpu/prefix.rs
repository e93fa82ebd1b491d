//! Attention over a reused prefix equals attention with prefix caching off: an engine serves
//! three requests (two sharing a 40-token system prompt, then the next turn of the first one's
//! chat), each a prefill and three decode steps, once with caching on and once off, and every
//! attention output row both runs computed must be identical. On the CPU backend, and on the
//! kernels (`gpu_xxx` on a CUDA stream, skipping without a GPU; its twin `sim_xxx` on the
//! emulator).
//!
//! The K/V and queries the "model" produces for a token are a function of every token up to it,
//! its position and the layer, as a real model's are: a block reused from another request holds
//! exactly what this request would have computed, and attention over it must not tell.

use crate::common;

use std::collections::BTreeMap;

use common::{twins, Device};
use half::{bf16, f16};
use paged_gqa::cache::{CacheConfig, PageStorage, PagedCache};
use paged_gqa::cpu::CpuStorage;
use paged_gqa::{AttendOptions, Element, GqaShape};

const LAYERS: usize = 2;
const BLOCK_SIZE: usize = 16;
const BLOCKS: usize = 24;
const DECODE_STEPS: u32 = 3;

fn shape() -> GqaShape {
    GqaShape::new(8, 2, 64).unwrap()
}

fn config<T: Element>(caching: bool) -> CacheConfig {
    CacheConfig::new(shape(), LAYERS, BLOCK_SIZE, T::DTYPE)
        .unwrap()
        .with_prefix_caching(caching)
}

/// A 32-bit mix (splitmix64's finaliser).
fn mix(a: u32, b: u32) -> u32 {
    let mut z = ((a as u64) << 32 | b as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32
}

/// A value in [-1, 1) from a digest and a channel.
fn value(digest: u32, channel: u32) -> f32 {
    (mix(digest, channel) >> 8) as f32 / (1u32 << 23) as f32 - 1.0
}

/// The digest of every prefix of `tokens`: what the model's K/V and queries depend on.
fn digests(tokens: &[u32]) -> Vec<u32> {
    let mut last = 0x5eed;
    tokens
        .iter()
        .map(|&t| {
            last = mix(last, t);
            last
        })
        .collect()
}

/// K, V (`[n, n_kv_heads, head_dim]`) and Q (`[n, n_heads, head_dim]`) of the tokens whose
/// prefixes digest to `d`, at `layer`.
fn projections(d: &[u32], layer: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (kv, q) = (shape().kv_row_len() as u32, shape().q_row_len() as u32);
    let rows = |channel: u32, len: u32| -> Vec<f32> {
        d.iter()
            .flat_map(|&x| {
                (0..len).map(move |e| value(x, channel << 24 | (layer as u32) << 16 | e))
            })
            .collect()
    };
    (rows(1, kv), rows(2, kv), rows(3, q))
}

/// The requests' prompts: two share a 40-token system prompt, the third is the first one's chat
/// (prompt, its three sampled tokens) and a new question.
fn prompts() -> Vec<Vec<u32>> {
    let system: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 50).collect();
    let first: Vec<u32> = system.iter().copied().chain(100..107).collect();
    let second: Vec<u32> = system.iter().copied().chain(200..211).collect();
    let next_turn: Vec<u32> = first
        .iter()
        .copied()
        .chain((1..=DECODE_STEPS).map(|step| sampled(0, step)))
        .chain(400..405)
        .collect();
    vec![first, second, next_turn]
}

/// The token request `r` samples at decode step `step` (fixed: the runs must agree).
fn sampled(r: usize, step: u32) -> u32 {
    300 + 10 * r as u32 + step
}

/// What a run computed: prompt tokens found cached per request, and the attention output row
/// of every (request, position, layer) it computed.
#[derive(Default)]
struct Served {
    computed: Vec<usize>,
    out: BTreeMap<(usize, usize, usize), Vec<f64>>,
}

/// One engine step of one sequence: the new tokens' positions and their digests.
struct Step {
    start: usize,
    digests: Vec<u32>,
}

/// Serves the requests one after the other on `cache`: each is added with its prompt, then
/// every step appends its sampled token, plans, and gets from `layer(cache, plan, layer, step)`
/// that layer's output rows (after writing the step's K/V). The first request is freed when
/// done (its blocks are parked), the second stays live (its blocks are held).
fn serve<S: PageStorage>(
    cache: &mut PagedCache<S>,
    mut layer: impl FnMut(&mut PagedCache<S>, &S::Plan, usize, &Step) -> Vec<f64>,
) -> Served {
    let mut served = Served::default();
    let row = shape().q_row_len();
    for (r, prompt) in prompts().iter().enumerate() {
        let admission = cache.add_sequence_with_prompt(prompt, b"").unwrap();
        let (seq, computed) = (admission.seq, admission.computed);
        served.computed.push(computed);
        let mut tokens = prompt.clone();
        let mut start = computed;
        for s in 0..=DECODE_STEPS {
            let appended: Vec<u32> = if s == 0 {
                vec![]
            } else {
                tokens.push(sampled(r, s));
                vec![sampled(r, s)]
            };
            let d = digests(&tokens);
            let step = Step {
                start,
                digests: d[start..].to_vec(),
            };
            cache.append_tokens(seq, &appended).unwrap();
            let plan = cache.plan(&[(seq, step.digests.len())]).unwrap();
            assert_eq!(
                cache.manager().len(seq).unwrap(),
                step.start + step.digests.len()
            );
            for l in 0..LAYERS {
                let out = layer(cache, &plan, l, &step);
                for (i, chunk) in out.chunks(row).enumerate() {
                    served.out.insert((r, start + i, l), chunk.to_vec());
                }
            }
            start = tokens.len();
        }
        if r == 0 {
            cache.free(seq).unwrap();
        }
    }
    served
}

/// Both runs' rows agree wherever both computed them (exactly, but for prompt rows given a
/// `prompt_tolerance`: a relative L2 bound); the cached run computed fewer.
fn compare(on: &Served, off: &Served, what: &str, prompt_tolerance: Option<f64>) {
    assert_eq!(
        on.computed,
        [0, 32, 48],
        "{what}: prompt tokens found cached"
    );
    assert_eq!(off.computed, [0, 0, 0], "{what}: caching off");
    let prompt_lens: Vec<usize> = prompts().iter().map(Vec::len).collect();
    let mut compared = 0;
    for (key, row) in &on.out {
        let want = &off.out[key];
        let &(request, position, _) = key;
        match prompt_tolerance {
            Some(bound) if position < prompt_lens[request] => {
                let err = common::rel_l2(row, want);
                assert!(err <= bound, "{what}: {key:?}: relative L2 {err} > {bound}");
            }
            _ => assert_eq!(row, want, "{what}: (request, position, layer) {key:?}"),
        }
        compared += 1;
    }
    // (47 + 3) + (19 + 3) + (7 + 3) rows, on every layer.
    assert_eq!(compared, 82 * LAYERS, "{what}");
    assert_eq!(off.out.len(), (50 + 54 + 58) * LAYERS, "{what}");
}

fn serve_cpu<T: Element + Into<f32> + Sync>(caching: bool) -> Served {
    let storage = CpuStorage::<T>::new(config::<T>(caching), BLOCKS).unwrap();
    let mut cache = PagedCache::new(storage).unwrap();
    let served = serve(&mut cache, |cache, plan, layer, step| {
        let (k, v, q) = projections(&step.digests, layer);
        let cast = |x: Vec<f32>| x.into_iter().map(T::from_f32).collect::<Vec<T>>();
        cache.write(layer, plan, &cast(k), &cast(v)).unwrap();
        let q = cast(q);
        let mut out = vec![f32::NAN; q.len()];
        let mut lse = vec![f32::NAN; q.len() / shape().head_dim()];
        let options = AttendOptions::default();
        cache
            .attend(layer, plan, &q, &mut out, &mut lse, &options)
            .unwrap();
        out.into_iter().map(f64::from).collect()
    });
    let stats = cache.prefix_stats();
    if caching {
        assert_eq!((stats.prompt_tokens, stats.hit_tokens), (47 + 51 + 55, 80));
    } else {
        assert_eq!((stats.hit_tokens, stats.cached_blocks), (0, 0));
    }
    cache.manager().audit().unwrap();
    served
}

fn serve_device<D: Device, T: Element>(dev: &D, caching: bool) -> Served {
    let storage = dev.storage::<T>(config::<T>(caching), BLOCKS).unwrap();
    let mut cache = PagedCache::new(storage).unwrap();
    let served = serve(&mut cache, |cache, plan, layer, step| {
        let (k, v, q) = projections(&step.digests, layer);
        let up = |x: Vec<f32>| dev.upload(&x.into_iter().map(T::from_f32).collect::<Vec<T>>());
        let (k, v, q) = (up(k), up(v), up(q));
        D::write_kv(cache, layer, plan, &k, &v).unwrap();
        let rows = step.digests.len() * shape().n_heads();
        let mut out = dev.alloc_poisoned::<T>(rows * shape().head_dim());
        let mut lse = dev.alloc_poisoned::<f32>(rows);
        let options = AttendOptions::default();
        D::attend_cache(cache, layer, plan, &q, &mut out, &mut lse, &options).unwrap();
        dev.download_f64(&out)
    });
    assert_eq!(
        cache.prefix_stats().hit_tokens,
        if caching { 80 } else { 0 }
    );
    served
}

#[test]
fn cpu_attention_over_a_reused_prefix_equals_attention_without_caching_f32() {
    compare(
        &serve_cpu::<f32>(true),
        &serve_cpu::<f32>(false),
        "cpu f32",
        None,
    );
}

#[test]
fn cpu_attention_over_a_reused_prefix_equals_attention_without_caching_bf16() {
    compare(
        &serve_cpu::<bf16>(true),
        &serve_cpu::<bf16>(false),
        "cpu bf16",
        None,
    );
}

/// On the kernels, a prompt's rows may go to another kernel when fewer of them are computed
/// (7 rows of 4 heads go to the CUDA cores, 55 to the tensor cores), which rounds differently:
/// those agree within the kernels' tolerance; decode rows run the same kernel over the same
/// keys, and agree exactly.
fn kernels<D: Device, T: Element>(dev: &D, test: &str) {
    compare(
        &serve_device::<D, T>(dev, true),
        &serve_device::<D, T>(dev, false),
        test,
        // Per token row, relative L2: each run's row is within about u_o (its output rounding)
        // plus u_o (the tensor-core kernel's weights rounded to T, random in sign) of the truth,
        // so the two within 4 u_o of each other.
        Some(4.0 * common::check::model::<D, T>(paged_gqa::plan::KernelChoice::Auto).out_unit),
    );
}
twins!(
    gpu_attention_over_a_reused_prefix_equals_attention_without_caching_bf16,
    sim_attention_over_a_reused_prefix_equals_attention_without_caching_bf16,
    kernels::<_, bf16>
);
twins!(
    gpu_attention_over_a_reused_prefix_equals_attention_without_caching_f16,
    sim_attention_over_a_reused_prefix_equals_attention_without_caching_f16,
    kernels::<_, f16>
);
