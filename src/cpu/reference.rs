//! Reference attention from the definition, accumulated in f64: the oracle every kernel and
//! every faster path is tested against.
//!
//! For query row `j` of sequence `s` (position `p = context_len - query_len + j`) and query
//! head `h` reading K/V head `h / group`, over the keys `t` the row sees (`0..=p` for plain
//! causal attention; see [`crate::variants`] for the window and the non-causal pass):
//!   `score_t = scale * q . k_t` (`k_t` the key's values: its stored values times the source's
//!   K scale, exactly in f64; `v_t` likewise), then `cap * tanh(score_t / cap)` with a soft-cap, then
//!   `+ slope[h] * (t - p)` with ALiBi,
//!   `lse = ln(sum_t exp(score_t) + exp(sink[h]))` (natural log; no sink term without sinks),
//!   `out = sum_t exp(score_t - lse) * v_t`.

use crate::cpu::error_bound::{key_weight_error, sink_weight_error, Conditioning, RowConditioning};
use crate::cpu::KvSource;
use crate::error::{Error, Result};
use crate::variants::AttendOptions;

/// Output of an attention call.
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    /// [num_tokens, n_heads, head_dim] (NaN in rows [`attention_of_tokens`] left out)
    pub out: Vec<f64>,
    /// [num_tokens, n_heads], natural log. `-inf` for a row that sees no key (its `out` is 0);
    /// NaN in rows [`attention_of_tokens`] left out.
    pub lse: Vec<f64>,
}

/// GQA attention of `q` (`[num_tokens, n_heads, head_dim]`, rows of the sequences of
/// `kv.lens()` concatenated in batch order) over `kv` (its values: stored values times its
/// scales), with the variants of `options` (causal, `scale = 1/sqrt(head_dim)` by default).
///
/// ```
/// use paged_gqa::{cpu, GqaShape, SeqLens};
/// let shape = GqaShape::new(2, 1, 8)?;
/// let lens = SeqLens::decode(&[1])?;
/// let (k, v) = (vec![0.5f32; 8], (0..8).map(|i| i as f32).collect::<Vec<_>>());
/// let kv = cpu::ContiguousKv::new(shape, &lens, &k, &v)?;
/// let att = cpu::attention(&[1.0f32; 16], &kv, &Default::default())?;
/// assert_eq!(&att.out[8..16], &[0., 1., 2., 3., 4., 5., 6., 7.]); // one key: out = v
/// # Ok::<(), paged_gqa::Error>(())
/// ```
pub fn attention<Q, T, K>(q: &[Q], kv: &K, options: &AttendOptions) -> Result<Attention>
where
    Q: Copy + Into<f64> + Sync,
    T: Copy + Into<f64>,
    K: KvSource<T> + Sync,
{
    attention_of_tokens(q, kv, options, &vec![true; kv.lens().num_tokens()])
}

/// [`attention`] for the query rows `token` with `keep[token]` only (`keep`: `[num_tokens]`);
/// every other row's `out` and `lse` are NaN, so a comparison that forgets to skip them fails.
/// For checking long cases against the oracle at a sample of their rows. Rows are computed on
/// all the machine's cores (each exactly as [`attention`] defines it).
pub fn attention_of_tokens<Q, T, K>(
    q: &[Q],
    kv: &K,
    options: &AttendOptions,
    keep: &[bool],
) -> Result<Attention>
where
    Q: Copy + Into<f64> + Sync,
    T: Copy + Into<f64>,
    K: KvSource<T> + Sync,
{
    Ok(oracle(q, kv, options, keep, false)?.0)
}

/// [`attention_of_tokens`] and, from the same pass, the [`Conditioning`] of every kept row:
/// what [`RoundingModel::bounds`](crate::cpu::RoundingModel::bounds) needs to bound a kernel's
/// error against this oracle on these inputs.
pub fn attention_with_conditioning<Q, T, K>(
    q: &[Q],
    kv: &K,
    options: &AttendOptions,
    keep: &[bool],
) -> Result<(Attention, Conditioning)>
where
    Q: Copy + Into<f64> + Sync,
    T: Copy + Into<f64>,
    K: KvSource<T> + Sync,
{
    let (att, cond) = oracle(q, kv, options, keep, true)?;
    Ok((att, cond.expect("asked for")))
}

/// The oracle's pass over the kept rows, with their conditioning when `conditioned`.
fn oracle<Q, T, K>(
    q: &[Q],
    kv: &K,
    options: &AttendOptions,
    keep: &[bool],
    conditioned: bool,
) -> Result<(Attention, Option<Conditioning>)>
where
    Q: Copy + Into<f64> + Sync,
    T: Copy + Into<f64>,
    K: KvSource<T> + Sync,
{
    let shape = kv.shape();
    let lens = kv.lens();
    let (n_heads, d) = (shape.n_heads(), shape.head_dim());
    let expected = lens.num_tokens() * shape.q_row_len();
    Error::check_len("q", q.len(), expected)?;
    Error::check_len("keep", keep.len(), lens.num_tokens())?;
    options.validate(shape)?;
    kv.check_visible(options.mask())?;

    // (sequence, query row of it, token) of every kept row.
    let rows: Vec<(usize, usize, usize)> = (0..lens.batch())
        .flat_map(|seq| {
            lens.query_rows(seq)
                .enumerate()
                .map(move |(j, token)| (seq, j, token))
        })
        .filter(|&(_, _, token)| keep[token])
        .collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(rows.len())
        .max(1);
    // Thread i takes rows i, i + threads, ...: causal rows differ in cost, interleaving evens it.
    let results: Vec<Vec<TokenRows>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let rows = &rows;
                scope.spawn(move || {
                    rows.iter()
                        .skip(i)
                        .step_by(threads)
                        .map(|&(seq, j, token)| {
                            let (out, lse, cond) =
                                token_attention(q, kv, options, seq, j, token, conditioned);
                            (token, out, lse, cond)
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("oracle thread panicked"))
            .collect()
    });

    let mut out = vec![f64::NAN; expected];
    let mut lse = vec![f64::NAN; lens.num_tokens() * n_heads];
    let mut cond = conditioned.then(|| Conditioning {
        weighted_abs_v: vec![f64::NAN; expected],
        weighted_rho_abs_v: vec![f64::NAN; expected],
        weight_norm_v: vec![f64::NAN; expected],
        weighted_rho: vec![f64::NAN; lens.num_tokens() * n_heads],
        keys: vec![f64::NAN; lens.num_tokens() * n_heads],
    });
    for (token, token_out, token_lse, token_cond) in results.into_iter().flatten() {
        out[token * n_heads * d..][..n_heads * d].copy_from_slice(&token_out);
        lse[token * n_heads..][..n_heads].copy_from_slice(&token_lse);
        if let (Some(cond), Some(rows)) = (cond.as_mut(), token_cond) {
            for (head, (row, keys)) in rows.into_iter().enumerate() {
                let (e, r) = ((token * n_heads + head) * d, token * n_heads + head);
                cond.weighted_abs_v[e..][..d].copy_from_slice(&row.weighted_abs_v);
                cond.weighted_rho_abs_v[e..][..d].copy_from_slice(&row.weighted_rho_abs_v);
                for (x, &sq) in cond.weight_norm_v[e..][..d]
                    .iter_mut()
                    .zip(&row.weight_sq_v)
                {
                    *x = sq.sqrt();
                }
                cond.weighted_rho[r] = row.weighted_rho;
                cond.keys[r] = keys as f64;
            }
        }
    }
    Ok((Attention { out, lse }, cond))
}

/// One token's rows: (token, out `[n_heads, head_dim]`, lse `[n_heads]`, and when asked the
/// conditioning and key count of each head's row).
type TokenRows = (usize, Vec<f64>, Vec<f64>, Option<HeadConditioning>);

/// Each head's conditioning and key count, `[n_heads]`.
type HeadConditioning = Vec<(RowConditioning, usize)>;

/// All heads of query row `j` of sequence `seq` (row `token` of `q`): out `[n_heads, head_dim]`
/// and lse `[n_heads]`, from the definition; with `conditioned`, each head's conditioning too.
fn token_attention<Q, T, K>(
    q: &[Q],
    kv: &K,
    options: &AttendOptions,
    seq: usize,
    j: usize,
    token: usize,
    conditioned: bool,
) -> (Vec<f64>, Vec<f64>, Option<HeadConditioning>)
where
    Q: Copy + Into<f64>,
    T: Copy + Into<f64>,
    K: KvSource<T>,
{
    let shape = kv.shape();
    let lens = kv.lens();
    let (n_heads, d) = (shape.n_heads(), shape.head_dim());
    let scale = options.scale_for(shape);
    let cap = f64::from(options.logit_softcap());
    let position = lens.position(seq, j) as f64;
    let keys = options
        .mask()
        .visible_keys(lens.context_len(seq), lens.query_len(seq), j);
    let mut out = vec![0.0f64; n_heads * d];
    let mut lse = vec![f64::NEG_INFINITY; n_heads];
    let mut scores = Vec::with_capacity(keys.len());
    // With `conditioned`: per key, (z: the scaled dot before the cap, |scaled| sum |q k|, bias).
    let mut terms: Vec<(f64, f64, f64)> = Vec::new();
    let mut conds = conditioned.then(Vec::new);
    for head in 0..n_heads {
        let kv_head = head / shape.group();
        let (k_scale, v_scale) = kv.scales(kv_head);
        let (k_scale, v_scale) = (f64::from(k_scale), f64::from(v_scale));
        let q_row = &q[(token * n_heads + head) * d..][..d];
        let slope = options.alibi_slopes().map_or(0.0, |s| f64::from(s[head]));
        let sink = options
            .sinks()
            .map_or(f64::NEG_INFINITY, |s| f64::from(s[head]));
        scores.clear();
        terms.clear();
        scores.extend(keys.clone().map(|t| {
            // Stored values times the source's K scale (1 but for fp8 pages), in f64.
            let key = kv.key(seq, t, kv_head);
            let z = scale * (dot(q_row, key) * k_scale);
            let mut s = z;
            if cap > 0.0 {
                s = cap * (s / cap).tanh();
            }
            let bias = slope * (t as f64 - position);
            if conditioned {
                let abs_dot = (scale * k_scale).abs() * abs_dot(q_row, key);
                terms.push((z, abs_dot, bias));
            }
            s + bias
        }));
        let max = scores.iter().copied().fold(sink, f64::max);
        if max == f64::NEG_INFINITY {
            // No visible key and no sink: out stays 0, lse stays -inf (and nothing to round).
            if let Some(conds) = conds.as_mut() {
                conds.push((RowConditioning::new(d), keys.len()));
            }
            continue;
        }
        let sum = scores.iter().map(|s| (s - max).exp()).sum::<f64>() + (sink - max).exp();
        let row_lse = max + sum.ln();
        let o = &mut out[head * d..][..d];
        let mut cond = conditioned.then(|| RowConditioning::new(d));
        for (i, (t, &s)) in keys.clone().zip(&scores).enumerate() {
            let p = (s - row_lse).exp();
            let values = kv.value(seq, t, kv_head);
            for (o, &v) in o.iter_mut().zip(values) {
                *o += p * (v.into() * v_scale);
            }
            if let Some(cond) = cond.as_mut() {
                let (z, abs_dot, bias) = terms[i];
                let rho = key_weight_error(d, z, abs_dot, cap, bias, s, row_lse);
                cond.add_key(p, rho, values.iter().map(|&v| v.into() * v_scale));
            }
        }
        if let (Some(conds), Some(mut cond)) = (conds.as_mut(), cond) {
            if sink > f64::NEG_INFINITY {
                cond.add_sink((sink - row_lse).exp(), sink_weight_error(sink, row_lse));
            }
            conds.push((cond, keys.len()));
        }
        lse[head] = row_lse;
    }
    (out, lse, conds)
}

fn abs_dot<Q: Copy + Into<f64>, T: Copy + Into<f64>>(a: &[Q], b: &[T]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x.into() * y.into()).abs())
        .sum()
}

fn dot<Q: Copy + Into<f64>, T: Copy + Into<f64>>(a: &[Q], b: &[T]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x.into() * y.into()).sum()
}
