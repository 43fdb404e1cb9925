/**
 * scripts/select-heads.ts on the tiny fixture model: the paper's selection (two task families, every q/k/v/o head of
 * every layer, MNR, 2 per family) runs end to end on the CPU backend through the serving compressor and writes a
 * reform_heads.json that src/model/heads.ts accepts; the pieces it is built from (samples, MNR, pooling) hold.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { libraryPath } from "../ffi/native.ts";
import { meanNormalisedRank, tokenSpan } from "../scripts/heads-lab.ts";
import {
  buildSample,
  FAMILIES,
  type HeadResult,
  parseLayers,
  pickPerFamily,
  selectHeads,
  tokenizeSample,
} from "../scripts/select-heads.ts";
import { maxPool, smoothScores } from "../src/engine/selection.ts";
import { loadModelConfig } from "../src/model/config.ts";
import { loadHeads } from "../src/model/heads.ts";
import type { HeadSpec } from "../src/model/types.ts";
import { ModelTokenizer } from "../src/model/tokenizer.ts";
import { mulberry32 } from "../src/util/rng.ts";
import { makeTinyModel } from "./fixtures/tiny-model.ts";

const haveCpu = existsSync(libraryPath("cpu"));
let root: string;
let dir: string;

beforeAll(async () => {
  root = mkdtempSync(join(tmpdir(), "reform-select-heads-"));
  dir = await makeTinyModel(join(root, "tiny"), { reformHeads: null });
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

describe("select-heads", () => {
  test("parseLayers: every layer by default", () => {
    expect(parseLayers(undefined, 4)).toEqual([0, 1, 2, 3]);
    expect(parseLayers("all", 4)).toEqual([0, 1, 2, 3]);
    expect(parseLayers("1-2", 4)).toEqual([1, 2]);
    expect(parseLayers("3,1,1", 4)).toEqual([1, 3]);
    expect(() => parseLayers("4", 4)).toThrow(/out of range/);
    expect(() => parseLayers("x", 4)).toThrow(/cannot parse/);
  });

  test("pickPerFamily keeps the best 2 of each family, without repeats", () => {
    const h = (layer: number, pattern: number, paraphrase: number): HeadResult => ({
      layer,
      kind: "q",
      head: 0,
      mnr: { pattern, paraphrase },
      mean: (pattern + paraphrase) / 2,
    });
    const a = h(0, 0.01, 0.3);
    const b = h(1, 0.02, 0.1);
    const c = h(2, 0.03, 0.2);
    const d = h(3, 0.5, 0.05);
    expect(pickPerFamily([a, b, c, d], 2)).toEqual([a, b, d, c]);
  });

  test("maxPool is the centered moving maximum; mean smoothing is unchanged", () => {
    const x = Float32Array.from([0, 3, 1, Number.NaN, 0, 5, 2]);
    expect(Array.from(maxPool(x, 3))).toEqual([3, 3, 3, 1, 5, 5, 5]);
    expect(Array.from(smoothScores(x, 1, "max"))).toEqual(Array.from(x)); // a window of 1 is the identity
    const y = Float32Array.from({ length: 50 }, (_, i) => Math.sin(i));
    const brute = Array.from(y, (_, i) => Math.max(...y.slice(Math.max(0, i - 4), i + 5)));
    expect(Array.from(smoothScores(y, 9, "max"))).toEqual(brute);
    expect(Array.from(smoothScores(y, 9))).toEqual(Array.from(smoothScores(y, 9, "mean")));
  });

  test("MNR: 0 for the top tokens, near 1 for the bottom", () => {
    const s = Float32Array.from([5, 4, 3, 2, 1]);
    expect(meanNormalisedRank(s, [0, 1])).toBe(0);
    expect(meanNormalisedRank(s, [4, 5])).toBe(1);
    expect(meanNormalisedRank(s, [0, 2])).toBe(0.125);
  });

  test("samples of both families are deterministic and the answer span decodes to the answer", () => {
    const tok = ModelTokenizer.fromDir(dir);
    const count = (x: string) => tok.encode(x).length;
    for (const family of FAMILIES) {
      const s1 = buildSample(family, 300, mulberry32(7), count);
      const s2 = buildSample(family, 300, mulberry32(7), count);
      expect(s1).toEqual(s2);
      expect(s1.text.slice(s1.at[0], s1.at[1])).toBe(s1.answer);
      const t = tokenizeSample(tok, s1);
      expect(t.ids.length).toBeGreaterThanOrEqual(300);
      expect(tok.decode(t.ids.subarray(t.span[0], t.span[1])).trim()).toBe(s1.answer);
      // the question does not repeat the answer
      expect(s1.question.includes(s1.answer)).toBe(false);
    }
    expect(buildSample("pattern", 100, mulberry32(1), count).question).toMatch(
      /^What is the value corresponding to the id [a-z0-9]{10}\?$/,
    );
    expect(() => tokenSpan(tok, "abc", [], 0, 1)).toThrow(/not found/);
  });

  test.skipIf(!haveCpu)("selects 2 + 2 heads on the tiny model and writes a loadable reform_heads.json", () => {
    const out = join(dir, "reform_heads.json");
    const lines: string[] = [];
    const opts = {
      modelDir: dir,
      samples: 2,
      contextTokens: 400,
      chunk: 64,
      capacity: 128,
      backend: "cpu" as const,
      smoothing: "max" as const,
    };
    const r = selectHeads({ ...opts, out, log: (x) => lines.push(x) });
    const cfg = loadModelConfig(dir).config;
    // every q, k, v and o (attention output: one per query head) head of every layer is a candidate
    expect(r.ranking.length).toBe(cfg.numLayers * (2 * cfg.numHeads + 2 * cfg.numKvHeads));
    expect(r.ranking.filter((h) => h.kind === "o").length).toBe(cfg.numLayers * cfg.numHeads);
    for (const h of r.ranking)
      for (const f of FAMILIES) {
        expect(h.mnr[f]).toBeGreaterThanOrEqual(0);
        expect(h.mnr[f]).toBeLessThanOrEqual(1);
      }
    for (let i = 1; i < r.ranking.length; i++) expect(r.ranking[i - 1]!.mean).toBeLessThanOrEqual(r.ranking[i]!.mean);
    expect(r.selected.length).toBe(4);
    expect(new Set(r.selected).size).toBe(4);
    // several times the capacity: the compressor evicted
    for (const n of r.contextTokens) expect(n).toBeGreaterThanOrEqual(3 * 128);
    expect(lines.some((l) => l.startsWith("selected:"))).toBe(true);

    // the file is what heads.ts reads, with the selection settings recorded and the query operator set
    const viaDir = loadHeads(dir, cfg);
    expect(viaDir.source).toBe(`file:${out}`);
    const want = r.selected.map((h) => ({ layer: h.layer, kind: h.kind, head: h.head }));
    expect(viaDir.heads).toEqual(want);
    expect(viaDir.smoothing).toBe("max");
    // selection settings are recorded, not applied: no top-level chunk/capacity/window overrides
    expect(viaDir.chunkSize).toBeUndefined();
    expect(viaDir.window).toBeUndefined();
    const j = JSON.parse(readFileSync(out, "utf8"));
    expect(j.selection).toMatchObject({
      chunk_size: 64,
      capacity: 128,
      eviction: "h2o",
      layers: "all",
      pooling: "max",
      pooling_window: 20,
    });

    // deterministic
    const again = selectHeads({ ...opts, out: null, log: () => {} });
    expect(again.ranking.map((h) => [h.layer, h.kind, h.head, h.mean])).toEqual(
      r.ranking.map((h) => [h.layer, h.kind, h.head, h.mean]),
    );

    // a layer restriction limits the candidates and is recorded in the file
    const out0 = join(dir, "heads-layer0.json");
    const only0 = selectHeads({ ...opts, layers: "0", out: out0, log: () => {} });
    expect(only0.ranking.length).toBe(2 * cfg.numHeads + 2 * cfg.numKvHeads);
    expect(only0.ranking.every((h) => h.layer === 0)).toBe(true);
    expect(JSON.parse(readFileSync(out0, "utf8")).selection.layers).toBe("0");
  });

  test("heads.ts: o heads (over the query heads) and the eviction policy", () => {
    const cfg = { numLayers: 2, numHeads: 4, numKvHeads: 1 };
    const o: HeadSpec = { layer: 1, kind: "o", head: 3 };
    const hf = loadHeads(dir, cfg, { heads: [o], eviction: "tova" });
    expect(hf.heads).toEqual([o]);
    expect(hf.eviction).toBe("tova");
    expect(loadHeads(dir, cfg, { heads: [o] }).eviction).toBeUndefined(); // the server's default: h2o
    expect(() => loadHeads(dir, cfg, { heads: [{ layer: 1, kind: "o", head: 4 }] })).toThrow(/out of range 0..3/);
    expect(() => loadHeads(dir, cfg, { heads: [{ layer: 1, kind: "x", head: 0 }] })).toThrow(/"q", "k", "v" or "o"/);
    expect(() => loadHeads(dir, cfg, { heads: [o], eviction: "lru" })).toThrow(
      /"eviction" must be "h2o", "streaming", "tova"/,
    );
  });

  test("heads.ts: smoothing must be mean or max", () => {
    const cfg = { numLayers: 2, numHeads: 2, numKvHeads: 1 };
    expect(loadHeads(dir, cfg, { heads: [{ layer: 0, kind: "q", head: 0 }], smoothing: "max" }).smoothing).toBe("max");
    expect(loadHeads(dir, cfg, { heads: [{ layer: 0, kind: "q", head: 0 }] }).smoothing).toBeUndefined();
    expect(() => loadHeads(dir, cfg, { heads: [{ layer: 0, kind: "q", head: 0 }], smoothing: "median" })).toThrow(
      /"smoothing" must be "mean" or "max"/,
    );
  });
});
