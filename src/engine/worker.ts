/**
 * Engine worker: a Bun Worker that owns the native library, the model, the tokenizer and every
 * session's compressor. The HTTP thread talks to it through src/engine/client.ts (postMessage).
 *
 * Scheduling: one queue for the one device. Every unit of work is a generator that yields after one
 * chunk-sized native job (one compress chunk, one prefill piece, one decode step); the scheduler runs
 * the runnable tasks round robin, one step each, and lets incoming messages in between steps, so a long
 * upload and a generation interleave fairly and an abort is seen after at most one step.
 * Appends/finalize/delete of the same session are serialised (per-session chain); queries are not
 * (they read a snapshot of the embedding file and use the compressor in a single step).
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import {
  loadNative,
  NativeError,
  RF_ERR_OOM,
  RF_F16,
  type CompressParams,
  type HeadSpec,
  type Native,
  type NativeCompressor,
  type NativeModel,
  type NativeSeq,
} from "../../ffi/native.ts";
import {
  EngineError,
  type ContextInfo,
  type EngineMetrics,
  type ModelInfo,
  type QueryEvent,
  type QueryRequest,
  type SamplingOptions,
  type TokenLogprob,
} from "./api.ts";
import { loadModelConfig, type LoadedConfig } from "../model/config.ts";
import { loadHeads, type HeadsFile } from "../model/heads.ts";
import { loadSafetensors, modelFiles } from "../model/safetensors.ts";
import { ModelTokenizer } from "../model/tokenizer.ts";
import { Session, type SessionParams } from "./session.ts";
import {
  buildMessages,
  CONTEXT_PLACEHOLDER,
  DEFAULT_EDGE,
  DEFAULT_WINDOW,
  gather,
  splitAtPlaceholder,
  StopMatcher,
  streamingSelection,
  validateBudget,
  validateMethod,
} from "./query.ts";

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
}

export interface EngineOptions {
  modelDir: string;
  dataDir: string;
  backend?: "auto" | "cpu" | "cuda";
  /** native library file to load instead of build/libreform_<backend>.so (REFORM_LIBRARY) */
  library?: string;
  servedName?: string;
  heads?: string | object | null;
  threads?: number;
  defaults?: Partial<EngineDefaults>;
}

type Task<T = unknown> = Generator<void, T, void>;

export type QueryWire = Omit<QueryRequest, "signal">;

// ---------------------------------------------------------------- helpers

const f16tab = (() => {
  const t = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const s = h & 0x8000 ? -1 : 1;
    const e = (h >> 10) & 0x1f;
    const m = h & 0x3ff;
    t[h] = e === 0 ? s * m * 2 ** -24 : e === 31 ? (m ? NaN : s * Infinity) : s * (1 + m / 1024) * 2 ** (e - 15);
  }
  return t;
})();
/** Request checks of logprobs / penalties / logit bias (400 with the offending parameter). */
function validateSamplingExtras(sp: SamplingOptions, vocab: number): void {
  const bad = (param: string, msg: string) => new EngineError(400, "invalid_request", msg, param);
  if (sp.logprobs != null && !(Number.isInteger(sp.logprobs) && sp.logprobs >= 0 && sp.logprobs <= 20))
    throw bad("top_logprobs", "logprobs (the number of alternatives) must be an integer from 0 to 20");
  for (const [k, name] of [
    ["presencePenalty", "presence_penalty"],
    ["frequencyPenalty", "frequency_penalty"],
  ] as const) {
    const v = sp[k];
    if (v != null && !(Number.isFinite(v) && v >= -2 && v <= 2)) throw bad(name, `${name} must be between -2 and 2`);
  }
  const rp = sp.repetitionPenalty;
  if (rp != null && !(Number.isFinite(rp) && rp > 0 && rp <= 10)) throw bad("repetition_penalty", "repetition_penalty must be in (0, 10]");
  if (sp.logitBias != null) {
    const entries = Object.entries(sp.logitBias);
    if (entries.length > 1024) throw bad("logit_bias", "logit_bias has more than 1024 entries");
    for (const [k, v] of entries) {
      const id = Number(k);
      if (!Number.isInteger(id) || id < 0 || id >= vocab) throw bad("logit_bias", `logit_bias: '${k}' is not a token id of this model (0..${vocab - 1})`);
      if (!(Number.isFinite(v) && v >= -100 && v <= 100)) throw bad("logit_bias", `logit_bias[${k}] must be between -100 and 100`);
    }
  }
}

/**
 * Logit adjustments before sampling: repetition penalty (prompt + generated tokens), presence / frequency penalties
 * (generated tokens), logit bias. `adjust(raw, out)` writes the adjusted logits into `out`.
 */
export class LogitProcessor {
  readonly active: boolean;
  private readonly counts = new Map<number, number>();
  private readonly seen: Uint8Array | null;
  private readonly seenList: number[] = [];
  private readonly bias: [number, number][];
  constructor(
    private readonly sp: SamplingOptions,
    vocab: number,
    prompt: ArrayLike<number>,
  ) {
    const rp = sp.repetitionPenalty ?? 1;
    this.bias = Object.entries(sp.logitBias ?? {})
      .map(([k, v]) => [Number(k), v] as [number, number])
      .filter(([, v]) => v !== 0);
    this.active = rp !== 1 || !!sp.presencePenalty || !!sp.frequencyPenalty || this.bias.length > 0;
    this.seen = rp !== 1 ? new Uint8Array(vocab) : null;
    if (this.seen) for (let i = 0; i < prompt.length; i++) this.mark(prompt[i]!);
  }
  private mark(id: number): void {
    if (this.seen && id >= 0 && id < this.seen.length && !this.seen[id]) {
      this.seen[id] = 1;
      this.seenList.push(id);
    }
  }
  /** a token was generated */
  add(id: number): void {
    this.counts.set(id, (this.counts.get(id) ?? 0) + 1);
    this.mark(id);
  }
  adjust(raw: Float32Array, out: Float32Array): Float32Array {
    out.set(raw);
    const rp = this.sp.repetitionPenalty ?? 1;
    if (rp !== 1) for (const id of this.seenList) out[id] = out[id]! > 0 ? out[id]! / rp : out[id]! * rp;
    const pres = this.sp.presencePenalty ?? 0;
    const freq = this.sp.frequencyPenalty ?? 0;
    if (pres !== 0 || freq !== 0) for (const [id, c] of this.counts) out[id] = out[id]! - pres - freq * c;
    for (const [id, b] of this.bias) out[id] = out[id]! + b;
    return out;
  }
}

/** log-softmax of `logits` at `id`, and the `n` most likely tokens (ties: lower id first) */
export function logprobsOf(logits: Float32Array, id: number, n: number): { logprob: number; top: { id: number; logprob: number }[] } {
  let mx = -Infinity;
  for (let i = 0; i < logits.length; i++) if (logits[i]! > mx) mx = logits[i]!;
  let sum = 0;
  for (let i = 0; i < logits.length; i++) sum += Math.exp(logits[i]! - mx);
  const lse = mx + Math.log(sum);
  const top: { id: number; logprob: number }[] = [];
  if (n > 0) {
    // keep the n best in a small sorted array (n <= 20)
    for (let i = 0; i < logits.length; i++) {
      const v = logits[i]!;
      if (top.length === n && v <= top[n - 1]!.logprob) continue;
      let j = top.length < n ? top.length : n - 1;
      if (top.length < n) top.push({ id: i, logprob: v });
      while (j > 0 && top[j - 1]!.logprob < v) {
        top[j] = top[j - 1]!;
        j--;
      }
      top[j] = { id: i, logprob: v };
    }
    for (const t of top) t.logprob -= lse;
  }
  return { logprob: logits[id]! - lse, top };
}

export function f16ToF32(a: Uint16Array): Float32Array {
  const o = new Float32Array(a.length);
  for (let i = 0; i < a.length; i++) o[i] = f16tab[a[i]!]!;
  return o;
}

function toEngineError(e: unknown): EngineError {
  if (e instanceof EngineError) return e;
  const msg = e instanceof Error ? e.message : String(e);
  // Out of (device) memory is a capacity problem, not a bug: 503 so clients retry later or ask for less.
  if (e instanceof NativeError && e.code === RF_ERR_OOM) return new EngineError(503, "insufficient_memory", msg);
  return new EngineError(500, "internal_error", msg);
}

const ID_RE = /^[A-Za-z0-9_-]{1,128}$/;

// ---------------------------------------------------------------- scheduler

class Scheduler {
  private queue: { gen: Task<any>; resolve: (v: any) => void; reject: (e: unknown) => void }[] = [];
  private running = false;
  onStep: () => void = () => {};

  get depth(): number {
    return this.queue.length;
  }

  run<T>(gen: Task<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.queue.push({ gen, resolve, reject });
      if (!this.running) void this.loop();
    });
  }

  private async loop(): Promise<void> {
    this.running = true;
    try {
      while (this.queue.length > 0) {
        const t = this.queue.shift()!;
        let r: IteratorResult<void, any>;
        try {
          r = t.gen.next();
        } catch (e) {
          t.reject(e);
          this.onStep();
          continue;
        }
        if (r.done) t.resolve(r.value);
        else this.queue.push(t);
        this.onStep();
        // let messages (aborts, new requests) in between steps
        await new Promise<void>((res) => setImmediate(res));
      }
    } finally {
      this.running = false;
    }
  }
}

// ---------------------------------------------------------------- engine core

interface Live {
  comp: NativeCompressor;
  dirty: number; // chunks processed since the last state save
  lastUsed: number;
}

export class EngineCore {
  native!: Native;
  model!: NativeModel;
  cfg!: LoadedConfig;
  tok!: ModelTokenizer;
  headsFile!: HeadsFile;
  defaults!: EngineDefaults;
  params!: SessionParams;
  fingerprint = "";
  info!: ModelInfo;
  exitLayer = -1;

  readonly sessions = new Map<string, Session>();
  private live = new Map<string, Live>();
  private chains = new Map<string, Promise<unknown>>();
  readonly sched = new Scheduler();
  private aborted = new Set<string>();
  private idleTimer: ReturnType<typeof setInterval> | null = null;

  metrics: EngineMetrics = {
    tokensProcessedTotal: 0,
    tokensGeneratedTotal: 0,
    promptTokensTotal: 0,
    requestsTotal: 0,
    queueDepth: 0,
    activeContexts: 0,
    ttftSeconds: [],
    tpotSeconds: [],
  };

  constructor(
    readonly opts: EngineOptions,
    readonly emitProgress: (info: ContextInfo) => void = () => {},
  ) {}

  load(): ModelInfo {
    const o = this.opts;
    this.cfg = loadModelConfig(o.modelDir);
    const mc = this.cfg.config;
    this.headsFile = loadHeads(o.modelDir, mc, o.heads ?? null);
    this.tok = ModelTokenizer.fromDir(o.modelDir);
    const d = o.defaults ?? {};
    const hf = this.headsFile;
    const maxPos = this.cfg.maxPositionEmbeddings;
    const chunkSize = d.chunkSize ?? hf.chunkSize ?? 1024;
    const capacity = d.capacity ?? hf.capacity ?? 4096;
    const maxBudget = d.maxBudget ?? Math.max(maxPos, 1024);
    this.defaults = {
      budget: Math.min(d.budget ?? 8192, maxBudget),
      maxBudget,
      chunkSize,
      capacity,
      maxTokens: d.maxTokens ?? 512,
      maxNewTokens: Math.max(d.maxNewTokens ?? 8192, d.maxTokens ?? 512),
      window: d.window ?? hf.window ?? DEFAULT_WINDOW,
      edge: d.edge ?? DEFAULT_EDGE,
      nSink: d.nSink ?? hf.nSink ?? 4,
      obsWindow: Math.min(d.obsWindow ?? hf.obsWindow ?? 128, chunkSize),
      prefillChunk: d.prefillChunk ?? 512,
      maxLiveCompressors: d.maxLiveCompressors ?? 8,
      stateSaveEvery: d.stateSaveEvery ?? 64,
      idleMs: d.idleMs ?? 5 * 60_000,
    };
    this.native = loadNative(
      o.backend ?? ((process.env.REFORM_BACKEND as any) || "auto"),
      o.library ?? (process.env.REFORM_LIBRARY || undefined),
    );
    if (o.threads) this.native.setThreads(o.threads);
    this.model = this.native.createModel(mc);
    try {
      loadSafetensors(o.modelDir, this.model);
      this.model.finalize();
    } catch (e) {
      this.model.destroy();
      throw e;
    }
    // probe the compressor once: embed dim + exit layer, and that the params are accepted
    const probe = this.model.createCompressor(this.compressParams(), hf.heads);
    this.params = {
      chunkSize,
      capacity,
      nSink: this.defaults.nSink,
      nRecent: this.nRecent(capacity),
      obsWindow: this.defaults.obsWindow,
      embDim: probe.embedDim,
      embDtype: RF_F16,
    };
    this.exitLayer = probe.exitLayer;
    probe.destroy();
    this.fingerprint = this.computeFingerprint();
    this.info = {
      id: o.servedName ?? o.modelDir.split("/").filter(Boolean).pop() ?? "model",
      path: o.modelDir,
      architecture: this.cfg.architecture,
      backend: this.native.backendName(),
      device: this.native.deviceInfo(),
      trainedContext: maxPos,
      vocabSize: mc.vocabSize,
      numLayers: mc.numLayers,
      heads: hf.heads.map((h) => ({ ...h })),
      exitLayer: this.exitLayer,
      defaults: {
        budget: this.defaults.budget,
        maxBudget: this.defaults.maxBudget,
        chunkSize,
        capacity,
        maxTokens: this.defaults.maxTokens,
      },
    };
    this.loadSessions();
    this.idleTimer = setInterval(() => this.evictIdle(), 15_000);
    (this.idleTimer as any).unref?.();
    this.sched.onStep = () => {
      this.metrics.queueDepth = this.sched.depth;
    };
    return this.info;
  }

  private nRecent(capacity: number): number {
    return Math.max(1, Math.min(this.defaults.obsWindow, Math.floor(capacity / 4)));
  }

  private compressParams(): CompressParams {
    const d = this.defaults;
    return {
      capacity: d.capacity,
      nSink: d.nSink,
      nRecent: this.nRecent(d.capacity),
      obsWindow: d.obsWindow,
      maxChunk: Math.max(d.chunkSize, 512),
      embDtype: RF_F16,
      exitLayer: -1,
    };
  }

  private computeFingerprint(): string {
    const parts: string[] = [readFileSync(join(this.opts.modelDir, "config.json"), "utf8")];
    for (const f of modelFiles(this.opts.modelDir)) parts.push(`${f.split("/").pop()}:${statSync(f).size}`);
    parts.push(JSON.stringify(this.headsFile.heads));
    const p = this.params;
    parts.push(JSON.stringify([p.chunkSize, p.capacity, p.nSink, p.nRecent, p.obsWindow, p.embDim, p.embDtype]));
    return Bun.hash(parts.join("\n")).toString(16);
  }

  private contextsDir(): string {
    return join(this.opts.dataDir, "contexts");
  }

  private loadSessions(): void {
    const dir = this.contextsDir();
    mkdirSync(dir, { recursive: true });
    for (const name of readdirSync(dir)) {
      if (!ID_RE.test(name)) continue;
      const s = Session.load(join(dir, name));
      if (!s) continue;
      if (s.meta.fingerprint !== this.fingerprint && !s.meta.failed) {
        s.fail("context was built with a different model or head/compression configuration");
      }
      this.sessions.set(s.id, s);
    }
    this.metrics.activeContexts = this.sessions.size;
  }

  // ------------------------------------------------------------ sessions

  private get(id: string): Session {
    const s = ID_RE.test(id) ? this.sessions.get(id) : undefined;
    if (!s) throw new EngineError(404, "context_not_found", `context ${id} not found`, "context_id");
    return s;
  }

  private infoOf(s: Session): ContextInfo {
    const l = this.live.get(s.id);
    return s.info(l ? l.comp.cacheLen() : 0);
  }

  private progress(s: Session): void {
    this.emitProgress(this.infoOf(s));
  }

  /** Run `fn` after the previous operation on session `id` finished. */
  private chain<T>(id: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.chains.get(id) ?? Promise.resolve();
    const p = prev.then(fn, fn);
    const tail = p.catch(() => {});
    this.chains.set(id, tail);
    void tail.then(() => {
      if (this.chains.get(id) === tail) this.chains.delete(id);
    });
    return p;
  }

  createContext(metadata?: Record<string, unknown>): ContextInfo {
    const id = "ctx_" + crypto.randomUUID().replace(/-/g, "").slice(0, 24);
    const s = Session.create(this.opts.dataDir, id, {
      fingerprint: this.fingerprint,
      heads: this.headsFile.heads,
      params: this.params,
      metadata,
    });
    this.sessions.set(id, s);
    this.metrics.activeContexts = this.sessions.size;
    return this.infoOf(s);
  }

  getContext(id: string): ContextInfo | null {
    const s = ID_RE.test(id) ? this.sessions.get(id) : undefined;
    return s ? this.infoOf(s) : null;
  }

  listContexts(): ContextInfo[] {
    return [...this.sessions.values()].map((s) => this.infoOf(s)).sort((a, b) => a.createdAt - b.createdAt);
  }

  append(id: string, bytes: Uint8Array): Promise<ContextInfo> {
    const s = this.get(id);
    return this.chain(id, async () => {
      if (!this.sessions.has(id)) throw new EngineError(404, "context_not_found", `context ${id} not found`, "context_id");
      if (s.meta.failed) throw new EngineError(409, "context_failed", `context ${id} failed: ${s.meta.failed}`, "context_id");
      try {
        s.appendBytes(bytes, this.tok, false);
        this.progress(s);
        await this.sched.run(this.compressTask(s, false));
      } catch (e) {
        throw this.failSession(s, e);
      }
      return this.infoOf(s);
    });
  }

  finalize(id: string): Promise<ContextInfo> {
    const s = this.get(id);
    return this.chain(id, async () => {
      if (!this.sessions.has(id)) throw new EngineError(404, "context_not_found", `context ${id} not found`, "context_id");
      if (s.meta.failed) throw new EngineError(409, "context_failed", `context ${id} failed: ${s.meta.failed}`, "context_id");
      try {
        s.appendBytes(new Uint8Array(0), this.tok, true);
        await this.sched.run(this.compressTask(s, true));
        s.meta.finalized = true;
        s.saveMeta(true);
      } catch (e) {
        throw this.failSession(s, e);
      }
      this.progress(s);
      return this.infoOf(s);
    });
  }

  private failSession(s: Session, e: unknown): EngineError {
    const err = toEngineError(e);
    if (err.status >= 500 && this.sessions.has(s.id)) {
      try {
        s.fail(err.message);
      } catch {
        /* ignore */
      }
      this.dropLive(s.id, false);
      this.progress(s);
    }
    return err;
  }

  deleteContext(id: string): Promise<boolean> {
    if (!ID_RE.test(id) || !this.sessions.has(id)) return Promise.resolve(false);
    return this.chain(id, async () => {
      const s = this.sessions.get(id);
      if (!s) return false;
      this.dropLive(id, false);
      this.sessions.delete(id);
      s.destroy();
      this.metrics.activeContexts = this.sessions.size;
      return true;
    });
  }

  // ------------------------------------------------------------ compressors

  private dropLive(id: string, save: boolean): void {
    const l = this.live.get(id);
    if (!l) return;
    this.live.delete(id);
    const s = this.sessions.get(id);
    if (save && s && l.dirty > 0 && !s.meta.failed) {
      try {
        s.saveCompressorState(l.comp.saveState(), l.comp.seen());
      } catch (e) {
        console.error(`[engine] saving compressor state of ${id} failed: ${(e as Error).message}`);
      }
    }
    l.comp.destroy();
  }

  private evictIdle(): void {
    const now = Date.now();
    for (const [id, l] of this.live) {
      if (now - l.lastUsed > this.defaults.idleMs && !this.chains.has(id)) this.dropLive(id, true);
    }
  }

  /** Live compressor of a session; restored from its saved state + replay of stored tokens. */
  private *ensureCompressor(s: Session): Task<Live> {
    const have = this.live.get(s.id);
    if (have) {
      this.live.delete(s.id);
      this.live.set(s.id, have); // LRU order
      have.lastUsed = Date.now();
      return have;
    }
    const comp = this.model.createCompressor(this.compressParams(), s.meta.heads);
    const l: Live = { comp, dirty: 0, lastUsed: Date.now() };
    try {
      let seen = 0;
      const st = s.loadCompressorState();
      if (st) {
        comp.loadState(st.blob);
        seen = st.seen;
      }
      const chunk = s.meta.params.chunkSize;
      while (seen < s.meta.processed) {
        const n = Math.min(chunk, s.meta.processed - seen);
        comp.process(s.readTokens(seen, seen + n), null);
        seen += n;
        l.dirty++;
        yield;
      }
    } catch (e) {
      comp.destroy();
      throw e;
    }
    this.live.set(s.id, l);
    while (this.live.size > this.defaults.maxLiveCompressors) {
      const oldest = this.live.keys().next().value as string;
      if (oldest === s.id) break;
      this.dropLive(oldest, true);
    }
    return l;
  }

  /** Compress the stored-but-unprocessed tokens: complete chunks only, or everything when `final`. */
  private *compressTask(s: Session, final: boolean): Task<void> {
    const chunk = s.meta.params.chunkSize;
    const pending = () => s.meta.tokens - s.meta.processed;
    if (pending() < (final ? 1 : chunk)) {
      if (final) {
        const l = this.live.get(s.id);
        if (l && l.dirty > 0) {
          s.saveCompressorState(l.comp.saveState(), l.comp.seen());
          l.dirty = 0;
        }
      }
      return;
    }
    const l = yield* this.ensureCompressor(s);
    while (pending() >= (final ? 1 : chunk)) {
      if (!this.sessions.has(s.id)) return; // deleted meanwhile
      const n = Math.min(chunk, pending());
      const toks = s.readTokens(s.meta.processed, s.meta.processed + n);
      const emb = l.comp.process(toks)!;
      s.appendEmbeddings(emb, n);
      l.dirty++;
      l.lastUsed = Date.now();
      this.metrics.tokensProcessedTotal += n;
      if (n < chunk || l.dirty >= this.defaults.stateSaveEvery) {
        s.saveCompressorState(l.comp.saveState(), l.comp.seen());
        l.dirty = 0;
      }
      this.progress(s);
      yield;
    }
    if (final && l.dirty > 0) {
      s.saveCompressorState(l.comp.saveState(), l.comp.seen());
      l.dirty = 0;
    }
  }

  // ------------------------------------------------------------ queries

  abort(qid: string): void {
    this.aborted.add(qid);
  }

  /**
   * Validate and run a query. `emit` receives the events; the promise resolves after "done".
   * Request errors are thrown (rejected) before any event is emitted.
   */
  query(qid: string, req: QueryWire, emit: (ev: QueryEvent) => void): Promise<void> {
    const tReq = performance.now();
    this.metrics.requestsTotal++;
    try {
      const method = validateMethod(req.method ?? "reform");
      const budget = validateBudget(req.budget ?? this.defaults.budget, this.defaults.maxBudget);
      const sp = req.sampling;
      if (!sp || !Number.isInteger(sp.maxTokens) || sp.maxTokens < 1) {
        throw new EngineError(400, "invalid_request", "sampling.maxTokens must be a positive integer", "max_tokens");
      }
      validateSamplingExtras(sp, this.cfg.config.vocabSize);
      if (sp.maxTokens > this.defaults.maxNewTokens) {
        throw new EngineError(
          400,
          "max_tokens_too_large",
          `max_tokens ${sp.maxTokens} exceeds the server's maximum of ${this.defaults.maxNewTokens} new tokens`,
          "max_tokens",
        );
      }
      let s: Session | null = null;
      if (req.contextId !== undefined && req.contextId !== null) {
        s = this.get(req.contextId);
        const st = s.state;
        if (st !== "ready") {
          const why = st === "failed" ? `failed: ${s.meta.failed}` : st === "empty" ? "empty" : "still processing (finalize it first)";
          throw new EngineError(409, "context_not_ready", `context ${s.id} is ${why}`, "context_id");
        }
        if (method === "full" && s.meta.tokens > this.defaults.maxBudget) {
          throw new EngineError(
            400,
            "context_too_long",
            `context has ${s.meta.tokens} tokens, more than the recompute capacity ${this.defaults.maxBudget} of method "full"`,
            "method",
          );
        }
      }
      let rendered: string;
      let question: string;
      if (req.prompt !== undefined && req.prompt !== null) {
        if (req.question != null || req.messages != null)
          throw new EngineError(400, "invalid_request", "give either `prompt` or `question` / `messages`, not both", "prompt");
        if (typeof req.prompt !== "string" || req.prompt.length === 0)
          throw new EngineError(400, "invalid_request", "`prompt` must be a non-empty string", "prompt");
        rendered = s ? CONTEXT_PLACEHOLDER + req.prompt : req.prompt;
        question = req.prompt;
      } else {
        const b = buildMessages(req, s !== null);
        rendered = this.tok.renderChat(b.messages, true);
        question = b.question;
      }
      return this.sched.run(this.queryTask(qid, req, method, budget, s, rendered, question, tReq, emit)).finally(() => this.aborted.delete(qid));
    } catch (e) {
      this.aborted.delete(qid);
      return Promise.reject(toEngineError(e));
    }
  }

  private *queryTask(
    qid: string,
    req: QueryWire,
    method: string,
    budget: number,
    s: Session | null,
    rendered: string,
    question: string,
    tReq: number,
    emit: (ev: QueryEvent) => void,
  ): Task<void> {
    const tStart = performance.now();
    const sp = req.sampling;
    let seq: NativeSeq | null = null;
    let h2oComp: NativeCompressor | null = null;
    const contextTokens = s ? s.meta.tokens : 0;
    let selected = 0;
    let started = false;
    try {
      // ---- build the prompt
      let pre: number[] = [];
      let ctx: Int32Array = new Int32Array(0);
      let suf: number[] = [];
      if (!s) {
        pre = this.tok.encodePrompt(rendered);
      } else {
        const parts = splitAtPlaceholder(rendered);
        // every method keeps the context's first tokens (edges / sinks), so its first token follows the prefix
        const first = s.meta.tokens > 0 ? s.readTokens(0, 1)[0] : undefined;
        ({ pre, suf } = this.tok.encodeAround(parts.prefix, first, parts.suffix));
        const n = s.meta.tokens;
        if (method === "reform") {
          if (n <= budget) ctx = s.readTokens(0, n);
          else {
            const l = yield* this.ensureCompressor(s);
            let q = this.tok.encode(question);
            if (q.length === 0) q = suf.slice();
            const maxQ = Math.max(this.defaults.chunkSize, 512);
            if (q.length > maxQ) q = q.slice(q.length - maxQ);
            const qe = l.comp.embed(Int32Array.from(q));
            const qf = qe instanceof Uint16Array ? f16ToF32(qe) : qe;
            const emb = s.embeddings();
            const d = this.defaults;
            const idx = this.native.scoreSelect(emb, s.meta.processed, s.meta.params.embDim, qf, q.length, { window: d.window, budget, edge: d.edge });
            ctx = gather(s.readTokens(0, n), idx);
            yield;
          }
        } else if (method === "full") {
          ctx = s.readTokens(0, n);
        } else if (method === "streaming") {
          ctx = gather(s.readTokens(0, n), streamingSelection(n, budget, this.defaults.nSink));
        } else if (method === "h2o") {
          const all = s.readTokens(0, n);
          const d = this.defaults;
          h2oComp = this.model.createCompressor(
            {
              capacity: budget + pre.length,
              nSink: d.nSink,
              nRecent: Math.max(1, Math.min(d.obsWindow, Math.floor(budget / 4))),
              obsWindow: d.obsWindow,
              maxChunk: Math.max(d.chunkSize, 512),
              embDtype: RF_F16,
              exitLayer: this.cfg.config.numLayers - 1,
            },
            s.meta.heads,
          );
          const full = new Int32Array(pre.length + all.length);
          full.set(pre);
          full.set(all, pre.length);
          for (let off = 0; off < full.length; off += d.chunkSize) {
            if (this.aborted.has(qid)) break;
            h2oComp.process(full.subarray(off, Math.min(full.length, off + d.chunkSize)), null);
            yield;
          }
          selected = Math.min(n, Math.max(0, h2oComp.cacheLen() - pre.length));
        }
      }
      if (method !== "h2o" || !s) selected = ctx.length;
      const promptLen = h2oComp ? h2oComp.cacheLen() + suf.length : pre.length + ctx.length + suf.length;
      const prompt = new Int32Array(h2oComp ? suf.length : promptLen);
      if (h2oComp) prompt.set(suf);
      else {
        prompt.set(pre);
        prompt.set(ctx, pre.length);
        prompt.set(suf, pre.length + ctx.length);
      }
      seq = this.model.createSeq(promptLen + sp.maxTokens + 1);
      seq.setSeed(sp.seed ?? Math.floor(Math.random() * 2 ** 52));
      if (h2oComp) {
        seq.importCompressor(h2oComp);
        h2oComp.destroy();
        h2oComp = null;
      }
      emit({ type: "start", promptTokens: promptLen, selectedTokens: selected, contextTokens });
      started = true;
      this.metrics.promptTokensTotal += promptLen;

      // ---- prefill (logits on the host only when the sampler needs adjusting or logprobs are asked for)
      const V = this.cfg.config.vocabSize;
      const proc = new LogitProcessor(sp, V, prompt);
      const wantLp = sp.logprobs != null;
      const raw = proc.active || wantLp ? new Float32Array(V) : null;
      const adj = proc.active ? new Float32Array(V) : null;
      const pc = this.defaults.prefillChunk;
      for (let off = 0; off < prompt.length; off += pc) {
        if (this.aborted.has(qid)) break;
        const end = Math.min(prompt.length, off + pc);
        seq.forward(prompt.subarray(off, end), raw !== null && end === prompt.length, raw ?? undefined);
        yield;
      }

      // ---- decode
      const dec = this.tok.streamDecoder();
      const stop = new StopMatcher(sp.stop ?? []);
      let finish: "stop" | "length" | "abort" = "length";
      let generated = 0;
      let tFirst = 0;
      let tLast = 0;
      const sampling = { temperature: sp.temperature ?? 0, topP: sp.topP ?? 1, topK: sp.topK ?? 0 };
      const one = new Int32Array(1);
      while (true) {
        if (this.aborted.has(qid)) {
          finish = "abort";
          break;
        }
        if (generated >= sp.maxTokens) {
          finish = "length";
          break;
        }
        const id = adj ? seq.sampleFrom(proc.adjust(raw!, adj), sampling) : seq.sample(sampling);
        let lp: (TokenLogprob & { top: TokenLogprob[] }) | undefined;
        if (wantLp) {
          const r = logprobsOf(raw!, id, sp.logprobs!);
          const info = (t: number, l: number): TokenLogprob => ({
            tokenId: t,
            token: this.tok.tokenText(t),
            bytes: Array.from(this.tok.tokenBytes(t)),
            logprob: l,
          });
          lp = { ...info(id, r.logprob), top: r.top.map((t) => info(t.id, t.logprob)) };
        }
        proc.add(id);
        generated++;
        const now = performance.now();
        if (generated === 1) {
          tFirst = now;
          this.pushSample(this.metrics.ttftSeconds, (now - tReq) / 1000);
        }
        tLast = now;
        this.metrics.tokensGeneratedTotal++;
        if (this.tok.isEos(id)) {
          finish = "stop";
          break;
        }
        const piece = dec.push(id);
        const r = stop.push(piece);
        if (r.emit.length > 0 || !r.stopped) emit({ type: "token", text: r.emit, tokenId: id, ...(lp ? { logprob: lp } : {}) });
        if (r.stopped) {
          finish = "stop";
          break;
        }
        if (generated >= sp.maxTokens) {
          finish = "length";
          break;
        }
        one[0] = id;
        seq.forward(one, raw !== null, raw ?? undefined);
        yield;
      }
      if (finish !== "stop") {
        // flush held-back text (incomplete stop-string prefixes, trailing partial characters)
        const r = stop.push(dec.flush());
        const rest = r.stopped ? r.emit : r.emit + stop.flush();
        if (rest.length > 0) emit({ type: "token", text: rest, tokenId: -1 });
      }
      const tEnd = performance.now();
      const tpot = generated > 1 ? (tLast - tFirst) / (generated - 1) : 0;
      if (generated > 1) this.pushSample(this.metrics.tpotSeconds, tpot / 1000);
      emit({
        type: "done",
        finishReason: finish,
        usage: { promptTokens: promptLen, completionTokens: generated, contextTokens, selectedTokens: selected },
        timings: {
          queueMs: tStart - tReq,
          ttftMs: generated > 0 ? tFirst - tReq : 0,
          tpotMs: tpot,
          totalMs: tEnd - tReq,
        },
      });
    } finally {
      void started;
      seq?.destroy();
      h2oComp?.destroy();
    }
  }

  private pushSample(arr: number[], v: number): void {
    arr.push(v);
    if (arr.length > 256) arr.splice(0, arr.length - 256);
  }

  countTokens(text: string): number {
    return this.tok.encode(text).length;
  }

  tokenize(text: string, addSpecial: boolean): number[] {
    const ids = this.tok.encode(text);
    return addSpecial ? this.tok.withBos(ids) : ids;
  }

  detokenize(ids: number[], skipSpecial: boolean): string {
    const V = this.cfg.config.vocabSize;
    const bad = ids.findIndex((x) => !Number.isInteger(x) || x < 0 || x >= V);
    if (bad >= 0) throw new EngineError(400, "invalid_request", `tokens[${bad}] = ${ids[bad]} is not a token id of this model (0..${V - 1})`, "tokens");
    return this.tok.decode(ids, skipSpecial);
  }

  snapshotMetrics(): EngineMetrics {
    return { ...this.metrics, queueDepth: this.sched.depth, ttftSeconds: [...this.metrics.ttftSeconds], tpotSeconds: [...this.metrics.tpotSeconds] };
  }

  async close(): Promise<void> {
    if (this.idleTimer) clearInterval(this.idleTimer);
    // wait for in-flight session operations
    await Promise.all([...this.chains.values()]);
    for (const id of [...this.live.keys()]) this.dropLive(id, true);
    this.model?.destroy();
  }
}

// ---------------------------------------------------------------- worker entry

declare const self: Worker;

export type ToWorker =
  | { t: "init"; opts: EngineOptions }
  | { t: "call"; id: number; op: string; args: any[] }
  | { t: "query"; id: number; req: QueryWire }
  | { t: "abort"; id: number };

export type FromWorker =
  | { t: "loaded"; info: ModelInfo }
  | { t: "loadFailed"; error: string }
  | { t: "res"; id: number; ok: true; result: unknown }
  | { t: "res"; id: number; ok: false; error: { status: number; code: string; message: string; param: string | null } }
  | { t: "ev"; id: number; ev: QueryEvent }
  | { t: "progress"; info: ContextInfo }
  | { t: "metrics"; m: EngineMetrics };

function errWire(e: unknown) {
  const err = toEngineError(e);
  return { status: err.status, code: err.code, message: err.message, param: err.param };
}

if (typeof Bun !== "undefined" && !Bun.isMainThread) {
  let core: EngineCore | null = null;
  let loadError: string | null = null;
  const post = (m: FromWorker) => self.postMessage(m);
  let lastMetrics = 0;
  const pushMetrics = (force = false) => {
    if (!core) return;
    const now = Date.now();
    if (!force && now - lastMetrics < 50) return;
    lastMetrics = now;
    post({ t: "metrics", m: core.snapshotMetrics() });
  };

  const ops: Record<string, (...a: any[]) => unknown> = {
    createContext: (meta?: Record<string, unknown>) => core!.createContext(meta),
    append: (id: string, bytes: Uint8Array) => core!.append(id, bytes),
    finalize: (id: string) => core!.finalize(id),
    getContext: (id: string) => core!.getContext(id),
    listContexts: () => core!.listContexts(),
    deleteContext: (id: string) => core!.deleteContext(id),
    countTokens: (text: string) => core!.countTokens(text),
    tokenize: (text: string, addSpecial: boolean) => core!.tokenize(text, addSpecial),
    detokenize: (ids: number[], skipSpecial: boolean) => core!.detokenize(ids, skipSpecial),
    close: async () => {
      await core?.close();
      return true;
    },
  };

  self.onmessage = async (ev: MessageEvent<ToWorker>) => {
    const m = ev.data;
    if (m.t === "init") {
      try {
        core = new EngineCore(m.opts, (info) => post({ t: "progress", info }));
        const info = core.load();
        const again = core.sched.onStep;
        core.sched.onStep = () => {
          again();
          pushMetrics();
        };
        post({ t: "loaded", info });
        pushMetrics(true);
      } catch (e) {
        loadError = e instanceof Error ? e.message : String(e);
        core = null;
        post({ t: "loadFailed", error: loadError });
      }
      return;
    }
    if (m.t === "abort") {
      core?.abort(String(m.id));
      return;
    }
    if (!core) {
      const error = { status: 503, code: "model_not_loaded", message: `model not loaded${loadError ? `: ${loadError}` : ""}`, param: null };
      if (m.t === "call" || m.t === "query") post({ t: "res", id: m.id, ok: false, error });
      return;
    }
    if (m.t === "query") {
      try {
        await core.query(String(m.id), m.req, (e) => {
          if (e.type === "done") pushMetrics(true);
          post({ t: "ev", id: m.id, ev: e });
        });
        post({ t: "res", id: m.id, ok: true, result: null });
      } catch (e) {
        post({ t: "res", id: m.id, ok: false, error: errWire(e) });
      }
      pushMetrics(true);
      return;
    }
    if (m.t === "call") {
      const fn = ops[m.op];
      try {
        if (!fn) throw new EngineError(500, "internal_error", `unknown op ${m.op}`);
        const result = await fn(...m.args);
        post({ t: "res", id: m.id, ok: true, result });
      } catch (e) {
        post({ t: "res", id: m.id, ok: false, error: errWire(e) });
      }
      pushMetrics(true);
    }
  };
}
