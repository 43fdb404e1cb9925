/**
 * Protocol models of the HTTP API: the request bodies (zod) of every endpoint that takes JSON, and the
 * views that turn engine results into response JSON. Field limits are the engine's own (`Field` in
 * src/engine/schema.ts) under the API's snake_case names, so the HTTP layer and the engine cannot
 * disagree; this file only adds what is specific to the HTTP shape (aliases, OpenAI's no-op fields).
 */
import { z } from "zod";
import type { ScoreBackground } from "../src/engine/background.ts";
import type {
  ContextInfo,
  InlineInfo,
  Method,
  ModelInfo,
  SamplingOptions,
  Selection,
  TokenLogprob,
  Usage,
} from "../src/engine/api.ts";
import { ContextIdSchema, Field, MessageSchema } from "../src/engine/schema.ts";
import type { GenerationConfigMode } from "../src/config.ts";
import type { SamplingDefaults } from "../src/model/generation-config.ts";
import { ApiError } from "./errors.ts";

export { ContextIdSchema };

/** `stop`: a string or a list of strings; empty strings are dropped. */
export const StopSchema = z
  .union([z.string(), Field.stop])
  .nullish()
  .transform((v) => (v == null ? [] : typeof v === "string" ? [v] : v).filter((s) => s.length > 0));

/** The sampling fields both query APIs share, snake_case. */
const SamplingFields = {
  temperature: Field.temperature.nullish(),
  top_p: Field.topP.nullish(),
  top_k: Field.topK.nullish(),
  min_p: Field.minP.nullish(),
  seed: Field.seed.nullish(),
  stop: StopSchema,
  presence_penalty: Field.presencePenalty.nullish(),
  frequency_penalty: Field.frequencyPenalty.nullish(),
  repetition_penalty: Field.repetitionPenalty.nullish(),
  logit_bias: Field.logitBias.nullish(),
};
const SamplingObject = z.object(SamplingFields);
type SamplingBody = z.output<typeof SamplingObject>;

/** The model's sampling defaults an OpenAI request gets for the fields it leaves out: its generation_config.json's
 * (vLLM's `--generation-config auto`), or none with --generation-config openai. */
export function openaiSamplingDefaults(info: ModelInfo | null, mode: GenerationConfigMode): SamplingDefaults {
  return mode === "auto" ? (info?.generation ?? {}) : {};
}

/** What an OpenAI request that sets no sampling field gets (GET /props: default_generation_settings). */
export function openaiSamplingView(info: ModelInfo | null, mode: GenerationConfigMode) {
  const s = samplingOf(
    { stop: [] },
    { maxTokens: 0, temperature: 1, logprobs: null, model: openaiSamplingDefaults(info, mode) },
  );
  return {
    generation_config: mode,
    temperature: s.temperature,
    top_p: s.topP,
    top_k: s.topK,
    min_p: s.minP ?? 0,
    repetition_penalty: s.repetitionPenalty ?? 1,
  };
}

/** The engine's sampling options from a request's snake_case fields; a field the request leaves out takes the
 * model's default (`o.model`: its generation_config.json, the OpenAI routes only), then the API's. */
export function samplingOf(
  b: SamplingBody,
  o: { maxTokens: number; temperature: number; logprobs: number | null; model?: SamplingDefaults },
): SamplingOptions {
  const m = o.model ?? {};
  const s: SamplingOptions = {
    maxTokens: o.maxTokens,
    temperature: b.temperature ?? m.temperature ?? o.temperature,
    topP: b.top_p ?? m.topP ?? 1,
    topK: b.top_k ?? m.topK ?? 0,
    seed: b.seed ?? undefined,
    stop: b.stop,
  };
  if (o.logprobs !== null) s.logprobs = o.logprobs;
  const minP = b.min_p ?? m.minP;
  if (minP != null && minP > 0) s.minP = minP;
  if (b.presence_penalty != null) s.presencePenalty = b.presence_penalty;
  if (b.frequency_penalty != null) s.frequencyPenalty = b.frequency_penalty;
  const repetitionPenalty = b.repetition_penalty ?? m.repetitionPenalty;
  if (repetitionPenalty != null) s.repetitionPenalty = repetitionPenalty;
  if (b.logit_bias != null)
    s.logitBias = Object.fromEntries(Object.entries(b.logit_bias).map(([k, v]) => [Number(k), v]));
  return s;
}

// ------------------------------------------------------------------ native API

/** The most a context's metadata may take as JSON (bytes): it is stored beside the context and repeated in every
 * context listing and /v1/models, so a name or a file's details fit, a document does not. */
export const MAX_METADATA_BYTES = 16 * 1024;

export const CreateContextBody = z
  .object({
    metadata: z
      .record(z.string(), z.unknown())
      .refine((m) => new TextEncoder().encode(JSON.stringify(m)).byteLength <= MAX_METADATA_BYTES, {
        message: `metadata must take at most ${MAX_METADATA_BYTES} bytes as JSON`,
      })
      .optional(),
  })
  .strict();

export const JsonContentBody = z.object({ text: z.string(), final: z.boolean().optional() }).strict();

/** POST /v1/contexts/:id/query */
export const QueryBody = z
  .object({
    question: z.string().min(1).optional(),
    messages: z.array(MessageSchema).min(1).optional(),
    max_tokens: Field.maxTokens.optional(),
    ...SamplingFields,
    method: Field.method.default("reform"),
    budget: Field.budget.optional(),
    /** the score floor for this query, 0-1 (0: the budget filled by score); default the server's --score-floor */
    score_floor: Field.scoreFloor.optional(),
    /** the background each question token's scores count from ("kth-pairs", "kth", "mean", "off"; true = the default, false =
     * "off"); default the server's --score-background */
    score_background: Field.scoreBackground.optional(),
    stream: z.boolean().default(true),
    /** report log-probabilities with this many alternatives per token (0..20) */
    logprobs: Field.logprobs.optional(),
    /** report what was gathered: the `start` event's (non-stream: the body's) `selection` (selectionView) */
    return_selection: z.boolean().optional(),
  })
  .strict()
  .superRefine((v, ctx) => {
    if ((v.question === undefined) === (v.messages === undefined)) {
      ctx.addIssue({ code: "custom", path: ["question"], message: "give exactly one of 'question' or 'messages'" });
    }
  });

// ------------------------------------------------------------------ OpenAI-compatible API

export const CONTEXT_MODEL_PREFIX = "context:";
/** A model name the README documents for the served model, whatever its own name. */
export const MODEL_ALIAS = "reform";

/** The fields both OpenAI endpoints share (sampling, REFORM routing) */
const OpenAIFields = {
  model: z.string().optional(),
  stream: z.boolean().nullish(),
  stream_options: z.looseObject({ include_usage: z.boolean().optional() }).nullish(),
  max_tokens: Field.maxTokens.nullish(),
  ...SamplingFields,
  n: z.number().int().nullish(),
  context_id: ContextIdSchema.optional(),
  method: Field.method.optional(),
  budget: Field.budget.optional(),
  score_floor: Field.scoreFloor.optional(),
  score_background: Field.scoreBackground.optional(),
  reform: z
    .object({
      context_id: ContextIdSchema.optional(),
      method: Field.method.optional(),
      budget: Field.budget.optional(),
      score_floor: Field.scoreFloor.optional(),
      score_background: Field.scoreBackground.optional(),
      /** false: a prompt beyond the window is refused (400 context_length_exceeded) instead of answered by REFORM */
      inline: z.boolean().optional(),
      /** true: streams carry `event: progress` while an inline prompt compresses (else SSE comments) */
      progress: z.boolean().optional(),
    })
    .strict()
    .optional(),
};

/**
 * Sampling and decoding controls of other servers (llama.cpp, vLLM, text-generation-webui) that this one does not
 * implement, with the values that mean "off". The OpenAI bodies ignore unknown fields (clients send many harmless
 * ones), but a request that turns one of these on would otherwise be answered as if it had not: it is refused.
 */
const NOT_IMPLEMENTED: Record<string, readonly unknown[]> = {
  mirostat: [0],
  mirostat_mode: [0],
  typical_p: [1],
  tfs_z: [1],
  top_a: [0],
  epsilon_cutoff: [0],
  eta_cutoff: [0],
  dynatemp_range: [0],
  xtc_probability: [0],
  dry_multiplier: [0],
  min_tokens: [0],
  ignore_eos: [false],
  use_beam_search: [false],
  guided_json: [],
  guided_regex: [],
  guided_choice: [],
  guided_grammar: [],
  grammar: [],
  json_schema: [],
};

/** Rules both OpenAI endpoints share. */
function refineOpenAI(
  v: { n?: number | null; stream?: boolean | null; stream_options?: unknown },
  ctx: z.RefinementCtx,
): void {
  for (const [field, off] of Object.entries(NOT_IMPLEMENTED)) {
    const value = (v as Record<string, unknown>)[field];
    if (value != null && !off.includes(value))
      ctx.addIssue({
        code: "custom",
        path: [field],
        message: `'${field}' is not implemented by this server (sampling: temperature, top_p, top_k, min_p, seed, penalties, logit_bias)`,
      });
  }
  if (v.n != null && v.n !== 1) ctx.addIssue({ code: "custom", path: ["n"], message: "only n=1 is supported" });
  if (v.stream_options != null && v.stream !== true)
    ctx.addIssue({
      code: "custom",
      path: ["stream_options"],
      message: "stream_options is only allowed when stream is true",
    });
}

const ContentPart = z.looseObject({ type: z.string(), text: z.string().optional() });

const ChatMessageSchema = z.looseObject({
  role: z.enum(["system", "developer", "user", "assistant", "tool"]),
  content: z.union([z.string(), z.array(ContentPart), z.null()]).optional(),
  name: z.string().optional(),
});

/** POST /v1/chat/completions */
export const ChatBody = z
  .looseObject({
    ...OpenAIFields,
    messages: z.array(ChatMessageSchema).min(1),
    max_completion_tokens: Field.maxTokens.nullish(),
    logprobs: z.boolean().nullish(),
    top_logprobs: Field.logprobs.nullish(),
    // accepted only in their no-op forms, refused otherwise (never silently ignored)
    tools: z.array(z.unknown()).nullish(),
    tool_choice: z.unknown().optional(),
    functions: z.array(z.unknown()).nullish(),
    response_format: z.looseObject({ type: z.string() }).nullish(),
  })
  .superRefine((v, ctx) => {
    refineOpenAI(v, ctx);
    // 0 is the off value (OpenAI clients send it with logprobs: false)
    if (v.top_logprobs != null && v.top_logprobs > 0 && v.logprobs !== true)
      ctx.addIssue({ code: "custom", path: ["top_logprobs"], message: "top_logprobs requires logprobs: true" });
    if ((v.tools?.length ?? 0) > 0 || (v.functions?.length ?? 0) > 0)
      ctx.addIssue({
        code: "custom",
        path: ["tools"],
        message: "tool / function calling is not supported by this server",
      });
    if (v.tool_choice != null && v.tool_choice !== "none" && v.tool_choice !== "auto")
      ctx.addIssue({
        code: "custom",
        path: ["tool_choice"],
        message: "tool / function calling is not supported by this server",
      });
    if (v.response_format != null && v.response_format.type !== "text")
      ctx.addIssue({
        code: "custom",
        path: ["response_format"],
        message: `response_format '${v.response_format.type}' is not supported (only 'text'; constrained decoding is not implemented)`,
      });
    v.messages.forEach((m, i) => {
      // only an assistant turn (one that called tools) may come without content
      if (m.content == null && m.role !== "assistant")
        ctx.addIssue({
          code: "custom",
          path: ["messages", i, "content"],
          message: `a ${m.role} message needs content`,
        });
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
export type ChatBody = z.output<typeof ChatBody>;

/** POST /v1/completions (OpenAI's legacy text completion): a raw prompt, no chat template. */
export const CompletionBody = z
  .looseObject({
    ...OpenAIFields,
    // OpenAI's other prompt shapes (token ids, several prompts) parse, so that the refinement below can say which
    // one was sent and what to do instead; the handler sees a single string
    prompt: z
      .union([z.string().min(1), z.array(z.union([z.string().min(1), z.number(), z.array(z.number())])).min(1)])
      .transform((p) => (typeof p === "string" ? p : p.length === 1 && typeof p[0] === "string" ? p[0] : p)),
    logprobs: Field.logprobs.nullish(),
    echo: z.boolean().nullish(),
    suffix: z.string().nullish(),
    best_of: z.number().int().nullish(),
  })
  .superRefine((v, ctx) => {
    refineOpenAI(v, ctx);
    if (typeof v.prompt !== "string")
      ctx.addIssue({
        code: "custom",
        path: ["prompt"],
        message: v.prompt.some((p) => typeof p !== "string")
          ? "a prompt of token ids is not supported: send its text (POST /v1/detokenize gives the text of token ids)"
          : "one prompt per request (an array holds exactly one string)",
      });
    if (v.best_of != null && v.best_of !== 1)
      ctx.addIssue({ code: "custom", path: ["best_of"], message: "only best_of=1 is supported" });
    if (v.suffix) ctx.addIssue({ code: "custom", path: ["suffix"], message: "suffix (insertion) is not supported" });
    if (v.echo && v.logprobs != null)
      ctx.addIssue({
        code: "custom",
        path: ["echo"],
        message: "echo with logprobs is not supported (prompt log-probabilities are not computed)",
      });
  });
export type CompletionBody = z.output<typeof CompletionBody>;

/** POST /v1/tokenize (vLLM-style) */
export const TokenizeBody = z
  .object({
    model: z.string().optional(),
    text: z.string().optional(),
    prompt: z.string().optional(),
    add_special_tokens: z.boolean().default(false),
  })
  .strict()
  .refine((v) => (v.text === undefined) !== (v.prompt === undefined), {
    message: "give exactly one of 'text' or 'prompt'",
    path: ["text"],
  });

/** POST /v1/detokenize */
export const DetokenizeBody = z
  .object({
    model: z.string().optional(),
    tokens: z.array(z.number().int()).max(4_000_000),
    skip_special_tokens: z.boolean().default(false),
  })
  .strict();

/** The long context a request names: `context_id`, `reform.context_id`, or the model `context:<id>`, with the
 * REFORM fields given top-level or in the `reform` object. A field given twice with two values is a 400 naming both
 * (answering from either one would be a silent guess). */
export function reformTarget(body: {
  model?: string;
  context_id?: string;
  method?: Method;
  budget?: number;
  score_floor?: number;
  score_background?: ScoreBackground;
  reform?: {
    context_id?: string;
    method?: Method;
    budget?: number;
    score_floor?: number;
    score_background?: ScoreBackground;
  };
}): {
  contextId: string | undefined;
  method: Method;
  budget: number | undefined;
  scoreFloor: number | undefined;
  scoreBackground: ScoreBackground | undefined;
} {
  let fromModel: string | undefined;
  if (body.model?.startsWith(CONTEXT_MODEL_PREFIX)) {
    const id = ContextIdSchema.safeParse(body.model.slice(CONTEXT_MODEL_PREFIX.length));
    if (!id.success) throw new ApiError(404, "model_not_found", `the model '${body.model}' does not exist`, "model");
    fromModel = id.data;
  }
  const contextId = agreed("context_id", [
    ["context_id", body.context_id],
    ["reform.context_id", body.reform?.context_id],
    ["model", fromModel],
  ]);
  return {
    contextId,
    method:
      agreed("method", [
        ["method", body.method],
        ["reform.method", body.reform?.method],
      ]) ?? "reform",
    budget: agreed("budget", [
      ["budget", body.budget],
      ["reform.budget", body.reform?.budget],
    ]),
    scoreFloor: agreed("score_floor", [
      ["score_floor", body.score_floor],
      ["reform.score_floor", body.reform?.score_floor],
    ]),
    scoreBackground: agreed("score_background", [
      ["score_background", body.score_background],
      ["reform.score_background", body.reform?.score_background],
    ]),
  };
}

/** The one value the given places agree on (undefined when none is given); two different values are a 400. */
function agreed<T>(param: string, places: [string, T | undefined][]): T | undefined {
  const given = places.filter((p): p is [string, T] => p[1] !== undefined);
  const other = given.find((p) => p[1] !== given[0]![1]);
  if (other)
    throw new ApiError(
      400,
      "conflicting_values",
      `'${given[0]![0]}' is ${JSON.stringify(given[0]![1])} but '${other[0]}' is ${JSON.stringify(other[1])}: give it once`,
      param,
    );
  return given[0]?.[1];
}

// ------------------------------------------------------------------ response views

/** How an inline request was served, as the `reform.inline` extension field shows it. */
export function inlineView(i: InlineInfo): Record<string, unknown> {
  return {
    context_id: i.contextId,
    cache: i.cache,
    context_tokens: i.contextTokens,
    appended_tokens: i.appendedTokens,
    gathered_tokens: i.gatheredTokens,
    question_tokens: i.questionTokens,
    prefix_key: i.key,
  };
}

/** The response headers of an inline request: `X-Reform-Inline` (how) and `X-Reform-Context-Id`. */
export function inlineHeaders(i: InlineInfo): Record<string, string> {
  return {
    "x-reform-inline": `cache=${i.cache}; context_id=${i.contextId}; gathered_tokens=${i.gatheredTokens}; context_tokens=${i.contextTokens}; appended_tokens=${i.appendedTokens}`,
    "x-reform-context-id": i.contextId,
  };
}

/** ContextInfo as the API shows it: the engine's camelCase fields plus snake_case aliases. */
export function contextView(info: ContextInfo): Record<string, unknown> {
  return {
    object: "context",
    ...info,
    bytes_received: info.bytesReceived,
    tokens_received: info.tokensReceived,
    tokens_processed: info.tokensProcessed,
    pending_chars: info.pendingChars,
    embedding_bytes: info.embeddingBytes,
    disk_bytes: info.diskBytes,
    cache_len: info.cacheLen,
    invalid_utf8: info.invalidUtf8,
    created_at: info.createdAt,
    updated_at: info.updatedAt,
  };
}

/** OpenAI's logprobs entry for one token */
/**
 * The effective limits, heads and compressor settings of the loaded model (GET /props, and the served model in
 * GET /v1/models): the values the engine resolved (src/engine/load.ts resolveDefaults), not the flags.
 */
export function limitsView(info: ModelInfo) {
  const d = info.defaults;
  const c = info.compressor;
  return {
    limits: {
      trained_window: info.trainedContext,
      max_model_len: d.maxModelLen,
      allow_beyond_window: d.allowBeyondWindow,
      chunk_size: d.chunkSize,
      capacity: d.capacity,
      max_query_tokens: d.maxQueryTokens,
      budget: d.budget,
      max_budget: d.maxBudget,
      max_tokens: d.maxTokens,
      max_new_tokens: d.maxNewTokens,
      smoothing_window: d.smoothingWindow,
      smoothing_lag: d.smoothingLag,
      smoothing: d.smoothing,
      edge: d.edge,
      sentence_tail: d.sentenceTail,
      score_floor: d.scoreFloor,
      score_background: d.scoreBackground,
      template_tokens: d.templateTokens,
      baseline_cache_factor: d.baselineCacheFactor,
      max_h2o_tokens: d.maxH2oTokens,
    },
    heads: info.heads.map((h) => ({ layer: h.layer, kind: h.kind, head: h.head })),
    compressor: {
      chunk_size: c.chunkSize,
      capacity: c.capacity,
      n_sink: c.nSink,
      n_recent: c.nRecent,
      obs_window: c.obsWindow,
      eviction: c.eviction,
      embed_dim: c.embedDim,
      embed_dtype: c.embedDtype,
      exit_layer: c.exitLayer,
      bos_token_id: c.bosTokenId,
    },
  };
}

export function logprobView(lp: TokenLogprob & { top?: TokenLogprob[] }) {
  const one = (t: TokenLogprob) => ({ token: t.token, logprob: t.logprob, bytes: t.bytes });
  return { ...one(lp), top_logprobs: (lp.top ?? []).map(one) };
}
export type LogprobView = ReturnType<typeof logprobView>;

/** OpenAI's usage object */
export function openaiUsage(u: { promptTokens: number; completionTokens: number }) {
  return {
    prompt_tokens: u.promptTokens,
    completion_tokens: u.completionTokens,
    total_tokens: u.promptTokens + u.completionTokens,
  };
}

/** The native API's usage: OpenAI's plus the context's counts. */
export function usageView(u: Usage) {
  return { ...openaiUsage(u), context_tokens: u.contextTokens, selected_tokens: u.selectedTokens };
}

/** What a query gathered (opt-in `return_selection`), in the API's snake_case. */
export function selectionView(s: Selection) {
  return {
    method: s.method,
    context_tokens: s.contextTokens,
    selected_tokens: s.selectedTokens,
    window: s.window,
    lag: s.lag,
    edge: s.edge,
    score_floor: s.scoreFloor,
    score_background: s.scoreBackground,
    spans: s.spans.map((p) => ({
      start: p.start,
      end: p.end,
      byte_start: p.byteStart,
      byte_end: p.byteEnd,
      char_start: p.charStart,
      char_end: p.charEnd,
      score: p.score,
      text: p.text,
    })),
    profile: s.profile,
  };
}

export function timingsView(t: { queueMs: number; ttftMs: number; tpotMs: number; totalMs: number }) {
  return { queue_ms: t.queueMs, ttft_ms: t.ttftMs, tpot_ms: t.tpotMs, total_ms: t.totalMs };
}

export function newId(prefix: string): string {
  return `${prefix}-${crypto.randomUUID().replace(/-/g, "").slice(0, 24)}`;
}
