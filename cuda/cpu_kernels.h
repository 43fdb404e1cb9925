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
/* out-of-place variant; os: stride of the output elements (keys written into the attention's key blocks) */
inline void rope_head_to(const float* v, float* o, int hd, const float* c, const float* s, int64_t os = 1) {
  const int half = hd / 2;
  for (int i = 0; i < half; i++) {
    const float a = v[i], b = v[i + half];
    o[i * os] = a * c[i] - b * s[i];
    o[(i + half) * os] = b * c[i] + a * s[i];
  }
}

/* Causal GQA attention (cpu/attn_isa.inc: flash-style over each KV head's query group).
 * q: [n][nh*hd] (already rotated); K, V: [nkv][ld][hd] (K rotated); query j sees entries 0..past+j.
 * Query head h uses kv head h / (nh/nkv). stats: [n][nh][2] softmax max and sum per query row, written here
 * and read by attn_scores. scratch: attn_scratch_size(n, nh, nkv, hd) floats. */
inline int64_t attn_queries_per_task(int nh, int nkv) { return std::max(1, cpu_isa()->mr / (nh / nkv)); }
inline int64_t attn_scratch_size(int64_t n, int nh, int nkv, int hd) {
  const int64_t grp = nh / nkv;
  return (int64_t)pool_threads() * cpu_isa()->attn_scratch(attn_queries_per_task(nh, nkv) * grp, n * grp, hd);
}

/* Keys in the attention's own layout (what the KV caches store): per kv head, blocks of NR keys, each
 * [hd][NR] (NR = cpu_isa()->nr), so no call transposes keys again. kt_ld: keys per kv head, a multiple of NR. */
inline int64_t kt_round(int64_t keys) {
  const int64_t nr = cpu_isa()->nr;
  return (keys + nr - 1) / nr * nr;
}
inline int64_t kt_offset(int64_t e, int d, int hd) {
  const int64_t nr = cpu_isa()->nr;
  return (e / nr) * nr * hd + (int64_t)d * nr + e % nr;
}
/* key e (hd floats) into the blocks of one kv head; kt_rope_store: rotated on the way */
inline void kt_store(float* KTg, int hd, int64_t e, const float* k) {
  const int64_t nr = cpu_isa()->nr;
  float* b = KTg + kt_offset(e, 0, hd);
  for (int d = 0; d < hd; d++) b[(int64_t)d * nr] = k[d];
}
inline void kt_rope_store(float* KTg, int hd, int64_t e, const float* k, const float* c, const float* s) {
  rope_head_to(k, KTg + kt_offset(e, 0, hd), hd, c, s, cpu_isa()->nr);
}

/* rows j0..n-1 of every kv head; out == nullptr: statistics only */
inline void attn_run(AttnCall a, int64_t j0, float* scratch) {
  const CpuIsa* isa = cpu_isa();
  const int64_t qb = attn_queries_per_task(a.nh, a.nkv), grp = a.nh / a.nkv;
  const int64_t blocks = (a.n - j0 + qb - 1) / qb, per = isa->attn_scratch(qb * grp, a.n * grp, a.hd);
  // the last query blocks see the most keys: hand them out first
  parallel_dynamic(blocks * a.nkv, blocks * a.nkv > 1 && (a.n - j0) * (a.past + a.n) * a.hd * grp > 32768,
                   [&](int64_t task, int tid) {
                     const int64_t b = blocks - 1 - task / a.nkv;
                     const int g = (int)(task % a.nkv);
                     isa->attn_rows(a, g, j0 + b * qb, std::min(a.n, j0 + (b + 1) * qb), scratch + tid * per);
                   });
}

/* out: [n][nh*hd]. Keys from KT (kt_ld keys per kv head, see kt_store) when KT is set, else from K. */
inline void attn_forward(const float* q, int64_t n, int nh, int nkv, int hd, const float* K, const float* KT,
                         int64_t kt_ld, const float* V, int64_t ld, int64_t past, float* out, float* stats,
                         float* scratch) {
  attn_run(AttnCall{q, n, nh, nkv, hd, K, V, ld, past, KT, kt_ld, out, stats, nullptr, 0, 0}, 0, scratch);
}

/* softmax statistics of the rows j >= obs_start only (the exit layer, whose attention output is not needed) */
inline void attn_stats(const float* q, int64_t n, int nh, int nkv, int hd, const float* K, const float* KT,
                       int64_t kt_ld, int64_t ld, int64_t past, int64_t obs_start, float* stats, float* scratch) {
  attn_run(AttnCall{q, n, nh, nkv, hd, K, nullptr, ld, past, KT, kt_ld, nullptr, stats, nullptr, 0, 0}, obs_start,
           scratch);
}

/* H2O score accumulation: for queries j in [obs_start, n) and every query head h of kv group g,
 * score[g*ld_score + e] += softmax prob of (h, j) on entry e (e <= past+j), from the stats of attn_forward or
 * attn_stats over those rows. Parallel over (kv head, key range); deterministic (fixed summation order). */
inline void attn_scores(const float* q, int64_t n, int nh, int nkv, int hd, const float* K, const float* KT,
                        int64_t kt_ld, int64_t ld, int64_t past, int64_t obs_start, const float* stats, float* score,
                        int64_t ld_score, float* scratch) {
  obs_start = std::max<int64_t>(obs_start, 0);
  if (obs_start >= n) return;
  const CpuIsa* isa = cpu_isa();
  const int64_t grp = nh / nkv, keys = past + n, chunk = 8 * (int64_t)isa->nr;
  const int64_t chunks = (keys + chunk - 1) / chunk;
  const int64_t per = isa->attn_scratch(attn_queries_per_task(nh, nkv) * grp, n * grp, hd);
  const AttnCall a{q,  n,     nh,      nkv,           hd,    K,        nullptr,  ld, past,
                   KT, kt_ld, nullptr, (float*)stats, score, ld_score, obs_start};
  parallel_dynamic(chunks * nkv, chunks * nkv > 1 && (n - obs_start) * keys * hd * grp > 32768,
                   [&](int64_t task, int tid) {
                     const int g = (int)(task % nkv);
                     const int64_t e0 = (task / nkv) * chunk;
                     isa->attn_score(a, g, e0, std::min(keys, e0 + chunk), scratch + tid * per);
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
