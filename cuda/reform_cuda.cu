/*
 * reform_cuda.cu — CUDA implementation of cuda/reform.h (sm_90).
 *
 * Storage: weights and activations in cfg.weight_dtype (bf16 default, f16), kept as raw uint16_t
 * on the device; kernels take a runtime `f16` flag (uniform branch) instead of being templated,
 * except the tensor-core attention kernel (wmma), which is instantiated for both types.
 * All accumulation is f32. Logits are f32. Rounding points mirror HF transformers in bf16
 * (RMSNorm, RoPE, SwiGLU, residual adds round to the activation dtype where HF does).
 *
 * Matrix products: cuBLAS, dlopen'ed at run time ("libcublas.so.13", ".12", "libcublas.so"),
 * with a tiled shared-memory fallback GEMM when it cannot be loaded (or REFORM_NO_CUBLAS=1).
 *
 * Every object (model, compressor, seq) uses its model's stream and cuBLAS handle; rf_score uses
 * a global stream/handle guarded by a mutex. Host results are returned after a stream sync.
 */
#ifdef RF_CUDA_EMU
/* CPU emulation build (tests only): see cuda/emu/cuda_emu.h */
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <library_types.h>
#include <mma.h>
/* Kernel launches and dynamic shared memory go through these two macros so that the CPU emulation
 * (cuda/emu) can compile this file unchanged. */
#define RF_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define RF_EXTERN_SHARED(type, name) extern __shared__ __align__(128) type name[]
#endif

#include <dlfcn.h>

#include <cstdlib>
#include <memory>
#include <mutex>

#include "reform_common.h"
#include "select.h"

namespace {

using rf::set_error;

/* ======================================================================================
 * cuBLAS via dlopen
 * ====================================================================================== */
typedef void* cublasHandle_t;
typedef int cublasStatus_t;
enum { CUBLAS_OP_N_ = 0, CUBLAS_OP_T_ = 1 };
enum { CUBLAS_COMPUTE_32F_ = 68 };
enum { CUBLAS_GEMM_DEFAULT_ = -1 };
enum { CUBLAS_DEFAULT_MATH_ = 0 };

typedef cublasStatus_t (*fn_cublasCreate)(cublasHandle_t*);
typedef cublasStatus_t (*fn_cublasDestroy)(cublasHandle_t);
typedef cublasStatus_t (*fn_cublasSetStream)(cublasHandle_t, cudaStream_t);
typedef cublasStatus_t (*fn_cublasSetMathMode)(cublasHandle_t, int);
typedef cublasStatus_t (*fn_cublasGemmEx)(cublasHandle_t, int transa, int transb, int m, int n, int k,
                                          const void* alpha, const void* A, cudaDataType_t Atype, int lda,
                                          const void* B, cudaDataType_t Btype, int ldb, const void* beta, void* C,
                                          cudaDataType_t Ctype, int ldc, int computeType, int algo);

struct CublasLib {
  bool tried = false;
  bool ok = false;
  std::string name;
  std::string why;
  fn_cublasCreate create = nullptr;
  fn_cublasDestroy destroy = nullptr;
  fn_cublasSetStream set_stream = nullptr;
  fn_cublasSetMathMode set_math = nullptr;
  fn_cublasGemmEx gemm_ex = nullptr;
};
std::mutex g_cublas_mu;
CublasLib g_cublas;

const CublasLib& cublas_lib() {
  std::lock_guard<std::mutex> lk(g_cublas_mu);
  if (g_cublas.tried) return g_cublas;
  g_cublas.tried = true;
  const char* no = getenv("REFORM_NO_CUBLAS");
  if (no && *no && strcmp(no, "0") != 0) {
    g_cublas.why = "disabled by REFORM_NO_CUBLAS";
    return g_cublas;
  }
  // REFORM_CUBLAS_LIB: a path (or soname) to load instead of the default search
  const char* forced = getenv("REFORM_CUBLAS_LIB");
  static const char* names[] = {"libcublas.so.13", "libcublas.so.12", "libcublas.so"};
  void* h = nullptr;
  if (forced && *forced) {
    h = dlopen(forced, RTLD_NOW | RTLD_LOCAL);
    if (h) g_cublas.name = forced;
  } else {
    for (const char* n : names) {
      h = dlopen(n, RTLD_NOW | RTLD_LOCAL);
      if (h) {
        g_cublas.name = n;
        break;
      }
    }
  }
  if (!h) {
    const char* e = dlerror();
    g_cublas.why = std::string("dlopen failed: ") + (e ? e : "?");
    return g_cublas;
  }
  g_cublas.create = (fn_cublasCreate)dlsym(h, "cublasCreate_v2");
  g_cublas.destroy = (fn_cublasDestroy)dlsym(h, "cublasDestroy_v2");
  g_cublas.set_stream = (fn_cublasSetStream)dlsym(h, "cublasSetStream_v2");
  g_cublas.set_math = (fn_cublasSetMathMode)dlsym(h, "cublasSetMathMode");
  g_cublas.gemm_ex = (fn_cublasGemmEx)dlsym(h, "cublasGemmEx");
  if (!g_cublas.create || !g_cublas.destroy || !g_cublas.set_stream || !g_cublas.gemm_ex) {
    g_cublas.why = g_cublas.name + ": missing symbols";
    g_cublas.name.clear();
    return g_cublas;  // keep the handle open (harmless)
  }
  g_cublas.ok = true;
  return g_cublas;
}

}  // namespace

#ifdef RF_CUDA_EMU
/* emulation build only (test hook, see cuda/emu): forget the cached cuBLAS lookup */
void rf_emu_reset_cublas_state() {
  std::lock_guard<std::mutex> lk(g_cublas_mu);
  g_cublas = CublasLib();
}
#endif

namespace {

/* ======================================================================================
 * error helpers
 * ====================================================================================== */
#define CU_CHECK(call)                                                                               \
  do {                                                                                               \
    cudaError_t e_ = (call);                                                                         \
    if (e_ != cudaSuccess) {                                                                         \
      return set_error(RF_ERR_DEVICE, "%s failed: %s (%s:%d)", #call, cudaGetErrorString(e_), __FILE__, \
                       __LINE__);                                                                    \
    }                                                                                                \
  } while (0)

#define KERNEL_CHECK()                                                                                  \
  do {                                                                                                  \
    cudaError_t e_ = cudaGetLastError();                                                                \
    if (e_ != cudaSuccess)                                                                              \
      return set_error(RF_ERR_DEVICE, "kernel launch failed: %s (%s:%d)", cudaGetErrorString(e_), __FILE__, \
                       __LINE__);                                                                       \
  } while (0)

#define RF_TRY(expr)          \
  do {                        \
    int rc_ = (expr);         \
    if (rc_ != RF_OK) return rc_; \
  } while (0)

int dalloc(void** p, size_t bytes, const char* what) {
  *p = nullptr;
  if (bytes == 0) bytes = 16;
  cudaError_t e = cudaMalloc(p, bytes);
  if (e != cudaSuccess) {
    *p = nullptr;
    cudaGetLastError();  // clear (allocation errors are not sticky)
    if (e == cudaErrorMemoryAllocation)
      return set_error(RF_ERR_OOM, "cudaMalloc of %zu bytes (%.1f MiB) for %s failed: out of device memory", bytes,
                       bytes / 1048576.0, what);
    return set_error(RF_ERR_DEVICE, "cudaMalloc of %zu bytes (%.1f MiB) for %s failed: %s", bytes, bytes / 1048576.0,
                     what, cudaGetErrorString(e));
  }
  return RF_OK;
}

/* Owns a set of device allocations, freed together. */
struct DevArena {
  std::vector<void*> ptrs;
  int64_t bytes = 0;
  template <typename T>
  int alloc(T** p, size_t count, const char* what) {
    void* v = nullptr;
    int rc = dalloc(&v, count * sizeof(T), what);
    if (rc != RF_OK) return rc;
    ptrs.push_back(v);
    bytes += (int64_t)(count * sizeof(T));
    *p = (T*)v;
    return RF_OK;
  }
  void free_all() {
    for (void* p : ptrs) cudaFree(p);
    ptrs.clear();
    bytes = 0;
  }
};

int device_index() {
  const char* e = getenv("REFORM_CUDA_DEVICE");
  return e && *e ? atoi(e) : 0;
}

int device_count_impl(std::string* why) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    if (why) *why = cudaGetErrorString(e);
    return 0;
  }
  if (n == 0 && why) *why = "no CUDA device found";
  return n;
}

int ensure_device(int dev) {
  std::string why;
  int n = device_count_impl(&why);
  if (n <= 0) return set_error(RF_ERR_NODEVICE, "no usable CUDA device: %s", why.c_str());
  if (dev < 0 || dev >= n) return set_error(RF_ERR_NODEVICE, "CUDA device %d not present (%d devices)", dev, n);
  cudaError_t e = cudaSetDevice(dev);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return set_error(RF_ERR_NODEVICE, "cudaSetDevice(%d) failed: %s", dev, cudaGetErrorString(e));
  }
  return RF_OK;
}

inline unsigned nblocks(int64_t n, int t) {
  int64_t b = (n + t - 1) / t;
  if (b < 1) b = 1;
  if (b > 1048576) b = 1048576;  // kernels use grid-stride loops
  return (unsigned)b;
}

/* ======================================================================================
 * device helpers
 * ====================================================================================== */
__device__ __forceinline__ float h2f(uint16_t v, bool f16) {
  return f16 ? __half2float(__ushort_as_half(v)) : __bfloat162float(__ushort_as_bfloat16(v));
}
__device__ __forceinline__ uint16_t f2h(float x, bool f16) {
  return f16 ? __half_as_ushort(__float2half_rn(x)) : __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
/* round an f32 value to the activation dtype and back (HF rounding points) */
__device__ __forceinline__ float rnd(float x, bool f16) { return h2f(f2h(x, f16), f16); }
/* load any RF dtype element */
__device__ __forceinline__ float ld_any(const void* p, int dt, int64_t i) {
  if (dt == RF_F32) return ((const float*)p)[i];
  uint16_t v = ((const uint16_t*)p)[i];
  return dt == RF_F16 ? __half2float(__ushort_as_half(v)) : __bfloat162float(__ushort_as_bfloat16(v));
}
__device__ __forceinline__ void st_any(void* p, int dt, int64_t i, float x) {
  if (dt == RF_F32)
    ((float*)p)[i] = x;
  else if (dt == RF_F16)
    ((uint16_t*)p)[i] = __half_as_ushort(__float2half_rn(x));
  else
    ((uint16_t*)p)[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/* ======================================================================================
 * elementwise / small kernels
 * ====================================================================================== */
__global__ void k_convert(const void* __restrict__ src, int sdt, uint16_t* __restrict__ dst, int64_t n, bool f16) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = f2h(ld_any(src, sdt, i), f16);
}

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
__global__ void k_init_normal(uint16_t* __restrict__ dst, int64_t n, uint64_t key, float std, bool f16) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    uint64_t h = splitmix64(key ^ splitmix64((uint64_t)i));
    float u1 = ((float)(h >> 40) + 1.0f) * (1.0f / 16777216.0f);  // (0, 1]
    float u2 = (float)(h & 0xFFFFFFull) * (1.0f / 16777216.0f);   // [0, 1)
    float z = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
    dst[i] = f2h(z * std, f16);
  }
}
__global__ void k_fill(uint16_t* __restrict__ dst, int64_t n, float v, bool f16) {
  uint16_t h = f2h(v, f16);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = h;
}

/* x[i][:] = embed[tok[i]][:] */
__global__ void k_embed(const int32_t* __restrict__ tok, const uint16_t* __restrict__ emb, uint16_t* __restrict__ x,
                        int n, int H) {
  int64_t total = (int64_t)n * H;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t r = i / H, c = i % H;
    x[i] = emb[(int64_t)tok[r] * H + c];
  }
}

/* RMSNorm, HF semantics: y = w * to_dtype(x * rsqrt(mean(x^2) + eps)). One block per row. */
__global__ void k_rmsnorm(const uint16_t* __restrict__ x, const uint16_t* __restrict__ w, uint16_t* __restrict__ y,
                          int H, float eps, bool f16) {
  const uint16_t* xr = x + (int64_t)blockIdx.x * H;
  uint16_t* yr = y + (int64_t)blockIdx.x * H;
  float ss = 0.f;
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    float v = h2f(xr[c], f16);
    ss += v * v;
  }
  __shared__ float red[32];
  ss = warp_sum(ss);
  int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  if (lane == 0) red[wid] = ss;
  __syncthreads();
  if (wid == 0) {
    float v = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) red[0] = v;
  }
  __syncthreads();
  float r = rsqrtf(red[0] / (float)H + eps);
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    float v = rnd(h2f(xr[c], f16) * r, f16);
    yr[c] = f2h(h2f(w[c], f16) * v, f16);
  }
}

/* rows of y (n x cols, stride ld) = bias */
__global__ void k_bias_fill(uint16_t* __restrict__ y, const uint16_t* __restrict__ b, int n, int cols) {
  int64_t total = (int64_t)n * cols;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = b[i % cols];
}

/* h[i][c] = silu(g) * u with gu = [n][2I] (gate first). HF rounding: silu result rounded, product rounded. */
__global__ void k_swiglu(const uint16_t* __restrict__ gu, uint16_t* __restrict__ h, int n, int I, bool f16) {
  int64_t total = (int64_t)n * I;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t r = i / I, c = i % I;
    float g = h2f(gu[r * 2 * I + c], f16);
    float u = h2f(gu[r * 2 * I + I + c], f16);
    float s = rnd(g / (1.f + expf(-g)), f16);
    h[i] = f2h(s * u, f16);
  }
}

/* x = x + y (rounded) */
__global__ void k_residual(uint16_t* __restrict__ x, const uint16_t* __restrict__ y, int64_t n, bool f16) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    x[i] = f2h(h2f(x[i], f16) + h2f(y[i], f16), f16);
}

/* HF apply_rotary_pos_emb in the activation dtype: cos/sin rounded, q*cos + rotate_half(q)*sin. */
__device__ __forceinline__ void rope_pair(float x1, float x2, float ang, bool f16, float* o1, float* o2) {
  float s, c;
  sincosf(ang, &s, &c);
  c = rnd(c, f16);
  s = rnd(s, f16);
  *o1 = rnd(x1 * c, f16) - rnd(x2 * s, f16);
  *o2 = rnd(x2 * c, f16) + rnd(x1 * s, f16);
}

/* q_rot[i][h*hd + d] = rope(qkv[i][h*hd + d]) at position pos0 + i */
__global__ void k_rope_q(const uint16_t* __restrict__ qkv, int qkv_stride, uint16_t* __restrict__ out, int n,
                         int nH, int hd, int pos0, const float* __restrict__ inv_freq, bool f16) {
  int half = hd / 2;
  int64_t total = (int64_t)n * nH * half;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int d = (int)(i % half);
    int64_t t = i / half;
    int h = (int)(t % nH);
    int r = (int)(t / nH);
    const uint16_t* src = qkv + (int64_t)r * qkv_stride + (int64_t)h * hd;
    uint16_t* dst = out + (int64_t)r * nH * hd + (int64_t)h * hd;
    float ang = (float)(pos0 + r) * inv_freq[d];
    float o1, o2;
    rope_pair(h2f(src[d], f16), h2f(src[d + half], f16), ang, f16, &o1, &o2);
    dst[d] = f2h(o1, f16);
    dst[d + half] = f2h(o2, f16);
  }
}

/* Append chunk K/V (from qkv rows) into head-major caches at rows pos0..pos0+n-1; keys roped at
 * their position when `rope`, else stored pre-RoPE. */
__global__ void k_append_kv(const uint16_t* __restrict__ qkv, int qkv_stride, int k_off, int v_off,
                            uint16_t* __restrict__ Kc, uint16_t* __restrict__ Vc, int64_t Tstride, int n, int nKV,
                            int hd, int pos0, bool rope, const float* __restrict__ inv_freq, bool f16) {
  int half = hd / 2;
  int64_t total = (int64_t)n * nKV * half;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int d = (int)(i % half);
    int64_t t = i / half;
    int h = (int)(t % nKV);
    int r = (int)(t / nKV);
    const uint16_t* ks = qkv + (int64_t)r * qkv_stride + k_off + (int64_t)h * hd;
    const uint16_t* vs = qkv + (int64_t)r * qkv_stride + v_off + (int64_t)h * hd;
    int64_t dst = ((int64_t)h * Tstride + pos0 + r) * hd;
    if (rope) {
      float o1, o2;
      rope_pair(h2f(ks[d], f16), h2f(ks[d + half], f16), (float)(pos0 + r) * inv_freq[d], f16, &o1, &o2);
      Kc[dst + d] = f2h(o1, f16);
      Kc[dst + d + half] = f2h(o2, f16);
    } else {
      Kc[dst + d] = ks[d];
      Kc[dst + d + half] = ks[d + half];
    }
    Vc[dst + d] = vs[d];
    Vc[dst + d + half] = vs[d + half];
  }
}

/* dst[h][j] = rope(src[h][j]) at position pos0 + j, j < count (head-major, separate T strides) */
__global__ void k_rope_rows(const uint16_t* __restrict__ src, int64_t sT, uint16_t* __restrict__ dst, int64_t dT,
                            int nKV, int count, int hd, int pos0, const float* __restrict__ inv_freq, bool f16) {
  int half = hd / 2;
  int64_t total = (int64_t)nKV * count * half;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int d = (int)(i % half);
    int64_t t = i / half;
    int j = (int)(t % count);
    int h = (int)(t / count);
    const uint16_t* s = src + ((int64_t)h * sT + j) * hd;
    uint16_t* o = dst + ((int64_t)h * dT + j) * hd;
    float o1, o2;
    rope_pair(h2f(s[d], f16), h2f(s[d + half], f16), (float)(pos0 + j) * inv_freq[d], f16, &o1, &o2);
    o[d] = f2h(o1, f16);
    o[d + half] = f2h(o2, f16);
  }
}

/* Zero scores of rows [pos0, pos0+n) of every head */
__global__ void k_zero_scores(float* __restrict__ score, int64_t Tstride, int nKV, int pos0, int n) {
  int64_t total = (int64_t)nKV * n;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int h = (int)(i / n), r = (int)(i % n);
    score[(int64_t)h * Tstride + pos0 + r] = 0.f;
  }
}

/* Embedding extraction: one warp per (token, selected head). table[2e] = column in qkv, table[2e+1] =
 * column in the embedding row. L2-normalise (F.normalize semantics, eps 1e-6). */
__global__ void k_emb_extract(const uint16_t* __restrict__ qkv, int qkv_stride, const int32_t* __restrict__ table,
                              void* __restrict__ emb, int edim, int hd, bool emb_f16, bool f16) {
  int i = blockIdx.x, e = blockIdx.y, lane = threadIdx.x;
  const uint16_t* src = qkv + (int64_t)i * qkv_stride + table[2 * e];
  int64_t dst = (int64_t)i * edim + table[2 * e + 1];
  float ss = 0.f;
  for (int d = lane; d < hd; d += 32) {
    float v = h2f(src[d], f16);
    ss += v * v;
  }
  ss = warp_sum(ss);
  float inv = 1.f / fmaxf(sqrtf(ss), 1e-6f);
  for (int d = lane; d < hd; d += 32) {
    float v = h2f(src[d], f16) * inv;
    if (emb_f16)
      ((__half*)emb)[dst + d] = __float2half_rn(v);
    else
      ((float*)emb)[dst + d] = v;
  }
}

/* gather rows: dst[h][i][:] = src[h][keep[h*cap + i]][:] for i < cap */
template <typename E>
__global__ void k_gather_rows(const E* __restrict__ src, int64_t sT, E* __restrict__ dst, int64_t dT,
                              const int32_t* __restrict__ keep, int nKV, int cap, int width) {
  int64_t total = (int64_t)nKV * cap * width;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int c = (int)(i % width);
    int64_t t = i / width;
    int r = (int)(t % cap);
    int h = (int)(t / cap);
    int srow = keep[(int64_t)h * cap + r];
    dst[((int64_t)h * dT + r) * width + c] = src[((int64_t)h * sT + srow) * width + c];
  }
}

/* ---- scoring helpers ---- */
/* one warp per row: dst[r][:] = src[r][:] / ||src[r]|| (f32 out), zero rows stay zero */
__global__ void k_normalize_rows(const void* __restrict__ src, int sdt, float* __restrict__ dst, int64_t rows,
                                 int dim) {
  const int lane = threadIdx.x & 31;
  const int64_t wpb = blockDim.x >> 5;
  for (int64_t r = blockIdx.x * wpb + (threadIdx.x >> 5); r < rows; r += (int64_t)gridDim.x * wpb) {
    float ss = 0.f;
    for (int d = lane; d < dim; d += 32) {
      float v = ld_any(src, sdt, r * dim + d);
      ss += v * v;
    }
    ss = warp_sum(ss);
    float inv = 1.f / fmaxf(sqrtf(ss), 1e-12f);  // all-zero row -> 0
    for (int d = lane; d < dim; d += 32) dst[r * dim + d] = ld_any(src, sdt, r * dim + d) * inv;
  }
}
__global__ void k_rowmax(const float* __restrict__ s, int64_t rows, int cols, float* __restrict__ out) {
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < rows; r += (int64_t)gridDim.x * blockDim.x) {
    float m = -INFINITY;
    for (int c = 0; c < cols; c++) m = fmaxf(m, s[r * cols + c]);
    out[r] = m;
  }
}

/* ======================================================================================
 * fallback GEMM: C[M][N] = alpha * A[M][K] . B[N][K]^T + beta * C   (row-major, any RF dtypes)
 * ====================================================================================== */
#define FG_BM 64
#define FG_BN 64
#define FG_BK 16
__global__ void __launch_bounds__(256) k_gemm_nt(int M, int N, int K, const void* __restrict__ A, int adt, int64_t lda,
                                                 const void* __restrict__ B, int bdt, int64_t ldb, void* C, int cdt,
                                                 int64_t ldc, float alpha, float beta) {
  __shared__ float As[FG_BK][FG_BM + 4];
  __shared__ float Bs[FG_BK][FG_BN + 4];
  int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  int64_t m0 = (int64_t)blockIdx.y * FG_BM, n0 = (int64_t)blockIdx.x * FG_BN;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 4; j++) acc[i][j] = 0.f;
  for (int k0 = 0; k0 < K; k0 += FG_BK) {
#pragma unroll
    for (int e = 0; e < 4; e++) {
      int idx = tid + 256 * e;
      int r = idx / FG_BK, k = idx % FG_BK;
      int64_t gm = m0 + r, gn = n0 + r;
      int gk = k0 + k;
      As[k][r] = (gm < M && gk < K) ? ld_any(A, adt, gm * lda + gk) : 0.f;
      Bs[k][r] = (gn < N && gk < K) ? ld_any(B, bdt, gn * ldb + gk) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < FG_BK; k++) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; i++) a[i] = As[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; j++) b[j] = Bs[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; i++) {
    int64_t gm = m0 + ty + 16 * i;
    if (gm >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      int64_t gn = n0 + tx + 16 * j;
      if (gn >= N) continue;
      float v = alpha * acc[i][j];
      if (beta != 0.f) v += beta * ld_any(C, cdt, gm * ldc + gn);
      st_any(C, cdt, gm * ldc + gn, v);
    }
  }
}

/* ======================================================================================
 * attention (tensor cores via wmma): flash-style, causal, GQA
 *   Q: [n][q_stride] rows, head h at column h*hd (already roped)
 *   K, V: head-major [nKV][Tstride][hd]; keys 0..total-1; query i sees key j iff j <= len + i
 *   O: [n][o_stride], head h at column h*hd
 *   stat_m / stat_l (optional): per (head, query) row max (scaled logits) and sum of exp.
 * Block: 128 threads (4 warps), 64 queries x one head, key tiles of 64.
 * ====================================================================================== */
#define FA_BQ 64
#define FA_BK 64
#define FA_THREADS 128

struct FaLayout {
  int ldh, lds, ldp, ldo;
  size_t q, k, v, s, p, o, m, l, total;
};
__host__ __device__ inline size_t fa_align(size_t x) { return (x + 127) & ~(size_t)127; }
__host__ __device__ inline FaLayout fa_layout(int hd) {
  FaLayout L;
  L.ldh = hd + 8;
  L.lds = FA_BK + 4;
  L.ldp = FA_BK + 8;
  L.ldo = hd + 4;
  size_t off = 0;
  L.q = off; off = fa_align(off + (size_t)FA_BQ * L.ldh * 2);
  L.k = off; off = fa_align(off + (size_t)FA_BK * L.ldh * 2);
  L.v = off; off = fa_align(off + (size_t)FA_BK * L.ldh * 2);
  L.s = off; off = fa_align(off + (size_t)FA_BQ * L.lds * 4);
  L.p = off; off = fa_align(off + (size_t)FA_BQ * L.ldp * 2);
  L.o = off; off = fa_align(off + (size_t)FA_BQ * L.ldo * 4);
  L.m = off; off = fa_align(off + (size_t)FA_BQ * 4);
  L.l = off; off = fa_align(off + (size_t)FA_BQ * 4);
  L.total = off;
  return L;
}

template <typename T>
__device__ __forceinline__ T to_t(float x);
template <>
__device__ __forceinline__ __half to_t<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 to_t<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
__global__ void __launch_bounds__(FA_THREADS)
    k_flash_attn(const uint16_t* __restrict__ Q, int q_stride, const uint16_t* __restrict__ K,
                 const uint16_t* __restrict__ V, int64_t Tstride, uint16_t* __restrict__ O, int o_stride,
                 float* __restrict__ stat_m, float* __restrict__ stat_l, int stat_stride, int q_begin, int n, int len,
                 int total, int G, int hd, float scale, bool f16) {
  using namespace nvcuda;
  RF_EXTERN_SHARED(unsigned char, smem);
  const FaLayout L = fa_layout(hd);
  uint16_t* Qs = (uint16_t*)(smem + L.q);
  uint16_t* Ks = (uint16_t*)(smem + L.k);
  uint16_t* Vs = (uint16_t*)(smem + L.v);
  float* Ss = (float*)(smem + L.s);
  T* Ps = (T*)(smem + L.p);
  float* Os = (float*)(smem + L.o);
  float* row_m = (float*)(smem + L.m);
  float* row_l = (float*)(smem + L.l);

  const int h = blockIdx.y, kvh = h / G;
  const int q0 = q_begin + blockIdx.x * FA_BQ;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int vpr = hd / 8;  // uint4 vectors per row

  for (int idx = tid; idx < FA_BQ * vpr; idx += FA_THREADS) {
    int r = idx / vpr, c = (idx % vpr) * 8;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (q0 + r < n) val = *(const uint4*)(Q + (int64_t)(q0 + r) * q_stride + (int64_t)h * hd + c);
    *(uint4*)(Qs + r * L.ldh + c) = val;
  }
  for (int idx = tid; idx < FA_BQ * hd; idx += FA_THREADS) Os[(idx / hd) * L.ldo + idx % hd] = 0.f;
  if (tid < FA_BQ) {
    row_m[tid] = -INFINITY;
    row_l[tid] = 0.f;
  }
  const int q_hi = min(n, q0 + FA_BQ);
  const int kend = min(total, len + q_hi);
  const uint16_t* Kh = K + (int64_t)kvh * Tstride * hd;
  const uint16_t* Vh = V + (int64_t)kvh * Tstride * hd;
  __syncthreads();

  for (int k0 = 0; k0 < kend; k0 += FA_BK) {
    for (int idx = tid; idx < FA_BK * vpr; idx += FA_THREADS) {
      int r = idx / vpr, c = (idx % vpr) * 8;
      uint4 kv = make_uint4(0u, 0u, 0u, 0u), vv = make_uint4(0u, 0u, 0u, 0u);
      if (k0 + r < kend) {
        kv = *(const uint4*)(Kh + (int64_t)(k0 + r) * hd + c);
        vv = *(const uint4*)(Vh + (int64_t)(k0 + r) * hd + c);
      }
      *(uint4*)(Ks + r * L.ldh + c) = kv;
      *(uint4*)(Vs + r * L.ldh + c) = vv;
    }
    __syncthreads();
    {  // S = Q K^T for this warp's 16 rows
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
      for (int j = 0; j < 4; j++) wmma::fill_fragment(acc[j], 0.f);
      for (int kk = 0; kk < hd; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, (const T*)(Qs + warp * 16 * L.ldh + kk), L.ldh);
#pragma unroll
        for (int j = 0; j < 4; j++) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(b, (const T*)(Ks + j * 16 * L.ldh + kk), L.ldh);
          wmma::mma_sync(acc[j], a, b, acc[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; j++)
        wmma::store_matrix_sync(Ss + warp * 16 * L.lds + j * 16, acc[j], L.lds, wmma::mem_row_major);
    }
    __syncthreads();
    {  // online softmax: 2 threads per row, 32 columns each
      const int r = tid >> 1, hf = tid & 1;
      const int lim = len + q0 + r;  // last visible key for this row
      const float* srow = Ss + r * L.lds + hf * 32;
      float sv[32];
      float mx = -INFINITY;
#pragma unroll
      for (int c = 0; c < 32; c++) {
        int j = k0 + hf * 32 + c;
        float s = srow[c] * scale;
        if (j > lim || j >= kend) s = -INFINITY;
        sv[c] = s;
        mx = fmaxf(mx, s);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      const float m_old = row_m[r];
      const float m_new = fmaxf(m_old, mx);
      float corr = 1.f;
      if (m_new == -INFINITY)
        corr = 1.f;
      else if (m_old == -INFINITY)
        corr = 0.f;
      else
        corr = expf(m_old - m_new);
      float sum = 0.f;
      T* prow = Ps + r * L.ldp + hf * 32;
#pragma unroll
      for (int c = 0; c < 32; c++) {
        float p = (sv[c] == -INFINITY) ? 0.f : expf(sv[c] - m_new);
        sum += p;
        prow[c] = to_t<T>(p);
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      const float l_old = row_l[r];
      __syncwarp();
      if (hf == 0) {
        row_m[r] = m_new;
        row_l[r] = l_old * corr + sum;
      }
      if (corr != 1.f) {
        float* orow = Os + r * L.ldo;
        for (int c = hf; c < hd; c += 2) orow[c] *= corr;
      }
    }
    __syncthreads();
    // O += P V (this warp's 16 rows)
    for (int cf = 0; cf < hd; cf += 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
      wmma::load_matrix_sync(o, Os + warp * 16 * L.ldo + cf, L.ldo, wmma::mem_row_major);
#pragma unroll
      for (int ks = 0; ks < FA_BK; ks += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, Ps + warp * 16 * L.ldp + ks, L.ldp);
        wmma::load_matrix_sync(b, (const T*)(Vs + ks * L.ldh + cf), L.ldh);
        wmma::mma_sync(o, a, b, o);
      }
      wmma::store_matrix_sync(Os + warp * 16 * L.ldo + cf, o, L.ldo, wmma::mem_row_major);
    }
    __syncthreads();
  }
  for (int idx = tid; idx < FA_BQ * hd; idx += FA_THREADS) {
    int r = idx / hd, c = idx % hd;
    if (q0 + r < n) {
      float l = row_l[r];
      float v = l > 0.f ? Os[r * L.ldo + c] / l : 0.f;
      O[(int64_t)(q0 + r) * o_stride + (int64_t)h * hd + c] = f2h(v, f16);
    }
  }
  if (stat_m && tid < FA_BQ && q0 + tid < n) {
    stat_m[(int64_t)h * stat_stride + q0 + tid] = row_m[tid];
    stat_l[(int64_t)h * stat_stride + q0 + tid] = row_l[tid];
  }
}

/* H2O accumulation: score[kvh][j] += sum over queries qi in [qs, n) and heads g of the group of
 * exp(s*scale - m) / l. One thread per key, 128 keys per block; K tile in smem (f32). */
#define H2O_KEYS 128
#define H2O_QB 16
__host__ __device__ inline size_t h2o_smem(int hd) {
  return ((size_t)H2O_KEYS * (hd + 1) + (size_t)H2O_QB * hd + 3 * H2O_QB) * 4;
}
__global__ void __launch_bounds__(H2O_KEYS)
    k_h2o(const uint16_t* __restrict__ Q, int q_stride, const uint16_t* __restrict__ K, int64_t Tstride,
          const float* __restrict__ stat_m, const float* __restrict__ stat_l, int stat_stride, float* __restrict__ score,
          int qs, int n, int len, int total, int G, int hd, float scale, bool f16) {
  RF_EXTERN_SHARED(float, hsm);
  float* Ks = hsm;                                   // [H2O_KEYS][hd+1]
  float* Qs = Ks + (size_t)H2O_KEYS * (hd + 1);      // [H2O_QB][hd]
  float* qm = Qs + (size_t)H2O_QB * hd;              // [H2O_QB]
  float* ql = qm + H2O_QB;                           // [H2O_QB]
  int* qidx = (int*)(ql + H2O_QB);                   // [H2O_QB]
  const int kvh = blockIdx.y, tid = threadIdx.x;
  const int j0 = blockIdx.x * H2O_KEYS;
  const int j = j0 + tid;
  const uint16_t* Kh = K + (int64_t)kvh * Tstride * hd;
  for (int idx = tid; idx < H2O_KEYS * hd; idx += H2O_KEYS) {
    int r = idx / hd, c = idx % hd;
    Ks[r * (hd + 1) + c] = (j0 + r < total) ? h2f(Kh[(int64_t)(j0 + r) * hd + c], f16) : 0.f;
  }
  const int W = n - qs;
  const int R = G * W;
  float tot = 0.f;
  for (int base = 0; base < R; base += H2O_QB) {
    __syncthreads();
    for (int idx = tid; idx < H2O_QB * hd; idx += H2O_KEYS) {
      int rr = idx / hd, c = idx % hd;
      int p = base + rr;
      float v = 0.f;
      if (p < R) {
        int g = p / W, qi = qs + p % W;
        v = h2f(Q[(int64_t)qi * q_stride + (int64_t)(kvh * G + g) * hd + c], f16);
      }
      Qs[rr * hd + c] = v;
    }
    if (tid < H2O_QB) {
      int p = base + tid;
      if (p < R) {
        int g = p / W, qi = qs + p % W, hh = kvh * G + g;
        qm[tid] = stat_m[(int64_t)hh * stat_stride + qi];
        ql[tid] = stat_l[(int64_t)hh * stat_stride + qi];
        qidx[tid] = qi;
      } else {
        qm[tid] = 0.f;
        ql[tid] = 0.f;
        qidx[tid] = -1;
      }
    }
    __syncthreads();
    float acc[H2O_QB];
#pragma unroll
    for (int rr = 0; rr < H2O_QB; rr++) acc[rr] = 0.f;
    const float* kr = Ks + tid * (hd + 1);
    for (int d = 0; d < hd; d++) {
      float kv = kr[d];
#pragma unroll
      for (int rr = 0; rr < H2O_QB; rr++) acc[rr] += kv * Qs[rr * hd + d];
    }
    if (j < total) {
#pragma unroll
      for (int rr = 0; rr < H2O_QB; rr++) {
        int qi = qidx[rr];
        if (qi >= 0 && j <= len + qi && ql[rr] > 0.f) tot += expf(acc[rr] * scale - qm[rr]) / ql[rr];
      }
    }
  }
  if (j < total) score[(int64_t)kvh * Tstride + j] += tot;
}

/* Decode attention (one query): split-K partials then combine. part: [nH][nsplit_max][hd+2] */
#define DEC_SPLIT 256
__global__ void __launch_bounds__(128)
    k_decode_partial(const uint16_t* __restrict__ Q, const uint16_t* __restrict__ K, const uint16_t* __restrict__ V,
                     int64_t Tstride, float* __restrict__ part, int nsplit_max, int total, int G, int hd, float scale,
                     bool f16) {
  __shared__ float qs[256];
  __shared__ float wm[4], wl[4];
  __shared__ float wo[4][256];
  const int h = blockIdx.x, split = blockIdx.y, kvh = h / G;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int d = tid; d < hd; d += 128) qs[d] = h2f(Q[(int64_t)h * hd + d], f16);
  __syncthreads();
  const int j0 = split * DEC_SPLIT, j1 = min(total, j0 + DEC_SPLIT);
  const uint16_t* Kh = K + (int64_t)kvh * Tstride * hd;
  const uint16_t* Vh = V + (int64_t)kvh * Tstride * hd;
  float o[8];
#pragma unroll
  for (int i = 0; i < 8; i++) o[i] = 0.f;
  float m = -INFINITY, l = 0.f;
  for (int j = j0 + warp; j < j1; j += 4) {
    const uint16_t* kr = Kh + (int64_t)j * hd;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 8; i++) {
      int d = lane + 32 * i;
      if (d < hd) s += qs[d] * h2f(kr[d], f16);
    }
    s = warp_sum(s) * scale;
    float m_new = fmaxf(m, s);
    float corr = (m == -INFINITY) ? 0.f : expf(m - m_new);
    float p = expf(s - m_new);
    l = l * corr + p;
    const uint16_t* vr = Vh + (int64_t)j * hd;
#pragma unroll
    for (int i = 0; i < 8; i++) {
      int d = lane + 32 * i;
      if (d < hd) o[i] = o[i] * corr + p * h2f(vr[d], f16);
    }
    m = m_new;
  }
  if (lane == 0) {
    wm[warp] = m;
    wl[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < 8; i++) {
    int d = lane + 32 * i;
    if (d < hd) wo[warp][d] = o[i];
  }
  __syncthreads();
  float M = fmaxf(fmaxf(wm[0], wm[1]), fmaxf(wm[2], wm[3]));
  float* out = part + ((int64_t)h * nsplit_max + split) * (hd + 2);
  for (int d = tid; d < hd; d += 128) {
    float acc = 0.f;
    if (M != -INFINITY)
      for (int w = 0; w < 4; w++)
        if (wm[w] != -INFINITY) acc += wo[w][d] * expf(wm[w] - M);
    out[d] = acc;
  }
  if (tid == 0) {
    float Ls = 0.f;
    if (M != -INFINITY)
      for (int w = 0; w < 4; w++)
        if (wm[w] != -INFINITY) Ls += wl[w] * expf(wm[w] - M);
    out[hd] = M;
    out[hd + 1] = Ls;
  }
}
__global__ void k_decode_combine(const float* __restrict__ part, int nsplit_max, int nsplit, int hd,
                                 uint16_t* __restrict__ O, bool f16) {
  const int h = blockIdx.x;
  const float* ph = part + (int64_t)h * nsplit_max * (hd + 2);
  float M = -INFINITY;
  for (int s = 0; s < nsplit; s++) M = fmaxf(M, ph[(int64_t)s * (hd + 2) + hd]);
  float Ls = 0.f;
  for (int s = 0; s < nsplit; s++) {
    float m = ph[(int64_t)s * (hd + 2) + hd];
    if (m != -INFINITY) Ls += ph[(int64_t)s * (hd + 2) + hd + 1] * expf(m - M);
  }
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < nsplit; s++) {
      float m = ph[(int64_t)s * (hd + 2) + hd];
      if (m != -INFINITY) acc += ph[(int64_t)s * (hd + 2) + d] * expf(m - M);
    }
    O[(int64_t)h * hd + d] = f2h(Ls > 0.f ? acc / Ls : 0.f, f16);
  }
}

/* ======================================================================================
 * GEMM dispatcher
 * ====================================================================================== */
cudaDataType_t cuda_dt(int dt) { return dt == RF_F32 ? CUDA_R_32F : dt == RF_F16 ? CUDA_R_16F : CUDA_R_16BF; }

struct Gemm {
  cublasHandle_t h = nullptr;
  cudaStream_t stream = nullptr;
  std::string why_fallback;
  fn_cublasGemmEx gemm_ex = nullptr;  // entry points of the library the handle came from
  fn_cublasDestroy destroy_fn = nullptr;

  int init(cudaStream_t s) {
    stream = s;
    const CublasLib& lib = cublas_lib();
    if (!lib.ok) {
      why_fallback = lib.why;
      return RF_OK;
    }
    cublasHandle_t hh = nullptr;
    int st = lib.create(&hh);
    if (st != 0 || !hh) {
      why_fallback = "cublasCreate failed (status " + std::to_string(st) + ")";
      return RF_OK;
    }
    if (lib.set_stream(hh, s) != 0) {
      lib.destroy(hh);
      return set_error(RF_ERR_DEVICE, "cublasSetStream failed");
    }
    if (lib.set_math) lib.set_math(hh, CUBLAS_DEFAULT_MATH_);
    h = hh;
    gemm_ex = lib.gemm_ex;
    destroy_fn = lib.destroy;
    return RF_OK;
  }
  void destroy() {
    if (h) destroy_fn(h);
    h = nullptr;
  }
  /* C[M][N] (ldc) = A[M][K] (lda) . B[N][K]^T (ldb) + beta*C, row-major */
  int nt(int M, int N, int K, const void* A, int adt, int64_t lda, const void* B, int bdt, int64_t ldb, void* C,
         int cdt, int64_t ldc, float beta) {
    if (M <= 0 || N <= 0) return RF_OK;
    float alpha = 1.f;
    if (h) {
      int st = gemm_ex(h, CUBLAS_OP_T_, CUBLAS_OP_N_, N, M, K, &alpha, B, cuda_dt(bdt), (int)ldb, A,
                                    cuda_dt(adt), (int)lda, &beta, C, cuda_dt(cdt), (int)ldc, CUBLAS_COMPUTE_32F_,
                                    CUBLAS_GEMM_DEFAULT_);
      if (st != 0)
        return set_error(RF_ERR_DEVICE, "cublasGemmEx(M=%d N=%d K=%d) failed with status %d", M, N, K, st);
      return RF_OK;
    }
    dim3 grid((unsigned)((N + FG_BN - 1) / FG_BN), (unsigned)((M + FG_BM - 1) / FG_BM));
    RF_LAUNCH(k_gemm_nt, grid, 256, 0, stream)(M, N, K, A, adt, lda, B, bdt, ldb, C, cdt, ldc, alpha, beta);
    KERNEL_CHECK();
    return RF_OK;
  }
};

/* ======================================================================================
 * objects
 * ====================================================================================== */
struct LayerW {
  uint16_t* in_norm = nullptr;
  uint16_t* post_norm = nullptr;
  uint16_t* wqkv = nullptr;  // [qd + 2 kvd][H]
  uint16_t* bqkv = nullptr;  // [qd + 2 kvd]
  uint16_t* wo = nullptr;    // [H][qd]
  uint16_t* wgu = nullptr;   // [2I][H] (gate rows first)
  uint16_t* wdown = nullptr; // [H][I]
};

}  // namespace

struct rf_model {
  rf_config cfg{};
  int dev = 0;
  bool f16 = false;
  int adt = RF_BF16;  // activation / weight dtype
  int H = 0, I = 0, V = 0, NL = 0, nH = 0, nKV = 0, hd = 0, qd = 0, kvd = 0, qkvd = 0, G = 1;
  DevArena arena;
  uint16_t* embed = nullptr;
  uint16_t* norm = nullptr;
  uint16_t* lm_head = nullptr;
  std::vector<LayerW> layers;
  float* inv_freq = nullptr;
  void* staging = nullptr;
  size_t staging_bytes = 0;
  std::vector<uint8_t> set;
  bool finalized = false;
  cudaStream_t stream = nullptr;
  Gemm gemm;
  size_t fa_smem = 0;
  int children = 0;        // live compressors / seqs (they keep the model alive, as in the CPU build)
  bool destroyed = false;  // rf_model_destroy called; freed when the last child goes
};

struct rf_compressor {
  rf_model* m = nullptr;
  rf_compress_params p{};
  std::vector<rf::HeadSel> heads;
  int exit = 0;
  int edim = 0;
  int T = 0;  // capacity + max_chunk rows per cache head
  int64_t len = 0, seen = 0;
  DevArena arena;
  std::vector<uint16_t*> Kc, Vc;  // per layer [nKV][T][hd] (keys pre-RoPE)
  std::vector<float*> score;      // per layer [nKV][T]
  uint16_t* Krot = nullptr;       // [nKV][T][hd]
  uint16_t *x = nullptr, *xn = nullptr, *qkv = nullptr, *qrot = nullptr, *attn = nullptr, *gu = nullptr,
           *hbuf = nullptr;
  float *stat_m = nullptr, *stat_l = nullptr;  // [nH][max_chunk]
  void* emb = nullptr;                         // [max_chunk][edim]
  int32_t* tok = nullptr;
  int32_t* table = nullptr;           // per layer pairs, concatenated
  std::vector<int> table_off, table_cnt;  // per layer
  uint16_t* tmpK = nullptr;           // [nKV][cap][hd]
  float* tmpS = nullptr;              // [nKV][cap]
  int32_t* keep_d = nullptr;          // [nKV][cap]
};

struct rf_seq {
  rf_model* m = nullptr;
  int maxT = 0;
  int S = 0;  // rows per internal prefill chunk
  int len = 0;
  bool has_logits = false;
  DevArena arena;
  std::vector<uint16_t*> Kc, Vc;  // per layer [nKV][maxT][hd] (roped)
  uint16_t *x = nullptr, *xn = nullptr, *qkv = nullptr, *qrot = nullptr, *attn = nullptr, *gu = nullptr,
           *hbuf = nullptr;
  float* logits = nullptr;  // [V]
  float* part = nullptr;    // decode partials
  int nsplit_max = 0;
  int32_t* tok = nullptr;
  std::vector<float> host_logits;
};

namespace {

/* ---------------- shared forward pieces ---------------- */
struct Acts {
  uint16_t *x, *xn, *qkv, *qrot, *attn, *gu, *hbuf;
};

int launch_flash(rf_model* m, const uint16_t* Q, const uint16_t* K, const uint16_t* V, int64_t Tstride, uint16_t* O,
                 float* sm, float* sl, int stat_stride, int q_begin, int n, int len, int total) {
  int rows = n - q_begin;
  if (rows <= 0) return RF_OK;
  dim3 grid((unsigned)((rows + FA_BQ - 1) / FA_BQ), (unsigned)m->nH);
  float scale = 1.f / sqrtf((float)m->hd);
  if (m->f16)
    RF_LAUNCH(k_flash_attn<__half>, grid, FA_THREADS, m->fa_smem, m->stream)(Q, m->qd, K, V, Tstride, O, m->qd, sm, sl,
                                                                     stat_stride, q_begin, n, len, total, m->G,
                                                                     m->hd, scale, true);
  else
    RF_LAUNCH(k_flash_attn<__nv_bfloat16>, grid, FA_THREADS, m->fa_smem, m->stream)(Q, m->qd, K, V, Tstride, O, m->qd, sm,
                                                                            sl, stat_stride, q_begin, n, len, total,
                                                                            m->G, m->hd, scale, false);
  KERNEL_CHECK();
  return RF_OK;
}

int run_rmsnorm(rf_model* m, const uint16_t* x, const uint16_t* w, uint16_t* y, int rows) {
  RF_LAUNCH(k_rmsnorm, rows, 256, 0, m->stream)(x, w, y, m->H, m->cfg.rms_eps, m->f16);
  KERNEL_CHECK();
  return RF_OK;
}

/* xn = rmsnorm(x); qkv = xn Wqkv^T (+bias) */
int run_qkv(rf_model* m, const LayerW& w, const Acts& a, int n) {
  RF_TRY(run_rmsnorm(m, a.x, w.in_norm, a.xn, n));
  float beta = 0.f;
  if (m->cfg.qkv_bias) {
    RF_LAUNCH(k_bias_fill, nblocks((int64_t)n * m->qkvd, 256), 256, 0, m->stream)(a.qkv, w.bqkv, n, m->qkvd);
    KERNEL_CHECK();
    beta = 1.f;
  }
  return m->gemm.nt(n, m->qkvd, m->H, a.xn, m->adt, m->H, w.wqkv, m->adt, m->H, a.qkv, m->adt, m->qkvd, beta);
}

/* x += attn Wo^T; x += MLP(rmsnorm(x)) */
int run_post_attn(rf_model* m, const LayerW& w, const Acts& a, int n) {
  const int64_t nh = (int64_t)n * m->H;
  RF_TRY(m->gemm.nt(n, m->H, m->qd, a.attn, m->adt, m->qd, w.wo, m->adt, m->qd, a.xn, m->adt, m->H, 0.f));
  RF_LAUNCH(k_residual, nblocks(nh, 256), 256, 0, m->stream)(a.x, a.xn, nh, m->f16);
  KERNEL_CHECK();
  RF_TRY(run_rmsnorm(m, a.x, w.post_norm, a.xn, n));
  RF_TRY(m->gemm.nt(n, 2 * m->I, m->H, a.xn, m->adt, m->H, w.wgu, m->adt, m->H, a.gu, m->adt, 2 * m->I, 0.f));
  RF_LAUNCH(k_swiglu, nblocks((int64_t)n * m->I, 256), 256, 0, m->stream)(a.gu, a.hbuf, n, m->I, m->f16);
  KERNEL_CHECK();
  RF_TRY(m->gemm.nt(n, m->H, m->I, a.hbuf, m->adt, m->I, w.wdown, m->adt, m->I, a.xn, m->adt, m->H, 0.f));
  RF_LAUNCH(k_residual, nblocks(nh, 256), 256, 0, m->stream)(a.x, a.xn, nh, m->f16);
  KERNEL_CHECK();
  return RF_OK;
}

int check_tokens(const rf_model* m, const int32_t* tokens, int n) {
  if (!tokens) return set_error(RF_ERR_INVALID, "tokens is NULL");
  for (int i = 0; i < n; i++)
    if (tokens[i] < 0 || tokens[i] >= m->V)
      return set_error(RF_ERR_INVALID, "token %d at index %d out of range [0,%d)", tokens[i], i, m->V);
  return RF_OK;
}

int upload_tokens(rf_model* m, int32_t* dtok, const int32_t* tokens, int n, uint16_t* x) {
  CU_CHECK(cudaMemcpyAsync(dtok, tokens, sizeof(int32_t) * n, cudaMemcpyHostToDevice, m->stream));
  RF_LAUNCH(k_embed, nblocks((int64_t)n * m->H, 256), 256, 0, m->stream)(dtok, m->embed, x, n, m->H);
  KERNEL_CHECK();
  return RF_OK;
}

/* ---------------- model helpers ---------------- */
uint16_t* tensor_dst(rf_model* m, const rf::TensorId& id, int64_t* count) {
  const int64_t H = m->H;
  switch (id.kind) {
    case rf::T_EMBED: *count = (int64_t)m->V * H; return m->embed;
    case rf::T_NORM: *count = H; return m->norm;
    case rf::T_LM_HEAD: *count = (int64_t)m->V * H; return m->lm_head;
    default: break;
  }
  LayerW& w = m->layers[id.layer];
  switch (id.kind) {
    case rf::T_IN_NORM: *count = H; return w.in_norm;
    case rf::T_POST_NORM: *count = H; return w.post_norm;
    case rf::T_Q: *count = (int64_t)m->qd * H; return w.wqkv;
    case rf::T_K: *count = (int64_t)m->kvd * H; return w.wqkv + (int64_t)m->qd * H;
    case rf::T_V: *count = (int64_t)m->kvd * H; return w.wqkv + (int64_t)(m->qd + m->kvd) * H;
    case rf::T_O: *count = H * m->qd; return w.wo;
    case rf::T_QB: *count = m->qd; return w.bqkv;
    case rf::T_KB: *count = m->kvd; return w.bqkv + m->qd;
    case rf::T_VB: *count = m->kvd; return w.bqkv + m->qd + m->kvd;
    case rf::T_GATE: *count = (int64_t)m->I * H; return w.wgu;
    case rf::T_UP: *count = (int64_t)m->I * H; return w.wgu + (int64_t)m->I * H;
    case rf::T_DOWN: *count = H * m->I; return w.wdown;
    default: break;
  }
  *count = 0;
  return nullptr;
}

void model_free(rf_model* m) {
  if (!m) return;
  cudaSetDevice(m->dev);
  if (m->stream) cudaStreamSynchronize(m->stream);
  m->gemm.destroy();
  m->arena.free_all();
  if (m->stream) cudaStreamDestroy(m->stream);
  m->stream = nullptr;
  cudaGetLastError();
}

/* a compressor / seq of m went away: free m if the caller already destroyed it and this was the last child */
void model_release_child(rf_model* m) {
  if (--m->children <= 0 && m->destroyed) {
    model_free(m);
    delete m;
  }
}

int model_create_impl(const rf_config* cfg, rf_model** out) {
  RF_TRY(rf::validate_config(cfg));
  if (cfg->head_dim % 16 != 0 || cfg->head_dim > 256)
    return set_error(RF_ERR_INVALID, "CUDA build requires head_dim to be a multiple of 16 and <= 256 (got %d)",
                     cfg->head_dim);
  int dev = device_index();
  RF_TRY(ensure_device(dev));
  std::unique_ptr<rf_model> m(new rf_model());
  m->cfg = *cfg;
  m->dev = dev;
  m->f16 = cfg->weight_dtype == RF_F16;
  m->adt = m->f16 ? RF_F16 : RF_BF16;
  m->H = cfg->hidden_size;
  m->I = cfg->intermediate_size;
  m->V = cfg->vocab_size;
  m->NL = cfg->num_layers;
  m->nH = cfg->num_heads;
  m->nKV = cfg->num_kv_heads;
  m->hd = cfg->head_dim;
  m->qd = m->nH * m->hd;
  m->kvd = m->nKV * m->hd;
  m->qkvd = m->qd + 2 * m->kvd;
  m->G = m->nH / m->nKV;

  cudaDeviceProp prop;
  CU_CHECK(cudaGetDeviceProperties(&prop, dev));
  m->fa_smem = fa_layout(m->hd).total;
  size_t need = std::max(m->fa_smem, h2o_smem(m->hd));
  if (need > (size_t)prop.sharedMemPerBlockOptin)
    return set_error(RF_ERR_INVALID, "head_dim %d needs %zu bytes of shared memory, device allows %zu", m->hd, need,
                     (size_t)prop.sharedMemPerBlockOptin);
  // Opt in to > 48 KB of dynamic shared memory. Only ever raise the limit: the attribute is per kernel (process
  // wide), so lowering it for a model with a smaller head_dim would break launches of a live model with a larger one.
  auto raise_smem = [](const void* f, size_t bytes) -> int {
    cudaFuncAttributes fa;
    CU_CHECK(cudaFuncGetAttributes(&fa, f));
    if ((size_t)fa.maxDynamicSharedSizeBytes < bytes)
      CU_CHECK(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    return RF_OK;
  };
  RF_TRY(raise_smem((const void*)k_flash_attn<__half>, m->fa_smem));
  RF_TRY(raise_smem((const void*)k_flash_attn<__nv_bfloat16>, m->fa_smem));
  RF_TRY(raise_smem((const void*)k_h2o, h2o_smem(m->hd)));

  CU_CHECK(cudaStreamCreateWithFlags(&m->stream, cudaStreamNonBlocking));
  struct Guard {
    rf_model* p;
    ~Guard() {
      if (p) model_free(p);
    }
  } guard{m.get()};
  RF_TRY(m->gemm.init(m->stream));

  const int64_t H = m->H;
  DevArena& A = m->arena;
  RF_TRY(A.alloc(&m->embed, (size_t)m->V * H, "embed_tokens"));
  RF_TRY(A.alloc(&m->norm, (size_t)H, "norm"));
  if (cfg->tie_embeddings)
    m->lm_head = m->embed;
  else
    RF_TRY(A.alloc(&m->lm_head, (size_t)m->V * H, "lm_head"));
  m->layers.resize(m->NL);
  for (int l = 0; l < m->NL; l++) {
    LayerW& w = m->layers[l];
    RF_TRY(A.alloc(&w.in_norm, (size_t)H, "input_layernorm"));
    RF_TRY(A.alloc(&w.post_norm, (size_t)H, "post_attention_layernorm"));
    RF_TRY(A.alloc(&w.wqkv, (size_t)m->qkvd * H, "q/k/v_proj"));
    if (cfg->qkv_bias) RF_TRY(A.alloc(&w.bqkv, (size_t)m->qkvd, "q/k/v bias"));
    RF_TRY(A.alloc(&w.wo, (size_t)H * m->qd, "o_proj"));
    RF_TRY(A.alloc(&w.wgu, (size_t)2 * m->I * H, "gate/up_proj"));
    RF_TRY(A.alloc(&w.wdown, (size_t)H * m->I, "down_proj"));
  }
  std::vector<float> inv = rf::rope_inv_freq(*cfg);
  RF_TRY(A.alloc(&m->inv_freq, inv.size(), "rope inv_freq"));
  CU_CHECK(cudaMemcpyAsync(m->inv_freq, inv.data(), inv.size() * 4, cudaMemcpyHostToDevice, m->stream));
  m->staging_bytes = (size_t)32 << 20;
  {
    uint8_t* st = nullptr;
    RF_TRY(A.alloc(&st, m->staging_bytes, "upload staging"));
    m->staging = st;
  }
  CU_CHECK(cudaStreamSynchronize(m->stream));
  m->set.assign(rf::tensor_slot_count(*cfg), 0);
  guard.p = nullptr;
  *out = m.release();
  return RF_OK;
}

int set_tensor_impl(rf_model* m, const char* name, const void* data, int32_t dtype, const int64_t* shape,
                    int32_t ndim) {
  if (!m) return set_error(RF_ERR_INVALID, "model is NULL");
  if (!data) return set_error(RF_ERR_INVALID, "tensor data is NULL");
  rf::TensorId id;
  RF_TRY(rf::check_tensor(m->cfg, name, dtype, shape, ndim, &id));
  CU_CHECK(cudaSetDevice(m->dev));
  int64_t count = 0;
  uint16_t* dst = tensor_dst(m, id, &count);
  if (!dst) return set_error(RF_ERR_INTERNAL, "no destination for tensor '%s'", name);
  if (dtype == m->adt) {
    CU_CHECK(cudaMemcpyAsync(dst, data, (size_t)count * 2, cudaMemcpyHostToDevice, m->stream));
  } else {
    const int es = rf::dtype_size(dtype);
    const int64_t chunk = (int64_t)(m->staging_bytes / es);
    for (int64_t off = 0; off < count; off += chunk) {
      int64_t c = std::min(chunk, count - off);
      CU_CHECK(cudaMemcpyAsync(m->staging, (const uint8_t*)data + off * es, (size_t)(c * es), cudaMemcpyHostToDevice,
                               m->stream));
      RF_LAUNCH(k_convert, nblocks(c, 256), 256, 0, m->stream)(m->staging, dtype, dst + off, c, m->f16);
      KERNEL_CHECK();
    }
  }
  CU_CHECK(cudaStreamSynchronize(m->stream));
  m->set[rf::tensor_slot(m->cfg, id)] = 1;
  return RF_OK;
}

int init_random_impl(rf_model* m, uint64_t seed, float std) {
  if (!m) return set_error(RF_ERR_INVALID, "model is NULL");
  if (!(std >= 0.f)) return set_error(RF_ERR_INVALID, "std must be >= 0");
  CU_CHECK(cudaSetDevice(m->dev));
  uint64_t tix = 0;
  auto normal = [&](uint16_t* p, int64_t n) -> int {
    uint64_t key = seed * 0x9E3779B97F4A7C15ull + (++tix) * 0xD1B54A32D192ED03ull;
    RF_LAUNCH(k_init_normal, nblocks(n, 256), 256, 0, m->stream)(p, n, key, std, m->f16);
    KERNEL_CHECK();
    return RF_OK;
  };
  auto fill = [&](uint16_t* p, int64_t n, float v) -> int {
    RF_LAUNCH(k_fill, nblocks(n, 256), 256, 0, m->stream)(p, n, v, m->f16);
    KERNEL_CHECK();
    return RF_OK;
  };
  const int64_t H = m->H;
  RF_TRY(normal(m->embed, (int64_t)m->V * H));
  if (!m->cfg.tie_embeddings) RF_TRY(normal(m->lm_head, (int64_t)m->V * H));
  RF_TRY(fill(m->norm, H, 1.f));
  for (int l = 0; l < m->NL; l++) {
    LayerW& w = m->layers[l];
    RF_TRY(fill(w.in_norm, H, 1.f));
    RF_TRY(fill(w.post_norm, H, 1.f));
    RF_TRY(normal(w.wqkv, (int64_t)m->qkvd * H));
    if (w.bqkv) RF_TRY(fill(w.bqkv, m->qkvd, 0.f));
    RF_TRY(normal(w.wo, H * m->qd));
    RF_TRY(normal(w.wgu, 2 * (int64_t)m->I * H));
    RF_TRY(normal(w.wdown, H * m->I));
  }
  CU_CHECK(cudaStreamSynchronize(m->stream));
  std::fill(m->set.begin(), m->set.end(), (uint8_t)1);
  return RF_OK;
}

/* ---------------- compressor ---------------- */
void comp_free(rf_compressor* c) {
  if (!c) return;
  if (c->m) {
    cudaSetDevice(c->m->dev);
    cudaStreamSynchronize(c->m->stream);
  }
  c->arena.free_all();
  cudaGetLastError();
  if (c->m) model_release_child(c->m);
  c->m = nullptr;
}

int comp_create_impl(rf_model* m, const rf_compress_params* p, const int32_t* heads, int32_t n_heads,
                     rf_compressor** out) {
  if (!m) return set_error(RF_ERR_INVALID, "model is NULL");
  if (!m->finalized) return set_error(RF_ERR_STATE, "model is not finalized");
  std::unique_ptr<rf_compressor> c(new rf_compressor());
  int exit_layer = 0;
  RF_TRY(rf::validate_compress(m->cfg, p, heads, n_heads, &c->heads, &exit_layer));
  if ((int64_t)p->capacity + p->max_chunk > (int64_t)INT32_MAX / 2)
    return set_error(RF_ERR_INVALID, "capacity + max_chunk too large");
  CU_CHECK(cudaSetDevice(m->dev));
  c->m = m;
  m->children++;
  struct Guard {
    rf_compressor* p;
    ~Guard() {
      if (p) comp_free(p);
    }
  } guard{c.get()};
  c->p = *p;
  c->exit = exit_layer;
  c->edim = n_heads * m->hd;
  c->T = p->capacity + p->max_chunk;
  const int nl = exit_layer + 1;
  const size_t T = (size_t)c->T, hd = (size_t)m->hd, nKV = (size_t)m->nKV, N = (size_t)p->max_chunk;
  DevArena& A = c->arena;
  c->Kc.resize(nl);
  c->Vc.resize(nl);
  c->score.resize(nl);
  for (int l = 0; l < nl; l++) {
    RF_TRY(A.alloc(&c->Kc[l], nKV * T * hd, "compressor K cache"));
    RF_TRY(A.alloc(&c->Vc[l], nKV * T * hd, "compressor V cache"));
    RF_TRY(A.alloc(&c->score[l], nKV * T, "compressor H2O scores"));
  }
  RF_TRY(A.alloc(&c->Krot, nKV * T * hd, "compressor roped keys"));
  RF_TRY(A.alloc(&c->x, N * m->H, "activations x"));
  RF_TRY(A.alloc(&c->xn, N * m->H, "activations xn"));
  RF_TRY(A.alloc(&c->qkv, N * m->qkvd, "activations qkv"));
  RF_TRY(A.alloc(&c->qrot, N * m->qd, "activations q_rot"));
  RF_TRY(A.alloc(&c->attn, N * m->qd, "activations attn"));
  if (exit_layer > 0) {
    RF_TRY(A.alloc(&c->gu, N * 2 * m->I, "activations gate/up"));
    RF_TRY(A.alloc(&c->hbuf, N * m->I, "activations mlp"));
  }
  RF_TRY(A.alloc(&c->stat_m, (size_t)m->nH * N, "attention row max"));
  RF_TRY(A.alloc(&c->stat_l, (size_t)m->nH * N, "attention row sum"));
  {
    uint8_t* e = nullptr;
    RF_TRY(A.alloc(&e, N * c->edim * (p->emb_dtype == RF_F16 ? 2 : 4), "embedding output"));
    c->emb = e;
  }
  RF_TRY(A.alloc(&c->tok, N, "tokens"));
  RF_TRY(A.alloc(&c->tmpK, nKV * (size_t)p->capacity * hd, "eviction scratch"));
  RF_TRY(A.alloc(&c->tmpS, nKV * (size_t)p->capacity, "eviction score scratch"));
  RF_TRY(A.alloc(&c->keep_d, nKV * (size_t)p->capacity, "eviction indices"));
  // embedding table: per layer, pairs (qkv column, embedding column)
  std::vector<int32_t> tab;
  c->table_off.assign(nl, 0);
  c->table_cnt.assign(nl, 0);
  for (int l = 0; l < nl; l++) {
    c->table_off[l] = (int)(tab.size() / 2);
    for (size_t i = 0; i < c->heads.size(); i++) {
      const rf::HeadSel& h = c->heads[i];
      if (h.layer != l) continue;
      int col = h.kind == RF_HEAD_Q ? h.head * m->hd
                : h.kind == RF_HEAD_K ? m->qd + h.head * m->hd
                                      : m->qd + m->kvd + h.head * m->hd;
      tab.push_back(col);
      tab.push_back((int32_t)i * m->hd);
      c->table_cnt[l]++;
    }
  }
  RF_TRY(A.alloc(&c->table, tab.size(), "head table"));
  CU_CHECK(cudaMemcpyAsync(c->table, tab.data(), tab.size() * 4, cudaMemcpyHostToDevice, m->stream));
  CU_CHECK(cudaStreamSynchronize(m->stream));
  guard.p = nullptr;
  *out = c.release();
  return RF_OK;
}

/* One chunk forward. update: append to cache + H2O + eviction; else cache unchanged. */
int comp_forward(rf_compressor* c, const int32_t* tokens, int n, void* out_emb, bool update) {
  rf_model* m = c->m;
  if (n < 1 || n > c->p.max_chunk)
    return set_error(RF_ERR_INVALID, "%s: n = %d must be in [1, max_chunk = %d]",
                     update ? "rf_compressor_process" : "rf_compressor_embed", n, c->p.max_chunk);
  RF_TRY(check_tokens(m, tokens, n));
  CU_CHECK(cudaSetDevice(m->dev));
  const int len = (int)c->len, total = len + n;
  const int w = std::min(c->p.obs_window, n);
  const float scale = 1.f / sqrtf((float)m->hd);
  Acts a{c->x, c->xn, c->qkv, c->qrot, c->attn, c->gu, c->hbuf};
  RF_TRY(upload_tokens(m, c->tok, tokens, n, c->x));
  for (int l = 0; l <= c->exit; l++) {
    const LayerW& W = m->layers[l];
    RF_TRY(run_qkv(m, W, a, n));
    if (out_emb && c->table_cnt[l] > 0) {
      dim3 grid((unsigned)n, (unsigned)c->table_cnt[l]);
      RF_LAUNCH(k_emb_extract, grid, 32, 0, m->stream)(c->qkv, m->qkvd, c->table + 2 * c->table_off[l], c->emb, c->edim,
                                                m->hd, c->p.emb_dtype == RF_F16, m->f16);
      KERNEL_CHECK();
    }
    const bool last = l == c->exit;
    if (last && !update) break;  // embedding only: q/k/v of the exit layer is all that is needed
    // append pre-RoPE K and V at rows len..len+n-1 (beyond the logical cache when !update)
    RF_LAUNCH(k_append_kv, nblocks((int64_t)n * m->nKV * (m->hd / 2), 256), 256, 0, m->stream)(
        c->qkv, m->qkvd, m->qd, m->qd + m->kvd, c->Kc[l], c->Vc[l], c->T, n, m->nKV, m->hd, len, false, m->inv_freq,
        m->f16);
    KERNEL_CHECK();
    if (update) {
      RF_LAUNCH(k_zero_scores, nblocks((int64_t)m->nKV * n, 256), 256, 0, m->stream)(c->score[l], c->T, m->nKV, len, n);
      KERNEL_CHECK();
    }
    RF_LAUNCH(k_rope_q, nblocks((int64_t)n * m->nH * (m->hd / 2), 256), 256, 0, m->stream)(
        c->qkv, m->qkvd, c->qrot, n, m->nH, m->hd, len, m->inv_freq, m->f16);
    KERNEL_CHECK();
    // cache entry i is at position i: rope all keys
    RF_LAUNCH(k_rope_rows, nblocks((int64_t)m->nKV * total * (m->hd / 2), 256), 256, 0, m->stream)(
        c->Kc[l], c->T, c->Krot, c->T, m->nKV, total, m->hd, 0, m->inv_freq, m->f16);
    KERNEL_CHECK();
    const int q_begin = last ? n - w : 0;
    RF_TRY(launch_flash(m, c->qrot, c->Krot, c->Vc[l], c->T, c->attn, update ? c->stat_m : nullptr,
                        update ? c->stat_l : nullptr, c->p.max_chunk, q_begin, n, len, total));
    if (update) {
      dim3 grid((unsigned)((total + H2O_KEYS - 1) / H2O_KEYS), (unsigned)m->nKV);
      RF_LAUNCH(k_h2o, grid, H2O_KEYS, h2o_smem(m->hd), m->stream)(c->qrot, m->qd, c->Krot, c->T, c->stat_m, c->stat_l,
                                                             c->p.max_chunk, c->score[l], n - w, n, len, total, m->G,
                                                             m->hd, scale, m->f16);
      KERNEL_CHECK();
    }
    if (!last) RF_TRY(run_post_attn(m, W, a, n));
  }
  if (out_emb) {
    size_t bytes = (size_t)n * c->edim * (c->p.emb_dtype == RF_F16 ? 2 : 4);
    CU_CHECK(cudaMemcpyAsync(out_emb, c->emb, bytes, cudaMemcpyDeviceToHost, m->stream));
  }
  CU_CHECK(cudaStreamSynchronize(m->stream));
  if (!update) return RF_OK;
  c->seen += n;
  if (total <= c->p.capacity) {
    c->len = total;
    return RF_OK;
  }
  // H2O eviction per (layer, kv head); selection on host with the shared helper. Whatever happens, the cache
  // ends at `capacity` rows (a failure part-way leaves some layers unevicted, truncated: memory-safe, not exact).
  c->len = c->p.capacity;
  {
    const int cap = c->p.capacity, nKV = m->nKV, hd = m->hd;
    std::vector<float> sc((size_t)nKV * total);
    std::vector<int32_t> keep_all((size_t)nKV * cap);
    std::vector<int32_t> keep;
    for (int l = 0; l <= c->exit; l++) {
      CU_CHECK(cudaMemcpy2DAsync(sc.data(), (size_t)total * 4, c->score[l], (size_t)c->T * 4, (size_t)total * 4, nKV,
                                 cudaMemcpyDeviceToHost, m->stream));
      CU_CHECK(cudaStreamSynchronize(m->stream));
      for (int h = 0; h < nKV; h++) {
        rf::h2o_select(sc.data() + (size_t)h * total, total, cap, c->p.n_sink, c->p.n_recent, &keep);
        if ((int)keep.size() != cap) return set_error(RF_ERR_INTERNAL, "h2o_select returned %zu entries", keep.size());
        memcpy(keep_all.data() + (size_t)h * cap, keep.data(), (size_t)cap * 4);
      }
      CU_CHECK(cudaMemcpyAsync(c->keep_d, keep_all.data(), keep_all.size() * 4, cudaMemcpyHostToDevice, m->stream));
      const int64_t nel = (int64_t)nKV * cap * hd;
      const size_t row_bytes = (size_t)cap * hd * 2;
      RF_LAUNCH(k_gather_rows<uint16_t>, nblocks(nel, 256), 256, 0, m->stream)(c->Kc[l], c->T, c->tmpK, cap, c->keep_d,
                                                                        nKV, cap, hd);
      KERNEL_CHECK();
      CU_CHECK(cudaMemcpy2DAsync(c->Kc[l], (size_t)c->T * hd * 2, c->tmpK, row_bytes, row_bytes, nKV,
                                 cudaMemcpyDeviceToDevice, m->stream));
      RF_LAUNCH(k_gather_rows<uint16_t>, nblocks(nel, 256), 256, 0, m->stream)(c->Vc[l], c->T, c->tmpK, cap, c->keep_d,
                                                                        nKV, cap, hd);
      KERNEL_CHECK();
      CU_CHECK(cudaMemcpy2DAsync(c->Vc[l], (size_t)c->T * hd * 2, c->tmpK, row_bytes, row_bytes, nKV,
                                 cudaMemcpyDeviceToDevice, m->stream));
      RF_LAUNCH(k_gather_rows<float>, nblocks((int64_t)nKV * cap, 256), 256, 0, m->stream)(c->score[l], c->T, c->tmpS, cap,
                                                                                   c->keep_d, nKV, cap, 1);
      KERNEL_CHECK();
      CU_CHECK(cudaMemcpy2DAsync(c->score[l], (size_t)c->T * 4, c->tmpS, (size_t)cap * 4, (size_t)cap * 4, nKV,
                                 cudaMemcpyDeviceToDevice, m->stream));
    }
    CU_CHECK(cudaStreamSynchronize(m->stream));
  }
  return RF_OK;
}

int state_save_impl(const rf_compressor* c, void* buf, int64_t size) {
  rf_model* m = c->m;
  const int nl = c->exit + 1, nKV = m->nKV, hd = m->hd;
  const int64_t len = c->len;
  int64_t need = rf::state_size(nl, nKV, hd, len);
  if (!buf || size < need) return set_error(RF_ERR_INVALID, "state buffer too small (%lld < %lld)", (long long)size,
                                            (long long)need);
  CU_CHECK(cudaSetDevice(m->dev));
  rf::StateHeader hdr;
  memset(&hdr, 0, sizeof hdr);
  memcpy(hdr.magic, "RFCSTAT1", 8);
  hdr.num_layers_cached = nl;
  hdr.num_kv_heads = nKV;
  hdr.head_dim = hd;
  hdr.capacity = c->p.capacity;
  hdr.len = len;
  hdr.seen = c->seen;
  hdr.hidden_size = m->H;
  uint8_t* o = (uint8_t*)buf;
  memcpy(o, &hdr, sizeof hdr);
  float* f = (float*)(o + sizeof hdr);
  std::vector<uint16_t> k((size_t)nKV * len * hd), v((size_t)nKV * len * hd);
  std::vector<float> s((size_t)nKV * len);
  for (int l = 0; l < nl; l++) {
    if (len > 0) {
      const size_t rb = (size_t)len * hd * 2, pitch = (size_t)c->T * hd * 2;
      CU_CHECK(cudaMemcpy2DAsync(k.data(), rb, c->Kc[l], pitch, rb, nKV, cudaMemcpyDeviceToHost, m->stream));
      CU_CHECK(cudaMemcpy2DAsync(v.data(), rb, c->Vc[l], pitch, rb, nKV, cudaMemcpyDeviceToHost, m->stream));
      CU_CHECK(cudaMemcpy2DAsync(s.data(), (size_t)len * 4, c->score[l], (size_t)c->T * 4, (size_t)len * 4, nKV,
                                 cudaMemcpyDeviceToHost, m->stream));
      CU_CHECK(cudaStreamSynchronize(m->stream));
    }
    for (int h = 0; h < nKV; h++) {
      const size_t base = (size_t)h * len * hd;
      for (int64_t i = 0; i < len * hd; i++) *f++ = m->f16 ? rf::f16_to_f32(k[base + i]) : rf::bf16_to_f32(k[base + i]);
      for (int64_t i = 0; i < len * hd; i++) *f++ = m->f16 ? rf::f16_to_f32(v[base + i]) : rf::bf16_to_f32(v[base + i]);
      for (int64_t i = 0; i < len; i++) *f++ = s[(size_t)h * len + i];
    }
  }
  return RF_OK;
}

int state_load_impl(rf_compressor* c, const void* buf, int64_t size) {
  rf_model* m = c->m;
  if (!buf || size < (int64_t)sizeof(rf::StateHeader)) return set_error(RF_ERR_INVALID, "state blob too small");
  rf::StateHeader hdr;
  memcpy(&hdr, buf, sizeof hdr);
  const int nl = c->exit + 1, nKV = m->nKV, hd = m->hd;
  if (memcmp(hdr.magic, "RFCSTAT1", 8) != 0) return set_error(RF_ERR_INVALID, "state blob: bad magic");
  if (hdr.num_layers_cached != nl || hdr.num_kv_heads != nKV || hdr.head_dim != hd || hdr.hidden_size != m->H)
    return set_error(RF_ERR_INVALID,
                     "state blob does not match this compressor (layers %d/%d, kv heads %d/%d, head_dim %d/%d, "
                     "hidden %d/%d)",
                     hdr.num_layers_cached, nl, hdr.num_kv_heads, nKV, hdr.head_dim, hd, hdr.hidden_size, m->H);
  if (hdr.len < 0 || hdr.len > c->p.capacity || hdr.seen < hdr.len)
    return set_error(RF_ERR_INVALID, "state blob: cache length %lld invalid for capacity %d", (long long)hdr.len,
                     c->p.capacity);
  const int64_t len = hdr.len;
  if (size != rf::state_size(nl, nKV, hd, len))  // exact, as in the CPU build
    return set_error(RF_ERR_INVALID, "state blob has %lld bytes, expected %lld", (long long)size,
                     (long long)rf::state_size(nl, nKV, hd, len));
  CU_CHECK(cudaSetDevice(m->dev));
  const float* f = (const float*)((const uint8_t*)buf + sizeof hdr);
  std::vector<uint16_t> k((size_t)nKV * len * hd), v((size_t)nKV * len * hd);
  std::vector<float> s((size_t)nKV * len);
  for (int l = 0; l < nl; l++) {
    for (int h = 0; h < nKV; h++) {
      const size_t base = (size_t)h * len * hd;
      for (int64_t i = 0; i < len * hd; i++) {
        float x = *f++;
        k[base + i] = m->f16 ? rf::f32_to_f16(x) : rf::f32_to_bf16(x);
      }
      for (int64_t i = 0; i < len * hd; i++) {
        float x = *f++;
        v[base + i] = m->f16 ? rf::f32_to_f16(x) : rf::f32_to_bf16(x);
      }
      for (int64_t i = 0; i < len; i++) s[(size_t)h * len + i] = *f++;
    }
    if (len > 0) {
      const size_t rb = (size_t)len * hd * 2, pitch = (size_t)c->T * hd * 2;
      CU_CHECK(cudaMemcpy2DAsync(c->Kc[l], pitch, k.data(), rb, rb, nKV, cudaMemcpyHostToDevice, m->stream));
      CU_CHECK(cudaMemcpy2DAsync(c->Vc[l], pitch, v.data(), rb, rb, nKV, cudaMemcpyHostToDevice, m->stream));
      CU_CHECK(cudaMemcpy2DAsync(c->score[l], (size_t)c->T * 4, s.data(), (size_t)len * 4, (size_t)len * 4, nKV,
                                 cudaMemcpyHostToDevice, m->stream));
      CU_CHECK(cudaStreamSynchronize(m->stream));
    }
  }
  c->len = len;
  c->seen = hdr.seen;
  return RF_OK;
}

/* ---------------- seq ---------------- */
void seq_free(rf_seq* s) {
  if (!s) return;
  if (s->m) {
    cudaSetDevice(s->m->dev);
    cudaStreamSynchronize(s->m->stream);
  }
  s->arena.free_all();
  cudaGetLastError();
  if (s->m) model_release_child(s->m);
  s->m = nullptr;
}

int seq_create_impl(rf_model* m, int32_t max_tokens, rf_seq** out) {
  if (!m) return set_error(RF_ERR_INVALID, "model is NULL");
  if (!m->finalized) return set_error(RF_ERR_STATE, "model is not finalized");
  if (max_tokens < 1) return set_error(RF_ERR_INVALID, "max_tokens must be >= 1");
  CU_CHECK(cudaSetDevice(m->dev));
  std::unique_ptr<rf_seq> s(new rf_seq());
  s->m = m;
  m->children++;
  struct Guard {
    rf_seq* p;
    ~Guard() {
      if (p) seq_free(p);
    }
  } guard{s.get()};
  s->maxT = max_tokens;
  s->S = std::min(max_tokens, 4096);
  const size_t T = (size_t)max_tokens, hd = (size_t)m->hd, nKV = (size_t)m->nKV, N = (size_t)s->S;
  DevArena& A = s->arena;
  s->Kc.resize(m->NL);
  s->Vc.resize(m->NL);
  for (int l = 0; l < m->NL; l++) {
    RF_TRY(A.alloc(&s->Kc[l], nKV * T * hd, "sequence K cache"));
    RF_TRY(A.alloc(&s->Vc[l], nKV * T * hd, "sequence V cache"));
  }
  RF_TRY(A.alloc(&s->x, N * m->H, "activations x"));
  RF_TRY(A.alloc(&s->xn, N * m->H, "activations xn"));
  RF_TRY(A.alloc(&s->qkv, N * m->qkvd, "activations qkv"));
  RF_TRY(A.alloc(&s->qrot, N * m->qd, "activations q_rot"));
  RF_TRY(A.alloc(&s->attn, N * m->qd, "activations attn"));
  RF_TRY(A.alloc(&s->gu, N * 2 * m->I, "activations gate/up"));
  RF_TRY(A.alloc(&s->hbuf, N * m->I, "activations mlp"));
  RF_TRY(A.alloc(&s->logits, (size_t)m->V, "logits"));
  s->nsplit_max = (max_tokens + DEC_SPLIT - 1) / DEC_SPLIT;
  RF_TRY(A.alloc(&s->part, (size_t)m->nH * s->nsplit_max * (hd + 2), "decode partials"));
  RF_TRY(A.alloc(&s->tok, N, "tokens"));
  s->host_logits.resize(m->V);
  guard.p = nullptr;
  *out = s.release();
  return RF_OK;
}

int seq_forward_impl(rf_seq* s, const int32_t* tokens, int n, float* logits_out) {
  rf_model* m = s->m;
  if (n < 1) return set_error(RF_ERR_INVALID, "n must be >= 1");
  if ((int64_t)s->len + n > s->maxT)
    return set_error(RF_ERR_INVALID, "sequence would exceed max_tokens (%d + %d > %d)", s->len, n, s->maxT);
  RF_TRY(check_tokens(m, tokens, n));
  CU_CHECK(cudaSetDevice(m->dev));
  s->has_logits = false;
  Acts a{s->x, s->xn, s->qkv, s->qrot, s->attn, s->gu, s->hbuf};
  const float scale = 1.f / sqrtf((float)m->hd);
  int nb = 0;
  for (int off = 0; off < n; off += nb) {
    nb = std::min(s->S, n - off);
    const int pos0 = s->len;
    RF_TRY(upload_tokens(m, s->tok, tokens + off, nb, s->x));
    for (int l = 0; l < m->NL; l++) {
      const LayerW& W = m->layers[l];
      RF_TRY(run_qkv(m, W, a, nb));
      RF_LAUNCH(k_rope_q, nblocks((int64_t)nb * m->nH * (m->hd / 2), 256), 256, 0, m->stream)(
          s->qkv, m->qkvd, s->qrot, nb, m->nH, m->hd, pos0, m->inv_freq, m->f16);
      KERNEL_CHECK();
      RF_LAUNCH(k_append_kv, nblocks((int64_t)nb * m->nKV * (m->hd / 2), 256), 256, 0, m->stream)(
          s->qkv, m->qkvd, m->qd, m->qd + m->kvd, s->Kc[l], s->Vc[l], s->maxT, nb, m->nKV, m->hd, pos0, true,
          m->inv_freq, m->f16);
      KERNEL_CHECK();
      const int total = pos0 + nb;
      if (nb == 1) {
        const int nsplit = (total + DEC_SPLIT - 1) / DEC_SPLIT;
        dim3 grid((unsigned)m->nH, (unsigned)nsplit);
        RF_LAUNCH(k_decode_partial, grid, 128, 0, m->stream)(s->qrot, s->Kc[l], s->Vc[l], s->maxT, s->part, s->nsplit_max,
                                                      total, m->G, m->hd, scale, m->f16);
        KERNEL_CHECK();
        RF_LAUNCH(k_decode_combine, m->nH, 128, 0, m->stream)(s->part, s->nsplit_max, nsplit, m->hd, s->attn, m->f16);
        KERNEL_CHECK();
      } else {
        RF_TRY(launch_flash(m, s->qrot, s->Kc[l], s->Vc[l], s->maxT, s->attn, nullptr, nullptr, 0, 0, nb, pos0,
                            total));
      }
      RF_TRY(run_post_attn(m, W, a, nb));
    }
    s->len += nb;
  }
  // logits of the last token
  RF_TRY(run_rmsnorm(m, s->x + (size_t)(nb - 1) * m->H, m->norm, s->xn, 1));
  RF_TRY(m->gemm.nt(1, m->V, m->H, s->xn, m->adt, m->H, m->lm_head, m->adt, m->H, s->logits, RF_F32, m->V, 0.f));
  CU_CHECK(cudaMemcpyAsync(s->host_logits.data(), s->logits, (size_t)m->V * 4, cudaMemcpyDeviceToHost, m->stream));
  CU_CHECK(cudaStreamSynchronize(m->stream));
  if (logits_out) memcpy(logits_out, s->host_logits.data(), (size_t)m->V * 4);
  s->has_logits = true;
  return RF_OK;
}

int seq_import_impl(rf_seq* s, const rf_compressor* c) {
  rf_model* m = s->m;
  if (c->m != m) return set_error(RF_ERR_INVALID, "compressor belongs to a different model");
  if (c->exit != m->NL - 1)
    return set_error(RF_ERR_INVALID, "compressor exit layer %d is not the model's last layer %d", c->exit, m->NL - 1);
  if (c->len > s->maxT)
    return set_error(RF_ERR_INVALID, "compressor cache (%lld) exceeds max_tokens %d", (long long)c->len, s->maxT);
  CU_CHECK(cudaSetDevice(m->dev));
  const int len = (int)c->len;
  if (len > 0) {
    for (int l = 0; l < m->NL; l++) {
      RF_LAUNCH(k_rope_rows, nblocks((int64_t)m->nKV * len * (m->hd / 2), 256), 256, 0, m->stream)(
          c->Kc[l], c->T, s->Kc[l], s->maxT, m->nKV, len, m->hd, 0, m->inv_freq, m->f16);
      KERNEL_CHECK();
      const size_t rb = (size_t)len * m->hd * 2;
      CU_CHECK(cudaMemcpy2DAsync(s->Vc[l], (size_t)s->maxT * m->hd * 2, c->Vc[l], (size_t)c->T * m->hd * 2, rb,
                                 m->nKV, cudaMemcpyDeviceToDevice, m->stream));
    }
  }
  CU_CHECK(cudaStreamSynchronize(m->stream));
  s->len = len;
  s->has_logits = false;
  return RF_OK;
}

/* ---------------- scoring ---------------- */
struct ScoreCtx {
  std::mutex mu;
  bool ready = false;
  int dev = -1;
  cudaStream_t stream = nullptr;
  Gemm gemm;
};
ScoreCtx g_score;

int score_impl(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
               float* out) {
  if (n_ctx < 0) return set_error(RF_ERR_INVALID, "n_ctx must be >= 0");
  if (dim <= 0) return set_error(RF_ERR_INVALID, "dim must be > 0");
  if (n_q < 1) return set_error(RF_ERR_INVALID, "n_q must be >= 1");
  if (ctx_dtype != RF_F32 && ctx_dtype != RF_F16) return set_error(RF_ERR_INVALID, "ctx_dtype must be f32 or f16");
  if (n_ctx == 0) return RF_OK;
  if (!ctx || !q || !out) return set_error(RF_ERR_INVALID, "NULL pointer argument");
  int dev = device_index();
  RF_TRY(ensure_device(dev));
  std::lock_guard<std::mutex> lk(g_score.mu);
  if (!g_score.ready || g_score.dev != dev) {
    if (g_score.ready) {
      g_score.gemm.destroy();
      cudaStreamDestroy(g_score.stream);
      g_score.ready = false;
    }
    CU_CHECK(cudaStreamCreateWithFlags(&g_score.stream, cudaStreamNonBlocking));
    if (g_score.gemm.init(g_score.stream) != RF_OK) {
      cudaStreamDestroy(g_score.stream);
      g_score.stream = nullptr;
      return rf::last_error_code_ref();
    }
    g_score.dev = dev;
    g_score.ready = true;
  }
  cudaStream_t st = g_score.stream;
  const int es = ctx_dtype == RF_F32 ? 4 : 2;
  int64_t B = std::max<int64_t>(1, ((int64_t)16 << 20) / dim);
  B = std::min<int64_t>(B, std::max<int64_t>(1, ((int64_t)64 << 20) / n_q));
  B = std::min<int64_t>(B, (int64_t)1 << 20);  // fallback GEMM grid.y = B / 64 must stay <= 65535
  B = std::min<int64_t>(B, n_ctx);
  DevArena A;
  struct Free {
    DevArena* a;
    cudaStream_t s;
    ~Free() {
      cudaStreamSynchronize(s);
      a->free_all();
    }
  } fr{&A, st};
  float *qraw = nullptr, *qn = nullptr, *cn = nullptr, *S = nullptr, *od = nullptr;
  uint8_t* raw = nullptr;
  RF_TRY(A.alloc(&qraw, (size_t)n_q * dim, "score queries"));
  RF_TRY(A.alloc(&qn, (size_t)n_q * dim, "score queries (normalised)"));
  RF_TRY(A.alloc(&raw, (size_t)B * dim * es, "score ctx block"));
  RF_TRY(A.alloc(&cn, (size_t)B * dim, "score ctx block (normalised)"));
  RF_TRY(A.alloc(&S, (size_t)B * n_q, "score similarity block"));
  RF_TRY(A.alloc(&od, (size_t)B, "score output block"));
  CU_CHECK(cudaMemcpyAsync(qraw, q, (size_t)n_q * dim * 4, cudaMemcpyHostToDevice, st));
  RF_LAUNCH(k_normalize_rows, nblocks(n_q, 8), 256, 0, st)(qraw, RF_F32, qn, n_q, dim);
  KERNEL_CHECK();
  for (int64_t off = 0; off < n_ctx; off += B) {
    int64_t b = std::min(B, n_ctx - off);
    CU_CHECK(cudaMemcpyAsync(raw, (const uint8_t*)ctx + off * dim * es, (size_t)(b * dim * es),
                             cudaMemcpyHostToDevice, st));
    RF_LAUNCH(k_normalize_rows, nblocks(b, 8), 256, 0, st)(raw, ctx_dtype, cn, b, dim);
    KERNEL_CHECK();
    RF_TRY(g_score.gemm.nt((int)b, n_q, dim, cn, RF_F32, dim, qn, RF_F32, dim, S, RF_F32, n_q, 0.f));
    RF_LAUNCH(k_rowmax, nblocks(b, 256), 256, 0, st)(S, b, n_q, od);
    KERNEL_CHECK();
    CU_CHECK(cudaMemcpyAsync(out + off, od, (size_t)b * 4, cudaMemcpyDeviceToHost, st));
    CU_CHECK(cudaStreamSynchronize(st));
  }
  return RF_OK;
}

}  // namespace

/* ======================================================================================
 * C ABI
 * ====================================================================================== */
extern "C" {

RF_API int rf_abi_version(void) { return RF_ABI_VERSION; }
RF_API const char* rf_backend_name(void) { return "cuda"; }
RF_API const char* rf_last_error(void) { return rf::last_error_ref().c_str(); }
RF_API int rf_last_error_code(void) { return rf::last_error_code_ref(); }

RF_API int rf_device_count(void) {
  std::string why;
  int n = device_count_impl(&why);
  if (n <= 0) set_error(RF_ERR_NODEVICE, "no usable CUDA device: %s", why.c_str());
  return n;
}

RF_API int rf_device_info(char* buf, int32_t buflen) {
  if (!buf || buflen <= 0) return set_error(RF_ERR_INVALID, "buffer is NULL or empty");
  std::string why;
  int n = device_count_impl(&why);
  std::string s;
  const CublasLib& lib = cublas_lib();
  std::string gemm = lib.ok ? "cuBLAS (" + lib.name + ")" : "built-in tiled GEMM (cuBLAS unavailable: " + lib.why + ")";
  if (n <= 0) {
    s = "cuda: no usable device (" + why + "); GEMM: " + gemm;
  } else {
    int dev = device_index();
    cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, dev < n ? dev : 0);
    if (e != cudaSuccess) {
      cudaGetLastError();
      s = std::string("cuda: ") + std::to_string(n) + " device(s), properties unavailable: " + cudaGetErrorString(e);
    } else {
      char tmp[512];
      snprintf(tmp, sizeof tmp, "cuda: device %d/%d %s (sm_%d%d, %.1f GiB, %d SMs); GEMM: ", dev < n ? dev : 0, n,
               p.name, p.major, p.minor, p.totalGlobalMem / 1073741824.0, p.multiProcessorCount);
      s = tmp + gemm;
    }
  }
  snprintf(buf, (size_t)buflen, "%s", s.c_str());
  return RF_OK;
}

RF_API int rf_set_threads(int32_t n) {
  (void)n;
  return RF_OK;
}

RF_API rf_model* rf_model_create(const rf_config* cfg) {
  rf::clear_error();
  rf_model* m = nullptr;
  try {
    if (model_create_impl(cfg, &m) != RF_OK) return nullptr;
  } catch (const std::bad_alloc&) {
    set_error(RF_ERR_OOM, "host allocation failed");
    return nullptr;
  } catch (...) {
    set_error(RF_ERR_INTERNAL, "unexpected exception");
    return nullptr;
  }
  return m;
}

RF_API int rf_model_set_tensor(rf_model* m, const char* name, const void* data, int32_t dtype, const int64_t* shape,
                               int32_t ndim) {
  try {
    return set_tensor_impl(m, name, data, dtype, shape, ndim);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}

RF_API int rf_model_init_random(rf_model* m, uint64_t seed, float std) {
  try {
    return init_random_impl(m, seed, std);
  } catch (...) {
    return set_error(RF_ERR_INTERNAL, "unexpected exception");
  }
}

RF_API int rf_model_finalize(rf_model* m) {
  if (!m) return set_error(RF_ERR_INVALID, "model is NULL");
  RF_TRY(rf::check_complete(m->cfg, m->set));
  m->finalized = true;
  return RF_OK;
}

RF_API int64_t rf_model_memory_bytes(const rf_model* m) {
  if (!m) return set_error(RF_ERR_INVALID, "model is NULL");
  return m->arena.bytes;
}

RF_API void rf_model_destroy(rf_model* m) {
  if (!m || m->destroyed) return;
  m->destroyed = true;
  if (m->children > 0) return;  // the last compressor / seq frees it (CPU build semantics)
  model_free(m);
  delete m;
}

RF_API rf_compressor* rf_compressor_create(rf_model* m, const rf_compress_params* p, const int32_t* heads,
                                           int32_t n_heads) {
  rf::clear_error();
  rf_compressor* c = nullptr;
  try {
    if (comp_create_impl(m, p, heads, n_heads, &c) != RF_OK) return nullptr;
  } catch (...) {
    set_error(RF_ERR_OOM, "host allocation failed");
    return nullptr;
  }
  return c;
}

RF_API int32_t rf_compressor_embed_dim(const rf_compressor* c) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  return c->edim;
}
RF_API int32_t rf_compressor_exit_layer(const rf_compressor* c) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  return c->exit;
}

RF_API int rf_compressor_process(rf_compressor* c, const int32_t* tokens, int32_t n, void* out_emb) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  try {
    return comp_forward(c, tokens, n, out_emb, true);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}

RF_API int rf_compressor_embed(rf_compressor* c, const int32_t* tokens, int32_t n, void* out_emb) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  if (!out_emb) return set_error(RF_ERR_INVALID, "out_emb is NULL");
  try {
    return comp_forward(c, tokens, n, out_emb, false);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}

RF_API int64_t rf_compressor_cache_len(const rf_compressor* c) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  return c->len;
}
RF_API int64_t rf_compressor_seen(const rf_compressor* c) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  return c->seen;
}
RF_API int rf_compressor_reset(rf_compressor* c) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  c->len = 0;
  c->seen = 0;
  return RF_OK;
}
RF_API int64_t rf_compressor_state_size(const rf_compressor* c) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  return rf::state_size(c->exit + 1, c->m->nKV, c->m->hd, c->len);
}
RF_API int rf_compressor_state_save(const rf_compressor* c, void* buf, int64_t size) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  try {
    return state_save_impl(c, buf, size);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}
RF_API int rf_compressor_state_load(rf_compressor* c, const void* buf, int64_t size) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  try {
    return state_load_impl(c, buf, size);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}
RF_API void rf_compressor_destroy(rf_compressor* c) {
  if (!c) return;
  comp_free(c);
  delete c;
}

RF_API int rf_score(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
                    float* out) {
  try {
    return score_impl(ctx, ctx_dtype, n_ctx, dim, q, n_q, out);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}

RF_API rf_seq* rf_seq_create(rf_model* m, int32_t max_tokens) {
  rf::clear_error();
  rf_seq* s = nullptr;
  try {
    if (seq_create_impl(m, max_tokens, &s) != RF_OK) return nullptr;
  } catch (...) {
    set_error(RF_ERR_OOM, "host allocation failed");
    return nullptr;
  }
  return s;
}

RF_API int rf_seq_forward(rf_seq* s, const int32_t* tokens, int32_t n, float* logits_out) {
  if (!s) return set_error(RF_ERR_INVALID, "seq is NULL");
  try {
    return seq_forward_impl(s, tokens, n, logits_out);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}

RF_API int32_t rf_seq_sample(rf_seq* s, float temperature, float top_p, int32_t top_k, uint64_t* rng_state) {
  if (!s) return set_error(RF_ERR_INVALID, "seq is NULL");
  if (!s->has_logits) return set_error(RF_ERR_STATE, "no logits: call rf_seq_forward first");
  if (std::isnan(temperature) || std::isnan(top_p)) return set_error(RF_ERR_INVALID, "rf_seq_sample: NaN parameter");
  try {
    return rf::sample_logits(s->host_logits.data(), s->m->V, temperature, top_p, top_k, rng_state);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}

RF_API int32_t rf_sample_logits(const float* logits, int32_t n, float temperature, float top_p, int32_t top_k,
                                uint64_t* rng_state) {
  return rf::sample_logits_checked(logits, n, temperature, top_p, top_k, rng_state);
}

RF_API int32_t rf_seq_length(const rf_seq* s) {
  if (!s) return set_error(RF_ERR_INVALID, "seq is NULL");
  return s->len;
}
RF_API int rf_seq_reset(rf_seq* s) {
  if (!s) return set_error(RF_ERR_INVALID, "seq is NULL");
  s->len = 0;
  s->has_logits = false;
  return RF_OK;
}
RF_API int rf_seq_import_compressor(rf_seq* s, const rf_compressor* c) {
  if (!s || !c) return set_error(RF_ERR_INVALID, "seq or compressor is NULL");
  try {
    return seq_import_impl(s, c);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}
RF_API void rf_seq_destroy(rf_seq* s) {
  if (!s) return;
  seq_free(s);
  delete s;
}

RF_API int64_t rf_smooth_select(const float* scores, int64_t n, int32_t window, int64_t budget, int32_t edge,
                                float* smoothed, int32_t* out_idx) {
  try {
    return rf::smooth_select(scores, n, window, budget, edge, smoothed, out_idx);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}

RF_API int64_t rf_score_select(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q,
                               int32_t n_q, int32_t window, int64_t budget, int32_t edge, float* scores,
                               int32_t* out_idx) {
  try {
    return rf::score_select([&](float* s) { return rf_score(ctx, ctx_dtype, n_ctx, dim, q, n_q, s); }, n_ctx, window, budget, edge,
                            scores, out_idx);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}

}  // extern "C"
