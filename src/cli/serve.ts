#!/usr/bin/env bun
/**
 * bun run serve --model DIR [--data DIR] [--host H] [--port N] [--heads FILE] [--backend cpu|cuda]
 *               [--api-key KEY] [--served-name NAME] [--max-body-bytes N] [--log-requests]
 * Every option has an environment fallback (see USAGE). Starts listening at once; /health answers
 * 503 until the model is loaded.
 */
import { existsSync, mkdirSync, statSync } from "node:fs";
import { resolve } from "node:path";
import { parseArgs } from "node:util";
import { startServer } from "../server.ts";

const USAGE = `usage: bun run serve --model DIR [options]

  --model DIR          Hugging Face model directory (config.json, *.safetensors, tokenizer.json)
                       env REFORM_MODEL
  --data DIR           where context sessions are stored (default ./data)        env REFORM_DATA_DIR
  --host HOST          listen address (default 127.0.0.1; 0.0.0.0 for all)       env REFORM_HOST
  --port N             listen port (default 8080)                                env REFORM_PORT, PORT
  --heads FILE|JSON    head-selection file overriding <model>/reform_heads.json  env REFORM_HEADS
  --backend cpu|cuda   native backend (default: cuda when available, else cpu)   env REFORM_BACKEND
  --library FILE       native library to load instead of build/libreform_<backend>.so  env REFORM_LIBRARY
  --api-key KEY        require 'Authorization: Bearer KEY' (all but /health)     env REFORM_API_KEY
  --served-name NAME   model name shown by /v1/models (default: model dir name)  env REFORM_SERVED_NAME
  --max-body-bytes N   largest single upload request in bytes (default 64 GiB)   env REFORM_MAX_BODY_BYTES
  --budget N           default recompute budget (context tokens gathered)        (default 8192)
  --max-budget N       largest budget a request may ask for          (default max(trained ctx, 1024))
  --max-tokens N       default answer length limit                                (default 512)
  --max-new-tokens N   largest max_tokens a request may ask for                   (default 8192)
  --chunk-size N       compression chunk in tokens              (default: heads file, else 1024)
  --capacity N         compressor KV entries per layer/head     (default: heads file, else 4096)
  --threads N          CPU backend threads                                        (default: all cores)
  --log-requests       log every request                                         env REFORM_LOG_REQUESTS=1
  -h, --help           show this help
`;

function fail(msg: string): never {
  console.error(`serve: ${msg}\n\n${USAGE}`);
  process.exit(2);
}

function intOpt(name: string, v: string | undefined, def: number, min: number, max: number): number {
  if (v === undefined || v === "") return def;
  if (!/^\d+$/.test(v)) fail(`--${name} must be a whole number, got '${v}'`);
  const n = Number(v);
  if (n < min || n > max) fail(`--${name} must be between ${min} and ${max}, got ${n}`);
  return n;
}

async function main() {
  let values: Record<string, string | boolean | undefined>;
  try {
    ({ values } = parseArgs({
      args: process.argv.slice(2),
      options: {
        model: { type: "string", short: "m" },
        data: { type: "string" },
        host: { type: "string" },
        port: { type: "string", short: "p" },
        heads: { type: "string" },
        backend: { type: "string" },
        library: { type: "string" },
        "api-key": { type: "string" },
        "served-name": { type: "string" },
        "max-body-bytes": { type: "string" },
        budget: { type: "string" },
        "max-budget": { type: "string" },
        "max-tokens": { type: "string" },
        "max-new-tokens": { type: "string" },
        "chunk-size": { type: "string" },
        capacity: { type: "string" },
        threads: { type: "string" },
        "log-requests": { type: "boolean" },
        help: { type: "boolean", short: "h" },
      },
      allowPositionals: false,
      strict: true,
    }));
  } catch (e) {
    fail((e as Error).message);
  }
  if (values.help) {
    console.log(USAGE);
    return;
  }
  const env = process.env;
  const str = (k: string, ...envs: string[]) => {
    const v = values[k];
    if (typeof v === "string") return v;
    for (const e of envs) if (env[e]) return env[e];
    return undefined;
  };

  const model = str("model", "REFORM_MODEL");
  if (!model) fail("--model is required (or set REFORM_MODEL)");
  const modelDir = resolve(model);
  if (!existsSync(modelDir) || !statSync(modelDir).isDirectory()) fail(`model directory not found: ${modelDir}`);
  if (!existsSync(resolve(modelDir, "config.json"))) fail(`${modelDir} has no config.json (expected a Hugging Face model directory)`);

  const dataDir = resolve(str("data", "REFORM_DATA_DIR") ?? "data");
  try {
    mkdirSync(dataDir, { recursive: true });
  } catch (e) {
    fail(`cannot create data directory ${dataDir}: ${(e as Error).message}`);
  }

  const backend = str("backend", "REFORM_BACKEND");
  if (backend !== undefined && backend !== "cpu" && backend !== "cuda") fail(`--backend must be cpu or cuda, got '${backend}'`);
  const library = str("library", "REFORM_LIBRARY");
  if (library !== undefined && !existsSync(library)) fail(`native library not found: ${library}`);
  const heads = str("heads", "REFORM_HEADS");
  if (heads !== undefined && !heads.trim().startsWith("{") && !existsSync(heads)) fail(`heads file not found: ${heads}`);

  const host = str("host", "REFORM_HOST") ?? "127.0.0.1";
  const port = intOpt("port", str("port", "REFORM_PORT", "PORT"), 8080, 0, 65535);
  const maxBodyBytes = intOpt("max-body-bytes", str("max-body-bytes", "REFORM_MAX_BODY_BYTES"), 64 * 1024 ** 3, 1, Number.MAX_SAFE_INTEGER);
  const apiKey = str("api-key", "REFORM_API_KEY");
  const logRequests = values["log-requests"] === true || env.REFORM_LOG_REQUESTS === "1";

  const optInt = (name: string, min: number) => {
    const v = values[name];
    return typeof v === "string" ? intOpt(name, v, 0, min, 1 << 30) : undefined;
  };
  const defaults: Record<string, number> = {};
  for (const [flag, key, min] of [
    ["budget", "budget", 16],
    ["max-budget", "maxBudget", 16],
    ["max-tokens", "maxTokens", 1],
    ["max-new-tokens", "maxNewTokens", 1],
    ["chunk-size", "chunkSize", 1],
    ["capacity", "capacity", 1],
  ] as const) {
    const v = optInt(flag, min);
    if (v !== undefined) defaults[key] = v;
  }
  if (defaults.budget !== undefined && defaults.maxBudget !== undefined && defaults.budget > defaults.maxBudget) {
    fail("--budget must not exceed --max-budget");
  }
  const threads = optInt("threads", 1);

  let srv: Awaited<ReturnType<typeof startServer>>;
  try {
    srv = await startServer({
      modelDir,
      dataDir,
      host,
      port,
      apiKey: apiKey ?? "",
      maxBodyBytes,
      backend: backend as "cpu" | "cuda" | undefined,
      heads: heads && !heads.trim().startsWith("{") ? resolve(heads) : heads,
      servedName: str("served-name", "REFORM_SERVED_NAME"),
      logRequests,
      engine: {
        ...(library !== undefined ? { library: resolve(library) } : {}),
        ...(threads !== undefined ? { threads } : {}),
        ...(Object.keys(defaults).length ? { defaults } : {}),
      },
    });
  } catch (e) {
    const msg = (e as Error).message;
    if (/EADDRINUSE|address already in use|port .* in use/i.test(msg)) {
      console.error(`serve: port ${port} on ${host} is already in use (pick another with --port)`);
    } else {
      console.error(`serve: failed to start: ${msg}`);
    }
    process.exit(1);
  }
  console.log(`REFORM server listening on ${srv.url} (model ${modelDir}, data ${dataDir}${apiKey ? ", API key required" : ""})`);
  console.log(`loading the model... GET ${srv.url}/health answers 200 once it is ready`);
  srv.engine.ready().catch(() => {
    /* logged by startServer; /health reports the reason */
  });

  let stopping = false;
  const shutdown = async (sig: string) => {
    if (stopping) {
      console.error("forced exit");
      process.exit(1);
    }
    stopping = true;
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

await main();
