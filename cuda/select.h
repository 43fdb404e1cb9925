/*
 * select.h — REFORM's query-time token selection (rf_smooth_select), host-only C++17 shared by the CPU and the
 * CUDA builds. At a million context tokens a JavaScript sort of the scores costs more than the scoring itself;
 * this is O(n): a sliding moving average and a two-pass radix select of the k-th largest score.
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

}  // namespace rf

#endif /* REFORM_SELECT_H */
