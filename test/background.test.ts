/**
 * The question tokens' background (src/engine/background.ts): the context's normalised row sum that a session keeps as
 * its embeddings are written, caught up from emb.bin where it is missing or behind (older sessions, a crash), and the
 * offsets it gives: each query row's mean cosine over the context, as rf_score computes the cosines; and the "kth"
 * background's query (the question's rows and a zero row, their k-th best matches as offsets).
 */
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Native, RF_F16 } from "../ffi/native.ts";
import {
  addNormalisedRows,
  adjacentPairs,
  BACKGROUND_K,
  backgroundOf,
  backgroundOffsets,
  kthQuery,
  scoresPairs,
  usesKth,
} from "../src/engine/background.ts";
import { Session } from "../src/engine/session.ts";
import { f16ToF32 } from "../src/util/f16.ts";
import { f32ToF16 } from "./fixtures/tiny-model.ts";
import { mulberry32 } from "./helpers/random-model.ts";

const root = mkdtempSync(join(tmpdir(), "reform-background-"));
const native = new Native("cpu");
afterAll(() => {
  native.close();
  rmSync(root, { recursive: true, force: true });
});

const dim = 24;
const params = { chunkSize: 16, capacity: 32, nSink: 4, nRecent: 8, obsWindow: 8, embDim: dim, embDtype: RF_F16 };
const r = mulberry32(7);
const rows = Uint16Array.from({ length: 300 * dim }, () => f32ToF16(r() * 2 - 1 + (r() < 0.5 ? 0.3 : 0)));

/** the sum of rows [0, n) each divided by its norm, from the f16 values as stored */
function directSum(n: number): number[] {
  const x = f16ToF32(rows.subarray(0, n * dim));
  const out = new Array<number>(dim).fill(0);
  for (let i = 0; i < n; i++) {
    let ss = 0;
    for (let d = 0; d < dim; d++) ss += x[i * dim + d]! ** 2;
    for (let d = 0; d < dim; d++) out[d]! += x[i * dim + d]! / Math.sqrt(ss);
  }
  return out;
}

/** the session with n acknowledged tokens (reconcile keeps only the rows of acknowledged tokens) */
function withTokens(s: Session, n: number): Session {
  writeFileSync(join(s.dir, "tokens.bin"), new Uint8Array(n * 4));
  s.meta.tokens = n;
  s.saveMeta(true);
  return s;
}

const close = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  expect(a.length).toBe(b.length);
  for (let i = 0; i < a.length; i++) expect(Math.abs(a[i]! - b[i]!)).toBeLessThan(1e-9);
};

describe("a context's normalised row sum", () => {
  test("kept as rows are written, stored with the metadata, caught up from the file when missing or behind", () => {
    const s = withTokens(Session.create(root, "ctx-a", { fingerprint: "f", heads: [], params }), 300);
    for (const [a, z] of [
      [0, 100],
      [100, 101],
      [101, 250],
    ])
      s.appendEmbeddings(rows.subarray(a * dim, z * dim), z - a);
    const kept = s.rowSum(native);
    expect(kept.rows).toBe(250);
    close(kept.sum, directSum(250));
    expect(s.meta.rowSumRows).toBe(250); // written as the rows were, no catching up

    // reloaded: the stored sum
    const again = Session.load(join(root, "contexts", "ctx-a"))!;
    close(again.rowSum(native).sum, kept.sum);

    // a session stored before the sum was kept: summed from emb.bin at its first query, then kept up to date
    again.meta.rowSum = undefined;
    again.meta.rowSumRows = undefined;
    again.saveMeta(true);
    const old = Session.load(join(root, "contexts", "ctx-a"))!;
    old.appendEmbeddings(rows.subarray(250 * dim, 260 * dim), 10); // the sum does not cover the rows: left behind
    expect(old.meta.rowSumRows).toBeUndefined();
    const caught = old.rowSum(native);
    expect(caught.rows).toBe(260);
    close(caught.sum, directSum(260));
    old.appendEmbeddings(rows.subarray(260 * dim, 300 * dim), 40);
    expect(old.meta.rowSumRows).toBe(300);
    close(old.rowSum(native).sum, directSum(300));

    // rows lost from the file (reconcile keeps whole rows of acknowledged tokens): the sum is taken again
    truncateSync(join(root, "contexts", "ctx-a", "emb.bin"), 120 * dim * 2 + 5);
    const cut = Session.load(join(root, "contexts", "ctx-a"))!;
    expect(cut.meta.processed).toBe(120);
    // reconcile drops a sum over more rows than the file keeps, so rows appended before any query do not extend it
    expect(cut.meta.rowSumRows).toBeUndefined();
    cut.appendEmbeddings(rows.subarray(120 * dim, 300 * dim), 180);
    const resummed = cut.rowSum(native);
    expect(resummed.rows).toBe(300);
    close(resummed.sum, directSum(300));
    // a sum caught up at a query is stored: after a restart it is not summed again
    const stored = Session.load(join(root, "contexts", "ctx-a"))!;
    expect(stored.meta.rowSumRows).toBe(300);
    close(new Float64Array(stored.meta.rowSum!.buffer, 0, dim), directSum(300));
  });

  test("a row with an f16 overflow (inf) is left out of the sum; a non-finite query row gets no offset", () => {
    const s = withTokens(Session.create(root, "ctx-inf", { fingerprint: "f", heads: [], params }), 3);
    const three = Uint16Array.from(rows.subarray(0, 3 * dim));
    three[dim + 5] = 0x7c00; // +inf in row 1
    s.appendEmbeddings(three, 3);
    const { sum, rows: count } = s.rowSum(native);
    expect(count).toBe(3);
    expect(sum.every(Number.isFinite)).toBe(true);
    const two = Uint16Array.from([...rows.subarray(0, dim), ...rows.subarray(2 * dim, 3 * dim)]);
    const expected = new Float64Array(dim);
    addNormalisedRows(expected, two, 2, dim);
    close(sum, expected);
    const q = Float32Array.from({ length: 2 * dim }, (_, i) => (i === dim ? Number.NaN : 1));
    const off = backgroundOffsets({ sum, rows: count }, q, 2, dim);
    expect(Number.isFinite(off[0]!)).toBe(true);
    expect(off[0]).not.toBe(0);
    expect(off[1]).toBe(0);
  });

  test("the offsets are each query row's mean cosine over the context (rf_score's cosines)", () => {
    const n = 300;
    const q = Float32Array.from({ length: 5 * dim }, () => r() * 2 - 1);
    const s = Session.create(root, "ctx-b", { fingerprint: "f", heads: [], params });
    s.appendEmbeddings(rows, n);
    const { sum, rows: count } = s.rowSum(native);
    const off = backgroundOffsets({ sum, rows: count }, q, 5, dim);
    for (let j = 0; j < 5; j++) {
      const cos = native.score(rows, n, dim, q.subarray(j * dim, (j + 1) * dim), 1);
      const mean = cos.reduce((a, b) => a + b, 0) / n;
      expect(Math.abs(off[j]! - mean)).toBeLessThan(1e-5);
    }
    expect(Array.from(backgroundOffsets({ sum, rows: 0 }, q, 5, dim))).toEqual([0, 0, 0, 0, 0]);
  });
});

describe('the "kth" background', () => {
  test("a zero row at offset 0 joins the question's rows: no row scores below 0, and only rows above a token's k-th best match score above 0", () => {
    const nq = 5;
    const q = Float32Array.from({ length: nq * dim }, () => r() * 2 - 1);
    const n = 300;
    const kth = native.scoreKth(rows, n, dim, q, nq, BACKGROUND_K);
    const { q: q1, offsets } = kthQuery(q, nq, dim, kth);
    expect(q1.length).toBe((nq + 1) * dim);
    expect(Array.from(q1.subarray(0, nq * dim))).toEqual(Array.from(q));
    expect(Array.from(q1.subarray(nq * dim)).every((v) => v === 0)).toBe(true);
    expect(Array.from(offsets)).toEqual([...Array.from(kth), 0]);
    const scores = new Float32Array(n);
    native.scoreSelect(rows, n, dim, q1, nq + 1, { window: 1, budget: 16, edge: 0, offsets }, scores);
    expect(Math.min(...scores)).toBe(0);
    // a row scores above 0 only where some token matches it better than that token's k-th best match
    const perRow = Array.from({ length: nq }, (_, j) =>
      native.score(rows, n, dim, q.subarray(j * dim, (j + 1) * dim), 1),
    );
    const above = scores.filter((s) => s > 0).length;
    const expected = Array.from({ length: n }, (_, i) => perRow.some((c, j) => c[i]! > kth[j]! + 1e-6)).filter(
      Boolean,
    ).length;
    expect(Math.abs(above - expected)).toBeLessThanOrEqual(nq); // rows within 1e-6 of a k-th best may go either way
    expect(above).toBeLessThanOrEqual(nq * BACKGROUND_K);
    // fewer than k rows with a cosine: -inf, no offset for that token
    const none = kthQuery(q, nq, dim, Float32Array.from([Number.NEGATIVE_INFINITY, 0.5, 0.1, 0.2, 0.3]));
    expect(none.offsets[0]).toBe(0);
    expect(none.offsets[1]).toBeCloseTo(0.5);
  });

  test('"kth-pairs": pairs are rows of tokens next to each other in one turn, both scored, the second continuing the word; their offsets follow the rows', () => {
    // turns: [5, 6, " ", 7] and [8, 9]; the space token has no row, so 6 and 7 are not neighbours, nor are 7 and 8
    const SPACE = 1;
    const pairs = adjacentPairs(
      [
        [5, 6, SPACE, 7],
        [8, 9],
      ],
      (id) => id !== SPACE,
    );
    expect(Array.from(pairs)).toEqual([0, 1, 3, 4]);
    expect(adjacentPairs([[SPACE], []], (id) => id !== SPACE).length).toBe(0);
    // 9 starts a word of its own (its first byte is a space): no pair ends at it
    const words = adjacentPairs(
      [
        [5, 6, SPACE, 7],
        [8, 9],
      ],
      (id) => id !== SPACE,
      (id) => id !== 9,
    );
    expect(Array.from(words)).toEqual([0, 1]);
    const q = new Float32Array(3 * 4);
    const two = Int32Array.of(0, 1, 1, 2);
    const k = kthQuery(q, 3, 4, Float32Array.from([0.1, 0.2, 0.3, 0.4, Number.NEGATIVE_INFINITY]), two);
    expect(k.nq).toBe(4); // the zero row joins
    expect(k.pairs).toBe(two);
    expect(Array.from(k.offsets)).toEqual([0.1, 0.2, 0.3, 0].map(Math.fround));
    expect(Array.from(k.pairOffsets)).toEqual([Math.fround(0.4), 0]); // fewer than k rows: no offset
    expect(scoresPairs("kth-pairs") && usesKth("kth-pairs") && usesKth("kth")).toBe(true);
    expect(scoresPairs("kth") || usesKth("mean") || usesKth("off")).toBe(false);
  });

  test("the on|off field's booleans are the default background and off", () => {
    expect(backgroundOf(true)).toBe("kth-pairs");
    expect(backgroundOf(false)).toBe("off");
    expect(backgroundOf("mean")).toBe("mean");
  });
});
