/**
 * POST /v1/contexts/:id/query — answer a question (or chat messages) from a context session.
 * SSE by default: `start`, `token`..., `finish` (finish_reason + usage + timings), `data: [DONE]`.
 */
import { Hono } from "hono";
import { z } from "zod";
import {
  METHODS,
  type ChatMessage,
  type EngineClient,
  type Method,
  type QueryEvent,
  type QueryRequest,
  type SamplingOptions,
  type TokenLogprob,
  type Usage,
} from "../src/engine/api.ts";
import { ApiError } from "./errors.ts";
import type { Deps } from "./types.ts";
import { contextIdParam, parseJsonBody, sseResponse, type SseWriter } from "./util.ts";

export const MethodSchema = z.enum(METHODS as unknown as [Method, ...Method[]]);
export const StopSchema = z
  .union([z.string(), z.array(z.string()).max(16)])
  .nullish()
  .transform((v) => (v == null ? [] : typeof v === "string" ? [v] : v).filter((s) => s.length > 0));

/** presence / frequency / repetition penalties and logit bias, shared by both query APIs (snake_case) */
export const PenaltyFields = {
  presence_penalty: z.number().min(-2).max(2).nullish(),
  frequency_penalty: z.number().min(-2).max(2).nullish(),
  repetition_penalty: z.number().gt(0).max(10).nullish(),
  logit_bias: z
    .record(z.string().regex(/^\d+$/, "logit_bias keys are token ids"), z.number().min(-100).max(100))
    .nullish(),
};

/** The engine's sampling extras from the snake_case fields above (+ the number of logprob alternatives). */
export function samplingExtras(b: {
  presence_penalty?: number | null;
  frequency_penalty?: number | null;
  repetition_penalty?: number | null;
  logit_bias?: Record<string, number> | null;
}, logprobs: number | null): Partial<SamplingOptions> {
  const o: Partial<SamplingOptions> = {};
  if (logprobs !== null) o.logprobs = logprobs;
  if (b.presence_penalty != null) o.presencePenalty = b.presence_penalty;
  if (b.frequency_penalty != null) o.frequencyPenalty = b.frequency_penalty;
  if (b.repetition_penalty != null) o.repetitionPenalty = b.repetition_penalty;
  if (b.logit_bias != null) o.logitBias = Object.fromEntries(Object.entries(b.logit_bias).map(([k, v]) => [Number(k), v]));
  return o;
}

/** OpenAI's logprobs entry for one token */
export function logprobView(lp: TokenLogprob & { top?: TokenLogprob[] }) {
  const one = (t: TokenLogprob) => ({ token: t.token, logprob: t.logprob, bytes: t.bytes });
  return { ...one(lp), top_logprobs: (lp.top ?? []).map(one) };
}

export const MessageSchema = z.object({
  role: z.enum(["system", "user", "assistant", "tool"]),
  content: z.string(),
});

export const QueryBody = z
  .object({
    question: z.string().min(1).optional(),
    messages: z.array(MessageSchema).min(1).optional(),
    max_tokens: z.number().int().min(1).max(1_000_000).optional(),
    temperature: z.number().min(0).max(2).default(0),
    top_p: z.number().gt(0).max(1).default(1),
    top_k: z.number().int().min(0).default(0),
    seed: z.number().int().optional(),
    stop: StopSchema,
    method: MethodSchema.default("reform"),
    budget: z.number().int().min(1).optional(),
    stream: z.boolean().default(true),
    /** report log-probabilities with this many alternatives per token (0..20) */
    logprobs: z.number().int().min(0).max(20).optional(),
    ...PenaltyFields,
  })
  .strict()
  .superRefine((v, ctx) => {
    if ((v.question === undefined) === (v.messages === undefined)) {
      ctx.addIssue({ code: "custom", path: ["question"], message: "give exactly one of 'question' or 'messages'" });
    }
  });

export interface Collected {
  text: string;
  logprobs: ReturnType<typeof logprobView>[];
  finishReason: "stop" | "length" | "abort";
  usage: Usage;
  timings: { queueMs: number; ttftMs: number; tpotMs: number; totalMs: number };
  start: Extract<QueryEvent, { type: "start" }> | null;
}

/** Checks that the context exists and can be queried (404 / 409), and that the budget fits (400). */
export async function precheck(d: Deps, contextId: string | undefined, budget: number | undefined): Promise<void> {
  const info = d.engine.modelInfo();
  if (budget !== undefined && info && budget > info.defaults.maxBudget) {
    throw new ApiError(
      400,
      "budget_too_large",
      `budget ${budget} exceeds the maximum of ${info.defaults.maxBudget} tokens`,
      "budget",
    );
  }
  if (contextId === undefined) return;
  const ctx = await d.engine.getContext(contextId);
  if (!ctx) throw new ApiError(404, "context_not_found", `context '${contextId}' not found`, "context_id");
  if (ctx.state === "processing") {
    throw new ApiError(
      409,
      "context_not_ready",
      `context '${contextId}' is still processing (${ctx.tokensProcessed}/${ctx.tokensReceived} tokens compressed); retry when its state is 'ready'`,
      "context_id",
    );
  }
  if (ctx.state === "failed") {
    throw new ApiError(409, "context_failed", `context '${contextId}' failed: ${ctx.error ?? "unknown error"}`, "context_id");
  }
}

/**
 * Starts an engine query and waits for its first event, so request errors (thrown by the engine
 * before the first event) still become proper JSON error responses. The engine query is aborted
 * when the client disconnects (`req.signal`) or `ac` is aborted.
 */
export async function openQuery(
  engine: EngineClient,
  req: Request,
  q: Omit<QueryRequest, "signal">,
): Promise<{ it: AsyncIterator<QueryEvent>; first: IteratorResult<QueryEvent>; ac: AbortController }> {
  const ac = new AbortController();
  const onAbort = () => ac.abort();
  if (req.signal.aborted) ac.abort();
  else req.signal.addEventListener("abort", onAbort, { once: true });
  let it: AsyncIterator<QueryEvent> | undefined;
  try {
    it = engine.query({ ...q, signal: ac.signal })[Symbol.asyncIterator]();
    const first = await it.next();
    return { it, first, ac };
  } catch (e) {
    req.signal.removeEventListener("abort", onAbort);
    if (ac.signal.aborted) throw new ApiError(499, "client_closed_request", "client closed the request");
    throw e;
  }
}

/**
 * Streams an engine query as SSE: `onEvent` turns each engine event into sends (the writer is given);
 * `done` events are counted in the stats first. Ends with `data: [DONE]`, or stops generation when the
 * client goes away. Shared by the native query route and both OpenAI endpoints.
 */
export function streamQuery(
  d: Deps,
  req: Request,
  q: { it: AsyncIterator<QueryEvent>; first: IteratorResult<QueryEvent>; ac: AbortController },
  label: string,
  onEvent: (ev: QueryEvent, w: SseWriter) => void,
  onOpen?: (w: SseWriter) => void,
): Response {
  const { stats, log, opts } = d;
  const { it, first, ac } = q;
  stats.sseActive++;
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
          stats.queriesAborted++;
          log("info", `${label}: client went away, generation stopped`);
        } else {
          w.send("[DONE]");
        }
      } finally {
        stats.sseActive--;
        ac.abort();
        await it.return?.().catch(() => {});
      }
    },
    { heartbeatSec: opts.sseHeartbeatSec, log },
  );
}

/** Drains a query (non-stream responses). */
export async function collect(it: AsyncIterator<QueryEvent>, first: IteratorResult<QueryEvent>): Promise<Collected> {
  let text = "";
  const logprobs: Collected["logprobs"] = [];
  let start: Collected["start"] = null;
  let res = first;
  for (;;) {
    if (res.done) break;
    const ev = res.value;
    if (ev.type === "start") start = ev;
    else if (ev.type === "token") {
      text += ev.text;
      if (ev.logprob) logprobs.push(logprobView(ev.logprob));
    } else if (ev.type === "done") {
      await it.return?.().catch(() => {});
      return { text, logprobs, finishReason: ev.finishReason, usage: ev.usage, timings: ev.timings, start };
    }
    res = await it.next();
  }
  throw new Error("engine query ended without a final event");
}

export function usageView(u: Usage) {
  return {
    prompt_tokens: u.promptTokens,
    completion_tokens: u.completionTokens,
    total_tokens: u.promptTokens + u.completionTokens,
    context_tokens: u.contextTokens,
    selected_tokens: u.selectedTokens,
  };
}

export function timingsView(t: Collected["timings"]) {
  return { queue_ms: t.queueMs, ttft_ms: t.ttftMs, tpot_ms: t.tpotMs, total_ms: t.totalMs };
}

export function newId(prefix: string): string {
  return `${prefix}-${crypto.randomUUID().replace(/-/g, "").slice(0, 24)}`;
}

export function queryRoutes(d: Deps): Hono {
  const { engine, opts, stats, log } = d;
  const r = new Hono();

  r.post("/:id/query", async (c) => {
    const contextId = contextIdParam(c);
    const body = await parseJsonBody(c, QueryBody, opts.maxJsonBytes);
    await precheck(d, contextId, body.budget);
    const defaults = engine.modelInfo()?.defaults;
    const messages: ChatMessage[] | undefined = body.messages;
    const { it, first, ac } = await openQuery(engine, c.req.raw, {
      contextId,
      question: body.question,
      messages,
      method: body.method,
      budget: body.budget,
      sampling: {
        maxTokens: body.max_tokens ?? defaults?.maxTokens ?? 256,
        temperature: body.temperature,
        topP: body.top_p,
        topK: body.top_k,
        seed: body.seed,
        stop: body.stop,
        ...samplingExtras(body, body.logprobs ?? null),
      },
    });
    const id = newId("query");
    const base = { id, object: "context.query", context_id: contextId, method: body.method };

    if (!body.stream) {
      const res = await collect(it, first);
      stats.observeQuery(res.timings, res.usage.completionTokens);
      return c.json({
        ...base,
        text: res.text,
        ...(body.logprobs !== undefined ? { logprobs: res.logprobs } : {}),
        finish_reason: res.finishReason,
        usage: usageView(res.usage),
        timings: timingsView(res.timings),
      });
    }

    return streamQuery(d, c.req.raw, { it, first, ac }, `query ${id} on ${contextId}`, (ev, w) => {
      if (ev.type === "start") {
        w.send(
          { type: "start", ...base, prompt_tokens: ev.promptTokens, selected_tokens: ev.selectedTokens, context_tokens: ev.contextTokens },
          "start",
        );
      } else if (ev.type === "token") {
        w.send(
          { type: "token", text: ev.text, token_id: ev.tokenId, ...(ev.logprob ? { logprob: logprobView(ev.logprob) } : {}) },
          "token",
        );
      } else if (ev.type === "done") {
        w.send(
          { type: "finish", ...base, finish_reason: ev.finishReason, usage: usageView(ev.usage), timings: timingsView(ev.timings) },
          "finish",
        );
      }
    });
  });

  return r;
}
