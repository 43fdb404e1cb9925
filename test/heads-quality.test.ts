/**
 * The embedded model's selected heads (its reform_heads.json, written by scripts/select-heads.ts) against random
 * heads, the worst heads and the old default (q0, k0, v0 of layer 1) under the file's smoothing, and against what the
 * server gathers without a heads file (src/model/heads.ts defaultHeads, mean over 33 tokens), on held-out samples
 * (bench/data through bench/ruler-tasks.ts, seeds no selection saw), measured by what the query path gathers: the
 * share of samples whose asked needle value is among the gathered tokens at the serving budget, window and edge.
 * Each context is compressed once through the serving compressor with every head (scripts/heads-lab.ts);
 * deterministic, a few seconds.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { gatheredRate, heldOutSamples } from "../bench/heads-ablation.ts";
import { libraryPath } from "../ffi/native.ts";
import { allHeads, embedTables, type HeadTables, headKey, type Lab, openLab } from "../scripts/heads-lab.ts";
import { selectionFor } from "../src/engine/selection.ts";
import { defaultHeads, loadHeads } from "../src/model/heads.ts";
import type { HeadSpec } from "../src/model/types.ts";
import { mulberry32 } from "../src/util/rng.ts";

const MODEL = join(import.meta.dir, "..", "models", "reform-tiny");
const HEADS = join(MODEL, "reform_heads.json");
const haveCpu = existsSync(libraryPath("cpu"));

describe.skipIf(!haveCpu)("selected heads on held-out samples", () => {
  let lab: Lab;
  let tables: HeadTables[];
  let spans: [number, number][][];
  let cands: HeadSpec[] = [];
  const idx = (hs: HeadSpec[]) => hs.map((h) => cands.findIndex((c) => headKey(c) === headKey(h)));

  beforeAll(() => {
    lab = openLab(MODEL, { backend: "cpu" });
    cands = allHeads(lab.mc);
    // 4K tokens: 16 contexts of 16x the capacity, compressed with every candidate head (q, k, v, o) in a few seconds
    const samples = heldOutSamples(lab, ["single", "multikey", "multivalue", "multiquery"], 4, 4000, 3);
    spans = samples.map((s) => s.spans);
    const d = lab.defaults;
    tables = samples.map((s) => embedTables(lab, s.ids, s.q, cands, { chunk: d.chunkSize, capacity: d.capacity }));
  }, 120_000);
  afterAll(() => lab?.close());

  test("the selected heads file gathers more than random or worst heads, no less than the old default heads or the server without a heads file", () => {
    const hf = loadHeads(MODEL, lab.mc, HEADS);
    const op = hf.smoothing ?? "mean";
    const d = lab.defaults; // the server's own defaults: window 33 without a heads file
    const at = { budget: d.budget, ...selectionFor({ ...d, window: hf.window ?? d.window }, d.budget) };
    const rate = (heads: number[], o = op) => gatheredRate(tables, spans, { heads, ...at, op: o });
    // what the server gathers without a heads file: the default heads, mean smoothing, window 33
    const before = gatheredRate(tables, spans, {
      heads: idx(defaultHeads(lab.mc)),
      budget: d.budget,
      ...selectionFor(d, d.budget),
      op: "mean",
    });
    const selected = rate(idx(hf.heads));
    const old = ["q", "k", "v"].map((kind) => ({ layer: 1, kind, head: 0 }) as HeadSpec);
    const rnd = mulberry32(5);
    let random = 0;
    const draws = 12;
    for (let r = 0; r < draws; r++) {
      const pool = cands.map((_, i) => i);
      const pick: number[] = [];
      while (pick.length < hf.heads.length) pick.push(pool.splice(Math.floor(rnd() * pool.length), 1)[0]!);
      random += rate(pick) / draws;
    }
    const worst = rate(
      idx(["q3", "q1", "k1", "q0"].map((k) => ({ layer: 0, kind: k[0], head: Number(k[1]) }) as HeadSpec)),
    );
    console.log(
      `gathered: selected ${selected}, random ${random.toFixed(3)}, worst ${worst}, old default ${rate(idx(old))} ` +
        `(${op}, window ${at.window}), without a heads file ${before} (default heads, mean, window ${selectionFor(d, d.budget).window})`,
    );
    expect(selected).toBeGreaterThan(random);
    expect(selected).toBeGreaterThan(worst);
    expect(selected).toBeGreaterThanOrEqual(rate(idx(old)));
    // since the default window became 0.15 x budget (then 0.1 x: 33 here) the server without a heads file gathers as much as this file
    expect(selected).toBeGreaterThanOrEqual(before);
  });
});
