//! Teacher-forced evaluation of page dtypes on a fixed text: fp8 scales calibrated from the
//! K/V amax of a prefix, then perplexity, top-1 agreement and the mean KL divergence of the
//! next-token distributions against a baseline.

use candle_core::{Result, Tensor, D};
use paged_gqa::GqaShape;

use super::kv::{self, Backend, KvCache, KvDtype};
use super::model::{log_softmax, Llama, StepInput};

/// The model's shape as the cache sees it.
pub fn gqa_shape(model: &Llama) -> Result<GqaShape> {
    let c = &model.config;
    Ok(GqaShape::new(c.n_heads, c.n_kv_heads, c.head_dim)?)
}

/// Feeds `tokens` as one sequence through `kv` in chunks of `chunk` tokens (every chunk a
/// step), with logits for every position: the log-probabilities `[tokens.len(), vocab]`.
pub fn teacher_forced(
    model: &Llama,
    kv: &mut dyn KvCache,
    tokens: &[u32],
    chunk: usize,
) -> Result<Tensor> {
    let seq = kv.add_sequence_with_prompt(tokens)?.seq;
    let mut out = Vec::new();
    for start in (0..tokens.len()).step_by(chunk) {
        let end = (start + chunk).min(tokens.len());
        kv.plan(&[(seq, end - start)])?;
        let positions: Vec<u32> = (start as u32..end as u32).collect();
        let rows: Vec<u32> = (0..(end - start) as u32).collect();
        let logits = model.forward(
            &StepInput {
                tokens: &tokens[start..end],
                positions: &positions,
                logit_rows: &rows,
            },
            kv,
        )?;
        out.push(log_softmax(&logits)?);
    }
    kv.free(seq)?;
    Tensor::cat(&out, 0)
}

/// Per-(layer, K/V head) amax of the K and V of `tokens`, computed over f32 pages.
pub fn calibrate(
    model: &Llama,
    tokens: &[u32],
    block_size: usize,
) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
    let blocks = tokens.len().div_ceil(block_size);
    let mut kv = kv::build(
        Backend::Cpu,
        KvDtype::F32,
        gqa_shape(model)?,
        model.config.num_layers,
        block_size,
        blocks,
        None,
        None,
    )?;
    kv.record_amax();
    teacher_forced(model, kv.as_mut(), tokens, 128)?;
    Ok(kv.amax().expect("recording").to_vec())
}

/// One page dtype's figures on the text.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    pub perplexity: f64,
    /// Share of positions whose most likely next token is the baseline's.
    pub top1_agreement: f64,
    /// Mean KL(baseline ‖ this) over positions, in nats.
    pub mean_kl: f64,
}

/// Figures of `logp` `[n, vocab]` on `tokens` against the baseline `base` `[n, vocab]`
/// (positions 0..n-1 predict tokens 1..n).
pub fn figures(logp: &Tensor, base: &Tensor, tokens: &[u32]) -> Result<Figures> {
    let n = tokens.len() - 1;
    let logp = logp.narrow(0, 0, n)?;
    let base = base.narrow(0, 0, n)?;
    let targets = Tensor::new(&tokens[1..], logp.device())?.unsqueeze(1)?; // [n, 1]
    let nll: f32 = logp.gather(&targets, 1)?.neg()?.mean_all()?.to_scalar()?;
    let top = logp.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let base_top = base.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let agree = top.iter().zip(&base_top).filter(|(a, b)| a == b).count();
    let kl = (base.exp()? * (&base - &logp)?)?.sum(D::Minus1)?; // [n]
    let mean_kl: f32 = kl.mean_all()?.to_scalar()?;
    Ok(Figures {
        perplexity: (nll as f64).exp(),
        top1_agreement: agree as f64 / n as f64,
        mean_kl: mean_kl as f64,
    })
}
