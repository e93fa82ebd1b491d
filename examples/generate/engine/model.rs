//! The Llama forward (RMSNorm, interleaved RoPE, GQA attention, SwiGLU) over a flattened
//! batch of tokens from many sequences, with attention through the paged cache.
//!
//! It follows candle-transformers' `quantized_llama` op for op (the same weights through
//! `QMatMul`, the same RoPE tables, `rms_norm`, `silu`), so that the only difference from that
//! reference is attention: ours reads K/V from pages, the reference concatenates a contiguous
//! cache and repeats K/V heads.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Result, Tensor, D};

use super::gguf::{Gguf, LlamaConfig};
use super::kv::KvCache;

/// RoPE tables are precomputed for this many positions (as candle's `quantized_llama`).
pub const MAX_SEQ_LEN: usize = 4096;

struct Block {
    attn_norm: Tensor, // [hidden] f32
    wq: QMatMul,       // [n_heads * head_dim, hidden]
    wk: QMatMul,       // [n_kv_heads * head_dim, hidden]
    wv: QMatMul,       // [n_kv_heads * head_dim, hidden]
    wo: QMatMul,       // [hidden, n_heads * head_dim]
    ffn_norm: Tensor,  // [hidden] f32
    w_gate: QMatMul,   // [ffn, hidden]
    w_up: QMatMul,     // [ffn, hidden]
    w_down: QMatMul,   // [hidden, ffn]
}

/// The weights of a GGUF Llama, on candle's CPU (or CUDA) device.
pub struct Llama {
    pub config: LlamaConfig,
    embed: Tensor, // [vocab, hidden] f32 (dequantized, as the reference's embedding)
    blocks: Vec<Block>,
    norm: Tensor,    // [hidden] f32
    output: QMatMul, // [vocab, hidden]: output.weight, or the tied token embedding
    cos: Tensor,     // [MAX_SEQ_LEN, head_dim / 2] f32
    sin: Tensor,     // [MAX_SEQ_LEN, head_dim / 2] f32
}

/// A step's tokens, flattened in batch order, and the rows whose logits are wanted.
pub struct StepInput<'a> {
    pub tokens: &'a [u32],
    /// [tokens] the position of each token in its sequence
    pub positions: &'a [u32],
    /// indices into `tokens` of the rows to compute logits for (a sequence's last token)
    pub logit_rows: &'a [u32],
}

impl Llama {
    /// Loads every weight of `gguf` onto `device` (checked by [`Gguf::llama_config`] first).
    /// `dequantize`: the matmul weights as f32 (what `CANDLE_DEQUANTIZE_ALL` does to
    /// candle's loaders), else quantized as stored, multiplied by candle's quantized kernels
    /// (which quantize the activations too: see the README's "A real model").
    pub fn load(gguf: &mut Gguf, device: &Device, dequantize: bool) -> Result<Self> {
        let config = gguf.llama_config()?;
        let matmul = |q: candle_core::quantized::QTensor| -> Result<QMatMul> {
            if dequantize {
                Ok(QMatMul::Tensor(q.dequantize(device)?))
            } else {
                QMatMul::from_qtensor(q)
            }
        };
        let f32_of = |q: candle_core::quantized::QTensor| q.dequantize(device);
        let embed_q = gguf.tensor("token_embd.weight", device)?;
        let embed = embed_q.dequantize(device)?;
        let norm = f32_of(gguf.tensor("output_norm.weight", device)?)?;
        let output = match gguf.optional_tensor("output.weight", device)? {
            Some(w) => matmul(w)?,
            None => matmul(embed_q)?,
        };
        let mut blocks = Vec::with_capacity(config.num_layers);
        for layer in 0..config.num_layers {
            let mut q = |t: &str| gguf.tensor(&format!("blk.{layer}.{t}.weight"), device);
            blocks.push(Block {
                attn_norm: q("attn_norm")?.dequantize(device)?,
                wq: matmul(q("attn_q")?)?,
                wk: matmul(q("attn_k")?)?,
                wv: matmul(q("attn_v")?)?,
                wo: matmul(q("attn_output")?)?,
                ffn_norm: q("ffn_norm")?.dequantize(device)?,
                w_gate: matmul(q("ffn_gate")?)?,
                w_up: matmul(q("ffn_up")?)?,
                w_down: matmul(q("ffn_down")?)?,
            });
        }
        let (cos, sin) = rope_tables(config.head_dim, config.rope_base, device)?;
        Ok(Self {
            config,
            embed,
            blocks,
            norm,
            output,
            cos,
            sin,
        })
    }

    /// One engine step: the tokens of every sequence in the plan that `kv` holds (prompt
    /// chunks and decode tokens alike), each layer's K/V written to the pages and attended
    /// through them. Returns the logits of `input.logit_rows`, `[rows, vocab]` f32.
    pub fn forward(&self, input: &StepInput, kv: &mut dyn KvCache) -> Result<Tensor> {
        let c = &self.config;
        let n = input.tokens.len();
        let device = self.embed.device();
        let ids = Tensor::new(input.tokens, device)?;
        let positions = Tensor::new(input.positions, device)?;
        // Per-token RoPE angles: rope_i over [b = tokens, heads, t = 1, head_dim].
        let cos = self.cos.index_select(&positions, 0)?.unsqueeze(1)?; // [n, 1, head_dim / 2]
        let sin = self.sin.index_select(&positions, 0)?.unsqueeze(1)?; // [n, 1, head_dim / 2]
        let mut x = self.embed.index_select(&ids, 0)?; // [n, hidden]
        for (layer, b) in self.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &b.attn_norm, c.rms_eps as f32)?; // [n, hidden]
            let q = b.wq.forward(&h)?.reshape((n, c.n_heads, 1, c.head_dim))?;
            let k =
                b.wk.forward(&h)?
                    .reshape((n, c.n_kv_heads, 1, c.head_dim))?;
            let v = b.wv.forward(&h)?.reshape((n, c.n_kv_heads, c.head_dim))?;
            let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?.squeeze(2)?; // [n, n_heads, head_dim]
            let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?.squeeze(2)?; // [n, n_kv_heads, head_dim]
            let attn = kv.write_and_attend(layer, &q, &k, &v)?; // [n, n_heads, head_dim] f32
            let attn = b.wo.forward(&attn.reshape((n, c.hidden))?)?; // [n, hidden]
            x = (attn + &x)?;
            let h = candle_nn::ops::rms_norm(&x, &b.ffn_norm, c.rms_eps as f32)?;
            let gate = candle_nn::ops::silu(&b.w_gate.forward(&h)?)?; // [n, ffn]
            let up = b.w_up.forward(&h)?; // [n, ffn]
            x = (b.w_down.forward(&(gate * up)?)? + &x)?; // [n, hidden]
        }
        let rows = Tensor::new(input.logit_rows, device)?;
        let last = x.index_select(&rows, 0)?; // [rows, hidden]
        let last = candle_nn::ops::rms_norm(&last, &self.norm, c.rms_eps as f32)?;
        self.output.forward(&last) // [rows, vocab]
    }
}

/// RoPE's cos and sin, `[MAX_SEQ_LEN, head_dim / 2]`, computed as candle's `quantized_llama`
/// computes them (bit for bit the same angles).
fn rope_tables(head_dim: usize, base: f32, device: &Device) -> Result<(Tensor, Tensor)> {
    let theta: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1f32 / base.powf(i as f32 / head_dim as f32))
        .collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let angles = Tensor::arange(0, MAX_SEQ_LEN as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((MAX_SEQ_LEN, 1))?
        .matmul(&theta.reshape((1, theta.elem_count()))?)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// Log-softmax of `logits` `[rows, vocab]` along the vocabulary.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}
