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
//!   A launch with no cp.async (plain loads only) gets the bandwidth bound, marked not modelled.
//!
//! The latency is the idle pointer-chase DRAM latency measured by Luo et al., "Dissecting the
//! NVIDIA Hopper Architecture through Microbenchmarking and Multiple Level Analysis",
//! arXiv:2501.12084v2, Table 3: 656 cycles on an H800 PCIe, about 374 ns at 1755 MHz (read
//! through a detailed summary; an H800, not an H100 SXM; loaded latency is higher). Arithmetic,
//! instruction issue, caches and loaded latency are not modelled.

use super::occupancy::{limits, Occupancy};
use super::profile::LaunchProfile;

/// Idle DRAM latency in seconds (arXiv:2501.12084v2 Table 3: 656 cycles at 1.755 GHz), the
/// planner's figure: one machine model for both.
pub use crate::plan::DRAM_LATENCY_S;

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
    bandwidth: crate::plan::SplitModel::BANDWIDTH,
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
    /// The launch moves no bytes with cp.async: its loads' bytes in flight are not modelled,
    /// and the prediction is the bandwidth bound's.
    NotModelled,
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
    let modelled = launch.max_block_inflight > 0;
    let achievable_bandwidth = if modelled {
        sustainable.min(gpu.bandwidth)
    } else {
        gpu.bandwidth
    };
    let predicted_time_s = dram_bytes as f64 / achievable_bandwidth;
    Prediction {
        gpu,
        dram_bytes,
        bandwidth_time_s,
        required_inflight_per_sm: required,
        inflight_per_sm: inflight,
        resident_blocks_per_sm: resident,
        achievable_bandwidth,
        predicted_time_s,
        bound: if !modelled {
            Bound::NotModelled
        } else if sustainable >= gpu.bandwidth {
            Bound::Bandwidth
        } else {
            Bound::Latency
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::occupancy::theoretical;
    use crate::sim::profile::{LaunchProfile, SiteCounters, Space};

    fn launch(blocks: u64, inflight: u64, kv_sectors: u64) -> LaunchProfile {
        LaunchProfile {
            kernel: "k".into(),
            launcher: "l".into(),
            grid: [blocks as u32, 1, 1],
            block: [128, 1, 1],
            dynamic_smem: 0,
            blocks,
            kv_bytes_fetched: 32 * kv_sectors,
            max_block_inflight: inflight,
            sum_block_inflight: inflight * blocks,
            sites: vec![SiteCounters {
                location: "a.cu:1".into(),
                op: "cp.async".into(),
                space: Space::Kv,
                bytes: 16,
                requests: kv_sectors / 16,
                lanes: 2 * kv_sectors,
                wavefronts: 0,
                ideal_wavefronts: 0,
                sectors: kv_sectors,
                ideal_sectors: kv_sectors,
            }],
            phases: vec![],
        }
    }

    #[test]
    fn littles_law_decides_the_bound() {
        let occupancy = theoretical(128, Some(64), 0, 0); // 8 blocks per SM
        let bytes = 32 * 1_000_000u64;
        // Plenty of blocks, 16 KiB each in flight: bandwidth-bound on both GPUs.
        let p = predict(&launch(10_000, 16 * 1024, 1_000_000), &occupancy, H100);
        assert_eq!(p.bound, Bound::Bandwidth);
        assert_eq!(p.dram_bytes, bytes);
        assert!((p.predicted_time_s - bytes as f64 / H100.bandwidth).abs() < 1e-12);
        // 66 blocks of 1 KiB: half the SMs, 0.5 KiB per SM in flight against ~9.3 KiB needed.
        let p = predict(&launch(66, 1024, 1_000_000), &occupancy, H100);
        assert_eq!(p.bound, Bound::Latency);
        assert!((p.inflight_per_sm - 512.0).abs() < 1e-9);
        let sustained = 512.0 * 132.0 / DRAM_LATENCY_S;
        assert!((p.achievable_bandwidth - sustained).abs() / sustained < 1e-12);
        assert!(p.predicted_time_s > p.bandwidth_time_s);
        // Required bytes per SM: bandwidth x latency / 132.
        assert!((p.required_inflight_per_sm - 3.35e12 * DRAM_LATENCY_S / 132.0).abs() < 1e-6);
        // No cp.async: not modelled, the bandwidth bound stands.
        let p = predict(&launch(66, 0, 1_000_000), &occupancy, H200);
        assert_eq!(p.bound, Bound::NotModelled);
        assert_eq!(p.predicted_time_s, p.bandwidth_time_s);
    }
}
