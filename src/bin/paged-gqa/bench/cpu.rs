//! The sweep on the CPU backend: the fused f32 decode against the naive path, wall-clock
//! medians, and the host's measured copy bandwidth.

use std::time::Instant;

use half::{bf16, f16};
use paged_gqa::cpu::{self, ContiguousKv, PagedKv};
use paged_gqa::fp8::{Fp8E4M3, Fp8E5M2, Fp8Element, KvScales};
use paged_gqa::{DType, Element};

use super::{data, report::Record, Case};
use crate::Failure;

/// Median wall-clock milliseconds of `iters` runs after one warm-up.
pub(super) fn time_ms(
    iters: usize,
    mut f: impl FnMut() -> paged_gqa::Result<()>,
) -> Result<f64, Failure> {
    f().map_err(Failure::runtime)?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        f().map_err(Failure::runtime)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Host copy bandwidth in GB/s: bytes read plus bytes written by a 256 MiB `copy_from_slice`,
/// best of 5.
fn copy_bandwidth_gbs() -> f64 {
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        best = best.min(start.elapsed().as_secs_f64());
    }
    2.0 * n as f64 / best / 1e9
}

pub fn run(cases: &[Case], iters: usize) -> Result<Vec<Record>, Failure> {
    let copy_gbs = copy_bandwidth_gbs();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let device = format!("CPU ({threads} threads)");
    eprintln!("bench: {device}, measured copy bandwidth {copy_gbs:.1} GB/s (read + write)");
    let mut records = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        eprintln!("bench [{}/{}] {case}", i + 1, cases.len());
        let times = match (case.dtype, case.kv_dtype) {
            (DType::F16, DType::F8E4M3) => measure_fp8::<f16, Fp8E4M3>(case, iters)?,
            (DType::F16, DType::F8E5M2) => measure_fp8::<f16, Fp8E5M2>(case, iters)?,
            (_, DType::F8E4M3) => measure_fp8::<bf16, Fp8E4M3>(case, iters)?,
            (_, DType::F8E5M2) => measure_fp8::<bf16, Fp8E5M2>(case, iters)?,
            (DType::F16, _) => measure::<f16>(case, iters)?,
            _ => measure::<bf16>(case, iters)?,
        };
        records.push(Record::new(
            case,
            "cpu",
            &device,
            times,
            copy_gbs,
            &format!("wall clock, median of {iters} after 1 warm-up"),
        ));
    }
    Ok(records)
}

/// [`paths`] over fp8 pages of `F`: the fallback reads them under their scales; the naive
/// path gathers and repeats the stored values, their scales repeated alike.
fn measure_fp8<T: Element + Into<f32>, F: Fp8Element>(
    case: &Case,
    iters: usize,
) -> Result<(f64, Option<f64>, Option<f64>), Failure> {
    let mut rng = data::rng();
    let t = data::tables(case, &mut rng).map_err(Failure::runtime)?;
    let (k, v, scales) = data::fp8_kv::<F>(&mut rng, &t.layout).map_err(Failure::runtime)?;
    let q: Vec<T> = data::random(&mut rng, t.lens.num_tokens() * case.shape.q_row_len());
    paths(case, iters, &t, &q, (&k, &v), Some(&scales))
}

/// [`paths`] over 16-bit pages of `T`.
fn measure<T: Element + Into<f32>>(
    case: &Case,
    iters: usize,
) -> Result<(f64, Option<f64>, Option<f64>), Failure> {
    let mut rng = data::rng();
    let t = data::tables(case, &mut rng).map_err(Failure::runtime)?;
    let (k, v): (Vec<T>, Vec<T>) = (
        data::random(&mut rng, t.layout.cache_len()),
        data::random(&mut rng, t.layout.cache_len()),
    );
    let q: Vec<T> = data::random(&mut rng, t.lens.num_tokens() * case.shape.q_row_len());
    paths(case, iters, &t, &q, (&k, &v), None)
}

/// (fused, naive whole path, naive attention alone), milliseconds, of `q`
/// (`[num_tokens, n_heads, head_dim]`) over the pages `kv` (`[num_blocks, block_size,
/// n_kv_heads, head_dim]` each) of `t`, read under `scales` where they hold fp8 values.
fn paths<T: Element + Into<f32>, P: Copy + Into<f32> + Sync>(
    case: &Case,
    iters: usize,
    t: &data::Tables,
    q: &[T],
    (k, v): (&[P], &[P]),
    scales: Option<&KvScales>,
) -> Result<(f64, Option<f64>, Option<f64>), Failure> {
    let kv = PagedKv::new(t.layout, &t.lens, &t.block_tables, t.max_blocks, k, v)
        .and_then(|kv| match scales {
            Some(scales) => kv.with_scales(scales),
            None => Ok(kv),
        })
        .map_err(Failure::runtime)?;
    let rows = t.lens.num_tokens() * case.shape.n_heads();
    let (mut out, mut lse) = (
        vec![0.0f32; rows * case.shape.head_dim()],
        vec![0.0f32; rows],
    );
    let fused = time_ms(iters, || {
        cpu::attend(q, &kv, &case.options, &mut out, &mut lse)
    })?;
    let naive = time_ms(iters, || {
        cpu::attend_naive(q, &kv, &case.options, &mut out, &mut lse)
    })?;
    // The attention step alone, over K/V gathered and repeated beforehand (fp8: with their
    // scales repeated alike).
    let (kr, vr, repeated) = cpu::gather_repeated(&kv).map_err(Failure::runtime)?;
    let mha = ContiguousKv::new(case.shape.repeated(), &t.lens, &kr, &vr)
        .and_then(|mha| match scales {
            Some(_) => mha.with_scales(&repeated),
            None => Ok(mha),
        })
        .map_err(Failure::runtime)?;
    let attention = time_ms(iters, || {
        cpu::attend(q, &mha, &case.options, &mut out, &mut lse)
    })?;
    Ok((fused, Some(naive), Some(attention)))
}
