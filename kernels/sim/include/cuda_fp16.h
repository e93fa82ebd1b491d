// cuda_fp16.h for the kernel emulator: __half, __half2 and the conversions the kernels use,
// bit-exact with round-to-nearest-even (tests/sim_checks.rs tries every 16-bit pattern against
// the `half` crate). A NaN converts to the canonical NaN 0x7fff, as CUDA's __float2half_rn does.
#pragma once

#include <stdint.h>
#include <string.h>

#include "cuda_runtime.h"

namespace pgqa_sim_cuda {

struct __half {
  uint16_t x;
};
struct __half2 {
  __half x, y;
};
// The raw bit containers (cuda_fp8.h's conversions return them), converting to __half and
// __half2 as CUDA's constructors from them do.
struct __half_raw {
  unsigned short x;
  operator __half() const { return {x}; }
};
struct __half2_raw {
  unsigned short x, y;
  operator __half2() const { return {{x}, {y}}; }
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.x & 0x8000u) << 16;
  const uint32_t exponent = (h.x >> 10) & 0x1fu;
  uint32_t mantissa = h.x & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf, NaN (payload kept)
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --e;
    }
    bits = sign | (static_cast<uint32_t>(e) << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return {0x7fff};                        // NaN
  if (abs >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (abs >= 0x38800000u) {  // normal half (|f| >= 2^-14)
    const uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
    return {static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
  }
  if (abs < 0x33000000u) return {sign};  // below half the smallest subnormal: +-0
  // Subnormal half: value = mantissa * 2^-24, rounded to nearest even.
  const uint32_t exponent = abs >> 23;
  const uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126 - exponent;  // 14 .. 24
  const uint32_t kept = mantissa >> shift;
  const uint32_t rest = mantissa & ((1u << shift) - 1);
  const uint32_t halfway = 1u << (shift - 1);
  const uint32_t result = kept + (rest > halfway || (rest == halfway && (kept & 1u)));
  return {static_cast<uint16_t>(sign | result)};
}

inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }

}  // namespace pgqa_sim_cuda
