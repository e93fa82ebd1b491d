//! `paged-gqa attend`: run one case and write `out` and `lse`.

use std::path::Path;

use paged_gqa::cpu;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::{case, Backend, Failure};

pub fn run(case_path: &Path, out_path: &Path, backend: Backend) -> Result<(), Failure> {
    let case = case::load(case_path)?;
    if backend == Backend::Cuda {
        return Err(Failure::runtime(
            "--backend cuda: the GPU attention kernel does not exist yet (it lands with the fused \
             decode kernel); only repeat_kv runs on the GPU today. Use --backend cpu.",
        ));
    }
    let kv = cpu::PagedKv::new(
        case.layout,
        &case.lens,
        &case.block_tables,
        case.max_blocks,
        &case.k_cache,
        &case.v_cache,
    )
    .map_err(|e| Failure::input(format!("{}: {e}", case_path.display())))?;
    let result = cpu::attention(&case.q, &kv, case.scale)
        .map_err(|e| Failure::input(format!("{}: {e}", case_path.display())))?;
    let shape = case.layout.shape();
    let tokens = case.lens.num_tokens();
    write(
        out_path,
        &result,
        [tokens, shape.n_heads(), shape.head_dim()],
    )
}

fn f32_bytes(values: &[f64]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| (v as f32).to_le_bytes())
        .collect()
}

/// Writes `out` and `lse` as f32 to a temporary file, then renames it into place, so a failure
/// never leaves a partial output.
fn write(path: &Path, result: &cpu::Attention, out_shape: [usize; 3]) -> Result<(), Failure> {
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
