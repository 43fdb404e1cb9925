/**
 * End-to-end HTTP tests against the real server: startServer with the tiny random model
 * (test/fixtures/tiny-model.ts) on the CPU backend, driven over loopback with fetch.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { TINY_BOS_ID, TINY_EOS_ID, TINY_EOT_ID } from "./fixtures/tiny-model.ts";
import { ModelTokenizer } from "../src/model/tokenizer.ts";
import { collectSse, expectError, pieceStream, sseEvents, waitFor, type SseEvent } from "./helpers/http.ts";
import { startTestServer, type TestServer } from "./helpers/server.ts";

const KEY = "test-key-123";
const MAX_BODY = 48 * 1024;
const MAX_JSON = 64 * 1024;
const T = 120_000; // per-test timeout (2-core CI)

let srv: TestServer;
let base: string;

const auth = { authorization: `Bearer ${KEY}` };
function api(path: string, init: RequestInit = {}): Promise<Response> {
  return fetch(`${base}${path}`, { ...init, headers: { ...auth, ...(init.headers as Record<string, string>) } });
}
function post(path: string, body: unknown, headers: Record<string, string> = {}): Promise<Response> {
  return api(path, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
}
// biome-ignore lint/suspicious/noExplicitAny: tests read response bodies loosely typed
async function json(r: Response | Promise<Response>): Promise<any> {
  const res = await r;
  const text = await res.text();
  try {
    return JSON.parse(text);
  } catch {
    throw new Error(`not JSON (${res.status}): ${text}`);
  }
}

const enc = new TextEncoder();
/** Some text with multi-byte characters everywhere (2, 3 and 4-byte UTF-8). */
function sampleText(n: number, seed = 0): string {
  const words = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "över",
    "naïve",
    "café",
    "日本語",
    "テキスト",
    "🎉",
    "🦊",
    "and",
    "lazy",
    "dog.",
  ];
  const out: string[] = [];
  let x = seed * 7919 + 17;
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) & 0x7fffffff;
    out.push(words[x % words.length]!);
  }
  return out.join(" ") + "\n";
}

async function newContext(metadata?: Record<string, unknown>): Promise<string> {
  const res = await post("/v1/contexts", metadata ? { metadata } : {});
  expect(res.status).toBe(201);
  return (await json(res)).id;
}

async function uploadFinal(id: string, text: string): Promise<Record<string, unknown>> {
  const res = await api(`/v1/contexts/${id}/content?final=true`, {
    method: "PUT",
    body: text,
    headers: { "content-type": "text/plain; charset=utf-8" },
  });
  const body = await json(res);
  if (res.status !== 200) throw new Error(`upload failed: ${JSON.stringify(body)}`);
  return body;
}

function queryBody(extra: Record<string, unknown> = {}) {
  return { question: "What does the fox do?", max_tokens: 6, temperature: 0, ...extra };
}

beforeAll(async () => {
  // a 2048-token window: these tests recompute whole small contexts (method "full") and long answers; the limits
  // derived from a small window are tested in test/engine.test.ts and test/http-safety.test.ts
  srv = await startTestServer({
    name: "http",
    modelOptions: { maxPositions: 2048 },
    flags: ["--max-body-bytes", `${MAX_BODY}`, "--max-json-bytes", `${MAX_JSON}`],
    env: { REFORM_API_KEY: KEY, REFORM_SERVED_NAME: "tiny-reform" },
    ready: false,
  });
  base = srv.url;
  // The server listens before the model is loaded.
  const h = await fetch(`${base}/health`);
  expect([200, 503]).toContain(h.status);
  await srv.engine.ready();
}, T);

afterAll(() => srv?.stop());

describe("ops", () => {
  test("health is open and ok; models list has OpenAI's shape", async () => {
    const h = await fetch(`${base}/health`);
    expect(h.status).toBe(200);
    expect(await json(h)).toMatchObject({ status: "ok", model: "tiny-reform", backend: "cpu" });
    const m = await json(api("/v1/models"));
    expect(m.object).toBe("list");
    expect(m.data[0]).toMatchObject({ id: "tiny-reform", object: "model", owned_by: "reform" });
    expect(typeof m.data[0].created).toBe("number");
    const one = await json(api("/v1/models/tiny-reform"));
    expect(one.id).toBe("tiny-reform");
    await expectError(await api("/v1/models/nope"), 404, "model_not_found");
  });

  test("GET /props and /v1/models report the effective limits, the heads and the compressor", async () => {
    // 2048-token window, chunk 32 / capacity 64 from the fixture's heads file, the rest derived from the window
    const limits = {
      trained_window: 2048,
      max_model_len: 2048,
      allow_beyond_window: false,
      chunk_size: 32,
      capacity: 64,
      max_query_tokens: 2048 - 64,
      budget: 1280,
      max_budget: 1792,
      max_tokens: 256,
      max_new_tokens: 1024,
      smoothing_window: 129,
      smoothing_lag: 0,
      edge: 0,
      sentence_tail: 192,
      score_floor: 0.5,
      baseline_cache_factor: 4,
      max_h2o_tokens: 262_144,
    };
    const heads = ["q", "k", "v"].map((kind) => ({ layer: 0, kind, head: 0 }));
    const compressor = {
      chunk_size: 32,
      capacity: 64,
      n_sink: 4,
      n_recent: 16,
      obs_window: 32,
      eviction: "h2o",
      exit_layer: 0,
    };
    await expectError(await fetch(`${base}/props`), 401, "missing_api_key");
    const p = await json(api("/props"));
    expect(p).toMatchObject({ model: "tiny-reform", backend: "cpu", limits, heads, compressor, n_ctx: 2048 });
    expect(p.compressor.bos_token_id).toBe(TINY_BOS_ID);
    expect(p.limits.template_tokens).toBeGreaterThan(0);
    // the fixture's generation_config.json says do_sample: false: OpenAI requests without a temperature are greedy
    expect(p.default_generation_settings).toEqual({
      n_ctx: 2048,
      max_tokens: 256,
      generation_config: "auto",
      temperature: 0,
      top_p: 1,
      top_k: 0,
      min_p: 0,
      repetition_penalty: 1,
    });
    const m = await json(api("/v1/models"));
    expect(m.data[0]).toMatchObject({ max_model_len: 2048, reform: { limits, heads, compressor } });
    expect((await json(api("/v1/models/tiny-reform"))).reform).toEqual(m.data[0].reform);
    // the limits the server enforces are the ones it reports
    const ctx = await newContext();
    await uploadFinal(ctx, sampleText(150, 6));
    await expectError(
      await post(`/v1/contexts/${ctx}/query`, queryBody({ budget: limits.max_budget + 1 })),
      400,
      "budget_too_large",
    );
    await expectError(
      await post(`/v1/contexts/${ctx}/query`, queryBody({ max_tokens: limits.max_new_tokens + 1 })),
      400,
      "max_tokens_too_large",
    );
  });
});

describe("contexts", () => {
  test("create / get / list / delete", async () => {
    const res = await post("/v1/contexts", { metadata: { name: "doc" } });
    expect(res.status).toBe(201);
    const c = await json(res);
    expect(c).toMatchObject({
      state: "empty",
      bytes_received: 0,
      tokens_received: 0,
      tokens_processed: 0,
      metadata: { name: "doc" },
    });
    expect(res.headers.get("location")).toBe(`/v1/contexts/${c.id}`);
    // empty body is fine too
    const bare = await api("/v1/contexts", { method: "POST" });
    expect(bare.status).toBe(201);
    const bareId = (await json(bare)).id;
    const got = await json(api(`/v1/contexts/${c.id}`));
    expect(got.id).toBe(c.id);
    const list = await json(api("/v1/contexts"));
    expect(list.object).toBe("list");
    expect(list.data.map((x: { id: string }) => x.id)).toEqual(expect.arrayContaining([c.id, bareId]));
    const del = await api(`/v1/contexts/${c.id}`, { method: "DELETE" });
    expect(del.status).toBe(200);
    expect((await json(del)).deleted).toBe(true);
    await expectError(await api(`/v1/contexts/${c.id}`), 404, "context_not_found");
    await expectError(await api(`/v1/contexts/${c.id}`, { method: "DELETE" }), 404, "context_not_found");
    await api(`/v1/contexts/${bareId}`, { method: "DELETE" });
  });

  test(
    "streamed upload in many pieces (split UTF-8) over two requests, with progress SSE",
    async () => {
      const id = await newContext();
      const part1 = sampleText(700, 1);
      const part2 = sampleText(500, 2);
      const b1 = enc.encode(part1);
      const b2 = enc.encode(part2);

      // Progress stream opened before the upload; closes by itself when the context is ready.
      const evRes = await api(`/v1/contexts/${id}/events`);
      expect(evRes.status).toBe(200);
      expect(evRes.headers.get("content-type")).toContain("text/event-stream");
      const progress = collectSse(evRes);

      // Piece sizes 1..13 bytes and some bigger ones, so multi-byte characters are split.
      const r1 = await api(`/v1/contexts/${id}/content`, {
        method: "POST",
        body: pieceStream(b1, [1, 3, 7, 13, 2, 5, 4096, 11]),
        headers: { "content-type": "text/plain; charset=utf-8" },
      });
      const i1 = await json(r1);
      expect(r1.status).toBe(200);
      expect(i1.appended_bytes).toBe(b1.byteLength);
      expect(i1.bytes_received).toBe(b1.byteLength);
      expect(i1.state).toBe("processing");
      expect(i1.finalized).toBe(false);

      // Not finalized yet: queries are refused with 409.
      await expectError(await post(`/v1/contexts/${id}/query`, queryBody()), 409, "context_not_ready");

      const r2 = await api(`/v1/contexts/${id}/content`, {
        method: "PUT",
        body: pieceStream(b2, [2, 9, 1, 1000, 6]),
        headers: { "content-type": "application/octet-stream", "x-reform-final": "true" },
      });
      const i2 = await json(r2);
      expect(r2.status).toBe(200);
      expect(i2.bytes_received).toBe(b1.byteLength + b2.byteLength);
      expect(i2.state).toBe("ready");
      expect(i2.finalized).toBe(true);
      expect(i2.tokens_processed).toBe(i2.tokens_received);
      expect(i2.pending_chars).toBe(0);
      expect(i2.embedding_bytes).toBeGreaterThan(0);
      // Streaming tokenization of the pieces equals tokenizing the whole text at once.
      expect(i2.tokens_received).toBe(await srv.engine.countTokens(part1 + part2));

      const events = await progress;
      expect(events.at(-1)!.data).toBe("[DONE]");
      const prog = events.filter((e) => e.event === "progress").map((e) => JSON.parse(e.data));
      expect(prog.length).toBeGreaterThanOrEqual(2);
      expect(prog[0].state).toBe("empty");
      expect(prog.at(-1).state).toBe("ready");
      expect(prog.at(-1).tokens_processed).toBe(i2.tokens_processed);
      for (let k = 1; k < prog.length; k++) {
        expect(prog[k].bytes_received).toBeGreaterThanOrEqual(prog[k - 1].bytes_received);
        expect(prog[k].tokens_processed).toBeGreaterThanOrEqual(prog[k - 1].tokens_processed);
      }
      // Events of a ready context: one event, then the stream closes.
      const again = await collectSse(await api(`/v1/contexts/${id}/events`));
      expect(again.map((e) => e.event)).toEqual(["progress", "message"]);

      const st = await json(api(`/v1/contexts/${id}`));
      expect(st).toMatchObject({ id, state: "ready", bytes_received: b1.byteLength + b2.byteLength });
    },
    T,
  );

  test(
    "events: a deleted context ends its stream with an error event (context_deleted), then [DONE]",
    async () => {
      const ids: string[] = [];
      for (const _ of [0, 1]) ids.push((await json(api("/v1/contexts", { method: "POST", body: "{}" }))).id);
      // one still empty (the stream waits for ready), one ready and followed (?follow=true waits for more)
      await json(api(`/v1/contexts/${ids[1]}/content?final=true`, { method: "PUT", body: sampleText(200, 3) }));
      const streams = [
        api(`/v1/contexts/${ids[0]}/events`).then(collectSse),
        api(`/v1/contexts/${ids[1]}/events?follow=true`).then(collectSse),
      ];
      await Bun.sleep(300);
      for (const id of ids) await json(api(`/v1/contexts/${id}`, { method: "DELETE" }));
      for (const evs of await Promise.all(streams)) {
        expect(evs.map((e) => e.event)).toEqual(["progress", "error", "message"]);
        expect(JSON.parse(evs[1]!.data).error).toMatchObject({ code: "context_deleted", param: "id" });
        expect(evs[2]!.data).toBe("[DONE]");
      }
    },
    T,
  );

  test(
    "JSON {text} upload and a separate finalize",
    async () => {
      const id = await newContext();
      const res = await post(`/v1/contexts/${id}/content`, { text: "Hello wörld. " + sampleText(50, 3) });
      expect(res.status).toBe(200);
      const fin = await json(post(`/v1/contexts/${id}/finalize`, ""));
      expect(fin.state).toBe("ready");
      const q = await json(post(`/v1/contexts/${id}/query`, queryBody({ stream: false })));
      expect(q.object).toBe("context.query");
    },
    T,
  );

  test(
    "client disconnect mid-upload keeps what was received; the upload can be resumed",
    async () => {
      const id = await newContext();
      const text = sampleText(1500, 4);
      const bytes = enc.encode(text);
      const ac = new AbortController();
      let sent = 0;
      const body = new ReadableStream<Uint8Array>({
        async pull(ctrl) {
          if (sent >= 6000) {
            await Bun.sleep(200);
            ac.abort();
            return;
          }
          ctrl.enqueue(bytes.slice(sent, sent + 1000));
          sent += 1000;
          await Bun.sleep(10);
        },
      });
      await api(`/v1/contexts/${id}/content`, {
        method: "PUT",
        body,
        signal: ac.signal,
        headers: { "content-type": "text/plain" },
      }).then(
        () => {},
        () => {},
      );
      let info: { bytes_received: number } = { bytes_received: 0 };
      await waitFor(
        async () => {
          info = await json(api(`/v1/contexts/${id}`));
          return info.bytes_received === 6000;
        },
        20_000,
        50,
      );
      // a resume that names the wrong start is refused and told the right one; nothing is appended
      const wrong = await api(`/v1/contexts/${id}/content?offset=${info.bytes_received - 1000}`, {
        method: "PUT",
        body: bytes.slice(5000),
      });
      const mismatch = await expectError(wrong, 409, "offset_mismatch");
      expect(mismatch.message).toContain(`resume from ${info.bytes_received}`);
      expect((await json(api(`/v1/contexts/${id}`))).bytes_received).toBe(info.bytes_received);
      // resume from the acknowledged offset
      const rest = await api(`/v1/contexts/${id}/content?final=1&offset=${info.bytes_received}`, {
        method: "PUT",
        body: bytes.slice(info.bytes_received),
      });
      const done = await json(rest);
      expect(rest.status).toBe(200);
      expect(done.bytes_received).toBe(bytes.byteLength);
      expect(done.tokens_received).toBe(await srv.engine.countTokens(text));
      // healthy afterwards
      expect((await fetch(`${base}/health`)).status).toBe(200);
    },
    T,
  );
});

describe("query", () => {
  let ctxId: string;
  beforeAll(async () => {
    ctxId = await newContext();
    await uploadFinal(ctxId, sampleText(1200, 5));
  }, T);

  function checkUsage(u: Record<string, number>, maxTokens: number) {
    expect(u.completion_tokens).toBeGreaterThanOrEqual(1);
    expect(u.completion_tokens).toBeLessThanOrEqual(maxTokens);
    expect(u.prompt_tokens).toBeGreaterThan(0);
    expect(u.total_tokens).toBe(u.prompt_tokens! + u.completion_tokens!);
    expect(u.context_tokens).toBeGreaterThan(0);
    expect(u.selected_tokens).toBeLessThanOrEqual(u.context_tokens!);
  }

  test(
    "SSE: start, tokens, finish (finish_reason + usage + timings), [DONE]",
    async () => {
      const res = await post(`/v1/contexts/${ctxId}/query`, queryBody({ max_tokens: 8 }));
      expect(res.status).toBe(200);
      expect(res.headers.get("content-type")).toContain("text/event-stream");
      const evs = await collectSse(res);
      expect(evs[0]!.event).toBe("start");
      expect(evs.at(-1)).toEqual({ event: "message", data: "[DONE]" });
      const fin = evs.at(-2)!;
      expect(fin.event).toBe("finish");
      const f = JSON.parse(fin.data);
      expect(["stop", "length"]).toContain(f.finish_reason);
      checkUsage(f.usage, 8);
      for (const k of ["queue_ms", "ttft_ms", "tpot_ms", "total_ms"]) expect(typeof f.timings[k]).toBe("number");
      const toks = evs.filter((e) => e.event === "token").map((e) => JSON.parse(e.data));
      // token_id -1 marks a final flush of held-back text (incomplete UTF-8), not a generated token
      expect(toks.filter((t) => t.token_id >= 0).length).toBe(f.usage.completion_tokens);
      for (const t of toks) {
        expect(typeof t.text).toBe("string");
        expect(typeof t.token_id).toBe("number");
      }
    },
    T,
  );

  test(
    "non-stream JSON; every method; seeds make sampling reproducible",
    async () => {
      // a small context: "full" needs one that fits, "streaming"/"h2o" run the model over all of it
      const ctx = await newContext();
      await uploadFinal(ctx, sampleText(150, 6));
      for (const method of ["reform", "full", "streaming", "h2o"]) {
        const res = await post(`/v1/contexts/${ctx}/query`, queryBody({ method, stream: false, max_tokens: 5 }));
        const q = await json(res);
        expect(res.status).toBe(200);
        expect(q).toMatchObject({ object: "context.query", context_id: ctx, method });
        expect(typeof q.text).toBe("string");
        expect(["stop", "length"]).toContain(q.finish_reason);
        checkUsage(q.usage, 5);
      }
      const a = await json(
        post(
          `/v1/contexts/${ctxId}/query`,
          queryBody({ stream: false, temperature: 1, seed: 42, top_k: 50, top_p: 0.9 }),
        ),
      );
      const b = await json(
        post(
          `/v1/contexts/${ctxId}/query`,
          queryBody({ stream: false, temperature: 1, seed: 42, top_k: 50, top_p: 0.9 }),
        ),
      );
      expect(a.text).toBe(b.text);
      const msgs = await json(
        post(`/v1/contexts/${ctxId}/query`, {
          messages: [{ role: "user", content: "Where is the dog?" }],
          stream: false,
          max_tokens: 3,
        }),
      );
      expect(msgs.usage.completion_tokens).toBeGreaterThanOrEqual(1);
    },
    T,
  );

  test(
    "OpenAI chat: streamed chunks have chat.completion.chunk shape, usage chunk, [DONE]",
    async () => {
      const res = await post("/v1/chat/completions", {
        model: "tiny-reform",
        messages: [
          { role: "system", content: "Answer briefly." },
          { role: "user", content: "What does the fox do?" },
        ],
        context_id: ctxId,
        stream: true,
        stream_options: { include_usage: true },
        max_tokens: 6,
        temperature: 0,
      });
      expect(res.status).toBe(200);
      const evs = await collectSse(res);
      expect(evs.at(-1)!.data).toBe("[DONE]");
      const chunks = evs.slice(0, -1).map((e) => {
        expect(e.event).toBe("message");
        return JSON.parse(e.data);
      });
      const id = chunks[0].id;
      expect(id).toMatch(/^chatcmpl-/);
      for (const c of chunks) {
        expect(c).toMatchObject({ id, object: "chat.completion.chunk", model: "tiny-reform" });
        expect(typeof c.created).toBe("number");
        expect("usage" in c).toBe(true);
      }
      expect(chunks[0].choices[0]).toMatchObject({
        index: 0,
        delta: { role: "assistant", content: "" },
        finish_reason: null,
      });
      const usageChunk = chunks.at(-1);
      expect(usageChunk.choices).toEqual([]);
      expect(usageChunk.usage.total_tokens).toBe(usageChunk.usage.prompt_tokens + usageChunk.usage.completion_tokens);
      const last = chunks.at(-2);
      expect(last.choices[0].delta).toEqual({});
      expect(["stop", "length"]).toContain(last.choices[0].finish_reason);
      for (const c of chunks.slice(1, -2)) {
        expect(c.usage).toBeNull();
        expect(c.choices[0].finish_reason).toBeNull();
        expect(typeof c.choices[0].delta.content).toBe("string");
      }

      // without include_usage: no usage key, no usage chunk
      const evs2 = await collectSse(
        await post("/v1/chat/completions", {
          model: "reform",
          messages: [{ role: "user", content: "hi" }],
          reform: { context_id: ctxId },
          stream: true,
          max_tokens: 3,
        }),
      );
      const ch2 = evs2.slice(0, -1).map((e) => JSON.parse(e.data));
      for (const c of ch2) {
        expect("usage" in c).toBe(false);
        expect(c.choices.length).toBe(1);
      }
      expect(ch2.at(-1).choices[0].finish_reason).not.toBeNull();
    },
    T,
  );

  test(
    "stop strings end to end: the answer ends before the stop string, streamed and not, finish_reason stop",
    async () => {
      const body = {
        model: "tiny-reform",
        messages: [{ role: "user", content: "What does the fox do?" }],
        context_id: ctxId,
        max_tokens: 24,
        temperature: 0,
      };
      const free = await json(post("/v1/chat/completions", body));
      const text: string = free.choices[0].message.content;
      // a stop string from the middle of the greedy answer (it is the same answer with the stop set)
      const at = Math.max(1, Math.floor(text.length / 2));
      const stop = text.slice(at, at + 3);
      expect(stop.length).toBeGreaterThan(0);
      const cut = text.slice(0, text.indexOf(stop));
      const stopped = await json(post("/v1/chat/completions", { ...body, stop: ["never-produced", stop] }));
      expect(stopped.choices[0].message.content).toBe(cut);
      expect(stopped.choices[0].finish_reason).toBe("stop");
      const evs = (await collectSse(await post("/v1/chat/completions", { ...body, stream: true, stop })))
        .filter((e) => e.data !== "[DONE]")
        .map((e) => JSON.parse(e.data));
      expect(evs.map((e) => e.choices[0]?.delta?.content ?? "").join("")).toBe(cut);
      expect(evs.at(-1).choices[0].finish_reason).toBe("stop");
    },
    T,
  );

  test(
    "OpenAI chat: non-stream response shape, plain chat without a context, context via model name",
    async () => {
      const res = await post("/v1/chat/completions", {
        model: "tiny-reform",
        messages: [{ role: "user", content: [{ type: "text", text: "What does the fox do?" }] }],
        reform: { context_id: ctxId, method: "reform", budget: 256 },
        max_completion_tokens: 4,
        stop: ["\n\n"],
        seed: 1,
      });
      expect(res.status).toBe(200);
      const c = await json(res);
      expect(c).toMatchObject({ object: "chat.completion", model: "tiny-reform" });
      expect(c.id).toMatch(/^chatcmpl-/);
      expect(c.choices).toHaveLength(1);
      expect(c.choices[0]).toMatchObject({ index: 0, message: { role: "assistant" }, logprobs: null });
      expect(typeof c.choices[0].message.content).toBe("string");
      expect(["stop", "length"]).toContain(c.choices[0].finish_reason);
      expect(c.usage.total_tokens).toBe(c.usage.prompt_tokens + c.usage.completion_tokens);
      expect(c.usage.completion_tokens).toBeLessThanOrEqual(4);
      expect(c.reform.selected_tokens).toBeLessThanOrEqual(256);

      const plain = await json(
        post("/v1/chat/completions", {
          model: "tiny-reform",
          messages: [{ role: "user", content: "hi" }],
          max_tokens: 3,
        }),
      );
      expect(plain.object).toBe("chat.completion");
      expect(plain.reform.context_id).toBeNull();

      const models = await json(api("/v1/models"));
      expect(models.data.map((m: { id: string }) => m.id)).toContain(`context:${ctxId}`);
      const viaModel = await json(
        post("/v1/chat/completions", {
          model: `context:${ctxId}`,
          messages: [{ role: "user", content: "hi" }],
          max_tokens: 2,
        }),
      );
      expect(viaModel.reform.context_id).toBe(ctxId);
    },
    T,
  );

  test(
    "client disconnect during SSE stops generation; the server stays healthy",
    async () => {
      const before = srv.engine.metrics().tokensGeneratedTotal;
      // The random tiny model samples its stop tokens now and then at temperature 1 (the query below, seed 3: after
      // 11 tokens, a few ms after the third event), and an answer that ends on its own before the abort reaches the
      // server is rightly finished, not aborted (whether the client read the finish before aborting is a race).
      // With the stop tokens banned, each answer runs to its 700 tokens unless the disconnect stops it.
      const noStop = { [TINY_EOS_ID]: -100, [TINY_EOT_ID]: -100 };
      for (const path of [`/v1/contexts/${ctxId}/query`, "/v1/chat/completions"]) {
        const ac = new AbortController();
        const body =
          path === "/v1/chat/completions"
            ? {
                messages: [{ role: "user", content: "go" }],
                context_id: ctxId,
                stream: true,
                max_tokens: 700,
                temperature: 1,
                seed: 3,
                logit_bias: noStop,
              }
            : queryBody({ max_tokens: 700, temperature: 1, seed: 3, logit_bias: noStop });
        const res = await api(path, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify(body),
          signal: ac.signal,
        });
        expect(res.status).toBe(200);
        let n = 0;
        let finished = false;
        try {
          for await (const e of sseEvents(res)) {
            if (e.event === "finish" || e.data === "[DONE]") finished = true;
            if (++n >= 3) ac.abort();
          }
        } catch {
          /* aborted */
        }
        expect(finished).toBe(false);
      }
      // generation stops: the generated-token counter settles below what either answer alone would have reached
      // (700: the default budget 1280 + 700 + the prompt fit the 2048-token window)
      await waitFor(
        async () => /reform_queries_aborted_total [2-9]/.test(await (await api("/metrics")).text()),
        20_000,
        50,
      );
      await Bun.sleep(300);
      const settled = srv.engine.metrics().tokensGeneratedTotal;
      await Bun.sleep(500);
      expect(srv.engine.metrics().tokensGeneratedTotal).toBe(settled);
      expect(settled - before).toBeLessThan(700);
      expect((await fetch(`${base}/health`)).status).toBe(200);
      const next = await json(post(`/v1/contexts/${ctxId}/query`, queryBody({ stream: false })));
      expect(next.usage.completion_tokens).toBeGreaterThanOrEqual(1);
    },
    T,
  );

  test(
    "concurrent sessions: several uploads and queries at once",
    async () => {
      const N = 4;
      const texts = Array.from({ length: N }, (_, i) => sampleText(300 + 50 * i, 10 + i));
      const ids = await Promise.all(texts.map(() => newContext()));
      const infos = await Promise.all(
        ids.map((id, i) =>
          api(`/v1/contexts/${id}/content?final=true`, {
            method: "PUT",
            body: pieceStream(enc.encode(texts[i]!), [97, 1, 300 + i]),
            headers: { "content-type": "text/plain" },
          }).then(json),
        ),
      );
      infos.forEach((info, i) => {
        expect(info.id).toBe(ids[i]);
        expect(info.state).toBe("ready");
        expect(info.bytes_received).toBe(enc.encode(texts[i]!).byteLength);
      });
      // queries on all of them (and the shared one) at once, stream and non-stream mixed
      const results = await Promise.all([
        ...ids.map((id) => post(`/v1/contexts/${id}/query`, queryBody({ max_tokens: 4 })).then(collectSse)),
        ...ids.map((id) =>
          post("/v1/chat/completions", {
            messages: [{ role: "user", content: "q" }],
            context_id: id,
            max_tokens: 4,
          }).then(json),
        ),
      ]);
      for (const r of results.slice(0, N) as SseEvent[][]) {
        expect(r.at(-1)!.data).toBe("[DONE]");
        expect(r.at(-2)!.event).toBe("finish");
      }
      for (const r of results.slice(N) as { object: string }[]) expect(r.object).toBe("chat.completion");
      const m = await (await api("/metrics")).text();
      expect(m).toMatch(/reform_active_contexts \d+/);
      for (const id of ids) expect((await api(`/v1/contexts/${id}`, { method: "DELETE" })).status).toBe(200);
    },
    T,
  );
});

describe("logprobs, penalties, logit bias", () => {
  let ctxId: string;
  beforeAll(async () => {
    ctxId = await newContext();
    await uploadFinal(ctxId, sampleText(300, 9));
  }, T);
  const chat = (extra: Record<string, unknown>) => ({
    model: `context:${ctxId}`,
    messages: [{ role: "user", content: "What does the fox do?" }],
    max_tokens: 8,
    temperature: 0,
    ...extra,
  });

  test(
    "OpenAI logprobs: one entry per token, greedy = the top alternative, bytes spell the content; stream == non-stream",
    async () => {
      const r = await json(post("/v1/chat/completions", chat({ logprobs: true, top_logprobs: 3 })));
      const content: string = r.choices[0].message.content;
      const lps = r.choices[0].logprobs.content as {
        token: string;
        logprob: number;
        bytes: number[];
        top_logprobs: { token: string; logprob: number; bytes: number[] }[];
      }[];
      expect(r.choices[0].logprobs.refusal).toBeNull();
      expect(lps.length).toBeGreaterThan(0);
      expect(lps.length).toBeLessThanOrEqual(r.usage.completion_tokens);
      for (const e of lps) {
        expect(e.logprob).toBeLessThanOrEqual(0);
        expect(e.top_logprobs.length).toBe(3);
        for (let i = 1; i < 3; i++)
          expect(e.top_logprobs[i]!.logprob).toBeLessThanOrEqual(e.top_logprobs[i - 1]!.logprob);
        // greedy decoding picks the most likely token
        expect(e.top_logprobs[0]!.logprob).toBeCloseTo(e.logprob, 6);
        expect(e.top_logprobs[0]!.bytes).toEqual(e.bytes);
        const p = e.top_logprobs.reduce((a, t) => a + Math.exp(t.logprob), 0);
        expect(p).toBeLessThanOrEqual(1 + 1e-6);
      }
      // the tokens' bytes concatenate to the generated text
      const bytes = lps.flatMap((e) => e.bytes);
      expect(new TextDecoder().decode(Uint8Array.from(bytes))).toBe(content);
      // streamed: the entries ride on the chunks, same values
      const res = await post("/v1/chat/completions", chat({ logprobs: true, top_logprobs: 3, stream: true }));
      const evs = (await collectSse(res)).filter((e) => e.data !== "[DONE]").map((e) => JSON.parse(e.data));
      const streamed = evs.flatMap((c) => c.choices[0]?.logprobs?.content ?? []);
      expect(streamed).toEqual(lps);
      // without logprobs: null
      const plain = await json(post("/v1/chat/completions", chat({})));
      expect(plain.choices[0].logprobs).toBeNull();
      expect(plain.choices[0].message.content).toBe(content);
    },
    T,
  );

  test(
    "logit_bias steers greedy decoding; penalties run; the context query API takes the same fields",
    async () => {
      // token ids come with our own query API's SSE token events
      const sse = await collectSse(
        await post(`/v1/contexts/${ctxId}/query`, queryBody({ max_tokens: 1, logprobs: 2 })),
      );
      const tok = JSON.parse(sse.find((e) => e.event === "token")!.data);
      expect(tok.logprob.top_logprobs.length).toBe(2);
      expect(tok.logprob.bytes).toEqual(tok.logprob.top_logprobs[0].bytes);
      const greedyId: number = tok.token_id;
      // ban the greedy choice: the runner-up of the same distribution wins
      const banned = await json(
        post(
          `/v1/contexts/${ctxId}/query`,
          queryBody({ stream: false, max_tokens: 1, logprobs: 2, logit_bias: { [greedyId]: -100 } }),
        ),
      );
      expect(banned.logprobs.length).toBe(1);
      expect(banned.logprobs[0].bytes).toEqual(tok.logprob.top_logprobs[1].bytes);
      expect(banned.logprobs[0].logprob).toBeCloseTo(tok.logprob.top_logprobs[1].logprob, 6); // logprobs stay the model's own
      // +100 on one token: greedy decoding repeats it
      const forced = await json(
        post(
          `/v1/contexts/${ctxId}/query`,
          queryBody({ stream: false, max_tokens: 4, logprobs: 0, logit_bias: { "65": 100 } }),
        ),
      );
      expect(new Set(forced.logprobs.map((e: { bytes: number[] }) => e.bytes.join(","))).size).toBe(1);
      expect(forced.usage.completion_tokens).toBe(4);
      // OpenAI field names on the chat endpoint too, with penalties
      const r = await json(
        post(
          "/v1/chat/completions",
          chat({
            logprobs: true,
            logit_bias: { "65": 100 },
            presence_penalty: 1,
            frequency_penalty: 1.5,
            repetition_penalty: 1.3,
            max_tokens: 3,
          }),
        ),
      );
      expect(r.choices[0].logprobs.content.map((e: { bytes: number[] }) => e.bytes.join(","))).toEqual(
        forced.logprobs.slice(0, 3).map((e: { bytes: number[] }) => e.bytes.join(",")),
      );
    },
    T,
  );

  test("bad values: 400 naming the parameter", async () => {
    await expectError(await post("/v1/chat/completions", chat({ top_logprobs: 2 })), 400);
    await expectError(await post("/v1/chat/completions", chat({ logprobs: true, top_logprobs: 21 })), 400);
    await expectError(await post("/v1/chat/completions", chat({ presence_penalty: 3 })), 400);
    await expectError(await post("/v1/chat/completions", chat({ repetition_penalty: 0 })), 400);
    await expectError(await post("/v1/chat/completions", chat({ logit_bias: { abc: 1 } })), 400);
    const oov = await post("/v1/chat/completions", chat({ logit_bias: { "999999": 1 } }));
    expect(oov.status).toBe(400);
    expect((await json(oov)).error.param).toBe("logit_bias");
    const tools = await post("/v1/chat/completions", chat({ tools: [{ type: "function", function: { name: "f" } }] }));
    expect(tools.status).toBe(400);
    expect((await json(tools)).error.message).toMatch(/not supported/);
    const rf = await post("/v1/chat/completions", chat({ response_format: { type: "json_object" } }));
    expect(rf.status).toBe(400);
    expect((await json(rf)).error.message).toMatch(/json_object/);
    // their no-op forms are accepted
    const ok = await post(
      "/v1/chat/completions",
      chat({ tools: [], tool_choice: "none", response_format: { type: "text" }, max_tokens: 1 }),
    );
    expect(ok.status).toBe(200);
    await ok.text();
    await expectError(await post(`/v1/contexts/${ctxId}/query`, queryBody({ logprobs: 30 })), 400);
  });
});

describe("OpenAI legacy completions (raw prompt, no chat template)", () => {
  let ctxId: string;
  let tok: ModelTokenizer;
  beforeAll(async () => {
    ctxId = await newContext();
    await uploadFinal(ctxId, sampleText(120, 13));
    tok = ModelTokenizer.fromDir(srv.modelDir);
  }, T);

  test(
    "plain and over a context: shapes, exact prompt accounting, legacy logprobs, stream == non-stream, echo",
    async () => {
      const plain = await json(
        post("/v1/completions", { model: "tiny-reform", prompt: "The quick brown", max_tokens: 5, temperature: 0 }),
      );
      expect(plain).toMatchObject({ object: "text_completion", model: "tiny-reform" });
      expect(plain.id).toMatch(/^cmpl-/);
      expect(typeof plain.choices[0].text).toBe("string");
      expect(plain.choices[0].logprobs).toBeNull();
      expect(plain.usage.prompt_tokens).toBe(tok.withBos(tok.encode("The quick brown")).length);

      const prompt = "\n\nQuestion: what does the fox do?\nAnswer:";
      const body = {
        model: `context:${ctxId}`,
        prompt,
        max_tokens: 6,
        temperature: 0,
        logprobs: 2,
        reform: { method: "full" },
      };
      const r = await json(post("/v1/completions", body));
      // BOS + every context token + the prompt continuing them
      expect(r.usage.prompt_tokens).toBe(1 + r.reform.context_tokens + tok.encodeSuffix(prompt).length);
      expect(r.reform.selected_tokens).toBe(r.reform.context_tokens);
      const lp = r.choices[0].logprobs;
      expect(lp.tokens.length).toBe(lp.token_logprobs.length);
      expect(lp.tokens.length).toBe(lp.top_logprobs.length);
      expect(lp.tokens.join("")).toBe(r.choices[0].text);
      expect(lp.text_offset[0]).toBe(0);
      for (let i = 1; i < lp.tokens.length; i++)
        expect(lp.text_offset[i]).toBe(lp.text_offset[i - 1] + lp.tokens[i - 1].length);
      for (let i = 0; i < lp.tokens.length; i++) {
        const alts = Object.values(lp.top_logprobs[i]) as number[];
        expect(alts.length).toBeGreaterThanOrEqual(1);
        // greedy: the chosen token is the most likely (the legacy format keys alternatives by text, so two byte
        // tokens that both show as U+FFFD collide; compare only where they do not)
        if (alts.length === 2) expect(Math.max(...alts)).toBeCloseTo(lp.token_logprobs[i], 6);
      }
      // streamed
      const evs = (
        await collectSse(
          await post("/v1/completions", { ...body, stream: true, stream_options: { include_usage: true } }),
        )
      )
        .filter((e) => e.data !== "[DONE]")
        .map((e) => JSON.parse(e.data));
      expect(evs.every((e) => e.object === "text_completion")).toBe(true);
      const withChoice = evs.filter((e) => e.choices.length > 0);
      expect(withChoice.map((e) => e.choices[0].text).join("")).toBe(r.choices[0].text);
      expect(withChoice.flatMap((e) => e.choices[0].logprobs?.tokens ?? [])).toEqual(lp.tokens);
      expect(withChoice.flatMap((e) => e.choices[0].logprobs?.text_offset ?? [])).toEqual(lp.text_offset);
      expect(withChoice.at(-1).choices[0].finish_reason).toBe(r.choices[0].finish_reason);
      expect(evs.at(-1).usage).toEqual(r.usage);
      // echo returns the prompt first
      const e = await json(post("/v1/completions", { ...body, logprobs: undefined, echo: true }));
      expect(e.choices[0].text).toBe(prompt + r.choices[0].text);
    },
    T,
  );

  test("tokenize / detokenize round trip (the model's tokenizer), errors", async () => {
    const text = "héllo the fox 🦊 日本語";
    const t = await json(post("/v1/tokenize", { text }));
    expect(t.tokens).toEqual(tok.encode(text));
    expect(t.count).toBe(t.tokens.length);
    expect(t.trained_context).toBeGreaterThan(0);
    const withBos = await json(post("/v1/tokenize", { prompt: text, add_special_tokens: true }));
    expect(withBos.tokens).toEqual(tok.withBos(tok.encode(text)));
    expect((await json(post("/v1/detokenize", { tokens: t.tokens }))).text).toBe(text);
    expect((await json(post("/v1/detokenize", { tokens: withBos.tokens, skip_special_tokens: true }))).text).toBe(text);
    await expectError(await post("/v1/tokenize", {}), 400);
    await expectError(await post("/v1/tokenize", { text: "a", prompt: "b" }), 400);
    const bad = await post("/v1/detokenize", { tokens: [1, 99999] });
    expect(bad.status).toBe(400);
    expect((await json(bad)).error.param).toBe("tokens");
  });

  test("unsupported forms are refused with 400", async () => {
    const b = { prompt: "hi", max_tokens: 2 };
    for (const extra of [
      { n: 2 },
      { best_of: 3 },
      { suffix: "x" },
      { echo: true, logprobs: 1 },
      { prompt: ["a", "b"] },
      { prompt: "" },
      { logprobs: 21 },
    ]) {
      await expectError(await post("/v1/completions", { ...b, ...extra }), 400);
    }
    await expectError(await post("/v1/completions", { max_tokens: 2 }), 400);
    await expectError(await post("/v1/completions", { ...b, model: "context:ctx_nope" }), 404);
    // OpenAI's other prompt shapes: the message says which one and what to send instead
    for (const [prompt, says] of [
      [[1, 2, 3], "token ids"],
      [[[1, 2]], "token ids"],
      [["a", "b"], "one prompt per request"],
    ] as const) {
      const e = await expectError(await post("/v1/completions", { ...b, prompt }), 400, "invalid_value");
      expect(e.param).toBe("prompt");
      expect(e.message).toContain(says);
    }
    const one = await json(post("/v1/completions", { prompt: ["hi"], max_tokens: 1 }));
    expect(one.usage.completion_tokens).toBe(1);
  });
});

describe("errors", () => {
  let ready: string;
  beforeAll(async () => {
    ready = await newContext();
    await uploadFinal(ready, sampleText(300, 20));
  }, T);

  test("malformed JSON, empty body, non-object", async () => {
    await expectError(await post(`/v1/contexts/${ready}/query`, "{not json"), 400, "invalid_json");
    await expectError(await post("/v1/chat/completions", ""), 400, "invalid_json");
    await expectError(await post("/v1/chat/completions", "[1,2]"), 400, "invalid_json");
    await expectError(await post("/v1/contexts", '{"metadata": '), 400, "invalid_json");
  });

  test("validation errors name the param", async () => {
    const cases: [string, unknown, string][] = [
      [`/v1/contexts/${ready}/query`, { question: "q", temperature: 5 }, "temperature"],
      [`/v1/contexts/${ready}/query`, { question: "q", max_tokens: 0 }, "max_tokens"],
      [`/v1/contexts/${ready}/query`, { question: "q", max_tokens: 1.5 }, "max_tokens"],
      [`/v1/contexts/${ready}/query`, { question: "q", method: "magic" }, "method"],
      [`/v1/contexts/${ready}/query`, { max_tokens: 3 }, "question"],
      [`/v1/contexts/${ready}/query`, { question: "q", bogus: 1 }, ""],
      [`/v1/contexts/${ready}/query`, { question: "q", stop: [1] }, "stop"],
      ["/v1/chat/completions", { messages: [] }, "messages"],
      ["/v1/chat/completions", { messages: [{ role: "user", content: "x" }], n: 2 }, "n"],
      ["/v1/chat/completions", { messages: [{ role: "wizard", content: "x" }] }, "messages.0.role"],
      [
        "/v1/chat/completions",
        { messages: [{ role: "user", content: [{ type: "image_url" }] }] },
        "messages.0.content.0",
      ],
      ["/v1/chat/completions", { messages: [{ role: "user", content: "x" }], top_p: 0 }, "top_p"],
      ["/v1/contexts", { metadata: "x" }, "metadata"],
    ];
    for (const [path, body, param] of cases) {
      const e = await expectError(await post(path, body), 400);
      expect(e.type).toBe("invalid_request_error");
      if (param) expect(e.param).toBe(param);
      else expect(e.message).toContain("bogus");
    }
  });

  test("unknown context: 404 everywhere", async () => {
    const id = "ctx_doesnotexist";
    await expectError(await api(`/v1/contexts/${id}`), 404, "context_not_found");
    await expectError(await api(`/v1/contexts/${id}/events`), 404, "context_not_found");
    await expectError(await api(`/v1/contexts/${id}/content`, { method: "PUT", body: "x" }), 404, "context_not_found");
    await expectError(await post(`/v1/contexts/${id}/query`, queryBody()), 404, "context_not_found");
    await expectError(await post(`/v1/contexts/${id}/finalize`, ""), 404, "context_not_found");
    await expectError(
      await post("/v1/chat/completions", { messages: [{ role: "user", content: "x" }], context_id: id }),
      404,
      "context_not_found",
    );
    await expectError(await api(`/v1/contexts/bad%20id!`), 400);
  });

  test("409: query on an empty or still-processing context", async () => {
    const empty = await newContext();
    await expectError(await post(`/v1/contexts/${empty}/query`, queryBody()), 409, "context_not_ready");
    await api(`/v1/contexts/${empty}/content`, { method: "PUT", body: "some text, not finalized" });
    await expectError(await post(`/v1/contexts/${empty}/query`, queryBody()), 409, "context_not_ready");
    await expectError(
      await post("/v1/chat/completions", { messages: [{ role: "user", content: "x" }], context_id: empty }),
      409,
    );
  });

  test("413: body over the configured limit", async () => {
    const id = await newContext();
    const big = new Uint8Array(MAX_BODY + 10).fill(0x61);
    await expectError(await api(`/v1/contexts/${id}/content`, { method: "PUT", body: big }), 413, "payload_too_large");
    await expectError(
      await api(`/v1/contexts/${id}/content`, {
        method: "PUT",
        body: pieceStream(big, [32 * 1024]),
        headers: { "content-type": "text/plain" },
      }),
      413,
      "payload_too_large",
    );
    await expectError(
      await post(`/v1/contexts/${ready}/query`, { question: "x".repeat(MAX_JSON + 1) }),
      413,
      "payload_too_large",
    );
    // far above every limit (Bun's own cap used to answer these with a bare 413 and no JSON body)
    const huge = new Uint8Array(3 * 1024 * 1024).fill(0x61);
    await expectError(await api(`/v1/contexts/${id}/content`, { method: "PUT", body: huge }), 413, "payload_too_large");
    await expectError(
      await post("/v1/chat/completions", { messages: [{ role: "user", content: "x".repeat(huge.length) }] }),
      413,
      "payload_too_large",
    );
    expect((await fetch(`${base}/health`)).status).toBe(200);
  });

  test("400: budget above the maximum", async () => {
    const max = srv.engine.modelInfo()!.defaults.maxBudget;
    const e = await expectError(
      await post(`/v1/contexts/${ready}/query`, queryBody({ budget: max + 1 })),
      400,
      "budget_too_large",
    );
    expect(e.param).toBe("budget");
    await expectError(
      await post("/v1/chat/completions", {
        messages: [{ role: "user", content: "x" }],
        reform: { context_id: ready, budget: max + 1 },
      }),
      400,
    );
  });

  test("415: unsupported media types", async () => {
    await expectError(
      await api(`/v1/contexts/${ready}/content`, {
        method: "PUT",
        body: "x",
        headers: { "content-type": "image/png" },
      }),
      415,
      "unsupported_media_type",
    );
    await expectError(
      await api(`/v1/contexts/${ready}/query`, {
        method: "POST",
        body: "{}",
        headers: { "content-type": "multipart/form-data; boundary=x" },
      }),
      415,
    );
  });

  test("401: missing or wrong API key; /health stays open", async () => {
    await expectError(await fetch(`${base}/v1/contexts`), 401, "missing_api_key");
    await expectError(
      await fetch(`${base}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: "Bearer wrong" },
        body: "{}",
      }),
      401,
      "invalid_api_key",
    );
    expect((await fetch(`${base}/health`)).status).toBe(200);
  });

  test("404 unknown route, 405 wrong method", async () => {
    await expectError(await api("/v1/nope"), 404, "not_found");
    await expectError(await api("/nope"), 404, "not_found");
    await expectError(await api("/ui/nope.js"), 404, "not_found");
    // "/" is the web page (routes/web.ts): it and its modules are open without the key, like /health
    const page = await fetch(`${base}/`);
    expect(page.status).toBe(200);
    expect(page.headers.get("content-type")).toContain("text/html");
    expect(page.headers.get("content-security-policy")).toContain("default-src 'self'");
    expect(await page.text()).toContain('<script type="module" src="/ui/app.js">');
    for (const asset of ["/ui/app.js", "/ui/vendor/preact.mjs", "/ui/vendor/eventsource-parser/parse.js"]) {
      const r = await fetch(`${base}${asset}`);
      expect(r.status).toBe(200);
      expect(r.headers.get("content-type")).toContain("text/javascript");
      await r.arrayBuffer();
    }
    for (const path of ["/v1/chat/completions", "/v1/completions", "/v1/tokenize"]) {
      const e = await api(path);
      await expectError(e, 405, "method_not_allowed");
      expect(e.headers.get("allow")).toBe("POST");
    }
    await expectError(await api("/v1/models", { method: "DELETE" }), 405);
    await expectError(await api(`/v1/contexts/${ready}/query`, { method: "GET" }), 405);
    await expectError(await api(`/v1/contexts/${ready}`, { method: "PUT", body: "x" }), 405);
  });

  test("metrics: Prometheus text", async () => {
    const res = await api("/metrics");
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toContain("text/plain");
    const m = await res.text();
    for (const name of [
      "reform_tokens_processed_total",
      "reform_tokens_generated_total",
      "reform_engine_requests_total",
      "reform_queue_depth",
      "reform_active_contexts",
      "reform_ttft_seconds_bucket",
      "reform_tpot_seconds_count",
      "reform_http_requests_total",
    ]) {
      expect(m).toContain(name);
    }
    expect(m).toMatch(/# TYPE reform_ttft_seconds histogram/);
    expect(m).toMatch(/reform_tokens_processed_total [1-9]\d*/);
    // routes registered after the hand-written table of old are labelled too (tokenized earlier in this file)
    expect(m).toMatch(/reform_http_requests_total\{method="POST",route="\/v1\/tokenize",status="200"\} [1-9]/);
    expect(m).toMatch(/reform_http_requests_total\{method="POST",route="\/v1\/completions",status="200"\} [1-9]/);
    expect(m).not.toContain('route="unmatched",status="200"');
    // every sample line is "name{labels} value" (empty lines, between metric families, are allowed by the format)
    for (const line of m.trim().split("\n")) {
      if (line && !line.startsWith("#"))
        expect(line).toMatch(/^[a-z_:][a-z0-9_:]*(\{[^}]*\})? (-?[0-9.e+-]+|NaN|\+Inf|-Inf)$/);
    }
  });
});
