/*
 * cpu_kernels.h — float32 CPU kernels of the REFORM CPU build (namespace rf::cpu).
 * Header-only so that test/native/kernel_tests.cpp can check them against naive references.
 * OpenMP parallel (compile with -fopenmp; without it the pragmas are ignored and the code runs serially).
 * None of these functions allocate inside a parallel region (no exception can escape one).
 */
#ifndef REFORM_CPU_KERNELS_H
#define REFORM_CPU_KERNELS_H

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__FMA__) && defined(__AVX__)
#include <immintrin.h>
#endif

// 32-byte vectors in inline helpers: without AVX GCC warns (at the end of the TU) about the vector ABI.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace rf {
namespace cpu {

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

/* sum a[i]*b[i], float accumulation, vectorised */
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
  return s;
}

/* 8-wide float vector (GCC vector extension: AVX with -march=native, two SSE halves otherwise). */
typedef float v8f __attribute__((vector_size(32)));
inline v8f load8(const float* p) {
  v8f v;
  memcpy(&v, p, sizeof v);
  return v;
}

/* a*b + c with one rounding where the CPU has FMA (explicit, so that every instantiation rounds alike). */
inline v8f fmadd8(v8f a, v8f b, v8f c) {
#if defined(__FMA__) && defined(__AVX__)
  return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  const v8f p = a * b;
  return p + c;
#endif
}
inline float fmadd1(float a, float b, float c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  const float p = a * b;
  return p + c;
#endif
}

/* Register-blocked dot products of T x-rows against R W-rows: out[t*R + r] = x[t] . w[r].
 * Every dot product is accumulated in the same order whatever T and R are (8 lane-wise partial sums,
 * fixed-order lane reduction, scalar tail), so results do not depend on the blocking. */
template <int T, int R>
inline void dot_block(const float* const* x, const float* const* w, int64_t in, float* out) {
  v8f acc[T][R];
  for (int t = 0; t < T; t++)
    for (int r = 0; r < R; r++) acc[t][r] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    v8f wv[R];
    for (int r = 0; r < R; r++) wv[r] = load8(w[r] + i);
    for (int t = 0; t < T; t++) {
      const v8f xv = load8(x[t] + i);
      for (int r = 0; r < R; r++) acc[t][r] = fmadd8(xv, wv[r], acc[t][r]);
    }
  }
  for (int t = 0; t < T; t++)
    for (int r = 0; r < R; r++) {
      const v8f a = acc[t][r];
      float s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
      for (int64_t j = i; j < in; j++) s = fmadd1(x[t][j], w[r][j], s);
      out[t * R + r] = s;
    }
}

/* y[n,out] = x[n,in] @ W[out,in]^T (+ bias[out]). Parallel over blocks of output rows; within a block,
 * 4-token x 2-row register tiles (1-token x 4-row for leftover tokens). Results are bitwise independent of
 * n (see dot_block), so prefill in pieces == prefill at once. */
inline void matmul(const float* x, int64_t n, int64_t in, const float* W, int64_t out, const float* bias, float* y) {
  const int64_t RB = 16, TB = 64;
  const int64_t nrb = (out + RB - 1) / RB;
  if (n <= 0 || out <= 0) return;
#pragma omp parallel for schedule(static) if (nrb * n * in > 32768)
  for (int64_t rb = 0; rb < nrb; rb++) {
    const int64_t r0 = rb * RB, r1 = std::min(out, r0 + RB);
    float tile[16];
    for (int64_t t0 = 0; t0 < n; t0 += TB) {
      const int64_t t1 = std::min(n, t0 + TB);
      int64_t t = t0;
      for (; t + 4 <= t1; t += 4) {
        const float* xs[4] = {x + t * in, x + (t + 1) * in, x + (t + 2) * in, x + (t + 3) * in};
        int64_t r = r0;
        for (; r + 2 <= r1; r += 2) {
          const float* ws[2] = {W + r * in, W + (r + 1) * in};
          dot_block<4, 2>(xs, ws, in, tile);
          for (int a = 0; a < 4; a++)
            for (int b = 0; b < 2; b++) y[(t + a) * out + r + b] = tile[a * 2 + b] + (bias ? bias[r + b] : 0.f);
        }
        for (; r < r1; r++) {
          const float* ws[1] = {W + r * in};
          dot_block<4, 1>(xs, ws, in, tile);
          for (int a = 0; a < 4; a++) y[(t + a) * out + r] = tile[a] + (bias ? bias[r] : 0.f);
        }
      }
      for (; t < t1; t++) {
        const float* xs[1] = {x + t * in};
        int64_t r = r0;
        for (; r + 4 <= r1; r += 4) {
          const float* ws[4] = {W + r * in, W + (r + 1) * in, W + (r + 2) * in, W + (r + 3) * in};
          dot_block<1, 4>(xs, ws, in, tile);
          for (int b = 0; b < 4; b++) y[t * out + r + b] = tile[b] + (bias ? bias[r + b] : 0.f);
        }
        for (; r < r1; r++) {
          const float* ws[1] = {W + r * in};
          dot_block<1, 1>(xs, ws, in, tile);
          y[t * out + r] = tile[0] + (bias ? bias[r] : 0.f);
        }
      }
    }
  }
}

/* y[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w  (x and y may alias) */
inline void rmsnorm(const float* x, int64_t n, int64_t dim, const float* w, float eps, float* y) {
#pragma omp parallel for schedule(static) if (n * dim > 65536)
  for (int64_t t = 0; t < n; t++) {
    const float* xr = x + t * dim;
    float* yr = y + t * dim;
    double ss = 0;
    for (int64_t i = 0; i < dim; i++) ss += (double)xr[i] * xr[i];
    const float r = (float)(1.0 / std::sqrt(ss / (double)dim + (double)eps));
    for (int64_t i = 0; i < dim; i++) yr[i] = xr[i] * r * w[i];
  }
}

/* cos/sin of pos * inv_freq[i], i < half (angle computed in double). */
inline void rope_cos_sin(const float* inv_freq, int half, int64_t pos, float* c, float* s) {
  for (int i = 0; i < half; i++) {
    const double a = (double)pos * (double)inv_freq[i];
    c[i] = (float)std::cos(a);
    s[i] = (float)std::sin(a);
  }
}

/* HF rotate_half RoPE on one head vector v[hd] (in place):
 * out[i] = v[i]*c[i] - v[i+half]*s[i], out[i+half] = v[i+half]*c[i] + v[i]*s[i]. */
inline void rope_head(float* v, int hd, const float* c, const float* s) {
  const int half = hd / 2;
  for (int i = 0; i < half; i++) {
    const float a = v[i], b = v[i + half];
    v[i] = a * c[i] - b * s[i];
    v[i + half] = b * c[i] + a * s[i];
  }
}
/* out-of-place variant */
inline void rope_head_to(const float* v, float* o, int hd, const float* c, const float* s) {
  const int half = hd / 2;
  for (int i = 0; i < half; i++) {
    const float a = v[i], b = v[i + half];
    o[i] = a * c[i] - b * s[i];
    o[i + half] = b * c[i] + a * s[i];
  }
}

/* softmax of scores s[0..m) in place (numerically stable); returns nothing. */
inline void softmax_inplace(float* s, int64_t m) {
  float mx = -INFINITY;
  for (int64_t i = 0; i < m; i++) mx = std::max(mx, s[i]);
  double sum = 0;
  for (int64_t i = 0; i < m; i++) {
    s[i] = std::exp(s[i] - mx);
    sum += s[i];
  }
  const float inv = (float)(1.0 / sum);
  for (int64_t i = 0; i < m; i++) s[i] *= inv;
}

/* Causal attention probabilities of one query head against entries 0..m-1 of one kv head.
 * K: entries of hd floats, stride hd. Writes probs[0..m). */
inline void attn_probs(const float* q, const float* K, int64_t m, int hd, float scale, float* probs) {
  for (int64_t e = 0; e < m; e++) probs[e] = dot(q, K + e * hd, hd) * scale;
  softmax_inplace(probs, m);
}

/* Scratch floats needed by attn_forward / attn_scores for `entries` keys. */
inline int64_t attn_scratch_size(int64_t entries) { return (int64_t)max_threads() * (entries + 16); }

/* Causal GQA attention output.
 * q: [n][nh*hd] (already rotated); K, V: [nkv][ld][hd] (K rotated); query j sees entries 0..past+j.
 * out: [n][nh*hd]. Query head h uses kv head h / (nh/nkv). scratch: attn_scratch_size(past+n) floats. */
inline void attn_forward(const float* q, int64_t n, int nh, int nkv, int hd, const float* K, const float* V, int64_t ld,
                         int64_t past, float* out, float* scratch) {
  const int grp = nh / nkv;
  const float scale = 1.0f / std::sqrt((float)hd);
  const int64_t tasks = n * nh;
  const int64_t stride = past + n + 16;
#pragma omp parallel for schedule(dynamic, 1) if (tasks * (past + n) * hd > 32768)
  for (int64_t task = 0; task < tasks; task++) {
    const int64_t j = task / nh;
    const int h = (int)(task % nh), g = h / grp;
    float* p = scratch + (int64_t)thread_id() * stride;
    const int64_t m = past + j + 1;
    const float* qh = q + j * (int64_t)nh * hd + (int64_t)h * hd;
    const float* Kg = K + (int64_t)g * ld * hd;
    const float* Vg = V + (int64_t)g * ld * hd;
    attn_probs(qh, Kg, m, hd, scale, p);
    float* o = out + j * (int64_t)nh * hd + (int64_t)h * hd;
    for (int d = 0; d < hd; d++) o[d] = 0.f;
    for (int64_t e = 0; e < m; e++) {
      const float pe = p[e];
      const float* v = Vg + e * hd;
#pragma omp simd
      for (int d = 0; d < hd; d++) o[d] += pe * v[d];
    }
  }
}

/* H2O score accumulation: for queries j in [obs_start, n) and every query head h of kv group g,
 * score[g*ld_score + e] += softmax prob of (h, j) on entry e (e <= past+j). Parallel over kv heads,
 * deterministic (fixed summation order). */
inline void attn_scores(const float* q, int64_t n, int nh, int nkv, int hd, const float* K, int64_t ld, int64_t past,
                        int64_t obs_start, float* score, int64_t ld_score, float* scratch) {
  const int grp = nh / nkv;
  const float scale = 1.0f / std::sqrt((float)hd);
  const int64_t stride = past + n + 16;
#pragma omp parallel for schedule(static) if (nkv > 1 && (n - obs_start) * (past + n) * hd * grp > 32768)
  for (int g = 0; g < nkv; g++) {
    float* p = scratch + (int64_t)thread_id() * stride;
    const float* Kg = K + (int64_t)g * ld * hd;
    float* sg = score + (int64_t)g * ld_score;
    for (int64_t j = std::max<int64_t>(obs_start, 0); j < n; j++) {
      const int64_t m = past + j + 1;
      for (int hh = 0; hh < grp; hh++) {
        const int h = g * grp + hh;
        attn_probs(q + j * (int64_t)nh * hd + (int64_t)h * hd, Kg, m, hd, scale, p);
        for (int64_t e = 0; e < m; e++) sg[e] += p[e];
      }
    }
  }
}

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

/* gate[i] = silu(gate[i]) * up[i] */
inline void swiglu(float* gate, const float* up, int64_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; i++) gate[i] = silu(gate[i]) * up[i];
}

/* y = x / max(||x||_2, eps) (x and y may alias) */
inline void l2_normalize(const float* x, int64_t d, float eps, float* y) {
  double ss = 0;
  for (int64_t i = 0; i < d; i++) ss += (double)x[i] * x[i];
  const double nrm = std::max(std::sqrt(ss), (double)eps);
  const float inv = (float)(1.0 / nrm);
  for (int64_t i = 0; i < d; i++) y[i] = x[i] * inv;
}

/* x[i] += y[i] */
inline void add_inplace(float* x, const float* y, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n > 262144)
  for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

/* out[i] = max_j cos(ctx_i, q_j); ctx rows given as f32 via load(row, i, buf). cos(a,b) =
 * a.b / (max(|a|, 1e-12) * max(|b|, 1e-12)). qn: n_q pre-normalised rows. tmp: max_threads()*dim floats. */
template <class LoadRow>
inline void cosine_max(LoadRow load, int64_t n_ctx, int dim, const float* qn, int n_q, float* out, float* tmp) {
#pragma omp parallel for schedule(static) if (n_ctx * (int64_t)dim * n_q > 65536)
  for (int64_t i = 0; i < n_ctx; i++) {
    float* row = tmp + (int64_t)thread_id() * dim;
    load(i, row);
    double ss = 0;
    for (int d = 0; d < dim; d++) ss += (double)row[d] * row[d];
    const float inv = (float)(1.0 / std::max(std::sqrt(ss), 1e-12));
    float best = -INFINITY;
    for (int j = 0; j < n_q; j++) best = std::max(best, dot(row, qn + (int64_t)j * dim, dim) * inv);
    out[i] = best;
  }
}

}  // namespace cpu
}  // namespace rf

#endif
