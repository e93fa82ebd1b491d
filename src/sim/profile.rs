//! The emulator's profile of traced launches: every load and store of the traced copy of the
//! kernels grouped into warp-level requests and counted with the sm_90 rules, per launch and per
//! source line (see docs/emulator.md, "Profiling the kernels").
//!
//! Counters are exact for the emulator's execution of the kernel source; how they map to the
//! hardware follows these rules (from NVIDIA's Nsight Compute documentation; those marked
//! *model* are inferred, not documented):
//!
//! - **Request**: one warp instruction. Its lanes are the lanes that reached the same site the
//!   same number of times since the warp last stopped at a barrier or collective (*model* of
//!   SIMT reconvergence).
//! - **Shared memory**: 32 banks of 4 bytes. Lanes are served in phases of 32 lanes (accesses of
//!   up to 4 bytes), 16 (8 bytes) or 8 (16 bytes) (*model*: the half- and quarter-warp split).
//!   A phase costs as many **wavefronts** as the most distinct 4-byte words in one bank (the
//!   same word is a broadcast); ideal: `ceil(active lanes x bytes / 128)`, at least 1
//!   (*model* for partial warps). Bank conflicts = wavefronts - ideal. `ldmatrix.x4`: one phase
//!   per 8x8 matrix, ideal 1 (*model*). cp.async's shared side counts as a store (*model*).
//! - **Global memory**: sectors are the distinct aligned 32-byte blocks the active lanes touch;
//!   ideal `ceil(distinct bytes requested / 32)`, so lanes reading one address cost nothing extra
//!   (*model*: NVIDIA does not publish the formula).
//!   K/V pages (the ranges the traffic counter watches) are counted apart.
//! - **Lane utilisation**: active lanes / 32 per request. **Warp utilisation**: per phase
//!   between two `__syncthreads` (or the entry and exit), the share of the block's live warps
//!   that made any access or collective in it.
//! - **Bytes in flight**: the cp.async bytes a block has issued and not yet waited for, at most:
//!   the sum over its threads of each thread's most (*model*: the emulator runs a block's threads
//!   one after another, where the GPU runs them together through one pipeline).
//!
//! What it cannot see: instruction latency and issue slots, arithmetic, caches (every sector
//! request is counted, whether L1 or L2 would serve it), clocks and DRAM behaviour.

use crate::error::{Error, Result};

/// Where a site's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "cli", derive(serde::Serialize))]
pub enum Space {
    /// Shared memory (dynamic, or a static `__shared__` array).
    Shared,
    /// A K/V page: device memory the traffic counter watches.
    Kv,
    /// Other device memory.
    Global,
    /// No memory: a warp collective (shuffle, ballot, `__syncwarp`, mma).
    None,
}

impl Space {
    fn parse(text: &str) -> Result<Self> {
        Ok(match text {
            "shared" => Space::Shared,
            "kv" => Space::Kv,
            "global" => Space::Global,
            "none" => Space::None,
            other => return Err(bad(&format!("space `{other}`"))),
        })
    }
}

/// The counters of one site (instruction address) in one space, summed over the launch.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(serde::Serialize))]
pub struct SiteCounters {
    /// `file:line` of the site, innermost inlined frame first, joined by ` < `.
    pub location: String,
    /// `load`, `store`, `cp.async`, `ldmatrix`, `shuffle`, `mma`, `ballot`, `syncwarp`.
    pub op: String,
    pub space: Space,
    /// Bytes per lane.
    pub bytes: u32,
    /// Warp-level requests.
    pub requests: u64,
    /// Active lanes, summed over the requests.
    pub lanes: u64,
    /// Shared memory: wavefronts, and the ideal for the same lanes and widths.
    pub wavefronts: u64,
    pub ideal_wavefronts: u64,
    /// Global memory: 32-byte sectors, and the ideal.
    pub sectors: u64,
    pub ideal_sectors: u64,
}

/// Kernel headers whose helpers (vector loads, cp.async, ldmatrix wrappers) are not where a
/// site's cost is decided: a site is shown at the first frame outside them.
const HELPER_HEADERS: [&str; 3] = ["common.cuh:", "mma.cuh:", "fp8.cuh:"];

impl SiteCounters {
    /// The source line the site is shown at: its innermost frame outside the helper headers
    /// (`common.cuh`, `mma.cuh`, `fp8.cuh`), else its innermost frame.
    pub fn line(&self) -> &str {
        let frames: Vec<&str> = self.location.split(" < ").collect();
        frames
            .iter()
            .find(|f| !HELPER_HEADERS.iter().any(|h| f.starts_with(h)))
            .or(frames.first())
            .copied()
            .unwrap_or("?")
    }
}

/// One phase of the blocks: from one barrier (or the entry) to the next (or the exit).
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(serde::Serialize))]
pub struct PhaseCounters {
    /// `file:line` of the barrier that opens it, or `entry`.
    pub from: String,
    /// `file:line` of the barrier that closes it, or `exit`.
    pub to: String,
    /// Times a block went through it.
    pub occurrences: u64,
    /// Live warps at its barriers, summed over occurrences.
    pub warps: u64,
    /// Warps that made any access or collective in it, summed over occurrences.
    pub busy_warps: u64,
}

impl PhaseCounters {
    /// Busy warps / live warps.
    pub fn warp_utilisation(&self) -> f64 {
        ratio(self.busy_warps, self.warps)
    }
}

/// Totals of one kind of traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(serde::Serialize))]
pub struct Totals {
    pub requests: u64,
    pub lanes: u64,
    pub wavefronts: u64,
    pub ideal_wavefronts: u64,
    pub sectors: u64,
    pub ideal_sectors: u64,
}

impl Totals {
    fn add(&mut self, s: &SiteCounters) {
        self.requests += s.requests;
        self.lanes += s.lanes;
        self.wavefronts += s.wavefronts;
        self.ideal_wavefronts += s.ideal_wavefronts;
        self.sectors += s.sectors;
        self.ideal_sectors += s.ideal_sectors;
    }
    /// Shared-memory bank conflicts: wavefronts beyond the ideal.
    pub fn bank_conflicts(&self) -> u64 {
        self.wavefronts.saturating_sub(self.ideal_wavefronts)
    }
    /// Active lanes / (32 x requests).
    pub fn lane_utilisation(&self) -> f64 {
        ratio(self.lanes, 32 * self.requests)
    }
    /// Ideal sectors / sectors (1.0: every byte of every sector touched is used).
    pub fn sector_efficiency(&self) -> f64 {
        ratio(self.ideal_sectors, self.sectors)
    }
}

/// One traced launch.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(serde::Serialize))]
pub struct LaunchProfile {
    /// The kernel instance, as `cuda_core_attend_kernel<__half, __half, 128>`.
    pub kernel: String,
    /// The host function that launched it.
    pub launcher: String,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dynamic_smem: u64,
    /// Blocks run.
    pub blocks: u64,
    /// Bytes cp.async brought from the K/V pages (the device's traffic counter).
    pub kv_bytes_fetched: u64,
    /// The most cp.async bytes one block had issued and not waited for (its threads' peaks
    /// summed).
    pub max_block_inflight: u64,
    /// The per-block maxima, summed (their mean is this over `blocks`).
    pub sum_block_inflight: u64,
    pub sites: Vec<SiteCounters>,
    pub phases: Vec<PhaseCounters>,
}

impl LaunchProfile {
    /// Threads per block.
    pub fn threads(&self) -> u32 {
        self.block.iter().product()
    }

    /// Totals of the sites in `space` (load, store and cp.async; shared also ldmatrix).
    pub fn totals(&self, space: Space) -> Totals {
        let mut t = Totals::default();
        for s in self.sites.iter().filter(|s| s.space == space) {
            t.add(s);
        }
        t
    }

    /// Active lanes per memory request (every space), as a share of 32.
    pub fn lane_utilisation(&self) -> f64 {
        let mut t = Totals::default();
        for s in self.sites.iter().filter(|s| s.space != Space::None) {
            t.add(s);
        }
        t.lane_utilisation()
    }

    /// Busy warps / live warps over every phase of every block in which any warp did anything
    /// (a phase between two barriers with no access or collective at all is left out).
    pub fn warp_utilisation(&self) -> f64 {
        let working = || self.phases.iter().filter(|p| p.busy_warps > 0);
        let busy: u64 = working().map(|p| p.busy_warps).sum();
        let warps: u64 = working().map(|p| p.warps).sum();
        ratio(busy, warps)
    }

    /// The mean over blocks of each block's most cp.async bytes in flight.
    pub fn mean_block_inflight(&self) -> f64 {
        ratio(self.sum_block_inflight, self.blocks)
    }

    /// Bytes the launch moves to or from device memory, by the sector counts: every sector
    /// requested counts (no cache), so this is an upper bound of DRAM traffic except where a
    /// sector is requested twice.
    pub fn global_bytes(&self) -> u64 {
        32 * (self.totals(Space::Kv).sectors + self.totals(Space::Global).sectors)
    }

    /// The sites as source lines: sites with the same [`SiteCounters::line`], op and space
    /// summed, hottest first (shared wavefronts plus global sectors).
    pub fn source_lines(&self) -> Vec<SiteCounters> {
        let mut lines: Vec<SiteCounters> = Vec::new();
        for s in &self.sites {
            let line = s.line().to_string();
            match lines
                .iter_mut()
                .find(|l| l.location == line && l.op == s.op && l.space == s.space)
            {
                Some(l) => {
                    l.bytes = l.bytes.max(s.bytes);
                    l.requests += s.requests;
                    l.lanes += s.lanes;
                    l.wavefronts += s.wavefronts;
                    l.ideal_wavefronts += s.ideal_wavefronts;
                    l.sectors += s.sectors;
                    l.ideal_sectors += s.ideal_sectors;
                }
                None => lines.push(SiteCounters {
                    location: line,
                    ..s.clone()
                }),
            }
        }
        lines.sort_by(|a, b| {
            (b.wavefronts + b.sectors, b.requests)
                .cmp(&(a.wavefronts + a.sectors, a.requests))
                .then_with(|| a.location.cmp(&b.location))
        });
        lines
    }
}

/// The profiles of a device's traced launches, in launch order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(serde::Serialize))]
pub struct Profile {
    pub launches: Vec<LaunchProfile>,
}

fn bad(what: &str) -> Error {
    Error::Driver(format!("the emulator's profile text is malformed: {what}"))
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn num<T: std::str::FromStr>(field: Option<&str>, what: &str) -> Result<T> {
    field
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| bad(&format!("{what} `{}`", field.unwrap_or(""))))
}

impl Profile {
    /// Parses the emulator's profile text (`pgqa_sim_take_profile`: tab-separated `launch`,
    /// `site` and `phase` records, each site and phase belonging to the launch before it).
    pub fn parse(text: &str) -> Result<Self> {
        let mut launches: Vec<LaunchProfile> = Vec::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let mut f = line.split('\t');
            let kind = f.next().unwrap_or("");
            match kind {
                "launch" => {
                    let kernel = f.next().ok_or_else(|| bad("launch without kernel"))?;
                    let launcher = f.next().ok_or_else(|| bad("launch without launcher"))?;
                    let mut v = [0u64; 11];
                    for (k, x) in v.iter_mut().enumerate() {
                        *x = num(f.next(), &format!("launch field {k}"))?;
                    }
                    launches.push(LaunchProfile {
                        kernel: kernel.strip_prefix("void ").unwrap_or(kernel).to_string(),
                        launcher: launcher.to_string(),
                        grid: [v[0] as u32, v[1] as u32, v[2] as u32],
                        block: [v[3] as u32, v[4] as u32, v[5] as u32],
                        dynamic_smem: v[6],
                        blocks: v[7],
                        kv_bytes_fetched: v[8],
                        max_block_inflight: v[9],
                        sum_block_inflight: v[10],
                        sites: Vec::new(),
                        phases: Vec::new(),
                    });
                }
                "site" => {
                    let launch = launches
                        .last_mut()
                        .ok_or_else(|| bad("site before launch"))?;
                    let location = f.next().ok_or_else(|| bad("site"))?.to_string();
                    let op = f.next().ok_or_else(|| bad("site op"))?.to_string();
                    let space = Space::parse(f.next().unwrap_or(""))?;
                    let bytes = num(f.next(), "site bytes")?;
                    let mut v = [0u64; 6];
                    for (k, x) in v.iter_mut().enumerate() {
                        *x = num(f.next(), &format!("site field {k}"))?;
                    }
                    launch.sites.push(SiteCounters {
                        location,
                        op,
                        space,
                        bytes,
                        requests: v[0],
                        lanes: v[1],
                        wavefronts: v[2],
                        ideal_wavefronts: v[3],
                        sectors: v[4],
                        ideal_sectors: v[5],
                    });
                }
                "phase" => {
                    let launch = launches
                        .last_mut()
                        .ok_or_else(|| bad("phase before launch"))?;
                    let from = f.next().ok_or_else(|| bad("phase"))?.to_string();
                    let to = f.next().ok_or_else(|| bad("phase"))?.to_string();
                    launch.phases.push(PhaseCounters {
                        from,
                        to,
                        occurrences: num(f.next(), "phase occurrences")?,
                        warps: num(f.next(), "phase warps")?,
                        busy_warps: num(f.next(), "phase busy warps")?,
                    });
                }
                other => return Err(bad(&format!("record `{other}`"))),
            }
        }
        Ok(Profile { launches })
    }
}
