#!/usr/bin/env bash
# The GPU training stage of the runbook: trains the `small` default model (training/train.py --config small) on
# the device, evaluates it on held-out text, and leaves in $OUT what a device run can bring back (at most 8 files
# of at most 16 MiB): the bf16 weights in shards, their index, config.json, and one log with the training and
# evaluation output. Only the weight shards come back (files are counted): `python3 training/finish.py --config small
# $OUT/model models/<name>` rebuilds the index and config.json and completes the directory here.
#
#   bash scripts/gpu-train.sh                 # on the GPU machine (called by scripts/gpu-session.sh train)
#   bash scripts/gpu-train.sh --dry-run       # on a CPU: the same commands on the `dryrun` config, a few steps
#
# Needs the pre-tokenized corpus (python3 training/corpus.py) in ${REFORM_TRAIN_DATA:-training/data}; on the
# device machine that folder is carried in (../shared and the package mirror are not there).
# Environment: GPU_TRAIN_MINUTES (default 6.5: the training loop's wall time, data workers included; with start-up
# and the evaluation the stage takes about 8 minutes),
# OUT (default gpu-out), PYTHON (default: the first python3 on PATH, else /usr/bin/python3, that has torch).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
# the first python3 with torch (Debian's python3-torch lives in /usr/bin/python3 even where another python3 is first)
PY=${PYTHON:-}
if [[ -z $PY ]]; then
  for c in python3 /usr/bin/python3; do
    if "$c" -c "import torch" >/dev/null 2>&1; then PY=$c && break; fi
  done
fi
[[ -n $PY ]] || { echo "[gpu-train] no python3 with torch"; exit 2; }
DATA=${REFORM_TRAIN_DATA:-training/data}
mkdir -p "$OUT"
log() { echo "[gpu-train] $*"; }

config=small
minutes=${GPU_TRAIN_MINUTES:-6.5}
extra=(--device cuda --eval-every 1000 --eval-n 0 --save-every 1000)
eval_args=(--n 20 --lengths 1740)
if [[ ${1:-} == --dry-run ]]; then
  config=dryrun
  minutes=${GPU_TRAIN_MINUTES:-1}
  extra=(--device cpu --steps "${DRY_RUN_STEPS:-20}" --eval-every 1000 --eval-n 0 --save-every 1000)
  eval_args=(--n 2 --lengths 256)
fi
if [[ $config == dryrun && ! -f $DATA/train_sents.bin ]]; then
  DATA=$(mktemp -d -t reform-smoke-data.XXXXXX)
  log "no corpus: the dry run builds the offline smoke corpus in $DATA"
  "$PY" training/corpus.py --smoke --out "$DATA" >/dev/null || exit 2
fi
for f in train_sents.bin train_offsets.npy eval_sents.bin eval_offsets.npy words.json; do
  [[ -f $DATA/$f ]] || {
    log "missing $DATA/$f: run python3 training/corpus.py (and carry the folder to the device)"
    exit 2
  }
done

run_dir=$(mktemp -d -t reform-train.XXXXXX)
export_dir="$run_dir/export"
{
  log "$(date -u +%FT%TZ) config $config, $minutes minutes"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
  nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv 2>/dev/null || true
} 2>&1

# GPU utilisation every 10 s beside the trainer's own tokens/s (nvidia-smi needs no Python module)
smi_pid=
if command -v nvidia-smi >/dev/null 2>&1 && [[ $config != dryrun ]]; then
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 10 2>/dev/null |
    sed -u 's/^/[gpu-util] /' &
  smi_pid=$!
fi
PYTHONUNBUFFERED=1 "$PY" training/train.py --config "$config" --data "$DATA" --run-dir "$run_dir" \
  --minutes "$minutes" --export "$export_dir" --shard-mib 15 "${extra[@]}" 2>&1
rc=$?
[[ -n $smi_pid ]] && kill "$smi_pid" 2>/dev/null
if [[ $rc -ne 0 ]]; then
  log "training failed (rc $rc)"
  exit "$rc"
fi

log "held-out evaluation"
PYTHONUNBUFFERED=1 "$PY" training/evaluate.py --model "$export_dir" --data "$DATA" "${eval_args[@]}" \
  2>&1 || log "evaluation failed (the weights still come back)"

# what comes back: the weight files only (index, config, tokenizer and template files are rebuilt by finish.py)
mkdir -p "$OUT/model"
cp "$export_dir"/model*.safetensors "$OUT/model/"
ls -la "$OUT/model"
rm -rf "$run_dir"
log "done"
