/**
 * In-memory EngineClient for HTTP-layer tests that need deterministic timing (409 while
 * processing, slow generation for disconnects, loading/failed states). The main HTTP tests use
 * the real engine.
 */
import {
  EngineError,
  emptyMetrics,
  type ContextInfo,
  type EngineClient,
  type EngineMetrics,
  type ModelInfo,
  type QueryEvent,
  type QueryRequest,
} from "../../src/engine/api.ts";
import type { SamplingDefaults } from "../../src/model/generation-config.ts";

export interface FakeOptions {
  /** ms each append stays in "processing". */
  appendDelayMs?: number;
  /** ms between generated tokens. */
  tokenDelayMs?: number;
  /** ms each getContext takes (a slow answer on a route that keeps the idle timeout). */
  getDelayMs?: number;
  state?: "loading" | "ready" | "failed";
  loadError?: string;
  /** the model's generation_config.json sampling defaults (ModelInfo.generation) */
  generation?: SamplingDefaults;
}

interface Ctx {
  info: ContextInfo;
  decoder: TextDecoder;
  text: string;
}

export class FakeEngine implements EngineClient {
  private ctxs = new Map<string, Ctx>();
  private subs = new Map<string, Set<(i: ContextInfo | null) => void>>();
  private n = 0;
  st: "loading" | "ready" | "failed";
  err: string | null;
  aborted = 0;
  generated = 0;
  activeQueries = 0;
  lastQuery: QueryRequest | null = null;
  private readonly generation: SamplingDefaults;
  appendDelayMs: number;
  tokenDelayMs: number;
  getDelayMs: number;
  /** throw an EngineError(500) after this many tokens (mid-stream fault). */
  failAfterTokens: number | null = null;
  /** an append that would take a context past this many bytes fails with an EngineError(500) (a device fault) */
  failAppendPastBytes: number | null = null;
  /** count a piece's bytes only once its append delay is over (as the real engine: stored, then counted) */
  countBytesWhenStored = false;
  /** each query first reports this many `compress` progress steps, `progressDelayMs` apart (an inline request) */
  progressSteps = 0;
  progressDelayMs = 0;
  readonly texts = new Map<string, string>();

  constructor(o: FakeOptions = {}) {
    this.appendDelayMs = o.appendDelayMs ?? 0;
    this.tokenDelayMs = o.tokenDelayMs ?? 0;
    this.getDelayMs = o.getDelayMs ?? 0;
    this.st = o.state ?? "ready";
    this.err = o.loadError ?? null;
    this.generation = o.generation ?? {};
  }

  state() {
    return this.st;
  }
  loadError() {
    return this.err;
  }
  async ready() {
    if (this.st !== "ready") throw new Error("not ready");
  }
  modelInfo(): ModelInfo {
    return {
      id: "fake-model",
      path: "/fake",
      architecture: "LlamaForCausalLM",
      backend: "cpu",
      device: "fake",
      deviceWarnings: [],
      memory: {
        weights: 1,
        workspace: 0,
        perCompressor: 1,
        recomputeSeq: 1,
        maxModelLen: 256,
        deviceFree: null,
        deviceTotal: null,
        maxLiveCompressors: 8,
        fits: true,
        residentBudget: 0,
        residentTokens: 0,
      },
      trainedContext: 256,
      vocabSize: 320,
      numLayers: 2,
      heads: [],
      exitLayer: 1,
      generation: this.generation,
      defaults: {
        budget: 64,
        maxBudget: 128,
        chunkSize: 32,
        capacity: 64,
        maxTokens: 8,
        maxNewTokens: 64,
        maxModelLen: 256,
        maxH2oTokens: 4096,
        maxDiskBytes: 0,
        smoothingWindow: 3,
        smoothingLag: 0,
        smoothing: "mean",
        edge: 2,
        sentenceTail: 0,
        scoreFloor: 0,
        scoreBackground: "off",
        maxQueryTokens: 192,
        baselineCacheFactor: 4,
        inlineMaxContexts: 16,
        inlineMaxAgeSec: 86400,
        inlineMaxDiskBytes: 0,
        templateTokens: 8,
        allowBeyondWindow: false,
      },
      compressor: {
        chunkSize: 32,
        capacity: 64,
        nSink: 4,
        nRecent: 16,
        obsWindow: 32,
        eviction: "h2o",
        embedDim: 24,
        embedDtype: "f16",
        exitLayer: 1,
        bosTokenId: null,
      },
    };
  }

  private notify(c: Ctx) {
    c.info = { ...c.info, updatedAt: Date.now() };
    for (const cb of this.subs.get(c.info.id) ?? []) cb({ ...c.info });
  }

  async createContext(opts?: { metadata?: Record<string, unknown> }) {
    const id = `ctx${++this.n}`;
    const now = Date.now();
    const info: ContextInfo = {
      id,
      state: "empty",
      createdAt: now,
      updatedAt: now,
      bytesReceived: 0,
      tokensReceived: 0,
      tokensProcessed: 0,
      pendingChars: 0,
      embeddingBytes: 0,
      diskBytes: 0,
      cacheLen: 0,
      invalidUtf8: 0,
      metadata: opts?.metadata,
    };
    this.ctxs.set(id, { info, decoder: new TextDecoder("utf-8", { fatal: false }), text: "" });
    return { ...info };
  }

  private must(id: string): Ctx {
    const c = this.ctxs.get(id);
    if (!c) throw new EngineError(404, "context_not_found", `context '${id}' not found`, "context_id");
    return c;
  }

  async append(id: string, bytes: Uint8Array) {
    const c = this.must(id);
    if (this.failAppendPastBytes !== null && c.info.bytesReceived + bytes.byteLength > this.failAppendPastBytes)
      throw new EngineError(500, "device_error", "simulated device fault while compressing");
    c.text += c.decoder.decode(bytes, { stream: true });
    if (!this.countBytesWhenStored) c.info.bytesReceived += bytes.byteLength;
    c.info.tokensReceived = c.text.length;
    c.info.state = "processing";
    this.notify(c);
    if (this.appendDelayMs) await Bun.sleep(this.appendDelayMs);
    if (this.countBytesWhenStored) c.info.bytesReceived += bytes.byteLength;
    c.info.tokensProcessed = c.text.length;
    c.info.embeddingBytes = c.text.length * 4;
    c.info.diskBytes = c.text.length * 8;
    c.info.state = "ready";
    this.texts.set(id, c.text);
    this.notify(c);
    return { ...c.info };
  }

  async finalize(id: string) {
    const c = this.must(id);
    c.text += c.decoder.decode();
    c.info.tokensReceived = c.info.tokensProcessed = c.text.length;
    c.info.state = "ready";
    this.texts.set(id, c.text);
    this.notify(c);
    return { ...c.info };
  }

  async getContext(id: string) {
    if (this.getDelayMs) await Bun.sleep(this.getDelayMs);
    const c = this.ctxs.get(id);
    return c ? { ...c.info } : null;
  }
  async listContexts() {
    return [...this.ctxs.values()].map((c) => ({ ...c.info }));
  }
  async deleteContext(id: string) {
    const had = this.ctxs.delete(id);
    if (had) for (const cb of this.subs.get(id) ?? []) cb(null);
    this.subs.delete(id);
    return had;
  }
  subscribe(id: string, cb: (info: ContextInfo | null) => void) {
    let s = this.subs.get(id);
    if (!s) this.subs.set(id, (s = new Set()));
    s.add(cb);
    return () => s!.delete(cb);
  }

  query(req: QueryRequest): AsyncIterable<QueryEvent> {
    this.lastQuery = req;
    if (req.contextId !== undefined) {
      const c = this.must(req.contextId);
      if (c.info.state !== "ready")
        throw new EngineError(409, "context_not_ready", `context '${req.contextId}' is ${c.info.state}`, "context_id");
    }
    if (req.budget !== undefined && req.budget > 128)
      throw new EngineError(400, "budget_too_large", "budget too large", "budget");
    const self = this;
    const words = ["the", " answer", " is", " 42", " ok", " done", " more", " words", " here", " end"];
    return {
      async *[Symbol.asyncIterator]() {
        self.activeQueries++;
        const t0 = performance.now();
        let n = 0;
        let finish: "stop" | "length" | "abort" = "length";
        let completed = false;
        try {
          for (let i = 1; i <= self.progressSteps; i++) {
            if (i > 1 && self.progressDelayMs) await Bun.sleep(self.progressDelayMs);
            yield { type: "progress", stage: "compress", done: i * 128, total: self.progressSteps * 128 };
          }
          yield { type: "start", promptTokens: 10, selectedTokens: 5, contextTokens: 20 };
          for (; n < req.sampling.maxTokens; n++) {
            if (req.signal?.aborted) {
              finish = "abort";
              break;
            }
            if (self.tokenDelayMs) await Bun.sleep(self.tokenDelayMs);
            if (req.signal?.aborted) {
              finish = "abort";
              break;
            }
            if (self.failAfterTokens !== null && n >= self.failAfterTokens) {
              throw new EngineError(500, "device_error", "simulated device fault");
            }
            self.generated++;
            yield { type: "token", text: words[n % words.length]!, tokenId: n };
          }
          const total = performance.now() - t0;
          yield {
            type: "done",
            finishReason: finish,
            usage: { promptTokens: 10, completionTokens: n, contextTokens: 20, selectedTokens: 5 },
            timings: { queueMs: 0, ttftMs: 1, tpotMs: 1, totalMs: total },
          };
          completed = finish !== "abort";
        } finally {
          if (!completed) self.aborted++;
          self.activeQueries--;
        }
      },
    };
  }

  async countTokens(text: string) {
    return text.length;
  }
  async tokenize(text: string, addSpecial = false) {
    const ids = Array.from(text, (ch) => ch.codePointAt(0)!);
    return addSpecial ? [0, ...ids] : ids;
  }
  async detokenize(ids: number[]) {
    return String.fromCodePoint(...ids.filter((x) => x > 0));
  }
  metrics(): EngineMetrics {
    return {
      tokensProcessedTotal: 0,
      tokensGeneratedTotal: this.generated,
      promptTokensTotal: 0,
      requestsTotal: 0,
      queueDepth: 0,
      activeContexts: this.ctxs.size,
      diskBytes: [...this.ctxs.values()].reduce((n, c) => n + c.info.diskBytes, 0),
      residentBytes: 0,
      residentContexts: 0,
      residentEvictions: 0,
      ttftSeconds: [0.01, 0.02],
      tpotSeconds: [0.001],
      inline: emptyMetrics().inline,
    };
  }
  async close() {}
}
