/*
 * select.h — REFORM's query path after the query embedding (rf_smooth_select, rf_score_select), host-only C++17
 * shared by the CPU and the CUDA builds. At a million context tokens a JavaScript sort of the scores costs more than
 * the scoring itself; this is O(n): a sliding moving average and a two-pass radix select of the k-th largest score.
 * The CPU scoring here (score_rows) streams the mmapped f16 embeddings once, widening 16 values per instruction.
 *
 * The results are exactly those of src/engine/query.ts smoothScores + selectTokens (the reference the tests
 * compare against): the average uses f64 prefix sums in the same order, rounded once to f32; ties go to the
 * earlier position. Included by exactly one translation unit per library, after reform_common.h.
 */
#ifndef REFORM_SELECT_H
#define REFORM_SELECT_H

#include "reform_common.h"

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__F16C__) || defined(__AVX512F__))
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace rf {

/* Order-preserving map of a float to uint32 (a larger score gets a larger key). -0 and +0 share a key because
 * the reference comparator treats them as equal; NaN gets key 0, ranking below every number (the reference's
 * order for NaN is whatever its sort made of an inconsistent comparator). */
inline uint32_t select_key(float f) {
  if (f != f) return 0;
  if (f == 0.f) f = 0.f;
  uint32_t u;
  memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* Centered moving average of width 2*half+1 over the part of the window inside [0, n). The two running prefix
 * sums advance through the same additions as query.ts's prefix array, so every value matches it bit for bit. */
inline void smooth_scores(const float* s, int64_t n, int64_t half, float* out) {
  if (half <= 0) {
    memcpy(out, s, (size_t)n * sizeof(float));
    return;
  }
  double p_lo = 0, p_hi = 0;
  int64_t i_lo = 0, i_hi = 0;
  for (int64_t i = 0; i < n; i++) {
    const int64_t lo = i - half > 0 ? i - half : 0;
    const int64_t hi = i + half + 1 < n ? i + half + 1 : n;
    while (i_hi < hi) p_hi += s[i_hi++];
    while (i_lo < lo) p_lo += s[i_lo++];
    out[i] = (float)((p_hi - p_lo) / (double)(hi - lo));
  }
}

/* The k-th largest key among sm[lo..hi) (1 <= k <= hi - lo) and how many positions holding exactly that key are
 * taken (the earliest ones), from a 16-bit histogram of the high halves and one of the low halves in that bin. */
inline void kth_key(const float* sm, int64_t lo, int64_t hi, int64_t k, uint32_t* key, int64_t* take_eq) {
  std::vector<int64_t> hist(65536);
  for (int64_t i = lo; i < hi; i++) hist[select_key(sm[i]) >> 16]++;
  int64_t above = 0;
  int b = 65535;
  while (above + hist[(size_t)b] < k) above += hist[(size_t)b--];
  std::fill(hist.begin(), hist.end(), 0);
  for (int64_t i = lo; i < hi; i++) {
    const uint32_t kk = select_key(sm[i]);
    if ((int)(kk >> 16) == b) hist[kk & 0xffffu]++;
  }
  int t = 65535;
  while (above + hist[(size_t)t] < k) above += hist[(size_t)t--];
  *key = ((uint32_t)b << 16) | (uint32_t)t;
  *take_eq = k - above;
}

/* smoothScores(scores, window) then selectTokens(smoothed, budget, edge) of query.ts; see rf_smooth_select. */
inline int64_t smooth_select(const float* scores, int64_t n, int32_t window, int64_t budget, int32_t edge,
                             float* smoothed, int32_t* out_idx) {
  if (n < 0 || n > INT32_MAX || budget < 0) return set_error(RF_ERR_INVALID, "rf_smooth_select: bad sizes");
  if (n > 0 && (!scores || !out_idx)) return set_error(RF_ERR_INVALID, "rf_smooth_select: NULL argument");
  if (n == 0) return 0;
  std::vector<float> own;
  if (!smoothed) {
    own.resize((size_t)n);
    smoothed = own.data();
  }
  smooth_scores(scores, n, window > 0 ? window / 2 : 0, smoothed);
  if (n <= budget) {
    for (int64_t i = 0; i < n; i++) out_idx[i] = (int32_t)i;
    return n;
  }
  const int64_t e = std::max<int64_t>(0, std::min<int64_t>(edge, budget / 4));
  const int64_t k = budget - 2 * e;  // < n - 2e because n > budget
  uint32_t key = UINT32_MAX;
  int64_t take_eq = 0;
  if (k > 0) kth_key(smoothed, e, n - e, k, &key, &take_eq);
  int64_t m = 0;
  for (int64_t i = 0; i < n; i++) {
    bool keep = i < e || i >= n - e;
    if (!keep && k > 0) {
      const uint32_t kk = select_key(smoothed[i]);
      keep = kk > key || (kk == key && take_eq > 0 && take_eq--);
    }
    if (keep) out_idx[m++] = (int32_t)i;
  }
  return m;
}

inline void f16_row_to_f32(const uint16_t* src, float* dst, int dim) {
  int d = 0;
#if defined(__x86_64__) && defined(__AVX512F__)
  for (; d + 16 <= dim; d += 16) _mm512_storeu_ps(dst + d, _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256((const __m256i*)(src + d))));  // maskz: GCC 12 warns on the unmasked form
#endif
#if defined(__x86_64__) && defined(__F16C__)
  for (; d + 8 <= dim; d += 8) _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + d))));
#endif
  for (; d < dim; d++) dst[d] = f16_to_f32(src[d]);
}

/* rf_score on the host: out[i] = max_j cos(ctx_i, q_j), cos(a, b) = a.b / (max(|a|, 1e-12) * max(|b|, 1e-12)).
 * Memory-bound at a handful of query rows, so each context row is read once and dotted with four query rows at a
 * time; the sums are f32 (rf_score's reference tolerance, not its bits). */
inline int score_rows(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
                      float* out) {
  if (n_ctx < 0 || dim <= 0 || n_q < 1) return set_error(RF_ERR_INVALID, "rf_score_select: bad sizes");
  if (ctx_dtype != RF_F32 && ctx_dtype != RF_F16)
    return set_error(RF_ERR_INVALID, "rf_score_select: ctx dtype must be f32/f16");
  if (n_ctx == 0) return RF_OK;
  if (!ctx || !q || !out) return set_error(RF_ERR_INVALID, "rf_score_select: NULL argument");
  std::vector<float> qn((size_t)n_q * dim);
  for (int j = 0; j < n_q; j++) {
    const float* src = q + (int64_t)j * dim;
    double ss = 0;
    for (int d = 0; d < dim; d++) ss += (double)src[d] * src[d];
    const float inv = (float)(1.0 / std::max(std::sqrt(ss), 1e-12));
    for (int d = 0; d < dim; d++) qn[(size_t)j * dim + d] = src[d] * inv;
  }
  const float* Q = qn.data();
#pragma omp parallel if (n_ctx * (int64_t)dim * n_q > 65536)
  {
    std::vector<float> buf(ctx_dtype == RF_F16 ? (size_t)dim : 0);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n_ctx; i++) {
      const float* row;
      if (ctx_dtype == RF_F16) {
        f16_row_to_f32((const uint16_t*)ctx + i * dim, buf.data(), dim);
        row = buf.data();
      } else {
        row = (const float*)ctx + i * dim;
      }
      float ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int d = 0; d < dim; d++) ss += row[d] * row[d];
      const float inv = 1.f / std::max(std::sqrt(ss), 1e-12f);
      float best = -INFINITY;
      int j = 0;
      for (; j + 4 <= n_q; j += 4) {
        const float *q0 = Q + (int64_t)j * dim, *q1 = q0 + dim, *q2 = q1 + dim, *q3 = q2 + dim;
        float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int d = 0; d < dim; d++) {
          a0 += row[d] * q0[d];
          a1 += row[d] * q1[d];
          a2 += row[d] * q2[d];
          a3 += row[d] * q3[d];
        }
        best = std::max(best, std::max(std::max(a0, a1), std::max(a2, a3)));
      }
      for (; j < n_q; j++) {
        const float* qj = Q + (int64_t)j * dim;
        float a = 0;
#pragma omp simd reduction(+ : a)
        for (int d = 0; d < dim; d++) a += row[d] * qj[d];
        best = std::max(best, a);
      }
      out[i] = best * inv;
    }
  }
  return RF_OK;
}

/* rf_score_select: score(scores) fills n_ctx scores (rf_score's semantics; the build's own scorer), then
 * smooth_select. `scores` may be NULL (a scratch buffer is used). */
template <class Score>
inline int64_t score_select(Score score, int64_t n_ctx, int32_t window, int64_t budget, int32_t edge, float* scores,
                            int32_t* out_idx) {
  if (n_ctx < 0 || n_ctx > INT32_MAX || budget < 0) return set_error(RF_ERR_INVALID, "rf_score_select: bad sizes");
  std::vector<float> own;
  if (!scores) {
    own.resize((size_t)n_ctx);
    scores = own.data();
  }
  const int rc = score(scores);
  if (rc != RF_OK) return rc;
  return smooth_select(scores, n_ctx, window, budget, edge, nullptr, out_idx);
}

}  // namespace rf

#endif /* REFORM_SELECT_H */
