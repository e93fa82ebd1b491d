// mma.cuh: warp-level tensor-core pieces (sm_80+): ldmatrix loads and the m16n8k16 MMA with
// f32 accumulation, for bf16 and f16.
//
// Fragment layouts of mma.sync.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"), with
// lane = 4 * g + t (g = lane / 4, t = lane % 4), each 32-bit register holding two elements, the
// lower-indexed one in the lower 16 bits:
//   A 16x16 (row-major), a[4]: a0 (row g,   cols 2t, 2t+1)     a1 (row g+8, cols 2t, 2t+1)
//                              a2 (row g,   cols 2t+8, 2t+9)   a3 (row g+8, cols 2t+8, 2t+9)
//   B 16x8 (k x n),      b[2]: b0 (k 2t, 2t+1, col g)          b1 (k 2t+8, 2t+9, col g)
//   C 16x8 f32,          c[4]: c0, c1 (row g, cols 2t, 2t+1)   c2, c3 (row g+8, cols 2t, 2t+1)
// The C layout of two adjacent 16x8 tiles (cols 0-7, 8-15) is the A layout of one 16x16 tile:
// attention reuses its score accumulators as the A operand of P V without a shuffle.
#pragma once

#include "common.cuh"

// 1 where the tensor-core code has a body: device code for sm_80+, and the kernel emulator.
#if defined(PGQA_SIM) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define PGQA_MMA_CODE 1
#else
#define PGQA_MMA_CODE 0
#endif

namespace pgqa {

__device__ inline unsigned shared_address(const void *ptr) {
  return static_cast<unsigned>(__cvta_generic_to_shared(ptr));
}

// Four 8x8 b16 matrices from shared memory. Lanes 8i .. 8i+7 give the addresses of the 8 rows
// (16 bytes each, 16-byte aligned) of matrix i; register i receives matrix i, lane holding row
// lane / 4, elements 2 (lane % 4) and 2 (lane % 4) + 1.
__device__ inline void ldmatrix_x4(uint32_t (&r)[4], const void *row) {
#if defined(PGQA_SIM)
  ::pgqa_sim::ldmatrix_x4(r, row, false, PGQA_SIM_SITE);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
#endif
}

// The same, each matrix transposed: lane holds column lane / 4, rows 2 (lane % 4) and
// 2 (lane % 4) + 1.
__device__ inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void *row) {
#if defined(PGQA_SIM)
  ::pgqa_sim::ldmatrix_x4(r, row, true, PGQA_SIM_SITE);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
#endif
}

// c += a * b (16x16 by 16x8, f32 accumulators).
__device__ inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                 const __nv_bfloat16 *) {
#if defined(PGQA_SIM)
  ::pgqa_sim::mma_m16n8k16(c, a, b0, b1, true, PGQA_SIM_SITE);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
__device__ inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                 const __half *) {
#if defined(PGQA_SIM)
  ::pgqa_sim::mma_m16n8k16(c, a, b0, b1, false, PGQA_SIM_SITE);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats as one register of two 16-bit elements, `lo` in the lower half.
__device__ inline uint32_t pack2(float lo, float hi, const __nv_bfloat16 *) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t *>(&v);
}
__device__ inline uint32_t pack2(float lo, float hi, const __half *) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t *>(&v);
}

}  // namespace pgqa
