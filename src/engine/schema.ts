/**
 * Request rules of the engine, each written once as a zod schema (the "protocol models").
 *
 * The engine validates every query it receives with `QueryRequestSchema`, so a direct caller (tests,
 * scripts) gets the same 400s as an HTTP client. The HTTP schemas in routes/ are built from the same
 * field schemas (`Field.*`) under their snake_case names, so a limit changed here changes everywhere.
 * Rules that depend on the loaded model or the server configuration (budget <= max budget, max_tokens
 * <= the server maximum, token ids < vocabulary, prompt length) live in `planQuery` (src/engine/answer.ts).
 */
import { z } from "zod";
import { SCORE_BACKGROUNDS, backgroundOf } from "./background.ts";
import { EngineError, METHODS, type Method, type QueryRequest } from "./api.ts";

/** Context ids double as directory names on disk: letters, digits, '_' and '-', starting with a letter or digit. */
export const ContextIdSchema = z
  .string()
  .min(1)
  .max(128)
  .regex(/^[A-Za-z0-9][A-Za-z0-9_-]*$/, "must be a context id (letters, digits, '_', '-')");

export function isContextId(id: unknown): id is string {
  return ContextIdSchema.safeParse(id).success;
}

/** Fewest context tokens a gather budget may ask for: below this the always-kept edges are all there is. */
export const MIN_BUDGET = 16;
/** OpenAI accepts at most 4 stop sequences. */
export const MAX_STOP = 4;
/** logprobs alternatives per token, as OpenAI's top_logprobs. */
export const MAX_TOP_LOGPROBS = 20;
export const MAX_LOGIT_BIAS = 1024;

/** One schema per request field; the HTTP layer reuses these under its own (snake_case) names. */
export const Field = {
  method: z.enum(METHODS as unknown as [Method, ...Method[]]),
  budget: z.number().int().min(MIN_BUDGET),
  scoreFloor: z.number().min(0).max(1),
  // true / false as the on|off field was before "mean" and "kth" (background.ts backgroundOf)
  scoreBackground: z.union([z.boolean(), z.enum(SCORE_BACKGROUNDS)]).transform(backgroundOf),
  maxTokens: z.number().int().min(1),
  temperature: z.number().min(0).max(2),
  topP: z.number().gt(0).max(1),
  topK: z.number().int().min(0),
  minP: z.number().min(0).max(1),
  seed: z.number().int(),
  stop: z.array(z.string()).max(MAX_STOP, `at most ${MAX_STOP} stop sequences`),
  logprobs: z.number().int().min(0).max(MAX_TOP_LOGPROBS),
  presencePenalty: z.number().min(-2).max(2),
  frequencyPenalty: z.number().min(-2).max(2),
  repetitionPenalty: z.number().gt(0).max(10),
  logitBias: z
    .record(z.string().regex(/^\d+$/, "logit_bias keys are token ids"), z.number().min(-100).max(100))
    .refine((r) => Object.keys(r).length <= MAX_LOGIT_BIAS, `logit_bias has more than ${MAX_LOGIT_BIAS} entries`),
};

export const MessageSchema = z.object({
  role: z.enum(["system", "user", "assistant", "tool"]),
  content: z.string(),
});

export const SamplingSchema = z.object({
  maxTokens: Field.maxTokens,
  temperature: Field.temperature,
  topP: Field.topP,
  topK: Field.topK,
  minP: Field.minP.optional(),
  seed: Field.seed.optional(),
  stop: Field.stop,
  logprobs: Field.logprobs.nullish(),
  presencePenalty: Field.presencePenalty.optional(),
  frequencyPenalty: Field.frequencyPenalty.optional(),
  repetitionPenalty: Field.repetitionPenalty.optional(),
  logitBias: Field.logitBias.optional(),
});

export const QueryRequestSchema = z
  .object({
    contextId: ContextIdSchema.optional(),
    question: z.string().min(1).optional(),
    messages: z.array(MessageSchema).min(1).optional(),
    prompt: z.string().min(1).optional(),
    sampling: SamplingSchema,
    method: Field.method,
    budget: Field.budget.optional(),
    scoreFloor: Field.scoreFloor.optional(),
    scoreBackground: Field.scoreBackground.optional(),
    inline: z
      .object({ owner: z.string().max(256) })
      .strict()
      .optional(),
    returnSelection: z.boolean().optional(),
  })
  .superRefine((v, ctx) => {
    const given = [v.question, v.messages, v.prompt].filter((x) => x !== undefined).length;
    if (v.prompt !== undefined ? given !== 1 : v.question !== undefined && v.messages !== undefined)
      ctx.addIssue({
        code: "custom",
        path: ["prompt"],
        message: "give exactly one of `question`, `messages` or `prompt`",
      });
    if (given === 0)
      ctx.addIssue({
        code: "custom",
        path: ["messages"],
        message: "either `question`, `messages` or `prompt` is required",
      });
  });

/** A query as it crosses into the engine (no AbortSignal: that stays on the caller's side). */
export type QueryWire = Omit<QueryRequest, "signal">;

/**
 * A union's own issue says only "Invalid input"; what helps is the issue of the alternative whose type matched
 * (`stop: [5 strings]` is an array that is too long, not "not a string"), or, when none did, the types expected.
 */
function specificIssue(issue: z.core.$ZodIssue): z.core.$ZodIssue {
  if (issue.code !== "invalid_union" || issue.errors.length === 0) return issue;
  for (const branch of issue.errors) {
    const first = branch[0];
    if (first && first.code !== "invalid_type")
      return specificIssue({ ...first, path: [...issue.path, ...first.path] } as z.core.$ZodIssue);
  }
  const expected = [...new Set(issue.errors.map((b) => (b[0]?.code === "invalid_type" ? b[0].expected : null)))];
  if (expected.includes(null)) return issue;
  return { ...issue, message: `expected ${expected.join(" or ")}` };
}

/** The first issue of a zod error as OpenAI's `param` (dotted path, with an optional prefix) and a message. */
export function describeZodError(err: z.ZodError, prefix?: string): { param: string | null; message: string } {
  const first = err.issues[0];
  if (!first) return { param: prefix ?? null, message: "invalid request" };
  const issue = specificIssue(first);
  const path = issue.path.map(String).join(".");
  const param = prefix ? (path ? `${prefix}.${path}` : prefix) : path || null;
  return {
    param,
    message: param ? `invalid value for '${param}': ${issue.message}` : `invalid request: ${issue.message}`,
  };
}

/** Parses a query at the engine's edge: 400 `invalid_value` naming the first offending field. */
export function parseQuery(req: unknown): QueryWire {
  const r = QueryRequestSchema.safeParse(req);
  if (r.success) return r.data as QueryWire;
  const { param, message } = describeZodError(r.error);
  throw new EngineError(400, "invalid_value", message, param);
}
