/**
 * Choosing the default smoothing window by measurement (src/engine/load.ts LIMIT_RATIOS, README "Choosing the
 * defaults"): held-out needle samples (bench/ruler-tasks.ts over bench/data, needles at spread depths) at several
 * context lengths, each compressed once through the server's own compressor (scripts/heads-lab.ts) with the heads the
 * server uses for this model, then what the query path gathers at the default budget for each smoothing window:
 * the count of samples of which every asked needle value is among the gathered tokens (what `return_selection`
 * shows), per task; once with the paper's gathering (the whole budget by score) and once as served (the sentence tail
 * kept back, the score floor, the passages' sentences completed: selection.ts refineSelection). Gathering only: whether the
 * model then answers is bench/ruler.ts's job.
 *
 *   bun bench/window-sweep.ts [--model DIR] [--heads FILE_OR_JSON] [--lengths 16k,128k,1m] [--samples 6]
 *       [--windows 33,49,65,81,129] [--lags 0,16] [--op mean|max] [--tasks single,multikey,multivalue,multiquery]
 *       [--seed 7]
 * --lags: how far the smoothing window trails each token (default 0, the paper's centered window, and the served
 * lag); a lag beyond half a window is skipped.
 *
 * Memory: one float per context token, head and question token (1M tokens x 3 heads x ~15 ≈ 180 MiB per sample).
 */
import { join } from "node:path";
import { intFlag, parseFlags, runCli, valueFlags } from "../src/cli/args.ts";
import {
  edgeFor,
  maxLag,
  refineSelection,
  type SmoothingOp,
  selectionFor,
  selectTokens,
  sentenceEnds,
  smoothScores,
} from "../src/engine/selection.ts";
import { loadHeads } from "../src/model/heads.ts";
import { embedTables, headKey, openLab, scoreHeads } from "../scripts/heads-lab.ts";
import { parseLength } from "./common.ts";
import { heldOutSamples } from "./heads-ablation.ts";
import type { Task } from "./ruler-tasks.ts";

function main(argv: string[]): void {
  const { values } = parseFlags(
    argv,
    valueFlags("model", "heads", "lengths", "samples", "windows", "lags", "op", "tasks", "seed"),
  );
  const modelDir = values.model ?? join(import.meta.dir, "..", "models", "reform-tiny");
  const lengths = (values.lengths ?? "16k,128k,1m").split(",").map(parseLength);
  const n = intFlag("samples", values.samples, 1) ?? 6;
  const windows = (values.windows ?? "33,49,65,81,129").split(",").map(Number);
  const op = (values.op ?? "mean") as SmoothingOp;
  const tasks = (values.tasks ?? "single,multikey,multivalue,multiquery").split(",") as Task[];
  const seed = intFlag("seed", values.seed, 0) ?? 7;
  const lab = openLab(modelDir, { backend: "cpu" });
  try {
    const d = lab.defaults;
    const hf = loadHeads(modelDir, lab.mc, values.heads);
    const heads = hf.heads.map((_, i) => i);
    const edge = edgeFor(d.budget, d.edge);
    const served = selectionFor(d, d.budget).tail;
    const tails = served > 0 ? [0, served] : [0];
    const ends = sentenceEnds(lab.tok.vocabSize, (id) => lab.tok.tokenBytes(id));
    console.log(
      `model ${modelDir} (max_model_len ${d.maxModelLen}); heads ${hf.heads.map(headKey).join(", ")} ` +
        `(${hf.source}); chunk ${d.chunkSize}, capacity ${d.capacity}, budget ${d.budget}, edge ${edge}, ${op} ` +
        `pooling; ${n} held-out samples per task (${tasks.join(", ")}), seed ${seed}; gathered = every asked value ` +
        "among the gathered tokens",
    );
    const lags = values.lags ? values.lags.split(",").map(Number) : [...new Set([0, hf.lag ?? d.lag])];
    if (lags.some((x) => !Number.isInteger(x) || x < 0))
      throw new Error(`--lags: whole numbers >= 0, got ${values.lags}`);
    // one row per setting (tail, lag, window), one column per context length
    // a lag beyond half a window is not a setting
    const cols = tails.flatMap((t) =>
      lags.flatMap((lag) =>
        windows.filter((w) => lag <= maxLag(w)).map((w) => ({ t, w, lag, floor: t > 0 ? d.scoreFloor : 0 })),
      ),
    );
    const cells: string[][] = cols.map(() => []);
    for (const length of lengths) {
      const t0 = performance.now();
      const samples = heldOutSamples(lab, tasks, n, length, seed);
      const hit = cols.map(() => new Map<Task, number>());
      for (const s of samples) {
        // one sample at a time: the cosine table of a 1M-token context is the memory this bench needs
        const table = embedTables(lab, s.ids, s.q, hf.heads, { chunk: d.chunkSize, capacity: d.capacity });
        const raw = scoreHeads(table, heads);
        cols.forEach(({ w, t: tail, lag, floor }, k) => {
          const idx = selectTokens(smoothScores(raw, w, op, lag), d.budget - tail, edge);
          const kept = new Set(refineSelection(idx, raw, s.ids, ends, { window: w, op, lag, edge, tail, floor }));
          const all = s.spans.every(([a, b]) => {
            for (let t = a; t < b; t++) if (!kept.has(t)) return false;
            return true;
          });
          if (all) hit[k]!.set(s.task, (hit[k]!.get(s.task) ?? 0) + 1);
        });
      }
      hit.forEach((m, k) => {
        const total = [...m.values()].reduce((a, b) => a + b, 0);
        cells[k]!.push(`${total}/${samples.length} (${tasks.map((t) => m.get(t) ?? 0).join("/")})`);
      });
      console.error(`[window-sweep] ${length} tokens: ${((performance.now() - t0) / 1000).toFixed(0)} s`);
    }
    const fmtLen = (x: number) => (x >= 1048576 ? `${x / 1048576}M` : `${Math.round(x / 1024)}K`);
    console.log(`\n| window | lag | tail | floor | ${lengths.map(fmtLen).join(" | ")} |`);
    console.log(`| --- | --- | --- | --- | ${lengths.map(() => "---").join(" | ")} |`);
    cols.forEach((c, k) => {
      console.log(`| ${c.w} | ${c.lag} | ${c.t} | ${c.floor} | ${cells[k]!.join(" | ")} |`);
    });
    console.log(
      `\n(per task in parentheses: ${tasks.join(" / ")}; lag: how far the window trails each token; tail: tokens of ` +
        "the budget that complete the passages' sentences, and floor: the score floor, both as served)",
    );
  } finally {
    lab.close();
  }
}

if (import.meta.main)
  await runCli(
    "window-sweep",
    "usage: bun bench/window-sweep.ts [--lengths 16k,128k,1m] [--samples N] [--windows ...]",
    () => main(process.argv.slice(2)),
  );
