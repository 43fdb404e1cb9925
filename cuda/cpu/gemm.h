/*
 * gemm.h — y[m][n] = x[m][k] @ W[n][k]^T (+ bias) for the CPU build, with weights packed once into panels
 * (layout and kernels: cpu/isa.h, cpu/gemm_isa.inc).
 *
 * Why not OpenBLAS (measured 2026-11, Debian 12's libopenblas 0.3.21, AMD EPYC Zen 5, 1 thread, same process,
 * the small model's shapes): ours ran 1.2-2.0x its sgemm for 512-token prefill (m=512, k=768/2048,
 * n=768..4096) and 1.0-1.3x its sgemv for decode in f32; it has no f32 x bf16/f16 product (cblas_sbgemm
 * needs bf16 activations), so 16-bit weights would have to be widened in memory (2x the bytes streamed).
 */
#ifndef REFORM_CPU_GEMM_H
#define REFORM_CPU_GEMM_H

#include "isa.h"
#include "pool.h"

namespace rf {
namespace cpu {

/* ---------------- packing ---------------- */

/* one row-major [rows][k] source matrix of a (possibly fused) packed weight */
struct WSrc {
  const void* data;
  int32_t dtype;
  int64_t rows;
};

/* Packs the sources' rows one after another (n = sum of rows) for `isa`. The panels keep the sources' type
 * when they all share it, else f32. Columns past n in the last panel are zero. */
inline PackedW pack_weights(const WSrc* src, int nsrc, int64_t k, const CpuIsa* isa = cpu_isa()) {
  PackedW w;
  w.isa = isa;
  w.k = k;
  w.dtype = src[0].dtype;
  for (int s = 0; s < nsrc; s++) {
    w.n += src[s].rows;
    if (src[s].dtype != w.dtype) w.dtype = RF_F32;
  }
  const int64_t nr = isa->nr, np = w.panels(), esz = dtype_size(w.dtype);
  w.bytes = np * k * nr * esz;
  void* p = nullptr;
  if (posix_memalign(&p, 64, (size_t)std::max<int64_t>(w.bytes, 64)) != 0) throw std::bad_alloc();
  w.buf.reset((uint8_t*)p);
  // source and row within it of every output column
  std::vector<std::pair<int, int64_t>> row_of((size_t)w.n);
  for (int s = 0, o = 0; s < nsrc; s++)
    for (int64_t r = 0; r < src[s].rows; r++) row_of[(size_t)o++] = {s, r};
  uint8_t* dst = w.buf.get();
  parallel_for(np, w.bytes > (1 << 20), [&](int64_t p0, int64_t p1, int) {
    for (int64_t pnl = p0; pnl < p1; pnl++)
      for (int64_t j = 0; j < nr; j++) {
        const int64_t col = pnl * nr + j;
        uint8_t* d = dst + (pnl * k * nr + j) * esz;
        const int64_t step = nr * esz;
        if (col >= w.n) {
          for (int64_t kk = 0; kk < k; kk++) memset(d + kk * step, 0, (size_t)esz);
          continue;
        }
        const WSrc& s = src[row_of[(size_t)col].first];
        const int64_t base = row_of[(size_t)col].second * k;
        if (s.dtype == w.dtype) {
          const uint8_t* sp = (const uint8_t*)s.data + base * esz;
          for (int64_t kk = 0; kk < k; kk++) memcpy(d + kk * step, sp + kk * esz, (size_t)esz);
        } else {
          for (int64_t kk = 0; kk < k; kk++) {
            const float v = load_as_f32(s.data, s.dtype, base + kk);
            memcpy(d + kk * step, &v, 4);
          }
        }
      }
  });
  return w;
}

/* row r of W (= column r of the packed panels) as f32: embedding lookup from a tied lm_head */
inline void packed_row(const PackedW& w, int64_t r, float* out) {
  const int64_t nr = w.isa->nr;
  const int64_t off = (r / nr) * w.k * nr + r % nr;
  for (int64_t kk = 0; kk < w.k; kk++) out[kk] = load_as_f32(w.data(), w.dtype, off + kk * nr);
}

/* ---------------- the matmul ---------------- */

/* y[m][ldy] (first w.n columns) = x[m][w.k] @ W^T (+ bias[w.n]). Results are bitwise independent of m. */
inline void gemm(const float* x, int64_t m, const PackedW& w, const float* bias, float* y, int64_t ldy = -1) {
  if (m <= 0 || w.n <= 0) return;
  const CpuIsa* isa = w.isa;
  const int64_t K = w.k, np = w.panels(), MR = isa->mr;
  GemmCall g{&w, x, nullptr, m, ldy < 0 ? w.n : ldy, w.dtype == RF_F32 ? 256 : 512, bias, y};
  const bool par = m * w.n * K > (1 << 18);
  if (m == 1) {
    parallel_for(np, par, [&](int64_t p0, int64_t p1, int) { isa->panels(g, p0, p1); });
    return;
  }
  const int64_t tiles = (m + MR - 1) / MR, mpad = tiles * MR;
  static thread_local std::vector<float> apack;
  if ((int64_t)apack.size() < mpad * K) apack.resize((size_t)(mpad * K));
  float* ap = apack.data();
  g.apack = ap;
  parallel_for(tiles, par, [&](int64_t t0, int64_t t1, int) {
    for (int64_t t = t0; t < t1; t++) {
      const float* rows[64];  // MR <= 64
      for (int64_t i = 0; i < MR; i++) rows[i] = t * MR + i < m ? x + (t * MR + i) * K : nullptr;
      for (int64_t k0 = 0; k0 < K; k0 += g.kc) {
        const int64_t kc = std::min(g.kc, K - k0);
        float* d = ap + k0 * mpad + t * kc * MR;
        for (int64_t kk = 0; kk < kc; kk++)
          for (int64_t i = 0; i < MR; i++) d[kk * MR + i] = rows[i] ? rows[i][k0 + kk] : 0.f;
      }
    }
  });
  parallel_for(np, par, [&](int64_t p0, int64_t p1, int) { isa->panels(g, p0, p1); });
}

}  // namespace cpu
}  // namespace rf

#endif
