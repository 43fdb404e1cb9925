"""Hugging Face model directories in and out: safetensors (f32) + config.json + tokenizer files.

The directory written here is what the server's src/model/ loads unchanged (`LlamaForCausalLM`, tied
embeddings, ChatML template, answers end with `<|im_end|>`). The safetensors format is a little-endian u64
header length, a JSON header, then raw tensors (https://github.com/huggingface/safetensors); it is written and
read here directly so that training needs no package beyond torch and numpy.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import torch

from model import Llama, ModelArgs

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PREFIX = "model."


def _tensor_bytes(t: torch.Tensor, dtype: str) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if dtype == "BF16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    return t.to(torch.float16 if dtype == "F16" else torch.float32).numpy().tobytes()


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], dtype: str = "F32") -> None:
    """One safetensors file (atomic: written beside, then renamed)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    blobs, off = [], 0
    for name in sorted(tensors):
        b = _tensor_bytes(tensors[name], dtype)
        header[name] = {"dtype": dtype, "shape": list(tensors[name].shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)  # tensors start 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def write_sharded(out_dir: str, tensors: dict[str, torch.Tensor], dtype: str, shard_mib: float) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json when the weights
    exceed shard_mib (a GPU run brings back files of at most 16 MiB). Returns the files written."""
    per = 2 if dtype in ("F16", "BF16") else 4
    groups, cur, size = [], {}, 0
    for name in sorted(tensors):
        nb = tensors[name].numel() * per
        if cur and size + nb > shard_mib * 2**20:
            groups.append(cur)
            cur, size = {}, 0
        cur[name] = tensors[name]
        size += nb
    groups.append(cur)
    for old in os.listdir(out_dir):
        if old.startswith("model") and (old.endswith(".safetensors") or old.endswith(".index.json")):
            os.remove(os.path.join(out_dir, old))
    if len(groups) == 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), groups[0], dtype)
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, g in enumerate(groups):
        fn = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(os.path.join(out_dir, fn), g, dtype)
        files.append(fn)
        weight_map.update({k: fn for k in g})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.numel() * per for t in tensors.values())}, "weight_map": weight_map}, f)
    return files + ["model.safetensors.index.json"]


def read_header(path: str) -> dict:
    """The JSON header of a safetensors file: {name: {dtype, shape, data_offsets}, "__metadata__": ...}."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    dtypes = {"F32": np.float32, "F16": np.float16, "BF16": None}
    header = read_header(path)
    with open(path, "rb") as f:
        f.seek(8 + struct.unpack("<Q", f.read(8))[0])
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        if t["dtype"] == "BF16":
            u = np.frombuffer(data[a:b], dtype=np.uint16).astype(np.uint32) << 16
            arr = u.view(np.float32)
        else:
            arr = np.frombuffer(data[a:b], dtype=dtypes[t["dtype"]]).astype(np.float32)
        out[name] = torch.from_numpy(arr.reshape(t["shape"]).copy())
    return out


def args_from_config(cfg: dict) -> ModelArgs:
    return ModelArgs(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        head_dim=cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]),
        max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=cfg.get("rope_theta", 10000.0),
    )


def load_hf_dir(path: str) -> Llama:
    """A Llama from a Hugging Face directory (config.json + model.safetensors, tied embeddings)."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    model = Llama(args_from_config(cfg))
    files = ["model.safetensors"]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for fn in files:
        state.update({k[len(PREFIX) :]: v for k, v in read_safetensors(os.path.join(path, fn)).items()})
    state.pop("lm_head.weight", None)  # tied: the head is the embedding
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: missing {missing}, unexpected {unexpected}")
    return model


def write_side_files(out_dir: str, args: dict, dtype: str, tokenizer_json: str) -> None:
    """config.json, generation_config.json, tokenizer_config.json (ChatML) and tokenizer.json beside the weights."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **args,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": [2, 0],
        "pad_token_id": 0,
        "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype],
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 0], "pad_token_id": 0, "do_sample": False}, f, indent=1)
    tok_cfg = {
        "chat_template": CHATML_TEMPLATE,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "model_max_length": args["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=1)
    if os.path.abspath(tokenizer_json) != os.path.abspath(os.path.join(out_dir, "tokenizer.json")):
        shutil.copyfile(tokenizer_json, os.path.join(out_dir, "tokenizer.json"))


def export_hf_dir(
    model: Llama,
    out_dir: str,
    tokenizer_json: str,
    extra_files: dict[str, str] | None = None,
    dtype: str = "F32",
    shard_mib: float = 1e9,
) -> None:
    """Write the model as a Hugging Face directory the server loads with `--model out_dir` (dtype F32, F16 or
    BF16; sharded above shard_mib)."""
    a = model.args
    os.makedirs(out_dir, exist_ok=True)
    tensors = {PREFIX + k: v for k, v in model.state_dict().items() if not k.startswith("rope_")}
    write_sharded(out_dir, tensors, dtype, shard_mib)
    write_side_files(out_dir, a.to_dict(), dtype, tokenizer_json)
    for name, text in (extra_files or {}).items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text)
