/**
 * Start-up of the engine: the model directory (config, heads, tokenizer, safetensors) into the native
 * library, the defaults that follow from it, and the fingerprint that ties stored contexts to this exact
 * model and compression setup.
 */
import { closeSync, openSync, readFileSync, readSync, statSync } from "node:fs";
import { DEFAULT_BACKGROUND, type ScoreBackground } from "./background.ts";
import { join } from "node:path";
import { type CompressParams, loadNative, type Native, type NativeModel, RF_F16 } from "../../ffi/native.ts";
import { type LoadedConfig, loadModelConfig } from "../model/config.ts";
import { readSamplingDefaults } from "../model/generation-config.ts";
import { type HeadsFile, loadHeads } from "../model/heads.ts";
import { loadSafetensors, modelFiles } from "../model/safetensors.ts";
import { ModelTokenizer } from "../model/tokenizer.ts";
import type { MemoryPlan, ModelInfo } from "./api.ts";
import { type EvictionPolicy, evictionParams } from "./eviction.ts";
import { buildMessages, splitAtPlaceholder } from "./prompt.ts";
import { maxLag, queryScorers, sentenceEnds, wordContinuations } from "./selection.ts";
import type { SessionParams } from "./session.ts";

export interface EngineDefaults {
  budget: number; // default recompute budget (context tokens gathered)
  maxBudget: number; // largest budget / full-context size accepted
  chunkSize: number; // compress chunk
  capacity: number; // compressor KV capacity per (layer, kv head)
  maxTokens: number; // default max new tokens
  maxNewTokens: number; // largest max_tokens a request may ask for (bounds the recompute KV cache)
  window: number; // smoothing window at the default budget (scales with a request's budget)
  /** how far the smoothing window trails each token (selection.ts smoothScores; 0 = centered, the paper's), at the
   * default budget (scales with a request's budget) */
  lag: number;
  edge: number; // first/last tokens always kept at the default budget (scales with a request's budget)
  /** tokens of the budget that complete the gathered passages' sentences (selection.ts completeSentences; 0 = the
   * paper's gathering), at the default budget (scales with a request's budget) */
  sentenceTail: number;
  /** how far from the selection's lowest smoothed score to its best a gathered token must reach (selection.ts
   * keepNearBest; 0 = fill the budget by score, the paper's gathering) */
  scoreFloor: number;
  /** the background each question token's scores count from (background.ts; "off": the paper's scoring) */
  scoreBackground: ScoreBackground;
  nSink: number;
  obsWindow: number;
  /** how the upload compressor evicts (eviction.ts; the heads file's "eviction", default h2o) */
  eviction: EvictionPolicy;
  prefillChunk: number; // prefill piece per scheduler step
  maxLiveCompressors: number;
  stateSaveEvery: number; // chunks between compressor state saves
  idleMs: number; // live compressors idle longer are saved + destroyed
  /** longest recompute (template + gathered context + question + max_tokens) a query may ask for */
  maxModelLen: number;
  /** longest context the recurrent baselines (methods "h2o", "streaming") compress at full depth */
  maxH2oTokens: number;
  /** disk all contexts together may use; an upload that would pass it is refused (0 = no limit) */
  maxDiskBytes: number;
  /** longest question (as embedded: the prompt after the context, or the previous user turn) scored by reform */
  maxQueryTokens: number;
  /** cache of the recurrent baselines: this many times the request's budget, bounded by the window */
  baselineCacheFactor: number;
  /** inline REFORM's implicit contexts (inline.ts): at most this many, evicted after this many idle seconds, at most
   * this much disk together (0 = bounded only by --max-disk-bytes) */
  inlineMaxContexts: number;
  inlineMaxAgeSec: number;
  inlineMaxDiskBytes: number;
  /** token ids the tokenization memo of inline prompts keeps (memory: 4 bytes each plus the block keys) */
  inlineMemoTokens: number;
  /** write a chunk's embeddings to the file while the next chunk computes (rf_compressor_submit / _collect); false:
   * one chunk at a time (rf_compressor_process), the plain path */
  compressOverlap: boolean;
  /** device memory for resident context embeddings (resident.ts): -1 = what the memory plan leaves free, 0 = none */
  residentEmbBytes: number;
}

export interface EngineOptions {
  modelDir: string;
  dataDir: string;
  /** resolved by src/config.ts (flags, REFORM_BACKEND); the engine reads no environment itself */
  backend?: "auto" | "cpu" | "cuda";
  /** native library file to load instead of build/libreform_<backend>.so (REFORM_LIBRARY) */
  library?: string;
  servedName?: string;
  heads?: string | object | null;
  threads?: number;
  defaults?: Partial<EngineDefaults>;
  /** let max_model_len and chunk + capacity exceed the trained window (a warning instead of a start-up error) */
  allowBeyondWindow?: boolean;
}

export interface LoadedEngine {
  native: Native;
  model: NativeModel;
  cfg: LoadedConfig;
  tok: ModelTokenizer;
  headsFile: HeadsFile;
  defaults: EngineDefaults;
  /** the trained window, max_position_embeddings */
  trainedWindow: number;
  /** tokens of the chat template around the context and the question, without either */
  templateTokens: number;
  /** BOS prepended to the first chunk of every context (the model uses one), else null */
  bos: number | null;
  /** per token id: does it end a sentence (selection.ts sentenceEnds; for completeSentences) */
  sentenceEnds: Uint8Array;
  /** per token id: does its question row score the context (selection.ts queryScorers) */
  queryScorers: Uint8Array;
  /** per token id: does it continue the word of the token before it (selection.ts wordContinuations; query pairs) */
  wordContinuations: Uint8Array;
  params: SessionParams;
  fingerprint: string;
  /** what contexts stored by an older version carry for this same setup (accepted once, then rewritten) */
  legacyFingerprint: string;
  info: ModelInfo;
}

/**
 * The ratios every default limit is derived from, as fractions of the trained window W (max_position_embeddings)
 * or of the gather budget. One place, so that a benchmark can tune them. Why these:
 *   - compression: a chunk is processed on top of a cache of `capacity` entries, at positions capacity ..
 *     capacity + chunk − 1, and the question is embedded on top of the same cache; chunk W/4 + capacity W/2 = 3W/4
 *     stays inside the window and leaves W − capacity = W/2 positions for the question;
 *   - recompute: template + gathered budget + question + max_tokens must fit max_model_len (= W by default):
 *     default max_tokens W/8, W/4 left for the template and the question, so the default budget is 5W/8;
 *     the largest budget (7W/8) leaves W/8 for the template, a short question and a short answer, the largest
 *     max_tokens is W/2 (with a small budget);
 *   - selection: no always-kept edges (the paper keeps the context's first and last tokens; `--edge N` does): the
 *     recompute prompt's template already opens the sequence, and this model copied from the edges' unrelated
 *     sentences (a multi-value key's value taken from an edge; the web page's needle answered with an edge's words).
 *     Measured with the served gathering, the same questions paired with `full` (bench/ruler.ts --paired, seeds 1-2):
 *     multi-value 0.84x -> 0.97x of `full` at 128K and 0.84x -> 1.00x at 1M with edges of budget/32 (10) against none,
 *     the other tasks within a sample (README "Choosing the defaults"). The smoothing window (0.1 x budget, odd, at
 *     most the paper's 129: 33 at the 512-token model's budget 320), chosen
 *     by measurement on all four needle tasks with the gathering as served (embedded model and heads, budget 320, 24
 *     held-out samples per length, the share whose every asked value was gathered; README "Choosing the defaults",
 *     bench/window-sweep.ts): windows 33 / 49 / 65 / 129 gathered 24 / 22 / 17 / 7 at 16K tokens, 24 / 22 / 19 / 9
 *     at 128K and 24 / 21 / 16 / 3 at 1M, and 33 answered more than 49 at 128K (bench/ruler.ts, 60 samples per
 *     task: mean 77.8 vs 73.1). A needle sentence is 20-35 tokens: a much wider window dilutes the needle into its
 *     surroundings; a much narrower one lets isolated matches of common question words win in a long context,
 *     which the score floor removes (without it 33 gathered least of 33-65: 18 / 13 / 9);
 *   - sentence tail: 0.15 x budget is kept back from the scored selection and, with the partial sentences trimmed
 *     off the passages' ends, spent completing the sentence at each passage's middle (selection.ts completeSentences):
 *     a window centered on a fact's key stops partway into a long value; with it window 49 gathered 23 / 23 / 22 of
 *     24 at 16K / 128K / 1M (bench/window-sweep.ts), and the trimming took multi-value from 61-74% gathered to 78-83%
 *     at 128K (bench/ruler.ts, README "Choosing the defaults");
 *   - smoothing lag 0 (the paper's centered window). A window trailing each token by 0.05 x budget (16) lets a
 *     matched key's value share its score and gathered more of the multi-value needles (bench/window-sweep.ts), but
 *     it cuts the key phrase before the match, and the model, which answers by restating "key is value", then
 *     answered fewer needles at 1M tokens: bench/ruler.ts, the same 24 samples per length, mean 52.1 centered vs
 *     29.2 trailing at 1M, 56.3 vs 61.5 at 128K (README "Choosing the defaults"). `--smoothing-lag` keeps the option;
 *   - score floor 0.5: of the selected tokens, those below halfway from the lowest smoothed score to the best are
 *     dropped and their budget completes sentences (selection.ts keepNearBest): at 128K, 60 samples per task (window
 *     49), the mean went from 66.7 to 73.1, single needles 83.3 -> 91.7, multi-key 81.7 -> 93.3 (README "Choosing the
 *     defaults"); `--score-floor 0` gives the paper's budget filled by score;
 *   - baselines: streaming and h2o get a cache 4x REFORM's budget (as the paper ran them), bounded by the window.
 */
export const LIMIT_RATIOS = {
  chunk: 1 / 4,
  capacity: 1 / 2,
  maxTokens: 1 / 8,
  promptReserve: 1 / 4,
  maxBudget: 7 / 8,
  maxNewTokens: 1 / 2,
  edgeOfBudget: 0,
  smoothingOfBudget: 0.1,
  smoothingMax: 129,
  sentenceTailOfBudget: 0.15,
  lagOfBudget: 0,
  scoreFloor: 0.5,
  baselineCacheFactor: 4,
} as const;

/** Fewest context tokens a request may gather (the schema's minimum budget). */
const MIN_BUDGET = 16;

/** Odd and at least 1 (a centered smoothing window). */
function oddAtLeast1(x: number): number {
  const r = Math.max(1, Math.round(x));
  return r % 2 === 0 ? r + 1 : r;
}

/** A configuration whose limits contradict each other or break the model's window (refused at start). */
export class LimitsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "LimitsError";
  }
}

/** What resolveDefaults needs besides the configured values. */
export interface LimitInputs {
  /** max_position_embeddings */
  trainedWindow: number;
  /** template tokens around an empty question (see templateTokensOf) */
  templateTokens: number;
  allowBeyondWindow: boolean;
}

/**
 * The one place engine defaults are resolved: explicit values (flags, options) win, then the heads file, then
 * the values derived from the trained window with LIMIT_RATIOS. Then the rules every configuration must keep,
 * each refused with a message that names the numbers:
 *   window   chunk + capacity <= W (compressed positions stay in the trained window); max_model_len <= W.
 *            With `allowBeyondWindow` these two are warnings instead.
 *   fit      default budget + default max_tokens + template + 1 question token <= max_model_len; the largest budget
 *            with 1 question and 1 answer token, and the largest max_tokens with the smallest budget, fit too
 *            (else the server would accept values it can never serve).
 *   order    budget <= max budget, max_tokens <= max new tokens, obs_window <= chunk, smoothing lag <= window / 2,
 *            0 <= score floor <= 1.
 * Nothing is capped silently: a value that does not fit is an error, never quietly lowered.
 */
export function resolveDefaults(
  d: Partial<EngineDefaults>,
  hf: Pick<HeadsFile, "chunkSize" | "capacity" | "nSink" | "obsWindow" | "window" | "lag" | "eviction">,
  x: LimitInputs,
): { defaults: EngineDefaults; warnings: string[] } {
  const W = x.trainedWindow;
  const R = LIMIT_RATIOS;
  const frac = (f: number) => Math.max(1, Math.floor(W * f));
  const chunkSize = d.chunkSize ?? hf.chunkSize ?? frac(R.chunk);
  const capacity = d.capacity ?? hf.capacity ?? frac(R.capacity);
  const maxModelLen = d.maxModelLen ?? W;
  const maxTokens = d.maxTokens ?? frac(R.maxTokens);
  const budget = d.budget ?? Math.max(MIN_BUDGET, W - frac(R.maxTokens) - frac(R.promptReserve));
  const maxBudget = d.maxBudget ?? Math.max(budget, frac(R.maxBudget));
  const maxNewTokens = d.maxNewTokens ?? Math.max(maxTokens, frac(R.maxNewTokens));
  const obsWindow = d.obsWindow ?? hf.obsWindow ?? Math.min(128, chunkSize);
  const edge = d.edge ?? Math.round(budget * R.edgeOfBudget);
  const sentenceTail = d.sentenceTail ?? Math.round(budget * R.sentenceTailOfBudget);
  const scoreFloor = d.scoreFloor ?? R.scoreFloor;
  const window = d.window ?? hf.window ?? oddAtLeast1(Math.min(R.smoothingMax, budget * R.smoothingOfBudget));
  // a derived lag stays inside half the window (a heads file may set a narrow one); a configured one must fit
  const lag = d.lag ?? hf.lag ?? Math.min(maxLag(window), Math.round(budget * R.lagOfBudget));
  // the question is embedded on top of a full cache: what is left of the window (at least a chunk beyond it)
  const maxQueryTokens = d.maxQueryTokens ?? Math.max(W - capacity, chunkSize);

  const errors: string[] = [];
  const warnings: string[] = [];
  const windowRule = (msg: string) => (x.allowBeyondWindow ? warnings : errors).push(msg);
  if (chunkSize + capacity > W)
    windowRule(
      `chunk_size ${chunkSize} + capacity ${capacity} = ${chunkSize + capacity} exceeds the trained window of ${W} ` +
        "tokens: compressed positions would leave the window (lower --chunk-size or --capacity, or opt in with --allow-beyond-window)",
    );
  if (maxModelLen > W)
    windowRule(
      `max_model_len ${maxModelLen} exceeds the trained window of ${W} tokens: recomputed positions would leave ` +
        "the window (lower --max-model-len, or opt in with --allow-beyond-window)",
    );
  const t = x.templateTokens;
  if (budget + maxTokens + t + 1 > maxModelLen)
    errors.push(
      `the default budget ${budget} + max_tokens ${maxTokens} + chat template ${t} + 1 question token = ` +
        `${budget + maxTokens + t + 1} exceeds max_model_len ${maxModelLen} (lower --budget or --max-tokens)`,
    );
  if (maxBudget + t + 2 > maxModelLen)
    errors.push(
      `the maximum budget ${maxBudget} + chat template ${t} + 1 question token + 1 answer token = ` +
        `${maxBudget + t + 2} exceeds max_model_len ${maxModelLen} (lower --max-budget)`,
    );
  if (maxNewTokens + MIN_BUDGET + t + 1 > maxModelLen)
    errors.push(
      `the largest max_tokens ${maxNewTokens} + the smallest budget ${MIN_BUDGET} + chat template ${t} + 1 question ` +
        `token = ${maxNewTokens + MIN_BUDGET + t + 1} exceeds max_model_len ${maxModelLen} (lower --max-new-tokens)`,
    );
  // a configured default above the configured maximum is a contradiction, not something to cap silently
  if (budget > maxBudget)
    errors.push(
      `the default budget ${budget} exceeds the maximum budget ${maxBudget} (raise --max-budget or lower --budget)`,
    );
  if (maxTokens > maxNewTokens)
    errors.push(
      `the default max_tokens ${maxTokens} exceeds the largest max_tokens ${maxNewTokens} (raise --max-new-tokens or lower --max-tokens)`,
    );
  if (lag < 0 || lag > maxLag(window))
    errors.push(
      `the smoothing lag ${lag} (${d.lag !== undefined ? "--smoothing-lag" : 'the heads file\'s "lag"'}) must be ` +
        `within half the smoothing window ${window} (0 to ${maxLag(window)}): a token must stay inside its ` +
        "own window (lower the lag or widen the window)",
    );
  if (!(scoreFloor >= 0 && scoreFloor <= 1))
    errors.push(`the score floor ${scoreFloor} must be between 0 (off) and 1 (only the best-scoring tokens)`);
  if (obsWindow > chunkSize)
    errors.push(
      `obs_window ${obsWindow} exceeds chunk_size ${chunkSize} (H2O scores come from the last queries of a chunk)`,
    );
  if (errors.length > 0) throw new LimitsError(`configuration does not fit the model: ${errors.join("; ")}`);
  return {
    defaults: {
      maxModelLen,
      maxH2oTokens: d.maxH2oTokens ?? 262_144,
      maxDiskBytes: d.maxDiskBytes ?? 0,
      budget,
      maxBudget,
      chunkSize,
      capacity,
      maxTokens,
      maxNewTokens,
      window,
      lag,
      edge,
      sentenceTail,
      scoreFloor,
      scoreBackground: d.scoreBackground ?? DEFAULT_BACKGROUND,
      nSink: d.nSink ?? hf.nSink ?? 4,
      obsWindow,
      eviction: d.eviction ?? hf.eviction ?? "h2o",
      prefillChunk: d.prefillChunk ?? 512,
      maxLiveCompressors: d.maxLiveCompressors ?? 8,
      stateSaveEvery: d.stateSaveEvery ?? 64,
      idleMs: d.idleMs ?? 5 * 60_000,
      maxQueryTokens,
      baselineCacheFactor: d.baselineCacheFactor ?? R.baselineCacheFactor,
      inlineMaxContexts: d.inlineMaxContexts ?? 16,
      inlineMaxAgeSec: d.inlineMaxAgeSec ?? 24 * 3600,
      inlineMaxDiskBytes: d.inlineMaxDiskBytes ?? 0,
      inlineMemoTokens: d.inlineMemoTokens ?? 4 << 20,
      compressOverlap: d.compressOverlap ?? true,
      residentEmbBytes: d.residentEmbBytes ?? -1,
    },
    warnings,
  };
}

const MiB = 1024 * 1024;
const fmtMiB = (b: number): string =>
  b >= 1024 * MiB
    ? `${(b / (1024 * MiB)).toFixed(2)} GiB`
    : b >= MiB
      ? `${(b / MiB).toFixed(1)} MiB`
      : `${(b / 1024).toFixed(1)} KiB`;

/** The memory plan in one line (start-up log). */
export function describePlan(p: MemoryPlan): string {
  const dev =
    p.deviceFree !== null && p.deviceTotal !== null
      ? `device ${fmtMiB(p.deviceFree)} free of ${fmtMiB(p.deviceTotal)} after weights + workspace`
      : "host memory (not measured)";
  return (
    `weights ${fmtMiB(p.weights)}, shared per-step workspace ${fmtMiB(p.workspace)}, ` +
    `per live compressor ${fmtMiB(p.perCompressor)} (cache), recompute sequence ${fmtMiB(p.recomputeSeq)} ` +
    `(max_model_len ${p.maxModelLen}); ${dev} -> up to ${p.maxLiveCompressors} live compressor(s)` +
    (p.fits ? "" : " (WARNING: not even one compressor fits next to a recompute sequence; uploads will get 503)") +
    (p.residentTokens > 0
      ? `; resident context embeddings up to ${fmtMiB(p.residentBudget)} (about ${p.residentTokens} context tokens, ` +
        "scored without reading the embedding file)"
      : p.deviceFree !== null
        ? "; no resident context embeddings (no room left: queries stream the embedding file)"
        : "")
  );
}

/**
 * Sizes the live compressors by free device memory: weights and the shared workspace are already allocated (the
 * probe compressor and a probe sequence grew the workspace to their step's size), one recompute sequence of
 * max_model_len tokens and a margin (CUDA context, cuBLAS, fragmentation: 2% of the card) are kept free, and the rest
 * holds at most this many compressor caches (never more than --max-live-compressors). What is left after those caches
 * holds resident context embeddings (resident.ts; at most --resident-emb-bytes when set). On the CPU backend memory is
 * not measured, the configured number of compressors stands and no embeddings are resident.
 */
export function memoryPlan(
  model: NativeModel,
  d: EngineDefaults,
  perCompressor: number,
  embDim = 0,
): { memory: MemoryPlan; maxLive: number } {
  const seq = model.createSeq(Math.min(d.maxModelLen, 4096)); // grows the shared workspace to a prefill piece
  seq.destroy();
  const mi = model.memoryInfo();
  const recomputeSeq = mi.seqBytesPerToken * d.maxModelLen;
  let maxLive = d.maxLiveCompressors;
  let fits = true;
  let residentBudget = 0;
  if (mi.deviceFree !== null && mi.deviceTotal !== null) {
    const avail = mi.deviceFree - recomputeSeq - Math.round(mi.deviceTotal * 0.02);
    const n = Math.floor(avail / Math.max(1, perCompressor));
    fits = n >= 1;
    maxLive = Math.max(1, Math.min(maxLive, n));
    const left = Math.max(0, avail - maxLive * perCompressor);
    residentBudget = d.residentEmbBytes < 0 ? left : Math.min(d.residentEmbBytes, left);
  }
  // whole blocks of rows (embStoreBytes): what a store of this many bytes holds
  const perToken = embDim > 0 ? embDim * 2 + 4 : 0;
  const residentTokens = perToken > 0 ? Math.floor(residentBudget / perToken) : 0;
  return {
    memory: {
      weights: mi.weights,
      workspace: mi.workspace,
      perCompressor,
      recomputeSeq,
      maxModelLen: d.maxModelLen,
      deviceFree: mi.deviceFree,
      deviceTotal: mi.deviceTotal,
      maxLiveCompressors: maxLive,
      fits,
      residentBudget,
      residentTokens,
    },
    maxLive,
  };
}

/** Tokens the chat template puts around the context and an empty question (what every query pays). */
export function templateTokensOf(tok: ModelTokenizer): number {
  const { messages } = buildMessages({ question: "" }, true);
  const parts = splitAtPlaceholder(tok.renderChat(messages, true));
  const { pre, suf } = tok.encodeAround(parts.prefix, undefined, parts.suffix);
  return pre.length + suf.length;
}

/** BOS id the compressed stream starts with (as in training), or null when the model uses none. */
export function bosOf(tok: ModelTokenizer): number | null {
  return tok.usesBos && tok.bosId !== null ? tok.bosId : null;
}

/**
 * The limits of a model directory and configuration, without loading weights or the native library: the
 * engine's own resolution, for `serve` to refuse a configuration that breaks the window before it listens.
 */
export function resolveLimits(o: Pick<EngineOptions, "modelDir" | "heads" | "defaults" | "allowBeyondWindow">): {
  defaults: EngineDefaults;
  warnings: string[];
  trainedWindow: number;
  templateTokens: number;
} {
  const cfg = loadModelConfig(o.modelDir);
  const headsFile = loadHeads(o.modelDir, cfg.config, o.heads ?? null);
  const tok = ModelTokenizer.fromDir(o.modelDir);
  const inputs: LimitInputs = {
    trainedWindow: cfg.maxPositionEmbeddings,
    templateTokens: templateTokensOf(tok),
    allowBeyondWindow: o.allowBeyondWindow ?? false,
  };
  return { ...resolveDefaults(o.defaults ?? {}, headsFile, inputs), ...inputs };
}

/**
 * Parameters of every upload-time compressor (early exit at the last layer holding a selected head; eviction by the
 * configured policy). A call takes a chunk (plus the BOS the first chunk gets) or a question embedded on top of the
 * cache.
 */
export function uploadCompressParams(d: EngineDefaults, bos: number | null): CompressParams {
  return {
    capacity: d.capacity,
    nSink: d.nSink,
    ...evictionParams(d.eviction, d.capacity, d.nSink, d.obsWindow),
    obsWindow: d.obsWindow,
    maxChunk: Math.max(d.chunkSize + (bos === null ? 0 : 1), d.maxQueryTokens),
    embDtype: RF_F16,
    exitLayer: -1,
  };
}

/**
 * A cheap sample of a weights file's content: its safetensors header and 16 evenly spaced 4 KiB windows. Another
 * checkpoint with the same config.json and file sizes (a fine-tune of the same base) differs in every window.
 */
function contentSample(file: string): string {
  const size = statSync(file).size;
  const fd = openSync(file, "r");
  try {
    const len = Buffer.alloc(8);
    readSync(fd, len, 0, 8, 0);
    const header = Buffer.alloc(Math.max(0, Math.min(Number(len.readBigUInt64LE(0)), size - 8, 64 << 20)));
    readSync(fd, header, 0, header.length, 8);
    let h = Bun.hash(header);
    const win = Buffer.alloc(Math.min(4096, size));
    for (let k = 0; k < 16; k++) {
      readSync(fd, win, 0, win.length, Math.floor(((size - win.length) * k) / 15));
      h = Bun.hash(win, h);
    }
    return h.toString(16);
  } finally {
    closeSync(fd);
  }
}

/** The fingerprint that ties a stored context to this model and compression setup, and the formula of an older
 * version (config + file sizes only), which stored contexts may still carry. */
function fingerprintOf(
  modelDir: string,
  hf: HeadsFile,
  p: SessionParams,
  bos: number | null,
  eviction: EvictionPolicy,
): { current: string; legacy: string } {
  const parts: string[] = [readFileSync(join(modelDir, "config.json"), "utf8")];
  const files = modelFiles(modelDir);
  for (const f of files) parts.push(`${f.split("/").pop()}:${statSync(f).size}`);
  parts.push(JSON.stringify(hf.heads));
  parts.push(JSON.stringify([p.chunkSize, p.capacity, p.nSink, p.nRecent, p.obsWindow, p.embDim, p.embDtype]));
  // contexts stored by the older formula were compressed without BOS: only valid for a model that uses none
  // (and with H2O eviction, the only policy there was)
  const legacy = bos === null && eviction === "h2o" ? Bun.hash(parts.join("\n")).toString(16) : "";
  // contexts compressed without the BOS the stream now starts with are not the same compression
  parts.push(`bos:${bos ?? "none"}`);
  for (const f of files) parts.push(`content:${contentSample(f)}`);
  // another eviction policy stores another cache (the default adds nothing: contexts stored before it stay valid)
  if (eviction !== "h2o") parts.push(`eviction:${eviction}`);
  return { current: Bun.hash(parts.join("\n")).toString(16), legacy };
}

export function loadEngine(o: EngineOptions): LoadedEngine {
  const cfg = loadModelConfig(o.modelDir);
  const mc = cfg.config;
  const headsFile = loadHeads(o.modelDir, mc, o.heads ?? null);
  const tok = ModelTokenizer.fromDir(o.modelDir);
  const maxPos = cfg.maxPositionEmbeddings;
  const templateTokens = templateTokensOf(tok);
  const { defaults, warnings } = resolveDefaults(o.defaults ?? {}, headsFile, {
    trainedWindow: maxPos,
    templateTokens,
    allowBeyondWindow: o.allowBeyondWindow ?? false,
  });
  for (const w of warnings) console.warn(`[engine] warning (--allow-beyond-window): ${w}`);
  const bos = bosOf(tok);
  const native = loadNative(o.backend ?? "auto", o.library);
  if (o.threads) native.setThreads(o.threads);
  const model = native.createModel(mc);
  try {
    loadSafetensors(o.modelDir, model);
    model.finalize();
  } catch (e) {
    model.destroy();
    throw e;
  }
  // probe the compressor once: embed dim + exit layer, and that the params are accepted
  const cp = uploadCompressParams(defaults, bos);
  const probe = model.createCompressor(cp, headsFile.heads);
  const params: SessionParams = {
    chunkSize: defaults.chunkSize,
    capacity: defaults.capacity,
    nSink: defaults.nSink,
    nRecent: cp.nRecent,
    obsWindow: defaults.obsWindow,
    embDim: probe.embedDim,
    embDtype: RF_F16,
  };
  const exitLayer = probe.exitLayer;
  const perCompressor = probe.memoryBytes();
  probe.destroy();
  const { memory, maxLive } = memoryPlan(model, defaults, perCompressor, params.embDim);
  defaults.maxLiveCompressors = maxLive;
  const device = native.deviceInfo();
  // a slow path the backend fell back to (no cuBLAS, a driver older than the runtime) is said at start and in /health
  const deviceWarnings = [...device.matchAll(/WARNING: ([^)]*)/g)].map((m) => m[1]!);
  for (const w of deviceWarnings) console.warn(`[engine] WARNING (${native.backendName()}): ${w}`);
  console.log(`[engine] device: ${device}`);
  console.log(`[engine] memory plan: ${describePlan(memory)}`);
  const generation = readSamplingDefaults(o.modelDir);
  for (const why of generation.ignored) console.warn(`[engine] generation_config.json: ${why} (left out)`);
  const info: ModelInfo = {
    id: o.servedName ?? o.modelDir.split("/").filter(Boolean).pop() ?? "model",
    path: o.modelDir,
    architecture: cfg.architecture,
    backend: native.backendName(),
    device,
    deviceWarnings,
    memory,
    trainedContext: maxPos,
    vocabSize: mc.vocabSize,
    numLayers: mc.numLayers,
    heads: headsFile.heads.map((h) => ({ ...h })),
    exitLayer,
    generation: generation.defaults,
    defaults: {
      budget: defaults.budget,
      maxBudget: defaults.maxBudget,
      chunkSize: defaults.chunkSize,
      capacity: defaults.capacity,
      maxTokens: defaults.maxTokens,
      maxNewTokens: defaults.maxNewTokens,
      maxModelLen: defaults.maxModelLen,
      maxH2oTokens: defaults.maxH2oTokens,
      maxDiskBytes: defaults.maxDiskBytes,
      smoothingWindow: defaults.window,
      smoothingLag: defaults.lag,
      smoothing: headsFile.smoothing ?? "mean",
      edge: defaults.edge,
      sentenceTail: defaults.sentenceTail,
      scoreFloor: defaults.scoreFloor,
      scoreBackground: defaults.scoreBackground,
      maxQueryTokens: defaults.maxQueryTokens,
      baselineCacheFactor: defaults.baselineCacheFactor,
      inlineMaxContexts: defaults.inlineMaxContexts,
      inlineMaxAgeSec: defaults.inlineMaxAgeSec,
      inlineMaxDiskBytes: defaults.inlineMaxDiskBytes,
      templateTokens,
      allowBeyondWindow: o.allowBeyondWindow ?? false,
    },
    compressor: {
      chunkSize: params.chunkSize,
      capacity: params.capacity,
      nSink: params.nSink,
      nRecent: params.nRecent,
      obsWindow: params.obsWindow,
      eviction: defaults.eviction,
      embedDim: params.embDim,
      embedDtype: "f16",
      exitLayer,
      bosTokenId: bos,
    },
  };
  const fp = fingerprintOf(o.modelDir, headsFile, params, bos, defaults.eviction);
  return {
    native,
    model,
    cfg,
    tok,
    headsFile,
    defaults,
    trainedWindow: maxPos,
    templateTokens,
    bos,
    sentenceEnds: sentenceEnds(tok.vocabSize, (id) => tok.tokenBytes(id)),
    queryScorers: queryScorers(tok.vocabSize, (id) => tok.tokenBytes(id), tok.specialIds),
    wordContinuations: wordContinuations(tok.vocabSize, (id) => tok.tokenBytes(id), tok.specialIds),
    params,
    fingerprint: fp.current,
    legacyFingerprint: fp.legacy,
    info,
  };
}
