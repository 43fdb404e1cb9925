/**
 * POST /v1/contexts/:id/query — answer a question (or chat messages) from a context session.
 * SSE by default: `start`, `token`..., `finish` (finish_reason + usage + timings), `data: [DONE]`.
 * `return_selection: true` adds what REFORM gathered to `start` (non-stream: to the body): `selection`.
 */
import { Hono } from "hono";
import { logprobView, newId, QueryBody, samplingOf, selectionView, timingsView, usageView } from "./protocol.ts";
import { collectQuery, openQuery, streamQuery } from "./serving.ts";
import type { Deps } from "./types.ts";
import { contextIdParam, parseJsonBody } from "./util.ts";

export function queryRoutes(d: Deps): Hono {
  const { engine, opts } = d;
  const r = new Hono();

  r.post("/:id/query", async (c) => {
    const contextId = contextIdParam(c);
    const body = await parseJsonBody(c, QueryBody, opts.maxJsonBytes);
    const defaults = engine.modelInfo()?.defaults;
    const q = await openQuery(engine, c.req.raw, {
      contextId,
      question: body.question,
      messages: body.messages,
      method: body.method,
      budget: body.budget,
      scoreFloor: body.score_floor,
      scoreBackground: body.score_background,
      returnSelection: body.return_selection,
      sampling: samplingOf(body, {
        maxTokens: body.max_tokens ?? defaults?.maxTokens ?? 256,
        temperature: 0,
        logprobs: body.logprobs ?? null,
      }),
    });
    const id = newId("query");
    const base = { id, object: "context.query", context_id: contextId, method: body.method };

    if (!body.stream) {
      const res = await collectQuery(d, q);
      return c.json({
        ...base,
        text: res.text,
        ...(body.logprobs !== undefined ? { logprobs: res.logprobs } : {}),
        ...(res.start?.selection ? { selection: selectionView(res.start.selection) } : {}),
        finish_reason: res.finishReason,
        usage: usageView(res.usage),
        timings: timingsView(res.timings),
      });
    }

    return streamQuery(d, c.req.raw, q, `query ${id} on ${contextId}`, (ev, w) => {
      if (ev.type === "start") {
        w.send(
          {
            type: "start",
            ...base,
            prompt_tokens: ev.promptTokens,
            selected_tokens: ev.selectedTokens,
            context_tokens: ev.contextTokens,
            ...(ev.selection ? { selection: selectionView(ev.selection) } : {}),
          },
          "start",
        );
      } else if (ev.type === "progress") {
        w.send({ type: "progress", stage: ev.stage, done: ev.done, total: ev.total }, "progress");
      } else if (ev.type === "token") {
        w.send(
          {
            type: "token",
            text: ev.text,
            token_id: ev.tokenId,
            ...(ev.logprob ? { logprob: logprobView(ev.logprob) } : {}),
          },
          "token",
        );
      } else if (ev.type === "done") {
        w.send(
          {
            type: "finish",
            ...base,
            finish_reason: ev.finishReason,
            usage: usageView(ev.usage),
            timings: timingsView(ev.timings),
          },
          "finish",
        );
      }
    });
  });

  return r;
}
