/*
 * cpu_kernels.h — float32 CPU kernels of the REFORM CPU build (namespace rf::cpu); the matmul is in cpu/gemm.h.
 * Header-only so that test/native/kernel_tests.cpp can check them against naive references.
 * Parallel on the worker threads of cpu/pool.h (OpenMP only for `simd`: compile with -fopenmp-simd).
 * None of these functions allocate inside a parallel task (no exception can escape one).
 */
#ifndef REFORM_CPU_KERNELS_H
#define REFORM_CPU_KERNELS_H

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/gemm.h"  // matmul: rf::cpu::pack_weights, rf::cpu::gemm
#include "cpu/pool.h"  // rf::cpu::parallel_for, parallel_dynamic

namespace rf {
namespace cpu {

/* sum a[i]*b[i], float accumulation, vectorised */
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
  return s;
}

/* y[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w  (x and y may alias) */
inline void rmsnorm(const float* x, int64_t n, int64_t dim, const float* w, float eps, float* y) {
  parallel_for(n, n * dim > 65536, [&](int64_t t0, int64_t t1, int) {
    for (int64_t t = t0; t < t1; t++) {
      const float* xr = x + t * dim;
      float* yr = y + t * dim;
      double ss = 0;
      for (int64_t i = 0; i < dim; i++) ss += (double)xr[i] * xr[i];
      const float r = (float)(1.0 / std::sqrt(ss / (double)dim + (double)eps));
      for (int64_t i = 0; i < dim; i++) yr[i] = xr[i] * r * w[i];
    }
  });
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
inline int64_t attn_scratch_size(int64_t entries) { return (int64_t)pool_threads() * (entries + 16); }

/* Causal GQA attention output.
 * q: [n][nh*hd] (already rotated); K, V: [nkv][ld][hd] (K rotated); query j sees entries 0..past+j.
 * out: [n][nh*hd]. Query head h uses kv head h / (nh/nkv). scratch: attn_scratch_size(past+n) floats. */
inline void attn_forward(const float* q, int64_t n, int nh, int nkv, int hd, const float* K, const float* V, int64_t ld,
                         int64_t past, float* out, float* scratch) {
  const int grp = nh / nkv;
  const float scale = 1.0f / std::sqrt((float)hd);
  const int64_t tasks = n * nh;
  const int64_t stride = past + n + 16;
  parallel_dynamic(tasks, tasks * (past + n) * hd > 32768, [&](int64_t task, int tid) {
    const int64_t j = task / nh;
    const int h = (int)(task % nh), g = h / grp;
    float* p = scratch + (int64_t)tid * stride;
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
  });
}

/* H2O score accumulation: for queries j in [obs_start, n) and every query head h of kv group g,
 * score[g*ld_score + e] += softmax prob of (h, j) on entry e (e <= past+j). Parallel over kv heads,
 * deterministic (fixed summation order). */
inline void attn_scores(const float* q, int64_t n, int nh, int nkv, int hd, const float* K, int64_t ld, int64_t past,
                        int64_t obs_start, float* score, int64_t ld_score, float* scratch) {
  const int grp = nh / nkv;
  const float scale = 1.0f / std::sqrt((float)hd);
  const int64_t stride = past + n + 16;
  parallel_dynamic(nkv, nkv > 1 && (n - obs_start) * (past + n) * hd * grp > 32768, [&](int64_t g, int tid) {
    float* p = scratch + (int64_t)tid * stride;
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
  });
}

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

/* out[t][i] = silu(gu[t][i]) * gu[t][I + i]: rows of the fused gate|up projection, [n][2I] -> [n][I] */
inline void swiglu_rows(const float* gu, int64_t n, int64_t I, float* out) {
  parallel_for(n, n * I > 65536, [&](int64_t t0, int64_t t1, int) {
    for (int64_t t = t0; t < t1; t++)
      for (int64_t i = 0; i < I; i++) out[t * I + i] = silu(gu[t * 2 * I + i]) * gu[t * 2 * I + I + i];
  });
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
  parallel_for(n, n > 262144, [&](int64_t i0, int64_t i1, int) {
#pragma omp simd
    for (int64_t i = i0; i < i1; i++) x[i] += y[i];
  });
}

/* out[i] = max_j cos(ctx_i, q_j); ctx rows given as f32 via load(row, i, buf). cos(a,b) =
 * a.b / (max(|a|, 1e-12) * max(|b|, 1e-12)). qn: n_q pre-normalised rows. tmp: pool_threads()*dim floats. */
template <class LoadRow>
inline void cosine_max(LoadRow load, int64_t n_ctx, int dim, const float* qn, int n_q, float* out, float* tmp) {
  parallel_for(n_ctx, n_ctx * (int64_t)dim * n_q > 65536, [&](int64_t i0, int64_t i1, int tid) {
    float* row = tmp + (int64_t)tid * dim;
    for (int64_t i = i0; i < i1; i++) {
      load(i, row);
      double ss = 0;
      for (int d = 0; d < dim; d++) ss += (double)row[d] * row[d];
      const float inv = (float)(1.0 / std::max(std::sqrt(ss), 1e-12));
      float best = -INFINITY;
      for (int j = 0; j < n_q; j++) best = std::max(best, dot(row, qn + (int64_t)j * dim, dim) * inv);
      out[i] = best;
    }
  });
}

}  // namespace cpu
}  // namespace rf

#endif
