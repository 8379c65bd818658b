// The elementwise passes of attention with materialized probabilities, for the CPU pruned-attention path.
// When few (batch, head) pairs are kept, their Sq x Sk probabilities are small, and keeping them from the
// forward to the backward turns attention into six batched GEMMs (torch/MKL) and two passes here:
//   forward:  P = softmax(scale * L + bias) in place over L = q k^T (causal: key j > row i masked; a padded
//             query's row = 0), with each row's largest probability (1 / the row's sum of exp) for confidence;
//   backward: dS = scale * P * (dP - delta) in place over dP = dO v^T, delta_i = <dO_i, O_i>.
// Each pass reads a row once from L1 after one trip from memory; torch needs three passes for the softmax with
// its scale and mask and two for dS. Rows are independent: OpenMP splits them statically.
//
// Policies (the same as ATen's CPU flash attention and the reference): a row with no key to attend to gives
// probabilities 0 and largest probability 0; a NaN (or +inf) logit makes its whole row NaN.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common.h"
#include "simd.h"

namespace py = pybind11;

namespace fedsparse {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Row x [0, hi) <- scale * x + b (b may be null), returns the max; sets *bad if a value is NaN.
float scale_bias_max_scalar(float* x, const float* b, float scale, int64_t j, int64_t hi, float m, bool* bad) {
  for (; j < hi; ++j) {
    const float v = x[j] * scale + (b ? b[j] : 0.0f);
    x[j] = v;
    *bad |= std::isnan(v);
    m = std::max(m, v);
  }
  return m;
}

// Zeroes the masked tail x [hi, sk); then, for a row with a NaN (bad) or +inf max, or with nothing to attend
// to (max -inf), writes the whole row and its largest probability (*top: NaN, 0) and returns true.
bool special_row(float* x, int64_t hi, int64_t sk, float m, bool bad, float* top) {
  std::fill(x + hi, x + sk, 0.0f);
  if (!(bad || m == -kNegInf || m == kNegInf)) return false;
  *top = m == kNegInf && !bad ? 0.0f : kNaN;
  std::fill(x, x + hi, *top);
  return true;
}

// Softmax of x [0, hi) in place, x [hi, sk) = 0; returns 1 / sum of exp (the largest probability).
float softmax_row_scalar(float* x, const float* b, float scale, int64_t hi, int64_t sk) {
  bool bad = false;
  float top;
  const float m = scale_bias_max_scalar(x, b, scale, 0, hi, kNegInf, &bad);
  if (special_row(x, hi, sk, m, bad, &top)) return top;
  float sum = 0.0f;
  for (int64_t j = 0; j < hi; ++j) sum += (x[j] = std::exp(x[j] - m));
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < hi; ++j) x[j] *= inv;
  return inv;
}

void dscores_row_scalar(float* dp, const float* p, float delta, float scale, int64_t sk) {
  for (int64_t j = 0; j < sk; ++j) dp[j] = scale * p[j] * (dp[j] - delta);
}

#ifdef FS_X86
__attribute__((target("avx2,fma"))) float softmax_row_avx2(float* x, const float* b, float scale, int64_t hi,
                                                           int64_t sk) {
  const int64_t hv = hi & ~int64_t(7);
  const __m256 sv = _mm256_set1_ps(scale);
  __m256 mv = _mm256_set1_ps(kNegInf), nanv = _mm256_setzero_ps();
  for (int64_t j = 0; j < hv; j += 8) {
    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + j), sv);
    if (b) v = _mm256_add_ps(v, _mm256_loadu_ps(b + j));
    _mm256_storeu_ps(x + j, v);
    nanv = _mm256_or_ps(nanv, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    mv = _mm256_max_ps(mv, v);
  }
  bool bad = _mm256_movemask_ps(nanv) != 0;
  float top;
  const float m = scale_bias_max_scalar(x, b, scale, hv, hi, hmax(mv), &bad);
  if (special_row(x, hi, sk, m, bad, &top)) return top;
  const __m256 mb = _mm256_set1_ps(m);
  __m256 s = _mm256_setzero_ps();
  for (int64_t j = 0; j < hv; j += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j), mb));
    _mm256_storeu_ps(x + j, e);
    s = _mm256_add_ps(s, e);
  }
  float sum = hsum(s);
  for (int64_t j = hv; j < hi; ++j) sum += (x[j] = std::exp(x[j] - m));
  const float inv = 1.0f / sum;
  const __m256 iv = _mm256_set1_ps(inv);
  for (int64_t j = 0; j < hv; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), iv));
  for (int64_t j = hv; j < hi; ++j) x[j] *= inv;
  return inv;
}

__attribute__((target("avx2,fma"))) void dscores_row_avx2(float* dp, const float* p, float delta, float scale,
                                                          int64_t sk) {
  const int64_t sv8 = sk & ~int64_t(7);
  const __m256 dv = _mm256_set1_ps(delta), sv = _mm256_set1_ps(scale);
  for (int64_t j = 0; j < sv8; j += 8) {
    const __m256 ps = _mm256_mul_ps(_mm256_loadu_ps(p + j), sv);
    _mm256_storeu_ps(dp + j, _mm256_mul_ps(ps, _mm256_sub_ps(_mm256_loadu_ps(dp + j), dv)));
  }
  dscores_row_scalar(dp + sv8, p + sv8, delta, scale, sk - sv8);
}


// softmax_row_avx2 on 16 lanes: the softmax is bound by its instructions (exp), so twice the lanes cut it
// from 0.30 to 0.20 ms for 16 x 256 x 256 on 2 cores (3.20 -> 3.08 ms for the whole pruned attention
// forward + backward with confidence, B=8 H=20 S=256 D=32, 2 of 20 heads kept). dS is bound by memory and
// stays on AVX2.
__attribute__((target("avx512f"))) float softmax_row_avx512(float* x, const float* b, float scale, int64_t hi,
                                                            int64_t sk) {
  const int64_t hv = hi & ~int64_t(15);
  const __m512 sv = _mm512_set1_ps(scale);
  __m512 mv = _mm512_set1_ps(kNegInf);
  __mmask16 nan = 0;
  for (int64_t j = 0; j < hv; j += 16) {
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + j), sv);
    if (b) v = _mm512_add_ps(v, _mm512_loadu_ps(b + j));
    _mm512_storeu_ps(x + j, v);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    mv = _mm512_max_ps(mv, v);
  }
  bool bad = nan != 0;
  float top;
  const float m = scale_bias_max_scalar(x, b, scale, hv, hi, _mm512_reduce_max_ps(mv), &bad);
  if (special_row(x, hi, sk, m, bad, &top)) return top;
  const __m512 mb = _mm512_set1_ps(m);
  __m512 s = _mm512_setzero_ps();
  for (int64_t j = 0; j < hv; j += 16) {
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(x + j), mb));
    _mm512_storeu_ps(x + j, e);
    s = _mm512_add_ps(s, e);
  }
  float sum = _mm512_reduce_add_ps(s);
  for (int64_t j = hv; j < hi; ++j) sum += (x[j] = std::exp(x[j] - m));
  const float inv = 1.0f / sum;
  const __m512 iv = _mm512_set1_ps(inv);
  for (int64_t j = 0; j < hv; j += 16) _mm512_storeu_ps(x + j, _mm512_mul_ps(_mm512_loadu_ps(x + j), iv));
  for (int64_t j = hv; j < hi; ++j) x[j] *= inv;
  return inv;
}

#endif

template <class T>
T* data_of(py::array_t<T>& x, int64_t n, const char* what) {
  FS_CHECK(x.size() == n, std::string(what) + " has the wrong number of elements");
  FS_CHECK(x.flags() & py::array::c_style, std::string(what) + " must be C-contiguous");
  FS_CHECK(x.writeable(), std::string(what) + " must be writable");
  return x.mutable_data();
}

template <class T>
const T* optional_data(const py::object& x, int64_t n, const char* what, py::array_t<T>& keep) {
  if (x.is_none()) return nullptr;
  FS_CHECK(py::isinstance<py::array_t<T>>(x), std::string(what) + " has the wrong dtype");
  keep = py::reinterpret_borrow<py::array_t<T>>(x);
  FS_CHECK(keep.size() == n && (keep.flags() & py::array::c_style),
           std::string(what) + " must be C-contiguous with the right number of elements");
  return keep.data();
}

// Parallel over rows when there is enough work for a second thread to pay off.
constexpr int64_t kParallelElements = 1 << 16;

void attention_softmax(py::array_t<float>& s, float scale, const py::object& bias, int64_t bias_rows,
                       bool causal, const py::object& qvalid, const py::object& maxp, int max_level) {
  FS_CHECK(s.ndim() == 3, "s must be [N, Sq, Sk]");
  const int64_t N = s.shape(0), Sq = s.shape(1), Sk = s.shape(2);
  float* x = data_of(s, N * Sq * Sk, "s");
  FS_CHECK(bias.is_none() || bias_rows == 1 || bias_rows == Sq, "bias_rows must be 1 or Sq");
  py::array_t<float> bias_a, maxp_a;
  py::array_t<bool> qv_a;
  const float* b = optional_data(bias, N * bias_rows * Sk, "bias", bias_a);
  const bool* qv = optional_data(qvalid, N * Sq, "qvalid", qv_a);
  float* mp = nullptr;
  if (!maxp.is_none()) {
    FS_CHECK(py::isinstance<py::array_t<float>>(maxp), "maxp must be a float32 array or None");
    maxp_a = py::reinterpret_borrow<py::array_t<float>>(maxp);
    mp = data_of(maxp_a, N * Sq, "maxp");
  }
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
#ifdef FS_X86
      top = simd == 2   ? softmax_row_avx512(row, br, scale, hi, Sk)
            : simd == 1 ? softmax_row_avx2(row, br, scale, hi, Sk)
                        : softmax_row_scalar(row, br, scale, hi, Sk);
#else
      top = softmax_row_scalar(row, br, scale, hi, Sk);
#endif
    }
    if (mp) mp[r] = top;
  }
}

void attention_dscores(py::array_t<float>& dp, const py::array_t<float>& p, const py::array_t<float>& delta,
                       float scale, int max_level) {
  FS_CHECK(dp.ndim() == 3, "dp must be [N, Sq, Sk]");
  const int64_t N = dp.shape(0), Sq = dp.shape(1), Sk = dp.shape(2);
  float* d = data_of(dp, N * Sq * Sk, "dp");
  FS_CHECK(p.size() == N * Sq * Sk && (p.flags() & py::array::c_style), "p must be C-contiguous like dp");
  FS_CHECK(delta.size() == N * Sq && (delta.flags() & py::array::c_style), "delta must be C-contiguous [N, Sq]");
  const float* pp = p.data();
  const float* dl = delta.data();
  const int simd = simd_level(max_level);
  const int64_t rows = N * Sq;
  py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static) if (rows > 1 && rows * Sk > kParallelElements)
  for (int64_t r = 0; r < rows; ++r) {
#ifdef FS_X86
    if (simd) {
      dscores_row_avx2(d + r * Sk, pp + r * Sk, dl[r], scale, Sk);  // bound by memory: AVX-512 gains nothing
      continue;
    }
#endif
    dscores_row_scalar(d + r * Sk, pp + r * Sk, dl[r], scale, Sk);
  }
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
