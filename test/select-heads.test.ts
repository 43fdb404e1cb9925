/**
 * scripts/select-heads.ts on the tiny fixture model: runs end to end on the CPU backend and writes a
 * reform_heads.json that src/model/heads.ts accepts.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { libraryPath } from "../ffi/native.ts";
import { loadModelConfig } from "../src/model/config.ts";
import { loadHeads } from "../src/model/heads.ts";
import { ModelTokenizer } from "../src/model/tokenizer.ts";
import { buildSample, parseLayers, pickTop, selectHeads, type HeadResult } from "../scripts/select-heads.ts";
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
  test("parseLayers", () => {
    expect(parseLayers("all", 4)).toEqual([0, 1, 2, 3]);
    expect(parseLayers("1-2", 4)).toEqual([1, 2]);
    expect(parseLayers("3,1,1", 4)).toEqual([1, 3]);
    expect(parseLayers(undefined, 33)).toEqual([8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]);
    expect(() => parseLayers("4", 4)).toThrow(/out of range/);
    expect(() => parseLayers("x", 4)).toThrow(/cannot parse/);
  });

  test("pickTop prefers one layer on near-ties", () => {
    const h = (layer: number, kind: "q" | "k" | "v", head: number, recall: number): HeadResult => ({
      layer,
      kind,
      head,
      recall,
      bestRank: 1,
      recalls: [],
      ranks: [],
    });
    const ranking = [h(5, "q", 0, 0.9), h(7, "k", 0, 0.89), h(5, "k", 0, 0.885), h(9, "v", 0, 0.5), h(5, "v", 1, 0.2)];
    const top = pickTop(ranking, 3).map((x) => `${x.layer}${x.kind}`);
    expect(top).toEqual(["5q", "5k", "7k"]);
  });

  test("samples are deterministic and the needle span decodes to the needle", () => {
    const tok = ModelTokenizer.fromDir(dir);
    const mk = () => {
      let a = 7;
      return () => (a = (a * 16807) % 2147483647) / 2147483647;
    };
    const s1 = buildSample(tok, 150, mk());
    const s2 = buildSample(tok, 150, mk());
    expect(Array.from(s1.tokens)).toEqual(Array.from(s2.tokens));
    expect(s1.tokens.length).toBeGreaterThanOrEqual(150);
    const needle = tok.decode(s1.tokens.subarray(s1.needle[0], s1.needle[1]));
    expect(needle.trim()).toBe(`The secret passphrase for ${s1.name} is ${s1.word}.`);
    expect(tok.decode(s1.question)).toBe(`What is the secret passphrase for ${s1.name}?`);
  });

  test.skipIf(!haveCpu)("selects heads on the tiny model and writes a loadable reform_heads.json", () => {
    const out = join(dir, "reform_heads.json");
    const lines: string[] = [];
    const r = selectHeads({
      modelDir: dir,
      layers: "all",
      samples: 2,
      contextTokens: 160,
      budget: 24,
      window: 9,
      chunk: 64,
      capacity: 256,
      top: 3,
      backend: "cpu",
      out,
      log: (s) => lines.push(s),
    });
    const cfg = loadModelConfig(dir).config;
    // every q/k/v head of both layers, ranked
    expect(r.candidates.length).toBe(cfg.numLayers * (cfg.numHeads + 2 * cfg.numKvHeads));
    expect(r.ranking.length).toBe(r.candidates.length);
    expect(r.exitLayer).toBe(cfg.numLayers - 1);
    for (const h of r.ranking) {
      expect(h.recalls.length).toBe(2);
      expect(h.recall).toBeGreaterThanOrEqual(0);
      expect(h.recall).toBeLessThanOrEqual(1);
      expect(h.bestRank).toBeGreaterThanOrEqual(1);
    }
    for (let i = 1; i < r.ranking.length; i++)
      expect(r.ranking[i - 1]!.recall).toBeGreaterThanOrEqual(r.ranking[i]!.recall);
    expect(r.selected.length).toBe(3);
    expect(lines.some((l) => l.startsWith("selected:"))).toBe(true);

    // the file is what heads.ts reads: via --heads path and as <model>/reform_heads.json
    const viaPath = loadHeads(dir, cfg, out);
    const viaDir = loadHeads(dir, cfg);
    expect(viaDir.source).toBe(`file:${out}`);
    const want = r.selected.map((h) => ({ layer: h.layer, kind: h.kind, head: h.head }));
    expect(viaPath.heads).toEqual(want);
    expect(viaDir.heads).toEqual(want);
    expect(JSON.parse(readFileSync(out, "utf8")).heads).toEqual(want);

    // deterministic
    const again = selectHeads({
      modelDir: dir,
      layers: "all",
      samples: 2,
      contextTokens: 160,
      budget: 24,
      window: 9,
      chunk: 64,
      capacity: 256,
      backend: "cpu",
      out: null,
      log: () => {},
    });
    expect(again.ranking.map((h) => [h.layer, h.kind, h.head, h.recall])).toEqual(
      r.ranking.map((h) => [h.layer, h.kind, h.head, h.recall]),
    );
  });
});
