"""Byte-level BPE encoder for the model's `tokenizer.json` (GPT-2 pre-tokenization, no normalizer).

The server tokenizes with @huggingface/tokenizers (src/model/tokenizer.ts); this file must give the same ids on
the same text, which `test/training.test.ts` checks on a varied text set. Special tokens written literally in a
text (`<|im_start|>` ...) are matched first, as the Hugging Face tokenizer does for added tokens.

Speed: each pre-token's ids are cached, so encoding natural text is a regex split plus dictionary lookups (the
training data pipeline encodes every example on the fly).
"""

from __future__ import annotations

import json
from functools import lru_cache

try:
    import regex as re  # \p{L} / \p{N} classes, as the Hugging Face ByteLevel pre-tokenizer
except ImportError as e:  # pragma: no cover - setup installs python3-regex
    raise SystemExit("training needs the `regex` module (Debian: python3-regex, pip: regex)") from e

# The GPT-2 pattern used by the ByteLevel pre-tokenizer (use_regex: true).
GPT2_PATTERN = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the alphabet of byte-level BPE tokens)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class Tokenizer:
    """Encoder/decoder for a Hugging Face byte-level BPE `tokenizer.json`.

    encode(text) -> list[int]: no special tokens added (the chat template writes them as text).
    decode(ids) -> str: invalid UTF-8 becomes U+FFFD, as the server's decoder.
    """

    def __init__(self, path: str):
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        model = spec["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: only BPE tokenizers are supported, got {model.get('type')}")
        self.vocab: dict[str, int] = model["vocab"]
        self.inv = {i: s for s, i in self.vocab.items()}
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_map = bytes_to_unicode()
        self.byte_inv = {c: b for b, c in self.byte_map.items()}
        self.special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        for s, i in self.special.items():
            self.inv[i] = s
        self.special_ids = set(self.special.values())
        self.special_re = (
            re.compile("(" + "|".join(re.escape(s) for s in sorted(self.special, key=len, reverse=True)) + ")")
            if self.special
            else None
        )
        self._bpe = lru_cache(maxsize=1 << 18)(self._bpe_uncached)

    @property
    def vocab_size(self) -> int:
        return max(self.inv) + 1

    def token_id(self, s: str) -> int:
        return self.special[s] if s in self.special else self.vocab[s]

    def _bpe_uncached(self, word: str) -> tuple[int, ...]:
        parts = list(word)
        while len(parts) > 1:
            best, best_rank = -1, None
            for i in range(len(parts) - 1):
                r = self.ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best < 0:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        return tuple(self.vocab[p] for p in parts)

    def _encode_ordinary(self, text: str, out: list[int]) -> None:
        bm = self.byte_map
        for piece in GPT2_PATTERN.findall(text):
            out.extend(self._bpe("".join(bm[b] for b in piece.encode("utf-8"))))

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        if self.special_re is None:
            self._encode_ordinary(text, out)
            return out
        for i, part in enumerate(self.special_re.split(text)):
            if i % 2 == 1:
                out.append(self.special[part])
            elif part:
                self._encode_ordinary(part, out)
        return out

    def decode_bytes(self, ids) -> bytes:
        out = bytearray()
        for i in ids:
            s = self.inv[int(i)]
            if int(i) in self.special_ids:
                out += s.encode("utf-8")
            else:
                out += bytes(self.byte_inv[c] for c in s)
        return bytes(out)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


if __name__ == "__main__":
    # `python3 training/tokenizer.py TOKENIZER_JSON < texts.json`: prints the ids of each text in a JSON list
    # (used by the test that compares with the server's tokenizer).
    import sys

    tok = Tokenizer(sys.argv[1])
    texts = json.load(sys.stdin)
    json.dump([tok.encode(t) for t in texts], sys.stdout)
