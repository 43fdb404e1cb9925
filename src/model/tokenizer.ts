/**
 * Model tokenizer: tokenizer.json + tokenizer_config.json (+ generation_config.json / config.json for
 * eos ids) through @huggingface/tokenizers; chat templates through @huggingface/jinja.
 *
 * - encode(text) never adds special tokens; prompts get BOS once at the start via withBos().
 * - Special-token text ("<|im_end|>") is a control token only where the chat template writes it: in document text
 *   (encodeText, encodeContinuation) and in message contents (renderChat marks them, encode restores them) it is
 *   plain text, as Hugging Face's `split_special_tokens` and vLLM treat untrusted text. Otherwise an uploaded file
 *   about chat models, or a user's message, could end a turn or open another inside the prompt.
 * - encodeContinuation(text) tokenizes a piece of a long text that starts at a "safe boundary"
 *   (just before a space preceded by a non-space) so that the concatenation of the pieces' tokens
 *   equals encode(whole text). For tokenizers where plain encode of the piece already does that
 *   (GPT-2 / Llama 3 byte-level BPE) it is used directly; otherwise (SentencePiece-style prefix
 *   handling) the piece is encoded as encode(ANCHOR + piece) minus encode(ANCHOR). Which mode works
 *   is verified on sample texts at load time (`continuationMode`).
 * - StreamDecoder: incremental detokenizer that only emits stable text (holds back a trailing
 *   U+FFFD, i.e. an incomplete UTF-8 sequence split across byte tokens).
 */
import { Template } from "@huggingface/jinja";
import { Tokenizer } from "@huggingface/tokenizers";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";

export interface ChatMsg {
  role: string;
  content: string;
}

/** Used when the model ships no chat template. */
export const FALLBACK_CHAT_TEMPLATE =
  "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n{% endfor %}" +
  "{% if add_generation_prompt %}Assistant:{% endif %}";

const ANCHOR = "a";
/** Brackets a special-token string from a message content in a rendered prompt (private-use characters around a
 * per-tokenizer nonce and the special's index): encode() writes it back as plain text. */
const MARK_OPEN = "\uE000";
const MARK_CLOSE = "\uE001";

/**
 * `i`, or the start of the marked special-token string it would cut (renderChat's markers are atoms: a cut inside one
 * would put its private-use characters and nonce in front of the model). For cuts that are not at a space.
 */
export function outsideMark(s: string, i: number): number {
  const open = s.lastIndexOf(MARK_OPEN, i - 1);
  if (open < 0 || i - open > 64) return i;
  const close = s.indexOf(MARK_CLOSE, open);
  return close >= 0 && close < i ? i : open;
}

const SAMPLE_TEXTS = [
  "The quick brown fox jumps over the lazy dog. It's 12345 o'clock!\n\nNew paragraph:  two  spaces, tabs\tand émojis 🎉 中文字符 end.",
  "def f(x):\n    return x * 2  # comment\n\n\nclass A: pass",
];

/** GPT-2 byte-level BPE: the printable character that stands for each byte, inverted */
const UNICODE_TO_BYTE: Map<string, number> = (() => {
  const bs: number[] = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = bs.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n++);
    }
  }
  const m = new Map<string, number>();
  bs.forEach((b, i) => m.set(String.fromCharCode(cs[i]!), b));
  return m;
})();

function tokenStr(v: unknown): string | null {
  if (typeof v === "string") return v;
  if (v && typeof v === "object" && typeof (v as any).content === "string") return (v as any).content;
  return null;
}

function readJson(p: string): any | null {
  if (!existsSync(p)) return null;
  return JSON.parse(readFileSync(p, "utf8"));
}

export class ModelTokenizer {
  readonly tk: Tokenizer;
  readonly bosToken: string | null;
  readonly eosToken: string | null;
  readonly bosId: number | null;
  readonly eosIds: Set<number>;
  /** true when the model expects a BOS token at the start of a prompt. */
  readonly usesBos: boolean;
  readonly chatTemplate: string;
  readonly hasChatTemplate: boolean;
  readonly continuationMode: "direct" | "anchor";
  private readonly template: Template;
  private readonly anchorIds: number[];
  /** byte-level BPE (GPT-2 / Llama 3): token strings are bytes mapped to printable characters */
  private readonly byteLevel: boolean;
  private readonly tokenBytesCache = new Map<number, Uint8Array>();
  /** the same tokenizer without its special added tokens: special-token text comes out as plain text */
  private readonly plainTk: Tokenizer;
  /** ids of the special added tokens (template markup: `<|im_start|>`, `<|eot_id|>`, ...) */
  readonly specialIds: Set<number>;
  /** the special tokens' strings, longest first (so that one never matches inside a longer one) */
  private readonly specials: string[];
  private readonly specialRe: RegExp | null;
  /** MARK_OPEN + nonce: what starts a marked special-token string in a rendered prompt */
  private readonly markPrefix = `${MARK_OPEN}${Math.random().toString(36).slice(2, 10)}:`;
  private readonly markRe: RegExp;
  /** whether splitEncode equals the tokenizer on a rendered chat (else message contents keep their specials parsed) */
  private readonly marksExact: boolean;

  constructor(tokenizerJson: any, tokenizerConfig: any, opts: { generationConfig?: any; modelConfig?: any } = {}) {
    this.tk = new Tokenizer(tokenizerJson, tokenizerConfig ?? {});
    const added: { id?: number; content: string; special?: boolean }[] = tokenizerJson?.added_tokens ?? [];
    this.specialIds = new Set(added.filter((t) => t.special && typeof t.id === "number").map((t) => t.id!));
    this.specials = added
      .filter((t) => t.special && t.content.length > 0)
      .map((t) => t.content)
      .sort((a, b) => b.length - a.length);
    this.plainTk = this.specials.length
      ? new Tokenizer({ ...tokenizerJson, added_tokens: added.filter((t) => !t.special) }, tokenizerConfig ?? {})
      : this.tk;
    const esc = (x: string) => x.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    this.specialRe = this.specials.length ? new RegExp(this.specials.map(esc).join("|"), "g") : null;
    this.markRe = new RegExp(`${esc(this.markPrefix)}(\\d+)${MARK_CLOSE}`, "g");
    const hasByteLevel = (d: any): boolean =>
      !!d && (d.type === "ByteLevel" || (Array.isArray(d.decoders) && d.decoders.some(hasByteLevel)));
    this.byteLevel = hasByteLevel(tokenizerJson?.decoder);
    const tc = tokenizerConfig ?? {};
    this.bosToken = tokenStr(tc.bos_token);
    this.eosToken = tokenStr(tc.eos_token);
    const id = (t: string | null) => (t == null ? undefined : this.tk.token_to_id(t));
    const gen = opts.generationConfig ?? {};
    const mc = opts.modelConfig ?? {};
    let bos: number | null = id(this.bosToken) ?? null;
    if (bos === null && typeof gen.bos_token_id === "number") bos = gen.bos_token_id;
    if (bos === null && typeof mc.bos_token_id === "number") bos = mc.bos_token_id;
    this.bosId = bos;
    const eos = new Set<number>();
    const add = (v: unknown) => {
      if (typeof v === "number") eos.add(v);
      else if (Array.isArray(v)) v.forEach(add);
    };
    add(gen.eos_token_id);
    if (gen.eos_token_id === undefined) add(mc.eos_token_id);
    const eid = id(this.eosToken);
    if (eid !== undefined) eos.add(eid);
    this.eosIds = eos;
    // does the model use BOS? tokenizer_config add_bos_token wins; otherwise ask the post-processor.
    if (typeof tc.add_bos_token === "boolean") this.usesBos = tc.add_bos_token && bos !== null;
    else {
      const withSpecial = this.tk.encode("a", { add_special_tokens: true }).ids;
      this.usesBos = bos !== null && withSpecial[0] === bos;
    }
    let tpl: unknown = tc.chat_template;
    if (Array.isArray(tpl)) {
      // [{name, template}] form
      const def = tpl.find((t: any) => t?.name === "default") ?? tpl[0];
      tpl = def?.template;
    }
    this.hasChatTemplate = typeof tpl === "string" && tpl.length > 0;
    this.chatTemplate = this.hasChatTemplate ? (tpl as string) : FALLBACK_CHAT_TEMPLATE;
    this.template = new Template(this.chatTemplate);
    this.anchorIds = this.encode(ANCHOR);
    this.continuationMode = this.detectContinuationMode();
    this.marksExact = this.splitMatches();
  }

  static fromDir(dir: string): ModelTokenizer {
    const tj = readJson(join(dir, "tokenizer.json"));
    if (!tj) throw new Error(`model directory ${dir} has no tokenizer.json`);
    const tc = readJson(join(dir, "tokenizer_config.json")) ?? {};
    return new ModelTokenizer(tj, tc, {
      generationConfig: readJson(join(dir, "generation_config.json")),
      modelConfig: readJson(join(dir, "config.json")),
    });
  }

  get vocabSize(): number {
    return this.tk.get_vocab(true).size;
  }

  /**
   * Tokenization of a prompt, no special tokens added: special-token text in `text` is recognised (the chat
   * template's turn markers), except where renderChat marked it as a message's own text.
   */
  encode(text: string): number[] {
    if (text.length === 0) return [];
    if (!text.includes(this.markPrefix)) return this.tk.encode(text, { add_special_tokens: false }).ids;
    return this.splitEncode(text);
  }

  /**
   * A rendered prompt split at the template's specials (as the tokenizer itself does first), each piece between them
   * tokenized on its own with marked strings written back as plain text. Equal to tk.encode on unmarked text for
   * byte-level BPE; not for every tokenizer (SentencePiece's "first" prefix space, specials that strip their
   * neighbours' whitespace), which `marksExact` checks at load.
   */
  private splitEncode(text: string): number[] {
    const out: number[] = [];
    let at = 0;
    const piece = (to: number) => {
      if (to > at) out.push(...this.encodeText(text.slice(at, to).replace(this.markRe, (_, j) => this.specials[+j]!)));
    };
    for (const m of text.matchAll(this.specialRe!)) {
      piece(m.index);
      out.push(this.tk.token_to_id(m[0])!);
      at = m.index + m[0].length;
    }
    piece(text.length);
    return out;
  }

  /** Document text (an uploaded context, an inline document): special-token strings are plain text. */
  encodeText(text: string): number[] {
    if (text.length === 0) return [];
    return this.plainTk.encode(text, { add_special_tokens: false }).ids;
  }

  decode(ids: ArrayLike<number>, skipSpecial = true): string {
    if (ids.length === 0) return "";
    return this.tk.decode(Array.from(ids), { skip_special_tokens: skipSpecial, clean_up_tokenization_spaces: false });
  }

  /** Prepend BOS once when the model uses one and `ids` does not start with it. */
  withBos(ids: number[]): number[] {
    if (this.usesBos && this.bosId !== null && ids[0] !== this.bosId) return [this.bosId, ...ids];
    return ids;
  }

  /**
   * The bytes one token stands for (as in OpenAI's logprobs `bytes`): byte-level BPE characters mapped back to bytes,
   * SentencePiece byte-fallback tokens `<0xNN>` as that byte, "▁" as a space; special tokens as their text.
   */
  tokenBytes(id: number): Uint8Array {
    let b = this.tokenBytesCache.get(id);
    if (b) return b;
    const t = this.tk.id_to_token(id);
    if (typeof t !== "string") b = new Uint8Array(0);
    else {
      const m = /^<0x([0-9A-Fa-f]{2})>$/.exec(t);
      if (m) b = Uint8Array.of(parseInt(m[1]!, 16));
      else if (this.byteLevel && Array.from(t).every((ch) => UNICODE_TO_BYTE.has(ch)))
        b = Uint8Array.from(Array.from(t), (ch) => UNICODE_TO_BYTE.get(ch)!);
      else b = new TextEncoder().encode(this.byteLevel ? t : t.replace(/▁/g, " "));
    }
    if (this.tokenBytesCache.size < 1 << 20) this.tokenBytesCache.set(id, b);
    return b;
  }

  /** Text of one token on its own (a partial UTF-8 sequence shows as U+FFFD). */
  tokenText(id: number): string {
    return new TextDecoder().decode(this.tokenBytes(id));
  }

  /** Tokenize a piece that starts at a safe boundary of a longer text (see header). */
  encodeContinuation(text: string): number[] {
    if (text.length === 0) return [];
    if (this.continuationMode === "direct") return this.encodeText(text);
    const ids = this.encodeText(ANCHOR + text);
    return ids.slice(this.anchorIds.length);
  }

  /** A piece of a long prompt (an inline request's rendered messages) from a safe boundary on: as
   * encodeContinuation, with the template's special tokens recognised and the messages' own text plain (encode). */
  encodePromptContinuation(text: string): number[] {
    if (text.length === 0) return [];
    if (this.continuationMode === "direct") return this.encode(text);
    return this.encode(ANCHOR + text).slice(this.anchorIds.length);
  }

  /**
   * Tokenize text that directly follows other tokens (the part of a prompt after the spliced context): as if it
   * continued a word, so SentencePiece tokenizers add no "▁" of their own at its start. Anchored when the anchor
   * tokenizes separately, else plain.
   */
  encodeSuffix(text: string): number[] {
    if (text.length === 0) return [];
    const ids = this.encode(ANCHOR + text);
    const a = this.anchorIds;
    if (ids.length >= a.length && a.every((x, i) => ids[i] === x)) return ids.slice(a.length);
    return this.encode(text);
  }

  /** True when token `id` carries a leading space of its own ("▁The" in SentencePiece, "ĠThe" in byte-level BPE). */
  startsWithSpace(id: number): boolean {
    const t = this.tk.id_to_token(id);
    return typeof t === "string" && (t.startsWith("▁") || t.startsWith("Ġ") || t.startsWith(" "));
  }

  /**
   * Prompt tokens around spliced context tokens: prefix (with BOS), then the context, then the suffix, so that the
   * result equals tokenizing the whole prompt text where the tokenizer allows: a space that ends the prefix is
   * left to the context's first token when that token carries its own leading space (SentencePiece), and the
   * suffix is tokenized as a continuation.
   */
  encodeAround(
    prefix: string,
    firstContextToken: number | undefined,
    suffix: string,
  ): { pre: number[]; suf: number[] } {
    let p = prefix;
    if (
      firstContextToken !== undefined &&
      p.endsWith(" ") &&
      !p.endsWith("  ") &&
      this.startsWithSpace(firstContextToken)
    )
      p = p.slice(0, -1);
    return { pre: this.encodePrompt(p), suf: this.encodeSuffix(suffix) };
  }

  private splitMatches(): boolean {
    if (!this.specialRe) return true;
    let rendered: string;
    try {
      rendered = this.renderChat(
        [
          { role: "system", content: "Be brief." },
          { role: "user", content: "Hello there, world.\n\nTwo lines." },
          { role: "assistant", content: " A reply." },
          { role: "user", content: "x y" },
        ],
        true,
      );
    } catch {
      rendered = this.specials.map((sp) => `${sp}user\n Hello there.\n\n`).join("");
    }
    const want = this.tk.encode(rendered, { add_special_tokens: false }).ids;
    const got = this.splitEncode(rendered);
    const same = want.length === got.length && want.every((x, i) => x === got[i]);
    if (!same)
      console.warn(
        "[tokenizer] special-token text in chat messages is parsed as control tokens with this tokenizer: tokenized " +
          "apart, the template's pieces would not match its own tokenization (uploads and inline documents keep it as text)",
      );
    return same;
  }

  private detectContinuationMode(): "direct" | "anchor" {
    const check = (enc: (s: string) => number[]) =>
      SAMPLE_TEXTS.every((t) => {
        const whole = this.encode(t);
        const pieces: number[] = [];
        let start = 0;
        for (let i = 1; i < t.length; i++) {
          if (
            t[i] === " " &&
            t[i - 1] !== " " &&
            t[i - 1] !== "\n" &&
            t[i + 1] !== undefined &&
            !/\s/.test(t[i + 1]!)
          ) {
            pieces.push(...(start === 0 ? this.encode(t.slice(0, i)) : enc(t.slice(start, i))));
            start = i;
          }
        }
        pieces.push(...(start === 0 ? this.encode(t) : enc(t.slice(start))));
        return whole.length === pieces.length && whole.every((x, i) => x === pieces[i]);
      });
    if (check((s) => this.encode(s))) return "direct";
    const anchorOk = check((s) => {
      const ids = this.encode(ANCHOR + s);
      return ids.slice(this.anchorIds.length);
    });
    if (!anchorOk) {
      console.warn(
        "[tokenizer] neither direct nor anchored continuation tokenization matches whole-text tokenization; using anchored",
      );
    }
    return "anchor";
  }

  /** Render the chat template; special-token strings in the messages' contents are marked as their own text. */
  renderChat(messages: ChatMsg[], addGenerationPrompt = true): string {
    return this.template.render({
      messages: messages.map((m) => ({ ...m, content: this.markText(m.content) })),
      add_generation_prompt: addGenerationPrompt,
      bos_token: this.bosToken ?? "",
      eos_token: this.eosToken ?? "",
    });
  }

  /**
   * `text` with its special-token strings marked as plain text, for a prompt that encode() tokenizes; unchanged (its
   * specials parsed, with a warning at load) where the split tokenization would not equal the tokenizer's own.
   */
  markText(text: string): string {
    const re = this.specialRe;
    if (!re || !this.marksExact || text.search(re) < 0) return text;
    return text.replace(re, (m) => `${this.markPrefix}${this.specials.indexOf(m)}${MARK_CLOSE}`);
  }

  /**
   * Tokenize a rendered prompt: special tokens in the text are recognised; BOS added once when
   * the model uses one (templates that already render bos_token do not get a second one).
   */
  encodePrompt(rendered: string, addBos = true): number[] {
    const ids = this.encode(rendered);
    return addBos ? this.withBos(ids) : ids;
  }

  isEos(id: number): boolean {
    return this.eosIds.has(id);
  }

  streamDecoder(): StreamDecoder {
    return new StreamDecoder(this);
  }
}

/**
 * Incremental detokenizer (TGI-style prefix/read offsets): decodes a small window of recent ids and
 * emits the new suffix only when it does not end in U+FFFD (an incomplete multi-byte character).
 */
export class StreamDecoder {
  private ids: number[] = [];
  private prefixOffset = 0;
  private readOffset = 0;
  constructor(private readonly tok: ModelTokenizer) {}

  /** Add one token; returns the text that became stable ("" when none). */
  push(id: number): string {
    this.ids.push(id);
    const prefixText = this.tok.decode(this.ids.slice(this.prefixOffset, this.readOffset));
    const newText = this.tok.decode(this.ids.slice(this.prefixOffset));
    if (newText.length > prefixText.length && !newText.endsWith("\uFFFD") && newText.startsWith(prefixText)) {
      const out = newText.slice(prefixText.length);
      this.prefixOffset = this.readOffset;
      this.readOffset = this.ids.length;
      return out;
    }
    return "";
  }

  /** Whatever is still held back (at the end of generation). */
  flush(): string {
    const prefixText = this.tok.decode(this.ids.slice(this.prefixOffset, this.readOffset));
    const newText = this.tok.decode(this.ids.slice(this.prefixOffset));
    this.prefixOffset = this.readOffset = this.ids.length;
    return newText.length > prefixText.length && newText.startsWith(prefixText) ? newText.slice(prefixText.length) : "";
  }
}
