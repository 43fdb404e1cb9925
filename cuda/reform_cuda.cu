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
#include "abi_guard.h"
#include "select.h"

using rf::set_error;

#if defined(__GNUC__) && !defined(__clang__)
/* The ABI objects (rf_model, ...) hold types of the anonymous namespace. GCC warns about that when they are defined
 * in an included file, for fear of several translation units; the parts below belong to this one only. */
#pragma GCC diagnostic ignored "-Wsubobject-linkage"
#endif

/* One translation unit (simplest for nvcc and the CPU emulation); each part relies on the ones before it. */
#include "gpu/cublas_loader.cuh"
#include "gpu/device.cuh"
#include "gpu/kernels.cuh"
#include "gpu/attention.cuh"
#include "gpu/gemm.cuh"
#include "gpu/objects.cuh"
#include "gpu/forward.cuh"
#include "gpu/model.cuh"
#include "gpu/compressor.cuh"
#include "gpu/seq.cuh"
#include "gpu/score.cuh"
#include "gpu/embstore.cuh"
#include "gpu/abi.cuh"
