//! Finds the CUDA compiler: `NVCC`, then `CUDA_HOME` / `CUDA_PATH`, then `PATH`, then the
//! project-local wheels that scripts/install-toolchain puts in `.toolchain/cuda`.

use std::env;
use std::path::{Path, PathBuf};

/// A CUDA toolkit: nvcc and the folder holding libcudart_static.a.
pub struct Toolkit {
    pub nvcc: PathBuf,
    pub lib_dir: PathBuf,
}

fn is_file(path: &Path) -> bool {
    path.is_file()
}

/// The lib folder of a toolkit rooted at `root` that holds the static CUDA runtime.
fn lib_dir(root: &Path) -> Option<PathBuf> {
    [
        "lib64",
        "lib",
        "targets/x86_64-linux/lib",
        "targets/sbsa-linux/lib",
    ]
    .iter()
    .map(|sub| root.join(sub))
    .find(|dir| dir.join("libcudart_static.a").is_file())
}

fn toolkit(nvcc: PathBuf, found_by: &'static str) -> Result<Toolkit, String> {
    let nvcc = nvcc.canonicalize().unwrap_or(nvcc);
    let root = nvcc
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("nvcc at {} has no toolkit folder above it", nvcc.display()))?
        .to_path_buf();
    let lib_dir = lib_dir(&root).ok_or_else(|| {
        format!(
            "nvcc found by {found_by} at {}, but no libcudart_static.a under {}",
            nvcc.display(),
            root.display()
        )
    })?;
    Ok(Toolkit { nvcc, lib_dir })
}

/// Looks for nvcc in the documented order. `Ok(None)`: no CUDA compiler anywhere.
/// `Err`: one was named (by NVCC, CUDA_HOME or CUDA_PATH) but is not usable.
pub fn find(manifest_dir: &Path) -> Result<Option<Toolkit>, String> {
    if let Some(nvcc) = env::var_os("NVCC") {
        let nvcc = PathBuf::from(nvcc);
        if !is_file(&nvcc) {
            return Err(format!("NVCC={} is not a file", nvcc.display()));
        }
        return toolkit(nvcc, "NVCC").map(Some);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            let nvcc = PathBuf::from(root).join("bin").join("nvcc");
            if !is_file(&nvcc) {
                return Err(format!(
                    "{var} is set but {} does not exist",
                    nvcc.display()
                ));
            }
            return toolkit(
                nvcc,
                if var == "CUDA_HOME" {
                    "CUDA_HOME"
                } else {
                    "CUDA_PATH"
                },
            )
            .map(Some);
        }
    }
    if let Some(path) = env::var_os("PATH") {
        if let Some(nvcc) = env::split_paths(&path)
            .map(|dir| dir.join("nvcc"))
            .find(|p| is_file(p))
        {
            return toolkit(nvcc, "PATH").map(Some);
        }
    }
    let local = manifest_dir.join(".toolchain/cuda/nvidia/cu13/bin/nvcc");
    if is_file(&local) {
        return toolkit(local, ".toolchain").map(Some);
    }
    Ok(None)
}
