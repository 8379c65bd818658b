// Server-side streaming aggregation: dequantize one client's payload and accumulate it, weighted, into
// float32 accumulators, scattering each tensor's kept elements (dense, head rows, head columns, element
// mask) to their places; plus per-unit weight sums (per head, per element, or per tensor) so the caller
// can normalise head-wise. python/fedsparse/server/aggregate.py drives it; the numpy reference is
// python/fedsparse/server/reference.py.
//
// Why per payload and fused: a payload (~0.5 MB for 1M parameters at 8 bits, half the heads) fits in L2,
// and the float32 accumulator (4 MB per 1M parameters) in L3, so decoding straight into `acc += w * x`
// reads each payload byte once from memory and never materialises a client's dense update (unpack + sum
// would write and re-read 4 MB per client). The work is split into blocks of output elements (disjoint, so
// no atomics) over all tensors of a batch of payloads in one parallel loop (parallel.h): many small LoRA
// tensors then still keep every thread busy.
//
// Everything the kernel is told (the plan: offsets, counts, shapes) is checked against the buffers before
// any byte is read or written, so a wrong plan raises ValueError and leaves acc and wsum untouched.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <cmath>
#include <vector>

#include "common.h"
#include "crc32.h"
#include "parallel.h"
#include "simd.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FS_AGG_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))  // AVX-512, AVX2
#else
#define FS_AGG_HOT
#endif

namespace py = pybind11;

namespace fedsparse {
namespace {

// Columns of one plan row (int64): what the payload says (kind .. data_nbytes, from the parser; mask_offset
// -1 means every head / element travelled) and where the tensor goes (acc_offset in floats, w_offset into
// weights, wsum_offset into wsum and counts or -1, wsum_mode: how wsum is indexed).
enum Col { cKind, cRows, cCols, cHeads, cMaskOff, cKept, cBits, cDataOff, cDataBytes, cAccOff, cWOff, cWsumOff,
           cWsumMode, kCols };
// wsum_mode: one slot for the tensor (dense entries), one per head (head entries), one per element (any).
enum WsumMode { kPerTensor = 0, kPerHead = 1, kPerElement = 2 };
constexpr int64_t kSerialBelow = 1 << 15;   // kept elements of a batch; below, threads cost more than they save
constexpr int64_t kThreadsAbove = 1 << 20;  // kept elements of one payload worth threads in sum_squares
constexpr int64_t kParallelPlanRows = 512;  // plan rows of a batch from which they are built on threads
constexpr int64_t kChunk = 2048;            // elements per work item (a multiple of every group size < 2048)
constexpr int64_t kPrefetch = 4096;         // bytes of codes fetched ahead of the multiply-add

struct Tensor {
  int kind = kDense, bits = 32;
  int64_t R = 0, C = 0, H = 0, n_kept = 0, seg_len = 1;
  const uint8_t* values = nullptr;
  float* acc = nullptr;
  const float* w = nullptr;  // one weight per head (head kinds) or one for the tensor
  float* wsum = nullptr;     // indexed by wsum_mode; nullptr: not tracked
  float* counts = nullptr;   // same layout as wsum: how many clients sent the unit
  int wsum_mode = kPerTensor;
  std::vector<int64_t> units;  // kept heads (head kinds) or kept element indices

  // The codes: past the tensor scale and the float16 group scales of the quantized widths (all of values else).
  const uint8_t* codes(int64_t gs) const { return values + (bits <= 8 ? 4 + 2 * ((n_kept + gs - 1) / gs) : 0); }

  // The kept elements form equal-length contiguous runs in the [R, C] view: a kept head's rows, a kept
  // head's columns within one row, single elements, or the whole tensor.
  int64_t segment_start(int64_t s, int64_t* unit) const {
    switch (kind) {
      case kHeadRows: *unit = units[size_t(s)]; return *unit * seg_len;
      case kHeadCols: {
        const int64_t kh = int64_t(units.size());
        *unit = units[size_t(s % kh)];
        return (s / kh) * C + *unit * seg_len;
      }
      case kElements: *unit = 0; return units[size_t(s)];
      default: *unit = 0; return 0;
    }
  }
  // How many kept (compact) elements land before flat output index e (0 <= e <= R*C). Heads own contiguous
  // row blocks (head rows) or column blocks within each row (head columns), so this is a count of kept
  // heads before e's head plus e's offset inside its own head if that one is kept.
  int64_t compact_pos(int64_t e) const {
    const int64_t numel = R * C, ku = int64_t(units.size());
    if (numel == 0 || e <= 0) return 0;
    if (e >= numel) return n_kept;
    const auto before = [&](int64_t h) { return int64_t(std::lower_bound(units.begin(), units.end(), h) - units.begin()); };
    switch (kind) {
      case kHeadRows: {
        const int64_t h = e / seg_len, b = before(h);
        return b * seg_len + (b < ku && units[size_t(b)] == h ? e - h * seg_len : 0);
      }
      case kHeadCols: {
        const int64_t row = e / C, col = e % C, h = col / seg_len, b = before(h);
        return row * ku * seg_len + b * seg_len + (b < ku && units[size_t(b)] == h ? col - h * seg_len : 0);
      }
      case kElements: return before(e);
      default: return e;
    }
  }
  template <class Fn>  // fn(dst offset, compact offset relative to k0, count, weight) per run of [k0, k0+cnt)
  void for_runs(int64_t k0, int64_t cnt, Fn fn) const {
    int64_t done = 0;
    while (done < cnt) {
      const int64_t k = k0 + done, s = k / seg_len, off = k % seg_len;
      const int64_t take = std::min(seg_len - off, cnt - done);
      int64_t unit;
      const int64_t start = segment_start(s, &unit);
      fn(start + off, done, take, w[unit]);
      done += take;
    }
  }
};

// The bytes of compact elements [ka, kb) of a tensor's values (past the tensor scale and group scales of the
// quantized widths): what the multiply-add of those elements reads, as offsets into its payload.
std::pair<int64_t, int64_t> code_bytes(const Tensor& t, const uint8_t* payload, int64_t gs, int64_t ka, int64_t kb) {
  const int64_t codes = t.codes(gs) - payload;
  return {codes + ka * t.bits / 8, codes + (kb * t.bits + 7) / 8};
}

struct Item {
  int32_t t;
  int64_t k0, cnt;
};

FS_AGG_HOT void axpy_f32(float* __restrict acc, const float* __restrict x, int64_t n, float f) {
  for (int64_t i = 0; i < n; ++i) acc[i] += x[i] * f;
}
FS_AGG_HOT double sumsq_u8(const uint8_t* __restrict c, int64_t n) {
  int64_t s = 0;
  for (int64_t i0 = 0; i0 < n; i0 += 65536) {  // exact in int32 per 65536 codes: 128**2 * 65536 = 2**30
    int32_t part = 0;  // int32 lanes: the loop vectorizes to multiply-add of 16-bit pairs
    for (int64_t i = i0; i < std::min(n, i0 + 65536); ++i) {
      const int16_t v = int16_t(int(c[i]) - 128);
      part += int32_t(v) * v;
    }
    s += part;
  }
  return double(s);
}
FS_AGG_HOT double sumsq_f32(const float* __restrict x, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += double(x[i]) * double(x[i]);
  return s;
}

// Decode compact elements [k0, k0+cnt) (cnt within one group for quantized widths) into buf.
void decode(const Tensor& t, int64_t k0, int64_t cnt, int64_t gs, float* buf) {
  if (t.bits == 32) {
    std::memcpy(buf, t.values + 4 * k0, 4 * size_t(cnt));  // little-endian host (checked in quant.cpp)
  } else if (t.bits == 16) {
    for (int64_t i = 0; i < cnt; ++i) buf[i] = f16_to_f32(load_u16le(t.values + 2 * (k0 + i)));
  } else {
    const int64_t g = k0 / gs;
    const float step = f16_to_f32(load_u16le(t.values + 4 + 2 * g)) * load_f32le(t.values);
    const uint8_t* codes = t.codes(gs);
    const int off = 1 << (t.bits - 1);
    if (t.bits == 8) {
      for (int64_t i = 0; i < cnt; ++i) buf[i] = float(int(codes[k0 + i]) - off) * step;
    } else if (t.bits == 4) {
      for (int64_t i = 0, k = k0; i < cnt; ++i, ++k) buf[i] = float(int(codes[k >> 1] >> ((k & 1) * 4) & 0xf) - off) * step;
    } else {
      for (int64_t i = 0, k = k0; i < cnt; ++i, ++k) buf[i] = float(int(codes[k >> 2] >> ((k & 3) * 2) & 0x3) - off) * step;
    }
  }
}

struct Plan {
  std::vector<Tensor> tensors;
  std::vector<Item> items;
  int64_t gs = 64, total_kept = 0;
};

struct In {
  const uint8_t* ptr;
  int64_t size;
};

In read_only(const py::buffer& b, const char* what) {
  py::buffer_info info = b.request();
  FS_CHECK(info.ndim <= 1 || info.strides.back() == info.itemsize, std::string(what) + " must be contiguous");
  return {static_cast<const uint8_t*>(info.ptr), int64_t(info.size * info.itemsize)};
}

// Where a payload's tensors go. Without targets (sum_squares) only the payload side is checked.
struct Targets {
  const float* w = nullptr;
  int64_t nw = 0;
  float* acc = nullptr;
  int64_t n_acc = 0;
  float* wsum = nullptr;
  float* counts = nullptr;
  int64_t n_wsum = 0;
  bool present = false;
};

// Validate the plan against every buffer, then build the tensors (and, with `items`, the work items of
// sum_squares). Throws before any write.
Plan build_plan(const In& payload, const py::buffer_info& pi, int64_t gs, const Targets& to, bool items = false) {
  FS_CHECK(pi.itemsize == 8 && (pi.format == "q" || pi.format == "l") && pi.ndim == 2 && pi.shape[1] == kCols &&
               pi.strides[1] == 8 && pi.strides[0] == 8 * kCols,
           "plan must be a C-contiguous int64 array [n_tensors, 13]");
  FS_CHECK(gs >= 16 && gs <= 65536 && (gs & (gs - 1)) == 0, "group_size must be a power of two in [16, 65536]");
  const int64_t* rows = static_cast<const int64_t*>(pi.ptr);
  static const float kOne = 1.f;
  const auto at = [](int64_t i) { return "plan row " + std::to_string(i) + ": "; };  // built only on failure
  Plan plan;
  plan.gs = gs;
  plan.tensors.resize(size_t(pi.shape[0]));
  // The masks are the first bytes of the payload read since the parser left it (a cache miss each, ~80 per
  // payload in a row otherwise): ask for all of them at once.
  for (int64_t i = 0; i < pi.shape[0]; ++i) {
    const int64_t m = rows[i * kCols + cMaskOff];
    if (m >= 0 && m < payload.size) __builtin_prefetch(payload.ptr + m);
  }
  for (int64_t i = 0; i < pi.shape[0]; ++i) {
    const int64_t* p = rows + i * kCols;
    Tensor& t = plan.tensors[size_t(i)];
    t.kind = int(p[cKind]);
    t.bits = int(p[cBits]);
    t.R = p[cRows];
    t.C = p[cCols];
    t.H = p[cHeads];
    t.n_kept = p[cKept];
    FS_CHECK(t.kind >= kDense && t.kind <= kElements, at(i) + "unknown sparsity kind");
    FS_CHECK(t.bits == 32 || t.bits == 16 || t.bits == 8 || t.bits == 4 || t.bits == 2, at(i) + "bad bit width");
    FS_CHECK(t.R >= 0 && t.C >= 0 && t.R < (int64_t(1) << 31) && t.C < (int64_t(1) << 31), at(i) + "bad shape");
    const int64_t numel = t.R * t.C;
    const bool heads = t.kind == kHeadRows || t.kind == kHeadCols;
    if (heads) {
      FS_CHECK(t.H >= 1 && (t.kind == kHeadRows ? t.R : t.C) % t.H == 0, at(i) + "n_heads must divide the head axis");
    }
    const int64_t nbits = heads ? t.H : (t.kind == kElements ? numel : 0);
    const bool all_kept = p[cMaskOff] == -1;
    FS_CHECK(all_kept || (p[cMaskOff] >= 0 && p[cMaskOff] <= payload.size - (nbits + 7) / 8),
             at(i) + "mask outside the payload");
    FS_CHECK(t.n_kept >= 0 && t.n_kept <= numel, at(i) + "bad kept count");
    FS_CHECK(p[cDataBytes] == values_nbytes(t.n_kept, t.bits, gs), at(i) + "value section size does not match");
    FS_CHECK(p[cDataOff] >= 0 && p[cDataOff] <= payload.size - p[cDataBytes], at(i) + "values outside the payload");
    if (to.present) {
      FS_CHECK(p[cAccOff] >= 0 && p[cAccOff] <= to.n_acc - numel, at(i) + "accumulator too small");
      const int64_t nw_t = heads ? t.H : 1;
      FS_CHECK(p[cWOff] >= 0 && p[cWOff] <= to.nw - nw_t, at(i) + "weights too short");
      t.wsum_mode = int(p[cWsumMode]);
      FS_CHECK(t.wsum_mode == kPerElement || (t.wsum_mode == kPerHead && heads) ||
                   (t.wsum_mode == kPerTensor && t.kind == kDense),
               at(i) + "wsum_mode does not fit the sparsity kind");
      const int64_t n_ws = t.wsum_mode == kPerHead ? t.H : (t.wsum_mode == kPerElement ? numel : 1);
      FS_CHECK(p[cWsumOff] == -1 || (p[cWsumOff] >= 0 && p[cWsumOff] <= to.n_wsum - n_ws), at(i) + "wsum too short");
      for (int64_t j = 0; j < nw_t; ++j)
        FS_CHECK(std::isfinite(to.w[p[cWOff] + j]), at(i) + "weights must be finite");
      t.acc = to.acc + p[cAccOff];
      t.w = to.w + p[cWOff];
      t.wsum = p[cWsumOff] >= 0 ? to.wsum + p[cWsumOff] : nullptr;
      t.counts = p[cWsumOff] >= 0 ? to.counts + p[cWsumOff] : nullptr;
    } else {
      t.w = &kOne;  // for_runs reads w[unit] only for head kinds; sum_squares ignores it
    }

    const uint8_t* mask = all_kept ? nullptr : payload.ptr + p[cMaskOff];
    int64_t n_set = all_kept ? nbits : 0;  // one allocation for the units, not one per doubling
    for (int64_t b = 0; !all_kept && b < (nbits + 7) / 8; ++b) n_set += __builtin_popcount(mask[b]);
    t.units.reserve(size_t(n_set));
    for (int64_t b = 0; b < nbits; ++b)
      if (all_kept || (mask[b >> 3] >> (b & 7) & 1)) t.units.push_back(b);
    const int64_t ku = int64_t(t.units.size());
    int64_t expect = numel;
    if (t.kind == kHeadRows) {
      t.seg_len = t.R / t.H * t.C;
      expect = ku * t.seg_len;
    } else if (t.kind == kHeadCols) {
      t.seg_len = t.C / t.H;
      expect = ku * t.R * t.seg_len;
    } else if (t.kind == kElements) {
      t.seg_len = 1;
      expect = ku;
    } else {
      t.seg_len = numel;
    }
    t.seg_len = std::max<int64_t>(t.seg_len, 1);
    FS_CHECK(expect == t.n_kept, at(i) + "kept-element count does not match the mask");
    t.values = payload.ptr + p[cDataOff];
    const int64_t chunk = t.bits <= 8 ? std::max<int64_t>(gs, kChunk) : kChunk;  // whole groups per item
    for (int64_t k0 = 0; items && k0 < t.n_kept; k0 += chunk)
      plan.items.push_back({int32_t(i), k0, std::min(chunk, t.n_kept - k0)});
    plan.total_kept += t.n_kept;
  }
  return plan;
}

// 8 bits, the common case: acc[i] += (code[i] - 128) * f over one piece (a quantization group cut at a head
// block's end), f = group scale * tensor scale * head weight. One ISA struct per instruction set: h2f
// converts a float16 group scale, fma does one piece; walk_u8 (below) is inlined into each ISA's run so the
// piece loop inlines too. code - 128 is exact; the SIMD ones then round once (fused multiply-add), the
// scalar one twice (no FMA assumed).
#define FS_ALWAYS_INLINE inline __attribute__((always_inline))
struct U8Scalar {
  static float h2f(uint16_t h) { return f16_to_f32(h); }
  FS_ALWAYS_INLINE static void fma(float* __restrict a, const uint8_t* __restrict c, int64_t n, float f) {
    for (int64_t i = 0; i < n; ++i) a[i] += float(int(c[i]) - 128) * f;
  }
};
#ifdef FS_X86
#define FS_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FS_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
// Codes widen straight from memory to int32 lanes (vpmovzxbd: one shuffle per 8 or 16 codes, against ~2.3
// for the byte -> word -> dword chain the compiler emits for the scalar loop).
struct U8Avx2 {
  FS_TARGET_AVX2 static float h2f(uint16_t h) { return _cvtsh_ss(h); }
  FS_TARGET_AVX2 static void fma(float* __restrict a, const uint8_t* __restrict c, int64_t n, float f) {
    const __m256 vf = _mm256_set1_ps(f), off = _mm256_set1_ps(128.f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + i)));
      const __m256 x = _mm256_sub_ps(_mm256_cvtepi32_ps(q), off);
      _mm256_storeu_ps(a + i, _mm256_fmadd_ps(x, vf, _mm256_loadu_ps(a + i)));
    }
    for (; i < n; ++i) a[i] = std::fma(float(c[i]) - 128.f, f, a[i]);
  }
};
struct U8Avx512 {
  FS_TARGET_AVX512 static float h2f(uint16_t h) { return _cvtsh_ss(h); }
  FS_TARGET_AVX512 static void fma(float* __restrict a, const uint8_t* __restrict c, int64_t n, float f) {
    const __m512 vf = _mm512_set1_ps(f), off = _mm512_set1_ps(128.f);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i)));
      const __m512 x = _mm512_sub_ps(_mm512_cvtepi32_ps(q), off);
      _mm512_storeu_ps(a + i, _mm512_fmadd_ps(x, vf, _mm512_loadu_ps(a + i)));
    }
    if (i < n) {  // the tail under a mask; its codes copied out first (no byte-masked load without AVX-512BW)
      alignas(16) uint8_t tail[16] = {};
      std::memcpy(tail, c + i, size_t(n - i));
      const __mmask16 m = __mmask16((1u << (n - i)) - 1);
      const __m512i q = _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(tail)));
      const __m512 x = _mm512_sub_ps(_mm512_cvtepi32_ps(q), off);
      _mm512_mask_storeu_ps(a + i, m, _mm512_fmadd_ps(x, vf, _mm512_maskz_loadu_ps(m, a + i)));
    }
  }
};
#endif

// walk_u8's usual case: every piece a whole group of 64 codes (runs of whole groups, starting on one).
inline bool whole_groups(const Tensor& t, int64_t k0, int64_t gs) {
  return gs == 64 && t.seg_len % 64 == 0 && k0 % 64 == 0;
}

struct NoFold {
  FS_ALWAYS_INLINE void block(const uint8_t*) {}
};

// One walk over an item's compact range [k0, k0 + cnt), cut where a run (head block) or a quantization group
// ends; each piece is one Isa::fma with a constant factor. In the whole_groups case, fold.block(codes) sees
// each whole group's 64 codes in order just before its multiply-add (the last group, if partial, it does not).
template <class Isa, class Fold = NoFold>
FS_ALWAYS_INLINE void walk_u8(const Tensor& t, int64_t k0, int64_t cnt, int64_t gs, float scale, Fold&& fold = Fold()) {
  const uint8_t* scales = t.values + 4;
  const uint8_t* codes = t.codes(gs);
  const float tstep = load_f32le(t.values) * scale;
  const int64_t end = k0 + cnt;
  int64_t k = k0, s = k0 / t.seg_len, off = k0 % t.seg_len, unit = 0;
  int64_t start = t.segment_start(s, &unit);
  float wu = tstep * t.w[unit];
  const int shift = __builtin_ctzll(uint64_t(gs));  // gs is a power of two: no division per piece
  const auto next_segment = [&] {
    off = 0;
    start = t.segment_start(++s, &unit);
    wu = tstep * t.w[unit];
  };
  if (whole_groups(t, k0, gs)) {  // only the last piece may be less than a group: segments are whole groups
    while (k < end) {
      const int64_t seg_end = std::min(k + t.seg_len - off, end);
      float* dst = t.acc + start + off;
      for (; k + 64 <= seg_end; k += 64, dst += 64) {
        __builtin_prefetch(codes + k + kPrefetch);
        fold.block(codes + k);
        Isa::fma(dst, codes + k, 64, Isa::h2f(load_u16le(scales + 2 * (k >> 6))) * wu);
      }
      if (k < seg_end) Isa::fma(dst, codes + k, seg_end - k, Isa::h2f(load_u16le(scales + 2 * (k >> 6))) * wu);
      k = seg_end;
      if (k < end) next_segment();
    }
    return;
  }
  while (k < end) {
    const int64_t g = k >> shift;
    const int64_t take = std::min(std::min(t.seg_len - off, ((g + 1) << shift) - k), end - k);
    __builtin_prefetch(codes + k + kPrefetch);
    Isa::fma(t.acc + start + off, codes + k, take, Isa::h2f(load_u16le(scales + 2 * g)) * wu);
    k += take;
    off += take;
    if (off == t.seg_len && k < end) next_segment();
  }
}

void run_u8_scalar(const Tensor& t, int64_t k0, int64_t cnt, int64_t gs, float scale) {
  walk_u8<U8Scalar>(t, k0, cnt, gs, scale);
}
#ifdef FS_X86
FS_TARGET_AVX2 void run_u8_avx2(const Tensor& t, int64_t k0, int64_t cnt, int64_t gs, float scale) {
  walk_u8<U8Avx2>(t, k0, cnt, gs, scale);
}
FS_TARGET_AVX512 void run_u8_avx512(const Tensor& t, int64_t k0, int64_t cnt, int64_t gs, float scale) {
  walk_u8<U8Avx512>(t, k0, cnt, gs, scale);
}
#endif

#if defined(FS_X86) && defined(FS_CRC_FOLD512)
#define FS_TARGET_AVX512_CRC __attribute__((target("avx512f,avx512vl,vpclmulqdq,avx2,fma,f16c")))
// The CRC-32 of the codes folded 64 bytes at a time as the multiply-add reads them (accumulate(check_crc)):
// each byte is then loaded once for both, and the fold hides under the multiply-add.
struct Fold512 {
  uint32_t crc;  // of the bytes before the first block
  __m512i z;
  bool started = false;
  FS_TARGET_AVX512_CRC explicit Fold512(uint32_t c) : crc(c), z(_mm512_setzero_si512()) {}
  FS_TARGET_AVX512_CRC void block(const uint8_t* p) {
    z = started ? crc32_fold_next(z, p) : crc32_fold_first(crc, p);
    started = true;
  }
  FS_TARGET_AVX512_CRC uint32_t finish() const {
    if (!started) return crc;
    alignas(64) uint8_t state[64];
    _mm512_store_si512(state, z);
    return crc32_fold_finish(state);
  }
};
// walk_u8 on AVX-512 in the whole_groups case: *crc (of the payload's bytes before codes + k0) is carried
// through the codes of the whole groups of [k0, k0 + cnt), codes + k0 + 64 * (cnt / 64).
FS_TARGET_AVX512_CRC void run_u8_avx512_crc(const Tensor& t, int64_t k0, int64_t cnt, float scale, uint32_t* crc) {
  Fold512 fold(*crc);
  walk_u8<U8Avx512>(t, k0, cnt, 64, scale, fold);
  *crc = fold.finish();
}
#endif

void run_u8(const Tensor& t, int64_t k0, int64_t cnt, int64_t gs, float scale, int level) {
#ifdef FS_X86
  if (level >= 2) return run_u8_avx512(t, k0, cnt, gs, scale);
  if (level == 1) return run_u8_avx2(t, k0, cnt, gs, scale);
#endif
  run_u8_scalar(t, k0, cnt, gs, scale);
}

// acc += scale * w * values for the compact elements [k0, k0 + cnt) of one tensor (any range). crc: carried
// through the codes as run_u8_avx512_crc does (8 bits, whole_groups, AVX-512 with VPCLMULQDQ only).
void run_range(const Tensor& t, int64_t k0, int64_t cnt, int64_t gs, float scale, std::vector<float>& buf,
               int level, uint32_t* crc = nullptr) {
  if (cnt <= 0) return;
  if (t.bits == 8) {
#if defined(FS_X86) && defined(FS_CRC_FOLD512)
    if (crc) {
      run_u8_avx512_crc(t, k0, cnt, scale, crc);
    } else
#endif
    run_u8(t, k0, cnt, gs, scale, level);
  } else {
    const int64_t piece = t.bits <= 8 ? gs : kChunk;  // decode one quantization group (or chunk) at a time
    if (buf.size() < size_t(piece)) buf.resize(size_t(piece));  // payloads of a batch may differ in group size
    for (int64_t k = k0; k < k0 + cnt;) {
      const int64_t n = std::min((k / piece + 1) * piece, k0 + cnt) - k;
      decode(t, k, n, gs, buf.data());
      t.for_runs(k, n, [&](int64_t dst, int64_t d, int64_t m, float w) {
        axpy_f32(t.acc + dst, buf.data() + d, m, w * scale);
      });
      k += n;
    }
  }
  if (t.wsum && t.wsum_mode == kPerElement) {
    t.for_runs(k0, cnt, [&](int64_t dst, int64_t, int64_t n, float w) {
      for (int64_t i = 0; i < n; ++i) {
        t.wsum[dst + i] += w;
        t.counts[dst + i] += 1.f;
      }
    });
  }
}

// Sum of squares of the dequantized values of one work item (float64, groups in order).
double item_sum_squares(const Plan& plan, const Item& it, std::vector<float>& buf) {
  const Tensor& t = plan.tensors[size_t(it.t)];
  const int64_t gsz = t.bits <= 8 ? plan.gs : kChunk;
  if (t.bits != 8 && buf.size() < size_t(gsz)) buf.resize(size_t(gsz));  // decode buffer: a group or a chunk
  double s = 0;
  for (int64_t g0 = it.k0; g0 < it.k0 + it.cnt; g0 += gsz) {
    const int64_t cnt = std::min(gsz, it.k0 + it.cnt - g0);
    if (t.bits == 8) {
      const int64_t g = g0 / gsz;
      const double step = double(f16_to_f32(load_u16le(t.values + 4 + 2 * g)) * load_f32le(t.values));
      s += sumsq_u8(t.codes(gsz) + g0, cnt) * step * step;
    } else {
      decode(t, g0, cnt, gsz, buf.data());
      s += sumsq_f32(buf.data(), cnt);
    }
  }
  return s;
}

// Norm clipping's factor (as server/stream.py's clip_factor): min(1, clip / ||x||), 1 for a zero update.
double clip_factor(double sumsq, double clip) {
  const double norm = std::sqrt(sumsq);
  return norm > 0 ? std::min(1.0, clip / norm) : 1.0;
}

// A batch of payloads into the same accumulators: acc += scale_b * w * dequantize(tensor) for every tensor of
// every payload b, and wsum += w, counts += 1 for the tensors / heads / elements that travelled.
//
// Order of work (why a batch): the output is cut into blocks of kBlock elements of one tensor, and each block
// takes its slice from every payload of the batch in turn, so the block (32 KB) stays in L1/L2 while
// B payloads stream through it. One payload at a time would sweep the whole float32 output (4 MB per 1M
// parameters, L3 or DRAM) once per client; measured on 100 x 1M-parameter 8-bit payloads: 6.0 vs 13.6
// G elements/s per core for the multiply-add loop alone. Each output element sees the payloads in batch
// order whatever the thread count, so results are deterministic.
constexpr int64_t kBlock = 8192;

struct Unit {
  int32_t group;
  int64_t e0, e1;
};

// accumulate(check_crc=True): every payload's CRC-32, computed by the accumulate pass itself, each byte read
// once (a separate CRC pass first reads all of a batch, 26 MB for 34 x 0.76 MB, and the multiply-add then reads it
// again from memory). Payload b's bytes [0, size - 4) are cut at bound[r] into one range per run r of units;
// run r continues its range's CRC up to the end of each code fragment just before its multiply-add reads the
// fragment (so the fragment is in L1 when the multiply-add comes), then up to the range's end. The ranges'
// CRCs are combined in order (crc32_combine) and compared with the payload's last 4 bytes. Any cut gives the
// right CRC; cuts at the runs' first fragments make the CRC's reads the multiply-add's reads.
struct CrcSplit {
  size_t n_runs = 0;
  std::vector<const uint8_t*> base;  // [B] payload bytes
  std::vector<int64_t> size;         // [B] payload sizes
  std::vector<int64_t> bound;        // [B][runs + 1]: run r takes bytes [bound[r], bound[r + 1])
  std::vector<uint32_t> part;        // [B][runs]: the CRC of each range

  // Payload b's cut points: bounds(b)[r] .. bounds(b)[r + 1] is run r's range.
  int64_t* bounds(size_t b) { return &bound[b * (n_runs + 1)]; }
  const int64_t* bounds(size_t b) const { return &bound[b * (n_runs + 1)]; }

  CrcSplit() = default;
  CrcSplit(const std::vector<py::buffer_info>& views, const std::vector<Plan>& batch,
           const std::vector<std::vector<std::pair<int32_t, int32_t>>>& groups, const std::vector<Unit>& units,
           int64_t run) {
    const size_t B = batch.size();
    const int64_t n_units = int64_t(units.size());
    n_runs = size_t((n_units + run - 1) / run);
    base.resize(B);
    size.resize(B);
    bound.assign(B * (n_runs + 1), 0);
    part.assign(B * n_runs, 0);
    std::vector<int32_t> tensor_of(groups.size() * B, -1);  // [group][payload]: its tensor there, or -1
    for (size_t g = 0; g < groups.size(); ++g)
      for (const auto& [b, i] : groups[g]) tensor_of[g * B + size_t(b)] = i;
    for (size_t b = 0; b < B; ++b) {
      base[b] = static_cast<const uint8_t*>(views[3 * b].ptr);
      size[b] = int64_t(views[3 * b].size * views[3 * b].itemsize);
      int64_t* bd = bounds(b);
      bd[n_runs] = size[b] - 4;
      for (int64_t r = int64_t(n_runs) - 1; r >= 1; --r) {  // the run's first fragment; none: the next run's cut
        bd[r] = bd[r + 1];
        for (int64_t u = r * run; u < std::min(n_units, (r + 1) * run); ++u) {
          const int32_t i = tensor_of[size_t(units[size_t(u)].group) * B + b];
          if (i < 0) continue;
          const Tensor& t = batch[b].tensors[size_t(i)];
          const int64_t ka = t.compact_pos(units[size_t(u)].e0), kb = t.compact_pos(units[size_t(u)].e1);
          if (kb > ka) {
            bd[r] = std::min(bd[r], code_bytes(t, base[b], batch[b].gs, ka, kb).first);
            break;
          }
        }
      }
    }
  }
  void start(int64_t r, std::vector<int64_t>& cursor) const {
    for (size_t b = 0; b < base.size(); ++b) cursor[b] = bounds(b)[r];
  }
  // Run r's CRC of payload b carried on to byte `to` (within its range).
  void to(int64_t r, size_t b, int64_t to, std::vector<int64_t>& cursor) {
    to = std::min(to, bounds(b)[r + 1]);
    if (to <= cursor[b]) return;
    uint32_t& c = part[b * n_runs + size_t(r)];  // only run r's thread writes it
    c = crc32_update(c, base[b] + cursor[b], to - cursor[b]);
    cursor[b] = to;
  }
  // Run r's CRC of payload b carried on to byte c0, for a multiply-add that folds the 8-bit codes [c0, c1) into
  // it itself (run_range's crc), or nullptr where it may not: the range must go on from the cursor through c1.
  uint32_t* fold_from(int64_t r, size_t b, int64_t c0, int64_t c1, std::vector<int64_t>& cursor) {
    if (c0 < cursor[b] || c1 > bounds(b)[r + 1]) return nullptr;
    to(r, b, c0, cursor);
    return &part[b * n_runs + size_t(r)];
  }
  void finish(int64_t r, std::vector<int64_t>& cursor) {
    for (size_t b = 0; b < base.size(); ++b) to(r, b, bounds(b)[r + 1], cursor);
  }
  // Combine each payload's ranges, compare; raise for the first mismatch in batch order.
  void check(int threads) const {
    const size_t B = base.size();
    std::vector<char> bad(B, 0);
    parallel_units(int64_t(B), B >= 8 ? threads : 1, [&](int64_t bi, int) {
      const size_t b = size_t(bi);
      uint32_t c = n_runs ? part[b * n_runs] : crc32(base[b], size[b] - 4);
      for (size_t r = 1; r < n_runs; ++r)
        c = crc32_combine(c, part[b * n_runs + r], bounds(b)[r + 1] - bounds(b)[r]);
      bad[b] = c != load_u32le(base[b] + size[b] - 4);
    });
    for (size_t b = 0; b < B; ++b)
      FS_CHECK(!bad[b], "payload " + std::to_string(b) + ": CRC mismatch: payload corrupted or truncated");
  }
};

// True when every payload's tensors go to the same accumulator ranges in the same order, ascending and disjoint.
bool same_targets(const std::vector<Plan>& batch) {
  if (batch.empty()) return false;
  const std::vector<Tensor>& first = batch[0].tensors;
  for (size_t i = 0; i < first.size(); ++i)
    if (i > 0 && first[i - 1].acc + first[i - 1].R * first[i - 1].C > first[i].acc) return false;
  for (const Plan& p : batch) {
    if (p.tensors.size() != first.size()) return false;
    for (size_t i = 0; i < first.size(); ++i)
      if (p.tensors[i].acc != first[i].acc || p.tensors[i].R * p.tensors[i].C != first[i].R * first[i].C) return false;
  }
  return true;
}

void accumulate(const py::sequence& payloads, const py::sequence& plans, const py::sequence& weights,
                const py::sequence& scales_seq, const py::sequence& group_sizes, const py::buffer& acc_b,
                const py::buffer& wsum_b, const py::buffer& counts_b, double clip_norm, int max_level,
                bool check_crc) {
  FS_CHECK(clip_norm == 0 || (std::isfinite(clip_norm) && clip_norm > 0), "clip_norm must be 0 (off) or > 0");
  const size_t B = py::len(payloads);
  FS_CHECK(py::len(plans) == B && py::len(weights) == B && py::len(scales_seq) == B && py::len(group_sizes) == B,
           "payloads, plans, weights, scales and group_sizes must have the same length");
  py::buffer_info ai = acc_b.request(true), si = wsum_b.request(true), ci = counts_b.request(true);
  FS_CHECK(ai.format == py::format_descriptor<float>::format() && ai.ndim == 1 && ai.strides[0] == 4 && !ai.readonly,
           "acc must be a writable contiguous float32 [n]");
  FS_CHECK(si.format == py::format_descriptor<float>::format() && si.ndim == 1 && (si.size == 0 || si.strides[0] == 4) &&
               !si.readonly,
           "wsum must be a writable contiguous float32 [n]");
  FS_CHECK(ci.format == si.format && ci.ndim == 1 && ci.size == si.size && (ci.size == 0 || ci.strides[0] == 4) &&
               !ci.readonly,
           "counts must be a writable contiguous float32 array of wsum's size");
  const auto disjoint = [](const void* a, int64_t na, const void* b, int64_t nb) {
    const char *pa = static_cast<const char*>(a), *pb = static_cast<const char*>(b);
    return na == 0 || nb == 0 || pa + na <= pb || pb + nb <= pa;
  };
  FS_CHECK(disjoint(ai.ptr, 4 * ai.size, si.ptr, 4 * si.size) && disjoint(ai.ptr, 4 * ai.size, ci.ptr, 4 * ci.size) &&
               disjoint(si.ptr, 4 * si.size, ci.ptr, 4 * ci.size),
           "acc, wsum and counts must not overlap");

  // With the GIL: pin every buffer (kept alive until return) and read the scalars. Without it: everything else,
  // so that the caller's other threads run Python meanwhile (the plans' checks are ~5% of a call).
  std::vector<py::buffer_info> views;
  std::vector<Plan> batch(B);
  std::vector<float> scale(B);
  std::vector<int64_t> gs(B);
  views.reserve(3 * B);
  const auto at = [](size_t b) { return "payload " + std::to_string(b) + ": "; };  // built only on failure
  for (size_t b = 0; b < B; ++b) {
    views.push_back(py::buffer(payloads[b]).request());
    views.push_back(py::buffer(weights[b]).request());
    views.push_back(py::buffer(plans[b]).request());
    scale[b] = py::cast<float>(scales_seq[b]);
    gs[b] = py::cast<int64_t>(group_sizes[b]);
  }
  py::gil_scoped_release nogil;
  // The plans are checked and built in parallel (~0.12 us a plan row, ~10 us a payload of 80 tensors) once there
  // are enough rows to pay for starting threads (~20 us each); a bad one raises for the first such payload in
  // batch order, whatever the thread that met it.
  int64_t plan_rows = 0;
  for (size_t b = 0; b < B; ++b) plan_rows += views[3 * b + 2].ndim == 2 ? int64_t(views[3 * b + 2].shape[0]) : 0;
  std::vector<std::exception_ptr> failed(B);
  parallel_units(int64_t(B), plan_rows >= kParallelPlanRows ? max_threads() : 1, [&](int64_t bi, int) {
    const size_t b = size_t(bi);
    try {
      const py::buffer_info &pv = views[3 * b], &wv = views[3 * b + 1];
      FS_CHECK(pv.ndim <= 1 && (pv.ndim == 0 || pv.strides[0] == pv.itemsize), "payload must be contiguous");
      const In payload{static_cast<const uint8_t*>(pv.ptr), int64_t(pv.size * pv.itemsize)};
      FS_CHECK(!check_crc || payload.size >= 4, "a payload checked for its CRC has at least its 4 CRC bytes");
      FS_CHECK(wv.format == py::format_descriptor<float>::format() && wv.ndim == 1 && (wv.size == 0 || wv.strides[0] == 4),
               "weights must be a contiguous float32 [n]");
      FS_CHECK(std::isfinite(scale[b]), "scale must be finite");
      Targets to;
      to.w = static_cast<const float*>(wv.ptr);
      to.nw = int64_t(wv.size);
      to.acc = static_cast<float*>(ai.ptr);
      to.n_acc = int64_t(ai.size);
      to.wsum = static_cast<float*>(si.ptr);
      to.counts = static_cast<float*>(ci.ptr);
      to.n_wsum = int64_t(si.size);
      to.present = true;
      batch[b] = build_plan(payload, views[3 * b + 2], gs[b], to, clip_norm > 0);
    } catch (...) {
      failed[b] = std::current_exception();
    }
  });
  for (size_t b = 0; b < B; ++b) {
    if (!failed[b]) continue;
    try {
      std::rethrow_exception(failed[b]);
    } catch (const std::invalid_argument& e) {  // "fedsparse: payload b: plan row i: ...", as FS_CHECK words it
      const std::string inner = e.what(), prefix = "fedsparse: ";
      throw std::invalid_argument(prefix + at(b) + (inner.rfind(prefix, 0) == 0 ? inner.substr(prefix.size()) : inner));
    }
  }

  // Tensors of different payloads that share an accumulator range are folded together.
  std::vector<std::vector<std::pair<int32_t, int32_t>>> groups;  // (payload, tensor) per output tensor
  std::vector<std::pair<const float*, int64_t>> group_dst;
  if (same_targets(batch)) {  // the usual case: output tensor i is tensor i of every payload, no sort
    for (size_t i = 0; i < batch[0].tensors.size(); ++i) {
      const Tensor& t = batch[0].tensors[i];
      group_dst.emplace_back(t.acc, t.R * t.C);
      groups.emplace_back();
      groups.back().reserve(B);
      for (size_t b = 0; b < B; ++b) groups.back().emplace_back(int32_t(b), int32_t(i));
    }
  } else {
    std::vector<std::tuple<const float*, int64_t, int32_t, int32_t>> all;
    for (size_t b = 0; b < B; ++b)
      for (size_t i = 0; i < batch[b].tensors.size(); ++i) {
        const Tensor& t = batch[b].tensors[i];
        all.emplace_back(t.acc, t.R * t.C, int32_t(b), int32_t(i));
      }
    std::stable_sort(all.begin(), all.end(), [](const auto& x, const auto& y) { return std::get<0>(x) < std::get<0>(y); });
    for (const auto& [ptr, numel, b, i] : all) {
      if (groups.empty() || group_dst.back().first != ptr) {
        FS_CHECK(group_dst.empty() || group_dst.back().first + group_dst.back().second <= ptr,
                 "accumulator ranges of different tensors overlap");
        groups.emplace_back();
        group_dst.emplace_back(ptr, numel);
      }
      FS_CHECK(group_dst.back().second == numel, "tensors sharing an accumulator range differ in size");
      groups.back().emplace_back(b, i);
    }
  }
  std::vector<Unit> units;
  int64_t total_kept = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    const int64_t numel = group_dst[g].second;
    for (int64_t e0 = 0; e0 < numel; e0 += kBlock) units.push_back({int32_t(g), e0, std::min(numel, e0 + kBlock)});
  }
  for (const Plan& p : batch) total_kept += p.total_kept;

  const int level = simd_level(max_level);
  const int threads = total_kept > kSerialBelow ? max_threads() : 1;
  std::vector<std::vector<float>> bufs(static_cast<size_t>(threads));
  if (clip_norm > 0) {  // each payload's norm first (its items in order, one payload per thread at a time)
    parallel_units(int64_t(B), threads, [&](int64_t b, int tid) {
      double s = 0;
      for (const Item& it : batch[size_t(b)].items) s += item_sum_squares(batch[size_t(b)], it, bufs[size_t(tid)]);
      scale[size_t(b)] = float(double(scale[size_t(b)]) * clip_factor(s, clip_norm));
    });
  }
  for (const Plan& p : batch)  // per-head and per-tensor weight sums: tiny, serial, in payload order
    for (const Tensor& t : p.tensors) {
      if (!t.wsum) continue;
      if (t.wsum_mode == kPerTensor) {
        t.wsum[0] += t.w[0];
        t.counts[0] += 1.f;
      } else if (t.wsum_mode == kPerHead) {
        for (int64_t h : t.units) {
          t.wsum[h] += t.w[h];
          t.counts[h] += 1.f;
        }
      }
    }
  // Threads take runs of consecutive blocks (a quarter of their share at a time, dynamically): the codes of
  // consecutive blocks lie next to each other in every payload, so the prefetch ahead and the hardware
  // prefetcher serve the thread that reads them. Handing out single blocks made 2 threads only 1.14x one.
  const int64_t n_units = int64_t(units.size());
  const int64_t run = std::max<int64_t>(1, n_units / (4 * int64_t(threads)));
  const int64_t n_runs = (n_units + run - 1) / run;
  CrcSplit crc = check_crc ? CrcSplit(views, batch, groups, units, run) : CrcSplit();
  std::vector<std::vector<int64_t>> cursors(size_t(threads), std::vector<int64_t>(check_crc ? B : 0));
#if defined(FS_X86) && defined(FS_CRC_FOLD512)
  const bool fold_crc = check_crc && level >= 2 && crc32_can_fold512();
#else
  const bool fold_crc = false;
#endif
  parallel_units(n_runs, threads, [&](int64_t r, int tid) {
    std::vector<float>& buf = bufs[size_t(tid)];
    std::vector<int64_t>& cursor = cursors[size_t(tid)];
    if (check_crc) crc.start(r, cursor);
    for (int64_t u = r * run; u < std::min(n_units, (r + 1) * run); ++u) {
      const Unit& un = units[size_t(u)];
      for (const auto& [b, i] : groups[size_t(un.group)]) {
        const Plan& p = batch[size_t(b)];
        const Tensor& t = p.tensors[size_t(i)];
        const int64_t ka = t.compact_pos(un.e0), kb = t.compact_pos(un.e1);
        std::pair<int64_t, int64_t> bytes{0, 0};
        uint32_t* fold = nullptr;
        if (check_crc && kb > ka) {
          bytes = code_bytes(t, crc.base[size_t(b)], p.gs, ka, kb);
          if (fold_crc && t.bits == 8 && whole_groups(t, ka, p.gs))
            fold = crc.fold_from(r, size_t(b), bytes.first, bytes.second, cursor);
          if (!fold) crc.to(r, size_t(b), bytes.second, cursor);  // just before the multiply-add reads them
        }
        run_range(t, ka, kb - ka, p.gs, scale[size_t(b)], buf, level, fold);
        if (fold) {  // the multiply-add folded the codes' whole groups in; the rest here
          cursor[size_t(b)] = bytes.first + 64 * ((kb - ka) / 64);
          crc.to(r, size_t(b), bytes.second, cursor);
        }
      }
    }
    if (check_crc) crc.finish(r, cursor);
  });
  if (check_crc) crc.check(threads);
}

// Sum of squares of the dequantized values of the planned tensors (the update's squared L2 norm; elements
// that did not travel are zero). Used for norm clipping; weights, acc and wsum are not touched.
double sum_squares(const py::buffer& payload_b, const py::buffer& plan_b, int64_t gs) {
  const In payload = read_only(payload_b, "payload");
  const py::buffer_info plan_info = plan_b.request();
  Plan plan = build_plan(payload, plan_info, gs, Targets(), /*items=*/true);

  py::gil_scoped_release nogil;
  const int64_t n_items = int64_t(plan.items.size());
  const int threads = plan.total_kept > kThreadsAbove ? max_threads() : 1;
  std::vector<std::vector<float>> bufs(static_cast<size_t>(threads));
  std::vector<double> part(size_t(n_items), 0.0);  // per item, summed in order: the same result on any thread count
  parallel_units(n_items, threads, [&](int64_t i, int tid) {
    part[size_t(i)] = item_sum_squares(plan, plan.items[size_t(i)], bufs[size_t(tid)]);
  });
  double total = 0;
  for (double s : part) total += s;
  return total;
}

}  // namespace
}  // namespace fedsparse

void init_aggregate(py::module_& m) {
  using namespace fedsparse;
  m.def("accumulate", &accumulate, py::arg("payloads"), py::arg("plans"), py::arg("weights"), py::arg("scales"),
        py::arg("group_sizes"), py::arg("acc"), py::arg("wsum"), py::arg("counts"), py::arg("clip_norm") = 0.0,
        py::arg("max_level") = 2, py::arg("check_crc") = false,
        "For each payload b of a batch (sequences of equal length): acc += scales[b] * w * dequantize(tensor) for "
        "every tensor, scattered to its place; wsum += w and counts += 1 for the tensors / heads / elements that "
        "travelled. clip_norm > 0: each payload's scale is first multiplied by min(1, clip_norm / ||its values||). "
        "plans[b]: int64 [n, 13] rows (kind, "
        "rows, cols, n_heads, mask_offset or -1 for all kept, n_kept, bits, data_offset, data_nbytes, "
        "acc_offset, w_offset, wsum_offset or -1, wsum_mode 0 tensor / 1 head / 2 element); weights float32 "
        "(one per head for head-sparse tensors, else one per tensor). Checks the whole batch before writing. "
        "max_level caps the instruction set of the 8-bit loop (2 AVX-512, 1 AVX2, 0 scalar; for tests). "
        "check_crc: also check each payload's CRC-32 (its last 4 bytes) in the same pass, for payloads parsed "
        "with parse_payloads(crc=False); a mismatch raises after the batch was added (acc, wsum and counts "
        "are then to be discarded).");
  m.def("sum_squares", &sum_squares, py::arg("payload"), py::arg("plan"), py::arg("group_size"),
        "Sum of squares (float64) of the dequantized values of the planned tensors of a payload.");
}
