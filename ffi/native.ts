/**
 * Typed bun:ffi binding to the native REFORM engine (cuda/reform.h).
 *
 * Two shared libraries implement the same C ABI: build/libreform_cuda.so (GPU) and
 * build/libreform_cpu.so (CPU). `loadNative()` picks one: a forced backend ("cpu" | "cuda"), or CUDA when
 *   its library exists and reports at least one device, else CPU. The choice itself (flags, REFORM_BACKEND)
 *   is made by the caller's configuration (src/config.ts); this binding reads no environment.
 * Every failing native call is turned into a NativeError carrying the status code and message.
 * Native calls block the calling thread: use them from the engine worker, never the HTTP thread.
 */
import { dlopen, FFIType, ptr, type Pointer, CString } from "bun:ffi";
import { existsSync } from "node:fs";
import { join, resolve } from "node:path";
import type { HeadSpec, ModelConfig } from "../src/model/types.ts";

export const RF_OK = 0;
export const RF_ERR_INVALID = -1;
export const RF_ERR_OOM = -2;
export const RF_ERR_DEVICE = -3;
export const RF_ERR_STATE = -4;
export const RF_ERR_NODEVICE = -5;
export const RF_ERR_INTERNAL = -6;

export const RF_F32 = 0;
export const RF_F16 = 1;
export const RF_BF16 = 2;
export type DType = typeof RF_F32 | typeof RF_F16 | typeof RF_BF16;

export const RF_ROPE_DEFAULT = 0;
export const RF_ROPE_LLAMA3 = 1;
export const RF_ROPE_LINEAR = 2;

export const RF_HEAD_Q = 0;
export const RF_HEAD_K = 1;
export const RF_HEAD_V = 2;
export const RF_HEAD_O = 3;
const HEAD_KIND: Record<HeadSpec["kind"], number> = { q: RF_HEAD_Q, k: RF_HEAD_K, v: RF_HEAD_V, o: RF_HEAD_O };

/** The compressor's ranking of its evictable entries (reform.h: H2O accumulates the observation window's attention,
 * TOVA ranks by the chunk's last query, summed over the layer's heads). StreamingLLM is not a ranking: it is a cache of
 * sinks and recent entries only (nRecent = capacity - nSink). */
export const RF_EVICT_H2O = 0;
export const RF_EVICT_TOVA = 1;
export type EvictRank = "h2o" | "tova";
const EVICT_RANK: Record<EvictRank, number> = { h2o: RF_EVICT_H2O, tova: RF_EVICT_TOVA };

/** The query-time pooling operators of rf_smooth_select / rf_score_select (selection.ts SmoothingOp). */
export const RF_POOL_MEAN = 0;
export const RF_POOL_MAX = 1;
export type PoolOp = "mean" | "max";
/** What rf_score_select keeps: smoothing `window` (odd), trailing each position by `lag` (0..window/2, default 0),
 * pooled with `pool` (default mean); `budget` positions of which the first and last `edge` always. `offsets` (n_q
 * finite values, optional): taken off each query row's cosine before the maximum over the rows (q_offset). */
export interface ScoreSelection {
  window: number;
  lag?: number;
  budget: number;
  edge: number;
  pool?: PoolOp;
  offsets?: Float32Array;
  /** query row pairs (cuda/reform.h RF_PAIRS_MAX): 2 int32 per pair, (a, b) query rows matching context rows (i - 1, i) */
  pairs?: Int32Array;
  /** each pair's offset (pairs.length / 2 f32, or none: 0), as `offsets` for the single rows */
  pairOffsets?: Float32Array;
}
const POOL: Record<PoolOp, number> = { mean: RF_POOL_MEAN, max: RF_POOL_MAX };

/** The lag argument of the selection entry points: a whole number (the library checks its range against the window;
 * `| 0` would silently truncate a fraction). */
function lagArg(lag: number | undefined, where: string): number {
  const x = lag ?? 0;
  if (!Number.isInteger(x)) throw new Error(`${where}: lag ${x} is not a whole number`);
  return x;
}

/** rf_score_select's q_offset: the selection's offsets (checked against the query rows) or NULL */
function offsetsArg(sel: ScoreSelection, nQ: number, where: string): Float32Array | null {
  const o = sel.offsets;
  if (!o) return null;
  if (o.length < nQ) throw new Error(`${where}: ${o.length} offsets for ${nQ} query rows`);
  return o;
}

/** rf_score_select's pairs, n_pairs and pair_offset: the selection's pairs (checked against the query rows and their
 * offsets) or NULL, 0, NULL */
function pairsArg(
  pairs: Int32Array | undefined,
  pairOffsets: Float32Array | undefined,
  nQ: number,
  where: string,
): [Int32Array | null, number, Float32Array | null] {
  if (!pairs || pairs.length === 0) return [null, 0, null];
  if (pairs.length % 2 !== 0) throw new Error(`${where}: pairs holds ${pairs.length} values, not (a, b) pairs`);
  const n = pairs.length / 2;
  for (const j of pairs)
    if (!Number.isInteger(j) || j < 0 || j >= nQ)
      throw new Error(`${where}: pair row ${j} outside the ${nQ} query rows`);
  if (pairOffsets && pairOffsets.length < n)
    throw new Error(`${where}: ${pairOffsets.length} pair offsets for ${n} pairs`);
  return [pairs, n, pairOffsets ?? null];
}

/** The context, query and scores arguments of the scoring entry points (scoreKth, scoreSelect, scoreKthSelect),
 * checked: the rows to pass (an empty context gets a non-NULL placeholder, since bun:ffi passes an empty array as NULL;
 * the library reads none of it) and their dtype. */
function scoringArgs(
  ctx: Float32Array | Uint16Array | MappedRows,
  nCtx: number,
  dim: number,
  q: Float32Array,
  nQ: number,
  where: string,
  scores?: Float32Array,
): { data: Pointer | Float32Array | Uint16Array; dtype: number } {
  if (ctx.length < nCtx * dim) throw new Error(`${where}: ctx smaller than n_ctx*dim`);
  const mapped = "ptr" in ctx;
  if (mapped && ctx.dtype !== RF_F16 && ctx.dtype !== RF_F32) throw new Error(`${where}: bad dtype`);
  if (q.length < nQ * dim) throw new Error(`${where}: q smaller than n_q*dim`);
  if (scores && scores.length < nCtx) throw new Error(`${where}: scores smaller than n_ctx`);
  if (mapped) return { data: ctx.ptr, dtype: ctx.dtype };
  return { data: ctx.length > 0 ? ctx : new Float32Array(1), dtype: ctx instanceof Float32Array ? RF_F32 : RF_F16 };
}

/** The ABI version this binding packs and calls (cuda/reform.h RF_ABI_VERSION). */
export const RF_ABI_VERSION = 8;

const CODE_NAMES: Record<number, string> = {
  [RF_ERR_INVALID]: "invalid_argument",
  [RF_ERR_OOM]: "out_of_memory",
  [RF_ERR_DEVICE]: "device_error",
  [RF_ERR_STATE]: "invalid_state",
  [RF_ERR_NODEVICE]: "no_device",
  [RF_ERR_INTERNAL]: "internal_error",
};

export class NativeError extends Error {
  readonly code: number;
  readonly codeName: string;
  constructor(code: number, message: string, where: string) {
    const name = CODE_NAMES[code] ?? `error_${code}`;
    super(`${where}: ${name}: ${message || "(no message)"}`);
    this.code = code;
    this.codeName = name;
    this.name = "NativeError";
  }
}

export interface CompressParams {
  capacity: number;
  nSink: number;
  nRecent: number;
  obsWindow: number;
  maxChunk: number;
  embDtype: typeof RF_F32 | typeof RF_F16;
  exitLayer: number; // -1: derived from the heads
  /** how evictable entries are ranked (default h2o) */
  eviction?: EvictRank;
}

/** A file mapped by Native.mapFile: its address and size in bytes. */
export interface MappedFile {
  ptr: Pointer;
  bytes: number;
}

/** Embedding rows in a mapped file, as scoreSelect reads them: `length` elements (rows x dim) of `dtype` at `ptr`. */
export interface MappedRows {
  ptr: Pointer;
  dtype: typeof RF_F16 | typeof RF_F32;
  length: number;
}

const symbols = {
  rf_abi_version: { args: [], returns: FFIType.i32 },
  rf_backend_name: { args: [], returns: FFIType.cstring },
  rf_last_error: { args: [], returns: FFIType.cstring },
  rf_last_error_code: { args: [], returns: FFIType.i32 },
  rf_device_count: { args: [], returns: FFIType.i32 },
  rf_device_info: { args: [FFIType.ptr, FFIType.i32], returns: FFIType.i32 },
  rf_set_threads: { args: [FFIType.i32], returns: FFIType.i32 },
  rf_struct_layout: { args: [], returns: FFIType.cstring },

  rf_model_create: { args: [FFIType.ptr], returns: FFIType.ptr },
  rf_model_set_tensor: {
    args: [FFIType.ptr, FFIType.cstring, FFIType.ptr, FFIType.i32, FFIType.ptr, FFIType.i32],
    returns: FFIType.i32,
  },
  rf_model_init_random: { args: [FFIType.ptr, FFIType.u64, FFIType.f32], returns: FFIType.i32 },
  rf_model_finalize: { args: [FFIType.ptr], returns: FFIType.i32 },
  rf_model_memory_bytes: { args: [FFIType.ptr], returns: FFIType.i64_fast },
  rf_memory_info: { args: [FFIType.ptr, FFIType.ptr, FFIType.i32], returns: FFIType.i32 },
  rf_compressor_memory_bytes: { args: [FFIType.ptr], returns: FFIType.i64_fast },
  rf_model_destroy: { args: [FFIType.ptr], returns: FFIType.void },

  rf_compressor_create: { args: [FFIType.ptr, FFIType.ptr, FFIType.ptr, FFIType.i32], returns: FFIType.ptr },
  rf_compressor_embed_dim: { args: [FFIType.ptr], returns: FFIType.i32 },
  rf_compressor_exit_layer: { args: [FFIType.ptr], returns: FFIType.i32 },
  rf_compressor_process: { args: [FFIType.ptr, FFIType.ptr, FFIType.i32, FFIType.ptr], returns: FFIType.i32 },
  rf_compressor_embed: { args: [FFIType.ptr, FFIType.ptr, FFIType.i32, FFIType.ptr], returns: FFIType.i32 },
  rf_compressor_submit: { args: [FFIType.ptr, FFIType.ptr, FFIType.i32], returns: FFIType.i32 },
  rf_compressor_collect: { args: [FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
  rf_compressor_pending: { args: [FFIType.ptr], returns: FFIType.i32 },
  rf_compressor_cache_len: { args: [FFIType.ptr], returns: FFIType.i64_fast },
  rf_compressor_seen: { args: [FFIType.ptr], returns: FFIType.i64_fast },
  rf_compressor_reset: { args: [FFIType.ptr], returns: FFIType.i32 },
  rf_compressor_state_size: { args: [FFIType.ptr], returns: FFIType.i64_fast },
  rf_compressor_state_save: { args: [FFIType.ptr, FFIType.ptr, FFIType.i64], returns: FFIType.i32 },
  rf_compressor_state_load: { args: [FFIType.ptr, FFIType.ptr, FFIType.i64], returns: FFIType.i32 },
  rf_compressor_destroy: { args: [FFIType.ptr], returns: FFIType.void },

  rf_score: {
    args: [FFIType.ptr, FFIType.i32, FFIType.i64, FFIType.i32, FFIType.ptr, FFIType.i32, FFIType.ptr],
    returns: FFIType.i32,
  },

  rf_score_kth: {
    args: [
      FFIType.ptr,
      FFIType.i32,
      FFIType.i64,
      FFIType.i32,
      FFIType.ptr,
      FFIType.i32,
      FFIType.ptr,
      FFIType.i32,
      FFIType.i32,
      FFIType.ptr,
    ],
    returns: FFIType.i32,
  },

  rf_embstore_create: { args: [FFIType.ptr, FFIType.i32], returns: FFIType.ptr },
  rf_embstore_append: { args: [FFIType.ptr, FFIType.ptr, FFIType.i64], returns: FFIType.i32 },
  rf_embstore_rows: { args: [FFIType.ptr], returns: FFIType.i64_fast },
  rf_embstore_memory_bytes: { args: [FFIType.ptr], returns: FFIType.i64_fast },
  rf_embstore_score_select: {
    args: [
      FFIType.ptr,
      FFIType.i64,
      FFIType.ptr,
      FFIType.i32,
      FFIType.ptr,
      FFIType.ptr,
      FFIType.i32,
      FFIType.ptr,
      FFIType.i32,
      FFIType.i32,
      FFIType.i32,
      FFIType.i64,
      FFIType.i32,
      FFIType.ptr,
      FFIType.ptr,
    ],
    returns: FFIType.i64_fast,
  },
  rf_embstore_score_kth: {
    args: [FFIType.ptr, FFIType.i64, FFIType.ptr, FFIType.i32, FFIType.ptr, FFIType.i32, FFIType.i32, FFIType.ptr],
    returns: FFIType.i32,
  },
  rf_embstore_destroy: { args: [FFIType.ptr], returns: FFIType.void },

  rf_seq_create: { args: [FFIType.ptr, FFIType.i32], returns: FFIType.ptr },
  rf_seq_forward: { args: [FFIType.ptr, FFIType.ptr, FFIType.i32, FFIType.ptr], returns: FFIType.i32 },
  rf_seq_sample: { args: [FFIType.ptr, FFIType.f32, FFIType.f32, FFIType.i32, FFIType.ptr], returns: FFIType.i32 },
  rf_sample_logits: {
    args: [FFIType.ptr, FFIType.i32, FFIType.f32, FFIType.f32, FFIType.i32, FFIType.ptr],
    returns: FFIType.i32,
  },
  rf_seq_length: { args: [FFIType.ptr], returns: FFIType.i32 },
  rf_seq_reset: { args: [FFIType.ptr], returns: FFIType.i32 },
  rf_seq_import_compressor: { args: [FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
  rf_seq_destroy: { args: [FFIType.ptr], returns: FFIType.void },
  rf_smooth_select: {
    args: [
      FFIType.ptr,
      FFIType.i64,
      FFIType.i32,
      FFIType.i32,
      FFIType.i32,
      FFIType.i64,
      FFIType.i32,
      FFIType.ptr,
      FFIType.ptr,
    ],
    returns: FFIType.i64_fast,
  },
  rf_score_select: {
    args: [
      FFIType.ptr,
      FFIType.i32,
      FFIType.i64,
      FFIType.i32,
      FFIType.ptr,
      FFIType.i32,
      FFIType.ptr,
      FFIType.ptr,
      FFIType.i32,
      FFIType.ptr,
      FFIType.i32,
      FFIType.i32,
      FFIType.i32,
      FFIType.i64,
      FFIType.i32,
      FFIType.ptr,
      FFIType.ptr,
    ],
    returns: FFIType.i64_fast,
  },
  rf_score_kth_select: {
    args: [
      FFIType.ptr,
      FFIType.i32,
      FFIType.i64,
      FFIType.i32,
      FFIType.ptr,
      FFIType.i32,
      FFIType.ptr,
      FFIType.i32,
      FFIType.i32,
      FFIType.i32,
      FFIType.i32,
      FFIType.i32,
      FFIType.i64,
      FFIType.i32,
      FFIType.ptr,
      FFIType.ptr,
      FFIType.ptr,
    ],
    returns: FFIType.i64_fast,
  },
  rf_map_file: { args: [FFIType.ptr, FFIType.ptr], returns: FFIType.ptr },
  rf_unmap_file: { args: [FFIType.ptr, FFIType.i64], returns: FFIType.i32 },
} as const;

type Lib = ReturnType<typeof dlopen<typeof symbols>>["symbols"];

type FieldType = "i32" | "f32";
interface StructSpec<F extends string> {
  readonly name: string;
  readonly size: number;
  /** C field name -> [byte offset, type]; reserved words are left zero */
  readonly fields: Readonly<Record<F, readonly [number, FieldType]>>;
}

/** The structs packed here by hand. Their offsets are checked against the library's rf_struct_layout() when it
 * loads, so a changed cuda/reform.h fails loudly instead of silently misplacing a field. */
const RF_CONFIG = {
  name: "rf_config",
  size: 128,
  fields: {
    vocab_size: [0, "i32"],
    hidden_size: [4, "i32"],
    intermediate_size: [8, "i32"],
    num_layers: [12, "i32"],
    num_heads: [16, "i32"],
    num_kv_heads: [20, "i32"],
    head_dim: [24, "i32"],
    qkv_bias: [28, "i32"],
    tie_embeddings: [32, "i32"],
    rope_type: [36, "i32"],
    rms_eps: [40, "f32"],
    rope_theta: [44, "f32"],
    rope_factor: [48, "f32"],
    rope_low_freq_factor: [52, "f32"],
    rope_high_freq_factor: [56, "f32"],
    rope_original_max_pos: [60, "i32"],
    weight_dtype: [64, "i32"],
    qk_norm: [68, "i32"],
  },
} as const satisfies StructSpec<string>;

const RF_COMPRESS_PARAMS = {
  name: "rf_compress_params",
  size: 64,
  fields: {
    capacity: [0, "i32"],
    n_sink: [4, "i32"],
    n_recent: [8, "i32"],
    obs_window: [12, "i32"],
    max_chunk: [16, "i32"],
    emb_dtype: [20, "i32"],
    exit_layer: [24, "i32"],
    eviction: [28, "i32"],
  },
} as const satisfies StructSpec<string>;

function packStruct<F extends string>(spec: StructSpec<F>, values: Record<F, number>): Uint8Array {
  const buf = new Uint8Array(spec.size);
  const dv = new DataView(buf.buffer);
  for (const name of Object.keys(spec.fields) as F[]) {
    const [offset, type] = spec.fields[name];
    if (type === "f32") dv.setFloat32(offset, values[name], true);
    else dv.setInt32(offset, values[name] | 0, true);
  }
  return buf;
}

/** Differences between the structs as packed here and `layout` (rf_struct_layout(): one line per struct,
 * "name sizeof field:offset:type ..."); empty when they agree. Reserved fields are the library's business. */
export function structLayoutMismatches(layout: string): string[] {
  const lib = new Map<string, { size: number; fields: Map<string, string> }>();
  for (const line of layout.split("\n")) {
    const [name, size, ...fields] = line.trim().split(/\s+/);
    if (!name) continue;
    const fm = new Map<string, string>();
    for (const f of fields) {
      const [field, offset, type] = f.split(":");
      fm.set(field, `${offset}:${type}`);
    }
    lib.set(name, { size: Number(size), fields: fm });
  }
  const out: string[] = [];
  for (const spec of [RF_CONFIG, RF_COMPRESS_PARAMS] as StructSpec<string>[]) {
    const have = lib.get(spec.name);
    if (!have) {
      out.push(`${spec.name}: not described by the library`);
      continue;
    }
    if (have.size !== spec.size) out.push(`${spec.name}: sizeof ${have.size} in the library, ${spec.size} here`);
    for (const [field, [offset, type]] of Object.entries(spec.fields)) {
      const want = `${offset}:${type}`;
      const got = have.fields.get(field);
      if (got !== want) out.push(`${spec.name}.${field}: ${got ?? "missing"} in the library, ${want} here`);
    }
    for (const field of have.fields.keys())
      if (field !== "reserved" && !(field in spec.fields))
        out.push(`${spec.name}.${field}: in the library, not packed here`);
  }
  return out;
}

/** RF_MAX_PENDING of cuda/reform.h: chunks a compressor may have submitted and not collected */
export const RF_MAX_PENDING = 2;
/** RF_EMBSTORE_BLOCK_BYTES of cuda/reform.h: the CUDA build allocates resident embeddings in blocks of this many bytes
 * of rows (plus 4 bytes per row for its norm) */
export const RF_EMBSTORE_BLOCK_BYTES = 16 << 20;
/** Device bytes a resident store of `rows` rows of `dim` f16 values holds in the CUDA build (whole blocks). */
export function embStoreBytes(rows: number, dim: number): number {
  const blockRows = Math.max(1, Math.floor(RF_EMBSTORE_BLOCK_BYTES / (2 * dim)));
  return Math.ceil(rows / blockRows) * blockRows * (dim * 2 + 4);
}

export const ROOT_DIR = resolve(import.meta.dir, "..");
export function libraryPath(backend: "cpu" | "cuda"): string {
  return join(ROOT_DIR, "build", `libreform_${backend}.so`);
}

const NULL_BUF = new Uint8Array(0);

export class Native {
  readonly backend: "cpu" | "cuda";
  readonly path: string;
  private readonly lib: Lib;
  private readonly closeLib: () => void;

  /** `path` defaults to build/libreform_<backend>.so; with an explicit path the backend is the library's own
   * (rf_backend_name), and a given `backend` must match it. */
  constructor(backend?: "cpu" | "cuda", path?: string) {
    if (!backend && !path) throw new Error("Native: a backend or a library path is required");
    path ??= libraryPath(backend!);
    if (!existsSync(path)) {
      throw new Error(`native library not found: ${path} (run \`bun run build:native\`)`);
    }
    const handle = dlopen(path, symbols);
    this.lib = handle.symbols;
    this.closeLib = () => handle.close();
    this.path = path;
    const v = this.lib.rf_abi_version();
    if (v !== RF_ABI_VERSION) {
      handle.close();
      throw new Error(
        `native library ${path} has ABI version ${v}, expected ${RF_ABI_VERSION} (rebuild it: \`bun run build:native\`)`,
      );
    }
    const own = String(this.lib.rf_backend_name());
    if (own !== "cpu" && own !== "cuda") {
      handle.close();
      throw new Error(`native library ${path} reports an unknown backend "${own}"`);
    }
    if (backend && backend !== own) {
      handle.close();
      throw new Error(`native library ${path} is the ${own} backend, not ${backend}`);
    }
    const layout = this.lib.rf_struct_layout();
    const mismatches = layout ? structLayoutMismatches(String(layout)) : ["rf_struct_layout() failed"];
    if (mismatches.length > 0) {
      handle.close();
      throw new Error(`native library ${path}: struct layout differs from ffi/native.ts: ${mismatches.join("; ")}`);
    }
    this.backend = own;
  }

  close(): void {
    this.closeLib();
  }

  lastError(): string {
    const s = this.lib.rf_last_error();
    return s ? String(s) : "";
  }

  private check(rc: number, where: string): number {
    if (rc < 0) throw new NativeError(rc, this.lastError(), where);
    return rc;
  }

  private checkPtr(p: Pointer | bigint | null, where: string): Pointer {
    if (!p) {
      const code = this.lib.rf_last_error_code();
      throw new NativeError(code < 0 ? code : RF_ERR_INTERNAL, this.lastError() || "returned NULL", where);
    }
    return p as Pointer;
  }

  backendName(): string {
    return String(this.lib.rf_backend_name());
  }

  deviceCount(): number {
    return this.lib.rf_device_count();
  }

  deviceInfo(): string {
    const buf = new Uint8Array(512);
    this.check(this.lib.rf_device_info(buf, buf.length), "rf_device_info");
    const end = buf.indexOf(0);
    return new TextDecoder().decode(buf.subarray(0, end < 0 ? buf.length : end));
  }

  setThreads(n: number): void {
    this.check(this.lib.rf_set_threads(n), "rf_set_threads");
  }

  // ---- model ----
  createModel(cfg: ModelConfig): NativeModel {
    const buf = packStruct(RF_CONFIG, {
      vocab_size: cfg.vocabSize,
      hidden_size: cfg.hiddenSize,
      intermediate_size: cfg.intermediateSize,
      num_layers: cfg.numLayers,
      num_heads: cfg.numHeads,
      num_kv_heads: cfg.numKvHeads,
      head_dim: cfg.headDim,
      qkv_bias: cfg.qkvBias ? 1 : 0,
      tie_embeddings: cfg.tieEmbeddings ? 1 : 0,
      rope_type: cfg.ropeType,
      rms_eps: cfg.rmsEps,
      rope_theta: cfg.ropeTheta,
      rope_factor: cfg.ropeFactor,
      rope_low_freq_factor: cfg.ropeLowFreqFactor,
      rope_high_freq_factor: cfg.ropeHighFreqFactor,
      rope_original_max_pos: cfg.ropeOriginalMaxPos,
      weight_dtype: cfg.weightDtype,
      qk_norm: cfg.qkNorm ? 1 : 0,
    });
    const p = this.checkPtr(this.lib.rf_model_create(buf), "rf_model_create");
    return new NativeModel(this, this.lib, p, cfg);
  }

  // ---- scoring ----
  /** out[i] = max_j cos(ctx_i, q_j). ctx: n_ctx*dim values (Float32Array or Uint16Array holding f16). */
  /** rf_sample_logits: the native sampler over given logits; `rng` (one u64 state) is advanced in place. */
  sampleLogits(logits: Float32Array, p: SamplingParams, rng: BigUint64Array): number {
    if (logits.length === 0) throw new Error("sampleLogits: empty logits");
    return this._check(
      this.lib.rf_sample_logits(logits, logits.length, p.temperature, p.topP, p.topK, rng),
      "rf_sample_logits",
    );
  }

  score(
    ctx: Float32Array | Uint16Array,
    nCtx: number,
    dim: number,
    q: Float32Array,
    nQ: number,
    out?: Float32Array,
  ): Float32Array {
    const o = out ?? new Float32Array(nCtx);
    if (o.length < nCtx) throw new Error("score: out too small");
    const dtype = ctx instanceof Float32Array ? RF_F32 : RF_F16;
    if (ctx.length < nCtx * dim) throw new Error("score: ctx smaller than n_ctx*dim");
    if (q.length < nQ * dim) throw new Error("score: q smaller than n_q*dim");
    if (nCtx === 0) return o;
    this.check(this.lib.rf_score(ctx, dtype, nCtx, dim, q, nQ, o), "rf_score");
    return o;
  }

  /** rf_score_kth: each query row's k-th best match over the context rows (nQ f32: the k-th largest cosine, -inf when
   * fewer than k rows have one), then each pair's (`pairs`, as ScoreSelection's: nQ + pairs.length / 2 f32 in all), the
   * values rf_score_select takes its offsets from. `ctx` as in scoreSelect. */
  scoreKth(
    ctx: Float32Array | Uint16Array | MappedRows,
    nCtx: number,
    dim: number,
    q: Float32Array,
    nQ: number,
    k: number,
    pairs?: Int32Array,
  ) {
    const { data, dtype } = scoringArgs(ctx, nCtx, dim, q, nQ, "scoreKth");
    const [p, nP] = pairsArg(pairs, undefined, nQ, "scoreKth");
    const out = new Float32Array(Math.max(1, nQ + nP)); // see smoothSelect: never an empty (NULL) buffer
    this.check(this.lib.rf_score_kth(data, dtype, nCtx, dim, q, nQ, p, nP, k | 0, out), "rf_score_kth");
    return out.subarray(0, nQ + nP);
  }

  /** rf_smooth_select: smoothScores + selectTokens of src/engine/selection.ts in O(n) natively (the same smoothed
   * values and indices, for either pooling operator and any lag in [0, window / 2]). `smoothed` (optional, >= n)
   * receives the smoothed scores. */
  smoothSelect(
    scores: Float32Array,
    window: number,
    budget: number,
    edge: number,
    smoothed?: Float32Array,
    pool: PoolOp = "mean",
    lag = 0,
  ): Int32Array {
    const n = scores.length;
    if (smoothed && smoothed.length < n) throw new Error("smoothSelect: smoothed smaller than scores");
    const lagN = lagArg(lag, "smoothSelect");
    if (n === 0) return new Int32Array(0);
    // one spare slot: bun:ffi passes an empty array as NULL, which the library rejects
    const out = new Int32Array(Math.min(n, Math.max(0, budget)) + 1);
    const m = this.check(
      Number(
        this.lib.rf_smooth_select(scores, n, window | 0, lagN, POOL[pool], budget, edge | 0, smoothed ?? null, out),
      ),
      "rf_smooth_select",
    );
    return out.subarray(0, m);
  }

  /** rf_map_file: the whole file mapped read-only (any size; Bun.mmap stops at 4 GiB). Throws NativeError when it
   * cannot be opened or mapped. Release with unmapFile once no view of it is in use. */
  mapFile(path: string): MappedFile {
    const out = new BigInt64Array(1);
    const p = this.checkPtr(this.lib.rf_map_file(Buffer.from(`${path}\0`, "utf8"), out), "rf_map_file");
    return { ptr: p, bytes: Number(out[0]) };
  }

  unmapFile(m: MappedFile): void {
    this.check(this.lib.rf_unmap_file(m.ptr, m.bytes), "rf_unmap_file");
  }

  /** rf_score_select: score (as `score`) then smoothSelect (with `sel.pool`, default mean) in one native call, reading
   * `ctx` in place (a typed array, or rows of a mapped file: `MappedRows`). `scores` (optional, >= nCtx) receives the
   * raw scores. */
  scoreSelect(
    ctx: Float32Array | Uint16Array | MappedRows,
    nCtx: number,
    dim: number,
    q: Float32Array,
    nQ: number,
    sel: ScoreSelection,
    scores?: Float32Array,
  ): Int32Array {
    const where = "scoreSelect";
    const { data, dtype } = scoringArgs(ctx, nCtx, dim, q, nQ, where, scores);
    const lag = lagArg(sel.lag, where);
    if (nCtx === 0) return new Int32Array(0);
    const out = new Int32Array(Math.min(nCtx, Math.max(0, sel.budget)) + 1); // see smoothSelect
    const m = this.check(
      Number(
        this.lib.rf_score_select(
          data,
          dtype,
          nCtx,
          dim,
          q,
          nQ,
          offsetsArg(sel, nQ, where),
          ...pairsArg(sel.pairs, sel.pairOffsets, nQ, where),
          sel.window | 0,
          lag,
          POOL[sel.pool ?? "mean"],
          sel.budget,
          sel.edge | 0,
          scores ?? null,
          out,
        ),
      ),
      "rf_score_select",
    );
    return out.subarray(0, m);
  }

  /** rf_score_kth_select: scoreKth, then scoreSelect over the question's rows and a zero row with the k-th bests as
   * offsets (background.ts kthQuery), in one native call; the CPU build reads the context once. `sel`'s offsets and
   * pair offsets are not used (the k-th bests are); `kth` (optional, >= nQ + the pairs) receives scoreKth's values,
   * `scores` (optional, >= nCtx) the raw scores. Returns the selected positions. */
  scoreKthSelect(
    ctx: Float32Array | Uint16Array | MappedRows,
    nCtx: number,
    dim: number,
    q: Float32Array,
    nQ: number,
    k: number,
    sel: ScoreSelection,
    scores?: Float32Array,
    kth?: Float32Array,
  ): Int32Array {
    const where = "scoreKthSelect";
    const { data, dtype } = scoringArgs(ctx, nCtx, dim, q, nQ, where, scores);
    const [p, nP] = pairsArg(sel.pairs, undefined, nQ, where);
    if (kth && kth.length < nQ + nP) throw new Error(`${where}: kth smaller than n_q + the pairs`);
    const lag = lagArg(sel.lag, where);
    const out = new Int32Array(Math.min(nCtx, Math.max(0, sel.budget)) + 1); // see smoothSelect
    const m = this.check(
      Number(
        this.lib.rf_score_kth_select(
          data,
          dtype,
          nCtx,
          dim,
          q,
          nQ,
          p,
          nP,
          k | 0,
          sel.window | 0,
          lag,
          POOL[sel.pool ?? "mean"],
          sel.budget,
          sel.edge | 0,
          kth ?? null,
          scores ?? null,
          out,
        ),
      ),
      "rf_score_kth_select",
    );
    return out.subarray(0, m);
  }

  /** @internal */
  _check(rc: number, where: string): number {
    return this.check(rc, where);
  }
  /** @internal */
  _checkPtr(p: Pointer | bigint | null, where: string): Pointer {
    return this.checkPtr(p, where);
  }
}

/** rf_memory_info: free / total device memory (null on the CPU backend), weights, the shared per-step workspace,
 * KV-cache bytes per token of a sequence. */
export interface MemoryInfo {
  deviceFree: number | null;
  deviceTotal: number | null;
  weights: number;
  workspace: number;
  seqBytesPerToken: number;
}

export class NativeModel {
  private destroyed = false;
  constructor(
    readonly native: Native,
    private readonly lib: Lib,
    readonly handle: Pointer,
    readonly config: ModelConfig,
  ) {}

  setTensor(name: string, data: ArrayBufferView, dtype: DType, shape: number[]): void {
    const shp = new BigInt64Array(shape.map((s) => BigInt(s)));
    const nameBuf = Buffer.from(name + "\0", "utf8");
    this.native._check(
      this.lib.rf_model_set_tensor(
        this.handle,
        nameBuf,
        new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
        dtype,
        shp,
        shape.length,
      ),
      `rf_model_set_tensor(${name})`,
    );
  }

  initRandom(seed: number | bigint, std: number): void {
    this.native._check(this.lib.rf_model_init_random(this.handle, BigInt(seed), std), "rf_model_init_random");
  }

  finalize(): void {
    this.native._check(this.lib.rf_model_finalize(this.handle), "rf_model_finalize");
  }

  memoryBytes(): number {
    return Number(this.lib.rf_model_memory_bytes(this.handle));
  }

  /** Memory for a plan (bytes; null where the backend does not know): rf_memory_info. */
  memoryInfo(): MemoryInfo {
    const out = new BigInt64Array(5);
    const n = this.lib.rf_memory_info(this.handle, out, out.length) as number;
    this.native._check(Math.min(n, 0), "rf_memory_info");
    const v = (i: number): number | null => (i < n && out[i]! >= 0n ? Number(out[i]) : null);
    return {
      deviceFree: v(0),
      deviceTotal: v(1),
      weights: v(2) ?? 0,
      workspace: v(3) ?? 0,
      seqBytesPerToken: v(4) ?? 0,
    };
  }

  createCompressor(params: CompressParams, heads: HeadSpec[]): NativeCompressor {
    if (heads.length === 0) throw new Error("createCompressor: at least one head is required");
    const pb = packStruct(RF_COMPRESS_PARAMS, {
      capacity: params.capacity,
      n_sink: params.nSink,
      n_recent: params.nRecent,
      obs_window: params.obsWindow,
      max_chunk: params.maxChunk,
      emb_dtype: params.embDtype,
      exit_layer: params.exitLayer,
      eviction: EVICT_RANK[params.eviction ?? "h2o"],
    });
    const hb = new Int32Array(heads.length * 3);
    heads.forEach((h, i) => {
      hb[i * 3] = h.layer;
      hb[i * 3 + 1] = HEAD_KIND[h.kind];
      hb[i * 3 + 2] = h.head;
    });
    const p = this.native._checkPtr(
      this.lib.rf_compressor_create(this.handle, pb, hb, heads.length),
      "rf_compressor_create",
    );
    return new NativeCompressor(this.native, this.lib, p, params);
  }

  /** A resident store of context embeddings (f16 rows of `dim` values) on this model's device. */
  createEmbStore(dim: number): NativeEmbStore {
    const p = this.native._checkPtr(this.lib.rf_embstore_create(this.handle, dim), "rf_embstore_create");
    return new NativeEmbStore(this.native, this.lib, p, dim);
  }

  createSeq(maxTokens: number): NativeSeq {
    const p = this.native._checkPtr(this.lib.rf_seq_create(this.handle, maxTokens), "rf_seq_create");
    return new NativeSeq(this.native, this.lib, p, this.config.vocabSize);
  }

  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    this.lib.rf_model_destroy(this.handle);
  }
}

export class NativeCompressor {
  private destroyed = false;
  /** rows of each submitted chunk not collected yet, oldest first */
  private readonly pendingRows: number[] = [];
  readonly embedDim: number;
  readonly exitLayer: number;
  constructor(
    readonly native: Native,
    private readonly lib: Lib,
    readonly handle: Pointer,
    readonly params: CompressParams,
  ) {
    this.embedDim = lib.rf_compressor_embed_dim(handle);
    this.exitLayer = lib.rf_compressor_exit_layer(handle);
  }

  private outBuf(n: number): Float32Array | Uint16Array {
    return this.params.embDtype === RF_F16 ? new Uint16Array(n * this.embedDim) : new Float32Array(n * this.embedDim);
  }

  /** Process one chunk; returns its embeddings (n*embedDim, f32 or f16 bits per emb dtype). */
  process(tokens: Int32Array, out?: Float32Array | Uint16Array | null): Float32Array | Uint16Array | null {
    const o = out === null ? null : (out ?? this.outBuf(tokens.length));
    this.native._check(this.lib.rf_compressor_process(this.handle, tokens, tokens.length, o), "rf_compressor_process");
    return o;
  }

  /** Queue one chunk (as `process`) without waiting for its embeddings; `collect` returns them, in order. At most
   * RF_MAX_PENDING chunks may be pending. */
  submit(tokens: Int32Array): void {
    this.native._check(this.lib.rf_compressor_submit(this.handle, tokens, tokens.length), "rf_compressor_submit");
    this.pendingRows.push(tokens.length);
  }

  /** The embeddings of the oldest submitted chunk (waits for them), or null when none is pending. `out`, when given,
   * must hold that chunk's rows. Without it the buffer is the chunk's size: max_chunk rows (the longest question a
   * context embeds, ~W / 2 of a model's window) zero-filled per chunk made uploads 3x slower for a 2M-token window. */
  collect(out?: Float32Array | Uint16Array): Float32Array | Uint16Array | null {
    const rows = this.pendingRows[0] ?? 0;
    if (out && out.length < rows * this.embedDim) throw new Error(`collect: out smaller than the chunk's ${rows} rows`);
    // one row at least: bun:ffi passes an empty array as NULL, which the library rejects
    const o = out ?? this.outBuf(Math.max(1, rows));
    const n = this.native._check(this.lib.rf_compressor_collect(this.handle, o), "rf_compressor_collect");
    if (n > 0) this.pendingRows.shift();
    return n === 0 ? null : o.subarray(0, n * this.embedDim);
  }

  /** Chunks submitted and not yet collected. */
  pending(): number {
    return this.native._check(this.lib.rf_compressor_pending(this.handle), "rf_compressor_pending");
  }

  /** Embed tokens against the current cache without changing it. */
  embed(tokens: Int32Array, out?: Float32Array | Uint16Array): Float32Array | Uint16Array {
    const o = out ?? this.outBuf(tokens.length);
    this.native._check(this.lib.rf_compressor_embed(this.handle, tokens, tokens.length, o), "rf_compressor_embed");
    return o;
  }

  cacheLen(): number {
    return Number(this.lib.rf_compressor_cache_len(this.handle));
  }
  seen(): number {
    return Number(this.lib.rf_compressor_seen(this.handle));
  }
  /** Bytes this compressor holds (its caches; not the model's shared workspace). */
  memoryBytes(): number {
    return Number(this.lib.rf_compressor_memory_bytes(this.handle));
  }
  reset(): void {
    this.native._check(this.lib.rf_compressor_reset(this.handle), "rf_compressor_reset");
    this.pendingRows.length = 0; // the library drops them too
  }
  /** Bytes of the state blob saveState() would return. */
  stateSize(): number {
    return this.native._check(Number(this.lib.rf_compressor_state_size(this.handle)), "rf_compressor_state_size");
  }
  saveState(): Uint8Array {
    const size = Number(this.lib.rf_compressor_state_size(this.handle));
    this.native._check(size, "rf_compressor_state_size");
    const buf = new Uint8Array(size);
    this.native._check(this.lib.rf_compressor_state_save(this.handle, buf, size), "rf_compressor_state_save");
    return buf;
  }
  loadState(buf: Uint8Array): void {
    this.native._check(this.lib.rf_compressor_state_load(this.handle, buf, buf.byteLength), "rf_compressor_state_load");
  }
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    this.lib.rf_compressor_destroy(this.handle);
  }
}

/** Resident context embeddings (rf_embstore): f16 rows kept on the device (CUDA build) for scoring without the file. */
export class NativeEmbStore {
  private destroyed = false;
  constructor(
    readonly native: Native,
    private readonly lib: Lib,
    readonly handle: Pointer,
    readonly dim: number,
  ) {}

  /** Appends `n` rows of f16 bits (`rows` holds at least n * dim values). */
  append(rows: Uint16Array, n: number): void {
    if (rows.length < n * this.dim) throw new Error("embstore append: rows smaller than n * dim");
    if (n === 0) return;
    this.native._check(this.lib.rf_embstore_append(this.handle, rows, n), "rf_embstore_append");
  }

  rows(): number {
    return Number(this.lib.rf_embstore_rows(this.handle));
  }

  /** Bytes the store holds (CUDA: device memory, whole blocks). */
  memoryBytes(): number {
    return Number(this.lib.rf_embstore_memory_bytes(this.handle));
  }

  /** Native.scoreKth over the store's first nCtx rows. */
  scoreKth(nCtx: number, q: Float32Array, nQ: number, k: number, pairs?: Int32Array): Float32Array {
    if (q.length < nQ * this.dim) throw new Error("embstore scoreKth: q smaller than n_q*dim");
    const [p, nP] = pairsArg(pairs, undefined, nQ, "embstore scoreKth");
    const out = new Float32Array(Math.max(1, nQ + nP));
    this.native._check(
      this.lib.rf_embstore_score_kth(this.handle, nCtx, q, nQ, p, nP, k | 0, out),
      "rf_embstore_score_kth",
    );
    return out.subarray(0, nQ + nP);
  }

  /** Native.scoreSelect over the store's first nCtx rows. */
  scoreSelect(nCtx: number, q: Float32Array, nQ: number, sel: ScoreSelection, scores?: Float32Array): Int32Array {
    if (q.length < nQ * this.dim) throw new Error("embstore scoreSelect: q smaller than n_q*dim");
    if (scores && scores.length < nCtx) throw new Error("embstore scoreSelect: scores smaller than n_ctx");
    const where = "embstore scoreSelect";
    const lag = lagArg(sel.lag, where);
    if (nCtx === 0) return new Int32Array(0);
    const out = new Int32Array(Math.min(nCtx, Math.max(0, sel.budget)) + 1); // see Native.smoothSelect
    const m = this.native._check(
      Number(
        this.lib.rf_embstore_score_select(
          this.handle,
          nCtx,
          q,
          nQ,
          offsetsArg(sel, nQ, where),
          ...pairsArg(sel.pairs, sel.pairOffsets, nQ, where),
          sel.window | 0,
          lag,
          POOL[sel.pool ?? "mean"],
          sel.budget,
          sel.edge | 0,
          scores ?? null,
          out,
        ),
      ),
      "rf_embstore_score_select",
    );
    return out.subarray(0, m);
  }

  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    this.lib.rf_embstore_destroy(this.handle);
  }
}

export interface SamplingParams {
  temperature: number;
  topP: number;
  topK: number;
}

export class NativeSeq {
  private destroyed = false;
  readonly rng = new BigUint64Array(1);
  constructor(
    readonly native: Native,
    private readonly lib: Lib,
    readonly handle: Pointer,
    readonly vocabSize: number,
  ) {}

  setSeed(seed: number | bigint): void {
    this.rng[0] = BigInt.asUintN(64, BigInt(seed));
  }

  /** Append tokens; returns the last token's logits when `wantLogits` (into `out` when given). */
  forward(tokens: Int32Array, wantLogits = false, out?: Float32Array): Float32Array | null {
    if (out && out.length !== this.vocabSize)
      throw new Error(`logits buffer has ${out.length} entries, vocab is ${this.vocabSize}`);
    const logits = wantLogits ? (out ?? new Float32Array(this.vocabSize)) : null;
    this.native._check(this.lib.rf_seq_forward(this.handle, tokens, tokens.length, logits), "rf_seq_forward");
    return logits;
  }

  /** Sample from the last logits (this sequence's generator). */
  sample(p: SamplingParams): number {
    return this.native._check(
      this.lib.rf_seq_sample(this.handle, p.temperature, p.topP, p.topK, this.rng),
      "rf_seq_sample",
    );
  }

  /** Sample from caller-adjusted logits with the same algorithm and this sequence's generator. */
  sampleFrom(logits: Float32Array, p: SamplingParams): number {
    return this.native.sampleLogits(logits, p, this.rng);
  }

  length(): number {
    return this.lib.rf_seq_length(this.handle);
  }
  reset(): void {
    this.native._check(this.lib.rf_seq_reset(this.handle), "rf_seq_reset");
  }
  importCompressor(c: NativeCompressor): void {
    this.native._check(this.lib.rf_seq_import_compressor(this.handle, c.handle), "rf_seq_import_compressor");
  }
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    this.lib.rf_seq_destroy(this.handle);
  }
}

/** Pick and load a backend: `prefer` forces one; `library` names the library file to load instead of
 * build/libreform_<backend>.so (its backend must match a forced one). */
export function loadNative(prefer: "auto" | "cpu" | "cuda" = "auto", library?: string): Native {
  if (library) {
    const n = new Native(prefer === "auto" ? undefined : prefer, library);
    if (n.backend === "cuda" && n.deviceCount() < 1) {
      const msg = n.lastError();
      n.close();
      throw new Error(`${library}: no CUDA device is usable${msg ? `: ${msg}` : ""}`);
    }
    return n;
  }
  if (prefer === "cpu") return new Native("cpu");
  if (prefer === "cuda") {
    const n = new Native("cuda");
    if (n.deviceCount() < 1) {
      const msg = n.lastError();
      n.close();
      throw new Error(`REFORM_BACKEND=cuda but no CUDA device is usable${msg ? `: ${msg}` : ""}`);
    }
    return n;
  }
  if (existsSync(libraryPath("cuda"))) {
    try {
      const n = new Native("cuda");
      if (n.deviceCount() > 0) return n;
      n.close();
    } catch {
      /* fall through to CPU */
    }
  }
  return new Native("cpu");
}

export { ptr, CString, NULL_BUF };
