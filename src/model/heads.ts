/**
 * REFORM head selection.
 *
 * The compressor embeds every context token with the vectors of a few attention heads (q, k or v
 * projections of chosen heads at chosen layers, before RoPE, or o: a query head's attention output, before o_proj;
 * L2-normalised). At query time each context token is scored by the max cosine similarity with the query tokens'
 * vectors, so the heads chosen should be ones whose vectors *retrieve*: the same fact phrased in the question and in
 * the context should map to similar vectors.
 *
 * Where the heads come from (first match wins):
 *   1. `--heads` on the CLI: a path to a JSON file or an inline JSON string;
 *   2. `reform_heads.json` next to the model weights;
 *   3. the default heuristic below.
 * File format:
 *   {"heads": [{"layer": 13, "kind": "q", "head": 0}, {"layer": 13, "kind": "k", "head": 0}, ...],
 *    "smoothing": "max", "eviction": "h2o",
 *    "chunk_size": 1024, "capacity": 4096, "n_sink": 4, "obs_window": 128, "window": 129, "lag": 16,
 *    "selection": {...}}   (all but heads optional)
 * `kind` is "q", "k", "v" or "o" (the attention output); `head` indexes that kind's heads:
 * 0..num_attention_heads-1 for q and o, 0..num_key_value_heads-1 for k/v.
 * `smoothing` is how a token's score is pooled over the smoothing window at query time: "mean" (the default) or
 * "max"; either runs natively in one call (rf_score_select; src/engine/selection.ts is the reference).
 * `eviction` is how the upload compressor's full cache evicts: "h2o" (the default), "streaming" or "tova"
 * (src/engine/eviction.ts); another policy stores another cache, so contexts stored under one are refused under
 * another (the fingerprint). `chunk_size`, `capacity`, `n_sink`, `obs_window`, `window` and `lag` (how far the
 * smoothing window trails each token) override the serving defaults; `selection` is a record of how the heads were chosen (scripts/select-heads.ts writes the chunk, capacity,
 * eviction, pooling operator and window it selected under, and the heads' MNR) and is not read.
 *
 * How to choose heads (for a new model): `bun scripts/select-heads.ts --model DIR --out DIR/reform_heads.json`, the
 * REFORM paper's procedure: two task families (key-value pattern matching; a question that leads to a fact in
 * other words), contexts several times the compressor's capacity through the serving compressor (chunk, capacity,
 * H2O), every q/k/v/o head of every layer a candidate, cosine max over the question pooled over 20 tokens, ranked by
 * the mean normalised rank of the answer tokens, the best 2 of each family kept. `bun bench/heads-ablation.ts`
 * then measures the heads (selected / random / worst), the smoothing window and operator, eviction, budget and
 * chunk / capacity on held-out samples (README, "Head selection"). Mind the exit layer: the compressor runs layers
 * 0..max(layer of the selected heads), so heads at lower layers make compression cheaper (an o head at the exit layer
 * also runs that layer's attention and keeps its cache).
 * Default heuristic (no file): layer = round(0.45 * (num_layers - 1)) (clamped), heads q0, k0, v0 —
 * head 0 of kv group 0 and its first query head. A reasonable untuned starting point.
 */
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { EVICTION_POLICIES, type EvictionPolicy } from "../engine/eviction.ts";
import { SMOOTHING_OPS, type SmoothingOp } from "../engine/selection.ts";
import { HEAD_KINDS, type HeadSpec, type ModelConfig } from "./types.ts";

export interface HeadsFile {
  heads: HeadSpec[];
  chunkSize?: number;
  capacity?: number;
  nSink?: number;
  obsWindow?: number;
  window?: number;
  /** how far the smoothing window trails each token (selection.ts smoothScores; 0 = centered) */
  lag?: number;
  /** how scores are pooled over the smoothing window at query time (default mean) */
  smoothing?: SmoothingOp;
  /** how the upload compressor evicts (default h2o) */
  eviction?: EvictionPolicy;
  source: string; // "cli" | "file:<path>" | "default"
}

export class HeadsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "HeadsError";
  }
}

export function defaultHeads(cfg: Pick<ModelConfig, "numLayers">): HeadSpec[] {
  const layer = Math.max(0, Math.min(cfg.numLayers - 1, Math.round(0.45 * (cfg.numLayers - 1))));
  return [
    { layer, kind: "q", head: 0 },
    { layer, kind: "k", head: 0 },
    { layer, kind: "v", head: 0 },
  ];
}

function optInt(j: any, keys: string[], where: string, min = 1): number | undefined {
  for (const k of keys) {
    const v = j[k];
    if (v === undefined || v === null) continue;
    if (typeof v !== "number" || !Number.isInteger(v) || v < min)
      throw new HeadsError(`${where}: "${k}" must be ${min > 0 ? "a positive" : "a non-negative"} integer`);
    return v;
  }
  return undefined;
}

/** Parse and validate a heads JSON object against the model. */
export function parseHeads(
  j: any,
  cfg: Pick<ModelConfig, "numLayers" | "numHeads" | "numKvHeads">,
  source: string,
): HeadsFile {
  const where = `heads (${source})`;
  if (Array.isArray(j)) j = { heads: j };
  if (!j || typeof j !== "object" || !Array.isArray(j.heads) || j.heads.length === 0) {
    throw new HeadsError(
      `${where}: expected {"heads": [{"layer": L, "kind": "q|k|v|o", "head": H}, ...]} with at least one head`,
    );
  }
  const seen = new Set<string>();
  const heads: HeadSpec[] = j.heads.map((h: any, i: number) => {
    if (!h || typeof h !== "object") throw new HeadsError(`${where}: heads[${i}] is not an object`);
    const { layer, kind, head } = h;
    if (!Number.isInteger(layer) || layer < 0 || layer >= cfg.numLayers) {
      throw new HeadsError(`${where}: heads[${i}].layer ${JSON.stringify(layer)} out of range 0..${cfg.numLayers - 1}`);
    }
    if (!HEAD_KINDS.includes(kind)) throw new HeadsError(`${where}: heads[${i}].kind must be "q", "k", "v" or "o"`);
    const max = kind === "q" || kind === "o" ? cfg.numHeads : cfg.numKvHeads;
    if (!Number.isInteger(head) || head < 0 || head >= max) {
      throw new HeadsError(
        `${where}: heads[${i}].head ${JSON.stringify(head)} out of range 0..${max - 1} for kind "${kind}"`,
      );
    }
    const key = `${layer}/${kind}/${head}`;
    if (seen.has(key)) throw new HeadsError(`${where}: duplicate head ${key}`);
    seen.add(key);
    return { layer, kind, head } as HeadSpec;
  });
  const smoothing = j.smoothing ?? undefined;
  if (smoothing !== undefined && !SMOOTHING_OPS.includes(smoothing))
    throw new HeadsError(`${where}: "smoothing" must be ${SMOOTHING_OPS.map((o) => `"${o}"`).join(" or ")}`);
  const eviction = j.eviction ?? undefined;
  if (eviction !== undefined && !EVICTION_POLICIES.includes(eviction))
    throw new HeadsError(`${where}: "eviction" must be ${EVICTION_POLICIES.map((o) => `"${o}"`).join(", ")}`);
  return {
    heads,
    ...(smoothing ? { smoothing } : {}),
    ...(eviction ? { eviction } : {}),
    chunkSize: optInt(j, ["chunk_size", "chunkSize"], where),
    capacity: optInt(j, ["capacity"], where),
    nSink: optInt(j, ["n_sink", "nSink"], where),
    obsWindow: optInt(j, ["obs_window", "obsWindow"], where),
    window: optInt(j, ["window", "smoothing_window"], where),
    lag: optInt(j, ["lag", "smoothing_lag"], where, 0),
    source,
  };
}

/**
 * Resolve heads: `spec` (CLI: file path or inline JSON), else `<modelDir>/reform_heads.json`, else
 * the default heuristic.
 */
export function loadHeads(
  modelDir: string,
  cfg: Pick<ModelConfig, "numLayers" | "numHeads" | "numKvHeads">,
  spec?: string | object | null,
): HeadsFile {
  if (spec != null && spec !== "") {
    if (typeof spec === "object") return parseHeads(spec, cfg, "cli");
    const s = spec.trim();
    if (s.startsWith("{") || s.startsWith("[")) {
      let j: any;
      try {
        j = JSON.parse(s);
      } catch (e) {
        throw new HeadsError(`heads (cli): invalid JSON (${(e as Error).message})`);
      }
      return parseHeads(j, cfg, "cli");
    }
    if (!existsSync(s)) throw new HeadsError(`heads file ${s} not found`);
    return parseHeads(readJsonFile(s), cfg, `file:${s}`);
  }
  const p = join(modelDir, "reform_heads.json");
  if (existsSync(p)) return parseHeads(readJsonFile(p), cfg, `file:${p}`);
  return { heads: defaultHeads(cfg), source: "default" };
}

function readJsonFile(p: string): any {
  try {
    return JSON.parse(readFileSync(p, "utf8"));
  } catch (e) {
    throw new HeadsError(`heads file ${p}: invalid JSON (${(e as Error).message})`);
  }
}
