/**
 * The C ABI's one guard layer (cuda/abi_guard.h), on both builds: the CPU library and the CUDA source on the CPU
 * emulation (build/libreform_cuda_emu.so, x86-64 only).
 *  - the shared C++ guard and checks themselves: test/native/abi_guard_tests.cpp;
 *  - bad arguments come back with the same code and message from both builds (never out-of-memory);
 *  - a host exception inside a CUDA-build call is RF_ERR_INTERNAL, only std::bad_alloc is RF_ERR_OOM (the
 *    emulation throws on demand; the CPU build's mapping is the same header, tested in C++);
 *  - rf_struct_layout() agrees with the offsets ffi/native.ts packs, and a disagreement is named.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { dlopen, FFIType, ptr } from "bun:ffi";
import { spawnSync } from "node:child_process";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import {
  libraryPath,
  Native,
  NativeError,
  RF_BF16,
  RF_ERR_INTERNAL,
  RF_ERR_INVALID,
  RF_ERR_OOM,
  RF_ERR_STATE,
  RF_F32,
  RF_ROPE_DEFAULT,
  ROOT_DIR,
  structLayoutMismatches,
  type CompressParams,
} from "../ffi/native";
import type { HeadSpec, ModelConfig } from "../src/model/types.ts";
import { buildModel, expectNativeError, i32 } from "./helpers/random-model";
import { buildNative } from "./helpers/build.ts";

/** the emulation's fiber switch is x86-64 only (scripts/build-native.sh skips it elsewhere) */
const X64 = process.arch === "x64";
const EMU = join(ROOT_DIR, "build", "libreform_cuda_emu.so");
const BUILDS = [{ name: "cpu", path: libraryPath("cpu") }, ...(X64 ? [{ name: "cuda emulation", path: EMU }] : [])];

/** vocab 64, two layers, head_dim 16 (the CUDA build needs a multiple of 16); weights come from rf_model_init_random */
const CFG: ModelConfig = buildModel({
  name: "abi",
  dims: { vocab: 64, hidden: 64, intermediate: 128, headDim: 16 },
  tie: false,
  bias: false,
  rope: RF_ROPE_DEFAULT,
  dtype: RF_F32,
  layers: 2,
  seed: 1,
}).cfg;
const CP: CompressParams = {
  capacity: 16,
  nSink: 2,
  nRecent: 4,
  obsWindow: 4,
  maxChunk: 8,
  embDtype: RF_F32,
  exitLayer: -1,
};
const HEADS: HeadSpec[] = [{ layer: 0, kind: "k", head: 1 }];

/** raw entry points, for NULL handles and negative counts that the binding never passes */
function openRaw(path: string) {
  const h = dlopen(path, {
    rf_struct_layout: { args: [], returns: FFIType.cstring },
    rf_last_error: { args: [], returns: FFIType.cstring },
    rf_last_error_code: { args: [], returns: FFIType.i32 },
    rf_set_threads: { args: [FFIType.i32], returns: FFIType.i32 },
    rf_model_create: { args: [FFIType.ptr], returns: FFIType.ptr },
    rf_model_set_tensor: {
      args: [FFIType.ptr, FFIType.ptr, FFIType.ptr, FFIType.i32, FFIType.ptr, FFIType.i32],
      returns: FFIType.i32,
    },
    rf_model_init_random: { args: [FFIType.ptr, FFIType.u64, FFIType.f32], returns: FFIType.i32 },
    rf_model_finalize: { args: [FFIType.ptr], returns: FFIType.i32 },
    rf_compressor_process: { args: [FFIType.ptr, FFIType.ptr, FFIType.i32, FFIType.ptr], returns: FFIType.i32 },
    rf_compressor_state_load: { args: [FFIType.ptr, FFIType.ptr, FFIType.i64], returns: FFIType.i32 },
    rf_compressor_embed_dim: { args: [FFIType.ptr], returns: FFIType.i32 },
    rf_compressor_collect: { args: [FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
    rf_compressor_pending: { args: [FFIType.ptr], returns: FFIType.i32 },
    rf_embstore_append: { args: [FFIType.ptr, FFIType.ptr, FFIType.i64], returns: FFIType.i32 },
    rf_score: {
      args: [FFIType.ptr, FFIType.i32, FFIType.i64, FFIType.i32, FFIType.ptr, FFIType.i32, FFIType.ptr],
      returns: FFIType.i32,
    },
    rf_seq_forward: { args: [FFIType.ptr, FFIType.ptr, FFIType.i32, FFIType.ptr], returns: FFIType.i32 },
    rf_seq_sample: { args: [FFIType.ptr, FFIType.f32, FFIType.f32, FFIType.i32, FFIType.ptr], returns: FFIType.i32 },
    rf_seq_import_compressor: { args: [FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
    rf_compressor_create: { args: [FFIType.ptr, FFIType.ptr, FFIType.ptr, FFIType.i32], returns: FFIType.ptr },
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
  });
  return { sym: h.symbols, close: () => h.close() };
}

interface Outcome {
  code: number;
  message: string;
}

/** Every bad call of the table on one build: its status code and rf_last_error(). */
function badCalls(path: string): Record<string, Outcome> {
  const { sym, close } = openRaw(path);
  const native = new Native(undefined, path);
  const out: Record<string, Outcome> = {};
  const last = (rc: number): Outcome => ({ code: rc, message: String(sym.rf_last_error()) });
  const viaBinding = (name: string, fn: () => unknown) => {
    try {
      fn();
      out[name] = { code: 0, message: "(no error)" };
    } catch (e) {
      if (!(e instanceof NativeError)) throw e;
      out[name] = { code: e.code, message: e.message };
    }
  };
  const tok = i32([1, 2]);
  const q = new Float32Array(4);
  try {
    out["rf_model_create(NULL)"] = (() => {
      const p = sym.rf_model_create(null);
      expect(p).toBeNull();
      return last(sym.rf_last_error_code());
    })();
    out["rf_set_threads(-1)"] = last(sym.rf_set_threads(-1));
    out["rf_model_set_tensor(NULL model)"] = last(
      sym.rf_model_set_tensor(
        null,
        ptr(Buffer.from("model.norm.weight\0")),
        ptr(q),
        RF_F32,
        ptr(new BigInt64Array([4n])),
        1,
      ),
    );
    out["rf_model_init_random(NULL)"] = last(sym.rf_model_init_random(null, 1n, 0.02));
    out["rf_model_finalize(NULL)"] = last(sym.rf_model_finalize(null));
    out["rf_compressor_process(NULL)"] = last(sym.rf_compressor_process(null, ptr(tok), 2, null));
    out["rf_compressor_embed_dim(NULL)"] = last(sym.rf_compressor_embed_dim(null));
    out["rf_compressor_pending(NULL)"] = last(sym.rf_compressor_pending(null));
    out["rf_embstore_append(NULL)"] = last(sym.rf_embstore_append(null, ptr(q), 1));
    out["rf_compressor_state_load(NULL)"] = last(sym.rf_compressor_state_load(null, ptr(q), 16));
    out["rf_seq_forward(NULL)"] = last(sym.rf_seq_forward(null, ptr(tok), 2, null));
    out["rf_seq_sample(NULL)"] = last(sym.rf_seq_sample(null, 0, 1, 0, ptr(new BigUint64Array(1))));
    out["rf_seq_import_compressor(NULL, NULL)"] = last(sym.rf_seq_import_compressor(null, null));
    out["rf_score(n_q 0)"] = last(sym.rf_score(ptr(q), RF_F32, 1, 4, ptr(q), 0, ptr(q)));
    out["rf_score(bf16 ctx)"] = last(sym.rf_score(ptr(q), RF_BF16, 1, 4, ptr(q), 1, ptr(q)));
    out["rf_score(NULL ctx)"] = last(sym.rf_score(null, RF_F32, 1, 4, ptr(q), 1, ptr(q)));
    out["rf_smooth_select(pool 2)"] = last(
      Number(sym.rf_smooth_select(ptr(q), 4, 3, 0, 2, 2, 0, null, ptr(new Int32Array(4)))),
    );
    out["rf_smooth_select(lag beyond half the window)"] = last(
      Number(sym.rf_smooth_select(ptr(q), 4, 3, 2, 0, 2, 0, null, ptr(new Int32Array(4)))),
    );

    const m = native.createModel(CFG);
    viaBinding("initRandom(NaN std)", () => m.initRandom(1, Number.NaN));
    viaBinding("createSeq before finalize", () => m.createSeq(8));
    viaBinding("createCompressor before finalize", () => m.createCompressor(CP, HEADS));
    m.initRandom(1, 0.02);
    m.finalize();
    // rf_compress_params words: capacity, n_sink, n_recent, obs_window, max_chunk, emb_dtype, exit_layer, eviction
    const rawCompressor = (eviction: number, head: number[]) => {
      const p = new Int32Array(16);
      p.set([16, 2, 4, 4, 8, RF_F32, -1, eviction]);
      expect(sym.rf_compressor_create(m.handle, ptr(p), ptr(i32(head)), 1)).toBeNull();
      return last(sym.rf_last_error_code());
    };
    out["rf_compressor_create(eviction 2)"] = rawCompressor(2, [0, 1, 0]);
    out["rf_compressor_create(head kind 4)"] = rawCompressor(0, [0, 4, 0]);
    out["rf_compressor_create(o head past the query heads)"] = rawCompressor(1, [0, 3, CFG.numHeads]);
    viaBinding("createSeq(0)", () => m.createSeq(0));
    const s = m.createSeq(4);
    viaBinding("sample before forward", () => s.sample({ temperature: 0, topP: 1, topK: 0 }));
    viaBinding("forward: token out of range", () => s.forward(i32([1, 64])));
    viaBinding("forward: past max_tokens", () => s.forward(i32([1, 2, 3, 4, 5])));
    const c = m.createCompressor(CP, HEADS);
    viaBinding("process: n > max_chunk", () => c.process(i32(new Array(9).fill(1))));
    c.process(i32([1, 2, 3]));
    const blob = c.saveState();
    const bad = blob.slice();
    bad[0] = 0x58;
    viaBinding("loadState: bad magic", () => c.loadState(bad));
    viaBinding("loadState: truncated", () => c.loadState(blob.subarray(0, blob.length - 4)));
    viaBinding("importCompressor: exit layer 0 of 2", () => s.importCompressor(c));
    // pipelined compress: at most RF_MAX_PENDING chunks; nothing that would lose or misorder them while pending
    out["rf_compressor_collect(out NULL)"] = last(sym.rf_compressor_collect(c.handle, null));
    c.submit(i32([4, 5]));
    c.submit(i32([6]));
    viaBinding("submit: a third chunk pending", () => c.submit(i32([7])));
    viaBinding("process while chunks are pending", () => c.process(i32([7])));
    viaBinding("saveState while chunks are pending", () => c.saveState());
    viaBinding("loadState while chunks are pending", () => c.loadState(blob));
    viaBinding("submit: n > max_chunk", () => {
      c.collect();
      c.submit(i32(new Array(9).fill(1)));
    });
    c.reset(); // drops what is pending
    viaBinding("collect after reset (nothing pending)", () => {
      if (c.collect() !== null) throw new Error("a chunk survived reset");
    });
    viaBinding("createEmbStore(dim 0)", () => m.createEmbStore(0));
    const st = m.createEmbStore(4);
    st.append(new Uint16Array(8), 2);
    viaBinding("embstore scoreSelect: n_ctx beyond its rows", () =>
      st.scoreSelect(3, q, 1, { window: 1, budget: 1, edge: 0 }),
    );
    viaBinding("embstore scoreSelect: n_q 0", () => st.scoreSelect(2, q, 0, { window: 1, budget: 1, edge: 0 }));
    st.destroy();
    viaBinding("sampleLogits: NaN temperature", () =>
      native.sampleLogits(new Float32Array(4), { temperature: Number.NaN, topP: 1, topK: 0 }, new BigUint64Array(1)),
    );
    c.destroy();
    s.destroy();
    m.destroy();
  } finally {
    native.close();
    close();
  }
  return out;
}

const EXPECTED: Record<string, number> = {
  "rf_model_create(NULL)": RF_ERR_INVALID,
  "rf_set_threads(-1)": RF_ERR_INVALID,
  "rf_model_set_tensor(NULL model)": RF_ERR_INVALID,
  "rf_model_init_random(NULL)": RF_ERR_INVALID,
  "rf_model_finalize(NULL)": RF_ERR_INVALID,
  "rf_compressor_process(NULL)": RF_ERR_INVALID,
  "rf_compressor_embed_dim(NULL)": RF_ERR_INVALID,
  "rf_compressor_state_load(NULL)": RF_ERR_INVALID,
  "rf_seq_forward(NULL)": RF_ERR_INVALID,
  "rf_seq_sample(NULL)": RF_ERR_INVALID,
  "rf_seq_import_compressor(NULL, NULL)": RF_ERR_INVALID,
  "rf_score(n_q 0)": RF_ERR_INVALID,
  "rf_score(bf16 ctx)": RF_ERR_INVALID,
  "rf_score(NULL ctx)": RF_ERR_INVALID,
  "rf_smooth_select(pool 2)": RF_ERR_INVALID,
  "rf_smooth_select(lag beyond half the window)": RF_ERR_INVALID,
  "rf_compressor_create(eviction 2)": RF_ERR_INVALID,
  "rf_compressor_create(head kind 4)": RF_ERR_INVALID,
  "rf_compressor_create(o head past the query heads)": RF_ERR_INVALID,
  "initRandom(NaN std)": RF_ERR_INVALID,
  "createSeq before finalize": RF_ERR_STATE,
  "createCompressor before finalize": RF_ERR_STATE,
  "createSeq(0)": RF_ERR_INVALID,
  "sample before forward": RF_ERR_STATE,
  "forward: token out of range": RF_ERR_INVALID,
  "forward: past max_tokens": RF_ERR_INVALID,
  "process: n > max_chunk": RF_ERR_INVALID,
  "loadState: bad magic": RF_ERR_INVALID,
  "loadState: truncated": RF_ERR_INVALID,
  "importCompressor: exit layer 0 of 2": RF_ERR_INVALID,
  "rf_compressor_pending(NULL)": RF_ERR_INVALID,
  "rf_embstore_append(NULL)": RF_ERR_INVALID,
  "rf_compressor_collect(out NULL)": RF_ERR_INVALID,
  "submit: a third chunk pending": RF_ERR_STATE,
  "process while chunks are pending": RF_ERR_STATE,
  "saveState while chunks are pending": RF_ERR_STATE,
  "loadState while chunks are pending": RF_ERR_STATE,
  "submit: n > max_chunk": RF_ERR_INVALID,
  "collect after reset (nothing pending)": 0,
  "createEmbStore(dim 0)": RF_ERR_INVALID,
  "embstore scoreSelect: n_ctx beyond its rows": RF_ERR_INVALID,
  "embstore scoreSelect: n_q 0": RF_ERR_INVALID,
  "sampleLogits: NaN temperature": RF_ERR_INVALID,
};

const outcomes = new Map<string, Record<string, Outcome>>();

beforeAll(() => {
  buildNative();
  for (const b of BUILDS) outcomes.set(b.name, badCalls(b.path));
}, 600_000);

test("shared guard and checks: C++ tests of cuda/abi_guard.h pass", () => {
  mkdirSync(join(ROOT_DIR, "build"), { recursive: true });
  const exe = join(ROOT_DIR, "build/abi_guard_tests");
  const cxx = process.env.CXX ?? "g++";
  const args = ["-O1", "-std=c++17", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Icuda"];
  const c = spawnSync(cxx, [...args, "test/native/abi_guard_tests.cpp", "-o", exe], {
    cwd: ROOT_DIR,
    encoding: "utf8",
  });
  const cout = `${c.stdout}${c.stderr}`;
  if (c.status !== 0) console.error(cout);
  expect(c.status).toBe(0);
  expect(cout).not.toMatch(/warning:/);
  const r = spawnSync(exe, [], { encoding: "utf8" });
  const lines = r.stdout.trim().split("\n");
  expect(lines.filter((l) => l.startsWith("[FAIL]"))).toEqual([]);
  expect(lines.filter((l) => l.startsWith("[PASS]")).length).toBeGreaterThan(40);
  expect(lines[lines.length - 1]).toMatch(/ 0 failed$/);
  expect(r.status).toBe(0);
}, 120_000);

for (const b of BUILDS) {
  describe(`C ABI guard: ${b.name}`, () => {
    test("bad arguments come back as RF_ERR_INVALID / RF_ERR_STATE (never out-of-memory)", () => {
      const got = outcomes.get(b.name)!;
      const codes = Object.fromEntries(Object.entries(got).map(([k, v]) => [k, v.code]));
      expect(codes).toEqual(EXPECTED);
      for (const o of Object.values(got)) expect(o.message.length).toBeGreaterThan(0);
    });

    test("rf_struct_layout agrees with the offsets ffi/native.ts packs", () => {
      const { sym, close } = openRaw(b.path);
      try {
        const layout = String(sym.rf_struct_layout());
        expect(layout).toMatch(/^rf_config 128 vocab_size:0:i32 /);
        expect(structLayoutMismatches(layout)).toEqual([]);
      } finally {
        close();
      }
    });
  });
}

describe.skipIf(!X64)("C ABI guard: both builds agree", () => {
  test("the same bad call gets the same message from the CPU build and the CUDA emulation", () => {
    const cpu = outcomes.get("cpu")!;
    const emu = outcomes.get("cuda emulation")!;
    for (const k of Object.keys(EXPECTED)) expect({ call: k, ...emu[k] }).toEqual({ call: k, ...cpu[k] });
  });

  test("the same struct layout", () => {
    const a = openRaw(libraryPath("cpu"));
    const e = openRaw(EMU);
    try {
      expect(String(e.sym.rf_struct_layout())).toBe(String(a.sym.rf_struct_layout()));
    } finally {
      a.close();
      e.close();
    }
  });
});

describe.skipIf(!X64)("C ABI guard: host exceptions in the CUDA build (emulation)", () => {
  let emu: Native;
  let setHook: (key: string, value: string) => void;
  let closeHooks: () => void;
  beforeAll(() => {
    emu = new Native("cuda", EMU);
    const h = dlopen(EMU, { rf_emu_set: { args: [FFIType.ptr, FFIType.ptr], returns: FFIType.i32 } });
    const cs = (s: string) => ptr(Buffer.from(`${s}\0`));
    setHook = (key, value) => expect(h.symbols.rf_emu_set(cs(key), cs(value))).toBe(0);
    closeHooks = () => h.close();
  });
  afterAll(() => {
    setHook("throw_on_launch", "");
    closeHooks();
    emu.close();
  });

  test("std::bad_alloc is RF_ERR_OOM; any other exception is RF_ERR_INTERNAL, in every guarded call", () => {
    const m = emu.createModel(CFG);
    setHook("throw_on_launch", "runtime_error");
    expectNativeError(() => m.initRandom(1, 0.02), RF_ERR_INTERNAL, /rf_model_init_random: internal error: emulated/);
    m.initRandom(1, 0.02);
    m.finalize();
    const s = m.createSeq(8);
    const c = m.createCompressor(CP, HEADS);
    setHook("throw_on_launch", "runtime_error");
    expectNativeError(() => s.forward(i32([1, 2])), RF_ERR_INTERNAL, /rf_seq_forward: internal error: emulated/);
    setHook("throw_on_launch", "runtime_error");
    expectNativeError(() => c.process(i32([1, 2])), RF_ERR_INTERNAL, /rf_compressor_process: internal error/);
    setHook("throw_on_launch", "runtime_error");
    expectNativeError(() => c.embed(i32([1, 2])), RF_ERR_INTERNAL, /rf_compressor_embed: internal error/);
    setHook("throw_on_launch", "runtime_error");
    expectNativeError(() => c.submit(i32([1, 2])), RF_ERR_INTERNAL, /rf_compressor_submit: internal error/);
    expect(c.pending()).toBe(0); // a failed submit leaves nothing pending
    const st = m.createEmbStore(16);
    setHook("throw_on_launch", "runtime_error");
    expectNativeError(() => st.append(new Uint16Array(32), 2), RF_ERR_INTERNAL, /rf_embstore_append: internal error/);
    st.append(new Uint16Array(32).fill(0x3c00), 2);
    setHook("throw_on_launch", "runtime_error");
    expectNativeError(
      () => st.scoreSelect(2, new Float32Array(16), 1, { window: 1, budget: 1, edge: 0 }),
      RF_ERR_INTERNAL,
      /rf_embstore_score_select: internal error/,
    );
    st.destroy();
    setHook("throw_on_launch", "runtime_error");
    expectNativeError(
      () => emu.score(new Float32Array(8), 2, 4, new Float32Array(4), 1),
      RF_ERR_INTERNAL,
      /rf_score: internal error/,
    );
    setHook("throw_on_launch", "bad_alloc");
    expectNativeError(() => s.forward(i32([1, 2])), RF_ERR_OOM, /rf_seq_forward: out of host memory/);
    // the objects stay usable after a failed call
    s.reset();
    const logits = s.forward(i32([1, 2, 3]), true)!;
    expect(logits.every(Number.isFinite)).toBe(true);
    c.destroy();
    s.destroy();
    m.destroy();
  });
});

test("a layout that differs from the packing is refused with the field named", () => {
  const { sym, close } = openRaw(libraryPath("cpu"));
  const layout = String(sym.rf_struct_layout());
  close();
  expect(structLayoutMismatches(layout.replace("rope_theta:44:f32", "rope_theta:48:f32"))).toEqual([
    "rf_config.rope_theta: 48:f32 in the library, 44:f32 here",
  ]);
  expect(structLayoutMismatches(layout.replace("rms_eps:40:f32", "rms_eps:40:i32"))).toEqual([
    "rf_config.rms_eps: 40:i32 in the library, 40:f32 here",
  ]);
  expect(
    structLayoutMismatches(layout.replace(" weight_dtype:64:i32", " weight_dtype:64:i32 kv_dtype:68:i32")),
  ).toEqual(["rf_config.kv_dtype: in the library, not packed here"]);
  expect(structLayoutMismatches(layout.replace("rf_compress_params 64", "rf_compress_params 68"))).toEqual([
    "rf_compress_params: sizeof 68 in the library, 64 here",
  ]);
  expect(structLayoutMismatches(layout.split("\n")[0])).toEqual(["rf_compress_params: not described by the library"]);
});

describe("pipelined compress: collect hands back one chunk", () => {
  test("a chunk's rows in a buffer of its size, not max_chunk's (the engine's upload compressor takes the longest question, ~half a model's window); the bytes of process; an out smaller than the chunk refused", () => {
    const native = new Native("cpu");
    try {
      const m = native.createModel(CFG);
      m.initRandom(1, 0.02);
      m.finalize();
      const big = { ...CP, maxChunk: 4096 };
      const chunks = [i32([4, 5, 6]), i32([7, 8, 9, 10, 11]), i32([12])];
      const ref = m.createCompressor(big, HEADS);
      const want = chunks.map((ch) => Array.from(ref.process(ch)!));
      const c = m.createCompressor(big, HEADS);
      const dim = c.embedDim;
      const got: number[][] = [];
      for (const ch of chunks) {
        c.submit(ch);
        if (c.pending() > 1) {
          if (got.length === 1)
            expect(() => c.collect(new Float32Array(4 * dim))).toThrow(/smaller than the chunk's 5 rows/);
          const e = c.collect()!;
          expect(e.buffer.byteLength).toBe(got.length === 0 ? 3 * dim * 4 : 5 * dim * 4);
          got.push(Array.from(e));
        }
      }
      const last = c.collect()!;
      expect(last.buffer.byteLength).toBe(dim * 4);
      got.push(Array.from(last));
      expect(c.collect()).toBeNull();
      expect(got).toEqual(want);
      ref.destroy();
      c.destroy();
      m.destroy();
    } finally {
      native.close();
    }
  });
});
