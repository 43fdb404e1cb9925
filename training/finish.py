"""Complete a model directory brought back from a GPU run into the directory the server loads.

    python3 training/finish.py --config small gpu-out/model models/reform-small

A device run brings back only the weight files (its files are counted): this copies them, rebuilds
model.safetensors.index.json from the shards' own headers, writes config.json from the training config (or keeps
the one beside the weights), and adds the repository's tokenizer.json, tokenizer_config.json (ChatML) and
generation_config.json. Loading the result back proves every tensor is there with its shape.
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
from export import load_hf_dir, read_header, write_side_files  # noqa: E402
from train import CONFIGS, TOKENIZER  # noqa: E402

DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, choices=sorted(CONFIGS), help="the training config (no config.json)")
    ap.add_argument("src")
    ap.add_argument("dst")
    a = ap.parse_args()
    os.makedirs(a.dst, exist_ok=True)
    shards = sorted(glob.glob(os.path.join(a.src, "model*.safetensors")))
    if not shards:
        raise SystemExit(f"{a.src}: no model*.safetensors")
    for f in shards:
        shutil.copyfile(f, os.path.join(a.dst, os.path.basename(f)))
    dtypes = {t["dtype"] for f in shards for k, t in read_header(f).items() if k != "__metadata__"}
    if len(shards) > 1:
        weight_map, total = {}, 0
        for f in shards:
            for k, t in read_header(f).items():
                if k != "__metadata__":
                    weight_map[k] = os.path.basename(f)
                    total += t["data_offsets"][1] - t["data_offsets"][0]
        with open(os.path.join(a.dst, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    if a.config:
        args = CONFIGS[a.config]["model"].to_dict()
    else:
        with open(os.path.join(a.src, "config.json")) as fh:
            cfg = json.load(fh)
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta")
        args = {k: cfg[k] for k in keys}
    write_side_files(a.dst, args, dtypes.pop() if len(dtypes) == 1 else "F32", TOKENIZER)
    m = load_hf_dir(a.dst)
    print(f"{a.dst}: {m.num_params() / 1e6:.2f}M parameters, window {m.args.max_position_embeddings}")


if __name__ == "__main__":
    main()
