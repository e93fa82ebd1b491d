//! Builds the kernel emulator: kernels/*.cu compiled by the host C++ compiler against the shim
//! headers in kernels/sim/include, with the emulator's runtime (kernels/sim/runtime.cpp) and its
//! planted-bug checks (kernels/sim/checks.cu), into the static library `paged_gqa_sim`. Needs no
//! CUDA toolkit, so every build has it.

use std::path::Path;

/// Compiles the emulator library. The kernels keep their own file names; the shims rename
/// their C entry points to `pgqa_sim_*` and their namespace to `pgqa_emulated`, so the emulated
/// and the nvcc-built kernels link into one binary.
pub fn build(manifest_dir: &Path) {
    let kernel_dir = manifest_dir.join("kernels");
    let sim_dir = kernel_dir.join("sim");
    let mut kernels: Vec<_> = std::fs::read_dir(&kernel_dir)
        .expect("kernels/ is readable")
        .map(|entry| entry.expect("kernels/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    kernels.sort();
    kernels.push(sim_dir.join("checks.cu"));

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        // Optimised in every profile: the emulator runs the test suite's kernels.
        .opt_level(2)
        .debug(false)
        .warnings(false)
        .cargo_warnings(false)
        .define("PGQA_SIM", "1")
        .flag("-fno-strict-aliasing")
        .flag("-Wno-unknown-pragmas")
        // The shims come first: they stand in for cuda_runtime.h, cuda_fp16.h, cuda_bf16.h.
        .include(sim_dir.join("include"))
        .include(kernel_dir.join("include"))
        .include(&kernel_dir)
        .include(&sim_dir)
        .file(sim_dir.join("runtime.cpp"));
    // The .cu sources are C++ to the host compiler.
    for kernel in &kernels {
        build.file(kernel);
    }
    build.flag("-x").flag("c++");
    build.compile("paged_gqa_sim");
    println!("cargo::rustc-link-lib=dylib=stdc++");
}
