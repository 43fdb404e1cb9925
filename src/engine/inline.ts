/**
 * Inline REFORM: a chat or completion request without a context whose prompt does not fit the window is answered
 * the way the paper frames the task — the whole input is compressed, its end is the question.
 *
 * The split (`planInline`), on the rendered prompt R (the chat template over all messages, or the raw prompt):
 *   - REFORM engages only when R does not fit: BOS + tokens(R) + max_tokens > max_model_len, no context named, and
 *     the request did not turn it off (the routes decide that);
 *   - the question (the end of R that the recompute holds after the gathered tokens, as a raw prompt continuing
 *     them) may have at most `qmax` tokens: min(max_query_tokens, max_model_len − max_tokens − budget − BOS − 1),
 *     so that it can be embedded on top of the compressed context and the recompute fits the window;
 *   - it is the final user turn (its content and everything the template renders after it) when that fits; else the
 *     last paragraph of that turn (after its last blank line, else its last line break); else the last `qmax` tokens
 *     of it, starting at a word;
 *   - the cut then moves back to the nearest "safe boundary" (just before a space between two non-spaces) while the
 *     question still fits: there the tokenization of the compressed part is a prefix of the tokenization of any
 *     longer text, so the next turn of the conversation (which resends everything) extends it exactly;
 *   - everything before the cut is compressed as an implicit context.
 *
 * The cache (`InlineCache`): implicit contexts are ordinary sessions (metadata `inline: true`, `owner`), keyed by
 * sha-256 over the owner and the token ids of their compressed part. A request takes the longest cached context of
 * its owner whose key equals the hash of the same-length prefix of its own ids: equal length is a hit (nothing to
 * compress), shorter is extended in place (only the new ids are appended and compressed), none is a miss (a new
 * context). A compression in flight is shared by every request that needs the same ids; a context being read by a
 * query is not extended until that query ends. Bounds: count, idle age and disk of the implicit contexts (plus the
 * server's --max-disk-bytes), enforced before each compression by deleting the least recently used idle ones.
 *
 * Tokenization is incremental too (`TokenMemo`): the compressed text is tokenized in blocks cut at safe boundaries
 * (a deterministic cut from the start, so a longer text has the same leading blocks), each remembered by the hash of
 * its text, so a follow-up tokenizes only its new blocks.
 */
import { createHash } from "node:crypto";
import {
  EngineError,
  type InlineCache as CacheKind,
  type InlineInfo,
  type InlineMetrics,
  emptyMetrics,
} from "./api.ts";
import type { LoadedEngine } from "./load.ts";
import { CONTEXT_PLACEHOLDER, splitAtPlaceholder } from "./prompt.ts";
import type { QueryWire } from "./schema.ts";
import { outsideMark } from "../model/tokenizer.ts";
import { lastSafeBoundary, type Session } from "./session.ts";

/** Characters per tokenization block (about 5 ms of tokenizer work). */
const BLOCK_CHARS = 16384;
/** Questions are looked for in at most this many characters per allowed token (no token is longer in practice). */
const CHARS_PER_TOKEN_BOUND = 32;

const enc = new TextEncoder();

function isSpace(c: string | undefined): boolean {
  return c !== undefined && /\s/.test(c);
}

/** True when cutting `s` before index `i` is a safe boundary (a space between two non-spaces starts the rest). */
export function isSafeCut(s: string, i: number): boolean {
  return i >= 1 && i < s.length - 1 && s[i] === " " && !isSpace(s[i - 1]) && !isSpace(s[i + 1]);
}

// ------------------------------------------------------------------ tokenization memo

/** Block-wise tokenization of long texts, remembered per block (bounded, least recently used first out). */
export class TokenMemo {
  private readonly blocks = new Map<string, Int32Array>();
  private held = 0;

  constructor(
    private readonly tok: { encode(t: string): number[]; encodePromptContinuation(t: string): number[] },
    private readonly maxTokens: number,
  ) {}

  /** Bytes the memo holds (ids, plus a key per block). */
  get bytes(): number {
    return this.held * 4 + this.blocks.size * 80;
  }

  /** The block boundaries of `text`: greedy from the start, each block ending at its last safe boundary. */
  static cuts(text: string): number[] {
    const out: number[] = [];
    let s = 0;
    while (s < text.length) {
      let end: number;
      if (text.length - s <= BLOCK_CHARS + 1) end = text.length;
      else {
        const b = lastSafeBoundary(text.slice(s, s + BLOCK_CHARS + 1));
        end = b > 0 ? s + b : s + BLOCK_CHARS;
        const c = text.charCodeAt(end);
        if (b === 0 && c >= 0xdc00 && c <= 0xdfff) end--; // never split a surrogate pair
        const whole = b === 0 ? outsideMark(text, end) : end; // nor a marked special's text
        if (whole > s) end = whole;
      }
      out.push(end);
      s = end;
    }
    return out;
  }

  tokenize(text: string): Int32Array {
    const parts: Int32Array[] = [];
    let total = 0;
    let s = 0;
    for (const end of TokenMemo.cuts(text)) {
      const piece = text.slice(s, end);
      const key = `${s === 0 ? 0 : 1}${createHash("sha256").update(piece).digest("base64")}`;
      let ids = this.blocks.get(key);
      if (ids) {
        this.blocks.delete(key);
        this.blocks.set(key, ids);
      } else {
        ids = Int32Array.from(s === 0 ? this.tok.encode(piece) : this.tok.encodePromptContinuation(piece));
        this.blocks.set(key, ids);
        this.held += ids.length;
        while (this.held > this.maxTokens && this.blocks.size > 1) {
          const [k, v] = this.blocks.entries().next().value as [string, Int32Array];
          this.blocks.delete(k);
          this.held -= v.length;
        }
      }
      parts.push(ids);
      total += ids.length;
      s = end;
    }
    const out = new Int32Array(total);
    let o = 0;
    for (const p of parts) {
      out.set(p, o);
      o += p.length;
    }
    return out;
  }
}

// ------------------------------------------------------------------ the split

/** An inline request, split: what is compressed and what is asked. */
export interface InlinePlan {
  owner: string;
  /** the compressed part's token ids (no BOS: the compressor adds it) and the UTF-8 size of its text */
  ids: Int32Array;
  textBytes: number;
  /** the end of the prompt: the recompute's raw prompt after the gathered tokens */
  question: string;
  /** the end of `question` that is embedded to score the context: the question without the document's end that the
   * cut moved back over */
  scored: string;
  questionTokens: number;
  /** context tokens the recompute gathers */
  gathered: number;
}

/**
 * Splits a request whose rendered prompt does not fit the window (rules: file header); null when it fits, or when
 * there is nothing before the question to compress (the ordinary path then answers or refuses it).
 */
export function planInline(e: LoadedEngine, memo: TokenMemo, req: QueryWire, owner: string): InlinePlan | null {
  const d = e.defaults;
  const tok = e.tok;
  const maxTokens = req.sampling.maxTokens;
  const budget = req.budget ?? d.budget;
  const bosLen = tok.usesBos && tok.bosId !== null ? 1 : 0;

  let R: string;
  let natural: number; // where the final turn starts
  let contentEnd: number; // where the final user message's content ends
  if (req.prompt !== undefined) {
    R = req.prompt;
    natural = 0;
    contentEnd = R.length;
  } else {
    const msgs = (req.messages ?? []).map((m) => ({ role: m.role, content: m.content }));
    if (req.question !== undefined) msgs.push({ role: "user", content: req.question });
    let last = -1;
    for (let i = msgs.length - 1; i >= 0 && last < 0; i--) if (msgs[i]!.role === "user") last = i;
    if (last < 0) return null;
    // marked as the user's own text where it holds special-token strings (tokenizer.ts), as renderChat marks the rest
    const content = tok.markText(msgs[last]!.content);
    msgs[last] = { role: "user", content: CONTEXT_PLACEHOLDER };
    const parts = splitAtPlaceholder(tok.renderChat(msgs, true));
    R = parts.prefix + content + parts.suffix;
    natural = parts.prefix.length;
    contentEnd = natural + content.length;
  }
  // at least one byte per token: a prompt this short fits whatever it tokenizes to
  if (enc.encode(R).byteLength + bosLen + maxTokens <= d.maxModelLen) return null;

  const qmax = Math.min(d.maxQueryTokens, d.maxModelLen - maxTokens - budget - bosLen - 1);
  if (qmax < 1)
    throw new EngineError(
      400,
      "context_length_exceeded",
      `this prompt does not fit the window and is answered by REFORM, whose recompute holds the budget (${budget}), ` +
        `the question and max_tokens (${maxTokens}) within max_model_len ${d.maxModelLen}: no room is left for the ` +
        "question; lower max_tokens or the budget",
      "max_tokens",
    );
  const count = (from: number): number =>
    R.length - from > qmax * CHARS_PER_TOKEN_BOUND ? Number.POSITIVE_INFINITY : tok.encodeSuffix(R.slice(from)).length;

  // 1. the final turn; 2. its last paragraph (or line); 3. its last qmax tokens, from a word start
  let qs = -1;
  if (count(natural) <= qmax) qs = natural;
  if (qs < 0) {
    let end = contentEnd;
    while (end > natural && isSpace(R[end - 1])) end--;
    for (const sep of ["\n\n", "\n"]) {
      const p = R.lastIndexOf(sep, end - 1);
      if (p >= natural && p + sep.length < end && count(p + sep.length) <= qmax) {
        qs = p + sep.length;
        break;
      }
    }
  }
  if (qs < 0) qs = tailStart(R, Math.max(natural, R.length - qmax * CHARS_PER_TOKEN_BOUND), qmax, count, tok);
  // move back to a safe boundary (prefix-stable tokenization) while the question still fits; the text moved over is
  // the document's end, recomputed after the gathered tokens but not embedded to score the context (a code file's
  // last lines scored there gathered whitespace and answered wrong where the question alone answered right)
  const asked = qs;
  if (!isSafeCut(R, qs)) {
    const floor = Math.max(1, qs - qmax * 8);
    for (let i = qs - 1; i >= floor; i--) {
      if (!isSafeCut(R, i)) continue;
      if (count(i) <= qmax) qs = i;
      break;
    }
  }
  const compressed = R.slice(0, qs);
  if (compressed.trim().length === 0) return null;
  let ids = memo.tokenize(compressed);
  if (bosLen === 1 && ids[0] === tok.bosId) ids = ids.subarray(1); // templates that render BOS: the compressor adds it
  const question = R.slice(qs);
  const questionTokens = tok.encodeSuffix(question).length;
  if (bosLen + ids.length + questionTokens + maxTokens <= d.maxModelLen) return null; // fits after all
  if (ids.length === 0) return null;

  const method = req.method;
  if (method === "full")
    throw new EngineError(
      400,
      "context_too_long",
      `the prompt has about ${ids.length + questionTokens} tokens, more than the window: method "full" cannot answer it (use "reform")`,
      "method",
    );
  if ((method === "h2o" || method === "streaming") && ids.length > d.maxH2oTokens)
    throw new EngineError(
      400,
      "context_too_long",
      `method "${method}" compresses the whole prompt again at full depth; it has ${ids.length} tokens, more than ` +
        `its limit of ${d.maxH2oTokens}: use method "reform"`,
      "method",
    );
  return {
    owner,
    ids,
    textBytes: enc.encode(compressed).byteLength,
    question,
    scored: R.slice(asked),
    questionTokens,
    gathered: method === "reform" ? Math.min(budget, ids.length) : 0,
  };
}

/** The start of the last `qmax` tokens of R (from `lo` on), moved forward to a word start. */
function tailStart(
  R: string,
  lo: number,
  qmax: number,
  count: (from: number) => number,
  tok: LoadedEngine["tok"],
): number {
  const ids = tok.encodeSuffix(R.slice(lo));
  let bytes = 0;
  for (let i = Math.max(0, ids.length - qmax); i < ids.length; i++) bytes += tok.tokenBytes(ids[i]!).byteLength;
  // walk back `bytes` UTF-8 bytes from the end
  let pos = R.length;
  while (pos > lo && bytes > 0) {
    const c = R.codePointAt(pos - 1)!;
    const low = c >= 0xdc00 && c <= 0xdfff;
    const cp = low ? R.codePointAt(pos - 2)! : c;
    bytes -= cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
    pos -= low ? 2 : 1;
  }
  for (let tries = 0; tries < 8; tries++) {
    let p = pos;
    while (p < R.length - 1 && !isSafeCut(R, p)) p++;
    if (p < R.length - 1 && count(p) <= qmax) return p;
    const at = outsideMark(R, pos);
    if (count(at) <= qmax) return at;
    pos += Math.max(1, Math.floor((R.length - pos) / 10));
  }
  return outsideMark(R, Math.max(lo, R.length - qmax)); // one character per token at worst
}

// ------------------------------------------------------------------ the cache

interface Entry {
  id: string;
  owner: string;
  key: string;
  tokens: number;
  lastUsed: number;
  /** the compression in flight (a miss or an extension), shared by everyone who needs these ids */
  busy: Promise<void> | null;
  /** queries answering from it now; it is not extended or evicted meanwhile */
  readers: number;
  waitIdle: (() => void)[];
  listeners: Set<(done: number, total: number) => void>;
}

/** What the engine lends the cache: its sessions and the one way to compress into them. */
export interface InlineHost {
  create(metadata: Record<string, unknown>): Session;
  session(id: string): Session | undefined;
  /** appends the ids to the session and compresses them all (final), reporting progress; on the engine's chain */
  compress(
    s: Session,
    ids: Int32Array,
    textBytes: number,
    progress: (done: number, total: number) => void,
  ): Promise<void>;
  remove(id: string): Promise<unknown>;
  /** disk the server may still use before --max-disk-bytes (Infinity when uncapped) */
  diskRoom(): number;
}

export interface InlineLease {
  session: Session;
  /** ends this query's use of the context (it may be extended or evicted again) */
  release(): void;
}

/** sha-256 over the owner and the token ids, at each of the given prefix lengths (one pass). */
export function prefixKeys(owner: string, ids: Int32Array, lengths: number[]): Map<number, string> {
  const h = new Bun.CryptoHasher("sha256");
  h.update(owner);
  h.update("\0");
  const bytes = new Uint8Array(ids.buffer, ids.byteOffset, ids.byteLength);
  const out = new Map<number, string>();
  let at = 0;
  for (const L of [...new Set(lengths)].sort((a, b) => a - b)) {
    h.update(bytes.subarray(at * 4, L * 4));
    at = L;
    out.set(L, h.copy().digest("hex"));
  }
  return out;
}

export class InlineCache {
  private readonly entries = new Map<string, Entry>();
  readonly memo: TokenMemo;
  private readonly counters: InlineMetrics = emptyMetrics().inline;

  constructor(
    private readonly e: LoadedEngine,
    private readonly host: InlineHost,
  ) {
    this.memo = new TokenMemo(e.tok, e.defaults.inlineMemoTokens);
  }

  private get maxContexts(): number {
    return Math.max(1, this.e.defaults.inlineMaxContexts);
  }

  /** Takes over an implicit context found on disk at start (its key is recomputed from its tokens). */
  adopt(s: Session): boolean {
    const owner = s.meta.metadata?.owner;
    if (typeof owner !== "string" || s.state !== "ready") return false;
    const ids = s.readTokens(0, s.meta.tokens);
    const key = prefixKeys(owner, ids, [ids.length]).get(ids.length)!;
    this.entries.set(s.id, this.newEntry(s.id, owner, key, ids.length, s.meta.updatedAt));
    return true;
  }

  private newEntry(id: string, owner: string, key: string, tokens: number, lastUsed = Date.now()): Entry {
    return { id, owner, key, tokens, lastUsed, busy: null, readers: 0, waitIdle: [], listeners: new Set() };
  }

  metrics(): InlineMetrics {
    let disk = 0;
    for (const en of this.entries.values()) disk += this.host.session(en.id)?.diskBytes ?? 0;
    return { ...this.counters, contexts: this.entries.size, diskBytes: disk, memoBytes: this.memo.bytes };
  }

  /** The longest cached context of the owner whose ids are a prefix of `ids`, and the key of all of `ids`. */
  private lookup(owner: string, ids: Int32Array): { best: Entry | null; key: string } {
    const cands: Entry[] = [];
    for (const en of this.entries.values()) {
      if (!this.host.session(en.id)) {
        this.entries.delete(en.id); // deleted through the contexts API
        continue;
      }
      if (en.owner === owner && en.tokens <= ids.length) cands.push(en);
    }
    const keys = prefixKeys(owner, ids, [ids.length, ...cands.map((c) => c.tokens)]);
    let best: Entry | null = null;
    for (const c of cands) if (keys.get(c.tokens) === c.key && (!best || c.tokens > best.tokens)) best = c;
    return { best, key: keys.get(ids.length)! };
  }

  /**
   * The implicit context for `p`, compressed: found, extended or created (sharing a compression in flight).
   * `report` hears once which context answers, before any compression; `progress` hears the compression's.
   */
  async acquire(
    p: InlinePlan,
    report: (info: InlineInfo) => void,
    progress: (done: number, total: number) => void,
  ): Promise<InlineLease> {
    const n = p.ids.length;
    let reported = false;
    let waited = false;
    const tell = (en: Entry, cache: CacheKind, appended: number, key: string) => {
      if (reported) return;
      reported = true;
      report({
        contextId: en.id,
        cache,
        contextTokens: n,
        appendedTokens: appended,
        gatheredTokens: p.gathered,
        questionTokens: p.questionTokens,
        key,
      });
    };
    for (;;) {
      const { best, key } = this.lookup(p.owner, p.ids);
      if (best?.busy) {
        tell(best, best.tokens === n && best.key === key ? "shared" : "extend", n - best.tokens, key);
        waited = true;
        best.listeners.add(progress);
        await best.busy.catch(() => {});
        best.listeners.delete(progress);
        continue;
      }
      if (best && best.tokens === n) {
        tell(best, waited ? "shared" : "hit", 0, key);
        if (waited) this.counters.shared++;
        else this.counters.hits++;
        this.counters.requests++;
        return this.lease(best);
      }
      if (best && best.readers > 0) {
        tell(best, "extend", n - best.tokens, key);
        waited = true;
        await new Promise<void>((res) => best.waitIdle.push(res));
        continue;
      }
      const s = best ? this.host.session(best.id) : undefined;
      const add = best ? p.ids.subarray(best.tokens) : p.ids;
      const bytes = Math.max(0, p.textBytes - (s?.meta.bytesReceived ?? 0));
      await this.makeRoom(add.length * (4 + this.rowBytes()), best);
      let en: Entry;
      let session: Session;
      if (best && s) {
        en = best;
        session = s;
        en.key = key;
        en.tokens = n;
        this.counters.extends++;
        tell(en, "extend", add.length, key);
      } else {
        session = this.host.create({ name: `inline ${key.slice(0, 12)}`, inline: true, owner: p.owner });
        en = this.newEntry(session.id, p.owner, key, n);
        this.entries.set(en.id, en);
        this.counters.misses++;
        tell(en, "miss", add.length, key);
      }
      this.counters.requests++;
      this.counters.appendedTokens += add.length;
      en.listeners.add(progress);
      const fan = (done: number, total: number) => {
        for (const l of en.listeners) l(done, total);
      };
      en.busy = this.host.compress(session, Int32Array.from(add), bytes, fan);
      try {
        await en.busy;
      } catch (err) {
        this.entries.delete(en.id);
        void this.host.remove(en.id).catch(() => {});
        throw err;
      } finally {
        en.busy = null;
        en.listeners.delete(progress);
      }
      return this.lease(en);
    }
  }

  private rowBytes(): number {
    return this.e.params.embDim * (this.e.params.embDtype === 1 ? 2 : 4);
  }

  private lease(en: Entry): InlineLease {
    const session = this.host.session(en.id);
    if (!session) throw new EngineError(410, "context_deleted", `context '${en.id}' was deleted`, "context_id");
    en.readers++;
    en.lastUsed = Date.now();
    let released = false;
    return {
      session,
      release: () => {
        if (released) return;
        released = true;
        en.readers--;
        en.lastUsed = Date.now();
        if (en.readers === 0) for (const w of en.waitIdle.splice(0)) w();
      },
    };
  }

  private idle(): Entry[] {
    return [...this.entries.values()]
      .filter((x) => x.busy === null && x.readers === 0)
      .sort((a, b) => a.lastUsed - b.lastUsed);
  }

  private async evict(en: Entry): Promise<void> {
    this.entries.delete(en.id);
    this.counters.evictions++;
    await this.host.remove(en.id);
  }

  /** Deletes the implicit contexts idle longer than the age bound. */
  async evictAged(): Promise<void> {
    const limit = Date.now() - this.e.defaults.inlineMaxAgeSec * 1000;
    for (const en of this.idle()) if (en.lastUsed < limit) await this.evict(en);
  }

  /**
   * Room for one more compression of `bytes` (into `keep`, or a new context): least recently used idle contexts go
   * until the count, the inline disk bound and --max-disk-bytes allow it; 413 when they cannot.
   */
  private async makeRoom(bytes: number, keep: Entry | null): Promise<void> {
    const d = this.e.defaults;
    await this.evictAged();
    const diskOf = (x: Entry) => this.host.session(x.id)?.diskBytes ?? 0;
    const inlineDisk = () => [...this.entries.values()].reduce((a, x) => a + diskOf(x), 0);
    const over = () =>
      (keep === null && this.entries.size >= this.maxContexts) ||
      (d.inlineMaxDiskBytes > 0 && inlineDisk() + bytes > d.inlineMaxDiskBytes) ||
      bytes > this.host.diskRoom();
    for (const en of this.idle()) {
      if (!over()) return;
      if (en !== keep) await this.evict(en);
    }
    if (d.inlineMaxDiskBytes > 0 && bytes + (keep ? diskOf(keep) : 0) > d.inlineMaxDiskBytes)
      throw new EngineError(
        413,
        "disk_quota_exceeded",
        `compressing this prompt needs about ${bytes} bytes of disk, more than the ${d.inlineMaxDiskBytes} bytes ` +
          "inline contexts may use (--inline-max-disk-bytes): upload the document as a context instead, or raise the limit",
        null,
      );
    if (bytes > this.host.diskRoom())
      throw new EngineError(
        413,
        "disk_quota_exceeded",
        `compressing this prompt needs about ${bytes} bytes of disk, more than is left under --max-disk-bytes ` +
          `(${this.host.diskRoom()}): delete contexts you no longer need or raise the limit`,
        null,
      );
    // implicit contexts in use are never evicted: the count can pass its bound while they are
  }
}
