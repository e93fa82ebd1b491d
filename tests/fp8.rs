//! The host fp8 conversions (src/fp8.rs) against an independent source: the `float8` crate,
//! which follows CUDA's saturating conversion (`__NV_SATFINITE`), and values from the OCP 8-bit
//! floating point specification's tables. NaNs are compared as NaNs: `float8` keeps the input's
//! sign and (e5m2) payload bits where CUDA's float path, and ours, return 0x7F.

mod common;

use common::{float8_decode, float8_encode};
use float8::{F8E4M3, F8E5M2};
use paged_gqa::fp8::{self, Fp8Format, Fp8Format::E4M3, Fp8Format::E5M2};
use paged_gqa::Error;
use rand::{Rng, SeedableRng};

const FORMATS: [Fp8Format; 2] = [E4M3, E5M2];

/// `encode(format, x)` is `float8`'s result, or our NaN where `float8`'s is a NaN.
fn assert_encodes_as_reference(format: Fp8Format, x: f32) {
    let got = fp8::encode(format, x);
    let want = float8_encode(format, x);
    if float8_decode(format, want).is_nan() {
        assert_eq!(
            got,
            Fp8Format::NAN_BITS,
            "{format:?}: {x:e} ({:#010x}) must encode as NaN 0x7F",
            x.to_bits()
        );
    } else {
        assert_eq!(
            got,
            want,
            "{format:?}: {x:e} ({:#010x}) encodes to {got:#04x}, float8 says {want:#04x}",
            x.to_bits()
        );
    }
}

/// The finite codes of `format` with the sign bit clear, ascending: 0x00 ..= max_bits.
fn finite_codes(format: Fp8Format) -> std::ops::RangeInclusive<u8> {
    0..=format.max_bits()
}

#[test]
fn float8_reference_saturates_like_cuda_satfinite() {
    // What this suite relies on: float8 rounds to nearest even and saturates to the largest
    // finite value, infinities included (CUDA's __NV_SATFINITE), rather than returning
    // infinity or NaN for out-of-range values.
    assert_eq!(F8E4M3::from_f32(1e6).to_bits(), 0x7E);
    assert_eq!(F8E4M3::from_f32(f32::INFINITY).to_bits(), 0x7E);
    assert_eq!(F8E4M3::from_f32(f32::NEG_INFINITY).to_bits(), 0xFE);
    assert_eq!(F8E5M2::from_f32(1e6).to_bits(), 0x7B);
    assert_eq!(F8E5M2::from_f32(f32::INFINITY).to_bits(), 0x7B);
    assert_eq!(F8E5M2::from_f32(f32::NEG_INFINITY).to_bits(), 0xFB);
    assert!(F8E4M3::from_f32(f32::NAN).to_f32().is_nan());
    assert!(F8E5M2::from_f32(f32::NAN).to_f32().is_nan());
}

#[test]
fn every_pattern_decodes_as_float8_does() {
    for format in FORMATS {
        for bits in 0..=u8::MAX {
            let got = fp8::decode(format, bits);
            let want = float8_decode(format, bits);
            if want.is_nan() {
                assert!(
                    got.is_nan(),
                    "{format:?} {bits:#04x} decodes to {got}, not NaN"
                );
            } else {
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{format:?} {bits:#04x} decodes to {got:e}, float8 says {want:e}"
                );
            }
            assert_eq!(
                format.is_nan(bits),
                want.is_nan(),
                "{format:?}: is_nan({bits:#04x})"
            );
        }
    }
}

#[test]
fn decoded_values_match_the_ocp_tables() {
    let p2 = |e: i32| 2f32.powi(e);
    for (bits, value) in [
        (0x00, 0.0),
        (0x01, p2(-9)),       // smallest subnormal
        (0x07, 7.0 * p2(-9)), // largest subnormal
        (0x08, p2(-6)),       // smallest normal
        (0x38, 1.0),
        (0x3F, 1.875),
        (0x40, 2.0),
        (0x7E, 448.0), // largest finite
        (0xFE, -448.0),
        (0xB8, -1.0),
    ] {
        assert_eq!(fp8::decode(E4M3, bits), value, "e4m3 {bits:#04x}");
    }
    for (bits, value) in [
        (0x00, 0.0),
        (0x01, p2(-16)),
        (0x03, 3.0 * p2(-16)),
        (0x04, p2(-14)),
        (0x3C, 1.0),
        (0x3D, 1.25),
        (0x7B, 57344.0),
        (0x7C, f32::INFINITY),
        (0xFC, f32::NEG_INFINITY),
        (0xFB, -57344.0),
    ] {
        assert_eq!(fp8::decode(E5M2, bits), value, "e5m2 {bits:#04x}");
    }
    let nans = |format: Fp8Format| {
        (0..=u8::MAX)
            .filter(|&b| fp8::decode(format, b).is_nan())
            .collect::<Vec<_>>()
    };
    assert_eq!(nans(E4M3), [0x7F, 0xFF]);
    assert_eq!(nans(E5M2), [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF]);
    assert_eq!(fp8::decode(E4M3, 0x80).to_bits(), (-0.0f32).to_bits());
    assert_eq!(fp8::decode(E5M2, 0x80).to_bits(), (-0.0f32).to_bits());
    for format in FORMATS {
        assert_eq!(fp8::decode(format, format.max_bits()), format.max());
        assert!(fp8::decode(format, Fp8Format::NAN_BITS).is_nan());
        // Positive codes are ordered as their values, negative ones mirror them.
        for code in 1..=format.max_bits() {
            assert!(fp8::decode(format, code) > fp8::decode(format, code - 1));
            assert_eq!(fp8::decode(format, code | 0x80), -fp8::decode(format, code));
        }
    }
}

#[test]
fn every_decoded_pattern_encodes_back_to_itself() {
    for format in FORMATS {
        for bits in 0..=u8::MAX {
            let x = fp8::decode(format, bits);
            if x.is_nan() {
                assert_eq!(fp8::encode(format, x), Fp8Format::NAN_BITS);
            } else if x.is_infinite() {
                // e5m2 infinities are stored patterns, never an encoding's result.
                assert_eq!(fp8::encode(format, x), (bits & 0x80) | format.max_bits());
            } else {
                assert_eq!(
                    fp8::encode(format, x),
                    bits,
                    "{format:?} {bits:#04x} = {x:e}"
                );
            }
            assert_encodes_as_reference(format, x);
        }
    }
}

/// Every midpoint between neighbouring values of either sign goes to the one with an even code
/// (round half to even); one f32 ulp below goes to the smaller, one above to the larger.
#[test]
fn midpoints_round_to_even_and_their_neighbours_to_the_nearer_value() {
    for format in FORMATS {
        for sign in [0x00u8, 0x80] {
            for code in finite_codes(format).take(format.max_bits() as usize) {
                let low = float8_decode(format, code).abs();
                let high = float8_decode(format, code + 1).abs();
                // At most 5 significant bits: the midpoint is exact in f32.
                let mid = ((f64::from(low) + f64::from(high)) / 2.0) as f32;
                assert_eq!(f64::from(mid), (f64::from(low) + f64::from(high)) / 2.0);
                let even = if code % 2 == 0 { code } else { code + 1 };
                let signed = |x: f32| if sign == 0 { x } else { -x };
                for (x, want) in [
                    (mid, even),
                    (f32::from_bits(mid.to_bits() - 1), code),
                    (f32::from_bits(mid.to_bits() + 1), code + 1),
                ] {
                    let x = signed(x);
                    assert_eq!(
                        fp8::encode(format, x),
                        sign | want,
                        "{format:?}: {x:e} lies between {:#04x} and {:#04x}",
                        sign | code,
                        sign | (code + 1)
                    );
                    assert_encodes_as_reference(format, x);
                }
            }
        }
    }
}

#[test]
fn values_past_max_and_infinities_saturate_to_max() {
    for format in FORMATS {
        let max = format.max();
        // The step at the top binade: max + step / 2 is the last value rounding to max without
        // saturation (e4m3: 464, e5m2: 61440).
        let step = max - fp8::decode(format, format.max_bits() - 1);
        let threshold = max + step / 2.0;
        let mut xs = vec![
            threshold,
            f32::from_bits(threshold.to_bits() - 1),
            f32::from_bits(threshold.to_bits() + 1),
            max + step,
            2.0 * max,
            1e10,
            f32::MAX,
            f32::INFINITY,
        ];
        xs.extend((1..100).map(|k| max * (1.0 + k as f32 / 10.0)));
        for x in xs {
            for (x, sign) in [(x, 0x00), (-x, 0x80)] {
                assert_eq!(
                    fp8::encode(format, x),
                    sign | format.max_bits(),
                    "{format:?}: {x:e} must saturate"
                );
                assert_encodes_as_reference(format, x);
            }
        }
    }
}

#[test]
fn nan_stays_nan_and_encodes_as_0x7f() {
    for format in FORMATS {
        for bits in [
            0x7FC0_0000u32, // quiet NaN
            0xFFC0_0000,    // negative quiet NaN
            0x7F80_0001,    // signalling NaN, lowest payload
            0x7FA0_0000,
            0xFF80_0001,
            0x7FFF_FFFF,
            0xFFFF_FFFF,
        ] {
            let x = f32::from_bits(bits);
            assert_eq!(fp8::encode(format, x), Fp8Format::NAN_BITS, "{bits:#010x}");
            assert!(format.is_nan(fp8::encode(format, x)));
            assert_encodes_as_reference(format, x);
            assert_eq!(fp8::quantize(format, x, 0.5), Fp8Format::NAN_BITS);
        }
    }
}

#[test]
fn negative_zero_and_negative_underflow_keep_the_sign() {
    for format in FORMATS {
        let smallest = fp8::decode(format, 0x01);
        for x in [
            -0.0f32,
            -f32::from_bits(1), // smallest f32 subnormal
            -f32::MIN_POSITIVE, // smallest f32 normal
            -smallest / 2.0,    // a tie with zero: even is zero
            -smallest / 4.0,
        ] {
            assert_eq!(fp8::encode(format, x), 0x80, "{format:?}: {x:e}");
            assert_encodes_as_reference(format, x);
        }
        assert_eq!(fp8::encode(format, 0.0), 0x00);
        assert_eq!(fp8::encode(format, smallest / 2.0), 0x00);
        assert_eq!(
            fp8::encode(format, f32::from_bits((smallest / 2.0).to_bits() + 1)),
            0x01
        );
        assert!(fp8::decode(format, 0x80).is_sign_negative());
    }
}

#[test]
fn subnormals_encode_and_decode_exactly() {
    for format in FORMATS {
        let subnormals = 1u8..(1 << if format == E4M3 { 3 } else { 2 });
        let step = fp8::decode(format, 0x01);
        for code in subnormals {
            let x = f32::from(code) * step;
            assert_eq!(fp8::decode(format, code), x);
            assert_eq!(fp8::encode(format, x), code);
            assert_eq!(fp8::encode(format, -x), 0x80 | code);
            // Anywhere within a third of a step of x still rounds to it.
            for y in [x + step / 3.0, x - step / 3.0] {
                assert_eq!(fp8::encode(format, y), code, "{format:?}: {y:e}");
                assert_encodes_as_reference(format, y);
            }
        }
        // f32 subnormals are far below half the smallest fp8 subnormal.
        for bits in [1u32, 0x0040_0000, 0x007F_FFFF] {
            assert_eq!(fp8::encode(format, f32::from_bits(bits)), 0x00);
            assert_encodes_as_reference(format, f32::from_bits(bits));
        }
    }
}

/// Fixed-seed random `f32`s: any bit pattern (mostly far out of range: NaNs, infinities,
/// huge and tiny values), uniform over a little more than the format's range, and log-uniform
/// magnitudes through its subnormals, normals and the saturation region.
#[test]
fn random_values_encode_as_float8_does() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0f8e_4d3a);
    for format in FORMATS {
        let max = format.max();
        for _ in 0..300_000 {
            assert_encodes_as_reference(format, f32::from_bits(rng.random::<u32>()));
            assert_encodes_as_reference(format, rng.random_range(-1.2 * max..1.2 * max));
            let magnitude = 2f32.powf(rng.random_range(-20.0..18.0));
            let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
            assert_encodes_as_reference(format, sign * magnitude);
        }
    }
}

/// Every f32 bit pattern, both formats: minutes in a release build, so run on request:
/// `cargo test --release --test fp8 -- --ignored`.
#[test]
#[ignore = "exhaustive: all 2^32 f32 patterns (run with --release -- --ignored)"]
fn every_f32_encodes_as_float8_does() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let chunk = (1u64 << 32).div_ceil(threads);
    std::thread::scope(|scope| {
        for t in 0..threads {
            scope.spawn(move || {
                let end = ((t + 1) * chunk).min(1 << 32);
                for bits in t * chunk..end {
                    let x = f32::from_bits(bits as u32);
                    for format in FORMATS {
                        assert_encodes_as_reference(format, x);
                    }
                }
            });
        }
    });
}

#[test]
fn quantize_divides_by_the_scale_and_dequantize_multiplies() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5ca1e);
    for format in FORMATS {
        for _ in 0..50_000 {
            let scale = 2f32.powf(rng.random_range(-12.0..12.0));
            let x = rng.random_range(-1.1..1.1) * format.max() * scale;
            let stored = fp8::quantize(format, x, scale);
            let want = float8_encode(format, x / scale);
            if float8_decode(format, want).is_nan() {
                assert_eq!(stored, Fp8Format::NAN_BITS);
            } else {
                assert_eq!(stored, want, "{format:?}: quantize({x:e}, {scale:e})");
            }
            let read = fp8::dequantize(format, stored, scale);
            assert_eq!(
                read.to_bits(),
                (float8_decode(format, stored) * scale).to_bits()
            );
            // Within half a step (relative 2^-4 for e4m3, 2^-3 for e5m2) unless saturated.
            let rel = if format == E4M3 {
                1.0 / 16.0
            } else {
                1.0 / 8.0
            };
            if (x / scale).abs() <= format.max() && (x / scale).abs() >= 1.0 {
                assert!(
                    (read - x).abs() <= rel * x.abs(),
                    "{x:e} read back as {read:e}"
                );
            }
        }
    }
    // The documented degenerate scales.
    assert_eq!(fp8::quantize(E4M3, 3.0, 0.0), E4M3.max_bits());
    assert_eq!(fp8::quantize(E4M3, -3.0, 0.0), 0x80 | E4M3.max_bits());
    assert!(E4M3.is_nan(fp8::quantize(E4M3, 0.0, 0.0)));
    assert!(E5M2.is_nan(fp8::quantize(E5M2, 1.0, f32::NAN)));
}

/// The stored value is `sat_finite(x / scale)` with the quotient an IEEE division, as the
/// device computes it: near midpoints `x * (1 / scale)` would store another value.
#[test]
fn quantize_rounds_the_ieee_quotient_near_midpoints() {
    let scale = 0.37f32;
    let mut separated = 0;
    for format in FORMATS {
        for x in common::near_scaled_midpoints(format, scale) {
            let want = float8_encode(format, x / scale);
            assert_eq!(fp8::quantize(format, x, scale), want, "{format:?}: {x:e}");
            if float8_encode(format, x * (1.0 / scale)) != want {
                separated += 1;
            }
        }
    }
    assert!(
        separated > 0,
        "no input tells x / scale from x * (1 / scale)"
    );
}

#[test]
fn scale_from_amax_stores_amax_as_max() {
    assert_eq!(fp8::scale_from_amax(E4M3, 448.0), Ok(1.0));
    assert_eq!(fp8::scale_from_amax(E5M2, 57344.0), Ok(1.0));
    assert_eq!(fp8::scale_from_amax(E4M3, 3.5), Ok(3.5 / 448.0));
    assert_eq!(fp8::scale_from_amax(E5M2, 3.5), Ok(3.5 / 57344.0));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xa3a);
    for format in FORMATS {
        for _ in 0..20_000 {
            let amax = 2f32.powf(rng.random_range(-100.0..100.0));
            let scale = fp8::scale_from_amax(format, amax).unwrap();
            assert_eq!(scale, amax / format.max());
            assert_eq!(
                fp8::quantize(format, amax, scale),
                format.max_bits(),
                "{amax:e}"
            );
            assert_eq!(
                fp8::quantize(format, -amax, scale),
                0x80 | format.max_bits()
            );
            let read = fp8::dequantize(format, format.max_bits(), scale);
            assert!(
                (read - amax).abs() <= 2.0 * amax * f32::EPSILON,
                "{amax:e}: {read:e}"
            );
        }
        let huge = fp8::scale_from_amax(format, f32::MAX).unwrap();
        assert!(huge.is_finite());
        assert_eq!(fp8::quantize(format, f32::MAX, huge), format.max_bits());
    }
}

#[test]
fn scale_from_amax_of_zero_is_one() {
    for format in FORMATS {
        assert_eq!(fp8::scale_from_amax(format, 0.0), Ok(1.0));
        assert_eq!(fp8::scale_from_amax(format, -0.0), Ok(1.0));
        assert_eq!(fp8::quantize(format, 0.0, 1.0), 0x00);
    }
}

#[test]
fn scale_from_a_tiny_amax_stays_a_normal_f32() {
    for format in FORMATS {
        for amax in [
            f32::from_bits(1),
            1e-40,
            f32::MIN_POSITIVE,
            f32::MIN_POSITIVE * 100.0,
        ] {
            let scale = fp8::scale_from_amax(format, amax).unwrap();
            assert_eq!(scale, f32::MIN_POSITIVE, "{format:?}: amax {amax:e}");
            let stored = fp8::quantize(format, amax, scale);
            assert!(!format.is_nan(stored) && stored <= format.max_bits());
        }
        // Just above the clamp, the quotient is used as is.
        let amax = f32::MIN_POSITIVE * format.max() * 2.0;
        assert_eq!(
            fp8::scale_from_amax(format, amax),
            Ok(f32::MIN_POSITIVE * 2.0)
        );
    }
}

#[test]
fn scale_from_a_nan_infinite_or_negative_amax_is_an_error() {
    for format in FORMATS {
        for amax in [f32::INFINITY, f32::NEG_INFINITY, -1.0, -f32::MIN_POSITIVE] {
            assert_eq!(
                fp8::scale_from_amax(format, amax),
                Err(Error::InvalidAmax { amax })
            );
        }
        let err = fp8::scale_from_amax(format, f32::NAN).unwrap_err();
        assert!(matches!(err, Error::InvalidAmax { amax } if amax.is_nan()));
        assert!(err.to_string().contains("NaN"), "{err}");
    }
}
