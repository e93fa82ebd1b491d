//! An engine's life with a paged cache, on the CPU backend: two sequences prefill, decode a
//! few steps, one forks for parallel sampling, and both free. Every layer of every step only
//! writes the step's new K/V and attends; the plan is made once per step.
//!
//! `cargo run --example engine_step`

use paged_gqa::cache::{CacheConfig, PagedCache, SeqId};
use paged_gqa::cpu::CpuStorage;
use paged_gqa::AttendOptions;
use paged_gqa::{DType, GqaShape};

/// Stand-in for the model: the K, V (`[tokens, n_kv_heads, head_dim]`) and Q
/// (`[tokens, n_heads, head_dim]`) projections of a step's new tokens at one layer.
fn projections(
    config: &CacheConfig,
    tokens: usize,
    layer: usize,
    step: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let value = |i: usize, salt: usize| {
        (((i * 7919 + layer * 104_729 + step * 31 + salt) % 1000) as f32 / 500.0) - 1.0
    };
    let kv = tokens * config.shape().kv_row_len();
    let q = tokens * config.shape().q_row_len();
    (
        (0..kv).map(|i| value(i, 1)).collect(),
        (0..kv).map(|i| value(i, 2)).collect(),
        (0..q).map(|i| value(i, 3)).collect(),
    )
}

/// One engine step: plan once, then per layer write the new K/V and attend (any mix of prompt
/// chunks and decode tokens).
fn step(
    cache: &mut PagedCache<CpuStorage<f32>>,
    batch: &[(SeqId, usize)],
    step: usize,
) -> paged_gqa::Result<()> {
    let plan = cache.plan(batch)?; // reserves slots, copies shared partial blocks
    let config = *cache.config();
    for layer in 0..config.num_layers() {
        let (k_new, v_new, q) = projections(&config, plan.num_new_tokens(), layer, step);
        cache.write(layer, &plan, &k_new, &v_new)?;
        let rows = plan.num_new_tokens() * config.shape().n_heads();
        let (mut out, mut lse) = (vec![0.0f32; q.len()], vec![0.0f32; rows]); // [tokens, n_heads, (head_dim)]
        cache.attend(
            layer,
            &plan,
            &q,
            &mut out,
            &mut lse,
            &AttendOptions::default(),
        )?; // prompts and decode tokens alike
    }
    let lens: Vec<String> = batch
        .iter()
        .map(|&(s, _)| format!("seq {s}: {} tokens", cache.manager().len(s).unwrap()))
        .collect();
    println!(
        "step {step}: {} new tokens; {}; {} blocks free",
        plan.num_new_tokens(),
        lens.join(", "),
        cache.num_free_blocks()
    );
    Ok(())
}

fn main() -> paged_gqa::Result<()> {
    // A small Llama-like model: 4 layers, 8 query heads sharing 2 K/V heads of 64, pages of 16.
    let config = CacheConfig::new(GqaShape::new(8, 2, 64)?, 4, 16, DType::F32)?;
    let mut cache = PagedCache::new(CpuStorage::with_budget(config, 1 << 20)?)?; // 1 MiB of pages
    println!(
        "{} blocks of {} tokens, {} bytes per token",
        cache.num_free_blocks(),
        config.block_size(),
        config.bytes_per_token()
    );

    let (a, b) = (cache.add_sequence(), cache.add_sequence());
    step(&mut cache, &[(a, 37), (b, 12)], 0)?; // prefill both prompts
    for s in 1..=3 {
        step(&mut cache, &[(a, 1), (b, 1)], s)?; // decode
    }
    let a2 = cache.fork(a)?; // parallel sampling: a2 shares a's blocks
    step(&mut cache, &[(a, 1), (a2, 1), (b, 1)], 4)?; // a copies the shared partial block first
    cache.free(b)?;
    cache.free(a)?;
    step(&mut cache, &[(a2, 1)], 5)?;
    cache.free(a2)?;
    println!("all freed: {} blocks free", cache.num_free_blocks());

    // The memory arithmetic of a real model: Llama-3-70B in 40 GiB of bf16 pages.
    let llama70b = CacheConfig::new(GqaShape::new(64, 8, 128)?, 80, 16, DType::BF16)?;
    let mha = CacheConfig::new(GqaShape::new(64, 64, 128)?, 80, 16, DType::BF16)?;
    for (name, c) in [
        ("Llama-3-70B GQA (8 K/V heads)", llama70b),
        ("the same with MHA (64 K/V heads)", mha),
    ] {
        let tokens = c.blocks_for_budget(40 << 30)? * c.block_size();
        println!(
            "{name}: {} KiB per token, {tokens} tokens in 40 GiB",
            c.bytes_per_token() / 1024
        );
    }
    Ok(())
}
