/**
 * safetensors reader: single file (model.safetensors) or sharded (model.safetensors.index.json).
 * Files are memory-mapped (Bun.mmap) and each tensor's bytes are handed to the native model, which
 * copies them. Supported dtypes: F32, F16, BF16 (anything else -> error naming tensor and dtype).
 * Non-model tensors (rotary inv_freq, ...) are skipped. Header bounds are validated.
 */
import { existsSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { RF_BF16, RF_F16, RF_F32, type DType } from "../../ffi/native.ts";

export class SafetensorsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "SafetensorsError";
  }
}

export interface TensorInfo {
  name: string;
  dtype: string; // safetensors dtype string
  shape: number[];
  begin: number; // absolute byte offset in the file
  end: number;
  file: string;
}

const DTYPE_SIZE: Record<string, number> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U8: 1,
  BOOL: 1,
  F8_E4M3: 1,
  F8_E5M2: 1,
  U16: 2,
  U32: 4,
  U64: 8,
};

export function nativeDtype(dtype: string): DType | null {
  return dtype === "F32" ? RF_F32 : dtype === "F16" ? RF_F16 : dtype === "BF16" ? RF_BF16 : null;
}

/** Parse a safetensors header from the first bytes of a file of total size `fileSize`. */
export function parseHeader(bytes: Uint8Array, fileSize: number, file: string): TensorInfo[] {
  if (fileSize < 8 || bytes.byteLength < 8)
    throw new SafetensorsError(`${file}: file too small to be safetensors (${fileSize} bytes)`);
  const n = new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true);
  if (n === 0n || n > BigInt(fileSize - 8) || n > 100_000_000n) {
    throw new SafetensorsError(`${file}: corrupt safetensors header length ${n} (file is ${fileSize} bytes)`);
  }
  const hlen = Number(n);
  if (bytes.byteLength < 8 + hlen) throw new SafetensorsError(`${file}: truncated header`);
  let header: Record<string, any>;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(8, 8 + hlen)));
  } catch (e) {
    throw new SafetensorsError(`${file}: corrupt safetensors header (${(e as Error).message})`);
  }
  if (!header || typeof header !== "object" || Array.isArray(header))
    throw new SafetensorsError(`${file}: header is not a JSON object`);
  const dataStart = 8 + hlen;
  const dataLen = fileSize - dataStart;
  const out: TensorInfo[] = [];
  for (const [name, v] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    if (
      !v ||
      typeof v !== "object" ||
      typeof v.dtype !== "string" ||
      !Array.isArray(v.shape) ||
      !Array.isArray(v.data_offsets) ||
      v.data_offsets.length !== 2
    ) {
      throw new SafetensorsError(`${file}: tensor "${name}" has a malformed header entry`);
    }
    const [b, e] = v.data_offsets as number[];
    if (!Number.isInteger(b) || !Number.isInteger(e) || b! < 0 || e! < b! || e! > dataLen) {
      throw new SafetensorsError(
        `${file}: tensor "${name}" data_offsets [${b}, ${e}] are outside the data section (${dataLen} bytes)`,
      );
    }
    const shape = (v.shape as unknown[]).map((s) => {
      if (typeof s !== "number" || !Number.isInteger(s) || s < 0)
        throw new SafetensorsError(`${file}: tensor "${name}" has an invalid shape`);
      return s;
    });
    const esz = DTYPE_SIZE[v.dtype];
    if (esz !== undefined) {
      const count = shape.reduce((a, c) => a * c, 1);
      if (count * esz !== e! - b!) {
        throw new SafetensorsError(
          `${file}: tensor "${name}" byte size ${e! - b!} does not match shape [${shape}] of ${v.dtype}`,
        );
      }
    }
    out.push({ name, dtype: v.dtype, shape, begin: dataStart + b!, end: dataStart + e!, file });
  }
  return out;
}

/** Files of a model dir: the single file or the shards listed by the index. */
export function modelFiles(dir: string): string[] {
  const idx = join(dir, "model.safetensors.index.json");
  if (existsSync(idx)) {
    let j: any;
    try {
      j = JSON.parse(readFileSync(idx, "utf8"));
    } catch (e) {
      throw new SafetensorsError(`model.safetensors.index.json: invalid JSON (${(e as Error).message})`);
    }
    if (!j || typeof j.weight_map !== "object")
      throw new SafetensorsError(`model.safetensors.index.json: missing "weight_map"`);
    const files = [...new Set(Object.values(j.weight_map as Record<string, string>))].sort();
    for (const f of files)
      if (!existsSync(join(dir, f)))
        throw new SafetensorsError(`shard ${f} listed in model.safetensors.index.json is missing`);
    return files.map((f) => join(dir, f));
  }
  const single = join(dir, "model.safetensors");
  if (existsSync(single)) return [single];
  throw new SafetensorsError(`model directory ${dir} has no model.safetensors or model.safetensors.index.json`);
}

/** Read all tensor headers of a model dir. */
export function listTensors(dir: string): TensorInfo[] {
  const out: TensorInfo[] = [];
  for (const f of modelFiles(dir)) {
    const size = statSync(f).size;
    if (size < 8) throw new SafetensorsError(`${f}: file too small to be safetensors (${size} bytes)`);
    const m = Bun.mmap(f, { shared: false });
    out.push(...parseHeader(m, size, f));
  }
  return out;
}

/** Tensors the native model does not take (buffers saved by some exports). */
export function isSkippedTensor(name: string): boolean {
  return /rotary_emb\.inv_freq$/.test(name) || /\.masked_bias$/.test(name) || /\.attn\.bias$/.test(name);
}

export interface TensorSink {
  setTensor(name: string, data: ArrayBufferView, dtype: DType, shape: number[]): void;
}

/**
 * Load every model tensor of `dir` into `sink` (a NativeModel). Returns the number of tensors loaded.
 * `onProgress(done, total)` is called after each tensor.
 */
export function loadSafetensors(
  dir: string,
  sink: TensorSink,
  onProgress?: (done: number, total: number) => void,
): number {
  const files = modelFiles(dir);
  const maps: { file: string; map: Uint8Array; tensors: TensorInfo[] }[] = [];
  for (const f of files) {
    const size = statSync(f).size;
    if (size < 8) throw new SafetensorsError(`${f}: file too small to be safetensors (${size} bytes)`);
    const map = Bun.mmap(f, { shared: false });
    maps.push({ file: f, map, tensors: parseHeader(map, size, f) });
  }
  const all = maps.flatMap((m) => m.tensors.map((t) => ({ t, map: m.map })));
  const todo = all.filter(({ t }) => !isSkippedTensor(t.name));
  let done = 0;
  for (const { t, map } of todo) {
    const dt = nativeDtype(t.dtype);
    if (dt === null) {
      throw new SafetensorsError(`tensor "${t.name}" has unsupported dtype ${t.dtype} (supported: F32, F16, BF16)`);
    }
    let view: ArrayBufferView = map.subarray(t.begin, t.end);
    // the native side reads elements of 2/4 bytes; give it an aligned copy when the mmap offset is unaligned
    const esz = DTYPE_SIZE[t.dtype]!;
    if ((map.byteOffset + t.begin) % esz !== 0) view = new Uint8Array(view as Uint8Array);
    sink.setTensor(t.name, view, dt, t.shape);
    done++;
    onProgress?.(done, todo.length);
  }
  return done;
}
