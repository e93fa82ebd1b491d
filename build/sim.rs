//! Builds the kernel emulator: kernels/*.cu compiled by the host C++ compiler against the shim
//! headers in kernels/sim/include, with the emulator's runtime (kernels/sim/runtime.cpp) and its
//! planted-bug checks (kernels/sim/checks.cu), into the static library `paged_gqa_sim`. Needs no
//! CUDA toolkit, so every build has it.
//!
//! Each kernel file is compiled through a generated wrapper that includes it and then registers
//! its kernels' `__launch_bounds__` (found in the source; the host compiler keeps no trace of the
//! attribute), so the emulator refuses a launch above a kernel's bound as the driver does.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// `(bound expression, kernel name)` of every `__launch_bounds__(BOUND, ...) NAME(` in `source`.
fn launch_bounds(source: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("__launch_bounds__(") {
        rest = &rest[at + "__launch_bounds__(".len()..];
        let Some(close) = rest.find(')') else { break };
        let bound = rest[..close]
            .split(',')
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        let after = rest[close + 1..].trim_start();
        let name: String = after
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let is_call = after[name.len()..].trim_start().starts_with('(');
        if !bound.is_empty() && !name.is_empty() && is_call && bound != "..." {
            found.push((bound, name));
        }
    }
    found
}

/// `source` followed by the text of the kernel headers (`#include "x.cuh"` beside it) it
/// includes: where its kernels may be defined (attend_tensor_cores.cuh, instantiated by two files).
fn with_local_headers(kernel: &Path, source: &str) -> String {
    let mut text = source.to_string();
    for line in source.lines() {
        let included = line
            .trim()
            .strip_prefix("#include \"")
            .and_then(|rest| rest.strip_suffix('"'))
            .filter(|name| name.ends_with(".cuh"));
        if let Some(name) = included {
            if let Ok(header) = std::fs::read_to_string(kernel.with_file_name(name)) {
                text.push_str(&header);
            }
        }
    }
    text
}

/// The wrapper translation unit of `kernel`: the file itself, then its bounds' registration.
fn wrapper(out_dir: &Path, kernel: &Path) -> PathBuf {
    let source = std::fs::read_to_string(kernel).expect("kernel source is readable");
    let mut text = format!("#include \"{}\"\n", kernel.display());
    let bounds = launch_bounds(&with_local_headers(kernel, &source));
    if !bounds.is_empty() {
        text.push_str("namespace {\n[[maybe_unused]] const bool pgqa_sim_bounds_registered = (");
        for (bound, name) in &bounds {
            let _ = write!(
                text,
                "::pgqa_sim::register_launch_bounds(\"{name}\", {bound}), "
            );
        }
        text.push_str("true);\n}  // namespace\n");
    }
    let name = kernel.file_name().unwrap().to_string_lossy();
    let path = out_dir.join(format!("sim-{name}.cpp"));
    std::fs::write(&path, text).expect("write the emulator's wrapper");
    path
}
/// Compiles the emulator's two libraries. `paged_gqa_sim`: the runtime (with its tracer and
/// sanitizers) and the kernels, optimised, as the emulated suite runs them. `paged_gqa_sim_traced`:
/// the same kernels again with GCC's thread-sanitizer instrumentation and no sanitizer runtime
/// (every load and store calls a `__tsan_*` hook that kernels/sim/trace.cpp defines) and line
/// tables, for the profiler and the sanitizers. The kernels keep their own file names; the shims
/// rename their C entry points (`pgqa_sim_*`, `pgqa_trace_*`) and namespaces (`pgqa_emulated`,
/// `pgqa_traced`), so both copies and the nvcc-built kernels link into one binary.
pub fn build(manifest_dir: &Path, out_dir: &Path) {
    let kernel_dir = manifest_dir.join("kernels");
    let sim_dir = kernel_dir.join("sim");
    let mut kernels: Vec<_> = std::fs::read_dir(&kernel_dir)
        .expect("kernels/ is readable")
        .map(|entry| entry.expect("kernels/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    kernels.sort();
    kernels.push(sim_dir.join("checks.cu"));
    let wrappers: Vec<_> = kernels.iter().map(|k| wrapper(out_dir, k)).collect();

    let base = |build: &mut cc::Build| {
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
            // The shims come first: they stand in for cuda_runtime.h, cuda_fp16.h, cuda_bf16.h,
            // cuda_fp8.h.
            .include(sim_dir.join("include"))
            .include(kernel_dir.join("include"))
            .include(&kernel_dir)
            .include(&sim_dir);
    };

    let mut traced = cc::Build::new();
    base(&mut traced);
    traced
        .out_dir(out_dir.join("traced"))
        .define("PGQA_SIM_TRACED", "1")
        .flag("-fsanitize=thread")
        .flag("--param=tsan-instrument-func-entry-exit=0")
        // Line tables only: the profile names each site's `file:line` (addr2line).
        .flag("-g1");
    for wrapper in &wrappers {
        traced.file(wrapper);
    }
    traced.compile("paged_gqa_sim_traced");

    let mut build = cc::Build::new();
    base(&mut build);
    build
        .file(sim_dir.join("runtime.cpp"))
        .file(sim_dir.join("trace.cpp"))
        .file(sim_dir.join("sanitize.cpp"));
    for wrapper in &wrappers {
        build.file(wrapper);
    }
    build.compile("paged_gqa_sim");
    println!("cargo::rustc-link-lib=dylib=stdc++");
}
