/** The native libraries the test files need, built (or found up to date) once per file by build-native.sh. */
import { spawnSync } from "node:child_process";
import { ROOT_DIR } from "../../ffi/native.ts";

/** Builds the CPU library and the CUDA emulation (never the nvcc build: test/cuda-build.test.ts owns that). */
export function buildNative(): void {
  const r = spawnSync("bash", ["scripts/build-native.sh"], {
    cwd: ROOT_DIR,
    env: { ...process.env, REFORM_SKIP_CUDA: "1" },
    encoding: "utf8",
  });
  if (r.status !== 0) throw new Error(`build-native.sh failed:\n${r.stdout}\n${r.stderr}`);
}
