/*
 * fake_cublas.cpp — a host implementation of the five cuBLAS entry points reform_cuda.cu dlopens, written from
 * the cuBLAS documentation (column-major storage, op(A) is m x k, op(B) is k x n, C is m x n), with the argument
 * checks cuBLAS documents (CUBLAS_STATUS_INVALID_VALUE for negative sizes or a leading dimension below the
 * stored rows, CUBLAS_STATUS_NOT_SUPPORTED for a type combination outside the cublasGemmEx table). Used only by
 * the CPU emulation tests (build/emu/libcublas_fake.so), to exercise the cuBLAS call path of the CUDA build.
 */
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#define API extern "C" __attribute__((visibility("default")))

namespace {
enum { ST_OK = 0, ST_NOT_INITIALIZED = 1, ST_INVALID_VALUE = 7, ST_NOT_SUPPORTED = 15 };
enum { R_32F = 0, R_16F = 2, R_16BF = 14 };  // cudaDataType_t
enum { COMPUTE_32F = 68, COMPUTE_32F_FAST_TF32 = 77 };
enum { OP_N = 0, OP_T = 1, OP_C = 2 };
struct Handle {
  uint32_t magic;
  void* stream;
  int math;
  int64_t calls;
};
const uint32_t kMagic = 0xC0B1A5u;
int64_t g_calls = 0;  // all handles

float u2f(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
uint32_t f2u(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
float ld(const void* p, int t, int64_t i) {
  if (t == R_32F) return ((const float*)p)[i];
  uint16_t h = ((const uint16_t*)p)[i];
  if (t == R_16BF) return u2f((uint32_t)h << 16);
  uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) return (s ? -1.f : 1.f) * (float)m * (1.0f / 16777216.0f);
  if (e == 31) return u2f(s | 0x7f800000u | (m << 13));
  return u2f(s | ((e + 112) << 23) | (m << 13));
}
void st(void* p, int t, int64_t i, float x) {
  if (t == R_32F) {
    ((float*)p)[i] = x;
    return;
  }
  if (t == R_16BF) {
    uint32_t u = f2u(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      ((uint16_t*)p)[i] = (uint16_t)((u >> 16) | 0x40);
      return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    ((uint16_t*)p)[i] = (uint16_t)(u >> 16);
    return;
  }
  // f16 via double rounding-free path: use the hardware-independent conversion of the emulator's rules
  uint32_t x32 = f2u(x), sign = (x32 >> 16) & 0x8000u, ax = x32 & 0x7fffffffu;
  uint16_t r;
  if (ax > 0x7f800000u) r = (uint16_t)(sign | 0x7e00u);
  else if (ax >= 0x477ff000u) r = (uint16_t)(sign | 0x7c00u);
  else if (ax < 0x38800000u) {
    if (ax < 0x33000000u) r = (uint16_t)sign;
    else {
      int e = (int)(ax >> 23);
      uint32_t m = (ax & 0x7fffffu) | 0x800000u;
      int shift = 126 - e;
      uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
      if (rem > half || (rem == half && (q & 1u))) q++;
      r = (uint16_t)(sign | q);
    }
  } else {
    uint32_t e = (ax >> 23) - 112, m = ax & 0x7fffffu, q = (e << 10) | (m >> 13), rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) q++;
    r = (uint16_t)(sign | q);
  }
  ((uint16_t*)p)[i] = r;
}
bool valid(const Handle* h) { return h && h->magic == kMagic; }

API int cublasCreate_v2(void** handle) {
  if (!handle) return ST_INVALID_VALUE;
  Handle* h = (Handle*)calloc(1, sizeof(Handle));
  h->magic = kMagic;
  *handle = h;
  return ST_OK;
}
API int cublasDestroy_v2(void* handle) {
  Handle* h = (Handle*)handle;
  if (!valid(h)) return ST_NOT_INITIALIZED;
  h->magic = 0;
  free(h);
  return ST_OK;
}
API int cublasSetStream_v2(void* handle, void* stream) {
  Handle* h = (Handle*)handle;
  if (!valid(h)) return ST_NOT_INITIALIZED;
  h->stream = stream;
  return ST_OK;
}
API int cublasSetMathMode(void* handle, int mode) {
  Handle* h = (Handle*)handle;
  if (!valid(h)) return ST_NOT_INITIALIZED;
  h->math = mode;
  return ST_OK;
}

/* The CPU CUDA emulation's stream head (cuda/emu/cuda_emu.h EmuStreamHead): a GEMM runs in its stream's order, as
 * cuBLAS queues its kernels on the handle's stream. Any other stream pointer (none here) runs the GEMM at the call. */
struct EmuStreamHead {
  uint64_t magic;
  void (*enqueue)(void* stream, void (*fn)(void*), void* arg, void (*release)(void*));
};
const uint64_t kEmuStreamMagic = 0x4d41455254535545ull;

struct GemmArgs {
  int transa, transb, m, n, k;
  float a, b;
  const void *A, *B;
  void* C;
  int Atype, lda, Btype, ldb, Ctype, ldc;
};

void run_gemm(const GemmArgs& g) {
  for (int j = 0; j < g.n; j++)
    for (int i = 0; i < g.m; i++) {
      double acc = 0.0;
      for (int l = 0; l < g.k; l++) {
        float av = g.transa == OP_N ? ld(g.A, g.Atype, (int64_t)i + (int64_t)l * g.lda)
                                    : ld(g.A, g.Atype, (int64_t)l + (int64_t)i * g.lda);
        float bv = g.transb == OP_N ? ld(g.B, g.Btype, (int64_t)l + (int64_t)j * g.ldb)
                                    : ld(g.B, g.Btype, (int64_t)j + (int64_t)l * g.ldb);
        acc += (double)av * (double)bv;
      }
      const int64_t ci = (int64_t)i + (int64_t)j * g.ldc;
      float v = g.a * (float)acc;
      if (g.b != 0.f) v += g.b * ld(g.C, g.Ctype, ci);  // beta == 0: C is not read (may hold NaN)
      st(g.C, g.Ctype, ci, v);
    }
}
void run_gemm_queued(void* p) { run_gemm(*(GemmArgs*)p); }  // may run again: a captured graph replays it
void free_gemm_args(void* p) { delete (GemmArgs*)p; }
}  // namespace

/* C = alpha * op(A) op(B) + beta * C; alpha/beta are host floats (pointer mode host, compute 32F) */
API int cublasGemmEx(void* handle, int transa, int transb, int m, int n, int k, const void* alpha, const void* A,
                     int Atype, int lda, const void* B, int Btype, int ldb, const void* beta, void* C, int Ctype,
                     int ldc, int computeType, int algo) {
  Handle* h = (Handle*)handle;
  if (!valid(h)) return ST_NOT_INITIALIZED;
  if ((transa != OP_N && transa != OP_T) || (transb != OP_N && transb != OP_T)) return ST_INVALID_VALUE;
  if (m < 0 || n < 0 || k < 0) return ST_INVALID_VALUE;
  const int arows = transa == OP_N ? m : k, brows = transb == OP_N ? k : n;
  if (lda < (arows > 1 ? arows : 1) || ldb < (brows > 1 ? brows : 1) || ldc < (m > 1 ? m : 1)) return ST_INVALID_VALUE;
  if (!alpha || !beta) return ST_INVALID_VALUE;
  if (computeType != COMPUTE_32F && computeType != COMPUTE_32F_FAST_TF32) return ST_NOT_SUPPORTED;
  // cublasGemmEx table, CUBLAS_COMPUTE_32F rows: (A/B, C) in {(16BF,16BF), (16BF,32F), (16F,16F), (16F,32F),
  // (32F,32F)}
  const bool ok_types =
      Atype == Btype && ((Atype == R_16BF && (Ctype == R_16BF || Ctype == R_32F)) ||
                         (Atype == R_16F && (Ctype == R_16F || Ctype == R_32F)) || (Atype == R_32F && Ctype == R_32F));
  if (!ok_types) return ST_NOT_SUPPORTED;
  if (algo < -1 || algo > 23) return ST_INVALID_VALUE;
  if (m == 0 || n == 0) return ST_OK;
  if (k > 0 && (!A || !B)) return ST_INVALID_VALUE;
  if (!C) return ST_INVALID_VALUE;
  h->calls++;
  __atomic_add_fetch(&g_calls, 1, __ATOMIC_RELAXED);
  GemmArgs g{transa, transb, m,   n,     k,  *(const float*)alpha, *(const float*)beta, A, B, C, Atype,
             lda,    Btype,  ldb, Ctype, ldc};
  const EmuStreamHead* sh = (const EmuStreamHead*)h->stream;
  if (sh && sh->magic == kEmuStreamMagic) sh->enqueue(h->stream, run_gemm_queued, new GemmArgs(g), free_gemm_args);
  else run_gemm(g);
  return ST_OK;
}

/* test hook: number of GEMMs computed through this fake (all handles) */
API int64_t fake_cublas_calls(void) { return __atomic_load_n(&g_calls, __ATOMIC_RELAXED); }
