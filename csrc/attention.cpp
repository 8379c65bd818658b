// CPU row statistics of attention logits, for head confidence: per query row i of every (batch, head) pair,
//   m_i = max_j l_ij   and   s_i = sum_j exp(l_ij - m_i),   l_ij = scale * <q_i, k_j> + bias_ij (masked: -inf),
// so that the row's largest attention probability is 1 / s_i = exp(m_i - logsumexp_i) (DESIGN.md). The S x S
// logits never exist: a job owns RB query rows of one pair, computes them 4 rows at a time against the whole
// (L1/L2-resident, transposed) key block into a 4 x Sk buffer, reduces it, and moves on.
//
// Why hand-written AVX2 rather than leaving it to the vectorizer: the logits are a [4 x 16] register-blocked
// outer-product loop over D (8 FMAs per 2 key loads + 4 broadcasts) and exp is a Cephes-style polynomial
// with the exponent added in the integer domain; GCC vectorizes neither std::exp nor the reduction order we
// want. A portable scalar path (std::exp) runs where AVX2/FMA is missing; both give the same values to
// ~1e-6 relative. Measured on 2 Xeon cores, B=8, H=20, S=256, D=32: see benchmarks/bench_attention.py.
//
// NaN policy: a row whose logits hold NaN gets m_i = NaN (so the confidence is NaN), never a silent skip.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "arrays.h"
#include "common.h"
#include "simd.h"

namespace py = pybind11;

namespace fedsparse {
namespace {

constexpr int64_t kRowsPerJob = 64;
constexpr int64_t kKeyPad = 16;

struct RowStatsArgs {
  const float* q;     // [N, Sq, D]
  const float* k;     // [N, Sk, D]
  const float* bias;  // [N, bias_rows, Sk] or null
  int64_t N, Sq, Sk, D, bias_rows;
  bool causal, want_sum;
  float scale;
  float* m;  // [N, Sq]
  float* s;  // [N, Sq]
};

// Masks, bias and causal bound applied to a row of raw dot products; returns how many keys stay in play.
inline int64_t finish_logits(const RowStatsArgs& a, int64_t n, int64_t i, float* row) {
  const int64_t hi = a.causal ? std::min(a.Sk, i + 1) : a.Sk;
  const float* b = nullptr;
  if (a.bias) b = a.bias + (n * a.bias_rows + (a.bias_rows == 1 ? 0 : i)) * a.Sk;
  for (int64_t j = 0; j < hi; ++j) row[j] = row[j] * a.scale + (b ? b[j] : 0.0f);
  return hi;
}

void reduce_row_scalar(const float* row, int64_t hi, bool want_sum, float* m_out, float* s_out) {
  float m = kNegInf;
  bool nan = false;
  for (int64_t j = 0; j < hi; ++j) {
    nan |= std::isnan(row[j]);
    m = std::max(m, row[j]);
  }
  if (nan) m = std::numeric_limits<float>::quiet_NaN();
  *m_out = m;
  if (!want_sum) return;
  if (m == kNegInf) {
    *s_out = 0.0f;
    return;
  }
  float s = 0.0f;
  for (int64_t j = 0; j < hi; ++j) s += std::exp(row[j] - m);
  *s_out = s;
}

void dots_scalar(const float* q, const float* kt, int64_t rows, int64_t D, int64_t skp, int64_t hi, float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < hi; ++j) {
      float acc = 0.0f;
      for (int64_t d = 0; d < D; ++d) acc += q[r * D + d] * kt[d * skp + j];
      out[r * skp + j] = acc;
    }
}

#ifdef FS_X86
// row holds hi valid logits; the vector loops read up to round_up(hi, 8) (the buffer is padded with -inf).
__attribute__((target("avx2,fma"))) void reduce_row_avx2(float* row, int64_t hi, bool want_sum, float* m_out,
                                                         float* s_out) {
  const int64_t hv = (hi + 7) & ~int64_t(7);
  for (int64_t j = hi; j < hv; ++j) row[j] = kNegInf;
  __m256 mv = _mm256_set1_ps(kNegInf), nanv = _mm256_setzero_ps();
  for (int64_t j = 0; j < hv; j += 8) {
    const __m256 x = _mm256_loadu_ps(row + j);
    nanv = _mm256_or_ps(nanv, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    mv = _mm256_max_ps(mv, x);
  }
  float m = hmax(mv);
  if (_mm256_movemask_ps(nanv)) m = std::numeric_limits<float>::quiet_NaN();
  *m_out = m;
  if (!want_sum) return;
  if (m == kNegInf || std::isnan(m)) {
    *s_out = m == kNegInf ? 0.0f : m;
    return;
  }
  const __m256 mb = _mm256_set1_ps(m);
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= hv; j += 16) {
    s0 = _mm256_add_ps(s0, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(row + j), mb)));
    s1 = _mm256_add_ps(s1, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(row + j + 8), mb)));
  }
  for (; j < hv; j += 8) s0 = _mm256_add_ps(s0, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(row + j), mb)));
  *s_out = hsum(_mm256_add_ps(s0, s1));
}

// out[r, j] = <q_r, k_j> for R rows (R <= 4) and keys [0, hi) rounded up to 16; kt is [D, skp], skp % 16 == 0.
template <int R>
__attribute__((target("avx2,fma"))) void dots_avx2(const float* q, const float* kt, int64_t D, int64_t skp,
                                                   int64_t hi, float* out) {
  for (int64_t j = 0; j < hi; j += 16) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const __m256 k0 = _mm256_loadu_ps(kt + d * skp + j), k1 = _mm256_loadu_ps(kt + d * skp + j + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 qb = _mm256_broadcast_ss(q + r * D + d);
        acc[r][0] = _mm256_fmadd_ps(qb, k0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(qb, k1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(out + r * skp + j, acc[r][0]);
      _mm256_storeu_ps(out + r * skp + j + 8, acc[r][1]);
    }
  }
}

#endif

void row_stats_job(const RowStatsArgs& a, int64_t n, int64_t i0, int64_t i1, std::vector<float>& kt,
                   std::vector<float>& buf, bool simd) {
  const int64_t skp = (a.Sk + kKeyPad - 1) / kKeyPad * kKeyPad;
  // Only keys a causal row block can see need transposing.
  const int64_t kmax = a.causal ? std::min(a.Sk, i1) : a.Sk;
  kt.assign(size_t(a.D * skp), 0.0f);
  const float* kn = a.k + n * a.Sk * a.D;
  for (int64_t j = 0; j < kmax; ++j)
    for (int64_t d = 0; d < a.D; ++d) kt[size_t(d * skp + j)] = kn[j * a.D + d];
  buf.resize(size_t(4 * skp));
  for (int64_t i = i0; i < i1; i += 4) {
    const int64_t rows = std::min<int64_t>(4, i1 - i);
    const float* qi = a.q + (n * a.Sq + i) * a.D;
    const int64_t hi = a.causal ? std::min(a.Sk, i + rows) : a.Sk;
#ifdef FS_X86
    if (simd) {
      switch (rows) {
        case 4: dots_avx2<4>(qi, kt.data(), a.D, skp, hi, buf.data()); break;
        case 3: dots_avx2<3>(qi, kt.data(), a.D, skp, hi, buf.data()); break;
        case 2: dots_avx2<2>(qi, kt.data(), a.D, skp, hi, buf.data()); break;
        default: dots_avx2<1>(qi, kt.data(), a.D, skp, hi, buf.data()); break;
      }
    } else {
      dots_scalar(qi, kt.data(), rows, a.D, skp, hi, buf.data());
    }
#else
    dots_scalar(qi, kt.data(), rows, a.D, skp, hi, buf.data());
#endif
    for (int64_t r = 0; r < rows; ++r) {
      float* row = buf.data() + r * skp;
      const int64_t h = finish_logits(a, n, i + r, row);
      float* mo = a.m + n * a.Sq + i + r;
      float* so = a.s + n * a.Sq + i + r;
#ifdef FS_X86
      if (simd) {
        reduce_row_avx2(row, h, a.want_sum, mo, so);
        continue;
      }
#endif
      reduce_row_scalar(row, h, a.want_sum, mo, so);
    }
  }
}

void attention_row_stats(const py::array_t<float>& q, const py::array_t<float>& k,
                         const py::object& bias, int64_t bias_rows, bool causal, float scale,
                         py::array_t<float>& m, py::array_t<float>& s, bool want_sum, bool force_scalar) {
  FS_CHECK(q.ndim() == 3 && k.ndim() == 3, "q and k must be [N, S, D]");
  const int64_t N = q.shape(0), Sq = q.shape(1), D = q.shape(2), Sk = k.shape(1);
  FS_CHECK(k.shape(0) == N && k.shape(2) == D, "k must be [N, Sk, D] like q");
  RowStatsArgs a{};
  a.q = array_data<float>(q, N * Sq * D, "q", false);
  a.k = array_data<float>(k, N * Sk * D, "k", false);
  FS_CHECK(bias.is_none() || bias_rows == 1 || bias_rows == Sq, "bias_rows must be 1 or Sq");
  a.bias = optional_array_data<float>(bias, N * bias_rows * Sk, "bias", false);
  a.N = N; a.Sq = Sq; a.Sk = Sk; a.D = D; a.bias_rows = bias_rows;
  a.causal = causal; a.want_sum = want_sum; a.scale = scale;
  a.m = array_data<float>(m, N * Sq, "m", true);
  a.s = array_data<float>(s, N * Sq, "s", true);
  if (N == 0 || Sq == 0) return;
  if (Sk == 0) {
    std::fill(a.m, a.m + N * Sq, kNegInf);
    std::fill(a.s, a.s + N * Sq, 0.0f);
    return;
  }
  const bool simd = have_avx2() && !force_scalar;
  const int64_t blocks = (Sq + kRowsPerJob - 1) / kRowsPerJob, jobs = N * blocks;
  py::gil_scoped_release nogil;
#pragma omp parallel if (jobs > 1 && N * Sq * Sk * D > (1 << 16))
  {
    std::vector<float> kt, buf;
#pragma omp for schedule(dynamic, 1)
    for (int64_t job = 0; job < jobs; ++job) {
      const int64_t n = job / blocks, i0 = (job % blocks) * kRowsPerJob;
      row_stats_job(a, n, i0, std::min(Sq, i0 + kRowsPerJob), kt, buf, simd);
    }
  }
}

// dst viewed as [R, row_bytes]: row rows[n] = src row n, every other row = 0, in one parallel pass. This is how
// the CPU path writes the full-size output and gradients of pruned attention (a memset per pruned (b, h),
// a memcpy per kept one): torch's zero_() + index_copy_() writes the kept rows twice and runs two passes.
#ifdef FS_X86
// Zeros with non-temporal stores: no read-for-ownership of lines that are only overwritten.
__attribute__((target("avx2"))) void zero_stream(uint8_t* p, int64_t n) {
  const __m256i z = _mm256_setzero_si256();
  for (int64_t i = 0; i < n; i += 32) _mm256_stream_si256(reinterpret_cast<__m256i*>(p + i), z);
}
#else
void zero_stream(uint8_t* p, int64_t n) { std::memset(p, 0, size_t(n)); }
#endif

void scatter_rows(const py::buffer& dst_b, const py::buffer& src_b, const py::array_t<int64_t>& rows_a,
                  int64_t row_bytes, bool streaming) {
  py::buffer_info dst = dst_b.request(true), src = src_b.request();
  FS_CHECK(!dst.readonly, "dst must be writable");
  FS_CHECK(row_bytes > 0, "row_bytes must be positive");
  const int64_t dst_bytes = dst.size * dst.itemsize, src_bytes = src.size * src.itemsize;
  FS_CHECK(dst_bytes % row_bytes == 0, "dst must hold whole rows");
  const auto contiguous = [](const py::buffer_info& b) {
    int64_t expect = b.itemsize;
    for (int64_t i = b.ndim - 1; i >= 0; --i) {
      if (b.shape[size_t(i)] != 1 && b.strides[size_t(i)] != expect) return false;
      expect *= b.shape[size_t(i)];
    }
    return true;
  };
  FS_CHECK(contiguous(dst) && contiguous(src), "dst and src must be C-contiguous");
  const int64_t R = dst_bytes / row_bytes, N = rows_a.size();
  FS_CHECK(src_bytes == N * row_bytes, "src must hold one row per index");
  FS_CHECK(rows_a.ndim() == 1 && (N == 0 || rows_a.strides(0) == 8), "rows must be a contiguous int64 vector");
  std::vector<int64_t> from(size_t(R), -1);
  const int64_t* rows = rows_a.data();
  for (int64_t n = 0; n < N; ++n) {
    FS_CHECK(rows[n] >= 0 && rows[n] < R, "row index out of range");
    FS_CHECK(from[size_t(rows[n])] < 0, "row indices must be distinct");
    from[size_t(rows[n])] = n;
  }
  uint8_t* d = static_cast<uint8_t*>(dst.ptr);
  const uint8_t* sp = static_cast<const uint8_t*>(src.ptr);
  const bool stream = streaming && have_avx2() && row_bytes % 32 == 0 && reinterpret_cast<uintptr_t>(d) % 32 == 0;
  py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static) if (dst_bytes > (1 << 18))
  for (int64_t r = 0; r < R; ++r) {
    if (from[size_t(r)] >= 0)
      std::memcpy(d + r * row_bytes, sp + from[size_t(r)] * row_bytes, size_t(row_bytes));
    else if (stream)
      zero_stream(d + r * row_bytes, row_bytes);
    else
      std::memset(d + r * row_bytes, 0, size_t(row_bytes));
  }
#ifdef FS_X86
  if (stream) _mm_sfence();
#endif
}

}  // namespace
}  // namespace fedsparse

void init_attention(py::module_& m) {
  // noconvert: a silently converted copy of an output array would swallow the results.
  m.def("attention_row_stats", &fedsparse::attention_row_stats, py::arg("q").noconvert(),
        py::arg("k").noconvert(), py::arg("bias"), py::arg("bias_rows"), py::arg("causal"), py::arg("scale"),
        py::arg("m").noconvert(), py::arg("s").noconvert(),
        py::arg("want_sum"), py::arg("force_scalar") = false,
        "Row max m and sum of exp(l - m) of l = scale * q k^T + bias (causal: key j > row i masked), float32 "
        "C-contiguous q [N, Sq, D], k [N, Sk, D], bias None or [N, bias_rows (1 or Sq), Sk]; writes m, s "
        "[N, Sq] (m = -inf, s = 0 for a row with nothing to attend to; m = NaN if a logit is NaN).");
  m.def("scatter_rows", &fedsparse::scatter_rows, py::arg("dst"), py::arg("src"), py::arg("rows").noconvert(),
        py::arg("row_bytes"), py::arg("streaming") = false,
        "dst as [R, row_bytes] bytes: row rows[n] <- src row n, all other rows zeroed; one parallel pass.");
}
