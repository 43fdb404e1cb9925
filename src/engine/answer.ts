/**
 * One query from request to `done`: the checks that need the loaded model or a session (thrown before
 * any event, so the HTTP layer can still answer with a JSON error), the prompt around the context, then
 * gather (gather.ts) and generate (generate.ts) as one scheduled task.
 */
import type { NativeCompressor, NativeSeq } from "../../ffi/native.ts";
import { EngineError, type FinishReason, type Method, type QueryEvent } from "./api.ts";
import type { CompressorPool } from "./compressors.ts";
import { gatherContext } from "./gather.ts";
import { generate } from "./generate.ts";
import type { LoadedEngine } from "./load.ts";
import { buildMessages, CONTEXT_PLACEHOLDER, splitAtPlaceholder } from "./query.ts";
import type { QueryWire } from "./schema.ts";
import type { Task } from "./scheduler.ts";
import type { Session } from "./session.ts";

/** A query that passed its checks, ready to run. */
export interface PlannedQuery {
  req: QueryWire;
  method: Method;
  budget: number;
  session: Session | null;
  /** the chat template (or raw prompt) rendered with CONTEXT_PLACEHOLDER where the context goes */
  rendered: string;
  /** the text that scores the context */
  question: string;
}

/** The engine-state rules of a query (the request's shape was checked by QueryRequestSchema). */
export function planQuery(e: LoadedEngine, req: QueryWire, session: Session | null): PlannedQuery {
  const d = e.defaults;
  const sp = req.sampling;
  const method = req.method;
  const budget = req.budget ?? d.budget;
  if (budget > d.maxBudget)
    throw new EngineError(400, "budget_too_large", `budget ${budget} exceeds the maximum of ${d.maxBudget} tokens`, "budget");
  if (sp.maxTokens > d.maxNewTokens)
    throw new EngineError(
      400,
      "max_tokens_too_large",
      `max_tokens ${sp.maxTokens} exceeds the server's maximum of ${d.maxNewTokens} new tokens`,
      "max_tokens",
    );
  const vocab = e.cfg.config.vocabSize;
  for (const k of Object.keys(sp.logitBias ?? {})) {
    const id = Number(k);
    if (!Number.isInteger(id) || id < 0 || id >= vocab)
      throw new EngineError(400, "invalid_value", `logit_bias: '${k}' is not a token id of this model (0..${vocab - 1})`, "logit_bias");
  }
  if (session) {
    const st = session.state;
    if (st === "failed")
      throw new EngineError(409, "context_failed", `context '${session.id}' failed: ${session.meta.failed}`, "context_id");
    if (st !== "ready") {
      const why = st === "empty" ? "empty" : `still processing (${session.meta.processed}/${session.meta.tokens} tokens compressed; finalize it or retry when its state is 'ready')`;
      throw new EngineError(409, "context_not_ready", `context '${session.id}' is ${why}`, "context_id");
    }
    if (method === "full" && session.meta.tokens > d.maxBudget)
      throw new EngineError(
        400,
        "context_too_long",
        `context has ${session.meta.tokens} tokens, more than the recompute capacity ${d.maxBudget} of method "full"`,
        "method",
      );
  }
  if (req.prompt !== undefined) {
    return { req, method, budget, session, rendered: session ? CONTEXT_PLACEHOLDER + req.prompt : req.prompt, question: req.prompt };
  }
  const b = buildMessages(req, session !== null);
  return { req, method, budget, session, rendered: e.tok.renderChat(b.messages, true), question: b.question };
}

export interface RunHooks {
  pool: CompressorPool;
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
    if (!s) {
      prompt = Int32Array.from(e.tok.encodePrompt(q.rendered));
      promptLen = prompt.length;
    } else {
      const parts = splitAtPlaceholder(q.rendered);
      // every method keeps the context's first tokens (edges / sinks), so its first token follows the prefix
      const first = s.meta.tokens > 0 ? s.readTokens(0, 1)[0] : undefined;
      const { pre, suf } = e.tok.encodeAround(parts.prefix, first, parts.suffix);
      const g = yield* gatherContext(e, h.pool, h.sessionOf, {
        s,
        method: q.method,
        budget: q.budget,
        pre,
        suf,
        question: q.question,
        cancelled: () => h.cancelled() !== null,
      });
      ({ prompt, promptLen, selected, h2o } = g);
    }
    const sp = q.req.sampling;
    seq = e.model.createSeq(promptLen + sp.maxTokens + 1);
    seq.setSeed(sp.seed ?? Math.floor(Math.random() * 2 ** 52));
    if (h2o) {
      seq.importCompressor(h2o);
      h2o.destroy();
      h2o = null;
    }
    const contextTokens = s ? s.meta.tokens : 0;
    h.emit({ type: "start", promptTokens: promptLen, selectedTokens: selected, contextTokens });
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
