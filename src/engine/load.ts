/**
 * Start-up of the engine: the model directory (config, heads, tokenizer, safetensors) into the native
 * library, the defaults that follow from it, and the fingerprint that ties stored contexts to this exact
 * model and compression setup.
 */
import { closeSync, openSync, readFileSync, readSync, statSync } from "node:fs";
import { join } from "node:path";
import { type CompressParams, loadNative, type Native, type NativeModel, RF_F16 } from "../../ffi/native.ts";
import { type LoadedConfig, loadModelConfig } from "../model/config.ts";
import { type HeadsFile, loadHeads } from "../model/heads.ts";
import { loadSafetensors, modelFiles } from "../model/safetensors.ts";
import { ModelTokenizer } from "../model/tokenizer.ts";
import type { ModelInfo } from "./api.ts";
import { DEFAULT_EDGE, DEFAULT_WINDOW } from "./selection.ts";
import type { SessionParams } from "./session.ts";

export interface EngineDefaults {
  budget: number; // default recompute budget (context tokens gathered)
  maxBudget: number; // largest budget / full-context size accepted
  chunkSize: number; // compress chunk
  capacity: number; // compressor KV capacity per (layer, kv head)
  maxTokens: number; // default max new tokens
  maxNewTokens: number; // largest max_tokens a request may ask for (bounds the recompute KV cache)
  window: number; // smoothing window
  edge: number; // first/last tokens always kept
  nSink: number;
  obsWindow: number;
  prefillChunk: number; // prefill piece per scheduler step
  maxLiveCompressors: number;
  stateSaveEvery: number; // chunks between compressor state saves
  idleMs: number; // live compressors idle longer are saved + destroyed
  /** longest recompute (template + gathered context + question + max_tokens) a query may ask for */
  maxModelLen: number;
  /** longest context method "h2o" recomputes at full depth (its cost grows with the whole context) */
  maxH2oTokens: number;
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
}

export interface LoadedEngine {
  native: Native;
  model: NativeModel;
  cfg: LoadedConfig;
  tok: ModelTokenizer;
  headsFile: HeadsFile;
  defaults: EngineDefaults;
  params: SessionParams;
  fingerprint: string;
  /** what contexts stored by an older version carry for this same setup (accepted once, then rewritten) */
  legacyFingerprint: string;
  info: ModelInfo;
}

/** Room above the gather budget and the longest answer for the chat template and the question. */
const PROMPT_RESERVE = 1024;

function resolveDefaults(d: Partial<EngineDefaults>, hf: HeadsFile, maxPos: number): EngineDefaults {
  const chunkSize = d.chunkSize ?? hf.chunkSize ?? 1024;
  const maxBudget = d.maxBudget ?? Math.max(maxPos, 1024);
  const maxNewTokens = Math.max(d.maxNewTokens ?? 8192, d.maxTokens ?? 512);
  // a configured default above the configured maximum is a contradiction, not something to cap silently
  if (d.budget !== undefined && d.budget > maxBudget)
    throw new Error(
      `the default budget ${d.budget} exceeds the maximum budget ${maxBudget} (raise --max-budget or lower --budget)`,
    );
  return {
    // by default every budget and max_tokens the server accepts fit, with room for a question
    maxModelLen: d.maxModelLen ?? Math.max(maxPos, maxBudget + maxNewTokens + PROMPT_RESERVE),
    maxH2oTokens: d.maxH2oTokens ?? 262_144,
    budget: Math.min(d.budget ?? 8192, maxBudget),
    maxBudget,
    chunkSize,
    capacity: d.capacity ?? hf.capacity ?? 4096,
    maxTokens: d.maxTokens ?? 512,
    maxNewTokens,
    window: d.window ?? hf.window ?? DEFAULT_WINDOW,
    edge: d.edge ?? DEFAULT_EDGE,
    nSink: d.nSink ?? hf.nSink ?? 4,
    obsWindow: Math.min(d.obsWindow ?? hf.obsWindow ?? 128, chunkSize),
    prefillChunk: d.prefillChunk ?? 512,
    maxLiveCompressors: d.maxLiveCompressors ?? 8,
    stateSaveEvery: d.stateSaveEvery ?? 64,
    idleMs: d.idleMs ?? 5 * 60_000,
  };
}

/** Recent tokens the H2O eviction always keeps, for a cache of `capacity` entries. */
export function recentFor(capacity: number, obsWindow: number): number {
  return Math.max(1, Math.min(obsWindow, Math.floor(capacity / 4)));
}

/** Parameters of every upload-time compressor (early exit at the last layer holding a selected head). */
export function uploadCompressParams(d: EngineDefaults): CompressParams {
  return {
    capacity: d.capacity,
    nSink: d.nSink,
    nRecent: recentFor(d.capacity, d.obsWindow),
    obsWindow: d.obsWindow,
    maxChunk: Math.max(d.chunkSize, 512),
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
function fingerprintOf(modelDir: string, hf: HeadsFile, p: SessionParams): { current: string; legacy: string } {
  const parts: string[] = [readFileSync(join(modelDir, "config.json"), "utf8")];
  const files = modelFiles(modelDir);
  for (const f of files) parts.push(`${f.split("/").pop()}:${statSync(f).size}`);
  parts.push(JSON.stringify(hf.heads));
  parts.push(JSON.stringify([p.chunkSize, p.capacity, p.nSink, p.nRecent, p.obsWindow, p.embDim, p.embDtype]));
  const legacy = Bun.hash(parts.join("\n")).toString(16);
  for (const f of files) parts.push(`content:${contentSample(f)}`);
  return { current: Bun.hash(parts.join("\n")).toString(16), legacy };
}

export function loadEngine(o: EngineOptions): LoadedEngine {
  const cfg = loadModelConfig(o.modelDir);
  const mc = cfg.config;
  const headsFile = loadHeads(o.modelDir, mc, o.heads ?? null);
  const tok = ModelTokenizer.fromDir(o.modelDir);
  const maxPos = cfg.maxPositionEmbeddings;
  const defaults = resolveDefaults(o.defaults ?? {}, headsFile, maxPos);
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
  const cp = uploadCompressParams(defaults);
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
  probe.destroy();
  const info: ModelInfo = {
    id: o.servedName ?? o.modelDir.split("/").filter(Boolean).pop() ?? "model",
    path: o.modelDir,
    architecture: cfg.architecture,
    backend: native.backendName(),
    device: native.deviceInfo(),
    trainedContext: maxPos,
    vocabSize: mc.vocabSize,
    numLayers: mc.numLayers,
    heads: headsFile.heads.map((h) => ({ ...h })),
    exitLayer,
    defaults: {
      budget: defaults.budget,
      maxBudget: defaults.maxBudget,
      chunkSize: defaults.chunkSize,
      capacity: defaults.capacity,
      maxTokens: defaults.maxTokens,
      maxNewTokens: defaults.maxNewTokens,
      maxModelLen: defaults.maxModelLen,
      maxH2oTokens: defaults.maxH2oTokens,
    },
  };
  const fp = fingerprintOf(o.modelDir, headsFile, params);
  return {
    native,
    model,
    cfg,
    tok,
    headsFile,
    defaults,
    params,
    fingerprint: fp.current,
    legacyFingerprint: fp.legacy,
    info,
  };
}
