// cuda_fp8.h for the kernel emulator: the fp8 storage types and the conversions kernels/fp8.cuh
// uses, as cuda_fp8.hpp documents them.
// - float -> fp8 (__nv_cvt_float_to_fp8, __nv_cvt_float2_to_fp8x2): round to nearest even, and
//   with __NV_SATFINITE saturate to +-max (448 e4m3, 57344 e5m2), infinities included; a NaN
//   becomes 0x7F, as CUDA's float path canonicalises it; below half the smallest subnormal, +-0.
//   __NV_NOSAT is not emulated (the kernels never use it): it fails the launch.
// - fp8 -> half (__nv_cvt_fp8_to_halfraw, __nv_cvt_fp8x2_to_halfraw2): exact; a NaN becomes the
//   canonical half NaN 0x7FFF, an e5m2 infinity the half infinity.
// Pairs hold the first value in the low byte (low half). Written independently of src/fp8.rs
// (the FPU's rounding instead of integer rounding); tests/sim_fp8.rs compares the two and the
// float8 crate for every fp8 pattern, every midpoint and random values.
#pragma once

#include <math.h>
#include <stdint.h>

#include <cmath>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace pgqa_sim_cuda {

typedef unsigned char __nv_fp8_storage_t;
typedef unsigned short int __nv_fp8x2_storage_t;
typedef unsigned int __nv_fp8x4_storage_t;

typedef enum __nv_saturation_t {
  __NV_NOSAT,
  __NV_SATFINITE,
} __nv_saturation_t;

typedef enum __nv_fp8_interpretation_t {
  __NV_E4M3,
  __NV_E5M2,
} __nv_fp8_interpretation_t;

inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float x, __nv_saturation_t saturate,
                                                __nv_fp8_interpretation_t kind) {
  if (saturate != __NV_SATFINITE) ::pgqa_sim::trap(PGQA_SIM_SITE);
  const bool e4m3 = kind == __NV_E4M3;
  const int mantissa_bits = e4m3 ? 3 : 2;
  const int min_exponent = e4m3 ? -6 : -14;  // of the normal values; subnormals share its step
  const unsigned max_code = e4m3 ? 0x7eu : 0x7bu;
  if (std::isnan(x)) return 0x7f;
  const unsigned char sign = std::signbit(x) ? 0x80 : 0x00;
  const float a = fabsf(x);
  if (std::isinf(a)) return sign | max_code;
  if (a < 0x1p-126f) return sign;  // zero or an f32 subnormal: rounds to zero in both formats
  const int exponent = ilogbf(a);  // 2^exponent <= a < 2^(exponent + 1)
  const int step_exponent = (exponent > min_exponent ? exponent : min_exponent) - mantissa_bits;
  // a in steps of the fp8 spacing at its magnitude: an exact power-of-two scaling, then the
  // FPU's round to nearest even (the default mode, which the emulator keeps).
  const unsigned steps = static_cast<unsigned>(rintf(ldexpf(a, -step_exponent)));
  // A normal value's steps include the implicit bit (2^m ..= 2^(m+1)): adding the binades above
  // the smallest normal one gives its code, and a value rounded up to 2^(m+1) steps lands on the
  // next binade's first code. A subnormal's steps are its code.
  const unsigned binades = exponent > min_exponent ? static_cast<unsigned>(exponent - min_exponent) : 0u;
  const unsigned code = (binades << mantissa_bits) + steps;
  return static_cast<__nv_fp8_storage_t>(sign | (code > max_code ? max_code : code));
}

inline __nv_fp8x2_storage_t __nv_cvt_float2_to_fp8x2(float2 x, __nv_saturation_t saturate,
                                                     __nv_fp8_interpretation_t kind) {
  const unsigned lo = __nv_cvt_float_to_fp8(x.x, saturate, kind);
  const unsigned hi = __nv_cvt_float_to_fp8(x.y, saturate, kind);
  return static_cast<__nv_fp8x2_storage_t>(lo | (hi << 8));
}

inline __half_raw __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t x, __nv_fp8_interpretation_t kind) {
  if (kind == __NV_E5M2) {
    // e5m2 is the top byte of an f16: the same exponent field and bias.
    const unsigned short h = static_cast<unsigned short>(x << 8);
    return {(h & 0x7fffu) > 0x7c00u ? static_cast<unsigned short>(0x7fffu) : h};
  }
  if ((x & 0x7fu) == 0x7fu) return {0x7fffu};
  const int field = (x >> 3) & 0xf;
  const int mantissa = x & 0x7;
  // Subnormal: mantissa * 2^-9; normal: (8 + mantissa) * 2^(field - 7 - 3). Exact in f32 and f16.
  float value = field == 0 ? ldexpf(static_cast<float>(mantissa), -9)
                           : ldexpf(static_cast<float>(8 + mantissa), field - 10);
  if (x & 0x80u) value = -value;
  return {__float2half_rn(value).x};
}

inline __half2_raw __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t x, __nv_fp8_interpretation_t kind) {
  return {__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(x & 0xffu), kind).x,
          __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(x >> 8), kind).x};
}

}  // namespace pgqa_sim_cuda
