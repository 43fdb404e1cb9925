/**
 * Serving a query over HTTP, shared by the native query route and both OpenAI endpoints: start the
 * engine query and wait for its first event (so request errors still become JSON error responses),
 * then either drain it into one JSON body or stream it as SSE; stop generation when the client goes away.
 */
import type { EngineClient, FinishReason, QueryEvent, QueryRequest, Usage } from "../src/engine/api.ts";
import { ApiError } from "./errors.ts";
import { type LogprobView, logprobView } from "./protocol.ts";
import type { Deps } from "./types.ts";
import { type SseWriter, sseResponse } from "./util.ts";

export interface OpenQuery {
  it: AsyncIterator<QueryEvent>;
  first: IteratorResult<QueryEvent>;
  ac: AbortController;
}

export interface Collected {
  text: string;
  logprobs: LogprobView[];
  finishReason: FinishReason;
  usage: Usage;
  timings: { queueMs: number; ttftMs: number; tpotMs: number; totalMs: number };
  start: Extract<QueryEvent, { type: "start" }> | null;
}

/**
 * Starts an engine query and waits for its first event. The engine query is aborted when the client
 * disconnects (`req.signal`) or `ac` is aborted.
 */
export async function openQuery(
  engine: EngineClient,
  req: Request,
  q: Omit<QueryRequest, "signal">,
): Promise<OpenQuery> {
  const ac = new AbortController();
  const onAbort = () => ac.abort();
  if (req.signal.aborted) ac.abort();
  else req.signal.addEventListener("abort", onAbort, { once: true });
  try {
    const it = engine.query({ ...q, signal: ac.signal })[Symbol.asyncIterator]();
    const first = await it.next();
    return { it, first, ac };
  } catch (e) {
    req.signal.removeEventListener("abort", onAbort);
    if (ac.signal.aborted) throw new ApiError(499, "client_closed_request", "client closed the request");
    throw e;
  }
}

/**
 * Streams an engine query as SSE: `onEvent` turns each engine event into sends; `done` events are
 * counted in the stats first. Ends with `data: [DONE]`, or stops generation when the client goes away.
 */
export function streamQuery(
  d: Deps,
  req: Request,
  q: OpenQuery,
  label: string,
  onEvent: (ev: QueryEvent, w: SseWriter) => void,
  onOpen?: (w: SseWriter) => void,
  headers?: Record<string, string>,
): Response {
  const { stats, log, opts } = d;
  const { it, first, ac } = q;
  stats.sseActive.inc();
  return sseResponse(
    req,
    async (w) => {
      w.signal.addEventListener("abort", () => ac.abort(), { once: true });
      let res = first;
      try {
        onOpen?.(w);
        while (!res.done) {
          const ev = res.value;
          if (ev.type === "done") stats.observeQuery(ev.timings, ev.usage.completionTokens);
          onEvent(ev, w);
          if (w.closed || ac.signal.aborted) break;
          res = await it.next();
        }
        if (ac.signal.aborted || w.closed) {
          stats.queriesAborted.inc();
          log("info", `${label}: client went away, generation stopped`);
        } else {
          w.send("[DONE]");
        }
      } finally {
        stats.sseActive.dec();
        ac.abort();
        await it.return?.().catch(() => {});
      }
    },
    { heartbeatSec: opts.sseHeartbeatSec, log, ...(headers ? { headers } : {}) },
  );
}

/** Drains a query for a non-stream response, and counts it in the stats. */
export async function collectQuery(d: Deps, q: OpenQuery): Promise<Collected> {
  const { it, first } = q;
  let text = "";
  const logprobs: LogprobView[] = [];
  let start: Collected["start"] = null;
  let res = first;
  while (!res.done) {
    const ev = res.value;
    if (ev.type === "start") start = ev;
    else if (ev.type === "token") {
      text += ev.text;
      if (ev.logprob) logprobs.push(logprobView(ev.logprob));
    } else if (ev.type === "done") {
      await it.return?.().catch(() => {});
      d.stats.observeQuery(ev.timings, ev.usage.completionTokens);
      if (ev.finishReason === "abort") d.stats.queriesAborted.inc(); // the client went away before the body
      return { text, logprobs, finishReason: ev.finishReason, usage: ev.usage, timings: ev.timings, start };
    }
    res = await it.next();
  }
  throw new Error("engine query ended without a final event");
}
