#!/usr/bin/env bash
# Prepares what a device run needs that the working tree does not carry: the pre-tokenized training corpus
# (training/data is git-ignored and the device machine has no package mirror). Writes .device/train-data/
# (~16 MiB; .device/ is ignored by git). Then, with the device tool:
#   run(command="REFORM_TRAIN_DATA=.device/train-data bash scripts/gpu-session.sh all", carry=[".device"])
# and afterwards complete the weights that came back into a model directory:
#   python3 training/finish.py <files_at>/gpu-out/model models/reform-small
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
python3 -c "import torch, regex" >/dev/null 2>&1 || PY=/usr/bin/python3
[[ -f training/data/train_sents.bin ]] || "$PY" training/corpus.py
mkdir -p .device/train-data
cp training/data/{train_sents.bin,train_offsets.npy,eval_sents.bin,eval_offsets.npy,words.json,manifest.json} .device/train-data/
du -sh .device/train-data
