//! The naive GQA path an engine without GQA-aware kernels takes: gather the pages into
//! contiguous K/V, materialise `repeat_kv`, then plain multi-head attention.

use crate::cpu::{attention, Attention, ContiguousKv, KvSource, PagedKv};
use crate::error::{Error, Result};
use crate::fp8::KvScales;
use crate::shape::GqaShape;
use crate::variants::{AttendOptions, KeyMask};

/// `repeat_kv` of the Llama reference code on `x` (`[num_tokens, n_kv_heads, head_dim]`):
/// `x[:, :, None, :].expand(t, n_kv, n_rep, d).reshape(t, n_kv * n_rep, d)`, so output head
/// `h` is a copy of input head `h / n_rep`. Returns `[num_tokens, n_heads, head_dim]`.
///
/// ```
/// use paged_gqa::{cpu, GqaShape};
/// let shape = GqaShape::new(4, 2, 8)?;
/// let x: Vec<u16> = (0..16).collect(); // one token, K/V heads [0..8) and [8..16)
/// let out = cpu::repeat_kv(&x, shape, 1)?;
/// assert_eq!(&out[8..16], &x[0..8]); // head 1 reads kv head 0
/// assert_eq!(&out[16..24], &x[8..16]); // head 2 reads kv head 1
/// # Ok::<(), paged_gqa::Error>(())
/// ```
pub fn repeat_kv<T: Copy>(x: &[T], shape: GqaShape, num_tokens: usize) -> Result<Vec<T>> {
    let expected = num_tokens * shape.kv_row_len();
    Error::check_len("x", x.len(), expected)?;
    let (n_kv, n_rep, d) = (shape.n_kv_heads(), shape.group(), shape.head_dim());
    let mut out = Vec::with_capacity(num_tokens * shape.q_row_len());
    for token in 0..num_tokens {
        for kv_head in 0..n_kv {
            let row = &x[(token * n_kv + kv_head) * d..][..d];
            for _ in 0..n_rep {
                out.extend_from_slice(row);
            }
        }
    }
    Ok(out)
}

/// Copies the K and V rows of every sequence out of the pages into contiguous
/// `[total_keys, n_kv_heads, head_dim]` tensors, sequences concatenated in batch order: the
/// stored values (fp8 pages' scales stay with [`PagedKv::kv_scales`]).
pub fn gather_paged<T: Copy>(paged: &PagedKv<'_, T>) -> Result<(Vec<T>, Vec<T>)> {
    // Every key is gathered: none may lie in a page a sliding window reclaimed.
    paged.check_visible(KeyMask {
        causal: false,
        window_left: None,
    })?;
    let lens = paged.lens();
    let shape = paged.shape();
    let len = lens.total_keys() * shape.kv_row_len();
    let (mut k, mut v) = (Vec::with_capacity(len), Vec::with_capacity(len));
    for seq in 0..lens.batch() {
        for pos in 0..lens.context_len(seq) {
            for kv_head in 0..shape.n_kv_heads() {
                k.extend_from_slice(paged.key(seq, pos, kv_head));
                v.extend_from_slice(paged.value(seq, pos, kv_head));
            }
        }
    }
    Ok((k, v))
}

/// `paged` as the naive paths see it: the pages gathered, every K/V head repeated for its
/// group (`k` and `v` `[total_keys, n_heads, head_dim]`), and the fp8 scales repeated with
/// their heads (`[n_heads]` each; ones when `paged` has none).
pub fn gather_repeated<T: Copy>(paged: &PagedKv<'_, T>) -> Result<(Vec<T>, Vec<T>, KvScales)> {
    let shape = paged.shape();
    let total_keys = paged.lens().total_keys();
    let (k, v) = gather_paged(paged)?;
    let heads = 0..shape.n_heads();
    let (k_scales, v_scales) = heads.map(|h| paged.scales(h / shape.group())).unzip();
    Ok((
        repeat_kv(&k, shape, total_keys)?,
        repeat_kv(&v, shape, total_keys)?,
        KvScales::new(k_scales, v_scales)?,
    ))
}

/// The naive path: gather the pages, materialise `repeat_kv` for K and V, then attention with
/// one K/V head per query head. Same contract and result as [`attention`] over `paged`.
pub fn attention_naive<Q, T>(
    q: &[Q],
    paged: &PagedKv<'_, T>,
    options: &AttendOptions,
) -> Result<Attention>
where
    Q: Copy + Into<f64> + Sync,
    T: Copy + Into<f64> + Sync,
{
    let (k, v, scales) = gather_repeated(paged)?;
    let mha =
        ContiguousKv::new(paged.shape().repeated(), paged.lens(), &k, &v)?.with_scales(&scales)?;
    // The default scale depends on head_dim only, and sinks and slopes are per query head:
    // repeat_kv keeps both.
    attention(q, &mha, options)
}
