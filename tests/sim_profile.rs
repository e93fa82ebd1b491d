//! The emulator's profiler and sanitizers on planted kernels (kernels/sim/checks.cu, traced
//! copy) whose counters are worked out by hand from the sm_90 rules (src/sim/profile.rs), and
//! on the real attention kernels: their K/V sectors against the traffic counter.

use paged_gqa::sim::profile::{LaunchProfile, Profile, SiteCounters, Space};
use paged_gqa::sim::{run_check, run_traced_check, CheckRun, Tracing};

const PROFILE: Tracing = Tracing {
    profile: true,
    sanitize: false,
};
const SANITIZE: Tracing = Tracing {
    profile: false,
    sanitize: true,
};

fn floats(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The profile of check `name`'s single launch (it must succeed).
fn profiled(name: &str, variant: i32, input: &[f32], output_floats: usize) -> LaunchProfile {
    let (run, profile) =
        run_traced_check(name, variant, &floats(input), 4 * output_floats, PROFILE)
            .unwrap_or_else(|| panic!("the traced copy has no check {name}"));
    assert_eq!(run.status, 0, "{name} variant {variant}: {}", run.report);
    let Profile { mut launches } = profile;
    assert_eq!(launches.len(), 1, "{name}: one launch");
    launches.remove(0)
}

/// The one site of `launch` with `op` in `space`, shown at a line of checks.cu.
fn site<'a>(launch: &'a LaunchProfile, op: &str, space: Space) -> &'a SiteCounters {
    let found: Vec<&SiteCounters> = launch
        .sites
        .iter()
        .filter(|s| s.op == op && s.space == space)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{}: one {op} site in {space:?}: {:#?}",
        launch.kernel,
        launch.sites
    );
    assert!(
        found[0].line().starts_with("checks.cu:"),
        "{}: site shown at {} ({})",
        launch.kernel,
        found[0].line(),
        found[0].location
    );
    found[0]
}

#[test]
fn shared_memory_wavefronts_follow_the_bank_rules() {
    // (variant, bytes per lane, active lanes, wavefronts, ideal)
    let cases = [
        (0, 16, 32, 4, 4), // float4 at 16 x lane: four quarter-warp phases, conflict-free
        (1, 4, 32, 2, 1),  // word 2 x lane: lanes l and l + 16 share a bank
        (2, 4, 32, 32, 1), // word 32 x lane: all in bank 0
        (3, 4, 32, 1, 1),  // one word: a broadcast
        (4, 8, 32, 2, 2),  // float2 at 8 x lane: two half-warp phases
        (5, 4, 8, 1, 1),   // lanes 0-7
    ];
    for (variant, bytes, lanes, wavefronts, ideal) in cases {
        let launch = profiled("profile_shared", variant, &[], 32);
        let load = site(&launch, "load", Space::Shared);
        let what = format!("variant {variant}: {load:?}");
        assert_eq!(load.requests, 1, "{what}: one request (one instruction)");
        assert_eq!(load.bytes, bytes, "{what}");
        assert_eq!(load.lanes, lanes, "{what}");
        assert_eq!(load.wavefronts, wavefronts, "{what}");
        assert_eq!(load.ideal_wavefronts, ideal, "{what}");
        // The fill: 32 conflict-free 32-bit stores.
        let fill = site(&launch, "store", Space::Shared);
        assert_eq!(
            (fill.requests, fill.wavefronts, fill.ideal_wavefronts),
            (32, 32, 32),
            "{fill:?}"
        );
        let total = launch.totals(Space::Shared);
        assert_eq!(total.bank_conflicts(), wavefronts - ideal, "{what}");
    }
}

#[test]
fn global_sectors_follow_the_sector_rules() {
    let input: Vec<f32> = (0..1024).map(|i| i as f32).collect();
    // (variant, bytes per lane, sectors, ideal)
    for (variant, bytes, sectors, ideal) in [(0, 4, 4, 4), (1, 4, 32, 4), (2, 16, 16, 16)] {
        let launch = profiled("profile_global", variant, &input, 32);
        let load = site(&launch, "load", Space::Global);
        let what = format!("variant {variant}: {load:?}");
        assert_eq!(load.requests, 1, "{what}");
        assert_eq!(load.bytes, bytes, "{what}");
        assert_eq!(
            (load.sectors, load.ideal_sectors),
            (sectors, ideal),
            "{what}"
        );
        let store = site(&launch, "store", Space::Global);
        assert_eq!(
            (store.requests, store.sectors, store.ideal_sectors),
            (1, 4, 4)
        );
        assert_eq!(launch.global_bytes(), 32 * (sectors + 4));
    }
}

#[test]
fn lane_utilisation_counts_active_lanes() {
    let launch = profiled("profile_shared", 5, &[], 32);
    let load = site(&launch, "load", Space::Shared);
    assert_eq!(load.lanes, 8);
    let full = profiled("profile_shared", 3, &[], 32);
    assert_eq!(site(&full, "load", Space::Shared).lanes, 32);
}

#[test]
fn warp_utilisation_shows_an_idle_half_block() {
    let launch = profiled("profile_idle_half", 0, &[], 128);
    assert_eq!(launch.phases.len(), 2, "{:#?}", launch.phases);
    let first = &launch.phases[0];
    assert_eq!(first.from, "entry");
    assert!(first.to.contains("checks.cu:"), "{first:?}");
    assert_eq!((first.warps, first.busy_warps), (4, 2), "{first:?}");
    assert_eq!(first.warp_utilisation(), 0.5);
    let second = &launch.phases[1];
    assert_eq!(
        (second.to.as_str(), second.warps, second.busy_warps),
        ("exit", 4, 4)
    );
    assert_eq!(launch.warp_utilisation(), 6.0 / 8.0);
}

#[test]
fn bytes_in_flight_are_the_most_a_block_had_not_waited_for() {
    let input: Vec<f32> = (0..384).map(|i| i as f32).collect();
    let launch = profiled("profile_inflight", 0, &input, 32);
    assert_eq!(launch.max_block_inflight, 3 * 32 * 16);
    assert_eq!(launch.mean_block_inflight(), (3 * 32 * 16) as f64);
    // Three copy sites (three lines), each one request of 32 x 16 bytes: 16 sectors, and on the
    // shared side four conflict-free quarter-warp wavefronts.
    let copies: Vec<&SiteCounters> = launch.sites.iter().filter(|s| s.op == "cp.async").collect();
    assert_eq!(copies.len(), 6, "{copies:#?}");
    for c in copies {
        assert_eq!(c.requests, 1, "{c:?}");
        match c.space {
            Space::Global => assert_eq!((c.sectors, c.ideal_sectors), (16, 16), "{c:?}"),
            Space::Shared => assert_eq!((c.wavefronts, c.ideal_wavefronts), (4, 4), "{c:?}"),
            _ => panic!("{c:?}"),
        }
    }
}

fn plain(name: &str, variant: i32, input: &[f32], output_floats: usize) -> CheckRun {
    run_check(name, variant, &floats(input), 4 * output_floats).expect("check")
}

fn sanitized(name: &str, variant: i32, input: &[f32], output_floats: usize) -> CheckRun {
    run_traced_check(name, variant, &floats(input), 4 * output_floats, SANITIZE)
        .expect("traced check")
        .0
}

#[test]
fn sanitizers_catch_what_the_two_schedules_cannot() {
    let input: Vec<f32> = (0..64).map(|i| i as f32).collect();
    // (check, output floats, what the report must say)
    let cases = [
        (
            "race_same_value",
            128,
            "racecheck: shared-memory write-after-write hazard",
        ),
        ("warp_exchange", 32, "racecheck: shared-memory"),
        (
            "stale_read_masked",
            128,
            "racecheck: shared-memory read-after-write hazard",
        ),
        (
            "global_race",
            64,
            "racecheck: global-memory read-after-write",
        ),
        ("uninitialised", 64, "initcheck"),
    ];
    for (name, out, says) in cases {
        let two_schedules = plain(name, 1, &input, out);
        assert_eq!(
            two_schedules.status, 0,
            "{name}: the two-schedule comparison alone passes it: {}",
            two_schedules.report
        );
        let clean = sanitized(name, 0, &input, out);
        assert_eq!(clean.status, 0, "{name} variant 0: {}", clean.report);
        let caught = sanitized(name, 1, &input, out);
        assert_ne!(caught.status, 0, "{name}: the sanitizers must catch it");
        assert!(
            caught.report.contains(says) && caught.report.contains("checks.cu:"),
            "{name}: {}",
            caught.report
        );
    }
    let both = sanitized("uninitialised", 1, &input, 64).report;
    assert!(
        both.contains("reads global") && both.contains("reads shared byte"),
        "{both}"
    );
}

#[test]
fn sanitizers_catch_the_planted_races_the_two_schedules_catch() {
    let caught = sanitized("shared_race", 1, &[], 128);
    assert_ne!(caught.status, 0);
    assert!(caught.report.contains("racecheck"), "{}", caught.report);
    let clean = sanitized("shared_race", 0, &[], 128);
    assert_eq!(clean.status, 0, "{}", clean.report);
    let unwritten = sanitized("poisoned_shared", 1, &[], 128);
    assert!(
        unwritten.report.contains("initcheck"),
        "{}",
        unwritten.report
    );
    assert_eq!(sanitized("poisoned_shared", 0, &[], 128).status, 0);
}

mod real_kernels {
    use paged_gqa::fp8::{self, Fp8E4M3, Fp8Element, KvScales};
    use paged_gqa::plan::KernelChoice;
    use paged_gqa::sim::profile::{LaunchProfile, Space};
    use paged_gqa::sim::{AttendBatch, DeviceKvScales, SimDevice};
    use paged_gqa::{AttendOptions, GqaShape, PagedLayout, SeqLens};

    /// Values in [-1, 1) from a fixed sequence (never zeros).
    fn values(n: usize, salt: u64) -> Vec<f32> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ salt;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 0.999
            })
            .collect()
    }

    /// One attention call over `contexts` keys with `query_lens` rows each, pages of `page`
    /// tokens (bf16, or e4m3 when `fp8`): per launch of an attention kernel, the K/V sectors
    /// the profile counts x 32 must be the bytes the traffic counter counted, and both nonzero.
    /// Returns the attention kernels' launch profiles.
    fn check(
        choice: KernelChoice,
        fp8_pages: bool,
        contexts: &[usize],
        query_lens: &[usize],
    ) -> Vec<LaunchProfile> {
        let shape = GqaShape::new(8, 2, 64).unwrap();
        let page = 16;
        let max_blocks = contexts.iter().max().unwrap().div_ceil(page);
        let num_blocks = contexts.len() * max_blocks;
        let layout = PagedLayout::new(shape, num_blocks, page).unwrap();
        let lens = SeqLens::new(contexts, query_lens).unwrap();
        let block_tables: Vec<i32> = (0..num_blocks as i32).rev().collect();
        let device = SimDevice::with_tracing(super::PROFILE);
        device.set_race_check(false);
        let q: Vec<half::bf16> = values(lens.num_tokens() * shape.q_row_len(), 1)
            .into_iter()
            .map(half::bf16::from_f32)
            .collect();
        let q = device.upload(&q).unwrap();
        let mut out = device.alloc::<half::bf16>(q.len()).unwrap();
        let mut lse = device
            .alloc::<f32>(lens.num_tokens() * shape.n_heads())
            .unwrap();
        let batch = AttendBatch::with_kernels(
            &device,
            layout,
            paged_gqa::DType::BF16,
            &lens,
            &block_tables,
            max_blocks,
            choice,
        )
        .unwrap();
        let (k, v) = (values(layout.cache_len(), 2), values(layout.cache_len(), 3));
        let options = AttendOptions::default();
        if fp8_pages {
            let (n_kv, d) = (shape.n_kv_heads(), shape.head_dim());
            let scales = KvScales::from_amax(
                Fp8E4M3::FORMAT,
                &fp8::head_amax(&k, n_kv, d).unwrap(),
                &fp8::head_amax(&v, n_kv, d).unwrap(),
            )
            .unwrap();
            let quantize = |x: &[f32], s: &[f32]| -> Vec<Fp8E4M3> {
                x.iter()
                    .enumerate()
                    .map(|(i, &x)| Fp8E4M3::quantize(x, s[(i / d) % n_kv]))
                    .collect()
            };
            let kq = device.upload(&quantize(&k, scales.k())).unwrap();
            let vq = device.upload(&quantize(&v, scales.v())).unwrap();
            let scales = DeviceKvScales::new(&device, &scales).unwrap();
            device.watch(kq.address(), kq.len());
            device.watch(vq.address(), vq.len());
            batch
                .run_fp8(&device, &kq, &vq, &scales, &q, &mut out, &mut lse, &options)
                .unwrap();
        } else {
            let to = |x: &[f32]| -> Vec<half::bf16> {
                x.iter().map(|&v| half::bf16::from_f32(v)).collect()
            };
            let (k, v) = (
                device.upload(&to(&k)).unwrap(),
                device.upload(&to(&v)).unwrap(),
            );
            device.watch(k.address(), 2 * k.len());
            device.watch(v.address(), 2 * v.len());
            batch
                .run(&device, &k, &v, &q, &mut out, &mut lse, &options)
                .unwrap();
        }
        let fetched = device.watched_bytes();
        let profile = device.take_profile().unwrap();
        let kernels: Vec<String> = profile.launches.iter().map(|l| l.kernel.clone()).collect();
        let attention: Vec<LaunchProfile> = profile
            .launches
            .into_iter()
            .filter(|l| {
                l.kernel.starts_with("cuda_core_attend_kernel")
                    || l.kernel.starts_with("tensor_core_attend_kernel")
            })
            .collect();
        assert!(
            !attention.is_empty(),
            "{choice:?}: no attention launch in {kernels:#?}"
        );
        let mut total = 0;
        for launch in &attention {
            let kv = launch.totals(Space::Kv);
            assert!(kv.sectors > 0, "{}: no K/V sectors", launch.kernel);
            assert_eq!(
                32 * kv.sectors,
                launch.kv_bytes_fetched,
                "{} ({choice:?}, fp8 {fp8_pages}): K/V sectors x 32 against the traffic counter",
                launch.kernel
            );
            assert!(
                launch.totals(Space::Shared).wavefronts > 0,
                "{}",
                launch.kernel
            );
            total += launch.kv_bytes_fetched;
        }
        assert_eq!(total, fetched);
        attention
    }

    #[test]
    fn kv_sectors_match_the_traffic_counter() {
        for fp8_pages in [false, true] {
            // Decode (and a split of a long context) on the CUDA-core kernel.
            check(KernelChoice::CudaCores, fp8_pages, &[37, 300], &[1, 1]);
            // Prompt chunks on the tensor-core kernel.
            check(KernelChoice::TensorCores, fp8_pages, &[40, 70], &[40, 20]);
        }
    }

    #[test]
    fn narrow_blocks_keep_a_16_bit_tiles_bytes_in_flight_with_fp8_pages() {
        // 64 decode rows over 300 keys (5 tiles of 64, at least 2 per split), group 4 at
        // head_dim 64: the narrow layout. A block's most bytes in flight are the first copy
        // groups before the first wait: Q (4 rows x 64 x 2 bytes) and one 64-key tile of
        // 16-bit K and V, or two of 8-bit K and V (the ring of three staging buffers).
        let tile_16_bit = 2 * 64 * 64 * 2;
        for fp8_pages in [false, true] {
            let launches = check(
                KernelChoice::NarrowTensorCores,
                fp8_pages,
                &[300; 64],
                &[1; 64],
            );
            let narrow: Vec<_> = launches
                .iter()
                .filter(|l| {
                    l.kernel.starts_with("tensor_core_attend_kernel") && l.kernel.ends_with(", 4>")
                })
                .collect();
            assert_eq!(narrow.len(), 1, "fp8 {fp8_pages}: {launches:#?}");
            assert_eq!(
                narrow[0].max_block_inflight,
                tile_16_bit + 4 * 64 * 2,
                "fp8 {fp8_pages}: {}",
                narrow[0].kernel
            );
        }
    }
}
