/*
 * gemm.h — y[m][n] = x[m][k] @ W[n][k]^T (+ bias) for the CPU build, with weights packed once into panels.
 *
 * Instruction set chosen at run time, not at compile time (the library is built for baseline x86-64 / any
 * target): AVX-512 where the CPU has it, else AVX2+FMA (+F16C), else a portable path (GCC vectors, any CPU).
 * REFORM_CPU_ISA=avx512|avx2|portable lowers the choice (tests force each path with it); a set the CPU lacks
 * is never used. Each set's kernels are the same source (gemm_isa.inc) compiled under its target pragma.
 *
 * Layout: W is packed into panels of NR outputs (NR = the set's register tile width): panel p holds, for each
 * k, the NR weights W[p*NR + j][k] contiguously, in the checkpoint's own type (f32, bf16 or f16; 16-bit
 * weights are widened in registers, exactly). Several weight matrices with the same k can be packed into one
 * (fused q/k/v, fused gate/up): their rows are concatenated.
 * Prefill (m > 1) packs x per call into MR-row tiles and runs MR x NR register tiles over KC-deep blocks;
 * decode (m == 1) streams the panels once, four at a time. Both are parallel over panels (cpu/pool.h).
 */
#ifndef REFORM_CPU_GEMM_H
#define REFORM_CPU_GEMM_H

#include "../reform_common.h"
#include "pool.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define RF_CPU_X86 1
#else
#define RF_CPU_X86 0
#endif

// 32/64-byte vectors in inline helpers of the AVX regions: GCC notes the vector ABI of a baseline build
#pragma GCC diagnostic ignored "-Wpsabi"

#define RF_AI static inline __attribute__((always_inline))

namespace rf {
namespace cpu {

struct bf16_t {
  uint16_t v;
};
struct f16_t {
  uint16_t v;
};

struct GemmCall;

/* one instruction set's kernels */
struct GemmIsa {
  const char* name;
  int nr, mr;                                                  // panel width, register tile height
  void (*panels)(const GemmCall& g, int64_t p0, int64_t p1);  // outputs of panels [p0, p1), all rows
};

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

/* a packed weight matrix (or several fused along n) */
struct PackedW {
  int32_t dtype = RF_F32;  // element type of the panels
  int64_t n = 0, k = 0;
  const GemmIsa* isa = nullptr;  // the set it was packed for (its nr); gemm() runs that set's kernels
  std::unique_ptr<uint8_t, FreeDeleter> buf;
  int64_t bytes = 0;
  const void* data() const { return buf.get(); }
  int64_t panels() const { return isa ? (n + isa->nr - 1) / isa->nr : 0; }
};

struct GemmCall {
  const PackedW* w;
  const float* a;      // x, row-major [m][k] (read directly when m == 1)
  const float* apack;  // x packed for m > 1: k block k0 at apack + k0*mpad, tile t of it at + t*kc*MR
  int64_t m, ldy, kc;
  const float* bias;
  float* y;
};

/* ---------------- the instruction sets ---------------- */

namespace portable {
typedef float V __attribute__((vector_size(16)));  // the baseline vector of x86-64 (SSE2) and AArch64 (NEON)
constexpr int W = 4, NV = 2, MR = 4;
RF_AI V vzero() { return V{}; }
RF_AI V vset1(float x) { return V{x, x, x, x}; }
RF_AI V vfma(V a, V b, V c) { return a * b + c; }
RF_AI V vadd(V a, V b) { return a + b; }
RF_AI V vloadu(const float* p) {
  V v;
  memcpy(&v, p, sizeof v);
  return v;
}
RF_AI void vstoreu(float* p, V v) { memcpy(p, &v, sizeof v); }
RF_AI V vload_b(const float* p) { return vloadu(p); }
RF_AI V vload_b(const bf16_t* p) {
  V v{};
  for (int i = 0; i < W; i++) v[i] = bf16_to_f32(p[i].v);
  return v;
}
RF_AI V vload_b(const f16_t* p) {
  V v{};
  for (int i = 0; i < W; i++) v[i] = f16_to_f32(p[i].v);
  return v;
}
#include "gemm_isa.inc"
}  // namespace portable

#if RF_CPU_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
typedef __m256 V;
constexpr int W = 8, NV = 2, MR = 6;
RF_AI V vzero() { return _mm256_setzero_ps(); }
RF_AI V vset1(float x) { return _mm256_set1_ps(x); }
RF_AI V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
RF_AI V vadd(V a, V b) { return _mm256_add_ps(a, b); }
RF_AI V vloadu(const float* p) { return _mm256_loadu_ps(p); }
RF_AI void vstoreu(float* p, V v) { _mm256_storeu_ps(p, v); }
RF_AI V vload_b(const float* p) { return _mm256_loadu_ps(p); }
RF_AI V vload_b(const bf16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
RF_AI V vload_b(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
#include "gemm_isa.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
// maskz forms of the widening loads: the plain ones start from _mm512_undefined_*, which GCC 12 reports as
// maybe-uninitialized
namespace avx512 {
typedef __m512 V;
constexpr int W = 16, NV = 2, MR = 12;
RF_AI V vzero() { return _mm512_setzero_ps(); }
RF_AI V vset1(float x) { return _mm512_set1_ps(x); }
RF_AI V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
RF_AI V vadd(V a, V b) { return _mm512_add_ps(a, b); }
RF_AI V vloadu(const float* p) { return _mm512_loadu_ps(p); }
RF_AI void vstoreu(float* p, V v) { _mm512_storeu_ps(p, v); }
RF_AI V vload_b(const float* p) { return _mm512_loadu_ps(p); }
RF_AI V vload_b(const bf16_t* p) {
  const __m512i w = _mm512_maskz_cvtepu16_epi32((__mmask16)0xffff, _mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32((__mmask16)0xffff, w, 16));
}
RF_AI V vload_b(const f16_t* p) {
  return _mm512_maskz_cvtph_ps((__mmask16)0xffff, _mm256_loadu_si256((const __m256i*)p));
}
#include "gemm_isa.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif

enum Isa { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

inline const GemmIsa* gemm_isa_table(Isa i) {
  static const GemmIsa sets[] = {
      {"portable", portable::NR, portable::MR, portable::gemm_panels},
#if RF_CPU_X86
      {"avx2", avx2::NR, avx2::MR, avx2::gemm_panels},
      {"avx512", avx512::NR, avx512::MR, avx512::gemm_panels},
#endif
  };
  return &sets[i];
}

/* the best set this CPU (and this build) runs */
inline Isa cpu_best_isa() {
#if RF_CPU_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f")) return ISA_AVX512;
  if (avx2) return ISA_AVX2;
#endif
  return ISA_PORTABLE;
}

/* the set for `name` ("avx512", "avx2", "portable"), or nullptr when unknown or the CPU lacks it */
inline const GemmIsa* gemm_isa_named(const char* name) {
  const Isa best = cpu_best_isa();
  for (int i = 0; i <= (int)best; i++)
    if (strcmp(gemm_isa_table((Isa)i)->name, name) == 0) return gemm_isa_table((Isa)i);
  return nullptr;
}

/* chosen once per process: the best set, or REFORM_CPU_ISA's when the CPU has it */
inline const GemmIsa* gemm_isa() {
  static const GemmIsa* chosen = [] {
    const char* env = getenv("REFORM_CPU_ISA");
    const GemmIsa* forced = env && *env ? gemm_isa_named(env) : nullptr;
    return forced ? forced : gemm_isa_table(cpu_best_isa());
  }();
  return chosen;
}

/* ---------------- packing ---------------- */

/* one row-major [rows][k] source matrix of a (possibly fused) packed weight */
struct WSrc {
  const void* data;
  int32_t dtype;
  int64_t rows;
};

/* Packs the sources' rows one after another (n = sum of rows) for `isa`. The panels keep the sources' type
 * when they all share it, else f32. Columns past n in the last panel are zero. */
inline PackedW pack_weights(const WSrc* src, int nsrc, int64_t k, const GemmIsa* isa = gemm_isa()) {
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
  const GemmIsa* isa = w.isa;
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
