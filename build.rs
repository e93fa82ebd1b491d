//! Compiles kernels/*.cu with nvcc (through `cc` in CUDA mode) into a static library, links the
//! static CUDA runtime, and keeps the `ptxas -v` resource report of every kernel in
//! `$OUT_DIR/kernel-report.tsv`. The build fails when a kernel spills registers or has a stack
//! frame that kernels/resource-allowlist.txt does not allow.
//!
//! Without nvcc (or with PAGED_GQA_NO_CUDA=1) the crate builds CPU-only: a warning, no
//! `paged_gqa_kernels` cfg, and every CUDA entry point returns `Error::CudaUnavailable`.

#[path = "build/ptxas.rs"]
mod ptxas;
#[path = "build/sim.rs"]
mod sim;
#[path = "build/toolchain.rs"]
mod toolchain;

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;

/// Architectures built when PAGED_GQA_CUDA_ARCHS is unset: Ampere and Hopper, plus PTX of
/// the newest for forward compatibility.
const DEFAULT_ARCHS: &str = "80;90";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(paged_gqa_kernels)");
    println!("cargo::rustc-check-cfg=cfg(paged_gqa_mma)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=build");
    println!("cargo::rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "PAGED_GQA_CUDA_ARCHS",
        "PAGED_GQA_NO_CUDA",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    println!(
        "cargo::rerun-if-changed={}",
        manifest_dir.join(".toolchain/cuda/.installed").display()
    );
    // The kernel emulator needs only the host C++ compiler: every build has it.
    sim::build(&manifest_dir, &PathBuf::from(env::var("OUT_DIR").unwrap()));

    if env::var("PAGED_GQA_NO_CUDA").is_ok_and(|v| v == "1") {
        println!("cargo::warning=PAGED_GQA_NO_CUDA=1: building paged-gqa without CUDA kernels (CPU backend only)");
        return;
    }
    let toolkit = match toolchain::find(&manifest_dir) {
        Ok(Some(toolkit)) => toolkit,
        Ok(None) => {
            println!(
                "cargo::warning=nvcc not found (NVCC, CUDA_HOME, CUDA_PATH, PATH, .toolchain): \
                 building paged-gqa without CUDA kernels (CPU backend only); \
                 scripts/install-toolchain installs a CUDA compiler"
            );
            return;
        }
        Err(message) => panic!("paged-gqa: {message}"),
    };
    let archs = match parse_archs(
        &env::var("PAGED_GQA_CUDA_ARCHS")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_ARCHS.into()),
    ) {
        Ok(archs) => archs,
        Err(message) => panic!("paged-gqa: PAGED_GQA_CUDA_ARCHS: {message}"),
    };
    build_kernels(&manifest_dir, &toolkit, &archs);
    println!("cargo::rustc-cfg=paged_gqa_kernels");
    // The tensor-core kernel has a body only in sm_80+ code (kernels/attend_tensor_cores.cu).
    if archs.iter().any(|&arch| arch >= 80) {
        println!("cargo::rustc-cfg=paged_gqa_mma");
    }
    println!("cargo::rustc-env=PAGED_GQA_NVCC={}", toolkit.nvcc.display());
}

/// "80;90" or "80,90" -> [80, 90], each a compute capability CUDA 13 supports (75 and up).
fn parse_archs(text: &str) -> Result<Vec<u32>, String> {
    let mut archs = Vec::new();
    for word in text.split([';', ',', ' ']).filter(|w| !w.is_empty()) {
        let arch: u32 = word
            .parse()
            .map_err(|_| format!("`{word}` is not a number like 90"))?;
        if arch < 75 {
            return Err(format!(
                "sm_{arch} is older than sm_75, the oldest CUDA 13 targets"
            ));
        }
        archs.push(arch);
    }
    archs.sort_unstable();
    archs.dedup();
    if archs.is_empty() {
        return Err("no architecture given".into());
    }
    Ok(archs)
}

fn build_kernels(manifest_dir: &Path, toolkit: &toolchain::Toolkit, archs: &[u32]) {
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernel_dir = manifest_dir.join("kernels");
    let mut sources: Vec<PathBuf> = fs::read_dir(&kernel_dir)
        .expect("kernels/ is readable")
        .map(|entry| entry.expect("kernels/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    sources.sort();

    // nvcc's flags, set here rather than through cc's CUDA mode: cc's get_compiler() hands
    // host-compiler flags (-ffunction-sections, ...) to nvcc unwrapped, which nvcc rejects.
    // cc still archives the objects and emits the link directives.
    let include = kernel_dir.join("include");
    let mut flags: Vec<String> = vec![
        "-O3".into(),
        "-std=c++17".into(),
        "-lineinfo".into(),
        "-Xptxas=-v".into(),
        // Compressed fatbins: about 8x smaller objects and binaries (the -lineinfo tables the
        // sanitizers report source lines from are most of the size); decompressed at load.
        "-Xfatbin=-compress-all".into(),
        "-Xcompiler=-fPIC,-ffunction-sections,-fdata-sections".into(),
        "--expt-relaxed-constexpr".into(),
        format!("-I{}", include.display()),
        format!("-I{}", kernel_dir.display()),
    ];
    let newest = *archs.last().unwrap();
    for &arch in archs {
        let code = if arch == newest {
            format!("[sm_{arch},compute_{arch}]")
        } else {
            format!("sm_{arch}")
        };
        flags.push(format!("-gencode=arch=compute_{arch},code={code}"));
    }

    // One nvcc per file, in parallel; each one's stderr carries its ptxas report.
    let results: Vec<(PathBuf, PathBuf, String)> = thread::scope(|scope| {
        let handles: Vec<_> = sources
            .iter()
            .map(|source| {
                let object = out_dir
                    .join(source.file_stem().unwrap())
                    .with_extension("o");
                let mut command = Command::new(&toolkit.nvcc);
                command
                    .args(&flags)
                    .arg("-c")
                    .arg(source)
                    .arg("-o")
                    .arg(&object);
                scope.spawn(move || (source.clone(), object, run(command, source)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("nvcc thread"))
            .collect()
    });

    let mut kernels = Vec::new();
    let mut objects = Vec::new();
    for (source, object, stderr) in results {
        let name = source.file_name().unwrap().to_string_lossy().into_owned();
        kernels.extend(ptxas::parse(&name, &stderr));
        objects.push(object);
    }
    let report = out_dir.join("kernel-report.tsv");
    fs::write(&report, ptxas::to_tsv(&kernels)).expect("write kernel report");
    println!(
        "cargo::rustc-env=PAGED_GQA_KERNEL_REPORT={}",
        report.display()
    );

    let allowlist_path = kernel_dir.join("resource-allowlist.txt");
    let allowlist = fs::read_to_string(&allowlist_path).unwrap_or_default();
    let allowed = ptxas::parse_allowlist(&allowlist).unwrap_or_else(|e| panic!("paged-gqa: {e}"));
    let violations = ptxas::violations(&kernels, &allowed);
    if !violations.is_empty() {
        panic!(
            "paged-gqa: kernels break the no-spill, no-stack rule (allow one in {} with a reason):\n  {}",
            allowlist_path.display(),
            violations.join("\n  ")
        );
    }

    cc::Build::new()
        .objects(&objects)
        .cargo_warnings(false)
        .compile("paged_gqa_kernels");
    println!(
        "cargo::rustc-link-search=native={}",
        toolkit.lib_dir.display()
    );
    println!("cargo::rustc-link-lib=static=cudart_static");
    for lib in ["stdc++", "dl", "rt", "pthread"] {
        println!("cargo::rustc-link-lib=dylib={lib}");
    }
}

/// Runs nvcc; returns its stderr (the ptxas report). Panics with the compiler output on failure.
fn run(mut command: Command, source: &Path) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("paged-gqa: could not run nvcc on {}: {e}", source.display()));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        panic!(
            "paged-gqa: nvcc failed on {} ({}):\n{}{}",
            source.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            stderr
        );
    }
    stderr
}
