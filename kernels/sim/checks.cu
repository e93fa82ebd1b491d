// checks.cu: tiny kernels, each with a planted mistake (variant 1) or without it (variant 0),
// that prove the emulator's strict semantics; tests/sim_checks.rs runs them through
// pgqa_sim_check and asserts what the emulator reports. Compiled only into the emulator.

#include <string>

#include "common.cuh"
#include "fp8.cuh"
#include "mma.cuh"

extern "C" void *pgqa_sim_device_new(void);
extern "C" void pgqa_sim_device_free(void *device);
extern "C" void *pgqa_sim_malloc(void *device, size_t bytes);
extern "C" const char *pgqa_sim_last_report(void *device);
extern "C" void pgqa_sim_set_tracing(void *device, int flags);
extern "C" void pgqa_sim_mark_written(void *device, const void *ptr, size_t len);
extern "C" char *pgqa_sim_take_profile(void *device);

namespace {

constexpr int kThreads = 128;

// Reads the dynamic shared memory it never wrote (variant 1) or after writing it (variant 0).
__global__ void __launch_bounds__(kThreads) poisoned_shared(float *out, int variant) {
  PGQA_DYNAMIC_SHARED(smem);
  float *s = reinterpret_cast<float *>(smem);
  if (variant == 0) s[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// Two groups of cp.async (16 bytes per thread each), then every thread reads 8 floats copied by
// others; variant 1 reads before the wait_group, variant 2 waits with a count one too high (the
// second group is still in flight), variant 3 never waits.
__global__ void __launch_bounds__(kThreads) async_copy(const float *in, float *out, int variant) {
  PGQA_DYNAMIC_SHARED(smem);
  float *s = reinterpret_cast<float *>(smem);
  const int t = threadIdx.x;
  pgqa::copy16_async(s + 4 * t, in + 4 * t);
  pgqa::copy_async_commit();
  pgqa::copy16_async(s + 4 * (kThreads + t), in + 4 * (kThreads + t));
  pgqa::copy_async_commit();
  if (variant == 0) pgqa::copy_async_wait<0>();
  if (variant == 2) pgqa::copy_async_wait<1>();
  if (variant != 3) {
    __syncthreads();
    for (int i = 0; i < 8; ++i) out[8 * t + i] = s[(8 * t + i + 4) % (8 * kThreads)];
    pgqa::copy_async_wait<0>();
  }
}

// cp.async from a misaligned source (variant 1) or across the end of the source (variant 2:
// the last thread copies the 16 bytes holding element n - 1, n not a multiple of 4).
__global__ void __launch_bounds__(kThreads) async_copy_bounds(const float *in, float *out, int n, int variant) {
  PGQA_DYNAMIC_SHARED(smem);
  float *s = reinterpret_cast<float *>(smem);
  const int t = threadIdx.x;
  const float *src = variant == 2 && t == kThreads - 1 ? in + 4 * ((n + 3) / 4 - 1) : in + 4 * t + (variant == 1 ? 1 : 0);
  pgqa::copy16_async(s + 4 * t, src);
  pgqa::copy_async_commit();
  pgqa::copy_async_wait<0>();
  __syncthreads();
  out[t] = s[4 * t];
}

// Half the block takes another barrier (variant 1), or exits early (variant 0: allowed).
__global__ void __launch_bounds__(kThreads) barrier_divergence(float *out, int variant) {
  const int t = threadIdx.x;
  if (t >= 64) {
    if (variant == 0) return;
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[t] = 1.0f;
}

// A full-mask shuffle in a branch half the warp skips (variant 1), or by the whole warp.
__global__ void __launch_bounds__(kThreads) shuffle_divergence(float *out, int variant) {
  const int t = threadIdx.x;
  float x = static_cast<float>(t);
  if (variant == 0 || t % 32 < 16) x = __shfl_xor_sync(0xffffffffu, x, 1);
  out[t] = x;
}

// ldmatrix with one lane missing (variant 1: lane 5 returns first).
__global__ void __launch_bounds__(32) ldmatrix_divergence(float *out, int variant) {
  PGQA_DYNAMIC_SHARED(smem);
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) reinterpret_cast<uint32_t *>(smem)[i] = i;
  __syncwarp();
  if (variant == 1 && lane == 5) return;
  uint32_t r[4];
  pgqa::ldmatrix_x4(r, smem + 16 * lane);
  out[lane] = static_cast<float>(r[0] & 0xffff);
}

// Thread t writes s[t] and reads s[t + 1]: without the barrier (variant 1) that is a race.
__global__ void __launch_bounds__(kThreads) shared_race(float *out, int variant) {
  PGQA_DYNAMIC_SHARED(smem);
  float *s = reinterpret_cast<float *>(smem);
  const int t = threadIdx.x;
  s[t] = static_cast<float>(t);
  if (variant == 0) __syncthreads();
  out[t] = s[(t + 1) % kThreads];
}

// Reads one element past the end of `in` (variant 1), writes one past `out` (variant 2), writes
// past the dynamic shared memory (variant 3), writes just before it (variant 4).
__global__ void __launch_bounds__(kThreads) out_of_bounds(const float *in, float *out, int n, int variant) {
  PGQA_DYNAMIC_SHARED(smem);
  float *s = reinterpret_cast<float *>(smem);
  const int t = blockIdx.x * kThreads + threadIdx.x;
  const int last = n - 1;
  float x = in[t < n ? t : last];
  if (variant == 1 && t == last) x = in[t + 1024];
  if (variant == 3 && threadIdx.x == 7) s[kThreads + 4096] = x;
  if (variant == 4 && threadIdx.x == 9) s[-1] = x;
  out[t < n ? t : last] = x;
  if (variant == 2 && t == last) out[t + 1024] = x;
}

// Plain kernels for the launch checks.
__global__ void __launch_bounds__(1024) plain(float *out) { out[threadIdx.x % 16] = 1.0f; }
__global__ void __launch_bounds__(kThreads, 1) bounded(float *out) { out[threadIdx.x % 16] = 1.0f; }

// One m16n8k16 product: A [16][16] and B [16][8] (k x n) from `in` (16-bit values), through
// shared memory and ldmatrix (A direct, B transposed), D [16][8] f32 to `out`.
template <typename T>
__global__ void __launch_bounds__(32) mma_tile(const uint16_t *in, float *out) {
  PGQA_DYNAMIC_SHARED(smem);
  uint16_t *a_s = reinterpret_cast<uint16_t *>(smem);  // [16][16]
  uint16_t *b_s = a_s + 256;                            // [16][8]
  const int lane = threadIdx.x;
  for (int i = lane; i < 256 + 128; i += 32) a_s[i] = in[i];
  __syncwarp();
  uint32_t a[4], b[4];
  pgqa::ldmatrix_x4(a, a_s + (lane & 15) * 16 + (lane >> 4) * 8);
  // B rows (k) 0-7 and 8-15 as the two matrices of b0 and b1 (x4 reads them twice).
  pgqa::ldmatrix_x4_trans(b, b_s + (lane & 15) * 8);
  float c[4] = {0.25f, -0.5f, 1.0f, 2.0f};
  const T *tag = nullptr;
  pgqa::mma_16816(c, a, b[0], b[1], tag);
  const int g = lane / 4, t = lane % 4;
  out[g * 8 + 2 * t] = c[0];
  out[g * 8 + 2 * t + 1] = c[1];
  out[(g + 8) * 8 + 2 * t] = c[2];
  out[(g + 8) * 8 + 2 * t + 1] = c[3];
}

// Every shuffle mode of lane values 100 + lane: out [4][32].
__global__ void __launch_bounds__(32) shuffles(float *out) {
  const int lane = threadIdx.x;
  const float x = 100.0f + lane;
  out[lane] = __shfl_xor_sync(0xffffffffu, x, 5);
  out[32 + lane] = __shfl_up_sync(0xffffffffu, x, 3);
  out[64 + lane] = __shfl_down_sync(0xffffffffu, x, 3, 16);
  out[96 + lane] = __shfl_sync(0xffffffffu, x, 31 - lane);
}

__global__ void __launch_bounds__(kThreads) trapping(float *out) {
  if (threadIdx.x == 3) __trap();
  out[threadIdx.x] = 1.0f;
}

// Every fp8 pattern through each conversion of fp8.cuh from fp8, one warp, lane l holding
// patterns 8l .. 8l + 7. in: the f32 scale, 12 bytes of padding, then the 256 patterns in order.
// out: [256] f32 each of fp8_to_float8, fp8_to_float16 (lanes 0-15), fp8_to_float and
// dequantize8 (under the scale), then [256] f16 and [256] bf16 bits of widen8.
template <typename F>
__global__ void __launch_bounds__(32) fp8_decode(const unsigned char *in, unsigned char *out) {
  const F *tag = nullptr;
  const int lane = threadIdx.x;
  const float scale = reinterpret_cast<const float *>(in)[0];
  const unsigned char *patterns = in + 16;
  const uint2 v = reinterpret_cast<const uint2 *>(patterns)[lane];
  float *f = reinterpret_cast<float *>(out);
  float x[8];
  pgqa::fp8_to_float8(v, x, tag);
  for (int i = 0; i < 8; ++i) f[8 * lane + i] = x[i];
  if (lane < 16) {
    float y[16];
    pgqa::fp8_to_float16(reinterpret_cast<const uint4 *>(patterns)[lane], y, tag);
    for (int i = 0; i < 16; ++i) f[256 + 16 * lane + i] = y[i];
  }
  for (int i = 0; i < 8; ++i) f[512 + 8 * lane + i] = pgqa::fp8_to_float(patterns[8 * lane + i], tag);
  pgqa::dequantize8(v, scale, x, tag);
  for (int i = 0; i < 8; ++i) f[768 + 8 * lane + i] = x[i];
  uint4 *wide = reinterpret_cast<uint4 *>(out + 4096);
  wide[lane] = pgqa::widen8(v, tag, static_cast<const __half *>(nullptr));
  wide[32 + lane] = pgqa::widen8(v, tag, static_cast<const __nv_bfloat16 *>(nullptr));
}

// n f32 values (n a multiple of 16) through each conversion of fp8.cuh to fp8, thread t holding
// values 16t .. 16t + 15. in: the f32 scale, 12 bytes of padding, then the values. out: [n] bytes
// each of float16_to_fp8, float8_to_fp8, float2_to_fp8x2, float_to_fp8_satfinite and quantize8
// (under the scale).
template <typename F>
__global__ void __launch_bounds__(kThreads) fp8_encode(const unsigned char *in, unsigned char *out, int n) {
  const F *tag = nullptr;
  const int t = blockIdx.x * kThreads + threadIdx.x;
  if (16 * t >= n) return;
  const float scale = reinterpret_cast<const float *>(in)[0];
  const float *values = reinterpret_cast<const float *>(in + 16) + 16 * t;
  float x[16], lo[8], hi[8];
  for (int i = 0; i < 16; ++i) x[i] = values[i];
  for (int i = 0; i < 8; ++i) {
    lo[i] = x[i];
    hi[i] = x[8 + i];
  }
  reinterpret_cast<uint4 *>(out)[t] = pgqa::float16_to_fp8(x, tag);
  reinterpret_cast<uint2 *>(out + n)[2 * t] = pgqa::float8_to_fp8(lo, tag);
  reinterpret_cast<uint2 *>(out + n)[2 * t + 1] = pgqa::float8_to_fp8(hi, tag);
  for (int i = 0; i < 16; i += 2) {
    const uint16_t pair = pgqa::float2_to_fp8x2(x[i], x[i + 1], tag);
    out[2 * n + 16 * t + i] = static_cast<unsigned char>(pair & 0xff);
    out[2 * n + 16 * t + i + 1] = static_cast<unsigned char>(pair >> 8);
  }
  for (int i = 0; i < 16; ++i) out[3 * n + 16 * t + i] = pgqa::float_to_fp8_satfinite(x[i], tag);
  reinterpret_cast<uint2 *>(out + 4 * n)[2 * t] = pgqa::quantize8(lo, scale, tag);
  reinterpret_cast<uint2 *>(out + 4 * n)[2 * t + 1] = pgqa::quantize8(hi, scale, tag);
}

// ---------------------------------------------------------------------------------------------
// The profiler's planted cases (run on the traced copy; tests/sim_profile.rs holds the counts
// worked out by hand). One warp unless said.

// One shared-memory load per lane after a conflict-free fill: variant 0: a float4 at 16 x lane
// (128-bit, quarter-warp phases: 4 wavefronts, ideal 4); 1: a float at word 2 x lane (lanes l
// and l + 16 share a bank: 2-way, 2 wavefronts, ideal 1); 2: a float at word 32 x lane (every
// lane in bank 0: 32-way, 32 wavefronts); 3: word 0 for every lane (a broadcast: 1 wavefront);
// 4: a float2 at 8 x lane (half-warp phases: 2 wavefronts, ideal 2); 5: lanes 0-7 only, a float
// at word lane (lane utilisation 8/32, 1 wavefront, ideal 1).
__global__ void __launch_bounds__(32) profile_shared(float *out, int variant) {
  PGQA_DYNAMIC_SHARED(smem);
  float *s = reinterpret_cast<float *>(smem);
  const int lane = threadIdx.x;
  for (int i = lane; i < 1024; i += 32) s[i] = static_cast<float>(i);
  __syncwarp();
  float x = 0.0f;
  if (variant == 0) {
    const float4 v = pgqa::load_vec<float4>(s + 4 * lane);
    x = v.x + v.y + v.z + v.w;
  } else if (variant == 1) {
    x = s[2 * lane];
  } else if (variant == 2) {
    x = s[32 * lane];
  } else if (variant == 3) {
    x = s[0];
  } else if (variant == 4) {
    const float2 v = pgqa::load_vec<float2>(s + 2 * lane);
    x = v.x + v.y;
  } else if (variant == 5 && lane < 8) {
    x = s[lane];
  }
  out[lane] = x;
}

// One global load per lane: variant 0: a float at lane (coalesced: 4 sectors, ideal 4); 1: a
// float at 32 x lane (128 bytes apart: 32 sectors, ideal 4); 2: a float4 at 4 x lane (16
// sectors, ideal 16). The store to out[lane] is coalesced (4 sectors).
__global__ void __launch_bounds__(32) profile_global(const float *in, float *out, int variant) {
  const int lane = threadIdx.x;
  float x;
  if (variant == 0) {
    x = in[lane];
  } else if (variant == 1) {
    x = in[32 * lane];
  } else {
    const float4 v = pgqa::load_vec<float4>(in + 4 * lane);
    x = v.x + v.y + v.z + v.w;
  }
  out[lane] = x;
}

// 128 threads (4 warps): before the barrier only warps 0 and 1 work (warp utilisation 0.5),
// after it every warp does (1.0).
__global__ void __launch_bounds__(kThreads) profile_idle_half(float *out) {
  PGQA_DYNAMIC_SHARED(smem);
  float *s = reinterpret_cast<float *>(smem);
  const int t = threadIdx.x;
  if (t < 64) s[t] = static_cast<float>(t);
  __syncthreads();
  out[t] = s[t % 64];
}

// cp.async in flight: each of 32 lanes issues two 16-byte copies in one group, then a third in a
// second group, waits for all (the block's most in flight: 3 x 32 x 16 = 1536 bytes).
__global__ void __launch_bounds__(32) profile_inflight(const float *in, float *out) {
  PGQA_DYNAMIC_SHARED(smem);
  float *s = reinterpret_cast<float *>(smem);
  const int lane = threadIdx.x;
  pgqa::copy16_async(s + 4 * lane, in + 4 * lane);
  pgqa::copy16_async(s + 128 + 4 * lane, in + 128 + 4 * lane);
  pgqa::copy_async_commit();
  pgqa::copy16_async(s + 256 + 4 * lane, in + 256 + 4 * lane);
  pgqa::copy_async_commit();
  pgqa::copy_async_wait<0>();
  __syncwarp();
  out[lane] = s[lane];
}

// ---------------------------------------------------------------------------------------------
// The sanitizers' planted cases: variant 1 has the bug, variant 0 not. None of them changes the
// output, so the two-schedule comparison passes them all.

// Every thread writes the same value to s[0] with no barrier between (variant 0: thread 0
// alone): a write-after-write hazard whose value is the same either way.
__global__ void __launch_bounds__(kThreads) race_same_value(float *out, int variant) {
  PGQA_DYNAMIC_SHARED(smem);
  float *s = reinterpret_cast<float *>(smem);
  const int t = threadIdx.x;
  if (variant == 1 || t == 0) s[0] = 1.0f;
  __syncthreads();
  out[t] = s[0];
}

// Lanes swap values through shared memory; variant 0 with __syncwarp between the write and the
// read, variant 1 without (lanes are not in lockstep since Volta). The read is volatile and its
// value discarded unless the exchange was synchronised, so the output is the same either way.
__global__ void __launch_bounds__(32) warp_exchange(float *out, int variant) {
  PGQA_DYNAMIC_SHARED(smem);
  float *s = reinterpret_cast<float *>(smem);
  const int lane = threadIdx.x;
  s[lane] = static_cast<float>(lane);
  if (variant == 0) __syncwarp();
  const float x = *static_cast<volatile float *>(s + (lane ^ 1));
  out[lane] = variant == 0 ? x : static_cast<float>(lane ^ 1);
}

// Warp 1 reads s[0] in the phase warp 0 writes it (variant 1) and discards what it read (a
// stale read, masked); variant 0 reads after the barrier.
__global__ void __launch_bounds__(kThreads) stale_read_masked(float *out, int variant) {
  PGQA_DYNAMIC_SHARED(smem);
  float *s = reinterpret_cast<float *>(smem);
  const int t = threadIdx.x;
  if (t == 0) s[0] = 2.0f;
  if (variant == 1 && t == 32) {
    const float stale = *static_cast<volatile float *>(s);
    (void)stale;
  }
  __syncthreads();
  out[t] = s[0];
}

// Two blocks: block 0 writes out[0]; block 1 reads it (variant 1; a hazard between blocks) or
// reads in[0] (variant 0). Block 1 discards what it read.
__global__ void __launch_bounds__(32) global_race(const float *in, float *out, int variant) {
  const int lane = threadIdx.x;
  if (blockIdx.x == 0) {
    if (lane == 0) out[0] = 1.0f;
  } else if (lane == 0) {
    const float x = *static_cast<const volatile float *>(variant == 1 ? out : in);
    (void)x;
    out[1] = 2.0f;
  }
}

// Reads device memory nothing wrote (variant 1: out[lane + 32], allocated, never written; variant
// 0: in[lane]) and shared memory no thread wrote (variant 1) or one it wrote (variant 0). The
// values read are discarded.
__global__ void __launch_bounds__(32) uninitialised(const float *in, float *out, int variant) {
  PGQA_DYNAMIC_SHARED(smem);
  float *s = reinterpret_cast<float *>(smem);
  const int lane = threadIdx.x;
  if (variant == 0) s[lane] = 0.0f;
  __syncwarp();
  const float g = *static_cast<const volatile float *>(variant == 1 ? out + 32 + lane : in + lane);
  const float x = *static_cast<volatile float *>(s + lane);
  (void)g;
  (void)x;
  out[lane] = 1.0f;
}

void *upload(void *device, const void *data, size_t bytes, size_t capacity) {
  void *p = pgqa_sim_malloc(device, capacity);
  if (bytes > 0) memcpy(p, data, bytes);
  pgqa_sim_mark_written(device, p, bytes);
  return p;
}

}  // namespace

// Runs check `name` (variant 0: correct, others: a planted mistake) with `input` copied to a
// device buffer; copies the device output (poisoned where unwritten) to `output`, the report
// to `report`. Returns the launch's cudaError value, or -1 for an unknown name.
// The traced copy (PGQA_SIM_TRACED) is pgqa_trace_check: its device traces with `tracing` flags
// (see pgqa_sim_set_tracing) and hands back the profile text of the check's launches.
#if defined(PGQA_SIM_TRACED)
extern "C" int pgqa_trace_check(const char *name, int variant, const void *input, size_t input_bytes,
                                void *output, size_t output_bytes, char *report, size_t report_bytes,
                                int tracing, char **profile) {
  void *device = pgqa_sim_device_new();
  pgqa_sim_set_tracing(device, tracing);
#else
extern "C" int pgqa_sim_check(const char *name, int variant, const void *input, size_t input_bytes,
                              void *output, size_t output_bytes, char *report, size_t report_bytes) {
  void *device = pgqa_sim_device_new();
#endif
  void *in = upload(device, input, input_bytes, input_bytes > 0 ? input_bytes : 16);
  float *out = static_cast<float *>(upload(device, nullptr, 0, output_bytes));
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(device);
  const std::string n = name;
  const float *in_f = static_cast<const float *>(in);
  const int elems = static_cast<int>(input_bytes / 4);
  int status = -1;
  if (n == "poisoned_shared") {
    status = PGQA_LAUNCH(poisoned_shared, 1, kThreads, kThreads * 4, stream, out, variant);
  } else if (n == "async_copy") {
    status = PGQA_LAUNCH(async_copy, 1, kThreads, 8 * kThreads * 4, stream, in_f, out, variant);
  } else if (n == "async_copy_bounds") {
    status = PGQA_LAUNCH(async_copy_bounds, 1, kThreads, 4 * kThreads * 4, stream, in_f, out, elems, variant);
  } else if (n == "barrier_divergence") {
    status = PGQA_LAUNCH(barrier_divergence, 1, kThreads, 0, stream, out, variant);
  } else if (n == "shuffle_divergence") {
    status = PGQA_LAUNCH(shuffle_divergence, 1, kThreads, 0, stream, out, variant);
  } else if (n == "ldmatrix_divergence") {
    status = PGQA_LAUNCH(ldmatrix_divergence, 1, 32, 1024, stream, out, variant);
  } else if (n == "shared_race") {
    status = PGQA_LAUNCH(shared_race, 1, kThreads, kThreads * 4, stream, out, variant);
  } else if (n == "out_of_bounds") {
    status = PGQA_LAUNCH(out_of_bounds, (elems + kThreads - 1) / kThreads, kThreads, kThreads * 4, stream, in_f,
                         out, elems, variant);
  } else if (n == "launch_block_too_large") {
    status = PGQA_LAUNCH(plain, 1, variant ? 2048 : 1024, 0, stream, out);
  } else if (n == "launch_past_launch_bounds") {
    status = PGQA_LAUNCH(bounded, 1, variant ? 2 * kThreads : kThreads, 0, stream, out);
  } else if (n == "launch_grid_too_large") {
    status = PGQA_LAUNCH(plain, dim3(1, variant ? 70000 : 65535), 32, 0, stream, out);
  } else if (n == "launch_shared_without_attribute") {
    if (variant == 0) cudaFuncSetAttribute(plain, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    status = PGQA_LAUNCH(plain, 1, 32, 64 * 1024, stream, out);
    cudaFuncSetAttribute(plain, cudaFuncAttributeMaxDynamicSharedMemorySize, 48 * 1024);
  } else if (n == "launch_shared_above_device") {
    status = cudaFuncSetAttribute(plain, cudaFuncAttributeMaxDynamicSharedMemorySize, variant ? 240 * 1024 : 227 * 1024);
    cudaGetLastError();
    cudaFuncSetAttribute(plain, cudaFuncAttributeMaxDynamicSharedMemorySize, 48 * 1024);
  } else if (n == "mma_bf16") {
    status = PGQA_LAUNCH(mma_tile<__nv_bfloat16>, 1, 32, 1024, stream, static_cast<const uint16_t *>(in), out);
  } else if (n == "mma_f16") {
    status = PGQA_LAUNCH(mma_tile<__half>, 1, 32, 1024, stream, static_cast<const uint16_t *>(in), out);
  } else if (n == "shuffles") {
    status = PGQA_LAUNCH(shuffles, 1, 32, 0, stream, out);
  } else if (n == "fp8_e4m3_decode" || n == "fp8_e5m2_decode") {
    const unsigned char *bytes = static_cast<const unsigned char *>(in);
    unsigned char *out_bytes = reinterpret_cast<unsigned char *>(out);
    status = n == "fp8_e4m3_decode"
                 ? PGQA_LAUNCH(fp8_decode<pgqa::fp8_e4m3>, 1, 32, 0, stream, bytes, out_bytes)
                 : PGQA_LAUNCH(fp8_decode<pgqa::fp8_e5m2>, 1, 32, 0, stream, bytes, out_bytes);
  } else if (n == "fp8_e4m3_encode" || n == "fp8_e5m2_encode") {
    const unsigned char *bytes = static_cast<const unsigned char *>(in);
    unsigned char *out_bytes = reinterpret_cast<unsigned char *>(out);
    const int values = static_cast<int>((input_bytes - 16) / 4);
    const int blocks = (values / 16 + kThreads - 1) / kThreads;
    status = n == "fp8_e4m3_encode"
                 ? PGQA_LAUNCH(fp8_encode<pgqa::fp8_e4m3>, blocks, kThreads, 0, stream, bytes, out_bytes, values)
                 : PGQA_LAUNCH(fp8_encode<pgqa::fp8_e5m2>, blocks, kThreads, 0, stream, bytes, out_bytes, values);
  } else if (n == "profile_shared") {
    status = PGQA_LAUNCH(profile_shared, 1, 32, 4096, stream, out, variant);
  } else if (n == "profile_global") {
    status = PGQA_LAUNCH(profile_global, 1, 32, 0, stream, in_f, out, variant);
  } else if (n == "profile_idle_half") {
    status = PGQA_LAUNCH(profile_idle_half, 1, kThreads, 64 * 4, stream, out);
  } else if (n == "profile_inflight") {
    status = PGQA_LAUNCH(profile_inflight, 1, 32, 384 * 4, stream, in_f, out);
  } else if (n == "race_same_value") {
    status = PGQA_LAUNCH(race_same_value, 1, kThreads, 16, stream, out, variant);
  } else if (n == "warp_exchange") {
    status = PGQA_LAUNCH(warp_exchange, 1, 32, 32 * 4, stream, out, variant);
  } else if (n == "stale_read_masked") {
    status = PGQA_LAUNCH(stale_read_masked, 1, kThreads, 16, stream, out, variant);
  } else if (n == "global_race") {
    status = PGQA_LAUNCH(global_race, 2, 32, 0, stream, in_f, out, variant);
  } else if (n == "uninitialised") {
    status = PGQA_LAUNCH(uninitialised, 1, 32, 32 * 4, stream, in_f, out, variant);
  } else if (n == "trap") {
    status = PGQA_LAUNCH(trapping, 1, kThreads, 0, stream, out);
  }
  cudaGetLastError();
  memcpy(output, out, output_bytes);
  snprintf(report, report_bytes, "%s", pgqa_sim_last_report(device));
#if defined(PGQA_SIM_TRACED)
  *profile = pgqa_sim_take_profile(device);
#endif
  pgqa_sim_device_free(device);
  return status;
}

#if !defined(PGQA_SIM_TRACED)

// The emulator's 16-bit conversions, for tests/sim_checks.rs to compare with the `half` crate.
extern "C" float pgqa_sim_f16_to_f32(uint16_t bits) { return __half2float(__half{bits}); }
extern "C" uint16_t pgqa_sim_f32_to_f16(float x) { return __float2half_rn(x).x; }
extern "C" float pgqa_sim_bf16_to_f32(uint16_t bits) { return __bfloat162float(__nv_bfloat16{bits}); }
extern "C" uint16_t pgqa_sim_f32_to_bf16(float x) { return __float2bfloat16_rn(x).x; }
#endif
