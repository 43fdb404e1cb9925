/**
 * HTTP-layer behaviour that needs deterministic engine timing (409 while processing, slow
 * generation for client disconnects, loading / failed health) against an in-memory fake engine.
 * The real-engine HTTP tests are in http.test.ts.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { deflateSync } from "node:zlib";
import { resolveConfig } from "../src/config.ts";
import { startServer, type RunningServer } from "../src/server.ts";
import { FakeEngine } from "./helpers/fake-engine.ts";
import { collectSse, expectError, j, jsonPost, pieceStream, sseEvents, waitFor } from "./helpers/http.ts";

const quiet = () => {};
const dataDir = mkdtempSync(join(tmpdir(), "reform-fake-"));

/** A PUT whose body the test streams piece by piece (`piece`) and whose client then goes away (`drop`). */
function streamedPut(url: string) {
  let c!: ReadableStreamDefaultController<Uint8Array>;
  const ac = new AbortController();
  const res = fetch(url, {
    method: "PUT",
    body: new ReadableStream<Uint8Array>({ start: (x) => void (c = x) }),
    signal: ac.signal,
  }).catch(() => null);
  return {
    piece: (b: Uint8Array) => c.enqueue(b),
    drop: async () => {
      ac.abort();
      await res;
    },
  };
}

async function start(engine: FakeEngine, extra: Record<string, unknown> = {}): Promise<RunningServer> {
  return startServer({
    modelDir: "/nonexistent",
    dataDir,
    port: 0,
    apiKey: "",
    engineClient: engine,
    log: quiet,
    ...extra,
  });
}

describe("fake engine", () => {
  let srv: RunningServer;
  let eng: FakeEngine;
  let base: string;
  beforeAll(async () => {
    eng = new FakeEngine();
    srv = await start(eng, { maxBodyBytes: 4096, maxJsonBytes: 2048 });
    base = srv.url;
  });
  afterAll(async () => {
    await srv.stop();
  });

  test("409 while the context is processing, then the query works", async () => {
    eng.appendDelayMs = 600;
    const ctx = await j(jsonPost(`${base}/v1/contexts`, {}));
    const up = fetch(`${base}/v1/contexts/${ctx.id}/content`, {
      method: "PUT",
      body: "hello world",
      headers: { "content-type": "text/plain" },
    });
    await waitFor(async () => (await j(fetch(`${base}/v1/contexts/${ctx.id}`))).state === "processing");
    // the status and the list say an upload holds it (a web page in another tab offers no resume then)
    expect((await j(fetch(`${base}/v1/contexts/${ctx.id}`))).upload_in_progress).toBe(true);
    const listed = (await j(fetch(`${base}/v1/contexts`))).data.find((c: { id: string }) => c.id === ctx.id);
    expect(listed.upload_in_progress).toBe(true);
    const q = await jsonPost(`${base}/v1/contexts/${ctx.id}/query`, { question: "q?", stream: false });
    await expectError(q, 409, "context_not_ready");
    const chat = await jsonPost(`${base}/v1/chat/completions`, {
      messages: [{ role: "user", content: "x" }],
      context_id: ctx.id,
    });
    await expectError(chat, 409, "context_not_ready");
    expect((await up).status).toBe(200);
    expect((await j(fetch(`${base}/v1/contexts/${ctx.id}`))).upload_in_progress).toBe(false);
    eng.appendDelayMs = 0;
    const ok = await jsonPost(`${base}/v1/contexts/${ctx.id}/query`, { question: "q?", stream: false });
    expect(ok.status).toBe(200);
  });

  test("413: content upload over the limit (content-length and chunked) and JSON over the limit", async () => {
    const ctx = await j(jsonPost(`${base}/v1/contexts`, {}));
    const big = new Uint8Array(5000).fill(97);
    await expectError(
      await fetch(`${base}/v1/contexts/${ctx.id}/content`, { method: "PUT", body: big }),
      413,
      "payload_too_large",
    );
    const chunked = await fetch(`${base}/v1/contexts/${ctx.id}/content`, {
      method: "POST",
      body: pieceStream(big, [1000]),
      headers: { "content-type": "text/plain" },
    });
    const err = await expectError(chunked, 413, "payload_too_large");
    // pieces of 1000 bytes against a 4096-byte limit: the piece that crosses it is cut there, not dropped whole
    expect(err.message).toContain("the first 4096 bytes were stored");
    expect((await j(fetch(`${base}/v1/contexts/${ctx.id}`))).bytes_received).toBe(4096);
    expect(eng.texts.get(ctx.id)).toBe("a".repeat(4096));
    const bigJson = await jsonPost(`${base}/v1/contexts/${ctx.id}/query`, { question: "x".repeat(3000) });
    await expectError(bigJson, 413, "payload_too_large");
    // the server is fine afterwards
    expect((await fetch(`${base}/health`)).status).toBe(200);
  });

  test("client disconnect during query SSE stops generation; server stays healthy", async () => {
    eng.tokenDelayMs = 30;
    const ctx = await j(jsonPost(`${base}/v1/contexts`, {}));
    await fetch(`${base}/v1/contexts/${ctx.id}/content?final=true`, { method: "PUT", body: "some text" });
    const before = eng.aborted;
    const ac = new AbortController();
    const res = await fetch(`${base}/v1/contexts/${ctx.id}/query`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ question: "q", max_tokens: 1000 }),
      signal: ac.signal,
    });
    expect(res.status).toBe(200);
    let tokens = 0;
    try {
      for await (const ev of sseEvents(res)) {
        if (ev.event === "token" && ++tokens >= 3) ac.abort();
      }
    } catch {
      /* aborted */
    }
    await waitFor(() => eng.aborted > before && eng.activeQueries === 0, 5000);
    expect(eng.generated).toBeLessThan(1000);
    // same for the OpenAI stream
    const ac2 = new AbortController();
    const res2 = await fetch(`${base}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        messages: [{ role: "user", content: "hi" }],
        context_id: ctx.id,
        max_tokens: 1000,
        stream: true,
      }),
      signal: ac2.signal,
    });
    let n = 0;
    try {
      for await (const _ of sseEvents(res2)) if (++n >= 3) ac2.abort();
    } catch {
      /* aborted */
    }
    await waitFor(() => eng.aborted > before + 1 && eng.activeQueries === 0, 5000);
    eng.tokenDelayMs = 0;
    const after = await jsonPost(`${base}/v1/contexts/${ctx.id}/query`, { question: "q", max_tokens: 3 });
    const evs = await collectSse(after);
    expect(evs.at(-1)!.data).toBe("[DONE]");
    const metrics = await (await fetch(`${base}/metrics`)).text();
    expect(metrics).toMatch(/reform_queries_aborted_total [1-9]/);
  });

  test("engine fault mid-stream: error event then [DONE]; before the stream: 500 JSON", async () => {
    const ctx = await j(jsonPost(`${base}/v1/contexts`, {}));
    await fetch(`${base}/v1/contexts/${ctx.id}/content?final=true`, { method: "PUT", body: "text" });
    eng.failAfterTokens = 2;
    try {
      const evs = await collectSse(
        await jsonPost(`${base}/v1/contexts/${ctx.id}/query`, { question: "q", max_tokens: 10 }),
      );
      expect(evs.map((e) => e.event)).toEqual(["start", "token", "token", "error", "message"]);
      const err = JSON.parse(evs[3]!.data).error;
      expect(err).toMatchObject({ type: "server_error", code: "device_error" });
      expect(evs[4]!.data).toBe("[DONE]");
      const chat = await collectSse(
        await jsonPost(`${base}/v1/chat/completions`, {
          messages: [{ role: "user", content: "x" }],
          context_id: ctx.id,
          stream: true,
        }),
      );
      expect(chat.at(-2)!.event).toBe("error");
      eng.failAfterTokens = 0;
      await expectError(
        await jsonPost(`${base}/v1/contexts/${ctx.id}/query`, { question: "q", stream: false }),
        500,
        "device_error",
      );
    } finally {
      eng.failAfterTokens = null;
    }
    expect((await fetch(`${base}/health`, { method: "HEAD" })).status).toBe(200);
  });

  test("JSON endpoints take JSON only (a cross-origin simple POST is refused); raw uploads take form and text bodies", async () => {
    for (const type of ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"]) {
      const bad = await fetch(`${base}/v1/contexts`, {
        method: "POST",
        body: '{"metadata":{"a":1}}',
        headers: { "content-type": type },
      });
      await expectError(bad, 415, "unsupported_media_type");
      const chat = await fetch(`${base}/v1/chat/completions`, {
        method: "POST",
        body: '{"messages":[{"role":"user","content":"x"}]}',
        headers: { "content-type": type },
      });
      await expectError(chat, 415, "unsupported_media_type");
    }
    // curl --data without a content type header at all still works
    const r = await fetch(`${base}/v1/contexts`, { method: "POST", body: new Blob(['{"metadata":{"a":1}}']) });
    expect(r.status).toBe(201);
    const ctx = await j(r);
    expect(ctx.metadata).toEqual({ a: 1 });
    const up = await fetch(`${base}/v1/contexts/${ctx.id}/content`, {
      method: "POST",
      body: "a=b&c",
      headers: { "content-type": "application/x-www-form-urlencoded" },
    });
    expect((await j(up)).bytes_received).toBe(5);
  });

  test("upload pieces reach the engine intact (multi-byte UTF-8 split across pieces)", async () => {
    const ctx = await j(jsonPost(`${base}/v1/contexts`, {}));
    const text = "héllo wörld — 日本語テキスト 🎉🎉 ".repeat(20);
    const bytes = new TextEncoder().encode(text);
    expect(bytes.byteLength).toBeLessThan(4096);
    const res = await fetch(`${base}/v1/contexts/${ctx.id}/content?final=1`, {
      method: "PUT",
      body: pieceStream(bytes, [1, 2, 3, 5, 7]),
      headers: { "content-type": "text/plain; charset=utf-8" },
    });
    expect(res.status).toBe(200);
    const info = await j(res);
    expect(info.appended_bytes).toBe(bytes.byteLength);
    expect(info.bytes_received).toBe(bytes.byteLength);
    expect(info.finalized).toBe(true);
    expect(eng.texts.get(ctx.id)).toBe(text);
  });

  test("uploads store text: gzip / deflate bodies decoded, charsets converted, binary files refused before a byte is stored", async () => {
    const text = "The secret number of cobalt-lantern is 4417203. café naïve — 日本語\n".repeat(25);
    const utf8 = new TextEncoder().encode(text);
    const put = async (body: RequestInit["body"], headers: Record<string, string>, query = "?final=1") => {
      const ctx = await j(jsonPost(`${base}/v1/contexts`, {}));
      const res = await fetch(`${base}/v1/contexts/${ctx.id}/content${query}`, { method: "PUT", body, headers });
      return { id: ctx.id as string, res };
    };
    const stored = async (r: { id: string; res: Response }) => {
      expect(r.res.status).toBe(200);
      const info = await j(r.res);
      expect(info.bytes_received).toBe(utf8.byteLength); // counts the stored UTF-8 bytes
      expect(eng.texts.get(r.id)).toBe(text);
    };
    // Content-Encoding, in pieces that cut the compressed stream anywhere
    await stored(await put(pieceStream(Bun.gzipSync(utf8), [3, 50, 7]), { "content-encoding": "gzip" }));
    await stored(await put(deflateSync(utf8), { "content-encoding": "deflate" })); // zlib format (RFC 9110)
    await stored(await put(Bun.gzipSync(utf8), { "content-encoding": "identity, gzip" }));
    await expectError((await put(utf8, { "content-encoding": "br" })).res, 415, "unsupported_media_type");
    const broken = await put(Bun.gzipSync(utf8).subarray(0, 40), { "content-encoding": "gzip" });
    expect((await expectError(broken.res, 400, "invalid_content_encoding")).message).toContain("gzip");
    // charsets: declared ones are converted; UTF-16 that no charset names, and an unknown charset, are refused
    const utf16le = new Uint8Array(2 + text.length * 2);
    utf16le.set([0xff, 0xfe]);
    for (let i = 0; i < text.length; i++) {
      utf16le[2 + 2 * i] = text.charCodeAt(i) & 0xff;
      utf16le[3 + 2 * i] = text.charCodeAt(i) >> 8;
    }
    await stored(await put(utf16le, { "content-type": "text/plain; charset=utf-16" }));
    await stored(await put(pieceStream(utf16le, [1, 3, 2]), { "content-type": "text/plain; charset=UTF-16LE" }));
    for (const headers of [{ "content-type": "text/plain" }, { "content-type": "text/plain; charset=utf-8" }]) {
      const bom = await put(utf16le, headers);
      expect((await expectError(bom.res, 415, "unsupported_media_type")).message).toContain("charset=utf-16");
      expect((await j(fetch(`${base}/v1/contexts/${bom.id}`))).bytes_received).toBe(0);
    }
    const latin1Text = "caf\u00e9 na\u00efve r\u00e9sum\u00e9 ".repeat(50);
    const latin1 = await put(
      Uint8Array.from(latin1Text, (ch) => ch.charCodeAt(0)),
      {
        "content-type": 'text/plain; charset="ISO-8859-1"',
      },
    );
    expect(latin1.res.status).toBe(200);
    expect(eng.texts.get(latin1.id)).toBe(latin1Text);
    const utf16be = Uint8Array.from(utf16le, (_, i) => utf16le[i ^ 1]!); // FE FF, then each unit big-endian
    await stored(await put(utf16be, { "content-type": "text/plain; charset=utf-16" })); // the mark names the order
    const noMark = await put(utf16le.subarray(2), {});
    expect((await expectError(noMark.res, 415, "binary_content")).message).toContain("charset=utf-16le");
    const unknown = await put(utf8, { "content-type": "text/plain; charset=klingon" });
    expect((await expectError(unknown.res, 415, "unsupported_media_type")).message).toContain("klingon");
    // binary files, by signature or by content, refused with what to do instead; nothing stored
    const gz = await put(Bun.gzipSync(utf8), { "content-type": "application/octet-stream" });
    expect((await expectError(gz.res, 415, "binary_content")).message).toContain("Content-Encoding: gzip");
    const pdf = await put(new TextEncoder().encode(`%PDF-1.7\n${text}`), {});
    expect((await expectError(pdf.res, 415, "binary_content")).message).toContain("pdftotext");
    const noise = Uint8Array.from({ length: 3000 }, (_, i) => (i * 7919) & 0xff);
    const bin = await put(noise, {});
    expect((await expectError(bin.res, 415, "binary_content")).message).toContain("NUL bytes or invalid UTF-8");
    for (const r of [gz, pdf, bin]) expect((await j(fetch(`${base}/v1/contexts/${r.id}`))).bytes_received).toBe(0);
    // ... unless asked; a log with a few bad bytes is text; only the context's first bytes are judged
    const forced = await put(noise, {}, "?binary=true");
    expect(forced.res.status).toBe(200);
    expect((await j(forced.res)).bytes_received).toBe(noise.byteLength);
    const log = new Uint8Array([...utf8.subarray(0, 2000), 0, 0xff, 0xfe, 0x1b, ...utf8.subarray(2000)]);
    expect((await put(log, {})).res.status).toBe(200);
    const more = await put(utf8, {}, "");
    expect(more.res.status).toBe(200);
    // a converted body cannot resume at an offset: it would name a byte of the source, not of the stored text
    const converted: [Record<string, string>, Uint8Array][] = [
      [{ "content-encoding": "gzip" }, Bun.gzipSync(utf8)],
      [{ "content-type": "text/plain; charset=utf-16" }, utf16le],
    ];
    for (const [headers, body] of converted) {
      const r = await fetch(`${base}/v1/contexts/${more.id}/content?offset=${utf8.byteLength}`, {
        method: "PUT",
        body,
        headers,
      });
      expect((await expectError(r, 400, "invalid_value")).param).toBe("offset");
    }
    const next = await fetch(`${base}/v1/contexts/${more.id}/content?offset=${utf8.byteLength}`, {
      method: "PUT",
      body: noise,
    });
    expect(next.status).toBe(200);
  });

  test("a slow stream is stored as it comes: the text check waits at most a second for the first 4 KiB", async () => {
    const ctx = await j(jsonPost(`${base}/v1/contexts`, {}));
    let ctrl!: ReadableStreamDefaultController<Uint8Array>;
    const body = new ReadableStream<Uint8Array>({ start: (c) => void (ctrl = c) });
    const line = new TextEncoder().encode("2026-11-30 12:00:01 INFO service started on port 8080\n");
    ctrl.enqueue(line);
    const up = fetch(`${base}/v1/contexts/${ctx.id}/content`, {
      method: "PUT",
      body,
      headers: { "content-type": "text/plain" },
    });
    const bytes = async () => (await j(fetch(`${base}/v1/contexts/${ctx.id}`))).bytes_received;
    await waitFor(async () => (await bytes()) === line.byteLength, 5000);
    ctrl.enqueue(line); // a resumed piece or a later line: passed on at once
    await waitFor(async () => (await bytes()) === 2 * line.byteLength, 5000);
    ctrl.close();
    expect((await up).status).toBe(200);
    expect(eng.texts.get(ctx.id)).toBe(new TextDecoder().decode(line).repeat(2));

    // a client that leaves while its first bytes are held for the check: they are stored, as any received byte
    const dropped = await j(jsonPost(`${base}/v1/contexts`, {}));
    const cut = streamedPut(`${base}/v1/contexts/${dropped.id}/content`);
    cut.piece(line);
    await Bun.sleep(200); // within the check's second
    await cut.drop();
    await waitFor(
      async () => (await j(fetch(`${base}/v1/contexts/${dropped.id}`))).bytes_received === line.byteLength,
      5000,
    );
  });

  test("a dropped upload: upload_storing while what it received is stored, then bytes_received is final", async () => {
    eng.appendDelayMs = 800;
    try {
      const ctx = await j(jsonPost(`${base}/v1/contexts`, {}));
      const status = async () => await j(fetch(`${base}/v1/contexts/${ctx.id}`));
      const cut = streamedPut(`${base}/v1/contexts/${ctx.id}/content`);
      cut.piece(new TextEncoder().encode("hello world, "));
      await waitFor(async () => (await status()).upload_in_progress === true, 5000);
      expect((await status()).upload_storing).toBe(false);
      await cut.drop();
      await waitFor(async () => (await status()).upload_in_progress === false, 5000);
      expect((await status()).upload_storing).toBe(true); // bytes_received may still grow: not one to resume from
      await waitFor(async () => (await status()).upload_storing === false, 5000);
      expect((await status()).bytes_received).toBe(13);
    } finally {
      eng.appendDelayMs = 0;
    }
  });

  test("streamed progress is throttled: comments at most one a second, events 250 ms apart, the first at once", async () => {
    eng.progressSteps = 60;
    eng.progressDelayMs = 20; // 60 chunks over ~1.2 s
    try {
      const ask = async (headers: Record<string, string>) => {
        const t0 = performance.now();
        const res = await jsonPost(
          `${base}/v1/chat/completions`,
          { messages: [{ role: "user", content: "hi" }], max_tokens: 2, stream: true },
          headers,
        );
        expect(res.status).toBe(200);
        return { text: await res.text(), ms: performance.now() - t0 };
      };
      const plain = await ask({});
      const comments = plain.text.split("\n").filter((l) => l.startsWith(": progress compress "));
      expect(comments[0]).toBe(": progress compress 128/7680"); // the first one, not delayed
      expect(comments.length).toBeLessThanOrEqual(Math.ceil(plain.ms / 1000) + 1);
      expect(comments.length).toBeGreaterThanOrEqual(1);
      const ev = await ask({ "x-reform-progress": "on" });
      const events = ev.text.split("\n\n").filter((b) => b.startsWith("event: progress"));
      expect(events[0]).toContain('"done":128');
      expect(events.length).toBeGreaterThanOrEqual(2);
      expect(events.length).toBeLessThanOrEqual(Math.ceil(ev.ms / 250) + 1);
    } finally {
      eng.progressSteps = 0;
      eng.progressDelayMs = 0;
    }
  });

  test("a malformed ?offset= is a 400 naming offset (a non-negative integer byte offset); nothing is stored", async () => {
    const ctx = await j(jsonPost(`${base}/v1/contexts`, {}));
    for (const bad of ["abc", "-1", "1.5", "", "1e3", "0x10"]) {
      const res = await fetch(`${base}/v1/contexts/${ctx.id}/content?offset=${bad}`, { method: "PUT", body: "x" });
      const e = await expectError(res, 400, "invalid_value");
      expect(e.param).toBe("offset");
      expect(e.message).toContain("non-negative integer byte offset");
      expect(e.message).not.toContain("NaN");
    }
    expect((await j(fetch(`${base}/v1/contexts/${ctx.id}`))).bytes_received).toBe(0);
    const ok = await fetch(`${base}/v1/contexts/${ctx.id}/content?offset=0`, { method: "PUT", body: "x" });
    expect(ok.status).toBe(200);
  });

  test("query parameters reach the engine", async () => {
    const ctx = await j(jsonPost(`${base}/v1/contexts`, {}));
    await fetch(`${base}/v1/contexts/${ctx.id}/content?final=1`, { method: "PUT", body: "abc" });
    await (
      await jsonPost(`${base}/v1/chat/completions`, {
        model: "reform",
        messages: [
          { role: "developer", content: [{ type: "text", text: "sys" }] },
          { role: "user", content: "u" },
        ],
        reform: { context_id: ctx.id, method: "h2o", budget: 100 },
        max_completion_tokens: 5,
        temperature: 0.5,
        top_p: 0.9,
        seed: 7,
        stop: "END",
      })
    ).json();
    const q = eng.lastQuery!;
    expect(q.contextId).toBe(ctx.id);
    expect(q.method).toBe("h2o");
    expect(q.budget).toBe(100);
    expect(q.messages).toEqual([
      { role: "system", content: "sys" },
      { role: "user", content: "u" },
    ]);
    expect(q.sampling).toEqual({ maxTokens: 5, temperature: 0.5, topP: 0.9, topK: 0, seed: 7, stop: ["END"] });
    // model "context:<id>" selects the context too
    await (
      await jsonPost(`${base}/v1/chat/completions`, {
        model: `context:${ctx.id}`,
        messages: [{ role: "user", content: "u" }],
        stream: false,
      })
    ).json();
    expect(eng.lastQuery!.contextId).toBe(ctx.id);
    const models = await j(fetch(`${base}/v1/models`));
    expect(models.data.map((m: { id: string }) => m.id)).toContain(`context:${ctx.id}`);
    // the same field in two places: one value is fine, two are a 400 naming both (never a silent pick)
    const other = "ctx_0123456789abcdef01234567";
    const ask = (extra: object) =>
      jsonPost(`${base}/v1/chat/completions`, { messages: [{ role: "user", content: "u" }], stream: false, ...extra });
    expect((await ask({ model: `context:${ctx.id}`, context_id: ctx.id, reform: { context_id: ctx.id } })).status).toBe(
      200,
    );
    expect(eng.lastQuery!.contextId).toBe(ctx.id);
    // score_background reaches the engine from either place; left out, the engine's default applies
    expect(eng.lastQuery!.scoreBackground).toBeUndefined();
    // true / false (the on|off field of earlier servers) are the default background and "off"
    await ask({ context_id: ctx.id, score_background: false });
    expect(eng.lastQuery!.scoreBackground).toBe("off");
    await ask({ reform: { context_id: ctx.id, score_background: true } });
    expect(eng.lastQuery!.scoreBackground).toBe("kth-pairs");
    await ask({ reform: { context_id: ctx.id, score_background: "mean" } });
    expect(eng.lastQuery!.scoreBackground).toBe("mean");
    // the same background spelt two ways is one answer, not a conflict
    await ask({ context_id: ctx.id, score_background: true, reform: { score_background: "kth-pairs" } });
    expect(eng.lastQuery!.scoreBackground).toBe("kth-pairs");
    for (const [extra, param] of [
      [{ context_id: ctx.id, score_background: true, reform: { score_background: false } }, "score_background"],
      [{ context_id: other, reform: { context_id: ctx.id } }, "context_id"],
      [{ context_id: ctx.id, reform: { context_id: other } }, "context_id"],
      [{ model: `context:${other}`, context_id: ctx.id }, "context_id"],
      [{ context_id: ctx.id, method: "h2o", reform: { method: "reform" } }, "method"],
      [{ context_id: ctx.id, budget: 100, reform: { budget: 200 } }, "budget"],
      [{ context_id: ctx.id, score_floor: 0, reform: { score_floor: 0.5 } }, "score_floor"],
    ] as const) {
      const err = await expectError(await ask(extra), 400, "conflicting_values");
      expect(err.param).toBe(param);
    }
  });
});

describe("sampling defaults of the model (generation_config.json, as vLLM's --generation-config auto)", () => {
  test("an OpenAI request that leaves a field out gets the model's value; one that sets it keeps its own; --generation-config openai: OpenAI's", async () => {
    const generation = { temperature: 0, topK: 5, repetitionPenalty: 1.1 };
    const auto = new FakeEngine({ generation });
    const openai = new FakeEngine({ generation });
    const a = await start(auto);
    const o = await start(openai, { generationConfig: "openai" });
    try {
      for (const [srv, eng] of [
        [a, auto],
        [o, openai],
      ] as const) {
        const ctx = await j(jsonPost(`${srv.url}/v1/contexts`, {}));
        await fetch(`${srv.url}/v1/contexts/${ctx.id}/content?final=1`, { method: "PUT", body: "abc" });
        const ask = async (extra: object) => {
          const r = await jsonPost(`${srv.url}/v1/chat/completions`, {
            model: `context:${ctx.id}`,
            messages: [{ role: "user", content: "u" }],
            max_tokens: 2,
            ...extra,
          });
          expect(r.status).toBe(200);
          await r.json();
          return eng.lastQuery!.sampling;
        };
        const left = await ask({});
        const set = await ask({ temperature: 0.7, top_k: 0, repetition_penalty: 1 });
        expect(set).toMatchObject({ temperature: 0.7, topK: 0, repetitionPenalty: 1 });
        const props = (await j(fetch(`${srv.url}/props`))).default_generation_settings;
        if (srv === a) {
          expect(left).toMatchObject({ temperature: 0, topP: 1, topK: 5, repetitionPenalty: 1.1 });
          expect(props).toMatchObject({ generation_config: "auto", temperature: 0, top_k: 5, repetition_penalty: 1.1 });
        } else {
          expect(left).toMatchObject({ temperature: 1, topP: 1, topK: 0 });
          expect(left.repetitionPenalty).toBeUndefined();
          expect(props).toMatchObject({ generation_config: "openai", temperature: 1, top_k: 0, repetition_penalty: 1 });
        }
        // the native query API keeps its own documented default (greedy), whatever the model says
        await (
          await jsonPost(`${srv.url}/v1/contexts/${ctx.id}/query`, { question: "q", max_tokens: 2, stream: false })
        ).json();
        expect(eng.lastQuery!.sampling).toMatchObject({ temperature: 0, topK: 0 });
      }
    } finally {
      await a.stop();
      await o.stop();
    }
  });
});

describe("health while loading / failed", () => {
  test("503 while loading, 200 once ready, 503 with reason when failed", async () => {
    const eng = new FakeEngine({ state: "loading" });
    const srv = await start(eng);
    try {
      const h = await fetch(`${srv.url}/health`);
      expect(h.status).toBe(503);
      expect((await j(h)).status).toBe("loading");
      await expectError(await jsonPost(`${srv.url}/v1/contexts`, {}), 503, "model_loading");
      expect((await fetch(`${srv.url}/metrics`)).status).toBe(200);
      eng.st = "ready";
      expect((await fetch(`${srv.url}/health`)).status).toBe(200);
      eng.st = "failed";
      eng.err = "weights missing";
      const f = await fetch(`${srv.url}/health`);
      expect(f.status).toBe(503);
      expect(await f.json()).toEqual({ status: "failed", reason: "weights missing" });
    } finally {
      await srv.stop();
    }
  });
});

describe("cross-origin access", () => {
  test("off by default: no CORS headers, preflights fail; --cors-origin names the origins that may call", async () => {
    const closed = await start(new FakeEngine(), {});
    const open = await start(new FakeEngine(), { corsOrigin: "http://app.example, http://other.example" });
    try {
      const preflight = (url: string, origin: string) =>
        fetch(`${url}/v1/chat/completions`, {
          method: "OPTIONS",
          headers: { origin, "access-control-request-method": "POST" },
        });
      const p0 = await preflight(closed.url, "http://evil.example");
      expect(p0.headers.get("access-control-allow-origin")).toBeNull();
      expect(p0.status).toBeGreaterThanOrEqual(400);
      const g0 = await fetch(`${closed.url}/v1/models`, { headers: { origin: "http://evil.example" } });
      expect(g0.headers.get("access-control-allow-origin")).toBeNull();

      const p1 = await preflight(open.url, "http://app.example");
      expect(p1.status).toBeLessThan(300);
      expect(p1.headers.get("access-control-allow-origin")).toBe("http://app.example");
      const p2 = await preflight(open.url, "http://evil.example");
      expect(p2.headers.get("access-control-allow-origin")).toBeNull();
    } finally {
      await closed.stop();
      await open.stop();
    }
  });

  test("the official openai JS client passes the preflight from an allowed origin (its x-stainless-* headers)", async () => {
    const srv = await start(new FakeEngine(), { apiKey: "k", corsOrigin: "http://chat.example" });
    // what a browser sends before `new OpenAI({baseURL, dangerouslyAllowBrowser: true}).chat.completions.create(...)`:
    // the client's non-safelisted request headers, lower-cased and sorted as the Fetch standard says
    const requested = [
      "authorization",
      "content-type",
      "x-stainless-arch",
      "x-stainless-helper-method",
      "x-stainless-lang",
      "x-stainless-os",
      "x-stainless-package-version",
      "x-stainless-retry-count",
      "x-stainless-runtime",
      "x-stainless-runtime-version",
      "x-stainless-timeout",
    ].join(",");
    try {
      const preflight = (origin: string) =>
        fetch(`${srv.url}/v1/chat/completions`, {
          method: "OPTIONS",
          headers: { origin, "access-control-request-method": "POST", "access-control-request-headers": requested },
        });
      const ok = await preflight("http://chat.example");
      expect(ok.status).toBeLessThan(300);
      expect(ok.headers.get("access-control-allow-origin")).toBe("http://chat.example");
      expect(ok.headers.get("access-control-allow-methods")).toContain("POST");
      const allowed = (ok.headers.get("access-control-allow-headers") ?? "").toLowerCase().split(/\s*,\s*/);
      for (const h of requested.split(",")) expect(allowed).toContain(h);
      // the answer differs per requested headers, so caches must key on them
      expect(ok.headers.get("vary")?.toLowerCase()).toContain("access-control-request-headers");
      // another origin still gets no permission, whatever it asks for
      expect((await preflight("http://evil.example")).headers.get("access-control-allow-origin")).toBeNull();
      // and the actual request with those headers is answered with the origin allowed
      const res = await fetch(`${srv.url}/v1/models`, {
        headers: { origin: "http://chat.example", authorization: "Bearer k", "x-stainless-lang": "js" },
      });
      expect(res.status).toBe(200);
      expect(res.headers.get("access-control-allow-origin")).toBe("http://chat.example");
    } finally {
      await srv.stop();
    }
  });
});

describe("api key", () => {
  test("401 without/with a wrong key, /health open, works with the key", async () => {
    const eng = new FakeEngine();
    const srv = await start(eng, { apiKey: "s3cret", corsOrigin: "http://x" });
    try {
      expect((await fetch(`${srv.url}/health`)).status).toBe(200);
      // the documented alternative header for clients that cannot send Authorization
      expect((await fetch(`${srv.url}/v1/models`, { headers: { "x-api-key": "s3cret" } })).status).toBe(200);
      await expectError(await fetch(`${srv.url}/v1/contexts`), 401, "missing_api_key");
      await expectError(
        await fetch(`${srv.url}/v1/models`, { headers: { authorization: "Bearer nope" } }),
        401,
        "invalid_api_key",
      );
      await expectError(await fetch(`${srv.url}/metrics`), 401);
      const ok = await fetch(`${srv.url}/v1/models`, { headers: { authorization: "Bearer s3cret" } });
      expect(ok.status).toBe(200);
      const pre = await fetch(`${srv.url}/v1/chat/completions`, {
        method: "OPTIONS",
        headers: { origin: "http://x", "access-control-request-method": "POST" },
      });
      expect(pre.status).toBeLessThan(300);
    } finally {
      await srv.stop();
    }
  });

  test("REFORM_API_KEY from the environment reaches the app through the config", async () => {
    const modelDir = mkdtempSync(join(tmpdir(), "reform-fake-model-"));
    writeFileSync(join(modelDir, "config.json"), "{}");
    const cfg = resolveConfig(["--model", modelDir, "--port", "0"], { REFORM_API_KEY: "envkey" });
    if (cfg.help) throw new Error("unexpected help");
    const srv = await startServer({ ...cfg, dataDir, engineClient: new FakeEngine(), log: quiet });
    try {
      await expectError(await fetch(`${srv.url}/v1/models`), 401);
      expect((await fetch(`${srv.url}/v1/models`, { headers: { authorization: "Bearer envkey" } })).status).toBe(200);
    } finally {
      await srv.stop();
      rmSync(modelDir, { recursive: true, force: true });
    }
  });
});
