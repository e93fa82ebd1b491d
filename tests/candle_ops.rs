//! The candle ops on CPU tensors against plain candle attention (gather, repeat_kv, matmul,
//! softmax, in f64): GQA groups 1, 4, 7, 8 and 71, decode, prefill and chunks mixed with
//! decode, pages of 1, 16 and 256 tokens, f32, f16 and bf16; and the write's semantics.

mod candle_common;
mod common;

use candle_common::{check, cpu_model, Case, DTYPES, PAGES, RATIOS};
use candle_core::{DType, Device, IndexOp, Tensor};
use paged_gqa::candle::{
    paged_attention, reshape_and_cache, write_kv, AttendOptions, PagedMetadata,
};
use paged_gqa::GqaShape;
use rand::rngs::StdRng;
use rand::Rng;

/// Lengths of one batch kind: (context_lens, query_lens).
type Lengths = (Vec<usize>, Vec<usize>);

/// Runs `paged_attention` on a case of every shape, page size and dtype with lengths from
/// `lengths`, against the reference; collects every failure before failing.
fn parity(test: &str, lengths: impl Fn(&mut StdRng, usize) -> Lengths) {
    let mut rng = common::rng(test);
    let dev = Device::Cpu;
    let mut failures = Vec::new();
    let mut cases = 0;
    for (n_heads, n_kv_heads, head_dim) in RATIOS {
        let shape = GqaShape::new(n_heads, n_kv_heads, head_dim).unwrap();
        for block_size in PAGES {
            for dtype in DTYPES {
                let (context_lens, query_lens) = lengths(&mut rng, block_size);
                let case = Case::random(
                    &mut rng,
                    shape,
                    block_size,
                    &context_lens,
                    &query_lens,
                    dtype,
                    &dev,
                )
                .unwrap();
                // Alternate the table dtype and an explicit scale.
                let (tables, scale) = if cases % 2 == 0 {
                    (case.block_tables(&dev).unwrap(), None)
                } else {
                    (case.block_tables_i32(&dev).unwrap(), Some(0.3))
                };
                let got = paged_attention(
                    &case.q,
                    &case.k_cache,
                    &case.v_cache,
                    &tables,
                    &case.context_lens(&dev).unwrap(),
                    Some(&case.query_lens(&dev).unwrap()),
                    &AttendOptions::new().with_scale_opt(scale),
                )
                .unwrap();
                let want = case.reference(scale).unwrap();
                let what = format!(
                    "{n_heads}/{n_kv_heads} heads of {head_dim}, pages of {block_size}, \
                     {dtype:?}, context_lens {context_lens:?}, query_lens {query_lens:?}"
                );
                if let Err(e) = check(&what, dtype, (&got.0, &got.1), &want, cpu_model(dtype)) {
                    failures.push(e);
                }
                cases += 1;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn decode_matches_plain_candle_attention() {
    parity(
        "decode_matches_plain_candle_attention",
        |rng, block_size| {
            // Three sequences, one of them a single key; contexts reach a third page of 256.
            let context_lens = vec![
                1,
                rng.random_range(2..=2 * block_size.max(40)),
                rng.random_range(block_size.max(20)..=(2 * block_size + 60).min(600)),
            ];
            (context_lens, vec![1, 1, 1])
        },
    );
}

#[test]
fn prefill_matches_plain_candle_attention() {
    parity("prefill_matches_plain_candle_attention", |rng, _| {
        let context_lens = vec![rng.random_range(1..=8), rng.random_range(20..=40)];
        (context_lens.clone(), context_lens)
    });
}

#[test]
fn chunks_mixed_with_decode_match_plain_candle_attention() {
    parity(
        "chunks_mixed_with_decode_match_plain_candle_attention",
        |rng, block_size| {
            // A decode row, a chunk well into a long context, a chunk that starts a page, a prompt.
            let long = rng.random_range(block_size.max(30) + 1..=block_size.max(30) + 300);
            let chunk = rng.random_range(2..=16);
            let context_lens = vec![rng.random_range(1..=300), long, 2 * block_size + 5, 12];
            let query_lens = vec![1, chunk, 5, 12];
            (context_lens, query_lens)
        },
    );
}

/// A case of `test` on the CPU in pages of 16, its generator seeded by the test's name.
fn case_of(
    test: &str,
    (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
    context_lens: &[usize],
    query_lens: &[usize],
    dtype: DType,
) -> Case {
    let shape = GqaShape::new(n_heads, n_kv_heads, head_dim).unwrap();
    let mut rng = common::rng(test);
    Case::random(
        &mut rng,
        shape,
        16,
        context_lens,
        query_lens,
        dtype,
        &Device::Cpu,
    )
    .unwrap()
}

/// `paged_attention` of `case`'s queries over `k_cache`, `v_cache` (its pages, or views of
/// them) with the default options, passing its query lengths unless `decode` (`None`), checked
/// against the reference as `what`: the output in the case's dtype, each element within its
/// bound.
fn check_attention(what: &str, case: &Case, (k_cache, v_cache): (&Tensor, &Tensor), decode: bool) {
    let (dev, dtype) = (Device::Cpu, case.q.dtype());
    let query_lens = case.query_lens(&dev).unwrap();
    let (out, lse) = paged_attention(
        &case.q,
        k_cache,
        v_cache,
        &case.block_tables(&dev).unwrap(),
        &case.context_lens(&dev).unwrap(),
        (!decode).then_some(&query_lens),
        &AttendOptions::default(),
    )
    .unwrap();
    let want = case.reference(None).unwrap();
    check(what, dtype, (&out, &lse), &want, cpu_model(dtype)).unwrap();
}

#[test]
fn a_sequence_with_no_new_rows_takes_no_rows() {
    let case = case_of(
        "a_sequence_with_no_new_rows_takes_no_rows",
        (8, 2, 64),
        &[30, 40, 7],
        &[2, 0, 3],
        DType::F32,
    );
    check_attention(
        "query_lens [2, 0, 3]",
        &case,
        (&case.k_cache, &case.v_cache),
        false,
    );
}

#[test]
fn query_lens_none_is_a_decode_step() {
    let case = case_of(
        "query_lens_none_is_a_decode_step",
        (16, 4, 64),
        &[33, 1, 17],
        &[1, 1, 1],
        DType::BF16,
    );
    check_attention("decode", &case, (&case.k_cache, &case.v_cache), true);
}

#[test]
fn metadata_serves_every_layer_of_a_step() {
    // Two layers with different caches, one metadata: each layer's result is its own.
    let a = case_of(
        "metadata_serves_every_layer_of_a_step",
        (32, 8, 128),
        &[50, 9],
        &[1, 9],
        DType::F16,
    );
    let dev = Device::Cpu;
    let meta = PagedMetadata::new(
        &a.block_tables(&dev).unwrap(),
        &a.context_lens(&dev).unwrap(),
        Some(&a.query_lens(&dev).unwrap()),
    )
    .unwrap();
    let options = AttendOptions::default();
    for layer in 0..2 {
        let k_cache = if layer == 0 {
            a.k_cache.clone()
        } else {
            (&a.k_cache * -0.5).unwrap()
        };
        let v_cache = if layer == 0 {
            a.v_cache.clone()
        } else {
            (&a.v_cache + 0.25).unwrap()
        };
        let (out, lse) = meta.attention(&a.q, &k_cache, &v_cache, &options).unwrap();
        let want =
            candle_common::reference_paged(&a.q, &k_cache, &v_cache, &a.tables, &a.lens, None)
                .unwrap();
        check(
            &format!("layer {layer}"),
            DType::F16,
            (&out, &lse),
            &want,
            cpu_model(DType::F16),
        )
        .unwrap();
    }
}

#[test]
fn caches_may_be_views_of_a_larger_tensor() {
    // One layer of a [layers, 2, num_blocks, ...] tensor: a contiguous view with an offset.
    let case = case_of(
        "caches_may_be_views_of_a_larger_tensor",
        (8, 2, 64),
        &[40, 3],
        &[4, 3],
        DType::F32,
    );
    let filler = (case.k_cache.ones_like().unwrap() * f64::NAN).unwrap();
    let pair = Tensor::stack(&[&case.k_cache, &case.v_cache], 0).unwrap();
    let pages =
        Tensor::stack(&[&Tensor::stack(&[&filler, &filler], 0).unwrap(), &pair], 0).unwrap();
    let layer = pages.i(1).unwrap();
    let (k_cache, v_cache) = (layer.i(0).unwrap(), layer.i(1).unwrap());
    assert!(k_cache.is_contiguous());
    check_attention("layer 1 of 2", &case, (&k_cache, &v_cache), false);
}

/// The caches' host values after `slots` receive `k`, `v` rows (`[tokens, row]`): the expected
/// result of a write.
fn expected_write(cache: &[f32], rows: &[f32], slots: &[i64], row: usize) -> Vec<f32> {
    let mut cache = cache.to_vec();
    for (token, &slot) in slots.iter().enumerate() {
        if slot >= 0 {
            let at = slot as usize * row;
            cache[at..at + row].copy_from_slice(&rows[token * row..][..row]);
        }
    }
    cache
}

/// Random slots for `tokens` rows among `num_slots`, distinct; with `padding`, about one in
/// five is -1.
fn random_slots(rng: &mut StdRng, tokens: usize, num_slots: usize, padding: bool) -> Vec<i64> {
    let mut all: Vec<i64> = (0..num_slots as i64).collect();
    rand::seq::SliceRandom::shuffle(&mut all[..], rng);
    let mut slots = all[..tokens].to_vec();
    for slot in slots.iter_mut() {
        if padding && rng.random_range(0..5) == 0 {
            *slot = -1;
        }
    }
    slots
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn write_kv_puts_each_row_in_its_slot_and_leaves_every_other_slot() {
    let mut rng = common::rng("write_kv_puts_each_row_in_its_slot_and_leaves_every_other_slot");
    let dev = Device::Cpu;
    let (num_blocks, block_size, n_kv, d) = (6, 16, 2, 64);
    let row = n_kv * d;
    for dtype in DTYPES {
        for shared in [false, true] {
            for slot_dtype in [DType::I64, DType::I32, DType::U32] {
                let tokens = 21;
                let cache_len = num_blocks * block_size * row;
                let dims = [num_blocks, block_size, n_kv, d];
                // Random old contents (the write must keep them), rounded to the dtype.
                let round = |v: Vec<f32>, dims: &[usize]| {
                    Tensor::from_vec(v, dims, &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                };
                let (k_cache, v_cache);
                if shared {
                    let both = candle_common::uniform(&mut rng, 2 * cache_len);
                    let pair = round(both, &[2, num_blocks, block_size, n_kv, d]);
                    (k_cache, v_cache) = (pair.i(0).unwrap(), pair.i(1).unwrap());
                } else {
                    k_cache = round(candle_common::uniform(&mut rng, cache_len), &dims);
                    v_cache = round(candle_common::uniform(&mut rng, cache_len), &dims);
                }
                let k = round(
                    candle_common::uniform(&mut rng, tokens * row),
                    &[tokens, n_kv, d],
                );
                let v = round(
                    candle_common::uniform(&mut rng, tokens * row),
                    &[tokens, n_kv, d],
                );
                // u32 slots cannot be padding.
                let padding = slot_dtype != DType::U32;
                let slots = random_slots(&mut rng, tokens, num_blocks * block_size, padding);
                let want_k = expected_write(&host(&k_cache), &host(&k), &slots, row);
                let want_v = expected_write(&host(&v_cache), &host(&v), &slots, row);
                let slot_tensor = Tensor::new(slots.clone(), &dev)
                    .unwrap()
                    .to_dtype(slot_dtype)
                    .unwrap();
                let write = if slot_dtype == DType::I32 {
                    reshape_and_cache
                } else {
                    write_kv
                };
                write(&k, &v, &k_cache, &v_cache, &slot_tensor).unwrap();
                let what = format!("{dtype:?}, shared storage {shared}, slots {slot_dtype:?}");
                assert_eq!(host(&k_cache), want_k, "k_cache after the write, {what}");
                assert_eq!(host(&v_cache), want_v, "v_cache after the write, {what}");
            }
        }
    }
}

#[test]
fn metadata_write_then_attention_is_attention_over_the_written_rows() {
    // A prefill of two sequences into empty (NaN-filled) pages, then a decode row each: what
    // attention reads is exactly what the metadata's write put there.
    let mut rng = common::rng("metadata_write_then_attention_is_attention_over_the_written_rows");
    let dev = Device::Cpu;
    let (n_heads, n_kv, d, block_size, num_blocks) = (28, 4, 64, 16, 8);
    for dtype in DTYPES {
        let dims = (num_blocks, block_size, n_kv, d);
        let k_cache = (Tensor::ones(dims, dtype, &dev).unwrap() * f64::NAN).unwrap();
        let v_cache = (Tensor::ones(dims, dtype, &dev).unwrap() * f64::NAN).unwrap();
        let tables = vec![vec![5u32, 2, 7], vec![0, 6, 6]];
        let prompt = [37usize, 11];
        let mut history: Vec<(Tensor, Tensor)> = Vec::new();
        let random = |rng: &mut StdRng, rows: usize, heads: usize| {
            let v = candle_common::uniform(rng, rows * heads * d);
            Tensor::from_vec(v, (rows, heads, d), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        for step in 0..2 {
            let (context, query): (Vec<usize>, Vec<usize>) = if step == 0 {
                (prompt.to_vec(), prompt.to_vec())
            } else {
                (prompt.iter().map(|p| p + 1).collect(), vec![1, 1])
            };
            let meta = PagedMetadata::new(
                &Tensor::new(tables.clone(), &dev).unwrap(),
                &Tensor::new(context.iter().map(|&c| c as u32).collect::<Vec<_>>(), &dev).unwrap(),
                Some(
                    &Tensor::new(query.iter().map(|&c| c as i64).collect::<Vec<_>>(), &dev)
                        .unwrap(),
                ),
            )
            .unwrap();
            let tokens: usize = query.iter().sum();
            let (k, v, q) = (
                random(&mut rng, tokens, n_kv),
                random(&mut rng, tokens, n_kv),
                random(&mut rng, tokens, n_heads),
            );
            meta.write_kv(&k, &v, &k_cache, &v_cache).unwrap();
            let (out, lse) = meta
                .attention(&q, &k_cache, &v_cache, &AttendOptions::default())
                .unwrap();
            // The reference keeps each sequence's rows contiguously.
            let mut start = 0;
            let mut parts = Vec::new();
            for seq in 0..2 {
                let rows = start..start + query[seq];
                start = rows.end;
                let (k_new, v_new) = (k.i(rows.clone()).unwrap(), v.i(rows.clone()).unwrap());
                if step == 0 {
                    history.push((k_new, v_new));
                } else {
                    let (hk, hv) = &history[seq];
                    history[seq] = (
                        Tensor::cat(&[hk, &k_new], 0).unwrap(),
                        Tensor::cat(&[hv, &v_new], 0).unwrap(),
                    );
                }
                let (hk, hv) = &history[seq];
                parts.push(
                    candle_common::reference_attention(&q.i(rows).unwrap(), hk, hv, None).unwrap(),
                );
            }
            let want = candle_common::Reference::cat(&parts).unwrap();
            check(
                &format!("{dtype:?}, step {step}"),
                dtype,
                (&out, &lse),
                &want,
                cpu_model(dtype),
            )
            .unwrap();
        }
    }
}
