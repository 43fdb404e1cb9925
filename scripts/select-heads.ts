/**
 * Choose REFORM retrieval heads for a model (see the header of src/model/heads.ts).
 *
 *   bun scripts/select-heads.ts --model DIR [--layers 8-16 | all | 3,5,7] [--kinds q,k,v] [--samples N]
 *       [--context-tokens N] [--top K] [--budget N] [--window W] [--chunk N] [--capacity N] [--seed S]
 *       [--threads N] [--out DIR/reform_heads.json] [--backend cpu|cuda]
 *
 * Builds N deterministic needle-in-a-haystack samples (varied filler sentences, a needle
 * "The secret passphrase for <name> is <word>." at a random depth, the question
 * "What is the secret passphrase for <name>?"), runs ONE compressor holding every candidate head
 * (all heads of the requested kinds at the candidate layers; exit layer = max candidate layer) over
 * each context in chunks, embeds the question with rf_compressor_embed, and for each head separately
 * scores the context tokens (max cosine over question tokens on that head's slice of the embedding),
 * smooths them with the engine's smoothScores and measures
 *   recall   = fraction of the needle's tokens among the top-`budget` smoothed scores,
 *   bestRank = 1-based rank of the best-ranked needle token.
 * Prints a ranking table and, with --out, writes the best --top heads in the reform_heads.json format
 * (greedy: best head first; later picks prefer a head from an already chosen layer when its mean
 * recall is within 0.02 of the best remaining head's).
 *
 * Memory: the context embeddings of all candidate heads are kept as f32 for one sample at a time:
 * context_tokens * n_candidates * head_dim * 4 bytes (e.g. 4096 tok * 432 heads * 128 * 4 = 0.9 GB).
 */
import { writeFileSync, mkdirSync } from "node:fs";
import { dirname } from "node:path";
import { loadNative, RF_F32, type Native, type NativeModel } from "../ffi/native.ts";
import type { HeadSpec } from "../src/model/types.ts";
import { DEFAULT_WINDOW, smoothScores } from "../src/engine/selection.ts";
import { loadModelConfig } from "../src/model/config.ts";
import { parseHeads } from "../src/model/heads.ts";
import { loadSafetensors } from "../src/model/safetensors.ts";
import { intFlag, oneOf, parseFlags, runCli, UsageError, valueFlags } from "../src/cli/args.ts";
import { ModelTokenizer } from "../src/model/tokenizer.ts";
import { mulberry32 } from "../src/util/rng.ts";

export interface SelectHeadsOptions {
  modelDir: string;
  /** "all", "8-16", "3,5,7" or a list; default: round(0.25*(L-1))..round(0.6*(L-1)). */
  layers?: string | number[];
  kinds?: ("q" | "k" | "v")[];
  samples?: number; // default 8
  contextTokens?: number; // default 2048
  top?: number; // default 3
  budget?: number; // default max(16, floor(contextTokens / 8))
  window?: number; // smoothing window, default DEFAULT_WINDOW (129), clamped to the context length
  chunk?: number; // compressor chunk size, default min(1024, contextTokens)
  capacity?: number; // compressor KV capacity, default 4096
  seed?: number; // default 1
  backend?: "cpu" | "cuda" | "auto";
  threads?: number;
  out?: string | null;
  /** progress / table output; default console.log. */
  log?: (line: string) => void;
}

export interface HeadResult extends HeadSpec {
  recall: number; // mean over samples
  bestRank: number; // mean over samples of the 1-based rank of the best needle token
  recalls: number[];
  ranks: number[];
}

export interface SelectHeadsResult {
  ranking: HeadResult[]; // best first
  selected: HeadResult[];
  candidates: HeadSpec[];
  exitLayer: number;
  budget: number;
  window: number;
  contextTokens: number[]; // actual context length per sample
  needleSpans: [number, number][]; // [start, end) per sample
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

export interface Sample {
  tokens: Int32Array;
  needle: [number, number]; // token span [start, end)
  question: Int32Array;
  name: string;
  word: string;
}

/** One needle-in-a-haystack sample of about `contextTokens` tokens (context tokens carry no BOS, as in sessions). */
export function buildSample(tok: ModelTokenizer, contextTokens: number, rnd: () => number): Sample {
  const name = pick(rnd, NAMES);
  const word = pick(rnd, WORDS);
  const needleText = `The secret passphrase for ${name} is ${word}.`;
  const needleIds = tok.encodeContinuation(" " + needleText);
  const target = Math.max(contextTokens - needleIds.length, 1);
  const sentences: number[][] = [];
  let n = 0;
  while (n < target) {
    const s = tok.encodeContinuation(" " + fillerSentence(rnd));
    if (s.length === 0) break;
    sentences.push(s);
    n += s.length;
  }
  // needle before sentence `at`: a random depth, away from the very start/end when there is room
  const at =
    sentences.length >= 2 ? 1 + Math.floor(rnd() * (sentences.length - 1)) : Math.floor(rnd() * (sentences.length + 1));
  const ids: number[] = [];
  let needle: [number, number] = [0, 0];
  for (let i = 0; i <= sentences.length; i++) {
    if (i === at) {
      needle = [ids.length, ids.length + needleIds.length];
      ids.push(...needleIds);
    }
    if (i < sentences.length) ids.push(...sentences[i]!);
  }
  const question = tok.encode(`What is the secret passphrase for ${name}?`);
  return { tokens: Int32Array.from(ids), needle, question: Int32Array.from(question), name, word };
}

// ---------------- helpers ----------------

export function parseLayers(spec: string | number[] | undefined, numLayers: number): number[] {
  let out: number[];
  if (Array.isArray(spec)) out = spec.slice();
  else if (spec === undefined || spec === "") {
    const lo = Math.round(0.25 * (numLayers - 1));
    const hi = Math.round(0.6 * (numLayers - 1));
    out = [];
    for (let l = lo; l <= hi; l++) out.push(l);
  } else if (spec.trim() === "all") {
    out = Array.from({ length: numLayers }, (_, i) => i);
  } else {
    out = [];
    for (const part of spec
      .split(",")
      .map((s) => s.trim())
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
  for (const l of out) {
    if (!Number.isInteger(l) || l < 0 || l >= numLayers)
      throw new Error(`--layers: layer ${l} out of range 0..${numLayers - 1}`);
  }
  return out;
}

/** Greedy top-K: best head first; then prefer a head from an already chosen layer when it is within `tie` of the best remaining. */
export function pickTop(ranking: HeadResult[], k: number, tie = 0.02): HeadResult[] {
  const rest = ranking.slice();
  const chosen: HeadResult[] = [];
  while (chosen.length < k && rest.length > 0) {
    let idx = 0;
    if (chosen.length > 0) {
      const layers = new Set(chosen.map((h) => h.layer));
      const best = rest[0]!.recall;
      const j = rest.findIndex((h) => h.recall >= best - tie && layers.has(h.layer));
      if (j >= 0) idx = j;
    }
    chosen.push(rest.splice(idx, 1)[0]!);
  }
  return chosen;
}

const headKey = (h: HeadSpec) => `L${h.layer}.${h.kind}${h.head}`;

// ---------------- core ----------------

export function selectHeads(o: SelectHeadsOptions): SelectHeadsResult {
  const t0 = performance.now();
  const log = o.log ?? ((s: string) => console.log(s));
  const lc = loadModelConfig(o.modelDir);
  const mc = lc.config;
  const tok = ModelTokenizer.fromDir(o.modelDir);
  const layers = parseLayers(o.layers, mc.numLayers);
  const kinds = o.kinds ?? ["q", "k", "v"];
  const samplesN = o.samples ?? 8;
  const ctxTarget = o.contextTokens ?? 2048;
  const budget = o.budget ?? Math.max(16, Math.floor(ctxTarget / 8));
  const top = o.top ?? 3;
  const seed = o.seed ?? 1;

  const candidates: HeadSpec[] = [];
  for (const layer of layers) {
    for (const kind of kinds) {
      const n = kind === "q" ? mc.numHeads : mc.numKvHeads;
      for (let head = 0; head < n; head++) candidates.push({ layer, kind, head });
    }
  }
  const D = mc.headDim;
  const nCand = candidates.length;
  log(
    `model ${o.modelDir}: ${lc.architecture}, ${mc.numLayers} layers, ${mc.numHeads} q / ${mc.numKvHeads} kv heads, head_dim ${D}; ` +
      `${nCand} candidate heads at layers ${layers[0]}..${layers[layers.length - 1]} (${kinds.join(",")})`,
  );

  // samples (deterministic)
  const rnd = mulberry32(seed);
  const samples: Sample[] = [];
  for (let i = 0; i < samplesN; i++) samples.push(buildSample(tok, ctxTarget, rnd));
  const maxCtx = Math.max(...samples.map((s) => s.tokens.length));
  const maxQ = Math.max(...samples.map((s) => s.question.length));
  if (budget >= Math.min(...samples.map((s) => s.tokens.length))) {
    log(`warning: budget ${budget} >= context length: every recall will be 1`);
  }
  const window = Math.max(1, Math.min(o.window ?? DEFAULT_WINDOW, maxCtx));
  const chunk = Math.max(1, Math.min(o.chunk ?? 1024, maxCtx));
  const obsWindow = Math.min(128, chunk);
  const capacity = o.capacity ?? 4096;
  const nSink = 4;
  const nRecent = Math.max(1, Math.min(obsWindow, Math.floor(capacity / 4)));
  log(
    `${samplesN} samples, ~${maxCtx} context tokens, budget ${budget}, window ${window}, chunk ${chunk}, capacity ${capacity}; ` +
      `embeddings ${((maxCtx * nCand * D * 4) / 2 ** 20).toFixed(1)} MiB per sample`,
  );

  const native: Native = loadNative(o.backend ?? "auto");
  let model: NativeModel | null = null;
  const recalls: number[][] = candidates.map(() => []);
  const ranks: number[][] = candidates.map(() => []);
  let exitLayer = -1;
  try {
    if (o.threads) native.setThreads(o.threads);
    model = native.createModel(mc);
    loadSafetensors(o.modelDir, model);
    model.finalize();
    log(
      `loaded on ${native.backendName()} (${native.deviceInfo()}) in ${((performance.now() - t0) / 1000).toFixed(1)} s`,
    );
    const comp = model.createCompressor(
      { capacity, nSink, nRecent, obsWindow, maxChunk: Math.max(chunk, maxQ), embDtype: RF_F32, exitLayer: -1 },
      candidates,
    );
    exitLayer = comp.exitLayer;
    const E = comp.embedDim; // nCand * D
    try {
      for (let si = 0; si < samples.length; si++) {
        const s = samples[si]!;
        const n = s.tokens.length;
        comp.reset();
        const emb = new Float32Array(n * E);
        for (let p = 0; p < n; p += chunk) {
          const c = s.tokens.subarray(p, Math.min(n, p + chunk));
          comp.process(c, emb.subarray(p * E, (p + c.length) * E));
        }
        const qe = comp.embed(s.question) as Float32Array;
        const nQ = s.question.length;
        const ctxH = new Float32Array(n * D);
        const qH = new Float32Array(nQ * D);
        const scores = new Float32Array(n);
        const order = new Int32Array(n);
        const [a, b] = s.needle;
        for (let h = 0; h < nCand; h++) {
          const off = h * D;
          for (let i = 0; i < n; i++) ctxH.set(emb.subarray(i * E + off, i * E + off + D), i * D);
          for (let j = 0; j < nQ; j++) qH.set(qe.subarray(j * E + off, j * E + off + D), j * D);
          native.score(ctxH, n, D, qH, nQ, scores);
          const sm = smoothScores(scores, window);
          for (let i = 0; i < n; i++) order[i] = i;
          order.sort((x, y) => sm[y]! - sm[x]! || x - y);
          let hit = 0;
          let best = n;
          for (let r = 0; r < n; r++) {
            const i = order[r]!;
            if (i >= a && i < b) {
              if (r < best) best = r;
              if (r < budget) hit++;
            }
          }
          recalls[h]!.push(b > a ? hit / (b - a) : 0);
          ranks[h]!.push(best + 1);
        }
        log(
          `sample ${si + 1}/${samples.length}: ${n} tokens, needle at ${a}..${b} (${s.name} -> ${s.word}), ` +
            `${((performance.now() - t0) / 1000).toFixed(1)} s`,
        );
      }
    } finally {
      comp.destroy();
    }
  } finally {
    model?.destroy();
    native.close();
  }

  const mean = (x: number[]) => x.reduce((p, c) => p + c, 0) / Math.max(1, x.length);
  const ranking: HeadResult[] = candidates.map((c, i) => ({
    ...c,
    recall: mean(recalls[i]!),
    bestRank: mean(ranks[i]!),
    recalls: recalls[i]!,
    ranks: ranks[i]!,
  }));
  ranking.sort((x, y) => y.recall - x.recall || x.bestRank - y.bestRank || x.layer - y.layer);
  const selected = pickTop(ranking, top);

  log("");
  log(`rank  head        recall@${budget}  best-rank`);
  ranking.forEach((h, i) => {
    const mark = selected.includes(h) ? " *" : "";
    log(
      `${String(i + 1).padStart(4)}  ${headKey(h).padEnd(10)}  ${h.recall.toFixed(3).padStart(9)}  ${h.bestRank.toFixed(1).padStart(9)}${mark}`,
    );
  });
  log(`selected: ${selected.map(headKey).join(", ")}`);

  let out: string | null = null;
  if (o.out) {
    const json = {
      heads: selected.map((h) => ({ layer: h.layer, kind: h.kind, head: h.head })),
      selection: {
        tool: "scripts/select-heads.ts",
        samples: samplesN,
        context_tokens: ctxTarget,
        budget,
        window,
        seed,
        recall: selected.map((h) => Number(h.recall.toFixed(4))),
        best_rank: selected.map((h) => Number(h.bestRank.toFixed(2))),
      },
    };
    parseHeads(json, mc, "select-heads"); // validate before writing
    mkdirSync(dirname(o.out), { recursive: true });
    const headLines = json.heads.map((h) => `    ${JSON.stringify(h)}`).join(",\n");
    writeFileSync(o.out, `{\n  "heads": [\n${headLines}\n  ],\n  "selection": ${JSON.stringify(json.selection)}\n}\n`);
    out = o.out;
    log(`wrote ${o.out}`);
  }
  const seconds = (performance.now() - t0) / 1000;
  log(`done in ${seconds.toFixed(1)} s`);
  return {
    ranking,
    selected,
    candidates,
    exitLayer,
    budget,
    window,
    contextTokens: samples.map((s) => s.tokens.length),
    needleSpans: samples.map((s) => s.needle),
    out,
    seconds,
  };
}

// ---------------- CLI ----------------

const USAGE =
  "usage: bun scripts/select-heads.ts --model DIR [--layers 8-16|all|3,5,7] [--kinds q,k,v] [--samples N]\n" +
  "         [--context-tokens N] [--top K] [--budget N] [--window W] [--chunk N] [--capacity N] [--seed S]\n" +
  "         [--threads N] [--out DIR/reform_heads.json] [--backend cpu|cuda (env REFORM_BACKEND)]";

function main(argv: string[]): void {
  const { values } = parseFlags(
    argv,
    valueFlags(
      "model",
      "layers",
      "kinds",
      "samples",
      "context-tokens",
      "top",
      "budget",
      "window",
      "chunk",
      "capacity",
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
  let kinds: ("q" | "k" | "v")[] | undefined;
  if (values.kinds !== undefined) {
    kinds = values.kinds
      .split(",")
      .map((s) => s.trim())
      .filter(Boolean) as ("q" | "k" | "v")[];
    for (const k of kinds)
      if (k !== "q" && k !== "k" && k !== "v") throw new UsageError(`--kinds: unknown kind "${k}" (q, k, v)`);
    if (kinds.length === 0) throw new UsageError("--kinds: empty");
  }
  const positive = (name: string, v: string | undefined) => intFlag(name, v, 1);
  selectHeads({
    modelDir: values.model,
    layers: values.layers,
    kinds,
    samples: positive("samples", values.samples),
    contextTokens: positive("context-tokens", values["context-tokens"]),
    top: positive("top", values.top),
    budget: positive("budget", values.budget),
    window: positive("window", values.window),
    chunk: positive("chunk", values.chunk),
    capacity: positive("capacity", values.capacity),
    seed: intFlag("seed", values.seed, Number.MIN_SAFE_INTEGER),
    threads: positive("threads", values.threads),
    out: values.out ?? null,
    backend: oneOf("backend", values.backend ?? (process.env.REFORM_BACKEND || undefined), ["auto", "cpu", "cuda"]),
  });
}

if (import.meta.main) await runCli("select-heads", USAGE, () => main(process.argv.slice(2)));
