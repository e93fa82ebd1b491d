//! The CPU oracle: attention from the definition in f64, over contiguous and paged K/V.
//! Hand-computed cases, the properties that define causal GQA, an independent textbook
//! formulation, and the proof that fused indexing (query head h reads K/V head h / group)
//! equals the naive path that materialises repeat_kv.

mod common;

use common::PagedCase;
use paged_gqa::cpu::{self, Attention, ContiguousKv, PagedKv};
use paged_gqa::AttendOptions;
use paged_gqa::{Error, GqaShape, SeqLens};

/// One sequence of `context_len` keys with contiguous K/V.
fn contiguous(
    shape: GqaShape,
    lens: &SeqLens,
    k: &[f32],
    v: &[f32],
    q: &[f32],
    scale: Option<f64>,
) -> Attention {
    let kv = ContiguousKv::new(shape, lens, k, v).unwrap();
    cpu::attention(q, &kv, &AttendOptions::new().with_scale_opt(scale)).unwrap()
}

#[test]
fn a_single_key_returns_its_value_and_its_score_as_lse() {
    let shape = GqaShape::new(2, 1, 8).unwrap();
    let lens = SeqLens::decode(&[1]).unwrap();
    let k: Vec<f32> = (0..8).map(|i| 0.25 * i as f32).collect();
    let v: Vec<f32> = (0..8).map(|i| i as f32 - 3.0).collect();
    let q: Vec<f32> = (0..16).map(|i| 0.5 - 0.125 * i as f32).collect();
    let att = contiguous(shape, &lens, &k, &v, &q, None);
    for head in 0..2 {
        let score: f64 = (0..8)
            .map(|i| q[head * 8 + i] as f64 * k[i] as f64)
            .sum::<f64>()
            / 8f64.sqrt();
        assert!(
            (att.lse[head] - score).abs() < 1e-14,
            "lse {} vs score {score}",
            att.lse[head]
        );
        let v64: Vec<f64> = v.iter().map(|&x| x as f64).collect();
        assert!(common::max_abs(&att.out[head * 8..head * 8 + 8], &v64) < 1e-14);
    }
}

#[test]
fn equal_scores_average_the_values_and_lse_adds_ln_len() {
    let shape = GqaShape::new(1, 1, 8).unwrap();
    let len = 5;
    let lens = SeqLens::decode(&[len]).unwrap();
    let k = vec![0.5f32; len * 8]; // every key the same: every score the same
    let v: Vec<f32> = (0..len * 8).map(|i| (i % 13) as f32).collect();
    let q = vec![0.375f32; 8]; // exact in f32
    let att = contiguous(shape, &lens, &k, &v, &q, None);
    let score = 8.0 * 0.375 * 0.5 / 8f64.sqrt();
    assert!((att.lse[0] - (score + (len as f64).ln())).abs() < 1e-13);
    for d in 0..8 {
        let mean = (0..len).map(|t| v[t * 8 + d] as f64).sum::<f64>() / len as f64;
        assert!((att.out[d] - mean).abs() < 1e-13);
    }
}

#[test]
fn two_keys_weigh_by_softmax_of_scaled_scores() {
    let shape = GqaShape::new(1, 1, 8).unwrap();
    let lens = SeqLens::decode(&[2]).unwrap();
    let mut k = vec![0f32; 16];
    k[0] = 1.0; // score 1 * scale
    k[8] = 3.0; // score 3 * scale
    let v: Vec<f32> = (0..16).map(|i| if i < 8 { 1.0 } else { -2.0 }).collect();
    let mut q = vec![0f32; 8];
    q[0] = 1.0;
    let scale = 0.7;
    let att = contiguous(shape, &lens, &k, &v, &q, Some(scale));
    let (e0, e1) = ((1.0f64 * scale).exp(), (3.0f64 * scale).exp());
    let expected = (e0 * 1.0 + e1 * -2.0) / (e0 + e1);
    assert!(
        att.out.iter().all(|&o| (o - expected).abs() < 1e-14),
        "{:?} vs {expected}",
        &att.out
    );
    assert!((att.lse[0] - (e0 + e1).ln()).abs() < 1e-14);
}

#[test]
fn scale_zero_gives_the_plain_mean_and_scale_changes_the_result() {
    let mut rng = common::rng("scale_zero_gives_the_plain_mean_and_scale_changes_the_result");
    let shape = GqaShape::new(4, 2, 16).unwrap();
    let lens = SeqLens::decode(&[9]).unwrap();
    let (k, v) = (
        common::uniform(&mut rng, 9 * 32),
        common::uniform(&mut rng, 9 * 32),
    );
    let q = common::uniform(&mut rng, 4 * 16);
    let flat = contiguous(shape, &lens, &k, &v, &q, Some(0.0));
    for head in 0..4 {
        let kv_head = head / 2;
        for d in 0..16 {
            let mean = (0..9)
                .map(|t| v[(t * 2 + kv_head) * 16 + d] as f64)
                .sum::<f64>()
                / 9.0;
            assert!((flat.out[head * 16 + d] - mean).abs() < 1e-14);
        }
    }
    let default = contiguous(shape, &lens, &k, &v, &q, None);
    let doubled = contiguous(shape, &lens, &k, &v, &q, Some(2.0 * shape.default_scale()));
    assert!(common::max_abs(&default.out, &doubled.out) > 1e-6);
}

#[test]
fn query_rows_do_not_see_future_keys() {
    let mut rng = common::rng("query_rows_do_not_see_future_keys");
    let shape = GqaShape::new(4, 2, 16).unwrap();
    let lens = SeqLens::new(&[6], &[3]).unwrap(); // rows at positions 3, 4, 5
    let (mut k, mut v) = (
        common::uniform(&mut rng, 6 * 32),
        common::uniform(&mut rng, 6 * 32),
    );
    let q = common::uniform(&mut rng, 3 * 4 * 16);
    let before = contiguous(shape, &lens, &k, &v, &q, None);
    // Change only the last key and value (position 5): rows 0 and 1 must not move, row 2 must.
    for x in &mut k[5 * 32..] {
        *x += 1.0;
    }
    for x in &mut v[5 * 32..] {
        *x -= 1.0;
    }
    let after = contiguous(shape, &lens, &k, &v, &q, None);
    let row = 4 * 16;
    assert_eq!(&before.out[..2 * row], &after.out[..2 * row]);
    assert_eq!(&before.lse[..8], &after.lse[..8]);
    assert!(common::max_abs(&before.out[2 * row..], &after.out[2 * row..]) > 1e-3);
}

#[test]
fn query_head_h_reads_kv_head_h_div_group() {
    let mut rng = common::rng("query_head_h_reads_kv_head_h_div_group");
    let shape = GqaShape::new(12, 3, 8).unwrap(); // group 4
    let lens = SeqLens::decode(&[7]).unwrap();
    let (k, mut v) = (
        common::uniform(&mut rng, 7 * 24),
        common::uniform(&mut rng, 7 * 24),
    );
    let q = common::uniform(&mut rng, 12 * 8);
    let before = contiguous(shape, &lens, &k, &v, &q, None);
    // Shift every value of K/V head 1: exactly query heads 4..8 change, by exactly the shift.
    for t in 0..7 {
        for x in &mut v[(t * 3 + 1) * 8..(t * 3 + 2) * 8] {
            *x += 10.0;
        }
    }
    let after = contiguous(shape, &lens, &k, &v, &q, None);
    for head in 0..12 {
        let (b, a) = (&before.out[head * 8..][..8], &after.out[head * 8..][..8]);
        if (4..8).contains(&head) {
            // The weights sum to 1, so the output moves by the shift (up to f32 rounding of v).
            assert!(
                a.iter().zip(b).all(|(a, b)| (a - b - 10.0).abs() < 1e-5),
                "head {head}"
            );
        } else {
            assert_eq!(a, b, "head {head} reads another K/V head and must not move");
        }
    }
}

/// Attention written as textbook matrices: full score matrix with a causal -inf mask,
/// softmax by exp / sum of exp, then P @ V. Independent of the library's loop structure.
fn textbook(
    shape: GqaShape,
    context_len: usize,
    query_len: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f64,
) -> Vec<f64> {
    let (h, kvh, d) = (shape.n_heads(), shape.n_kv_heads(), shape.head_dim());
    let mut out = vec![0.0; query_len * h * d];
    for head in 0..h {
        let kv = head * kvh / h; // == head / (h / kvh)
        for i in 0..query_len {
            let scores: Vec<f64> = (0..context_len)
                .map(|t| {
                    if t > context_len - query_len + i {
                        return f64::NEG_INFINITY;
                    }
                    scale
                        * (0..d)
                            .map(|c| {
                                q[(i * h + head) * d + c] as f64 * k[(t * kvh + kv) * d + c] as f64
                            })
                            .sum::<f64>()
                })
                .collect();
            let denom: f64 = scores.iter().map(|s| s.exp()).sum();
            for (t, s) in scores.iter().enumerate() {
                for c in 0..d {
                    out[(i * h + head) * d + c] +=
                        s.exp() / denom * v[(t * kvh + kv) * d + c] as f64;
                }
            }
        }
    }
    out
}

#[test]
fn matches_a_textbook_formulation_on_random_chunks() {
    let mut rng = common::rng("matches_a_textbook_formulation_on_random_chunks");
    for (n_heads, n_kv_heads, d, context_len, query_len) in
        [(8, 2, 16, 13, 4), (7, 7, 8, 5, 5), (6, 1, 24, 30, 1)]
    {
        let shape = GqaShape::new(n_heads, n_kv_heads, d).unwrap();
        let lens = SeqLens::new(&[context_len], &[query_len]).unwrap();
        let k = common::uniform(&mut rng, context_len * shape.kv_row_len());
        let v = common::uniform(&mut rng, context_len * shape.kv_row_len());
        let q = common::uniform(&mut rng, query_len * shape.q_row_len());
        let att = contiguous(shape, &lens, &k, &v, &q, None);
        let reference = textbook(
            shape,
            context_len,
            query_len,
            &q,
            &k,
            &v,
            shape.default_scale(),
        );
        assert!(common::max_abs(&att.out, &reference) < 1e-12);
    }
}

/// K and V of every sequence of `case` copied out of its pages by indexing its block tables
/// here (token `pos` of sequence `seq` is in page `tables[seq][pos / block_size]`, slot
/// `pos % block_size`), not through `PagedKv`: `[total_keys, n_kv_heads, head_dim]`,
/// sequences concatenated in batch order.
fn gather_by_tables(case: &PagedCase) -> (Vec<f32>, Vec<f32>) {
    let (block_size, row) = (case.layout.block_size(), case.layout.shape().kv_row_len());
    let (mut k, mut v) = (Vec::new(), Vec::new());
    for seq in 0..case.lens.batch() {
        let table = &case.tables[seq * case.max_blocks..][..case.max_blocks];
        for pos in 0..case.lens.context_len(seq) {
            let page = usize::try_from(table[pos / block_size]).unwrap();
            let at = (page * block_size + pos % block_size) * row;
            k.extend_from_slice(&case.k_cache[at..at + row]);
            v.extend_from_slice(&case.v_cache[at..at + row]);
        }
    }
    (k, v)
}

/// `x` (`[keys, n_kv_heads, head_dim]`) with K/V head `h / group`'s row copied for every query
/// head `h`: `[keys, n_heads, head_dim]`, repeat_kv written out here.
fn repeat_heads(x: &[f32], shape: GqaShape) -> Vec<f32> {
    let d = shape.head_dim();
    x.chunks(shape.kv_row_len())
        .flat_map(|token| {
            (0..shape.n_heads())
                .flat_map(move |h| token[h / shape.group() * d..][..d].iter().copied())
        })
        .collect()
}

#[test]
fn paged_equals_contiguous_on_the_same_values() {
    let mut rng = common::rng("paged_equals_contiguous_on_the_same_values");
    let shape = GqaShape::new(8, 2, 32).unwrap();
    let case = PagedCase::random(&mut rng, shape, 16, &[1, 16, 17, 40], &[1, 1, 5, 3]);
    let paged = cpu::attention(&case.q, &case.kv(), &AttendOptions::default()).unwrap();
    let (k, v) = gather_by_tables(&case);
    let contiguous = contiguous(shape, &case.lens, &k, &v, &case.q, None);
    assert_eq!(paged, contiguous);
    assert!(
        cpu::gather_paged(&case.kv()).unwrap() == (k, v),
        "gather_paged differs from the rows the block tables point at"
    );
}

/// The heart of the project: indexing K/V head h / group without copying gives the same
/// result as materialising repeat_kv, on every group size, head size, page size and the
/// context lengths where paging goes wrong (1, a page boundary, a partial last page).
#[test]
fn fused_indexing_equals_naive_repeat_kv() {
    let mut rng = common::rng("fused_indexing_equals_naive_repeat_kv");
    // (n_heads, n_kv_heads): groups 1, 2, 4, 7, 8, 71.
    let heads = [(8, 8), (4, 2), (32, 8), (28, 4), (16, 2), (71, 1)];
    let head_dims = [64, 80, 96, 128, 256];
    let mut cases = 0;
    for (i, &(n_heads, n_kv_heads)) in heads.iter().enumerate() {
        for (j, &block_size) in [1usize, 16, 256].iter().enumerate() {
            let head_dim = head_dims[(i + j) % head_dims.len()];
            let shape = GqaShape::new(n_heads, n_kv_heads, head_dim).unwrap();
            // 1 key; exactly one page; a page plus a partial page; a chunked prefill row set.
            let context_lens = [
                1,
                block_size,
                block_size + block_size.div_ceil(2) + 1,
                2 * block_size + 3,
            ];
            let query_lens = [1, 1, 1, 3];
            let case = PagedCase::random(&mut rng, shape, block_size, &context_lens, &query_lens);
            let fused = cpu::attention(&case.q, &case.kv(), &AttendOptions::default()).unwrap();
            // The naive path built here: K/V copied out through the tables, each K/V head's
            // rows repeated for its group, then attention with one K/V head per query head.
            let (k, v) = gather_by_tables(&case);
            let (k, v) = (repeat_heads(&k, shape), repeat_heads(&v, shape));
            let mha = GqaShape::new(n_heads, n_heads, head_dim).unwrap();
            let mha_kv = ContiguousKv::new(mha, &case.lens, &k, &v).unwrap();
            let naive = cpu::attention(&case.q, &mha_kv, &AttendOptions::default()).unwrap();
            let (out_diff, lse_diff) = (
                common::max_abs(&fused.out, &naive.out),
                common::max_abs(&fused.lse, &naive.lse),
            );
            assert!(
                out_diff < 1e-12 && lse_diff < 1e-12,
                "heads {n_heads}/{n_kv_heads}, d {head_dim}, block {block_size}: out {out_diff:e}, lse {lse_diff:e}"
            );
            // The library's naive path (gather_paged, repeat_kv) is exactly that.
            assert!(
                cpu::attention_naive(&case.q, &case.kv(), &AttendOptions::default()).unwrap()
                    == naive,
                "heads {n_heads}/{n_kv_heads}, d {head_dim}, block {block_size}: cpu::attention_naive"
            );
            assert!(
                fused.out.iter().all(|x| x.is_finite()) && fused.lse.iter().all(|x| x.is_finite())
            );
            cases += 1;
        }
    }
    // Every head_dim was covered by some case.
    assert_eq!(cases, 18);
}

#[test]
fn the_modulo_mapping_would_be_caught() {
    // Guard on the test above: a wrong mapping (h % n_kv_heads) gives a different answer, so
    // the comparison with repeat_kv can fail.
    let mut rng = common::rng("the_modulo_mapping_would_be_caught");
    let shape = GqaShape::new(8, 2, 16).unwrap();
    let case = PagedCase::random(&mut rng, shape, 16, &[20], &[1]);
    let fused = cpu::attention(&case.q, &case.kv(), &AttendOptions::default()).unwrap();
    // Build the modulo layout by permuting query heads: head h should read kv h % 2, which is
    // what the fused path computes for the head p(h) with p(h) / 4 == h % 2.
    let (k, v) = cpu::gather_paged(&case.kv()).unwrap();
    let mut k_mod = Vec::new();
    let mut v_mod = Vec::new();
    for t in 0..20 {
        for h in 0..8 {
            let kv = h % 2;
            k_mod.extend_from_slice(&k[(t * 2 + kv) * 16..][..16]);
            v_mod.extend_from_slice(&v[(t * 2 + kv) * 16..][..16]);
        }
    }
    let modulo = contiguous(
        shape.repeated(),
        &case.lens,
        &k_mod,
        &v_mod,
        &case.q,
        Some(shape.default_scale()),
    );
    assert!(common::max_abs(&fused.out, &modulo.out) > 1e-3);
}

#[test]
fn sequences_without_query_rows_contribute_nothing() {
    let mut rng = common::rng("sequences_without_query_rows_contribute_nothing");
    let shape = GqaShape::new(4, 2, 8).unwrap();
    let case = PagedCase::random(&mut rng, shape, 4, &[5, 0, 9], &[2, 0, 1]);
    let att = cpu::attention(&case.q, &case.kv(), &AttendOptions::default()).unwrap();
    assert_eq!(att.out.len(), 3 * 4 * 8);
    assert!(att.lse.iter().all(|x| x.is_finite()));
}

#[test]
fn a_q_of_the_wrong_length_is_an_error() {
    let mut rng = common::rng("a_q_of_the_wrong_length_is_an_error");
    let shape = GqaShape::new(4, 2, 8).unwrap();
    let case = PagedCase::random(&mut rng, shape, 4, &[5], &[2]);
    let err = cpu::attention(
        &case.q[..case.q.len() - 1],
        &case.kv(),
        &AttendOptions::default(),
    )
    .unwrap_err();
    assert_eq!(
        err,
        Error::BufferLength {
            name: "q",
            expected: 64,
            actual: 63
        }
    );
}

#[test]
fn a_non_finite_scale_is_an_error() {
    let mut rng = common::rng("a_non_finite_scale_is_an_error");
    let shape = GqaShape::new(4, 2, 8).unwrap();
    let case = PagedCase::random(&mut rng, shape, 4, &[5], &[2]);
    for scale in [f64::NAN, f64::INFINITY] {
        let err = cpu::attention(&case.q, &case.kv(), &AttendOptions::new().with_scale(scale))
            .unwrap_err();
        assert!(matches!(err, Error::InvalidScale { .. }), "{err}");
    }
}

#[test]
fn a_cache_of_the_wrong_length_is_an_error() {
    let mut rng = common::rng("a_cache_of_the_wrong_length_is_an_error");
    let shape = GqaShape::new(4, 2, 8).unwrap();
    let case = PagedCase::random(&mut rng, shape, 4, &[5], &[2]);
    let short = &case.v_cache[1..];
    let err = PagedKv::new(
        case.layout,
        &case.lens,
        &case.tables,
        case.max_blocks,
        &case.k_cache,
        short,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::BufferLength {
                name: "v_cache",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn sampled_rows_equal_the_full_oracle_and_the_rest_are_nan() {
    let mut rng = common::rng("sampled_rows_equal_the_full_oracle_and_the_rest_are_nan");
    let shape = GqaShape::new(8, 2, 16).unwrap();
    let case = PagedCase::random(&mut rng, shape, 4, &[70, 5, 40], &[70, 1, 33]);
    let kv = case.kv();
    let full = cpu::attention(&case.q, &kv, &AttendOptions::default()).unwrap();
    let keep = common::sample_tokens(&case.lens, 9);
    assert!(keep.iter().any(|&k| !k), "the sample must leave rows out");
    let sampled = cpu::attention_of_tokens(&case.q, &kv, &AttendOptions::default(), &keep).unwrap();
    let (row_len, n_heads) = (shape.q_row_len(), shape.n_heads());
    for (token, &kept) in keep.iter().enumerate() {
        let rows = |a: &Attention| {
            (
                a.out[token * row_len..][..row_len].to_vec(),
                a.lse[token * n_heads..][..n_heads].to_vec(),
            )
        };
        let (out, lse) = rows(&sampled);
        if kept {
            assert_eq!((out, lse), rows(&full), "token {token}");
        } else {
            assert!(out.iter().chain(&lse).all(|x| x.is_nan()), "token {token}");
        }
    }
    let err =
        cpu::attention_of_tokens(&case.q, &kv, &AttendOptions::default(), &keep[1..]).unwrap_err();
    assert!(
        matches!(err, Error::BufferLength { name: "keep", .. }),
        "{err}"
    );
}
