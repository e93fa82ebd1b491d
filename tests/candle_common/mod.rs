//! Helpers of the candle tests: random paged cases whose unused memory is poisoned, and the
//! attention they are checked against, written with plain candle ops from the definition
//! (gather, `repeat_kv`, matmul, masked softmax) in f64.
#![allow(dead_code)] // each test binary uses a different subset

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use paged_gqa::cache::{CacheConfig, PagedCache};
use paged_gqa::candle::CandleStorage;
use paged_gqa::cpu::{Accumulation, Conditioning, RoundingModel};
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
    pub fn reference(&self, scale: Option<f64>) -> Result<Reference> {
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

/// The f64 reference of a batch's rows: out `[rows, n_heads, d]`, lse `[rows, n_heads]`, and the
/// conditioning of each row (see `paged_gqa::cpu::Conditioning`), all computed with plain candle
/// ops, so a kernel's output can be held to its own forward-error bound per element.
#[derive(Debug, Clone)]
pub struct Reference {
    pub out: Tensor,
    pub lse: Tensor,
    /// `sum_t P_t |v_t|`, `sum_t P_t rho_t |v_t|`, `sqrt(sum_t P_t^2 v_t^2)`: `[rows, n_heads, d]`.
    pub weighted_abs_v: Tensor,
    pub weighted_rho_abs_v: Tensor,
    pub weight_norm_v: Tensor,
    /// `sum_t P_t rho_t` and the number of keys: `[rows, n_heads]`.
    pub weighted_rho: Tensor,
    pub keys: Tensor,
}

impl Reference {
    /// The rows of several references, in order.
    pub fn cat(parts: &[Reference]) -> Result<Reference> {
        let cat =
            |f: fn(&Reference) -> &Tensor| Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0);
        Ok(Reference {
            out: cat(|r| &r.out)?,
            lse: cat(|r| &r.lse)?,
            weighted_abs_v: cat(|r| &r.weighted_abs_v)?,
            weighted_rho_abs_v: cat(|r| &r.weighted_rho_abs_v)?,
            weight_norm_v: cat(|r| &r.weight_norm_v)?,
            weighted_rho: cat(|r| &r.weighted_rho)?,
            keys: cat(|r| &r.keys)?,
        })
    }

    /// No rows, `n_heads` heads of `d`.
    pub fn empty(n_heads: usize, d: usize, device: &Device) -> Result<Reference> {
        let rows = Tensor::zeros((0, n_heads, d), DType::F64, device)?;
        let heads = Tensor::zeros((0, n_heads), DType::F64, device)?;
        Ok(Reference {
            out: rows.clone(),
            lse: heads.clone(),
            weighted_abs_v: rows.clone(),
            weighted_rho_abs_v: rows.clone(),
            weight_norm_v: rows,
            weighted_rho: heads.clone(),
            keys: heads,
        })
    }

    /// The library's view of the conditioning, for `paged_gqa::cpu::RoundingModel::bounds`.
    pub fn conditioning(&self) -> Result<(paged_gqa::cpu::Attention, Conditioning)> {
        Ok((
            paged_gqa::cpu::Attention {
                out: host_f64(&self.out)?,
                lse: host_f64(&self.lse)?,
            },
            Conditioning {
                weighted_abs_v: host_f64(&self.weighted_abs_v)?,
                weighted_rho_abs_v: host_f64(&self.weighted_rho_abs_v)?,
                weight_norm_v: host_f64(&self.weight_norm_v)?,
                weighted_rho: host_f64(&self.weighted_rho)?,
                keys: host_f64(&self.keys)?,
            },
        ))
    }
}

/// Causal (bottom-right) attention of `q` `[q_len, n_heads, d]` over contiguous `k`, `v`
/// `[ctx, n_kv_heads, d]` with plain candle ops in f64: repeat_kv, `q k^T * scale`, the causal
/// mask, softmax, `p v`; with each row's conditioning (the relative weight error `rho_t` of
/// key `t`: `2 (d + 2) u |q| . |k_t| scale + u (4 |s_t| + 2 |s_t - lse| + 8)`, `u = 2^-24`, as
/// `paged_gqa::cpu`'s error-bound docs derive it).
pub fn reference_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: Option<f64>,
) -> Result<Reference> {
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
    let raw = (q.matmul(&k.t()?.contiguous()?)? * scale)?; // [n_heads, q_len, ctx]
    let first = ctx - q_len; // query row j sits at position first + j
    let visible = |j: usize, t: usize| t <= first + j;
    let mask: Vec<f64> = (0..q_len)
        .flat_map(|j| {
            (0..ctx).map(move |t| {
                if visible(j, t) {
                    0.0
                } else {
                    f64::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (q_len, ctx), q.device())?;
    let scores = raw.broadcast_add(&mask)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let exp = scores.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    let p = exp.broadcast_div(&sum)?; // [n_heads, q_len, ctx]
    let lse_col = (max + sum.log()?)?; // [n_heads, q_len, 1]
    let to_rows = |x: Tensor| x.transpose(0, 1)?.contiguous(); // [q_len, n_heads, ...]
    let out = to_rows(p.matmul(&v)?)?;
    let lse = lse_col.squeeze(D::Minus1)?.t()?.contiguous()?; // [q_len, n_heads]

    // Conditioning. Masked keys have p = 0 (and finite rho: their scores count as 0).
    let u = 2f64.powi(-24);
    let keep: Vec<f64> = (0..q_len)
        .flat_map(|j| (0..ctx).map(move |t| if visible(j, t) { 1.0 } else { 0.0 }))
        .collect();
    let keep = Tensor::from_vec(keep, (q_len, ctx), q.device())?;
    let s = raw.broadcast_mul(&keep)?; // the scores, 0 where masked
    let abs_dot = (q.abs()?.matmul(&k.abs()?.t()?.contiguous()?)? * scale)?;
    let logit_terms = ((s.abs()? * 4.0)? + (s.broadcast_sub(&lse_col)?.abs()? * 2.0)?)?;
    let rho = ((abs_dot * (2.0 * (d as f64 + 2.0) * u))? + ((logit_terms + 8.0)? * u)?)?;
    let p_rho = (&p * &rho)?;
    let v_abs = v.abs()?;
    let keys = keep.sum_keepdim(D::Minus1)?; // [q_len, 1]
    Ok(Reference {
        out,
        lse,
        weighted_abs_v: to_rows(p.matmul(&v_abs)?)?,
        weighted_rho_abs_v: to_rows(p_rho.matmul(&v_abs)?)?,
        weight_norm_v: to_rows(p.sqr()?.matmul(&v.sqr()?)?.sqrt()?)?,
        weighted_rho: p_rho.sum(D::Minus1)?.t()?.contiguous()?,
        keys: keys.broadcast_as((q_len, n_heads))?.contiguous()?,
    })
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
) -> Result<Reference> {
    let (num_blocks, block_size, n_kv, d) = k_cache.dims4()?;
    let flat = |c: &Tensor| c.reshape((num_blocks * block_size, n_kv, d));
    let (k_flat, v_flat) = (flat(k_cache)?, flat(v_cache)?);
    let mut parts = Vec::new();
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
        parts.push(reference_attention(&q_rows, &k, &v, scale)?);
    }
    if parts.is_empty() {
        return Reference::empty(q.dim(1)?, d, q.device());
    }
    Reference::cat(&parts)
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

/// `error <= bound`; false for a NaN error (an unwritten output).
fn within(error: f64, bound: f64) -> bool {
    error <= bound
}

/// How the crate's attention rounds on candle's CPU tensors (the f32 fallback: weights in f32,
/// the output rounded to `dtype`).
pub fn cpu_model(dtype: DType) -> RoundingModel {
    RoundingModel::f32_weights(crate_dtype(dtype))
}

/// How it rounds on candle's CUDA tensors: either kernel (`KernelChoice::Auto`), tensor cores
/// truncating.
pub fn cuda_model(dtype: DType) -> RoundingModel {
    let dtype = crate_dtype(dtype);
    RoundingModel::f32_weights(dtype)
        .either(RoundingModel::mma_weights(dtype, Accumulation::TensorCores))
}

fn crate_dtype(dtype: DType) -> paged_gqa::DType {
    match dtype {
        DType::F32 => paged_gqa::DType::F32,
        DType::F16 => paged_gqa::DType::F16,
        DType::BF16 => paged_gqa::DType::BF16,
        other => panic!("no rounding model for {other:?}"),
    }
}

/// Checks `out` (`dtype`) and `lse` against the reference, each element and each lse within the
/// forward-error bound `model` gives it from the reference's conditioning (no pooled norm: a
/// mistake confined to a long row, whose outputs are small, fails as surely as any); returns a
/// description of the failure.
pub fn check(
    what: &str,
    dtype: DType,
    (out, lse): (&Tensor, &Tensor),
    want: &Reference,
    model: RoundingModel,
) -> std::result::Result<(), String> {
    if out.dtype() != dtype {
        return Err(format!(
            "{what}: out is {:?}, expected {dtype:?}",
            out.dtype()
        ));
    }
    if out.dims() != want.out.dims() || lse.dims() != want.lse.dims() {
        return Err(format!(
            "{what}: shapes out {:?} lse {:?}, expected {:?} {:?}",
            out.dims(),
            lse.dims(),
            want.out.dims(),
            want.lse.dims()
        ));
    }
    let text = |e: candle_core::Error| e.to_string();
    let (got_out, got_lse) = (host_f64(out).map_err(text)?, host_f64(lse).map_err(text)?);
    let (oracle, cond) = want.conditioning().map_err(text)?;
    let (out_bound, lse_bound) = model.bounds(&oracle, &cond);
    let d = want.out.dim(D::Minus1).map_err(text)?;
    let over = |got: &[f64], want: &[f64], bound: &[f64], name: &str, row_len: usize| {
        // NaN (unwritten) fails as over its bound.
        let bad: Vec<usize> = (0..got.len())
            .filter(|&i| !within((got[i] - want[i]).abs(), bound[i]))
            .collect();
        match bad.first() {
            None => Ok(()),
            Some(&i) => Err(format!(
                "{what}: {name}[row {}, element {}] = {:e}, reference {:e}: error {:e} over its \
                 bound {:e} ({} elements over their bound)",
                i / row_len,
                i % row_len,
                got[i],
                want[i],
                (got[i] - want[i]).abs(),
                bound[i],
                bad.len()
            )),
        }
    };
    let heads = want.lse.dim(D::Minus1).map_err(text)?;
    over(&got_out, &oracle.out, &out_bound, "out", heads * d)?;
    over(&got_lse, &oracle.lse, &lse_bound, "lse", heads)
}

/// Two implementations' outputs of the same inputs (values in [-1, 1]) without a reference:
/// each element within the sum of their bounds when nothing is known of the conditioning (both
/// outputs' rounding, `u_o (|a| + |b|)`, and the weights rounded to the MMA type,
/// `lambda u_p max |v| <= lambda u_p`), each lse within `1e-5`; returns the failure.
pub fn check_against(
    what: &str,
    (out, lse): (&Tensor, &Tensor),
    (other_out, other_lse): (&Tensor, &Tensor),
    model: RoundingModel,
) -> std::result::Result<(), String> {
    let text = |e: candle_core::Error| e.to_string();
    let (a, b) = (
        host_f64(out).map_err(text)?,
        host_f64(other_out).map_err(text)?,
    );
    let (la, lb) = (
        host_f64(lse).map_err(text)?,
        host_f64(other_lse).map_err(text)?,
    );
    if a.len() != b.len() || la.len() != lb.len() {
        return Err(format!(
            "{what}: lengths {} / {} against {} / {}",
            a.len(),
            la.len(),
            b.len(),
            lb.len()
        ));
    }
    for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
        let bound = model.out_unit * (x.abs() + y.abs()) + model.lambda * model.p_unit + 1e-6;
        if !within((x - y).abs(), bound) {
            return Err(format!(
                "{what}: out[{i}] {x:e} against {y:e} (bound {bound:e})"
            ));
        }
    }
    for (i, (&x, &y)) in la.iter().zip(&lb).enumerate() {
        if !within((x - y).abs(), 1e-5) {
            return Err(format!("{what}: lse[{i}] {x:e} against {y:e} (bound 1e-5)"));
        }
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

/// The small cache of the cache tests: 8 query heads over 2 K/V heads of 64, `layers` layers,
/// pages of 16 in `dtype`, 4 of them on the CPU.
pub fn small_cache(layers: usize, dtype: paged_gqa::DType) -> PagedCache<CandleStorage> {
    let storage = CandleStorage::new(small_config(layers, dtype), 4, &Device::Cpu).unwrap();
    PagedCache::new(storage).unwrap()
}

/// The configuration of [`small_cache`].
pub fn small_config(layers: usize, dtype: paged_gqa::DType) -> CacheConfig {
    CacheConfig::new(GqaShape::new(8, 2, 64).unwrap(), layers, 16, dtype).unwrap()
}

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
