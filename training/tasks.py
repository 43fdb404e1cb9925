"""The synthetic task mix: RULER-style needle retrieval, quoting, copying and plain text, as token-id rows.

Every retrieval answer restates the fact as it stands in the text ("One of the special magic numbers for K is:
V."): the answer becomes two copies (the key phrase from the question, then the value after the matching phrase
in the text), which a small model learns far sooner than a bare value (../shared/design/training-notes.md).
RULER's string_match_all scoring only checks that each expected value appears, so the format costs nothing in
evaluation. Reference: Hsieh et al. 2024, RULER, section 3 (NIAH variants: single, multi-key, multi-value,
multi-query).

Chat format (ChatML, as the server renders it with the context spliced into the user turn, src/engine/prompt.ts):
    <|im_start|>user\n{haystack with needles}\n\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n
The loss covers the answer and its <|im_end|>.

`split="train"` draws haystack and key/value words from the training sources, `split="eval"` from the held-out
ones (Python docs reference/tutorial/howto, the last 20% of WordNet lemmas), so evaluation never sees trained text.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from dataclasses import dataclass, field

import numpy as np

from tokenizer import Tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
NEEDLE_TASKS = ("single", "multikey", "multivalue", "multiquery", "quote")

# needle templates, shared with bench/ruler.ts: (needle, question about one key, question about all values of one
# key, question about several keys); the quote task's question
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates.json")) as _f:
    _T = json.load(_f)
TEMPLATES = [tuple(t) for t in _T["needles"]]
QUOTE_Q = _T["quote"]


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # True where the loss applies (predicting ids[i] from ids[:i])
    task: str
    expected: list[str] = field(default_factory=list)  # strings that must all appear in the answer (eval)
    prompt_len: int = 0  # tokens before the answer (eval decodes from here)


class Corpus:
    """Token-id sentences and word lists of one split, as written by corpus.py."""

    def __init__(self, data_dir: str, split: str):
        self.ids = np.fromfile(os.path.join(data_dir, f"{split}_sents.bin"), dtype=np.uint16)
        self.offs = np.load(os.path.join(data_dir, f"{split}_offsets.npy"))
        with open(os.path.join(data_dir, "words.json")) as f:
            w = json.load(f)[split]
        self.adj, self.noun = w["adj"], w["noun"]

    def n_sents(self) -> int:
        return len(self.offs) - 1

    def sent(self, i: int) -> list[int]:
        return self.ids[self.offs[i] : self.offs[i + 1]].tolist()


class TaskMaker:
    def __init__(self, tok: Tokenizer, corpus: Corpus, seed: int, shard_rate: float = 0.0, cluster_rate: float = 0.0,
                 layout_rate: float = 0.0, cut_rate: float = 0.0):
        """`shard_rate`: the share of needle haystacks made of gathered-like runs (`shards`); `cluster_rate`: the share
        of needle tasks whose facts stand together (`_cluster`); `layout_rate`: the share of needle tasks with runs of
        whitespace between sentences and another separator before the question (`_layout`); `cut_rate`: the share of
        side-by-side facts whose sentence starts cut (`_cluster`). 0 (evaluation) draws exactly the samples drawn
        before the options existed."""
        self.tok, self.c = tok, corpus
        self.rng = random.Random(seed)
        self.shard_rate = shard_rate
        self.cluster_rate = cluster_rate
        self.layout_rate = layout_rate
        self.cut_rate = cut_rate
        self.head = tok.encode(IM_START + "user\n")
        self.im_end = tok.token_id(IM_END)

    # ---- keys and values -------------------------------------------------------------------------------
    def _words(self) -> str:
        r = self.rng
        return f"{r.choice(self.c.adj)}-{r.choice(self.c.noun)}"

    def key(self) -> str:
        r = self.rng.random()
        if r < 0.6:
            return self._words()
        if r < 0.8:
            return "".join(self.rng.choice(string.ascii_lowercase + string.digits) for _ in range(10))
        return str(self.rng.randrange(10**6, 10**7))

    def value(self, kind: str) -> str:
        r = self.rng
        if kind == "number":
            return str(r.randrange(10**6, 10**7))
        if kind == "uuid":
            h = "".join(r.choice("0123456789abcdef") for _ in range(32))
            return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        return self._words()

    # ---- haystack ----------------------------------------------------------------------------------------
    def haystack(self, n_tokens: int, fragmented: bool) -> list[list[int]]:
        """Sentences (token ids, each starting with a space) summing to about n_tokens. `fragmented` cuts random
        spans out of sentences, like the non-contiguous tokens REFORM gathers."""
        out, total = [], 0
        start = self.rng.randrange(self.c.n_sents())
        i = start
        while total < n_tokens:
            s = self.c.sent(i % self.c.n_sents())
            i += 1 if self.rng.random() < 0.9 else self.rng.randrange(1, 1000)
            if fragmented and len(s) > 8 and self.rng.random() < 0.5:
                a = self.rng.randrange(len(s) // 2)
                s = s[a : a + self.rng.randrange(4, len(s) - a + 1)]
            out.append(s)
            total += len(s)
        return out

    def shards(self, n_tokens: int) -> list[list[int]]:
        """Runs of 16-96 tokens from random places, cut at any token: the shape of what REFORM gathers beyond the
        window (windows of contiguous tokens around the best scores, joined edge to edge; src/engine/gather.ts).
        Needles land between runs, glued to cut text on both sides, as a gathered needle often is."""
        r, out, total = self.rng, [], 0
        while total < n_tokens:
            length = r.randint(16, 96)
            i = r.randrange(self.c.n_sents())
            run = self.c.sent(i)
            a = r.randrange(len(run))
            while len(run) < a + length:
                i = (i + 1) % self.c.n_sents()
                run = run + self.c.sent(i)
            out.append(run[a : a + length])
            total += length
        return out

    # ---- assembling ----------------------------------------------------------------------------------------
    def _chat(self, pieces: list[list[int]], question: str, answer: str, task: str, expected: list[str],
              sep: str = "\n\n") -> Example:
        body = [t for p in pieces for t in p]
        q = self.tok.encode(sep + question + IM_END + "\n" + IM_START + "assistant\n")
        a = self.tok.encode(answer) + [self.im_end]
        prompt = self.head + body + q
        return Example(prompt + a, [False] * len(prompt) + [True] * len(a), task, expected, len(prompt))

    def _insert(self, hay: list[list[int]], needles: list[list[int]]) -> list[list[int]]:
        """Needles at spread depths: sorted random positions between haystack sentences."""
        pos = sorted(self.rng.randrange(len(hay) + 1) for _ in needles)
        out, j = [], 0
        for i in range(len(hay) + 1):
            while j < len(needles) and pos[j] == i:
                out.append(needles[j])
                j += 1
            if i < len(hay):
                out.append(hay[i])
        return out

    def needle_task(self, task: str, n_tokens: int) -> Example:
        r = self.rng
        tpl = r.choice(TEMPLATES)
        kind = r.choice(("number", "number", "uuid", "words"))
        noun = {"number": "number", "uuid": "uuid", "words": "word"}[kind]
        fill = lambda s, **kw: s.format(n=noun, **kw)  # noqa: E731
        if task == "single":
            facts = [(self.key(), self.value(kind))]
            asked = facts
            question = fill(tpl[1], k=facts[0][0])
        elif task == "multikey":
            # distinct keys in draw order (a set's order follows the per-process string hash: samples would differ
            # from run to run)
            keys = list(dict.fromkeys(self.key() for _ in range(r.randint(2, 7))))
            facts = [(k, self.value(kind)) for k in keys]
            asked = [r.choice(facts)]
            question = fill(tpl[1], k=asked[0][0])
        elif task == "multivalue":
            k = self.key()
            facts = [(k, self.value(kind)) for _ in range(r.randint(2, 4))]
            asked = facts
            question = fill(tpl[2], k=k)
        else:  # multiquery
            keys = list(dict.fromkeys(self.key() for _ in range(r.randint(2, 4))))
            facts = [(k, self.value(kind)) for k in keys]
            asked = r.sample(facts, k=min(len(facts), r.randint(2, 3)))
            ks = ", ".join(k for k, _ in asked[:-1]) + " and " + asked[-1][0] if len(asked) > 1 else asked[0][0]
            question = fill(tpl[3], ks=ks)
        sentences = [fill(tpl[0], k=k, v=v) for k, v in facts]
        needles = [self.tok.encode(" " + s) for s in sentences]
        overhead = len(self.head) + 24 + len(self.tok.encode(question)) + sum(len(n) for n in needles) * 2
        fragmented = r.random() < 0.25  # drawn either way: with shard_rate 0 the random stream is the old one
        if self.shard_rate and r.random() < self.shard_rate:
            hay = self.shards(max(16, n_tokens - overhead))
        else:
            hay = self.haystack(max(16, n_tokens - overhead), fragmented=fragmented)
        if self.cluster_rate and r.random() < self.cluster_rate:
            # tokens of the sentence before its key: a cut start keeps at least one of them and the key whole (counted
            # only where starts are cut: this runs for every side-by-side sample the trainer makes)
            max_cut = len(self.tok.encode(" " + fill(tpl[0].split("{k}")[0]).rstrip())) - 1 if self.cut_rate else 0
            pieces = self._cluster(hay, needles, max_cut)
        else:
            pieces = self._insert(hay, needles)
        sep = "\n\n"
        if self.layout_rate and r.random() < self.layout_rate:
            pieces, sep = self._layout(pieces)
        if task == "multivalue":  # answer in order of appearance in the text
            order = [facts[i] for i in sorted(range(len(facts)), key=lambda i: self._index_of(pieces, needles[i]))]
        else:
            order = asked
        answer = " ".join(fill(tpl[0], k=k, v=v) for k, v in order)
        return self._chat(pieces, question, answer, task, [v for _, v in asked], sep)

    # what documents look like outside prose: indented titles and code, blank lines, tabs
    WHITESPACE_RUNS = ["\n", "\n\n", "\n\n\n", "\t", "\t\t\t", "\n    ", "\n        ", "\n\t"]
    # what stands between a document and its question in a chat message (an inline request's text as users write it)
    SEPARATORS = ["\n", "\n\n\n", " ", "\n\n\n\n", "\n \n", "\n\nQuestion: "]

    def _layout(self, pieces: list[list[int]]) -> tuple[list[list[int]], str]:
        """Runs of whitespace (blank lines, indentation up to 40 spaces, tabs) before a fifth of the pieces, and one of
        SEPARATORS before the question: license files, code and logs gathered beyond the window put such runs in the
        recompute prompt, and a model that saw only prose and "\n\n" answered them with whitespace (README, inline)."""
        r = self.rng
        out = []
        for p in pieces:
            if r.random() < 0.2:
                ws = r.choice(self.WHITESPACE_RUNS + [" " * r.randint(4, 40), "\n" + " " * r.randint(8, 40)])
                out.append(self.tok.encode(ws))
            out.append(p)
        return out, r.choice(self.SEPARATORS)

    def _cluster(self, hay: list[list[int]], needles: list[list[int]], max_cut: int = 0) -> list[list[int]]:
        """The needles (facts and distractors) side by side at one random place, some glued to a 1-12 token shard:
        the shape of a recompute prompt under the score floor (src/engine/selection.ts keepNearBest), where the
        passages that share the question's key stand next to each other and little else is kept. A model that saw
        facts only far apart restated one fact twice and skipped the next (bench/ruler.ts --show-misses). With
        `cut_rate`, that share of the needles lose their first 1..max_cut tokens ("al magic words for K is: V."), as
        a passage does when the budget runs out before its sentence start: the shipped weights restated 71% of
        multi-value facts side by side and 35-53% with their starts cut (1-8 tokens), the answer still restating
        the whole sentence."""
        r = self.rng
        cluster = []
        for nd in needles:
            if self.cut_rate and max_cut > 0 and r.random() < self.cut_rate:
                del nd[: r.randint(1, max_cut)]  # in place: the answer's order finds the needle by identity
            if r.random() < 0.5:
                i = r.randrange(self.c.n_sents())
                s = self.c.sent(i)
                a = r.randrange(len(s))
                cluster.append(s[a : a + r.randint(1, 12)])
            cluster.append(nd)
        at = r.randrange(len(hay) + 1)
        return hay[:at] + cluster + hay[at:]

    @staticmethod
    def _index_of(pieces: list[list[int]], needle: list[int]) -> int:
        for i, p in enumerate(pieces):
            if p is needle:
                return i
        return -1

    def quote_task(self, n_tokens: int) -> Example:
        """Quote the one sentence that holds a word found nowhere else in the haystack."""
        r = self.rng
        for _ in range(20):
            hay = self.haystack(max(16, n_tokens - 60), fragmented=False)
            texts = [self.tok.decode(s) for s in hay]
            # words as bench/ruler-tasks.ts counts them (letters only, any case): split() kept "string," apart from
            # "string", and 9% of the questions had a second sentence with the word in it
            counts: dict[str, int] = {}
            for t in texts:
                for w in set(re.findall(r"[a-z]+", t.lower())):
                    counts[w] = counts.get(w, 0) + 1
            order = list(range(len(hay)))
            r.shuffle(order)
            for i in order:
                words = [w for w in re.findall(r"[A-Za-z]+", texts[i]) if len(w) >= 5 and counts.get(w.lower()) == 1]
                if words and len(hay[i]) <= 60:
                    w = r.choice(words)
                    sent = texts[i].strip()
                    return self._chat(hay, QUOTE_Q.format(w=w), sent, "quote", [sent])
        return self.needle_task("single", n_tokens)

    def copy_task(self, n_tokens: int) -> Example:
        """Repeated random-token span (loss on the second copy): the exercise that grows copying heads."""
        half = n_tokens // 2
        span = [self.rng.randrange(3, self.tok.vocab_size) for _ in range(half)]
        ids = span + span
        return Example(ids, [False] * (half + 1) + [True] * (half - 1), "copy")

    def text_task(self, n_tokens: int) -> Example:
        ids = [t for s in self.haystack(n_tokens, fragmented=False) for t in s][:n_tokens]
        return Example(ids, [False] + [True] * (len(ids) - 1), "text")

    def make_fitting(self, task: str, max_total: int) -> Example:
        """An example of at most max_total tokens, as long as possible: made again with a shorter haystack when it
        comes out too long (never cut, so no answer loses its context)."""
        target = max_total
        for _ in range(32):  # shrink the haystack; at the floor, new draws (shorter keys and values) may fit
            ex = self.make(task, target)
            if len(ex.ids) <= max_total:
                return ex
            target = max(16, target - (len(ex.ids) - max_total) - 8)
        # the needles alone do not fit (short rows): plain text instead
        return self.text_task(max_total)

    def make(self, task: str, n_tokens: int) -> Example:
        if task in ("single", "multikey", "multivalue", "multiquery"):
            return self.needle_task(task, n_tokens)
        if task == "quote":
            return self.quote_task(n_tokens)
        if task == "copy":
            return self.copy_task(n_tokens)
        return self.text_task(n_tokens)


def batch_rows(maker: TaskMaker, mix: dict[str, float], seq_len: int, rows: int, pad: int = 0):
    """`rows` examples of at most seq_len + 1 tokens as (inputs, targets, mask) numpy arrays [rows, seq_len]
    (int64, int64, bool), padded with `pad` (masked out)."""
    tasks, weights = zip(*mix.items())
    x = np.full((rows, seq_len), pad, dtype=np.int64)
    y = np.full((rows, seq_len), pad, dtype=np.int64)
    m = np.zeros((rows, seq_len), dtype=bool)
    for r in range(rows):
        ex = maker.make_fitting(maker.rng.choices(tasks, weights)[0], seq_len + 1)
        n = len(ex.ids) - 1
        x[r, :n] = ex.ids[:-1]
        y[r, :n] = ex.ids[1:]
        m[r, :n] = ex.mask[1:]
    return x, y, m
