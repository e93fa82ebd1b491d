//! The sweep on the GPU: the fused attention against the naive path, timed with CUDA
//! events, rotating among input sets larger than L2 so the cache does not flatter anyone, and
//! the device's copy bandwidth measured in the same run.

use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use half::{bf16, f16};
use paged_gqa::cuda::{AttendBatch, NaiveAttention};
use paged_gqa::fp8::{Fp8E4M3, Fp8E5M2, Fp8Element};
use paged_gqa::{DType, DeviceValue, Element, PageElement};

use super::{data, report::Record, Case};
use crate::Failure;

const WARMUP: usize = 3;
/// At most this many rotating input sets per case.
const MAX_SETS: usize = 8;

fn driver(e: cudarc::driver::DriverError) -> Failure {
    Failure::runtime(paged_gqa::Error::from(e))
}

/// Milliseconds per call of `f(i)` (i rotates the input set): CUDA events around `iters`
/// calls after `WARMUP` calls.
fn time_ms(
    ctx: &Arc<CudaContext>,
    stream: &CudaStream,
    iters: usize,
    mut f: impl FnMut(usize) -> paged_gqa::Result<()>,
) -> Result<f64, Failure> {
    for i in 0..WARMUP {
        f(i).map_err(Failure::runtime)?;
    }
    let start = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(driver)?;
    let end = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(driver)?;
    start.record(stream).map_err(driver)?;
    for i in 0..iters.max(1) {
        f(i).map_err(Failure::runtime)?;
    }
    end.record(stream).map_err(driver)?;
    end.synchronize().map_err(driver)?;
    Ok(start.elapsed_ms(&end).map_err(driver)? as f64 / iters.max(1) as f64)
}

/// Device copy bandwidth in GB/s (bytes read + written): 1 GiB device-to-device copies.
fn copy_bandwidth_gbs(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>) -> Result<f64, Failure> {
    let n = 1usize << 30;
    let src = stream.alloc_zeros::<u8>(n).map_err(driver)?;
    let mut dst = stream.alloc_zeros::<u8>(n).map_err(driver)?;
    let ms = time_ms(ctx, stream, 10, |_| Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    Ok(2.0 * n as f64 / (ms * 1e-3) / 1e9)
}

/// A device buffer of `n` random elements: a random host pattern of up to 16 Mi elements,
/// uploaded repeatedly (values never zero; their exact pattern does not matter to the timing).
fn random_device<T: DeviceValue>(
    stream: &Arc<CudaStream>,
    pattern: &[T],
    n: usize,
) -> Result<CudaSlice<T>, Failure> {
    let mut buf = unsafe { stream.alloc::<T>(n) }.map_err(driver)?;
    let mut at = 0;
    while at < n {
        let len = pattern.len().min(n - at);
        stream
            .memcpy_htod(&pattern[..len], &mut buf.slice_mut(at..at + len))
            .map_err(driver)?;
        at += len;
    }
    Ok(buf)
}

pub fn run(ctx: &Arc<CudaContext>, cases: &[Case], iters: usize) -> Result<Vec<Record>, Failure> {
    let stream = ctx.new_stream().map_err(driver)?;
    let name = ctx.name().unwrap_or_else(|_| "GPU".into());
    let copy_gbs = copy_bandwidth_gbs(ctx, &stream)?;
    let l2 = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .map_err(driver)?
        .max(0) as u64;
    eprintln!(
        "bench: {name}, measured copy bandwidth {copy_gbs:.0} GB/s (read + write), L2 {} MiB",
        l2 >> 20
    );
    let timing =
        format!("CUDA events, mean of {iters} after {WARMUP} warm-up, input sets rotated past L2");
    let mut records = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        eprintln!("bench [{}/{}] {case}", i + 1, cases.len());
        let sets = ((2 * l2).div_ceil(case.kv_bytes().max(1)) as usize).clamp(1, MAX_SETS);
        let result = match (case.dtype, case.kv_dtype) {
            (DType::F16, DType::F8E4M3) => {
                measure_fp8::<f16, Fp8E4M3>(ctx, &stream, case, sets, iters)
            }
            (DType::F16, DType::F8E5M2) => {
                measure_fp8::<f16, Fp8E5M2>(ctx, &stream, case, sets, iters)
            }
            (_, DType::F8E4M3) => measure_fp8::<bf16, Fp8E4M3>(ctx, &stream, case, sets, iters),
            (_, DType::F8E5M2) => measure_fp8::<bf16, Fp8E5M2>(ctx, &stream, case, sets, iters),
            (DType::F16, _) => measure::<f16>(ctx, &stream, case, sets, iters),
            _ => measure::<bf16>(ctx, &stream, case, sets, iters),
        };
        match result {
            Ok(times) => records.push(Record::new(case, "cuda", &name, times, copy_gbs, &timing)),
            Err(e) => eprintln!("bench: skipped {case}: {}", e.message),
        }
    }
    Ok(records)
}

/// The fused path's inputs for one case: `sets` input sets (K and V pages of `P`, queries of
/// `T`), each K and query a different phase of its pattern, the outputs, and the batch.
struct Fused<T: Element, P: PageElement> {
    /// (k_cache, v_cache, q) per set: `[num_blocks, page_size, n_kv_heads, head_dim]` twice, then
    /// `[num_tokens, n_heads, head_dim]`.
    inputs: Vec<(CudaSlice<P>, CudaSlice<P>, CudaSlice<T>)>,
    /// [num_tokens, n_heads, head_dim]
    out: CudaSlice<T>,
    /// [num_tokens, n_heads]
    lse: CudaSlice<f32>,
    batch: AttendBatch,
}

impl<T: Element, P: PageElement> Fused<T, P> {
    fn new(
        stream: &Arc<CudaStream>,
        case: &Case,
        t: &data::Tables,
        (k_pattern, v_pattern, q_pattern): (&[P], &[P], &[T]),
        sets: usize,
    ) -> Result<Self, Failure> {
        let q_len = t.lens.num_tokens() * case.shape.q_row_len();
        let mut inputs = Vec::with_capacity(sets);
        for s in 0..sets {
            let offset = s * 7919; // a different pattern phase per set
            let k = random_device(stream, &rotate(k_pattern, offset), t.layout.cache_len())?;
            let v = random_device(stream, v_pattern, t.layout.cache_len())?;
            let q = random_device(stream, &rotate(q_pattern, offset), q_len)?;
            inputs.push((k, v, q));
        }
        let batch = AttendBatch::with_kernels(
            stream,
            t.layout,
            T::DTYPE,
            &t.lens,
            &t.block_tables,
            t.max_blocks,
            case.kernels.choice(),
        )
        .map_err(Failure::runtime)?;
        Ok(Self {
            inputs,
            out: stream.alloc_zeros::<T>(q_len).map_err(driver)?,
            lse: stream
                .alloc_zeros::<f32>(t.lens.num_tokens() * case.shape.n_heads())
                .map_err(driver)?,
            batch,
        })
    }
}

/// `pattern` from element `offset` (modulo its length) on, then its start.
fn rotate<V: Copy>(pattern: &[V], offset: usize) -> Vec<V> {
    let offset = offset % pattern.len().max(1);
    pattern[offset..]
        .iter()
        .chain(&pattern[..offset])
        .copied()
        .collect()
}

/// [`measure`] over fp8 pages of `F` (the fused path only: the naive path has no fp8 pages).
fn measure_fp8<T: Element, F: Fp8Element>(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    case: &Case,
    sets: usize,
    iters: usize,
) -> Result<(f64, Option<f64>, Option<f64>), Failure> {
    let mut rng = data::rng();
    let t = data::tables(case, &mut rng).map_err(Failure::runtime)?;
    // One random fp8 pattern (at most 16 Mi values per tensor, repeated), rotated per set.
    let pattern_layout = paged_gqa::PagedLayout::new(
        case.shape,
        t.layout
            .num_blocks()
            .min((16 << 20) / (case.page_size * case.shape.kv_row_len()))
            .max(1),
        case.page_size,
    )
    .map_err(Failure::runtime)?;
    let (pk, pv, scales) =
        data::fp8_kv::<F>(&mut rng, &pattern_layout).map_err(Failure::runtime)?;
    let scales = paged_gqa::cuda::DeviceKvScales::new(stream, &scales).map_err(Failure::runtime)?;
    let q_pattern: Vec<T> = data::random(&mut rng, 1 << 16);
    let mut f = Fused::new(stream, case, &t, (&pk, &pv, &q_pattern), sets)?;
    let fused_ms = time_ms(ctx, stream, iters, |i| {
        let (k, v, q) = &f.inputs[i % sets];
        let (out, lse) = (&mut f.out, &mut f.lse);
        f.batch
            .run_fp8(stream, k, v, &scales, q, out, lse, &case.options)
    })?;
    Ok((fused_ms, None, None))
}

/// (fused, naive whole path, naive attention alone), milliseconds per step. The naive path of
/// a prefill case runs its attention step on the same kernels with the MHA shape.
fn measure<T: Element>(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    case: &Case,
    sets: usize,
    iters: usize,
) -> Result<(f64, Option<f64>, Option<f64>), Failure> {
    let mut rng = data::rng();
    let t = data::tables(case, &mut rng).map_err(Failure::runtime)?;
    let pattern: Vec<T> = data::random(&mut rng, t.layout.cache_len().min(16 << 20));
    let mut f = Fused::new(stream, case, &t, (&pattern, &pattern, &pattern), sets)?;
    let fused_ms = time_ms(ctx, stream, iters, |i| {
        let (k, v, q) = &f.inputs[i % sets];
        let (out, lse) = (&mut f.out, &mut f.lse);
        f.batch.run(stream, k, v, q, out, lse, &case.options)
    })?;
    let mut naive =
        NaiveAttention::<T>::new(stream, t.layout, &t.lens, &t.block_tables, t.max_blocks)
            .map_err(Failure::runtime)?;
    let naive_ms = time_ms(ctx, stream, iters, |i| {
        let (k, v, q) = &f.inputs[i % sets];
        naive.run(stream, k, v, q, &mut f.out, &case.options)
    })?;
    let attention_ms = time_ms(ctx, stream, iters, |i| {
        naive.attention(stream, &f.inputs[i % sets].2, &mut f.out, &case.options)
    })?;
    Ok((fused_ms, Some(naive_ms), Some(attention_ms)))
}
