"""In-window evaluation on held-out haystack and held-out keys: recall per task (RULER string_match_all).

    python3 training/evaluate.py --model models/reform-tiny [--n 30] [--lengths 256,448] [--layout] [--gathered cut]

Each sample is a task from tasks.py built with split="eval" (Python docs reference/tutorial/howto as haystack,
the held-out 20% of WordNet lemmas as key and value words), answered greedily by the PyTorch model; its score is
the fraction of expected strings found in the answer, averaged per task (RULER, Hsieh et al. 2024, section 4).
The server-side benchmark (bench/ruler.ts) measures the same tasks through the HTTP API, beyond the window too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from tasks import NEEDLE_TASKS, Corpus, TaskMaker  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


@torch.no_grad()
def evaluate(model, tok: Tokenizer, corpus: Corpus, n: int, length: int, seed: int, tasks=NEEDLE_TASKS,
             layout: bool = False, gathered: str | None = None) -> dict:
    """{task: mean string_match_all score in [0, 1]} over n samples of at most `length` tokens each (prompt and
    expected answer). `layout`: every needle sample laid out as documents outside prose are (tasks.py _layout:
    whitespace runs between sentences, another separator before the question). `gathered`: every needle sample in the
    shape of a recompute prompt beyond the window, its haystack runs cut anywhere and its facts side by side ("side"),
    their sentence starts cut too ("cut"; tasks.py shards, _cluster)."""
    shape = dict(shard_rate=1.0, cluster_rate=1.0, cut_rate=1.0 if gathered == "cut" else 0.0) if gathered else {}
    maker = TaskMaker(tok, corpus, seed, layout_rate=1.0 if layout else 0.0, **shape)
    stop = {tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")}
    out = {}
    for task in tasks:
        score = 0.0
        for _ in range(n):
            ex = maker.make_fitting(task, length)
            if ex.task != task:
                raise ValueError(f"length {length} is too short for the {task} task")
            prompt = ex.ids[: ex.prompt_len]
            answer_budget = len(ex.ids) - ex.prompt_len + 8
            ids = model.generate(prompt, answer_budget, stop)
            text = tok.decode([i for i in ids if i not in stop])
            score += sum(e in text for e in ex.expected) / len(ex.expected)
        out[task] = score / n
    return out


def main():
    from export import load_hf_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=os.path.join(HERE, "data"))
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--lengths", default=None, help="comma-separated prompt lengths (default: 50%% and 85%% of the window)")
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--layout", action="store_true",
                    help="needle tasks laid out with whitespace runs and other separators before the question")
    ap.add_argument("--gathered", choices=["side", "cut"], default=None,
                    help="needle tasks shaped as REFORM gathers them: facts side by side in cut runs (side), their "
                         "sentence starts cut too (cut)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"],
                    help="float64 (default): greedy answers do not flip on near-ties with the thread count")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_hf_dir(a.model).to(a.device, getattr(torch, a.dtype)).eval()
    tok = Tokenizer(os.path.join(a.model, "tokenizer.json"))
    corpus = Corpus(a.data, "eval")
    window = model.args.max_position_embeddings
    # quotes have no layout and no facts to stand side by side
    tasks = [t for t in NEEDLE_TASKS if t != "quote"] if a.layout or a.gathered else NEEDLE_TASKS
    lengths = [int(x) for x in a.lengths.split(",")] if a.lengths else [window // 2, int(window * 0.85)]
    results = {}
    print(f"held-out in-window recall, {a.model} (window {window}), n={a.n} per task, greedy, {a.dtype}"
          + (", laid out with whitespace runs and other separators" if a.layout else "")
          + (f", gathered shape ({a.gathered})" if a.gathered else ""))
    print(f"{'task':<12}" + "".join(f"{L:>10}" for L in lengths))
    for L in lengths:
        results[L] = evaluate(model, tok, corpus, a.n, L, a.seed, tasks, a.layout, a.gathered)
    for t in tasks:
        print(f"{t:<12}" + "".join(f"{results[L][t]:>10.1%}" for L in lengths))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "n": a.n, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
