//! A Llama-shaped attention block in candle (random weights, 32 query heads over 8 K/V heads,
//! RoPE) run two ways side by side: through paged-gqa's paged cache and ops, and written with
//! plain candle ops (a growing K/V tensor per sequence, `repeat_kv`, matmul, softmax). Two
//! sequences prefill together, then decode 16 steps; every step's outputs must agree, and the
//! example prints the K/V memory each way uses.
//!
//! ```sh
//! cargo run --example candle_attention --features candle            # CPU, f32
//! cargo run --example candle_attention --features candle-cuda       # GPU (bf16) if there is one
//! cargo run --example candle_attention --features candle -- --no-rope
//! ```

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use paged_gqa::cache::{CacheConfig, PageStorage, PagedCache, SeqId};
use paged_gqa::candle::{AttendOptions, CandleStorage};
use paged_gqa::GqaShape;

const N_HEADS: usize = 32;
const N_KV_HEADS: usize = 8;
const HEAD_DIM: usize = 64;
const HIDDEN: usize = N_HEADS * HEAD_DIM;
const BLOCK_SIZE: usize = 16;
const PROMPTS: [usize; 2] = [37, 20];
const DECODE_STEPS: usize = 16;

/// The block's weights: `[out_features, in_features]`, as candle-nn's `Linear` keeps them.
struct Weights {
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
}

impl Weights {
    fn random(dtype: DType, device: &Device) -> Result<Self> {
        let scale = 1.0 / (HIDDEN as f64).sqrt();
        let w = |out: usize| {
            (Tensor::randn(0f32, 1.0, (out, HIDDEN), device)? * scale)?.to_dtype(dtype)
        };
        Ok(Self {
            wq: w(HIDDEN)?,
            wk: w(N_KV_HEADS * HEAD_DIM)?,
            wv: w(N_KV_HEADS * HEAD_DIM)?,
            wo: w(HIDDEN)?,
        })
    }

    /// Q `[tokens, n_heads, d]`, K and V `[tokens, n_kv_heads, d]` of `x` `[tokens, hidden]`,
    /// RoPE applied to Q and K at `positions`.
    fn qkv(&self, x: &Tensor, positions: &[usize], rope: bool) -> Result<(Tensor, Tensor, Tensor)> {
        let tokens = x.dim(0)?;
        let q = x
            .matmul(&self.wq.t()?)?
            .reshape((tokens, N_HEADS, HEAD_DIM))?;
        let k = x
            .matmul(&self.wk.t()?)?
            .reshape((tokens, N_KV_HEADS, HEAD_DIM))?;
        let v = x
            .matmul(&self.wv.t()?)?
            .reshape((tokens, N_KV_HEADS, HEAD_DIM))?;
        if !rope {
            return Ok((q, k, v));
        }
        let (cos, sin) = rope_tables(positions, x.dtype(), x.device())?;
        Ok((rotate(&q, &cos, &sin)?, rotate(&k, &cos, &sin)?, v))
    }

    /// The output projection of attention rows `[tokens, n_heads, d]`.
    fn output(&self, attention: &Tensor) -> Result<Tensor> {
        let tokens = attention.dim(0)?;
        attention.reshape((tokens, HIDDEN))?.matmul(&self.wo.t()?)
    }
}

/// cos and sin `[tokens, 1, d / 2]` of Llama's rotary embedding (theta 10000).
fn rope_tables(positions: &[usize], dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = HEAD_DIM / 2;
    let mut angles = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for i in 0..half {
            angles.push(p as f32 / 10000f32.powf(2.0 * i as f32 / HEAD_DIM as f32));
        }
    }
    let angles = Tensor::from_vec(angles, (positions.len(), 1, half), device)?;
    Ok((
        angles.cos()?.to_dtype(dtype)?,
        angles.sin()?.to_dtype(dtype)?,
    ))
}

/// Rotate-half RoPE on `x` `[tokens, heads, d]`.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = HEAD_DIM / 2;
    let (x1, x2) = (
        x.narrow(D::Minus1, 0, half)?,
        x.narrow(D::Minus1, half, half)?,
    );
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[&a, &b], D::Minus1)?.contiguous()
}

/// `repeat_kv` of the Llama code: `[tokens, n_kv, d]` -> `[tokens, n_kv * n_rep, d]`.
fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    let (tokens, n_kv, d) = x.dims3()?;
    x.unsqueeze(2)?
        .expand((tokens, n_kv, n_rep, d))?
        .reshape((tokens, n_kv * n_rep, d))
}

/// Plain candle attention of `q` `[q_len, n_heads, d]` over one sequence's whole `k`, `v`
/// `[ctx, n_kv_heads, d]`, causal (bottom-right), in f32. Also returns the bytes of the
/// repeat_kv copies it materialised.
fn plain_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, usize)> {
    let (q_len, _, _) = q.dims3()?;
    let ctx = k.dim(0)?;
    let (k, v) = (
        repeat_kv(k, N_HEADS / N_KV_HEADS)?,
        repeat_kv(v, N_HEADS / N_KV_HEADS)?,
    );
    let repeated_bytes = 2 * k.elem_count() * k.dtype().size_in_bytes();
    let heads = |x: &Tensor| x.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous(); // [heads, len, d]
    let (q, k, v) = (heads(q)?, heads(&k)?, heads(&v)?);
    let scores = (q.matmul(&k.t()?)? / (HEAD_DIM as f64).sqrt())?;
    let mask: Vec<f32> = (0..q_len)
        .flat_map(|j| {
            (0..ctx).map(move |t| {
                if t <= ctx - q_len + j {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let scores = scores.broadcast_add(&Tensor::from_vec(mask, (q_len, ctx), q.device())?)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let exp = scores.broadcast_sub(&max)?.exp()?;
    let p = exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?;
    Ok((p.matmul(&v)?.transpose(0, 1)?.contiguous()?, repeated_bytes))
}

/// The device: the GPU when this build has `candle-cuda` and there is one, else the CPU.
fn device() -> Device {
    if cfg!(feature = "candle-cuda") {
        match paged_gqa::cuda::context(0)
            .map_err(|e| e.to_string())
            .and_then(|_| Device::new_cuda(0).map_err(|e| e.to_string()))
        {
            Ok(device) => return device,
            Err(why) => println!("no GPU ({why}): running on the CPU"),
        }
    }
    Device::Cpu
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let rope = !std::env::args().any(|a| a == "--no-rope");
    let device = device();
    // The CUDA kernels take f16 and bf16; the CPU path also f32.
    let (dtype, ours, tolerance) = if device.is_cuda() {
        (DType::BF16, paged_gqa::DType::BF16, 5e-2)
    } else {
        (DType::F32, paged_gqa::DType::F32, 1e-4)
    };
    println!(
        "{N_HEADS} query heads over {N_KV_HEADS} K/V heads of {HEAD_DIM}, {dtype:?} on {:?}, RoPE {}",
        device.location(),
        if rope { "on" } else { "off" }
    );
    let weights = Weights::random(dtype, &device)?;

    // The paged side: one layer, pages of 16 tokens, room for 256 tokens.
    let config = CacheConfig::new(
        GqaShape::new(N_HEADS, N_KV_HEADS, HEAD_DIM)?,
        1,
        BLOCK_SIZE,
        ours,
    )?;
    let mut cache = PagedCache::new(CandleStorage::new(config, 256 / BLOCK_SIZE, &device)?)?;
    let seqs: Vec<SeqId> = PROMPTS.iter().map(|_| cache.add_sequence()).collect();
    // The plain side: each sequence's K and V so far, [len, n_kv_heads, d].
    let empty = Tensor::zeros((0, N_KV_HEADS, HEAD_DIM), dtype, &device)?;
    let mut plain_kv: Vec<(Tensor, Tensor)> = vec![(empty.clone(), empty); PROMPTS.len()];
    let mut lens = vec![0usize; PROMPTS.len()];
    let (mut worst, mut repeated_peak) = (0f64, 0usize);

    for step in 0..=DECODE_STEPS {
        let new: Vec<usize> = if step == 0 {
            PROMPTS.to_vec()
        } else {
            vec![1; PROMPTS.len()]
        };
        let tokens: usize = new.iter().sum();
        let x = Tensor::randn(0f32, 1.0, (tokens, HIDDEN), &device)?.to_dtype(dtype)?;
        let positions: Vec<usize> = new
            .iter()
            .zip(&lens)
            .flat_map(|(&n, &len)| len..len + n)
            .collect();
        let (q, k, v) = weights.qkv(&x, &positions, rope)?;

        // paged-gqa: plan once per step, then per layer write the new K/V and attend.
        let batch: Vec<(SeqId, usize)> = seqs.iter().copied().zip(new.iter().copied()).collect();
        let plan = cache.plan(&batch)?;
        cache.write(0, &plan, &k, &v)?;
        let (attention, _lse) = cache.attend(0, &plan, &q, &AttendOptions::default())?;
        let paged_out = weights.output(&attention)?;

        // Plain candle: append to each sequence's K/V, repeat_kv, matmul, softmax.
        let (mut outs, mut start, mut repeated) = (Vec::new(), 0, 0);
        for (seq, &n) in new.iter().enumerate() {
            let rows = start..start + n;
            start = rows.end;
            let (pk, pv) = &plain_kv[seq];
            let pk = Tensor::cat(&[pk, &k.i(rows.clone())?], 0)?;
            let pv = Tensor::cat(&[pv, &v.i(rows.clone())?], 0)?;
            let (out, bytes) = plain_attention(&q.i(rows)?, &pk, &pv)?;
            outs.push(out.to_dtype(dtype)?);
            repeated += bytes;
            plain_kv[seq] = (pk, pv);
        }
        repeated_peak = repeated_peak.max(repeated);
        let plain_out = weights.output(&Tensor::cat(&outs, 0)?)?;

        let diff = (paged_out.to_dtype(DType::F32)? - plain_out.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()? as f64;
        let scale = plain_out
            .to_dtype(DType::F32)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()? as f64;
        worst = worst.max(diff / scale);
        assert!(
            diff <= tolerance * scale,
            "step {step}: the paged block's output differs from plain candle's by {diff:e} \
             (largest value {scale:e}, tolerance {tolerance:e} of it)"
        );
        for (len, n) in lens.iter_mut().zip(&new) {
            *len += n;
        }
    }

    let token_bytes = config.bytes_per_token() as usize;
    let held = (cache.storage().num_blocks() - cache.num_free_blocks()) * BLOCK_SIZE * token_bytes;
    let pages_bytes = cache.storage().pages().elem_count() * dtype.size_in_bytes();
    let plain_bytes: usize = plain_kv
        .iter()
        .map(|(k, v)| (k.elem_count() + v.elem_count()) * dtype.size_in_bytes())
        .sum();
    println!(
        "prefill of {PROMPTS:?} tokens and {DECODE_STEPS} decode steps: outputs agree \
         (largest difference {worst:.1e} of the largest value)"
    );
    println!("K/V memory after {} tokens:", lens.iter().sum::<usize>());
    println!(
        "  paged-gqa:    {held} bytes in {} pages held ({pages_bytes} bytes of pages allocated), \
         {N_KV_HEADS} K/V heads stored, no repeat_kv",
        held / (BLOCK_SIZE * token_bytes)
    );
    println!(
        "  plain candle: {plain_bytes} bytes of K/V tensors, plus {repeated_peak} bytes of \
         repeat_kv copies ({N_HEADS} heads) materialised by the last step"
    );
    Ok(())
}
