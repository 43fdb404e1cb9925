/**
 * Prometheus text exposition (format 0.0.4). The engine reports its own counters and recent
 * TTFT/TPOT samples; the HTTP layer adds request counters and cumulative latency histograms
 * observed from each query's final event (monotonic, unlike the engine's bounded sample window).
 */
import type { EngineClient } from "../src/engine/api.ts";

const TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];
const TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5];

class Histogram {
  readonly counts: number[];
  sum = 0;
  count = 0;
  constructor(readonly buckets: number[]) {
    this.counts = buckets.map(() => 0);
  }
  observe(v: number) {
    if (!Number.isFinite(v) || v < 0) return;
    this.sum += v;
    this.count++;
    for (let i = 0; i < this.buckets.length; i++) if (v <= this.buckets[i]!) this.counts[i]!++;
  }
}

function esc(v: string): string {
  return v.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/"/g, '\\"');
}

function fmt(n: number): string {
  if (Number.isNaN(n)) return "NaN";
  if (n === Infinity) return "+Inf";
  if (n === -Infinity) return "-Inf";
  return String(n);
}

function quantile(sorted: number[], q: number): number {
  if (sorted.length === 0) return NaN;
  const idx = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[idx]!;
}

export class HttpStats {
  readonly startedAt = Date.now();
  private requests = new Map<string, number>(); // key: method\0route\0status
  inFlight = 0;
  sseActive = 0;
  uploadBytes = 0;
  queriesAborted = 0;
  readonly ttft = new Histogram(TTFT_BUCKETS);
  readonly tpot = new Histogram(TPOT_BUCKETS);
  readonly e2e = new Histogram(TTFT_BUCKETS);

  countRequest(method: string, route: string, status: number) {
    const k = `${method}\0${route}\0${status}`;
    this.requests.set(k, (this.requests.get(k) ?? 0) + 1);
  }

  observeQuery(t: { ttftMs: number; tpotMs: number; totalMs: number }, completionTokens: number) {
    this.ttft.observe(t.ttftMs / 1000);
    if (completionTokens > 1) this.tpot.observe(t.tpotMs / 1000);
    this.e2e.observe(t.totalMs / 1000);
  }

  render(engine: EngineClient): string {
    const out: string[] = [];
    const metric = (name: string, type: string, help: string, lines: string[]) => {
      out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`, ...lines);
    };
    const state = engine.state();
    metric("reform_up", "gauge", "1 when the model is loaded and the engine accepts work.", [
      `reform_up ${state === "ready" ? 1 : 0}`,
    ]);
    metric("reform_engine_state", "gauge", "Engine state (1 for the current one).", [
      ...(["loading", "ready", "failed"] as const).map(
        (s) => `reform_engine_state{state="${s}"} ${state === s ? 1 : 0}`,
      ),
    ]);
    const info = engine.modelInfo();
    if (info) {
      metric("reform_model_info", "gauge", "Served model.", [
        `reform_model_info{model="${esc(info.id)}",architecture="${esc(info.architecture)}",backend="${esc(info.backend)}",device="${esc(info.device)}"} 1`,
      ]);
    }
    metric("reform_process_start_time_seconds", "gauge", "Server start time (unix seconds).", [
      `reform_process_start_time_seconds ${Math.floor(this.startedAt / 1000)}`,
    ]);

    let m: ReturnType<EngineClient["metrics"]> | null = null;
    try {
      m = engine.metrics();
    } catch {
      m = null;
    }
    if (m) {
      metric("reform_tokens_processed_total", "counter", "Context tokens compressed since start.", [
        `reform_tokens_processed_total ${fmt(m.tokensProcessedTotal)}`,
      ]);
      metric("reform_tokens_generated_total", "counter", "Answer tokens generated since start.", [
        `reform_tokens_generated_total ${fmt(m.tokensGeneratedTotal)}`,
      ]);
      metric("reform_prompt_tokens_total", "counter", "Prompt tokens attended in recompute since start.", [
        `reform_prompt_tokens_total ${fmt(m.promptTokensTotal)}`,
      ]);
      metric("reform_engine_requests_total", "counter", "Queries handled by the engine since start.", [
        `reform_engine_requests_total ${fmt(m.requestsTotal)}`,
      ]);
      metric("reform_queue_depth", "gauge", "Jobs waiting in the engine queue.", [
        `reform_queue_depth ${fmt(m.queueDepth)}`,
      ]);
      metric("reform_active_contexts", "gauge", "Context sessions held by the engine.", [
        `reform_active_contexts ${fmt(m.activeContexts)}`,
      ]);
      metric("reform_disk_bytes", "gauge", "Bytes of all contexts' files (tokens, embeddings, state, metadata).", [
        `reform_disk_bytes ${fmt(m.diskBytes)}`,
      ]);
      metric(
        "reform_resident_embedding_bytes",
        "gauge",
        "Device memory of the context embeddings kept resident (scored without reading the embedding file).",
        [`reform_resident_embedding_bytes ${fmt(m.residentBytes)}`],
      );
      metric("reform_resident_contexts", "gauge", "Contexts whose embeddings are resident on the device.", [
        `reform_resident_contexts ${fmt(m.residentContexts)}`,
      ]);
      metric(
        "reform_resident_evictions_total",
        "counter",
        "Resident embedding stores dropped for room or under device memory pressure.",
        [`reform_resident_evictions_total ${fmt(m.residentEvictions)}`],
      );
      const maxDisk = info?.defaults.maxDiskBytes ?? 0;
      if (maxDisk > 0)
        metric("reform_disk_limit_bytes", "gauge", "Disk the contexts may use (--max-disk-bytes).", [
          `reform_disk_limit_bytes ${fmt(maxDisk)}`,
        ]);
      const inl = m.inline;
      for (const [name, type, help, v] of [
        [
          "reform_inline_requests_total",
          "counter",
          "Queries answered by inline REFORM (prompts beyond the window).",
          inl.requests,
        ],
        ["reform_inline_hits_total", "counter", "Inline requests whose whole compressed prefix was cached.", inl.hits],
        [
          "reform_inline_extends_total",
          "counter",
          "Inline requests that extended a cached prefix (only new tokens compressed).",
          inl.extends,
        ],
        ["reform_inline_misses_total", "counter", "Inline requests compressed from scratch.", inl.misses],
        [
          "reform_inline_shared_total",
          "counter",
          "Inline requests that joined a compression of the same prefix in flight.",
          inl.shared,
        ],
        [
          "reform_inline_appended_tokens_total",
          "counter",
          "Tokens compressed for inline requests.",
          inl.appendedTokens,
        ],
        [
          "reform_inline_evictions_total",
          "counter",
          "Implicit contexts evicted (count, age or disk bound).",
          inl.evictions,
        ],
        ["reform_inline_contexts", "gauge", "Implicit contexts held for prefix reuse.", inl.contexts],
        ["reform_inline_disk_bytes", "gauge", "Bytes of the implicit contexts' files.", inl.diskBytes],
        ["reform_inline_memo_bytes", "gauge", "Memory of the inline tokenization memo.", inl.memoBytes],
      ] as const)
        metric(name, type, help, [`${name} ${fmt(v)}`]);
      for (const [name, samples, help] of [
        ["reform_recent_ttft_seconds", m.ttftSeconds, "Time to first token over recent queries."],
        ["reform_recent_tpot_seconds", m.tpotSeconds, "Time per output token over recent queries."],
      ] as const) {
        const sorted = [...samples].sort((a, b) => a - b);
        const sum = sorted.reduce((a, b) => a + b, 0);
        metric(name, "summary", help, [
          ...[0.5, 0.9, 0.99].map((q) => `${name}{quantile="${q}"} ${fmt(quantile(sorted, q))}`),
          `${name}_sum ${fmt(sum)}`,
          `${name}_count ${sorted.length}`,
        ]);
      }
    }

    const hist = (name: string, help: string, h: Histogram) => {
      const lines = h.buckets.map((b, i) => `${name}_bucket{le="${fmt(b)}"} ${h.counts[i]}`);
      lines.push(`${name}_bucket{le="+Inf"} ${h.count}`, `${name}_sum ${fmt(h.sum)}`, `${name}_count ${h.count}`);
      metric(name, "histogram", help, lines);
    };
    hist("reform_ttft_seconds", "Time to first token (queue + gather + recompute + first decode).", this.ttft);
    hist("reform_tpot_seconds", "Mean time per output token after the first, per query.", this.tpot);
    hist("reform_request_duration_seconds", "End-to-end query duration.", this.e2e);

    const reqLines: string[] = [];
    for (const [k, v] of this.requests) {
      const [method, route, status] = k.split("\0");
      reqLines.push(
        `reform_http_requests_total{method="${esc(method!)}",route="${esc(route!)}",status="${status}"} ${v}`,
      );
    }
    metric("reform_http_requests_total", "counter", "HTTP requests by route and status.", reqLines);
    metric("reform_http_requests_in_flight", "gauge", "HTTP requests being handled.", [
      `reform_http_requests_in_flight ${this.inFlight}`,
    ]);
    metric("reform_sse_streams_active", "gauge", "Open server-sent-event streams.", [
      `reform_sse_streams_active ${this.sseActive}`,
    ]);
    metric("reform_upload_bytes_total", "counter", "Context bytes accepted over HTTP.", [
      `reform_upload_bytes_total ${this.uploadBytes}`,
    ]);
    metric("reform_queries_aborted_total", "counter", "Queries stopped because the client went away.", [
      `reform_queries_aborted_total ${this.queriesAborted}`,
    ]);
    return out.join("\n") + "\n";
  }
}
