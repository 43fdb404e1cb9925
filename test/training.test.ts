/**
 * training/ against the server: the trainer's tokenizer gives the server's ids on the same text, and a few
 * training steps through the GPU runbook's own command (scripts/gpu-train.sh --dry-run), exported and completed by
 * training/finish.py, give a directory the server loads and generates from.
 * Skipped (and counted as skipped) where no python3 with torch, numpy and regex exists; scripts/setup.sh
 * --with-test-libs installs them.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { libraryPath } from "../ffi/native.ts";
import { DEFAULT_MODEL_DIR } from "../src/config.ts";
import { ModelTokenizer } from "../src/model/tokenizer.ts";
import { startServer } from "../src/server.ts";

const ROOT = join(import.meta.dir, "..");
const PY = ["python3", "/usr/bin/python3"].find(
  (p) => spawnSync(p, ["-c", "import torch, numpy, regex"], { encoding: "utf8" }).status === 0,
);
const T = 240_000;
const root = mkdtempSync(join(tmpdir(), "reform-training-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

function py(args: string[], input?: string, env: Record<string, string> = {}) {
  const r = spawnSync(PY!, args, { cwd: ROOT, input, encoding: "utf8", env: { ...process.env, ...env }, timeout: T });
  if (r.status !== 0) throw new Error(`python3 ${args.join(" ")} failed (${r.status}): ${r.stderr}\n${r.stdout}`);
  return r.stdout;
}

const TEXTS = [
  "One of the special magic numbers for bright-river is: 4821937.",
  "The quick brown fox jumps over the lazy dog. It's 12345 o'clock!\n\nNew paragraph:  two  spaces, tabs\tand émojis 🎉 中文字符 end.",
  "def f(x):\n    return x * 2  # comment\n\n\nclass A: pass",
  "<|im_start|>user\nWhat is the secret number of 9477255?<|im_end|>\n<|im_start|>assistant\n",
  "   leading spaces, trailing spaces   \n\n\n",
  "they'll we've I'm you'd it's DON'T 3.14159 1,000,000 -42 e^x",
  "uuid 1f3a9c2e-7b4d-4e21-9a0f-5c6d7e8f9a0b and URL https://example.org/a?b=c&d=e#f",
  "Ünïcödé ÀÉÎÕÜ ß ø å ñ 日本語のテキスト 한국어 текст العربية 🦊🎉👍🏽",
  "", // empty
  readFileSync(join(ROOT, "bench", "data", "heldout-haystack.txt"), "utf8").slice(0, 20_000),
];

describe.skipIf(!PY)("training/ (python3 with torch, numpy, regex)", () => {
  test("the trainer's tokenizer gives the server's token ids", () => {
    const tokJson = join(DEFAULT_MODEL_DIR, "tokenizer.json");
    const ours: number[][] = JSON.parse(py(["training/tokenizer.py", tokJson], JSON.stringify(TEXTS)));
    const server = ModelTokenizer.fromDir(DEFAULT_MODEL_DIR);
    expect(ours.length).toBe(TEXTS.length);
    TEXTS.forEach((t, i) => {
      expect(ours[i]!).toEqual(server.encode(t));
    });
    // special tokens written in the text are single ids on both sides
    expect(ours[3]![0]).toBe(1);
  });

  let data = "";
  /** the smoke corpus (corpus.py --smoke), built once */
  const smokeData = () => {
    if (!data) {
      data = join(root, "data");
      py(["training/corpus.py", "--smoke", "--out", data]);
    }
    return data;
  };

  /** A python script's start: `tok` and a TaskMaker `m` (with `args`) over the corpus in sys.argv[1]. */
  const makerScript = (args: string) => `
import json, sys
sys.path.insert(0, "training")
from tasks import Corpus, TaskMaker
from tokenizer import Tokenizer
tok = Tokenizer("${join(DEFAULT_MODEL_DIR, "tokenizer.json")}")
m = TaskMaker(tok, Corpus(sys.argv[1], "train"), ${args})`;

  test(
    "model.widen: the shipped weights widened compute the same logits, new units get gradients, shrinking refused",
    () => {
      const check = `
import json, sys, torch
sys.path.insert(0, "training")
from export import load_hf_dir
from model import widen
torch.manual_seed(0)
m = load_hf_dir("${DEFAULT_MODEL_DIR}")
w = widen(m, 192, 6, 3, 576)
ids = torch.randint(0, 1024, (2, 200))
a, b = m(ids), w(ids)
b.logsumexp(-1).mean().backward()
new_head = w.layers[0].self_attn.o_proj.weight.grad[:, 128:].abs().max().item()
new_unit = w.layers[0].mlp.down_proj.weight.grad[:, 384:].abs().max().item()
refused = []
for args in ((96, 4, 2, 384), (192, 6, 2, 576)):
    try:
        widen(m, *args)
    except ValueError as e:
        refused.append(str(e))
print(json.dumps({"diff": (a - b).abs().max().item(), "scale": a.abs().max().item(), "params": [m.num_params(), w.num_params()],
                  "new_head": new_head, "new_unit": new_unit, "refused": refused}))
`;
      const r = JSON.parse(py(["-c", check]));
      expect(r.scale).toBeGreaterThan(5); // real logits, not a degenerate model
      expect(r.diff).toBeLessThan(1e-3);
      expect(r.params[1]).toBeGreaterThan(2 * r.params[0]);
      // the new heads and MLP units write through zero weights (so the function is kept); those weights must get
      // gradients at the first step, or the new units would stay dead
      expect(r.new_head).toBeGreaterThan(0);
      expect(r.new_unit).toBeGreaterThan(0);
      expect(r.refused).toHaveLength(2);
    },
    T,
  );

  test(
    "gathered-like haystacks (tasks.py shard_rate): runs of 16-96 tokens, every needle whole in the prompt",
    () => {
      const check = `${makerScript("seed=5, shard_rate=1.0")}
runs = [len(p) for _ in range(20) for p in m.shards(300)]
out = []
for task in ("single", "multikey", "multivalue", "multiquery"):
    for _ in range(10):
        ex = m.make_fitting(task, 400)
        prompt = tok.decode(ex.ids[: ex.prompt_len])
        out.append([ex.task, len(ex.ids), all(e in prompt for e in ex.expected)])
print(json.dumps({"runs": runs, "examples": out}))
`;
      const r = JSON.parse(py(["-c", check, smokeData()]));
      expect(r.runs.length).toBeGreaterThan(40);
      expect(Math.min(...r.runs)).toBeGreaterThanOrEqual(16);
      expect(Math.max(...r.runs)).toBeLessThanOrEqual(96);
      for (const [task, len, whole] of r.examples) {
        expect(["single", "multikey", "multivalue", "multiquery"]).toContain(task);
        expect(len).toBeLessThanOrEqual(400);
        expect(whole).toBe(true);
      }
    },
    T,
  );

  test(
    "facts side by side (tasks.py cluster_rate): the needles adjacent but for 1-12 token shards, answers in text order",
    () => {
      const check = `${makerScript("seed=7, cluster_rate=1.0")}
clusters = []
for _ in range(20):
    hay = [[-100 - i] for i in range(8)]
    needles = [[-1], [-2], [-3], [-4]]
    pieces = m._cluster(hay, needles)
    clusters.append([p if p in hay or p in needles else len(p) for p in pieces])
examples = []
for task in ("multikey", "multivalue", "multiquery"):
    for _ in range(10):
        ex = m.make_fitting(task, 400)
        prompt = tok.decode(ex.ids[: ex.prompt_len])
        answer = tok.decode(ex.ids[ex.prompt_len :])
        whole = all(e in prompt for e in ex.expected)
        order = [answer.index(e) for e in sorted(ex.expected, key=prompt.index)] if whole else []
        examples.append([ex.task, len(ex.ids), whole, order == sorted(order)])
print(json.dumps({"clusters": clusters, "examples": examples}))
`;
      const r = JSON.parse(py(["-c", check, smokeData()]));
      let shards = 0;
      for (const c of r.clusters as (number[] | number)[][]) {
        // the haystack in its order, the needles in theirs, one run of needles with at most a shard before each
        expect(c.filter((p) => Array.isArray(p) && p[0]! <= -100)).toEqual(
          Array.from({ length: 8 }, (_, i) => [-100 - i]),
        );
        const at = c.flatMap((p, i) => (Array.isArray(p) && p[0]! > -100 ? [i] : []));
        expect(at.map((i) => (c[i] as number[])[0])).toEqual([-1, -2, -3, -4]);
        for (let k = 1; k < at.length; k++) expect(at[k]! - at[k - 1]!).toBeLessThanOrEqual(2);
        for (const p of c)
          if (typeof p === "number") {
            expect(p).toBeGreaterThanOrEqual(1);
            expect(p).toBeLessThanOrEqual(12);
            shards++;
          }
      }
      expect(shards).toBeGreaterThan(10); // about half the needles get one
      for (const [task, len, whole, ordered] of r.examples) {
        expect(len).toBeLessThanOrEqual(400);
        expect(whole).toBe(true);
        if (task === "multivalue") expect(ordered).toBe(true);
      }
    },
    T,
  );

  test(
    "a few training steps through the GPU runbook's command, exported, load in the server and generate",
    async () => {
      const data = smokeData();
      const out = join(root, "out");
      const r = spawnSync("bash", ["scripts/gpu-train.sh", "--dry-run"], {
        cwd: ROOT,
        encoding: "utf8",
        env: { ...process.env, OUT: out, REFORM_TRAIN_DATA: data, DRY_RUN_STEPS: "8", PYTHON: PY! },
        timeout: T,
      });
      expect(r.status).toBe(0);
      const log = r.stdout;
      expect(log).toMatch(/\[train\] step 8 tokens/);
      expect(log).toMatch(/held-out in-window recall/);
      // what a device run brings back: the weights only; finish.py completes the directory
      expect(readdirSync(join(out, "model"))).toEqual(["model.safetensors"]);
      const modelDir = join(root, "model");
      expect(py(["training/finish.py", "--config", "dryrun", join(out, "model"), modelDir])).toContain("window 256");

      const srv = await startServer({
        modelDir,
        dataDir: join(root, "srv"),
        host: "127.0.0.1",
        port: 0,
        backend: "cpu",
        library: libraryPath("cpu"),
        log: () => {},
      });
      try {
        await srv.engine.ready();
        // biome-ignore lint/suspicious/noExplicitAny: a JSON body
        const models: any = await (await fetch(`${srv.url}/v1/models`)).json();
        expect(models.data[0].max_model_len).toBe(256);
        const res = await fetch(`${srv.url}/v1/chat/completions`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ messages: [{ role: "user", content: "Hello" }], max_tokens: 8, temperature: 0 }),
        });
        // biome-ignore lint/suspicious/noExplicitAny: a JSON body
        const body: any = await res.json();
        expect(res.status).toBe(200);
        expect(body.usage.completion_tokens).toBeGreaterThan(0);
        expect(body.usage.completion_tokens).toBeLessThanOrEqual(8);
      } finally {
        await srv.stop();
      }
    },
    T,
  );
});
