// CUDA C++ pack/unpack kernels: element masks to little-endian bitmaps (warp ballots), and blockwise
// two-level absmax quantization of a compact float32 vector (8/4/2-bit codes, float16 group scales,
// one float32 tensor step), and its inverse. Launchers and their contracts: pack.h.
//
// The arithmetic follows python/fedsparse/quant.py step for step: IEEE float32 division (__fdiv_rn),
// products (__fmul_rn) and sums (__fadd_rn) that nvcc can neither contract into an FMA nor approximate,
// rintf (round half to even, as np.rint), floorf, and __float2half_rn for the scale; so the codes are
// bit-identical to the numpy reference and to csrc/quant.cpp. Build without --use_fast_math / -ftz.
//
// Work layout: a thread owns 8 consecutive elements (two float4 loads when aligned). A group has
// group_size >= 16 elements, so a thread never straddles two groups, and 8 b-bit codes are exactly b
// whole bytes, so every thread writes its own bytes of the bit stream: no atomics on codes, no
// read-modify-write, padding bits zero by construction.
//   quantize: kernel 1 reduces each group's absmax (warp shuffles over the group's lanes; across
//             warps with an atomicMax on the float bits, exact since absmax >= 0) and the tensor max
//             (block reduction, one atomic per block) into the workspace; kernel 2 derives tstep and
//             each group's float16 scale, rounds, packs and stores.
//   dequantize: one pass, vector loads and stores.
//   mask_to_bitmap: each lane loads 4 mask bytes (one 32-bit load), four ballots give the warp's 128
//             bits, and lanes 0-3 interleave them (bit spreading) into 4 little-endian words.
#include "pack.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

namespace fedsparse {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 256;      // threads per block, every kernel
constexpr int kVec = 8;            // elements per thread in quantize / dequantize
constexpr int kBlocksPerSm = 2048 / kThreads;
constexpr int64_t kHeaderBytes = 16;  // workspace: u32 tmax bits, u32 status, pad; then float amax[G]

__host__ __device__ inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Bits 0..7 of x to bits 0, 4, 8, ..., 28.
__device__ __forceinline__ uint32_t spread4(uint32_t x) {
  x = (x | (x << 12)) & 0x000f000fu;
  x = (x | (x << 6)) & 0x03030303u;
  x = (x | (x << 3)) & 0x11111111u;
  return x;
}

__device__ __forceinline__ bool is_aligned(const void* p, unsigned bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// Elements k0..k0+7 of x, zeros past n.
__device__ __forceinline__ void load8(const float* __restrict__ x, int64_t k0, int64_t n, bool aligned,
                                      float v[kVec]) {
  if (aligned && k0 + kVec <= n) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(x + k0));
    const float4 b = __ldg(reinterpret_cast<const float4*>(x + k0) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = k0 + i < n ? x[k0 + i] : 0.f;
  }
}

// Unaligned little-endian scalars (the value section puts tstep at byte 0 and scales at byte 4).
__device__ __forceinline__ float load_f32_bytes(const uint8_t* p) {
  return __uint_as_float(uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24);
}
__device__ __forceinline__ void store_f32_bytes(uint8_t* p, float f) {
  const uint32_t u = __float_as_uint(f);
  p[0] = uint8_t(u); p[1] = uint8_t(u >> 8); p[2] = uint8_t(u >> 16); p[3] = uint8_t(u >> 24);
}

// ---------------------------------------------------------------------------------------------------
// mask -> bitmap. A warp step covers 128 elements: lane l holds elements 4l..4l+3 as the bytes of v;
// ballot j has bit l set when element 4l+j is kept. Output word w (bytes 4w..4w+3 of the step's 16)
// holds elements 32w..32w+31, i.e. lanes 8w..8w+7: bit 4i+j of word w is bit 8w+i of ballot j.
__global__ void __launch_bounds__(kThreads)
    mask_to_bitmap_kernel(const uint8_t* __restrict__ mask, int64_t n, uint8_t* __restrict__ bitmap,
                          unsigned long long* __restrict__ count) {
  const int lane = threadIdx.x & 31;
  const int64_t steps = (n + 127) / 128, nbytes = (n + 7) / 8;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  const bool mask_aligned = is_aligned(mask, 4), bitmap_aligned = is_aligned(bitmap, 4);
  unsigned long long kept = 0;  // the same in every lane: ballots are warp-wide
  // The loop index depends on the warp only, so every lane takes part in every ballot.
  for (int64_t s = int64_t(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5); s < steps; s += warps) {
    const int64_t e0 = s * 128 + 4 * lane;
    uint32_t v;
    if (mask_aligned && e0 + 4 <= n) {
      v = __ldg(reinterpret_cast<const unsigned int*>(mask + e0));
    } else {
      v = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (e0 + j < n) v |= uint32_t(mask[e0 + j]) << (8 * j);
    }
    uint32_t word = 0;
    const int w = lane & 3;  // meaningful for lanes 0-3
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t b = __ballot_sync(kFullMask, ((v >> (8 * j)) & 0xffu) != 0u);
      kept += unsigned(__popc(b));
      word |= spread4((b >> (8 * w)) & 0xffu) << j;
    }
    if (lane < 4) {
      const int64_t o = s * 16 + 4 * lane;
      if (bitmap_aligned && o + 4 <= nbytes) {
        *reinterpret_cast<uint32_t*>(bitmap + o) = word;
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (o + j < nbytes) bitmap[o + j] = uint8_t(word >> (8 * j));
      }
    }
  }
  if (lane == 0 && kept) atomicAdd(count, kept);
}

// ---------------------------------------------------------------------------------------------------
// quantize, kernel 1: amax[g] = max |x| over group g and header[0] = bits of max |x| (non-finite
// values count as 0 and set header[1]). A group spans tpg = group_size / 8 threads: for tpg <= 32 one
// lane per group stores, otherwise each warp's share meets the others in an atomicMax on the float
// bits (amax zeroed by the launcher).
__global__ void __launch_bounds__(kThreads)
    absmax_kernel(const float* __restrict__ x, int64_t n, int log2_tpg, float* __restrict__ amax,
                  unsigned* __restrict__ header) {
  const int tpg = 1 << log2_tpg;
  const int width = tpg < 32 ? tpg : 32;
  const int64_t chunks = ((n + kVec - 1) / kVec + 31) / 32 * 32;  // a multiple of 32: warp-uniform loop
  const int64_t groups = (n + (int64_t(kVec) << log2_tpg) - 1) >> (log2_tpg + 3);
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  const bool aligned = is_aligned(x, 16);
  float tmax = 0.f;
  bool bad = false;
  for (int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x; c < chunks; c += stride) {
    float v[kVec];
    load8(x, c * kVec, n, aligned, v);
    float m = 0.f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float a = fabsf(v[i]);
      const bool finite = a <= FLT_MAX;  // false for NaN and Inf
      bad |= !finite;
      m = finite ? fmaxf(m, a) : m;
    }
    tmax = fmaxf(tmax, m);
    for (int off = width >> 1; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, off));
    const int64_t g = c >> log2_tpg;
    if ((threadIdx.x & (width - 1)) == 0 && g < groups) {
      if (tpg <= 32) amax[g] = m;
      else if (m > 0.f) atomicMax(reinterpret_cast<unsigned*>(amax) + g, __float_as_uint(m));
    }
  }
  __shared__ float warp_max[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(kFullMask, tmax, off));
  if (__any_sync(kFullMask, bad) && lane == 0) atomicOr(header + 1, 1u);
  if (lane == 0) warp_max[warp] = tmax;
  __syncthreads();
  if (warp == 0) {
    float t = lane < kThreads / 32 ? warp_max[lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1) t = fmaxf(t, __shfl_xor_sync(kFullMask, t, off));
    if (lane == 0 && t > 0.f) atomicMax(header, __float_as_uint(t));
  }
}

// quantize, kernel 2: tstep, scales and codes.
template <int BITS>
__global__ void __launch_bounds__(kThreads)
    encode_kernel(const float* __restrict__ x, int64_t n, int log2_gs, const float* __restrict__ amax,
                  const unsigned* __restrict__ header, bool stochastic, uint32_t key, bool nan_to_zero,
                  uint8_t* __restrict__ tstep_out, uint8_t* __restrict__ scales, uint8_t* __restrict__ codes) {
  constexpr int kOffset = 1 << (BITS - 1);
  constexpr float kQmax = float(kOffset - 1);
  const float tmax = __uint_as_float(header[0]);
  const float tstep = __fdiv_rn(tmax, kQmax);  // quant.py: float32(tmax) / float32(qmax)
  const int64_t chunks = (n + kVec - 1) / kVec, nbytes = (n * BITS + 7) / 8;
  const int64_t gmask = (int64_t(1) << log2_gs) - 1;
  const int64_t first = int64_t(blockIdx.x) * kThreads + threadIdx.x, stride = int64_t(gridDim.x) * kThreads;
  const bool x_aligned = is_aligned(x, 16), codes_aligned = is_aligned(codes, BITS);
  if (first == 0) store_f32_bytes(tstep_out, tstep);
  for (int64_t c = first; c < chunks; c += stride) {
    const int64_t k0 = c * kVec, g = k0 >> log2_gs;
    // s_g = float16(absmax_g / tmax), 0 when tmax == 0; e_g = float32(s_g) * tstep.
    unsigned short s16 = 0;
    if (tmax > 0.f) s16 = __half_as_ushort(__float2half_rn(__fdiv_rn(amax[g], tmax)));
    if ((k0 & gmask) == 0) {
      scales[2 * g] = uint8_t(s16);
      scales[2 * g + 1] = uint8_t(s16 >> 8);
    }
    const float step = __fmul_rn(__half2float(__ushort_as_half(s16)), tstep);
    float v[kVec];
    load8(x, k0, n, x_aligned, v);
    uint64_t packed = 0;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      float xi = v[i];
      if (nan_to_zero && !(fabsf(xi) <= FLT_MAX)) xi = 0.f;
      float y = step > 0.f ? __fdiv_rn(xi, step) : 0.f;
      if (stochastic) {
        // quant.uniform01: (lowbias32(lowbias32(seed) ^ uint32(k)) >> 8) * 2**-24, exact in float32
        const uint32_t h = lowbias32(key ^ uint32_t(k0 + i));
        y = floorf(__fadd_rn(y, __fmul_rn(__uint2float_rn(h >> 8), 0x1p-24f)));
      } else {
        y = rintf(y);
      }
      y = fminf(fmaxf(y, -kQmax), kQmax);
      const uint32_t code = k0 + i < n ? uint32_t(int(y) + kOffset) : 0u;  // padding bits zero
      packed |= uint64_t(code) << (BITS * i);
    }
    // The 8 codes are exactly BITS bytes at byte BITS * c of the stream.
    const int64_t o = c * BITS;
    if (codes_aligned && o + BITS <= nbytes) {
      if constexpr (BITS == 8) {
        *reinterpret_cast<uint2*>(codes + o) = make_uint2(uint32_t(packed), uint32_t(packed >> 32));
      } else if constexpr (BITS == 4) {
        *reinterpret_cast<uint32_t*>(codes + o) = uint32_t(packed);
      } else {
        *reinterpret_cast<uint16_t*>(codes + o) = uint16_t(packed);
      }
    } else {
#pragma unroll
      for (int j = 0; j < BITS; ++j)
        if (o + j < nbytes) codes[o + j] = uint8_t(packed >> (8 * j));
    }
  }
}

// dequantize: out[k] = float32(code_k - 2**(bits-1)) * (float32(s_g) * tstep).
template <int BITS>
__global__ void __launch_bounds__(kThreads)
    decode_kernel(const uint8_t* __restrict__ tstep_in, const uint8_t* __restrict__ scales,
                  const uint8_t* __restrict__ codes, int64_t n, int log2_gs, float* __restrict__ out) {
  constexpr int kOffset = 1 << (BITS - 1);
  constexpr uint32_t kCodeMask = (1u << BITS) - 1u;
  const float tstep = load_f32_bytes(tstep_in);
  const int64_t chunks = (n + kVec - 1) / kVec, nbytes = (n * BITS + 7) / 8;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  const bool codes_aligned = is_aligned(codes, BITS), out_aligned = is_aligned(out, 16);
  for (int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x; c < chunks; c += stride) {
    const int64_t k0 = c * kVec, o = c * BITS, g = k0 >> log2_gs;
    uint64_t packed = 0;
    if (codes_aligned && o + BITS <= nbytes) {
      if constexpr (BITS == 8) {
        const uint2 p = __ldg(reinterpret_cast<const uint2*>(codes + o));
        packed = uint64_t(p.x) | uint64_t(p.y) << 32;
      } else if constexpr (BITS == 4) {
        packed = __ldg(reinterpret_cast<const unsigned int*>(codes + o));
      } else {
        packed = __ldg(reinterpret_cast<const unsigned short*>(codes + o));
      }
    } else {
#pragma unroll
      for (int j = 0; j < BITS; ++j)
        if (o + j < nbytes) packed |= uint64_t(codes[o + j]) << (8 * j);
    }
    const unsigned short s16 = static_cast<unsigned short>(scales[2 * g] | scales[2 * g + 1] << 8);
    const float step = __fmul_rn(__half2float(__ushort_as_half(s16)), tstep);
    float v[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i)
      v[i] = __fmul_rn(float(int(uint32_t(packed >> (BITS * i)) & kCodeMask) - kOffset), step);
    if (out_aligned && k0 + kVec <= n) {
      reinterpret_cast<float4*>(out + k0)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(out + k0)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i)
        if (k0 + i < n) out[k0 + i] = v[i];
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side.

Status cuda_status(cudaError_t e, const char* what) {
  Status s;
  if (e != cudaSuccess) {
    s.cuda_error = int(e);
    s.what = what;
  }
  return s;
}

Status rejected(const char* what) {
  Status s;
  s.what = what;
  return s;
}

// Enough blocks to cover `threads` (grid-stride loops beyond 8 blocks of 256 per SM).
Status grid_for(int64_t threads, int* grid) {
  int dev = 0, sms = 0;
  Status st = cuda_status(cudaGetDevice(&dev), "cudaGetDevice");
  if (!st.ok()) return st;
  st = cuda_status(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev),
                   "cudaDeviceGetAttribute(multiProcessorCount)");
  if (!st.ok()) return st;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(sms > 0 ? sms : 1) * kBlocksPerSm;
  *grid = int(blocks < 1 ? 1 : (blocks < cap ? blocks : cap));
  return st;
}

int log2_exact(int64_t v) {  // v a power of two
  int r = 0;
  while ((int64_t(1) << r) < v) ++r;
  return r;
}

bool valid_group_size(int64_t gs) { return gs >= 16 && gs <= 65536 && (gs & (gs - 1)) == 0; }

template <int BITS>
void launch_encode(int grid, cudaStream_t st, const float* x, int64_t n, int log2_gs, const float* amax,
                   const unsigned* header, bool stochastic, uint32_t key, bool nan_to_zero, uint8_t* tstep,
                   uint8_t* scales, uint8_t* codes) {
  encode_kernel<BITS><<<grid, kThreads, 0, st>>>(x, n, log2_gs, amax, header, stochastic, key, nan_to_zero,
                                                 tstep, scales, codes);
}

template <int BITS>
void launch_decode(int grid, cudaStream_t st, const uint8_t* tstep, const uint8_t* scales, const uint8_t* codes,
                   int64_t n, int log2_gs, float* out) {
  decode_kernel<BITS><<<grid, kThreads, 0, st>>>(tstep, scales, codes, n, log2_gs, out);
}

}  // namespace

const char* error_name(int cuda_error) { return cudaGetErrorName(static_cast<cudaError_t>(cuda_error)); }

const char* error_string(int cuda_error) {
  return cudaGetErrorString(static_cast<cudaError_t>(cuda_error));
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it so the next launcher does not report it
    return 0;
  }
  return count;
}

int64_t num_groups(int64_t n, int64_t group_size) { return (n + group_size - 1) / group_size; }
int64_t code_bytes(int64_t n, int bits) { return (n * bits + 7) / 8; }
int64_t quantize_workspace_bytes(int64_t n, int64_t group_size) {
  return kHeaderBytes + 4 * num_groups(n, group_size);
}

static Status mask_to_bitmap_impl(const uint8_t* mask, int64_t n, uint8_t* bitmap, int64_t* count,
                                  cudaStream_t st) {
  if (n < 0) return rejected("n must be >= 0");
  if (!count || (n > 0 && (!mask || !bitmap))) return rejected("null pointer");
  if (reinterpret_cast<uintptr_t>(count) & 7) return rejected("count must be 8-byte aligned");
  Status s = cuda_status(cudaMemsetAsync(count, 0, sizeof(int64_t), st), "cudaMemsetAsync");
  if (!s.ok() || n == 0) return s;
  int grid = 0;
  s = grid_for((n + 127) / 128 * 32, &grid);
  if (!s.ok()) return s;
  mask_to_bitmap_kernel<<<grid, kThreads, 0, st>>>(mask, n, bitmap, reinterpret_cast<unsigned long long*>(count));
  return cuda_status(cudaGetLastError(), "kernel launch");
}

static Status quantize_impl(const float* x, int64_t n, int bits, int64_t group_size, bool stochastic,
                            uint32_t seed, bool nan_to_zero, uint8_t* tstep, uint8_t* scales, uint8_t* codes,
                            void* workspace, cudaStream_t st) {
  if (n < 0) return rejected("n must be >= 0");
  if (bits != 8 && bits != 4 && bits != 2) return rejected("bits must be 8, 4 or 2");
  if (!valid_group_size(group_size)) return rejected("group_size must be a power of two in [16, 65536]");
  if (!tstep || !workspace || (n > 0 && (!x || !scales || !codes))) return rejected("null pointer");
  if (reinterpret_cast<uintptr_t>(workspace) & 15) return rejected("workspace must be 16-byte aligned");
  unsigned* header = static_cast<unsigned*>(workspace);
  float* amax = reinterpret_cast<float*>(static_cast<uint8_t*>(workspace) + kHeaderBytes);
  const int log2_gs = log2_exact(group_size), log2_tpg = log2_gs - 3;
  // Zero the header (tmax, status), and amax too when warps combine it with atomics.
  const size_t zero = size_t((1 << log2_tpg) > 32 ? quantize_workspace_bytes(n, group_size) : kHeaderBytes);
  Status s = cuda_status(cudaMemsetAsync(workspace, 0, zero, st), "cudaMemsetAsync");
  if (!s.ok()) return s;
  if (n == 0) return cuda_status(cudaMemsetAsync(tstep, 0, 4, st), "cudaMemsetAsync");
  const int64_t chunks = (n + kVec - 1) / kVec;
  int grid = 0;
  s = grid_for((chunks + 31) / 32 * 32, &grid);
  if (!s.ok()) return s;
  absmax_kernel<<<grid, kThreads, 0, st>>>(x, n, log2_tpg, amax, header);
  s = cuda_status(cudaGetLastError(), "absmax kernel launch");
  if (!s.ok()) return s;
  const uint32_t key = lowbias32(seed);
  if (bits == 8)
    launch_encode<8>(grid, st, x, n, log2_gs, amax, header, stochastic, key, nan_to_zero, tstep, scales, codes);
  else if (bits == 4)
    launch_encode<4>(grid, st, x, n, log2_gs, amax, header, stochastic, key, nan_to_zero, tstep, scales, codes);
  else
    launch_encode<2>(grid, st, x, n, log2_gs, amax, header, stochastic, key, nan_to_zero, tstep, scales, codes);
  return cuda_status(cudaGetLastError(), "encode kernel launch");
}

static Status dequantize_impl(const uint8_t* tstep, const uint8_t* scales, const uint8_t* codes, int64_t n,
                              int bits, int64_t group_size, float* out, cudaStream_t st) {
  if (n < 0) return rejected("n must be >= 0");
  if (bits != 8 && bits != 4 && bits != 2) return rejected("bits must be 8, 4 or 2");
  if (!valid_group_size(group_size)) return rejected("group_size must be a power of two in [16, 65536]");
  if (n == 0) return Status();
  if (!tstep || !scales || !codes || !out) return rejected("null pointer");
  int grid = 0;
  Status s = grid_for((n + kVec - 1) / kVec, &grid);
  if (!s.ok()) return s;
  const int log2_gs = log2_exact(group_size);
  if (bits == 8) launch_decode<8>(grid, st, tstep, scales, codes, n, log2_gs, out);
  else if (bits == 4) launch_decode<4>(grid, st, tstep, scales, codes, n, log2_gs, out);
  else launch_decode<2>(grid, st, tstep, scales, codes, n, log2_gs, out);
  return cuda_status(cudaGetLastError(), "kernel launch");
}

Status mask_to_bitmap(const uint8_t* mask, int64_t n, uint8_t* bitmap, int64_t* count, void* stream) {
  Status s = mask_to_bitmap_impl(mask, n, bitmap, count, static_cast<cudaStream_t>(stream));
  s.op = "mask_to_bitmap";
  return s;
}

Status quantize(const float* x, int64_t n, int bits, int64_t group_size, bool stochastic, uint32_t seed,
                bool nan_to_zero, uint8_t* tstep, uint8_t* scales, uint8_t* codes, void* workspace,
                void* stream) {
  Status s = quantize_impl(x, n, bits, group_size, stochastic, seed, nan_to_zero, tstep, scales, codes, workspace,
                           static_cast<cudaStream_t>(stream));
  s.op = "quantize";
  return s;
}

Status dequantize(const uint8_t* tstep, const uint8_t* scales, const uint8_t* codes, int64_t n, int bits,
                  int64_t group_size, float* out, void* stream) {
  Status s = dequantize_impl(tstep, scales, codes, n, bits, group_size, out, static_cast<cudaStream_t>(stream));
  s.op = "dequantize";
  return s;
}

}  // namespace cuda
}  // namespace fedsparse
