/**
 * Builds the native CPU library (warning-free) and the C++ kernel test program
 * (test/native/kernel_tests.cpp: every rf::cpu kernel vs a naive reference), runs it and asserts success.
 */
import { expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { ROOT_DIR } from "../ffi/native";

function run(cmd: string, args: string[], env: Record<string, string> = {}) {
  const r = spawnSync(cmd, args, { cwd: ROOT_DIR, env: { ...process.env, ...env }, encoding: "utf8" });
  return { status: r.status, out: `${r.stdout ?? ""}${r.stderr ?? ""}`, error: r.error };
}

test("build-native.sh builds libreform_cpu.so", () => {
  const r = run("bash", ["scripts/build-native.sh"], { REFORM_SKIP_CUDA: "1" });
  if (r.status !== 0) console.error(r.out);
  expect(r.status).toBe(0);
  expect(r.out).not.toMatch(/warning:/);
  expect(existsSync(join(ROOT_DIR, "build/libreform_cpu.so"))).toBe(true);
}, 300_000);

test("the start path builds only what serving needs; scripts/test.sh builds the test libraries too", () => {
  // setup.sh is what setup-and-serve.sh runs before starting the server: no CUDA emulation, ASan variant, fake cuBLAS
  const r = run("bash", ["scripts/setup.sh"], { REFORM_SKIP_CUDA: "1" });
  if (r.status !== 0) console.error(r.out);
  expect(r.status).toBe(0);
  expect(r.out).toContain("CUDA emulation skipped");
  expect(r.out).not.toMatch(/compiling libreform_cuda_emu|compiling libcublas_fake/);
  expect(readFileSync(join(ROOT_DIR, "scripts/setup-and-serve.sh"), "utf8")).toMatch(/\nbash scripts\/setup\.sh\n/);
  expect(readFileSync(join(ROOT_DIR, "scripts/test.sh"), "utf8")).toContain("scripts/setup.sh --with-test-libs");
}, 300_000);

/** Compiles test/native/kernel_tests.cpp (warning-free) with `defines`, runs it once per REFORM_CPU_ISA value. */
function kernelTests(exeName: string, defines: string[], isas: string[]) {
  mkdirSync(join(ROOT_DIR, "build"), { recursive: true });
  const exe = join(ROOT_DIR, "build", exeName);
  const cxx = process.env.CXX ?? "g++";
  const c = run(cxx, [
    "-O2",
    ...defines,
    "-fopenmp-simd",
    "-pthread",
    "-std=c++17",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    "-Icuda",
    "test/native/kernel_tests.cpp",
    "-o",
    exe,
  ]);
  if (c.status !== 0) console.error(c.out);
  expect(c.status).toBe(0);
  expect(c.out).not.toMatch(/warning:/);
  for (const isa of isas) {
    const r = run(exe, [], { REFORM_CPU_ISA: isa });
    const lines = r.out.trim().split("\n");
    const failed = lines.filter((l) => l.startsWith("[FAIL]"));
    if (failed.length || r.status !== 0) console.error(r.out);
    expect(failed).toEqual([]);
    expect(r.status).toBe(0);
    expect(lines.filter((l) => l.startsWith("[PASS]")).length).toBeGreaterThan(100);
    expect(lines[lines.length - 1]).toMatch(/ 0 failed$/);
  }
}

// built like the library (baseline target); each instruction set the CPU has is tested by name, and the
// whole program runs once per default set (REFORM_CPU_ISA) so that every kernel runs on each path
test("C++ kernel tests pass", () => kernelTests("kernel_tests", [], ["", "avx2", "portable"]), 180_000);

// what a non-x86 target builds: the portable set alone
test(
  "C++ kernel tests pass with only the portable kernels compiled",
  () => kernelTests("kernel_tests_portable", ["-DRF_CPU_PORTABLE_ONLY"], [""]),
  180_000,
);
