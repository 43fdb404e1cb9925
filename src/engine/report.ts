/**
 * What a query gathered, for people (the opt-in `selection` of a query's `start` event; the web page draws it):
 * the selected context tokens merged into [start, end) runs with their text and place in the document, and the
 * smoothed scores over the whole context downsampled to a strip of at most PROFILE_BUCKETS values. Pure; runs
 * only when a request asks for it, after the native selection (gather.ts), so the query path is unchanged otherwise.
 *
 * Places are counted over the tokens' own bytes (`tokenBytes`), i.e. in the text as the server decoded and
 * tokenized it: for valid UTF-8 and a byte-level BPE tokenizer (Llama 3, Qwen, reform-tiny) these are the uploaded
 * file's byte offsets; a SentencePiece tokenizer's "▁" counts as the space it stands for. Characters are Unicode
 * code points (as `text_offset` in routes/openai.ts); a span that starts inside a character starts at the next one.
 */
import type { Method, SelectedSpan, Selection } from "./api.ts";
import type { ScoreBackground } from "./background.ts";
import { mergeRuns } from "./selection.ts";

export const PROFILE_BUCKETS = 512;

export interface TokenBytesSource {
  tokenBytes(id: number): Uint8Array;
}

/** Per-id byte length and count of character starts (bytes that are not UTF-8 continuation bytes), filled lazily. */
class TokenPlaces {
  private readonly bytes = new Map<number, number>();
  private readonly starts = new Map<number, number>();
  constructor(private readonly tok: TokenBytesSource) {}
  of(id: number): { bytes: number; starts: number } {
    let b = this.bytes.get(id);
    let c = this.starts.get(id);
    if (b === undefined || c === undefined) {
      const tb = this.tok.tokenBytes(id);
      b = tb.length;
      c = 0;
      for (const x of tb) if ((x & 0xc0) !== 0x80) c++;
      this.bytes.set(id, b);
      this.starts.set(id, c);
    }
    return { bytes: b, starts: c };
  }
}

const places = new WeakMap<TokenBytesSource, TokenPlaces>();

/** Max of `values` per bucket: bucket i covers [floor(i*n/B), floor((i+1)*n/B)), B = min(n, buckets). */
export function downsampleMax(values: Float32Array, buckets = PROFILE_BUCKETS): number[] {
  const n = values.length;
  const b = Math.min(n, buckets);
  const out = new Array<number>(b);
  for (let i = 0; i < b; i++) {
    const lo = Math.floor((i * n) / b);
    const hi = Math.floor(((i + 1) * n) / b);
    let m = -Infinity;
    for (let j = lo; j < hi; j++) if (values[j]! > m) m = values[j]!;
    out[i] = Number.isFinite(m) ? m : 0;
  }
  return out;
}

export interface ReportInput {
  method: Method;
  /** all context tokens */
  tokens: Int32Array;
  /** gathered positions, ascending */
  idx: ArrayLike<number>;
  /** smoothed score of every context token, or null when the method scored nothing */
  smoothed: Float32Array | null;
  window: number;
  lag: number;
  edge: number;
  /** the score floor the gathering used (0: none, or nothing scored) */
  scoreFloor?: number;
  /** the background the question tokens' scores counted from (background.ts; "off": none, or nothing scored) */
  scoreBackground?: ScoreBackground;
}

export function selectionReport(tok: TokenBytesSource, r: ReportInput): Selection {
  let p = places.get(tok);
  if (!p) places.set(tok, (p = new TokenPlaces(tok)));
  const runs = mergeRuns(r.idx);
  const spans: SelectedSpan[] = [];
  const dec = new TextDecoder("utf-8", { fatal: false, ignoreBOM: true });
  // one walk over the tokens up to the last run's end: byte and character offsets at each run's edges
  let pos = 0;
  let bytes = 0;
  let chars = 0;
  const advance = (to: number) => {
    for (; pos < to; pos++) {
      const t = p.of(r.tokens[pos]!);
      bytes += t.bytes;
      chars += t.starts;
    }
  };
  for (const [start, end] of runs) {
    advance(start);
    const byteStart = bytes;
    const charStart = chars;
    const parts: Uint8Array[] = [];
    let len = 0;
    for (let i = start; i < end; i++) {
      const b = tok.tokenBytes(r.tokens[i]!);
      parts.push(b);
      len += b.length;
    }
    const buf = new Uint8Array(len);
    let off = 0;
    for (const b of parts) {
      buf.set(b, off);
      off += b.length;
    }
    advance(end);
    let score: number | null = null;
    if (r.smoothed) {
      let m = -Infinity;
      for (let i = start; i < end; i++) if (r.smoothed[i]! > m) m = r.smoothed[i]!;
      score = Number.isFinite(m) ? m : null;
    }
    spans.push({ start, end, byteStart, byteEnd: bytes, charStart, charEnd: chars, score, text: dec.decode(buf) });
  }
  let profile: Selection["profile"] = null;
  if (r.smoothed) {
    const values = downsampleMax(r.smoothed);
    let min = Infinity;
    let max = -Infinity;
    for (const v of values) {
      if (v < min) min = v;
      if (v > max) max = v;
    }
    profile = { buckets: values.length, values, min: values.length ? min : 0, max: values.length ? max : 0 };
  }
  return {
    method: r.method,
    contextTokens: r.tokens.length,
    selectedTokens: r.idx.length,
    window: r.window,
    lag: r.lag,
    edge: r.edge,
    scoreFloor: r.scoreFloor ?? 0,
    scoreBackground: r.scoreBackground ?? "off",
    spans,
    profile,
  };
}
