/**
 * A real server for the HTTP tests (and the benchmarks that drive one in process): a tiny random model
 * (test/fixtures/tiny-model.ts) or a given model directory, configured the way `bun run serve` is (flags and
 * environment through src/config.ts) on the CPU build, listening on a free port, with its files in a temporary
 * folder that `stop()` removes.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { libraryPath } from "../../ffi/native.ts";
import { type Env, resolveConfig } from "../../src/config.ts";
import { type RunningServer, type ServerOptions, startServer } from "../../src/server.ts";
import { makeTinyModel, type TinyModelOptions } from "../fixtures/tiny-model.ts";

export interface TestServerOptions {
  /** Names the temporary folder (`reform-<name>-…`). */
  name?: string;
  /** Serve this model directory; without it a tiny random model is made in the temporary folder. */
  modelDir?: string;
  /** The tiny model's options (without `modelDir`). */
  modelOptions?: TinyModelOptions;
  /** `serve` flags after `--model DIR --data <tmp>/data --port 0`. */
  flags?: string[];
  /** Environment on top of REFORM_BACKEND=cpu and REFORM_LIBRARY=the CPU build (nothing else is read). */
  env?: Env;
  /** Options no flag sets, over the resolved ones; `defaults` is merged into the resolved engine defaults. */
  options?: Partial<Omit<ServerOptions, "modelDir" | "dataDir">>;
  /** Wait until the engine is ready (default true); false returns as soon as the server listens. */
  ready?: boolean;
}

/** The running server; `root` is its temporary folder (the data under `root/data`), which `stop()` removes. */
export interface TestServer extends RunningServer {
  root: string;
  modelDir: string;
}

export async function startTestServer(o: TestServerOptions = {}): Promise<TestServer> {
  const root = mkdtempSync(join(tmpdir(), `reform-${o.name ?? "test"}-`));
  let srv: RunningServer | undefined;
  try {
    const modelDir = o.modelDir ?? (await makeTinyModel(join(root, "model"), o.modelOptions));
    const cfg = resolveConfig(["--model", modelDir, "--data", join(root, "data"), "--port", "0", ...(o.flags ?? [])], {
      REFORM_BACKEND: "cpu",
      REFORM_LIBRARY: libraryPath("cpu"),
      ...o.env,
    });
    if (cfg.help) throw new Error("unexpected help");
    const running = await startServer({
      ...cfg,
      log: () => {},
      ...o.options,
      defaults: { ...cfg.defaults, ...o.options?.defaults },
    });
    srv = running;
    if (o.ready ?? true) await running.engine.ready();
    return {
      ...running,
      root,
      modelDir,
      async stop() {
        try {
          await running.stop();
        } finally {
          rmSync(root, { recursive: true, force: true });
        }
      },
    };
  } catch (e) {
    await srv?.stop();
    rmSync(root, { recursive: true, force: true });
    throw e;
  }
}
