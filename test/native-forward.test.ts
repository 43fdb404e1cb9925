/**
 * Native engine (CPU build) vs the plain TypeScript reference (test/reference/llama-ref.ts) on tiny random
 * models built deterministically here: forward logits, incremental prefill/decode, greedy generation,
 * compressor embeddings / cache / eviction, scoring, sampling, state persistence, H2O import, error paths.
 */
import { beforeAll, describe, expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import {
  Native,
  NativeError,
  RF_BF16,
  RF_ERR_INVALID,
  RF_ERR_STATE,
  RF_F16,
  RF_F32,
  type DType,
  RF_ROPE_DEFAULT,
  RF_ROPE_LINEAR,
  RF_ROPE_LLAMA3,
  ROOT_DIR,
  type CompressParams,
  type NativeCompressor,
} from "../ffi/native";
import type { HeadSpec } from "../src/model/types.ts";
import { argmax, refForward, refGreedy, refLogits, refSample, refScore, RefCompressor } from "./reference/llama-ref";

import {
  buildModel,
  expectNativeError,
  legacyState,
  parseState,
  flat,
  fromF16,
  gaussian,
  i32,
  loadModel,
  maxAbs,
  mulberry32,
  relErr,
  toF16,
  tokensFrom,
  type Variant,
} from "./helpers/random-model";
import { buildNative } from "./helpers/build.ts";

/* ---------------- setup ---------------- */

let native: Native;
beforeAll(() => {
  buildNative();
  native = new Native("cpu");
}, 300_000);

describe("library", () => {
  test("backend identity", () => {
    expect(native.backendName()).toBe("cpu");
    expect(native.deviceCount()).toBe(1);
    expect(native.deviceInfo()).toContain("CPU");
    const isa = /\((avx512|avx2|portable) kernels\)/.exec(native.deviceInfo())?.[1];
    expect(isa).toBeDefined();
    if (forced) expect(isa).toBe(forced);
    native.setThreads(2);
    expect(native.lastError()).toBe("");
  });
});

/* ---------------- forward ---------------- */

const VARIANTS: Variant[] = [
  { name: "f32 tied, default rope", tie: true, bias: false, rope: RF_ROPE_DEFAULT, dtype: RF_F32, layers: 2, seed: 11 },
  {
    name: "f32 untied + qkv bias, llama3 rope",
    tie: false,
    bias: true,
    rope: RF_ROPE_LLAMA3,
    dtype: RF_F32,
    layers: 3,
    seed: 12,
  },
  {
    name: "bf16 untied, linear rope",
    tie: false,
    bias: false,
    rope: RF_ROPE_LINEAR,
    dtype: RF_BF16,
    layers: 2,
    seed: 13,
  },
  {
    name: "f16 tied + qkv bias, llama3 rope",
    tie: true,
    bias: true,
    rope: RF_ROPE_LLAMA3,
    dtype: RF_F16,
    layers: 3,
    seed: 14,
  },
  {
    name: "bf16 tied + q/k norm (Qwen3), head_dim 16 != hidden/heads",
    tie: true,
    bias: false,
    qkNorm: true,
    rope: RF_ROPE_DEFAULT,
    dtype: RF_BF16,
    layers: 2,
    seed: 15,
    dims: { headDim: 16 },
  },
];

/* Tolerances per weight dtype (logits vs the Float64 reference, relative to the largest logit). The reference
 * runs on the rounded 16-bit values and the engine widens 16-bit weights exactly (in registers) and computes
 * in f32, so bf16 and f16 weights need no more slack than f32: only f32 rounding of activations differs. */
const TOL: Record<DType, number> = { [RF_F32]: 1e-4, [RF_BF16]: 1e-4, [RF_F16]: 1e-4 };

for (const v of VARIANTS) {
  describe(`forward: ${v.name}`, () => {
    const b = buildModel(v);
    const prompt = tokensFrom(v.seed * 7, 21);

    test("prefill logits match the reference", () => {
      const m = loadModel(native, b);
      const s = m.createSeq(64);
      const logits = s.forward(i32(prompt), true)!;
      const ref = refLogits(b.ref, b.w, prompt);
      expect(relErr(logits, ref)).toBeLessThan(TOL[v.dtype]);
      expect(s.length()).toBe(prompt.length);
      s.destroy();
      m.destroy();
    });

    test("prefill in pieces == prefill at once == decode steps", () => {
      const m = loadModel(native, b);
      const all = refForward(b.ref, b.w, prompt, true);
      const s1 = m.createSeq(64);
      const once = s1.forward(i32(prompt), true)!;
      const s2 = m.createSeq(64);
      s2.forward(i32(prompt.slice(0, 5)));
      s2.forward(i32(prompt.slice(5, 13)));
      const pieces = s2.forward(i32(prompt.slice(13)), true)!;
      expect(maxAbs(pieces, once)).toBeLessThan(1e-5);
      const s3 = m.createSeq(64);
      for (let i = 0; i < prompt.length; i++) {
        const lg = s3.forward(i32([prompt[i]]), true)!;
        expect(relErr(lg, all[i])).toBeLessThan(TOL[v.dtype]);
        if (i === prompt.length - 1) expect(maxAbs(lg, once)).toBeLessThan(1e-5);
      }
      expect(s3.length()).toBe(prompt.length);
      s3.reset();
      expect(s3.length()).toBe(0);
      expect(maxAbs(s3.forward(i32(prompt), true)!, once)).toBe(0);
      for (const s of [s1, s2, s3]) s.destroy();
      m.destroy();
    });

    test("greedy continuation of 16 tokens equals the reference", () => {
      const m = loadModel(native, b);
      const s = m.createSeq(64);
      const p = prompt.slice(0, 8);
      s.forward(i32(p));
      const got: number[] = [];
      for (let i = 0; i < 16; i++) {
        const t = s.sample({ temperature: 0, topP: 1, topK: 0 });
        got.push(t);
        s.forward(i32([t]));
      }
      expect(got).toEqual(refGreedy(b.ref, b.w, p, 16));
      s.destroy();
      m.destroy();
    });
  });
}

describe("long sequences", () => {
  test("KV cache growth across reallocations: pieces == at once, decode after growth", () => {
    const b = buildModel(VARIANTS[1]);
    const m = loadModel(native, b);
    const toks = tokensFrom(3, 700);
    const s1 = m.createSeq(701);
    const once = s1.forward(i32(toks), true)!;
    const s2 = m.createSeq(701);
    let last: Float32Array | null = null;
    for (const [a, z] of [
      [0, 200],
      [200, 257],
      [257, 600],
      [600, 699],
      [699, 700],
    ])
      last = s2.forward(i32(toks.slice(a, z)), true);
    expect(maxAbs(last!, once)).toBeLessThan(1e-5);
    const d1 = s1.forward(i32([5]), true)!;
    const d2 = s2.forward(i32([5]), true)!;
    expect(maxAbs(d1, d2)).toBeLessThan(1e-5);
    expect(s1.length()).toBe(701);
    expectNativeError(() => s1.forward(i32([5])), RF_ERR_INVALID, /max_tokens/);
    s1.destroy();
    s2.destroy();
    m.destroy();
  });
});

/* ---------------- compressor ---------------- */

const CP: CompressParams = {
  capacity: 24,
  nSink: 2,
  nRecent: 4,
  obsWindow: 4,
  maxChunk: 10,
  embDtype: RF_F32,
  exitLayer: -1,
};
const HEADS: HeadSpec[] = [
  { layer: 0, kind: "q", head: 1 },
  { layer: 1, kind: "k", head: 0 },
  { layer: 1, kind: "v", head: 1 },
  { layer: 0, kind: "v", head: 0 },
];
/** chunk sizes: eviction starts at the 3rd chunk; a chunk shorter than obs_window at the end */
const CHUNKS = [10, 10, 10, 7, 10, 3, 10];

const COMPRESSOR_VARIANTS: Variant[] = [
  { name: "qkv bias, llama3 rope", tie: false, bias: true, rope: RF_ROPE_LLAMA3, dtype: RF_F32, layers: 3, seed: 21 },
  // every path that computes q/k with the per-head norm: chunks, embed() of a query, import into a sequence
  {
    name: "q/k norm (Qwen3), head_dim 16",
    tie: true,
    bias: false,
    qkNorm: true,
    rope: RF_ROPE_DEFAULT,
    dtype: RF_F32,
    layers: 3,
    seed: 22,
    dims: { headDim: 16 },
  },
];

for (const v of COMPRESSOR_VARIANTS)
  describe(`compressor: ${v.name}`, () => {
    const b = buildModel(v);
    const hd = b.cfg.headDim;
    const toks = tokensFrom(
      99,
      CHUNKS.reduce((a, c) => a + c, 0),
    );

    test("embeddings, cache length, cache contents and scores match the reference with eviction", () => {
      const m = loadModel(native, b);
      const c = m.createCompressor(CP, HEADS);
      expect(c.embedDim).toBe(HEADS.length * hd);
      expect(c.exitLayer).toBe(1);
      const ref = new RefCompressor(b.ref, b.w, CP, HEADS);
      let off = 0;
      let evicted = false;
      for (const n of CHUNKS) {
        const chunk = toks.slice(off, off + n);
        off += n;
        const e = c.process(i32(chunk)) as Float32Array;
        const re = flat(ref.process(chunk));
        expect(maxAbs(e, re)).toBeLessThan(1e-4);
        expect(c.cacheLen()).toBe(ref.cacheLen());
        expect(c.seen()).toBe(off);
        if (off > CP.capacity) evicted = true;
        // cache contents (pre-RoPE keys, values, scores) via the state blob
        const st = parseState(c.saveState(), hd);
        expect(st.magic).toBe("RFCSTAT2");
        // the exit layer's cache is not kept below full depth (nothing reads it)
        expect(b.cfg.numLayers).toBeGreaterThan(2);
        expect(st.layers).toBe(1);
        expect(st.len).toBe(ref.cacheLen());
        for (let l = 0; l < st.layers; l++)
          for (let g = 0; g < st.kvh; g++) {
            const rc = ref.cache[l][g];
            expect(maxAbs(st.cache[l][g].k, flat(rc.map((x) => x.k)))).toBeLessThan(1e-4);
            expect(maxAbs(st.cache[l][g].v, flat(rc.map((x) => x.v)))).toBeLessThan(1e-4);
            expect(
              maxAbs(
                st.cache[l][g].s,
                rc.map((x) => x.s),
              ),
            ).toBeLessThan(1e-4);
          }
      }
      expect(evicted).toBe(true);
      expect(c.cacheLen()).toBe(CP.capacity);
      // a legacy blob (RFCSTAT1: the exit layer included) still loads; its extra layer is ignored
      const q = i32(toks.slice(3, 11));
      const c2 = m.createCompressor(CP, HEADS);
      c2.loadState(legacyState(c.saveState(), hd));
      expect(c2.cacheLen()).toBe(c.cacheLen());
      expect(maxAbs(c2.embed(q) as Float32Array, c.embed(q) as Float32Array)).toBe(0);
      c2.destroy();
      // eviction is score-driven, not plain recency: some kept middle entries differ between (layer, kv head)
      const kept = ref.cache.flatMap((per) => per.map((e) => e.map((x) => x.idx).join(",")));
      expect(new Set(kept).size).toBeGreaterThan(1);
      const recency = [0, 1, ...Array.from({ length: CP.capacity - 2 }, (_, i) => off - (CP.capacity - 2) + i)].join(
        ",",
      );
      expect(kept.some((k) => k !== recency)).toBe(true);
      c.destroy();
      m.destroy();
    });

    /** the state blob's kept keys and scores vs the reference's, every cached layer */
    function expectCacheLikeRef(c: NativeCompressor, ref: RefCompressor, layers: number) {
      const st = parseState(c.saveState(), hd);
      expect(st.layers).toBe(layers);
      expect(st.len).toBe(ref.cacheLen());
      for (let l = 0; l < st.layers; l++)
        for (let g = 0; g < st.kvh; g++) {
          const rc = ref.cache[l][g];
          expect(maxAbs(st.cache[l][g].k, flat(rc.map((x) => x.k)))).toBeLessThan(1e-4);
          expect(
            maxAbs(
              st.cache[l][g].s,
              rc.map((x) => x.s),
            ),
          ).toBeLessThan(1e-4);
        }
    }

    test("TOVA eviction: embeddings, kept entries and scores match the reference; one keep-set per layer", () => {
      const m = loadModel(native, b);
      const tp: CompressParams = { ...CP, eviction: "tova" };
      const c = m.createCompressor(tp, HEADS);
      const h2o = m.createCompressor(CP, HEADS);
      const ref = new RefCompressor(b.ref, b.w, tp, HEADS);
      let off = 0;
      for (const n of CHUNKS) {
        const chunk = toks.slice(off, off + n);
        off += n;
        const e = c.process(i32(chunk)) as Float32Array;
        h2o.process(i32(chunk), null);
        expect(maxAbs(e, flat(ref.process(chunk)))).toBeLessThan(1e-4);
        expect(c.cacheLen()).toBe(ref.cacheLen());
        expectCacheLikeRef(c, ref, 1);
      }
      expect(c.cacheLen()).toBe(CP.capacity);
      // TOVA keeps one set of tokens per layer (its score is the layer's), not one per kv head
      for (const per of ref.cache) expect(new Set(per.map((e) => e.map((x) => x.idx).join(","))).size).toBe(1);
      // the scores are the last query's probabilities, not accumulated: a kept entry's score is at most the number of
      // query heads (each head's probabilities sum to 1), while H2O's accumulate over chunks and windows
      const st = parseState(c.saveState(), hd);
      for (const x of st.cache[0][0].s) expect(x).toBeLessThanOrEqual(b.cfg.numHeads + 1e-4);
      // another policy, another cache: the kept keys differ from H2O's
      const hs = parseState(h2o.saveState(), hd);
      expect(maxAbs(st.cache[0][0].k, hs.cache[0][0].k)).toBeGreaterThan(1e-3);
      for (const x of [c, h2o]) x.destroy();
      m.destroy();
    });

    test("o heads (attention outputs before o_proj) match the reference, below and at the exit layer", () => {
      const m = loadModel(native, b);
      const nh = b.cfg.numHeads;
      // layer 1 is the exit layer: its attention runs for the o head, so its cache is kept (2 layers in the blob)
      const OH: HeadSpec[] = [
        { layer: 0, kind: "o", head: 1 },
        { layer: 1, kind: "k", head: 0 },
        { layer: 1, kind: "o", head: nh - 1 },
      ];
      for (const eviction of ["h2o", "tova"] as const) {
        const p: CompressParams = { ...CP, eviction };
        const c = m.createCompressor(p, OH);
        expect(c.exitLayer).toBe(1);
        expect(c.embedDim).toBe(OH.length * hd);
        const ref = new RefCompressor(b.ref, b.w, p, OH);
        let off = 0;
        for (const n of CHUNKS) {
          const chunk = toks.slice(off, off + n);
          off += n;
          expect(maxAbs(c.process(i32(chunk)) as Float32Array, flat(ref.process(chunk)))).toBeLessThan(1e-4);
          expectCacheLikeRef(c, ref, 2);
        }
        // a question in context: the o head attends over the cache, which stays as it was
        const before = c.saveState();
        const q = [5, 17, 42, 3, 88];
        expect(maxAbs(c.embed(i32(q)) as Float32Array, flat(ref.embed(q)))).toBeLessThan(1e-4);
        expect(Buffer.from(c.saveState()).equals(Buffer.from(before))).toBe(true);
        c.destroy();
      }
      // one pass serves every head set (scripts/heads-lab.ts): an o head is the same vector whether its layer is the
      // exit layer or a middle one
      const alone = m.createCompressor(CP, [{ layer: 1, kind: "o", head: 0 }]);
      const deep = m.createCompressor(CP, [
        { layer: 1, kind: "o", head: 0 },
        { layer: 2, kind: "q", head: 0 },
      ]);
      let off = 0;
      for (const n of CHUNKS) {
        const chunk = i32(toks.slice(off, off + n));
        off += n;
        const a = alone.process(chunk) as Float32Array;
        const d = deep.process(chunk) as Float32Array;
        for (let t = 0; t < n; t++)
          expect(maxAbs(a.subarray(t * hd, (t + 1) * hd), d.subarray(2 * t * hd, (2 * t + 1) * hd))).toBeLessThan(1e-6);
      }
      for (const x of [alone, deep]) x.destroy();
      m.destroy();
    });

    test("embed() matches the reference and leaves the cache unchanged", () => {
      const m = loadModel(native, b);
      const c = m.createCompressor(CP, HEADS);
      const ref = new RefCompressor(b.ref, b.w, CP, HEADS);
      for (let i = 0; i < 4; i++) {
        const chunk = toks.slice(i * 10, i * 10 + 10);
        c.process(i32(chunk), null);
        ref.process(chunk);
      }
      const before = c.saveState();
      const q = [5, 17, 42, 3, 88];
      const e = c.embed(i32(q)) as Float32Array;
      expect(maxAbs(e, flat(ref.embed(q)))).toBeLessThan(1e-4);
      const after = c.saveState();
      expect(Buffer.from(after).equals(Buffer.from(before))).toBe(true);
      expect(c.seen()).toBe(40);
      // a second embed gives identical output
      expect(maxAbs(c.embed(i32(q)) as Float32Array, e)).toBe(0);
      c.destroy();
      m.destroy();
    });

    test("f16 embedding output", () => {
      const m = loadModel(native, b);
      const c32 = m.createCompressor(CP, HEADS);
      const c16 = m.createCompressor({ ...CP, embDtype: RF_F16 }, HEADS);
      for (let i = 0; i < 3; i++) {
        const chunk = i32(toks.slice(i * 10, i * 10 + 10));
        const a = c32.process(chunk) as Float32Array;
        const h = c16.process(chunk) as Uint16Array;
        expect(h).toBeInstanceOf(Uint16Array);
        expect(h.length).toBe(a.length);
        for (let j = 0; j < a.length; j++) expect(fromF16(h[j])).toBe(fromF16(toF16(a[j])));
      }
      c32.destroy();
      c16.destroy();
      m.destroy();
    });

    test("state save -> load into a new compressor -> identical subsequent outputs", () => {
      const m = loadModel(native, b);
      const c1 = m.createCompressor(CP, HEADS);
      for (let i = 0; i < 4; i++) c1.process(i32(toks.slice(i * 10, i * 10 + 10)));
      const blob = c1.saveState();
      const c2 = m.createCompressor(CP, HEADS);
      c2.loadState(blob);
      expect(c2.cacheLen()).toBe(c1.cacheLen());
      expect(c2.seen()).toBe(c1.seen());
      for (let i = 4; i < 6; i++) {
        const chunk = i32(toks.slice(i * 10, i * 10 + 10));
        const a = c1.process(chunk) as Float32Array;
        const bb = c2.process(chunk) as Float32Array;
        expect(maxAbs(a, bb)).toBe(0);
      }
      expect(Buffer.from(c1.saveState()).equals(Buffer.from(c2.saveState()))).toBe(true);
      // reset, then reload: same again
      c2.reset();
      expect(c2.cacheLen()).toBe(0);
      expect(c2.seen()).toBe(0);
      c2.loadState(blob);
      expect(c2.seen()).toBe(40);
      // corrupt / mismatched blobs are rejected
      const bad = blob.slice();
      bad[0] = 0;
      expectNativeError(() => c2.loadState(bad), RF_ERR_INVALID, /magic/);
      expectNativeError(() => c2.loadState(blob.slice(0, blob.length - 4)), RF_ERR_INVALID);
      const other = m.createCompressor({ ...CP, exitLayer: 2 }, HEADS);
      expectNativeError(() => other.loadState(blob), RF_ERR_INVALID);
      for (const c of [c1, c2, other]) c.destroy();
      m.destroy();
    });

    test("seq import from a full-depth compressor without eviction == plain prefill", () => {
      const m = loadModel(native, b);
      const c = m.createCompressor({ ...CP, capacity: 64, exitLayer: b.cfg.numLayers - 1 }, HEADS);
      expect(c.exitLayer).toBe(2);
      const ctx = toks.slice(0, 27);
      c.process(i32(ctx.slice(0, 10)), null);
      c.process(i32(ctx.slice(10, 20)), null);
      c.process(i32(ctx.slice(20)), null);
      expect(c.cacheLen()).toBe(27);
      const s = m.createSeq(40);
      s.importCompressor(c);
      expect(s.length()).toBe(27);
      expectNativeError(() => s.sample({ temperature: 0, topP: 1, topK: 0 }), RF_ERR_STATE);
      const next = [7, 8];
      const got = s.forward(i32(next), true)!;
      const plain = m.createSeq(40);
      const want = plain.forward(i32([...ctx, ...next]), true)!;
      expect(maxAbs(got, want)).toBeLessThan(1e-5);
      expect(relErr(got, refLogits(b.ref, b.w, [...ctx, ...next]))).toBeLessThan(1e-4);
      // a compressor that exits early cannot be imported
      const early = m.createCompressor(CP, HEADS);
      expectNativeError(() => s.importCompressor(early), RF_ERR_INVALID, /exit layer/);
      for (const x of [s, plain]) x.destroy();
      c.destroy();
      early.destroy();
      m.destroy();
    });
  });

/* ---------------- scoring ---------------- */

describe("rf_score", () => {
  test("max cosine vs the reference (f32 and f16 context)", () => {
    const rng = mulberry32(5);
    const nCtx = 301;
    const dim = 24;
    const nQ = 3;
    const ctx = new Float32Array(nCtx * dim).map(() => gaussian(rng));
    ctx.fill(0, 0, dim); // a zero row
    const q = new Float32Array(nQ * dim).map(() => gaussian(rng));
    const got = native.score(ctx, nCtx, dim, q, nQ);
    const want = refScore(ctx, nCtx, dim, q, nQ);
    expect(maxAbs(got, want)).toBeLessThan(1e-5);
    expect(got[0]).toBe(0);
    const ctx16 = new Uint16Array(ctx.length);
    const ctx16v = new Float64Array(ctx.length);
    for (let i = 0; i < ctx.length; i++) {
      ctx16[i] = toF16(ctx[i]);
      ctx16v[i] = fromF16(ctx16[i]);
    }
    const got16 = native.score(ctx16, nCtx, dim, q, nQ);
    expect(maxAbs(got16, refScore(ctx16v, nCtx, dim, q, nQ))).toBeLessThan(1e-5);
    // n_q = 1 and self-similarity
    const self = native.score(ctx.subarray(dim, 2 * dim), 1, dim, ctx.subarray(dim, 2 * dim), 1);
    expect(Math.abs(self[0] - 1)).toBeLessThan(1e-6);
    expect(native.score(ctx, 0, dim, q, nQ).length).toBe(0);
  });
});

/* ---------------- sampling ---------------- */

describe("sampling", () => {
  const b = buildModel({
    name: "s",
    tie: true,
    bias: false,
    rope: RF_ROPE_DEFAULT,
    dtype: RF_F32,
    layers: 2,
    seed: 31,
  });

  test("rf_sample_logits over given logits == rf_seq_sample, same generator; errors", () => {
    const m = loadModel(native, b);
    const s = m.createSeq(16);
    const logits = s.forward(i32([4, 5, 6]), true)!;
    const P = { temperature: 3, topP: 0.95, topK: 30 };
    s.setSeed(9);
    const viaSeq = Array.from({ length: 100 }, () => s.sample(P));
    const st = new BigUint64Array([9n]);
    const viaLogits = Array.from({ length: 100 }, () => native.sampleLogits(logits, P, st));
    expect(viaLogits).toEqual(viaSeq);
    expect(st[0]).toBe(s.rng[0]);
    s.setSeed(9);
    expect(s.sampleFrom(logits, P)).toBe(viaSeq[0]);
    // adjusted logits: a huge bias on one token makes it the only choice
    const biased = logits.slice();
    biased[17] += 1000;
    expect(native.sampleLogits(biased, P, st)).toBe(17);
    expect(native.sampleLogits(biased, { temperature: 0, topP: 1, topK: 0 }, st)).toBe(17);
    expect(() => native.sampleLogits(new Float32Array(0), P, st)).toThrow();
    expectNativeError(() => native.sampleLogits(logits, { ...P, temperature: NaN }, st), RF_ERR_INVALID, /NaN/);
    s.destroy();
    m.destroy();
  });

  test("greedy, top_k 1, same seed -> same draws, exact algorithm, distribution", () => {
    const m = loadModel(native, b);
    const s = m.createSeq(16);
    expectNativeError(() => s.sample({ temperature: 0, topP: 1, topK: 0 }), RF_ERR_STATE);
    const logits = s.forward(i32([1, 2, 3]), true)!;
    const am = argmax(logits);
    expect(s.sample({ temperature: 0, topP: 1, topK: 0 })).toBe(am);
    expect(s.sample({ temperature: -1, topP: 0.5, topK: 5 })).toBe(am);
    s.setSeed(123);
    for (let i = 0; i < 20; i++) expect(s.sample({ temperature: 1.5, topP: 1, topK: 1 })).toBe(am);
    // same seed -> same sequence; matches the documented algorithm exactly
    const draw = (seed: number, n: number, p: { temperature: number; topP: number; topK: number }) => {
      s.setSeed(seed);
      return Array.from({ length: n }, () => s.sample(p));
    };
    const P = { temperature: 4, topP: 0.9, topK: 20 }; // the tiny model's logits are peaked
    const a = draw(42, 200, P);
    expect(draw(42, 200, P)).toEqual(a);
    expect(draw(43, 200, P)).not.toEqual(a);
    const st = new BigUint64Array([42n]);
    expect(a).toEqual(Array.from({ length: 200 }, () => refSample(logits, P.temperature, P.topP, P.topK, st)));
    draw(42, 200, P);
    expect(s.rng[0]).toBe(st[0]); // state advanced in place exactly like the reference
    // zero seed is replaced by a fixed constant
    const z = draw(0, 10, P);
    const st0 = new BigUint64Array([0n]);
    expect(z).toEqual(Array.from({ length: 10 }, () => refSample(logits, P.temperature, P.topP, P.topK, st0)));
    // top_k restricts the support
    const top3 = Array.from(logits.keys())
      .sort((x, y) => logits[y] - logits[x])
      .slice(0, 3);
    for (const t of draw(7, 300, { temperature: 2, topP: 1, topK: 3 })) expect(top3).toContain(t);
    // distribution sanity: empirical frequencies ~ softmax(logits / T)
    const N = 4000;
    const T = 4;
    const counts = new Float64Array(logits.length);
    for (const t of draw(99, N, { temperature: T, topP: 1, topK: 0 })) counts[t]++;
    const mx = Math.max(...logits);
    const e = Array.from(logits, (x) => Math.exp((x - mx) / T));
    expect(new Set(draw(99, N, { temperature: T, topP: 1, topK: 0 })).size).toBeGreaterThan(5);
    const sum = e.reduce((x, y) => x + y, 0);
    for (let i = 0; i < logits.length; i++) {
      const p = e[i] / sum;
      expect(Math.abs(counts[i] / N - p)).toBeLessThan(4 * Math.sqrt((p * (1 - p)) / N) + 2e-3);
    }
    s.destroy();
    m.destroy();
  });
});

/* ---------------- errors ---------------- */

describe("error paths", () => {
  const v: Variant = { name: "e", tie: false, bias: false, rope: RF_ROPE_DEFAULT, dtype: RF_F32, layers: 2, seed: 41 };
  const b = buildModel(v);

  test("model loading errors", () => {
    const m = native.createModel(b.cfg);
    const w = new Float32Array(32);
    expectNativeError(
      () => m.setTensor("model.layers.0.self_attn.foo.weight", w, RF_F32, [32]),
      RF_ERR_INVALID,
      /unknown tensor/,
    );
    expectNativeError(() => m.setTensor("model.layers.9.input_layernorm.weight", w, RF_F32, [32]), RF_ERR_INVALID);
    expectNativeError(() => m.setTensor("model.norm.weight", w, RF_F32, [31]), RF_ERR_INVALID, /shape/);
    expectNativeError(() => m.setTensor("model.norm.weight", w, RF_F32, [32, 1]), RF_ERR_INVALID, /shape/);
    expectNativeError(() => m.setTensor("model.norm.weight", w, 7 as DType, [32]), RF_ERR_INVALID, /dtype/);
    expectNativeError(
      () => m.setTensor("model.layers.0.self_attn.q_proj.bias", w, RF_F32, [32]),
      RF_ERR_INVALID,
      /bias/,
    );
    for (const t of b.tensors)
      if (t.name !== "model.layers.1.mlp.up_proj.weight") m.setTensor(t.name, t.data, t.dtype, t.shape);
    expectNativeError(() => m.finalize(), RF_ERR_STATE, /model\.layers\.1\.mlp\.up_proj\.weight/);
    // using a non-finalized model
    expect(() => m.createSeq(8)).toThrow(NativeError);
    expect(native.lastError()).toMatch(/finalized/);
    const up = b.tensors.find((t) => t.name === "model.layers.1.mlp.up_proj.weight")!;
    m.setTensor(up.name, up.data, up.dtype, up.shape);
    m.finalize();
    expect(m.memoryBytes()).toBeGreaterThan(0);
    // weights are packed at finalize: they cannot change afterwards
    expectNativeError(() => m.setTensor(up.name, up.data, up.dtype, up.shape), RF_ERR_STATE, /finalized/);
    expectNativeError(() => m.initRandom(1, 0.02), RF_ERR_STATE, /finalized/);
    m.destroy();
    // invalid config
    expect(() => native.createModel({ ...b.cfg, numKvHeads: 3 })).toThrow(NativeError);
    expect(native.lastError()).toMatch(/multiple/);
  });

  test("q/k norm tensors: refused without qk_norm, [head_dim] and required with it", () => {
    const hd = b.cfg.headDim;
    const w = new Float32Array(hd).fill(1);
    const plain = native.createModel(b.cfg);
    expectNativeError(
      () => plain.setTensor("model.layers.0.self_attn.q_norm.weight", w, RF_F32, [hd]),
      RF_ERR_INVALID,
      /no q\/k norm/,
    );
    plain.destroy();
    const m = native.createModel({ ...b.cfg, qkNorm: true });
    expectNativeError(
      () => m.setTensor("model.layers.0.self_attn.k_norm.weight", w, RF_F32, [b.cfg.hiddenSize]),
      RF_ERR_INVALID,
      /shape/,
    );
    for (const t of b.tensors) m.setTensor(t.name, t.data, t.dtype, t.shape);
    for (let l = 0; l < b.cfg.numLayers; l++) m.setTensor(`model.layers.${l}.self_attn.q_norm.weight`, w, RF_F32, [hd]);
    m.setTensor("model.layers.0.self_attn.k_norm.weight", w, RF_F32, [hd]);
    expectNativeError(() => m.finalize(), RF_ERR_STATE, /model\.layers\.1\.self_attn\.k_norm\.weight/);
    m.setTensor("model.layers.1.self_attn.k_norm.weight", w, RF_F32, [hd]);
    m.finalize();
    // unit norm weights: the model differs from the plain one only by the per-head normalisation
    const s = m.createSeq(8);
    expect(s.forward(i32([1, 2, 3]), true)!.every(Number.isFinite)).toBe(true);
    s.destroy();
    m.destroy();
  });

  test("runtime argument errors never crash", () => {
    const m = loadModel(native, b);
    const s = m.createSeq(8);
    expectNativeError(() => s.forward(i32([1, 97])), RF_ERR_INVALID, /out of range/);
    expectNativeError(() => s.forward(i32([-1])), RF_ERR_INVALID, /out of range/);
    expectNativeError(() => s.forward(i32([])), RF_ERR_INVALID);
    expect(s.length()).toBe(0);
    s.forward(i32([1, 2, 3, 4, 5, 6]));
    expectNativeError(() => s.forward(i32([1, 2, 3])), RF_ERR_INVALID, /max_tokens/);
    expect(s.length()).toBe(6);
    s.forward(i32([1, 2]));
    expectNativeError(() => s.forward(i32([1])), RF_ERR_INVALID, /max_tokens/);
    expect(() => m.createSeq(0)).toThrow(NativeError);

    const c = m.createCompressor(CP, HEADS);
    expectNativeError(() => c.process(i32(new Array(11).fill(1))), RF_ERR_INVALID, /max_chunk/);
    expectNativeError(() => c.embed(i32(new Array(11).fill(1))), RF_ERR_INVALID, /max_chunk/);
    expectNativeError(() => c.process(i32([3, 200])), RF_ERR_INVALID, /out of range/);
    expect(c.seen()).toBe(0);
    expect(c.cacheLen()).toBe(0);
    // invalid head specs / params (pointer-returning create: NULL + code via rf_last_error_code)
    const bad: [CompressParams, HeadSpec[], RegExp][] = [
      [CP, [{ layer: 2, kind: "q", head: 0 }], /layer/],
      [CP, [{ layer: 0, kind: "k", head: 2 }], /index/],
      [CP, [{ layer: 0, kind: "q", head: -1 }], /index/],
      // capacity below n_sink + n_recent (2 + 4); equal is StreamingLLM's cache (no heavy hitters), accepted below
      [{ ...CP, capacity: 5 }, HEADS, /capacity/],
      [{ ...CP, obsWindow: 0 }, HEADS, /obs_window/],
      [{ ...CP, exitLayer: 0 }, HEADS, /exit_layer/],
      [{ ...CP, embDtype: RF_BF16 as any }, HEADS, /emb_dtype/],
    ];
    for (const [p, h, re] of bad) {
      expectNativeError(() => m.createCompressor(p, h), RF_ERR_INVALID, re);
    }
    // capacity == n_sink + n_recent: the cache keeps the sinks and the most recent entries only
    const sl = m.createCompressor({ ...CP, capacity: 6 }, HEADS);
    sl.process(i32([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]));
    expect(sl.cacheLen()).toBe(6);
    sl.destroy();
    // still fully functional afterwards
    expect(s.length()).toBe(8);
    c.process(i32([1, 2, 3]));
    expect(c.seen()).toBe(3);
    expect(() => native.score(new Float32Array(4), 1, 0, new Float32Array(4), 1)).toThrow(NativeError);
    c.destroy();
    s.destroy();
    m.destroy();
  });

  test("objects outliving the model handle stay valid", () => {
    const m = loadModel(native, b);
    const s = m.createSeq(8);
    const c = m.createCompressor(CP, HEADS);
    const want = s.forward(i32([1, 2, 3]), true)!;
    m.destroy();
    s.reset();
    expect(maxAbs(s.forward(i32([1, 2, 3]), true)!, want)).toBe(0);
    c.process(i32([4, 5]));
    s.destroy();
    c.destroy();
  });
});

/* ---------------- random weights in the configured type; every instruction set ---------------- */

describe("rf_model_init_random", () => {
  test("matrices stored in cfg.weight_dtype (2 bytes bf16/f16, 4 bytes f32), norms f32; finite logits", () => {
    const b = buildModel({
      name: "r",
      tie: false,
      bias: true,
      rope: RF_ROPE_DEFAULT,
      dtype: RF_F32,
      layers: 2,
      seed: 51,
    });
    const c = b.cfg;
    const qd = c.numHeads * c.headDim,
      kvd = c.numKvHeads * c.headDim;
    const matrix =
      2 * c.vocabSize * c.hiddenSize +
      c.numLayers * (c.hiddenSize * (2 * qd + 2 * kvd) + 3 * c.hiddenSize * c.intermediateSize);
    const f32 = c.hiddenSize * (1 + 2 * c.numLayers) + c.numLayers * (qd + 2 * kvd) * 2; // norms; biases (+ fused copy)
    const logits: Float32Array[] = [];
    for (const [dt, size] of [
      [RF_BF16, 2],
      [RF_F16, 2],
      [RF_F32, 4],
    ] as const) {
      const m = native.createModel({ ...c, weightDtype: dt });
      m.initRandom(5, 0.05);
      m.finalize();
      // packed panels pad the last panel of each matrix with zero columns: at most 64 per matrix
      const bytes = m.memoryBytes();
      expect(bytes).toBeGreaterThanOrEqual(matrix * size + f32 * 4);
      expect(bytes).toBeLessThan(matrix * size + f32 * 4 + 10 * 64 * c.hiddenSize * 4 * c.numLayers);
      const s = m.createSeq(16);
      const lg = s.forward(i32([1, 2, 3, 4]), true)!;
      expect(lg.every(Number.isFinite)).toBe(true);
      logits.push(lg);
      s.destroy();
      m.destroy();
    }
    // the same draws rounded to bf16 / f16: close to the f32 model, not equal to it
    expect(relErr(logits[0], Array.from(logits[2]))).toBeLessThan(0.05);
    expect(relErr(logits[1], Array.from(logits[2]))).toBeLessThan(0.01);
    expect(maxAbs(logits[0], logits[2])).toBeGreaterThan(0);
  });
});

/* The library picks its instruction set once per process (REFORM_CPU_ISA lowers it): run this file's engine tests
 * again in child processes forced onto the AVX2 and the portable kernels (skipped inside those children). */
const forced = process.env.REFORM_CPU_ISA;
describe.skipIf(!!forced)("instruction sets", () => {
  const flags = (() => {
    try {
      return require("node:fs").readFileSync("/proc/cpuinfo", "utf8") as string;
    } catch {
      return "";
    }
  })();
  const sets = [
    "portable",
    ...(/\bavx2\b/.test(flags) && /\bfma\b/.test(flags) && /\bf16c\b/.test(flags) ? ["avx2"] : []),
  ];
  for (const isa of sets)
    test(`forward, compressor, scoring on the ${isa} kernels`, () => {
      const r = spawnSync(
        "bun",
        ["test", "test/native-forward.test.ts", "-t", "library|forward|long sequences|compressor|rf_score|init_random"],
        {
          cwd: ROOT_DIR,
          env: { ...process.env, REFORM_CPU_ISA: isa },
          encoding: "utf8",
        },
      );
      const out = `${r.stdout}${r.stderr}`;
      if (r.status !== 0) console.error(out);
      expect(r.status).toBe(0);
      expect(out).toMatch(/ 0 fail/);
      expect(Number(/(\d+) pass/.exec(out)?.[1] ?? 0)).toBeGreaterThan(15);
    }, 300_000);
});
