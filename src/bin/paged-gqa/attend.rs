//! `paged-gqa attend`: run one case and write `out` and `lse`.

use std::path::Path;
use std::rc::Rc;

use half::{bf16, f16};
use paged_gqa::cuda::{self, AttendBatch};
use paged_gqa::fp8::{Fp8E4M3, Fp8E5M2, Fp8Element};
use paged_gqa::{cpu, sim, DType, Element, PageElement};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::case::Case;
use crate::{case, Backend, Failure};

/// `out` [num_tokens, n_heads, head_dim] and `lse` [num_tokens, n_heads], f32.
struct Output {
    out: Vec<f32>,
    lse: Vec<f32>,
}

pub fn run(case_path: &Path, out_path: &Path, backend: Backend) -> Result<(), Failure> {
    let case = case::load(case_path)?;
    let output = match backend {
        Backend::Cpu => {
            run_cpu(&case).map_err(|e| Failure::input(format!("{}: {e}", case_path.display())))?
        }
        Backend::Cuda => run_kernels(&case, run_cuda_typed::<bf16>, run_cuda_typed::<f16>)?,
        Backend::Sim => run_kernels(&case, run_sim_typed::<bf16>, run_sim_typed::<f16>)?,
    };
    let shape = case.layout.shape();
    write(
        out_path,
        &output,
        [case.lens.num_tokens(), shape.n_heads(), shape.head_dim()],
    )
}

/// The definition, in f64, from the case's values (fp8 caches: the dequantized values).
fn run_cpu(case: &Case) -> paged_gqa::Result<Output> {
    let kv = cpu::PagedKv::new(
        case.layout,
        &case.lens,
        &case.block_tables,
        case.max_blocks,
        &case.k_cache,
        &case.v_cache,
    )?;
    let result = cpu::attention(&case.q, &kv, &case.options)?;
    let narrow = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect();
    Ok(Output {
        out: narrow(result.out),
        lse: narrow(result.lse),
    })
}

type RunTyped = fn(&Case) -> Result<Output, Failure>;

/// The fused attention kernels (on the GPU or the emulator), any query lengths. Take f16 and
/// bf16 cases, over pages of the same type or fp8.
fn run_kernels(case: &Case, bf16_run: RunTyped, f16_run: RunTyped) -> Result<Output, Failure> {
    match case.dtype {
        Some(DType::BF16) => bf16_run(case),
        Some(DType::F16) => f16_run(case),
        other => Err(Failure::runtime(format!(
            "--backend cuda and --backend sim take cases whose q, k_cache and v_cache are all F16 or all BF16, \
             or F16 or BF16 q over F8_E4M3 or F8_E5M2 caches (this one: {}). Use --backend cpu.",
            other.map_or("mixed".to_string(), |d| format!("{d:?}"))
        ))),
    }
}

/// The case's values as `T` (they came from T, so the conversion back is exact).
fn typed<T: Element>(values: &[f64]) -> Vec<T> {
    values.iter().map(|&v| T::from_f32(v as f32)).collect()
}

/// The stored fp8 bits as `F` values.
fn stored<F: Fp8Element>(bits: &[u8]) -> Vec<F> {
    bits.iter().map(|&b| F::from_bits(b)).collect()
}

/// The exact kernel code on the emulator (see docs/emulator.md).
fn run_sim_typed<T: Element>(case: &Case) -> Result<Output, Failure> {
    run_sim_on::<T>(case, &sim::SimDevice::new())
}

/// [`run_sim_typed`] on `device`, its K/V pages watched (the traffic counter).
fn run_sim_on<T: Element>(case: &Case, device: &Rc<sim::SimDevice>) -> Result<Output, Failure> {
    let fail = Failure::runtime;
    let batch = sim::AttendBatch::new(
        device,
        case.layout,
        T::DTYPE,
        &case.lens,
        &case.block_tables,
        case.max_blocks,
    )
    .map_err(fail)?;
    let q = device.upload(&typed::<T>(&case.q)).map_err(fail)?;
    let mut out = device.alloc::<T>(case.q.len()).map_err(fail)?;
    let mut lse = device
        .alloc::<f32>(case.q.len() / case.layout.shape().head_dim())
        .map_err(fail)?;
    match &case.fp8 {
        None => {
            let k = typed::<T>(&case.k_cache);
            let v = typed::<T>(&case.v_cache);
            let (k, v) = watched_pages(device, &k, &v)?;
            batch
                .run(device, &k, &v, &q, &mut out, &mut lse, &case.options)
                .map_err(fail)
        }
        Some(fp8) if fp8.dtype == DType::F8E4M3 => {
            run_sim_fp8::<T, Fp8E4M3>(device, &batch, case, fp8, &q, &mut out, &mut lse)
        }
        Some(fp8) => run_sim_fp8::<T, Fp8E5M2>(device, &batch, case, fp8, &q, &mut out, &mut lse),
    }?;
    Ok(Output {
        out: out.as_slice().iter().map(|&x| x.into() as f32).collect(),
        lse: lse.to_vec(),
    })
}

/// The pages `k` and `v` (`[num_blocks, block_size, n_kv_heads, head_dim]` each) uploaded to
/// `device`, which counts the bytes the kernels fetch from them.
fn watched_pages<P: PageElement>(
    device: &Rc<sim::SimDevice>,
    k: &[P],
    v: &[P],
) -> Result<(sim::SimBuffer<P>, sim::SimBuffer<P>), Failure> {
    let k = device.upload(k).map_err(Failure::runtime)?;
    let v = device.upload(v).map_err(Failure::runtime)?;
    let bytes = k.len() * std::mem::size_of::<P>();
    device.watch(k.address(), bytes);
    device.watch(v.address(), bytes);
    Ok((k, v))
}

/// The fused attention on `device` over the case's fp8 pages of `F`, read under its scales.
fn run_sim_fp8<T: Element, F: Fp8Element>(
    device: &Rc<sim::SimDevice>,
    batch: &sim::AttendBatch,
    case: &Case,
    fp8: &crate::case::Fp8Cache,
    q: &sim::SimBuffer<T>,
    out: &mut sim::SimBuffer<T>,
    lse: &mut sim::SimBuffer<f32>,
) -> Result<(), Failure> {
    let (k, v) = watched_pages(device, &stored::<F>(&fp8.k_bits), &stored::<F>(&fp8.v_bits))?;
    let scales = sim::DeviceKvScales::new(device, &fp8.scales).map_err(Failure::runtime)?;
    batch
        .run_fp8(device, &k, &v, &scales, q, out, lse, &case.options)
        .map_err(Failure::runtime)
}

/// The profile of the case's attention on the emulator's traced kernels (no race check).
pub fn profile_case(case_path: &Path) -> Result<sim::profile::Profile, Failure> {
    let case = case::load(case_path)?;
    let device = sim::SimDevice::with_tracing(sim::Tracing {
        profile: true,
        sanitize: false,
    });
    device.set_race_check(false);
    match case.dtype {
        Some(DType::BF16) => run_sim_on::<bf16>(&case, &device)?,
        Some(DType::F16) => run_sim_on::<f16>(&case, &device)?,
        _ => run_kernels(&case, run_sim_typed::<bf16>, run_sim_typed::<f16>)?,
    };
    device.take_profile().map_err(Failure::runtime)
}

fn run_cuda_typed<T: Element>(case: &Case) -> Result<Output, Failure> {
    let fail = Failure::runtime;
    let driver = |e: cudarc::driver::DriverError| fail(paged_gqa::Error::from(e));
    let ctx = cuda::context(0).map_err(fail)?;
    let stream = ctx.default_stream();
    let batch = AttendBatch::new(
        &stream,
        case.layout,
        T::DTYPE,
        &case.lens,
        &case.block_tables,
        case.max_blocks,
    )
    .map_err(fail)?;
    let q = stream.clone_htod(&typed::<T>(&case.q)).map_err(driver)?;
    let mut out = stream.alloc_zeros::<T>(case.q.len()).map_err(driver)?;
    let mut lse = stream
        .alloc_zeros::<f32>(case.q.len() / case.layout.shape().head_dim())
        .map_err(driver)?;
    match &case.fp8 {
        None => {
            let k = stream
                .clone_htod(&typed::<T>(&case.k_cache))
                .map_err(driver)?;
            let v = stream
                .clone_htod(&typed::<T>(&case.v_cache))
                .map_err(driver)?;
            batch
                .run(&stream, &k, &v, &q, &mut out, &mut lse, &case.options)
                .map_err(fail)?;
        }
        Some(fp8) => {
            fn run<T: Element, F: Fp8Element>(
                stream: &std::sync::Arc<cuda::CudaStream>,
                batch: &AttendBatch,
                case: &Case,
                fp8: &crate::case::Fp8Cache,
                q: &cuda::CudaSlice<T>,
                out: &mut cuda::CudaSlice<T>,
                lse: &mut cuda::CudaSlice<f32>,
            ) -> Result<(), Failure> {
                let driver =
                    |e: cudarc::driver::DriverError| Failure::runtime(paged_gqa::Error::from(e));
                let k = stream
                    .clone_htod(&stored::<F>(&fp8.k_bits))
                    .map_err(driver)?;
                let v = stream
                    .clone_htod(&stored::<F>(&fp8.v_bits))
                    .map_err(driver)?;
                let scales =
                    cuda::DeviceKvScales::new(stream, &fp8.scales).map_err(Failure::runtime)?;
                batch
                    .run_fp8(stream, &k, &v, &scales, q, out, lse, &case.options)
                    .map_err(Failure::runtime)
            }
            if fp8.dtype == DType::F8E4M3 {
                run::<T, Fp8E4M3>(&stream, &batch, case, fp8, &q, &mut out, &mut lse)?;
            } else {
                run::<T, Fp8E5M2>(&stream, &batch, case, fp8, &q, &mut out, &mut lse)?;
            }
        }
    }
    let out: Vec<T> = stream
        .clone_dtoh(&out)
        .map_err(|e| fail(paged_gqa::Error::from(e)))?;
    let lse = stream
        .clone_dtoh(&lse)
        .map_err(|e| fail(paged_gqa::Error::from(e)))?;
    Ok(Output {
        out: out.into_iter().map(|x| x.into() as f32).collect(),
        lse,
    })
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes `out` and `lse` as f32 to a temporary file, then renames it into place, so a failure
/// never leaves a partial output.
fn write(path: &Path, result: &Output, out_shape: [usize; 3]) -> Result<(), Failure> {
    let out_bytes = f32_bytes(&result.out);
    let lse_bytes = f32_bytes(&result.lse);
    let view = |shape: Vec<usize>, bytes| {
        TensorView::new(Dtype::F32, shape, bytes)
            .map_err(|e| Failure::runtime(format!("output tensor: {e}")))
    };
    let tensors = [
        ("out", view(out_shape.to_vec(), &out_bytes)?),
        ("lse", view(vec![out_shape[0], out_shape[1]], &lse_bytes)?),
    ];
    let data = safetensors::serialize(tensors, None)
        .map_err(|e| Failure::runtime(format!("serialize output: {e}")))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.partial"));
    std::fs::write(&tmp, data)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| Failure::runtime(format!("cannot write {}: {e}", path.display())))
}
