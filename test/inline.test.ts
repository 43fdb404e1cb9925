/**
 * Inline REFORM over HTTP with the official `openai` client, on a random-weight model with a 2048-token window
 * (test/fixtures/tiny-model.ts): a ~200K-token document sent inside the messages is answered by REFORM (header and
 * extension field say so), a second question on it is a prefix-cache hit and much faster, the next chat turn
 * extends the cached context by its new tokens only, identical requests in flight share one compression, API keys
 * (owners) never share a context, the off switches, progress events, /v1/models names, and the count / disk /
 * memory bounds under many distinct documents. Answer quality needs a trained model: bench/inline.ts.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import OpenAI from "openai";
import type { QueryEvent } from "../src/engine/api.ts";
import { expectError, j, jsonPost } from "./helpers/http.ts";
import { startTestServer, type TestServer } from "./helpers/server.ts";

const T = 240_000;
const MAX_CONTEXTS = 4;
const MAX_INLINE_DISK = 12_000_000;
const MEMO_TOKENS = 300_000;
let srv: TestServer;
let base: string;
let client: OpenAI;

// biome-ignore lint/suspicious/noExplicitAny: tests read response bodies loosely typed
type Json = any;

const WORDS = "alpha beta gamma delta river stone cloud paper seven orange window garden silver market lantern".split(
  " ",
);

/** A document of about `chars` characters, different for each seed. */
function documentOf(chars: number, seed: number): string {
  let s = `Document ${seed}.\n`;
  let i = seed * 7919;
  while (s.length < chars) {
    s += WORDS[(i * 7 + (i >> 3) + seed) % WORDS.length] + (i % 13 === 12 ? ".\n" : " ");
    i++;
  }
  return s.trimEnd();
}

function inlineHeader(h: Headers): Record<string, string> | null {
  const v = h.get("x-reform-inline");
  if (!v) return null;
  return Object.fromEntries(v.split(";").map((p) => p.trim().split("=") as [string, string]));
}

async function metric(name: string): Promise<number> {
  const text = await (await fetch(`${base}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  return line ? Number(line.split(" ")[1]) : Number.NaN;
}

beforeAll(async () => {
  srv = await startTestServer({
    name: "inline",
    modelOptions: { maxPositions: 2048 },
    flags: ["--inline-max-contexts", String(MAX_CONTEXTS), "--inline-max-disk-bytes", String(MAX_INLINE_DISK)],
    options: { defaults: { inlineMemoTokens: MEMO_TOKENS }, sseHeartbeatSec: 1 },
  });
  base = srv.url;
  client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "unused", maxRetries: 0 });
}, T);

afterAll(() => srv?.stop());

describe("a long document inline through the openai client", () => {
  const doc = documentOf(250_000, 1);
  let first: Json;
  let firstMs = 0;

  test(
    "is answered by REFORM: header and extension field name the context and the gathered tokens",
    async () => {
      const tokens = (await srv.engine.tokenize(doc)).length;
      expect(tokens).toBeGreaterThan(180_000);
      const t0 = performance.now();
      const { data, response } = await client.chat.completions
        .create({
          model: "reform",
          messages: [{ role: "user", content: `${doc}\n\nWhich word comes after the first river?` }],
          max_tokens: 4,
          temperature: 0,
        })
        .withResponse();
      firstMs = performance.now() - t0;
      first = data;
      const h = inlineHeader(response.headers);
      expect(h).not.toBeNull();
      expect(h!.cache).toBe("miss");
      const ext = (data as Json).reform.inline;
      expect(h!.context_id).toBe(ext.context_id);
      expect(response.headers.get("x-reform-context-id")).toBe(ext.context_id);
      const d = srv.engine.modelInfo()!.defaults;
      expect(ext.gathered_tokens).toBe(d.budget);
      expect(Number(h!.gathered_tokens)).toBe(d.budget);
      expect(ext.context_tokens).toBeGreaterThan(tokens - 50);
      expect(ext.question_tokens).toBeLessThanOrEqual(d.maxQueryTokens);
      expect(data.choices[0]!.message.role).toBe("assistant");
      expect(data.usage!.prompt_tokens).toBeLessThanOrEqual(d.maxModelLen);
      // the implicit context is the server's cache: a client's append or finalize would change (or block) what it
      // answers others with, so both are refused and the context stays as it was
      const id = ext.context_id as string;
      const before = await (await fetch(`${base}/v1/contexts/${id}`)).json();
      for (const [path, init] of [
        [`/v1/contexts/${id}/content?final=true`, { method: "PUT", body: " The secret number of x is 5555555." }],
        [`/v1/contexts/${id}/content`, { method: "POST", body: "more" }],
        [`/v1/contexts/${id}/finalize`, { method: "POST" }],
      ] as const) {
        const r = await fetch(`${base}${path}`, init);
        expect(r.status).toBe(409);
        expect(((await r.json()) as Json).error).toMatchObject({ code: "context_read_only", param: "id" });
      }
      expect(await (await fetch(`${base}/v1/contexts/${id}`)).json()).toEqual(before);
    },
    T,
  );

  test(
    "a second question on the same document is a prefix-cache hit, much faster",
    async () => {
      const t0 = performance.now();
      const { data, response } = await client.chat.completions
        .create({
          model: "reform",
          messages: [{ role: "user", content: `${doc}\n\nHow many gardens are there?` }],
          max_tokens: 4,
          temperature: 0,
        })
        .withResponse();
      const secondMs = performance.now() - t0;
      console.log(`inline: first ${firstMs.toFixed(0)} ms, second ${secondMs.toFixed(0)} ms`);
      expect(inlineHeader(response.headers)!.cache).toBe("hit");
      expect((data as Json).reform.inline.context_id).toBe(first.reform.inline.context_id);
      expect((data as Json).reform.inline.appended_tokens).toBe(0);
      expect(secondMs * 10).toBeLessThan(firstMs);
    },
    T,
  );

  test(
    "the next turn resends document and history and appends only its new tokens",
    async () => {
      const messages = [
        { role: "user" as const, content: `${doc}\n\nWhich word comes after the first river?` },
        { role: "assistant" as const, content: first.choices[0].message.content || "stone" },
        { role: "user" as const, content: "And after the second one?" },
      ];
      const { data, response } = await client.chat.completions
        .create({ model: "reform", messages, max_tokens: 4, temperature: 0 })
        .withResponse();
      const ext = (data as Json).reform.inline;
      expect(inlineHeader(response.headers)!.cache).toBe("extend");
      expect(ext.context_id).toBe(first.reform.inline.context_id);
      expect(ext.appended_tokens).toBeGreaterThan(0);
      expect(ext.appended_tokens).toBeLessThan(100);
      // and the turn after that, streamed
      const stream = await client.chat.completions.create({
        model: "reform",
        messages: [
          ...messages,
          { role: "assistant", content: data.choices[0]!.message.content || "x" },
          { role: "user", content: "Thanks. One more?" },
        ],
        max_tokens: 4,
        temperature: 0,
        stream: true,
      });
      const chunks: Json[] = [];
      for await (const c of stream) chunks.push(c);
      expect(chunks[0].reform.inline.cache).toBe("extend");
      expect(chunks[0].reform.inline.appended_tokens).toBeLessThan(100);
      expect(chunks.at(-1).choices[0].finish_reason).toBeTruthy();
      expect(await metric("reform_inline_extends_total")).toBe(2);
      expect(await metric("reform_inline_hits_total")).toBe(1);
    },
    T,
  );
});

describe("rules", () => {
  const doc = documentOf(12_000, 2);

  test(
    "a request that fits the window keeps today's path; the off switches refuse what does not fit",
    async () => {
      const small = await jsonPost(`${base}/v1/chat/completions`, {
        messages: [{ role: "user", content: "hello" }],
        max_tokens: 2,
      });
      expect(small.status).toBe(200);
      expect(small.headers.get("x-reform-inline")).toBeNull();
      expect(((await small.json()) as Json).reform.inline).toBeUndefined();
      const long = { messages: [{ role: "user", content: doc }], max_tokens: 2 };
      await expectError(
        await jsonPost(`${base}/v1/chat/completions`, long, { "x-reform-inline": "off" }),
        400,
        "context_length_exceeded",
      );
      await expectError(
        await jsonPost(`${base}/v1/chat/completions`, { ...long, reform: { inline: false } }),
        400,
        "context_length_exceeded",
      );
    },
    T,
  );

  test(
    "/v1/completions: a long raw prompt, its last paragraph the question",
    async () => {
      const res = await jsonPost(`${base}/v1/completions`, {
        prompt: `${doc}\n\nQuestion: which word comes first?\nAnswer:`,
        max_tokens: 2,
        temperature: 0,
      });
      expect(res.status).toBe(200);
      const body = (await res.json()) as Json;
      expect(body.object).toBe("text_completion");
      expect(body.reform.inline.cache).toBe("miss");
      expect(body.reform.inline.question_tokens).toBeLessThanOrEqual(srv.engine.modelInfo()!.defaults.maxQueryTokens);
    },
    T,
  );

  test(
    "streams: progress as comments, or as `event: progress` when asked; kept-alive JSON starts at once",
    async () => {
      const ask = (seed: number, headers: Record<string, string>, stream: boolean) =>
        jsonPost(
          `${base}/v1/chat/completions`,
          { messages: [{ role: "user", content: documentOf(12_000, seed) }], max_tokens: 2, stream },
          headers,
        );
      const plain = await (await ask(3, {}, true)).text();
      expect(plain).toContain(": progress compress ");
      expect(plain).not.toContain("event: progress");
      const withEvents = await (await ask(4, { "x-reform-progress": "on" }, true)).text();
      expect(withEvents).toContain("event: progress");
      const ev = withEvents.split("\n\n").find((b) => b.startsWith("event: progress"))!;
      const data = JSON.parse(ev.split("\n")[1]!.slice("data: ".length));
      expect(data).toMatchObject({ object: "reform.progress", stage: "compress" });
      expect(data.total).toBeGreaterThan(1000);
      const res = await ask(5, {}, false);
      expect(res.headers.get("x-reform-inline")).toContain("cache=miss");
      const text = await res.text();
      expect(text.startsWith("\n")).toBe(true); // sent before the compression ended
      expect(JSON.parse(text).object).toBe("chat.completion");
    },
    T,
  );

  test(
    "identical requests in flight share one compression",
    async () => {
      const body = { messages: [{ role: "user", content: `${documentOf(16_000, 6)}\n\nQ?` }], max_tokens: 2 };
      const [a, b] = await Promise.all([
        jsonPost(`${base}/v1/chat/completions`, body),
        jsonPost(`${base}/v1/chat/completions`, body),
      ]);
      const [ja, jb] = [JSON.parse(await a.text()), JSON.parse(await b.text())];
      expect(ja.reform.inline.context_id).toBe(jb.reform.inline.context_id);
      expect([ja.reform.inline.cache, jb.reform.inline.cache].sort()).toEqual(["miss", "shared"]);
      expect(await metric("reform_inline_shared_total")).toBe(1);
    },
    T,
  );

  test(
    "owners (API keys) never share an implicit context",
    async () => {
      const prompt = documentOf(12_000, 7);
      const first = async (owner: string) => {
        const it = srv.engine.query({
          prompt,
          method: "reform",
          sampling: { maxTokens: 1, temperature: 0, topP: 1, topK: 0, stop: [] },
          inline: { owner },
        });
        let info: Extract<QueryEvent, { type: "inline" }> | null = null;
        for await (const ev of it) if (ev.type === "inline") info = ev;
        return info!;
      };
      const a = await first("owner-a");
      const b = await first("owner-b");
      const a2 = await first("owner-a");
      expect(a.cache).toBe("miss");
      expect(b.cache).toBe("miss");
      expect(b.contextId).not.toBe(a.contextId);
      expect(b.key).not.toBe(a.key);
      expect(a2).toMatchObject({ cache: "hit", contextId: a.contextId });
    },
    T,
  );

  test(
    "/v1/models lists uploaded contexts with their names, not the implicit ones",
    async () => {
      const ctx = await j(jsonPost(`${base}/v1/contexts`, { metadata: { name: "handbook" } }));
      const up = await fetch(`${base}/v1/contexts/${ctx.id}/content?final=true`, {
        method: "PUT",
        body: "The handbook says hello.",
        headers: { "content-type": "text/plain" },
      });
      expect(up.status).toBe(200);
      const models = await j(fetch(`${base}/v1/models`));
      const entry = models.data.find((m: Json) => m.id === `context:${ctx.id}`);
      expect(entry).toMatchObject({ name: "handbook", context_id: ctx.id });
      const inlineIds = (await j(fetch(`${base}/v1/contexts`))).data
        .filter((c: Json) => c.metadata?.inline === true)
        .map((c: Json) => `context:${c.id}`);
      expect(inlineIds.length).toBeGreaterThan(0);
      expect(models.data.some((m: Json) => inlineIds.includes(m.id))).toBe(false);
      await fetch(`${base}/v1/contexts/${ctx.id}`, { method: "DELETE" });
    },
    T,
  );

  test(
    "many distinct documents: count, disk and memory stay within their bounds (least recently used go first)",
    async () => {
      for (let seed = 100; seed < 108; seed++) {
        const res = await jsonPost(`${base}/v1/chat/completions`, {
          messages: [{ role: "user", content: `${documentOf(12_000, seed)}\n\nQ?` }],
          max_tokens: 1,
        });
        expect(res.status).toBe(200);
        await res.text();
        expect(await metric("reform_inline_contexts")).toBeLessThanOrEqual(MAX_CONTEXTS);
        expect(await metric("reform_inline_disk_bytes")).toBeLessThanOrEqual(MAX_INLINE_DISK);
        expect(await metric("reform_inline_memo_bytes")).toBeLessThanOrEqual(MEMO_TOKENS * 4 + 64 * 80);
      }
      expect(await metric("reform_inline_evictions_total")).toBeGreaterThanOrEqual(8);
      const inline = (await j(fetch(`${base}/v1/contexts`))).data.filter((c: Json) => c.metadata?.inline === true);
      expect(inline.length).toBeLessThanOrEqual(MAX_CONTEXTS);
      // the most recent document is still cached
      const again = await jsonPost(`${base}/v1/chat/completions`, {
        messages: [{ role: "user", content: `${documentOf(12_000, 107)}\n\nQ?` }],
        max_tokens: 1,
      });
      expect(again.headers.get("x-reform-inline")).toContain("cache=hit");
      await again.text();
    },
    T,
  );
});
