// CPU pack/unpack kernels: compaction of the travelling elements (dense, head rows, head columns,
// element mask) fused with blockwise absmax quantization, and the inverse. The arithmetic follows
// python/fedsparse/quant.py step by step so that codes are bit-identical for round-to-nearest.
//
// Groups never straddle a byte of codes (group_size is a power of two >= 16), so each group is
// encoded independently: OpenMP splits the groups, each thread gathers a group into an L1-resident
// buffer, and writes whole bytes. Two passes over the source (absmax, then codes) read it twice;
// together that is about the traffic of one copy.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "common.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "fedsparse's CPU kernels assume a little-endian host"
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FS_HOT __attribute__((target_clones("avx2", "default")))
#else
#define FS_HOT
#endif

namespace py = pybind11;

namespace fedsparse {
namespace {

enum Status { kOk = 0, kNonFinite = 1, kF16Overflow = 2 };
constexpr int64_t kSerialBelow = 1 << 16;  // elements; below this OpenMP start-up costs more than it saves

inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Maps an index k of the compact vector (kept elements, row-major) to an offset of the [R, C] source.
// The kept elements form equal-length contiguous segments: a kept head's rows, a kept head's columns in
// one row, or single elements.
struct CompactMap {
  int kind = kDense;
  int64_t C = 0, seg_len = 0;
  std::vector<int64_t> units;  // kept heads (head kinds) or kept element indices (element kind)

  CompactMap(int kind_, int64_t R, int64_t C_, int64_t n_heads, const uint8_t* mask, int64_t n_kept)
      : kind(kind_), C(C_) {
    const int64_t nbits = kind == kElements ? R * C : (kind == kDense ? 0 : n_heads);
    for (int64_t i = 0; i < nbits; ++i)
      if (mask[i >> 3] >> (i & 7) & 1) units.push_back(i);
    if (kind == kDense) seg_len = std::max<int64_t>(R * C, 1);
    else if (kind == kHeadRows) seg_len = std::max<int64_t>(R / n_heads * C, 1);
    else if (kind == kHeadCols) seg_len = std::max<int64_t>(C / n_heads, 1);
    else seg_len = 1;
    const int64_t kept_units = int64_t(units.size());
    int64_t expect = R * C;
    if (kind == kHeadRows) expect = kept_units * (R / n_heads) * C;
    else if (kind == kHeadCols) expect = kept_units * R * (C / n_heads);
    else if (kind == kElements) expect = kept_units;
    FS_CHECK(expect == n_kept, "kept-element count does not match the mask");
  }

  int64_t segment_start(int64_t s) const {
    switch (kind) {
      case kHeadRows: return units[s] * seg_len;
      case kHeadCols: {
        const int64_t kh = int64_t(units.size());
        return (s / kh) * C + units[s % kh] * seg_len;
      }
      case kElements: return units[s];
      default: return 0;
    }
  }

  template <class Fn>  // fn(source offset, compact offset, count) for each contiguous run of [k0, k0+cnt)
  void for_runs(int64_t k0, int64_t cnt, Fn fn) const {
    int64_t done = 0;
    while (done < cnt) {
      const int64_t k = k0 + done, s = k / seg_len, off = k % seg_len;
      const int64_t take = std::min(seg_len - off, cnt - done);
      fn(segment_start(s) + off, done, take);
      done += take;
    }
  }
};

// max |x| as the bit pattern of the float: for non-negative floats integer order is float order, and
// anything above kMaxFiniteBits is NaN or Inf. An integer max-reduction vectorizes without -ffast-math.
constexpr uint32_t kMaxFiniteBits = 0x7f7fffffu;
FS_HOT uint32_t absmax_bits(const float* x, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, x + i, 4);
    b &= 0x7fffffffu;
    m = b > m ? b : m;
  }
  return m;
}

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

void zero_nonfinite(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::fabs(x[i]) <= FLT_MAX ? x[i] : 0.f;
}

FS_HOT void round_group(const float* x, int64_t n, float step, float qmax, int offset, uint8_t* u) {
  for (int64_t i = 0; i < n; ++i) {
    float y = step > 0.f ? x[i] / step : 0.f;
    y = std::rint(y);
    y = std::min(std::max(y, -qmax), qmax);
    u[i] = uint8_t(int(y) + offset);
  }
}

void round_group_stochastic(const float* x, int64_t n, float step, float qmax, int offset, uint32_t key,
                            int64_t k0, uint8_t* u) {
  for (int64_t i = 0; i < n; ++i) {
    const float r = float(lowbias32(key ^ uint32_t(k0 + i)) >> 8) * (1.0f / 16777216.0f);
    float y = step > 0.f ? x[i] / step : 0.f;
    y = std::floor(y + r);
    y = std::min(std::max(y, -qmax), qmax);
    u[i] = uint8_t(int(y) + offset);
  }
}

FS_HOT void pack_bits(const uint8_t* u, int64_t n, int bits, uint8_t* out) {
  if (bits == 8) {
    std::memcpy(out, u, size_t(n));
  } else if (bits == 4) {
    const int64_t full = n / 2;
    for (int64_t j = 0; j < full; ++j) out[j] = uint8_t(u[2 * j] | u[2 * j + 1] << 4);
    if (n & 1) out[full] = u[n - 1];
  } else {  // 2 bits
    const int64_t full = n / 4;
    for (int64_t j = 0; j < full; ++j)
      out[j] = uint8_t(u[4 * j] | u[4 * j + 1] << 2 | u[4 * j + 2] << 4 | u[4 * j + 3] << 6);
    if (n & 3) {
      uint8_t b = 0;
      for (int64_t i = full * 4; i < n; ++i) b |= uint8_t(u[i] << (2 * (i - full * 4)));
      out[full] = b;
    }
  }
}

FS_HOT void decode_group(const uint8_t* codes, int64_t n, int bits, float step, float* x) {
  const int offset = 1 << (bits - 1);
  if (bits == 8) {
    for (int64_t i = 0; i < n; ++i) x[i] = float(int(codes[i]) - offset) * step;
  } else if (bits == 4) {
    for (int64_t i = 0; i < n; ++i) x[i] = float(int(codes[i >> 1] >> ((i & 1) * 4) & 0xf) - offset) * step;
  } else {
    for (int64_t i = 0; i < n; ++i) x[i] = float(int(codes[i >> 2] >> ((i & 3) * 2) & 0x3) - offset) * step;
  }
}

struct Buf {
  const uint8_t* ptr;
  int64_t size;
};
struct MutBuf {
  uint8_t* ptr;
  int64_t size;
};

Buf read_buffer(const py::buffer& b, const char* what) {
  py::buffer_info info = b.request();
  FS_CHECK(info.ndim <= 1 || info.strides.back() == info.itemsize, std::string(what) + " must be contiguous");
  return {static_cast<const uint8_t*>(info.ptr), int64_t(info.size * info.itemsize)};
}
MutBuf write_buffer(const py::buffer& b, const char* what) {
  py::buffer_info info = b.request(true);
  FS_CHECK(!info.readonly, std::string(what) + " must be writable");
  return {static_cast<uint8_t*>(info.ptr), int64_t(info.size * info.itemsize)};
}

void check_common(int kind, int64_t R, int64_t C, int64_t n_heads, int64_t mask_size, int bits, int64_t gs) {
  FS_CHECK(kind >= kDense && kind <= kElements, "unknown sparsity kind");
  FS_CHECK(R >= 0 && C >= 0, "negative shape");
  FS_CHECK(bits == 32 || bits == 16 || bits == 8 || bits == 4 || bits == 2, "bits must be 32, 16, 8, 4 or 2");
  FS_CHECK(gs >= 16 && gs <= 65536 && (gs & (gs - 1)) == 0, "group_size must be a power of two in [16, 65536]");
  if (kind == kHeadRows || kind == kHeadCols) {
    FS_CHECK(n_heads >= 1, "head sparsity needs n_heads >= 1");
    FS_CHECK((kind == kHeadRows ? R : C) % n_heads == 0, "n_heads must divide the head dimension");
    FS_CHECK(mask_size * 8 >= n_heads, "head mask too short");
  }
  if (kind == kElements) FS_CHECK(mask_size * 8 >= R * C, "element mask too short");
}

// Gather the kept elements of src (float32 [R, C]) and encode them into out (one value section).
int quantize(const py::buffer& src_b, int kind, int64_t R, int64_t C, int64_t n_heads, const py::buffer& mask_b,
             int64_t n_kept, int bits, int64_t gs, bool stochastic, uint32_t seed, bool nan_to_zero,
             const py::buffer& out_b) {
  const Buf src = read_buffer(src_b, "source"), mask = read_buffer(mask_b, "mask");
  const MutBuf out = write_buffer(out_b, "output");
  check_common(kind, R, C, n_heads, mask.size, bits, gs);
  FS_CHECK(src.size == 4 * R * C, "source must hold R*C float32 values");
  FS_CHECK(out.size == values_nbytes(n_kept, bits, gs), "output buffer has the wrong size");
  const float* x = reinterpret_cast<const float*>(src.ptr);

  py::gil_scoped_release nogil;
  const CompactMap map(kind, R, C, n_heads, mask.ptr, n_kept);
  const int64_t chunk = (bits == 32 || bits == 16) ? 4096 : gs;
  const int64_t n_chunks = (n_kept + chunk - 1) / chunk;
  bool bad = false, overflow = false;
  std::vector<float> amax(bits <= 8 ? size_t(n_chunks) : 0);

  // Pass 1: absmax per group (and the non-finite check); raw widths are written here directly.
#pragma omp parallel if (n_kept > kSerialBelow)
  {
    std::vector<float> buf(static_cast<size_t>(chunk));
    bool my_bad = false, my_overflow = false;
#pragma omp for schedule(static)
    for (int64_t g = 0; g < n_chunks; ++g) {
      const int64_t k0 = g * chunk, cnt = std::min(chunk, n_kept - k0);
      const auto gather = [&] {
        map.for_runs(k0, cnt, [&](int64_t s, int64_t d, int64_t n) { std::memcpy(&buf[d], x + s, 4 * size_t(n)); });
      };
      uint32_t m = 0;
      if (bits <= 8) {  // codes come in pass 2: only the absmax is needed, read it in place
        map.for_runs(k0, cnt, [&](int64_t s, int64_t, int64_t n) { m = std::max(m, absmax_bits(x + s, n)); });
      } else {
        gather();
        m = absmax_bits(buf.data(), cnt);
      }
      if (m > kMaxFiniteBits) {
        if (!nan_to_zero) {
          my_bad = true;
          continue;
        }
        if (bits <= 8) gather();
        zero_nonfinite(buf.data(), cnt);
        m = absmax_bits(buf.data(), cnt);
      }
      if (bits == 32) {
        std::memcpy(out.ptr + 4 * k0, buf.data(), 4 * size_t(cnt));
      } else if (bits == 16) {
        uint8_t* o = out.ptr + 2 * k0;
        for (int64_t i = 0; i < cnt; ++i) {
          const uint16_t h = f32_to_f16(buf[i]);
          my_overflow |= (h & 0x7c00) == 0x7c00;
          store_u16le(o + 2 * i, h);
        }
      } else {
        amax[size_t(g)] = bits_to_float(m);
      }
    }
#pragma omp critical
    {
      bad |= my_bad;
      overflow |= my_overflow;
    }
  }
  if (bad) return kNonFinite;
  if (overflow) return kF16Overflow;
  if (bits >= 16) return kOk;

  // Pass 2: scales and codes.
  const float tmax = n_chunks ? *std::max_element(amax.begin(), amax.end()) : 0.f;
  const float qmax = float((1 << (bits - 1)) - 1);
  const float tstep = tmax / qmax;
  store_f32le(out.ptr, tstep);
  uint8_t* scales = out.ptr + 4;
  uint8_t* codes = scales + 2 * n_chunks;
  const uint32_t key = lowbias32(seed);
#pragma omp parallel if (n_kept > kSerialBelow)
  {
    std::vector<float> buf(static_cast<size_t>(gs));
    std::vector<uint8_t> u(static_cast<size_t>(gs));
#pragma omp for schedule(static)
    for (int64_t g = 0; g < n_chunks; ++g) {
      const int64_t k0 = g * gs, cnt = std::min(gs, n_kept - k0);
      const uint16_t s16 = tmax > 0.f ? f32_to_f16(amax[size_t(g)] / tmax) : 0;
      store_u16le(scales + 2 * g, s16);
      const float step = f16_to_f32(s16) * tstep;
      map.for_runs(k0, cnt, [&](int64_t s, int64_t d, int64_t n) { std::memcpy(&buf[d], x + s, 4 * size_t(n)); });
      if (nan_to_zero) zero_nonfinite(buf.data(), cnt);
      if (stochastic) round_group_stochastic(buf.data(), cnt, step, qmax, 1 << (bits - 1), key, k0, u.data());
      else round_group(buf.data(), cnt, step, qmax, 1 << (bits - 1), u.data());
      pack_bits(u.data(), cnt, bits, codes + k0 * bits / 8);
    }
  }
  return kOk;
}

// Decode one value section and scatter it into out (float32 [R, C], zero where nothing travelled;
// the caller passes it zeroed).
void dequantize(const py::buffer& values_b, int kind, int64_t R, int64_t C, int64_t n_heads,
                const py::buffer& mask_b, int64_t n_kept, int bits, int64_t gs, const py::buffer& out_b) {
  const Buf values = read_buffer(values_b, "values"), mask = read_buffer(mask_b, "mask");
  const MutBuf out = write_buffer(out_b, "output");
  check_common(kind, R, C, n_heads, mask.size, bits, gs);
  FS_CHECK(values.size == values_nbytes(n_kept, bits, gs), "value section has the wrong size");
  FS_CHECK(out.size == 4 * R * C, "output must hold R*C float32 values");
  float* y = reinterpret_cast<float*>(out.ptr);

  py::gil_scoped_release nogil;
  const CompactMap map(kind, R, C, n_heads, mask.ptr, n_kept);
  const int64_t chunk = bits <= 8 ? gs : 4096;
  const int64_t n_chunks = (n_kept + chunk - 1) / chunk;
  const float tstep = bits <= 8 ? load_f32le(values.ptr) : 0.f;
  const uint8_t* scales = values.ptr + 4;
  const uint8_t* codes = scales + 2 * n_chunks;
#pragma omp parallel if (n_kept > kSerialBelow)
  {
    std::vector<float> buf(static_cast<size_t>(chunk));
#pragma omp for schedule(static)
    for (int64_t g = 0; g < n_chunks; ++g) {
      const int64_t k0 = g * chunk, cnt = std::min(chunk, n_kept - k0);
      if (bits == 32) {
        std::memcpy(buf.data(), values.ptr + 4 * k0, 4 * size_t(cnt));
      } else if (bits == 16) {
        for (int64_t i = 0; i < cnt; ++i) buf[i] = f16_to_f32(load_u16le(values.ptr + 2 * (k0 + i)));
      } else {
        const float step = f16_to_f32(load_u16le(scales + 2 * g)) * tstep;
        decode_group(codes + k0 * bits / 8, cnt, bits, step, buf.data());
      }
      map.for_runs(k0, cnt, [&](int64_t s, int64_t d, int64_t n) { std::memcpy(y + s, &buf[d], 4 * size_t(n)); });
    }
  }
}

}  // namespace
}  // namespace fedsparse

void init_quant(py::module_& m) {
  using namespace fedsparse;
  m.def("quantize", &quantize, py::arg("src"), py::arg("kind"), py::arg("rows"), py::arg("cols"),
        py::arg("n_heads"), py::arg("mask"), py::arg("n_kept"), py::arg("bits"), py::arg("group_size"),
        py::arg("stochastic"), py::arg("seed"), py::arg("nan_to_zero"), py::arg("out"),
        "Compact and encode float32 [rows, cols] into one value section. Returns 0 (ok), 1 (NaN/Inf found), "
        "2 (float16 overflow).");
  m.def("dequantize", &dequantize, py::arg("values"), py::arg("kind"), py::arg("rows"), py::arg("cols"),
        py::arg("n_heads"), py::arg("mask"), py::arg("n_kept"), py::arg("bits"), py::arg("group_size"),
        py::arg("out"), "Decode one value section into a zeroed float32 [rows, cols] buffer.");
}
