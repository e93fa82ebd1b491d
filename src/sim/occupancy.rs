//! Theoretical occupancy on sm_90 (H100, H200), as CUDA's occupancy calculator computes it
//! (`cudaOccMaxActiveBlocksPerMultiprocessor` in `cuda_occupancy.h`; the Hopper Tuning Guide's
//! limits): registers from the `ptxas -v` report the build keeps, shared memory from the launch.

use std::sync::OnceLock;

/// sm_90's per-SM limits.
pub mod limits {
    /// 32-bit registers per SM.
    pub const REGISTERS: u32 = 65536;
    /// Registers are allocated per warp in units of 256.
    pub const REGISTER_UNIT: u32 = 256;
    /// Warp schedulers (sub-partitions) per SM: each holds a quarter of the registers.
    pub const SUB_PARTITIONS: u32 = 4;
    pub const MAX_WARPS: u32 = 64;
    pub const MAX_BLOCKS: u32 = 32;
    /// Shared memory per SM: 228 KiB.
    pub const SHARED: u64 = 233_472;
    /// Reserved by CUDA per block.
    pub const SHARED_RESERVED: u64 = 1024;
    /// Shared memory is allocated in units of 128 bytes.
    pub const SHARED_UNIT: u64 = 128;
    /// The most a block can have (opted in): 227 KiB.
    pub const SHARED_PER_BLOCK_OPTIN: u64 = 232_448;
    /// Multiprocessors of an H100 SXM or H200.
    pub const SMS: u32 = 132;
}

/// What limits the blocks per SM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(serde::Serialize))]
pub enum Limiter {
    Warps,
    Registers,
    SharedMemory,
    Blocks,
    /// The register count is unknown (no ptxas report: built without nvcc).
    Unknown,
}

/// A kernel instance's theoretical occupancy.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "cli", derive(serde::Serialize))]
pub struct Occupancy {
    /// Registers per thread (ptxas, sm_90), if known.
    pub registers: Option<u32>,
    /// Shared memory per block: static + dynamic + reserved, rounded to 128 bytes.
    pub shared_per_block: u64,
    pub blocks_per_sm: u32,
    pub warps_per_sm: u32,
    /// Warps per SM / 64.
    pub occupancy: f64,
    pub limiter: Limiter,
}

/// The occupancy of blocks of `threads` threads using `registers` registers per thread (None:
/// unknown, so only warps, shared memory and blocks limit) and `static_smem + dynamic_smem`
/// bytes of shared memory.
pub fn theoretical(
    threads: u32,
    registers: Option<u32>,
    static_smem: u64,
    dynamic_smem: u64,
) -> Occupancy {
    use limits::*;
    let warps = threads.div_ceil(32).max(1);
    let by_warps = MAX_WARPS / warps;
    let by_registers = registers.map(|r| {
        let per_warp = (r * 32).div_ceil(REGISTER_UNIT) * REGISTER_UNIT;
        if r > 255 || per_warp * warps > REGISTERS {
            0
        } else {
            // No registers: no register limit.
            (REGISTERS / SUB_PARTITIONS)
                .checked_div(per_warp)
                .map_or(u32::MAX, |per_sub_partition| {
                    per_sub_partition * SUB_PARTITIONS / warps
                })
        }
    });
    let shared_per_block =
        (static_smem + dynamic_smem + SHARED_RESERVED).div_ceil(SHARED_UNIT) * SHARED_UNIT;
    let by_shared = if shared_per_block > SHARED_PER_BLOCK_OPTIN + SHARED_RESERVED {
        0
    } else {
        (SHARED / shared_per_block) as u32
    };
    let mut candidates = vec![
        (by_warps, Limiter::Warps),
        (by_shared, Limiter::SharedMemory),
        (MAX_BLOCKS, Limiter::Blocks),
    ];
    if let Some(b) = by_registers {
        candidates.insert(1, (b, Limiter::Registers));
    }
    let (blocks, mut limiter) = candidates
        .iter()
        .copied()
        .min_by_key(|&(b, _)| b)
        .expect("candidates");
    if registers.is_none() && limiter != Limiter::SharedMemory {
        limiter = Limiter::Unknown;
    }
    Occupancy {
        registers,
        shared_per_block,
        blocks_per_sm: blocks,
        warps_per_sm: blocks * warps,
        occupancy: (blocks * warps) as f64 / MAX_WARPS as f64,
        limiter,
    }
}

/// A kernel's sm_90 resources from the build's `ptxas -v` report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelResources {
    pub registers: u32,
    pub static_smem: u64,
}

#[cfg(paged_gqa_kernels)]
const PTXAS_REPORT: &str = include_str!(concat!(env!("OUT_DIR"), "/kernel-report.tsv"));
#[cfg(not(paged_gqa_kernels))]
const PTXAS_REPORT: &str = "";

/// `void (anonymous namespace)::cuda_core_attend_kernel<__half, pgqa::fp8_e5m2, 256>(pgqa_attend_params,
/// int)` and the emulator's `cuda_core_attend_kernel<__half, fp8_e5m2, 256>` both to
/// `cuda_core_attend_kernel<__half,fp8_e5m2,256>`: no return type, parameters, namespaces or spaces.
pub fn normalize_kernel_name(name: &str) -> String {
    let name = name.trim();
    let name = name.strip_prefix("void ").unwrap_or(name);
    let mut out = String::new();
    let mut depth = 0;
    for c in name.chars() {
        match c {
            '<' => depth += 1,
            '>' => depth -= 1,
            '(' if depth == 0 && !out.is_empty() && !out.ends_with(':') => break,
            _ => {}
        }
        out.push(c);
    }
    let out = out.replace("(anonymous namespace)::", "");
    // Drop every `identifier::` qualifier.
    let mut cleaned = String::new();
    let mut word = String::new();
    let mut chars = out.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_alphanumeric() || c == '_' {
            word.push(c);
            continue;
        }
        if c == ':' && chars.peek() == Some(&':') {
            chars.next();
            word.clear();
            continue;
        }
        cleaned.push_str(&word);
        word.clear();
        if !c.is_whitespace() {
            cleaned.push(c);
        }
    }
    cleaned.push_str(&word);
    cleaned
}

/// Every sm_90 kernel of the ptxas report by normalised name (demangled with `c++filt` once;
/// empty without the report or without `c++filt`).
fn sm90_resources() -> &'static Vec<(String, KernelResources)> {
    static TABLE: OnceLock<Vec<(String, KernelResources)>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let rows: Vec<(&str, KernelResources)> = PTXAS_REPORT
            .lines()
            .skip(1)
            .filter_map(|line| {
                let f: Vec<&str> = line.split('\t').collect();
                (f.len() >= 5 && f[1] == "sm_90").then(|| {
                    Some((
                        f[2],
                        KernelResources {
                            registers: f[3].parse().ok()?,
                            static_smem: f[4].parse().ok()?,
                        },
                    ))
                })?
            })
            .collect();
        if rows.is_empty() {
            return Vec::new();
        }
        let input: String = rows.iter().map(|(m, _)| format!("{m}\n")).collect();
        let Some(demangled) = demangle(&input) else {
            return Vec::new();
        };
        demangled
            .lines()
            .zip(rows.iter())
            .map(|(name, (_, r))| (normalize_kernel_name(name), *r))
            .collect()
    })
}

fn demangle(input: &str) -> Option<String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("c++filt")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(input.as_bytes()).ok()?;
    let output = child.wait_with_output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The sm_90 resources of the kernel the emulator calls `kernel`, if the build has them.
pub fn kernel_resources(kernel: &str) -> Option<KernelResources> {
    let key = normalize_kernel_name(kernel);
    sm90_resources()
        .iter()
        .find(|(name, _)| *name == key)
        .map(|(_, r)| *r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_occupancy_calculators_worked_example() {
        // 128 threads, 96 registers, 24 KiB: 3072 registers per warp -> 5 warps per
        // sub-partition -> 5 blocks; shared (24 KiB + 1 KiB) allows 9; warps allow 16.
        let o = theoretical(128, Some(96), 0, 24 * 1024);
        assert_eq!((o.blocks_per_sm, o.warps_per_sm), (5, 20));
        assert_eq!(o.limiter, Limiter::Registers);
        assert_eq!(o.shared_per_block, 25 * 1024);
        assert!((o.occupancy - 20.0 / 64.0).abs() < 1e-12);
    }

    #[test]
    fn shared_memory_warps_and_blocks_limit() {
        // 100 KiB + 1 KiB per block: two fit in 228 KiB.
        let o = theoretical(128, Some(32), 0, 100 * 1024);
        assert_eq!((o.blocks_per_sm, o.limiter), (2, Limiter::SharedMemory));
        // 1024 threads: 32 warps, two blocks by warps.
        let o = theoretical(1024, Some(32), 0, 0);
        assert_eq!((o.blocks_per_sm, o.limiter), (2, Limiter::Warps));
        // 32 threads, few registers: the 32-block limit.
        let o = theoretical(32, Some(16), 0, 0);
        assert_eq!((o.blocks_per_sm, o.limiter), (32, Limiter::Blocks));
        // Over 255 registers, or over 227 KiB: nothing fits.
        assert_eq!(theoretical(128, Some(256), 0, 0).blocks_per_sm, 0);
        assert_eq!(theoretical(128, Some(32), 0, 228 * 1024).blocks_per_sm, 0);
        // Unknown registers: the limit shown is not a register one.
        assert_eq!(theoretical(128, None, 0, 0).limiter, Limiter::Unknown);
    }

    #[test]
    fn ptxas_and_emulator_names_agree() {
        let ptxas = "void (anonymous namespace)::cuda_core_attend_kernel<__half, pgqa::fp8_e5m2, 256>(pgqa_attend_params, int, int, int)";
        let emulated = "cuda_core_attend_kernel<__half, fp8_e5m2, 256>";
        assert_eq!(
            normalize_kernel_name(ptxas),
            normalize_kernel_name(emulated)
        );
        assert_eq!(
            normalize_kernel_name(emulated),
            "cuda_core_attend_kernel<__half,fp8_e5m2,256>"
        );
        assert_eq!(
            normalize_kernel_name("copy_blocks_kernel(uint4*, int const*, int, long)"),
            "copy_blocks_kernel"
        );
    }
}
