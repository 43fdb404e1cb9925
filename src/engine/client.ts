/**
 * EngineClient implementation for the main (HTTP) thread: forwards every call to the engine worker
 * (src/engine/worker.ts) with postMessage and never blocks on native work.
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
} from "./api.ts";
import type { EngineOptions } from "./load.ts";
import type { CallArgs, CallName, CallResult, FromWorker, ToWorker } from "./protocol.ts";

export type { EngineDefaults, EngineOptions } from "./load.ts";

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
}

class QueryStream {
  events: QueryEvent[] = [];
  done = false;
  error: EngineError | null = null;
  wake: (() => void) | null = null;
  notify(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }
}

export class WorkerEngineClient implements EngineClient {
  private worker: Worker;
  private st: "loading" | "ready" | "failed" = "loading";
  private err: string | null = null;
  private info: ModelInfo | null = null;
  private readyP: Promise<void>;
  private readyRes!: () => void;
  private readyRej!: (e: unknown) => void;
  private nextId = 1;
  private pending = new Map<number, Pending>();
  private streams = new Map<number, QueryStream>();
  private subs = new Map<string, Set<(i: ContextInfo | null) => void>>();
  private closed = false;
  private m: EngineMetrics = emptyMetrics();

  constructor(opts: EngineOptions) {
    this.readyP = new Promise<void>((res, rej) => {
      this.readyRes = res;
      this.readyRej = rej;
    });
    this.readyP.catch(() => {});
    this.worker = new Worker(new URL("./worker.ts", import.meta.url).href);
    this.worker.onmessage = (ev: MessageEvent<FromWorker>) => this.onMessage(ev.data);
    this.worker.onerror = (ev: ErrorEvent) => {
      const msg = ev.message || "engine worker crashed";
      if (this.st === "loading") {
        this.st = "failed";
        this.err = msg;
        this.readyRej(new Error(msg));
      }
      this.failAll(new EngineError(500, "engine_crashed", msg));
    };
    this.post({ t: "init", opts });
  }

  private post(m: ToWorker): void {
    this.worker.postMessage(m);
  }

  private failAll(e: EngineError): void {
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
    for (const s of this.streams.values()) {
      s.error = e;
      s.done = true;
      s.notify();
    }
  }

  private onMessage(m: FromWorker): void {
    switch (m.t) {
      case "loaded":
        this.info = m.info;
        this.st = "ready";
        this.readyRes();
        return;
      case "loadFailed":
        this.st = "failed";
        this.err = m.error;
        this.readyRej(new Error(m.error));
        return;
      case "metrics":
        this.m = m.m;
        return;
      case "progress":
      case "deleted": {
        const id = m.t === "progress" ? m.info.id : m.id;
        const set = this.subs.get(id);
        if (set)
          for (const cb of set) {
            try {
              cb(m.t === "progress" ? m.info : null);
            } catch {
              /* subscriber errors are theirs */
            }
          }
        if (m.t === "deleted") this.subs.delete(id);
        return;
      }
      case "ev": {
        const s = this.streams.get(m.id);
        if (s) {
          s.events.push(m.ev);
          s.notify();
        }
        return;
      }
      case "res": {
        const s = this.streams.get(m.id);
        if (s) {
          if (!m.ok) s.error = new EngineError(m.error.status, m.error.code, m.error.message, m.error.param);
          s.done = true;
          s.notify();
          return;
        }
        const p = this.pending.get(m.id);
        if (!p) return;
        this.pending.delete(m.id);
        if (m.ok) p.resolve(m.result);
        else p.reject(new EngineError(m.error.status, m.error.code, m.error.message, m.error.param));
        return;
      }
    }
  }

  private call<K extends CallName>(op: K, ...args: CallArgs<K>): Promise<CallResult<K>> {
    if (this.closed) return Promise.reject(closedError());
    const id = this.nextId++;
    return new Promise<CallResult<K>>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.post({ t: "call", id, op, args } as ToWorker);
    });
  }

  state(): "loading" | "ready" | "failed" {
    return this.st;
  }
  loadError(): string | null {
    return this.err;
  }
  ready(): Promise<void> {
    return this.readyP;
  }
  modelInfo(): ModelInfo | null {
    return this.info;
  }

  createContext(opts?: { metadata?: Record<string, unknown> }): Promise<ContextInfo> {
    return this.call("createContext", opts);
  }
  append(id: string, bytes: Uint8Array): Promise<ContextInfo> {
    return this.call("append", id, bytes);
  }
  finalize(id: string): Promise<ContextInfo> {
    return this.call("finalize", id);
  }
  getContext(id: string): Promise<ContextInfo | null> {
    return this.call("getContext", id);
  }
  listContexts(): Promise<ContextInfo[]> {
    return this.call("listContexts");
  }
  deleteContext(id: string): Promise<boolean> {
    return this.call("deleteContext", id);
  }
  subscribe(id: string, cb: (info: ContextInfo | null) => void): () => void {
    let set = this.subs.get(id);
    if (!set) this.subs.set(id, (set = new Set()));
    set.add(cb);
    return () => {
      const s = this.subs.get(id);
      if (!s) return;
      s.delete(cb);
      if (s.size === 0) this.subs.delete(id);
    };
  }

  countTokens(text: string): Promise<number> {
    return this.call("countTokens", text);
  }

  tokenize(text: string, addSpecial = false): Promise<number[]> {
    return this.call("tokenize", text, addSpecial);
  }

  detokenize(ids: number[], skipSpecial = false): Promise<string> {
    return this.call("detokenize", ids, skipSpecial);
  }

  query(req: QueryRequest): AsyncIterable<QueryEvent> {
    return {
      [Symbol.asyncIterator]: () => this.queryIter(req),
    };
  }

  private async *queryIter(req: QueryRequest): AsyncGenerator<QueryEvent> {
    if (this.closed) throw closedError();
    if (this.st !== "ready") {
      if (this.st === "failed") throw new EngineError(503, "model_not_loaded", `model failed to load: ${this.err}`);
      await this.readyP.catch(() => {});
      if ((this.st as string) !== "ready")
        throw new EngineError(503, "model_not_loaded", `model failed to load: ${this.err}`);
    }
    const { signal, ...wire } = req;
    if (signal?.aborted) throw new EngineError(499, "aborted", "request aborted");
    const id = this.nextId++;
    const s = new QueryStream();
    this.streams.set(id, s);
    const onAbort = () => this.post({ t: "abort", id });
    signal?.addEventListener("abort", onAbort, { once: true });
    let finished = false;
    try {
      this.post({ t: "query", id, req: wire });
      while (true) {
        if (s.events.length > 0) {
          const ev = s.events.shift()!;
          if (ev.type === "done") finished = true;
          yield ev;
          if (finished) return;
          continue;
        }
        if (s.done) {
          if (s.error) throw s.error;
          return;
        }
        await new Promise<void>((res) => (s.wake = res));
      }
    } finally {
      signal?.removeEventListener("abort", onAbort);
      if (!finished && !s.done) this.post({ t: "abort", id }); // consumer stopped early
      this.streams.delete(id);
    }
  }

  metrics(): EngineMetrics {
    return this.m;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    try {
      if (this.st === "ready") await this.call("close");
    } catch {
      /* closing anyway */
    }
    this.closed = true;
    this.failAll(closedError());
    this.worker.terminate();
  }
}

/** What a call to a closed engine gets: the server is stopping (the same code as a write refused while it closes). */
function closedError(): EngineError {
  return new EngineError(503, "shutting_down", "the server is shutting down: send the request again once it is back");
}

/** Start an engine worker that loads `modelDir` and keeps contexts under `dataDir`. */
export function createEngine(opts: EngineOptions): EngineClient {
  return new WorkerEngineClient(opts);
}
