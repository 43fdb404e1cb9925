/**
 * Query-time selection at scale: query.ts selectTokens (radix select) and the native rf_smooth_select
 * (cuda/select.h, in the CPU build and in the CUDA source compiled for the emulation) against a
 * straightforward reference — a full sort with the comparator the engine used before (score descending,
 * then position) — on random data with many ties, -0/+0, edge-dominated budgets and tiny inputs; for both pooling
 * operators (mean and max), the native smoothing against selection.ts smoothScores, value for value.
 */
import { beforeAll, describe, expect, test } from "bun:test";
import { closeSync, existsSync, ftruncateSync, mkdtempSync, openSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { type Pointer, toArrayBuffer } from "bun:ffi";
import { join } from "node:path";
import { Native, NativeError, RF_F16, ROOT_DIR } from "../ffi/native.ts";
import { SMOOTHING_OPS, selectTokens, smoothScores } from "../src/engine/selection.ts";
import { kthQuery } from "../src/engine/background.ts";
import { f32ToF16 } from "./fixtures/tiny-model.ts";
import { mulberry32 } from "./helpers/random-model.ts";
import { referenceSelect } from "./helpers/select-reference.ts";
import { buildNative } from "./helpers/build.ts";

type Kind = "uniform" | "ties" | "signed-zero" | "constant" | "negative";
function scores(n: number, kind: Kind, seed: number): Float32Array {
  const r = mulberry32(seed);
  const s = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    if (kind === "uniform") s[i] = r() * 2 - 1;
    else if (kind === "ties")
      s[i] = Math.floor(r() * 5) / 4; // 5 distinct values: heavy ties at every cut
    else if (kind === "signed-zero") s[i] = r() < 0.5 ? (r() < 0.5 ? -0 : 0) : r() < 0.5 ? 1 : -1;
    else if (kind === "constant") s[i] = 0.25;
    else s[i] = -1 - r() * 1e-3;
  }
  return s;
}

/** [n, budget, edge, window] */
const CASES: [number, number, number, number][] = [
  [1, 16, 256, 129],
  [16, 16, 256, 129],
  [17, 16, 256, 129], // one position dropped
  [100, 16, 256, 1], // edge = budget / 4
  [100, 17, 0, 3], // no edges
  [300, 40, 10, 9], // even split of edges and middle
  [1000, 64, 256, 129], // window wider than budget
  [1000, 999, 256, 129],
  [5000, 512, 256, 4], // even window
  [20000, 4096, 256, 129],
  [3, 2, 0, 0], // window 0: no smoothing
];

describe("selection matches the sort-based reference", () => {
  for (const kind of ["uniform", "ties", "signed-zero", "constant", "negative"] as Kind[]) {
    test(`selectTokens, ${kind}`, () => {
      CASES.forEach(([n, budget, edge, window], c) => {
        const sm = smoothScores(scores(n, kind, 1000 + c), window);
        // the raw scores as well: without smoothing, ties are exact and frequent
        for (const s of [sm, scores(n, kind, 2000 + c)]) {
          const ref = referenceSelect(s, budget, edge);
          const got = selectTokens(s, budget, edge);
          expect(got.length).toBe(Math.min(n, budget));
          expect(Array.from(got)).toEqual(Array.from(ref));
        }
      });
    });
  }
});

const EMU_LIB = join(ROOT_DIR, "build", "libreform_cuda_emu.so");
const libs: [string, () => Native][] = [["cpu", () => new Native("cpu")]];
if (process.arch === "x64") libs.push(["cuda source (emulation build)", () => new Native("cuda", EMU_LIB)]);

describe("native rf_smooth_select", () => {
  beforeAll(() => {
    buildNative();
  }, 600_000);

  for (const [name, open] of libs) {
    test(`${name}: same smoothed bits and indices as query.ts`, () => {
      if (name !== "cpu" && !existsSync(EMU_LIB)) throw new Error(`${EMU_LIB} was not built`);
      const native = open();
      try {
        for (const kind of ["uniform", "ties", "signed-zero", "constant", "negative"] as Kind[]) {
          CASES.forEach(([n, budget, edge, window], c) => {
            const raw = scores(n, kind, 3000 + c);
            const smRef = smoothScores(raw, window);
            const sm = new Float32Array(n);
            const got = native.smoothSelect(raw, window, budget, edge, sm);
            expect(Buffer.from(sm.buffer).equals(Buffer.from(smRef.buffer))).toBe(true);
            expect(Array.from(got)).toEqual(Array.from(referenceSelect(smRef, budget, edge)));
          });
        }
        // large enough that a prefix sum drifts: the f64 running sums must still match query.ts bit for bit
        const big = scores(300_000, "uniform", 7).map((x) => x * 1e4 + 3e4);
        const smBig = new Float32Array(big.length);
        const idx = native.smoothSelect(big, 129, 8192, 256, smBig);
        const smRef = smoothScores(big, 129);
        expect(Buffer.from(smBig.buffer).equals(Buffer.from(smRef.buffer))).toBe(true);
        expect(Array.from(idx)).toEqual(Array.from(referenceSelect(smRef, 8192, 256)));
        expect(native.smoothSelect(new Float32Array(0), 129, 100, 16).length).toBe(0);
        expect(() => native.smoothSelect(new Float32Array(10), 3, -1, 0)).toThrow(NativeError);
        expect(native.lastError()).toContain("rf_smooth_select");
        native.smoothSelect(new Float32Array(10), 3, 4, 0); // a success clears the thread's error
        expect(native.lastError()).toBe("");
      } finally {
        native.close();
      }
    });
  }
});

/** Max pooling's own hard cases: NaN (counts as -inf), -inf, runs of equal values, a lone peak at each end. */
function poolCases(seed: number): Float32Array[] {
  const r = mulberry32(seed);
  const nan = Float32Array.from({ length: 300 }, () => (r() < 0.2 ? Number.NaN : r() < 0.1 ? -Infinity : r() - 0.5));
  const plateau = Float32Array.from({ length: 500 }, (_, i) => Math.floor(i / 37) % 3);
  const peaks = new Float32Array(257).fill(-1);
  peaks[0] = 5;
  peaks[256] = 4;
  return [nan, plateau, peaks, Float32Array.from([Number.NaN, Number.NaN, 1, Number.NaN])];
}

describe("native max pooling (rf_smooth_select with RF_POOL_MAX)", () => {
  for (const [name, open] of libs) {
    test(`${name}: the same pooled values and indices as selection.ts maxPool + selectTokens`, () => {
      const native = open();
      try {
        const inputs: [Float32Array, number, number, number][] = [];
        for (const kind of ["uniform", "ties", "signed-zero", "constant", "negative"] as Kind[])
          CASES.forEach(([n, budget, edge, window], c) =>
            inputs.push([scores(n, kind, 5000 + c), window, budget, edge]),
          );
        for (const x of poolCases(9)) for (const window of [1, 3, 21, 64, 1001]) inputs.push([x, window, 40, 2]);
        for (const [raw, window, budget, edge] of inputs) {
          const smRef = smoothScores(raw, window, "max");
          const sm = new Float32Array(raw.length);
          const got = native.smoothSelect(raw, window, budget, edge, sm, "max");
          // bit for bit (NaN in, -inf out, as the reference)
          expect(Buffer.from(sm.buffer).equals(Buffer.from(smRef.buffer))).toBe(true);
          // selectTokens: the reference selection (the sort-based one orders NaN, left by a window of 1, arbitrarily)
          expect(Array.from(got)).toEqual(Array.from(selectTokens(smRef, budget, edge)));
        }
        // the operator is honoured: max and mean pooling of the same scores select differently
        const raw = scores(2000, "uniform", 77);
        expect(Array.from(native.smoothSelect(raw, 21, 100, 4, undefined, "max"))).not.toEqual(
          Array.from(native.smoothSelect(raw, 21, 100, 4, undefined, "mean")),
        );
      } finally {
        native.close();
      }
    });
  }
});

describe("smoothing lag (the window trails each token)", () => {
  test("the reference: a trailing window is the centered one moved back by the lag, clipped at the ends", () => {
    const raw = scores(400, "uniform", 41);
    for (const op of ["mean", "max"] as const) {
      const lagged = smoothScores(raw, 21, op, 6);
      // away from the ends, position i pools what the centered window pools at i - lag
      const centered = smoothScores(raw, 21, op);
      for (let i = 40; i < 360; i++) expect(lagged[i]).toBe(centered[i - 6]!);
    }
    // a peak raises the tokens after it more than those before it
    const peak = new Float32Array(101);
    peak[50] = 1;
    const sm = smoothScores(peak, 11, "mean", 4);
    expect(sm[59]! > 0 && sm[40] === 0).toBe(true);
    expect(() => smoothScores(raw, 21, "mean", 11)).toThrow(RangeError);
    expect(() => smoothScores(raw, 21, "max", -1)).toThrow(RangeError);
  });

  for (const [name, open] of libs) {
    test(`${name}: rf_smooth_select and rf_score_select with a lag, bit for bit as selection.ts`, () => {
      const native = open();
      try {
        for (const op of ["mean", "max"] as const)
          for (const [n, window, lag] of [
            [300, 21, 10],
            [1000, 49, 16],
            [5, 9, 4],
            [777, 3, 1],
          ] as const) {
            const raw = scores(n, "uniform", 900 + n + lag);
            const smRef = smoothScores(raw, window, op, lag);
            const sm = new Float32Array(n);
            const got = native.smoothSelect(raw, window, 64, 2, sm, op, lag);
            expect(Buffer.from(sm.buffer).equals(Buffer.from(smRef.buffer))).toBe(true);
            expect(Array.from(got)).toEqual(Array.from(selectTokens(smRef, 64, 2)));
          }
        // the fused path: the same indices as scoring, then the reference's lagged selection
        const dim = 16;
        const n = 2000;
        const ctx = scores(n * dim, "uniform", 5);
        const q = scores(3 * dim, "uniform", 6);
        const raw = new Float32Array(n);
        const idx = native.scoreSelect(ctx, n, dim, q, 3, { window: 21, lag: 8, budget: 100, edge: 4 }, raw);
        expect(Array.from(idx)).toEqual(Array.from(selectTokens(smoothScores(raw, 21, "mean", 8), 100, 4)));
        expect(() => native.smoothSelect(raw, 21, 100, 4, undefined, "mean", 11)).toThrow(NativeError);
        expect(native.lastError()).toContain("lag = 11");
      } finally {
        native.close();
      }
    });
  }
});

function toF16(x: Float32Array): Uint16Array {
  return Uint16Array.from(x, f32ToF16);
}

describe("native rf_score_select", () => {
  for (const [name, open] of libs) {
    test(`${name}: scores within 1e-5 of rf_score, indices of the reference selection on them (mean and max)`, () => {
      const native = open();
      const emu = name !== "cpu";
      try {
        const r = mulberry32(41);
        // dims: a multiple of 16 and one with a scalar tail; query rows: 1, 4 (one block) and 7 (block + tail)
        for (const [n, dim, nQ, budget] of (emu
          ? [[600, 24, 3, 64]]
          : [
              [5000, 192, 1, 512],
              [3000, 70, 4, 256],
              [4000, 64, 7, 4000],
              [2500, 128, 5, 2600],
            ]) as number[][]) {
          const ctx = Float32Array.from({ length: n! * dim! }, () => r() * 2 - 1);
          for (let d = 0; d < dim!; d++) ctx[7 * dim! + d] = 0; // an all-zero row scores 0
          const ctx16 = toF16(ctx);
          const q = Float32Array.from({ length: nQ! * dim! }, () => r() * 2 - 1);
          for (const c of [ctx, ctx16]) {
            const ref = native.score(c, n!, dim!, q, nQ!);
            const scores = new Float32Array(n!);
            const idx = native.scoreSelect(c, n!, dim!, q, nQ!, { window: 9, budget: budget!, edge: 16 }, scores);
            let worst = 0;
            for (let i = 0; i < n!; i++) worst = Math.max(worst, Math.abs(scores[i]! - ref[i]!));
            expect(worst).toBeLessThan(1e-5);
            expect(scores[7]).toBe(0);
            expect(Array.from(idx)).toEqual(Array.from(referenceSelect(smoothScores(scores, 9), budget!, 16)));
            // without a scores buffer: the same selection
            expect(
              Array.from(native.scoreSelect(c, n!, dim!, q, nQ!, { window: 9, budget: budget!, edge: 16 })),
            ).toEqual(Array.from(idx));
            // each operator natively == the reference pooling and selection (selection.ts) of the same raw scores
            for (const pool of SMOOTHING_OPS) {
              const own = new Float32Array(n!);
              const sel = { window: 9, budget: budget!, edge: 16, pool };
              const got = native.scoreSelect(c, n!, dim!, q, nQ!, sel, own);
              expect(Array.from(got)).toEqual(Array.from(selectTokens(smoothScores(own, 9, pool), budget!, 16)));
            }
          }
        }
        expect(
          native.scoreSelect(new Uint16Array(0), 0, 8, new Float32Array(8), 1, { window: 9, budget: 16, edge: 4 })
            .length,
        ).toBe(0);
        expect(() =>
          native.scoreSelect(new Float32Array(8), 1, 8, new Float32Array(8), 0, { window: 9, budget: 16, edge: 4 }),
        ).toThrow(NativeError);
        native.scoreSelect(new Float32Array(8), 1, 8, new Float32Array(8), 1, { window: 9, budget: 16, edge: 4 });
        expect(native.lastError()).toBe("");
      } finally {
        native.close();
      }
    });
  }
});

describe("native rf_score_select with per-query offsets (the question tokens' background, background.ts)", () => {
  for (const [name, open] of libs) {
    test(`${name}: score_i = max_j (cos(ctx_i, q_j) - offset_j), as rf_score per query row computes it; bad offsets refused`, () => {
      const native = open();
      try {
        const r = mulberry32(43);
        const [n, dim, nQ] = name === "cpu" ? [3000, 70, 19] : [500, 24, 5]; // 19: a block of 16 and a tail
        const ctx32 = Float32Array.from({ length: n * dim }, () => r() * 2 - 1);
        const q = Float32Array.from({ length: nQ * dim }, () => r() * 2 - 1);
        const offsets = Float32Array.from({ length: nQ }, () => r() * 0.4 - 0.1);
        // f32 rows (the CUDA build's f32 GEMM) and f16 rows (its tensor-core pair), the CPU build's one path
        for (const ctx of [ctx32, toF16(ctx32)]) {
          const perRow = Array.from({ length: nQ }, (_, j) =>
            native.score(ctx, n, dim, q.subarray(j * dim, (j + 1) * dim), 1),
          );
          const expected = Float32Array.from({ length: n }, (_, i) =>
            Math.max(...perRow.map((s, j) => s[i]! - offsets[j]!)),
          );
          const scores = new Float32Array(n);
          const sel = { window: 9, budget: 256, edge: 8, offsets };
          const idx = native.scoreSelect(ctx, n, dim, q, nQ, sel, scores);
          let worst = 0;
          for (let i = 0; i < n; i++) worst = Math.max(worst, Math.abs(scores[i]! - expected[i]!));
          expect(worst).toBeLessThan(1e-5);
          expect(Array.from(idx)).toEqual(Array.from(referenceSelect(smoothScores(scores, 9), 256, 8)));
          // the offsets change the order: the plain scores select other tokens
          const plain = native.scoreSelect(ctx, n, dim, q, nQ, { window: 9, budget: 256, edge: 8 });
          expect(Array.from(plain)).not.toEqual(Array.from(idx));
          // zero offsets are no offsets, bit for bit
          const zero = new Float32Array(n);
          const none = new Float32Array(n);
          native.scoreSelect(ctx, n, dim, q, nQ, { ...sel, offsets: new Float32Array(nQ) }, zero);
          native.scoreSelect(ctx, n, dim, q, nQ, { window: 9, budget: 256, edge: 8 }, none);
          expect(Array.from(zero)).toEqual(Array.from(none));
          const bad = Float32Array.from(offsets);
          bad[nQ - 1] = Number.NaN;
          expect(() => native.scoreSelect(ctx, n, dim, q, nQ, { ...sel, offsets: bad })).toThrow(
            /q_offset\[\d+\] is not finite/,
          );
          expect(() => native.scoreSelect(ctx, n, dim, q, nQ, { ...sel, offsets: offsets.subarray(1) })).toThrow(
            /offsets for/,
          );
        }
      } finally {
        native.close();
      }
    });
  }
});

describe("native rf_score_kth (each question token's k-th best match, background.ts)", () => {
  for (const [name, open] of libs) {
    test(`${name}: the k-th largest cosine per query row, the same cosines rf_score_select takes its offsets from`, () => {
      const native = open();
      try {
        const r = mulberry32(47);
        const [n, dim, nQ] = name === "cpu" ? [3000, 70, 19] : [500, 24, 5];
        const ctx32 = Float32Array.from({ length: n * dim }, () => r() * 2 - 1);
        const q = Float32Array.from({ length: nQ * dim }, () => r() * 2 - 1);
        for (const ctx of [ctx32, toF16(ctx32)]) {
          const perRow = Array.from({ length: nQ }, (_, j) =>
            Array.from(native.score(ctx, n, dim, q.subarray(j * dim, (j + 1) * dim), 1)).sort((a, b) => b - a),
          );
          for (const k of [1, 3, 32, 1000]) {
            const kth = native.scoreKth(ctx, n, dim, q, nQ, k);
            for (let j = 0; j < nQ; j++) expect(Math.abs(kth[j]! - perRow[j]![Math.min(k, n) - 1]!)).toBeLessThan(1e-5);
          }
          // k beyond the context: its last (smallest) cosine
          const few = native.scoreKth(ctx, 300, dim, q, nQ, 1024);
          for (let j = 0; j < nQ; j++) {
            const last = Math.min(...native.score(ctx, 300, dim, q.subarray(j * dim, (j + 1) * dim), 1));
            expect(Math.abs(few[j]! - last)).toBeLessThan(1e-5);
          }
          // taken off as offsets, each query row's k-th best row scores exactly 0 (the same bits on both sides)
          const k = 32;
          for (let j = 0; j < nQ; j++) {
            const qj = q.subarray(j * dim, (j + 1) * dim);
            const off = native.scoreKth(ctx, n, dim, qj, 1, k);
            const scores = new Float32Array(n);
            native.scoreSelect(ctx, n, dim, qj, 1, { window: 1, budget: 8, edge: 0, offsets: off }, scores);
            let atLeast = 0;
            let above = 0;
            for (const s of scores) {
              if (s >= 0) atLeast++;
              if (s > 0) above++;
            }
            expect(above).toBeLessThan(k);
            expect(atLeast).toBeGreaterThanOrEqual(k);
            expect(scores.some((s) => s === 0)).toBe(true);
          }
        }
        // an f16 overflow row has no cosine: left out, so k = all the rows finds one row too few
        const withInf = toF16(ctx32);
        withInf.fill(0x7c00, 0, dim);
        const short = native.scoreKth(withInf, 300, dim, q, nQ, 300);
        expect(Array.from(short).every((v) => v === Number.NEGATIVE_INFINITY)).toBe(true);
        const full = native.scoreKth(withInf, 300, dim, q, nQ, 299);
        expect(Array.from(full).every((v) => Number.isFinite(v))).toBe(true);
        expect(Array.from(native.scoreKth(new Float32Array(0), 0, dim, q, nQ, 4))).toEqual(
          new Array(nQ).fill(Number.NEGATIVE_INFINITY),
        );
        expect(() => native.scoreKth(ctx32, n, dim, q, nQ, 0)).toThrow(/k = 0 outside \[1, 1024\]/);
        expect(() => native.scoreKth(ctx32, n, dim, q, nQ, 1025)).toThrow(/k = 1025 outside/);
      } finally {
        native.close();
      }
    });
  }
});

describe("native query row pairs (bigram matching: rf_score_kth and rf_score_select with pairs, background.ts)", () => {
  for (const [name, open] of libs) {
    test(`${name}: P_p(i) = min(cos(ctx_{i-1}, q_a), cos(ctx_i, q_b)); its k-th best; a pair counts for both its rows; NaN rows left out; bad pairs refused`, () => {
      const native = open();
      try {
        const r = mulberry32(53);
        const [n, dim, nQ] = name === "cpu" ? [3000, 70, 19] : [500, 24, 5];
        const ctx32 = Float32Array.from({ length: n * dim }, () => r() * 2 - 1);
        const q = Float32Array.from({ length: nQ * dim }, () => r() * 2 - 1);
        // neighbours in the question, and one row paired with itself
        const ab = [...Array.from({ length: nQ - 1 }, (_, j) => [j, j + 1]).flat(), 2, 2];
        const pairs = Int32Array.from(ab);
        const nP = pairs.length / 2;
        for (const ctx of [ctx32, toF16(ctx32)]) {
          const cos = Array.from({ length: nQ }, (_, j) =>
            native.score(ctx, n, dim, q.subarray(j * dim, (j + 1) * dim), 1),
          );
          const P = (p: number, i: number) => Math.min(cos[pairs[2 * p]!]![i - 1]!, cos[pairs[2 * p + 1]!]![i]!);
          const sorted = Array.from({ length: nP }, (_, p) =>
            Array.from({ length: n - 1 }, (_, i) => P(p, i + 1)).sort((x, y) => y - x),
          );
          for (const k of [1, 32, 1024]) {
            const kth = native.scoreKth(ctx, n, dim, q, nQ, k, pairs);
            expect(kth.length).toBe(nQ + nP);
            const single = native.scoreKth(ctx, n, dim, q, nQ, k);
            expect(Array.from(kth.subarray(0, nQ))).toEqual(Array.from(single)); // the single rows unchanged
            // k is clamped to the n - 1 rows a pair can end at
            for (let p = 0; p < nP; p++)
              expect(Math.abs(kth[nQ + p]! - sorted[p]![Math.min(k, n - 1) - 1]!)).toBeLessThan(1e-5);
          }
          const few = native.scoreKth(ctx, 300, dim, q, nQ, 1024, pairs);
          for (let p = 0; p < nP; p++) {
            const last = Math.min(...Array.from({ length: 299 }, (_, i) => P(p, i + 1)));
            expect(Math.abs(few[nQ + p]! - last)).toBeLessThan(1e-5);
          }
          const offsets = Float32Array.from({ length: nQ }, () => r() * 0.4 - 0.1);
          const pairOffsets = Float32Array.from({ length: nP }, () => r() * 0.4 - 0.3);
          const scores = new Float32Array(n);
          const sel = { window: 9, budget: 256, edge: 8, offsets, pairs, pairOffsets };
          const idx = native.scoreSelect(ctx, n, dim, q, nQ, sel, scores);
          let worst = 0;
          let byPair = 0;
          for (let i = 0; i < n; i++) {
            const one = Math.max(...cos.map((c, j) => c[i]! - offsets[j]!));
            let two = Number.NEGATIVE_INFINITY;
            for (let p = 0; p < nP; p++)
              for (const e of [i, i + 1]) if (e >= 1 && e < n) two = Math.max(two, P(p, e) - pairOffsets[p]!);
            if (two > one) byPair++;
            worst = Math.max(worst, Math.abs(scores[i]! - Math.max(one, two)));
          }
          expect(worst).toBeLessThan(1e-5);
          expect(byPair).toBeGreaterThan(n / 10); // the pairs decide a share of the rows, so the test sees them
          expect(Array.from(idx)).toEqual(Array.from(referenceSelect(smoothScores(scores, 9), 256, 8)));
          // taken off as offsets (the single rows far below), each pair's k-th best end row scores exactly 0
          const k = 32;
          const kth = native.scoreKth(ctx, n, dim, q, nQ, k, pairs.subarray(0, 2));
          const only = new Float32Array(n);
          native.scoreSelect(
            ctx,
            n,
            dim,
            q,
            nQ,
            {
              window: 1,
              budget: 8,
              edge: 0,
              offsets: new Float32Array(nQ).fill(5),
              pairs: pairs.subarray(0, 2),
              pairOffsets: kth.subarray(nQ),
            },
            only,
          );
          expect(only.some((v) => v === 0)).toBe(true);
          const atLeast = only.filter((v) => v >= 0).length;
          expect(atLeast).toBeGreaterThanOrEqual(k); // each end row and the row before it
          expect(atLeast).toBeLessThanOrEqual(2 * k);
        }
        // an f16 overflow row has no cosine: the two pairs it is part of are left out
        const withInf = toF16(ctx32);
        withInf.fill(0x7c00, 5 * dim, 6 * dim);
        const m = 300;
        const all = native.scoreKth(withInf, m, dim, q, nQ, m - 1, pairs);
        const most = native.scoreKth(withInf, m, dim, q, nQ, m - 3, pairs);
        for (let p = 0; p < nP; p++) {
          expect(all[nQ + p]).toBe(Number.NEGATIVE_INFINITY);
          expect(Number.isFinite(most[nQ + p]!)).toBe(true);
        }
        const nanScores = new Float32Array(m);
        native.scoreSelect(withInf, m, dim, q, nQ, { window: 1, budget: 8, edge: 0, pairs }, nanScores);
        expect(Number.isNaN(nanScores[5]!)).toBe(true); // the row itself stays NaN
        expect(Number.isFinite(nanScores[4]!) && Number.isFinite(nanScores[6]!)).toBe(true);
        // one row: no pair ends anywhere
        expect(native.scoreKth(ctx32, 1, dim, q, nQ, 4, pairs)[nQ]).toBe(Number.NEGATIVE_INFINITY);
        const sel = { window: 9, budget: 64, edge: 0, pairs };
        expect(() => native.scoreSelect(ctx32, n, dim, q, nQ, { ...sel, pairs: Int32Array.from([0, nQ]) })).toThrow(
          /pair row \d+ outside the \d+ query rows/,
        );
        expect(() => native.scoreSelect(ctx32, n, dim, q, nQ, { ...sel, pairs: Int32Array.from([0, 1, 2]) })).toThrow(
          /not \(a, b\) pairs/,
        );
        const bad = new Float32Array(nP);
        bad[1] = Number.POSITIVE_INFINITY;
        expect(() => native.scoreSelect(ctx32, n, dim, q, nQ, { ...sel, pairOffsets: bad })).toThrow(
          /pair_offset\[1\] is not finite/,
        );
        expect(() => native.scoreKth(ctx32, n, dim, q, nQ, 4, new Int32Array(2 * 4097))).toThrow(
          /n_pairs = 4097 outside \[0, 4096\]/,
        );
      } finally {
        native.close();
      }
    });
  }
});

test("NaN ranks below every number", () => {
  const s = Float32Array.from([0, NaN, -5, NaN, 2, 0]);
  expect(Array.from(selectTokens(s, 4, 0))).toEqual([0, 2, 4, 5]);
  const native = new Native("cpu");
  try {
    expect(Array.from(native.smoothSelect(s, 1, 4, 0))).toEqual([0, 2, 4, 5]);
  } finally {
    native.close();
  }
});

describe("rf_map_file: a context's embedding file beyond 4 GiB (Bun.mmap's limit: 16.7M rows of 256 bytes)", () => {
  for (const [name, open] of libs) {
    test(`${name}: rows past 4 GiB are mapped, read and selected; errors name the file`, () => {
      const native = open();
      const dir = mkdtempSync(join(tmpdir(), "reform-map-"));
      const path = join(dir, "emb.bin");
      try {
        const dim = 128; // f16: 256 bytes a row, the embedded model's
        const rowBytes = dim * 2;
        const rows = 2 ** 24 + 64; // 4 GiB + 16 KiB, sparse: the holes read as zero rows (score 0)
        const planted = [2 ** 24 + 10, 2 ** 24 + 40]; // past 4 GiB
        const one = Uint16Array.from({ length: dim }, (_, d) => f32ToF16(d === 3 ? 1 : 0));
        const fd = openSync(path, "w");
        ftruncateSync(fd, rows * rowBytes);
        for (const r of planted) writeSync(fd, new Uint8Array(one.buffer), 0, rowBytes, r * rowBytes);
        closeSync(fd);
        const m = native.mapFile(path);
        try {
          expect(m.bytes).toBe(rows * rowBytes);
          const q = Float32Array.from({ length: dim }, (_, d) => (d === 3 ? 2 : 0));
          const idx =
            name === "cpu"
              ? native.scoreSelect({ ptr: m.ptr, dtype: RF_F16, length: rows * dim }, rows, dim, q, 1, {
                  window: 1,
                  budget: 2,
                  edge: 0,
                })
              : null;
          if (idx) expect(Array.from(idx)).toEqual(planted);
          // a view of the rows past 4 GiB holds what was written there
          const ab = toArrayBuffer((m.ptr + planted[1]! * rowBytes) as Pointer, 0, rowBytes);
          expect(Array.from(new Uint16Array(ab))).toEqual(Array.from(one));
        } finally {
          native.unmapFile(m);
        }
        expect(() => native.mapFile(join(dir, "missing.bin"))).toThrow(/rf_map_file: cannot open .*missing\.bin/);
        writeFileSync(join(dir, "empty.bin"), "");
        expect(() => native.mapFile(join(dir, "empty.bin"))).toThrow(/empty file/);
      } finally {
        native.close();
        rmSync(dir, { force: true, recursive: true });
      }
    }, 120_000);
  }
});

describe("native rf_score_kth_select (the kth backgrounds in one call, background.ts)", () => {
  /** equal as numbers (a -0 may read 0), NaN equal to NaN */
  const same = (a: Float32Array, b: Float32Array) => {
    let diff = 0;
    for (let i = 0; i < a.length; i++) if (!(a[i] === b[i] || (Number.isNaN(a[i]!) && Number.isNaN(b[i]!)))) diff++;
    return diff;
  };
  for (const [name, open] of libs) {
    test(`${name}: the same k-th bests, scores and selection as rf_score_kth then rf_score_select with kthQuery (f32 and f16 rows; k = 1, 3, 32, beyond the context; ties; pairs; a context shorter than k; an f16 overflow row); bad arguments refused`, () => {
      const native = open();
      try {
        const r = mulberry32(61);
        const [n, dim, nQ] = name === "cpu" ? [3000, 70, 19] : [500, 24, 5];
        const ctx32 = Float32Array.from({ length: n * dim }, () => r() * 2 - 1);
        // ties: a row repeated many times, so a k-th best falls inside a run of equal cosines
        for (let i = 100; i < 160; i++) ctx32.copyWithin(i * dim, 7 * dim, 8 * dim);
        const q = Float32Array.from({ length: nQ * dim }, () => r() * 2 - 1);
        q.set(ctx32.subarray(7 * dim, 8 * dim), 0); // the question's first row is the repeated one
        const pairs = Int32Array.from([...Array.from({ length: nQ - 1 }, (_, j) => [j, j + 1]).flat(), 2, 2]);
        const withInf = toF16(ctx32);
        withInf.fill(0x7c00, 5 * dim, 6 * dim);
        const cases: [string, Float32Array | Uint16Array, number][] = [
          ["f32", ctx32, n],
          ["f16", toF16(ctx32), n],
          ["f16, 20 rows", toF16(ctx32), 20],
          ["f16, 1 row", toF16(ctx32), 1],
          ["f16 with an overflow row", withInf, 300],
        ];
        let positive = 0;
        for (const [what, ctx, m] of cases)
          for (const k of [1, 3, 32, 1024])
            for (const pr of [undefined, pairs]) {
              const sel = { window: 9, budget: 64, edge: 0, pairs: pr };
              const kth = native.scoreKth(ctx, m, dim, q, nQ, k, pr);
              const kq = kthQuery(q, nQ, dim, kth, pr);
              const want = new Float32Array(m);
              const wantIdx = native.scoreSelect(ctx, m, dim, kq.q, kq.nq, { ...sel, ...kq }, want);
              const got = new Float32Array(m);
              const gotKth = new Float32Array(kth.length);
              const idx = native.scoreKthSelect(ctx, m, dim, q, nQ, k, sel, got, gotKth);
              const label = `${what}, k ${k}${pr ? ", pairs" : ""}`;
              expect({ label, kth: Array.from(gotKth) }).toEqual({ label, kth: Array.from(kth) });
              expect({ label, diff: same(got, want) }).toEqual({ label, diff: 0 });
              expect({ label, idx: Array.from(idx) }).toEqual({ label, idx: Array.from(wantIdx) });
              // no kth buffer, no scores: the same selection
              expect(Array.from(native.scoreKthSelect(ctx, m, dim, q, nQ, k, sel))).toEqual(Array.from(wantIdx));
              positive += got.filter((v) => v > 0).length;
            }
        expect(positive).toBeGreaterThan(100); // the candidates' excess is there to compare, not only zeros
        expect(native.scoreKthSelect(ctx32, 0, dim, q, nQ, 32, { window: 9, budget: 8, edge: 0 }).length).toBe(0);
        expect(() => native.scoreKthSelect(ctx32, n, dim, q, nQ, 0, { window: 9, budget: 8, edge: 0 })).toThrow(
          /k = 0 outside/,
        );
        expect(() =>
          native.scoreKthSelect(ctx32, n, dim, q, nQ, 32, { window: 9, lag: 7, budget: 8, edge: 0 }),
        ).toThrow(/lag/);
      } finally {
        native.close();
      }
    });
  }
});
