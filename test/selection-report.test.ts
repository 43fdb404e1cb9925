/**
 * The opt-in report of what a query gathered (`return_selection`): the pure parts (runs, the downsampled profile,
 * places in bytes and characters) and the native query route on the tiny random model (test/fixtures/tiny-model.ts),
 * where every span's text must be the document's own text at the span's place.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { downsampleMax, selectionReport } from "../src/engine/report.ts";
import { mergeRuns } from "../src/engine/selection.ts";
import { collectSse, expectError, j, jsonPost, uploadContext } from "./helpers/http.ts";
import { startTestServer, type TestServer } from "./helpers/server.ts";

// biome-ignore lint/suspicious/noExplicitAny: tests read response bodies loosely typed
type Json = any;

describe("report parts", () => {
  test("runs of consecutive indices", () => {
    expect(mergeRuns([])).toEqual([]);
    expect(mergeRuns([0, 1, 2, 5, 7, 8])).toEqual([
      [0, 3],
      [5, 6],
      [7, 9],
    ]);
  });

  test("profile: max per bucket, at most 512 buckets, covering every token", () => {
    expect(downsampleMax(Float32Array.from([1, 3, 2]))).toEqual([1, 3, 2]);
    const n = 1000;
    const v = new Float32Array(n);
    v[999] = 5;
    v[500] = 2;
    const p = downsampleMax(v);
    expect(p.length).toBe(512);
    expect(p[511]).toBe(5);
    expect(p[Math.floor((500 * 512) / n)]).toBe(2);
    expect(p.filter((x) => x !== 0).length).toBe(2);
  });

  test("places count the tokens' bytes and the characters they start", () => {
    // one token per byte: "aé€b" = 61 | c3 a9 | e2 82 ac | 62
    const bytes = new TextEncoder().encode("aé€b");
    const tok = { tokenBytes: (id: number) => Uint8Array.of(id) };
    const tokens = Int32Array.from(bytes);
    const sel = selectionReport(tok, {
      method: "reform",
      tokens,
      idx: [1, 2, 6],
      smoothed: Float32Array.from([0, 1, 2, 3, 4, 5, 6]),
      window: 1,
      lag: 0,
      edge: 0,
    });
    expect(sel.spans).toEqual([
      { start: 1, end: 3, byteStart: 1, byteEnd: 3, charStart: 1, charEnd: 2, score: 2, text: "é" },
      { start: 6, end: 7, byteStart: 6, byteEnd: 7, charStart: 3, charEnd: 4, score: 6, text: "b" },
    ]);
    expect(sel.profile).toEqual({ buckets: 7, values: [0, 1, 2, 3, 4, 5, 6], min: 0, max: 6 });
    expect(sel.selectedTokens).toBe(3);
  });
});

describe("return_selection on the query route", () => {
  const T = 120_000;
  let srv: TestServer;
  let base: string;
  let ctxId: string;
  // multi-byte characters throughout, so that bytes, characters and UTF-16 units all differ
  const doc = Array.from(
    { length: 60 },
    (_, i) =>
      `Paragraphe ${i}: le café ${i % 7} coûte ${i * 3} € — naïve 🌊 ${i % 5 === 0 ? "the needle is here. " : ""}`,
  ).join("\n");

  beforeAll(async () => {
    // with the paper's always-kept edges (off by default), so the spans reach both ends of the document
    srv = await startTestServer({ name: "selection", flags: ["--edge", "40"] });
    base = srv.url;
    ctxId = await uploadContext(base, doc);
  }, T);

  afterAll(() => srv?.stop());

  const ask = { question: "Where is the needle?", max_tokens: 2, temperature: 0, budget: 64 };
  /** the selection a non-stream query with these extra fields reports */
  const selectionWith = async (extra: object) =>
    (
      await j(
        jsonPost(`${base}/v1/contexts/${ctxId}/query`, { ...ask, stream: false, return_selection: true, ...extra }),
      )
    ).selection;
  /** a chat completion over the context with these extra (REFORM) fields */
  const chat = (extra: object) =>
    jsonPost(`${base}/v1/chat/completions`, {
      messages: [{ role: "user", content: "Where is the needle?" }],
      max_tokens: 2,
      ...extra,
    });

  function checkSelection(sel: Json, contextTokens: number) {
    expect(sel.method).toBe("reform");
    expect(sel.context_tokens).toBe(contextTokens);
    expect(sel.selected_tokens).toBe(64);
    expect(sel.window).toBeGreaterThan(0);
    const docBytes = new TextEncoder().encode(doc);
    const docChars = [...doc];
    let tokens = 0;
    let prevEnd = -1;
    for (const s of sel.spans) {
      expect(s.start).toBeGreaterThan(prevEnd); // in document order, merged (a gap between runs)
      prevEnd = s.end;
      tokens += s.end - s.start;
      // the span's text is the document's text at its place (a cut character decodes as U+FFFD at the span's ends)
      const fromBytes = new TextDecoder().decode(docBytes.subarray(s.byte_start, s.byte_end));
      expect(s.text).toBe(fromBytes);
      const inner = s.text.replace(/^\uFFFD+|\uFFFD+$/g, "");
      expect(docChars.slice(s.char_start, s.char_end).join("")).toContain(inner);
      expect(typeof s.score).toBe("number");
    }
    expect(tokens).toBe(64);
    expect(sel.spans[0].start).toBe(0); // the always-kept edges (--edge)
    expect(sel.spans[0].byte_start).toBe(0);
    expect(sel.spans.at(-1).end).toBe(contextTokens);
    expect(sel.spans.at(-1).byte_end).toBe(docBytes.length);
    expect(sel.spans.at(-1).char_end).toBe(docChars.length);
    const p = sel.profile;
    expect(p.buckets).toBe(Math.min(512, contextTokens));
    expect(p.values.length).toBe(p.buckets);
    expect(Math.max(...p.values)).toBe(p.max);
    expect(Math.min(...p.values)).toBe(p.min);
    // the best span holds the highest smoothed score of the context (the selection picks the best passages)
    expect(Math.max(...sel.spans.map((s: Json) => s.score))).toBeCloseTo(p.max, 5);
  }

  test(
    "streamed: the start event carries the selection; without the flag it does not",
    async () => {
      const ev = await collectSse(
        await jsonPost(`${base}/v1/contexts/${ctxId}/query`, { ...ask, return_selection: true }),
      );
      const start = JSON.parse(ev.find((e) => e.event === "start")!.data);
      expect(start.context_tokens).toBeGreaterThan(64);
      checkSelection(start.selection, start.context_tokens);
      const plain = await collectSse(await jsonPost(`${base}/v1/contexts/${ctxId}/query`, ask));
      expect(JSON.parse(plain.find((e) => e.event === "start")!.data).selection).toBeUndefined();
    },
    T,
  );

  test(
    "non-stream: the body carries it; method full reports the whole context, unscored",
    async () => {
      const res = await j(
        jsonPost(`${base}/v1/contexts/${ctxId}/query`, { ...ask, stream: false, return_selection: true }),
      );
      checkSelection(res.selection, res.usage.context_tokens);
      const short = "A short note: café 🌊, 12 €.";
      const id = (await j(jsonPost(`${base}/v1/contexts`, {}))).id;
      const info = await j(jsonPost(`${base}/v1/contexts/${id}/content`, { text: short, final: true }));
      const full = await j(
        jsonPost(`${base}/v1/contexts/${id}/query`, {
          question: "Where?",
          max_tokens: 1,
          method: "full",
          stream: false,
          return_selection: true,
        }),
      );
      expect(full.selection.profile).toBeNull();
      expect(full.selection.spans.length).toBe(1);
      expect(full.selection.spans[0]).toMatchObject({ start: 0, end: info.tokens_received, byte_start: 0 });
      expect(full.selection.spans[0].text).toBe(short);
      expect(full.selection.spans[0].char_end).toBe([...short].length);
    },
    T,
  );

  test(
    "score_floor per request: the gathering reports the floor it used (the server's by default); out of range is a 400",
    async () => {
      const selectionAt = (floor?: number) => selectionWith(floor === undefined ? {} : { score_floor: floor });
      const props = await j(fetch(`${base}/props`));
      expect((await selectionAt()).score_floor).toBe(props.limits.score_floor);
      expect((await selectionAt(1)).score_floor).toBe(1);
      // 0: the paper's gathering, the whole budget by score
      const paper = await selectionAt(0);
      expect(paper.score_floor).toBe(0);
      expect(paper.selected_tokens).toBe(64);
      const err = await expectError(
        await jsonPost(`${base}/v1/contexts/${ctxId}/query`, { ...ask, score_floor: 1.5 }),
        400,
      );
      expect(err.param).toBe("score_floor");
      // the OpenAI endpoints take it in the `reform` extension object and beside a top-level context_id
      for (const extra of [
        { reform: { context_id: ctxId, score_floor: -0.1 } },
        { context_id: ctxId, score_floor: -0.1 },
        { context_id: ctxId, score_floor: 1.5, reform: { score_floor: 0.5 } },
      ]) {
        const err = await expectError(await chat(extra), 400);
        expect(err.param).toContain("score_floor");
      }
      expect((await chat({ context_id: ctxId, score_floor: 0 })).status).toBe(200);
    },
    T,
  );

  test(
    "score_background per request: reported, kth-pairs by default (/props), each mode changes the scores; an unknown mode or two different ones is a 400",
    async () => {
      const background = (v?: boolean | string) => selectionWith(v === undefined ? {} : { score_background: v });
      const props = await j(fetch(`${base}/props`));
      expect(props.limits.score_background).toBe("kth-pairs");
      const byDefault = await background();
      const on = await background(true);
      const pairs = await background("kth-pairs");
      const kth = await background("kth");
      const mean = await background("mean");
      const off = await background(false);
      expect(byDefault.score_background).toBe("kth-pairs");
      expect(on.score_background).toBe("kth-pairs");
      expect(kth.score_background).toBe("kth");
      expect(mean.score_background).toBe("mean");
      expect(off.score_background).toBe("off");
      expect(on.profile.values).toEqual(byDefault.profile.values);
      expect(pairs.profile.values).toEqual(byDefault.profile.values);
      // the pairs of adjacent question tokens join the maximum: no row scores lower than with the tokens alone, some
      // higher
      const lower = kth.profile.values.filter((v: number, i: number) => pairs.profile.values[i] < v - 1e-6).length;
      expect(lower).toBe(0);
      expect(pairs.profile.values).not.toEqual(kth.profile.values);
      // each question token's k-th best match, or its mean cosine, comes off its scores: other values, the same length
      expect(on.profile.values.length).toBe(off.profile.values.length);
      expect(on.profile.values).not.toEqual(off.profile.values);
      expect(mean.profile.values).not.toEqual(off.profile.values);
      expect(mean.profile.values).not.toEqual(kth.profile.values);
      // below its k-th best match a token adds nothing: no raw score is negative
      expect(Math.min(...kth.profile.values)).toBeGreaterThanOrEqual(0);
      const err = await expectError(
        await jsonPost(`${base}/v1/contexts/${ctxId}/query`, { ...ask, score_background: "yes" }),
        400,
      );
      expect(err.param).toBe("score_background");
      const twice = await expectError(
        await chat({ context_id: ctxId, score_background: true, reform: { score_background: false } }),
        400,
      );
      expect(twice.param).toContain("score_background");
      expect((await chat({ reform: { context_id: ctxId, score_background: false } })).status).toBe(200);
    },
    T,
  );

  test(
    'a heads file with "smoothing": "max": the max-pooled selection (pooled and selected natively) is reported',
    async () => {
      const max = await startTestServer({
        name: "selection-max",
        modelDir: srv.modelDir,
        flags: [
          "--edge",
          "40",
          "--heads",
          JSON.stringify({
            heads: [
              { layer: 0, kind: "q", head: 0 },
              { layer: 0, kind: "k", head: 0 },
            ],
            smoothing: "max",
          }),
        ],
      });
      try {
        const props = await j(fetch(`${max.url}/props`));
        expect(props.limits.smoothing).toBe("max");
        const id = await uploadContext(max.url, doc);
        const res = await j(
          jsonPost(`${max.url}/v1/contexts/${id}/query`, { ...ask, stream: false, return_selection: true }),
        );
        checkSelection(res.selection, res.usage.context_tokens);
        // the same checks as the mean server's (checkSelection: 64 tokens, edges, best span = highest pooled score)
        expect((await j(fetch(`${base}/props`))).limits.smoothing).toBe("mean");
      } finally {
        await max.stop();
      }
    },
    T,
  );
});
