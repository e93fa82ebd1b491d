//! The kernel emulator's strict semantics, each proven by a tiny kernel with a planted mistake
//! (kernels/sim/checks.cu): the mistake must be reported, the correct variant must pass. Also
//! its warp-level PTX against plain arithmetic (mma.sync against a matrix product, shuffles,
//! ldmatrix) and its 16-bit conversions against the `half` crate for every bit pattern.

use half::{bf16, f16};
use paged_gqa::sim::{self, convert, CheckRun};

const SUCCESS: i32 = 0;
const INVALID_VALUE: i32 = 1;
const INVALID_CONFIGURATION: i32 = 9;
const ILLEGAL_ADDRESS: i32 = 700;
const LAUNCH_OUT_OF_RESOURCES: i32 = 701;
const LAUNCH_FAILURE: i32 = 719;

fn floats(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (i as f32 * 0.5 + 1.0).to_le_bytes())
        .collect()
}

fn run(name: &str, variant: i32, input: &[u8], output_bytes: usize) -> CheckRun {
    sim::run_check(name, variant, input, output_bytes).unwrap_or_else(|| panic!("no check {name}"))
}

fn out_f32(run: &CheckRun) -> Vec<f32> {
    run.output
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Runs variant 0 (must pass) and `variant` (must fail with `status`, its report naming every
/// word of `expect`).
fn planted(name: &str, variant: i32, status: i32, expect: &[&str]) -> CheckRun {
    let input = floats(2048);
    let good = run(name, 0, &input, 8192);
    assert_eq!(
        good.status, SUCCESS,
        "{name} without the mistake: {}",
        good.report
    );
    let bad = run(name, variant, &input, 8192);
    assert_eq!(bad.status, status, "{name}/{variant}: {}", bad.report);
    for word in expect {
        assert!(
            bad.report.contains(word),
            "{name}/{variant}: report lacks {word:?}:\n{}",
            bad.report
        );
    }
    bad
}

#[test]
fn shared_memory_starts_poisoned() {
    let good = run("poisoned_shared", 0, &[], 512);
    assert_eq!(
        out_f32(&good)[..128],
        (0..128).map(|i| i as f32).collect::<Vec<_>>()
    );
    let bad = run("poisoned_shared", 1, &[], 512);
    assert_eq!(bad.status, SUCCESS);
    assert!(
        bad.output[..512].iter().all(|&b| b == 0xff),
        "unwritten shared memory must read as NaN bytes"
    );
}

#[test]
fn device_buffers_start_poisoned() {
    // The kernel writes 128 floats; the rest of its output buffer must still be poison.
    let good = run("poisoned_shared", 0, &[], 4096);
    assert!(good.output[512..].iter().all(|&b| b == 0xff));
}

#[test]
fn cp_async_read_before_its_wait_group_sees_poison_and_is_a_race() {
    let bad = planted(
        "async_copy",
        1,
        LAUNCH_FAILURE,
        &["data race", "async_copy", "byte"],
    );
    let _ = bad;
}

#[test]
fn cp_async_wait_group_count_off_by_one_is_caught() {
    planted("async_copy", 2, LAUNCH_FAILURE, &["data race"]);
}

#[test]
fn thread_exiting_with_copies_in_flight_is_reported() {
    planted(
        "async_copy",
        3,
        LAUNCH_FAILURE,
        &["not retired by a wait_group", "thread (0,0,0)"],
    );
}

#[test]
fn cp_async_source_alignment_and_bounds_are_checked() {
    planted(
        "async_copy_bounds",
        1,
        ILLEGAL_ADDRESS,
        &["not 16-byte aligned", "common.cuh"],
    );
    // 510 floats: the last thread's 16 bytes cross the end by 8.
    let input = floats(510);
    let bad = run("async_copy_bounds", 2, &input, 8192);
    assert_eq!(bad.status, ILLEGAL_ADDRESS, "{}", bad.report);
    assert!(
        bad.report.contains("past the end of device buffer"),
        "{}",
        bad.report
    );
    assert!(bad.report.contains("thread (127,0,0)"), "{}", bad.report);
}

#[test]
fn barrier_at_two_call_sites_is_divergence_and_exited_threads_count_as_arrived() {
    planted(
        "barrier_divergence",
        1,
        LAUNCH_FAILURE,
        &["divergent barrier", "checks.cu:"],
    );
}

#[test]
fn shuffle_by_part_of_its_mask_is_divergence() {
    planted(
        "shuffle_divergence",
        1,
        LAUNCH_FAILURE,
        &["divergent warp collective", "has exited"],
    );
}

#[test]
fn ldmatrix_needs_every_lane() {
    planted(
        "ldmatrix_divergence",
        1,
        LAUNCH_FAILURE,
        &["ldmatrix", "lane 5 has exited"],
    );
}

#[test]
fn missing_barrier_is_reported_as_a_race_with_buffer_and_offset() {
    planted(
        "shared_race",
        1,
        LAUNCH_FAILURE,
        &[
            "data race in kernel shared_race",
            "device buffer #",
            "differs at byte",
        ],
    );
}

#[test]
fn global_reads_and_writes_past_a_buffer_are_caught_with_kernel_block_thread_and_address() {
    let read = planted(
        "out_of_bounds",
        1,
        ILLEGAL_ADDRESS,
        &[
            "out-of-bounds read",
            "past the end of device buffer",
            "block (15,0,0)",
            "thread (127,0,0)",
        ],
    );
    assert!(
        read.report.contains("kernel out_of_bounds"),
        "{}",
        read.report
    );
    planted(
        "out_of_bounds",
        2,
        ILLEGAL_ADDRESS,
        &["out-of-bounds write", "past the end of device buffer"],
    );
}

#[test]
fn writes_past_the_dynamic_shared_memory_are_caught() {
    planted(
        "out_of_bounds",
        3,
        ILLEGAL_ADDRESS,
        &[
            "past the end of the block's 512 bytes of dynamic shared memory",
            "thread (7,0,0)",
        ],
    );
}

#[test]
fn writes_just_before_the_dynamic_shared_memory_are_caught() {
    planted(
        "out_of_bounds",
        4,
        ILLEGAL_ADDRESS,
        &[
            "4 bytes before the block's 512 bytes of dynamic shared memory",
            "block (0,0,0)",
        ],
    );
}

#[test]
fn launches_are_validated_as_the_driver_does() {
    planted(
        "launch_block_too_large",
        1,
        INVALID_CONFIGURATION,
        &["block (2048,1,1)"],
    );
    planted(
        "launch_grid_too_large",
        1,
        INVALID_CONFIGURATION,
        &["grid (1,70000,1)"],
    );
    planted(
        "launch_past_launch_bounds",
        1,
        LAUNCH_OUT_OF_RESOURCES,
        &[
            "launch of bounded refused",
            "256 threads per block",
            "__launch_bounds__ allows 128",
        ],
    );
    planted(
        "launch_shared_without_attribute",
        1,
        INVALID_VALUE,
        &["65536 bytes of dynamic shared memory", "49152"],
    );
    let above = run("launch_shared_above_device", 1, &[], 16);
    assert_eq!(above.status, INVALID_VALUE);
    assert_eq!(
        run("launch_shared_above_device", 0, &[], 16).status,
        SUCCESS
    );
}

#[test]
fn trap_fails_the_launch_at_its_call_site() {
    let trapped = run("trap", 0, &[], 512);
    assert_eq!(trapped.status, LAUNCH_FAILURE);
    assert!(
        trapped.report.contains("__trap() at") && trapped.report.contains("thread (3,0,0)"),
        "{}",
        trapped.report
    );
}

#[test]
fn shuffles_follow_the_ptx_modes() {
    let r = run("shuffles", 0, &[], 512);
    assert_eq!(r.status, SUCCESS, "{}", r.report);
    let out = out_f32(&r);
    for lane in 0..32usize {
        let value = |l: usize| 100.0 + l as f32;
        assert_eq!(out[lane], value(lane ^ 5), "xor");
        assert_eq!(
            out[32 + lane],
            value(if lane >= 3 { lane - 3 } else { lane }),
            "up"
        );
        let segment_end = (lane / 16 + 1) * 16;
        assert_eq!(
            out[64 + lane],
            value(if lane + 3 < segment_end {
                lane + 3
            } else {
                lane
            }),
            "down, width 16"
        );
        assert_eq!(out[96 + lane], value(31 - lane), "idx");
    }
}

/// A 16-bit float type: how the `half` crate rounds an f32 to its bits (nearest even) and widens
/// them (exactly), and how the emulator does.
struct Half {
    name: &'static str,
    round: fn(f32) -> u16,
    widen: fn(u16) -> f32,
    sim_round: fn(f32) -> u16,
    sim_widen: fn(u16) -> f32,
}

const BF16: Half = Half {
    name: "bf16",
    round: |x| bf16::from_f32(x).to_bits(),
    widen: |b| bf16::from_bits(b).to_f32(),
    sim_round: convert::f32_to_bf16,
    sim_widen: convert::bf16_to_f32,
};

const F16: Half = Half {
    name: "f16",
    round: |x| f16::from_f32(x).to_bits(),
    widen: |b| f16::from_bits(b).to_f32(),
    sim_round: convert::f32_to_f16,
    sim_widen: convert::f16_to_f32,
};

/// One m16n8k16 through ldmatrix (A direct, B transposed) and mma.sync (the check `mma_TYPE`),
/// against the product computed here in f64 from the same 16-bit values (within f32
/// accumulation), C = [0.25, -0.5, 1, 2] per lane's fragment (rows g / g + 8, columns 2t / 2t + 1).
fn mma_matches_a_matrix_product(half: &Half) {
    let name = &format!("mma_{}", half.name);
    let (to_bits, to_f64) = (half.round, |b| (half.widen)(b) as f64);
    let mut rng_state = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        ((rng_state >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32
    };
    let a: Vec<u16> = (0..256).map(|_| to_bits(next())).collect();
    let b: Vec<u16> = (0..128).map(|_| to_bits(next())).collect();
    let input: Vec<u8> = a.iter().chain(&b).flat_map(|v| v.to_le_bytes()).collect();
    let r = run(name, 0, &input, 128 * 4);
    assert_eq!(r.status, SUCCESS, "{}", r.report);
    let d = out_f32(&r);
    for row in 0..16 {
        for col in 0..8 {
            let c: f64 = [0.25, -0.5, 1.0, 2.0][(row / 8) * 2 + col % 2];
            let terms: Vec<f64> = (0..16)
                .map(|k| to_f64(a[row * 16 + k]) * to_f64(b[k * 8 + col]))
                .collect();
            let want = c + terms.iter().sum::<f64>();
            // f32 accumulation of exact products: 16 roundings, each at most half an ulp of
            // the running magnitude.
            let magnitude = c.abs() + terms.iter().map(|t| t.abs()).sum::<f64>();
            let got = d[row * 8 + col] as f64;
            assert!(
                (got - want).abs() <= 16.0 * f64::from(f32::EPSILON) * magnitude,
                "{name} D[{row}][{col}] = {got}, want {want}"
            );
        }
    }
}

#[test]
fn mma_bf16_matches_a_matrix_product() {
    mma_matches_a_matrix_product(&BF16);
}

#[test]
fn mma_f16_matches_a_matrix_product() {
    mma_matches_a_matrix_product(&F16);
}

/// Every 16-bit pattern widens exactly; every pattern, the midpoints to its neighbours and one
/// f32 ulp either side of them round as the `half` crate rounds (nearest even); NaN stays NaN.
fn conversions_match(half: &Half) {
    let (name, widen, narrow) = (half.name, half.sim_widen, half.sim_round);
    let (reference_widen, reference_narrow) = (half.widen, half.round);
    for bits in 0..=u16::MAX {
        let want = reference_widen(bits);
        let got = widen(bits);
        if want.is_nan() {
            assert!(got.is_nan(), "{name}: {bits:#06x} widens to {got}");
            assert!(
                reference_widen(narrow(got)).is_nan(),
                "{name}: NaN {bits:#06x} must stay NaN"
            );
            continue;
        }
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "{name}: {bits:#06x} widens to {got}, want {want}"
        );
        assert_eq!(narrow(got), bits, "{name}: {bits:#06x} does not round-trip");
        let next = reference_widen(bits.wrapping_add(1));
        if next.is_finite() && want.is_finite() && (bits & 0x7fff) != 0x7fff {
            let mid = ((want as f64 + next as f64) / 2.0) as f32;
            for x in [
                mid,
                f32::from_bits(mid.to_bits().wrapping_sub(1)),
                f32::from_bits(mid.to_bits() + 1),
            ] {
                assert_eq!(
                    narrow(x),
                    reference_narrow(x),
                    "{name}: {x:e} (between {bits:#06x} and the next)"
                );
            }
        }
    }
    for x in [
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e30,
        -1e30,
        65520.0,
        65519.99,
        1e-30,
        -0.0,
    ] {
        assert_eq!(narrow(x), reference_narrow(x), "{name}: {x:e}");
    }
}

#[test]
fn f16_conversions_are_bit_exact_round_to_nearest_even() {
    conversions_match(&F16);
}

#[test]
fn bf16_conversions_are_bit_exact_round_to_nearest_even() {
    conversions_match(&BF16);
}
