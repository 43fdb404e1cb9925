/**
 * A question token's background: its mean cosine over the whole context, taken off its scores before the maximum
 * over the question's tokens (rf_score_select's q_offset). Without it a token that matches something in every row (a
 * log line's digits, dashes and punctuation, a code file's brackets) gives every row a high score, and the maximum
 * keeps that match everywhere: the needle's line scored 0.745 and its neighbours 0.734-0.744 in a 16K log. With it
 * each token counts by how much a row stands out from the context as a whole, as IDF weights a term by its rarity.
 * Measured (README, "Documents that are not prose"): log 16K 60.2 -> 74.2, code 16K 69.5 -> 72.7, prose unchanged.
 *
 * Linear, so nearly free: mean_i cos(c_i, q) = q^ . m with m the mean of the context's normalised rows c_i / |c_i|.
 * The session keeps the f64 sum of those rows as its embeddings are written (RowSum) and a query takes one dot product
 * per question token.
 */
import { F16_TABLE } from "../util/f16.ts";

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
