//! The device fp8 conversions (kernels/fp8.cuh over cuda_fp8.h): on the kernel emulator, whose
//! kernels/sim/include/cuda_fp8.h stands in for CUDA's, every fp8 pattern and a set of f32 values
//! through every vector conversion, compared bit for bit with the host's (src/fp8.rs) and with
//! the `float8` crate (NaNs as NaNs); and with nvcc, the header compiled for sm_80 and sm_90
//! without spills, on sm_90 to the cvt instructions.
//!
//! Unwritten device output is poison (0xFF bytes): 0xFF is an fp8 NaN but never the 0x7F every
//! NaN encodes to, and 0xFFFFFFFF never the f32 NaN (0x7FFFE000) an fp8 NaN decodes to.

mod common;
#[path = "../build/ptxas.rs"]
#[allow(dead_code)] // parse_allowlist and to_tsv are build.rs's
mod ptxas;

use std::path::Path;
use std::process::Command;

use common::{float8_decode, float8_encode};
use half::{bf16, f16};
use paged_gqa::fp8::{self, Fp8Format, Fp8Format::E4M3, Fp8Format::E5M2};
use paged_gqa::sim::{self, CheckRun};
use rand::{Rng, SeedableRng};

const FORMATS: [Fp8Format; 2] = [E4M3, E5M2];
/// Not a power of two, so dividing and multiplying by it rounds.
const SCALE: f32 = 0.37;
/// What an fp8 NaN becomes through the half NaN 0x7FFF, as CUDA widens it.
const NAN_F32_BITS: u32 = 0x7FFF_E000;

fn check(format: Fp8Format, what: &str, input: &[u8], output_bytes: usize) -> CheckRun {
    let name = match format {
        E4M3 => format!("fp8_e4m3_{what}"),
        E5M2 => format!("fp8_e5m2_{what}"),
    };
    let run = sim::run_check(&name, 0, input, output_bytes)
        .unwrap_or_else(|| panic!("the emulator has no check {name}"));
    assert_eq!(run.status, 0, "{name}: {}", run.report);
    run
}

/// The checks' input: the scale, padding to 16 bytes, then the data.
fn with_scale(data: impl IntoIterator<Item = u8>) -> Vec<u8> {
    let mut input = SCALE.to_le_bytes().to_vec();
    input.resize(16, 0);
    input.extend(data);
    input
}

fn f32_at(bytes: &[u8], index: usize) -> f32 {
    f32::from_le_bytes(bytes[4 * index..4 * index + 4].try_into().unwrap())
}

fn u16_at(bytes: &[u8], index: usize) -> u16 {
    u16::from_le_bytes(bytes[2 * index..2 * index + 2].try_into().unwrap())
}

#[test]
fn every_pattern_widens_on_the_emulator_as_on_the_host_and_in_float8() {
    for format in FORMATS {
        let run = check(format, "decode", &with_scale(0..=u8::MAX), 4096 + 1024);
        let out = &run.output;
        for bits in 0..=u8::MAX {
            let i = usize::from(bits);
            let host = fp8::decode(format, bits);
            let reference = float8_decode(format, bits);
            for (path, region) in [
                ("fp8_to_float8", 0),
                ("fp8_to_float16", 1),
                ("fp8_to_float", 2),
            ] {
                let got = f32_at(out, 256 * region + i);
                let want = if reference.is_nan() {
                    assert!(host.is_nan());
                    NAN_F32_BITS
                } else {
                    assert_eq!(host.to_bits(), reference.to_bits());
                    host.to_bits()
                };
                assert_eq!(
                    got.to_bits(),
                    want,
                    "{format:?} {path}({bits:#04x}) = {got:e}, want {:e}",
                    f32::from_bits(want)
                );
            }
            let dequantized = f32_at(out, 768 + i);
            let want = fp8::dequantize(format, bits, SCALE);
            if want.is_nan() {
                assert!(dequantized.is_nan(), "{format:?} dequantize8({bits:#04x})");
            } else {
                assert_eq!(dequantized.to_bits(), want.to_bits());
                assert_eq!(want.to_bits(), (reference * SCALE).to_bits());
            }
            let half = u16_at(&out[4096..], i);
            let brain = u16_at(&out[4096 + 512..], i);
            if reference.is_nan() {
                assert_eq!((half, brain), (0x7FFF, 0x7FFF), "{format:?} {bits:#04x}");
            } else {
                // Exact: every fp8 value is an f16 and a bf16 value.
                assert_eq!(f16::from_bits(half).to_f32().to_bits(), host.to_bits());
                assert_eq!(bf16::from_bits(brain).to_f32().to_bits(), host.to_bits());
            }
        }
    }
}

/// The f32 values the conversion to fp8 is tried on: every fp8 value, every midpoint between
/// neighbours and one f32 ulp either side, both signs, the saturation threshold, specials
/// (zeros, infinities, NaNs with either sign and several payloads, f32 subnormals and extremes)
/// and fixed-seed random values (any bit pattern, uniform over the range, log-uniform).
fn encode_inputs(format: Fp8Format) -> Vec<f32> {
    let mut xs: Vec<f32> = (0..=u8::MAX).map(|b| float8_decode(format, b)).collect();
    for code in 0..format.max_bits() {
        let low = float8_decode(format, code);
        let high = float8_decode(format, code + 1);
        let mid = ((f64::from(low) + f64::from(high)) / 2.0) as f32;
        for x in [
            mid,
            f32::from_bits(mid.to_bits() - 1),
            f32::from_bits(mid.to_bits() + 1),
        ] {
            xs.extend([x, -x]);
        }
    }
    // Values whose quotient by the scale lies within a few f32 ulps of a midpoint: there the
    // quotient's rounding (an IEEE division, not a multiplication by 1 / scale) decides.
    for x in common::near_scaled_midpoints(format, SCALE) {
        xs.extend([x, -x]);
    }
    let max = format.max();
    let threshold = max + (max - float8_decode(format, format.max_bits() - 1)) / 2.0;
    for x in [
        threshold,
        f32::from_bits(threshold.to_bits() - 1),
        f32::from_bits(threshold.to_bits() + 1),
        2.0 * max,
        f32::MAX,
        f32::INFINITY,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x007F_FFFF),
        0.0,
    ] {
        xs.extend([x, -x]);
    }
    xs.extend(
        [
            0x7FC0_0000u32,
            0xFFC0_0000,
            0x7F80_0001,
            0xFF80_0001,
            0x7FA0_0000,
            0x7FFF_FFFF,
        ]
        .map(f32::from_bits),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xf8_51);
    for _ in 0..4000 {
        xs.push(f32::from_bits(rng.random::<u32>()));
        xs.push(rng.random_range(-1.2 * max..1.2 * max));
        let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
        xs.push(sign * 2f32.powf(rng.random_range(-20.0..18.0)));
    }
    xs.resize(xs.len().next_multiple_of(16), 0.0);
    xs
}

#[test]
fn f32_values_narrow_on_the_emulator_as_on_the_host_and_in_float8() {
    for format in FORMATS {
        let xs = encode_inputs(format);
        let n = xs.len();
        let run = check(
            format,
            "encode",
            &with_scale(xs.iter().flat_map(|x| x.to_le_bytes())),
            5 * n,
        );
        for (i, &x) in xs.iter().enumerate() {
            let host = fp8::encode(format, x);
            let reference = float8_encode(format, x);
            if float8_decode(format, reference).is_nan() {
                assert_eq!(host, Fp8Format::NAN_BITS);
            } else {
                assert_eq!(host, reference, "{format:?}: host encode({x:e})");
            }
            for (path, region) in [
                ("float16_to_fp8", 0),
                ("float8_to_fp8", 1),
                ("float2_to_fp8x2", 2),
                ("float_to_fp8_satfinite", 3),
            ] {
                let got = run.output[region * n + i];
                assert_eq!(
                    got,
                    host,
                    "{format:?} {path}({x:e} = {:#010x}) = {got:#04x}, want {host:#04x}",
                    x.to_bits()
                );
            }
            let quantized = run.output[4 * n + i];
            assert_eq!(
                quantized,
                fp8::quantize(format, x, SCALE),
                "{format:?} quantize8({x:e})"
            );
            let reference = float8_encode(format, x / SCALE);
            if !float8_decode(format, reference).is_nan() {
                assert_eq!(quantized, reference, "{format:?} quantize8({x:e}), float8");
            }
        }
    }
}

/// Runs nvcc on tests/fixtures/fp8_device.cu (every function of fp8.cuh, both formats) with
/// `args`; returns its stderr.
fn compile_fixture(nvcc: &str, args: &[&str], output: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let result = Command::new(nvcc)
        .args(["-std=c++17", "-I"])
        .arg(root.join("kernels"))
        .args(args)
        .arg("-o")
        .arg(output)
        .arg(root.join("tests/fixtures/fp8_device.cu"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
    assert!(result.status.success(), "nvcc {args:?}:\n{stderr}");
    stderr
}

#[test]
fn fp8_header_compiles_with_nvcc_to_the_cvt_instructions_on_sm90() {
    let Some(nvcc) = common::nvcc("fp8_header_compiles_with_nvcc_to_the_cvt_instructions_on_sm90")
    else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("paged-gqa-fp8-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let report = compile_fixture(
        nvcc,
        &[
            "-c",
            "-Xptxas=-v",
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90",
        ],
        &dir.join("fp8_device.o"),
    );
    let kernels = ptxas::parse("fp8_device.cu", &report);
    for arch in ["sm_80", "sm_90"] {
        for format in ["fp8_e4m3", "fp8_e5m2"] {
            assert!(
                kernels
                    .iter()
                    .any(|k| k.arch == arch && k.kernel.contains(format)),
                "no {format} kernel for {arch} in the report:\n{report}"
            );
        }
    }
    let violations = ptxas::violations(&kernels, &[]);
    assert!(violations.is_empty(), "{violations:?}");

    let ptx = |arch: &str| {
        let path = dir.join(format!("fp8_device_{arch}.ptx"));
        compile_fixture(nvcc, &["-ptx", &format!("-arch=compute_{arch}")], &path);
        std::fs::read_to_string(path).unwrap()
    };
    let hopper = ptx("90");
    for instruction in [
        "cvt.rn.satfinite.e4m3x2.f32",
        "cvt.rn.satfinite.e5m2x2.f32",
        "cvt.rn.f16x2.e4m3x2",
        "cvt.rn.f16x2.e5m2x2",
        "div.rn.f32",
    ] {
        assert!(
            hopper.contains(instruction),
            "sm_90 PTX lacks {instruction}"
        );
    }
    // Before sm_89 cuda_fp8.h converts in software.
    let ampere = ptx("80");
    assert!(!ampere.contains("e4m3x2") && !ampere.contains("e5m2x2"));
    assert!(ampere.contains("div.rn.f32"));
    let _ = std::fs::remove_dir_all(&dir);
}
