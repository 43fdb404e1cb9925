/**
 * The GPU scripts (scripts/gpu_check.py, bench/gpu_bench.py) are meant for a machine with a GPU, where a crash
 * wastes scarce device time. Here they run against the CPU emulation of the CUDA build (build/libreform_cuda_emu.so)
 * in their torch-free modes (--no-hf, --shape tiny), so that their ctypes binding, checks and report code stay
 * working. Skipped when python3 with numpy is not available.
 */
import { beforeAll, describe, expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { ROOT_DIR } from "../ffi/native.ts";
import { buildNative } from "./helpers/build.ts";

const EMU = join(ROOT_DIR, "build", "libreform_cuda_emu.so");
const numpy = spawnSync("python3", ["-c", "import numpy"], { encoding: "utf8" }).status === 0;

function py(args: string[]) {
  const r = spawnSync("python3", args, { cwd: ROOT_DIR, encoding: "utf8", timeout: 240_000 });
  return { status: r.status, out: `${r.stdout}\n${r.stderr}` };
}

describe.skipIf(!numpy || process.arch !== "x64")("GPU scripts on the CPU emulation of the CUDA build", () => {
  beforeAll(() => {
    buildNative();
  }, 600_000);

  test("gpu_check.py --no-hf: every check of one config runs and passes", () => {
    const r = py([
      "scripts/gpu_check.py",
      "--no-hf",
      "--cuda-lib",
      EMU,
      "--configs",
      "llama3-gqa",
      "--prompt-len",
      "70",
      "--gen",
      "8",
    ]);
    if (r.status !== 0) console.error(r.out.slice(-4000));
    expect(r.out).toContain("RESULT: PASS");
    for (const check of [
      "logits rel err cuda vs CPU",
      "greedy 8 tokens",
      "with eviction",
      "state blob CUDA->CPU",
      "rf_score",
    ])
      expect(r.out).toContain(check);
    expect(r.out).not.toContain("Traceback");
    expect(r.status).toBe(0);
  }, 240_000);

  test("gpu_bench.py --shape tiny prints every figure", () => {
    const r = py(["bench/gpu_bench.py", "--lib", EMU, "--shape", "tiny", "--lengths", "512", "--decode", "4"]);
    if (r.status !== 0) console.error(r.out.slice(-4000));
    expect(r.status).toBe(0);
    expect(r.out).toMatch(/compress +512 tokens: .* tok\/s .*MFU/);
    expect(r.out).toMatch(/score 4096 x 64/);
    expect(r.out).toMatch(/prefill 256 tokens/);
    expect(r.out).toMatch(/decode at context 256: .* ms\/token/);
  }, 240_000);
});
