//! Helpers of the candle tests: random paged cases whose unused memory is poisoned, and the
//! attention they are checked against, written with plain candle ops from the definition
//! (gather, `repeat_kv`, matmul, masked softmax) in f64.
#![allow(dead_code)] // each test binary uses a different subset

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use paged_gqa::{GqaShape, SeqLens};
use rand::rngs::{SmallRng, StdRng};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// A random paged batch as candle tensors. Pages are handed out in shuffled order; every page
/// no sequence uses, every slot past a sequence's last key, and every table entry past a
/// sequence's pages points at NaN, so attention that reads one fails.
pub struct Case {
    pub shape: GqaShape,
    pub block_size: usize,
    pub num_blocks: usize,
    pub lens: SeqLens,
    /// [batch][max_blocks]
    pub tables: Vec<Vec<u32>>,
    pub max_blocks: usize,
    /// [num_blocks, block_size, n_kv_heads, head_dim]
    pub k_cache: Tensor,
    pub v_cache: Tensor,
    /// [num_tokens, n_heads, head_dim]
    pub q: Tensor,
}

/// `n` values uniform in [-1, 1), from a small generator seeded from `rng` (ChaCha, built
/// unoptimised in test builds, is slow for caches of millions of values).
pub fn uniform(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let mut fast = SmallRng::seed_from_u64(rng.random());
    (0..n).map(|_| fast.random_range(-1.0f32..1.0)).collect()
}

impl Case {
    /// A case with these lengths, in `dtype` on `device`.
    pub fn random(
        rng: &mut StdRng,
        shape: GqaShape,
        block_size: usize,
        context_lens: &[usize],
        query_lens: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let lens = SeqLens::new(context_lens, query_lens).unwrap();
        let pages: Vec<usize> = context_lens
            .iter()
            .map(|l| l.div_ceil(block_size))
            .collect();
        let max_blocks = pages.iter().copied().max().unwrap_or(0) + 1; // one padding entry at least
        let num_blocks = pages.iter().sum::<usize>() + 2; // two pages nobody uses
        let mut free: Vec<u32> = (0..num_blocks as u32).collect();
        free.shuffle(rng);
        let poisoned_page = free[0]; // never handed out: the padding entries point here
        let mut tables = vec![vec![poisoned_page; max_blocks]; context_lens.len()];
        let row = shape.kv_row_len();
        let mut k = uniform(rng, num_blocks * block_size * row);
        let mut v = uniform(rng, num_blocks * block_size * row);
        let mut used = vec![false; num_blocks * block_size];
        for (seq, (table, &n)) in tables.iter_mut().zip(&pages).enumerate() {
            for (index, entry) in table.iter_mut().take(n).enumerate() {
                let block = free.pop().unwrap();
                *entry = block;
                for offset in 0..block_size {
                    if index * block_size + offset < context_lens[seq] {
                        used[block as usize * block_size + offset] = true;
                    }
                }
            }
        }
        for (slot, &used) in used.iter().enumerate() {
            if !used {
                k[slot * row..][..row].fill(f32::NAN);
                v[slot * row..][..row].fill(f32::NAN);
            }
        }
        let dims = (num_blocks, block_size, shape.n_kv_heads(), shape.head_dim());
        let q = uniform(rng, lens.num_tokens() * shape.q_row_len());
        let q_dims = (lens.num_tokens(), shape.n_heads(), shape.head_dim());
        Ok(Self {
            k_cache: Tensor::from_vec(k, dims, device)?.to_dtype(dtype)?,
            v_cache: Tensor::from_vec(v, dims, device)?.to_dtype(dtype)?,
            q: Tensor::from_vec(q, q_dims, device)?.to_dtype(dtype)?,
            shape,
            block_size,
            num_blocks,
            lens,
            tables,
            max_blocks,
        })
    }

    /// The block tables as a `[batch, max_blocks]` u32 tensor.
    pub fn block_tables(&self, device: &Device) -> Result<Tensor> {
        Tensor::new(self.tables.clone(), device)
    }

    /// The block tables as a `[batch, max_blocks]` i32 tensor.
    pub fn block_tables_i32(&self, device: &Device) -> Result<Tensor> {
        let rows: Vec<Vec<i32>> = self
            .tables
            .iter()
            .map(|r| r.iter().map(|&b| b as i32).collect())
            .collect();
        Tensor::new(rows, device)
    }

    pub fn context_lens(&self, device: &Device) -> Result<Tensor> {
        let v: Vec<u32> = self.lens.context_lens().iter().map(|&l| l as u32).collect();
        Tensor::new(v, device)
    }

    pub fn query_lens(&self, device: &Device) -> Result<Tensor> {
        let v: Vec<u32> = (0..self.lens.batch())
            .map(|s| self.lens.query_len(s) as u32)
            .collect();
        Tensor::new(v, device)
    }

    /// Plain candle attention over the case's pages, from the definition, in f64.
    pub fn reference(&self, scale: Option<f64>) -> Result<(Tensor, Tensor)> {
        reference_paged(
            &self.q,
            &self.k_cache,
            &self.v_cache,
            &self.tables,
            &self.lens,
            scale,
        )
    }
}

/// `repeat_kv` of the Llama code: `[tokens, n_kv_heads, d]` -> `[tokens, n_kv_heads * n_rep,
/// d]`, head `h` a copy of head `h / n_rep`.
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    let (tokens, n_kv, d) = x.dims3()?;
    x.unsqueeze(2)?
        .expand((tokens, n_kv, n_rep, d))?
        .reshape((tokens, n_kv * n_rep, d))
}

/// Causal (bottom-right) attention of `q` `[q_len, n_heads, d]` over contiguous `k`, `v`
/// `[ctx, n_kv_heads, d]` with plain candle ops in f64: repeat_kv, `q k^T * scale`, the causal
/// mask, softmax, `p v`. Returns out `[q_len, n_heads, d]` and lse `[q_len, n_heads]`.
pub fn reference_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: Option<f64>,
) -> Result<(Tensor, Tensor)> {
    let (q_len, n_heads, d) = q.dims3()?;
    let (ctx, n_kv, _) = k.dims3()?;
    let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
    let f64_heads = |x: &Tensor| -> Result<Tensor> {
        repeat_kv(&x.to_dtype(DType::F64)?, n_heads / n_kv)?
            .transpose(0, 1)?
            .contiguous()
    };
    let (k, v) = (f64_heads(k)?, f64_heads(v)?); // [n_heads, ctx, d]
    let q = q.to_dtype(DType::F64)?.transpose(0, 1)?.contiguous()?; // [n_heads, q_len, d]
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?; // [n_heads, q_len, ctx]
    let first = ctx - q_len; // query row j sits at position first + j
    let mask: Vec<f64> = (0..q_len)
        .flat_map(|j| {
            (0..ctx).map(move |t| {
                if t <= first + j {
                    0.0
                } else {
                    f64::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (q_len, ctx), q.device())?;
    let scores = scores.broadcast_add(&mask)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let exp = scores.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    let p = exp.broadcast_div(&sum)?;
    let out = p.matmul(&v)?.transpose(0, 1)?.contiguous()?; // [q_len, n_heads, d]
    let lse = (max + sum.log()?)?.squeeze(D::Minus1)?.t()?.contiguous()?; // [q_len, n_heads]
    Ok((out, lse))
}

/// [`reference_attention`] of every sequence of a paged batch: its keys gathered from the pages
/// through its block table (`[batch][max_blocks]`), its query rows in batch order.
pub fn reference_paged(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    tables: &[Vec<u32>],
    lens: &SeqLens,
    scale: Option<f64>,
) -> Result<(Tensor, Tensor)> {
    let (num_blocks, block_size, n_kv, d) = k_cache.dims4()?;
    let flat = |c: &Tensor| c.reshape((num_blocks * block_size, n_kv, d));
    let (k_flat, v_flat) = (flat(k_cache)?, flat(v_cache)?);
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for (seq, table) in tables.iter().enumerate().take(lens.batch()) {
        let rows = lens.query_rows(seq);
        if rows.is_empty() {
            continue;
        }
        let slots: Vec<u32> = (0..lens.context_len(seq))
            .map(|p| table[p / block_size] * block_size as u32 + (p % block_size) as u32)
            .collect();
        let slots = Tensor::new(slots, q.device())?;
        let k = k_flat.index_select(&slots, 0)?;
        let v = v_flat.index_select(&slots, 0)?;
        let q_rows = q.i(rows.start..rows.end)?;
        let (out, lse) = reference_attention(&q_rows, &k, &v, scale)?;
        outs.push(out);
        lses.push(lse);
    }
    let n_heads = q.dim(1)?;
    if outs.is_empty() {
        let empty = Tensor::zeros((0, n_heads, d), DType::F64, q.device())?;
        return Ok((
            empty.clone(),
            Tensor::zeros((0, n_heads), DType::F64, q.device())?,
        ));
    }
    Ok((Tensor::cat(&outs, 0)?, Tensor::cat(&lses, 0)?))
}

/// A tensor's values as f64 on the host.
pub fn host_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// `||got - want|| / ||want||` and `max |got - want|`; NaN anywhere in `got` makes both NaN.
pub fn errors(got: &Tensor, want: &Tensor) -> Result<(f64, f64)> {
    let (got, want) = (host_f64(got)?, host_f64(want)?);
    assert_eq!(got.len(), want.len());
    let mut diff2 = 0.0;
    let mut norm2 = 0.0;
    let mut max_abs: f64 = 0.0;
    for (g, w) in got.iter().zip(&want) {
        let d = g - w;
        diff2 += d * d;
        norm2 += w * w;
        max_abs = if d.is_nan() {
            f64::NAN
        } else {
            max_abs.max(d.abs())
        };
    }
    Ok(((diff2 / norm2.max(f64::MIN_POSITIVE)).sqrt(), max_abs))
}

/// The bounds an output in `dtype` must meet against the f64 reference: relative L2 error and
/// max absolute error of `out` (values in [-1, 1]), and max absolute error of `lse`.
pub fn tolerance(dtype: DType) -> (f64, f64, f64) {
    match dtype {
        DType::F32 => (1e-5, 1e-5, 1e-4),
        DType::F16 => (2e-3, 4e-3, 1e-4),
        DType::BF16 => (1e-2, 2e-2, 1e-4),
        other => panic!("no tolerance for {other:?}"),
    }
}

/// Checks `out` and `lse` against the reference; returns a description of the failure.
pub fn check(
    what: &str,
    dtype: DType,
    (out, lse): (&Tensor, &Tensor),
    (want_out, want_lse): (&Tensor, &Tensor),
) -> std::result::Result<(), String> {
    let (rel, max_abs, lse_abs) = tolerance(dtype);
    if out.dtype() != dtype {
        return Err(format!(
            "{what}: out is {:?}, expected {dtype:?}",
            out.dtype()
        ));
    }
    if out.dims() != want_out.dims() || lse.dims() != want_lse.dims() {
        return Err(format!(
            "{what}: shapes out {:?} lse {:?}, expected {:?} {:?}",
            out.dims(),
            lse.dims(),
            want_out.dims(),
            want_lse.dims()
        ));
    }
    let (out_rel, out_max) = errors(out, want_out).map_err(|e| e.to_string())?;
    let (_, lse_max) = errors(lse, want_lse).map_err(|e| e.to_string())?;
    // NaN fails every comparison below.
    if !(out_rel <= rel && out_max <= max_abs && lse_max <= lse_abs) {
        return Err(format!(
            "{what}: out rel {out_rel:.2e} (bound {rel:.0e}), max abs {out_max:.2e} (bound \
             {max_abs:.0e}); lse max abs {lse_max:.2e} (bound {lse_abs:.0e})"
        ));
    }
    Ok(())
}

/// The GQA shapes of the parity tests: (n_heads, n_kv_heads, head_dim), groups 1, 4, 7, 8, 71.
pub const RATIOS: [(usize, usize, usize); 5] = [
    (8, 8, 64),
    (32, 8, 128),
    (28, 4, 64),
    (16, 2, 64),
    (71, 1, 64),
];

/// Page sizes of the parity tests.
pub const PAGES: [usize; 3] = [1, 16, 256];

/// Element types of the parity tests.
pub const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// The text of a candle error, which must carry the crate's error message.
pub fn assert_error<T: std::fmt::Debug>(result: Result<T>, expected: paged_gqa::Error) {
    match result {
        Ok(v) => panic!("expected the error \"{expected}\", got Ok({v:?})"),
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains(&expected.to_string()),
                "expected the error \"{expected}\", got \"{text}\""
            );
        }
    }
}
