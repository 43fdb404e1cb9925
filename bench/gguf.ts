/**
 * A GGUF v3 writer (llama architecture) for the peer benchmark: the same random weights our engine gets through
 * rf_model_set_tensor, in the layout llama.cpp loads, plus a minimal SentencePiece-style vocabulary (the
 * benchmark feeds token ids, so the pieces only need to be unique and include the byte tokens llama.cpp looks up).
 *
 * Hugging Face stores q_proj / k_proj rows for rotate-half RoPE (a head's first half of dims pairs with its second
 * half); GGUF's llama layout pairs adjacent dims, so those rows are permuted per head exactly as llama.cpp's
 * convert_hf_to_gguf.py does (row h*d + 2i + s <- row h*d + s*d/2 + i).
 */
import { closeSync, openSync, writeSync } from "node:fs";

export const GGML_F32 = 0;
export const GGML_F16 = 1;
export const GGML_BF16 = 30;

const T_U32 = 4,
  T_I32 = 5,
  T_F32 = 6,
  T_BOOL = 7,
  T_STRING = 8,
  T_ARRAY = 9;

export type GgufValue =
  | { u32: number }
  | { f32: number }
  | { bool: boolean }
  | { str: string }
  | { strings: string[] }
  | { f32s: Float32Array }
  | { i32s: Int32Array };

export interface GgufTensor {
  name: string;
  /** ggml order: ne[0] is the contiguous dimension (a [rows, cols] matrix is [cols, rows]). */
  ne: number[];
  type: typeof GGML_F32 | typeof GGML_F16 | typeof GGML_BF16;
  data: Float32Array | Uint16Array;
}

const ALIGN = 32;

class Buf {
  private chunks: Uint8Array[] = [];
  private cur = new Uint8Array(1 << 16);
  private dv = new DataView(this.cur.buffer);
  private pos = 0;
  length = 0;
  private room(n: number) {
    if (this.pos + n <= this.cur.length) return;
    this.chunks.push(this.cur.subarray(0, this.pos));
    this.cur = new Uint8Array(Math.max(1 << 16, n));
    this.dv = new DataView(this.cur.buffer);
    this.pos = 0;
  }
  u32(v: number) {
    this.room(4);
    this.dv.setUint32(this.pos, v, true);
    this.pos += 4;
    this.length += 4;
  }
  i32(v: number) {
    this.room(4);
    this.dv.setInt32(this.pos, v, true);
    this.pos += 4;
    this.length += 4;
  }
  u64(v: number) {
    this.room(8);
    this.dv.setBigUint64(this.pos, BigInt(v), true);
    this.pos += 8;
    this.length += 8;
  }
  f32(v: number) {
    this.room(4);
    this.dv.setFloat32(this.pos, v, true);
    this.pos += 4;
    this.length += 4;
  }
  bytes(b: Uint8Array) {
    this.room(b.length);
    this.cur.set(b, this.pos);
    this.pos += b.length;
    this.length += b.length;
  }
  str(s: string) {
    const b = new TextEncoder().encode(s);
    this.u64(b.length);
    this.bytes(b);
  }
  pad() {
    const n = (ALIGN - (this.length % ALIGN)) % ALIGN;
    this.bytes(new Uint8Array(n));
  }
  parts(): Uint8Array[] {
    return [...this.chunks, this.cur.subarray(0, this.pos)];
  }
}

function writeValue(b: Buf, v: GgufValue) {
  if ("u32" in v) {
    b.u32(T_U32);
    b.u32(v.u32);
  } else if ("f32" in v) {
    b.u32(T_F32);
    b.f32(v.f32);
  } else if ("bool" in v) {
    b.u32(T_BOOL);
    b.bytes(Uint8Array.of(v.bool ? 1 : 0));
  } else if ("str" in v) {
    b.u32(T_STRING);
    b.str(v.str);
  } else if ("strings" in v) {
    b.u32(T_ARRAY);
    b.u32(T_STRING);
    b.u64(v.strings.length);
    for (const s of v.strings) b.str(s);
  } else if ("f32s" in v) {
    b.u32(T_ARRAY);
    b.u32(T_F32);
    b.u64(v.f32s.length);
    for (const x of v.f32s) b.f32(x);
  } else {
    b.u32(T_ARRAY);
    b.u32(T_I32);
    b.u64(v.i32s.length);
    for (const x of v.i32s) b.i32(x);
  }
}

/** Write a GGUF v3 file: header, metadata, tensor infos, then the tensors, each 32-byte aligned. */
export function writeGguf(path: string, meta: [string, GgufValue][], tensors: GgufTensor[]): number {
  const h = new Buf();
  h.bytes(new TextEncoder().encode("GGUF"));
  h.u32(3);
  h.u64(tensors.length);
  h.u64(meta.length);
  for (const [k, v] of meta) {
    h.str(k);
    writeValue(h, v);
  }
  let off = 0;
  for (const t of tensors) {
    h.str(t.name);
    h.u32(t.ne.length);
    for (const d of t.ne) h.u64(d);
    h.u32(t.type);
    h.u64(off);
    off += Math.ceil(t.data.byteLength / ALIGN) * ALIGN;
  }
  h.pad();
  const fd = openSync(path, "w");
  try {
    for (const p of h.parts()) writeSync(fd, p);
    const zero = new Uint8Array(ALIGN);
    for (const t of tensors) {
      writeSync(fd, new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength));
      const pad = (ALIGN - (t.data.byteLength % ALIGN)) % ALIGN;
      if (pad) writeSync(fd, zero.subarray(0, pad));
    }
  } finally {
    closeSync(fd);
  }
  return h.length + off;
}

/** Rows of a [nHeads*headDim, cols] q/k projection from HF rotate-half order to GGUF's interleaved order. */
export function permuteRope<T extends Float32Array | Uint16Array>(
  w: T,
  nHeads: number,
  headDim: number,
  cols: number,
): T {
  const out = new (w.constructor as new (n: number) => T)(w.length);
  const half = headDim / 2;
  for (let h = 0; h < nHeads; h++)
    for (let i = 0; i < half; i++)
      for (let s = 0; s < 2; s++) {
        const src = (h * headDim + s * half + i) * cols;
        const dst = (h * headDim + 2 * i + s) * cols;
        out.set(w.subarray(src, src + cols), dst);
      }
  return out;
}

/** A vocabulary llama.cpp's SentencePiece ("llama") tokenizer loads: <unk>, <s>, </s>, the 256 byte pieces, then
 * unique filler pieces up to `size`. */
export function minimalVocab(size: number): [string, GgufValue][] {
  const tokens: string[] = ["<unk>", "<s>", "</s>"];
  const types = [2, 3, 3]; // unknown, control, control
  for (let b = 0; b < 256; b++) {
    tokens.push(`<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`);
    types.push(6); // byte
  }
  for (let i = tokens.length; i < size; i++) {
    tokens.push(`\u2581t${i}`);
    types.push(1); // normal
  }
  return [
    ["tokenizer.ggml.model", { str: "llama" }],
    ["tokenizer.ggml.tokens", { strings: tokens }],
    ["tokenizer.ggml.scores", { f32s: Float32Array.from(tokens, (_, i) => -i) }],
    ["tokenizer.ggml.token_type", { i32s: Int32Array.from(types) }],
    ["tokenizer.ggml.unknown_token_id", { u32: 0 }],
    ["tokenizer.ggml.bos_token_id", { u32: 1 }],
    ["tokenizer.ggml.eos_token_id", { u32: 2 }],
    ["tokenizer.ggml.add_bos_token", { bool: false }],
    ["tokenizer.ggml.add_eos_token", { bool: false }],
  ];
}

/** Parse a GGUF file's header, metadata and tensor infos (for the round-trip test). */
export function readGgufHeader(buf: Uint8Array): {
  version: number;
  meta: Map<string, unknown>;
  tensors: { name: string; ne: number[]; type: number; offset: number }[];
  dataStart: number;
} {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let p = 0;
  /** the position before advancing it by n bytes */
  const take = (n: number) => {
    p += n;
    return p - n;
  };
  const u32 = () => dv.getUint32(take(4), true);
  const u64 = () => Number(dv.getBigUint64(take(8), true));
  const str = () => {
    const n = u64();
    p += n;
    return new TextDecoder().decode(buf.subarray(p - n, p));
  };
  const scalar = (t: number): unknown => {
    if (t === T_U32) return u32();
    if (t === T_I32) return dv.getInt32(take(4), true);
    if (t === T_F32) return dv.getFloat32(take(4), true);
    if (t === T_BOOL) return buf[p++] !== 0;
    if (t === T_STRING) return str();
    throw new Error(`gguf: unsupported value type ${t}`);
  };
  if (new TextDecoder().decode(buf.subarray(0, 4)) !== "GGUF") throw new Error("gguf: bad magic");
  p = 4;
  const version = u32();
  const nT = u64();
  const nKv = u64();
  const meta = new Map<string, unknown>();
  for (let i = 0; i < nKv; i++) {
    const k = str();
    const t = u32();
    if (t === T_ARRAY) {
      const et = u32();
      const n = u64();
      meta.set(
        k,
        Array.from({ length: n }, () => scalar(et)),
      );
    } else meta.set(k, scalar(t));
  }
  const tensors = [];
  for (let i = 0; i < nT; i++) {
    const name = str();
    const nd = u32();
    const ne = Array.from({ length: nd }, u64);
    tensors.push({ name, ne, type: u32(), offset: u64() });
  }
  return { version, meta, tensors, dataStart: Math.ceil(p / ALIGN) * ALIGN };
}
