/**
 * The engine inside its worker: the loaded model, the registry of context sessions and the operations
 * on them (the `EngineCalls` of protocol.ts), all native work run through the one Scheduler.
 * Appends / finalize / delete of one session are serialised (a per-session chain); queries are not
 * (they read a snapshot of the embedding file and use the compressor in a single step).
 */
import { mkdirSync, readdirSync } from "node:fs";
import { join } from "node:path";
import {
  type ContextInfo,
  EngineError,
  type EngineMetrics,
  emptyMetrics,
  type ModelInfo,
  type QueryEvent,
} from "./api.ts";
import { checkServerLimits, planQuery, runQuery } from "./answer.ts";
import { CompressorPool } from "./compressors.ts";
import { contextDeleted, contextNotFound, toEngineError } from "./errors.ts";
import { InlineCache, type InlinePlan, planInline } from "./inline.ts";
import { type EngineOptions, type LoadedEngine, loadEngine } from "./load.ts";
import type { EngineCalls } from "./protocol.ts";
import { ResidentPool } from "./resident.ts";
import { Scheduler, type Task } from "./scheduler.ts";
import { isContextId, parseQuery, type QueryWire } from "./schema.ts";
import { Session } from "./session.ts";

const MAX_SAMPLES = 256;
/** Bytes of text tokenized per scheduler step (about 20 ms of tokenizer work). */
const APPEND_SLICE = 64 << 10;

function pushSample(arr: number[], v: number): void {
  arr.push(v);
  if (arr.length > MAX_SAMPLES) arr.splice(0, arr.length - MAX_SAMPLES);
}

export class EngineCore implements EngineCalls {
  readonly e: LoadedEngine;
  readonly sched = new Scheduler();
  private readonly pool: CompressorPool;
  /** resident context embeddings on the device (none on the CPU backend) */
  private readonly resident: ResidentPool;
  private readonly sessions = new Map<string, Session>();
  private readonly chains = new Map<string, Promise<unknown>>();
  private readonly aborted = new Set<string>();
  /** ids deleted lately, so requests that were waiting on them learn why they vanished (bounded) */
  private readonly deleted = new Set<string>();
  /**
   * set by close(): uploads stop at their next slice or chunk (what is stored stays; the client resumes from
   * bytes_received after the restart), new writes are refused, so shutting down waits for one step, not a piece
   */
  private closing = false;
  private readonly idleTimer: ReturnType<typeof setInterval>;
  private readonly sessionOf = (id: string) => this.sessions.get(id);
  /** implicit contexts of inline requests (prompts beyond the window sent without a context) */
  readonly inline: InlineCache;

  readonly metrics: EngineMetrics = emptyMetrics();

  constructor(
    readonly opts: EngineOptions,
    private readonly emitProgress: (info: ContextInfo) => void = () => {},
    private readonly emitDeleted: (id: string) => void = () => {},
  ) {
    this.e = loadEngine(opts);
    this.resident = new ResidentPool(this.e.model, this.e.params.embDim, this.e.info.memory.residentBudget);
    this.pool = new CompressorPool(this.e.model, this.e.defaults, this.e.bos, this.resident);
    this.inline = new InlineCache(this.e, {
      create: (metadata) => this.get(this.createContext({ metadata }).id),
      session: this.sessionOf,
      compress: (s, ids, bytes, progress) => this.compressInline(s, ids, bytes, progress),
      remove: (id) => this.deleteContext(id),
      diskRoom: () =>
        this.e.defaults.maxDiskBytes > 0 ? this.e.defaults.maxDiskBytes - this.diskBytes() : Number.POSITIVE_INFINITY,
    });
    this.loadSessions();
    this.idleTimer = setInterval(() => {
      this.pool.evictIdle(this.sessionOf, (id) => this.chains.has(id));
      void this.inline.evictAged().catch(() => {});
    }, 15_000);
    (this.idleTimer as { unref?: () => void }).unref?.();
  }

  get info(): ModelInfo {
    return this.e.info;
  }

  private loadSessions(): void {
    const dir = join(this.opts.dataDir, "contexts");
    mkdirSync(dir, { recursive: true });
    for (const name of readdirSync(dir)) {
      if (!isContextId(name)) continue;
      const s = Session.load(join(dir, name));
      if (!s) continue;
      if (s.meta.fingerprint === this.e.legacyFingerprint && !s.meta.failed) {
        // stored by a version whose fingerprint did not sample the weights: same config, sizes and setup
        s.meta.fingerprint = this.e.fingerprint;
        s.saveMeta(true);
      }
      if (s.meta.fingerprint !== this.e.fingerprint && !s.meta.failed) {
        s.fail("context was built with a different model or head/compression configuration");
      }
      this.sessions.set(s.id, s);
      // an implicit context is a cache entry: one that cannot serve (unfinished, failed) is deleted
      if (s.meta.metadata?.inline === true && !this.inline.adopt(s)) {
        this.sessions.delete(s.id);
        s.destroy();
      }
    }
    this.metrics.activeContexts = this.sessions.size;
  }

  // ------------------------------------------------------------ sessions

  /** The session of a context, for in-process tools (benchmarks); the server goes through the operations below. */
  session(id: string): Session | undefined {
    return this.sessions.get(id);
  }

  private get(id: string): Session {
    const s = this.sessions.get(id);
    if (!s) throw this.deleted.has(id) ? contextDeleted(id) : contextNotFound(id);
    return s;
  }

  private infoOf(s: Session): ContextInfo {
    return s.info(this.pool.cacheLen(s.id));
  }

  private progress(s: Session): void {
    this.emitProgress(this.infoOf(s));
  }

  /** Runs `fn` after the previous operation on session `id` finished, once the session still exists. */
  private chain<T>(id: string, fn: (s: Session) => Promise<T>): Promise<T> {
    this.get(id);
    const prev = this.chains.get(id) ?? Promise.resolve();
    const run = () => fn(this.get(id));
    const p = prev.then(run, run);
    const tail = p.catch(() => {});
    this.chains.set(id, tail);
    void tail.then(() => {
      if (this.chains.get(id) === tail) this.chains.delete(id);
    });
    return p;
  }

  createContext(opts?: { metadata?: Record<string, unknown> }): ContextInfo {
    const id = `ctx_${crypto.randomUUID().replace(/-/g, "").slice(0, 24)}`;
    const s = Session.create(this.opts.dataDir, id, {
      fingerprint: this.e.fingerprint,
      heads: this.e.headsFile.heads,
      params: this.e.params,
      metadata: opts?.metadata,
    });
    this.sessions.set(id, s);
    this.metrics.activeContexts = this.sessions.size;
    return this.infoOf(s);
  }

  getContext(id: string): ContextInfo | null {
    const s = this.sessions.get(id);
    return s ? this.infoOf(s) : null;
  }

  listContexts(): ContextInfo[] {
    return [...this.sessions.values()].map((s) => this.infoOf(s)).sort((a, b) => a.createdAt - b.createdAt);
  }

  private writable(s: Session): void {
    if (s.meta.failed)
      throw new EngineError(409, "context_failed", `context '${s.id}' failed: ${s.meta.failed}`, "context_id");
  }

  /** Disk used by all contexts' files. */
  diskBytes(): number {
    let n = 0;
    for (const s of this.sessions.values()) n += s.diskBytes;
    return n;
  }

  /** The disk cap: a piece is refused before it is stored when its estimated cost would pass the cap. */
  private checkDisk(s: Session, bytes: number): void {
    const cap = this.e.defaults.maxDiskBytes;
    if (cap <= 0 || bytes === 0) return;
    const used = this.diskBytes();
    const need = Math.ceil(bytes * s.diskBytesPerTextByte());
    if (used + need <= cap) return;
    throw new EngineError(
      413,
      "disk_quota_exceeded",
      `the contexts use ${used} of the ${cap} bytes of disk this server may use (--max-disk-bytes); ` +
        `${bytes} more bytes of text need about ${need} bytes (tokens, embeddings): delete contexts you no longer ` +
        "need (DELETE /v1/contexts/{id}) or raise the limit",
      null,
    );
  }

  append(id: string, bytes: Uint8Array): Promise<ContextInfo> {
    return this.chain(id, async (s) => {
      this.notClosing(s);
      this.writable(s);
      this.checkDisk(s, bytes.byteLength);
      try {
        await this.sched.run(this.appendTask(s, bytes), "background");
      } catch (e) {
        throw this.failSession(s, e);
      }
      this.notClosing(s); // stopped part-way: not all of these bytes are stored
      return this.infoOf(this.get(id)); // deleted meanwhile: the uploader hears so
    });
  }

  /**
   * Stores `bytes` one slice per scheduler step, compressing the complete chunks after each: tokenizing the few MiB
   * an upload hands over at once would hold every query back for a second or more (about 0.3 µs per byte).
   */
  private *appendTask(s: Session, bytes: Uint8Array): Task<void> {
    let off = 0;
    do {
      if (!this.sessions.has(s.id) || this.closing) return; // deleted / shutting down: the caller hears so
      s.appendBytes(bytes.subarray(off, off + APPEND_SLICE), this.e.tok, false);
      off += APPEND_SLICE;
      this.progress(s);
      yield;
      yield* this.compress(s, false);
    } while (off < bytes.byteLength);
  }

  finalize(id: string): Promise<ContextInfo> {
    return this.chain(id, async (s) => {
      this.notClosing(s);
      this.writable(s);
      try {
        s.appendBytes(new Uint8Array(0), this.e.tok, true);
        await this.sched.run(this.compress(s, true), "background");
      } catch (e) {
        throw this.failSession(s, e);
      }
      this.notClosing(s); // compression stopped part-way: not finalized
      try {
        this.get(id);
        s.meta.finalized = true;
        s.saveMeta(true);
      } catch (e) {
        throw this.failSession(s, e);
      }
      this.progress(s);
      return this.infoOf(s);
    });
  }

  private compress(s: Session, final: boolean) {
    return this.pool.compress(
      s,
      final,
      this.sessionOf,
      (n) => {
        this.metrics.tokensProcessedTotal += n;
        this.progress(s);
      },
      () => !this.sessions.has(s.id) || this.closing,
    );
  }

  /** Writes stop once the engine is closing (503, retryable after the restart: what was stored stays). */
  private notClosing(s: Session): void {
    if (this.closing)
      throw new EngineError(
        503,
        "shutting_down",
        `the server is shutting down; context '${s.id}' keeps the first ${s.meta.bytesReceived} bytes: resume the upload from there (its bytes_received) once the server is back`,
        "context_id",
      );
  }

  /** Appends an inline context's new token ids and compresses all of them (final), on the session's chain. */
  private compressInline(
    s: Session,
    ids: Int32Array,
    textBytes: number,
    progress: (done: number, total: number) => void,
  ): Promise<void> {
    return this.chain(s.id, async (s) => {
      this.writable(s);
      try {
        s.appendTokens(ids, textBytes);
        let done = 0;
        progress(0, ids.length);
        await this.sched.run(
          this.pool.compress(
            s,
            true,
            this.sessionOf,
            (n) => {
              this.metrics.tokensProcessedTotal += n;
              done += n;
              progress(done, ids.length);
              this.progress(s);
            },
            () => !this.sessions.has(s.id) || this.closing,
          ),
          "background",
        );
        this.notClosing(s); // stopped part-way: not finalized (an unfinished implicit context is dropped at start)
        this.get(s.id);
        s.meta.finalized = true;
        s.saveMeta(true);
      } catch (e) {
        throw this.failSession(s, e);
      }
      this.progress(s);
    });
  }

  /** A server-side fault marks the session failed (its data stays on disk); request errors do not. */
  private failSession(s: Session, e: unknown): EngineError {
    const err = toEngineError(e);
    if (err.status >= 500 && this.sessions.has(s.id)) {
      try {
        s.fail(err.message);
      } catch {
        /* the session is failed in memory either way */
      }
      this.pool.drop(s.id, null);
      this.resident.drop(s.id);
      this.progress(s);
    }
    return err;
  }

  /**
   * Deletes at once: the session leaves the registry, so the operation in flight on it stops at its next
   * chunk or step and everything waiting on it fails with `context_deleted`; its files go once that
   * operation has stopped.
   */
  async deleteContext(id: string): Promise<boolean> {
    const s = this.sessions.get(id);
    if (!s) return false;
    this.sessions.delete(id);
    this.deleted.add(id);
    if (this.deleted.size > 4096) this.deleted.delete(this.deleted.values().next().value as string);
    this.pool.drop(id, null);
    this.resident.drop(id);
    this.metrics.activeContexts = this.sessions.size;
    this.emitDeleted(id);
    await (this.chains.get(id) ?? Promise.resolve()).catch(() => {});
    s.destroy();
    return true;
  }

  // ------------------------------------------------------------ queries

  abort(qid: string): void {
    this.aborted.add(qid);
  }

  /**
   * Validates and runs a query; `emit` receives the events and the promise resolves after "done".
   * Request errors reject before any event is emitted.
   */
  query(qid: string, wire: unknown, emit: (ev: QueryEvent) => void): Promise<void> {
    const tReq = performance.now();
    this.metrics.requestsTotal++;
    try {
      const req = parseQuery(wire);
      // the server's limits first: a request over them is refused as such, not routed inline for it
      checkServerLimits(this.e, req);
      if (req.inline && req.contextId === undefined) {
        const plan = planInline(this.e, this.inline.memo, req, req.inline.owner);
        if (plan) return this.queryInline(qid, req, plan, emit, tReq);
      }
      const session = req.contextId !== undefined ? this.get(req.contextId) : null;
      return this.runPlanned(qid, req, session, emit, tReq);
    } catch (e) {
      this.aborted.delete(qid);
      return Promise.reject(toEngineError(e));
    }
  }

  /**
   * An inline request: its implicit context found, extended or compressed (inline.ts), then the query on it with the
   * end of the prompt as a raw prompt after the gathered tokens. The context is held (not extended, not evicted)
   * until the answer ends. A compression keeps going when the client leaves: a retry finds it.
   */
  private async queryInline(
    qid: string,
    req: QueryWire,
    plan: InlinePlan,
    emit: (ev: QueryEvent) => void,
    tReq: number,
  ): Promise<void> {
    let lease: Awaited<ReturnType<InlineCache["acquire"]>> | null = null;
    try {
      lease = await this.inline.acquire(
        plan,
        (info) => emit({ type: "inline", ...info }),
        (done, total) => {
          if (!this.aborted.has(qid)) emit({ type: "progress", stage: "compress", done, total });
        },
      );
      const { question: _q, messages: _m, inline: _i, ...rest } = req;
      await this.runPlanned(
        qid,
        { ...rest, contextId: lease.session.id, prompt: plan.question },
        lease.session,
        emit,
        tReq,
        plan.scored,
      );
    } catch (e) {
      throw toEngineError(e);
    } finally {
      lease?.release();
      this.aborted.delete(qid);
    }
  }

  private runPlanned(
    qid: string,
    req: QueryWire,
    session: Session | null,
    emit: (ev: QueryEvent) => void,
    tReq: number,
    scored?: string,
  ): Promise<void> {
    try {
      const planned = planQuery(this.e, req, session, scored);
      const task = runQuery(this.e, planned, {
        pool: this.pool,
        resident: this.resident,
        sessionOf: this.sessionOf,
        cancelled: () => {
          if (session && !this.sessions.has(session.id)) throw contextDeleted(session.id);
          return this.aborted.has(qid) ? "abort" : null;
        },
        emit,
        tReq,
        onStart: (n) => (this.metrics.promptTokensTotal += n),
        onFirstToken: (ms) => pushSample(this.metrics.ttftSeconds, ms / 1000),
        onToken: () => this.metrics.tokensGeneratedTotal++,
        onDone: (tpot) => {
          if (tpot > 0) pushSample(this.metrics.tpotSeconds, tpot / 1000);
        },
      });
      return this.sched.run(task, "interactive").finally(() => this.aborted.delete(qid));
    } catch (e) {
      this.aborted.delete(qid);
      return Promise.reject(toEngineError(e));
    }
  }

  countTokens(text: string): number {
    return this.e.tok.encode(text).length;
  }

  tokenize(text: string, addSpecial = false): number[] {
    const ids = this.e.tok.encode(text);
    return addSpecial ? this.e.tok.withBos(ids) : ids;
  }

  detokenize(ids: number[], skipSpecial = false): string {
    const V = this.e.cfg.config.vocabSize;
    const bad = ids.findIndex((x) => !Number.isInteger(x) || x < 0 || x >= V);
    if (bad >= 0)
      throw new EngineError(
        400,
        "invalid_value",
        `tokens[${bad}] = ${ids[bad]} is not a token id of this model (0..${V - 1})`,
        "tokens",
      );
    return this.e.tok.decode(ids, skipSpecial);
  }

  snapshotMetrics(): EngineMetrics {
    return {
      ...this.metrics,
      queueDepth: this.sched.depth,
      diskBytes: this.diskBytes(),
      residentBytes: this.resident.bytes(),
      residentContexts: this.resident.count(),
      residentEvictions: this.resident.evictions,
      ttftSeconds: [...this.metrics.ttftSeconds],
      tpotSeconds: [...this.metrics.tpotSeconds],
      inline: this.inline.metrics(),
    };
  }

  async close(): Promise<void> {
    clearInterval(this.idleTimer);
    this.closing = true;
    // wait for in-flight session operations
    await Promise.all([...this.chains.values()]);
    for (const id of this.pool.ids()) this.pool.drop(id, this.sessions.get(id) ?? null);
    this.resident.dropAll();
    this.e.model.destroy();
  }
}
