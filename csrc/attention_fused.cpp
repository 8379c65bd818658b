// Fused CPU attention over the kept (batch, head) pairs of pruned attention, forward and backward, with each
// pair's probabilities P [Sq, Sk] kept from the forward to the backward (probs [N, Sq, Sk]):
//   forward:  P = softmax(scale * q k^T + bias) (causal; padded queries give P rows of 0; each row's largest
//             probability for confidence), o = P v;
//   backward: dv = P^T dO, dP = dO v^T, dS = scale * P * (dP - delta) with delta_i = <dO_i, o_i>,
//             dq = dS k, dk = dS^T q.
// That is six GEMMs per pair where flash attention needs seven (it recomputes q k^T), with no gather: q, k, v
// and dO are read in place (any strides, last dimension contiguous). The outputs and gradients are the full
// [B, H, ...] tensors, written in the same parallel pass: kept pairs computed, pruned pairs zeroed. A job is a
// kept pair in the forward, a key/value head in the backward (grouped-query heads that share it add into its
// dk, dv in turn), each with its P in cache. A forward without a backward keeps no P: each thread computes its
// pairs' in a buffer of its own.
//
// GEMMs: register-blocked AVX-512 micro-kernels, MR rows x NV vectors of 16 floats of C per call, with B's rows
// streamed along k and A's elements broadcast; row and column tails by clamping and masks. Elsewhere a plain
// loop, correct but slow: the Python side uses this kernel only where AVX-512 runs (simd_level() == 2).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "arrays.h"
#include "attention_rows.h"
#include "common.h"

namespace py = pybind11;

namespace fedsparse {
namespace {

// C [M, N] = A B (add: C += A B) with A(m, k) = a[m * sam + k * sak] and B, C row-major (row strides ldb,
// ldc).
void gemm_plain(int64_t M, int64_t N, int64_t K, const float* a, int64_t sam, int64_t sak, const float* b,
                int64_t ldb, float* c, int64_t ldc, bool add) {
  for (int64_t m = 0; m < M; ++m) {
    float* cr = c + m * ldc;
    if (!add) std::fill(cr, cr + N, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const float x = a[m * sam + k * sak];
      const float* br = b + k * ldb;
      for (int64_t n = 0; n < N; ++n) cr[n] += x * br[n];
    }
  }
}

// dst [cols, rows] = src [rows, cols] (row stride rs) transposed.
void transpose_plain(const float* src, int64_t rs, int64_t rows, int64_t cols, float* dst) {
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t d = 0; d < cols; ++d) dst[d * rows + j] = src[j * rs + d];
}

#ifdef FS_X86
// What a micro-kernel stores: C = A B, C += A B, or (for dP = A B) dS = scale * P * (dP - delta), with P laid
// out like C and delta per row.
enum Epi { kStore, kAdd, kDScores };

// rows (<= MR) rows x the columns of mask of C = A B over k in [0, K). FULL blocks (rows == MR, every mask
// full) load and store without masks; otherwise rows past `rows` repeat the last one (computed, never stored).
template <int MR, int NV, bool FULL, Epi EPI>
__attribute__((target("avx512f"))) void micro_avx512(int64_t K, const float* a, int64_t sam, int64_t sak, int rows,
                                                     const float* b, int64_t ldb, const __mmask16* mask, float* c,
                                                     int64_t ldc, const float* p, const float* delta, float scale) {
  const float* ar[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) ar[r] = a + (FULL ? r : std::min(r, rows - 1)) * sam;
  __mmask16 mk[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) mk[v] = FULL ? __mmask16(0xFFFF) : mask[v];
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const float* cr = c + std::min(r, rows - 1) * ldc + 16 * v;
      acc[r][v] = EPI != kAdd ? _mm512_setzero_ps() : FULL ? _mm512_loadu_ps(cr) : _mm512_maskz_loadu_ps(mk[v], cr);
    }
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = FULL ? _mm512_loadu_ps(b + k * ldb + 16 * v) : _mm512_maskz_loadu_ps(mk[v], b + k * ldb + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_set1_ps(ar[r][k * sak]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(x, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    if (!FULL && r >= rows) break;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      __m512 x = acc[r][v];
      if (EPI == kDScores) {
        const float* pr = p + r * ldc + 16 * v;
        const __m512 ps = _mm512_mul_ps(FULL ? _mm512_loadu_ps(pr) : _mm512_maskz_loadu_ps(mk[v], pr),
                                        _mm512_set1_ps(scale));
        x = _mm512_mul_ps(ps, _mm512_sub_ps(x, _mm512_set1_ps(delta[r])));
      }
      if (FULL)
        _mm512_storeu_ps(c + r * ldc + 16 * v, x);
      else
        _mm512_mask_storeu_ps(c + r * ldc + 16 * v, mk[v], x);
    }
  }
}

template <int MR, int NV, Epi EPI>
__attribute__((target("avx512f"))) void gemm_avx512(int64_t M, int64_t N, int64_t K, const float* a, int64_t sam,
                                                    int64_t sak, const float* b, int64_t ldb, float* c, int64_t ldc,
                                                    const float* p, const float* delta, float scale) {
  for (int64_t n0 = 0; n0 < N; n0 += 16 * NV) {
    __mmask16 mask[NV];
    bool full_cols = true;
    for (int v = 0; v < NV; ++v) {
      const int64_t left = N - n0 - 16 * v;
      mask[v] = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
      full_cols &= left >= 16;
    }
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int rows = int(std::min<int64_t>(MR, M - m0));
      const int64_t at = m0 * ldc + n0;
      const float *pb = EPI == kDScores ? p + at : nullptr, *db = EPI == kDScores ? delta + m0 : nullptr;
      if (full_cols && rows == MR)
        micro_avx512<MR, NV, true, EPI>(K, a + m0 * sam, sam, sak, rows, b + n0, ldb, mask, c + at, ldc, pb, db,
                                        scale);
      else
        micro_avx512<MR, NV, false, EPI>(K, a + m0 * sam, sam, sak, rows, b + n0, ldb, mask, c + at, ldc, pb, db,
                                         scale);
    }
  }
}

// One masked gather per 16 rows of a column (rs * 15 must fit an int32).
__attribute__((target("avx512f"))) void transpose_avx512(const float* src, int64_t rs, int64_t rows,
                                                         int64_t cols, float* dst) {
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(int(rs)));
  for (int64_t j0 = 0; j0 < rows; j0 += 16) {
    const int64_t left = rows - j0;
    const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    for (int64_t d = 0; d < cols; ++d)
      _mm512_mask_storeu_ps(dst + d * rows + j0, m,
                            _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, src + j0 * rs + d, 4));
  }
}
#endif

// C [M, N] = A B, or C += A B with add (see gemm_plain). Wide C (N > 32: the Sk columns of q k^T) uses
// 6 x 64 blocks, narrow C (a head dimension up to 32) 12 x 32: 24 accumulators either way.
void gemm(int simd, int64_t M, int64_t N, int64_t K, const float* a, int64_t sam, int64_t sak, const float* b,
          int64_t ldb, float* c, int64_t ldc, bool add = false) {
#ifdef FS_X86
  if (simd == 2) {
    if (N > 32)
      (add ? gemm_avx512<6, 4, kAdd> : gemm_avx512<6, 4, kStore>)(M, N, K, a, sam, sak, b, ldb, c, ldc, nullptr,
                                                                   nullptr, 0.0f);
    else
      (add ? gemm_avx512<12, 2, kAdd> : gemm_avx512<12, 2, kStore>)(M, N, K, a, sam, sak, b, ldb, c, ldc, nullptr,
                                                                     nullptr, 0.0f);
    return;
  }
#endif
  gemm_plain(M, N, K, a, sam, sak, b, ldb, c, ldc, add);
}

// dS [M, N] = scale * P * (A B - delta) (row-wise delta; P, dS row-major with stride ldc): the dP GEMM of the
// backward with the dS pass in its stores.
void gemm_dscores(int simd, int64_t M, int64_t N, int64_t K, const float* a, int64_t sam, int64_t sak,
                  const float* b, int64_t ldb, float* ds, int64_t ldc, const float* p, const float* delta,
                  float scale) {
#ifdef FS_X86
  if (simd == 2) return gemm_avx512<6, 4, kDScores>(M, N, K, a, sam, sak, b, ldb, ds, ldc, p, delta, scale);
#endif
  gemm_plain(M, N, K, a, sam, sak, b, ldb, ds, ldc, false);
  for (int64_t i = 0; i < M; ++i) attn_rows::dscores_row(simd, ds + i * ldc, p + i * ldc, delta[i], scale, N);
}

void transpose(int simd, const float* src, int64_t rs, int64_t rows, int64_t cols, float* dst) {
#ifdef FS_X86
  if (simd == 2 && rs * 15 < (int64_t(1) << 31)) return transpose_avx512(src, rs, rows, cols, dst);
#endif
  transpose_plain(src, rs, rows, cols, dst);
}

// A float32 [B, H, S, D] array: data and strides in elements; the last dimension contiguous.
struct View4 {
  float* p = nullptr;
  int64_t n[4] = {0, 0, 0, 0};
  int64_t s[4] = {0, 0, 0, 0};
  // Row 0 of pair bh (= b * H + h).
  float* pair(int64_t bh) const { return p + (bh / n[1]) * s[0] + (bh % n[1]) * s[1]; }
};

View4 view4(const py::buffer& buf, const char* what, bool writable, bool contiguous) {
  const py::buffer_info bi = buf.request(writable);
  const std::string name(what);
  FS_CHECK(bi.ndim == 4, name + " must be 4-D [B, H, S, D]");
  FS_CHECK(bi.itemsize == 4 && bi.format == py::format_descriptor<float>::format(), name + " must be float32");
  FS_CHECK(!writable || !bi.readonly, name + " must be writable");
  View4 v;
  v.p = static_cast<float*>(bi.ptr);
  int64_t expect = 1;
  for (int i = 3; i >= 0; --i) {
    v.n[i] = bi.shape[size_t(i)];
    FS_CHECK(bi.strides[size_t(i)] >= 0 && bi.strides[size_t(i)] % 4 == 0, name + " has unsupported strides");
    v.s[i] = bi.strides[size_t(i)] / 4;
    FS_CHECK(!contiguous || v.n[i] <= 1 || v.s[i] == expect, name + " must be C-contiguous");
    expect *= v.n[i];
  }
  FS_CHECK(v.n[3] <= 1 || v.s[3] == 1, name + " must have a contiguous last dimension");
  return v;
}

// Checks the kept pairs (flat b * H + h, each in [0, BH), distinct); returns the pruned ones.
std::vector<int64_t> pruned_pairs(const py::array_t<int64_t>& pairs_a, int64_t BH) {
  FS_CHECK(pairs_a.ndim() == 1 && (pairs_a.size() == 0 || pairs_a.strides(0) == 8),
           "pairs must be a contiguous int64 vector");
  std::vector<char> kept(size_t(BH), 0);
  const int64_t* pairs = pairs_a.data();
  for (int64_t n = 0; n < pairs_a.size(); ++n) {
    FS_CHECK(pairs[n] >= 0 && pairs[n] < BH, "pair index out of range");
    FS_CHECK(!kept[size_t(pairs[n])], "pair indices must be distinct");
    kept[size_t(pairs[n])] = 1;
  }
  std::vector<int64_t> pruned;
  for (int64_t r = 0; r < BH; ++r)
    if (!kept[size_t(r)]) pruned.push_back(r);
  return pruned;
}

// The shapes of one call: q [B, H, Sq, D], k [B, Hk, Sk, D], v [B, Hk, Sk, Dv], H a multiple of Hk (query heads
// h of one group share key/value head h / (H / Hk)).
struct Dims {
  int64_t B, H, Hk, Sq, Sk, D, Dv;
  Dims(const View4& q, const View4& k, const View4& v)
      : B(q.n[0]), H(q.n[1]), Hk(k.n[1]), Sq(q.n[2]), Sk(k.n[2]), D(q.n[3]), Dv(v.n[3]) {
    FS_CHECK(k.n[0] == B && k.n[3] == D && Hk > 0 && H % Hk == 0, "k must be [B, Hk, Sk, D] with Hk dividing H");
    FS_CHECK(v.n[0] == B && v.n[1] == Hk && v.n[2] == Sk, "v must be [B, Hk, Sk, Dv] like k");
  }
  // The key/value head (flat b * Hk + hk) of query pair bh.
  int64_t kv(int64_t bh) const { return (bh / H) * Hk + (bh % H) / (H / Hk); }
};

// Units [0, n_compute) compute, units [n_compute, n_compute + n_zero) zero (argument: the zero unit's index).
// Dynamic: a thread that finishes its share of the compute early takes the zeroing.
template <class Compute, class Zero>
void run_units(int64_t n_compute, int64_t n_zero, int64_t work, Compute compute, Zero zero) {
  const int64_t units = n_compute + n_zero;
#pragma omp parallel if (units > 1 && work > (int64_t(1) << 16))
  {
    std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      if (u < n_compute)
        compute(u, scratch);
      else
        zero(u - n_compute);
    }
  }
}

void attention_fused_forward(const py::buffer& q_b, const py::buffer& k_b, const py::buffer& v_b,
                             const py::array_t<int64_t>& pairs_a, const py::object& bias, int64_t bias_rows,
                             bool causal, float scale, const py::object& qvalid, const py::object& probs_o,
                             const py::buffer& out_b, const py::object& maxp_o, int max_level) {
  const View4 q = view4(q_b, "q", false, false), k = view4(k_b, "k", false, false), v = view4(v_b, "v", false, false);
  const View4 out = view4(out_b, "out", true, true);
  const Dims dm(q, k, v);
  const int64_t Sq = dm.Sq, Sk = dm.Sk, D = dm.D, Dv = dm.Dv;
  FS_CHECK(out.n[0] == dm.B && out.n[1] == dm.H && out.n[2] == Sq && out.n[3] == Dv, "out must be [B, H, Sq, Dv]");
  const std::vector<int64_t> pruned = pruned_pairs(pairs_a, dm.B * dm.H);
  const int64_t N = pairs_a.size();
  FS_CHECK(bias.is_none() || bias_rows == 1 || bias_rows == Sq, "bias_rows must be 1 or Sq");
  const float* bi = optional_array_data<float>(bias, N * bias_rows * Sk, "bias", false);
  const bool* qv = optional_array_data<bool>(qvalid, N * Sq, "qvalid", false);
  float* P = optional_array_data<float>(probs_o, N * Sq * Sk, "probs", true);
  float* mp = optional_array_data<float>(maxp_o, N * Sq, "maxp", true);
  const int64_t* pairs = pairs_a.data();
  const int simd = simd_level(max_level);
  py::gil_scoped_release nogil;
  const auto compute = [&](int64_t n, std::vector<float>& buf) {  // buf: k^T, then P when it is not kept
    const int64_t bh = pairs[n], kvh = dm.kv(bh);
    buf.resize(size_t(D * Sk + (P ? 0 : Sq * Sk)));
    float *kt = buf.data(), *pn = P ? P + n * Sq * Sk : kt + D * Sk;
    transpose(simd, k.pair(kvh), k.s[2], Sk, D, kt);
    gemm(simd, Sq, Sk, D, q.pair(bh), q.s[2], 1, kt, Sk, pn, Sk);  // q k^T
    for (int64_t i = 0; i < Sq; ++i) {
      float* row = pn + i * Sk;
      float top = 0.0f;
      if (qv && !qv[n * Sq + i]) {
        std::fill(row, row + Sk, 0.0f);
      } else {
        const float* br = bi ? bi + (n * bias_rows + (bias_rows == 1 ? 0 : i)) * Sk : nullptr;
        top = attn_rows::softmax_row(simd, row, br, scale, causal ? std::min(Sk, i + 1) : Sk, Sk);
      }
      if (mp) mp[n * Sq + i] = top;
    }
    gemm(simd, Sq, Dv, Sk, pn, Sk, 1, v.pair(kvh), v.s[2], out.p + bh * Sq * Dv, Dv);  // P v
  };
  const auto zero = [&](int64_t z) { std::memset(out.p + pruned[size_t(z)] * Sq * Dv, 0, size_t(Sq * Dv) * 4); };
  run_units(N, int64_t(pruned.size()), N * Sq * Sk * (D + Dv), compute, zero);
}

void attention_fused_backward(const py::buffer& go_b, const py::buffer& q_b, const py::buffer& k_b,
                              const py::buffer& v_b, const py::buffer& out_b, const py::array_t<int64_t>& pairs_a,
                              const py::object& probs_o, float scale, const py::buffer& dq_b, const py::buffer& dk_b,
                              const py::buffer& dv_b, int max_level) {
  const View4 go = view4(go_b, "grad_out", false, false), q = view4(q_b, "q", false, false),
              k = view4(k_b, "k", false, false), v = view4(v_b, "v", false, false),
              out = view4(out_b, "out", false, true), dq = view4(dq_b, "dq", true, true),
              dk = view4(dk_b, "dk", true, true), dv = view4(dv_b, "dv", true, true);
  const Dims dm(q, k, v);
  const int64_t Sq = dm.Sq, Sk = dm.Sk, D = dm.D, Dv = dm.Dv;
  for (const View4* t : {&go, &out})
    FS_CHECK(t->n[0] == dm.B && t->n[1] == dm.H && t->n[2] == Sq && t->n[3] == Dv,
             "grad_out and out must be [B, H, Sq, Dv]");
  FS_CHECK(std::equal(dq.n, dq.n + 4, q.n) && std::equal(dk.n, dk.n + 4, k.n) && std::equal(dv.n, dv.n + 4, v.n),
           "dq, dk, dv must have the shapes of q, k, v");
  const std::vector<int64_t> pruned = pruned_pairs(pairs_a, dm.B * dm.H);
  const int64_t N = pairs_a.size();
  const float* P = array_data<float>(probs_o, N * Sq * Sk, "probs", false);
  const int64_t* pairs = pairs_a.data();
  // One unit per key/value head with kept query heads: they add into its dk, dv one after the other.
  std::vector<std::vector<int64_t>> of_kv(size_t(dm.B * dm.Hk));
  for (int64_t n = 0; n < N; ++n) of_kv[size_t(dm.kv(pairs[n]))].push_back(n);
  std::vector<int64_t> busy_kv, idle_kv;
  for (int64_t r = 0; r < dm.B * dm.Hk; ++r) (of_kv[size_t(r)].empty() ? idle_kv : busy_kv).push_back(r);
  const int simd = simd_level(max_level);
  py::gil_scoped_release nogil;
  const auto compute = [&](int64_t u, std::vector<float>& buf) {
    const int64_t kvh = busy_kv[size_t(u)];
    buf.resize(size_t(Sq * Sk + Dv * Sk + Sq));
    float *ds = buf.data(), *vt = ds + Sq * Sk, *delta = vt + Dv * Sk;
    float *dkp = dk.p + kvh * Sk * D, *dvp = dv.p + kvh * Sk * Dv;
    const float* kp = k.pair(kvh);
    transpose(simd, v.pair(kvh), v.s[2], Sk, Dv, vt);
    bool add = false;
    for (const int64_t n : of_kv[size_t(kvh)]) {
      const int64_t bh = pairs[n];
      const float *pn = P + n * Sq * Sk, *g = go.pair(bh), *o = out.p + bh * Sq * Dv;
      for (int64_t i = 0; i < Sq; ++i) {
        float s = 0.0f;
        for (int64_t d = 0; d < Dv; ++d) s += g[i * go.s[2] + d] * o[i * Dv + d];
        delta[i] = s;
      }
      gemm(simd, Sk, Dv, Sq, pn, 1, Sk, g, go.s[2], dvp, Dv, add);                       // dv (+)= P^T dO
      gemm_dscores(simd, Sq, Sk, Dv, g, go.s[2], 1, vt, Sk, ds, Sk, pn, delta, scale);  // dS from dP = dO v^T
      gemm(simd, Sq, D, Sk, ds, Sk, 1, kp, k.s[2], dq.p + bh * Sq * D, D);             // dq = dS k
      gemm(simd, Sk, D, Sq, ds, 1, Sk, q.pair(bh), q.s[2], dkp, D, add);                // dk (+)= dS^T q
      add = true;
    }
  };
  const auto zero = [&](int64_t z) {  // pruned query heads' dq, then unused key/value heads' dk and dv
    if (z < int64_t(pruned.size())) {
      std::memset(dq.p + pruned[size_t(z)] * Sq * D, 0, size_t(Sq * D) * 4);
      return;
    }
    const int64_t kvh = idle_kv[size_t(z - int64_t(pruned.size()))];
    std::memset(dk.p + kvh * Sk * D, 0, size_t(Sk * D) * 4);
    std::memset(dv.p + kvh * Sk * Dv, 0, size_t(Sk * Dv) * 4);
  };
  run_units(int64_t(busy_kv.size()), int64_t(pruned.size() + idle_kv.size()), N * Sq * Sk * (D + Dv), compute, zero);
}

}  // namespace
}  // namespace fedsparse

void init_attention_fused(py::module_& m) {
  // noconvert on outputs: a silently converted copy would swallow the results.
  m.def("attention_fused_forward", &fedsparse::attention_fused_forward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("pairs").noconvert(), py::arg("bias"), py::arg("bias_rows"), py::arg("causal"), py::arg("scale"),
        py::arg("qvalid"), py::arg("probs"), py::arg("out"), py::arg("maxp"), py::arg("max_level") = 2,
        "Attention of the kept pairs (flat b * H + h, int64 [N]) of float32 q [B, H, Sq, D], k [B, Hk, Sk, D], "
        "v [B, Hk, Sk, Dv] (Hk dividing H; any strides, last dimension contiguous): writes probs [N, Sq, Sk] = "
        "softmax(scale * q k^T + bias) (None: not kept, for calls without a backward), out [B, H, Sq, Dv] "
        "(C-contiguous; pruned pairs 0) and maxp None or float32 [N, Sq] (each row's largest probability). bias "
        "None or float32 [N, bias_rows (1 or Sq), Sk]; causal; qvalid None or bool [N, Sq] (False: the row is 0).");
  m.def("attention_fused_backward", &fedsparse::attention_fused_backward, py::arg("grad_out"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("pairs").noconvert(), py::arg("probs"),
        py::arg("scale"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("max_level") = 2,
        "Gradients of attention_fused_forward from grad_out [B, H, Sq, Dv] (any strides, last dimension "
        "contiguous), its out and probs: writes dq, dk, dv (C-contiguous, shaped like q, k, v; pruned pairs 0).");
  m.def("simd_level", [] { return fedsparse::simd_level(2); },
        "The widest CPU kernels this machine runs: 2 = AVX-512, 1 = AVX2, 0 = scalar.");
}
