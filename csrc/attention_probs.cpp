// The elementwise passes of attention with materialized probabilities, for the CPU pruned-attention path.
// When few (batch, head) pairs are kept, their Sq x Sk probabilities are small, and keeping them from the
// forward to the backward turns attention into six batched GEMMs (torch/MKL) and two passes here:
//   forward:  P = softmax(scale * L + bias) in place over L = q k^T (causal: key j > row i masked; a padded
//             query's row = 0), with each row's largest probability (1 / the row's sum of exp) for confidence;
//   backward: dS = scale * P * (dP - delta) in place over dP = dO v^T, delta_i = <dO_i, O_i>.
// Each pass reads a row once from L1 after one trip from memory; torch needs three passes for the softmax with
// its scale and mask and two for dS. Rows are independent: OpenMP splits them statically. The row kernels and
// their policies are in attention_rows.h.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>

#include "arrays.h"
#include "attention_rows.h"
#include "common.h"

namespace py = pybind11;

namespace fedsparse {
namespace {

// Parallel over rows when there is enough work for a second thread to pay off.
constexpr int64_t kParallelElements = 1 << 16;

void attention_softmax(py::array_t<float>& s, float scale, const py::object& bias, int64_t bias_rows,
                       bool causal, const py::object& qvalid, const py::object& maxp, int max_level) {
  FS_CHECK(s.ndim() == 3, "s must be [N, Sq, Sk]");
  const int64_t N = s.shape(0), Sq = s.shape(1), Sk = s.shape(2);
  float* x = array_data<float>(s, N * Sq * Sk, "s", true);
  FS_CHECK(bias.is_none() || bias_rows == 1 || bias_rows == Sq, "bias_rows must be 1 or Sq");
  const float* b = optional_array_data<float>(bias, N * bias_rows * Sk, "bias", false);
  const bool* qv = optional_array_data<bool>(qvalid, N * Sq, "qvalid", false);
  float* mp = optional_array_data<float>(maxp, N * Sq, "maxp", true);
  const int simd = simd_level(max_level);
  const int64_t rows = N * Sq;
  py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static) if (rows > 1 && rows * Sk > kParallelElements)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = r / Sq, i = r % Sq;
    float* row = x + r * Sk;
    float top = 0.0f;
    if (qv && !qv[r]) {
      std::fill(row, row + Sk, 0.0f);
    } else {
      const float* br = b ? b + (n * bias_rows + (bias_rows == 1 ? 0 : i)) * Sk : nullptr;
      const int64_t hi = causal ? std::min(Sk, i + 1) : Sk;
      top = attn_rows::softmax_row(simd, row, br, scale, hi, Sk);
    }
    if (mp) mp[r] = top;
  }
}

void attention_dscores(py::array_t<float>& dp, const py::array_t<float>& p, const py::array_t<float>& delta,
                       float scale, int max_level) {
  FS_CHECK(dp.ndim() == 3, "dp must be [N, Sq, Sk]");
  const int64_t N = dp.shape(0), Sq = dp.shape(1), Sk = dp.shape(2);
  float* d = array_data<float>(dp, N * Sq * Sk, "dp", true);
  const float* pp = array_data<float>(p, N * Sq * Sk, "p", false);
  const float* dl = array_data<float>(delta, N * Sq, "delta", false);
  const int simd = simd_level(max_level);
  const int64_t rows = N * Sq;
  py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static) if (rows > 1 && rows * Sk > kParallelElements)
  for (int64_t r = 0; r < rows; ++r) attn_rows::dscores_row(simd, d + r * Sk, pp + r * Sk, dl[r], scale, Sk);
}

}  // namespace
}  // namespace fedsparse

void init_attention_probs(py::module_& m) {
  // noconvert: a silently converted copy of an in-place array would swallow the results.
  m.def("attention_softmax", &fedsparse::attention_softmax, py::arg("s").noconvert(), py::arg("scale"),
        py::arg("bias"), py::arg("bias_rows"), py::arg("causal"), py::arg("qvalid"), py::arg("maxp"),
        py::arg("max_level") = 2,
        "In place over float32 C-contiguous s [N, Sq, Sk] (q k^T): s <- softmax(scale * s + bias) per row, "
        "bias None or float32 [N, bias_rows (1 or Sq), Sk]; causal masks key j > row i; qvalid None or bool "
        "[N, Sq] (False: the row is 0); maxp None or float32 [N, Sq] <- each row's largest probability (0 for "
        "a row with nothing to attend to). A NaN or +inf logit makes its row NaN.");
  m.def("attention_dscores", &fedsparse::attention_dscores, py::arg("dp").noconvert(), py::arg("p").noconvert(),
        py::arg("delta").noconvert(), py::arg("scale"), py::arg("max_level") = 2,
        "In place over float32 C-contiguous dp [N, Sq, Sk] (dO v^T): dp <- scale * p * (dp - delta[:, :, None]), "
        "p [N, Sq, Sk], delta [N, Sq] float32.");
}
