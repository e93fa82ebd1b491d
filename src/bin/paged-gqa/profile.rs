//! `paged-gqa profile`: one attention call (a replay case, or a bench shape) on the kernel
//! emulator's traced kernels, and per launch the profiler's headline figures (emulator counts,
//! and a speed-of-light model's predictions, never measurements) and its source table.

use std::path::{Path, PathBuf};

use clap::Args;
use paged_gqa::sim::occupancy::{self, Occupancy};
use paged_gqa::sim::profile::{LaunchProfile, Profile, SiteCounters, Space, Totals};
use paged_gqa::sim::speed_of_light::{self, Bound, Prediction, DRAM_LATENCY_S, H100, H200};
use serde::Serialize;

use crate::bench::{self, BenchDType, BenchKernels, BenchKvDType, BenchMode};
use crate::Failure;

/// Options of `paged-gqa profile`.
#[derive(Args, Debug)]
pub struct ProfileArgs {
    /// A replay case (as `paged-gqa attend` takes); without it, a bench shape (the options
    /// below; default Llama-3-8B decode, batch 4, context 4096).
    pub case: Option<PathBuf>,
    /// Model name, e.g. Llama-3-8B (see `paged-gqa bench`).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub batch: Option<usize>,
    /// Keys per sequence (decode) or prompt length (prefill).
    #[arg(long)]
    pub context: Option<usize>,
    #[arg(long, value_enum, default_value = "decode")]
    pub mode: BenchMode,
    #[arg(long, default_value_t = 16)]
    pub page_size: usize,
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: BenchDType,
    #[arg(long, value_enum, default_value = "auto")]
    pub kv_dtype: BenchKvDType,
    #[arg(long, value_enum, default_value = "auto")]
    pub kernels: BenchKernels,
    /// Source lines shown per launch (hottest first).
    #[arg(long, default_value_t = 12)]
    pub lines: usize,
    /// Writes everything (headlines, every site, every phase) as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// A launch's headline figures.
#[derive(Clone, Debug, Serialize)]
pub struct Headline {
    pub kernel: String,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dynamic_smem: u64,
    pub blocks: u64,
    /// Theoretical occupancy (ptxas registers for sm_90; model of the occupancy calculator).
    pub occupancy: Occupancy,
    pub shared: Totals,
    pub bank_conflicts: u64,
    pub kv: Totals,
    pub other_global: Totals,
    /// K/V sectors x 32: must equal `kv_bytes_fetched`.
    pub kv_sector_bytes: u64,
    pub kv_bytes_fetched: u64,
    /// Active lanes / 32 over every memory request.
    pub lane_utilisation: f64,
    /// Busy warps / live warps over every phase.
    pub warp_utilisation: f64,
    /// The phase with the fewest busy warps (of those with any): (from, to, utilisation).
    pub worst_phase: Option<(String, String, f64)>,
    pub max_block_inflight: u64,
    pub mean_block_inflight: f64,
    /// Model predictions on an H100 SXM and an H200 (not measurements).
    pub predictions: Vec<Prediction>,
}

/// The headline figures of `launch`.
pub fn headline(launch: &LaunchProfile) -> Headline {
    let resources = occupancy::kernel_resources(&launch.kernel);
    let occupancy = occupancy::theoretical(
        launch.threads(),
        resources.map(|r| r.registers),
        resources.map_or(0, |r| r.static_smem),
        launch.dynamic_smem,
    );
    let shared = launch.totals(Space::Shared);
    let kv = launch.totals(Space::Kv);
    let worst_phase = launch
        .phases
        .iter()
        .filter(|p| p.busy_warps > 0)
        .min_by(|a, b| a.warp_utilisation().total_cmp(&b.warp_utilisation()))
        .map(|p| (p.from.clone(), p.to.clone(), p.warp_utilisation()));
    Headline {
        kernel: launch.kernel.clone(),
        grid: launch.grid,
        block: launch.block,
        dynamic_smem: launch.dynamic_smem,
        blocks: launch.blocks,
        occupancy,
        bank_conflicts: shared.bank_conflicts(),
        shared,
        kv,
        other_global: launch.totals(Space::Global),
        kv_sector_bytes: 32 * kv.sectors,
        kv_bytes_fetched: launch.kv_bytes_fetched,
        lane_utilisation: launch.lane_utilisation(),
        warp_utilisation: launch.warp_utilisation(),
        worst_phase,
        max_block_inflight: launch.max_block_inflight,
        mean_block_inflight: launch.mean_block_inflight(),
        predictions: [H100, H200]
            .into_iter()
            .map(|gpu| speed_of_light::predict(launch, &occupancy, gpu))
            .collect(),
    }
}

#[derive(Serialize)]
struct LaunchJson<'a> {
    headline: Headline,
    source_lines: Vec<SiteCounters>,
    profile: &'a LaunchProfile,
}

#[derive(Serialize)]
struct ProfileJson<'a> {
    what: String,
    /// A bench shape's K and V bytes in the page dtype, each visible byte once.
    kv_bytes_needed: Option<u64>,
    note: &'static str,
    launches: Vec<LaunchJson<'a>>,
}

const NOTE: &str = "EMULATOR COUNTS (the kernel emulator running the traced kernels on the CPU, sm_90 \
rules; see docs/emulator.md) and MODEL PREDICTIONS (speed of light from datasheet bandwidth and a cited DRAM \
latency); no figure here is a GPU measurement";

pub fn run(args: ProfileArgs) -> Result<(), Failure> {
    let start = std::time::Instant::now();
    let (what, needed, profile) = match &args.case {
        Some(path) => (
            format!("replay case {}", path.display()),
            None,
            crate::attend::profile_case(path)?,
        ),
        None => {
            let case = bench_case(&args)?;
            (
                format!("{case}, {:?}", case.mode).to_lowercase(),
                Some(case.kv_bytes()),
                bench::profile_case(&case)?,
            )
        }
    };
    println!("profile of {what}: {NOTE}");
    println!(
        "emulated in {:.1} s; {} launch(es)",
        start.elapsed().as_secs_f64(),
        profile.launches.len()
    );
    for launch in &profile.launches {
        print_launch(launch, args.lines);
    }
    if let Some(path) = &args.json {
        write_json(path, &what, needed, &profile)?;
        println!("profile: {}", path.display());
    }
    Ok(())
}

fn bench_case(args: &ProfileArgs) -> Result<bench::Case, Failure> {
    let bench_args = bench::BenchArgs {
        backend: bench::BenchBackend::Sim,
        mode: args.mode,
        quick: false,
        full: false,
        models: vec![args.model.clone().unwrap_or_else(|| "Llama-3-8B".into())],
        batch: vec![args.batch.unwrap_or(4)],
        context: vec![args.context.unwrap_or(match args.mode {
            BenchMode::Decode => 4096,
            BenchMode::Prefill => 512,
        })],
        page_size: args.page_size,
        dtype: args.dtype,
        kv_dtype: args.kv_dtype,
        kernels: vec![args.kernels],
        iters: None,
        json: None,
        svg: None,
        profile: false,
    };
    let mut cases = bench::sim_cases(&bench_args)?;
    cases
        .pop()
        .ok_or_else(|| Failure::input("no case to profile"))
}

fn write_json(
    path: &Path,
    what: &str,
    kv_bytes_needed: Option<u64>,
    profile: &Profile,
) -> Result<(), Failure> {
    let json = ProfileJson {
        what: what.to_string(),
        kv_bytes_needed,
        note: NOTE,
        launches: profile
            .launches
            .iter()
            .map(|l| LaunchJson {
                headline: headline(l),
                source_lines: l.source_lines(),
                profile: l,
            })
            .collect(),
    };
    let text = serde_json::to_string_pretty(&json).map_err(Failure::runtime)?;
    std::fs::write(path, text).map_err(|e| Failure::runtime(format!("{}: {e}", path.display())))
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn kib(x: f64) -> String {
    format!("{:.1} KiB", x / 1024.0)
}

/// `a / b` with the ratio, or "-" when there is nothing.
fn of(a: u64, b: u64) -> String {
    if a == 0 && b == 0 {
        "-".into()
    } else {
        format!("{a} / {b}")
    }
}

fn print_launch(launch: &LaunchProfile, lines: usize) {
    let h = headline(launch);
    let o = &h.occupancy;
    println!();
    println!(
        "== {}  grid ({},{},{})  block ({},{},{})  dynamic smem {} B  launched from {}",
        h.kernel,
        h.grid[0],
        h.grid[1],
        h.grid[2],
        h.block[0],
        h.block[1],
        h.block[2],
        h.dynamic_smem,
        launch.launcher.split(" [with").next().unwrap_or("")
    );
    println!(
        "  occupancy (theoretical, sm_90)  {} registers/thread, {} B shared/block -> {} blocks = {} warps/SM ({}), limited by {:?}",
        o.registers.map_or("unknown".into(), |r| r.to_string()),
        o.shared_per_block,
        o.blocks_per_sm,
        o.warps_per_sm,
        pct(o.occupancy),
        o.limiter
    );
    println!(
        "  shared memory                   {} requests, wavefronts / ideal {} ({} bank conflicts)",
        h.shared.requests,
        of(h.shared.wavefronts, h.shared.ideal_wavefronts),
        h.bank_conflicts
    );
    println!(
        "  K/V pages                       {} requests, sectors / ideal {} ({} efficiency); sectors x 32 = {} B, fetched counter {} B",
        h.kv.requests,
        of(h.kv.sectors, h.kv.ideal_sectors),
        pct(h.kv.sector_efficiency()),
        h.kv_sector_bytes,
        h.kv_bytes_fetched
    );
    println!(
        "  other global memory             {} requests, sectors / ideal {}",
        h.other_global.requests,
        of(h.other_global.sectors, h.other_global.ideal_sectors)
    );
    println!(
        "  lanes active per request        {}",
        pct(h.lane_utilisation)
    );
    let worst = h
        .worst_phase
        .as_ref()
        .map_or(String::new(), |(from, to, u)| {
            format!("; least busy phase {from} -> {to}: {}", pct(*u))
        });
    println!(
        "  warps busy per phase            {} (phases with any work){worst}",
        pct(h.warp_utilisation)
    );
    println!(
        "  cp.async bytes in flight        {} per block at most (mean {})",
        kib(h.max_block_inflight as f64),
        kib(h.mean_block_inflight)
    );
    for p in &h.predictions {
        println!(
            "  MODEL {:<9} {:>9.3} us at {:.2} TB/s for {:.2} MB; in flight {}/SM ({:.1} blocks) vs {} needed (latency {:.0} ns) -> {:.3} us, {}",
            p.gpu.name,
            p.bandwidth_time_s * 1e6,
            p.gpu.bandwidth / 1e12,
            p.dram_bytes as f64 / 1e6,
            kib(p.inflight_per_sm),
            p.resident_blocks_per_sm,
            kib(p.required_inflight_per_sm),
            DRAM_LATENCY_S * 1e9,
            p.predicted_time_s * 1e6,
            match p.bound {
                Bound::Bandwidth => "bandwidth-bound",
                Bound::Latency => "latency-bound (too few bytes in flight)",
                Bound::NotModelled => "no cp.async: bytes in flight not modelled, bandwidth bound shown",
            }
        );
    }
    println!("  phases (warps busy / live):");
    for p in &launch.phases {
        let busy = match p.busy_warps {
            0 => "no access or collective (empty)".to_string(),
            _ => pct(p.warp_utilisation()),
        };
        println!("    {:>7} x {} -> {}: {busy}", p.occurrences, p.from, p.to);
    }
    println!(
        "  {:<44} {:<9} {:<6} {:>3} {:>10} {:>6} {:>21} {:>21}",
        "source line (hottest first)",
        "op",
        "space",
        "B",
        "requests",
        "lanes",
        "wavefronts / ideal",
        "sectors / ideal"
    );
    for s in launch.source_lines().iter().take(lines) {
        println!(
            "  {:<44} {:<9} {:<6} {:>3} {:>10} {:>6} {:>21} {:>21}",
            s.location,
            s.op,
            format!("{:?}", s.space).to_lowercase(),
            s.bytes,
            s.requests,
            pct(s.lanes as f64 / (32 * s.requests.max(1)) as f64),
            of(s.wavefronts, s.ideal_wavefronts),
            of(s.sectors, s.ideal_sectors)
        );
    }
}
