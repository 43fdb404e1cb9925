"""Build the training and evaluation corpus from Debian packages (the only text source these machines reach).

    python3 training/corpus.py [--out training/data] [--debs DIR]
    python3 training/corpus.py --smoke --out DIR      # offline: the smoke test's small corpus

Downloads (apt-get download, no root needed) and unpacks fortunes, fortunes-min, wordnet-base and python3.11-doc,
then writes to --out:
    train_sents.bin / train_offsets.npy   sentences for haystacks and plain text (uint16 token ids, each sentence
                                          encoded with a leading space so that concatenations tokenize exactly)
    eval_sents.bin  / eval_offsets.npy    the held-out haystack: sections reference/, tutorial/, howto/ of the
                                          Python documentation, never trained on
    words.json                            {"train": {"adj": [...], "noun": [...]}, "eval": {...}}: alphabetic 3-9
                                          letter lemmas of WordNet index.adj / index.noun; the last 20% of each
                                          (file order) are held out for evaluation keys and values
    eval_haystack.txt                     the held-out haystack as plain text (for the server-side benchmark)
    manifest.json                         sizes and sources
Reserved sources are the ones listed in ../shared/design/training-notes.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from tokenizer import Tokenizer  # noqa: E402

PACKAGES = ["fortunes", "fortunes-min", "wordnet-base", "python3.11-doc"]
DOCS = "usr/share/doc/python3.11/html/_sources"
HELD_OUT_DOC_SECTIONS = ("reference", "tutorial", "howto")
HELD_OUT_WORD_FRACTION = 0.2
DEFAULT_TOKENIZER = os.path.join(HERE, "..", "models", "reform-tiny", "tokenizer.json")

SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
RST_NOISE = re.compile(r"^\s*(\.\. |:[a-z]+:|[=\-~^\"'`#*+]{3,}\s*$|>>>|\.\.\.)")
WORD = re.compile(r"^[a-z]{3,9}$")


def fetch_packages(debs: str) -> str:
    """apt-get download + dpkg -x into debs/x; returns the unpacked root."""
    os.makedirs(debs, exist_ok=True)
    root = os.path.join(debs, "x")
    if all(glob.glob(os.path.join(debs, p + "_*.deb")) for p in PACKAGES) and os.path.isdir(root):
        return root
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, check=True)
    for deb in glob.glob(os.path.join(debs, "*.deb")):
        subprocess.run(["dpkg", "-x", deb, root], check=True)
    return root


def clean_rst(text: str) -> list[str]:
    """Paragraphs of prose from reStructuredText: directives, code blocks and headings dropped, roles flattened."""
    paras, cur, in_code = [], [], False
    for line in text.splitlines():
        if not line.strip():
            if cur:
                paras.append(" ".join(cur))
                cur = []
            continue
        indented = line.startswith((" ", "\t"))
        if in_code and indented:
            continue
        in_code = False
        if RST_NOISE.match(line):
            continue
        if line.rstrip().endswith("::"):
            in_code = True
            line = line.rstrip()[:-1]
        line = re.sub(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", line)
        line = line.replace("``", "").replace("`", "").replace("**", "").replace("*", "")
        cur.append(line.strip())
    if cur:
        paras.append(" ".join(cur))
    return paras


def sentences(paras: list[str]) -> list[str]:
    out = []
    for p in paras:
        p = re.sub(r"\s+", " ", p).strip()
        for s in SENT_SPLIT.split(p):
            s = s.strip()
            if 20 <= len(s) <= 400 and sum(c.isalpha() for c in s) > 0.6 * len(s):
                out.append(s)
    return out


def fortunes(root: str) -> list[str]:
    paras = []
    for path in sorted(glob.glob(os.path.join(root, "usr/share/games/fortunes/*"))):
        if "." in os.path.basename(path) or os.path.isdir(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            paras += [p.replace("\n", " ") for p in f.read().split("\n%\n")]
    return paras


def wordnet(root: str) -> tuple[list[str], dict]:
    glosses = []
    for pos in ("noun", "verb", "adj", "adv"):
        with open(os.path.join(root, "usr/share/wordnet", "data." + pos), encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue
                g = line.split("|", 1)[1].strip()
                for part in g.split(";"):
                    part = part.strip().strip('"').strip()
                    if len(part) > 20:
                        glosses.append(part[0].upper() + part[1:] + ("" if part.endswith(".") else "."))
    words = {"train": {}, "eval": {}}
    for pos in ("adj", "noun"):
        lemmas = []
        with open(os.path.join(root, "usr/share/wordnet", "index." + pos), encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                w = line.split(" ", 1)[0]
                if WORD.match(w):
                    lemmas.append(w)
        cut = int(len(lemmas) * (1 - HELD_OUT_WORD_FRACTION))
        words["train"][pos], words["eval"][pos] = lemmas[:cut], lemmas[cut:]
    return glosses, words


def python_docs(root: str) -> tuple[list[str], list[str]]:
    train, held = [], []
    base = os.path.join(root, DOCS)
    for path in sorted(glob.glob(os.path.join(base, "**", "*.txt"), recursive=True)):
        rel = os.path.relpath(path, base)
        with open(path, encoding="utf-8", errors="replace") as f:
            paras = clean_rst(f.read())
        (held if rel.split(os.sep)[0] in HELD_OUT_DOC_SECTIONS else train).extend(paras)
    return train, held


def write_sents(out: str, name: str, sents: list[str], tok: Tokenizer) -> int:
    ids, offs = [], [0]
    for s in sents:
        t = tok.encode(" " + s)
        ids.extend(t)
        offs.append(len(ids))
    np.asarray(ids, dtype=np.uint16).tofile(os.path.join(out, name + "_sents.bin"))
    np.save(os.path.join(out, name + "_offsets.npy"), np.asarray(offs, dtype=np.int64))
    return len(ids)


def smoke_sources() -> tuple[list[str], list[str], dict]:
    """A small corpus from the repository's own documents (README.md to train, ARCHITECTURE.md held out) with
    made-up words: the offline input of the trainer's smoke test, not a corpus to learn anything from."""
    def paras(name):
        with open(os.path.join(HERE, "..", name), encoding="utf-8") as f:
            return [p for p in f.read().split("\n\n") if p.strip()]
    syll = ["ka", "lo", "mi", "ren", "tu", "sa", "vel", "dor", "pin", "qua"]
    made = sorted({a + b + c for a in syll for b in syll for c in syll})
    half = len(made) // 2
    words = {"train": {"adj": made[:half:2], "noun": made[1:half:2]}, "eval": {"adj": made[half::2], "noun": made[half + 1 :: 2]}}
    return sentences(paras("README.md")), sentences(paras("ARCHITECTURE.md")), words


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "data"))
    ap.add_argument("--debs", default=os.path.join(HERE, "data", "debs"))
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    ap.add_argument("--smoke", action="store_true", help="a small offline corpus from the repository's documents")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    tok = Tokenizer(a.tokenizer)
    if a.smoke:
        train, held, words = smoke_sources()
    else:
        root = fetch_packages(a.debs)
        glosses, words = wordnet(root)
        doc_train, doc_held = python_docs(root)
        train = sentences(fortunes(root)) + sentences(glosses) + sentences(doc_train)
        held = sentences(doc_held)
    n_train = write_sents(a.out, "train", train, tok)
    n_eval = write_sents(a.out, "eval", held, tok)
    with open(os.path.join(a.out, "words.json"), "w") as f:
        json.dump(words, f)
    with open(os.path.join(a.out, "eval_haystack.txt"), "w") as f:
        f.write("\n".join(held))
    manifest = {
        "packages": [] if a.smoke else PACKAGES,
        "train": {"sentences": len(train), "tokens": n_train},
        "eval": {
            "sentences": len(held),
            "tokens": n_eval,
            "sources": ["ARCHITECTURE.md"] if a.smoke else [f"python docs {s}/" for s in HELD_OUT_DOC_SECTIONS],
        },
        "words": {s: {p: len(v) for p, v in words[s].items()} for s in words},
    }
    with open(os.path.join(a.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(json.dumps(manifest))


if __name__ == "__main__":
    main()
