/**
 * One query from request to `done`: the checks that need the loaded model or a session (thrown before
 * any event, so the HTTP layer can still answer with a JSON error), the prompt around the context, then
 * gather (gather.ts) and generate (generate.ts) as one scheduled task.
 */
import type { NativeCompressor, NativeSeq } from "../../ffi/native.ts";
import { EngineError, type FinishReason, type Method, type QueryEvent, type Selection } from "./api.ts";
import type { CompressorPool } from "./compressors.ts";
import { gatherContext } from "./gather.ts";
import { generate } from "./generate.ts";
import type { LoadedEngine } from "./load.ts";
import { buildMessages, CONTEXT_PLACEHOLDER, splitAtPlaceholder } from "./prompt.ts";
import type { ResidentPool } from "./resident.ts";
import type { QueryWire } from "./schema.ts";
import type { Task } from "./scheduler.ts";
import type { Session } from "./session.ts";

/** A query that passed its checks, ready to run. */
export interface PlannedQuery {
  req: QueryWire;
  method: Method;
  budget: number;
  session: Session | null;
  /** prompt tokens before and after the context (all of them when there is no context) */
  pre: number[];
  suf: number[];
  /**
   * What scores the context (reform): the tokens after the context exactly as the recompute prompt has them (the
   * question with the template's tail), and in multi-turn chat the previous user turn; a token's score is its
   * best match over the tokens of all turns.
   */
  queryTurns: number[][];
  /** cache entries of a recurrent baseline ("streaming", "h2o"); 0 for the other methods */
  cache: number;
}

/**
 * The limits of the server's configuration that hold for every query, with or without a context, whether or not
 * the prompt is then answered inline: checked first, so a request over them is refused for what it asks and not
 * for a consequence of it (inline routing).
 */
export function checkServerLimits(e: LoadedEngine, req: QueryWire): void {
  const d = e.defaults;
  const sp = req.sampling;
  const budget = req.budget ?? d.budget;
  if (budget > d.maxBudget)
    throw new EngineError(
      400,
      "budget_too_large",
      `budget ${budget} exceeds the maximum of ${d.maxBudget} tokens`,
      "budget",
    );
  if (sp.maxTokens > d.maxNewTokens)
    throw new EngineError(
      400,
      "max_tokens_too_large",
      `max_tokens ${sp.maxTokens} exceeds the server's maximum of ${d.maxNewTokens} new tokens (and the prompt ` +
        `with the gathered context plus max_tokens must fit max_model_len ${d.maxModelLen})`,
      "max_tokens",
    );
}

/** The request field that holds the prompt text, for error messages: "prompt", "question" or "messages". */
export function promptField(req: QueryWire): "prompt" | "question" | "messages" {
  if (req.prompt !== undefined) return "prompt";
  return req.question !== undefined ? "question" : "messages";
}

/** The engine-state rules of a query (the request's shape was checked by QueryRequestSchema). */
/**
 * `scored`: the end of the prompt that is embedded to score the context, when it is not the whole text after the
 * context (an inline request's question without the document's end its cut moved back over; inline.ts).
 */
export function planQuery(e: LoadedEngine, req: QueryWire, session: Session | null, scored?: string): PlannedQuery {
  const d = e.defaults;
  const sp = req.sampling;
  const method = req.method;
  const budget = req.budget ?? d.budget;
  checkServerLimits(e, req);
  const vocab = e.cfg.config.vocabSize;
  for (const k of Object.keys(sp.logitBias ?? {})) {
    const id = Number(k);
    if (!Number.isInteger(id) || id < 0 || id >= vocab)
      throw new EngineError(
        400,
        "invalid_value",
        `logit_bias: '${k}' is not a token id of this model (0..${vocab - 1})`,
        "logit_bias",
      );
  }
  if (session) {
    const st = session.state;
    if (st === "failed")
      throw new EngineError(
        409,
        "context_failed",
        `context '${session.id}' failed: ${session.meta.failed}`,
        "context_id",
      );
    if (st !== "ready") {
      const why =
        st === "empty"
          ? "empty"
          : `still processing (${session.meta.processed}/${session.meta.tokens} tokens compressed; finalize it or retry when its state is 'ready')`;
      throw new EngineError(409, "context_not_ready", `context '${session.id}' is ${why}`, "context_id");
    }
    if (session.meta.tokens === 0)
      throw new EngineError(
        409,
        "context_empty",
        `context '${session.id}' has no content to answer from`,
        "context_id",
      );
    if ((method === "h2o" || method === "streaming") && session.meta.tokens > d.maxH2oTokens)
      throw new EngineError(
        400,
        "context_too_long",
        `method "${method}" compresses the whole context again at full depth; this context has ${session.meta.tokens} tokens, ` +
          `more than its limit of ${d.maxH2oTokens}: use method "reform" (which reads only the compressed embeddings)`,
        "method",
      );
    if (method === "full" && session.meta.tokens > d.maxBudget)
      throw new EngineError(
        400,
        "context_too_long",
        `context has ${session.meta.tokens} tokens, more than the recompute capacity ${d.maxBudget} of method "full"`,
        "method",
      );
  }
  let rendered: string;
  let previous: string | undefined;
  if (req.prompt !== undefined) rendered = session ? CONTEXT_PLACEHOLDER + req.prompt : req.prompt;
  else {
    const b = buildMessages(req, session !== null);
    rendered = e.tok.renderChat(b.messages, true);
    previous = b.previous;
  }
  let pre: number[];
  let suf: number[] = [];
  if (!session) pre = e.tok.encodePrompt(rendered);
  else {
    const parts = splitAtPlaceholder(rendered);
    // every method keeps the context's first tokens (edges / sinks), so its first token follows the prefix
    ({ pre, suf } = e.tok.encodeAround(parts.prefix, session.readTokens(0, 1)[0], parts.suffix));
  }
  checkLength(e, pre.length + suf.length + gatheredTokens(method, budget, session), sp.maxTokens, promptField(req));
  const queryTurns: number[][] = [];
  if (session && method === "reform") {
    queryTurns.push(scored !== undefined ? e.tok.encodeSuffix(scored) : suf);
    if (previous !== undefined) queryTurns.push(e.tok.encodeText(previous));
    checkQuery(e, queryTurns, promptField(req));
  }
  const cache =
    session && (method === "h2o" || method === "streaming") ? baselineCache(e, budget, suf, sp.maxTokens) : 0;
  return { req, method, budget, session, pre, suf, queryTurns, cache };
}

/** Context tokens the recompute will hold for this method (the baselines are held to REFORM's budget here too). */
function gatheredTokens(method: Method, budget: number, s: Session | null): number {
  if (!s) return 0;
  return method === "full" ? s.meta.tokens : Math.min(budget, s.meta.tokens);
}

/**
 * The recurrent baselines' cache: `baselineCacheFactor` x the budget (as the paper ran them), bounded by the
 * window: while compressing, a chunk sits on top of the cache (cache + chunk within the window), and the
 * recompute holds the cache, the rest of the prompt and the answer (within max_model_len). checkLength has
 * already made sure that template + budget + question + max_tokens fit, so the bound never falls below the budget.
 */
export function baselineCache(e: LoadedEngine, budget: number, suf: number[], maxTokens: number): number {
  const d = e.defaults;
  const positions = Math.max(e.trainedWindow, d.maxModelLen);
  return Math.min(d.baselineCacheFactor * budget, positions - d.chunkSize, d.maxModelLen - suf.length - maxTokens);
}

/** Each question turn is embedded on top of the compressor's cache and must fit what is left of the window. */
function checkQuery(e: LoadedEngine, turns: number[][], field: string): void {
  const limit = e.defaults.maxQueryTokens;
  for (const t of turns) {
    if (t.length <= limit) continue;
    throw new EngineError(
      400,
      "query_too_long",
      `the question is embedded for scoring on top of the compressed context, where ${limit} tokens fit ` +
        `(max_query_tokens: the trained window ${e.trainedWindow} minus the compressor's capacity ` +
        `${e.defaults.capacity}); it has ${t.length} tokens: shorten the question (or the previous user turn)`,
      field,
    );
  }
  if (turns.every((t) => t.length === 0))
    throw new EngineError(400, "invalid_request", "the question has no tokens to score the context with", field);
}

/** The recompute must fit max_model_len: refused before any model work, naming the limit and the parts. */
function checkLength(e: LoadedEngine, promptTokens: number, maxTokens: number, field: string): void {
  const limit = e.defaults.maxModelLen;
  if (promptTokens + maxTokens <= limit) return;
  throw new EngineError(
    400,
    "context_length_exceeded",
    `this model's maximum recompute length is ${limit} tokens; the request needs ${promptTokens + maxTokens} ` +
      `(${promptTokens} prompt tokens, including the gathered context, + ${maxTokens} max_tokens): ` +
      `shorten the ${field}, lower the budget or lower max_tokens`,
    field,
  );
}

export interface RunHooks {
  pool: CompressorPool;
  /** resident context embeddings (null: none kept) */
  resident: ResidentPool | null;
  sessionOf: (id: string) => Session | undefined;
  /** why the query must stop now, or null */
  cancelled: () => FinishReason | null;
  emit: (ev: QueryEvent) => void;
  tReq: number;
  onStart: (promptTokens: number) => void;
  onFirstToken: (ttftMs: number) => void;
  onToken: () => void;
  onDone: (tpotMs: number) => void;
}

export function* runQuery(e: LoadedEngine, q: PlannedQuery, h: RunHooks): Task<void> {
  const tStart = performance.now();
  const s = q.session;
  let seq: NativeSeq | null = null;
  let h2o: NativeCompressor | null = null;
  try {
    let prompt: Int32Array;
    let promptLen: number;
    let selected = 0;
    let selection: Selection | undefined;
    if (!s) {
      prompt = Int32Array.from(q.pre);
      promptLen = prompt.length;
    } else {
      const g = yield* gatherContext(
        e,
        h.pool,
        h.sessionOf,
        {
          s,
          method: q.method,
          budget: q.budget,
          floor: q.req.scoreFloor ?? e.defaults.scoreFloor,
          background: q.req.scoreBackground ?? e.defaults.scoreBackground,
          pre: q.pre,
          suf: q.suf,
          queryTurns: q.queryTurns,
          cache: q.cache,
          cancelled: () => h.cancelled() !== null,
          progress: (done, total) =>
            h.emit({ type: "progress", stage: q.method === "streaming" ? "streaming" : "h2o", done, total }),
          report: q.req.returnSelection === true,
        },
        h.resident,
      );
      ({ prompt, promptLen, selected, h2o, selection } = g);
    }
    const sp = q.req.sampling;
    // resident embeddings give way when the recompute sequence does not fit beside them
    const create = () => e.model.createSeq(promptLen + sp.maxTokens + 1);
    seq = h.resident ? h.resident.withMemory(create) : create();
    seq.setSeed(sp.seed ?? Math.floor(Math.random() * 2 ** 52));
    if (h2o) {
      seq.importCompressor(h2o);
      h2o.destroy();
      h2o = null;
    }
    const contextTokens = s ? s.meta.tokens : 0;
    h.emit({
      type: "start",
      promptTokens: promptLen,
      selectedTokens: selected,
      contextTokens,
      ...(selection ? { selection } : {}),
    });
    h.onStart(promptLen);
    const tpot = yield* generate({
      seq,
      prompt,
      sampling: sp,
      tok: e.tok,
      vocabSize: e.cfg.config.vocabSize,
      prefillChunk: e.defaults.prefillChunk,
      cancelled: h.cancelled,
      emit: h.emit,
      usage: { promptTokens: promptLen, contextTokens, selectedTokens: selected },
      tReq: h.tReq,
      tStart,
      onFirstToken: h.onFirstToken,
      onToken: h.onToken,
    });
    h.onDone(tpot);
  } finally {
    seq?.destroy();
    h2o?.destroy();
  }
}
