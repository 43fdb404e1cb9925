/**
 * Pure, testable parts of REFORM query handling: score smoothing, token selection, gathering,
 * prompt construction around the context tokens, stop strings.
 */
import { EngineError, type ChatMessage, type QueryRequest } from "./api.ts";

export const DEFAULT_WINDOW = 129;
export const DEFAULT_EDGE = 256;
/** Placeholder rendered in the user's turn where the context token ids are spliced in. */
export const CONTEXT_PLACEHOLDER = "\u2063REFORM_CONTEXT\u2063";

/** Centered moving average of width `window` (odd; even widths are rounded up). At the edges the
 * average is over the part of the window inside the array. */
export function smoothScores(scores: Float32Array, window = DEFAULT_WINDOW): Float32Array {
  const n = scores.length;
  const out = new Float32Array(n);
  if (n === 0) return out;
  const half = Math.max(0, Math.floor(window / 2));
  if (half === 0) {
    out.set(scores);
    return out;
  }
  const prefix = new Float64Array(n + 1);
  for (let i = 0; i < n; i++) prefix[i + 1] = prefix[i]! + scores[i]!;
  for (let i = 0; i < n; i++) {
    const lo = Math.max(0, i - half);
    const hi = Math.min(n, i + half + 1);
    out[i] = (prefix[hi]! - prefix[lo]!) / (hi - lo);
  }
  return out;
}

/** Edge size actually kept for a budget: min(edge, floor(budget / 4)). */
export function edgeFor(budget: number, edge = DEFAULT_EDGE): number {
  return Math.max(0, Math.min(edge, Math.floor(budget / 4)));
}

/**
 * Select up to `budget` context positions: the first and last `edge` positions always, the rest by
 * highest smoothed score among the middle (ties: earlier position; NaN ranks lowest). Returned sorted ascending.
 * If the context fits the budget, all positions are returned.
 * O(n) without sorting (a million-token context would spend longer in a sort than in scoring): a radix select
 * finds the k-th largest score; cuda/select.h (Native.smoothSelect) is the same algorithm natively.
 */
export function selectTokens(smoothed: Float32Array, budget: number, edge = DEFAULT_EDGE): Int32Array {
  const n = smoothed.length;
  if (n <= budget) {
    const all = new Int32Array(n);
    for (let i = 0; i < n; i++) all[i] = i;
    return all;
  }
  const e = edgeFor(budget, edge);
  const k = budget - 2 * e;
  const keys = scoreKeys(smoothed);
  let key = 0xffffffff;
  let takeEq = 0;
  if (k > 0) ({ key, takeEq } = kthKey(keys, e, n - e, k));
  const out = new Int32Array(Math.max(0, budget));
  let m = 0;
  for (let i = 0; i < n; i++) {
    let keep = i < e || i >= n - e;
    if (!keep && k > 0) {
      const kk = keys[i]!;
      keep = kk > key || (kk === key && takeEq-- > 0);
    }
    if (keep) out[m++] = i;
  }
  return m === out.length ? out : out.slice(0, m);
}

/** Order-preserving uint32 keys of float scores (larger score, larger key); -0 shares +0's key because the
 * selection treats them as equal, NaN gets 0. */
function scoreKeys(x: Float32Array): Uint32Array {
  const f = new Float32Array(x.length);
  const u = new Uint32Array(f.buffer);
  for (let i = 0; i < x.length; i++) f[i] = x[i]! + 0; // -0 + 0 = +0
  for (let i = 0; i < u.length; i++) {
    const b = u[i]!;
    u[i] = x[i] !== x[i] ? 0 : b & 0x80000000 ? ~b >>> 0 : (b | 0x80000000) >>> 0;
  }
  return u;
}

/** The k-th largest key in keys[lo..hi) and how many of the positions holding exactly it are taken. */
function kthKey(keys: Uint32Array, lo: number, hi: number, k: number): { key: number; takeEq: number } {
  const hist = new Int32Array(65536);
  for (let i = lo; i < hi; i++) hist[keys[i]! >>> 16]!++;
  let above = 0;
  let b = 65535;
  while (above + hist[b]! < k) above += hist[b--]!;
  hist.fill(0);
  for (let i = lo; i < hi; i++) {
    const kk = keys[i]!;
    if (kk >>> 16 === b) hist[kk & 0xffff]!++;
  }
  let t = 65535;
  while (above + hist[t]! < k) above += hist[t--]!;
  return { key: ((b << 16) | t) >>> 0, takeEq: k - above };
}

/** tokens[idx[i]] in order. */
export function gather(tokens: Int32Array, idx: Int32Array): Int32Array {
  const out = new Int32Array(idx.length);
  for (let i = 0; i < idx.length; i++) out[i] = tokens[idx[i]!]!;
  return out;
}

/** Streaming baseline: first nSink + last `budget` tokens (all when they cover everything). */
export function streamingSelection(n: number, budget: number, nSink: number): Int32Array {
  if (n <= budget + nSink) return Int32Array.from({ length: n }, (_, i) => i);
  const out: number[] = [];
  for (let i = 0; i < nSink; i++) out.push(i);
  for (let i = n - budget; i < n; i++) out.push(i);
  return Int32Array.from(out);
}

export interface PromptParts {
  /** text before the context (rendered template prefix). */
  prefix: string;
  /** text after the context ("\n\n" + question + template suffix). */
  suffix: string;
  /** the text used to embed the query (the question). */
  question: string;
}

/**
 * Messages for a request. With a context, the last user message (or `question`) becomes
 * CONTEXT_PLACEHOLDER + "\n\n" + question.
 */
export function buildMessages(req: Pick<QueryRequest, "question" | "messages">, withContext: boolean): { messages: ChatMessage[]; question: string } {
  const msgs: ChatMessage[] = (req.messages ?? []).map((m) => ({ role: m.role, content: m.content }));
  let question = req.question ?? "";
  if (req.question !== undefined && req.question !== null) {
    msgs.push({ role: "user", content: req.question });
  }
  if (msgs.length === 0) throw new EngineError(400, "invalid_request", "either `question` or `messages` is required", "messages");
  if (!withContext) return { messages: msgs, question };
  let last = -1;
  for (let i = msgs.length - 1; i >= 0; i--) if (msgs[i]!.role === "user") {
    last = i;
    break;
  }
  if (last < 0) throw new EngineError(400, "invalid_request", "a user message (or `question`) is required to query a context", "messages");
  question = msgs[last]!.content;
  msgs[last] = { role: "user", content: CONTEXT_PLACEHOLDER + "\n\n" + question };
  return { messages: msgs, question };
}

/** Split a rendered prompt around the context placeholder. */
export function splitAtPlaceholder(rendered: string): { prefix: string; suffix: string } {
  const i = rendered.indexOf(CONTEXT_PLACEHOLDER);
  if (i < 0) throw new EngineError(500, "template_error", "the chat template dropped the user message content");
  if (rendered.indexOf(CONTEXT_PLACEHOLDER, i + 1) >= 0) {
    throw new EngineError(500, "template_error", "the chat template repeats the user message content");
  }
  return { prefix: rendered.slice(0, i), suffix: rendered.slice(i + CONTEXT_PLACEHOLDER.length) };
}

/**
 * Stop-string matcher over streamed text. push(text) returns the text safe to emit now (holding back
 * a possible prefix of a stop string) and whether a stop string was hit (text after it is dropped).
 */
export class StopMatcher {
  private held = "";
  private readonly maxLen: number;
  constructor(private readonly stops: string[]) {
    this.stops = stops.filter((s) => s.length > 0);
    this.maxLen = Math.max(0, ...this.stops.map((s) => s.length));
  }
  push(text: string): { emit: string; stopped: boolean } {
    if (this.stops.length === 0) return { emit: text, stopped: false };
    const buf = this.held + text;
    let first = -1;
    for (const s of this.stops) {
      const i = buf.indexOf(s);
      if (i >= 0 && (first < 0 || i < first)) first = i;
    }
    if (first >= 0) {
      this.held = "";
      return { emit: buf.slice(0, first), stopped: true };
    }
    // hold back the longest suffix that is a prefix of some stop string
    let keep = 0;
    for (let k = Math.min(this.maxLen - 1, buf.length); k > 0; k--) {
      const suf = buf.slice(buf.length - k);
      if (this.stops.some((s) => s.startsWith(suf))) {
        keep = k;
        break;
      }
    }
    this.held = buf.slice(buf.length - keep);
    return { emit: buf.slice(0, buf.length - keep), stopped: false };
  }
  flush(): string {
    const h = this.held;
    this.held = "";
    return h;
  }
}
