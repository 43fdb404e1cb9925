"""Complete a model directory brought back from a GPU run (weights + config.json only) into the directory the
server loads: tokenizer.json, tokenizer_config.json (ChatML) and generation_config.json are the repository's own.

    python3 training/finish.py gpu-out/model models/reform-small
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from export import load_hf_dir, write_side_files  # noqa: E402
from train import TOKENIZER  # noqa: E402

DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    a = ap.parse_args()
    with open(os.path.join(a.src, "config.json")) as f:
        cfg = json.load(f)
    os.makedirs(a.dst, exist_ok=True)
    for f in glob.glob(os.path.join(a.src, "model*.safetensors")) + glob.glob(os.path.join(a.src, "*.index.json")):
        shutil.copyfile(f, os.path.join(a.dst, os.path.basename(f)))
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta")
    write_side_files(a.dst, {k: cfg[k] for k in keys}, DTYPES[cfg.get("torch_dtype", "float32")], TOKENIZER)
    m = load_hf_dir(a.dst)  # proves the directory loads: every tensor present with its shape
    print(f"{a.dst}: {m.num_params() / 1e6:.2f}M parameters, window {m.args.max_position_embeddings}")


if __name__ == "__main__":
    main()
