/*
 * select.h — REFORM's query path after the query embedding (rf_smooth_select, rf_score_select), host-only C++17
 * shared by the CPU and the CUDA builds. At a million context tokens a JavaScript sort of the scores costs more than
 * the scoring itself; this is O(n): a sliding moving average and a two-pass radix select of the k-th largest score.
 * The CPU scoring here (score_rows) streams the mmapped f16 embeddings once, as a register-blocked small GEMM, with
 * each query row's offset (rf_score_select's q_offset) taken off its cosine before the maximum.
 *
 * The results are exactly those of src/engine/selection.ts smoothScores + selectTokens (the reference the tests
 * compare against): the average uses f64 prefix sums in the same order, rounded once to f32; the maximum (max pooling)
 * is a value of the input, NaN read as -inf; ties go to the earlier position. Included by exactly one translation unit
 * per library, after reform_common.h.
 */
#ifndef REFORM_SELECT_H
#define REFORM_SELECT_H

#include "abi_guard.h"
#include "reform_common.h"

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#include <immintrin.h>
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

/* Moving average of width 2*half+1 over the part of the window inside [0, n), the window trailing position i by `lag`
 * (0 <= lag <= half: it covers [i - lag - half, i - lag + half], so i stays inside it; 0 is centered). The two running
 * prefix sums advance through the same additions as selection.ts's prefix array, so every value matches it bit for
 * bit. */
inline void smooth_scores(const float* s, int64_t n, int64_t half, int64_t lag, float* out) {
  if (half <= 0) {
    memcpy(out, s, (size_t)n * sizeof(float));
    return;
  }
  double p_lo = 0, p_hi = 0;
  int64_t i_lo = 0, i_hi = 0;
  for (int64_t i = 0; i < n; i++) {
    const int64_t lo = i - lag - half > 0 ? i - lag - half : 0;
    const int64_t hi = i - lag + half + 1 < n ? i - lag + half + 1 : n;
    while (i_hi < hi) p_hi += s[i_hi++];
    while (i_lo < lo) p_lo += s[i_lo++];
    out[i] = (float)((p_hi - p_lo) / (double)(hi - lo));
  }
}

/* Moving maximum of width 2*half+1 over the part of the window inside [0, n) (trailing i by `lag`, as smooth_scores),
 * NaN counting as -inf: O(n) with a monotone deque of indices (decreasing values), as selection.ts maxPool computes
 * it, so every value matches. */
inline void max_pool(const float* s, int64_t n, int64_t half, int64_t lag, float* out) {
  if (half <= 0) {
    memcpy(out, s, (size_t)n * sizeof(float));
    return;
  }
  const auto v = [&](int64_t i) { return s[i] != s[i] ? -INFINITY : s[i]; };
  std::vector<int32_t> dq((size_t)n);
  int64_t head = 0, tail = 0, next = 0;
  for (int64_t i = 0; i < n; i++) {
    const int64_t hi = i - lag + half + 1 < n ? i - lag + half + 1 : n;
    for (; next < hi; next++) {
      const float x = v(next);
      while (tail > head && v(dq[(size_t)tail - 1]) <= x) tail--;
      dq[(size_t)tail++] = (int32_t)next;
    }
    while (dq[(size_t)head] < i - lag - half) head++;
    out[i] = v(dq[(size_t)head]);
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

inline int check_pool(int32_t pool, const char* where) {
  if (pool == RF_POOL_MEAN || pool == RF_POOL_MAX) return RF_OK;
  return set_error(RF_ERR_INVALID, "%s: pool must be RF_POOL_MEAN (0) or RF_POOL_MAX (1), got %d", where, pool);
}

/* The window's lag must keep the token inside its own window: 0 <= lag <= window / 2. */
inline int check_lag(int32_t window, int32_t lag, const char* where) {
  const int32_t half = window > 0 ? window / 2 : 0;
  if (lag >= 0 && lag <= half) return RF_OK;
  return set_error(RF_ERR_INVALID, "%s: lag = %d must be in [0, window / 2 = %d]", where, lag, half);
}

/* smoothScores(scores, window, pool, lag) then selectTokens(smoothed, budget, edge) of selection.ts; see
 * rf_smooth_select. */
inline int64_t smooth_select(const float* scores, int64_t n, int32_t window, int32_t lag, int32_t pool, int64_t budget,
                             int32_t edge, float* smoothed, int32_t* out_idx) {
  clear_error();  // a success leaves rf_last_error() empty, as the CUDA build's entry points do
  if (n < 0 || n > INT32_MAX || budget < 0) return set_error(RF_ERR_INVALID, "rf_smooth_select: bad sizes");
  if (check_pool(pool, "rf_smooth_select") != RF_OK) return RF_ERR_INVALID;
  if (n > 0 && (!scores || !out_idx)) return set_error(RF_ERR_INVALID, "rf_smooth_select: NULL argument");
  if (check_lag(window, lag, "rf_smooth_select") != RF_OK) return RF_ERR_INVALID;
  if (n == 0) return 0;
  std::vector<float> own;
  if (!smoothed) {
    own.resize((size_t)n);
    smoothed = own.data();
  }
  const int64_t half = window > 0 ? window / 2 : 0;
  if (pool == RF_POOL_MAX) max_pool(scores, n, half, lag, smoothed);
  else smooth_scores(scores, n, half, lag, smoothed);
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

/* The scorer's inner loop is compiled for AVX-512, AVX2 and the baseline, and the CPU picks one at load
 * (GCC target_clones: the library itself is built for the baseline, see scripts/build-native.sh); f16 rows widen
 * with vcvtph2ps where the CPU has it. nvcc's host pass and other compilers get the baseline code only. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define RF_SCORE_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))

__attribute__((target("avx512f"))) static void f16_widen_avx512(const uint16_t* s, float* d, int n) {
  int i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(
        d + i, _mm512_maskz_cvtph_ps(
                   0xffff, _mm256_loadu_si256((const __m256i*)(s + i))));  // maskz: GCC 12 warns on the unmasked form
  for (; i < n; i++) d[i] = f16_to_f32(s[i]);
}
__attribute__((target("avx,f16c"))) static void f16_widen_f16c(const uint16_t* s, float* d, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + i))));
  for (; i < n; i++) d[i] = f16_to_f32(s[i]);
}
#else
#define RF_SCORE_CLONES
#endif

static void f16_widen_scalar(const uint16_t* s, float* d, int n) {
  for (int i = 0; i < n; i++) d[i] = f16_to_f32(s[i]);
}

/* f16 -> f32 for a row, with the widest conversion this CPU has (chosen once) */
[[maybe_unused]] static void f16_widen(const uint16_t* s, float* d, int n) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
  static void (*const fn)(const uint16_t*, float*, int) = __builtin_cpu_supports("avx512f") ? f16_widen_avx512
                                                          : __builtin_cpu_supports("f16c")  ? f16_widen_f16c
                                                                                            : f16_widen_scalar;
  fn(s, d, n);
#else
  f16_widen_scalar(s, d, n);
#endif
}

/* rf_score on the host: out[i] = max_j cos(ctx_i, q_j), cos(a, b) = a.b / (max(|a|, 1e-12) * max(|b|, 1e-12)).
 * A small GEMM (context rows x query rows) whose left side is read once from the (mmapped) embeddings: blocks of
 * SCORE_RB rows are widened to f32 in a buffer, and each row element, broadcast, meets SCORE_QB query rows held
 * transposed in one vector, so the inner step is one FMA per (row, element) with no horizontal sums. The sums are
 * f32 (rf_score's reference tolerance, not its bits). */
constexpr int SCORE_RB = 8, SCORE_QB = 16;

/* The shared steps of the scorer's passes, inlined into each of their clones (a callee with the default target may be
 * inlined into an AVX-512 clone, not called from it). load_block widens block `blk` of SCORE_RB context rows into
 * `rows` (zeros past n_ctx) and writes their inverse norms; returns how many rows it holds. */
[[maybe_unused]] __attribute__((always_inline)) static inline int load_block(const void* ctx, int32_t ctx_dtype,
                                                                             int64_t n_ctx, int32_t dim, int64_t blk,
                                                                             float* rows, float inv[SCORE_RB]) {
  const int64_t i0 = blk * SCORE_RB;
  const int rb = (int)std::min<int64_t>(SCORE_RB, n_ctx - i0);
  for (int r = 0; r < SCORE_RB; r++) {
    float* dst = rows + (size_t)r * dim;
    if (r >= rb) {
      std::fill(dst, dst + dim, 0.f);
    } else if (ctx_dtype == RF_F16) {
      f16_widen((const uint16_t*)ctx + (i0 + r) * dim, dst, dim);
    } else {
      memcpy(dst, (const float*)ctx + (i0 + r) * dim, (size_t)dim * sizeof(float));
    }
  }
  for (int r = 0; r < SCORE_RB; r++) {
    const float* row = rows + (size_t)r * dim;
    float ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int d = 0; d < dim; d++) ss += row[d] * row[d];
    inv[r] = 1.f / std::max(std::sqrt(ss), 1e-12f);
  }
  return rb;
}

/* acc[r][l] = rows_r . qb_l for the SCORE_QB query rows of one block of transposed queries */
[[maybe_unused]] __attribute__((always_inline)) static inline void dot_block(const float* rows, int32_t dim,
                                                                             const float* qb,
                                                                             float acc[SCORE_RB][SCORE_QB]) {
  for (int r = 0; r < SCORE_RB; r++)
    for (int l = 0; l < SCORE_QB; l++) acc[r][l] = 0.f;
  for (int d = 0; d < dim; d++) {
    const float* qd = qb + (size_t)d * SCORE_QB;
    for (int r = 0; r < SCORE_RB; r++) {
      const float x = rows[(size_t)r * dim + d];
#pragma omp simd
      for (int l = 0; l < SCORE_QB; l++) acc[r][l] += x * qd[l];
    }
  }
}

/* The query row pairs of rf_score_select / rf_score_kth (cuda/reform.h RF_PAIRS_MAX): pair p matches context rows
 * (i - 1, i) with P_p(i) = min(cos(ctx_{i-1}, q_{ab[2p]}), cos(ctx_i, q_{ab[2p+1]})), NaN when either is NaN; `off`
 * (n, or NULL) is taken off each pair's value in the selection's scores */
struct Pairs {
  const int32_t* ab = nullptr;
  int32_t n = 0;
  const float* off = nullptr;
};

inline float pair_value(float x, float y) { return (x != x || y != y) ? NAN : std::min(x, y); }

/* A block's cosines for the pairs: cos[r * n_q + b * SCORE_QB + l] = acc[r][l] * inv[r] for query block b (the offset
 * path's product, bit for bit) */
[[maybe_unused]] __attribute__((always_inline)) static inline void keep_cosines(const float acc[SCORE_RB][SCORE_QB],
                                                                                const float inv[SCORE_RB], int b,
                                                                                int lanes, int32_t n_q, float* cos) {
  for (int r = 0; r < SCORE_RB; r++)
    for (int l = 0; l < lanes; l++) cos[(size_t)r * n_q + b * SCORE_QB + l] = acc[r][l] * inv[r];
}

/* Row r's cosines in a block (cos) and the row's before it: the block's row r - 1, or prev (the row before the block)
 * for r = 0; after the block, carry_row moves its last row (rb - 1) into prev */
inline const float* cos_before(const float* prev, const float* cos, int r, int32_t n_q) {
  return r == 0 ? prev : cos + (size_t)(r - 1) * n_q;
}
inline void carry_row(const float* cos, int r, int32_t n_q, float* prev) {
  std::copy(cos + (size_t)r * n_q, cos + (size_t)(r + 1) * n_q, prev);
}

/* cos[r * n_q + j] of block `blk`: its rows' cosines with every query row (the offset path's acc * inv, bit for bit);
 * what a pair needs of the row before a slice's first block */
[[maybe_unused]] __attribute__((always_inline)) static inline int block_cosines(const void* ctx, int32_t ctx_dtype,
                                                                                int64_t n_ctx, int32_t dim,
                                                                                const float* Qt, int32_t n_q,
                                                                                int64_t blk, float* rows, float* cos) {
  float inv[SCORE_RB];
  const int rb = load_block(ctx, ctx_dtype, n_ctx, dim, blk, rows, inv);
  const int nqb = (n_q + SCORE_QB - 1) / SCORE_QB;
  for (int b = 0; b < nqb; b++) {
    float acc[SCORE_RB][SCORE_QB];
    dot_block(rows, dim, Qt + (size_t)b * dim * SCORE_QB, acc);
    keep_cosines(acc, inv, b, std::min(SCORE_QB, n_q - b * SCORE_QB), n_q, cos);
  }
  return rb;
}

/* The pairs' row before a slice: the cosines of row blk0 * SCORE_RB - 1 into prev (n_q; nothing for the first block) */
[[maybe_unused]] __attribute__((always_inline)) static inline void row_before(const void* ctx, int32_t ctx_dtype,
                                                                              int64_t n_ctx, int32_t dim,
                                                                              const float* Qt, int32_t n_q,
                                                                              int64_t blk0, float* rows, float* cos,
                                                                              float* prev) {
  if (blk0 == 0) return;
  block_cosines(ctx, ctx_dtype, n_ctx, dim, Qt, n_q, blk0 - 1, rows, cos);
  carry_row(cos, SCORE_RB - 1, n_q, prev);
}

/* blocks [blk0, blk1) of SCORE_RB context rows; `rows` is a SCORE_RB * dim scratch buffer; `off` the query rows'
 * offsets (n_q, or NULL). With pairs (pr.n > 0): `cos` (SCORE_RB * n_q) and `prev` (n_q) are scratch, and pend[i]
 * receives max_p (P_p(i) - pr.off[p]) for each row i >= 1 of these blocks (-inf for row 0 or when every P_p(i) is NaN)
 */
[[maybe_unused]] RF_SCORE_CLONES static void score_blocks(const void* ctx, int32_t ctx_dtype, int64_t n_ctx,
                                                          int32_t dim, const float* Qt, int32_t n_q, const float* off,
                                                          int64_t blk0, int64_t blk1, float* rows, float* out,
                                                          const Pairs& pr, float* cos, float* prev, float* pend) {
  const int nqb = (n_q + SCORE_QB - 1) / SCORE_QB;
  if (pr.n > 0) row_before(ctx, ctx_dtype, n_ctx, dim, Qt, n_q, blk0, rows, cos, prev);
  for (int64_t blk = blk0; blk < blk1; blk++) {
    // the rows' inverse norms first: with offsets the maximum is over cosines (without, max(a) * s = max(a * s)
    // for s > 0 bit for bit, so both paths give rf_score's order of operations)
    float inv[SCORE_RB];
    const int rb = load_block(ctx, ctx_dtype, n_ctx, dim, blk, rows, inv);
    float best[SCORE_RB];
    std::fill(best, best + SCORE_RB, -INFINITY);
    for (int b = 0; b < nqb; b++) {
      float acc[SCORE_RB][SCORE_QB];
      dot_block(rows, dim, Qt + (size_t)b * dim * SCORE_QB, acc);
      const int lanes = std::min(SCORE_QB, n_q - b * SCORE_QB);  // padded lanes are not queries
      if (off) {
        const float* ob = off + (size_t)b * SCORE_QB;
        for (int r = 0; r < SCORE_RB; r++)
          for (int l = 0; l < lanes; l++) best[r] = std::max(best[r], acc[r][l] * inv[r] - ob[l]);
      } else {
        for (int r = 0; r < SCORE_RB; r++)
          for (int l = 0; l < lanes; l++) best[r] = std::max(best[r], acc[r][l]);
      }
      if (pr.n > 0) keep_cosines(acc, inv, b, lanes, n_q, cos);
    }
    const int64_t i0 = blk * SCORE_RB;
    for (int r = 0; r < rb; r++) out[i0 + r] = off ? best[r] : best[r] * inv[r];
    if (pr.n == 0) continue;
    for (int r = 0; r < rb; r++) {
      const float* before = cos_before(prev, cos, r, n_q);
      const float* here = cos + (size_t)r * n_q;
      float v = -INFINITY;
      if (i0 + r >= 1)
        for (int32_t p = 0; p < pr.n; p++) {
          const float x = pair_value(before[pr.ab[2 * p]], here[pr.ab[2 * p + 1]]);
          if (x == x) v = std::max(v, x - (pr.off ? pr.off[p] : 0.f));
        }
      pend[i0 + r] = v;
    }
    carry_row(cos, rb - 1, n_q, prev);
  }
}

/* A candidate of a k-th best: a value and the context row it belongs to (a pair's: its second row) */
struct Cand {
  float v;
  int64_t i;
};
inline bool cand_greater(const Cand& a, const Cand& b) { return a.v > b.v; }

/* Adds (v, i) to a min-heap of a query row's largest cosines (at most k: the smallest of them at its front) */
inline void keep_largest(std::vector<Cand>& heap, float v, int64_t i, int32_t k) {
  if ((int32_t)heap.size() < k) {
    heap.push_back({v, i});
    std::push_heap(heap.begin(), heap.end(), cand_greater);
  } else if (v > heap.front().v) {
    std::pop_heap(heap.begin(), heap.end(), cand_greater);
    heap.back() = {v, i};
    std::push_heap(heap.begin(), heap.end(), cand_greater);
  }
}

/* blocks [blk0, blk1): each query row's k largest cosines (the offset path's cosines, acc * inv, bit for bit) with
 * their rows into heaps[j]; with pairs, each pair's kp largest values P_p(i) into heaps[n_q + p] (`cos`, `prev` as in
 * score_blocks); NaN values (a row with an f16 overflow) are left out. *irregular is set when a row's norm is not
 * finite (an f16 overflow): rf_score_select's zero query row gives it no 0 (score_kth_rows) */
[[maybe_unused]] RF_SCORE_CLONES static void kth_blocks(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim,
                                                        const float* Qt, int32_t n_q, int32_t k, int64_t blk0,
                                                        int64_t blk1, float* rows, std::vector<Cand>* heaps,
                                                        const Pairs& pr, int32_t kp, float* cos, float* prev,
                                                        bool* irregular) {
  const int nqb = (n_q + SCORE_QB - 1) / SCORE_QB;
  if (pr.n > 0) row_before(ctx, ctx_dtype, n_ctx, dim, Qt, n_q, blk0, rows, cos, prev);
  for (int64_t blk = blk0; blk < blk1; blk++) {
    float inv[SCORE_RB];
    const int rb = load_block(ctx, ctx_dtype, n_ctx, dim, blk, rows, inv);
    const int64_t i0 = blk * SCORE_RB;
    for (int r = 0; r < rb; r++)
      if (!(inv[r] > 0.f && inv[r] < INFINITY)) *irregular = true;
    for (int b = 0; b < nqb; b++) {
      float acc[SCORE_RB][SCORE_QB];
      dot_block(rows, dim, Qt + (size_t)b * dim * SCORE_QB, acc);
      const int lanes = std::min(SCORE_QB, n_q - b * SCORE_QB);
      if (pr.n > 0) keep_cosines(acc, inv, b, lanes, n_q, cos);
      for (int l = 0; l < lanes; l++) {
        std::vector<Cand>& h = heaps[b * SCORE_QB + l];
        for (int r = 0; r < rb; r++) {
          const float v = acc[r][l] * inv[r];
          // most rows fall below a full heap's smallest: one comparison (false for NaN too)
          if ((int32_t)h.size() == k && !(v > h.front().v)) continue;
          if (v == v) keep_largest(h, v, i0 + r, k);
        }
      }
    }
    if (pr.n == 0) continue;
    for (int r = 0; r < rb; r++) {
      if (i0 + r == 0) continue;
      const float* before = cos_before(prev, cos, r, n_q);
      const float* here = cos + (size_t)r * n_q;
      for (int32_t p = 0; p < pr.n; p++) {
        const float v = pair_value(before[pr.ab[2 * p]], here[pr.ab[2 * p + 1]]);
        std::vector<Cand>& h = heaps[n_q + p];
        if ((int32_t)h.size() == kp && !(v > h.front().v)) continue;
        if (v == v) keep_largest(h, v, i0 + r, kp);
      }
    }
    carry_row(cos, rb - 1, n_q, prev);
  }
}

/* The k-th largest of one query row's candidates (the slices' or row groups' k largest cosines each; reordered in
 * place): rf_score_kth's last step in both builds. Fewer than k candidates (NaN rows left out): -inf. */
inline float kth_largest(std::vector<float>& cand, int32_t k) {
  if ((int32_t)cand.size() < k) return -INFINITY;
  std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), std::greater<float>());
  return cand[k - 1];
}

/* the queries normalised and transposed per block of SCORE_QB: qt[(b * dim + d) * SCORE_QB + l] = q_{b*QB+l}[d] / |q|
 */
inline std::vector<float> transposed_queries(const float* q, int32_t n_q, int32_t dim) {
  const int nqb = (n_q + SCORE_QB - 1) / SCORE_QB;
  std::vector<float> qt((size_t)nqb * dim * SCORE_QB, 0.f);
  for (int j = 0; j < n_q; j++) {
    const float* src = q + (int64_t)j * dim;
    double ss = 0;
    for (int d = 0; d < dim; d++) ss += (double)src[d] * src[d];
    const float inv = (float)(1.0 / std::max(std::sqrt(ss), 1e-12));
    for (int d = 0; d < dim; d++) qt[((size_t)(j / SCORE_QB) * dim + d) * SCORE_QB + j % SCORE_QB] = src[d] * inv;
  }
  return qt;
}

/* `for_ranges(n, f)` runs f(begin, end) over slices of [0, n) (the CPU build passes its worker pool) */
template <class ForRanges>
inline int score_rows(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
                      const float* q_offset, const Pairs& pr, float* out, ForRanges&& for_ranges) {
  if (n_ctx < 0 || dim <= 0 || n_q < 1) return set_error(RF_ERR_INVALID, "rf_score_select: bad sizes");
  if (ctx_dtype != RF_F32 && ctx_dtype != RF_F16)
    return set_error(RF_ERR_INVALID, "rf_score_select: ctx dtype must be f32/f16");
  if (n_ctx == 0) return RF_OK;
  if (!ctx || !q || !out) return set_error(RF_ERR_INVALID, "rf_score_select: NULL argument");
  const std::vector<float> qt = transposed_queries(q, n_q, dim);
  const float* Qt = qt.data();
  // each row's best pair ending at it; a pair counts for both its rows, so the maximum with the next row's comes after
  // every slice is done (a slice's last row needs the next slice's first)
  std::vector<float> pend(pr.n > 0 ? (size_t)n_ctx : 0);
  for_ranges((n_ctx + SCORE_RB - 1) / SCORE_RB, [&](int64_t b0, int64_t b1) {
    std::vector<float> rows((size_t)SCORE_RB * dim);
    std::vector<float> cos(pr.n > 0 ? (size_t)SCORE_RB * n_q : 0), prev(pr.n > 0 ? (size_t)n_q : 0);
    score_blocks(ctx, ctx_dtype, n_ctx, dim, Qt, n_q, q_offset, b0, b1, rows.data(), out, pr, cos.data(), prev.data(),
                 pend.data());
  });
  for (int64_t i = 0; pr.n > 0 && i < n_ctx; i++) {
    const float v = i + 1 < n_ctx ? std::max(pend[i], pend[i + 1]) : pend[i];
    out[i] = std::max(out[i], v);  // a NaN row stays NaN
  }
  return RF_OK;
}

/* rf_score_kth's candidates on the host: each slice of rows keeps every query row's (and pair's) k largest values with
 * their rows, and the slices' candidates meet under a lock; the k largest over the context are among them */
struct KthCands {
  std::vector<std::vector<Cand>> all;  // n_q query rows', then the pairs'
  int32_t kk = 0, kp = 0;              // k clamped to the rows (n_ctx) and to the pairs (n_ctx - 1)
  Pairs pairs;                         // the pairs scored: none in a one-row context
  bool irregular = false;              // a row's norm is not finite (kth_blocks)
};

template <class ForRanges>
inline KthCands kth_candidates(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q,
                               int32_t n_q, const Pairs& pr, int32_t k, ForRanges&& for_ranges) {
  KthCands c;
  c.kk = (int32_t)std::min<int64_t>(k, n_ctx);
  c.kp = (int32_t)std::min<int64_t>(k, n_ctx - 1);  // a pair ends at rows 1 .. n_ctx - 1
  c.pairs = c.kp >= 1 ? pr : Pairs{};
  c.all.resize((size_t)(n_q + c.pairs.n));
  const std::vector<float> qt = transposed_queries(q, n_q, dim);
  const float* Qt = qt.data();
  std::mutex mu;
  for_ranges((n_ctx + SCORE_RB - 1) / SCORE_RB, [&](int64_t b0, int64_t b1) {
    std::vector<float> rows((size_t)SCORE_RB * dim);
    std::vector<std::vector<Cand>> heaps((size_t)(n_q + c.pairs.n));
    std::vector<float> cos(c.pairs.n > 0 ? (size_t)SCORE_RB * n_q : 0), prev(c.pairs.n > 0 ? (size_t)n_q : 0);
    bool irregular = false;
    kth_blocks(ctx, ctx_dtype, n_ctx, dim, Qt, n_q, c.kk, b0, b1, rows.data(), heaps.data(), c.pairs, c.kp, cos.data(),
               prev.data(), &irregular);
    std::lock_guard<std::mutex> lk(mu);
    for (int j = 0; j < n_q + c.pairs.n; j++) c.all[j].insert(c.all[j].end(), heaps[j].begin(), heaps[j].end());
    c.irregular = c.irregular || irregular;
  });
  return c;
}

/* out[j] = the k-th largest of candidate list j (n_q query rows' with kk, then the pairs' with kp) */
inline void kth_values(const KthCands& c, int32_t n_q, float* out) {
  std::vector<float> v;
  for (int j = 0; j < n_q + c.pairs.n; j++) {
    v.clear();
    for (const Cand& x : c.all[j]) v.push_back(x.v);
    out[j] = kth_largest(v, j < n_q ? c.kk : c.kp);
  }
}

/* rf_score_kth on the host (arguments checked by check_score_kth and check_pairs): out (n_q + pr.n) the k-th largest
 * of each query row's and pair's candidates (-inf for an empty context, which has none); returns the candidates */
template <class ForRanges>
inline KthCands kth_of(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
                       const Pairs& pr, int32_t k, float* out, ForRanges&& for_ranges) {
  std::fill(out, out + n_q + pr.n, -INFINITY);
  if (n_ctx == 0) return {};
  KthCands c = kth_candidates(ctx, ctx_dtype, n_ctx, dim, q, n_q, pr, k, for_ranges);
  kth_values(c, n_q, out);
  return c;
}

/* rf_score_select's query for a kth background, from rf_score_kth's values `kth` (n_q, then the n_pairs pairs'):
 * the question's rows and a zero row (n_q + 1 rows), each row's offset its k-th best (-inf, fewer than k rows with a
 * value: 0) and the zero row's 0, each pair's offset its k-th best likewise. The same values as
 * src/engine/background.ts kthQuery. */
struct KthQuery {
  std::vector<float> q, off, pair_off;
};
inline KthQuery kth_query(const float* q, int32_t n_q, int32_t dim, const float* kth, int32_t n_pairs) {
  const auto finite = [](float v) { return std::isfinite(v) ? v : 0.f; };
  KthQuery r;
  r.q.assign(q, q + (size_t)n_q * dim);
  r.q.resize((size_t)(n_q + 1) * dim, 0.f);
  r.off.assign((size_t)n_q + 1, 0.f);
  for (int32_t j = 0; j < n_q; j++) r.off[j] = finite(kth[j]);
  r.pair_off.assign((size_t)std::max(1, n_pairs), 0.f);
  for (int32_t p = 0; p < n_pairs; p++) r.pair_off[p] = finite(kth[n_q + p]);
  return r;
}

/* rf_score_kth_select's scores on the host in one pass over the context where rf_score_kth then rf_score_select with
 * kth_query take two. Why the candidates suffice: with the zero row, no score falls below 0, and a cosine (pair value)
 * lifts a row above 0 only where it exceeds its query row's (pair's) k-th best, so that it is one of the k - 1 above
 * it, which are all among the candidates (or, with fewer than k values, every value is a candidate). So the scores
 * are 0 except at the candidates, which get their excess over the offset as rf_score_select computes it (a pair's
 * counts for both its rows): the same values (a row's -0 from the zero row reads 0 here). A context with a row whose
 * norm is not finite gets no 0 from the zero row: it takes rf_score_select's pass. kth receives rf_score_kth's values
 * (n_q + pr.n). */
template <class ForRanges>
inline int score_kth_rows(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
                          const Pairs& pr, int32_t k, float* kth, float* out, ForRanges&& for_ranges) {
  const KthCands c = kth_of(ctx, ctx_dtype, n_ctx, dim, q, n_q, pr, k, kth, for_ranges);
  if (n_ctx == 0) return RF_OK;
  const KthQuery kq = kth_query(q, n_q, dim, kth, pr.n);
  if (c.irregular)
    return score_rows(ctx, ctx_dtype, n_ctx, dim, kq.q.data(), n_q + 1, kq.off.data(),
                      Pairs{pr.ab, pr.n, kq.pair_off.data()}, out, for_ranges);
  std::fill(out, out + n_ctx, 0.f);
  for (int j = 0; j < n_q; j++)
    for (const Cand& x : c.all[j]) out[x.i] = std::max(out[x.i], x.v - kq.off[j]);
  for (int p = 0; p < c.pairs.n; p++)
    for (const Cand& x : c.all[n_q + p]) {
      const float e = x.v - kq.pair_off[p];
      out[x.i] = std::max(out[x.i], e);
      out[x.i - 1] = std::max(out[x.i - 1], e);
    }
  return RF_OK;
}

/* rf_score_select: score(scores) fills n_ctx scores (rf_score's semantics; the build's own scorer), then
 * smooth_select. `scores` may be NULL (a scratch buffer is used). */
template <class Score>
inline int64_t score_select(Score score, int64_t n_ctx, int32_t window, int32_t lag, int32_t pool, int64_t budget,
                            int32_t edge, float* scores, int32_t* out_idx) {
  clear_error();
  if (n_ctx < 0 || n_ctx > INT32_MAX || budget < 0) return set_error(RF_ERR_INVALID, "rf_score_select: bad sizes");
  if (check_pool(pool, "rf_score_select") != RF_OK) return RF_ERR_INVALID;
  if (check_lag(window, lag, "rf_score_select") != RF_OK) return RF_ERR_INVALID;
  std::vector<float> own;
  if (!scores) {
    own.resize((size_t)n_ctx);
    scores = own.data();
  }
  const int rc = score(scores);
  if (rc != RF_OK) return rc;
  return smooth_select(scores, n_ctx, window, lag, pool, budget, edge, nullptr, out_idx);
}

/* rf_score_kth_select in both builds: the checks of rf_score_kth (kth may be NULL: the k-th bests then go to a buffer
 * of its own) and of rf_score_select, then score_select with `score(kth, scores)`, the build's scoring */
template <class Score>
inline int64_t kth_select(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
                          const int32_t* pairs, int32_t n_pairs, int32_t k, int32_t window, int32_t lag, int32_t pool,
                          int64_t budget, int32_t edge, float* kth, float* scores, int32_t* out_idx, Score score) {
  float one = 0;  // kth may be NULL: checked as present
  RF_TRY(check_score_kth(ctx, ctx_dtype, n_ctx, dim, q, n_q, k, kth ? kth : &one, "rf_score_kth_select"));
  RF_TRY(check_pairs(pairs, n_pairs, nullptr, n_q, "rf_score_kth_select"));
  std::vector<float> own(kth ? 0 : (size_t)(n_q + n_pairs));
  float* kv = kth ? kth : own.data();
  return score_select([&](float* s) { return score(kv, s); }, n_ctx, window, lag, pool, budget, edge, scores, out_idx);
}

/* rf_map_file: the whole file, read-only and shared, for rf_score_select to stream (the page cache keeps it for the
 * next query, as JavaScript's own mmap did below 4 GiB). */
inline const void* map_file(const char* path, int64_t* out_bytes) {
  clear_error();
  if (!path || !out_bytes) {
    set_error(RF_ERR_INVALID, "rf_map_file: NULL argument");
    return nullptr;
  }
  *out_bytes = 0;
  const int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    set_error(RF_ERR_INVALID, "rf_map_file: cannot open %s: %s", path, strerror(errno));
    return nullptr;
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    close(fd);
    set_error(RF_ERR_INVALID, "rf_map_file: %s: %s", path, strerror(err));
    return nullptr;
  }
  if (st.st_size <= 0) {
    close(fd);
    set_error(RF_ERR_INVALID, "rf_map_file: %s: empty file", path);
    return nullptr;
  }
  void* p = mmap(nullptr, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
  const int err = errno;
  close(fd);  // the mapping keeps the file
  if (p == MAP_FAILED) {
    set_error(err == ENOMEM ? RF_ERR_OOM : RF_ERR_INVALID, "rf_map_file: mmap of %s (%lld bytes): %s", path,
              (long long)st.st_size, strerror(err));
    return nullptr;
  }
  *out_bytes = (int64_t)st.st_size;
  return p;
}

inline int unmap_file(const void* p, int64_t bytes) {
  clear_error();
  if (!p || bytes <= 0) return set_error(RF_ERR_INVALID, "rf_unmap_file: NULL or empty mapping");
  if (munmap(const_cast<void*>(p), (size_t)bytes) != 0)
    return set_error(RF_ERR_INVALID, "rf_unmap_file: %s", strerror(errno));
  return RF_OK;
}

}  // namespace rf

#endif /* REFORM_SELECT_H */
