//! FP8 storage values for the KV cache: the OCP formats e4m3fn and e5m2, and their host
//! conversions to and from `f32`, bit-exact with the device's (`kernels/fp8.cuh`: CUDA's
//! `cuda_fp8.h` conversions with `__NV_SATFINITE`, and the emulator's copy of them).
//!
//! | format | bits | bias | largest finite | smallest normal | smallest subnormal | infinities | NaNs |
//! |---|---|---|---|---|---|---|---|
//! | [`E4M3`](Fp8Format::E4M3) (e4m3fn) | `s eeee mmm` | 7 | 448 (`0x7E`) | 2^-6 | 2^-9 | none | `0x7F`, `0xFF` |
//! | [`E5M2`](Fp8Format::E5M2) | `s eeeee mm` | 15 | 57344 (`0x7B`) | 2^-14 | 2^-16 | `0x7C`, `0xFC` | `0x7D`-`0x7F`, `0xFD`-`0xFF` |
//!
//! - [`encode`] rounds to the nearest value, ties to even, and saturates: a value past the
//!   largest finite one, infinities included, becomes ±max (`__NV_SATFINITE`). So it never
//!   produces an e5m2 infinity. Every NaN becomes [`Fp8Format::NAN_BITS`] (`0x7F`, a NaN in both
//!   formats, sign dropped): that is what CUDA's `__nv_cvt_float_to_fp8` returns for a float
//!   NaN, since it replaces any NaN input by `0x7FFFFFFF` before converting. Values below half
//!   the smallest subnormal become ±0, keeping their sign.
//! - [`decode`] is exact: every fp8 value is an `f32`, an `f16` and a `bf16` value. Every NaN
//!   pattern decodes to a NaN; its sign and payload are not kept. A stored e5m2 infinity pattern
//!   decodes to ±inf.
//! - Scales: the cache stores `quantize(x, scale) = encode(x / scale)` and reads
//!   `dequantize(bits, scale) = decode(bits) * scale`, one `f32` scale per (layer, K/V head) for
//!   K and another for V. [`scale_from_amax`] turns an observed absolute maximum into a scale.
//!
//! The bit manipulation is this crate's own; the tests (`tests/fp8.rs`) check it against the
//! `float8` crate, which follows CUDA's saturating conversion, for every fp8 pattern, every
//! midpoint and a few million `f32` values.
//!
//! # fp8 KV caches
//!
//! A [`CacheConfig`](crate::cache::CacheConfig) with
//! [`with_page_dtype`](crate::cache::CacheConfig::with_page_dtype)`(DType::F8E4M3)` (or
//! `F8E5M2`) stores K/V in one byte a value: half the memory of bf16 pages, twice the tokens in
//! a budget, and half the bytes decode reads. Queries, outputs and new K/V rows stay f16 or bf16
//! (f32 on the CPU paths). Each (layer, K/V head) has a K scale and a V scale ([`KvScales`];
//! 1.0 until set, the engines' default): the write kernel stores `sat_finite(x / scale)`, and
//! attention is exactly attention over the dequantized K/V, `stored * scale`.
//!
//! The kernels fold the scales rather than dequantize: a thread block serves one K/V head, so
//! `k_scale` is one factor of every score it computes (multiplied into the softmax scale, before
//! a soft-cap, as FlashInfer does) and `v_scale` one factor of every output (multiplied in at
//! the normalisation; split partials are merged linearly, so they may carry it). That costs one
//! multiply a block instead of one per value, and the 8-bit values go from memory to the dot
//! products (CUDA-core kernel) or to the tensor cores' 16-bit operands (widened in shared memory:
//! every fp8 value is an f16 and a bf16 value) without being rounded again.
//!
//! Device pages: `CudaStorage<Fp8E4M3>`, `SimStorage<Fp8E4M3>` (`set_scales`, then `write` and
//! `attend` as for 16-bit pages); caller-managed pages: `AttendBatch::run_fp8`; host pages:
//! `CpuStorage<Fp8E4M3>` (`set_scales`, `write_quantized`, `attend`, `reference`) and
//! [`PagedKv::with_scales`](crate::cpu::PagedKv::with_scales).
//!
//! ## Accuracy
//!
//! Attention over fp8 pages against attention over the unquantized K/V, both computed by the f64
//! oracle, on realistic K/V (unit-variance normal values; per-head magnitudes from 1/2 to 2; K
//! with 4 outlier channels per head 8 times larger, V with 2 channels 4 times larger;
//! unit-variance queries, default scale; logits of standard deviation 0.9 to 4.4: attention
//! from diffuse to peaked), decode of 4 sequences of 256, 700, 1500 and 2500 keys. Relative L2
//! error of the outputs, and the largest error of any row's log-sum-exp, measured by
//! `tests/fp8_cache.rs` (its seed is fixed, 5418796803783143062, and it checks this table to its
//! digits):
//!
//! | pages | scales | Llama-3-8B | Qwen2-7B | Qwen2.5-0.5B | Gemma-2-9B | max lse error |
//! |---|---|---|---|---|---|---|
//! | bf16 | - | 0.0062 | 0.0058 | 0.0079 | 0.0053 | 0.033 |
//! | e4m3 | per head (amax / 448) | 0.093 | 0.088 | 0.142 | 0.075 | 0.50 |
//! | e4m3 | per layer | 0.078 | 0.080 | 0.142 | 0.085 | 0.50 |
//! | e4m3 | 1.0 | 0.090 | 0.121 | 0.115 | 0.074 | 0.48 |
//! | e5m2 | per head (amax / 57344) | 0.180 | 0.178 | 0.349 | 0.174 | 1.81 |
//! | e5m2 | per layer | 0.173 | 0.170 | 0.349 | 0.162 | 1.81 |
//! | e5m2 | 1.0 | 0.164 | 0.178 | 0.315 | 0.132 | 0.84 |
//! | e4m3, K/V x 64 | 1.0 | 0.864 | | | | 8.28 |
//! | e4m3, K/V x 64 | per head | 0.093 | | | | 0.50 |
//!
//! - The error is that of the mantissa: e4m3 (3 bits) is about 15 times bf16's (7 bits), e5m2
//!   (2 bits) about twice e4m3's. Most of it comes from K: a relative error of a few per cent
//!   in each key moves peaked logits by tenths, hence the larger figures of Qwen2.5-0.5B
//!   (head_dim 64, the most peaked logits here).
//! - fp8 values are floating point, so within the format's range the scale hardly matters: per
//!   head, per layer and 1.0 give the same error while every value stays inside the range.
//!   Scales matter at its ends: K/V 64 times larger (amax about 4000, past e4m3's 448) saturate
//!   under scale 1.0 (relative error 0.86) and are as accurate as before under per-head scales.
//!   Calibrate ([`KvScales::from_amax`]) unless the values are known to fit.
//! - The bounds the test asserts follow from each format's rounding (at most 2^-4 of a value
//!   for e4m3, 2^-3 for e5m2, 2^-8 for bf16, plus half the subnormal step times the scale),
//!   carried through `q . k` and the softmax-weighted V sum row by row: each row within five
//!   standard deviations of that prediction (past its second-order shift), each lse within its
//!   worst case, each shape within 1.5 times its predicted relative error; on the table's values
//!   and on fresh ones each run; and at least 0.5 for the saturated case.
//! - The kernels add their own rounding on top (16-bit queries and outputs; bf16 probabilities
//!   in the tensor-core kernel): they are tested against the oracle over the dequantized K/V,
//!   each element within the forward-error bound of the kernel's rounding
//!   ([`crate::cpu::RoundingModel`]; `tests/gpu/fp8.rs`).
//!
//! ```
//! use paged_gqa::fp8::{self, Fp8Format::{E4M3, E5M2}};
//!
//! assert_eq!(fp8::encode(E4M3, 1.0), 0x38);
//! assert_eq!(fp8::decode(E4M3, 0x38), 1.0);
//! assert_eq!(fp8::encode(E4M3, 1000.0), 0x7E); // saturates to 448
//! assert_eq!(fp8::encode(E5M2, f32::NEG_INFINITY), 0xFB); // -57344, never -inf
//! assert!(fp8::decode(E4M3, fp8::encode(E4M3, f32::NAN)).is_nan());
//!
//! // A K head whose values reach 3.5 in magnitude: 3.5 is stored as 448.
//! let scale = fp8::scale_from_amax(E4M3, 3.5)?;
//! assert_eq!(fp8::quantize(E4M3, -3.5, scale), 0xFE);
//! assert_eq!(fp8::dequantize(E4M3, 0xFE, scale), -3.5);
//! # Ok::<(), paged_gqa::Error>(())
//! ```

use crate::dtype::{DType, PageElement};
use crate::error::{Error, Result};

/// One of the two FP8 storage formats of the OCP 8-bit floating point specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fp8Format {
    /// e4m3fn: 4 exponent bits (bias 7), 3 mantissa bits, largest finite value 448, no
    /// infinities, NaN only at `0x7F` and `0xFF`. More precision, less range.
    E4M3,
    /// e5m2: 5 exponent bits (bias 15), 2 mantissa bits, largest finite value 57344, IEEE-style
    /// infinities (`0x7C`, `0xFC`) and NaNs (exponent 31, mantissa not 0). More range.
    E5M2,
}

impl Fp8Format {
    /// The format of an fp8 page dtype; `None` for the others.
    pub fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F8E4M3 => Some(Fp8Format::E4M3),
            DType::F8E5M2 => Some(Fp8Format::E5M2),
            DType::F32 | DType::F16 | DType::BF16 => None,
        }
    }

    /// The NaN [`encode`] produces in either format: `0x7F` (all exponent and mantissa bits set,
    /// sign clear), the NaN CUDA's float-to-fp8 conversion returns.
    pub const NAN_BITS: u8 = 0x7F;

    /// The largest finite value: 448 for e4m3fn, 57344 for e5m2. Encoding saturates to it.
    pub const fn max(self) -> f32 {
        match self {
            Fp8Format::E4M3 => 448.0,
            Fp8Format::E5M2 => 57344.0,
        }
    }

    /// The bits of [`max`](Self::max): `0x7E` for e4m3fn, `0x7B` for e5m2 (`| 0x80` for -max).
    pub const fn max_bits(self) -> u8 {
        match self {
            Fp8Format::E4M3 => 0x7E,
            Fp8Format::E5M2 => 0x7B,
        }
    }

    /// True when `bits` is a NaN of this format: `0x7F` or `0xFF` for e4m3fn; exponent 31 with a
    /// nonzero mantissa (`0x7D`-`0x7F`, `0xFD`-`0xFF`) for e5m2.
    pub const fn is_nan(self, bits: u8) -> bool {
        match self {
            Fp8Format::E4M3 => bits & 0x7F == 0x7F,
            Fp8Format::E5M2 => bits & 0x7F > 0x7C,
        }
    }

    /// Explicit mantissa bits: 3 or 2.
    const fn mantissa_bits(self) -> u32 {
        match self {
            Fp8Format::E4M3 => 3,
            Fp8Format::E5M2 => 2,
        }
    }

    /// Exponent bias: 7 or 15.
    const fn bias(self) -> i32 {
        match self {
            Fp8Format::E4M3 => 7,
            Fp8Format::E5M2 => 15,
        }
    }
}

/// `x` in `format`: rounded to the nearest value, ties to even; saturated to ±[`max`] past the
/// largest finite value (±inf included); a NaN becomes [`Fp8Format::NAN_BITS`]; below half the
/// smallest subnormal, ±0 (the sign kept). CUDA's `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, ..)`.
///
/// [`max`]: Fp8Format::max
pub fn encode(format: Fp8Format, x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let abs = bits & 0x7FFF_FFFF;
    if abs > 0x7F80_0000 {
        return Fp8Format::NAN_BITS;
    }
    if abs == 0x7F80_0000 {
        return sign | format.max_bits();
    }
    let biased_exponent = (abs >> 23) as i32;
    if biased_exponent == 0 {
        // Zero or an f32 subnormal (below 2^-126): far below half the smallest fp8 subnormal.
        return sign;
    }
    let m = format.mantissa_bits();
    let exponent = biased_exponent - 127; // |x| = significand * 2^(exponent - 23)
    let significand = (abs & 0x7F_FFFF) | 0x80_0000;
    let min_exponent = 1 - format.bias(); // of the normal values; subnormals share its step
                                          // The step between fp8 values near |x| is 2^(max(exponent, min_exponent) - m): the
                                          // significand bits below it are rounded off.
    let shift = (23 - m as i32) + (min_exponent - exponent).max(0);
    if shift > 24 {
        return sign; // |x| is below half a step: rounds to zero
    }
    let shift = shift as u32;
    let kept = significand >> shift;
    let rest = significand & ((1 << shift) - 1);
    let half = 1 << (shift - 1);
    let rounded = kept + u32::from(rest > half || (rest == half && kept & 1 == 1));
    // A normal value's `rounded` holds the implicit bit (2^m ..= 2^(m+1)), so adding
    // (exponent - min_exponent) << m gives exponent field exponent + bias, and a significand that
    // rounded up to 2^(m+1) carries into the next binade. A subnormal's `rounded` is its code.
    let code = (((exponent - min_exponent).max(0) as u32) << m) + rounded;
    if code > u32::from(format.max_bits()) {
        // Past max: the e4m3fn NaN 0x7F, e5m2 infinity 0x7C, or anything larger.
        sign | format.max_bits()
    } else {
        sign | code as u8
    }
}

/// The value of `bits` in `format`, exactly. NaN patterns ([`Fp8Format::is_nan`]) give a NaN
/// (sign and payload not kept); e5m2's `0x7C` and `0xFC` give ±inf.
pub fn decode(format: Fp8Format, bits: u8) -> f32 {
    if format.is_nan(bits) {
        return f32::NAN;
    }
    let magnitude = bits & 0x7F;
    let m = format.mantissa_bits();
    let exponent_field = i32::from(magnitude >> m);
    let mantissa = u32::from(magnitude) & ((1 << m) - 1);
    let value = if format == Fp8Format::E5M2 && magnitude == 0x7C {
        f32::INFINITY
    } else if exponent_field == 0 {
        // Zero or subnormal: mantissa steps of 2^(1 - bias - m), exact in f32.
        let step = f32::from_bits(((128 - format.bias() - m as i32) as u32) << 23);
        mantissa as f32 * step
    } else {
        f32::from_bits(((exponent_field - format.bias() + 127) as u32) << 23 | mantissa << (23 - m))
    };
    if bits & 0x80 != 0 {
        -value
    } else {
        value
    }
}

/// The stored bits of `x` under `scale`: [`encode`]`(format, x / scale)`, the quotient rounded
/// to `f32` first (an IEEE division, as the device computes it), so the stored value is
/// `sat_finite(x / scale)`.
///
/// `scale` should be positive and finite, as [`scale_from_amax`] returns it: a zero scale stores
/// ±max for nonzero `x` and NaN for zero; a NaN scale stores NaN.
pub fn quantize(format: Fp8Format, x: f32, scale: f32) -> u8 {
    encode(format, x / scale)
}

/// The value `bits` stands for under `scale`: [`decode`]`(format, bits) * scale`, rounded to `f32`.
pub fn dequantize(format: Fp8Format, bits: u8, scale: f32) -> f32 {
    decode(format, bits) * scale
}

/// The scale that stores an observed absolute maximum `amax` as the format's largest finite
/// value: `amax / max` (`amax / 448` for e4m3fn, `amax / 57344` for e5m2), for engines that
/// calibrate. The result is always positive, finite and a normal `f32`:
///
/// - `amax == 0` (every observed value was zero) gives 1.0: any positive scale stores zeros
///   exactly, and 1.0 is the scale engines use when none was calibrated.
/// - A tiny `amax` whose quotient would fall below `f32::MIN_POSITIVE` (2^-126) gives
///   `f32::MIN_POSITIVE`, so that `x / scale` stays finite and exact enough; values up to `amax`
///   then use less than the whole fp8 range.
///
/// # Errors
///
/// [`Error::InvalidAmax`] when `amax` is NaN, infinite or negative: a calibration bug that a
/// substitute scale would hide.
pub fn scale_from_amax(format: Fp8Format, amax: f32) -> Result<f32> {
    if amax.is_nan() || amax.is_infinite() || amax < 0.0 {
        return Err(Error::InvalidAmax { amax });
    }
    if amax == 0.0 {
        return Ok(1.0);
    }
    Ok((amax / format.max()).max(f32::MIN_POSITIVE))
}

/// One stored e4m3fn value (its bits): the element of [`DType::F8E4M3`]
/// pages. Converting it to `f32` or `f64` gives the stored value, [`decode`]: multiply by the
/// scale for the value it stands for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(transparent)]
pub struct Fp8E4M3(pub u8);

/// One stored e5m2 value (its bits): the element of [`DType::F8E5M2`]
/// pages, as [`Fp8E4M3`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(transparent)]
pub struct Fp8E5M2(pub u8);

// SAFETY: one byte of plain data, every bit pattern valid (zero included), no padding.
unsafe impl cudarc::driver::DeviceRepr for Fp8E4M3 {}
// SAFETY: as above.
unsafe impl cudarc::driver::ValidAsZeroBits for Fp8E4M3 {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for Fp8E5M2 {}
// SAFETY: as above.
unsafe impl cudarc::driver::ValidAsZeroBits for Fp8E5M2 {}

impl PageElement for Fp8E4M3 {
    const PAGE_DTYPE: DType = DType::F8E4M3;
}

impl PageElement for Fp8E5M2 {
    const PAGE_DTYPE: DType = DType::F8E5M2;
}

/// A stored fp8 value of one format: [`Fp8E4M3`] or [`Fp8E5M2`].
pub trait Fp8Element: PageElement + Into<f32> + Into<f64> + Send + Sync {
    /// The format of the stored bits.
    const FORMAT: Fp8Format;
    /// The value with these bits.
    fn from_bits(bits: u8) -> Self;
    /// The stored bits.
    fn to_bits(self) -> u8;
    /// `x` stored under `scale`: [`quantize`]`(FORMAT, x, scale)`.
    fn quantize(x: f32, scale: f32) -> Self {
        Self::from_bits(quantize(Self::FORMAT, x, scale))
    }
}

macro_rules! fp8_element {
    ($ty:ident, $format:expr) => {
        impl Fp8Element for $ty {
            const FORMAT: Fp8Format = $format;
            fn from_bits(bits: u8) -> Self {
                $ty(bits)
            }
            fn to_bits(self) -> u8 {
                self.0
            }
        }
        impl From<$ty> for f32 {
            /// The stored value, exactly ([`decode`]), without a scale.
            fn from(x: $ty) -> f32 {
                decode($format, x.0)
            }
        }
        impl From<$ty> for f64 {
            /// The stored value, exactly ([`decode`]), without a scale.
            fn from(x: $ty) -> f64 {
                f64::from(decode($format, x.0))
            }
        }
    };
}
fp8_element!(Fp8E4M3, Fp8Format::E4M3);
fp8_element!(Fp8E5M2, Fp8Format::E5M2);

/// The fp8 scales of one layer of a cache: `k` and `v`, one `f32` per K/V head (`[n_kv_heads]`
/// each; a per-layer scale is the same value repeated). K/V head `h`'s values are stored as
/// [`quantize`]`(x, k[h])` and read as [`dequantize`]`(bits, k[h])` (`v[h]` for V). Every scale
/// is positive and finite.
///
/// ```
/// use paged_gqa::fp8::{Fp8Format, KvScales};
/// // Calibrated per head from observed maxima (8 K/V heads), or one value per layer.
/// let k_amax = [3.5, 2.0, 1.0, 7.0, 0.5, 3.0, 2.5, 4.0];
/// let scales = KvScales::from_amax(Fp8Format::E4M3, &k_amax, &[1.0; 8])?;
/// assert_eq!(scales.k()[0], 3.5 / 448.0);
/// let layer = KvScales::per_layer(8, 0.01, 0.02)?;
/// assert_eq!(layer.v(), &[0.02; 8]);
/// assert!(KvScales::new(vec![1.0, 0.0], vec![1.0, 1.0]).is_err()); // k_scale[1] = 0
/// # Ok::<(), paged_gqa::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct KvScales {
    /// [n_kv_heads]
    k: Vec<f32>,
    /// [n_kv_heads]
    v: Vec<f32>,
}

impl KvScales {
    /// Scales `k` and `v`, `[n_kv_heads]` each. Errors: lengths that differ or are zero, a scale
    /// that is not positive and finite ([`Error::InvalidKvScale`]).
    pub fn new(k: Vec<f32>, v: Vec<f32>) -> Result<Self> {
        if k.is_empty() {
            return Err(Error::BufferLength {
                name: "k_scale",
                expected: 1,
                actual: 0,
            });
        }
        Error::check_len("v_scale (as many as k_scale)", v.len(), k.len())?;
        for (name, scales) in [("k_scale", &k), ("v_scale", &v)] {
            if let Some((head, &value)) = scales
                .iter()
                .enumerate()
                .find(|(_, s)| !(s.is_finite() && **s > 0.0))
            {
                return Err(Error::InvalidKvScale { name, head, value });
            }
        }
        Ok(Self { k, v })
    }

    /// One K scale and one V scale for every head (a per-layer, per-tensor scale).
    pub fn per_layer(n_kv_heads: usize, k: f32, v: f32) -> Result<Self> {
        Self::new(vec![k; n_kv_heads], vec![v; n_kv_heads])
    }

    /// Scale 1.0 for every head (the engines' default when nothing was calibrated).
    pub fn ones(n_kv_heads: usize) -> Self {
        Self {
            k: vec![1.0; n_kv_heads.max(1)],
            v: vec![1.0; n_kv_heads.max(1)],
        }
    }

    /// The scales that store each head's observed absolute maximum as the format's largest
    /// value ([`scale_from_amax`] per head): `k_amax`, `v_amax` `[n_kv_heads]`.
    pub fn from_amax(format: Fp8Format, k_amax: &[f32], v_amax: &[f32]) -> Result<Self> {
        let scales = |amax: &[f32]| -> Result<Vec<f32>> {
            amax.iter().map(|&a| scale_from_amax(format, a)).collect()
        };
        Self::new(scales(k_amax)?, scales(v_amax)?)
    }

    /// The K scales, `[n_kv_heads]`.
    pub fn k(&self) -> &[f32] {
        &self.k
    }

    /// The V scales, `[n_kv_heads]`.
    pub fn v(&self) -> &[f32] {
        &self.v
    }

    /// K/V heads the scales are for.
    pub fn n_kv_heads(&self) -> usize {
        self.k.len()
    }

    /// `Err(BufferLength)` unless there is one scale per K/V head.
    pub(crate) fn check_heads(&self, n_kv_heads: usize) -> Result<()> {
        Error::check_len("k_scale (one per K/V head)", self.k.len(), n_kv_heads)?;
        Error::check_len("v_scale (one per K/V head)", self.v.len(), n_kv_heads)
    }

    /// `[k..., v...]`, `[2, n_kv_heads]`: the layout the device storages keep per layer.
    pub(crate) fn concat(&self) -> Vec<f32> {
        self.k.iter().chain(&self.v).copied().collect()
    }
}

/// The absolute maximum of each K/V head's values in `rows` (`[num_tokens, n_kv_heads,
/// head_dim]`), `[n_kv_heads]`, for [`KvScales::from_amax`]. A NaN anywhere in a head makes
/// its maximum NaN (which [`scale_from_amax`] refuses), so a bad calibration batch is not
/// silently skipped.
pub fn head_amax(rows: &[f32], n_kv_heads: usize, head_dim: usize) -> Result<Vec<f32>> {
    let row_len = n_kv_heads * head_dim;
    if row_len == 0 || rows.len() % row_len != 0 {
        return Err(Error::BufferLength {
            name: "rows (whole [n_kv_heads, head_dim] rows)",
            expected: rows.len().next_multiple_of(row_len.max(1)),
            actual: rows.len(),
        });
    }
    let mut amax = vec![0.0f32; n_kv_heads];
    for row in rows.chunks(row_len) {
        for (head, values) in row.chunks(head_dim).enumerate() {
            for &x in values {
                let a = &mut amax[head];
                *a = if x.is_nan() || a.is_nan() {
                    f32::NAN
                } else {
                    a.max(x.abs())
                };
            }
        }
    }
    Ok(amax)
}
