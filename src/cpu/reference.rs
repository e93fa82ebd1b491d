//! Reference attention from the definition, accumulated in f64: the oracle every kernel and
//! every faster path is tested against.
//!
//! For query row `j` of sequence `s` (position `p = context_len - query_len + j`) and query
//! head `h` reading K/V head `h / group`:
//!   `score_t = scale * q . k_t` for keys `t in 0..=p`,
//!   `lse = ln(sum_t exp(score_t))` (natural log),
//!   `out = sum_t exp(score_t - lse) * v_t`.

use crate::cpu::KvSource;
use crate::error::{Error, Result};

/// Output of an attention call.
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    /// [num_tokens, n_heads, head_dim] (NaN in rows [`attention_of_tokens`] left out)
    pub out: Vec<f64>,
    /// [num_tokens, n_heads], natural log. `-inf` for a row that sees no key (its `out` is 0);
    /// NaN in rows [`attention_of_tokens`] left out.
    pub lse: Vec<f64>,
}

/// Causal GQA attention of `q` (`[num_tokens, n_heads, head_dim]`, rows of the sequences of
/// `kv.lens()` concatenated in batch order) over `kv`. `scale` defaults to `1/sqrt(head_dim)`.
///
/// ```
/// use paged_gqa::{cpu, GqaShape, SeqLens};
/// let shape = GqaShape::new(2, 1, 8)?;
/// let lens = SeqLens::decode(&[1])?;
/// let (k, v) = (vec![0.5f32; 8], (0..8).map(|i| i as f32).collect::<Vec<_>>());
/// let kv = cpu::ContiguousKv::new(shape, &lens, &k, &v)?;
/// let att = cpu::attention(&[1.0f32; 16], &kv, None)?;
/// assert_eq!(&att.out[8..16], &[0., 1., 2., 3., 4., 5., 6., 7.]); // one key: out = v
/// # Ok::<(), paged_gqa::Error>(())
/// ```
pub fn attention<T, K>(q: &[T], kv: &K, scale: Option<f64>) -> Result<Attention>
where
    T: Copy + Into<f64> + Sync,
    K: KvSource<T> + Sync,
{
    attention_of_tokens(q, kv, scale, &vec![true; kv.lens().num_tokens()])
}

/// [`attention`] for the query rows `token` with `keep[token]` only (`keep`: `[num_tokens]`);
/// every other row's `out` and `lse` are NaN, so a comparison that forgets to skip them fails.
/// For checking long cases against the oracle at a sample of their rows. Rows are computed on
/// all the machine's cores (each exactly as [`attention`] defines it).
pub fn attention_of_tokens<T, K>(
    q: &[T],
    kv: &K,
    scale: Option<f64>,
    keep: &[bool],
) -> Result<Attention>
where
    T: Copy + Into<f64> + Sync,
    K: KvSource<T> + Sync,
{
    let shape = kv.shape();
    let lens = kv.lens();
    let (n_heads, d) = (shape.n_heads(), shape.head_dim());
    let expected = lens.num_tokens() * shape.q_row_len();
    Error::check_len("q", q.len(), expected)?;
    Error::check_len("keep", keep.len(), lens.num_tokens())?;
    let scale = scale.unwrap_or_else(|| shape.default_scale());
    if !scale.is_finite() {
        return Err(Error::InvalidScale { scale });
    }

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
                            let (out, lse) = token_attention(q, kv, scale, seq, j, token);
                            (token, out, lse)
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
    for (token, token_out, token_lse) in results.into_iter().flatten() {
        out[token * n_heads * d..][..n_heads * d].copy_from_slice(&token_out);
        lse[token * n_heads..][..n_heads].copy_from_slice(&token_lse);
    }
    Ok(Attention { out, lse })
}

/// One token's rows: (token, out `[n_heads, head_dim]`, lse `[n_heads]`).
type TokenRows = (usize, Vec<f64>, Vec<f64>);

/// All heads of query row `j` of sequence `seq` (row `token` of `q`): out `[n_heads, head_dim]`
/// and lse `[n_heads]`, from the definition.
fn token_attention<T, K>(
    q: &[T],
    kv: &K,
    scale: f64,
    seq: usize,
    j: usize,
    token: usize,
) -> (Vec<f64>, Vec<f64>)
where
    T: Copy + Into<f64>,
    K: KvSource<T>,
{
    let shape = kv.shape();
    let (n_heads, d) = (shape.n_heads(), shape.head_dim());
    let visible = kv.lens().position(seq, j) + 1; // keys 0..=position
    let mut out = vec![0.0f64; n_heads * d];
    let mut lse = vec![f64::NEG_INFINITY; n_heads];
    let mut scores = Vec::with_capacity(visible);
    for head in 0..n_heads {
        let kv_head = head / shape.group();
        let q_row = &q[(token * n_heads + head) * d..][..d];
        scores.clear();
        scores.extend((0..visible).map(|t| scale * dot(q_row, kv.key(seq, t, kv_head))));
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if max == f64::NEG_INFINITY {
            continue; // no visible key: out stays 0, lse stays -inf
        }
        let row_lse = max + scores.iter().map(|s| (s - max).exp()).sum::<f64>().ln();
        let o = &mut out[head * d..][..d];
        for (t, &s) in scores.iter().enumerate() {
            let p = (s - row_lse).exp();
            for (o, &v) in o.iter_mut().zip(kv.value(seq, t, kv_head)) {
                *o += p * v.into();
            }
        }
        lse[head] = row_lse;
    }
    (out, lse)
}

fn dot<T: Copy + Into<f64>>(a: &[T], b: &[T]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x.into() * y.into()).sum()
}
