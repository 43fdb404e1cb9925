/**
 * CUDA build test (runs in CI: nvcc present, usually no GPU).
 *  - skipped when nvcc is absent
 *  - builds build/libreform_cuda.so with the nvcc line of scripts/build-native.sh
 *  - every RF_API function of cuda/reform.h is exported
 *  - the library loads through ffi/native.ts without a GPU: deviceCount() is 0 (or > 0 with a GPU)
 *    and rf_model_create fails with a NativeError naming the missing device instead of crashing.
 */
import { describe, expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { LLAMA_BASE } from "../bench/common.ts";
import { Native, NativeError, RF_ERR_NODEVICE, RF_ROPE_DEFAULT, ROOT_DIR } from "../ffi/native.ts";
import type { ModelConfig } from "../src/model/types.ts";

function findNvcc(): string | null {
  const candidates = [process.env.NVCC, "/usr/local/cuda/bin/nvcc"].filter(Boolean) as string[];
  for (const c of candidates) if (existsSync(c)) return c;
  const r = spawnSync("sh", ["-c", "command -v nvcc"], { encoding: "utf8" });
  const p = r.stdout?.trim();
  return r.status === 0 && p ? p : null;
}

const NVCC = findNvcc();
const LIB = join(ROOT_DIR, "build", "libreform_cuda.so");

/** Names of every RF_API function declared in the header (the identifier right before "("). */
function headerFunctions(): string[] {
  const src = readFileSync(join(ROOT_DIR, "cuda", "reform.h"), "utf8");
  const names = new Set<string>();
  for (const line of src.split("\n")) {
    if (!line.startsWith("RF_API ")) continue;
    const m = /\b(rf_[A-Za-z0-9_]+)\s*\(/.exec(line);
    if (m) names.add(m[1]);
  }
  return [...names].sort();
}

function exportedSymbols(path: string): Set<string> {
  const r = spawnSync("nm", ["-D", "--defined-only", path], { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`nm failed: ${r.stderr}`);
  const out = new Set<string>();
  for (const line of r.stdout.split("\n")) {
    const parts = line.trim().split(/\s+/);
    const name = parts[parts.length - 1];
    if (name && parts.length >= 3 && /^[TW]$/i.test(parts[1])) out.add(name);
  }
  return out;
}

const tinyConfig: ModelConfig = {
  ...LLAMA_BASE,
  vocabSize: 64,
  hiddenSize: 64,
  intermediateSize: 128,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  headDim: 16,
  ropeType: RF_ROPE_DEFAULT,
  ropeTheta: 10000,
};

describe.skipIf(!NVCC)("CUDA native library", () => {
  test(
    "builds with nvcc",
    () => {
      // Build only the CUDA target: the same nvcc line as scripts/build-native.sh (the CPU target is
      // covered by its own test). REFORM_NVCC_FLAGS is not used: the flags must stay in sync with the script.
      const script = readFileSync(join(ROOT_DIR, "scripts", "build-native.sh"), "utf8");
      expect(script).toContain("cuda/reform_cuda.cu");
      const r = spawnSync(
        NVCC!,
        [
          "-O3",
          "-std=c++17",
          "-arch=sm_90",
          "-Xcompiler",
          "-fPIC,-fvisibility=hidden",
          "-shared",
          "-cudart",
          "static",
          "-o",
          LIB + ".test.tmp",
          "cuda/reform_cuda.cu",
          "-ldl",
          "-lpthread",
        ],
        { cwd: ROOT_DIR, encoding: "utf8" },
      );
      if (r.status !== 0) throw new Error(`nvcc failed (${r.status}):\n${r.stdout}\n${r.stderr}`);
      // warning-free build
      const warnings = `${r.stdout}\n${r.stderr}`.split("\n").filter((l) => /warning/i.test(l));
      expect(warnings).toEqual([]);
      const mv = spawnSync("mv", ["-f", LIB + ".test.tmp", LIB]);
      expect(mv.status).toBe(0);
      expect(existsSync(LIB)).toBe(true);
    },
    { timeout: 600_000 },
  );

  test("exports every RF_API function of reform.h", () => {
    const want = headerFunctions();
    expect(want.length).toBeGreaterThan(30);
    const have = exportedSymbols(LIB);
    const missing = want.filter((n) => !have.has(n));
    expect(missing).toEqual([]);
    // nothing else of ours leaks with default visibility
    const extra = [...have].filter((n) => n.startsWith("rf_") && !want.includes(n));
    expect(extra).toEqual([]);
  });

  test("loads via ffi/native.ts and reports devices without crashing", () => {
    const n = new Native("cuda", LIB);
    try {
      expect(n.backendName()).toBe("cuda");
      const count = n.deviceCount();
      expect(count).toBeGreaterThanOrEqual(0);
      const hasGpu = spawnSync("sh", ["-c", "nvidia-smi -L"], { encoding: "utf8" }).status === 0;
      if (!hasGpu) expect(count).toBe(0);
      const info = n.deviceInfo();
      expect(info.startsWith("cuda")).toBe(true);

      if (count === 0) {
        let err: unknown = null;
        try {
          n.createModel(tinyConfig);
        } catch (e) {
          err = e;
        }
        expect(err).toBeInstanceOf(NativeError);
        const ne = err as NativeError;
        // Pointer-returning calls report their status through rf_last_error_code().
        expect(ne.code).toBe(RF_ERR_NODEVICE);
        expect(ne.message).toMatch(/no usable CUDA device|no_device/i);

        // status-returning calls report RF_ERR_NODEVICE directly
        let err2: unknown = null;
        try {
          n.score(new Float32Array(8), 2, 4, new Float32Array(4), 1);
        } catch (e) {
          err2 = e;
        }
        expect(err2).toBeInstanceOf(NativeError);
        expect((err2 as NativeError).code).toBe(RF_ERR_NODEVICE);
      } else {
        // with a GPU: a tiny model can be created and destroyed
        const m = n.createModel(tinyConfig);
        m.initRandom(1, 0.02);
        m.finalize();
        expect(m.memoryBytes()).toBeGreaterThan(0);
        m.destroy();
      }
    } finally {
      n.close();
    }
  });
});
