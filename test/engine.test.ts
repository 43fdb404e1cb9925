import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";

// tiny-model forwards on a loaded 2-core CI machine can exceed the 5 s default
setDefaultTimeout(60_000);
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadNative } from "../ffi/native.ts";
import type { EngineError, EngineClient, Method, QueryEvent, QueryRequest } from "../src/engine/api.ts";
import { planQuery } from "../src/engine/answer.ts";
import { createEngine, type EngineDefaults } from "../src/engine/client.ts";
import { EngineCore } from "../src/engine/core.ts";
import { planInline, TokenMemo } from "../src/engine/inline.ts";
import { templateTokensOf, uploadCompressParams } from "../src/engine/load.ts";
import { parseQuery } from "../src/engine/schema.ts";
import { LogitProcessor, logprobsOf } from "../src/engine/sampling.ts";
import { f16ToF32 } from "../src/util/f16.ts";
import { buildMessages, CONTEXT_PLACEHOLDER, splitAtPlaceholder } from "../src/engine/prompt.ts";
import {
  completeSentences,
  END_NEWLINE,
  END_PUNCT,
  keepNearBest,
  refineSelection,
  selectionFor,
  selectTokens,
  queryScorers,
  sentenceEnds,
  STARTS_SPACE,
  wordContinuations,
  smoothedAt,
  smoothScores,
} from "../src/engine/selection.ts";
import { StopMatcher } from "../src/engine/stop.ts";
import { lastSafeBoundary, trailingPartial } from "../src/engine/session.ts";
import { ModelTokenizer } from "../src/model/tokenizer.ts";
import { f32ToF16, makeTinyModel, TINY_BOS_ID, TINY_EOS_ID, TINY_EOT_ID } from "./fixtures/tiny-model.ts";

let root: string;
let modelDir: string;

// The engine's mechanics on long contexts (method "full" over ~1000 tokens) need a model whose window holds them:
// these tests use a 4096-token window (the limits derived from a 512-token window are tested further down).
const WINDOW = 4096;
const DEFAULTS = { budget: 128, maxTokens: 16, edge: 16, window: 9 };

function mkText(): string {
  const parts: string[] = [];
  const words = ["the", "quick", "brown", "fox", "héllo", "中文字", "emoji🎉", "naïve", "café", "data", "and", "sing"];
  let x = 12345;
  for (let i = 0; i < 700; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    parts.push(words[x % words.length]!);
    if (x % 17 === 0) parts.push("\n\n");
    if (x % 23 === 0) parts.push("  ");
  }
  return parts.join(" ") + " The secret code is 4242.";
}

function sampling(maxTokens = 8) {
  return { maxTokens, temperature: 0, topP: 1, topK: 0, seed: 1, stop: [] as string[] };
}

async function collect(e: EngineClient, req: QueryRequest): Promise<QueryEvent[]> {
  const evs: QueryEvent[] = [];
  for await (const ev of e.query(req)) evs.push(ev);
  return evs;
}

function ctxFiles(dataDir: string, id: string) {
  const d = join(dataDir, "contexts", id);
  return { tokens: readFileSync(join(d, "tokens.bin")), emb: readFileSync(join(d, "emb.bin")) };
}

/** Lengths of the recompute prompt's parts before and after the context, as the engine builds them. */
function promptAround(dir: string, question: string, id: string, data: string): { pre: number; suf: number } {
  const tok = ModelTokenizer.fromDir(dir);
  const parts = splitAtPlaceholder(tok.renderChat(buildMessages({ question }, true).messages, true));
  const first = new Int32Array(readFileSync(join(data, "contexts", id, "tokens.bin")).buffer.slice(0, 4))[0];
  const { pre, suf } = tok.encodeAround(parts.prefix, first, parts.suffix);
  return { pre: pre.length, suf: suf.length };
}

beforeAll(async () => {
  root = mkdtempSync(join(tmpdir(), "reform-eng-"));
  modelDir = await makeTinyModel(join(root, "model"), { maxPositions: WINDOW });
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

describe("sampling helpers", () => {
  test("LogitProcessor: repetition (prompt + output), presence / frequency (output), logit bias", () => {
    const raw = Float32Array.from([2, -2, 1, 0.5, -1, 3]);
    const out = new Float32Array(6);
    const off = new LogitProcessor({ maxTokens: 1, temperature: 0, topP: 1, topK: 0, stop: [] }, 6, [0, 1]);
    expect(off.active).toBe(false);
    const p = new LogitProcessor(
      {
        maxTokens: 1,
        temperature: 0,
        topP: 1,
        topK: 0,
        stop: [],
        repetitionPenalty: 2,
        presencePenalty: 0.5,
        frequencyPenalty: 0.25,
        logitBias: { 5: -10, 4: 1 },
      },
      6,
      [0, 1],
    );
    expect(p.active).toBe(true);
    expect(Array.from(p.adjust(raw, out))).toEqual([1, -4, 1, 0.5, 0, -7]);
    p.add(2);
    p.add(2);
    p.add(3);
    // token 2: seen (output) -> 1/2, presence 0.5, frequency 2 * 0.25; token 3: 0.25/... etc.
    const r = Array.from(p.adjust(raw, out));
    expect(r[2]).toBeCloseTo(0.5 - 0.5 - 0.5, 6);
    expect(r[3]).toBeCloseTo(0.25 - 0.5 - 0.25, 6);
    expect(r[0]).toBe(1);
    expect(Array.from(raw)).toEqual([2, -2, 1, 0.5, -1, 3]); // raw untouched
  });

  test("logprobsOf: log-softmax and the top n", () => {
    const l = Float32Array.from([1, 3, 2, 3, -5]);
    const lse = Math.log(Array.from(l).reduce((a, x) => a + Math.exp(x), 0));
    const r = logprobsOf(l, 2, 3);
    expect(r.logprob).toBeCloseTo(2 - lse, 6);
    expect(r.top.map((t) => t.id)).toEqual([1, 3, 2]); // ties: lower id first
    expect(r.top[0]!.logprob).toBeCloseTo(3 - lse, 6);
    expect(logprobsOf(l, 4, 0).top).toEqual([]);
    expect(logprobsOf(l, 0, 10).top.length).toBe(5);
  });
});

describe("pure query helpers", () => {
  test("smoothing: moving average with edges", () => {
    const s = smoothScores(Float32Array.from([0, 0, 3, 0, 0]), 3);
    expect(Array.from(s)).toEqual([0, 1, 1, 1, 0]);
    const e = smoothScores(Float32Array.from([3, 0, 0]), 3);
    expect(e[0]).toBeCloseTo(1.5);
  });

  test("selection keeps edges, picks a planted region, returns in order", () => {
    const n = 1000;
    const raw = new Float32Array(n);
    for (let i = 0; i < n; i++) raw[i] = ((i * 7919) % 101) / 1000; // low noise
    for (let i = 500; i < 540; i++) raw[i] = 1; // planted region
    const idx = selectTokens(smoothScores(raw, 9), 100, 16);
    expect(idx.length).toBe(100);
    for (let i = 1; i < idx.length; i++) expect(idx[i]!).toBeGreaterThan(idx[i - 1]!);
    const set = new Set(idx);
    for (let i = 0; i < 16; i++) expect(set.has(i) && set.has(n - 1 - i)).toBe(true);
    for (let i = 500; i < 540; i++) expect(set.has(i)).toBe(true);
    // context fits the budget: everything
    expect(selectTokens(new Float32Array(50), 100).length).toBe(50);
    // edges and smoothing window hold at the default budget and scale with a request's budget (window odd)
    expect(selectionFor({ budget: 320, window: 5, edge: 10 }, 320)).toEqual({ window: 5, lag: 0, edge: 10, tail: 0 });
    expect(selectionFor({ budget: 320, window: 5, edge: 10 }, 1280)).toEqual({ window: 21, lag: 0, edge: 40, tail: 0 });
    expect(selectionFor({ budget: 320, window: 5, edge: 10 }, 64)).toEqual({ window: 1, lag: 0, edge: 2, tail: 0 });
    // the lag scales with the budget and stays within half the window
    expect(selectionFor({ budget: 320, window: 49, edge: 10, lag: 16 }, 640).lag).toBe(32);
    expect(selectionFor({ budget: 320, window: 49, edge: 10, lag: 16 }, 32).lag).toBe(2);
    expect(selectionFor({ budget: 320, window: 5, edge: 10, lag: 16 }, 320).lag).toBe(2);
    // the sentence tail scales too, at most a quarter of the budget
    expect(selectionFor({ budget: 320, window: 49, edge: 10, sentenceTail: 48 }, 640).tail).toBe(96);
    expect(selectionFor({ budget: 320, window: 49, edge: 10, sentenceTail: 300 }, 320).tail).toBe(80);
  });

  test("wordContinuations: a token continues the word before it unless it starts with whitespace or is special", () => {
    const text = ["<s>", " virgin", "-", "t", "empo", "?", "\n", " ", "\tx", "", "\r"];
    const cont = wordContinuations(text.length, (id) => new TextEncoder().encode(text[id]!), new Set([0]));
    expect(Array.from(cont)).toEqual([0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0]);
  });

  test("queryScorers: the question's own tokens score the context, not the template's markup and whitespace", () => {
    const text = ["<|im_end|>", "\n", "\n\n", "    ", "\t", " What", "?", " 42", "\n}", ""];
    const scorers = queryScorers(text.length, (id) => new TextEncoder().encode(text[id]!), new Set([0]));
    expect(Array.from(scorers)).toEqual([0, 0, 0, 0, 0, 1, 1, 1, 1, 0]);
  });

  test("completeSentences: longest passages to their sentence end, then back to its start", () => {
    // vocabulary: id 9 ends a sentence ("." before a word that starts with a space), every other id does not
    const ends = sentenceEnds(10, (id) => new TextEncoder().encode(id === 9 ? "." : " a"));
    expect(ends[9]).toBe(END_PUNCT);
    expect(ends[3]).toBe(STARTS_SPACE);
    const tokens = Int32Array.from({ length: 100 }, (_, i) => (i === 30 || i === 70 || i === 75 ? 9 : 1));
    const range = (a: number, b: number) => Array.from({ length: b - a }, (_, i) => a + i);
    // passages 10..19 (10 long) and 60..64 (5 long)
    const idx = Int32Array.from([...range(10, 20), ...range(60, 65)]);
    // no tail: unchanged (the paper's gathering)
    expect(completeSentences(idx, tokens, ends, 0)).toBe(idx);
    // tail 14: the longer passage first, through its sentence end at 30 (11 tokens: 20..30), then 3 of the other
    expect(Array.from(completeSentences(idx, tokens, ends, 14))).toEqual([...range(10, 31), ...range(60, 68)]);
    // a large tail: forward to each sentence end (30, 70), then backward to each sentence start (0; 31, after the
    // end at 30), and no further
    expect(Array.from(completeSentences(idx, tokens, ends, 100))).toEqual([...range(0, 31), ...range(31, 71)]);
    // maxTail bounds each extension (4 forward and 4 backward per passage)
    expect(Array.from(completeSentences(idx, tokens, ends, 100, { maxTail: 4 }))).toEqual([
      ...range(6, 24),
      ...range(56, 69),
    ]);
    // a passage never runs into the next selected one
    const joined = Int32Array.from([10, 11, 12, 14, 15]);
    expect(Array.from(completeSentences(joined, tokens, ends, 5))).toEqual(range(10, 20));
  });

  test("completeSentences: the scored passages' sentences whole at both ends before the edges get any of the tail", () => {
    const ends = sentenceEnds(10, (id) => new TextEncoder().encode(id === 9 ? "." : " a"));
    // sentences end at 5, 30 and 40; the first edge 0..2 and a passage 33..36 inside the sentence 31..40
    const tokens = Int32Array.from({ length: 100 }, (_, i) => ([5, 30, 40].includes(i) ? 9 : 1));
    const range = (a: number, b: number) => Array.from({ length: b - a }, (_, i) => a + i);
    const idx = Int32Array.from([0, 1, 2, 33, 34, 35, 36]);
    // 6 tokens: 4 forward to the end at 40, 2 back to the start at 31; the edge's sentence waits
    expect(Array.from(completeSentences(idx, tokens, ends, 6))).toEqual([...range(0, 3), ...range(31, 41)]);
    // what is left after that goes to the edge
    expect(Array.from(completeSentences(idx, tokens, ends, 9))).toEqual([...range(0, 6), ...range(31, 41)]);
  });

  test("completeSentences: a period ends a sentence only before whitespace ('e.g.,', '1.0' stay inside it); a newline always", () => {
    const text = ["The", " rule", " (e", ".", "g", ".,", " 1", ".", "0", ")", " holds", ".", " Next", "\n", "x"];
    const vocab = [...new Set(text)];
    const tokens = Int32Array.from(text.map((t) => vocab.indexOf(t)));
    const ends = sentenceEnds(vocab.length, (id) => new TextEncoder().encode(vocab[id]!));
    expect(ends[vocab.indexOf(".")]).toBe(END_PUNCT);
    expect(ends[vocab.indexOf("\n")]).toBe(END_NEWLINE | STARTS_SPACE);
    // a passage on " rule": forward through "e.g.," and "1.0" to the sentence's own end (" holds" "."): 10 tokens,
    // then back to its start with one more
    expect(Array.from(completeSentences(Int32Array.from([1]), tokens, ends, 10))).toEqual([
      1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
    ]);
    expect(Array.from(completeSentences(Int32Array.from([1]), tokens, ends, 11))).toEqual([
      0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
    ]);
    // " Next" ends at the newline
    expect(Array.from(completeSentences(Int32Array.from([12]), tokens, ends, 5))).toEqual([12, 13]);
  });

  test("completeSentences: the partial sentences at a passage's ends pay for completing the one at its middle", () => {
    const ends = sentenceEnds(10, (id) => new TextEncoder().encode(id === 9 ? "." : " a"));
    // sentences end at 30, 70, 75, 120 and 160
    const tokens = Int32Array.from({ length: 200 }, (_, i) => ([30, 70, 75, 120, 160].includes(i) ? 9 : 1));
    const range = (a: number, b: number) => Array.from({ length: b - a }, (_, i) => a + i);
    // B = 26..39: the tail of the sentence ending at 30, then the start of the next (its middle, 32, is in it);
    // C = 110..125: its middle (117) in the sentence ending at 120, then the start of the next
    const idx = Int32Array.from([...range(26, 40), ...range(110, 126)]);
    // B gives up 26..30 and C 121..125; those 10 and the tail of 10 take B forward 20 tokens (40..59); C is whole
    expect(Array.from(completeSentences(idx, tokens, ends, 10))).toEqual([...range(31, 60), ...range(110, 121)]);
    // a larger tail: B to its end (70), C back to its start (76), and the 5 left take C's given-up piece back
    expect(Array.from(completeSentences(idx, tokens, ends, 60))).toEqual([...range(31, 71), ...range(76, 126)]);
    // the edges (a passage at position 0 or at the end) are kept as they are
    const edges = Int32Array.from([...range(0, 35), ...range(195, 200)]);
    expect(Array.from(completeSentences(edges, tokens, ends, 3))).toEqual([...range(0, 38), ...range(195, 200)]);
  });

  test("smoothedAt: the smoothed scores at the given positions, as smoothScores has them (mean and max, lagged)", () => {
    let x = 7;
    const raw = Float32Array.from({ length: 300 }, () => ((x = (x * 1103515245 + 12345) % 2 ** 31) / 2 ** 31) * 2 - 1);
    const at = [0, 1, 5, 48, 149, 150, 298, 299];
    for (const [w, op, lag] of [
      [1, "mean", 0],
      [9, "mean", 0],
      [49, "mean", 12],
      [9, "max", 0],
      [49, "max", 24],
    ] as const) {
      const full = smoothScores(raw, w, op, lag);
      const some = smoothedAt(raw, at, w, op, lag);
      at.forEach((i, j) => expect(Math.abs(some[j]! - full[i]!)).toBeLessThan(1e-6));
    }
    expect(() => smoothedAt(raw, at, 9, "mean", 5)).toThrow(RangeError);
  });

  test("score floor: keeps what reaches the floor between the lowest selected score and the best, and the edges", () => {
    // edges 0, 1 and 98, 99 of 100; a strong passage 10..14 (0.9), a weak one 20..22 (0.5), one between at 30 (0.7)
    const idx = Int32Array.from([0, 1, 10, 11, 12, 13, 14, 20, 21, 22, 30, 98, 99]);
    const sm = Float32Array.from([0.1, 0.1, 0.9, 0.9, 0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.7, 0.1, 0.1]);
    expect(Array.from(keepNearBest(idx, sm, 0.5, 2, 100))).toEqual([0, 1, 10, 11, 12, 13, 14, 30, 98, 99]);
    expect(Array.from(keepNearBest(idx, sm, 0.75, 2, 100))).toEqual([0, 1, 10, 11, 12, 13, 14, 98, 99]);
    // 0 keeps the whole selection (the paper's); 1 only the best
    expect(keepNearBest(idx, sm, 0, 2, 100)).toBe(idx);
    expect(Array.from(keepNearBest(idx, sm, 1, 2, 100))).toEqual([0, 1, 10, 11, 12, 13, 14, 98, 99]);
    // NaN ranks lowest: dropped, and it does not move the floor
    const withNaN = Float32Array.from(sm);
    withNaN[10] = Number.NaN;
    expect(Array.from(keepNearBest(idx, withNaN, 0.5, 2, 100))).toEqual([0, 1, 10, 11, 12, 13, 14, 98, 99]);
  });

  test("refineSelection: what the floor drops completes the kept passages' sentences", () => {
    const ends = sentenceEnds(10, (id) => new TextEncoder().encode(id === 9 ? "." : " a"));
    // one sentence ends at 40; a strong passage 20..29 stops inside it, a weak one at 60..65
    const tokens = Int32Array.from({ length: 100 }, (_, i) => (i === 40 ? 9 : 1));
    const raw = Float32Array.from({ length: 100 }, (_, i) => (i >= 20 && i < 30 ? 1 : i >= 60 && i < 66 ? 0.2 : 0));
    const idx = Int32Array.from([...Array.from({ length: 10 }, (_, i) => 20 + i), 60, 61, 62, 63, 64, 65]);
    const s = { window: 1, op: "mean" as const, lag: 0, edge: 0, tail: 5 };
    const range = (a: number, b: number) => Array.from({ length: b - a }, (_, i) => a + i);
    // without a floor the tail of 5 takes the strong passage to 34
    expect(Array.from(refineSelection(idx, raw, tokens, ends, { ...s, floor: 0 }))).toEqual([
      ...range(20, 35),
      ...range(60, 66),
    ]);
    // with one, the weak passage's 6 tokens and the tail of 5 take it through its sentence end at 40
    expect(Array.from(refineSelection(idx, raw, tokens, ends, { ...s, floor: 0.5 }))).toEqual(range(20, 41));
  });

  test("native score finds planted embeddings", () => {
    const native = loadNative("cpu");
    const dim = 24;
    const n = 600;
    let x = 99;
    const rnd = () => ((x = (x * 1103515245 + 12345) >>> 0) / 2 ** 32) * 2 - 1;
    const q = Float32Array.from({ length: dim }, rnd);
    const ctx = new Uint16Array(n * dim);
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < dim; j++) {
        const v = i >= 300 && i < 330 ? q[j]! + 0.05 * rnd() : rnd();
        ctx[i * dim + j] = f32ToF16(v);
      }
    }
    const sc = native.score(ctx, n, dim, q, 1);
    expect(sc[310]!).toBeGreaterThan(0.95);
    const idx = new Set(selectTokens(smoothScores(sc, 9), 80, 16));
    for (let i = 300; i < 330; i++) expect(idx.has(i)).toBe(true);
    expect(f16ToF32(Uint16Array.from([f32ToF16(0.5)]))[0]).toBe(0.5);
  });

  test("prompt split around the placeholder; stop matcher; boundaries", () => {
    const { messages, question } = buildMessages({ question: "why?" }, true);
    expect(question).toBe("why?");
    expect(messages[0]!.content).toBe(CONTEXT_PLACEHOLDER + "\n\nwhy?");
    const { prefix, suffix } = splitAtPlaceholder(`<u>${messages[0]!.content}</u>`);
    expect(prefix).toBe("<u>");
    expect(suffix).toBe("\n\nwhy?</u>");
    const m = new StopMatcher(["END"]);
    expect(m.push("abcE")).toEqual({ emit: "abc", stopped: false });
    expect(m.push("Nx")).toEqual({ emit: "ENx", stopped: false });
    expect(m.push("yEND tail")).toEqual({ emit: "y", stopped: true });
    expect(lastSafeBoundary("ab cd  ef g")).toBe(9);
    expect(lastSafeBoundary("abc ")).toBe(0);
    expect(Array.from(trailingPartial(new TextEncoder().encode("a🎉").subarray(0, 3)))).toEqual([240, 159]);
  });
});

describe("engine (tiny model, CPU library)", () => {
  let e: EngineClient;
  let dataDir: string;
  const text = mkText();
  const bytes = new TextEncoder().encode(text);

  beforeAll(async () => {
    dataDir = join(root, "data1");
    e = createEngine({ modelDir, dataDir, backend: "cpu", defaults: DEFAULTS });
    await e.ready();
  });
  afterAll(async () => {
    await e.close();
  });

  test("model info", () => {
    const mi = e.modelInfo()!;
    expect(e.state()).toBe("ready");
    expect(mi.architecture).toBe("LlamaForCausalLM");
    expect(mi.backend).toBe("cpu");
    expect(mi.exitLayer).toBe(0);
    expect(mi.defaults.chunkSize).toBe(32);
  });

  test("upload in many small pieces == upload in one (tokens and embeddings)", async () => {
    const a = await e.createContext({ metadata: { name: "one" } });
    await e.append(a.id, bytes);
    const fa = await e.finalize(a.id);
    expect(fa.state).toBe("ready");
    expect(fa.pendingChars).toBe(0);
    expect(fa.tokensProcessed).toBe(fa.tokensReceived);
    expect(fa.tokensReceived).toBeGreaterThan(500);

    const b = await e.createContext();
    const seen: string[] = [];
    const unsub = e.subscribe(b.id, (i) => seen.push(i?.state ?? "deleted"));
    let off = 0;
    let x = 7;
    while (off < bytes.length) {
      x = (x * 1103515245 + 12345) >>> 0;
      const n = 1 + (x % 23); // splits multi-byte characters too
      const info = await e.append(b.id, bytes.subarray(off, off + n));
      off += n;
      expect(info.tokensProcessed % 32).toBe(0);
    }
    const fb = await e.finalize(b.id);
    unsub();
    expect(seen.length).toBeGreaterThan(0);
    expect(fb.tokensReceived).toBe(fa.tokensReceived);
    expect(fb.bytesReceived).toBe(bytes.length);
    const A = ctxFiles(dataDir, a.id);
    const B = ctxFiles(dataDir, b.id);
    expect(Buffer.compare(A.tokens, B.tokens)).toBe(0);
    expect(A.emb.length).toBe(fa.embeddingBytes);
    expect(Buffer.compare(A.emb, B.emb)).toBe(0);
    // tokens equal tokenizing the whole text
    expect(await e.countTokens(text)).toBe(fa.tokensReceived);
    const list = await e.listContexts();
    expect(list.find((c) => c.id === a.id)!.metadata).toEqual({ name: "one" });
    expect(fa.invalidUtf8).toBe(0);
  });

  test("invalid UTF-8 is counted (each sequence read as U+FFFD), a U+FFFD of the text is not; whatever the pieces", async () => {
    const enc = new TextEncoder();
    const raw = Uint8Array.from([
      ...enc.encode("log line one \uFFFD kept as text\n"),
      0xff,
      0xfe,
      ...enc.encode(" two "),
      0xe6,
      0x97, // a cut 3-byte character: one sequence
      ...enc.encode(" three \uFFFD\n"),
    ]);
    for (const step of [raw.byteLength, 1, 2, 3]) {
      const c = await e.createContext();
      for (let off = 0; off < raw.byteLength; off += step) await e.append(c.id, raw.subarray(off, off + step));
      const info = await e.finalize(c.id);
      expect(info.invalidUtf8).toBe(3);
      expect(info.bytesReceived).toBe(raw.byteLength);
    }
  });

  test("query streams tokens for every method, and plain chat", async () => {
    const c = await e.createContext();
    await e.append(c.id, bytes);
    await e.finalize(c.id);
    for (const method of ["reform", "full", "streaming", "h2o"] as Method[]) {
      const all = await collect(e, {
        contextId: c.id,
        question: "What is the secret code?",
        method,
        sampling: sampling(6),
      });
      // h2o's full-depth pass reports its progress before the answer starts, up to the whole context
      const progress = all.filter((x) => x.type === "progress");
      if (method === "h2o" || method === "streaming") {
        expect(progress.length).toBeGreaterThan(0);
        const last = progress.at(-1)!;
        if (last.type !== "progress") throw new Error();
        expect(last.done).toBe(last.total);
        expect(all.findIndex((x) => x.type === "start")).toBe(progress.length);
      } else expect(progress.length).toBe(0);
      const evs = all.filter((x) => x.type !== "progress");
      expect(evs[0]!.type).toBe("start");
      const done = evs[evs.length - 1]!;
      expect(done.type).toBe("done");
      if (done.type !== "done") throw new Error();
      expect(done.usage.completionTokens).toBeGreaterThan(0);
      expect(evs.filter((x) => x.type === "token").length).toBeGreaterThan(0);
      const start = evs[0]!;
      if (start.type !== "start") throw new Error();
      if (method === "full") expect(start.selectedTokens).toBe(start.contextTokens);
      if (method === "reform") expect(start.selectedTokens).toBe(128);
      // the recurrent baselines hold a cache of 4x the budget (the window is far larger here), template prefix included
      if (method === "h2o" || method === "streaming") {
        const { pre, suf } = promptAround(modelDir, "What is the secret code?", c.id, dataDir);
        expect(start.promptTokens - suf).toBe(4 * 128);
        expect(start.selectedTokens).toBe(4 * 128 - pre);
      }
    }
    const plain = await collect(e, {
      messages: [{ role: "user", content: "hi" }],
      method: "reform",
      sampling: sampling(3),
    });
    expect(plain[plain.length - 1]!.type).toBe("done");
    // greedy is deterministic
    const r1 = await collect(e, { contextId: c.id, question: "code?", method: "reform", sampling: sampling(8) });
    const r2 = await collect(e, { contextId: c.id, question: "code?", method: "reform", sampling: sampling(8) });
    const toks = (evs: QueryEvent[]) => evs.filter((x) => x.type === "token").map((x: any) => x.tokenId);
    expect(toks(r1)).toEqual(toks(r2));
    expect(e.metrics().tokensGeneratedTotal).toBeGreaterThan(0);
  });

  test("request errors", async () => {
    const q = (req: Partial<QueryRequest>) =>
      collect(e, { method: "reform", sampling: sampling(2), question: "q", ...req } as QueryRequest);
    const err = async (p: Promise<unknown>) => {
      try {
        await p;
      } catch (x) {
        return x as EngineError;
      }
      throw new Error("expected an error");
    };
    expect((await err(q({ contextId: "ctx_nope" }))).code).toBe("context_not_found");
    const c = await e.createContext();
    expect((await err(q({ contextId: c.id }))).status).toBe(409);
    await e.append(c.id, new TextEncoder().encode("some text that is not finalized"));
    expect((await err(q({ contextId: c.id }))).code).toBe("context_not_ready");
    await e.finalize(c.id);
    // the request's shape is checked by the same schema the HTTP layer uses (invalid_value + param)
    const bogus = await err(q({ contextId: c.id, method: "bogus" as any }));
    expect([bogus.code, bogus.param]).toEqual(["invalid_value", "method"]);
    const small = await err(q({ contextId: c.id, budget: 5 }));
    expect([small.code, small.param]).toEqual(["invalid_value", "budget"]);
    // what depends on the server's configuration is the engine's own rule
    // the same logit_bias rule as HTTP (at most 1024 entries), for callers that are not HTTP
    const manyBias = Object.fromEntries(Array.from({ length: 1025 }, (_, i) => [i, 1]));
    const bias = await err(q({ contextId: c.id, sampling: { ...sampling(2), logitBias: manyBias } }));
    expect([bias.code, bias.param]).toEqual(["invalid_value", "sampling.logitBias"]);
    const huge = await err(q({ contextId: c.id, budget: 1e9 }));
    expect([huge.status, huge.code, huge.param]).toEqual([400, "budget_too_large", "budget"]);
    const big = await err(
      q({ contextId: c.id, sampling: { maxTokens: 10_000_000, temperature: 0, topP: 1, topK: 0, stop: [] } }),
    );
    expect(big.status).toBe(400);
    expect(big.code).toBe("max_tokens_too_large");
    expect((await err(q({ contextId: c.id, question: undefined, messages: [] }))).status).toBe(400);
    expect((await err(e.append("ctx_nope", new Uint8Array(1)))).status).toBe(404);
  });

  test("abort stops generation and frees the request", async () => {
    const c = await e.createContext();
    await e.append(c.id, bytes);
    await e.finalize(c.id);
    const ac = new AbortController();
    const evs: QueryEvent[] = [];
    // the end tokens banned: a random model's logits are nearly flat, so greedy decoding may reach one within a few
    // tokens when the threads' float sums round differently (seen under load), and that answer would end "stop"
    const noEnd = { [TINY_EOS_ID]: -100, [TINY_EOT_ID]: -100 };
    for await (const ev of e.query({
      contextId: c.id,
      question: "go",
      method: "reform",
      sampling: { ...sampling(2000), logitBias: noEnd },
      signal: ac.signal,
    })) {
      evs.push(ev);
      if (ev.type === "token" && evs.length >= 3) ac.abort();
    }
    const done = evs[evs.length - 1]!;
    expect(done.type).toBe("done");
    if (done.type !== "done") throw new Error();
    expect(done.finishReason).toBe("abort");
    expect(done.usage.completionTokens).toBeLessThan(1000);
    // breaking out of the iterator also cancels; the engine stays usable
    for await (const ev of e.query({ contextId: c.id, question: "go", method: "full", sampling: sampling(600) })) {
      if (ev.type === "token") break;
    }
    const after = await collect(e, { contextId: c.id, question: "go", method: "reform", sampling: sampling(2) });
    expect(after[after.length - 1]!.type).toBe("done");
  });

  test("delete frees files", async () => {
    const c = await e.createContext();
    await e.append(c.id, bytes.subarray(0, 500));
    const dir = join(dataDir, "contexts", c.id);
    expect(existsSync(dir)).toBe(true);
    expect(await e.deleteContext(c.id)).toBe(true);
    expect(existsSync(dir)).toBe(false);
    expect(await e.getContext(c.id)).toBeNull();
    expect(await e.deleteContext(c.id)).toBe(false);
  });
});

describe("restart", () => {
  test("sessions survive a restart, resume mid-upload exactly, answer identically", async () => {
    const dataDir = join(root, "data2");
    const text = mkText();
    const bytes = new TextEncoder().encode(text);
    const opts = { modelDir, dataDir, backend: "cpu" as const, defaults: { ...DEFAULTS, stateSaveEvery: 3 } };
    let e = createEngine(opts);
    await e.ready();
    const ref = await e.createContext();
    await e.append(ref.id, bytes);
    await e.finalize(ref.id);
    const part = await e.createContext();
    const cut = 1234 + 1; // likely inside a word
    await e.append(part.id, bytes.subarray(0, 700));
    await e.append(part.id, bytes.subarray(700, cut));
    const q = {
      contextId: ref.id,
      question: "What is the secret code?",
      method: "reform" as Method,
      sampling: sampling(8),
    };
    const before = (await collect(e, q)).filter((x) => x.type !== "done");
    await e.close();

    e = createEngine(opts);
    await e.ready();
    const ids = (await e.listContexts()).map((c) => c.id);
    expect(ids).toContain(ref.id);
    expect(ids).toContain(part.id);
    const info = (await e.getContext(ref.id))!;
    expect(info.state).toBe("ready");
    const after = (await collect(e, q)).filter((x) => x.type !== "done");
    expect(after).toEqual(before);
    // continue the interrupted upload after the restart
    const pinfo = (await e.getContext(part.id))!;
    expect(pinfo.state).toBe("processing");
    expect(pinfo.bytesReceived).toBe(cut);
    await e.append(part.id, bytes.subarray(cut));
    await e.finalize(part.id);
    const A = ctxFiles(dataDir, ref.id);
    const B = ctxFiles(dataDir, part.id);
    expect(Buffer.compare(A.tokens, B.tokens)).toBe(0);
    expect(Buffer.compare(A.emb, B.emb)).toBe(0);
    const h2oA = await collect(e, { ...q, method: "h2o" });
    const rB = (await collect(e, { ...q, contextId: part.id })).filter((x) => x.type !== "done");
    expect(rB).toEqual(before);
    expect(h2oA[h2oA.length - 1]!.type).toBe("done");
    await e.close();
  });
});

describe("the eviction policy is a setting of the heads file (TOVA)", () => {
  // layer 1 heads: their vectors depend on what layer 0's cache kept, so the policy shows in the stored embeddings
  const heads = [
    { layer: 1, kind: "q" as const, head: 0 },
    { layer: 1, kind: "o" as const, head: 1 },
  ];
  const text = Array.from({ length: 700 }, (_, i) => ["amber", "river", "stone", "seven", "lamp"][(i * 7) % 5]).join(
    " ",
  );
  let dir: string;
  beforeAll(async () => {
    dir = await makeTinyModel(join(root, "model-evict"), { maxPositions: 512, reformHeads: null });
  });

  test("served from the heads file, reported, applied to uploads, and part of what a stored context must match", async () => {
    const data = join(root, "data-evict");
    const open = (eviction?: string) =>
      new EngineCore({
        modelDir: dir,
        dataDir: data,
        backend: "cpu",
        heads: { heads, ...(eviction ? { eviction } : {}) },
      });
    const tova = open("tova");
    let id: string;
    try {
      expect(tova.info.compressor.eviction).toBe("tova");
      const params = uploadCompressParams(tova.e.defaults, tova.e.bos);
      expect(params.eviction).toBe("tova");
      id = tova.createContext().id;
      await tova.append(id, new TextEncoder().encode(text));
      await tova.finalize(id);
      const s = tova.session(id)!;
      const n = s.meta.tokens;
      expect(n).toBeGreaterThan(3 * tova.e.defaults.capacity); // the cache evicted several times
      // the stored rows are what a TOVA compressor computes, not an H2O one
      const rows = (eviction: "h2o" | "tova") => {
        const comp = tova.e.model.createCompressor({ ...params, eviction }, heads);
        try {
          const tokens = s.readTokens(0, n);
          const out: number[] = [];
          const chunk = tova.e.defaults.chunkSize;
          for (let off = 0; off < n; off += chunk) {
            const ids = tokens.subarray(off, Math.min(n, off + chunk));
            const e = comp.process(off === 0 ? Int32Array.from([TINY_BOS_ID, ...ids]) : ids)!;
            out.push(...e.subarray(off === 0 ? comp.embedDim : 0));
          }
          return out;
        } finally {
          comp.destroy();
        }
      };
      const stored = s.withEmbeddings(tova.e.native, (e) => Array.from(e.slice(0, n)));
      expect(stored).toEqual(rows("tova"));
      expect(stored).not.toEqual(rows("h2o"));
    } finally {
      await tova.close();
    }
    // the served default (h2o) refuses the context stored under TOVA: another policy, another cache
    const h2o = open();
    try {
      expect(h2o.info.compressor.eviction).toBe("h2o");
      expect(h2o.getContext(id!)?.error).toMatch(/different model or head\/compression configuration/);
    } finally {
      await h2o.close();
    }
  });
});

describe("limits follow the model (512-token window, derived defaults)", () => {
  let dir512: string;
  let core: EngineCore;
  let ctxId: string;
  const words = (n: number, seed: number) => {
    const w = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven", "lamp", "orbit"];
    let x = seed;
    return Array.from({ length: n }, () => w[(x = (x * 1103515245 + 12345) >>> 0) % w.length]).join(" ");
  };
  // layer 1: its q/k/v depend on what layer 0 attended to (layer 0's are a function of the token alone)
  const heads = [0, 1, 2].map((h) => ({ layer: 1, kind: (["q", "k", "v"] as const)[h], head: 0 }));

  beforeAll(async () => {
    // no chunk / capacity in the heads file: everything comes from max_position_embeddings
    dir512 = await makeTinyModel(join(root, "model512"), { maxPositions: 512, reformHeads: { heads } });
    core = new EngineCore({ modelDir: dir512, dataDir: join(root, "data512"), backend: "cpu" });
    const c = core.createContext();
    ctxId = c.id;
    await core.append(ctxId, new TextEncoder().encode(`${words(900, 3)} The secret code is 4242. ${words(200, 4)}`));
    await core.finalize(ctxId);
  });
  afterAll(async () => {
    await core?.close();
  });

  test("defaults: chunk W/4, capacity W/2, budget 5W/8, max budget 7W/8, max_tokens W/8, largest W/2, no edges, smoothing from the budget", () => {
    const i = core.info;
    expect(i.trainedContext).toBe(512);
    expect(i.defaults).toMatchObject({
      chunkSize: 128,
      capacity: 256,
      maxQueryTokens: 256,
      budget: 320,
      maxBudget: 448,
      maxTokens: 64,
      maxNewTokens: 256,
      maxModelLen: 512,
      smoothingWindow: 33,
      edge: 0,
      sentenceTail: 48,
      scoreFloor: 0.5,
      baselineCacheFactor: 4,
      allowBeyondWindow: false,
    });
    expect(i.defaults.templateTokens).toBe(templateTokensOf(ModelTokenizer.fromDir(dir512)));
    expect(i.compressor).toMatchObject({ chunkSize: 128, capacity: 256, bosTokenId: TINY_BOS_ID, exitLayer: 1 });
    // the default request fits the window with room for a question
    expect(i.defaults.budget + i.defaults.maxTokens + i.defaults.templateTokens).toBeLessThan(512);
  });

  test("BOS once: at the start of the compressed stream (first chunk only) and once in the recompute prompt", () => {
    const s = core.session(ctxId)!;
    const tokens = s.readTokens(0, s.meta.tokens);
    expect(tokens.includes(TINY_BOS_ID)).toBe(false); // tokens.bin: the context's own tokens only
    // the stored embeddings of the first two chunks are what a compressor fed [BOS, ...chunk 1], chunk 2 computes
    const params = uploadCompressParams(core.e.defaults, core.e.bos);
    const rowsOf = (withBos: boolean) => {
      const comp = core.e.model.createCompressor(params, heads);
      try {
        const first = comp.process(
          Int32Array.from(withBos ? [TINY_BOS_ID, ...tokens.subarray(0, 128)] : tokens.subarray(0, 128)),
        )!;
        const second = comp.process(tokens.subarray(128, 256))!;
        const dim = comp.embedDim;
        return [...first.subarray(withBos ? dim : 0), ...second];
      } finally {
        comp.destroy();
      }
    };
    const stored = s.withEmbeddings(core.e.native, (e) => Array.from(e.slice(0, 256)));
    expect(stored).toEqual(rowsOf(true));
    expect(stored).not.toEqual(rowsOf(false));
    // the recompute prompt: BOS once, at the start (the template renders it; the context adds none)
    const q = planQuery(
      core.e,
      parseQuery({ contextId: ctxId, question: "What is the secret code?", method: "reform", sampling: sampling(8) }),
      s,
    );
    const prompt = [...q.pre, ...tokens, ...q.suf];
    expect(prompt[0]).toBe(TINY_BOS_ID);
    expect(prompt.filter((t) => t === TINY_BOS_ID).length).toBe(1);
  });

  test("the question is scored as the recompute prompt has it (template tail included), and the previous user turn too", () => {
    const s = core.session(ctxId)!;
    const tok = core.e.tok;
    const one = planQuery(
      core.e,
      parseQuery({ contextId: ctxId, question: "What is the secret code?", method: "reform", sampling: sampling(8) }),
      s,
    );
    expect(one.queryTurns).toEqual([one.suf]);
    // the tail of the template: question, end of turn and the assistant header, not the bare question
    expect(tok.decode(one.suf, false)).toBe("\n\nWhat is the secret code?<|eot|><|assistant|>\n");
    expect(one.suf.length).toBeGreaterThan(tok.encode("What is the secret code?").length);
    const chat = planQuery(
      core.e,
      parseQuery({
        contextId: ctxId,
        messages: [
          { role: "user", content: "Tell me about the lamp." },
          { role: "assistant", content: "It is bright." },
          { role: "user", content: "And the code?" },
        ],
        method: "reform",
        sampling: sampling(8),
      }),
      s,
    );
    expect(chat.queryTurns).toEqual([chat.suf, tok.encode("Tell me about the lamp.")]);
    expect(tok.decode(chat.suf, false)).toBe("\n\nAnd the code?<|eot|><|assistant|>\n");
    // other methods embed nothing
    const full = planQuery(
      core.e,
      parseQuery({ contextId: ctxId, question: "q", method: "streaming", sampling: sampling(8) }),
      s,
    );
    expect(full.queryTurns).toEqual([]);
  });

  test("inline: the document's end that the cut moves back over is recomputed but not scored; special-token text in it stays text", () => {
    const tok = core.e.tok;
    const memo = new TokenMemo(tok, 1_000_000);
    const doc = `${words(900, 5)} The secret code is 4242. <|eot|> Done.\nif __name__ == "__main__":\n    sys.exit(_test())`;
    const req = parseQuery({
      messages: [{ role: "user", content: `${doc}\n\n\nWhat is the secret code?` }],
      method: "reform",
      sampling: sampling(8),
    });
    const plan = planInline(core.e, memo, req, "t")!;
    // the cut moved back to a safe boundary inside the code: the recompute holds that tail before the question ...
    expect(plan.question).toBe(
      ' "__main__":\n    sys.exit(_test())\n\n\nWhat is the secret code?<|eot|><|assistant|>\n',
    );
    // ... and only the question, as the template ends it, is embedded to score the context
    expect(plan.scored).toBe("What is the secret code?<|eot|><|assistant|>\n");
    const planned = planQuery(
      core.e,
      { ...req, messages: undefined, prompt: plan.question },
      core.session(ctxId)!,
      plan.scored,
    );
    expect(planned.queryTurns).toEqual([tok.encodeSuffix(plan.scored)]);
    // the user's "<|eot|>" is text in the compressed part and in the recompute; the template's own stays special
    const eot = tok.tk.token_to_id("<|eot|>")!;
    expect(Array.from(plan.ids)).not.toContain(eot);
    expect(planned.suf.filter((x) => x === eot)).toHaveLength(1); // the template's end of turn
    expect(tok.decode(planned.suf, false)).toBe(plan.question);
    expect(tok.decode(plan.ids, false)).toContain("The secret code is 4242. <|eot|> Done.");
    // a block cut where the text has no word boundary (CJK) never splits a marked special's text
    const cjk = `${"字".repeat(16380)}${tok.markText("<|eot|>")}${"字".repeat(100)}`;
    expect(Array.from(new TokenMemo(tok, 1_000_000).tokenize(cjk))).toEqual(tok.encode(cjk));
  });

  test("requests that cannot fit are 400s naming the limit", () => {
    const s = core.session(ctxId)!;
    const plan = (req: Record<string, unknown>) => () =>
      planQuery(
        core.e,
        parseQuery({ contextId: ctxId, method: "reform", sampling: sampling(8), question: "q", ...req }),
        s,
      );
    const err = (f: () => unknown) => {
      try {
        f();
      } catch (x) {
        return x as EngineError;
      }
      throw new Error("expected an error");
    };
    // the default budget + a long answer: over the window (512), not capped
    const long = err(plan({ sampling: sampling(200) }));
    expect([long.status, long.code]).toEqual([400, "context_length_exceeded"]);
    expect(long.message).toContain("maximum recompute length is 512 tokens");
    expect(err(plan({ budget: 449 })).code).toBe("budget_too_large");
    expect(err(plan({ budget: 449 })).message).toContain("448");
    expect(err(plan({ sampling: sampling(257) })).message).toContain("maximum of 256 new tokens");
    // a small budget leaves room for a long question in the recompute, but not on top of the compressor's cache
    const question = words(70, 9);
    expect(tokLen(question)).toBeGreaterThan(256);
    const q = err(plan({ budget: 16, question, sampling: sampling(4) }));
    expect([q.status, q.code, q.param]).toEqual([400, "query_too_long", "question"]);
    expect(q.message).toContain("256 tokens fit");
    expect(() => plan({ budget: 16, question, sampling: sampling(4), method: "streaming" })()).not.toThrow();
  });

  test("streaming and h2o: recurrent compressions with a cache of 4x the budget, bounded by the window", async () => {
    const runStart = async (method: Method, budget?: number) => {
      const evs: QueryEvent[] = [];
      await core.query(
        `q-${method}-${budget}`,
        { contextId: ctxId, question: "code?", method, budget, sampling: sampling(4) },
        (ev) => evs.push(ev),
      );
      const start = evs.find((x) => x.type === "start");
      if (!start || start.type !== "start") throw new Error("no start event");
      expect(evs.filter((x) => x.type === "progress").length).toBeGreaterThan(0);
      return start;
    };
    const { pre, suf } = promptAround(dir512, "code?", ctxId, join(root, "data512"));
    expect(core.getContext(ctxId)!.tokensReceived).toBeGreaterThan(600);
    for (const method of ["streaming", "h2o"] as Method[]) {
      // budget 64: 4 x 64 = 256 entries
      const small = await runStart(method, 64);
      expect(small.promptTokens - suf).toBe(256);
      expect(small.selectedTokens).toBe(256 - pre);
      // the default budget 320: 4 x 320 = 1280 does not fit; the window holds 512 - chunk 128 = 384 while compressing
      const dflt = await runStart(method);
      expect(dflt.promptTokens - suf).toBe(384);
      expect(dflt.promptTokens + 4).toBeLessThanOrEqual(512);
    }
  });

  test("a configuration that breaks the window is refused at start, naming the numbers; --allow-beyond-window opts in", async () => {
    const start = async (defaults: Partial<EngineDefaults>, allowBeyondWindow = false) => {
      const e = createEngine({
        modelDir: dir512,
        dataDir: join(root, "data512-cfg"),
        backend: "cpu",
        defaults,
        allowBeyondWindow,
      });
      try {
        await e.ready();
        return e.modelInfo()!;
      } catch (x) {
        return (x as Error).message;
      } finally {
        await e.close();
      }
    };
    expect(await start({ maxModelLen: 1024 })).toContain("max_model_len 1024 exceeds the trained window of 512 tokens");
    expect(await start({ chunkSize: 256, capacity: 384 })).toContain(
      "chunk_size 256 + capacity 384 = 640 exceeds the trained window of 512 tokens",
    );
    expect(await start({ budget: 448, maxTokens: 64 })).toMatch(
      /default budget 448 \+ max_tokens 64 \+ chat template \d+ \+ 1 question token = \d+ exceeds max_model_len 512/,
    );
    expect(await start({ maxModelLen: 400 })).toMatch(
      /maximum budget 448 \+ chat template \d+ .* exceeds max_model_len 400/,
    );
    expect(await start({ maxNewTokens: 500 })).toMatch(/largest max_tokens 500 .* exceeds max_model_len 512/);
    expect(await start({ maxTokens: 100, maxNewTokens: 50 })).toContain(
      "the default max_tokens 100 exceeds the largest max_tokens 50",
    );
    const beyond = await start({ maxModelLen: 1024 }, true);
    if (typeof beyond === "string") throw new Error(beyond);
    expect(beyond.defaults).toMatchObject({ maxModelLen: 1024, allowBeyondWindow: true });
  });
});

function tokLen(text: string): number {
  return ModelTokenizer.fromDir(join(root, "model512")).encode(text).length;
}
