/**
 * Choose REFORM retrieval heads for a model as the REFORM paper does (see the header of src/model/heads.ts).
 *
 *   bun scripts/select-heads.ts --model DIR [--samples N] [--context-tokens N] [--pool max|mean] [--pool-window W]
 *       [--per-family K] [--chunk N] [--capacity N] [--eviction h2o|streaming|tova] [--layers all|1-2|0,3]
 *       [--kinds q,k,v,o]
 *       [--smoothing mean|max] [--window W] [--seed S] [--threads N] [--out DIR/reform_heads.json] [--backend cpu|cuda]
 *
 * Two task families of synthetic samples (their own generator and seeds, never the held-out text of bench/data that
 * the evaluations use):
 *   pattern     lines "The value corresponding to the id {key} is {value}." (random 10-character keys) among
 *               natural-language filler; the question asks one key's value;
 *   paraphrase  facts about people ("Amelia Hart was born in the town of Kelmoor.") among the same filler; the
 *               question leads to one fact without repeating it ("Which town is the birthplace of Amelia Hart?"),
 *               so a head must match meaning, not the same words (the paper's multi-hop-like family).
 * Each sample is several times longer than the compressor's capacity (default 8x) and goes through the server's own
 * compressor at the serving chunk and capacity with H2O eviction (scripts/heads-lab.ts), so heads are judged on what
 * the server really stores. Every q, k, v and o (attention output) head of every layer is a candidate: each context
 * token's score is its
 * cosine with the question's tokens, max over them, pooled over a window (default the paper's 20 tokens, centered:
 * 21, max pooling); a head's quality is the mean normalised rank (MNR: 0 = the best token, 1 = the worst) of the
 * answer's tokens, averaged over the samples of a family. The best `--per-family` (2) heads of each family are kept.
 *
 * With --out it writes reform_heads.json: the heads, the query-time smoothing operator (`smoothing`, default mean)
 * and, with --window, the query-time smoothing window (both chosen by measurement: bench/heads-ablation.ts) and,
 * under "selection", the settings the heads were selected under and their MNR. The top-level chunk_size / capacity
 * keys are not written: those would override the serving defaults.
 */
import { mkdirSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";
import { intFlag, oneOf, parseFlags, runCli, UsageError, valueFlags } from "../src/cli/args.ts";
import { EVICTION_POLICIES, type EvictionPolicy } from "../src/engine/eviction.ts";
import { smoothScores, type SmoothingOp } from "../src/engine/selection.ts";
import { parseHeads } from "../src/model/heads.ts";
import type { ModelTokenizer } from "../src/model/tokenizer.ts";
import { HEAD_KINDS, type HeadKind, type HeadSpec } from "../src/model/types.ts";
import { mulberry32 } from "../src/util/rng.ts";
import { allHeads, embedTables, headKey, meanNormalisedRank, openLab, scoreHeads, tokenSpan } from "./heads-lab.ts";

export const FAMILIES = ["pattern", "paraphrase"] as const;
export type Family = (typeof FAMILIES)[number];

export interface SelectHeadsOptions {
  modelDir: string;
  /** "all" (default), "1-2", "0,3" or a list */
  layers?: string | number[];
  kinds?: HeadKind[];
  /** samples per family, default 24 */
  samples?: number;
  /** context tokens per sample, default 8 x capacity */
  contextTokens?: number;
  /** heads kept per family, default 2 */
  perFamily?: number;
  pool?: SmoothingOp; // default max
  poolWindow?: number; // default 20 (centered: 21)
  chunk?: number; // default: the serving chunk
  capacity?: number; // default: the serving capacity
  eviction?: EvictionPolicy; // default h2o
  /** query-time smoothing operator written to the file, default mean */
  smoothing?: SmoothingOp;
  /** query-time smoothing window (at the default budget) written to the file; default: none (the server's) */
  window?: number;
  seed?: number; // default 1
  backend?: "cpu" | "cuda" | "auto";
  threads?: number;
  out?: string | null;
  log?: (line: string) => void;
}

export interface HeadResult extends HeadSpec {
  /** MNR per family (mean over its samples) and their mean */
  mnr: Record<Family, number>;
  mean: number;
}

export interface SelectHeadsResult {
  /** every candidate, best mean MNR first */
  ranking: HeadResult[];
  selected: HeadResult[];
  chunk: number;
  capacity: number;
  contextTokens: number[];
  json: any;
  out: string | null;
  seconds: number;
}

// ---------------- deterministic synthetic data ----------------

const NAMES = [
  "Amelia Hart",
  "Bruno Castell",
  "Chiara Voss",
  "Dmitri Olen",
  "Esther Quill",
  "Farid Nasser",
  "Greta Lindqvist",
  "Hiro Tanabe",
  "Ines Mourao",
  "Jonah Whitlock",
  "Kaveh Rostami",
  "Lena Fairbairn",
  "Mateo Ibarra",
  "Nadia Petrenko",
  "Oskar Brandt",
  "Priya Raman",
  "Quentin Lobel",
  "Rosa Delacroix",
  "Stellan Moor",
  "Tamsin Reyes",
  "Ulrich Becker",
  "Valeria Costa",
  "Wen Zhao",
  "Ximena Duarte",
  "Yusuf Demir",
  "Zofia Kowal",
];
const WORDS = [
  "marmalade",
  "thunderbolt",
  "juniper",
  "saxophone",
  "labyrinth",
  "quicksilver",
  "pinecone",
  "avalanche",
  "origami",
  "kaleidoscope",
  "lighthouse",
  "cinnamon",
  "meteorite",
  "harmonica",
  "tangerine",
  "glacier",
  "porcupine",
  "velvet",
  "zeppelin",
  "chrysanthemum",
  "obsidian",
  "pumpernickel",
  "nightingale",
  "boomerang",
];
const SUBJECTS = [
  "The old farmer",
  "A quiet student",
  "The city council",
  "My neighbour",
  "The travelling merchant",
  "A young engineer",
  "The museum guide",
  "Our teacher",
  "The ship's captain",
  "A curious child",
  "The baker down the street",
  "The committee",
];
const VERBS = [
  "walked slowly toward",
  "wrote a long letter about",
  "could not stop thinking about",
  "painted a picture of",
  "argued for hours about",
  "carefully repaired",
  "quietly observed",
  "told a strange story about",
  "forgot all about",
  "spent the afternoon near",
  "made careful notes on",
  "decided to visit",
];
const OBJECTS = [
  "the river",
  "the northern hills",
  "an abandoned train station",
  "the village market",
  "the winter festival",
  "a broken clock",
  "the library on the corner",
  "the harbour at dawn",
  "a field of sunflowers",
  "the new bridge",
  "the mountain road",
  "an old photograph",
];
const TAILS = [
  "",
  " before the rain started",
  " while the bells rang",
  " without saying a word",
  " after a long day",
  " in the early morning",
  " as the sun went down",
  " for the third time that week",
  " with great enthusiasm",
];

function pick<T>(rnd: () => number, a: readonly T[]): T {
  return a[Math.floor(rnd() * a.length)]!;
}

function fillerSentence(rnd: () => number): string {
  return `${pick(rnd, SUBJECTS)} ${pick(rnd, VERBS)} ${pick(rnd, OBJECTS)}${pick(rnd, TAILS)}.`;
}

const KEY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789";
const key10 = (rnd: () => number) => Array.from({ length: 10 }, () => KEY_CHARS[Math.floor(rnd() * 36)]).join("");
const TOWNS = ["Kelmoor", "Brastow", "Ulvenby", "Marrowick", "Tessaly", "Dunharrow", "Peloran", "Ostrava", "Quenby"];
const JOBS = ["carpenter", "pharmacist", "surveyor", "librarian", "beekeeper", "glassblower", "locksmith", "tailor"];
const COLOURS = ["crimson", "turquoise", "amber", "violet", "olive", "scarlet", "indigo", "ochre", "teal"];
/** [fact with {n} the name and {v} the value, a question that leads to it in other words, values] */
const RELATIONS: [string, string, readonly string[]][] = [
  ["{n} was born in the town of {v}.", "Which town is the birthplace of {n}?", TOWNS],
  ["{n} keeps a small dog called {v}.", "What is the name of the pet that {n} owns?", WORDS],
  ["{n} earns a living as a {v}.", "What job does {n} do?", JOBS],
  ["The favourite colour of {n} is {v}.", "Which colour does {n} like best?", COLOURS],
];

export interface Sample {
  family: Family;
  text: string;
  question: string;
  answer: string;
  /** character range of the answer in the text */
  at: [number, number];
}

/** One sample of `family` with about `contextTokens` tokens: 4 facts (one asked) at random depths in the filler. */
export function buildSample(
  family: Family,
  contextTokens: number,
  rnd: () => number,
  countTokens: (s: string) => number,
): Sample {
  const facts: [string, string][] = []; // [sentence, value]
  let question = "";
  const names = new Set<string>();
  while (names.size < 4) names.add(family === "pattern" ? key10(rnd) : pick(rnd, NAMES));
  for (const name of names) {
    if (family === "pattern") {
      const v = rnd() < 0.7 ? String(1_000_000 + Math.floor(rnd() * 9_000_000)) : pick(rnd, WORDS);
      facts.push([`The value corresponding to the id ${name} is ${v}.`, v]);
      if (!question) question = `What is the value corresponding to the id ${name}?`;
    } else {
      const [fact, q, values] = pick(rnd, RELATIONS);
      const v = pick(rnd, values);
      facts.push([fact.replace("{n}", name).replace("{v}", v), v]);
      if (!question) question = q.replace("{n}", name);
    }
  }
  const filler: string[] = [];
  let n = facts.reduce((k, [f]) => k + countTokens(` ${f}`), 0);
  while (n < contextTokens) {
    const s = fillerSentence(rnd);
    filler.push(s);
    n += countTokens(` ${s}`);
  }
  const slots = facts.map(() => Math.floor(rnd() * (filler.length + 1)));
  const parts: string[] = [];
  let len = 0;
  let at: [number, number] = [0, 0];
  for (let i = 0; i <= filler.length; i++) {
    facts.forEach(([f, v], k) => {
      if (slots[k] !== i) return;
      if (k === 0) {
        const a = len + f.lastIndexOf(v);
        at = [a, a + v.length];
      }
      parts.push(f);
      len += f.length + 1;
    });
    if (i < filler.length) {
      parts.push(filler[i]!);
      len += filler[i]!.length + 1;
    }
  }
  return { family, text: parts.join(" "), question, answer: facts[0]![1], at };
}

/** A sample as token ids, with the answer's token span. */
export function tokenizeSample(
  tok: ModelTokenizer,
  s: Sample,
): { ids: Int32Array; q: Int32Array; span: [number, number] } {
  const ids = Int32Array.from(tok.encodeText(s.text));
  return { ids, q: Int32Array.from(tok.encode(s.question)), span: tokenSpan(tok, s.text, ids, s.at[0], s.at[1]) };
}

// ---------------- selection ----------------

export function parseLayers(spec: string | number[] | undefined, numLayers: number): number[] {
  let out: number[];
  if (Array.isArray(spec)) out = spec.slice();
  else if (spec === undefined || spec === "" || spec.trim() === "all") {
    out = Array.from({ length: numLayers }, (_, i) => i);
  } else {
    out = [];
    for (const part of spec
      .split(",")
      .map((x) => x.trim())
      .filter(Boolean)) {
      const m = /^(\d+)(?:-(\d+))?$/.exec(part);
      if (!m) throw new Error(`--layers: cannot parse "${part}" (use "all", "8-16" or "3,5,7")`);
      const a = Number(m[1]);
      const b = m[2] === undefined ? a : Number(m[2]);
      for (let l = Math.min(a, b); l <= Math.max(a, b); l++) out.push(l);
    }
  }
  out = [...new Set(out)].sort((a, b) => a - b);
  if (out.length === 0) throw new Error("--layers: no layers selected");
  for (const l of out)
    if (!Number.isInteger(l) || l < 0 || l >= numLayers)
      throw new Error(`--layers: layer ${l} out of range 0..${numLayers - 1}`);
  return out;
}

/** The best `k` heads of each family by its MNR (lower is better), the first family first; a head already kept
 * for an earlier family is passed over. */
export function pickPerFamily(ranking: HeadResult[], k: number): HeadResult[] {
  const chosen: HeadResult[] = [];
  for (const f of FAMILIES) {
    const byF = ranking.filter((h) => !chosen.includes(h)).sort((a, b) => a.mnr[f] - b.mnr[f] || a.mean - b.mean);
    chosen.push(...byF.slice(0, k));
  }
  return chosen;
}

export function selectHeads(o: SelectHeadsOptions): SelectHeadsResult {
  const t0 = performance.now();
  const log = o.log ?? ((x: string) => console.log(x));
  const lab = openLab(o.modelDir, { backend: o.backend, threads: o.threads });
  try {
    const mc = lab.mc;
    const layers = new Set(parseLayers(o.layers, mc.numLayers));
    const kinds = new Set(o.kinds ?? HEAD_KINDS);
    const candidates = allHeads(mc).filter((h) => layers.has(h.layer) && kinds.has(h.kind));
    const chunk = o.chunk ?? lab.defaults.chunkSize;
    const capacity = o.capacity ?? lab.defaults.capacity;
    const eviction = o.eviction ?? "h2o";
    const pool = o.pool ?? "max";
    const poolWindow = o.poolWindow ?? 20;
    const samplesN = o.samples ?? 24;
    const ctxTarget = o.contextTokens ?? 8 * capacity;
    const perFamily = o.perFamily ?? 2;
    const seed = o.seed ?? 1;
    log(
      `model ${o.modelDir}: ${mc.numLayers} layers, ${mc.numHeads} q / ${mc.numKvHeads} kv heads, head_dim ${mc.headDim}; ` +
        `${candidates.length} candidates; ${samplesN} samples per family of ~${ctxTarget} tokens through the compressor ` +
        `(chunk ${chunk}, capacity ${capacity}, ${eviction}); ${pool} pooling over ${poolWindow} tokens; MNR of the answer`,
    );
    const count = (x: string) => lab.tok.encode(x).length;
    const mnr = FAMILIES.map(() => candidates.map(() => [] as number[]));
    const lengths: number[] = [];
    FAMILIES.forEach((family, fi) => {
      const rnd = mulberry32(seed * 1_000_003 + fi * 7919);
      for (let si = 0; si < samplesN; si++) {
        const { ids, q, span } = tokenizeSample(lab.tok, buildSample(family, ctxTarget, rnd, count));
        lengths.push(ids.length);
        const t = embedTables(lab, ids, q, candidates, { chunk, capacity, policy: eviction });
        candidates.forEach((_, h) => {
          const pooled = smoothScores(scoreHeads(t, [h]), poolWindow, pool);
          mnr[fi]![h]!.push(meanNormalisedRank(pooled, span));
        });
      }
      log(`${family}: ${samplesN} samples, ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    });
    const avg = (x: number[]) => x.reduce((p, c) => p + c, 0) / Math.max(1, x.length);
    const ranking: HeadResult[] = candidates.map((c, h) => {
      const m = { pattern: avg(mnr[0]![h]!), paraphrase: avg(mnr[1]![h]!) };
      return { ...c, mnr: m, mean: (m.pattern + m.paraphrase) / 2 };
    });
    ranking.sort((a, b) => a.mean - b.mean || a.layer - b.layer);
    const selected = pickPerFamily(ranking, perFamily);
    log("");
    log("rank  head      MNR pattern  MNR paraphrase  mean");
    ranking.forEach((h, i) => {
      log(
        `${String(i + 1).padStart(4)}  ${headKey(h).padEnd(8)}  ${h.mnr.pattern.toFixed(4).padStart(11)}  ` +
          `${h.mnr.paraphrase.toFixed(4).padStart(14)}  ${h.mean.toFixed(4)}${selected.includes(h) ? " *" : ""}`,
      );
    });
    log(`selected: ${selected.map(headKey).join(", ")}`);
    const r4 = (x: number) => Number(x.toFixed(4));
    const json = {
      heads: selected.map((h) => ({ layer: h.layer, kind: h.kind, head: h.head })),
      smoothing: o.smoothing ?? "mean",
      ...(o.window ? { window: o.window } : {}),
      selection: {
        tool: "scripts/select-heads.ts",
        families: [...FAMILIES],
        per_family: perFamily,
        samples_per_family: samplesN,
        context_tokens: ctxTarget,
        chunk_size: chunk,
        capacity,
        eviction,
        // the candidate layers, as given (a restriction changes what "best" means; the file should say so)
        layers: o.layers === undefined ? "all" : Array.isArray(o.layers) ? o.layers.join(",") : o.layers,
        pooling: pool,
        pooling_window: poolWindow,
        score: "cosine, max over the question tokens",
        rank: "mean normalised rank of the answer tokens (0 best)",
        seed,
        mnr: selected.map((h) => ({ head: headKey(h), pattern: r4(h.mnr.pattern), paraphrase: r4(h.mnr.paraphrase) })),
      },
    };
    parseHeads(json, mc, "select-heads"); // validate before writing
    let out: string | null = null;
    if (o.out) {
      mkdirSync(dirname(o.out), { recursive: true });
      writeFileSync(o.out, `${JSON.stringify(json, null, 2)}\n`);
      out = o.out;
      log(`wrote ${o.out}`);
    }
    const seconds = (performance.now() - t0) / 1000;
    log(`done in ${seconds.toFixed(1)} s`);
    return { ranking, selected, chunk, capacity, contextTokens: lengths, json, out, seconds };
  } finally {
    lab.close();
  }
}

// ---------------- CLI ----------------

const USAGE =
  "usage: bun scripts/select-heads.ts --model DIR [--samples N] [--context-tokens N] [--pool max|mean] [--pool-window W]\n" +
  "         [--per-family K] [--chunk N] [--capacity N] [--eviction h2o|streaming|tova] [--layers all|1-2|0,3]\n" +
  "         [--kinds q,k,v,o] [--smoothing mean|max] [--window W] [--seed S] [--threads N] [--out DIR/reform_heads.json] [--backend cpu|cuda (env REFORM_BACKEND)]";

function main(argv: string[]): void {
  const { values } = parseFlags(
    argv,
    valueFlags(
      "model",
      "layers",
      "kinds",
      "samples",
      "context-tokens",
      "per-family",
      "pool",
      "pool-window",
      "chunk",
      "capacity",
      "eviction",
      "smoothing",
      "window",
      "seed",
      "threads",
      "out",
      "backend",
    ),
  );
  if (values.help) {
    console.log(USAGE);
    return;
  }
  if (!values.model) throw new UsageError("--model is required");
  let kinds: HeadKind[] | undefined;
  if (values.kinds !== undefined) {
    kinds = values.kinds
      .split(",")
      .map((x) => x.trim())
      .filter(Boolean) as HeadKind[];
    for (const k of kinds)
      if (!HEAD_KINDS.includes(k)) throw new UsageError(`--kinds: unknown kind "${k}" (${HEAD_KINDS.join(", ")})`);
    if (kinds.length === 0) throw new UsageError("--kinds: empty");
  }
  const positive = (name: string, v: string | undefined) => intFlag(name, v, 1);
  selectHeads({
    modelDir: values.model,
    layers: values.layers,
    kinds,
    samples: positive("samples", values.samples),
    contextTokens: positive("context-tokens", values["context-tokens"]),
    perFamily: positive("per-family", values["per-family"]),
    pool: values.pool === undefined ? undefined : oneOf("pool", values.pool, ["mean", "max"]),
    poolWindow: positive("pool-window", values["pool-window"]),
    chunk: positive("chunk", values.chunk),
    capacity: positive("capacity", values.capacity),
    eviction: values.eviction === undefined ? undefined : oneOf("eviction", values.eviction, EVICTION_POLICIES),
    smoothing: values.smoothing === undefined ? undefined : oneOf("smoothing", values.smoothing, ["mean", "max"]),
    window: positive("window", values.window),
    seed: intFlag("seed", values.seed, Number.MIN_SAFE_INTEGER),
    threads: positive("threads", values.threads),
    out: values.out ?? null,
    backend: oneOf("backend", values.backend ?? (process.env.REFORM_BACKEND || undefined), ["auto", "cpu", "cuda"]),
  });
}

if (import.meta.main) await runCli("select-heads", USAGE, () => main(process.argv.slice(2)));
