#!/usr/bin/env bash
# The one runbook a GPU machine executes: build, correctness, figures, (training). Sized to the device tool's limits
# (10 minutes a command, about 15 minutes of device time in all, at most 8 files of at most 16 MiB coming back):
#
#   call 1 (~8 min): REFORM_TRAIN_DATA=.device/train-data bash scripts/gpu-session.sh train
#                    the default model first: it is what the product lacks most (scripts/gpu-prepare.sh fills
#                    .device/ beforehand; carry it)
#   call 2 (~6 min): bash scripts/gpu-session.sh build check   # env + build (CUDA + CPU, in parallel) + gpu_check.py
#   call 3 (next session, ~8 min): bash scripts/gpu-session.sh bench
#   `all` (train, build, check, bench) does not fit one call.
#
# Stages, in order, each with its own time limit (seconds; the sum of a call's stages stays under 600):
#   env    10   GPU, driver, nvcc, python packages, cuBLAS lookup (REFORM_CUBLAS_LIB)      -> env.txt
#   build  240  scripts/build-native.sh, CUDA required (nvcc, one translation unit)      -> build.txt
#   check  300  scripts/gpu_check.py: CUDA vs the CPU build vs transformers; the pipelined compress's bytes, the
#               resident embeddings' scores and the decode graph's logits on the real device -> gpu_check.txt
#   bench  480  bench/gpu_bench.py, Llama-3.1-8B shape: compress 128K and 1M tokens (tok/s, MFU), compress 128K
#               writing the embedding file one chunk at a time vs overlapped, score 1M, score + select 1M streamed
#               vs resident (and its one upload), TTFT of a 1M-token query with and without resident embeddings,
#               prefill, time per output token (plain and as a CUDA graph); targets checked -> gpu_bench.txt
#   train  570  scripts/gpu-train.sh: trains `small`, evaluates it, weights -> model/ (2 bf16 shards) -> train.txt
# Every stage appends one line to summary.txt (stage, status, seconds); the files land in ${OUT:-gpu-out}
# (OUT is the device tool's folder that comes back): at most env, build, gpu_check, gpu_bench, train, summary, and
# the two weight shards of model/ (8 files; training/finish.py rebuilds the index and config.json here).
#
# --dry-run: for a machine without a GPU (the test suite runs it): every command path that can run does, against the
# CPU emulation of the CUDA build (build/libreform_cuda_emu.so): the build without nvcc, gpu_check.py --no-hf on one
# small config, gpu_bench.py --shape tiny, the train hook with --dry-run. Figures are meaningless there.
# Python needs numpy (+ torch, transformers, safetensors for the check); no bun is needed.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
stages=()
for a in "$@"; do
  case $a in
    --dry-run) DRY=1 ;;
    all) stages+=(train build check bench) ;;
    build | check | bench | train) stages+=("$a") ;;
    -h | --help)
      sed -n '2,29p' "$0"
      exit 0
      ;;
    *)
      echo "unknown stage or option: $a (stages: build check bench train all; --dry-run)" >&2
      exit 2
      ;;
  esac
done
[[ ${#stages[@]} -eq 0 ]] && stages=(train build check bench)
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
EMU=build/libreform_cuda_emu.so

log() { echo "[gpu-session] $*"; }
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

# stage NAME LIMIT_S FILE FUNCTION: runs FUNCTION (exported) under a time limit, output to the terminal and FILE; records the result
rc=0
stage() {
  local name=$1 limit=$2 file=$3
  shift 3
  log "stage $name (limit ${limit}s)$([[ $DRY == 1 ]] && echo ', dry run')"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" bash -c "$1" 2>&1 | tee "$OUT/$file"
  local r=${PIPESTATUS[0]}
  local st=ok
  if [[ $r -eq 124 || $r -eq 137 ]]; then st="TIMEOUT after ${limit}s"; elif [[ $r -ne 0 ]]; then st="FAILED (exit $r)"; fi
  summary "$name: $st, $((SECONDS - t0)) s$([[ $DRY == 1 ]] && echo ' (dry run)')"
  [[ $r -ne 0 ]] && rc=1
  return "$r"
}

# ---- env (always) ----
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || log "nvidia-smi: no GPU here"
  nvcc --version 2>&1 | tail -n 2 || log "nvcc not found"
  python3 -c 'import sys, numpy; print("python", sys.version.split()[0], "numpy", numpy.__version__)' 2>&1
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)' 2>/dev/null ||
    echo "torch / transformers: not installed (gpu_check.py needs them for the transformers comparison)"
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# cuBLAS: the library dlopens libcublas.so.13/.12 by name; the toolkit's copy or the pip wheel's may not be on the
# loader's path, so point REFORM_CUBLAS_LIB at one. Without it the built-in GEMM runs (many times slower): the library
# says so in its device info (a WARNING the server prints at start and shows in /health), and so does this line.
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
      export LD_LIBRARY_PATH="$(dirname "$c")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" # its libcublasLt must resolve
      break
    fi
  done
fi
if [[ -n ${REFORM_CUBLAS_LIB:-} ]]; then
  log "REFORM_CUBLAS_LIB=$REFORM_CUBLAS_LIB" | tee -a "$OUT/env.txt"
else
  log "WARNING: no cuBLAS found: the built-in GEMM will run (figures not representative)" | tee -a "$OUT/env.txt"
fi

build_real() {
  # the CPU library (reference for the check) and the CUDA library compile in parallel: nvcc dominates
  REFORM_SKIP_EMU=1 REFORM_SKIP_CUDA=1 bash scripts/build-native.sh &
  local cpu=$!
  REFORM_SKIP_EMU=1 REFORM_REQUIRE_CUDA=1 bash scripts/build-native.sh
  local r=$?
  wait "$cpu" || r=1
  return $r
}
build_dry() { REFORM_SKIP_CUDA=1 bash scripts/build-native.sh; }

check_real() { python3 scripts/gpu_check.py; }
check_dry() {
  python3 scripts/gpu_check.py --no-hf --cuda-lib "$EMU" --configs llama3-gqa --prompt-len 70 --gen 8
}

bench_real() { python3 bench/gpu_bench.py --targets; }
bench_dry() { python3 bench/gpu_bench.py --lib "$EMU" --shape tiny --lengths 512 --decode 4 --targets; }

# The training stage: scripts/gpu-train.sh (training/train.py --config small on the GPU, held-out evaluation, the
# weight shards into $OUT/model).
train_hook() {
  if [[ $DRY == 1 ]]; then bash scripts/gpu-train.sh --dry-run; else bash scripts/gpu-train.sh; fi
}

export DRY EMU
export -f build_real build_dry check_real check_dry bench_real bench_dry train_hook
: > "$OUT/summary.txt"
mode=real
[[ $DRY == 1 ]] && mode=dry
for s in "${stages[@]}"; do
  case $s in
    build) stage build 240 build.txt "build_$mode" || {
      log "build failed: nothing else can run"
      exit 1
    } ;;
    check) stage check 300 gpu_check.txt "check_$mode" ;;
    bench) stage bench 480 gpu_bench.txt "bench_$mode" ;;
    train) stage train 570 train.txt train_hook ;;
  esac
done
log "summary:"
cat "$OUT/summary.txt"
exit $rc
