// Server-side streaming aggregation: dequantize one client's payload and accumulate it, weighted, into
// float32 accumulators, scattering each tensor's kept elements (dense, head rows, head columns, element
// mask) to their places; plus per-unit weight sums (per head, per element, or per tensor) so the caller
// can normalise head-wise. python/fedsparse/server/aggregate.py drives it; the numpy reference is
// python/fedsparse/server/reference.py.
//
// Why per payload and fused: a payload (~0.5 MB for 1M parameters at 8 bits, half the heads) fits in L2,
// and the float32 accumulator (4 MB per 1M parameters) in L3, so decoding straight into `acc += w * x`
// reads each payload byte once from memory and never materialises a client's dense update (unpack + sum
// would write and re-read 4 MB per client). The work is split into chunks of whole quantization groups
// (disjoint output elements, so no atomics), all tensors of a payload in one OpenMP loop: many small LoRA
// tensors then still keep every thread busy.
//
// Everything the kernel is told (the plan: offsets, counts, shapes) is checked against the buffers before
// any byte is read or written, so a wrong plan raises ValueError and leaves acc and wsum untouched.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FS_AGG_HOT __attribute__((target_clones("avx2", "default")))
#else
#define FS_AGG_HOT
#endif

namespace py = pybind11;

namespace fedsparse {
namespace {

enum Kind { kDense = 0, kHeadRows = 1, kHeadCols = 2, kElements = 3 };
// Columns of one plan row (int64): what the payload says (kind .. data_nbytes, from the parser; mask_offset
// -1 means every head / element travelled) and where the tensor goes (acc_offset in floats, w_offset into
// weights, wsum_offset into wsum and counts or -1, wsum_mode: how wsum is indexed).
enum Col { cKind, cRows, cCols, cHeads, cMaskOff, cKept, cBits, cDataOff, cDataBytes, cAccOff, cWOff, cWsumOff,
           cWsumMode, kCols };
// wsum_mode: one slot for the tensor (dense entries), one per head (head entries), one per element (any).
enum WsumMode { kPerTensor = 0, kPerHead = 1, kPerElement = 2 };
constexpr int64_t kSerialBelow = 1 << 15;  // kept elements per payload; below, threads cost more than they save
constexpr int64_t kChunk = 2048;           // elements per work item (a multiple of every group size < 2048)

int64_t values_nbytes(int64_t n, int bits, int64_t gs) {
  if (bits == 32) return 4 * n;
  if (bits == 16) return 2 * n;
  return 4 + 2 * ((n + gs - 1) / gs) + (n * bits + 7) / 8;
}

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

struct Item {
  int32_t t;
  int64_t k0, cnt;
};

FS_AGG_HOT void axpy_u8(float* __restrict acc, const uint8_t* __restrict c, int64_t n, float f) {
  for (int64_t i = 0; i < n; ++i) acc[i] += float(int(c[i]) - 128) * f;
}
FS_AGG_HOT void axpy_f32(float* __restrict acc, const float* __restrict x, int64_t n, float f) {
  for (int64_t i = 0; i < n; ++i) acc[i] += x[i] * f;
}
FS_AGG_HOT double sumsq_u8(const uint8_t* __restrict c, int64_t n) {
  int64_t s = 0;  // exact: 127**2 * n fits easily
  for (int64_t i = 0; i < n; ++i) {
    const int v = int(c[i]) - 128;
    s += v * v;
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
    const int64_t g = k0 / gs, n_groups = (t.n_kept + gs - 1) / gs;
    const float step = f16_to_f32(load_u16le(t.values + 4 + 2 * g)) * load_f32le(t.values);
    const uint8_t* codes = t.values + 4 + 2 * n_groups;
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

// Validate the plan against every buffer, then build the tensors and work items. Throws before any write.
Plan build_plan(const In& payload, const py::buffer& plan_b, int64_t gs, const Targets& to) {
  py::buffer_info pi = plan_b.request();
  FS_CHECK(pi.itemsize == 8 && (pi.format == "q" || pi.format == "l") && pi.ndim == 2 && pi.shape[1] == kCols &&
               pi.strides[1] == 8 && pi.strides[0] == 8 * kCols,
           "plan must be a C-contiguous int64 array [n_tensors, 13]");
  FS_CHECK(gs >= 16 && gs <= 65536 && (gs & (gs - 1)) == 0, "group_size must be a power of two in [16, 65536]");
  const int64_t* rows = static_cast<const int64_t*>(pi.ptr);
  static const float kOne = 1.f;
  Plan plan;
  plan.gs = gs;
  plan.tensors.resize(size_t(pi.shape[0]));
  for (int64_t i = 0; i < pi.shape[0]; ++i) {
    const int64_t* p = rows + i * kCols;
    Tensor& t = plan.tensors[size_t(i)];
    const std::string at = "plan row " + std::to_string(i) + ": ";
    t.kind = int(p[cKind]);
    t.bits = int(p[cBits]);
    t.R = p[cRows];
    t.C = p[cCols];
    t.H = p[cHeads];
    t.n_kept = p[cKept];
    FS_CHECK(t.kind >= kDense && t.kind <= kElements, at + "unknown sparsity kind");
    FS_CHECK(t.bits == 32 || t.bits == 16 || t.bits == 8 || t.bits == 4 || t.bits == 2, at + "bad bit width");
    FS_CHECK(t.R >= 0 && t.C >= 0 && t.R < (int64_t(1) << 31) && t.C < (int64_t(1) << 31), at + "bad shape");
    const int64_t numel = t.R * t.C;
    const bool heads = t.kind == kHeadRows || t.kind == kHeadCols;
    if (heads) {
      FS_CHECK(t.H >= 1 && (t.kind == kHeadRows ? t.R : t.C) % t.H == 0, at + "n_heads must divide the head axis");
    }
    const int64_t nbits = heads ? t.H : (t.kind == kElements ? numel : 0);
    const bool all_kept = p[cMaskOff] == -1;
    FS_CHECK(all_kept || (p[cMaskOff] >= 0 && p[cMaskOff] <= payload.size - (nbits + 7) / 8),
             at + "mask outside the payload");
    FS_CHECK(t.n_kept >= 0 && t.n_kept <= numel, at + "bad kept count");
    FS_CHECK(p[cDataBytes] == values_nbytes(t.n_kept, t.bits, gs), at + "value section size does not match");
    FS_CHECK(p[cDataOff] >= 0 && p[cDataOff] <= payload.size - p[cDataBytes], at + "values outside the payload");
    if (to.present) {
      FS_CHECK(p[cAccOff] >= 0 && p[cAccOff] <= to.n_acc - numel, at + "accumulator too small");
      const int64_t nw_t = heads ? t.H : 1;
      FS_CHECK(p[cWOff] >= 0 && p[cWOff] <= to.nw - nw_t, at + "weights too short");
      t.wsum_mode = int(p[cWsumMode]);
      FS_CHECK(t.wsum_mode == kPerElement || (t.wsum_mode == kPerHead && heads) ||
                   (t.wsum_mode == kPerTensor && t.kind == kDense),
               at + "wsum_mode does not fit the sparsity kind");
      const int64_t n_ws = t.wsum_mode == kPerHead ? t.H : (t.wsum_mode == kPerElement ? numel : 1);
      FS_CHECK(p[cWsumOff] == -1 || (p[cWsumOff] >= 0 && p[cWsumOff] <= to.n_wsum - n_ws), at + "wsum too short");
      for (int64_t j = 0; j < nw_t; ++j)
        FS_CHECK(std::isfinite(to.w[p[cWOff] + j]), at + "weights must be finite");
      t.acc = to.acc + p[cAccOff];
      t.w = to.w + p[cWOff];
      t.wsum = p[cWsumOff] >= 0 ? to.wsum + p[cWsumOff] : nullptr;
      t.counts = p[cWsumOff] >= 0 ? to.counts + p[cWsumOff] : nullptr;
    } else {
      t.w = &kOne;  // for_runs reads w[unit] only for head kinds; sum_squares ignores it
    }

    const uint8_t* mask = all_kept ? nullptr : payload.ptr + p[cMaskOff];
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
    FS_CHECK(expect == t.n_kept, at + "kept-element count does not match the mask");
    t.values = payload.ptr + p[cDataOff];
    const int64_t chunk = t.bits <= 8 ? std::max<int64_t>(gs, kChunk) : kChunk;  // whole groups per item
    for (int64_t k0 = 0; k0 < t.n_kept; k0 += chunk)
      plan.items.push_back({int32_t(i), k0, std::min(chunk, t.n_kept - k0)});
    plan.total_kept += t.n_kept;
  }
  return plan;
}

void run_item(const Plan& plan, const Item& it, float scale, std::vector<float>& buf) {
  const Tensor& t = plan.tensors[size_t(it.t)];
  const int64_t gs = t.bits <= 8 ? plan.gs : kChunk;
  for (int64_t g0 = it.k0; g0 < it.k0 + it.cnt; g0 += gs) {  // one quantization group at a time
    const int64_t cnt = std::min(gs, it.k0 + it.cnt - g0);
    if (t.bits == 8) {  // fused: no decode buffer
      const int64_t g = g0 / gs, n_groups = (t.n_kept + gs - 1) / gs;
      const float step = f16_to_f32(load_u16le(t.values + 4 + 2 * g)) * load_f32le(t.values);
      const uint8_t* codes = t.values + 4 + 2 * n_groups + g0;
      t.for_runs(g0, cnt, [&](int64_t dst, int64_t d, int64_t n, float w) {
        axpy_u8(t.acc + dst, codes + d, n, step * (w * scale));
      });
    } else {
      decode(t, g0, cnt, gs, buf.data());
      t.for_runs(g0, cnt, [&](int64_t dst, int64_t d, int64_t n, float w) {
        axpy_f32(t.acc + dst, buf.data() + d, n, w * scale);
      });
    }
    if (t.wsum && t.wsum_mode == kPerElement) {  // disjoint elements per item: no race
      t.for_runs(g0, cnt, [&](int64_t dst, int64_t, int64_t n, float w) {
        for (int64_t i = 0; i < n; ++i) {
          t.wsum[dst + i] += w;
          t.counts[dst + i] += 1.f;
        }
      });
    }
  }
}

// acc[...] += scale * w * dequantize(payload tensors); wsum[...] += w and counts[...] += 1 for the units
// that travelled.
void accumulate(const py::buffer& payload_b, const py::buffer& plan_b, const py::buffer& weights_b, float scale,
                int64_t gs, const py::buffer& acc_b, const py::buffer& wsum_b, const py::buffer& counts_b) {
  const In payload = read_only(payload_b, "payload");
  py::buffer_info wi = weights_b.request(), ai = acc_b.request(true), si = wsum_b.request(true),
                  ci = counts_b.request(true);
  FS_CHECK(std::isfinite(scale), "scale must be finite");
  FS_CHECK(wi.format == py::format_descriptor<float>::format() && wi.ndim == 1 && (wi.size == 0 || wi.strides[0] == 4),
           "weights must be a contiguous float32 [n]");
  FS_CHECK(ai.format == py::format_descriptor<float>::format() && ai.ndim == 1 && ai.strides[0] == 4 && !ai.readonly,
           "acc must be a writable contiguous float32 [n]");
  FS_CHECK(si.format == py::format_descriptor<float>::format() && si.ndim == 1 && (si.size == 0 || si.strides[0] == 4) &&
               !si.readonly,
           "wsum must be a writable contiguous float32 [n]");
  FS_CHECK(ci.format == si.format && ci.ndim == 1 && ci.size == si.size && (ci.size == 0 || ci.strides[0] == 4) &&
               !ci.readonly,
           "counts must be a writable contiguous float32 array of wsum's size");
  float* acc = static_cast<float*>(ai.ptr);
  float* wsum = static_cast<float*>(si.ptr);
  Targets to;
  to.w = static_cast<const float*>(wi.ptr);
  to.nw = int64_t(wi.size);
  to.acc = acc;
  to.n_acc = int64_t(ai.size);
  to.wsum = wsum;
  to.counts = static_cast<float*>(ci.ptr);
  to.n_wsum = int64_t(si.size);
  to.present = true;
  Plan plan = build_plan(payload, plan_b, gs, to);
  const auto disjoint = [](const void* a, int64_t na, const void* b, int64_t nb) {
    const char *pa = static_cast<const char*>(a), *pb = static_cast<const char*>(b);
    return na == 0 || nb == 0 || pa + na <= pb || pb + nb <= pa;
  };
  FS_CHECK(disjoint(acc, 4 * ai.size, wsum, 4 * si.size) && disjoint(acc, 4 * ai.size, ci.ptr, 4 * ci.size) &&
               disjoint(wsum, 4 * si.size, ci.ptr, 4 * ci.size),
           "acc, wsum and counts must not overlap");

  py::gil_scoped_release nogil;
  for (const Tensor& t : plan.tensors) {  // per-head and per-tensor weight sums: tiny, serial
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
  const int64_t n_items = int64_t(plan.items.size());
#pragma omp parallel if (plan.total_kept > kSerialBelow)
  {
    std::vector<float> buf(size_t(std::max<int64_t>(plan.gs, kChunk)));
#pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < n_items; ++i) run_item(plan, plan.items[size_t(i)], scale, buf);
  }
}

// Sum of squares of the dequantized values of the planned tensors (the update's squared L2 norm; elements
// that did not travel are zero). Used for norm clipping; weights, acc and wsum are not touched.
double sum_squares(const py::buffer& payload_b, const py::buffer& plan_b, int64_t gs) {
  const In payload = read_only(payload_b, "payload");
  Plan plan = build_plan(payload, plan_b, gs, Targets());

  py::gil_scoped_release nogil;
  const int64_t n_items = int64_t(plan.items.size());
  double total = 0;
#pragma omp parallel if (plan.total_kept > kSerialBelow) reduction(+ : total)
  {
    std::vector<float> buf(size_t(std::max<int64_t>(plan.gs, kChunk)));
#pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < n_items; ++i) {
      const Item& it = plan.items[size_t(i)];
      const Tensor& t = plan.tensors[size_t(it.t)];
      const int64_t gsz = t.bits <= 8 ? plan.gs : kChunk;
      for (int64_t g0 = it.k0; g0 < it.k0 + it.cnt; g0 += gsz) {
        const int64_t cnt = std::min(gsz, it.k0 + it.cnt - g0);
        if (t.bits == 8) {
          const int64_t g = g0 / gsz, n_groups = (t.n_kept + gsz - 1) / gsz;
          const double step = double(f16_to_f32(load_u16le(t.values + 4 + 2 * g)) * load_f32le(t.values));
          total += sumsq_u8(t.values + 4 + 2 * n_groups + g0, cnt) * step * step;
        } else {
          decode(t, g0, cnt, gsz, buf.data());
          total += sumsq_f32(buf.data(), cnt);
        }
      }
    }
  }
  return total;
}

}  // namespace
}  // namespace fedsparse

void init_aggregate(py::module_& m) {
  using namespace fedsparse;
  m.def("accumulate", &accumulate, py::arg("payload"), py::arg("plan"), py::arg("weights"), py::arg("scale"),
        py::arg("group_size"), py::arg("acc"), py::arg("wsum"), py::arg("counts"),
        "acc += scale * w * dequantize(tensor) for every tensor of a payload, scattered to its place; wsum += w "
        "and counts += 1 for the tensors / heads / elements that travelled. plan: int64 [n, 13] rows (kind, "
        "rows, cols, n_heads, mask_offset or -1 for all kept, n_kept, bits, data_offset, data_nbytes, "
        "acc_offset, w_offset, wsum_offset or -1, wsum_mode 0 tensor / 1 head / 2 element); weights float32 "
        "(one per head for head-sparse tensors, else one per tensor). Checks the whole plan before writing.");
  m.def("sum_squares", &sum_squares, py::arg("payload"), py::arg("plan"), py::arg("group_size"),
        "Sum of squares (float64) of the dequantized values of the planned tensors of a payload.");
}
