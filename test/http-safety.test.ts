/**
 * Safety of the real server (tiny random model, CPU): one writer per context, bounded recompute prompts,
 * cancellation by DELETE, no silent model fallback, and the smaller OpenAI conformance rules.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import { startServer } from "../src/server.ts";
import { TINY_EOS_ID, TINY_EOT_ID } from "./fixtures/tiny-model.ts";
import {
  collectSse,
  createContext,
  expectError,
  j,
  jsonPost,
  pieceStream,
  uploadContext,
  waitFor,
} from "./helpers/http.ts";
import { startTestServer, type TestServer } from "./helpers/server.ts";

const T = 120_000;
let root: string;
let srv: TestServer;
let base: string;
let modelDir: string;
const enc = new TextEncoder();
const noEnd = { [TINY_EOS_ID]: -100, [TINY_EOT_ID]: -100 };

function words(n: number, seed: number): string {
  const w = ["alpha", "beta", "gamma", "delta", "fox", "river", "stone", "cloud", "lamp", "seven"];
  let x = seed;
  const out: string[] = [];
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) & 0x7fffffff;
    out.push(w[x % w.length]!);
  }
  return out.join(" ");
}

beforeAll(async () => {
  // an 8192-token window: the cancellation tests need answers of thousands of tokens to still be running
  srv = await startTestServer({
    name: "safety",
    modelOptions: { maxPositions: 8192 },
    flags: ["--served-name", "tiny-reform", "--chunk-size", "32", "--max-h2o-tokens", "2000"],
  });
  base = srv.url;
  root = srv.root;
  modelDir = srv.modelDir;
}, T);

afterAll(() => srv?.stop());

describe("one writer per context", () => {
  test(
    "a second upload while one is open gets 409 context_busy; the stored tokens are the first upload's alone",
    async () => {
      const id = await createContext(base);
      const c1 = words(3000, 1) + " ";
      const c2 = words(3000, 2) + " ";
      // the first upload trickles in (~2.5 s), so it is still open when the second one has waited out the server's
      // grace for a writer that is about to end (routes/contexts.ts WRITER_GRACE_MS)
      const first = fetch(`${base}/v1/contexts/${id}/content`, {
        method: "PUT",
        body: pieceStream(enc.encode(c1), [256], 30),
        headers: { "content-type": "text/plain" },
      });
      await waitFor(async () => (await j(fetch(`${base}/v1/contexts/${id}`))).bytes_received > 0);
      await expectError(
        await fetch(`${base}/v1/contexts/${id}/content`, {
          method: "PUT",
          body: c2,
          headers: { "content-type": "text/plain" },
        }),
        409,
        "context_busy",
      );
      await expectError(await fetch(`${base}/v1/contexts/${id}/finalize`, { method: "POST" }), 409, "context_busy");
      expect((await first).status).toBe(200);
      expect((await fetch(`${base}/v1/contexts/${id}/finalize`, { method: "POST" })).status).toBe(200);
      const info = await j(fetch(`${base}/v1/contexts/${id}`));
      expect(info.bytes_received).toBe(enc.encode(c1).byteLength);
      expect(info.tokens_received).toBe((await srv.engine.tokenize(c1)).length);
      // after it closed, the context takes the next upload
      const next = await fetch(`${base}/v1/contexts/${id}/content`, {
        method: "PUT",
        body: "more",
        headers: { "content-type": "text/plain" },
      });
      expect(next.status).toBe(200);
    },
    T,
  );

  test(
    "a resume sent the moment a client drops: stored after the dropped upload, or refused with the offset that stays",
    async () => {
      const { hostname, port } = new URL(base);
      for (let round = 0; round < 6; round++) {
        const id = await createContext(base);
        const n = 20_001;
        // another process writes a chunked upload without its last chunk and closes, as a dropped client does
        const drop = Bun.spawn(
          [
            process.execPath,
            "-e",
            `const s = require("node:net").connect(${port}, "${hostname}", () => {
              s.write("PUT /v1/contexts/${id}/content HTTP/1.1\\r\\nHost: x\\r\\ncontent-type: text/plain\\r\\n" +
                "transfer-encoding: chunked\\r\\n\\r\\n${n.toString(16)}\\r\\n" + "a".repeat(${n}) + "\\r\\n", () => s.destroy());
            });`,
          ],
          { stdout: "ignore", stderr: "inherit" },
        );
        await drop.exited;
        // at once, the resume from where the dropped upload stopped
        const res = await fetch(`${base}/v1/contexts/${id}/content?offset=${n}&final=true`, {
          method: "PUT",
          body: "b",
          headers: { "content-type": "text/plain" },
        });
        if (res.status === 200) {
          expect((await j(res)).bytes_received).toBe(n + 1);
          continue;
        }
        // Bun may drop a closed connection's unread body: then the advice must be right and stay right (no
        // context_busy, and no late write that would make a resume from the named offset duplicate text)
        const err = await expectError(res, 409, "offset_mismatch");
        const named = Number(/has (\d+) bytes/.exec(err.message ?? "")?.[1]);
        await Bun.sleep(600);
        expect((await j(fetch(`${base}/v1/contexts/${id}`))).bytes_received).toBe(named);
      }
    },
    T,
  );
});

describe("recompute prompt length", () => {
  test(
    "a prompt over max_model_len is refused with 400 context_length_exceeded before any model work",
    async () => {
      const limit = srv.engine.modelInfo()!.defaults.maxModelLen;
      const promptBefore = srv.engine.metrics().promptTokensTotal;
      const long = words(limit + 100, 3);
      for (const [path, body] of [
        ["/v1/chat/completions", { messages: [{ role: "user", content: long }], max_tokens: 4 }],
        ["/v1/completions", { prompt: long, max_tokens: 4 }],
      ] as const) {
        // inline REFORM turned off: without the switch such a request is answered by REFORM (test/inline.test.ts)
        const e = await expectError(
          await jsonPost(`${base}${path}`, body, { "x-reform-inline": "off" }),
          400,
          "context_length_exceeded",
        );
        expect(e.message).toContain(String(limit));
        expect(e.param).toBe(path === "/v1/completions" ? "prompt" : "messages");
      }
      const id = await uploadContext(base, words(400, 4));
      const q = await expectError(
        await jsonPost(`${base}/v1/contexts/${id}/query`, { question: long, max_tokens: 4, stream: false }),
        400,
        "context_length_exceeded",
      );
      expect(q.type).toBe("invalid_request_error");
      expect(q.param).toBe("question"); // the field the request used
      // refused before any model work: no recompute prompt was started
      await Bun.sleep(100);
      expect(srv.engine.metrics().promptTokensTotal).toBe(promptBefore);
    },
    T,
  );
});

describe("cancellation", () => {
  test(
    "DELETE during a streamed upload stops its compression at the next chunk; the upload answers 410 context_deleted",
    async () => {
      const id = await createContext(base);
      const big = enc.encode(words(60_000, 5));
      const up = fetch(`${base}/v1/contexts/${id}/content`, {
        method: "PUT",
        body: big,
        headers: { "content-type": "text/plain" },
      });
      await waitFor(async () => (await j(fetch(`${base}/v1/contexts/${id}`))).tokens_processed > 0, 60_000);
      const del = await fetch(`${base}/v1/contexts/${id}`, { method: "DELETE" });
      expect(del.status).toBe(200);
      await expectError(await up, 410, "context_deleted");
      // nothing of it is compressed any more
      const settled = srv.engine.metrics().tokensProcessedTotal;
      await Bun.sleep(400);
      expect(srv.engine.metrics().tokensProcessedTotal).toBe(settled);
      await expectError(await fetch(`${base}/v1/contexts/${id}`), 404, "context_not_found");
    },
    T,
  );

  test(
    "DELETE during a streamed query ends the stream with a context_deleted error event",
    async () => {
      const id = await uploadContext(base, words(600, 6));
      const res = await jsonPost(`${base}/v1/contexts/${id}/query`, {
        question: "fox?",
        max_tokens: 4000,
        temperature: 1,
        seed: 1,
        logit_bias: noEnd,
      });
      expect(res.status).toBe(200);
      const events: { event?: string; data: string }[] = [];
      let deleted = false;
      const { sseEvents } = await import("./helpers/http.ts");
      for await (const e of sseEvents(res)) {
        events.push(e);
        if (!deleted && e.event === "token") {
          deleted = true;
          expect((await fetch(`${base}/v1/contexts/${id}`, { method: "DELETE" })).status).toBe(200);
        }
      }
      const err = events.find((e) => e.event === "error");
      expect(err).toBeDefined();
      expect(JSON.parse(err!.data).error.code).toBe("context_deleted");
      expect(events.some((e) => e.event === "finish")).toBe(false);
    },
    T,
  );

  test(
    "h2o over its documented limit is refused with a 400 that names the alternative; under it, progress is streamed",
    async () => {
      const big = await uploadContext(base, words(2600, 7));
      const e = await expectError(
        await jsonPost(`${base}/v1/contexts/${big}/query`, { question: "x?", method: "h2o", max_tokens: 2 }),
        400,
        "context_too_long",
      );
      expect(e.message).toContain("reform");
      const small = await uploadContext(base, words(300, 8));
      const evs = await collectSse(
        await jsonPost(`${base}/v1/contexts/${small}/query`, {
          question: "x?",
          method: "h2o",
          max_tokens: 2,
          budget: 64,
        }),
      );
      const progress = evs.filter((x) => x.event === "progress").map((x) => JSON.parse(x.data));
      expect(progress.length).toBeGreaterThan(0);
      expect(progress.at(-1).done).toBe(progress.at(-1).total);
      expect(evs.findIndex((x) => x.event === "start")).toBeGreaterThan(evs.findIndex((x) => x.event === "progress"));
    },
    T,
  );
});

describe("no silent fallbacks, OpenAI conformance", () => {
  test(
    "unknown model names are 404 model_not_found (invalid_request_error); the served name, its alias and context:<id> work",
    async () => {
      // a context named by the model that does not exist is an unknown model too (param "model", not "context_id")
      for (const model of ["gpt-4", "ctx_0123456789abcdef01234567", "context:ctx_0123456789abcdef01234567"]) {
        const e = await expectError(
          await jsonPost(`${base}/v1/chat/completions`, {
            model,
            messages: [{ role: "user", content: "hi" }],
            max_tokens: 1,
          }),
          404,
          "model_not_found",
        );
        expect(e.type).toBe("invalid_request_error");
        expect(e.param).toBe("model");
      }
      const id = await uploadContext(base, words(50, 9));
      for (const model of ["tiny-reform", "reform", `context:${id}`]) {
        const r = await jsonPost(`${base}/v1/chat/completions`, {
          model,
          messages: [{ role: "user", content: "hi" }],
          max_tokens: 1,
        });
        expect(r.status).toBe(200);
      }
    },
    T,
  );

  test(
    "refused as OpenAI refuses them: null user content, more than 4 stops, stream_options without stream",
    async () => {
      const m = [{ role: "user", content: "hi" }];
      const nul = await expectError(
        await jsonPost(`${base}/v1/chat/completions`, { messages: [{ role: "user", content: null }] }),
        400,
      );
      expect(nul.param).toBe("messages.0.content");
      const stops = await expectError(
        await jsonPost(`${base}/v1/chat/completions`, { messages: m, stop: ["a", "b", "c", "d", "e"] }),
        400,
      );
      expect(stops.param).toBe("stop");
      const so = await expectError(
        await jsonPost(`${base}/v1/chat/completions`, { messages: m, stream_options: { include_usage: true } }),
        400,
      );
      expect(so.param).toBe("stream_options");
      // an assistant turn without content (it called tools) is fine
      const ok = await jsonPost(`${base}/v1/chat/completions`, {
        messages: [{ role: "assistant", content: null }, ...m],
        max_tokens: 1,
      });
      expect(ok.status).toBe(200);
    },
    T,
  );

  test(
    "one rule per limit: max_tokens names the server's maximum; budget 0 and 4 get the same answer",
    async () => {
      const max = srv.engine.modelInfo()!.defaults.maxNewTokens;
      const mt = await expectError(
        await jsonPost(`${base}/v1/chat/completions`, {
          messages: [{ role: "user", content: "hi" }],
          max_tokens: max + 1,
        }),
        400,
        "max_tokens_too_large",
      );
      expect(mt.message).toContain(String(max));
      // far over the window too: refused for max_tokens, not routed to inline REFORM (which had no room left)
      for (const path of ["/v1/chat/completions", "/v1/completions"]) {
        const body =
          path === "/v1/completions"
            ? { prompt: "hi", max_tokens: 100_000 }
            : { messages: [{ role: "user", content: "hi" }], max_tokens: 100_000 };
        const big = await expectError(await jsonPost(`${base}${path}`, body), 400, "max_tokens_too_large");
        expect(big.message).toContain(String(max));
        expect(big.param).toBe("max_tokens");
      }
      const id = await uploadContext(base, words(50, 10));
      const a = await expectError(await jsonPost(`${base}/v1/contexts/${id}/query`, { question: "q", budget: 0 }), 400);
      const b = await expectError(await jsonPost(`${base}/v1/contexts/${id}/query`, { question: "q", budget: 4 }), 400);
      expect([a.code, a.param, a.message]).toEqual([b.code, b.param, b.message]);
    },
    T,
  );

  test(
    "a finalized empty context cannot be queried (409 context_empty)",
    async () => {
      const id = await createContext(base);
      expect((await fetch(`${base}/v1/contexts/${id}/finalize`, { method: "POST" })).status).toBe(200);
      await expectError(await jsonPost(`${base}/v1/contexts/${id}/query`, { question: "q" }), 409, "context_empty");
    },
    T,
  );

  test(
    "a non-stream query whose client goes away counts in reform_queries_aborted_total",
    async () => {
      const id = await uploadContext(base, words(300, 11));
      const metric = async () =>
        Number(/reform_queries_aborted_total (\d+)/.exec(await (await fetch(`${base}/metrics`)).text())?.[1] ?? "0");
      const before = await metric();
      const generated = srv.engine.metrics().tokensGeneratedTotal;
      const ac = new AbortController();
      const p = fetch(`${base}/v1/contexts/${id}/query`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        // end-of-text banned, so the answer is still being generated when the client leaves
        body: JSON.stringify({
          question: "q",
          stream: false,
          max_tokens: 4000,
          temperature: 1,
          seed: 2,
          logit_bias: noEnd,
        }),
        signal: ac.signal,
      }).catch(() => null);
      // abort once this query is generating (earlier tests generated tokens too)
      await waitFor(() => srv.engine.metrics().tokensGeneratedTotal > generated, 30_000);
      ac.abort();
      await p;
      await waitFor(async () => (await metric()) === before + 1, 20_000);
    },
    T,
  );

  test(
    "max_model_len beyond the trained window: refused at start naming the numbers, unless --allow-beyond-window",
    async () => {
      const opts = { modelDir, port: 0, apiKey: "", backend: "cpu" as const, log: () => {} };
      const bad = await startServer({ ...opts, dataDir: join(root, "data-beyond"), defaults: { maxModelLen: 16384 } });
      try {
        await expect(bad.engine.ready()).rejects.toThrow(
          /max_model_len 16384 exceeds the trained window of 8192 tokens/,
        );
        const h = await fetch(`${bad.url}/health`);
        expect(h.status).toBe(503);
        expect(((await h.json()) as { reason: string }).reason).toContain("--allow-beyond-window");
        await expectError(await fetch(`${bad.url}/props`), 503, "engine_failed");
      } finally {
        await bad.stop();
      }
      const ok = await startServer({
        ...opts,
        dataDir: join(root, "data-beyond-ok"),
        defaults: { maxModelLen: 16384 },
        allowBeyondWindow: true,
      });
      try {
        await ok.engine.ready();
        const p = (await (await fetch(`${ok.url}/props`)).json()) as { limits: unknown };
        expect(p.limits).toMatchObject({ trained_window: 8192, max_model_len: 16384, allow_beyond_window: true });
      } finally {
        await ok.stop();
      }
    },
    T,
  );

  test(
    "a default budget above the maximum budget is a start-up error, not a silent cap",
    async () => {
      const s = await startServer({
        modelDir,
        dataDir: join(root, "data-bad"),
        port: 0,
        apiKey: "",
        backend: "cpu",
        log: () => {},
        defaults: { budget: 5000, maxBudget: 2000 },
      });
      try {
        await expect(s.engine.ready()).rejects.toThrow(/budget 5000 exceeds the maximum budget 2000/);
      } finally {
        await s.stop();
      }
    },
    T,
  );
});

describe("shutdown", () => {
  test(
    "stopping the server during an upload stops it at the next chunk; the upload is answered 503 shutting_down with the stored bytes, which stay, and it resumes",
    async () => {
      const dataDir = join(root, "data-shutdown");
      const opts = {
        modelDir,
        dataDir,
        port: 0,
        apiKey: "",
        backend: "cpu" as const,
        log: () => {},
        defaults: { chunkSize: 32 },
      };
      let s2 = await startServer(opts);
      await s2.engine.ready();
      const big = enc.encode(words(60_000, 21));
      const id = (await j(jsonPost(`${s2.url}/v1/contexts`, {}))).id as string;
      const up = fetch(`${s2.url}/v1/contexts/${id}/content`, {
        method: "PUT",
        body: big,
        headers: { "content-type": "text/plain" },
      });
      await waitFor(async () => (await j(fetch(`${s2.url}/v1/contexts/${id}`))).tokens_processed > 0, 60_000);
      const t0 = performance.now();
      await s2.stop();
      const stopMs = performance.now() - t0;
      expect(stopMs).toBeLessThan(3000); // one step, not the rest of the upload's piece
      // the upload is answered before the sockets close: where to resume from
      const err = await expectError(await up, 503, "shutting_down");
      const named = Number(/(\d+) bytes/.exec(err.message ?? "")?.[1]);
      // back up on the same data: what was stored is there, and the upload resumes from it
      s2 = await startServer(opts);
      try {
        await s2.engine.ready();
        const info = await j(fetch(`${s2.url}/v1/contexts/${id}`));
        expect(info.bytes_received).toBeGreaterThan(0);
        expect(info.bytes_received).toBeLessThan(big.byteLength);
        expect(info.bytes_received).toBe(named);
        expect(info.state).not.toBe("failed");
        const rest = await fetch(`${s2.url}/v1/contexts/${id}/content?final=1&offset=${info.bytes_received}`, {
          method: "PUT",
          body: big.slice(info.bytes_received),
          headers: { "content-type": "text/plain" },
        });
        expect(rest.status).toBe(200);
        const done = await j(rest);
        expect(done.bytes_received).toBe(big.byteLength);
        expect(done.state).toBe("ready");
        expect(done.tokens_processed).toBe(done.tokens_received);
      } finally {
        await s2.stop();
      }
    },
    T,
  );
});
