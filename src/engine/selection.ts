/**
 * Which context tokens a query keeps (pure, testable): score smoothing, top-budget selection with the
 * always-kept edges (a radix select, no sort), and gathering. The engine's
 * reform path runs the same smoothing (either operator) and selection natively (rf_score_select, cuda/select.h);
 * these are the reference the native code must match value for value, and what reports and tools use.
 */

export const DEFAULT_WINDOW = 129;
export const DEFAULT_EDGE = 256;

/** How a token's score is pooled over its window at query time: the mean or the max (both native too: rf_score_select
 * takes the operator, Native.scoreSelect's `pool`). */
export type SmoothingOp = "mean" | "max";
export const SMOOTHING_OPS: readonly SmoothingOp[] = ["mean", "max"];

/** Moving average (or, with op "max", moving maximum) of width `window` (odd; even widths are rounded up), trailing
 * each position i by `lag` (0 <= lag <= window / 2: the window covers [i - lag - window/2, i - lag + window/2]; 0
 * centers it, the paper's smoothing). At the edges the window is the part of it inside the array. Why a lag (this
 * project's addition; README "Choosing the defaults"): a question matches a fact's key, and its value comes after the
 * key, so a trailing window lets the value's tokens share the key's score. */
export function smoothScores(
  scores: Float32Array,
  window = DEFAULT_WINDOW,
  op: SmoothingOp = "mean",
  lag = 0,
): Float32Array {
  if (op === "max") return maxPool(scores, window, lag);
  const n = scores.length;
  const out = new Float32Array(n);
  checkLag(window, lag);
  if (n === 0) return out;
  const half = maxLag(window);
  if (half === 0) {
    out.set(scores);
    return out;
  }
  const prefix = new Float64Array(n + 1);
  for (let i = 0; i < n; i++) prefix[i + 1] = prefix[i]! + scores[i]!;
  for (let i = 0; i < n; i++) {
    const lo = Math.max(0, i - lag - half);
    const hi = Math.min(n, i - lag + half + 1);
    out[i] = (prefix[hi]! - prefix[lo]!) / (hi - lo);
  }
  return out;
}

/** The largest lag a smoothing window of width `window` allows: half of it, so a token stays inside its own window
 * (cuda/select.h check_lag is the native twin). */
export function maxLag(window: number): number {
  return Math.max(0, Math.floor(window / 2));
}

function checkLag(window: number, lag: number): void {
  if (!Number.isInteger(lag) || lag < 0 || lag > maxLag(window))
    throw new RangeError(`smoothing lag ${lag} must be an integer in [0, window / 2 = ${maxLag(window)}]`);
}

/** Moving maximum of width `window` (odd; even widths rounded up), trailing each position by `lag` as smoothScores,
 * O(n) with a monotone deque; NaN counts as the lowest score. */
export function maxPool(scores: Float32Array, window: number, lag = 0): Float32Array {
  const n = scores.length;
  const out = new Float32Array(n);
  checkLag(window, lag);
  const half = maxLag(window);
  if (half === 0 || n === 0) {
    out.set(scores);
    return out;
  }
  const v = (i: number) => (Number.isNaN(scores[i]!) ? Number.NEGATIVE_INFINITY : scores[i]!);
  const dq = new Int32Array(n); // indices with decreasing values
  let head = 0;
  let tail = 0;
  let next = 0; // next index to push
  for (let i = 0; i < n; i++) {
    const hi = Math.min(n, i - lag + half + 1);
    for (; next < hi; next++) {
      const x = v(next);
      while (tail > head && v(dq[tail - 1]!) <= x) tail--;
      dq[tail++] = next;
    }
    while (dq[head]! < i - lag - half) head++;
    out[i] = v(dq[head]!);
  }
  return out;
}

/**
 * Smoothing window, its lag, edge and sentence tail for a request's budget: the configured values hold at the default
 * budget and scale with the budget (src/engine/load.ts LIMIT_RATIOS says why); the window stays odd, the lag inside
 * half the window, the edges take at most half the budget (edgeFor), the tail at most a quarter.
 */
export function selectionFor(
  d: { budget: number; window: number; edge: number; sentenceTail?: number; lag?: number },
  budget: number,
): { window: number; lag: number; edge: number; tail: number } {
  const scale = budget / d.budget;
  const w0 = Math.max(1, Math.round(d.window * scale));
  const window = w0 % 2 === 0 ? w0 + 1 : w0;
  const lag = Math.min(maxLag(window), Math.round((d.lag ?? 0) * scale));
  const tail = Math.min(Math.floor(budget / 4), Math.round((d.sentenceTail ?? 0) * scale));
  return { window, lag, edge: edgeFor(budget, Math.round(d.edge * scale)), tail };
}

/** Sorted ascending indices -> maximal runs of consecutive indices, as [start, end) pairs. */
export function mergeRuns(idx: ArrayLike<number>): [number, number][] {
  const runs: [number, number][] = [];
  for (let i = 0; i < idx.length; i++) {
    const x = idx[i]!;
    const last = runs[runs.length - 1];
    if (last && last[1] === x) last[1] = x + 1;
    else runs.push([x, x + 1]);
  }
  return runs;
}

/** sentenceEnds' flags per token id */
export const END_PUNCT = 1; // ends in '.', '?' or '!' (closing quotes and brackets aside): a sentence end before whitespace
export const END_NEWLINE = 2; // holds a newline: ends one where it stands
export const STARTS_SPACE = 4; // begins with whitespace: what may follow an END_PUNCT token at a sentence end

/** Per token id, flags (END_PUNCT, END_NEWLINE, STARTS_SPACE) from which completeSentences tells where a sentence
 * ends: a period followed by anything but whitespace is inside one ("e.g.,", "1.0", "os.path"); counted as ends,
 * these took quoted sentences apart at their abbreviations (bench/ruler.ts --tasks quote --show-misses). */
export function sentenceEnds(vocabSize: number, tokenBytes: (id: number) => Uint8Array): Uint8Array {
  const out = new Uint8Array(vocabSize);
  for (let id = 0; id < vocabSize; id++) {
    const b = tokenBytes(id);
    if (b.length > 0 && (b[0] === 0x20 || b[0] === 0x09 || b[0] === 0x0a || b[0] === 0x0d)) out[id]! |= STARTS_SPACE;
    if (b.includes(0x0a)) out[id]! |= END_NEWLINE;
    // the token's last character before closing quotes and brackets: ".\"" ends, ".," does not
    let k = b.length - 1;
    while (k >= 0 && (b[k] === 0x22 || b[k] === 0x27 || b[k] === 0x29 || b[k] === 0x5d)) k--;
    if (k >= 0 && (b[k] === 0x2e || b[k] === 0x3f || b[k] === 0x21)) out[id]! |= END_PUNCT;
  }
  return out;
}

/**
 * Per token id: does its row of the question's embeddings score the context (1), or is it template markup (a
 * special token) or whitespace only (0)? The question is embedded whole, as it stands at the end of the recompute
 * prompt, but a context token's score is its best match over the question's own tokens: the chat template's
 * newlines and markers around the question matched every newline and indentation run of a document that is not
 * prose, and in C headers and license files whitespace was gathered instead of the needle (README, "Documents that are
 * not prose").
 */
export function queryScorers(
  vocabSize: number,
  tokenBytes: (id: number) => Uint8Array,
  specialIds: ReadonlySet<number>,
): Uint8Array {
  return byteTable(vocabSize, tokenBytes, specialIds, (b) => b.some((c) => !isSpace(c)));
}

const isSpace = (c: number) => c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d;

/** Per token id: 1 where `test` holds for its bytes, 0 for special tokens and where it does not. */
function byteTable(
  vocabSize: number,
  tokenBytes: (id: number) => Uint8Array,
  specialIds: ReadonlySet<number>,
  test: (b: Uint8Array) => boolean,
): Uint8Array {
  const out = new Uint8Array(vocabSize);
  for (let id = 0; id < vocabSize; id++) if (!specialIds.has(id) && test(tokenBytes(id))) out[id] = 1;
  return out;
}

/**
 * Per token id: does it continue the word of the token before it (1: its first byte is not whitespace) or start one
 * (0: whitespace first, a special token, or no bytes)? Two adjacent question tokens form a scored pair only inside one
 * word (background.ts adjacentPairs): a key of common pieces (`virgin-tempo`: ` virgin`, `-`, `t`, `empo`) matched in
 * order is rare where its pieces alone are everywhere, while pairs across words (`contains the`) matched the few places
 * a phrase of common words recurs and took the quote task's budget (bench/ruler.ts seed 2, 24 samples: the sentence
 * gathered 41.7% with every pair at 16K, 50% with word pairs and with none).
 */
export function wordContinuations(
  vocabSize: number,
  tokenBytes: (id: number) => Uint8Array,
  specialIds: ReadonlySet<number>,
): Uint8Array {
  return byteTable(vocabSize, tokenBytes, specialIds, (b) => b.length > 0 && !isSpace(b[0]!));
}

/**
 * Complete the sentences of the gathered passages (this project's addition to the paper's gathering; README "Choosing
 * the defaults" has the measurements): the selection is made with `tail` fewer tokens than the budget; then
 *   1. each passage (a run of consecutive selected positions, the always-kept edges aside) gives up the partial
 *      sentences at its ends, the piece before its first sentence start and the piece after its last sentence end,
 *      as long as the sentence at the passage's middle stays (a centered window's passage is centered on its peak);
 *   2. those tokens and the tail extend the passages that stop inside a sentence forward, to and including the next
 *      token that ends a sentence, at most `maxTail` tokens each, longest passages first, and with what is left,
 *      backward to the start of their sentence; the scored passages first, the always-kept edges only with what
 *      they leave;
 *   3. whatever is still left takes the given-up pieces back, so nothing of the budget goes unused.
 * Longest first: the longest run is where the most top-scored tokens cluster, and it needs no scores (the native
 * selection returns positions only). Why: the question matches a fact's key, and a window centered on the key stops
 * partway into a long value (a uuid is 30+ tokens) after it; the neighbouring sentences' fragments the window also
 * takes are what pays for the rest of the value when four facts share a small budget. (Dropping the 1-4 token shards
 * that near-threshold peaks leave, to spend their tokens here too, gathered a little more but answered no better:
 * bench/ruler.ts at 16K and 128K, 6 samples per task. Closing the gaps of up to 8 tokens between passages first, so
 * that a ragged peak's shards join up, answered about the same at 2K-128K but gathered less at 128K and answered 6
 * instead of 8 of the CI quality test's needles: not kept either.) Scored passages before edges: a fact that starts
 * cut ("al magic words for K is: V." for "One of the special magic words ...") halves what a small model restates
 * from facts side by side, and the edges' completion had taken the tokens that would have mended it (README,
 * "Choosing the defaults").
 *
 * idx: selected positions, ascending (selectTokens / rf_score_select); tokens: the context's ids (n); ends:
 * sentenceEnds of the vocabulary. Returns positions ascending, at most idx.length + tail of them.
 */
export function completeSentences(
  idx: Int32Array,
  tokens: Int32Array,
  ends: Uint8Array,
  tail: number,
  o: { maxTail?: number } = {},
): Int32Array {
  const maxTail = o.maxTail ?? 64;
  if (tail <= 0 || idx.length === 0) return idx;
  const n = tokens.length;
  const isEnd = (t: number) => {
    const f = ends[tokens[t]!]!;
    return (
      (f & END_NEWLINE) !== 0 || ((f & END_PUNCT) !== 0 && (t + 1 >= n || (ends[tokens[t + 1]!]! & STARTS_SPACE) !== 0))
    );
  };
  // longest passages first; positions kept in a set, so the work follows the budget, not the context's length
  const runs = mergeRuns(idx).sort((x, y) => y[1] - y[0] - (x[1] - x[0]) || x[0] - y[0]);
  const taken = new Set<number>(idx);
  const givenUp: number[] = [];
  const giveUp = (from: number, to: number) => {
    for (let t = from; t < to; t++) {
      taken.delete(t);
      givenUp.push(t);
    }
  };
  const atEdge = (r: [number, number]) => r[0] === 0 || r[1] === n;
  for (const r of runs) {
    const [a, b] = r;
    if (atEdge(r)) continue; // the edges are kept as they are
    const mid = (a + b - 1) >> 1;
    // a run starting inside a sentence: the piece up to the first sentence end before the middle
    if (!isEnd(a - 1))
      for (let t = a; t < mid; t++)
        if (isEnd(t)) {
          giveUp(a, t + 1);
          r[0] = t + 1;
          break;
        }
    // a run stopping inside a sentence: the piece after the last sentence end from the middle on
    if (!isEnd(b - 1))
      for (let t = b - 2; t >= mid; t--)
        if (isEnd(t)) {
          giveUp(t + 1, b);
          r[1] = t + 1;
          break;
        }
  }
  let left = tail + givenUp.length;
  // forward to the sentence end (a run that ends one already is complete)
  const forward = (r: [number, number]) => {
    if (isEnd(r[1] - 1)) return;
    for (let t = r[1]; t < n && t - r[1] < maxTail && left > 0 && !taken.has(t); t++) {
      taken.add(t);
      left--;
      if (isEnd(t)) break;
    }
  };
  // backward to the sentence start (the token after the previous sentence end)
  const backward = (r: [number, number]) => {
    for (let t = r[0] - 1; t >= 0 && r[0] - 1 - t < maxTail && left > 0 && !taken.has(t) && !isEnd(t); t--) {
      taken.add(t);
      left--;
    }
  };
  // the scored passages whole at both ends before the edges get anything
  const scored = runs.filter((r) => !atEdge(r));
  const edges = runs.filter(atEdge);
  for (const rs of [scored, edges]) for (const step of [forward, backward]) for (const r of rs) if (left > 0) step(r);
  // the given-up pieces back, in the order given up, while tokens are left
  for (let i = 0; i < givenUp.length && left > 0; i++)
    if (!taken.has(givenUp[i]!)) {
      taken.add(givenUp[i]!);
      left--;
    }
  return taken.size === idx.length && givenUp.length === 0 ? idx : Int32Array.from(taken).sort();
}

/** The smoothed score (smoothScores: the same window, operator and lag) at each of `positions`, from the raw scores
 * around them only, so the work follows the positions (a budget's worth), not the context's length. */
export function smoothedAt(
  scores: Float32Array,
  positions: ArrayLike<number>,
  window: number,
  op: SmoothingOp = "mean",
  lag = 0,
): Float32Array {
  checkLag(window, lag);
  const n = scores.length;
  const half = maxLag(window);
  const out = new Float32Array(positions.length);
  for (let j = 0; j < positions.length; j++) {
    const i = positions[j]!;
    const lo = Math.max(0, i - lag - half);
    const hi = Math.min(n, i - lag + half + 1);
    if (op === "max") {
      let m = Number.NEGATIVE_INFINITY;
      for (let t = lo; t < hi; t++) if (scores[t]! > m) m = scores[t]!; // NaN never wins, as in maxPool
      out[j] = m;
    } else {
      let sum = 0;
      for (let t = lo; t < hi; t++) sum += scores[t]!;
      out[j] = sum / (hi - lo);
    }
  }
  return out;
}

/**
 * The score floor (this project's addition to the paper's gathering; README "Choosing the defaults" has the
 * measurement): of the selected positions, keep those whose smoothed score reaches `floor` of the way from the lowest
 * selected score to the best one (0 keeps them all: the paper fills the budget by score; 1 keeps only the best). The
 * always-kept edges (the first and last `edge` of `n` positions) take no part and stay. Why: the budget is filled by
 * rank, so with one or two facts in a long context most of it goes to passages that merely share the question's
 * common words ("the value corresponding to"), and a small model copies its answer from one of those; a floor between
 * the noise and the best passage drops them, and the budget they held goes to completing sentences (refineSelection).
 * Relative to the selection's own range, so it does not depend on the heads' score scale.
 *
 * idx: selected positions, ascending; smoothed: their smoothed scores (smoothedAt), aligned with idx; NaN ranks
 * lowest. Returns the kept positions, ascending (idx itself when all are kept).
 */
export function keepNearBest(
  idx: Int32Array,
  smoothed: Float32Array,
  floor: number,
  edge: number,
  n: number,
): Int32Array {
  if (floor <= 0) return idx;
  const middle = (i: number) => i >= edge && i < n - edge;
  let best = Number.NEGATIVE_INFINITY;
  let low = Number.POSITIVE_INFINITY;
  for (let j = 0; j < idx.length; j++) {
    const v = smoothed[j]!;
    if (!middle(idx[j]!) || Number.isNaN(v)) continue;
    if (v > best) best = v;
    if (v < low) low = v;
  }
  if (best === Number.NEGATIVE_INFINITY) return idx;
  const cut = low + floor * (best - low);
  const kept = idx.filter((i, j) => !middle(i) || smoothed[j]! >= cut);
  return kept.length === idx.length ? idx : kept;
}

/** Gathering after the scored selection, as a query runs it (gather.ts; bench/window-sweep.ts replays it): the score
 * floor over the selected positions (keepNearBest; `scores` are the raw per-token scores, needed only with a floor),
 * then the sentence completion (completeSentences) with the tail plus what the floor dropped. */
export function refineSelection(
  idx: Int32Array,
  scores: Float32Array | null,
  tokens: Int32Array,
  ends: Uint8Array,
  s: { window: number; op: SmoothingOp; lag: number; edge: number; tail: number; floor: number },
): Int32Array {
  const kept =
    s.floor > 0 && scores
      ? keepNearBest(idx, smoothedAt(scores, idx, s.window, s.op, s.lag), s.floor, s.edge, scores.length)
      : idx;
  return completeSentences(kept, tokens, ends, s.tail + idx.length - kept.length);
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
    u[i] = Number.isNaN(x[i]!) ? 0 : b & 0x80000000 ? ~b >>> 0 : (b | 0x80000000) >>> 0;
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
