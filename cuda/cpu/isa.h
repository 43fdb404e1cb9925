/*
 * isa.h — the CPU build's instruction sets, chosen at run time, not at compile time (the library is built for
 * baseline x86-64 / any target): AVX-512 where the CPU has it, else AVX2+FMA (+F16C), else a portable path
 * (GCC vectors, any CPU). REFORM_CPU_ISA=avx512|avx2|portable lowers the choice (tests force each path with
 * it); a set the CPU lacks is never used. Each set's kernels are the same source (gemm_isa.inc, attn_isa.inc)
 * compiled under its target pragma, on the vector primitives defined here per set.
 *
 * Matmul (driven by cpu/gemm.h): W is packed into panels of NR outputs (NR = the set's register tile width):
 * panel p holds, for each k, the NR weights W[p*NR + j][k] contiguously, in the checkpoint's own type (f32,
 * bf16 or f16; 16-bit weights are widened in registers, exactly). Several weight matrices with the same k can be packed
 * into one (fused q/k/v, fused gate/up): their rows are concatenated. Prefill (m > 1) packs x per call into MR-row
 * tiles and runs MR x NR register tiles over KC-deep blocks; decode (m == 1) streams the panels once, four at a time.
 * Both are parallel over panels (cpu/pool.h).
 */
#ifndef REFORM_CPU_ISA_H
#define REFORM_CPU_ISA_H

#include "../reform_common.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

// RF_CPU_PORTABLE_ONLY: build only the portable set (what a non-x86 target gets; lets x86 check that build)
#if defined(__x86_64__) && !defined(RF_CPU_PORTABLE_ONLY)
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
struct AttnCall;

/* one instruction set's kernels */
struct CpuIsa {
  const char* name;
  int nr, mr;                                                 // panel width, register tile height
  void (*panels)(const GemmCall& g, int64_t p0, int64_t p1);  // outputs of panels [p0, p1), all rows
  void (*attn_rows)(const AttnCall& a, int g, int64_t j0, int64_t j1, float* scratch);   // queries j0..j1-1
  void (*attn_score)(const AttnCall& a, int g, int64_t e0, int64_t e1, float* scratch);  // keys e0..e1-1
  int64_t (*attn_scratch)(int64_t rows, int64_t window_rows, int hd);                    // floats per thread
};

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

/* a packed weight matrix (or several fused along n) */
struct PackedW {
  int32_t dtype = RF_F32;  // element type of the panels
  int64_t n = 0, k = 0;
  const CpuIsa* isa = nullptr;  // the set it was packed for (its nr); gemm() runs that set's kernels
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

/* causal GQA attention of one call (cpu_kernels.h attn_forward / attn_stats / attn_scores) */
struct AttnCall {
  const float* q;  // [n][nh*hd], rotated
  int64_t n;
  int nh, nkv, hd;
  const float *K, *V;  // [nkv][ld][hd] (K rotated)
  int64_t ld, past;    // query j sees entries 0..past+j
  const float* KT;     // when set, K is read from here instead: keys in NR-blocks of [hd][NR] (see kt_offset)
  int64_t kt_ld;       // keys per kv head in KT (a multiple of NR)
  float* out;          // [n][nh*hd], or nullptr: softmax statistics only
  float* stats;        // [n][nh][2]: running max and sum of exp of each query row's scores (written; read by scores)
  float* score;        // attn_score: score[g*ld_score + e] += probability, summed over queries >= obs_start
  int64_t ld_score, obs_start;
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
#include "attn_isa.inc"
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
#include "attn_isa.inc"
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
#include "attn_isa.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif

enum Isa { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

inline const CpuIsa* isa_table(Isa i) {
  static const CpuIsa sets[] = {
    {"portable", portable::NR, portable::MR, portable::gemm_panels, portable::attn_rows, portable::attn_score,
     portable::attn_scratch},
#if RF_CPU_X86
    {"avx2", avx2::NR, avx2::MR, avx2::gemm_panels, avx2::attn_rows, avx2::attn_score, avx2::attn_scratch},
    {"avx512", avx512::NR, avx512::MR, avx512::gemm_panels, avx512::attn_rows, avx512::attn_score,
     avx512::attn_scratch},
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
inline const CpuIsa* cpu_isa_named(const char* name) {
  const Isa best = cpu_best_isa();
  for (int i = 0; i <= (int)best; i++)
    if (strcmp(isa_table((Isa)i)->name, name) == 0) return isa_table((Isa)i);
  return nullptr;
}

/* chosen once per process: the best set, or REFORM_CPU_ISA's when the CPU has it */
inline const CpuIsa* cpu_isa() {
  static const CpuIsa* chosen = [] {
    const char* env = getenv("REFORM_CPU_ISA");
    const CpuIsa* forced = env && *env ? cpu_isa_named(env) : nullptr;
    return forced ? forced : isa_table(cpu_best_isa());
  }();
  return chosen;
}

}  // namespace cpu
}  // namespace rf

#endif
