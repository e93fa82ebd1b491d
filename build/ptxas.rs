//! Reads the resource report `ptxas -v` prints for every kernel (registers, shared memory,
//! stack frame, spills) and decides which kernels break the no-spill, no-stack rule.
//!
//! Shared by build.rs (which fails the build on a violation) and by tests/ptxas_report.rs.

use std::fmt::Write as _;

/// The resources of one kernel (an entry function) compiled for one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelResources {
    /// The .cu file it came from.
    pub source: String,
    /// Mangled name, as ptxas prints it.
    pub kernel: String,
    /// `sm_80`, `sm_90`, ...
    pub arch: String,
    pub registers: u32,
    pub shared_bytes: u64,
    pub stack_bytes: u64,
    pub spill_store_bytes: u64,
    pub spill_load_bytes: u64,
}

impl KernelResources {
    pub fn spills(&self) -> bool {
        self.spill_store_bytes > 0 || self.spill_load_bytes > 0
    }
}

/// One line of kernels/resource-allowlist.txt: kernels whose name contains `pattern` may have
/// `kind` ("spill" or "stack").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowance {
    pub pattern: String,
    pub kind: String,
}

/// Parses the allowlist: `<pattern> <spill|stack> <reason...>` per line, `#` comments.
pub fn parse_allowlist(text: &str) -> Result<Vec<Allowance>, String> {
    let mut out = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(pattern), Some(kind)) = (words.next(), words.next()) else {
            return Err(format!(
                "allowlist line {}: expected `<kernel> <spill|stack> <why>`",
                number + 1
            ));
        };
        if kind != "spill" && kind != "stack" {
            return Err(format!(
                "allowlist line {}: kind `{kind}` is neither spill nor stack",
                number + 1
            ));
        }
        if words.next().is_none() {
            return Err(format!(
                "allowlist line {}: say why `{pattern}` may {kind}",
                number + 1
            ));
        }
        out.push(Allowance {
            pattern: pattern.to_string(),
            kind: kind.to_string(),
        });
    }
    Ok(out)
}

fn number_before(text: &str, unit: &str) -> Option<u64> {
    let end = text.find(unit)?;
    text[..end].split_whitespace().last()?.parse().ok()
}

/// Parses what `ptxas -v` printed (through nvcc's stderr) while compiling `source`.
pub fn parse(source: &str, text: &str) -> Vec<KernelResources> {
    let mut kernels: Vec<KernelResources> = Vec::new();
    // Index into `kernels` of the entry whose report lines are being read.
    let mut current: Option<usize> = None;
    // Set after "Function properties for X": the next line holds X's stack and spills.
    let mut properties_of: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = properties_of.take() {
            if let Some(k) = current.filter(|&i| kernels[i].kernel == name) {
                let k = &mut kernels[k];
                k.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
            }
            continue;
        }
        let Some(info) = line.strip_prefix("ptxas info") else {
            continue;
        };
        let info = info.trim_start().trim_start_matches(':').trim();
        if let Some(rest) = info.strip_prefix("Compiling entry function '") {
            let mut parts = rest.split('\'');
            let kernel = parts.next().unwrap_or("").to_string();
            let arch = parts.nth(1).unwrap_or("").to_string();
            kernels.push(KernelResources {
                source: source.to_string(),
                kernel,
                arch,
                registers: 0,
                shared_bytes: 0,
                stack_bytes: 0,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
            });
            current = Some(kernels.len() - 1);
        } else if let Some(name) = info.strip_prefix("Function properties for ") {
            properties_of = Some(name.trim().to_string());
        } else if info.starts_with("Used ") {
            if let Some(i) = current {
                kernels[i].registers = number_before(info, "registers").unwrap_or(0) as u32;
                kernels[i].shared_bytes = number_before(info, "bytes smem").unwrap_or(0);
            }
        } else if info.starts_with("Compiling ") {
            current = None; // a non-entry function: its numbers are not a kernel's
        }
    }
    kernels
}

/// Kernels that spill or keep a stack frame without an allowance, one message each.
pub fn violations(kernels: &[KernelResources], allowed: &[Allowance]) -> Vec<String> {
    let is_allowed = |k: &KernelResources, kind: &str| {
        allowed
            .iter()
            .any(|a| a.kind == kind && k.kernel.contains(&a.pattern))
    };
    let mut out = Vec::new();
    for k in kernels {
        if k.spills() && !is_allowed(k, "spill") {
            out.push(format!(
                "{} ({}, {}): spills registers ({} bytes stored, {} bytes loaded)",
                k.kernel, k.arch, k.source, k.spill_store_bytes, k.spill_load_bytes
            ));
        }
        if k.stack_bytes > 0 && !is_allowed(k, "stack") {
            out.push(format!(
                "{} ({}, {}): has a {} byte stack frame",
                k.kernel, k.arch, k.source, k.stack_bytes
            ));
        }
    }
    out
}

/// The report as tab-separated values with a header line (scripts/kernel-report reads it).
pub fn to_tsv(kernels: &[KernelResources]) -> String {
    let mut out = String::from(
        "source\tarch\tkernel\tregisters\tshared_bytes\tstack_bytes\tspill_store_bytes\tspill_load_bytes\n",
    );
    for k in kernels {
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            k.source,
            k.arch,
            k.kernel,
            k.registers,
            k.shared_bytes,
            k.stack_bytes,
            k.spill_store_bytes,
            k.spill_load_bytes
        );
    }
    out
}
