//! `paged-gqa attend`: run one case and write `out` and `lse`.

use std::path::Path;

use half::{bf16, f16};
use paged_gqa::cuda::{self, AttendBatch};
use paged_gqa::{cpu, sim, DType, Element};
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

/// The definition, in f64, from the case's values.
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
/// bf16 cases.
fn run_kernels(case: &Case, bf16_run: RunTyped, f16_run: RunTyped) -> Result<Output, Failure> {
    match case.dtype {
        Some(DType::BF16) => bf16_run(case),
        Some(DType::F16) => f16_run(case),
        other => Err(Failure::runtime(format!(
            "--backend cuda and --backend sim take cases whose q, k_cache and v_cache are all F16 or all BF16 (this one: {}). \
             Use --backend cpu.",
            other.map_or("mixed".to_string(), |d| format!("{d:?}"))
        ))),
    }
}

/// The case's values as `T` (they came from T, so the conversion back is exact).
fn typed<T: Element>(values: &[f64]) -> Vec<T> {
    values.iter().map(|&v| T::from_f32(v as f32)).collect()
}

/// The exact kernel code on the emulator (see the README, "Running the kernels without a GPU").
fn run_sim_typed<T: Element>(case: &Case) -> Result<Output, Failure> {
    let fail = Failure::runtime;
    let device = sim::SimDevice::new();
    let batch = sim::AttendBatch::new(
        &device,
        case.layout,
        T::DTYPE,
        &case.lens,
        &case.block_tables,
        case.max_blocks,
    )
    .map_err(fail)?;
    let upload = |x: &[f64]| device.upload(&typed::<T>(x)).map_err(fail);
    let (q, k, v) = (
        upload(&case.q)?,
        upload(&case.k_cache)?,
        upload(&case.v_cache)?,
    );
    let mut out = device.alloc::<T>(case.q.len()).map_err(fail)?;
    let mut lse = device
        .alloc::<f32>(case.q.len() / case.layout.shape().head_dim())
        .map_err(fail)?;
    batch
        .run(&device, &k, &v, &q, &mut out, &mut lse, &case.options)
        .map_err(fail)?;
    Ok(Output {
        out: out.as_slice().iter().map(|&x| x.into() as f32).collect(),
        lse: lse.to_vec(),
    })
}

fn run_cuda_typed<T: Element>(case: &Case) -> Result<Output, Failure> {
    let fail = Failure::runtime;
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
    let upload = |x: &[f64]| {
        stream
            .clone_htod(&typed::<T>(x))
            .map_err(|e| fail(paged_gqa::Error::from(e)))
    };
    let (q, k, v) = (
        upload(&case.q)?,
        upload(&case.k_cache)?,
        upload(&case.v_cache)?,
    );
    let mut out = stream
        .alloc_zeros::<T>(case.q.len())
        .map_err(|e| fail(paged_gqa::Error::from(e)))?;
    let mut lse = stream
        .alloc_zeros::<f32>(case.q.len() / case.layout.shape().head_dim())
        .map_err(|e| fail(paged_gqa::Error::from(e)))?;
    batch
        .run(&stream, &k, &v, &q, &mut out, &mut lse, &case.options)
        .map_err(fail)?;
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
