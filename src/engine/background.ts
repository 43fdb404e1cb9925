/**
 * A question token's background: the level its matches must rise above, taken off its scores before the maximum over
 * the question's tokens (rf_score_select's q_offset). Without one a token that matches something in every row (a log
 * line's digits, dashes and punctuation, a code file's brackets) gives every row a high score, and the maximum keeps
 * that match everywhere: the needle's line scored 0.745 and its neighbours 0.734-0.744 in a 16K log. Two backgrounds:
 *
 * - "kth-pairs" (the default): "kth" for the question's tokens and for each pair of tokens next to each other inside one
 *   of its words (cuda/reform.h RF_PAIRS_MAX: the pair matches two consecutive context rows, with the smaller of its two
 *   cosines), each pair's K-th best match taken off its matches. What it is for: a key of common pieces ("virgin-tempo":
 *   " virgin", "-", "t", "empo") matches its pieces one by one all over a million-token context, and with the chat
 *   template around the question ("\n\nWhat are all the values ...?<|im_end|>\n<|im_start|>assistant\n") single pieces
 *   gave high scores to unrelated rows; the pieces in their order are rare. Measured (bench/ruler.ts --methods reform
 *   --paired, seeds 1-2): multi-value at 1M 86 -> 91% of the values gathered, 0.68x -> 0.74x of `full`; the quote's
 *   sentence at 128K 46 -> 54% (seed 2, 24 samples); multi-query at 128K 98 -> 95% (README, "Documents that are not
 *   prose").
 * - "kth": the token's K-th best match over the context (rf_score_kth, K = BACKGROUND_K), with scores
 *   below it counted as 0 (a zero query row, whose cosine is 0 everywhere, joins the maximum). A token then counts
 *   only at the few rows where it matches better than nearly everywhere else, as a rare term does (IDF). What it is
 *   for: with a 1024-token vocabulary a word is several common pieces ("grammar": " gr", "am", "m", "ar"); each piece
 *   alone matches rows all over the context about as well as the word's own row, and the question's other words
 *   ("contains", "sentence") match every row that has them: the K-th best of a piece that recurs everywhere is close to
 *   its best, so only the rows that match it better than anything else keep a score. Measured (README, "Documents
 *   that are not prose"): the quote task's sentence gathered 50% at 16K and 41% at 128K against 9% with "mean"; the
 *   needle tasks as before or better up to 128K (log 16K mean 71.9 -> 79.7), multi-value at 1M lower (0.68x of
 *   `full` against 0.90x).
 * - "mean": its mean cosine over the context. Linear, so nearly free: mean_i cos(c_i, q) = q^ . m with m the mean of
 *   the context's normalised rows c_i / |c_i|; the session keeps their f64 sum as its embeddings are written (RowSum).
 *   Measured: log 16K 60.2 -> 74.2, code 16K 69.5 -> 72.7, prose unchanged, quote not helped.
 */
import { F16_TABLE } from "../util/f16.ts";

/** How a question token's background is taken off its scores (the module comment); "off" is the paper's scoring. */
export const SCORE_BACKGROUNDS = ["kth-pairs", "kth", "mean", "off"] as const;
export type ScoreBackground = (typeof SCORE_BACKGROUNDS)[number];
export const DEFAULT_BACKGROUND: ScoreBackground = "kth-pairs";

/** Whether a background scores pairs of adjacent question tokens too (rf_score_select's pairs). */
export function scoresPairs(b: ScoreBackground): boolean {
  return b === "kth-pairs";
}

/** Whether a background takes each query row's K-th best match off its scores (rf_score_kth). */
export function usesKth(b: ScoreBackground): boolean {
  return b === "kth" || b === "kth-pairs";
}

/** The rank of the match a "kth" background is measured from. Above the number of facts a question may share a key
 * with (a multi-value key stands in 4 needles, and K = 4 gathered none of them at 16K), below the number of rows a
 * common piece matches: K = 16 and 32 gathered alike (bench/background-ablation.ts, 16K-128K); 32 keeps more room for
 * a fact that recurs. */
export const BACKGROUND_K = 32;

/** A request's or flag's value: true (the on|off field of ABI 5's servers) is the default background, false "off". */
export function backgroundOf(v: boolean | ScoreBackground): ScoreBackground {
  return v === true ? DEFAULT_BACKGROUND : v === false ? "off" : v;
}

/** What rf_score_select scores a context with: nq query rows (nq x dim f32), their offsets and pairs (Native
 * ScoreSelection's `offsets`, `pairs`, `pairOffsets`), as a background leaves them. */
export interface ScoreQuery {
  q: Float32Array;
  nq: number;
  offsets?: Float32Array;
  pairs?: Int32Array;
  pairOffsets?: Float32Array;
}

/**
 * rf_score_select's query for a "kth" or "kth-pairs" background: the question's rows plus a zero row at offset 0 (its
 * cosine is 0 on every row, so max_j (cos - kth_j) never falls below 0: a token that does not stand out adds nothing to
 * a row's score, rather than its distance below its K-th best), and the pairs, if any. kth: rf_score_kth of the
 * question's rows and the pairs (nq values, then the pairs': pairOffsets); a -inf (fewer than K rows with a value)
 * counts as 0. Returns nq + 1 rows.
 */
export function kthQuery(
  q: Float32Array,
  nq: number,
  dim: number,
  kth: Float32Array,
  pairs?: Int32Array,
): ScoreQuery & { offsets: Float32Array; pairOffsets: Float32Array } {
  const rows = new Float32Array((nq + 1) * dim);
  rows.set(q.subarray(0, nq * dim));
  const finite = (v: number) => (Number.isFinite(v) ? v : 0);
  const offsets = new Float32Array(nq + 1);
  for (let j = 0; j < nq; j++) offsets[j] = finite(kth[j]!);
  return { q: rows, nq: nq + 1, offsets, pairs, pairOffsets: Float32Array.from(kth.subarray(nq), finite) };
}

/**
 * The pairs of a question's scored rows (rf_score_select's pairs, 2 int32 each): rows that stand for tokens next to
 * each other in the same turn, the second continuing the first's word (`continues`: selection.ts wordContinuations;
 * why only inside a word: there). turns: each turn's tokens; kept: whether a token has a row (rows are numbered in turn
 * order over the kept tokens). At most RF_PAIRS_MAX (4096) pairs: the query is capped far below that.
 */
export function adjacentPairs(
  turns: number[][],
  kept: (id: number) => boolean,
  continues: (id: number) => boolean = () => true,
): Int32Array {
  const out: number[] = [];
  let row = 0;
  for (const t of turns) {
    let prev = -1; // the row of the previous token, when it has one
    for (const id of t) {
      if (!kept(id)) {
        prev = -1;
        continue;
      }
      if (prev >= 0 && continues(id)) out.push(prev, row);
      prev = row++;
    }
  }
  return Int32Array.from(out);
}

/** The sum of a context's first `rows` embedding rows, each L2-normalised (dim f64): what its background derives from. */
export interface RowSum {
  sum: Float64Array;
  rows: number;
}

/** Adds rows [0, n) of `rows` (n x dim, f32 or f16 bits), each divided by its L2 norm (max(|c|, 1e-12), as the
 * scorer's cosine), to `sum` (dim f64). A row with an infinite or NaN value (an f16 overflow) is left out: the scorer
 * gives it NaN, which ranks last, and one such row must not turn the whole context's sum into NaN. */
export function addNormalisedRows(sum: Float64Array, rows: Float32Array | Uint16Array, n: number, dim: number): void {
  // f16 rows widen through the table in place (no copy: this runs on every chunk an upload writes)
  const x: ArrayLike<number> = rows;
  const w = rows instanceof Uint16Array ? F16_TABLE : null;
  for (let i = 0; i < n; i++) {
    const o = i * dim;
    let ss = 0;
    for (let d = 0; d < dim; d++) {
      const v = w ? w[x[o + d]!]! : x[o + d]!;
      ss += v * v;
    }
    if (!Number.isFinite(ss)) continue;
    const inv = 1 / Math.max(Math.sqrt(ss), 1e-12);
    for (let d = 0; d < dim; d++) sum[d]! += (w ? w[x[o + d]!]! : x[o + d]!) * inv;
  }
}

/**
 * The offsets of rf_score_select: offsets[j] = cos-mean of query row j over the context rows a RowSum covers, i.e.
 * (q_j / |q_j|) . (sum / rows). q: nq x dim f32. All zeros for an empty context; 0 for a query row
 * with a non-finite value (rf_score_select refuses non-finite offsets).
 */
export function backgroundOffsets({ sum, rows }: RowSum, q: Float32Array, nq: number, dim: number): Float32Array {
  const out = new Float32Array(nq);
  if (rows <= 0) return out;
  for (let j = 0; j < nq; j++) {
    const o = j * dim;
    let ss = 0;
    let dot = 0;
    for (let d = 0; d < dim; d++) {
      ss += q[o + d]! * q[o + d]!;
      dot += q[o + d]! * sum[d]!;
    }
    const b = dot / Math.max(Math.sqrt(ss), 1e-12) / rows;
    out[j] = Number.isFinite(b) ? b : 0; // a query row the scorer cannot score (NaN) keeps its scores as they are
  }
  return out;
}
