/**
 * The GPU runbook (scripts/gpu-session.sh) and its scripts (scripts/gpu_check.py, bench/gpu_bench.py) are meant for a
 * machine with a GPU, where a crash wastes scarce device time. Here the runbook runs in its --dry-run mode: every
 * stage against the CPU emulation of the CUDA build (build/libreform_cuda_emu.so), the scripts in their torch-free
 * modes (--no-hf, --shape tiny), so that the runbook, their ctypes bindings, checks and report code stay working.
 * Skipped when python3 with numpy is not available.
 */
import { beforeAll, describe, expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ROOT_DIR } from "../ffi/native.ts";
import { buildNative } from "./helpers/build.ts";

const numpy = spawnSync("python3", ["-c", "import numpy"], { encoding: "utf8" }).status === 0;

describe.skipIf(!numpy || process.arch !== "x64")("GPU scripts on the CPU emulation of the CUDA build", () => {
  beforeAll(() => {
    buildNative();
  }, 600_000);

  test("scripts/gpu-session.sh --dry-run: every stage runs on the emulation and reports", () => {
    const out = mkdtempSync(join(tmpdir(), "reform-gpu-session-"));
    try {
      const r = spawnSync("bash", ["scripts/gpu-session.sh", "--dry-run"], {
        cwd: ROOT_DIR,
        env: { ...process.env, OUT: out },
        encoding: "utf8",
        timeout: 400_000,
      });
      const all = `${r.stdout}\n${r.stderr}`;
      if (r.status !== 0) console.error(all.slice(-6000));
      const summary = readFileSync(join(out, "summary.txt"), "utf8");
      for (const st of ["build", "check", "bench", "train"]) expect(summary).toMatch(new RegExp(`^${st}: ok, `, "m"));
      const check = readFileSync(join(out, "gpu_check.txt"), "utf8");
      expect(check).toContain("RESULT: PASS");
      for (const c of [
        "logits rel err cuda vs CPU",
        "greedy 8 tokens",
        "with eviction",
        "state blob CUDA->CPU",
        "rf_score",
        "pipelined compress (submit/collect, 2 interleaved) bytes == process",
        "resident embeddings vs streamed rf_score_select",
        "rf_score_kth_select (float16 ctx): CUDA = its two calls",
        "as a CUDA graph vs plain",
      ])
        expect(check).toContain(c);
      const bench = readFileSync(join(out, "gpu_bench.txt"), "utf8");
      expect(bench).toMatch(/compress +512 tokens: .* tok\/s .*MFU/);
      expect(bench).toMatch(/score 4096 x 64/);
      expect(bench).toMatch(/prefill 256 tokens/);
      expect(bench).toMatch(/decode at context 256: .* ms\/token/);
      expect(bench).toMatch(/ttft of a 4096-token query/);
      expect(bench).toMatch(/compress +512 tokens writing the embedding file \(plain\): .* tok\/s/);
      expect(bench).toMatch(/compress +512 tokens writing the embedding file \(overlapped\): .* tok\/s/);
      expect(bench).toMatch(/score\+select 4096 x 64 .* streamed .* ms, resident .* ms .*same selection: yes/);
      expect(bench).toMatch(/ttft of a 4096-token query with resident embeddings/);
      expect(bench).toMatch(/decode at context 256 with CUDA graphs: .* ms\/token/);
      expect(bench).toMatch(/time per output token < 15 ms: (PASS|MISS)/);
      expect(readFileSync(join(out, "env.txt"), "utf8")).toContain("numpy");
      expect(all).not.toContain("Traceback");
      expect(r.status).toBe(0);
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  }, 400_000);
});
