// fp8.cuh: FP8 storage values (OCP e4m3fn and e5m2) on the device: the element types of fp8
// pages, and their conversions to and from f32, f16 and bf16, 2, 8 or 16 values at a time.
//
// The semantics are src/fp8.rs's, bit for bit (tests/sim_fp8.rs checks both, on the emulator,
// against each other and the float8 crate; a GPU run of the same comparison is still to come):
// - to fp8: round to nearest even; saturate past the largest finite value (__NV_SATFINITE):
//   +-inf and everything beyond become +-max (448 e4m3fn, 57344 e5m2), so no e5m2 infinity is
//   ever produced; NaN becomes 0x7F (CUDA's float path; see the note below).
// - from fp8: exact (every fp8 value is an f16, a bf16 and an f32 value); a NaN pattern (0x7F,
//   0xFF for e4m3fn; exponent 31, mantissa not 0 for e5m2) gives a NaN, an e5m2 infinity +-inf.
// - quantize8(x, scale) stores sat_finite(x / scale) (an IEEE division, __fdiv_rn, whatever the
//   compiler flags); dequantize8 reads stored * scale.
//
// Under nvcc these are cuda_fp8.h's intrinsics: one cvt instruction per pair of values on sm_89
// and newer (cvt.rn.satfinite.{e4m3,e5m2}x2.f32 and cvt.rn.f16x2.{e4m3,e5m2}x2), the header's
// software path (integer operations on the bits, of the value widened to f64 for the conversion
// to fp8) on older GPUs (sm_80). Under the emulator (PGQA_SIM) kernels/sim/include/
// cuda_fp8.h implements the same intrinsics as cuda_fp8.hpp documents them. NaN note: the sign
// and payload of a NaN produced by the sm_89+ cvt are not documented in cuda_fp8.hpp and not yet
// observed on a GPU; every reader treats any NaN pattern as NaN.
//
// Element order: value i of a vector is byte i (little-endian words), as in memory.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace pgqa {

// One stored fp8 value, the element type of an fp8 page: 16 of them fill a 16-byte vector.
struct fp8_e4m3 {
  uint8_t bits;
};
struct fp8_e5m2 {
  uint8_t bits;
};

// The format behind an element type: cuda_fp8.h's interpretation and the largest finite value.
template <typename F>
struct Fp8Format;
template <>
struct Fp8Format<fp8_e4m3> {
  static constexpr __nv_fp8_interpretation_t kind = __NV_E4M3;
  static constexpr float max = 448.0f;
};
template <>
struct Fp8Format<fp8_e5m2> {
  static constexpr __nv_fp8_interpretation_t kind = __NV_E5M2;
  static constexpr float max = 57344.0f;
};

// One value to fp8, saturating (the tag's type picks the format: `const fp8_e4m3 *tag = nullptr`).
template <typename F>
__device__ __forceinline__ uint8_t float_to_fp8_satfinite(float x, const F *) {
  return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, Fp8Format<F>::kind);
}

// Two values to fp8: `lo` in the low byte, `hi` in the high byte.
template <typename F>
__device__ __forceinline__ uint16_t float2_to_fp8x2(float lo, float hi, const F *) {
  return __nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, Fp8Format<F>::kind);
}

// One fp8 value to f32 (exact).
template <typename F>
__device__ __forceinline__ float fp8_to_float(uint8_t bits, const F *) {
  const __half h(__nv_cvt_fp8_to_halfraw(bits, Fp8Format<F>::kind));
  return __half2float(h);
}

// Two fp8 values (low byte first) to f32 (exact).
template <typename F>
__device__ __forceinline__ float2 fp8x2_to_float2(uint16_t bits, const F *) {
  const __half2 h(__nv_cvt_fp8x2_to_halfraw2(bits, Fp8Format<F>::kind));
  return __half22float2(h);
}

// Eight fp8 values (one 8-byte vector) to floats, and back.
template <typename F>
__device__ __forceinline__ void fp8_to_float8(const uint2 &v, float (&f)[8], const F *tag) {
  const uint32_t words[2] = {v.x, v.y};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = fp8x2_to_float2(static_cast<uint16_t>(words[i / 2] >> (16 * (i % 2))), tag);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}
template <typename F>
__device__ __forceinline__ uint2 float8_to_fp8(const float (&f)[8], const F *tag) {
  uint32_t words[2];
#pragma unroll
  for (int w = 0; w < 2; ++w) {
    const uint32_t lo = float2_to_fp8x2(f[4 * w], f[4 * w + 1], tag);
    const uint32_t hi = float2_to_fp8x2(f[4 * w + 2], f[4 * w + 3], tag);
    words[w] = lo | (hi << 16);
  }
  return make_uint2(words[0], words[1]);
}

// Sixteen fp8 values (one 16-byte vector) to floats, and back.
template <typename F>
__device__ __forceinline__ void fp8_to_float16(const uint4 &v, float (&f)[16], const F *tag) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float2 x = fp8x2_to_float2(static_cast<uint16_t>(words[i / 2] >> (16 * (i % 2))), tag);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}
template <typename F>
__device__ __forceinline__ uint4 float16_to_fp8(const float (&f)[16], const F *tag) {
  uint32_t words[4];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const uint32_t lo = float2_to_fp8x2(f[4 * w], f[4 * w + 1], tag);
    const uint32_t hi = float2_to_fp8x2(f[4 * w + 2], f[4 * w + 3], tag);
    words[w] = lo | (hi << 16);
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// Eight fp8 values widened to eight values of the kernels' 16-bit types, one 16-byte vector
// (exact: fp8 -> f16 is one conversion, fp8 -> bf16 goes through f32).
template <typename F>
__device__ __forceinline__ uint4 widen8(const uint2 &v, const F *, const __half *) {
  const uint32_t in[2] = {v.x, v.y};
  uint32_t out[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __half2_raw h =
        __nv_cvt_fp8x2_to_halfraw2(static_cast<uint16_t>(in[i / 2] >> (16 * (i % 2))), Fp8Format<F>::kind);
    out[i] = static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}
template <typename F>
__device__ __forceinline__ uint4 widen8(const uint2 &v, const F *tag, const __nv_bfloat16 *) {
  float f[8];
  fp8_to_float8(v, f, tag);
  uint4 out;
  __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&out);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return out;
}

// Eight values stored under `scale`: sat_finite(x / scale) each.
template <typename F>
__device__ __forceinline__ uint2 quantize8(const float (&x)[8], float scale, const F *tag) {
  float q[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) q[i] = __fdiv_rn(x[i], scale);
  return float8_to_fp8(q, tag);
}

// Eight stored values read under `scale`: stored * scale each.
template <typename F>
__device__ __forceinline__ void dequantize8(const uint2 &v, float scale, float (&x)[8], const F *tag) {
  fp8_to_float8(v, x, tag);
#pragma unroll
  for (int i = 0; i < 8; ++i) x[i] *= scale;
}

}  // namespace pgqa
