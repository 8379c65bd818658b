// Row kernels of attention with materialized probabilities, shared by the elementwise passes
// (attention_probs.cpp) and the fused kernel (attention_fused.cpp):
//   softmax_row: x [0, hi) <- softmax(scale * x + b), x [hi, sk) <- 0; returns the largest probability;
//   dscores_row: dp <- scale * p * (dp - delta).
// Policies (the same as ATen's CPU flash attention and the reference): a row with no key to attend to gives
// probabilities 0 and largest probability 0; a NaN (or +inf) logit makes its whole row NaN.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "simd.h"

namespace fedsparse {
namespace attn_rows {
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Row x [0, hi) <- scale * x + b (b may be null), returns the max; sets *bad if a value is NaN.
inline float scale_bias_max_scalar(float* x, const float* b, float scale, int64_t j, int64_t hi, float m, bool* bad) {
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
inline bool special_row(float* x, int64_t hi, int64_t sk, float m, bool bad, float* top) {
  std::fill(x + hi, x + sk, 0.0f);
  if (!(bad || m == -kNegInf || m == kNegInf)) return false;
  *top = m == kNegInf && !bad ? 0.0f : kNaN;
  std::fill(x, x + hi, *top);
  return true;
}

// Softmax of x [0, hi) in place, x [hi, sk) = 0; returns 1 / sum of exp (the largest probability).
inline float softmax_row_scalar(float* x, const float* b, float scale, int64_t hi, int64_t sk) {
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

inline void dscores_row_scalar(float* dp, const float* p, float delta, float scale, int64_t sk) {
  for (int64_t j = 0; j < sk; ++j) dp[j] = scale * p[j] * (dp[j] - delta);
}

#ifdef FS_X86
__attribute__((target("avx2,fma"))) inline float softmax_row_avx2(float* x, const float* b, float scale, int64_t hi,
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

__attribute__((target("avx2,fma"))) inline void dscores_row_avx2(float* dp, const float* p, float delta, float scale,
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
// stays on AVX2. No NaN test in the first pass: exp_avx512 keeps NaN, so a NaN logit makes the sum, and with
// it the whole row and its largest probability, NaN; only a row whose maximum is -inf is searched for one.
__attribute__((target("avx512f"))) inline float softmax_row_avx512(float* x, const float* b, float scale, int64_t hi,
                                                            int64_t sk) {
  const int64_t hv = hi & ~int64_t(15);
  const __m512 sv = _mm512_set1_ps(scale);
  __m512 mv = _mm512_set1_ps(kNegInf);
  for (int64_t j = 0; j < hv; j += 16) {
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + j), sv);
    if (b) v = _mm512_add_ps(v, _mm512_loadu_ps(b + j));
    _mm512_storeu_ps(x + j, v);
    mv = _mm512_max_ps(mv, v);
  }
  bool bad = false;
  float top;
  const float m = scale_bias_max_scalar(x, b, scale, hv, hi, _mm512_reduce_max_ps(mv), &bad);
  if (m == kNegInf) bad |= std::any_of(x, x + hv, [](float v) { return std::isnan(v); });
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

// The widest row kernels at simd level (2 = AVX-512, 1 = AVX2, 0 = scalar; see simd_level).
inline float softmax_row(int simd, float* x, const float* b, float scale, int64_t hi, int64_t sk) {
#ifdef FS_X86
  if (simd == 2) return softmax_row_avx512(x, b, scale, hi, sk);
  if (simd == 1) return softmax_row_avx2(x, b, scale, hi, sk);
#endif
  (void)simd;
  return softmax_row_scalar(x, b, scale, hi, sk);
}

// dS is bound by memory: AVX-512 gains nothing over AVX2.
inline void dscores_row(int simd, float* dp, const float* p, float delta, float scale, int64_t sk) {
#ifdef FS_X86
  if (simd) return dscores_row_avx2(dp, p, delta, scale, sk);
#endif
  dscores_row_scalar(dp, p, delta, scale, sk);
}

}  // namespace attn_rows
}  // namespace fedsparse
