//! `paged-gqa demo`: a random paged case, fused GQA vs the naive repeat_kv path.

use std::time::{SystemTime, UNIX_EPOCH};

use half::bf16;
use paged_gqa::{cpu, cuda, GqaShape, PagedLayout, SeqLens};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::Failure;

/// Llama-3-8B attention heads.
const N_HEADS: usize = 32;
const N_KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const BLOCK_SIZE: usize = 16;
/// One token, a page boundary, a partial last page, a longer context.
const CONTEXT_LENS: [usize; 4] = [1, 16, 37, 300];
/// Decode for the first sequences, a 5-token chunk for the last.
const QUERY_LENS: [usize; 4] = [1, 1, 1, 5];
/// The fused and naive paths compute the same sums in f64; anything above this is a bug.
const AGREEMENT: f64 = 1e-10;

fn random_bf16(rng: &mut StdRng, n: usize) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
        .collect()
}

pub fn run(seed: Option<u64>) -> Result<(), Failure> {
    let seed = seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let mut rng = StdRng::seed_from_u64(seed);
    let err = |e: paged_gqa::Error| Failure::runtime(e);

    let shape = GqaShape::new(N_HEADS, N_KV_HEADS, HEAD_DIM).map_err(err)?;
    let lens = SeqLens::new(&CONTEXT_LENS, &QUERY_LENS).map_err(err)?;
    let max_blocks = CONTEXT_LENS
        .iter()
        .map(|l| l.div_ceil(BLOCK_SIZE))
        .max()
        .unwrap();
    let num_blocks = CONTEXT_LENS
        .iter()
        .map(|l| l.div_ceil(BLOCK_SIZE))
        .sum::<usize>()
        + 3;
    let layout = PagedLayout::new(shape, num_blocks, BLOCK_SIZE).map_err(err)?;

    // Pages handed out in a random order, as a real allocator would after some churn.
    let mut free: Vec<i32> = (0..num_blocks as i32).collect();
    free.shuffle(&mut rng);
    let mut block_tables = vec![-1i32; CONTEXT_LENS.len() * max_blocks];
    for (seq, len) in CONTEXT_LENS.iter().enumerate() {
        for index in 0..len.div_ceil(BLOCK_SIZE) {
            block_tables[seq * max_blocks + index] = free.pop().unwrap();
        }
    }
    let k_cache = random_bf16(&mut rng, layout.cache_len());
    let v_cache = random_bf16(&mut rng, layout.cache_len());
    let q = random_bf16(&mut rng, lens.num_tokens() * shape.q_row_len());
    let kv = cpu::PagedKv::new(layout, &lens, &block_tables, max_blocks, &k_cache, &v_cache)
        .map_err(err)?;

    println!(
        "paged-gqa demo (seed {seed}): n_heads {N_HEADS}, n_kv_heads {N_KV_HEADS} (group {}), head_dim {HEAD_DIM}, \
         bf16, pages of {BLOCK_SIZE} tokens",
        shape.group()
    );
    println!("  sequences: context_lens {CONTEXT_LENS:?}, query_lens {QUERY_LENS:?}");

    let fused = cpu::attention(&q, &kv, None).map_err(err)?;

    // Naive path: gather the pages, materialise repeat_kv (on the GPU when there is one),
    // then per-head attention.
    let (k, v) = cpu::gather_paged(&kv);
    let keys = lens.total_keys();
    let (k_rep, v_rep, where_ran) = match cuda::context(0) {
        Ok(ctx) => {
            let name = ctx.name().unwrap_or_else(|_| "GPU".into());
            let k_rep = repeat_kv_on_gpu(&ctx, shape, keys, &k).map_err(err)?;
            let v_rep = repeat_kv_on_gpu(&ctx, shape, keys, &v).map_err(err)?;
            // The GPU copy must equal the CPU definition bit for bit.
            let exact = k_rep == cpu::repeat_kv(&k, shape, keys).map_err(err)?
                && v_rep == cpu::repeat_kv(&v, shape, keys).map_err(err)?;
            if !exact {
                return Err(Failure::runtime(
                    "repeat_kv on the GPU differs from the CPU definition",
                ));
            }
            (
                k_rep,
                v_rep,
                format!("GPU ({name}); bit-identical to the CPU repeat_kv"),
            )
        }
        Err(why) => {
            let k_rep = cpu::repeat_kv(&k, shape, keys).map_err(err)?;
            let v_rep = cpu::repeat_kv(&v, shape, keys).map_err(err)?;
            (k_rep, v_rep, format!("CPU ({why})"))
        }
    };
    let mha = cpu::ContiguousKv::new(shape.repeated(), &lens, &k_rep, &v_rep).map_err(err)?;
    let naive = cpu::attention(&q, &mha, Some(shape.default_scale())).map_err(err)?;

    let max_abs = fused
        .out
        .iter()
        .zip(&naive.out)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
    let diff: Vec<f64> = fused
        .out
        .iter()
        .zip(&naive.out)
        .map(|(a, b)| a - b)
        .collect();
    let rel_l2 = norm(&diff) / norm(&naive.out);
    let lse_max = fused
        .lse
        .iter()
        .zip(&naive.lse)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    println!("  repeat_kv ran on: {where_ran}");
    println!("  attention ran on: CPU (f64 reference; the GPU attention kernel is not built yet)");
    println!(
        "  fused (query head h reads K/V head h/{}) vs naive repeat_kv:",
        shape.group()
    );
    println!("    out: max |diff| {max_abs:.3e}, relative L2 {rel_l2:.3e}; lse: max |diff| {lse_max:.3e}");
    if max_abs <= AGREEMENT && lse_max <= AGREEMENT {
        println!("  agree (tolerance {AGREEMENT:e})");
        Ok(())
    } else {
        Err(Failure::runtime(format!(
            "fused and naive disagree beyond {AGREEMENT:e}"
        )))
    }
}

fn repeat_kv_on_gpu(
    ctx: &std::sync::Arc<cuda::CudaContext>,
    shape: GqaShape,
    num_tokens: usize,
    x: &[bf16],
) -> paged_gqa::Result<Vec<bf16>> {
    let stream = ctx.default_stream();
    let src = stream.clone_htod(x)?;
    let mut dst = stream.alloc_zeros::<bf16>(num_tokens * shape.q_row_len())?;
    cuda::repeat_kv(&stream, shape, num_tokens, &src, &mut dst)?;
    Ok(stream.clone_dtoh(&dst)?)
}
