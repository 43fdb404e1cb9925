#!/usr/bin/env bun
/**
 * The question tokens' background (src/engine/background.ts), ablated: held-out RULER-style samples (bench/ruler-tasks.ts,
 * the same held-out draw as bench/heads-ablation.ts) compressed through the server's own compressor with the model's
 * selected heads (scripts/heads-lab.ts embedRows: the rows the server writes to emb.bin), then gathered as a query
 * gathers them — the native rf_score_kth / rf_score_select with each background's offsets, then the score floor and the
 * sentence completion (selection.ts refineSelection) — for each background: off (the paper's scoring), mean, and the
 * k-th best match for several K, of the question's tokens alone (kth) and with its adjacent pairs (kth-pairs). "Gathered" is the share of samples of which every asked value (the quote task: the
 * whole sentence) is among the gathered tokens, independent of whether the model then answers. The question is embedded
 * as its own text (the served path embeds it inside the chat template's turn and scores with its own tokens' rows).
 *
 *   bun bench/background-ablation.ts [--model DIR] [--haystack prose|license|code|log] [--tokens 16000]
 *       [--samples 12] [--tasks quote,single,multikey,multivalue,multiquery] [--k 4,16,32,64] [--seed 1] [--json OUT]
 *
 * Prints a markdown table (backgrounds x tasks); figures only.
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseFlags, runCli, valueFlags } from "../src/cli/args.ts";
import {
  addNormalisedRows,
  adjacentPairs,
  BACKGROUND_K,
  backgroundOffsets,
  kthQuery,
  type ScoreBackground,
  type ScoreQuery,
  scoresPairs,
  usesKth,
} from "../src/engine/background.ts";
import { refineSelection, selectionFor, sentenceEnds, wordContinuations } from "../src/engine/selection.ts";
import { loadHeads } from "../src/model/heads.ts";
import { embedRows, openLab } from "../scripts/heads-lab.ts";
import { heldOutSamples } from "./heads-ablation.ts";
import { HAYSTACKS, type Haystack, haystackSource, type Task } from "./ruler-tasks.ts";

function main(argv: string[]): void {
  const { values } = parseFlags(
    argv,
    valueFlags("model", "haystack", "tokens", "samples", "tasks", "k", "seed", "json"),
  );
  const modelDir = values.model ?? join(import.meta.dir, "..", "models", "reform-tiny");
  const haystack = (values.haystack ?? "prose") as Haystack;
  if (!HAYSTACKS.includes(haystack)) throw new Error(`--haystack: one of ${HAYSTACKS.join(", ")}`);
  const tokens = Number(values.tokens ?? 16000);
  const N = Number(values.samples ?? 12);
  const tasks = (
    values.tasks ?? (haystack === "prose" ? "quote," : "") + "single,multikey,multivalue,multiquery"
  ).split(",") as Task[];
  const ks = (values.k ?? `4,16,${BACKGROUND_K},64`).split(",").map(Number);
  const lab = openLab(modelDir, { backend: "cpu" });
  try {
    const d = lab.defaults;
    const hf = loadHeads(modelDir, lab.mc, null);
    const sel = selectionFor(d, d.budget);
    const op = hf.smoothing ?? "mean";
    const ends = sentenceEnds(lab.mc.vocabSize, (id) => lab.tok.tokenBytes(id));
    const words = wordContinuations(lab.mc.vocabSize, (id) => lab.tok.tokenBytes(id), lab.tok.specialIds);
    const samples = heldOutSamples(lab, tasks, N, tokens, Number(values.seed ?? 1), haystackSource(haystack));
    const settings: [string, ScoreBackground, number][] = [
      ["off (the paper's scoring)", "off", 0],
      ["mean", "mean", 0],
      ...ks.map((k): [string, ScoreBackground, number] => [`kth, K = ${k}`, "kth", k]),
      ...ks.map((k): [string, ScoreBackground, number] => [
        `kth-pairs, K = ${k}${k === BACKGROUND_K ? " (served)" : ""}`,
        "kth-pairs",
        k,
      ]),
    ];
    const hits = settings.map(() => new Map<Task, number>());
    const t0 = performance.now();
    for (const s of samples) {
      const { ctx, q, E } = embedRows(lab, s.ids, s.q, hf.heads, { chunk: d.chunkSize, capacity: d.capacity });
      const n = s.ids.length;
      const nq = s.q.length;
      const rowSum = { sum: new Float64Array(E), rows: n };
      addNormalisedRows(rowSum.sum, ctx, n, E);
      settings.forEach(([, bg, k], v) => {
        let query: ScoreQuery = { q, nq, offsets: bg === "mean" ? backgroundOffsets(rowSum, q, nq, E) : undefined };
        if (usesKth(bg)) {
          const pairs = scoresPairs(bg)
            ? adjacentPairs(
                [Array.from(s.q)],
                () => true,
                (id) => words[id] === 1,
              )
            : undefined;
          query = kthQuery(q, nq, E, lab.native.scoreKth(ctx, n, E, q, nq, k, pairs), pairs);
        }
        const scores = new Float32Array(n);
        const what = { window: sel.window, lag: sel.lag, budget: d.budget - sel.tail, edge: sel.edge, pool: op };
        const picked = lab.native.scoreSelect(
          ctx,
          n,
          E,
          query.q,
          query.nq,
          { ...what, offsets: query.offsets, pairs: query.pairs, pairOffsets: query.pairOffsets },
          scores,
        );
        const taken = new Set(refineSelection(picked, scores, s.ids, ends, { ...sel, op, floor: d.scoreFloor }));
        const ok = s.spans.every(([a, b]) => {
          for (let t = a; t < b; t++) if (!taken.has(t)) return false;
          return true;
        });
        if (ok) hits[v]!.set(s.task, (hits[v]!.get(s.task) ?? 0) + 1);
      });
    }
    console.error(`${samples.length} samples in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    const pct = (x: number) => ((100 * x) / N).toFixed(1);
    const lines = [
      `${samples.length} held-out samples (${haystack}, ~${tokens} tokens, ${N} per task); budget ${d.budget}, window ` +
        `${sel.window}, score floor ${d.scoreFloor}, sentence tail ${sel.tail}; gathered %`,
      "",
      `| background | ${tasks.join(" | ")} |`,
      `| --- |${tasks.map(() => " --- |").join("")}`,
      ...settings.map(([name], v) => `| ${name} | ${tasks.map((t) => pct(hits[v]!.get(t) ?? 0)).join(" | ")} |`),
    ];
    for (const l of lines) console.log(l);
    if (values.json) {
      const rows = settings.map(([name], v) => ({ name, gathered: Object.fromEntries(hits[v]!) }));
      writeFileSync(values.json, `${JSON.stringify({ haystack, tokens, samples: N, tasks, rows }, null, 2)}\n`);
    }
  } finally {
    lab.close();
  }
}

if (import.meta.main)
  await runCli("background-ablation", "usage: bun bench/background-ablation.ts [--haystack H] [--tokens N] ...", () =>
    main(process.argv.slice(2)),
  );
