//! The sweep on the kernel emulator: the real kernels, run on the CPU. Its times are the
//! emulator's wall clock, not a GPU's; what it measures is traffic: the bytes the attention
//! kernels bring from the K/V pages (`kv_bytes_fetched`, counted by the emulator at every
//! cp.async) against the bytes the batch must read (`kv_bytes_needed`).

use std::rc::Rc;

use half::{bf16, f16};
use paged_gqa::fp8::{Fp8E4M3, Fp8E5M2, Fp8Element};
use paged_gqa::sim::{AttendBatch, NaiveAttention, SimDevice};
use paged_gqa::{DType, Element};

use super::cpu::time_ms;
use super::report::{Record, Times};
use super::{data, Case};
use crate::Failure;

pub fn run(cases: &[Case], iters: usize) -> Result<Vec<Record>, Failure> {
    let device = SimDevice::new();
    // One schedule per launch: the race check would run (and count) everything twice.
    device.set_race_check(false);
    let name = "kernel emulator (emulated H200, on the CPU)";
    eprintln!("bench: {name}; times are emulation, not GPU time");
    let timing = format!(
        "EMULATION: wall clock of the CPU kernel emulator, median of {iters} after 1 warm-up; not a GPU time"
    );
    let mut records = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        eprintln!("bench [{}/{}] {case}", i + 1, cases.len());
        let (times, fetched) = match (case.dtype, case.kv_dtype) {
            (DType::F16, DType::F8E4M3) => measure_fp8::<f16, Fp8E4M3>(&device, case, iters)?,
            (DType::F16, DType::F8E5M2) => measure_fp8::<f16, Fp8E5M2>(&device, case, iters)?,
            (_, DType::F8E4M3) => measure_fp8::<bf16, Fp8E4M3>(&device, case, iters)?,
            (_, DType::F8E5M2) => measure_fp8::<bf16, Fp8E5M2>(&device, case, iters)?,
            (DType::F16, _) => measure::<f16>(&device, case, iters)?,
            _ => measure::<bf16>(&device, case, iters)?,
        };
        // The emulator's "bandwidth" would be meaningless: report against a nominal 1 GB/s.
        let mut record = Record::new(case, "sim", name, times, 1.0, &timing);
        record.kv_bytes_fetched = Some(fetched);
        records.push(record);
    }
    Ok(records)
}

/// [`measure`] over fp8 pages of `F` (no naive path: it has no fp8 pages).
fn measure_fp8<T: Element, F: Fp8Element>(
    device: &Rc<SimDevice>,
    case: &Case,
    iters: usize,
) -> Result<(Times, u64), Failure> {
    let mut rng = data::rng();
    let t = data::tables(case, &mut rng).map_err(Failure::runtime)?;
    let fail = Failure::runtime;
    let (k, v, scales) = data::fp8_kv::<F>(&mut rng, &t.layout).map_err(fail)?;
    let scales = paged_gqa::sim::DeviceKvScales::new(device, &scales).map_err(fail)?;
    let (k, v) = (
        device.upload(&k).map_err(fail)?,
        device.upload(&v).map_err(fail)?,
    );
    let q = data::random::<T>(&mut rng, t.lens.num_tokens() * case.shape.q_row_len());
    let q = device.upload(&q).map_err(fail)?;
    let mut out = device.alloc::<T>(q.len()).map_err(fail)?;
    let mut lse = device
        .alloc::<f32>(t.lens.num_tokens() * case.shape.n_heads())
        .map_err(fail)?;
    let fused = AttendBatch::with_kernels(
        device,
        t.layout,
        T::DTYPE,
        &t.lens,
        &t.block_tables,
        t.max_blocks,
        case.kernels.choice(),
    )
    .map_err(fail)?;
    let mut run = || {
        fused.run_fp8(
            device,
            &k,
            &v,
            &scales,
            &q,
            &mut out,
            &mut lse,
            &case.options,
        )
    };
    device.unwatch_all();
    device.watch(k.address(), k.len() * std::mem::size_of::<F>());
    device.watch(v.address(), v.len() * std::mem::size_of::<F>());
    run().map_err(fail)?;
    let fetched = device.watched_bytes();
    device.unwatch_all();
    let fused_ms = time_ms(iters, run)?;
    Ok(((fused_ms, None, None), fetched))
}

/// ((fused, naive whole path, naive attention alone) milliseconds, K/V bytes one fused call
/// fetched).
fn measure<T: Element>(
    device: &Rc<SimDevice>,
    case: &Case,
    iters: usize,
) -> Result<(Times, u64), Failure> {
    let mut rng = data::rng();
    let t = data::tables(case, &mut rng).map_err(Failure::runtime)?;
    let fail = Failure::runtime;
    let upload = |n: usize, rng: &mut _| device.upload(&data::random::<T>(rng, n)).map_err(fail);
    let k = upload(t.layout.cache_len(), &mut rng)?;
    let v = upload(t.layout.cache_len(), &mut rng)?;
    let q = upload(t.lens.num_tokens() * case.shape.q_row_len(), &mut rng)?;
    let mut out = device.alloc::<T>(q.len()).map_err(fail)?;
    let mut lse = device
        .alloc::<f32>(t.lens.num_tokens() * case.shape.n_heads())
        .map_err(fail)?;
    let fused = AttendBatch::with_kernels(
        device,
        t.layout,
        T::DTYPE,
        &t.lens,
        &t.block_tables,
        t.max_blocks,
        case.kernels.choice(),
    )
    .map_err(fail)?;
    device.unwatch_all();
    device.watch(k.address(), k.len() * std::mem::size_of::<T>());
    device.watch(v.address(), v.len() * std::mem::size_of::<T>());
    fused
        .run(device, &k, &v, &q, &mut out, &mut lse, &case.options)
        .map_err(fail)?;
    let fetched = device.watched_bytes();
    device.unwatch_all();
    let fused_ms = time_ms(iters, || {
        fused.run(device, &k, &v, &q, &mut out, &mut lse, &case.options)
    })?;
    let mut naive =
        NaiveAttention::<T>::new(device, t.layout, &t.lens, &t.block_tables, t.max_blocks)
            .map_err(fail)?;
    let naive_ms = time_ms(iters, || {
        naive.run(device, &k, &v, &q, &mut out, &case.options)
    })?;
    Ok(((fused_ms, Some(naive_ms), None), fetched))
}
