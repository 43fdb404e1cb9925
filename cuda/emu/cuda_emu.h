/*
 * cuda_emu.h — a CPU emulation of the subset of CUDA that cuda/reform_cuda.cu (with its parts in cuda/gpu) uses,
 * so that the CUDA source itself (kernels and host code) can be compiled with g++ and run on a machine without a GPU.
 *
 * It is a test instrument, not a backend: build/libreform_cuda_emu.so is reform_cuda.cu compiled with
 * -DRF_CUDA_EMU against this header. What it models:
 *   - every CUDA thread is a fiber; a block's threads run on one OS thread, switching only at barriers
 *     (__syncthreads, __syncwarp, warp shuffles, wmma collectives), in forward or reverse thread order
 *     (rf_emu_set("schedule", "reverse")): a missing barrier shows up as a result that depends on the order;
 *   - __syncthreads reached by only part of a block, or warp collectives reached by only part of a warp,
 *     abort with a message (deadlock on a GPU);
 *   - __shared__ memory is per block; dynamic shared memory is checked against the per-kernel limit
 *     (48 KiB unless raised with cudaFuncSetAttribute, at most sharedMemPerBlockOptin = 227 KiB as on H100);
 *   - launch configurations are checked (block <= 1024 threads, grid.y/z <= 65535, grid.x < 2^31);
 *   - device memory is a registry of host allocations: every pointer argument of a kernel must point into a
 *     live device allocation, cudaMemcpy* directions and extents are checked, new allocations and dynamic
 *     shared memory are filled with 0xFF bytes (NaN in f32/f16/bf16) so reads of unwritten memory show;
 *   - wmma 16x16x16 fragments (bf16/f16 inputs, f32 accumulate), all lanes must pass the same pointer/ldm;
 *   - a device memory limit (rf_emu_set("mem_limit", bytes)) for out-of-memory paths.
 *   - a host exception thrown by the next kernel launch (rf_emu_set("throw_on_launch", "bad_alloc" or
 *     "runtime_error")), for the error mapping of the ABI's exception boundary.
 *   - streams as queues: kernels, copies and event records are queued on their stream and run in stream order, but
 *     only when the host waits for them (rf_emu_set("streams", ...)):
 *       "lazy" (default)  a host wait runs just what it waits for: work nobody waited on has not happened, so a host
 *                         read of pinned memory before its copy completed sees stale bytes, and a stream that reads
 *                         another stream's output without cudaStreamWaitEvent reads it before it is written;
 *       "drain"           a host wait first runs every other stream as far as it can, then the one waited on: a
 *                         stream that overwrites a buffer another stream still has to read (a missing
 *                         cudaStreamWaitEvent the other way) does so first;
 *       "eager"           everything runs when it is queued (the order a single in-order device would take).
 *     Copies follow the runtime's documented host synchronisation: from pageable host memory the source is read
 *     when the call is made; into pageable host memory the call returns after the copy (and the stream's earlier
 *     work); to and from pinned memory (cudaMallocHost) the copy runs with its stream, whenever that is.
 *     cudaFree / cudaFreeHost / cudaStreamDestroy complete the pending work first, as the runtime does.
 *     A fake cuBLAS queues its GEMMs on the handle's stream through the stream's head (EmuStreamHead below).
 * What it cannot model: real timing, the memory model of concurrent warps, bank conflicts, occupancy, and the
 * exact rounding order of tensor-core accumulation. It never replaces a run on a GPU.
 */
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <tuple>
#include <functional>
#include <type_traits>

/* ---------------------------------------------------------------- keywords */
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
/* Blocks run one at a time and the threads of a block share one OS thread: a function-static variable is
 * exactly "one per block". (Launches are serialised by a global lock.) */
#define __shared__ static
#define RF_EXTERN_SHARED(type, name) type* name = (type*)emu::dyn_smem()

/* ---------------------------------------------------------------- vector types */
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

/* ---------------------------------------------------------------- runtime types */
typedef int cudaError_t;
enum : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidDevicePointer = 17,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorStreamCaptureUnsupported = 900,
  cudaErrorStreamCaptureInvalidated = 901,
};
typedef struct emu_stream* cudaStream_t;
typedef struct emu_event* cudaEvent_t;
typedef struct emu_graph* cudaGraph_t;
typedef struct emu_graph* cudaGraphExec_t;
enum cudaStreamCaptureMode {
  cudaStreamCaptureModeGlobal = 0,
  cudaStreamCaptureModeThreadLocal = 1,
  cudaStreamCaptureModeRelaxed = 2
};
enum { cudaEventDefault = 0, cudaEventDisableTiming = 2 };
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
enum { cudaStreamDefault = 0, cudaStreamNonBlocking = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
/* library_types.h values */
typedef enum cudaDataType_t { CUDA_R_16F = 2, CUDA_R_32F = 0, CUDA_R_16BF = 14 } cudaDataType_t;

struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  int major, minor;
  int multiProcessorCount;
  int maxThreadsPerBlock;
};
struct cudaFuncAttributes {
  int maxDynamicSharedSizeBytes;
  int maxThreadsPerBlock;
};

cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaSetDevice(int dev);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int dev);
cudaError_t cudaMalloc(void** p, size_t bytes);
cudaError_t cudaFree(void* p);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s = nullptr);
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind kind, cudaStream_t s = nullptr);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaGetLastError(void);
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, const void* f);
cudaError_t cudaFuncSetAttribute(const void* f, cudaFuncAttribute attr, int value);
/* pinned host memory: plain host memory here (counted: rf_emu_stat("live_host_allocs")); never device memory */
cudaError_t cudaMallocHost(void** p, size_t bytes);
cudaError_t cudaFreeHost(void* p);
/* free = limit - used (rf_emu_set("mem_limit")) */
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes);
/* (rf_emu_stat counters: "syncs" host waits, "d2h_bytes", "mallocs") both 13000 unless rf_emu_set("driver_version",
 * "12040") etc. */
cudaError_t cudaDriverGetVersion(int* v);
cudaError_t cudaRuntimeGetVersion(int* v);
/* an event marks the work queued on its stream when it was recorded (counted: rf_emu_stat("live_events"));
 * cudaEventSynchronize runs that work (see "streams" above) */
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
/* work queued on s from now on waits for the work e marks now (rf_emu_set("ignore_stream_waits", "1") drops the wait:
 * a test shows that a missing wait changes results) */
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags = 0);
cudaError_t cudaDeviceSynchronize(void);
/* CUDA graphs: work queued on a capturing stream is recorded instead of queued (kernels with their arguments,
 * copies, cuBLAS calls through the stream head); a launch queues the recorded list on a stream, to run again in order
 * with the same arguments. A host wait on the capturing stream, or a copy from or to pageable memory while capturing,
 * is refused (cudaErrorStreamCaptureUnsupported) and invalidates the capture, as on the GPU. Counted:
 * rf_emu_stat("graph_launches"), ("graph_captures"), ("live_graphs"). */
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* g);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* e, cudaGraph_t g, unsigned long long flags = 0);
cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t s);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e);
cudaError_t cudaGraphDestroy(cudaGraph_t g);

/* The head of every emulated stream: a library outside this one (the fake cuBLAS, which gets the stream through
 * cublasSetStream) queues host work on it with `enqueue` after checking `magic`. fn(arg) may run several times (a
 * captured graph replays it); release(arg) runs once, when nothing can run it any more. */
struct EmuStreamHead {
  uint64_t magic;  // EMU_STREAM_MAGIC
  void (*enqueue)(void* stream, void (*fn)(void*), void* arg, void (*release)(void*));
};
#define EMU_STREAM_MAGIC 0x4d41455254535545ull /* "EUSTREAM" */

/* ---------------------------------------------------------------- 16-bit float types */
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
namespace emu {
inline uint32_t f2u(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t u = f2u(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                           // round to nearest even
  return (uint16_t)(u >> 16);
}
inline float bf16_bits_to_f32(uint16_t h) { return u2f((uint32_t)h << 16); }
uint16_t f32_to_f16_bits(float f);
float f16_bits_to_f32(uint16_t h);
}  // namespace emu
inline __half __float2half_rn(float x) { return __half{emu::f32_to_f16_bits(x)}; }
inline float __half2float(__half h) { return emu::f16_bits_to_f32(h.x); }
inline __half __ushort_as_half(unsigned short v) { return __half{v}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16{emu::f32_to_bf16_bits(x)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return emu::bf16_bits_to_f32(h.x); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return __nv_bfloat16{v}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
namespace emu {
inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
}  // namespace emu

/* ---------------------------------------------------------------- device math */
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline unsigned __float_as_uint(float f) { return emu::f2u(f); }
/* a product never fused into an FMA (the g++ build of the emulation fuses nothing: no -mfma) */
inline float __fmul_rn(float a, float b) { return a * b; }
inline float cospif(float x) { return (float)cos(M_PI * (double)x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

/* ---------------------------------------------------------------- execution model */
namespace emu {
struct ThreadState {
  uint3 tid;
  uint3 bid;
  dim3 bdim;
  dim3 gdim;
  int linear;  // thread index within the block
};
ThreadState* cur();  // the running CUDA thread (aborts outside a kernel)
void syncthreads();
void syncwarp();
float shfl_xor_f(float v, int lane_mask);
int shfl_xor_i(int v, int lane_mask);
void* dyn_smem();
/* all lanes of the warp must pass the same (ptr, ldm): wmma collectives */
void warp_same_args(const void* p, unsigned ldm, const char* what);
[[noreturn]] void fail(const char* fmt, ...);

/* device allocation registry */
bool is_device_ptr(const void* p);

/* a number a test set for the code under test (rf_emu_set("knob:NAME", value)); 0 when unset. Only for sizes that a
 * GPU run takes from constants but a test must shrink to stay small (e.g. the rows of a resident embedding block) */
int64_t knob(const char* name);

/* kernel launch: validates the configuration and pointer arguments, then runs every block */
struct LaunchCfg {
  const void* fn;
  const char* name;
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
};
void run_kernel(const LaunchCfg& cfg, const std::function<void()>& body, bool args_ok, const char* bad_arg);

template <typename A>
inline bool ptr_arg_ok(const A& a) {
  if constexpr (std::is_pointer<A>::value) {
    return a == nullptr || is_device_ptr((const void*)a);
  } else {
    return true;
  }
}

template <typename... P>
struct Launcher {
  void (*fn)(P...);
  LaunchCfg cfg;
  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    std::tuple<P...> t(std::forward<A>(args)...);
    int idx = 0, bad = -1;
    std::apply([&](const P&... p) { ((ptr_arg_ok(p) ? (void)0 : (void)(bad = bad < 0 ? idx : bad), idx++), ...); }, t);
    char why[64] = "";
    if (bad >= 0) snprintf(why, sizeof why, "pointer argument #%d is not device memory", bad);
    auto f = fn;
    run_kernel(
        cfg, [f, t]() { std::apply(f, t); }, bad < 0, why);
  }
};
template <typename... P>
Launcher<P...> make_launcher(void (*fn)(P...), const char* name, dim3 g, dim3 b, size_t smem, cudaStream_t s) {
  return Launcher<P...>{fn, LaunchCfg{(const void*)fn, name, g, b, smem, s}};
}
}  // namespace emu

#define threadIdx (emu::cur()->tid)
#define blockIdx (emu::cur()->bid)
#define blockDim (emu::cur()->bdim)
#define gridDim (emu::cur()->gdim)
#define RF_LAUNCH(kernel, grid, block, smem, stream) emu::make_launcher(kernel, #kernel, grid, block, smem, stream)

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  (void)mask;
  emu::syncwarp();
}
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
  (void)mask;
  (void)width;
  return emu::shfl_xor_f(v, lane_mask);
}
/* Threads switch only at barriers and blocks run one at a time, so a read-modify-write is already atomic here. */
inline int atomicAdd(int* p, int v) {
  int o = *p;
  *p = o + v;
  return o;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  unsigned o = *p;
  *p = o + v;
  return o;
}
inline float atomicAdd(float* p, float v) {
  float o = *p;
  *p = o + v;
  return o;
}
inline int __shfl_xor_sync(unsigned mask, int v, int lane_mask, int width = 32) {
  (void)mask;
  (void)width;
  return emu::shfl_xor_i(v, lane_mask);
}

/* ---------------------------------------------------------------- wmma (16x16x16) */
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

/* Each lane keeps the whole tile (loads read all of it), computes and stores only the elements it owns
 * (element e belongs to lane e % 32): every output element is written once, as on the hardware. */
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols;
  float x[rows * cols];
};

namespace detail {
inline int lane() { return emu::cur()->linear & 31; }
/* CUDA: "mptr must be a 256-bit aligned pointer"; "ldm must be a multiple of 8 for __half element type or
 * multiple of 4 for float element type" (16 bytes either way) */
template <typename E>
inline void check_layout(const E* p, unsigned ldm, const char* what) {
  if (((uintptr_t)p & 31u) != 0)
    emu::fail("%s: pointer %p is not 256-bit aligned (misaligned address on the GPU)", what, (const void*)p);
  if ((ldm * sizeof(E)) % 16 != 0) emu::fail("%s: ldm %u is not a multiple of %zu elements", what, ldm, 16 / sizeof(E));
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  for (int i = 0; i < f.num_elements; i++) f.x[i] = v;
}

/* matrix_a / matrix_b with a compile-time layout */
template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  static_assert(std::is_same<P, T>::value, "wmma load: pointer type must match the fragment element type");
  detail::check_layout(p, ldm, "wmma::load_matrix_sync");
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; r++)
    for (int c = 0; c < F::cols; c++) {
      size_t off = std::is_same<Layout, row_major>::value ? (size_t)r * ldm + c : (size_t)c * ldm + r;
      f.x[r * F::cols + c] = emu::to_float(p[off]);
    }
  emu::warp_same_args(p, ldm, "wmma::load_matrix_sync");
}
/* accumulator with a run-time layout */
template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float, void>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  detail::check_layout(p, ldm, "wmma::load_matrix_sync(accumulator)");
  for (int r = 0; r < M; r++)
    for (int c = 0; c < N; c++) f.x[r * N + c] = p[layout == mem_row_major ? (size_t)r * ldm + c : (size_t)c * ldm + r];
  emu::warp_same_args(p, ldm, "wmma::load_matrix_sync(accumulator)");
}
template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float, void>& f, unsigned ldm,
                              layout_t layout) {
  detail::check_layout(p, ldm, "wmma::store_matrix_sync");
  const int ln = detail::lane();
  for (int e = ln; e < M * N; e += 32) {
    int r = e / N, c = e % N;
    p[layout == mem_row_major ? (size_t)r * ldm + c : (size_t)c * ldm + r] = f.x[e];
  }
  emu::warp_same_args(p, ldm, "wmma::store_matrix_sync");
}
template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float, void>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b,
                     const fragment<accumulator, M, N, K, float, void>& c) {
  const int ln = detail::lane();
  for (int e = ln; e < M * N; e += 32) {
    int r = e / N, col = e % N;
    float acc = c.x[e];
    for (int k = 0; k < K; k++) acc += a.x[r * K + k] * b.x[k * N + col];
    d.x[e] = acc;
  }
}
}  // namespace wmma
}  // namespace nvcuda
