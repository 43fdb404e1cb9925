#!/usr/bin/env bash
# Builds the native REFORM engine.
#   build/libreform_cpu.so   always (g++ -O3, baseline target: the matmul picks AVX-512 / AVX2 at run time; own
#                            worker threads (cuda/cpu/pool.h), OpenMP only for `simd` loops, no libgomp)
#   build/libreform_cuda.so  when nvcc is present (sm_90; cudart static, cuBLAS dlopen'ed at run time);
#                            cuda/reform_cuda.cu is one translation unit that includes its parts cuda/gpu/*.cuh
#   build/libreform_cuda_emu.so, build/libreform_cuda_emu_asan.so, build/emu/libcublas_fake.so   always (g++):
#       the CUDA source compiled for the CPU emulation in cuda/emu (tests only; REFORM_SKIP_EMU=1 skips them)
# Skips a target whose output is newer than its sources. REFORM_SKIP_CUDA=1 skips the CUDA build;
# REFORM_REQUIRE_CUDA=1 makes a missing nvcc an error.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build

newer() { # newer OUT SRC... : true when OUT exists and is newer than every SRC
  local out=$1; shift
  [[ -f $out ]] || return 1
  for s in "$@"; do [[ $s -nt $out ]] && return 1; done
  return 0
}

CPU_SRC=(cuda/reform_cpu.cpp cuda/cpu_kernels.h cuda/cpu/*.h cuda/cpu/*.inc cuda/reform.h cuda/reform_common.h cuda/abi_guard.h cuda/select.h)
CXX=${CXX:-g++}
if newer build/libreform_cpu.so "${CPU_SRC[@]}" scripts/build-native.sh; then
  echo "[build] libreform_cpu.so up to date"
else
  echo "[build] compiling libreform_cpu.so with $CXX"
  $CXX -O3 -fopenmp-simd -pthread -std=c++17 -fPIC -shared -fvisibility=hidden \
    -Wall -Wextra -Wno-unused-parameter \
    -o build/libreform_cpu.so.tmp cuda/reform_cpu.cpp
  mv build/libreform_cpu.so.tmp build/libreform_cpu.so
fi

NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ ${REFORM_SKIP_CUDA:-0} == 1 ]]; then
  echo "[build] CUDA build skipped (REFORM_SKIP_CUDA=1)"
elif [[ -z $NVCC ]]; then
  if [[ ${REFORM_REQUIRE_CUDA:-0} == 1 ]]; then echo "[build] nvcc not found" >&2; exit 1; fi
  echo "[build] nvcc not found: CUDA build skipped"
else
  CUDA_SRC=(cuda/reform_cuda.cu cuda/gpu/*.cuh cuda/reform.h cuda/reform_common.h cuda/abi_guard.h cuda/select.h)
  if newer build/libreform_cuda.so "${CUDA_SRC[@]}" scripts/build-native.sh; then
    echo "[build] libreform_cuda.so up to date"
  else
    echo "[build] compiling libreform_cuda.so with $NVCC (sm_90)"
    "$NVCC" -O3 -std=c++17 -arch=sm_90 -Xcompiler -fPIC,-fvisibility=hidden -shared -cudart static \
      -o build/libreform_cuda.so.tmp cuda/reform_cuda.cu -ldl -lpthread
    mv build/libreform_cuda.so.tmp build/libreform_cuda.so
  fi
fi

# CPU emulation of the CUDA build (test instrument, see cuda/emu/cuda_emu.h): the same reform_cuda.cu, compiled by
# g++ against the emulated runtime; an AddressSanitizer variant; a documented-semantics fake cuBLAS.
if [[ ${REFORM_SKIP_EMU:-0} == 1 ]]; then
  echo "[build] CUDA emulation skipped (REFORM_SKIP_EMU=1)"
elif [[ $(uname -m) != x86_64 ]]; then
  echo "[build] CUDA emulation skipped: its fiber switch is x86-64 only (this is $(uname -m))"
else
  mkdir -p build/emu
  EMU_SRC=(cuda/reform_cuda.cu cuda/gpu/*.cuh cuda/reform.h cuda/reform_common.h cuda/abi_guard.h cuda/select.h cuda/emu/cuda_emu.h
    cuda/emu/cuda_emu.cpp)
  EMU_FLAGS=(-std=c++17 -fPIC -shared -fvisibility=hidden -fno-strict-aliasing -DRF_CUDA_EMU -Icuda
    -Wall -Wextra -Wno-unused-parameter -Wno-unknown-pragmas)
  build_emu() { # OUT extra-flags...
    local out=$1; shift
    if newer "$out" "${EMU_SRC[@]}" scripts/build-native.sh; then
      echo "[build] $(basename "$out") up to date"
    else
      echo "[build] compiling $(basename "$out") (CUDA source on the CPU emulation) with $CXX"
      $CXX "${EMU_FLAGS[@]}" "$@" -o "$out.tmp" -x c++ cuda/reform_cuda.cu -x none cuda/emu/cuda_emu.cpp -ldl -lpthread
      mv "$out.tmp" "$out"
    fi
  }
  build_emu build/libreform_cuda_emu.so -O2 -g
  build_emu build/libreform_cuda_emu_asan.so -O1 -g -fsanitize=address -fno-omit-frame-pointer
  if newer build/emu/libcublas_fake.so cuda/emu/fake_cublas.cpp scripts/build-native.sh; then
    echo "[build] libcublas_fake.so up to date"
  else
    echo "[build] compiling libcublas_fake.so with $CXX"
    $CXX -O2 -std=c++17 -fPIC -shared -fvisibility=hidden -Wall -Wextra -o build/emu/libcublas_fake.so.tmp \
      cuda/emu/fake_cublas.cpp
    mv build/emu/libcublas_fake.so.tmp build/emu/libcublas_fake.so
  fi
fi
