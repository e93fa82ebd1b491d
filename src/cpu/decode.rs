//! Fused GQA decode on the CPU: the fallback backend. f32 arithmetic, threads over
//! (sequence, K/V head) pairs, and, like the GPU kernel, each K and V row is read and converted
//! once for the whole group of query heads that share it.

use std::num::NonZeroUsize;
use std::thread;

use crate::cpu::{gather_paged, repeat_kv, ContiguousKv, KvSource, PagedKv};
use crate::error::{Error, Result};

/// Decode attention of `q` (`[batch, n_heads, head_dim]`, one row per sequence) over `kv`
/// (paged or contiguous), into `out` (`[batch, n_heads, head_dim]`) and `lse`
/// (`[batch, n_heads]`, natural log). `scale` defaults to `1/sqrt(head_dim)`.
pub fn decode<T, K>(
    q: &[T],
    kv: &K,
    scale: Option<f64>,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()>
where
    T: Copy + Into<f32> + Sync,
    K: KvSource<T> + Sync,
{
    let shape = kv.shape();
    let lens = kv.lens();
    if let Some(seq) = (0..lens.batch()).find(|&s| lens.query_len(s) != 1) {
        return Err(Error::NotDecode {
            seq,
            query_len: lens.query_len(seq),
        });
    }
    let rows = lens.batch() * shape.n_heads();
    Error::check_len("q", q.len(), rows * shape.head_dim())?;
    Error::check_len("out", out.len(), rows * shape.head_dim())?;
    Error::check_len("lse", lse.len(), rows)?;
    let scale = scale.unwrap_or_else(|| shape.default_scale());
    if !scale.is_finite() {
        return Err(Error::InvalidScale { scale });
    }
    let (group, d, n_kv) = (shape.group(), shape.head_dim(), shape.n_kv_heads());

    // Work item i = (seq, kv_head) = (i / n_kv, i % n_kv) owns `group` consecutive output rows.
    let items: Vec<(usize, GroupOutput)> = out
        .chunks_mut(group * d)
        .zip(lse.chunks_mut(group))
        .enumerate()
        .collect();
    let threads = thread::available_parallelism()
        .map_or(1, NonZeroUsize::get)
        .min(items.len())
        .max(1);
    let per_thread = items.len().div_ceil(threads);
    let mut items = items.into_iter();
    thread::scope(|scope| {
        for _ in 0..threads {
            let chunk: Vec<_> = items.by_ref().take(per_thread).collect();
            scope.spawn(move || {
                let mut state = GroupState::new(group, d);
                for (item, (out, lse)) in chunk {
                    let (seq, kv_head) = (item / n_kv, item % n_kv);
                    let q_rows = &q[(seq * shape.n_heads() + kv_head * group) * d..][..group * d];
                    state.run(q_rows, scale as f32, kv, seq, kv_head, out, lse);
                }
            });
        }
    });
    Ok(())
}

/// The output rows `[group, head_dim]` and lse `[group]` of one (sequence, K/V head).
type GroupOutput<'a> = (&'a mut [f32], &'a mut [f32]);

/// Online-softmax state of one (sequence, K/V head): `group` query heads.
struct GroupState {
    d: usize,
    /// [group, d] scaled queries
    q: Vec<f32>,
    /// [d] the current K and V rows in f32
    k: Vec<f32>,
    v: Vec<f32>,
    /// [group] running max of the scores
    m: Vec<f32>,
    /// [group] running sum of exp(score - m)
    l: Vec<f32>,
}

impl GroupState {
    fn new(group: usize, d: usize) -> Self {
        Self {
            d,
            q: vec![0.0; group * d],
            k: vec![0.0; d],
            v: vec![0.0; d],
            m: vec![0.0; group],
            l: vec![0.0; group],
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run<T: Copy + Into<f32>>(
        &mut self,
        q_rows: &[T],
        scale: f32,
        kv: &impl KvSource<T>,
        seq: usize,
        kv_head: usize,
        out: &mut [f32],
        lse: &mut [f32],
    ) {
        let d = self.d;
        for (dst, &x) in self.q.iter_mut().zip(q_rows) {
            *dst = x.into() * scale;
        }
        self.m.fill(f32::NEG_INFINITY);
        self.l.fill(0.0);
        out.fill(0.0); // the running (unnormalised) outputs
        for t in 0..kv.lens().context_len(seq) {
            for (dst, &x) in self.k.iter_mut().zip(kv.key(seq, t, kv_head)) {
                *dst = x.into();
            }
            for (dst, &x) in self.v.iter_mut().zip(kv.value(seq, t, kv_head)) {
                *dst = x.into();
            }
            for (g, acc) in out.chunks_mut(d).enumerate() {
                let score: f32 = self.q[g * d..][..d]
                    .iter()
                    .zip(&self.k)
                    .map(|(a, b)| a * b)
                    .sum();
                let (m, l) = (&mut self.m[g], &mut self.l[g]);
                if score > *m {
                    let alpha = (*m - score).exp(); // 0 on the first key (m = -inf)
                    *l = *l * alpha + 1.0;
                    for (a, &v) in acc.iter_mut().zip(&self.v) {
                        *a = *a * alpha + v;
                    }
                    *m = score;
                } else {
                    let p = (score - *m).exp();
                    *l += p;
                    for (a, &v) in acc.iter_mut().zip(&self.v) {
                        *a += p * v;
                    }
                }
            }
        }
        for (g, acc) in out.chunks_mut(d).enumerate() {
            let l = self.l[g];
            if l > 0.0 {
                acc.iter_mut().for_each(|a| *a /= l);
                lse[g] = self.m[g] + l.ln();
            } else {
                lse[g] = f32::NEG_INFINITY;
            }
        }
    }
}

/// The naive path on the CPU, the benchmarks' baseline: gather the pages into contiguous K/V,
/// materialise `repeat_kv`, then decode with one K/V head per query head (each head reads its
/// own copy). Same contract and result as [`decode`].
pub fn decode_naive<T>(
    q: &[T],
    kv: &PagedKv<'_, T>,
    scale: Option<f64>,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()>
where
    T: Copy + Into<f32> + Sync,
{
    let shape = kv.shape();
    let lens = kv.lens();
    let (k, v) = gather_paged(kv);
    let k = repeat_kv(&k, shape, lens.total_keys())?;
    let v = repeat_kv(&v, shape, lens.total_keys())?;
    let mha = ContiguousKv::new(shape.repeated(), lens, &k, &v)?;
    decode(
        q,
        &mha,
        Some(scale.unwrap_or_else(|| shape.default_scale())),
        out,
        lse,
    )
}
