/**
 * Prometheus metrics (text exposition 0.0.4), kept by prom-client rather than written by hand: it owns the format,
 * label escaping, histogram buckets and summary quantiles. Each HttpStats has its own Registry (never the global
 * one), so several servers in one process (the tests) do not collide on metric names.
 *
 * Two sources: the engine reports its own counters, gauges and recent TTFT/TPOT samples, read once per scrape
 * (render) and copied into the metrics by their collect() callbacks; the HTTP layer counts requests, streams,
 * uploads and aborts as they happen, and keeps cumulative latency histograms observed from each query's final event
 * (monotonic, unlike the engine's bounded sample window).
 */
import { Counter, Gauge, Histogram, type Metric, Registry, Summary } from "prom-client";
import type { EngineClient, EngineMetrics, ModelInfo } from "../src/engine/api.ts";

const TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];
const TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5];
const ENGINE_STATES = ["loading", "ready", "failed"] as const;

/** The engine's own totals (counters) and levels (gauges), read at each scrape. */
const ENGINE_VALUES: [type: "counter" | "gauge", name: string, help: string, read: (m: EngineMetrics) => number][] = [
  ["counter", "reform_tokens_processed_total", "Context tokens compressed since start.", (m) => m.tokensProcessedTotal],
  ["counter", "reform_tokens_generated_total", "Answer tokens generated since start.", (m) => m.tokensGeneratedTotal],
  [
    "counter",
    "reform_prompt_tokens_total",
    "Prompt tokens attended in recompute since start.",
    (m) => m.promptTokensTotal,
  ],
  ["counter", "reform_engine_requests_total", "Queries handled by the engine since start.", (m) => m.requestsTotal],
  ["gauge", "reform_queue_depth", "Jobs waiting in the engine queue.", (m) => m.queueDepth],
  ["gauge", "reform_active_contexts", "Context sessions held by the engine.", (m) => m.activeContexts],
  [
    "gauge",
    "reform_disk_bytes",
    "Bytes of all contexts' files (tokens, embeddings, state, metadata).",
    (m) => m.diskBytes,
  ],
  [
    "gauge",
    "reform_resident_embedding_bytes",
    "Device memory of the context embeddings kept resident (scored without reading the embedding file).",
    (m) => m.residentBytes,
  ],
  [
    "gauge",
    "reform_resident_contexts",
    "Contexts whose embeddings are resident on the device.",
    (m) => m.residentContexts,
  ],
  [
    "counter",
    "reform_resident_evictions_total",
    "Resident embedding stores dropped for room or under device memory pressure.",
    (m) => m.residentEvictions,
  ],
  [
    "counter",
    "reform_inline_requests_total",
    "Queries answered by inline REFORM (prompts beyond the window).",
    (m) => m.inline.requests,
  ],
  [
    "counter",
    "reform_inline_hits_total",
    "Inline requests whose whole compressed prefix was cached.",
    (m) => m.inline.hits,
  ],
  [
    "counter",
    "reform_inline_extends_total",
    "Inline requests that extended a cached prefix (only new tokens compressed).",
    (m) => m.inline.extends,
  ],
  ["counter", "reform_inline_misses_total", "Inline requests compressed from scratch.", (m) => m.inline.misses],
  [
    "counter",
    "reform_inline_shared_total",
    "Inline requests that joined a compression of the same prefix in flight.",
    (m) => m.inline.shared,
  ],
  [
    "counter",
    "reform_inline_appended_tokens_total",
    "Tokens compressed for inline requests.",
    (m) => m.inline.appendedTokens,
  ],
  [
    "counter",
    "reform_inline_evictions_total",
    "Implicit contexts evicted (count, age or disk bound).",
    (m) => m.inline.evictions,
  ],
  ["gauge", "reform_inline_contexts", "Implicit contexts held for prefix reuse.", (m) => m.inline.contexts],
  ["gauge", "reform_inline_disk_bytes", "Bytes of the implicit contexts' files.", (m) => m.inline.diskBytes],
  ["gauge", "reform_inline_memo_bytes", "Memory of the inline tokenization memo.", (m) => m.inline.memoBytes],
];

/** What the engine reported at the scrape being rendered. */
interface Scrape {
  state: ReturnType<EngineClient["state"]>;
  info: ModelInfo | null;
  m: EngineMetrics | null; // null: engine.metrics() threw (its metrics are left out)
}

export class HttpStats {
  readonly startedAt = Date.now();
  readonly registry = new Registry();
  readonly inFlight: Gauge;
  readonly sseActive: Gauge;
  readonly uploadBytes: Counter;
  readonly queriesAborted: Counter;
  private readonly requests: Counter<"method" | "route" | "status">;
  private readonly ttft: Histogram;
  private readonly tpot: Histogram;
  private readonly e2e: Histogram;
  /** Registered from the start (in exposition order) but left out of a scrape where the engine has nothing for them
   * (no model loaded, metrics() threw, no disk limit set). */
  private readonly modelInfo: Gauge<"model" | "architecture" | "backend" | "device">;
  private readonly engineMetrics: { name: string; metric: Metric }[] = [];
  private readonly diskLimit: Gauge;
  private scrape: Scrape = { state: "loading", info: null, m: null };

  constructor() {
    const registers = [this.registry];
    const now = () => this.scrape;
    new Gauge({
      name: "reform_up",
      help: "1 when the model is loaded and the engine accepts work.",
      registers,
      collect() {
        this.set(now().state === "ready" ? 1 : 0);
      },
    });
    new Gauge({
      name: "reform_engine_state",
      help: "Engine state (1 for the current one).",
      labelNames: ["state"],
      registers,
      collect() {
        for (const s of ENGINE_STATES) this.set({ state: s }, now().state === s ? 1 : 0);
      },
    });
    this.modelInfo = new Gauge({
      name: "reform_model_info",
      help: "Served model.",
      labelNames: ["model", "architecture", "backend", "device"],
      registers,
      collect() {
        const info = now().info;
        this.reset();
        if (info)
          this.set({ model: info.id, architecture: info.architecture, backend: info.backend, device: info.device }, 1);
      },
    });
    new Gauge({
      name: "reform_process_start_time_seconds",
      help: "Server start time (unix seconds).",
      registers,
    }).set(Math.floor(this.startedAt / 1000));

    // The engine's totals are monotonic since start, so they stay counters: prom-client's Counter has no set(), so
    // collect() resets it and adds the engine's total as of this scrape.
    for (const [type, name, help, read] of ENGINE_VALUES) {
      const value = () => {
        const m = now().m;
        return m ? read(m) : 0;
      };
      const metric =
        type === "counter"
          ? new Counter({
              name,
              help,
              registers,
              collect() {
                this.reset();
                this.inc(value());
              },
            })
          : new Gauge({
              name,
              help,
              registers,
              collect() {
                this.set(value());
              },
            });
      this.engineMetrics.push({ name, metric });
    }

    // Quantiles over the engine's recent samples (a bounded window of its last queries), refilled at each scrape.
    // prom-client estimates them with a t-digest, which interpolates between neighbouring samples (not the
    // nearest-rank value), and reports 0 for every quantile while there are no samples yet (read _count).
    for (const [name, help, read] of [
      ["reform_recent_ttft_seconds", "Time to first token over recent queries.", (m: EngineMetrics) => m.ttftSeconds],
      ["reform_recent_tpot_seconds", "Time per output token over recent queries.", (m: EngineMetrics) => m.tpotSeconds],
    ] as const) {
      this.engineMetrics.push({
        name,
        metric: new Summary({
          name,
          help,
          percentiles: [0.5, 0.9, 0.99],
          registers,
          collect() {
            this.reset();
            const m = now().m;
            for (const v of m ? read(m) : []) if (Number.isFinite(v)) this.observe(v);
          },
        }),
      });
    }
    this.diskLimit = new Gauge({
      name: "reform_disk_limit_bytes",
      help: "Disk the contexts may use (--max-disk-bytes).",
      registers,
      collect() {
        this.set(now().info?.defaults.maxDiskBytes ?? 0);
      },
    });

    this.ttft = new Histogram({
      name: "reform_ttft_seconds",
      help: "Time to first token (queue + gather + recompute + first decode).",
      buckets: TTFT_BUCKETS,
      registers,
    });
    this.tpot = new Histogram({
      name: "reform_tpot_seconds",
      help: "Mean time per output token after the first, per query.",
      buckets: TPOT_BUCKETS,
      registers,
    });
    this.e2e = new Histogram({
      name: "reform_request_duration_seconds",
      help: "End-to-end query duration.",
      buckets: TTFT_BUCKETS,
      registers,
    });
    this.requests = new Counter({
      name: "reform_http_requests_total",
      help: "HTTP requests by route and status.",
      labelNames: ["method", "route", "status"],
      registers,
    });
    this.inFlight = new Gauge({
      name: "reform_http_requests_in_flight",
      help: "HTTP requests being handled.",
      registers,
    });
    this.sseActive = new Gauge({
      name: "reform_sse_streams_active",
      help: "Open server-sent-event streams.",
      registers,
    });
    this.uploadBytes = new Counter({
      name: "reform_upload_bytes_total",
      help: "Context bytes accepted over HTTP.",
      registers,
    });
    this.queriesAborted = new Counter({
      name: "reform_queries_aborted_total",
      help: "Queries stopped because the client went away.",
      registers,
    });
  }

  countRequest(method: string, route: string, status: number) {
    this.requests.inc({ method, route, status: String(status) });
  }

  observeQuery(t: { ttftMs: number; tpotMs: number; totalMs: number }, completionTokens: number) {
    const observe = (h: Histogram, ms: number) => {
      if (Number.isFinite(ms) && ms >= 0) h.observe(ms / 1000);
    };
    observe(this.ttft, t.ttftMs);
    if (completionTokens > 1) observe(this.tpot, t.tpotMs);
    observe(this.e2e, t.totalMs);
  }

  /** The exposition text of every metric, the engine's as of now (send it with registry.contentType). */
  render(engine: EngineClient): Promise<string> {
    let m: EngineMetrics | null;
    try {
      m = engine.metrics();
    } catch {
      m = null;
    }
    const info = engine.modelInfo();
    this.scrape = { state: engine.state(), info, m };
    const show = (name: string, metric: Metric, on: boolean) => {
      if (on) this.registry.registerMetric(metric);
      else this.registry.removeSingleMetric(name);
    };
    show("reform_model_info", this.modelInfo, info !== null);
    for (const { name, metric } of this.engineMetrics) show(name, metric, m !== null);
    show("reform_disk_limit_bytes", this.diskLimit, m !== null && (info?.defaults.maxDiskBytes ?? 0) > 0);
    // The collect() callbacks read this.scrape (prom-client calls them as metrics() starts, before it first awaits).
    return this.registry.metrics();
  }
}
