/**
 * src/config.ts: flags over environment over defaults, validation errors that name the flag, and the
 * `serve` CLI's exit status on a bad command line.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { UsageError } from "../src/cli/args.ts";
import { DEFAULT_MODEL_DIR, DEFAULTS, resolveConfig, SERVE_USAGE, type Env, type ServerConfig } from "../src/config.ts";
import { LimitsError, resolveDefaults } from "../src/engine/load.ts";
import { readSamplingDefaults, samplingDefaultsOf } from "../src/model/generation-config.ts";
import { makeTinyModel } from "./fixtures/tiny-model.ts";

const root = mkdtempSync(join(tmpdir(), "reform-config-"));
const model = join(root, "model");
mkdirSync(model);
writeFileSync(join(model, "config.json"), "{}");
const libDir = join(root, "lib");
mkdirSync(libDir);
writeFileSync(join(libDir, "libreform_cpu.so"), "");
afterAll(() => rmSync(root, { recursive: true, force: true }));

function config(argv: string[], env: Env = {}): ServerConfig {
  const c = resolveConfig(["--model", model, ...argv], env);
  if (c.help) throw new Error("unexpected help");
  return c;
}

function usageError(argv: string[], env: Env = {}): string {
  try {
    resolveConfig(argv, env);
  } catch (e) {
    expect(e).toBeInstanceOf(UsageError);
    return (e as Error).message;
  }
  throw new Error(`no error for ${argv.join(" ")}`);
}

describe("config", () => {
  test("defaults", () => {
    const c = config([]);
    expect(c).toMatchObject({
      modelDir: model,
      dataDir: resolve(DEFAULTS.dataDir),
      host: "127.0.0.1",
      port: 8080,
      maxBodyBytes: 64 * 1024 ** 3,
      maxJsonBytes: 32 * 1024 ** 2,
      idleTimeoutSec: 120,
      corsOrigin: "",
      backend: "auto",
      logRequests: false,
      defaults: {},
      allowBeyondWindow: false,
      generationConfig: "auto",
    });
    expect(c.apiKey).toBeUndefined();
    expect(c.library).toBeUndefined();
  });

  test("a flag wins over its environment variable, which wins over the default", () => {
    const env = { REFORM_PORT: "9001", PORT: "9002", REFORM_MAX_BODY_BYTES: "1000", REFORM_API_KEY: "envkey" };
    expect(config([], env)).toMatchObject({ port: 9001, maxBodyBytes: 1000, apiKey: "envkey" });
    expect(config(["--port", "7000", "--max-body-bytes", "5", "--api-key", "flagkey"], env)).toMatchObject({
      port: 7000,
      maxBodyBytes: 5,
      apiKey: "flagkey",
    });
    expect(config([], { PORT: "9002" }).port).toBe(9002);
    expect(resolveConfig([], { REFORM_MODEL: model })).toMatchObject({ modelDir: model });
  });

  test("body limits, timeout, CORS, logging, served name from the environment", () => {
    const c = config([], {
      REFORM_MAX_JSON_BYTES: "4096",
      REFORM_IDLE_TIMEOUT: "30",
      REFORM_CORS_ORIGIN: "https://example.org",
      REFORM_LOG_REQUESTS: "1",
      REFORM_SERVED_NAME: "served",
      REFORM_DATA_DIR: join(root, "d"),
    });
    expect(c).toMatchObject({
      maxJsonBytes: 4096,
      idleTimeoutSec: 30,
      corsOrigin: "https://example.org",
      logRequests: true,
      servedName: "served",
      dataDir: join(root, "d"),
    });
    expect(config(["--cors-origin", ""]).corsOrigin).toBe("");
    expect(config(["--log-requests"]).logRequests).toBe(true);
  });

  test("native backend and library: REFORM_BACKEND, REFORM_LIBRARY, REFORM_LIB_DIR", () => {
    expect(config([], { REFORM_BACKEND: "cpu" }).backend).toBe("cpu");
    const lib = join(libDir, "libreform_cpu.so");
    expect(config([], { REFORM_LIBRARY: lib })).toMatchObject({ library: lib, backend: "auto" });
    expect(config([], { REFORM_BACKEND: "cpu", REFORM_LIB_DIR: libDir }).library).toBe(lib);
    expect(usageError(["--model", model, "--backend", "cuda", "--lib-dir", libDir])).toContain("libreform_cuda.so");
    expect(usageError(["--model", model, "--lib-dir", libDir])).toContain("--lib-dir needs --backend");
    expect(usageError(["--model", model], { REFORM_BACKEND: "tpu" })).toContain("--backend must be");
    expect(usageError(["--model", model, "--library", join(root, "none.so")])).toContain("native library not found");
  });

  test("engine defaults from flags", () => {
    expect(config(["--budget", "100", "--max-budget", "200", "--max-tokens", "5", "--threads", "2"])).toMatchObject({
      defaults: { budget: 100, maxBudget: 200, maxTokens: 5 },
      threads: 2,
    });
    expect(usageError(["--model", model, "--budget", "300", "--max-budget", "200"])).toContain(
      "--budget must not exceed",
    );
    expect(usageError(["--model", model, "--budget", "8"])).toContain("--budget must be between 16 and");
    expect(config([]).allowBeyondWindow).toBe(false);
    expect(
      config(["--smoothing-lag", "8", "--sentence-tail", "0", "--score-floor", "0.25", "--edge", "0"]),
    ).toMatchObject({
      defaults: { lag: 8, sentenceTail: 0, scoreFloor: 0.25, edge: 0 },
    });
    expect(usageError(["--model", model, "--edge=-1"])).toContain("--edge must be");
    expect(usageError(["--model", model, "--score-floor", "1.5"])).toContain("--score-floor must be between 0 and 1");
    expect(usageError(["--model", model, "--score-floor", "half"])).toContain("--score-floor must be a number");
    expect(config(["--score-background", "off"])).toMatchObject({ defaults: { scoreBackground: "off" } });
    expect(config(["--score-background", "mean"])).toMatchObject({ defaults: { scoreBackground: "mean" } });
    expect(config(["--score-background", "on"])).toMatchObject({ defaults: { scoreBackground: "kth-pairs" } });
    expect(config(["--score-background", "kth"])).toMatchObject({ defaults: { scoreBackground: "kth" } });
    expect(config([]).defaults.scoreBackground).toBeUndefined(); // the engine's default (kth-pairs) applies
    expect(usageError(["--model", model, "--score-background", "maybe"])).toContain("--score-background");
    expect(config(["--max-model-len", "9000", "--allow-beyond-window"])).toMatchObject({
      defaults: { maxModelLen: 9000 },
      allowBeyondWindow: true,
    });
  });

  test("derived limits: every default follows the trained window (512, 2048, 8192)", () => {
    const derive = (W: number) => {
      const { defaults: d } = resolveDefaults(
        {},
        {},
        { trainedWindow: W, templateTokens: 12, allowBeyondWindow: false },
      );
      return [
        d.chunkSize,
        d.capacity,
        d.maxQueryTokens,
        d.budget,
        d.maxBudget,
        d.maxTokens,
        d.maxNewTokens,
        d.maxModelLen,
        d.edge,
        d.window,
        d.lag,
      ];
    };
    //                     chunk capacity query budget maxBudget maxTokens maxNew maxModelLen edge smoothing lag
    expect(derive(512)).toEqual([128, 256, 256, 320, 448, 64, 256, 512, 0, 33, 0]);
    expect(derive(2048)).toEqual([512, 1024, 1024, 1280, 1792, 256, 1024, 2048, 0, 129, 0]);
    expect(derive(8192)).toEqual([2048, 4096, 4096, 5120, 7168, 1024, 4096, 8192, 0, 129, 0]);
    // the heads file's chunk / capacity win over the derived ones, explicit values over both
    const x = { trainedWindow: 512, templateTokens: 12, allowBeyondWindow: false };
    expect(resolveDefaults({}, { chunkSize: 64, capacity: 128 }, x).defaults).toMatchObject({
      chunkSize: 64,
      capacity: 128,
    });
    expect(resolveDefaults({ capacity: 192 }, { chunkSize: 64, capacity: 128 }, x).defaults.capacity).toBe(192);
    // every rule that fails is named with its numbers, in one message
    expect(() => resolveDefaults({ chunkSize: 300, capacity: 300, maxModelLen: 600 }, {}, x)).toThrow(
      "chunk_size 300 + capacity 300 = 600 exceeds the trained window of 512 tokens",
    );
    expect(() => resolveDefaults({ maxModelLen: 600 }, {}, x)).toThrow(LimitsError);
    // a configured lag must keep each token inside its own window
    expect(() => resolveDefaults({ lag: 20 }, {}, x)).toThrow(
      "the smoothing lag 20 (--smoothing-lag) must be within half the smoothing window 33",
    );
    expect(resolveDefaults({ lag: 16 }, {}, x).defaults.lag).toBe(16);
    expect(resolveDefaults({}, { window: 9, lag: 4 }, x).defaults.lag).toBe(4);
    const beyond = resolveDefaults({ maxModelLen: 600 }, {}, { ...x, allowBeyondWindow: true });
    expect(beyond.defaults.maxModelLen).toBe(600);
    expect(beyond.warnings).toEqual([expect.stringContaining("max_model_len 600 exceeds the trained window of 512")]);
  });

  test("serve refuses a configuration that breaks the model's window before it listens", async () => {
    const tiny = await makeTinyModel(join(root, "tiny")); // max_position_embeddings 256
    const r = spawnSync(
      "bun",
      [
        "src/cli/serve.ts",
        "--model",
        tiny,
        "--data",
        join(root, "serve-data"),
        "--port",
        "0",
        "--max-model-len",
        "1024",
      ],
      {
        cwd: resolve(import.meta.dir, ".."),
        encoding: "utf8",
        timeout: 60_000,
      },
    );
    expect(r.status).toBe(2);
    expect(r.stderr).toContain("max_model_len 1024 exceeds the trained window of 256 tokens");
    expect(r.stdout).not.toContain("listening");
  });

  test("bad command lines name the flag", () => {
    // no --model: the embedded default model
    const dflt = resolveConfig([], {});
    expect(dflt.help).toBe(false);
    if (!dflt.help) expect(dflt.modelDir).toBe(DEFAULT_MODEL_DIR);
    expect(existsSync(join(DEFAULT_MODEL_DIR, "config.json"))).toBe(true);
    expect(usageError(["--model", root])).toContain("has no config.json");
    expect(usageError(["--model", join(root, "nope")])).toContain("model directory not found");
    expect(usageError(["--model", model, "--port", "70000"])).toContain("--port must be between 0 and 65535");
    expect(usageError(["--model", model], { REFORM_PORT: "http" })).toContain("--port must be a whole number");
    expect(usageError(["--model", model, "--idle-timeout", "300"])).toContain("--idle-timeout");
    expect(usageError(["--model", model, "--heads", join(root, "heads.json")])).toContain("heads file not found");
    expect(usageError(["--model", model, "--bogus"])).toContain("--bogus");
    expect(usageError(["--model", model, "--generation-config", "vllm"])).toContain("--generation-config");
    expect(config(["--generation-config", "openai"]).generationConfig).toBe("openai");
    expect(config([], { REFORM_GENERATION_CONFIG: "openai" }).generationConfig).toBe("openai");
  });

  test("sampling defaults from generation_config.json: the fields it names, do_sample false as greedy", () => {
    // the embedded model's file says do_sample: false, so chat frontends that send no temperature get its greedy answers
    expect(readSamplingDefaults(DEFAULT_MODEL_DIR)).toEqual({ defaults: { temperature: 0 }, ignored: [] });
    expect(samplingDefaultsOf({ temperature: 0.6, top_p: 0.9, top_k: 20, eos_token_id: 2 })).toEqual({
      defaults: { temperature: 0.6, topP: 0.9, topK: 20 },
      ignored: [],
    });
    expect(samplingDefaultsOf({ do_sample: false, temperature: 0.6, min_p: 0.05, repetition_penalty: 1.05 })).toEqual({
      defaults: { temperature: 0, minP: 0.05, repetitionPenalty: 1.05 },
      ignored: [],
    });
    const bad = samplingDefaultsOf({ temperature: 7, top_k: 1.5, top_p: null });
    expect(bad.defaults).toEqual({});
    expect(bad.ignored.map((s) => s.split(" ")[0])).toEqual(["temperature", "top_k"]);
    expect(samplingDefaultsOf(null)).toEqual({ defaults: {}, ignored: [] });
    expect(readSamplingDefaults(root).defaults).toEqual({});
  });

  test("--help, and the usage lists every flag with its environment variable", () => {
    expect(resolveConfig(["--help"], {})).toEqual({ help: true });
    for (const flag of ["--model", "--backend", "--library", "--lib-dir", "--max-json-bytes", "--api-key"]) {
      expect(SERVE_USAGE).toContain(flag);
    }
    for (const env of [
      "REFORM_BACKEND",
      "REFORM_LIBRARY",
      "REFORM_LIB_DIR",
      "REFORM_API_KEY",
      "REFORM_MAX_BODY_BYTES",
    ]) {
      expect(SERVE_USAGE).toContain(env);
    }
  });

  test("serve: a bad command line exits 2 with the message and the usage", () => {
    const r = spawnSync("bun", ["src/cli/serve.ts", "--model", model, "--port", "x"], {
      cwd: resolve(import.meta.dir, ".."),
      encoding: "utf8",
    });
    expect(r.status).toBe(2);
    expect(r.stderr).toContain("serve: --port must be a whole number, got 'x'");
    expect(r.stderr).toContain("usage: bun run serve");
  });

  test("serve: SIGTERM to its whole process group (systemd's stop, `kill -- -PGID`) is one clean stop, exit 0", async () => {
    const tiny = await makeTinyModel(join(root, "tiny-stop"));
    // `bun run serve` in a group of its own: the wrapper passes the signal on, so the server gets it twice
    const p = spawn("bun", ["run", "serve", "--model", tiny, "--data", join(root, "stop-data"), "--port", "0"], {
      cwd: resolve(import.meta.dir, ".."),
      detached: true,
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    p.stdout!.on("data", (d: Buffer) => (out += d.toString()));
    p.stderr!.on("data", (d: Buffer) => (out += d.toString()));
    const exited = new Promise<number | null>((res) => p.on("exit", (code) => res(code)));
    for (let i = 0; i < 600 && !out.includes("engine ready"); i++) await Bun.sleep(100);
    expect(out).toContain("engine ready");
    // an upload in flight: the stop then takes long enough for the second delivery to arrive while it runs
    const url = /listening on (http:\/\/[^ ]+)/.exec(out)![1]!;
    const ctx = (await (await fetch(`${url}/v1/contexts`, { method: "POST", body: "{}" })).json()) as { id: string };
    const line = "The quiet river runs past the stone bridge in the morning light. ".repeat(64);
    let sent = 0;
    const body = new ReadableStream<Uint8Array>({
      async pull(c) {
        c.enqueue(new TextEncoder().encode(line));
        sent++;
        await Bun.sleep(5);
      },
    });
    const up = fetch(`${url}/v1/contexts/${ctx.id}/content`, { method: "PUT", body }).catch(() => null);
    for (let i = 0; i < 100 && sent < 20; i++) await Bun.sleep(50);
    process.kill(-p.pid!, "SIGTERM");
    expect(await exited).toBe(0);
    expect(out).toContain("SIGTERM: shutting down");
    expect(out).not.toContain("forced exit");
    await up;
  }, 90_000);
});
