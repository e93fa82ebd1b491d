//! A speed-of-light **model** of a traced launch on an H100 SXM or an H200: a prediction from
//! the profile's byte counts and the datasheets, never a measurement.
//!
//! - **Bandwidth bound**: the launch's device-memory bytes (every sector requested, K/V and the
//!   rest) at the datasheet's HBM bandwidth.
//! - **Latency bound** (Little's law): to sustain bandwidth `B` with DRAM latency `L`, the GPU
//!   must keep `B x L` bytes in flight, `B x L / 132` per SM. The launch keeps, per SM, its
//!   blocks' cp.async bytes in flight (the mean over blocks of each block's most) times the
//!   blocks resident per SM (its theoretical occupancy, or fewer when the grid is smaller than
//!   the GPU). It can reach at most `in flight / L` of bandwidth.
//! - The predicted time is the longer of the two; the bound named is the one that decides it.
//!
//! The latency is the idle pointer-chase DRAM latency measured by Luo et al., "Dissecting the
//! NVIDIA Hopper Architecture through Microbenchmarking and Multiple Level Analysis",
//! arXiv:2501.12084v2, Table 3: 656 cycles on an H800 PCIe, about 374 ns at 1755 MHz (read
//! through a detailed summary; an H800, not an H100 SXM; loaded latency is higher). Arithmetic,
//! instruction issue, caches and loaded latency are not modelled.

use super::occupancy::{limits, Occupancy};
use super::profile::LaunchProfile;

/// Idle DRAM latency in seconds (arXiv:2501.12084v2 Table 3: 656 cycles at 1.755 GHz).
pub const DRAM_LATENCY_S: f64 = 656.0 / 1.755e9;

/// A GPU of the model.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "cli", derive(serde::Serialize))]
pub struct Gpu {
    pub name: &'static str,
    /// Datasheet HBM bandwidth, bytes per second.
    pub bandwidth: f64,
    pub sms: u32,
}

/// H100 SXM: 3.35 TB/s (NVIDIA's datasheet).
pub const H100: Gpu = Gpu {
    name: "H100 SXM",
    bandwidth: 3.35e12,
    sms: limits::SMS,
};
/// H200: 4.8 TB/s (NVIDIA's datasheet).
pub const H200: Gpu = Gpu {
    name: "H200",
    bandwidth: 4.8e12,
    sms: limits::SMS,
};

/// Which limit the model says a launch hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(serde::Serialize))]
pub enum Bound {
    /// DRAM bandwidth: enough bytes in flight to cover the latency.
    Bandwidth,
    /// Too few bytes in flight per SM (or too few blocks) to cover the DRAM latency.
    Latency,
}

/// The model's prediction for one launch on one GPU.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "cli", derive(serde::Serialize))]
pub struct Prediction {
    pub gpu: Gpu,
    /// Device-memory bytes (sectors x 32).
    pub dram_bytes: u64,
    /// `dram_bytes` at datasheet bandwidth, seconds.
    pub bandwidth_time_s: f64,
    /// Bytes each SM must keep in flight for datasheet bandwidth (bandwidth x latency / SMs).
    pub required_inflight_per_sm: f64,
    /// Bytes each SM keeps in flight: mean per-block cp.async bytes x resident blocks per SM.
    pub inflight_per_sm: f64,
    /// Blocks resident per SM: the occupancy's, or fewer for a small grid.
    pub resident_blocks_per_sm: f64,
    /// The bandwidth the in-flight bytes can sustain, capped at the datasheet's.
    pub achievable_bandwidth: f64,
    /// `dram_bytes` at `achievable_bandwidth`, seconds.
    pub predicted_time_s: f64,
    pub bound: Bound,
}

/// The model for `launch` at `occupancy` on `gpu`.
pub fn predict(launch: &LaunchProfile, occupancy: &Occupancy, gpu: Gpu) -> Prediction {
    let dram_bytes = launch.global_bytes();
    let bandwidth_time_s = dram_bytes as f64 / gpu.bandwidth;
    let required = gpu.bandwidth * DRAM_LATENCY_S / gpu.sms as f64;
    let per_sm_grid = launch.blocks as f64 / gpu.sms as f64;
    let resident = (occupancy.blocks_per_sm as f64).min(per_sm_grid);
    let inflight = launch.mean_block_inflight() * resident;
    let sustainable = inflight * gpu.sms as f64 / DRAM_LATENCY_S;
    let achievable_bandwidth = sustainable.min(gpu.bandwidth);
    let predicted_time_s = if achievable_bandwidth > 0.0 {
        dram_bytes as f64 / achievable_bandwidth
    } else {
        f64::INFINITY
    };
    Prediction {
        gpu,
        dram_bytes,
        bandwidth_time_s,
        required_inflight_per_sm: required,
        inflight_per_sm: inflight,
        resident_blocks_per_sm: resident,
        achievable_bandwidth,
        predicted_time_s,
        bound: if sustainable >= gpu.bandwidth {
            Bound::Bandwidth
        } else {
            Bound::Latency
        },
    }
}
