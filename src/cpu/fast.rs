//! Fused GQA attention on the CPU: the fallback backend, for any mix of query lengths. f32
//! arithmetic, threads over (sequence, K/V head) pairs, and, like the GPU kernel, each K and V
//! row is read and converted once for every query row and head of the group that sees it.

use std::num::NonZeroUsize;
use std::thread;

use crate::batch::SeqLens;
use crate::cpu::repeat_kv::gather_repeated;
use crate::cpu::{ContiguousKv, KvSource, PagedKv};
use crate::error::{Error, Result};
use crate::variants::{AttendOptions, KeyMask};

/// Query rows (tokens) per tile of a sequence's prompt in the CPU attention.
const TILE_TOKENS: usize = 16;

/// GQA attention of `q` (`[num_tokens, n_heads, head_dim]`, the query rows of the sequences of
/// `kv.lens()` in batch order) over `kv` (paged or contiguous; fp8 pages dequantized to f32 as
/// each row is read: stored value times the head's scale), into `out`
/// (`[num_tokens, n_heads, head_dim]`) and `lse` (`[num_tokens, n_heads]`, natural log), with
/// the variants of `options` (see [`crate::variants`]; causal, `scale = 1/sqrt(head_dim)` by
/// default).
pub fn attend<Q, T, K>(
    q: &[Q],
    kv: &K,
    options: &AttendOptions,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()>
where
    Q: Copy + Into<f32> + Sync,
    T: Copy + Into<f32>,
    K: KvSource<T> + Sync,
{
    let shape = kv.shape();
    let lens = kv.lens();
    let rows = lens.num_tokens() * shape.n_heads();
    Error::check_len("q", q.len(), rows * shape.head_dim())?;
    Error::check_len("out", out.len(), rows * shape.head_dim())?;
    Error::check_len("lse", lse.len(), rows)?;
    options.validate(shape)?;
    kv.check_visible(options.mask())?;
    let n_kv = shape.n_kv_heads();
    let items: Vec<usize> = (0..lens.batch() * n_kv)
        .filter(|i| lens.query_len(i / n_kv) > 0)
        .collect();
    let threads = thread::available_parallelism()
        .map_or(1, NonZeroUsize::get)
        .min(items.len())
        .max(1);
    let per_thread = items.len().div_ceil(threads);
    // Each thread returns its items' rows; they are scattered into `out` afterwards.
    let results: Vec<Vec<(usize, Group)>> = thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(per_thread.max(1))
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|&i| (i, Group::run(q, options, kv, i / n_kv, i % n_kv)))
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("attention thread"))
            .collect()
    });
    let (d, group) = (shape.head_dim(), shape.group());
    for (item, result) in results.into_iter().flatten() {
        let (seq, kv_head) = (item / n_kv, item % n_kv);
        for (j, token) in lens.query_rows(seq).enumerate() {
            for g in 0..group {
                let row = token * shape.n_heads() + kv_head * group + g;
                let r = j * group + g;
                out[row * d..][..d].copy_from_slice(&result.out[r * d..][..d]);
                lse[row] = result.lse[r];
            }
        }
    }
    Ok(())
}

/// The outputs of one (sequence, K/V head): rows (query row j, head g) at `j * group + g`.
struct Group {
    /// [rows, d]
    out: Vec<f32>,
    /// [rows]
    lse: Vec<f32>,
}

impl Group {
    fn run<Q: Copy + Into<f32>, T: Copy + Into<f32>>(
        q: &[Q],
        options: &AttendOptions,
        kv: &impl KvSource<T>,
        seq: usize,
        kv_head: usize,
    ) -> Self {
        let (shape, lens): (_, &SeqLens) = (kv.shape(), kv.lens());
        let (d, group, n_heads) = (shape.head_dim(), shape.group(), shape.n_heads());
        let scale = options.scale_for(shape) as f32;
        let heads = kv_head * group..(kv_head + 1) * group; // the group's query heads
        let scores = Scores {
            cap: options.logit_softcap(),
            slopes: options.alibi_slopes().map(|s| &s[heads.clone()]),
            group,
            first_position: lens.context_len(seq) - lens.query_len(seq),
        };
        let mask = options.mask();
        let (context_len, query_len) = (lens.context_len(seq), lens.query_len(seq));
        let first_position = scores.first_position; // of query row 0
        let rows = query_len * group;
        let mut qs = vec![0.0f32; rows * d];
        for (j, token) in lens.query_rows(seq).enumerate() {
            for g in 0..group {
                let src = &q[(token * n_heads + kv_head * group + g) * d..][..d];
                for (dst, &x) in qs[(j * group + g) * d..][..d].iter_mut().zip(src) {
                    *dst = x.into() * scale;
                }
            }
        }
        let (mut m, mut l) = (vec![f32::NEG_INFINITY; rows], vec![0.0f32; rows]);
        let mut out = vec![0.0f32; rows * d];
        let (mut k, mut v) = (vec![0.0f32; d], vec![0.0f32; d]);
        let (k_scale, v_scale) = kv.scales(kv_head); // 1 but for fp8 pages
                                                     // Query rows in tiles of TILE_TOKENS, so a tile's queries and outputs stay in cache
                                                     // while every key it sees streams past (a prompt's rows would not fit at once); each
                                                     // tile reads the keys from its first row's window start to its last row's limit.
        for j_start in (0..query_len).step_by(TILE_TOKENS) {
            let j_end = (j_start + TILE_TOKENS).min(query_len);
            let keys = mask.visible_keys(context_len, query_len, j_start).start
                ..mask.visible_keys(context_len, query_len, j_end - 1).end;
            for t in keys {
                for (dst, &x) in k.iter_mut().zip(kv.key(seq, t, kv_head)) {
                    *dst = x.into() * k_scale;
                }
                for (dst, &x) in v.iter_mut().zip(kv.value(seq, t, kv_head)) {
                    *dst = x.into() * v_scale;
                }
                let (j_first, j_last) = rows_seeing(mask, first_position, t);
                let rows =
                    j_first.clamp(j_start, j_end) * group..j_last.clamp(j_start, j_end) * group;
                update_rows(rows, d, &scores, t, &qs, &k, &v, &mut m, &mut l, &mut out);
            }
        }
        let mut lse = vec![f32::NEG_INFINITY; rows];
        for r in 0..rows {
            let sink = options
                .sinks()
                .map_or(f32::NEG_INFINITY, |s| s[heads.start + r % group]);
            let top = m[r].max(sink);
            if top == f32::NEG_INFINITY {
                out[r * d..][..d].fill(0.0); // no key, no sink
                continue;
            }
            // The keys' sum is l * e^(m - top); the sink adds e^(sink - top), and no value.
            let keys = if l[r] > 0.0 { (m[r] - top).exp() } else { 0.0 };
            let z = l[r] * keys + (sink - top).exp();
            out[r * d..][..d].iter_mut().for_each(|a| *a *= keys / z);
            lse[r] = top + z.ln();
        }
        Self { out, lse }
    }
}

/// The query rows `j_first..j_last` of a sequence (query row 0 at `first_position`) whose
/// visible keys under `mask` include key `t` (clamp to the rows that exist).
fn rows_seeing(mask: KeyMask, first_position: usize, t: usize) -> (usize, usize) {
    // Causal: row j sees t when first_position + j >= t.
    let j_first = if mask.causal {
        t.saturating_sub(first_position)
    } else {
        0
    };
    // Window: row j sees t when first_position + j - window_left <= t.
    let j_last = mask
        .window_left
        .map_or(usize::MAX, |w| (t + w + 1).saturating_sub(first_position));
    (j_first, j_last)
}

/// How a group's scores are shaped beyond `scale * q . k` (already in `qs`).
struct Scores<'a> {
    /// Soft-cap (0: off).
    cap: f32,
    /// ALiBi slopes of the group's heads, `[group]`.
    slopes: Option<&'a [f32]>,
    group: usize,
    /// Position of query row 0.
    first_position: usize,
}

impl Scores<'_> {
    /// Score of row `r` (query row `r / group`, head `r % group` of the group) for key `t`, from
    /// `dot = scale * q . k`.
    fn score(&self, dot: f32, r: usize, t: usize) -> f32 {
        let mut s = dot;
        if self.cap > 0.0 {
            s = self.cap * (s / self.cap).tanh(); // tanh saturates: no NaN for huge s
        }
        if let Some(slopes) = self.slopes {
            let position = self.first_position + r / self.group;
            s += slopes[r % self.group] * (t as f32 - position as f32);
        }
        s
    }
}

/// Online-softmax update of `rows` (each `d` wide in `qs` and `out`) with one key `k` (key `t`
/// of the sequence) and its value `v`: running max `m`, running sum `l`, unnormalised output.
#[allow(clippy::too_many_arguments)]
fn update_rows(
    rows: std::ops::Range<usize>,
    d: usize,
    scores: &Scores<'_>,
    t: usize,
    qs: &[f32],
    k: &[f32],
    v: &[f32],
    m: &mut [f32],
    l: &mut [f32],
    out: &mut [f32],
) {
    for r in rows {
        let score = scores.score(dot(&qs[r * d..][..d], k), r, t);
        let acc = &mut out[r * d..][..d];
        if score > m[r] {
            let alpha = (m[r] - score).exp(); // 0 on the row's first key (m = -inf)
            l[r] = l[r] * alpha + 1.0;
            for (a, &x) in acc.iter_mut().zip(v) {
                *a = *a * alpha + x;
            }
            m[r] = score;
        } else {
            let p = (score - m[r]).exp();
            l[r] += p;
            for (a, &x) in acc.iter_mut().zip(v) {
                *a += p * x;
            }
        }
    }
}

/// `a . b` over rows whose length is a multiple of 8 (GqaShape guarantees it for head_dim):
/// eight independent partial sums, which the compiler keeps in vector registers, instead of
/// one serial chain of additions.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum()
}

/// The naive path on the CPU, the benchmarks' baseline: gather the pages into contiguous K/V,
/// materialise `repeat_kv`, then attention with one K/V head per query head (each head reads
/// its own copy). Same contract and result as [`attend`].
pub fn attend_naive<Q, T>(
    q: &[Q],
    kv: &PagedKv<'_, T>,
    options: &AttendOptions,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()>
where
    Q: Copy + Into<f32> + Sync,
    T: Copy + Into<f32> + Sync,
{
    let (k, v, scales) = gather_repeated(kv)?;
    let mha = ContiguousKv::new(kv.shape().repeated(), kv.lens(), &k, &v)?.with_scales(&scales)?;
    // Sinks and slopes are per query head, and the default scale per head_dim: repeat_kv
    // keeps both.
    attend(q, &mha, options, out, lse)
}
