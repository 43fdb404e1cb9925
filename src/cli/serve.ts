#!/usr/bin/env bun
/**
 * bun run serve --model DIR [options]: the options, their environment variables and defaults are
 * resolved by src/config.ts (`--help` prints them). Starts listening at once; /health answers 503
 * until the model is loaded.
 */
import { mkdirSync } from "node:fs";
import { resolveConfig, SERVE_USAGE } from "../config.ts";
import { LimitsError, resolveLimits } from "../engine/load.ts";
import { startServer } from "../server.ts";
import { runCli, UsageError } from "./args.ts";

async function main() {
  const cfg = resolveConfig(process.argv.slice(2), process.env);
  if (cfg.help) {
    console.log(SERVE_USAGE);
    return;
  }
  const { modelDir, dataDir, host, port, apiKey } = cfg;
  try {
    mkdirSync(dataDir, { recursive: true });
  } catch (e) {
    throw new UsageError(`cannot create data directory ${dataDir}: ${(e as Error).message}`);
  }

  // A configuration that breaks the model's window is refused before the server listens (the engine applies the
  // same rules when it loads); anything else wrong with the model directory is the engine's to report.
  try {
    resolveLimits(cfg);
  } catch (e) {
    if (e instanceof LimitsError) {
      console.error(`serve: ${e.message}`);
      process.exit(2);
    }
  }

  let srv: Awaited<ReturnType<typeof startServer>>;
  try {
    srv = await startServer(cfg);
  } catch (e) {
    const msg = (e as Error).message;
    if (/EADDRINUSE|address already in use|port .* in use/i.test(msg)) {
      console.error(`serve: port ${port} on ${host} is already in use (pick another with --port)`);
    } else {
      console.error(`serve: failed to start: ${msg}`);
    }
    process.exit(1);
  }
  console.log(
    `REFORM server listening on ${srv.url} (model ${modelDir}, data ${dataDir}${apiKey ? ", API key required" : ""})`,
  );
  console.log(`loading the model... GET ${srv.url}/health answers 200 once it is ready`);
  srv.engine.ready().catch(() => {
    /* logged by startServer; /health reports the reason */
  });

  let stoppingSince = 0;
  const shutdown = async (sig: string) => {
    if (stoppingSince) {
      // the same signal twice at once is one stop delivered twice (a process group: `kill -- -PGID`, systemd's
      // KillMode=control-group, and `bun run` passing it on), not a person asking again to force it
      if (performance.now() - stoppingSince < REPEAT_IS_DUPLICATE_MS) return;
      console.error("forced exit");
      process.exit(1);
    }
    stoppingSince = performance.now();
    console.log(`${sig}: shutting down (saving compressor state)...`);
    const t = setTimeout(() => {
      console.error("shutdown took too long, exiting");
      process.exit(1);
    }, 30_000);
    try {
      await srv.stop();
    } finally {
      clearTimeout(t);
      process.exit(0);
    }
  };
  process.on("SIGINT", () => void shutdown("SIGINT"));
  process.on("SIGTERM", () => void shutdown("SIGTERM"));
}

/** A second stop signal sooner than this after the first is the same stop delivered twice; later, it forces the exit. */
const REPEAT_IS_DUPLICATE_MS = 1000;

await runCli("serve", SERVE_USAGE, main);
