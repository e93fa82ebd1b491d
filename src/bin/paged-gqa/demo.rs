//! `paged-gqa demo`: a random paged decode batch; the fused GQA decode (the CUDA kernel when
//! there is a GPU, the same kernel on the emulator with `--backend sim`, else the CPU fallback)
//! against the naive path (gather, repeat_kv, per-head attention in f64).

use paged_gqa::AttendOptions;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use half::bf16;
use paged_gqa::cuda::{self, AttendBatch, CudaContext};
use paged_gqa::{cpu, sim, DType, GqaShape, PagedLayout, SeqLens};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::{Backend, Failure};

/// Llama-3-8B attention heads.
const N_HEADS: usize = 32;
const N_KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const BLOCK_SIZE: usize = 16;
/// One token, a page boundary, a partial last page, a longer context.
const CONTEXT_LENS: [usize; 4] = [1, 16, 37, 3000];
/// The bf16 tolerance of the GPU tests: relative L2 of the output, max |error| of the lse.
const REL_L2: f64 = 1e-2;
const LSE_ABS: f64 = 1e-3;

fn random_bf16(rng: &mut StdRng, n: usize) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
        .collect()
}

pub fn run(seed: Option<u64>, backend: Option<Backend>) -> Result<(), Failure> {
    let seed = seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let mut rng = StdRng::seed_from_u64(seed);
    let err = Failure::runtime;

    let shape = GqaShape::new(N_HEADS, N_KV_HEADS, HEAD_DIM).map_err(err)?;
    let lens = SeqLens::decode(&CONTEXT_LENS).map_err(err)?;
    let pages: Vec<usize> = CONTEXT_LENS
        .iter()
        .map(|l| l.div_ceil(BLOCK_SIZE))
        .collect();
    let max_blocks = *pages.iter().max().unwrap();
    let num_blocks = pages.iter().sum::<usize>() + 3;
    let layout = PagedLayout::new(shape, num_blocks, BLOCK_SIZE).map_err(err)?;

    // Pages handed out in a random order, as a real allocator would after some churn.
    let mut free: Vec<i32> = (0..num_blocks as i32).collect();
    free.shuffle(&mut rng);
    let mut block_tables = vec![-1i32; CONTEXT_LENS.len() * max_blocks];
    for (seq, &n) in pages.iter().enumerate() {
        for index in 0..n {
            block_tables[seq * max_blocks + index] = free.pop().unwrap();
        }
    }
    let k_cache = random_bf16(&mut rng, layout.cache_len());
    let v_cache = random_bf16(&mut rng, layout.cache_len());
    let q = random_bf16(&mut rng, lens.num_tokens() * shape.q_row_len());
    let kv = cpu::PagedKv::new(layout, &lens, &block_tables, max_blocks, &k_cache, &v_cache)
        .map_err(err)?;

    println!(
        "paged-gqa demo (seed {seed}): decode, n_heads {N_HEADS}, n_kv_heads {N_KV_HEADS} (group {}), \
         head_dim {HEAD_DIM}, bf16, pages of {BLOCK_SIZE} tokens, context_lens {CONTEXT_LENS:?}",
        shape.group()
    );

    // The naive path: gather the pages, materialise repeat_kv, per-head attention (f64).
    let (k, v) = cpu::gather_paged(&kv).map_err(err)?;
    let keys = lens.total_keys();
    let gpu = match backend {
        None | Some(Backend::Cuda) => cuda::context(0),
        Some(Backend::Cpu) => Err(paged_gqa::Error::CudaUnavailable {
            reason: "--backend cpu".into(),
        }),
        Some(Backend::Sim) => Err(paged_gqa::Error::CudaUnavailable {
            reason: "--backend sim".into(),
        }),
    };
    if backend == Some(Backend::Cuda) {
        if let Err(why) = &gpu {
            return Err(Failure::runtime(why));
        }
    }
    let emulator = (backend == Some(Backend::Sim)).then(sim::SimDevice::new);
    let (k_rep, v_rep) = match (&gpu, &emulator) {
        (Ok(ctx), _) => (
            repeat_kv_on_gpu(ctx, shape, keys, &k).map_err(err)?,
            repeat_kv_on_gpu(ctx, shape, keys, &v).map_err(err)?,
        ),
        (_, Some(device)) => (
            repeat_kv_on_sim(device, shape, keys, &k).map_err(err)?,
            repeat_kv_on_sim(device, shape, keys, &v).map_err(err)?,
        ),
        _ => (
            cpu::repeat_kv(&k, shape, keys).map_err(err)?,
            cpu::repeat_kv(&v, shape, keys).map_err(err)?,
        ),
    };
    if k_rep != cpu::repeat_kv(&k, shape, keys).map_err(err)?
        || v_rep != cpu::repeat_kv(&v, shape, keys).map_err(err)?
    {
        return Err(Failure::runtime(
            "the repeat_kv kernel differs from the CPU definition",
        ));
    }
    let mha = cpu::ContiguousKv::new(shape.repeated(), &lens, &k_rep, &v_rep).map_err(err)?;
    let naive = cpu::attention(
        &q,
        &mha,
        &AttendOptions::new().with_scale(shape.default_scale()),
    )
    .map_err(err)?;

    // The fused path: each K/V row read once for its group of query heads.
    let rows = lens.batch() * shape.n_heads();
    let (mut out, mut lse) = (vec![f32::NAN; rows * HEAD_DIM], vec![f32::NAN; rows]);
    let where_ran = match (&gpu, &emulator) {
        (_, Some(device)) => {
            let batch = sim::AttendBatch::new(
                device,
                layout,
                DType::BF16,
                &lens,
                &block_tables,
                max_blocks,
            )
            .map_err(err)?;
            let upload = |x: &[bf16]| device.upload(x).map_err(err);
            let (k_dev, v_dev, q_dev) = (upload(&k_cache)?, upload(&v_cache)?, upload(&q)?);
            let mut out_dev = device.alloc::<bf16>(rows * HEAD_DIM).map_err(err)?;
            let mut lse_dev = device.alloc::<f32>(rows).map_err(err)?;
            batch
                .run(
                    device,
                    &k_dev,
                    &v_dev,
                    &q_dev,
                    &mut out_dev,
                    &mut lse_dev,
                    &AttendOptions::default(),
                )
                .map_err(err)?;
            out = out_dev.as_slice().iter().map(|&x| f32::from(x)).collect();
            lse = lse_dev.to_vec();
            format!(
                "the kernel emulator (the CUDA kernels on the CPU, race check {}): {} split(s); repeat_kv kernel bit-identical to the CPU",
                if device.race_check() { "on" } else { "off" },
                batch.schedule().num_splits
            )
        }
        (Ok(ctx), _) => {
            let stream = ctx.default_stream();
            let batch = AttendBatch::new(
                &stream,
                layout,
                DType::BF16,
                &lens,
                &block_tables,
                max_blocks,
            )
            .map_err(err)?;
            let upload = |x: &[bf16]| {
                stream
                    .clone_htod(x)
                    .map_err(|e| err(paged_gqa::Error::from(e)))
            };
            let (k_dev, v_dev, q_dev) = (upload(&k_cache)?, upload(&v_cache)?, upload(&q)?);
            let mut out_dev = upload(&vec![bf16::NAN; rows * HEAD_DIM])?;
            let mut lse_dev = stream
                .clone_htod(&lse)
                .map_err(|e| err(paged_gqa::Error::from(e)))?;
            batch
                .run(
                    &stream,
                    &k_dev,
                    &v_dev,
                    &q_dev,
                    &mut out_dev,
                    &mut lse_dev,
                    &AttendOptions::default(),
                )
                .map_err(err)?;
            let out_bf16 = stream
                .clone_dtoh(&out_dev)
                .map_err(|e| err(paged_gqa::Error::from(e)))?;
            out = out_bf16.into_iter().map(f32::from).collect();
            lse = stream
                .clone_dtoh(&lse_dev)
                .map_err(|e| err(paged_gqa::Error::from(e)))?;
            let name = ctx.name().unwrap_or_else(|_| "GPU".into());
            format!("GPU ({name}): CUDA decode kernel, {} split(s); repeat_kv kernel bit-identical to the CPU", batch.schedule().num_splits)
        }
        (Err(why), None) => {
            cpu::attend(&q, &kv, &AttendOptions::default(), &mut out, &mut lse).map_err(err)?;
            format!("CPU fallback decode, f32 ({why})")
        }
    };

    let diff: f64 = out
        .iter()
        .zip(&naive.out)
        .map(|(&a, b)| (a as f64 - b).powi(2))
        .sum();
    let norm: f64 = naive.out.iter().map(|b| b * b).sum();
    let rel_l2 = (diff / norm).sqrt();
    let max_abs = out
        .iter()
        .zip(&naive.out)
        .map(|(&a, b)| (a as f64 - b).abs())
        .fold(0.0, f64::max);
    let lse_max = lse
        .iter()
        .zip(&naive.lse)
        .map(|(&a, b)| (a as f64 - b).abs())
        .fold(0.0, f64::max);
    println!("  fused decode ran on: {where_ran}");
    println!(
        "  fused (query head h reads K/V head h/{}) vs naive repeat_kv + per-head attention (f64):",
        shape.group()
    );
    println!("    out: relative L2 {rel_l2:.3e}, max |diff| {max_abs:.3e}; lse: max |diff| {lse_max:.3e}");
    if rel_l2 < REL_L2 && lse_max < LSE_ABS && out.iter().all(|x| x.is_finite()) {
        println!("  agree (relative L2 < {REL_L2:e}, lse < {LSE_ABS:e})");
        Ok(())
    } else {
        Err(Failure::runtime(format!(
            "fused and naive disagree (bounds: relative L2 {REL_L2:e}, lse {LSE_ABS:e})"
        )))
    }
}

fn repeat_kv_on_gpu(
    ctx: &Arc<CudaContext>,
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

fn repeat_kv_on_sim(
    device: &Rc<sim::SimDevice>,
    shape: GqaShape,
    num_tokens: usize,
    x: &[bf16],
) -> paged_gqa::Result<Vec<bf16>> {
    let src = device.upload(x)?;
    let mut dst = device.alloc::<bf16>(num_tokens * shape.q_row_len())?;
    sim::repeat_kv(device, shape, num_tokens, &src, &mut dst)?;
    Ok(dst.to_vec())
}
