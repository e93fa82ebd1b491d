// cuda_bf16.h for the kernel emulator: __nv_bfloat16, __nv_bfloat162 and their conversions,
// bit-exact with round-to-nearest-even (checked against the `half` crate for every pattern). A
// NaN converts to the canonical NaN 0x7fff, as CUDA's __float2bfloat16_rn does.
#pragma once

#include <stdint.h>
#include <string.h>

#include "cuda_runtime.h"

namespace pgqa_sim_cuda {

struct __nv_bfloat16 {
  uint16_t x;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.x) << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return {0x7fff};  // NaN
  const uint32_t rounded = bits + 0x7fffu + ((bits >> 16) & 1u);
  return {static_cast<uint16_t>(rounded >> 16)};
}

inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }

}  // namespace pgqa_sim_cuda
