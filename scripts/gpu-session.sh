#!/usr/bin/env bash
# The GPU proof of the native engine in as few device calls as possible (the device tool allows 10 minutes a
# command and 30 minutes a session). Run from the repository root on a machine with an NVIDIA GPU:
#
#   bash scripts/gpu-session.sh check   # build (CUDA + CPU), then scripts/gpu_check.py: CUDA vs CPU vs transformers
#   bash scripts/gpu-session.sh bench   # build if needed, then bench/gpu_bench.py: Llama-3.1-8B shape, 128K and 1M
#   bash scripts/gpu-session.sh all     # both (may not fit one 10-minute call)
#
# Output goes to the terminal and to ${OUT:-gpu-out}/<stage>.txt (OUT is the device tool's folder that comes back).
# Python needs numpy (+ torch, transformers, safetensors for the check); no bun is needed.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

log() { echo "[gpu-session] $*"; }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || log "nvidia-smi failed"
  nvcc --version 2>&1 | tail -n 2 || true
  python3 -c 'import sys, numpy; print("python", sys.version.split()[0], "numpy", numpy.__version__)' 2>&1
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)' 2>&1 || true
} | tee "$OUT/env.txt"

# cuBLAS: the library dlopens libcublas.so.13/.12 by name; the toolkit's copy or the pip wheel's may not be on
# the loader's path, so point REFORM_CUBLAS_LIB at one (else the built-in GEMM is used, much slower).
if [[ -z ${REFORM_CUBLAS_LIB:-} ]]; then
  cands=()
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    cands+=("$d"/libcublas.so.13* "$d"/libcublas.so.12*)
  done
  wheel=$(python3 -c 'import os, nvidia.cublas as c; print(os.path.join(list(c.__path__)[0], "lib"))' 2>/dev/null || true)
  [[ -n $wheel ]] && cands+=("$wheel"/libcublas.so.13* "$wheel"/libcublas.so.12*)
  while read -r p; do cands+=("$p"); done < <(ldconfig -p 2>/dev/null | awk '/libcublas\.so\.1[23] /{print $NF}')
  for c in "${cands[@]}"; do
    if [[ -f $c && $c != *Lt* ]]; then
      export REFORM_CUBLAS_LIB=$c
      # its sibling libcublasLt must resolve too
      export LD_LIBRARY_PATH="$(dirname "$c")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      break
    fi
  done
fi
log "REFORM_CUBLAS_LIB=${REFORM_CUBLAS_LIB:-<none: built-in GEMM>}" | tee -a "$OUT/env.txt"

build() {
  REFORM_SKIP_EMU=1 REFORM_REQUIRE_CUDA=1 bash scripts/build-native.sh 2>&1 | tee "$OUT/build.txt"
  return "${PIPESTATUS[0]}"
}

rc=0
build || { log "build failed"; exit 1; }
if [[ $stage == check || $stage == all ]]; then
  log "gpu_check.py"
  timeout 540 python3 scripts/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt"
  r=${PIPESTATUS[0]}
  [[ $r -ne 0 ]] && rc=$r
fi
if [[ $stage == bench || $stage == all ]]; then
  log "gpu_bench.py"
  timeout 560 python3 bench/gpu_bench.py 2>&1 | tee "$OUT/gpu_bench.txt"
  r=${PIPESTATUS[0]}
  [[ $r -ne 0 ]] && rc=$r
fi
exit $rc
