/**
 * OpenAI-compatible surface: POST /v1/chat/completions and GET /v1/models.
 *
 * The long context is chosen by the extra body field `context_id` (or `reform: {context_id,
 * method, budget}`), or by picking the model `context:<id>` (listed by /v1/models), so chat
 * frontends that cannot send extra fields work unchanged. Without a context it is plain chat.
 */
import { Hono } from "hono";
import { z } from "zod";
import type { ChatMessage, Method } from "../src/engine/api.ts";
import { ApiError } from "./errors.ts";
import {
  collect,
  type Collected,
  logprobView,
  MethodSchema,
  newId,
  openQuery,
  PenaltyFields,
  precheck,
  samplingExtras,
  StopSchema,
  streamQuery,
} from "./query.ts";
import type { Deps } from "./types.ts";
import { ContextIdSchema, parseJsonBody } from "./util.ts";

const ContentPart = z.looseObject({ type: z.string(), text: z.string().optional() });

const ChatMessageSchema = z.looseObject({
  role: z.enum(["system", "developer", "user", "assistant", "tool"]),
  content: z.union([z.string(), z.array(ContentPart), z.null()]).optional(),
  name: z.string().optional(),
});

const CONTEXT_MODEL_PREFIX = "context:";

/** The long context a request names: `context_id`, `reform.context_id`, or the model `context:<id>`. */
function reformTarget(body: {
  model?: string;
  context_id?: string;
  method?: Method;
  budget?: number;
  reform?: { context_id?: string; method?: Method; budget?: number };
}): { contextId: string | undefined; method: Method; budget: number | undefined } {
  let contextId = body.context_id ?? body.reform?.context_id;
  if (contextId === undefined && body.model?.startsWith(CONTEXT_MODEL_PREFIX)) {
    const fromModel = ContextIdSchema.safeParse(body.model.slice(CONTEXT_MODEL_PREFIX.length));
    if (!fromModel.success) throw new ApiError(404, "model_not_found", `the model '${body.model}' does not exist`, "model");
    contextId = fromModel.data;
  }
  return { contextId, method: body.reform?.method ?? body.method ?? "reform", budget: body.reform?.budget ?? body.budget };
}

/** The fields both OpenAI endpoints share (sampling, REFORM routing) */
const ReformFields = {
  model: z.string().optional(),
  stream: z.boolean().nullish(),
  stream_options: z.looseObject({ include_usage: z.boolean().optional() }).nullish(),
  max_tokens: z.number().int().min(1).max(1_000_000).nullish(),
  temperature: z.number().min(0).max(2).nullish(),
  top_p: z.number().gt(0).max(1).nullish(),
  top_k: z.number().int().min(0).nullish(),
  seed: z.number().int().nullish(),
  stop: StopSchema,
  n: z.number().int().nullish(),
  ...PenaltyFields,
  context_id: ContextIdSchema.optional(),
  method: MethodSchema.optional(),
  budget: z.number().int().min(1).optional(),
  reform: z
    .object({
      context_id: ContextIdSchema.optional(),
      method: MethodSchema.optional(),
      budget: z.number().int().min(1).optional(),
    })
    .strict()
    .optional(),
};

/** POST /v1/completions (OpenAI's legacy text completion): a raw prompt, no chat template. */
const CompletionBody = z
  .looseObject({
    ...ReformFields,
    prompt: z.union([z.string().min(1), z.array(z.string().min(1)).length(1, "one prompt per request")]),
    logprobs: z.number().int().min(0).max(20).nullish(),
    echo: z.boolean().nullish(),
    suffix: z.string().nullish(),
    best_of: z.number().int().nullish(),
  })
  .superRefine((v, ctx) => {
    if (v.n != null && v.n !== 1) ctx.addIssue({ code: "custom", path: ["n"], message: "only n=1 is supported" });
    if (v.best_of != null && v.best_of !== 1) ctx.addIssue({ code: "custom", path: ["best_of"], message: "only best_of=1 is supported" });
    if (v.suffix) ctx.addIssue({ code: "custom", path: ["suffix"], message: "suffix (insertion) is not supported" });
    if (v.echo && v.logprobs != null)
      ctx.addIssue({ code: "custom", path: ["echo"], message: "echo with logprobs is not supported (prompt log-probabilities are not computed)" });
    if (v.stop.length > 16) ctx.addIssue({ code: "custom", path: ["stop"], message: "at most 16 stop sequences" });
  });

/** OpenAI's legacy logprobs object for completion tokens starting at character `offset` of the returned text */
function legacyLogprobs(entries: ReturnType<typeof logprobView>[], offset: number) {
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

const ChatBody = z
  .looseObject({
    ...ReformFields,
    messages: z.array(ChatMessageSchema).min(1),
    max_completion_tokens: z.number().int().min(1).max(1_000_000).nullish(),
    logprobs: z.boolean().nullish(),
    top_logprobs: z.number().int().min(0).max(20).nullish(),
    // accepted only in their no-op forms, refused otherwise (never silently ignored)
    tools: z.array(z.unknown()).nullish(),
    tool_choice: z.unknown().optional(),
    functions: z.array(z.unknown()).nullish(),
    response_format: z.looseObject({ type: z.string() }).nullish(),
  })
  .superRefine((v, ctx) => {
    if (v.n != null && v.n !== 1) ctx.addIssue({ code: "custom", path: ["n"], message: "only n=1 is supported" });
    if (v.top_logprobs != null && v.logprobs !== true)
      ctx.addIssue({ code: "custom", path: ["top_logprobs"], message: "top_logprobs requires logprobs: true" });
    if ((v.tools?.length ?? 0) > 0 || (v.functions?.length ?? 0) > 0)
      ctx.addIssue({ code: "custom", path: ["tools"], message: "tool / function calling is not supported by this server" });
    if (v.tool_choice != null && v.tool_choice !== "none" && v.tool_choice !== "auto")
      ctx.addIssue({ code: "custom", path: ["tool_choice"], message: "tool / function calling is not supported by this server" });
    if (v.response_format != null && v.response_format.type !== "text")
      ctx.addIssue({
        code: "custom",
        path: ["response_format"],
        message: `response_format '${v.response_format.type}' is not supported (only 'text'; constrained decoding is not implemented)`,
      });
    if (v.stop.length > 16) ctx.addIssue({ code: "custom", path: ["stop"], message: "at most 16 stop sequences" });
    v.messages.forEach((m, i) => {
      if (Array.isArray(m.content)) {
        m.content.forEach((p, j) => {
          if (p.type !== "text" || typeof p.text !== "string") {
            ctx.addIssue({
              code: "custom",
              path: ["messages", i, "content", j],
              message: `content part type '${p.type}' is not supported (text only)`,
            });
          }
        });
      }
    });
  });

/** OpenAI's usage object */
function openaiUsage(u: { promptTokens: number; completionTokens: number }) {
  return { prompt_tokens: u.promptTokens, completion_tokens: u.completionTokens, total_tokens: u.promptTokens + u.completionTokens };
}

/** The REFORM extras of a non-stream OpenAI response */
function reformExtras(contextId: string | undefined, method: Method, res: Collected) {
  const t = res.timings;
  return {
    context_id: contextId ?? null,
    method,
    context_tokens: res.usage.contextTokens,
    selected_tokens: res.usage.selectedTokens,
    timings: { queue_ms: t.queueMs, ttft_ms: t.ttftMs, tpot_ms: t.tpotMs, total_ms: t.totalMs },
  };
}

function toMessages(ms: z.output<typeof ChatBody>["messages"]): ChatMessage[] {
  return ms.map((m) => {
    const content =
      m.content == null ? "" : typeof m.content === "string" ? m.content : m.content.map((p) => p.text ?? "").join("");
    const role = m.role === "developer" ? "system" : m.role;
    return { role, content };
  });
}

export function openaiRoutes(d: Deps): Hono {
  const { engine, opts, stats, log } = d;
  const r = new Hono();
  const servedName = () => opts.servedName ?? engine.modelInfo()?.id ?? "reform";

  r.get("/models", async (c) => {
    const created = Math.floor(d.stats.startedAt / 1000);
    const info = engine.modelInfo();
    const data: Record<string, unknown>[] = [
      {
        id: servedName(),
        object: "model",
        created,
        owned_by: "reform",
        ...(info ? { max_model_len: info.trainedContext, backend: info.backend } : {}),
      },
    ];
    if (opts.listContextModels && engine.state() === "ready") {
      for (const ctx of await engine.listContexts()) {
        if (ctx.state !== "ready") continue;
        data.push({
          id: `${CONTEXT_MODEL_PREFIX}${ctx.id}`,
          object: "model",
          created: Math.floor(ctx.createdAt / 1000),
          owned_by: "reform-context",
        });
      }
    }
    return c.json({ object: "list", data });
  });

  r.get("/models/:model{.+}", async (c) => {
    const id = c.req.param("model");
    const created = Math.floor(d.stats.startedAt / 1000);
    if (id === servedName()) return c.json({ id, object: "model", created, owned_by: "reform" });
    if (id.startsWith(CONTEXT_MODEL_PREFIX)) {
      const ctxId = id.slice(CONTEXT_MODEL_PREFIX.length);
      const ctx = ContextIdSchema.safeParse(ctxId).success ? await engine.getContext(ctxId) : null;
      if (ctx) return c.json({ id, object: "model", created: Math.floor(ctx.createdAt / 1000), owned_by: "reform-context" });
    }
    throw new ApiError(404, "model_not_found", `the model '${id}' does not exist`, "model");
  });

  r.post("/chat/completions", async (c) => {
    const body = await parseJsonBody(c, ChatBody, opts.maxJsonBytes);
    const { contextId, method, budget } = reformTarget(body);
    await precheck(d, contextId, budget);

    const defaults = engine.modelInfo()?.defaults;
    const { it, first, ac } = await openQuery(engine, c.req.raw, {
      contextId,
      messages: toMessages(body.messages),
      method,
      budget,
      sampling: {
        maxTokens: body.max_completion_tokens ?? body.max_tokens ?? defaults?.maxTokens ?? 256,
        temperature: body.temperature ?? 1,
        topP: body.top_p ?? 1,
        topK: body.top_k ?? 0,
        seed: body.seed ?? undefined,
        stop: body.stop,
        ...samplingExtras(body, body.logprobs === true ? (body.top_logprobs ?? 0) : null),
      },
    });
    const id = newId("chatcmpl");
    const wantLogprobs = body.logprobs === true;
    const created = Math.floor(Date.now() / 1000);
    const model = body.model ?? servedName();
    const fingerprint = `reform-${engine.modelInfo()?.backend ?? "engine"}`;
    const finish = (f: string) => (f === "length" ? "length" : "stop");

    if (!body.stream) {
      const res = await collect(it, first);
      stats.observeQuery(res.timings, res.usage.completionTokens);
      return c.json({
        id,
        object: "chat.completion",
        created,
        model,
        system_fingerprint: fingerprint,
        choices: [
          {
            index: 0,
            message: { role: "assistant", content: res.text, refusal: null },
            logprobs: wantLogprobs ? { content: res.logprobs, refusal: null } : null,
            finish_reason: finish(res.finishReason),
          },
        ],
        usage: openaiUsage(res.usage),
        reform: reformExtras(contextId, method, res),
      });
    }

    const includeUsage = body.stream_options?.include_usage === true;
    // logprob entries of tokens whose text is still held back ride on the next chunk that is sent
    let pendingLp: ReturnType<typeof logprobView>[] = [];
    const chunk = (delta: Record<string, unknown>, finishReason: string | null) => {
      const lp = wantLogprobs && pendingLp.length > 0 ? { content: pendingLp, refusal: null } : null;
      if (lp) pendingLp = [];
      return {
        id,
        object: "chat.completion.chunk",
        created,
        model,
        system_fingerprint: fingerprint,
        choices: [{ index: 0, delta, logprobs: lp, finish_reason: finishReason }],
        ...(includeUsage ? { usage: null } : {}),
      };
    };

    let sentRole = false;
    return streamQuery(d, c.req.raw, { it, first, ac }, `chat ${id}`, (ev, w) => {
      const sendRole = () => {
        if (!sentRole) {
          sentRole = true;
          w.send(chunk({ role: "assistant", content: "", refusal: null }, null));
        }
      };
      if (ev.type === "start") sendRole();
      else if (ev.type === "token") {
        sendRole();
        if (ev.logprob) pendingLp.push(logprobView(ev.logprob));
        if (ev.text.length > 0) w.send(chunk({ content: ev.text }, null));
      } else if (ev.type === "done") {
        sendRole();
        w.send(chunk({}, finish(ev.finishReason)));
        if (includeUsage) {
          w.send({
            id,
            object: "chat.completion.chunk",
            created,
            model,
            system_fingerprint: fingerprint,
            choices: [],
            usage: openaiUsage(ev.usage),
          });
        }
      }
    });
  });

  // vLLM-style token utilities
  const TokenizeBody = z
    .object({
      model: z.string().optional(),
      text: z.string().optional(),
      prompt: z.string().optional(),
      add_special_tokens: z.boolean().default(false),
    })
    .strict()
    .refine((v) => (v.text === undefined) !== (v.prompt === undefined), { message: "give exactly one of 'text' or 'prompt'", path: ["text"] });
  r.post("/tokenize", async (c) => {
    const body = await parseJsonBody(c, TokenizeBody, opts.maxJsonBytes);
    const tokens = await engine.tokenize((body.text ?? body.prompt)!, body.add_special_tokens);
    return c.json({ tokens, count: tokens.length, trained_context: engine.modelInfo()?.trainedContext ?? null });
  });
  const DetokenizeBody = z
    .object({
      model: z.string().optional(),
      tokens: z.array(z.number().int()).max(4_000_000),
      skip_special_tokens: z.boolean().default(false),
    })
    .strict();
  r.post("/detokenize", async (c) => {
    const body = await parseJsonBody(c, DetokenizeBody, opts.maxJsonBytes);
    return c.json({ text: await engine.detokenize(body.tokens, body.skip_special_tokens) });
  });

  r.post("/completions", async (c) => {
    const body = await parseJsonBody(c, CompletionBody, opts.maxJsonBytes);
    const { contextId, method, budget } = reformTarget(body);
    await precheck(d, contextId, budget);
    const prompt = typeof body.prompt === "string" ? body.prompt : body.prompt[0]!;
    const { it, first, ac } = await openQuery(engine, c.req.raw, {
      contextId,
      prompt,
      method,
      budget,
      sampling: {
        maxTokens: body.max_tokens ?? 16, // OpenAI's default for this endpoint
        temperature: body.temperature ?? 1,
        topP: body.top_p ?? 1,
        topK: body.top_k ?? 0,
        seed: body.seed ?? undefined,
        stop: body.stop,
        ...samplingExtras(body, body.logprobs ?? null),
      },
    });
    const id = newId("cmpl");
    const created = Math.floor(Date.now() / 1000);
    const model = body.model ?? servedName();
    const fingerprint = `reform-${engine.modelInfo()?.backend ?? "engine"}`;
    const finish = (f: string) => (f === "length" ? "length" : "stop");
    const echo = body.echo === true ? prompt : "";
    const wantLogprobs = body.logprobs != null;

    if (!body.stream) {
      const res = await collect(it, first);
      stats.observeQuery(res.timings, res.usage.completionTokens);
      return c.json({
        id,
        object: "text_completion",
        created,
        model,
        system_fingerprint: fingerprint,
        choices: [
          {
            index: 0,
            text: echo + res.text,
            logprobs: wantLogprobs ? legacyLogprobs(res.logprobs, 0) : null,
            finish_reason: finish(res.finishReason),
          },
        ],
        usage: openaiUsage(res.usage),
        reform: reformExtras(contextId, method, res),
      });
    }

    const includeUsage = body.stream_options?.include_usage === true;
    let pending: ReturnType<typeof logprobView>[] = [];
    let offset = echo.length;
    const chunk = (text: string, finishReason: string | null) => {
      let lp = null;
      if (wantLogprobs && (pending.length > 0 || finishReason === null)) {
        lp = legacyLogprobs(pending, offset);
        for (const e of pending) offset += e.token.length;
        pending = [];
      }
      return {
        id,
        object: "text_completion",
        created,
        model,
        system_fingerprint: fingerprint,
        choices: [{ index: 0, text, logprobs: lp, finish_reason: finishReason }],
        ...(includeUsage ? { usage: null } : {}),
      };
    };
    return streamQuery(
      d,
      c.req.raw,
      { it, first, ac },
      `completion ${id}`,
      (ev, w) => {
        if (ev.type === "token") {
          if (ev.logprob) pending.push(logprobView(ev.logprob));
          if (ev.text.length > 0) w.send(chunk(ev.text, null));
        } else if (ev.type === "done") {
          w.send(chunk("", finish(ev.finishReason)));
          if (includeUsage) {
            w.send({ id, object: "text_completion", created, model, system_fingerprint: fingerprint, choices: [], usage: openaiUsage(ev.usage) });
          }
        }
      },
      (w) => {
        if (echo) w.send({ ...chunk("", null), choices: [{ index: 0, text: echo, logprobs: null, finish_reason: null }] });
      },
    );
  });

  return r;
}
