"""The Llama decoder the project trains, in the order the engine runs it (cuda/reform_cpu.cpp reads the same
weights): token embedding -> N x [RMSNorm -> attention with RoPE and grouped KV heads -> residual -> RMSNorm ->
SwiGLU MLP -> residual] -> RMSNorm -> tied LM head.

Tensor names are Hugging Face's `LlamaForCausalLM` names so that export.py writes a directory that
src/model/ loads unchanged. Reference: Touvron et al. 2023 (Llama), Hugging Face `modeling_llama.py`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def to_dict(self) -> dict:
        return asdict(self)


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 under autocast is upcast; float64 evaluation stays float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _up(x)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, n_pos: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [n_pos, head_dim] in Hugging Face's rotate-half layout (first half pairs with the second)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    ang = torch.outer(torch.arange(n_pos, device=device, dtype=torch.float32), inv)
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [T, D]."""
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return (_up(x) * cos + _up(rot) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.nh, self.nkv, self.hd = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(a.hidden_size, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(a.hidden_size, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, a.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal = True
        if cache is not None:  # decoding: attend to the cached keys/values too (T == 1 after the prompt)
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
                causal = T > 1
            cache["k"], cache["v"] = k, v
        rep = self.nh // self.nkv
        if rep > 1:  # grouped-query attention: each KV head serves `rep` query heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if hasattr(F, "scaled_dot_product_attention"):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:  # torch < 2.0 (Debian bookworm's python3-torch 1.13)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
            if causal:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
                att = att.masked_fill(mask, float("-inf"))
            y = att.softmax(-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """forward(ids [B, T] int64) -> logits [B, T, vocab] (float32 under autocast too)."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.num_hidden_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        cos, sin = rope_tables(a.head_dim, a.max_position_embeddings, a.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        # residual-branch outputs start small (GPT-2 scaling), so depth does not blow up the stream
        for n, p in self.named_parameters():
            if n.endswith("o_proj.weight") or n.endswith("down_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * a.num_hidden_layers))

    @staticmethod
    def _init(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids: torch.Tensor, caches: list[dict] | None = None, pos0: int = 0) -> torch.Tensor:
        """ids [B, T] at positions pos0..pos0+T-1; `caches` (one dict per layer) keeps keys/values for decoding."""
        T = ids.shape[1]
        if pos0 + T > self.args.max_position_embeddings:
            raise ValueError(f"position {pos0 + T} exceeds the window {self.args.max_position_embeddings}")
        x = self.embed_tokens(ids)
        cos, sin = self.rope_cos[pos0 : pos0 + T], self.rope_sin[pos0 : pos0 + T]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, caches[i] if caches is not None else None)
        return F.linear(self.norm(x), self.embed_tokens.weight)  # tied LM head

    @torch.no_grad()
    def generate(self, ids: list[int], max_new: int, stop: set[int]) -> list[int]:
        """Greedy decoding with a KV cache, inside the window (evaluation)."""
        dev = self.embed_tokens.weight.device
        caches = [{} for _ in self.layers]
        logits = self(torch.tensor([ids], device=dev), caches, 0)
        out, pos = [], len(ids)
        for _ in range(max_new):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if nxt in stop or pos >= self.args.max_position_embeddings:
                break
            logits = self(torch.tensor([[nxt]], device=dev), caches, pos)
            pos += 1
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def grow(model: Llama, num_hidden_layers: int) -> Llama:
    """A deeper copy of `model` that computes the same function: the layers added on top start with zero
    output projections (attention o_proj, MLP down_proj), so their residual branches add nothing until trained.
    ../shared/design/training-notes.md: growing a trained model this way kept its copying heads, where a deep
    model from scratch formed none."""
    from dataclasses import replace

    n0 = model.args.num_hidden_layers
    if num_hidden_layers < n0:
        raise ValueError(f"cannot grow {n0} layers to {num_hidden_layers}")
    big = Llama(replace(model.args, num_hidden_layers=num_hidden_layers))
    missing, unexpected = big.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("layers.") for k in missing), (missing, unexpected)
    for layer in big.layers[n0:]:
        nn.init.zeros_(layer.self_attn.o_proj.weight)
        nn.init.zeros_(layer.mlp.down_proj.weight)
    return big


def widen(model: Llama, hidden_size: int, num_attention_heads: int, num_key_value_heads: int,
          intermediate_size: int) -> Llama:
    """A wider copy of `model` that computes the same function (Net2Net-style, zero-initialised where it must be).

    The old weights sit in the leading block of every matrix. New hidden dimensions start at zero in the embedding
    and in every matrix that writes the residual stream (o_proj, down_proj), so the stream's old dimensions carry
    the same values; the RMSNorm gains are scaled by sqrt(old / new) because the norm now divides by the root mean
    square over more (zero) dimensions, and the epsilon by old / new for the same reason. New query heads, KV heads and MLP units read the stream through random
    weights and write through zero ones, so they add nothing until trained but get gradients at once. The head
    layout is kept: with grouped-query attention query head h reads KV head h // (heads / kv_heads), so the ratio
    must stay the same and the old heads keep their KV heads.

    Raises ValueError when a size would shrink or the query/KV head ratio would change."""
    from dataclasses import replace

    a = model.args
    if (hidden_size < a.hidden_size or num_attention_heads < a.num_attention_heads
            or num_key_value_heads < a.num_key_value_heads or intermediate_size < a.intermediate_size):
        raise ValueError("widen cannot shrink a model")
    if num_attention_heads * a.num_key_value_heads != a.num_attention_heads * num_key_value_heads:
        raise ValueError("widen keeps the query heads per KV head")
    big = Llama(replace(a, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                        num_key_value_heads=num_key_value_heads, intermediate_size=intermediate_size,
                        rms_norm_eps=a.rms_norm_eps * a.hidden_size / hidden_size))
    gain = math.sqrt(a.hidden_size / hidden_size)
    src = model.state_dict()
    with torch.no_grad():
        for name, p in big.named_parameters():
            old = src[name]
            if name.endswith("o_proj.weight") or name.endswith("down_proj.weight") or name == "embed_tokens.weight":
                p.zero_()
            if name.endswith("norm.weight"):
                p.fill_(gain)
                p[: old.shape[0]] = old * gain
            else:
                p[: old.shape[0], : old.shape[1]] = old
    return big
