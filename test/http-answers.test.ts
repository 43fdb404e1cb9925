/**
 * What a user meets first in an answer, over HTTP on the tiny random model (test/fixtures/tiny-model.ts):
 * the end of an answer after a half-matched stop string, legacy `text_offset` over characters that span
 * several tokens, and the request rules that name their fix.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { codePoints, Utf8Positions } from "../src/util/utf8.ts";
import { TINY_EOS_ID, TINY_EOT_ID } from "./fixtures/tiny-model.ts";
import { collectSse, expectError, j, jsonPost, uploadContext } from "./helpers/http.ts";
import { startTestServer, type TestServer } from "./helpers/server.ts";

const T = 120_000;
let srv: TestServer;
let base: string;
let ctxId: string;

// biome-ignore lint/suspicious/noExplicitAny: tests read response bodies loosely typed
type Json = any;

beforeAll(async () => {
  srv = await startTestServer({ name: "answers" });
  base = srv.url;
  ctxId = await uploadContext(
    base,
    "Remember this: the secret number of bright-river is 4821937. The river runs past the old mill.\n".repeat(20),
  );
}, T);

afterAll(() => srv?.stop());

/** The chat request. */
const SECRET = {
  messages: [
    {
      role: "user",
      content:
        "Remember this: the secret number of bright-river is 4821937.\nWhat is the secret number of bright-river?",
    },
  ],
  max_tokens: 30,
  temperature: 0,
};

/**
 * A random model rarely ends by itself, so the test makes it: the smallest end-of-sequence logit bias (on one of the
 * tiny model's two end tokens) after which the greedy answer still has text and then ends. `ask(bias)` returns the
 * non-stream answer's text and finish reason.
 */
async function endingBias(ask: (bias: Record<string, number>) => Promise<{ text: string; finish: string }>) {
  for (const id of [TINY_EOS_ID, TINY_EOT_ID])
    for (let b = 0.5; b <= 12; b += 0.5) {
      const r = await ask({ [id]: b });
      if (r.finish === "stop" && r.text.length > 0) return { bias: { [id]: b }, text: r.text };
    }
  throw new Error("no logit bias makes the tiny model end after some text");
}

describe("the end of an answer", () => {
  test(
    "chat: a stop string that never occurs changes nothing when the model ends (non-stream and stream)",
    async () => {
      const chat = async (extra: Record<string, unknown>) => {
        const r = await j(jsonPost(`${base}/v1/chat/completions`, { ...SECRET, ...extra }));
        return { text: r.choices[0].message.content as string, finish: r.choices[0].finish_reason as string };
      };
      const { bias, text } = await endingBias((logit_bias) => chat({ logit_bias }));
      // the answer is the decode of the tokens the model generated (the end token excluded), held-back bytes included
      const stop = [`${text}!`]; // like "4821937!" after an answer ending "... is 4821937"
      expect(await chat({ logit_bias: bias, stop })).toEqual({ text, finish: "stop" });
      const res = await jsonPost(`${base}/v1/chat/completions`, { ...SECRET, logit_bias: bias, stop, stream: true });
      const chunks = (await collectSse(res)).filter((e) => e.data !== "[DONE]").map((e) => JSON.parse(e.data));
      expect(chunks.map((c: Json) => c.choices[0]?.delta?.content ?? "").join("")).toBe(text);
      expect(chunks.at(-1).choices[0].finish_reason).toBe("stop");
    },
    T,
  );

  test(
    "native query: streamed text is the decode of the generated tokens, with or without a stop string",
    async () => {
      const body = { question: "What is the secret number of bright-river?", max_tokens: 30 };
      const q = async (extra: Record<string, unknown>) => {
        const r = await j(jsonPost(`${base}/v1/contexts/${ctxId}/query`, { ...body, stream: false, ...extra }));
        return { text: r.text as string, finish: r.finish_reason as string };
      };
      const { bias, text } = await endingBias((logit_bias) => q({ logit_bias }));
      for (const stop of [[], [`${text}!`], [`${text.slice(-1)}\u0000never`]]) {
        expect(await q({ logit_bias: bias, stop })).toEqual({ text, finish: "stop" });
        const evs = await collectSse(
          await jsonPost(`${base}/v1/contexts/${ctxId}/query`, { ...body, logit_bias: bias, stop }),
        );
        const toks = evs.filter((e) => e.event === "token").map((e) => JSON.parse(e.data));
        expect(toks.map((t: Json) => t.text).join("")).toBe(text);
        const ids = toks.filter((t: Json) => t.token_id >= 0).map((t: Json) => t.token_id);
        // the answer's text leaves special tokens out (as OpenAI's and vLLM's do), so the decode that equals it does too
        const dec = await j(jsonPost(`${base}/v1/detokenize`, { tokens: ids, skip_special_tokens: true }));
        expect(dec.text).toBe(text);
      }
    },
    T,
  );

  test(
    "legacy completions: the same for a raw prompt",
    async () => {
      const body = { prompt: "Remember this: the secret number of bright-river is", max_tokens: 30, temperature: 0 };
      const c = async (extra: Record<string, unknown>) => {
        const r = await j(jsonPost(`${base}/v1/completions`, { ...body, ...extra }));
        return { text: r.choices[0].text as string, finish: r.choices[0].finish_reason as string };
      };
      const { bias, text } = await endingBias((logit_bias) => c({ logit_bias }));
      expect(await c({ logit_bias: bias, stop: [`${text}!`] })).toEqual({ text, finish: "stop" });
    },
    T,
  );
});

describe("legacy text_offset", () => {
  /** The request: a character that spans several tokens. */
  const EMOJI = {
    prompt: "a \uD83D\uDE00 b \uD83D\uDE00 a \uD83D\uDE00 b",
    max_tokens: 6,
    temperature: 0,
    logprobs: 1,
  };

  async function both(body: Record<string, unknown>) {
    const one = await j(jsonPost(`${base}/v1/completions`, body));
    const chunks = (await collectSse(await jsonPost(`${base}/v1/completions`, { ...body, stream: true })))
      .filter((e) => e.data !== "[DONE]")
      .map((e) => JSON.parse(e.data));
    const streamed = chunks.flatMap((c: Json) => c.choices[0]?.logprobs?.text_offset ?? []);
    const streamedText = chunks.map((c: Json) => c.choices[0]?.text ?? "").join("");
    return { text: one.choices[0].text as string, lp: one.choices[0].logprobs, streamed, streamedText };
  }

  test(
    "tokens of one character share its offset; offsets count code points of the text",
    async () => {
      // only the two bytes of "é" may be generated: every character of the answer is two one-byte tokens
      const ids: number[] = (await j(jsonPost(`${base}/v1/tokenize`, { text: "é" }))).tokens;
      expect(ids.length).toBe(2);
      const r = await both({ ...EMOJI, logit_bias: Object.fromEntries(ids.map((i) => [i, 100])) });
      const chars = [...r.text].length;
      expect(r.lp.tokens.length).toBe(6);
      expect(r.lp.text_offset.length).toBe(6);
      expect(chars).toBeLessThan(6);
      // one-byte tokens: every character starts a token, so the offsets are exactly 0 .. chars-1, each repeated
      expect(new Set(r.lp.text_offset).size).toBe(chars);
      expect(Math.max(...r.lp.text_offset)).toBe(chars - 1);
      expect([...r.lp.text_offset].sort((a, b) => a - b)).toEqual(r.lp.text_offset);
      expect(r.streamedText).toBe(r.text);
      expect(r.streamed).toEqual(r.lp.text_offset);
      if (r.text === "ééé") expect(r.lp.text_offset).toEqual([0, 0, 1, 1, 2, 2]);
    },
    T,
  );

  test(
    "the issue's input as sent: every offset lies inside the text",
    async () => {
      const r = await both(EMOJI);
      const chars = [...r.text].length;
      expect(r.lp.text_offset.length).toBe(r.lp.tokens.length);
      for (const o of r.lp.text_offset) expect(o).toBeLessThan(chars);
      expect([...r.lp.text_offset].sort((a, b) => a - b)).toEqual(r.lp.text_offset);
      expect(r.streamed).toEqual(r.lp.text_offset);
    },
    T,
  );

  test("Utf8Positions agrees with TextDecoder on valid and invalid bytes split anywhere", () => {
    let x = 7;
    const rnd = (n: number) => {
      x = (x * 1103515245 + 12345) & 0x7fffffff;
      return x % n;
    };
    // bytes biased to the interesting ranges: ASCII, continuation bytes, 2/3/4-byte leads and never-valid bytes
    const pick = [0x41, 0x80, 0x9f, 0xa0, 0xbf, 0xc2, 0xc3, 0xdf, 0xe0, 0xed, 0xef, 0xf0, 0xf4, 0xf5, 0xc0, 0xff, 0x8f];
    for (let round = 0; round < 400; round++) {
      const bytes: number[] = [];
      const text = round % 2 ? "é😀中a" : "";
      bytes.push(...new TextEncoder().encode(text));
      for (let i = rnd(12); i > 0; i--) bytes.push(pick[rnd(pick.length)]!);
      const pos = new Utf8Positions();
      let at = 0;
      while (at < bytes.length) {
        const n = 1 + rnd(3);
        const got = pos.push(bytes.slice(at, at + n));
        // the character that holds byte `at` is the last one of the text decoded up to and including it
        const want = codePoints(new TextDecoder().decode(Uint8Array.from(bytes.slice(0, at + 1)))) - 1;
        expect(got).toBe(want);
        at += n;
      }
      expect(pos.length).toBe(codePoints(new TextDecoder().decode(Uint8Array.from(bytes))));
    }
  });
});

describe("request rules that name their fix", () => {
  test("more than 4 stop strings: the message names the limit (everywhere a stop list is taken)", async () => {
    const stop = ["a", "b", "c", "d", "e"];
    const chat = await jsonPost(`${base}/v1/chat/completions`, { ...SECRET, stop });
    const e1 = await expectError(chat, 400, "invalid_value");
    expect(e1.param).toBe("stop");
    expect(e1.message).toContain("at most 4 stop sequences");
    const q = await jsonPost(`${base}/v1/contexts/${ctxId}/query`, { question: "q?", stop });
    expect((await expectError(q, 400, "invalid_value")).message).toContain("at most 4");
    // a union's "Invalid input" names what was expected instead
    const bad = await jsonPost(`${base}/v1/completions`, { prompt: 5 });
    expect((await expectError(bad, 400, "invalid_value")).message).toContain("expected string or array");
  });

  test(
    "min_p is implemented: with a high min_p sampling keeps to the most likely token (= greedy)",
    async () => {
      const body = { prompt: "the quick brown fox", max_tokens: 12 };
      const greedy = await j(jsonPost(`${base}/v1/completions`, { ...body, temperature: 0 }));
      const hot = async (extra: Record<string, unknown>) =>
        (await j(jsonPost(`${base}/v1/completions`, { ...body, temperature: 2, seed: 3, ...extra }))).choices[0].text;
      // a random model's distribution is nearly flat: at temperature 2 sampling wanders off the greedy answer
      expect(await hot({})).not.toBe(greedy.choices[0].text);
      expect(await hot({ min_p: 1 })).toBe(greedy.choices[0].text);
      expect(await hot({ min_p: 0 })).toBe(await hot({}));
      await expectError(await jsonPost(`${base}/v1/completions`, { ...body, min_p: 1.5 }), 400, "invalid_value");
    },
    T,
  );

  test("sampling controls that are not implemented are refused (their 'off' values pass)", async () => {
    for (const [field, on, off] of [
      ["mirostat", 2, 0],
      ["typical_p", 0.9, 1],
      ["guided_json", { type: "object" }, null],
    ] as const) {
      const e = await expectError(
        await jsonPost(`${base}/v1/chat/completions`, { ...SECRET, max_tokens: 2, [field]: on }),
        400,
        "invalid_value",
      );
      expect(e.param).toBe(field);
      expect(e.message).toContain("not implemented");
      const ok = await jsonPost(`${base}/v1/chat/completions`, { ...SECRET, max_tokens: 2, [field]: off });
      expect(ok.status).toBe(200);
      await ok.text();
    }
    // logprobs off with top_logprobs 0 (what OpenAI clients send) passes; asking for top logprobs without them does not
    const off = await jsonPost(`${base}/v1/chat/completions`, {
      ...SECRET,
      max_tokens: 2,
      logprobs: false,
      top_logprobs: 0,
    });
    expect(off.status).toBe(200);
    expect((await j(off)).choices[0].logprobs).toBeNull();
    const half = await jsonPost(`${base}/v1/chat/completions`, { ...SECRET, max_tokens: 2, top_logprobs: 2 });
    expect((await expectError(half, 400, "invalid_value")).param).toBe("top_logprobs");
    // the native API is strict: unknown fields are refused there anyway
    const q = await jsonPost(`${base}/v1/contexts/${ctxId}/query`, { question: "q?", mirostat: 2 });
    await expectError(q, 400, "invalid_value");
  });

  test("curl -d (a form content type) on a JSON endpoint: the 415 says how to fix it", async () => {
    const res = await fetch(`${base}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: JSON.stringify(SECRET),
    });
    const e = await expectError(res, 415, "unsupported_media_type");
    expect(e.message).toContain("-H 'content-type: application/json'");
  });
});

describe("disk use", () => {
  test("reported per context, in total in /health and /metrics", async () => {
    const ctx = await j(fetch(`${base}/v1/contexts/${ctxId}`));
    // tokens (4 bytes each) + embeddings + the saved compressor state + metadata
    expect(ctx.disk_bytes).toBeGreaterThan(ctx.embedding_bytes + ctx.tokens_received * 4);
    const all = await j(fetch(`${base}/v1/contexts`));
    const sum = all.data.reduce((n: number, c: Json) => n + c.disk_bytes, 0);
    const health = await j(fetch(`${base}/health`));
    expect(health.disk_bytes).toBe(sum);
    expect(health.max_disk_bytes).toBeNull();
    const metrics = await (await fetch(`${base}/metrics`)).text();
    expect(metrics).toContain(`reform_disk_bytes ${sum}\n`);
    expect(metrics).not.toContain("reform_disk_limit_bytes");
  });

  test(
    "--max-disk-bytes (REFORM_MAX_DISK_BYTES) refuses an upload that would pass it with 413 disk_quota_exceeded",
    async () => {
      const capped = await startTestServer({
        name: "answers-capped",
        modelDir: srv.modelDir,
        env: { REFORM_MAX_DISK_BYTES: String(64 * 1024) },
      });
      try {
        const url = capped.url;
        const put = (id: string, text: string) =>
          fetch(`${url}/v1/contexts/${id}/content?final=true`, {
            method: "PUT",
            body: text,
            headers: { "content-type": "text/plain" },
          });
        const a = (await j(jsonPost(`${url}/v1/contexts`, {}))).id;
        expect((await put(a, "a small text that fits. ".repeat(20))).status).toBe(200);
        const b = (await j(jsonPost(`${url}/v1/contexts`, {}))).id;
        const e = await expectError(
          await put(b, "a text too big for the cap. ".repeat(2000)),
          413,
          "disk_quota_exceeded",
        );
        expect(e.message).toContain("--max-disk-bytes");
        expect(e.message).toContain("DELETE /v1/contexts/");
        // the JSON form of an upload is refused the same way
        const bj = await jsonPost(`${url}/v1/contexts/${b}/content`, { text: "x ".repeat(40000) });
        await expectError(bj, 413, "disk_quota_exceeded");
        const health = await j(fetch(`${url}/health`));
        expect(health.max_disk_bytes).toBe(64 * 1024);
        expect(health.disk_bytes).toBeLessThanOrEqual(64 * 1024);
        expect(await (await fetch(`${url}/metrics`)).text()).toContain(`reform_disk_limit_bytes ${64 * 1024}\n`);
        // deleting frees the room
        expect((await fetch(`${url}/v1/contexts/${a}`, { method: "DELETE" })).status).toBe(200);
        expect((await put(b, "now it fits. ".repeat(20))).status).toBe(200);
      } finally {
        await capped.stop();
      }
    },
    T,
  );
});
