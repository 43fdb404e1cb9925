/**
 * The token selection as the engine did it before the radix select: a full sort of the middle positions by
 * (smoothed score descending, position ascending). The straightforward reference that test/select.test.ts checks
 * query.ts selectTokens and rf_smooth_select against, and the "old" timing in bench/million.ts.
 */
import { edgeFor } from "../../src/engine/selection.ts";

export function referenceSelect(smoothed: Float32Array, budget: number, edge: number): Int32Array {
  const n = smoothed.length;
  if (n <= budget) return Int32Array.from({ length: n }, (_, i) => i);
  const e = edgeFor(budget, edge);
  const chosen = new Uint8Array(n);
  for (let i = 0; i < e; i++) chosen[i] = chosen[n - 1 - i] = 1;
  const mid: number[] = [];
  for (let i = e; i < n - e; i++) mid.push(i);
  mid.sort((a, b) => smoothed[b]! - smoothed[a]! || a - b);
  for (let k = 0; k < budget - 2 * e; k++) chosen[mid[k]!] = 1;
  const out: number[] = [];
  for (let i = 0; i < n; i++) if (chosen[i]) out.push(i);
  return Int32Array.from(out);
}
