/**
 * `ask`'s check before an upload: what the server would refuse only once the whole document is up (a budget or an
 * answer length that cannot fit the model), from GET /props, so that a big file is not uploaded for a 400.
 */
/** The part of GET /props's `limits` the upload preflight reads. */
export interface PropsLimits {
  max_model_len?: number;
  template_tokens?: number;
  budget?: number;
  max_budget?: number;
  max_tokens?: number;
  max_new_tokens?: number;
}

/** No common tokenizer averages more bytes per token on text: a document this many times the budget in bytes holds
 * more tokens than the budget, so a query over it gathers the whole budget. */
const MAX_BYTES_PER_TOKEN = 16;

/**
 * Why the server would refuse the query once the document is up (null: it may fit), from GET /props's limits: the
 * budget over max_budget, max_tokens over max_new_tokens, or (method reform, a document surely longer than the
 * budget) template + budget + question + max_tokens over max_model_len, the server's own rule (src/engine/answer.ts
 * checkLength). `questionTokens` is asked only when needed; null (unknown) skips that check. A field missing from
 * `limits` skips the checks that need it.
 */
export async function preflight(
  l: PropsLimits,
  q: {
    method: string;
    budget?: number;
    maxTokens?: number;
    documentBytes?: number;
    questionTokens: () => Promise<number | null>;
  },
): Promise<string | null> {
  const budget = q.budget ?? l.budget;
  const maxTokens = q.maxTokens ?? l.max_tokens;
  if (q.budget !== undefined && l.max_budget !== undefined && q.budget > l.max_budget)
    return `--budget ${q.budget} exceeds the server's maximum of ${l.max_budget} tokens (GET /props: limits.max_budget)`;
  if (q.maxTokens !== undefined && l.max_new_tokens !== undefined && q.maxTokens > l.max_new_tokens)
    return `--max-tokens ${q.maxTokens} exceeds the server's maximum of ${l.max_new_tokens} new tokens (GET /props: limits.max_new_tokens)`;
  if (
    q.method !== "reform" ||
    budget === undefined ||
    maxTokens === undefined ||
    l.max_model_len === undefined ||
    l.template_tokens === undefined ||
    q.documentBytes === undefined ||
    q.documentBytes < budget * MAX_BYTES_PER_TOKEN
  )
    return null;
  const question = await q.questionTokens();
  if (question === null) return null;
  // the question inside the chat template may tokenize a token or two differently: refuse only what surely fails
  const need = l.template_tokens + budget + question + maxTokens;
  if (need - 2 <= l.max_model_len) return null;
  const room = l.max_model_len - l.template_tokens - budget - question;
  const lower = [
    room > 0 ? `--max-tokens ${room} or less` : null,
    `a --budget below ${budget} (default ${l.budget ?? "?"})`,
  ].filter(Boolean);
  return (
    `the answer would not fit the model's recompute length of ${l.max_model_len} tokens (GET /props: ` +
    `limits.max_model_len): template ${l.template_tokens} + gathered budget ${budget} + question ${question} + ` +
    `max_tokens ${maxTokens} = ${need}; ask with ${lower.join(" or ")}`
  );
}
