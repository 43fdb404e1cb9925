/**
 * The REFORM paper's ablations of head selection and gathering, on our model: held-out RULER-style samples
 * (bench/ruler-tasks.ts over bench/data, never seen by training or by scripts/select-heads.ts), each context
 * compressed once through the server's own compressor with every head embedded (scripts/heads-lab.ts), then what each
 * setting gathers at query time. "Gathered" is the share of samples of which every asked needle value is among the
 * gathered tokens (what `return_selection` would show), independent of whether the model then answers.
 *
 *   bun bench/heads-ablation.ts [--model DIR] [--heads FILE (default: the model's reform_heads.json)] [--samples N] [--tokens N] [--tasks single,multikey]
 *       [--random N] [--seed S] [--window W] [--only heads,window,eviction,kind,budget,chunk] [--threads N] [--json OUT]
 *
 * Tables (markdown, for the README): smoothing window x operator (mean / max); selected vs random vs worst vs the old
 * default heads; eviction policy inside REFORM (H2O vs StreamingLLM vs TOVA, src/engine/eviction.ts); embedding type
 * per head kind (q, k, v and o, the attention output); budget; chunk / capacity. The worst heads and the MNR by kind come from a selection
 * run (scripts/select-heads.ts, its own synthetic samples).
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseFlags, runCli, valueFlags } from "../src/cli/args.ts";
import { selectionFor, type SmoothingOp } from "../src/engine/selection.ts";
import { loadHeads } from "../src/model/heads.ts";
import { HEAD_KINDS, type HeadSpec } from "../src/model/types.ts";
import { mulberry32 } from "../src/util/rng.ts";
import {
  allHeads,
  type EvictionPolicy,
  embedTables,
  gathers,
  type HeadTables,
  headKey,
  type Lab,
  openLab,
  scoreHeads,
  tokenSpan,
} from "../scripts/heads-lab.ts";
import { FAMILIES, type HeadResult, selectHeads } from "../scripts/select-heads.ts";
import { type HaystackSource, haystackSource, SampleMaker, type Task } from "./ruler-tasks.ts";

export interface EvalSample {
  task: Task;
  ids: Int32Array;
  q: Int32Array;
  /** the token spans of every value the question asks for */
  spans: [number, number][];
}

/** Held-out samples: `n` per task, needles at spread depths, seeds far from every other bench's and the selector's. */
export function heldOutSamples(
  lab: Lab,
  tasks: Task[],
  n: number,
  tokens: number,
  seed = 1,
  source: HaystackSource = haystackSource("prose"),
): EvalSample[] {
  const count = (s: string) => lab.tok.encode(s).length;
  const out: EvalSample[] = [];
  for (const task of tasks) {
    for (let i = 0; i < n; i++) {
      const s = new SampleMaker(900_000 + seed * 10_007 + i * 31 + tasks.indexOf(task), count, source).make(
        task,
        tokens,
        0.05 + (0.9 * i) / Math.max(1, n - 1),
      );
      const ids = Int32Array.from(lab.tok.encodeText(s.text));
      // each asked value: its first occurrence from its needle's start
      const spans = s.expected.map((v, k) => {
        const a = s.text.indexOf(v, Math.floor(s.depths[k]! * s.text.length));
        return tokenSpan(lab.tok, s.text, ids, a, a + v.length);
      });
      out.push({ task, ids, q: Int32Array.from(lab.tok.encode(s.question)), spans });
    }
  }
  return out;
}

export interface Setting {
  heads: number[];
  budget: number;
  window: number;
  edge: number;
  op: SmoothingOp;
}

/** Share of samples (tables) of which `setting` gathers every asked value. */
export function gatheredRate(tables: HeadTables[], spans: [number, number][][], s: Setting): number {
  let hit = 0;
  tables.forEach((t, i) => {
    const scores = scoreHeads(t, s.heads);
    if (spans[i]!.every((sp) => gathers(scores, sp, s))) hit++;
  });
  return hit / Math.max(1, tables.length);
}

const pct = (x: number) => `${(100 * x).toFixed(1)}`;

function main(argv: string[]): void {
  const { values } = parseFlags(
    argv,
    valueFlags("model", "heads", "samples", "tokens", "tasks", "random", "seed", "only", "threads", "json", "window"),
  );
  const modelDir = values.model ?? join(import.meta.dir, "..", "models", "reform-tiny");
  // without --heads: the model's reform_heads.json (the selected heads it ships), else the server's default heads
  const headsSpec = values.heads ?? null;
  const N = Number(values.samples ?? 12);
  const tokens = Number(values.tokens ?? 16000);
  const tasks = (values.tasks ?? "single,multikey").split(",") as Task[];
  const nRandom = Number(values.random ?? 20);
  const seed = Number(values.seed ?? 1);
  const only = new Set((values.only ?? "heads,window,eviction,kind,budget,chunk").split(","));
  const threads = values.threads ? Number(values.threads) : undefined;
  const lab = openLab(modelDir, { backend: "cpu", threads });
  const out: Record<string, unknown> = {};
  const lines: string[] = [];
  const say = (x = "") => {
    lines.push(x);
    console.log(x);
  };
  try {
    const d = lab.defaults;
    const cands = allHeads(lab.mc);
    const idxOf = (hs: HeadSpec[]) => hs.map((h) => cands.findIndex((c) => headKey(c) === headKey(h)));
    const hf = loadHeads(modelDir, lab.mc, headsSpec);
    const selected = idxOf(hf.heads);
    const op0: SmoothingOp = hf.smoothing ?? "mean";
    const oldDefault = idxOf([1, 1, 1].map((l, i) => ({ layer: l, kind: (["q", "k", "v"] as const)[i]!, head: 0 })));
    const samples = heldOutSamples(lab, tasks, N, tokens, seed);
    const spans = samples.map((s) => s.spans);
    const t0 = performance.now();
    const compress = (chunk: number, capacity: number, policy: EvictionPolicy) =>
      samples.map((s) => embedTables(lab, s.ids, s.q, cands, { chunk, capacity, policy }));
    const base = compress(d.chunkSize, d.capacity, "h2o");
    // --window: the smoothing window at the default budget (scales with the budget as the server's does)
    const d0 = values.window ? { ...d, window: Number(values.window) } : hf.window ? { ...d, window: hf.window } : d;
    const at = (budget: number) => ({ budget, ...selectionFor(d0, budget) });
    const def = at(d.budget);
    console.error(`compressed ${samples.length} samples in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    say(
      `${samples.length} held-out samples (${tasks.join(", ")}; ${N} each) of ~${tokens} tokens; chunk ${d.chunkSize}, ` +
        `capacity ${d.capacity}, budget ${d.budget}, window ${def.window}, edge ${def.edge}; selected heads ` +
        `${hf.heads.map(headKey).join(", ")} (${op0})`,
    );
    let ranking: HeadResult[] | null = null;
    const needRanking = only.has("heads") || only.has("kind");
    if (needRanking) ranking = selectHeads({ modelDir, backend: "cpu", threads, log: () => {} }).ranking;

    if (only.has("window")) {
      const windows = [5, 9, 17, 33, 65, 129, 257];
      const paper = ["18.4", "28.9", "39.4", "67.1", "70.7", "84.6", "84.3"];
      const rows = (["mean", "max"] as const).map((op) =>
        windows.map((w) => gatheredRate(base, spans, { heads: selected, ...def, window: w, op })),
      );
      out.window = { windows, mean: rows[0], max: rows[1] };
      say("");
      say(`| smoothing window | ${windows.join(" | ")} |`);
      say(`| --- |${windows.map(() => " --- |").join("")}`);
      say(`| paper (RULER 300K, %) | ${paper.join(" | ")} |`);
      say(`| ours, mean (gathered %) | ${rows[0]!.map(pct).join(" | ")} |`);
      say(`| ours, max (gathered %) | ${rows[1]!.map(pct).join(" | ")} |`);
    }

    if (only.has("heads") && ranking) {
      const rnd = mulberry32(seed * 7 + 3);
      const draws: number[][] = [];
      for (let r = 0; r < nRandom; r++) {
        const pool = cands.map((_, i) => i);
        const pickK: number[] = [];
        while (pickK.length < selected.length) pickK.push(pool.splice(Math.floor(rnd() * pool.length), 1)[0]!);
        draws.push(pickK);
      }
      // the worst: the last `per family` of each family's MNR ranking, as the selection picks the first
      const worst: HeadResult[] = [];
      for (const f of FAMILIES) {
        const byF = ranking.filter((h) => !worst.includes(h)).sort((a, b) => b.mnr[f] - a.mnr[f]);
        worst.push(...byF.slice(0, selected.length / 2));
      }
      const both = (heads: number[][]) =>
        (["mean", "max"] as const).map(
          (op) => heads.reduce((p, hs) => p + gatheredRate(base, spans, { heads: hs, ...def, op }), 0) / heads.length,
        );
      const rows: [string, string, number[]][] = [
        [`selected (${hf.heads.map(headKey).join(", ")})`, "84.6", both([selected])],
        [`random (${selected.length} heads, mean of ${nRandom} draws)`, "80.3", both(draws)],
        [`worst by MNR (${worst.map(headKey).join(", ")})`, "44.7", both([idxOf(worst)])],
        ["old default (L1.q0, L1.k0, L1.v0)", "", both([oldDefault])],
      ];
      out.heads = rows;
      say("");
      say("| heads | paper (RULER 300K, %) | ours, mean (gathered %) | ours, max (gathered %) |");
      say("| --- | --- | --- | --- |");
      for (const [name, p, r] of rows) say(`| ${name} | ${p} | ${pct(r[0]!)} | ${pct(r[1]!)} |`);
    }

    if (only.has("eviction")) {
      const streaming = compress(d.chunkSize, d.capacity, "streaming");
      const tova = compress(d.chunkSize, d.capacity, "tova");
      const rate = (t: HeadTables[]) => pct(gatheredRate(t, spans, { heads: selected, ...def, op: op0 }));
      const rows: [string, string, string][] = [
        ["H2O (served)", "84.6", rate(base)],
        ["StreamingLLM (sinks + recent)", "82.7", rate(streaming)],
        ["TOVA (the chunk's last query, layer mean)", "81.4", rate(tova)],
      ];
      out.eviction = rows;
      say("");
      say("| eviction inside REFORM | paper (RULER 300K, %) | ours (gathered %) |");
      say("| --- | --- | --- |");
      for (const [a, b, c] of rows) say(`| ${a} | ${b} | ${c} |`);
    }

    if (only.has("kind") && ranking) {
      say("");
      say(
        "| head kind | MNR pattern (mean, best) | MNR paraphrase (mean, best) | gathered % single heads (mean, best) |",
      );
      say("| --- | --- | --- | --- |");
      const kinds: Record<string, unknown> = {};
      for (const kind of HEAD_KINDS) {
        const hs = ranking.filter((h) => h.kind === kind);
        const m = (f: (typeof FAMILIES)[number]) => hs.map((h) => h.mnr[f]);
        const g = hs.map((h) => gatheredRate(base, spans, { heads: idxOf([h]), ...def, op: op0 }));
        const mean = (x: number[]) => x.reduce((p, c) => p + c, 0) / x.length;
        kinds[kind] = { pattern: m("pattern"), paraphrase: m("paraphrase"), gathered: g };
        say(
          `| ${kind} (${hs.length} heads) | ${mean(m("pattern")).toFixed(3)}, ${Math.min(...m("pattern")).toFixed(3)} | ` +
            `${mean(m("paraphrase")).toFixed(3)}, ${Math.min(...m("paraphrase")).toFixed(3)} | ${pct(mean(g))}, ${pct(Math.max(...g))} |`,
        );
      }
      out.kind = kinds;
    }

    if (only.has("budget")) {
      const budgets = [64, 128, 192, 256, 320, 384, 448].filter((b) => b <= d.maxBudget);
      const rows = budgets.map((b) => gatheredRate(base, spans, { heads: selected, ...at(b), op: op0 }));
      out.budget = { budgets, rows };
      say("");
      say(`| budget | ${budgets.join(" | ")} |`);
      say(`| --- |${budgets.map(() => " --- |").join("")}`);
      say(`| gathered % | ${rows.map(pct).join(" | ")} |`);
    }

    if (only.has("chunk")) {
      const combos: [number, number][] = [
        [64, 256],
        [128, 128],
        [128, 256],
        [128, 384],
        [256, 256],
      ];
      say("");
      say("| chunk / capacity | gathered % (selected heads) | gathered % (old default) |");
      say("| --- | --- | --- |");
      const rows: unknown[] = [];
      for (const [chunk, capacity] of combos) {
        const t = chunk === d.chunkSize && capacity === d.capacity ? base : compress(chunk, capacity, "h2o");
        const a = gatheredRate(t, spans, { heads: selected, ...def, op: op0 });
        const b = gatheredRate(t, spans, { heads: oldDefault, ...def, op: op0 });
        rows.push({ chunk, capacity, selected: a, oldDefault: b });
        say(
          `| ${chunk} / ${capacity}${chunk === d.chunkSize && capacity === d.capacity ? " (served)" : ""} | ${pct(a)} | ${pct(b)} |`,
        );
      }
      out.chunk = rows;
    }
  } finally {
    lab.close();
  }
  if (values.json) writeFileSync(values.json, `${JSON.stringify({ ...out, markdown: lines }, null, 2)}\n`);
}

if (import.meta.main)
  await runCli("heads-ablation", "usage: bun bench/heads-ablation.ts [--samples N] [--tokens N] ...", () =>
    main(process.argv.slice(2)),
  );
