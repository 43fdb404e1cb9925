#!/usr/bin/env bash
# The GPU training stage of the runbook: trains the `small` default model (training/train.py --config small) on
# the device, evaluates it on held-out text, and leaves in $OUT what a device run can bring back (at most 8 files
# of at most 16 MiB): the bf16 weights in shards, their index, config.json, and one log with the training and
# evaluation output. `python3 training/finish.py $OUT/model models/<name>` completes the directory here.
#
#   bash scripts/gpu-train.sh                 # on the GPU machine (called by scripts/gpu-session.sh train)
#   bash scripts/gpu-train.sh --dry-run       # on a CPU: the same commands on the `dryrun` config, a few steps
#
# Needs the pre-tokenized corpus (python3 training/corpus.py) in ${REFORM_TRAIN_DATA:-training/data}; on the
# device machine that folder is carried in (../shared and the package mirror are not there).
# Environment: GPU_TRAIN_MINUTES (default 5.5: the training loop's wall time, data workers included),
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
minutes=${GPU_TRAIN_MINUTES:-5.5}
extra=(--device cuda --eval-every 1000 --eval-n 0 --save-every 1000)
eval_args=(--n 40 --lengths 1024,1740)
if [[ ${1:-} == --dry-run ]]; then
  config=dryrun
  minutes=${GPU_TRAIN_MINUTES:-1}
  extra=(--device cpu --steps "${DRY_RUN_STEPS:-20}" --eval-every 1000 --eval-n 0 --save-every 1000)
  eval_args=(--n 2 --lengths 256)
fi
for f in train_sents.bin train_offsets.npy eval_sents.bin eval_offsets.npy words.json; do
  [[ -f $DATA/$f ]] || {
    log "missing $DATA/$f: run python3 training/corpus.py (and carry the folder to the device)"
    exit 2
  }
done

run_dir=$(mktemp -d -t reform-train.XXXXXX)
export_dir="$run_dir/export"
trainlog="$OUT/train-$config.log"
{
  log "$(date -u +%FT%TZ) config $config, $minutes minutes"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
  nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv 2>/dev/null || true
} 2>&1 | tee "$trainlog"

# GPU utilisation every 10 s beside the trainer's own tokens/s (nvidia-smi needs no Python module)
smi_pid=
if command -v nvidia-smi >/dev/null 2>&1 && [[ $config != dryrun ]]; then
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 10 2>/dev/null |
    sed -u 's/^/[gpu-util] /' >>"$trainlog" &
  smi_pid=$!
fi
PYTHONUNBUFFERED=1 "$PY" training/train.py --config "$config" --data "$DATA" --run-dir "$run_dir" \
  --minutes "$minutes" --export "$export_dir" --shard-mib 15 "${extra[@]}" 2>&1 | tee -a "$trainlog"
rc=${PIPESTATUS[0]}
[[ -n $smi_pid ]] && kill "$smi_pid" 2>/dev/null
if [[ $rc -ne 0 ]]; then
  log "training failed (rc $rc)" | tee -a "$trainlog"
  exit "$rc"
fi

log "held-out evaluation" | tee -a "$trainlog"
PYTHONUNBUFFERED=1 "$PY" training/evaluate.py --model "$export_dir" --data "$DATA" "${eval_args[@]}" \
  2>&1 | tee -a "$trainlog"
[[ ${PIPESTATUS[0]} -eq 0 ]] || log "evaluation failed (the weights still come back)" | tee -a "$trainlog"

# what comes back: the weights (shards + index or one file), config.json and the log (tokenizer and template files
# are the repository's own and are added back by training/finish.py)
mkdir -p "$OUT/model"
for f in "$export_dir"/model*.safetensors "$export_dir"/model.safetensors.index.json "$export_dir"/config.json; do
  [[ -f $f ]] && cp "$f" "$OUT/model/"
done
ls -la "$OUT/model" | tee -a "$trainlog"
rm -rf "$run_dir"
log "done" | tee -a "$trainlog"
