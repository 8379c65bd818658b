// The server's last step: the accumulated sums times the reciprocals of their weight sums, in place, one factor
// per unit (tensor or head, as the accumulator kept its weight sums), with the check that the result is finite
// in the same pass. python/fedsparse/server/stream.py (Accumulator.finish) calls it; its numpy twin there,
// scale_units_numpy, does the same per tensor. Tensors with a weight sum per element are divided there.
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "parallel.h"

namespace py = pybind11;

namespace fedsparse {
namespace {

// Columns of a row: where the tensor's values are, its [rows, cols] view, and how its factors are indexed.
enum Col { cAccOff, cRows, cCols, cHeads, cMode, cHeadKind, cFactorOff, kCols };
enum Mode { kPerTensor = 0, kPerHead = 1 };
constexpr int64_t kThreadsFrom = 1 << 20;  // elements from which two threads pay for starting one (~20 us)

// x[i] *= f over n values; true if all results are finite (on the bits, so the loop vectorizes).
bool scale(float* __restrict x, int64_t n, float f) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] * f;
    x[i] = v;
    uint32_t u;
    std::memcpy(&u, &v, 4);
    bad |= uint32_t((u & 0x7f800000u) == 0x7f800000u);
  }
  return !bad;
}

// One tensor: true if every scaled value is finite.
bool scale_tensor(const int64_t* p, float* acc, const float* factors) {
  float* x = acc + p[cAccOff];
  const int64_t R = p[cRows], C = p[cCols], H = p[cHeads];
  const float* f = factors + p[cFactorOff];
  bool ok = true;
  if (p[cMode] == kPerTensor) {
    ok = scale(x, R * C, f[0]);
  } else if (p[cHeadKind] == kHeadRows) {  // head h: rows [h R/H, (h+1) R/H), contiguous
    const int64_t n = R / H * C;
    for (int64_t h = 0; h < H; ++h) ok &= scale(x + h * n, n, f[h]);
  } else {  // head columns: in every row, head h owns columns [h C/H, (h+1) C/H)
    const int64_t n = C / H;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t h = 0; h < H; ++h) ok &= scale(x + r * C + h * n, n, f[h]);
  }
  return ok;
}

int64_t scale_units(const py::buffer& acc_b, const py::buffer& factors_b, const py::buffer& rows_b) {
  py::buffer_info ai = acc_b.request(true), fi = factors_b.request(), ri = rows_b.request();
  FS_CHECK(ai.format == py::format_descriptor<float>::format() && ai.ndim == 1 &&
               (ai.size == 0 || ai.strides[0] == 4) && !ai.readonly,
           "acc must be a writable contiguous float32 [n]");
  FS_CHECK(fi.format == ai.format && fi.ndim == 1 && (fi.size == 0 || fi.strides[0] == 4),
           "factors must be a contiguous float32 [n]");
  FS_CHECK(ri.itemsize == 8 && (ri.format == "q" || ri.format == "l") && ri.ndim == 2 && ri.shape[1] == kCols &&
               (ri.shape[0] == 0 || (ri.strides[1] == 8 && ri.strides[0] == 8 * kCols)),
           "rows must be a C-contiguous int64 array [n_tensors, 7]");
  const int64_t n_rows = ri.shape[0], n_acc = ai.size, n_f = fi.size;
  const int64_t* rows = static_cast<const int64_t*>(ri.ptr);
  int64_t total = 0;
  for (int64_t i = 0; i < n_rows; ++i) {  // every row checked before anything is written
    const int64_t* p = rows + i * kCols;
    const auto at = [i] { return "row " + std::to_string(i) + ": "; };
    const int64_t R = p[cRows], C = p[cCols], H = p[cHeads];
    FS_CHECK(R >= 0 && C >= 0 && R < (int64_t(1) << 31) && C < (int64_t(1) << 31), at() + "bad shape");
    FS_CHECK(p[cAccOff] >= 0 && p[cAccOff] <= n_acc - R * C, at() + "outside acc");
    int64_t units = 1;
    if (p[cMode] == kPerHead) {
      FS_CHECK(p[cHeadKind] == kHeadRows || p[cHeadKind] == kHeadCols, at() + "per-head factors need a head kind");
      FS_CHECK(H >= 1 && (p[cHeadKind] == kHeadRows ? R : C) % H == 0, at() + "n_heads must divide the head axis");
      units = H;
    } else {
      FS_CHECK(p[cMode] == kPerTensor, at() + "unknown mode");
    }
    FS_CHECK(p[cFactorOff] >= 0 && p[cFactorOff] <= n_f - units, at() + "factors too short");
    total += R * C;
  }
  float* acc = static_cast<float*>(ai.ptr);
  const float* factors = static_cast<const float*>(fi.ptr);
  std::vector<char> ok(size_t(n_rows), 1);
  {
    py::gil_scoped_release nogil;
    parallel_units(n_rows, total >= kThreadsFrom ? max_threads() : 1,
                   [&](int64_t i, int) { ok[size_t(i)] = scale_tensor(rows + i * kCols, acc, factors); });
  }
  for (int64_t i = 0; i < n_rows; ++i)
    if (!ok[size_t(i)]) return i;
  return -1;
}

}  // namespace
}  // namespace fedsparse

void init_finish(py::module_& m) {
  m.def("scale_units", &fedsparse::scale_units, py::arg("acc"), py::arg("factors"), py::arg("rows"),
        "acc *= factor in place, per unit of each tensor; rows int64 [n, 7] of (acc_offset, rows, cols, n_heads, "
        "mode 0 one factor / 1 one per head, head kind 1 rows / 2 columns, factor_offset). "
        "Checks every row first. Returns the first row with a value that is not finite afterwards, else -1.");
}
