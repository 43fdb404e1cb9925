/**
 * Deterministic tiny random Llama-family models for native-engine tests (weights + the matching Float64
 * reference weights), and small numeric helpers shared by the native test files.
 */
import { expect } from "bun:test";
import {
  NativeError,
  RF_BF16,
  RF_F32,
  RF_ROPE_LINEAR,
  RF_ROPE_LLAMA3,
  type DType,
  type Native,
  type NativeModel,
} from "../../ffi/native";
import type { ModelConfig } from "../../src/model/types.ts";
import { gaussian, mulberry32 } from "../../src/util/rng.ts";
import type { RefConfig, RefLayer, RefWeights } from "../reference/llama-ref";

// Re-exported: the native test files take every helper from here.
export { gaussian, mulberry32 };

/* ---------------- deterministic tiny models ---------------- */

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
export function toBf16(x: number): number {
  f32[0] = x;
  const u = u32[0];
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}
export function fromBf16(h: number): number {
  u32[0] = (h << 16) >>> 0;
  return f32[0];
}
const dv = new DataView(new ArrayBuffer(2));
export function toF16(x: number): number {
  dv.setFloat16(0, x, true);
  return dv.getUint16(0, true);
}
export function fromF16(h: number): number {
  dv.setUint16(0, h, true);
  return dv.getFloat16(0, true);
}

export interface Variant {
  name: string;
  /** sizes (defaults: vocab 97, hidden 32, intermediate 64, 4 heads, 2 kv heads, head_dim 8) */
  dims?: { vocab?: number; hidden?: number; intermediate?: number; heads?: number; kvHeads?: number; headDim?: number };
  tie: boolean;
  bias: boolean;
  /** Qwen3's per-head q/k RMSNorm */
  qkNorm?: boolean;
  rope: number;
  dtype: DType;
  layers: number;
  seed: number;
  /** the weights' storage dtype (rf_config.weight_dtype; both builds keep matrices in it) */
  weightDtype?: DType;
}

export interface Built {
  cfg: ModelConfig;
  ref: RefConfig;
  w: RefWeights;
  tensors: { name: string; data: ArrayBufferView; dtype: DType; shape: number[] }[];
}

export function buildModel(v: Variant): Built {
  const rng = mulberry32(v.seed);
  const cfg: ModelConfig = {
    vocabSize: v.dims?.vocab ?? 97,
    hiddenSize: v.dims?.hidden ?? 32,
    intermediateSize: v.dims?.intermediate ?? 64,
    numLayers: v.layers,
    numHeads: v.dims?.heads ?? 4,
    numKvHeads: v.dims?.kvHeads ?? 2,
    headDim: v.dims?.headDim ?? 8,
    qkvBias: v.bias,
    qkNorm: v.qkNorm ?? false,
    tieEmbeddings: v.tie,
    ropeType: v.rope,
    rmsEps: 1e-5,
    ropeTheta: v.rope === RF_ROPE_LLAMA3 ? 500000 : 10000,
    ropeFactor: v.rope === RF_ROPE_LLAMA3 ? 8 : v.rope === RF_ROPE_LINEAR ? 2 : 1,
    ropeLowFreqFactor: 1,
    ropeHighFreqFactor: 4,
    ropeOriginalMaxPos: 64, // small so that the llama3 bands all occur with head_dim 8
    weightDtype: v.weightDtype ?? RF_BF16,
  };
  const ref: RefConfig = { ...cfg };
  const tensors: Built["tensors"] = [];
  const make = (name: string, shape: number[], std: number, mean = 0): Float64Array => {
    const n = shape.reduce((a, b) => a * b, 1);
    const raw = new Float32Array(n);
    for (let i = 0; i < n; i++) raw[i] = mean + std * gaussian(rng);
    const vals = new Float64Array(n);
    let data: ArrayBufferView;
    if (v.dtype === RF_F32) {
      data = raw;
      for (let i = 0; i < n; i++) vals[i] = raw[i];
    } else {
      const bits = new Uint16Array(n);
      for (let i = 0; i < n; i++) {
        bits[i] = v.dtype === RF_BF16 ? toBf16(raw[i]) : toF16(raw[i]);
        vals[i] = v.dtype === RF_BF16 ? fromBf16(bits[i]) : fromF16(bits[i]);
      }
      data = bits;
    }
    tensors.push({ name, data, dtype: v.dtype, shape });
    return vals;
  };
  const H = cfg.hiddenSize;
  const I = cfg.intermediateSize;
  const qd = cfg.numHeads * cfg.headDim;
  const kvd = cfg.numKvHeads * cfg.headDim;
  const embed = make("model.embed_tokens.weight", [cfg.vocabSize, H], 1);
  const layers: RefLayer[] = [];
  for (let l = 0; l < cfg.numLayers; l++) {
    const p = `model.layers.${l}.`;
    const L: RefLayer = {
      inNorm: make(p + "input_layernorm.weight", [H], 0.1, 1),
      postNorm: make(p + "post_attention_layernorm.weight", [H], 0.1, 1),
      wq: make(p + "self_attn.q_proj.weight", [qd, H], 2 / Math.sqrt(H)),
      wk: make(p + "self_attn.k_proj.weight", [kvd, H], 2 / Math.sqrt(H)),
      wv: make(p + "self_attn.v_proj.weight", [kvd, H], 1 / Math.sqrt(H)),
      wo: make(p + "self_attn.o_proj.weight", [H, qd], 1 / Math.sqrt(qd)),
      gate: make(p + "mlp.gate_proj.weight", [I, H], 1 / Math.sqrt(H)),
      up: make(p + "mlp.up_proj.weight", [I, H], 1 / Math.sqrt(H)),
      down: make(p + "mlp.down_proj.weight", [H, I], 1 / Math.sqrt(I)),
    };
    if (v.bias) {
      L.bq = make(p + "self_attn.q_proj.bias", [qd], 0.3);
      L.bk = make(p + "self_attn.k_proj.bias", [kvd], 0.3);
      L.bv = make(p + "self_attn.v_proj.bias", [kvd], 0.3);
    }
    if (v.qkNorm) {
      // weights well away from 1 and from each other: attention as peaked as the other variants' (|q.k|/sqrt(hd)
      // ~ 4), and a norm applied with the wrong weights, to the wrong heads or after RoPE would show
      L.qNorm = make(p + "self_attn.q_norm.weight", [cfg.headDim], 0.5, 2);
      L.kNorm = make(p + "self_attn.k_norm.weight", [cfg.headDim], 0.5, 2);
    }
    layers.push(L);
  }
  const norm = make("model.norm.weight", [H], 0.1, 1);
  const w: RefWeights = { embed, norm, layers };
  if (!v.tie) w.lmHead = make("lm_head.weight", [cfg.vocabSize, H], 1 / Math.sqrt(H));
  return { cfg, ref, w, tensors };
}

export function loadModel(native: Native, b: Built): NativeModel {
  const m = native.createModel(b.cfg);
  for (const t of b.tensors) m.setTensor(t.name, t.data, t.dtype, t.shape);
  m.finalize();
  return m;
}

export function tokensFrom(seed: number, n: number, vocab = 97): number[] {
  const rng = mulberry32(seed);
  return Array.from({ length: n }, () => Math.floor(rng() * vocab));
}

export function relErr(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < b.length; i++) {
    num = Math.max(num, Math.abs(a[i] - b[i]));
    den = Math.max(den, Math.abs(b[i]));
  }
  return num / Math.max(den, 1e-30);
}
export function maxAbs(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < b.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}
export function flat(rows: Float64Array[]): Float64Array {
  const n = rows.reduce((a, r) => a + r.length, 0);
  const o = new Float64Array(n);
  let off = 0;
  for (const r of rows) {
    o.set(r, off);
    off += r.length;
  }
  return o;
}
export const i32 = (a: number[]) => new Int32Array(a);

/** fn must throw a NativeError with this code (and a message matching msg) */
export function expectNativeError(fn: () => unknown, code: number, msg?: RegExp): void {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(NativeError);
  expect((err as NativeError).code).toBe(code);
  if (msg) expect((err as NativeError).message).toMatch(msg);
}

/** Parse a compressor state blob (layout: cuda/reform_common.h StateHeader, then per layer and kv head the
 * pre-RoPE keys, values and H2O scores as f32): [layer][kvHead] {k, v, s}. Throws on a malformed blob. */
/** A state blob as saved before the exit layer's cache was dropped (magic RFCSTAT1, one more layer: zeros here). */
export function legacyState(buf: Uint8Array, hd: number): Uint8Array {
  const st = parseState(buf, hd);
  const extra = st.kvh * st.len * (2 * hd + 1) * 4;
  const out = new Uint8Array(buf.byteLength + extra);
  out.set(buf);
  out.set(new TextEncoder().encode("RFCSTAT1"), 0);
  new DataView(out.buffer).setInt32(8, st.layers + 1, true);
  return out;
}

export function parseState(buf: Uint8Array, hd: number) {
  const d = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const magic = new TextDecoder().decode(buf.subarray(0, 8));
  const layers = d.getInt32(8, true);
  const kvh = d.getInt32(12, true);
  if (d.getInt32(16, true) !== hd) throw new Error(`state blob head_dim ${d.getInt32(16, true)} != ${hd}`);
  const len = Number(d.getBigInt64(24, true));
  const seen = Number(d.getBigInt64(32, true));
  let off = 72;
  const f = (count: number) => {
    const a = new Float32Array(buf.slice(off, off + count * 4).buffer);
    off += count * 4;
    return a;
  };
  const cache: { k: Float32Array; v: Float32Array; s: Float32Array }[][] = [];
  for (let l = 0; l < layers; l++) {
    const row = [];
    for (let g = 0; g < kvh; g++) row.push({ k: f(len * hd), v: f(len * hd), s: f(len) });
    cache.push(row);
  }
  if (off !== buf.byteLength) throw new Error(`state blob has ${buf.byteLength} bytes, layout says ${off}`);
  return { magic, layers, kvh, len, seen, cache };
}
