/**
 * OpenAI-compatible surface: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, and the
 * vLLM-style POST /v1/tokenize and /v1/detokenize.
 *
 * The long context is chosen by the extra body field `context_id` (or `reform: {context_id, method,
 * budget}`), or by picking the model `context:<id>` (listed by /v1/models), so chat frontends that
 * cannot send extra fields work unchanged. Without a context it is plain chat.
 */
import type { Context } from "hono";
import { Hono } from "hono";
import type { ChatMessage, FinishReason, QueryRequest } from "../src/engine/api.ts";
import { ApiError } from "./errors.ts";
import {
  ChatBody,
  CompletionBody,
  CONTEXT_MODEL_PREFIX,
  ContextIdSchema,
  MODEL_ALIAS,
  DetokenizeBody,
  type LogprobView,
  limitsView,
  logprobView,
  newId,
  openaiUsage,
  reformTarget,
  samplingOf,
  TokenizeBody,
  timingsView,
} from "./protocol.ts";
import { type Collected, collectQuery, type OpenQuery, openQuery, streamQuery } from "./serving.ts";
import type { Deps } from "./types.ts";
import { parseJsonBody } from "./util.ts";

/** OpenAI's legacy logprobs object for completion tokens starting at character `offset` of the returned text */
function legacyLogprobs(entries: LogprobView[], offset: number) {
  const textOffset: number[] = [];
  let o = offset;
  for (const e of entries) {
    textOffset.push(o);
    o += e.token.length;
  }
  return {
    tokens: entries.map((e) => e.token),
    token_logprobs: entries.map((e) => e.logprob),
    top_logprobs: entries.map((e) => Object.fromEntries(e.top_logprobs.map((t) => [t.token, t.logprob]))),
    text_offset: textOffset,
  };
}

function toMessages(ms: ChatBody["messages"]): ChatMessage[] {
  return ms.map((m) => {
    const content =
      m.content == null ? "" : typeof m.content === "string" ? m.content : m.content.map((p) => p.text ?? "").join("");
    const role = m.role === "developer" ? "system" : m.role;
    return { role, content };
  });
}

/** OpenAI knows no "abort": a generation cut short by the server ends as "stop". */
function finishOf(f: FinishReason): "stop" | "length" {
  return f === "length" ? "length" : "stop";
}

/** A started OpenAI-style completion: the engine query plus the envelope every response object carries. */
interface Started {
  q: OpenQuery;
  contextId: string | undefined;
  method: QueryRequest["method"];
  /** the fields every response object and chunk repeats */
  envelope: { id: string; object: string; created: number; model: string; system_fingerprint: string };
  includeUsage: boolean;
}

export function openaiRoutes(d: Deps): Hono {
  const { engine, opts } = d;
  const r = new Hono();
  const servedName = () => opts.servedName ?? engine.modelInfo()?.id ?? MODEL_ALIAS;
  const isServedModel = (m: string) => m === servedName() || m === MODEL_ALIAS;

  /** A request names the served model, its alias, or `context:<id>`; anything else is not silently answered. */
  const checkModel = (model: string | undefined) => {
    if (model === undefined || isServedModel(model) || model.startsWith(CONTEXT_MODEL_PREFIX)) return;
    throw new ApiError(
      404,
      "model_not_found",
      `the model '${model}' does not exist: use '${servedName()}' (or '${MODEL_ALIAS}'), or '${CONTEXT_MODEL_PREFIX}<context id>' to answer from a context`,
      "model",
    );
  };

  /** The setup both completion endpoints share: REFORM routing, the engine query, the response envelope. */
  const start = async (
    c: Context,
    body: ChatBody | CompletionBody,
    input: Pick<QueryRequest, "messages" | "prompt">,
    o: { object: string; idPrefix: string; maxTokens: number; logprobs: number | null },
  ): Promise<Started> => {
    checkModel(body.model);
    const { contextId, method, budget } = reformTarget(body);
    const q = await openQuery(engine, c.req.raw, {
      contextId,
      ...input,
      method,
      budget,
      sampling: samplingOf(body, { maxTokens: o.maxTokens, temperature: 1, logprobs: o.logprobs }),
    });
    return {
      q,
      contextId,
      method,
      envelope: {
        id: newId(o.idPrefix),
        object: o.object,
        created: Math.floor(Date.now() / 1000),
        model: body.model ?? servedName(),
        system_fingerprint: `reform-${engine.modelInfo()?.backend ?? "engine"}`,
      },
      includeUsage: body.stream_options?.include_usage === true,
    };
  };

  /** A non-stream response: one choice, OpenAI's usage, and the REFORM extras. */
  const complete = (s: Started, res: Collected, choice: Record<string, unknown>) => ({
    ...s.envelope,
    choices: [{ index: 0, ...choice, finish_reason: finishOf(res.finishReason) }],
    usage: openaiUsage(res.usage),
    reform: {
      context_id: s.contextId ?? null,
      method: s.method,
      context_tokens: res.usage.contextTokens,
      selected_tokens: res.usage.selectedTokens,
      timings: timingsView(res.timings),
    },
  });

  /** A stream chunk with one choice (`usage: null` while usage is asked for, as OpenAI does). */
  const chunk = (s: Started, choice: Record<string, unknown>) => ({
    ...s.envelope,
    choices: [{ index: 0, ...choice }],
    ...(s.includeUsage ? { usage: null } : {}),
  });
  const usageChunk = (s: Started, u: { promptTokens: number; completionTokens: number }) => ({
    ...s.envelope,
    choices: [],
    usage: openaiUsage(u),
  });

  /** The served model as /v1/models lists it: vLLM's max_model_len (the effective one) and the REFORM limits. */
  const servedModel = (id: string, created: number) => {
    const info = engine.modelInfo();
    return {
      id,
      object: "model",
      created,
      owned_by: "reform",
      ...(info ? { max_model_len: info.defaults.maxModelLen, backend: info.backend, reform: limitsView(info) } : {}),
    };
  };

  r.get("/models", async (c) => {
    const created = Math.floor(d.stats.startedAt / 1000);
    const data: Record<string, unknown>[] = [servedModel(servedName(), created)];
    if (opts.listContextModels && engine.state() === "ready") {
      for (const ctx of await engine.listContexts()) {
        if (ctx.state !== "ready") continue;
        data.push({
          id: `${CONTEXT_MODEL_PREFIX}${ctx.id}`,
          object: "model",
          created: Math.floor(ctx.createdAt / 1000),
          owned_by: "reform",
        });
      }
    }
    return c.json({ object: "list", data });
  });

  r.get("/models/:model{.+}", async (c) => {
    const id = c.req.param("model");
    const created = Math.floor(d.stats.startedAt / 1000);
    if (isServedModel(id)) return c.json(servedModel(id, created));
    if (id.startsWith(CONTEXT_MODEL_PREFIX)) {
      const ctxId = id.slice(CONTEXT_MODEL_PREFIX.length);
      const ctx = ContextIdSchema.safeParse(ctxId).success ? await engine.getContext(ctxId) : null;
      if (ctx) return c.json({ id, object: "model", created: Math.floor(ctx.createdAt / 1000), owned_by: "reform" });
    }
    throw new ApiError(404, "model_not_found", `the model '${id}' does not exist`, "model");
  });

  r.post("/chat/completions", async (c) => {
    const body = await parseJsonBody(c, ChatBody, opts.maxJsonBytes);
    const wantLogprobs = body.logprobs === true;
    const s = await start(
      c,
      body,
      { messages: toMessages(body.messages) },
      {
        object: body.stream ? "chat.completion.chunk" : "chat.completion",
        idPrefix: "chatcmpl",
        maxTokens: body.max_completion_tokens ?? body.max_tokens ?? engine.modelInfo()?.defaults.maxTokens ?? 256,
        logprobs: wantLogprobs ? (body.top_logprobs ?? 0) : null,
      },
    );

    if (!body.stream) {
      const res = await collectQuery(d, s.q);
      return c.json(
        complete(s, res, {
          message: { role: "assistant", content: res.text, refusal: null },
          logprobs: wantLogprobs ? { content: res.logprobs, refusal: null } : null,
        }),
      );
    }

    // logprob entries of tokens whose text is still held back ride on the next chunk that is sent
    let pendingLp: LogprobView[] = [];
    const delta = (delta: Record<string, unknown>, finishReason: string | null) => {
      const lp = wantLogprobs && pendingLp.length > 0 ? { content: pendingLp, refusal: null } : null;
      if (lp) pendingLp = [];
      return chunk(s, { delta, logprobs: lp, finish_reason: finishReason });
    };
    let sentRole = false;
    return streamQuery(d, c.req.raw, s.q, `chat ${s.envelope.id}`, (ev, w) => {
      if (!sentRole) {
        sentRole = true;
        w.send(delta({ role: "assistant", content: "", refusal: null }, null));
      }
      if (ev.type === "progress") w.comment(`progress ${ev.stage} ${ev.done}/${ev.total}`);
      else if (ev.type === "token") {
        if (ev.logprob) pendingLp.push(logprobView(ev.logprob));
        if (ev.text.length > 0) w.send(delta({ content: ev.text }, null));
      } else if (ev.type === "done") {
        w.send(delta({}, finishOf(ev.finishReason)));
        if (s.includeUsage) w.send(usageChunk(s, ev.usage));
      }
    });
  });

  r.post("/completions", async (c) => {
    const body = await parseJsonBody(c, CompletionBody, opts.maxJsonBytes);
    const prompt = typeof body.prompt === "string" ? body.prompt : body.prompt[0]!;
    const wantLogprobs = body.logprobs != null;
    const s = await start(
      c,
      body,
      { prompt },
      {
        object: "text_completion",
        idPrefix: "cmpl",
        maxTokens: body.max_tokens ?? 16, // OpenAI's default for this endpoint
        logprobs: body.logprobs ?? null,
      },
    );
    const echo = body.echo === true ? prompt : "";

    if (!body.stream) {
      const res = await collectQuery(d, s.q);
      return c.json(
        complete(s, res, { text: echo + res.text, logprobs: wantLogprobs ? legacyLogprobs(res.logprobs, 0) : null }),
      );
    }

    let pending: LogprobView[] = [];
    let offset = echo.length;
    const piece = (text: string, finishReason: string | null) => {
      let lp = null;
      if (wantLogprobs && (pending.length > 0 || finishReason === null)) {
        lp = legacyLogprobs(pending, offset);
        for (const e of pending) offset += e.token.length;
        pending = [];
      }
      return chunk(s, { text, logprobs: lp, finish_reason: finishReason });
    };
    return streamQuery(
      d,
      c.req.raw,
      s.q,
      `completion ${s.envelope.id}`,
      (ev, w) => {
        if (ev.type === "progress") w.comment(`progress ${ev.stage} ${ev.done}/${ev.total}`);
        else if (ev.type === "token") {
          if (ev.logprob) pending.push(logprobView(ev.logprob));
          if (ev.text.length > 0) w.send(piece(ev.text, null));
        } else if (ev.type === "done") {
          w.send(piece("", finishOf(ev.finishReason)));
          if (s.includeUsage) w.send(usageChunk(s, ev.usage));
        }
      },
      (w) => {
        if (echo) w.send(chunk(s, { text: echo, logprobs: null, finish_reason: null }));
      },
    );
  });

  r.post("/tokenize", async (c) => {
    const body = await parseJsonBody(c, TokenizeBody, opts.maxJsonBytes);
    const tokens = await engine.tokenize((body.text ?? body.prompt)!, body.add_special_tokens);
    return c.json({ tokens, count: tokens.length, trained_context: engine.modelInfo()?.trainedContext ?? null });
  });

  r.post("/detokenize", async (c) => {
    const body = await parseJsonBody(c, DetokenizeBody, opts.maxJsonBytes);
    return c.json({ text: await engine.detokenize(body.tokens, body.skip_special_tokens) });
  });

  return r;
}
