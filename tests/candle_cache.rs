//! `PagedCache<CandleStorage>` on CPU tensors: an engine's steps (prompts, chunks, decode,
//! fork with copy-on-write, free) through `plan` / `write` / `attend`, each layer's output
//! checked against plain candle attention over a contiguous copy of each sequence's history.

mod candle_common;
mod common;

use std::collections::HashMap;

use candle_common::{
    check, cpu_model, reference_attention, small_cache, small_config, Reference, DTYPES,
};
use candle_core::{DType, Device, IndexOp, Tensor};
use paged_gqa::cache::{CacheConfig, PageStorage, PagedCache, SeqId};
use paged_gqa::candle::{AttendOptions, CandleStorage};
use paged_gqa::GqaShape;
use rand::rngs::StdRng;

const LAYERS: usize = 2;

/// What each sequence's attention must see: its K and V rows so far, per layer.
type History = HashMap<SeqId, Vec<(Tensor, Tensor)>>;

fn random(rng: &mut StdRng, rows: usize, heads: usize, d: usize, dtype: DType) -> Tensor {
    let values = candle_common::uniform(rng, rows * heads * d);
    Tensor::from_vec(values, (rows, heads, d), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// One step through the cache and through the reference; panics on a difference.
fn step(
    rng: &mut StdRng,
    cache: &mut PagedCache<CandleStorage>,
    history: &mut History,
    batch: &[(SeqId, usize)],
    what: &str,
) {
    let config = *cache.config();
    let (shape, dtype) = (config.shape(), candle_dtype(config.dtype()));
    let (n_heads, n_kv, d) = (shape.n_heads(), shape.n_kv_heads(), shape.head_dim());
    let plan = cache.plan(batch).unwrap();
    assert_eq!(
        plan.metadata()
            .slot_mapping(cache.storage().num_blocks(), config.block_size())
            .unwrap(),
        plan.as_ref().slot_mapping(),
        "{what}: the metadata's derived slots are the plan's"
    );
    let tokens = plan.as_ref().num_new_tokens();
    for layer in 0..LAYERS {
        let (k, v, q) = (
            random(rng, tokens, n_kv, d, dtype),
            random(rng, tokens, n_kv, d, dtype),
            random(rng, tokens, n_heads, d, dtype),
        );
        cache.write(layer, &plan, &k, &v).unwrap();
        let (out, lse) = cache
            .attend(layer, &plan, &q, &AttendOptions::default())
            .unwrap();
        let (mut parts, mut start) = (Vec::new(), 0);
        for &(seq, new) in batch {
            let rows = start..start + new;
            start = rows.end;
            let entry = &mut history.get_mut(&seq).unwrap()[layer];
            *entry = (
                Tensor::cat(&[&entry.0, &k.i(rows.clone()).unwrap()], 0).unwrap(),
                Tensor::cat(&[&entry.1, &v.i(rows.clone()).unwrap()], 0).unwrap(),
            );
            if new > 0 {
                parts.push(
                    reference_attention(&q.i(rows).unwrap(), &entry.0, &entry.1, None).unwrap(),
                );
            }
        }
        let want = Reference::cat(&parts).unwrap();
        check(
            &format!("{what}, layer {layer}"),
            dtype,
            (&out, &lse),
            &want,
            cpu_model(dtype),
        )
        .unwrap();
    }
}

fn candle_dtype(dtype: paged_gqa::DType) -> DType {
    match dtype {
        paged_gqa::DType::F32 => DType::F32,
        paged_gqa::DType::F16 => DType::F16,
        paged_gqa::DType::BF16 => DType::BF16,
        other => panic!("the candle tests use 16-bit and f32 caches, not {other:?}"),
    }
}

fn ours(dtype: DType) -> paged_gqa::DType {
    match dtype {
        DType::F32 => paged_gqa::DType::F32,
        DType::F16 => paged_gqa::DType::F16,
        _ => paged_gqa::DType::BF16,
    }
}

fn empty_history(cache: &PagedCache<CandleStorage>) -> Vec<(Tensor, Tensor)> {
    let config = cache.config();
    let (n_kv, d) = (config.shape().n_kv_heads(), config.shape().head_dim());
    let dtype = candle_dtype(config.dtype());
    let empty = Tensor::zeros((0, n_kv, d), dtype, &Device::Cpu).unwrap();
    vec![(empty.clone(), empty); LAYERS]
}

#[test]
fn an_engine_loop_matches_plain_candle_attention() {
    let mut rng = common::rng("an_engine_loop_matches_plain_candle_attention");
    for dtype in DTYPES {
        for block_size in [1, 16] {
            let shape = GqaShape::new(28, 4, 64).unwrap();
            let config = CacheConfig::new(shape, LAYERS, block_size, ours(dtype)).unwrap();
            let storage = CandleStorage::new(config, 256 / block_size + 8, &Device::Cpu).unwrap();
            let mut cache = PagedCache::new(storage).unwrap();
            let mut history = History::new();
            let what = |step: &str| format!("{dtype:?}, pages of {block_size}: {step}");
            let (a, b) = (cache.add_sequence(), cache.add_sequence());
            history.insert(a, empty_history(&cache));
            history.insert(b, empty_history(&cache));
            step(
                &mut rng,
                &mut cache,
                &mut history,
                &[(a, 23), (b, 9)],
                &what("prefill"),
            );
            for i in 0..3 {
                step(
                    &mut rng,
                    &mut cache,
                    &mut history,
                    &[(a, 1), (b, 1)],
                    &what(&format!("decode {i}")),
                );
            }
            // b forks; both write into their shared partial block (copy-on-write).
            let c = cache.fork(b).unwrap();
            history.insert(c, history[&b].clone());
            step(
                &mut rng,
                &mut cache,
                &mut history,
                &[(b, 1), (c, 2), (a, 1)],
                &what("after fork"),
            );
            // A chunk of a new prompt beside decode rows, then b leaves.
            let d = cache.add_sequence();
            history.insert(d, empty_history(&cache));
            step(
                &mut rng,
                &mut cache,
                &mut history,
                &[(d, 7), (a, 1), (c, 1)],
                &what("chunk 1"),
            );
            cache.free(b).unwrap();
            step(
                &mut rng,
                &mut cache,
                &mut history,
                &[(c, 1), (d, 12), (a, 0)],
                &what("chunk 2"),
            );
            cache.manager().audit().unwrap();
        }
    }
}

#[test]
fn layer_views_are_the_pages_of_that_layer() {
    let mut cache = small_cache(3, paged_gqa::DType::F32);
    let seq = cache.add_sequence();
    let plan = cache.plan(&[(seq, 2)]).unwrap();
    let ones = Tensor::ones((2, 2, 64), DType::F32, &Device::Cpu).unwrap();
    cache
        .write(1, &plan, &ones, &(&ones * 2.0).unwrap())
        .unwrap();
    let sums: Vec<f32> = (0..3)
        .flat_map(|layer| {
            let (k, v) = cache.storage().layer(layer).unwrap();
            [
                k.sum_all().unwrap().to_scalar::<f32>().unwrap(),
                v.sum_all().unwrap().to_scalar::<f32>().unwrap(),
            ]
        })
        .collect();
    assert_eq!(sums, [0.0, 0.0, 256.0, 512.0, 0.0, 0.0]);
    let pages = cache.storage().pages();
    assert_eq!(pages.dims(), &[3, 2, 4, 16, 2, 64]);
    assert_eq!(
        pages
            .i((1, 0))
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        256.0
    );
}

/// fp8 pages are not wired to candle tensors: a configuration with them is refused, naming the
/// page dtype, instead of allocating pages of the compute dtype.
#[test]
fn fp8_page_configurations_are_refused() {
    let config = small_config(2, paged_gqa::DType::BF16)
        .with_page_dtype(paged_gqa::DType::F8E4M3)
        .unwrap();
    let err = CandleStorage::new(config, 4, &Device::Cpu).err().unwrap();
    assert!(
        matches!(
            err,
            paged_gqa::Error::UnsupportedDType {
                dtype: paged_gqa::DType::F8E4M3,
                ..
            }
        ),
        "{err}"
    );
}
