/**
 * Llama-2 / Mistral style SentencePiece tokenizers (BPE with byte fallback and "▁" word marks), in both
 * tokenizer.json forms found in the wild: the legacy Prepend("▁") + Replace(" ", "▁") normalizer, and the Metaspace
 * pre-tokenizer with prepend_scheme "first". A context is uploaded in pieces; every piece after the first is
 * tokenized as a continuation (src/model/tokenizer.ts), and the token stream must equal the tokenization of the
 * whole text, whatever the split. Also: the round trip to text (byte fallback), BOS, the chat template.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { EngineClient } from "../src/engine/api.ts";
import { createEngine } from "../src/engine/client.ts";
import { buildMessages, CONTEXT_PLACEHOLDER, splitAtPlaceholder } from "../src/engine/prompt.ts";
import { lastSafeBoundary } from "../src/engine/session.ts";
import { ModelTokenizer } from "../src/model/tokenizer.ts";
import { makeTinyModel, SP_BOS_ID } from "./fixtures/tiny-model.ts";

setDefaultTimeout(60_000);

let root: string;
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), "reform-sp-"));
});
afterAll(() => {
  rmSync(root, { recursive: true, force: true });
});

function text(seed: number, words = 400): string {
  const vocab = [
    "The",
    "the",
    "and",
    "an",
    "a",
    "sing",
    "winter",
    "héllo",
    "naïve",
    "中文字",
    "emoji🎉",
    "it's",
    "I",
    "x.y",
    "",
    "Hat",
  ];
  const out: string[] = [];
  let x = seed >>> 0;
  for (let i = 0; i < words; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    out.push(vocab[x % vocab.length]!);
    if (x % 13 === 0) out.push("\n");
    if (x % 29 === 0) out.push("  "); // runs of spaces
    if (x % 31 === 0) out.push("\t");
  }
  return out.join(" ");
}

/** split the text like the session does: commit up to the last safe boundary of what has arrived */
function pieces(tok: ModelTokenizer, t: string, seed: number): number[] {
  const ids: number[] = [];
  let tail = "";
  let started = false;
  let x = seed >>> 0;
  let off = 0;
  while (off < t.length) {
    x = (x * 1103515245 + 12345) >>> 0;
    const n = 1 + (x % 37);
    tail += t.slice(off, off + n);
    off += n;
    const b = lastSafeBoundary(tail);
    if (b > 0) {
      const commit = tail.slice(0, b);
      tail = tail.slice(b);
      ids.push(...(started ? tok.encodeContinuation(commit) : tok.encode(commit)));
      started = true;
    }
  }
  if (tail) ids.push(...(started ? tok.encodeContinuation(tail) : tok.encode(tail)));
  return ids;
}

for (const style of ["sp-legacy", "sp-metaspace"] as const) {
  describe(`SentencePiece tokenizer (${style})`, () => {
    let modelDir: string;
    let tok: ModelTokenizer;
    beforeAll(async () => {
      modelDir = await makeTinyModel(join(root, style), { tokenizer: style, layers: 1 });
      tok = ModelTokenizer.fromDir(modelDir);
    });

    test("loads: BOS used, byte fallback round trip, leading-space handling detected", () => {
      expect(tok.usesBos).toBe(true);
      expect(tok.bosId).toBe(SP_BOS_ID);
      expect(tok.withBos(tok.encode("The winter"))[0]).toBe(SP_BOS_ID);
      const t = text(3);
      expect(tok.decode(tok.encode(t))).toBe(t);
      // the legacy form prepends "▁" to every encode call, so pieces need the anchor; Metaspace "first" does not
      expect(tok.continuationMode).toBe(style === "sp-legacy" ? "anchor" : "direct");
    });

    test("continuation tokenization of pieces == tokenization of the whole, for many splits", () => {
      for (let s = 1; s <= 25; s++) {
        const t = text(s * 7919);
        const whole = tok.encode(t);
        expect(pieces(tok, t, s)).toEqual(whole);
      }
    });

    test("engine: upload in small pieces == upload at once; a query runs", async () => {
      const e: EngineClient = createEngine({
        modelDir,
        dataDir: join(root, `${style}-data`),
        backend: "cpu",
        defaults: { budget: 128, maxTokens: 4, edge: 16, window: 9 },
      });
      try {
        await e.ready();
        const t = text(11, 300);
        const bytes = new TextEncoder().encode(t);
        const a = await e.createContext();
        await e.append(a.id, bytes);
        const fa = await e.finalize(a.id);
        const b = await e.createContext();
        let x = 5;
        for (let off = 0; off < bytes.length; ) {
          x = (x * 1103515245 + 12345) >>> 0;
          const n = 1 + (x % 19); // splits multi-byte characters too
          await e.append(b.id, bytes.subarray(off, off + n));
          off += n;
        }
        const fb = await e.finalize(b.id);
        const read = (id: string) => readFileSync(join(root, `${style}-data`, "contexts", id, "tokens.bin"));
        expect(Buffer.compare(read(a.id), read(b.id))).toBe(0);
        expect(fb.tokensReceived).toBe(fa.tokensReceived);
        expect(fa.tokensReceived).toBe(tok.encode(t).length);
        const ids = Array.from(new Int32Array(new Uint8Array(read(b.id)).buffer));
        expect(tok.decode(ids)).toBe(t);
        const evs = [];
        for await (const ev of e.query({
          contextId: b.id,
          question: "What is it?",
          method: "reform",
          sampling: { maxTokens: 4, temperature: 0, topP: 1, topK: 0, seed: 1, stop: [] },
        }))
          evs.push(ev);
        expect(evs[0]!.type).toBe("start");
        expect(evs[evs.length - 1]!.type).toBe("done");
      } finally {
        await e.close();
      }
    });
  });
}

describe("prompt around spliced context tokens == tokenizing the whole prompt", () => {
  for (const style of ["bpe", "sp-legacy", "sp-metaspace"] as const) {
    test(`${style}: prefix + context tokens + suffix`, async () => {
      const dir = await makeTinyModel(join(root, `prompt-${style}`), { tokenizer: style, layers: 1 });
      const tok = ModelTokenizer.fromDir(dir);
      const contexts = ["The winter and the sing.", "héllo 中文字 the end", text(5, 60), "x", "I sing\nand sing."];
      const questions = ["What is it?", "Was the winter  cold?", "中文字 and emoji🎉", "and"];
      for (const c of contexts)
        for (const q of questions) {
          const { messages } = buildMessages({ question: q } as any, true) as any;
          const rendered = tok.renderChat(messages, true);
          const parts = splitAtPlaceholder(rendered);
          const ctx = tok.encode(c);
          const { pre, suf } = tok.encodeAround(parts.prefix, ctx[0], parts.suffix);
          const whole = tok.encodePrompt(rendered.replace(CONTEXT_PLACEHOLDER, c));
          expect([...pre, ...ctx, ...suf]).toEqual(whole);
        }
    });
  }
});

describe("special-token text in a message: plain text where exact, else parsed as before (never a changed prompt)", () => {
  for (const style of ["bpe", "sp-legacy", "sp-metaspace"] as const)
    test(`${style}: the other turns' tokens stay what the tokenizer makes of them`, async () => {
      const dir = await makeTinyModel(join(root, `marks-${style}`), { tokenizer: style, layers: 1 });
      const tok = ModelTokenizer.fromDir(dir);
      const special = style === "bpe" ? "<|eot|>" : "</s>";
      const id = tok.tk.token_to_id(special)!;
      const chat = (content: string) => [
        { role: "user", content: "the" },
        { role: "assistant", content: "a test" },
        { role: "user", content },
      ];
      const plain = tok.encodePrompt(tok.renderChat(chat("hat")));
      const ids = tok.encodePrompt(tok.renderChat(chat(`hat ${special}`)));
      const asText = ids.filter((x) => x === id).length === plain.filter((x) => x === id).length;
      // either the user's special is text (and everything before it tokenizes as without it) ...
      if (asText) expect(ids.slice(0, plain.length - 8)).toEqual(plain.slice(0, plain.length - 8));
      // ... or it is parsed, as the tokenizer's own encode of the whole prompt (the SentencePiece "first" form,
      // whose pieces cannot be tokenized apart)
      else
        expect(ids).toEqual(tok.tk.encode(tok.renderChat(chat(`hat ${special}`)), { add_special_tokens: false }).ids);
      expect(tok.decode(ids, false)).toContain(`hat ${special}`);
      if (style !== "sp-metaspace") expect(asText).toBe(true);
    });
});
