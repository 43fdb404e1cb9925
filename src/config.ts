/**
 * The server's configuration, resolved in one place: a command-line flag wins over its environment
 * variable, which wins over the default. `resolveConfig(argv, env)` returns one typed object that the
 * server, the HTTP app (through AppOptions) and the engine (through EngineOptions) are given; nothing
 * else in the server reads process.env. The flag table below is also the `serve --help` text.
 */
import { existsSync, statSync } from "node:fs";
import { DEFAULT_BACKGROUND, SCORE_BACKGROUNDS } from "./engine/background.ts";
import { join, resolve } from "node:path";
import type { EngineDefaults } from "./engine/client.ts";
import { intFlag, numFlag, oneOf, parseFlags, UsageError } from "./cli/args.ts";

export type Backend = "auto" | "cpu" | "cuda";
/** auto: the model's generation_config.json sampling defaults (src/model/generation-config.ts); openai: OpenAI's */
export const GENERATION_CONFIG_MODES = ["auto", "openai"] as const;
export type GenerationConfigMode = (typeof GENERATION_CONFIG_MODES)[number];

/** Defaults of everything the server can be told; startServer applies the same ones to programmatic callers. */
export const DEFAULTS = {
  dataDir: "data",
  host: "127.0.0.1",
  port: 8080,
  /** one content upload request */
  maxBodyBytes: 64 * 1024 ** 3,
  /** one JSON request (queries, chat) */
  maxJsonBytes: 32 * 1024 ** 2,
  /** Bun caps it at 255 */
  idleTimeoutSec: 120,
  /** no cross-origin access unless origins are named */
  corsOrigin: "",
  backend: "auto" as Backend,
} as const;

export interface ServerConfig {
  modelDir: string;
  dataDir: string;
  host: string;
  port: number;
  /** Bearer token required on every route but /health; undefined = no auth. */
  apiKey?: string;
  maxBodyBytes: number;
  maxJsonBytes: number;
  idleTimeoutSec: number;
  /** Origins allowed cross-origin (comma-separated, "*" any); "" = same-origin only. */
  corsOrigin: string;
  servedName?: string;
  /** Head-selection file, or inline JSON, overriding <model>/reform_heads.json. */
  heads?: string;
  logRequests: boolean;
  backend: Backend;
  /** Native library file to load instead of build/libreform_<backend>.so. */
  library?: string;
  threads?: number;
  defaults: Partial<EngineDefaults>;
  /** Let --max-model-len (and chunk + capacity) exceed the model's trained window: a warning, not an error. */
  allowBeyondWindow: boolean;
  /** Answer OpenAI requests whose prompt exceeds the window with REFORM (implicit contexts); --no-inline: refuse. */
  inline: boolean;
  /** Where OpenAI requests' left-out sampling fields come from: the model's generation_config.json, or OpenAI's. */
  generationConfig: GenerationConfigMode;
}

type Flag = {
  flag: string;
  short?: string;
  /** Placeholder of the value; absent for an on/off switch. */
  arg?: string;
  env?: string[];
  help: string;
};

/** The embedded default model: the project's own, trained by training/ and shipped in the repository. */
export const DEFAULT_MODEL_DIR = join(import.meta.dir, "..", "models", "reform-tiny");

const FLAGS: Flag[] = [
  {
    flag: "model",
    short: "m",
    arg: "DIR",
    env: ["REFORM_MODEL"],
    help: "Hugging Face model directory (config.json, *.safetensors, tokenizer.json); default: the embedded model, models/reform-tiny",
  },
  {
    flag: "data",
    arg: "DIR",
    env: ["REFORM_DATA_DIR"],
    help: `where context sessions are stored (default ./${DEFAULTS.dataDir})`,
  },
  {
    flag: "host",
    arg: "HOST",
    env: ["REFORM_HOST"],
    help: `listen address (default ${DEFAULTS.host}; 0.0.0.0 for all)`,
  },
  {
    flag: "port",
    short: "p",
    arg: "N",
    env: ["REFORM_PORT", "PORT"],
    help: `listen port (default ${DEFAULTS.port}; 0 = any free port)`,
  },
  {
    flag: "heads",
    arg: "FILE|JSON",
    env: ["REFORM_HEADS"],
    help: "head-selection file overriding <model>/reform_heads.json",
  },
  {
    flag: "backend",
    arg: "cpu|cuda",
    env: ["REFORM_BACKEND"],
    help: "native backend (default: cuda when available, else cpu)",
  },
  {
    flag: "library",
    arg: "FILE",
    env: ["REFORM_LIBRARY"],
    help: "native library to load instead of build/libreform_<backend>.so",
  },
  {
    flag: "lib-dir",
    arg: "DIR",
    env: ["REFORM_LIB_DIR"],
    help: "folder of libreform_<backend>.so (default build/); needs --backend",
  },
  {
    flag: "api-key",
    arg: "KEY",
    env: ["REFORM_API_KEY"],
    help: "require 'Authorization: Bearer KEY' (all but /health)",
  },
  {
    flag: "served-name",
    arg: "NAME",
    env: ["REFORM_SERVED_NAME"],
    help: "model name shown by /v1/models (default: model dir name)",
  },
  {
    flag: "max-body-bytes",
    arg: "N",
    env: ["REFORM_MAX_BODY_BYTES"],
    help: "largest single upload request in bytes (default 64 GiB)",
  },
  {
    flag: "max-json-bytes",
    arg: "N",
    env: ["REFORM_MAX_JSON_BYTES"],
    help: "largest JSON request body in bytes (default 32 MiB)",
  },
  {
    flag: "idle-timeout",
    arg: "S",
    env: ["REFORM_IDLE_TIMEOUT"],
    help: `seconds a quiet ordinary connection stays open (default ${DEFAULTS.idleTimeoutSec}, at most 255)`,
  },
  {
    flag: "cors-origin",
    arg: "ORIGIN",
    env: ["REFORM_CORS_ORIGIN"],
    help: 'origins allowed to call the API from a browser, comma-separated ("*" = any; default: none, same-origin only)',
  },
  {
    flag: "budget",
    arg: "N",
    help: "default recompute budget, context tokens gathered (default 5/8 of the trained window)",
  },
  { flag: "max-budget", arg: "N", help: "largest budget a request may ask for (default 7/8 of the trained window)" },
  {
    flag: "smoothing-lag",
    arg: "N",
    help: "tokens the smoothing window trails each scored token by, at the default budget (default 0: centered, the paper's; at most half the window)",
  },
  {
    flag: "edge",
    arg: "N",
    help: "first and last context tokens always gathered, at the default budget, as the paper keeps them (default 0: none)",
  },
  {
    flag: "sentence-tail",
    arg: "N",
    help: "tokens of the default budget that complete the gathered passages' sentences (default 0.15 x budget; 0: the paper's gathering)",
  },
  {
    flag: "score-floor",
    arg: "F",
    help: "how far from the selection's lowest smoothed score to its best a gathered token must reach, 0-1 (default 0.5; 0: fill the budget by score, the paper's gathering)",
  },
  {
    flag: "score-background",
    arg: "kth-pairs|kth|mean|off",
    help: "what each question token's matches must rise above to score: kth, its 32nd best match in the context (a rare word's pieces then decide, not the pieces and words that match everywhere); kth-pairs, the same and each pair of adjacent question tokens matched by two consecutive context tokens, less its own 32nd best (a key's pieces count where they stand in order); mean, its mean similarity over the context; off, nothing (the paper's scoring). Default kth-pairs; on = the default",
  },
  { flag: "max-tokens", arg: "N", help: "default answer length limit (default 1/8 of the trained window)" },
  {
    flag: "max-new-tokens",
    arg: "N",
    help: "largest max_tokens a request may ask for (default 1/2 of the trained window)",
  },
  {
    flag: "max-model-len",
    arg: "N",
    help: "longest recompute: template + gathered context + question + max_tokens (default: the trained window; larger needs --allow-beyond-window)",
  },
  {
    flag: "allow-beyond-window",
    help: "allow --max-model-len and chunk + capacity beyond the trained window (a warning instead of an error)",
  },
  {
    flag: "max-h2o-tokens",
    arg: "N",
    help: "longest context the baselines h2o / streaming accept (default 262144)",
  },
  {
    flag: "max-disk-bytes",
    arg: "N",
    env: ["REFORM_MAX_DISK_BYTES"],
    help: "disk all contexts together may use; uploads beyond it get 413 (default: no limit)",
  },
  {
    flag: "resident-emb-bytes",
    arg: "N",
    env: ["REFORM_RESIDENT_EMB_BYTES"],
    help: "device memory for context embeddings kept resident for queries (default: what the memory plan leaves; 0 = none)",
  },
  {
    flag: "no-compress-overlap",
    env: ["REFORM_COMPRESS_OVERLAP"],
    help: "compress one chunk at a time instead of writing a chunk's embeddings while the next computes (env: 0 = off)",
  },
  {
    flag: "generation-config",
    arg: "MODE",
    env: ["REFORM_GENERATION_CONFIG"],
    help: "auto: OpenAI requests that leave out temperature / top_p / top_k / min_p / repetition_penalty get the model's generation_config.json values (as vLLM); openai: OpenAI's defaults (temperature 1) (default auto)",
  },
  {
    flag: "no-inline",
    env: ["REFORM_INLINE"],
    help: "refuse OpenAI requests beyond the window (400) instead of answering them with REFORM (env: 0 = off)",
  },
  {
    flag: "inline-max-contexts",
    arg: "N",
    env: ["REFORM_INLINE_MAX_CONTEXTS"],
    help: "implicit contexts of inline prompts kept for prefix reuse (default 16; least recently used go first)",
  },
  {
    flag: "inline-max-age",
    arg: "S",
    env: ["REFORM_INLINE_MAX_AGE"],
    help: "seconds an unused implicit context is kept (default 86400)",
  },
  {
    flag: "inline-max-disk-bytes",
    arg: "N",
    env: ["REFORM_INLINE_MAX_DISK_BYTES"],
    help: "disk the implicit contexts may use together (default: only --max-disk-bytes)",
  },
  {
    flag: "chunk-size",
    arg: "N",
    help: "compression chunk in tokens (default: heads file, else 1/4 of the trained window)",
  },
  {
    flag: "capacity",
    arg: "N",
    help: "compressor KV entries per layer/head (default: heads file, else 1/2 of the trained window)",
  },
  { flag: "threads", arg: "N", help: "CPU backend threads (default: all cores)" },
  { flag: "log-requests", env: ["REFORM_LOG_REQUESTS"], help: "log every request (env: 1 = on)" },
];

const PARSE_OPTIONS = Object.fromEntries(
  FLAGS.map((f) => [
    f.flag,
    { type: f.arg ? ("string" as const) : ("boolean" as const), ...(f.short ? { short: f.short } : {}) },
  ]),
);

/** Engine defaults settable from the command line: flag, EngineDefaults key, smallest value. */
const ENGINE_DEFAULT_FLAGS = [
  ["budget", "budget", 16],
  ["max-budget", "maxBudget", 16],
  ["max-tokens", "maxTokens", 1],
  ["max-new-tokens", "maxNewTokens", 1],
  ["max-model-len", "maxModelLen", 16],
  ["max-h2o-tokens", "maxH2oTokens", 16],
  ["chunk-size", "chunkSize", 1],
  ["capacity", "capacity", 1],
  ["edge", "edge", 0],
  ["sentence-tail", "sentenceTail", 0],
  ["smoothing-lag", "lag", 0],
] as const satisfies readonly (readonly [string, keyof EngineDefaults, number])[];

function usageLine(f: Flag): string {
  const name = `${f.short ? `-${f.short}, ` : "    "}--${f.flag}${f.arg ? ` ${f.arg}` : ""}`;
  const line = `  ${name.padEnd(26)} ${f.help}`;
  if (!f.env) return line;
  const env = `env ${f.env.join(", ")}`;
  return line.length + env.length < 110 ? `${line}  ${env}` : `${line}\n${" ".repeat(29)}${env}`;
}

export const SERVE_USAGE = [
  "usage: bun run serve [--model DIR] [options]",
  "",
  ...FLAGS.map(usageLine),
  `  ${"-h, --help".padEnd(26)} show this help`,
  "",
  "A flag wins over its environment variable.",
].join("\n");

export type Env = Record<string, string | undefined>;

export type ConfigResult = { help: true } | ({ help: false } & ServerConfig);

/**
 * Flags, then environment, then defaults. Throws a UsageError naming the flag for anything invalid
 * (including a model directory, library or heads file that does not exist). Creates nothing.
 */
export function resolveConfig(argv: string[], env: Env): ConfigResult {
  const { values } = parseFlags(argv, PARSE_OPTIONS);
  if (values.help) return { help: true };
  const str = (flag: string): string | undefined => {
    const v = values[flag];
    if (typeof v === "string") return v;
    for (const e of FLAGS.find((f) => f.flag === flag)?.env ?? []) if (env[e]) return env[e];
    return undefined;
  };

  const modelDir = resolve(str("model") ?? DEFAULT_MODEL_DIR);
  if (!existsSync(modelDir) || !statSync(modelDir).isDirectory())
    throw new UsageError(`model directory not found: ${modelDir}`);
  if (!existsSync(join(modelDir, "config.json"))) {
    throw new UsageError(`${modelDir} has no config.json (expected a Hugging Face model directory)`);
  }

  const backend = oneOf("backend", str("backend"), ["auto", "cpu", "cuda"]) ?? DEFAULTS.backend;
  let library = str("library");
  const libDir = str("lib-dir");
  if (library === undefined && libDir !== undefined) {
    if (backend === "auto")
      throw new UsageError("--lib-dir needs --backend cpu or cuda (or name the file with --library)");
    library = join(libDir, `libreform_${backend}.so`);
  }
  if (library !== undefined && !existsSync(library)) throw new UsageError(`native library not found: ${library}`);

  const inlineHeads = (h: string) => h.trim().startsWith("{");
  const heads = str("heads");
  if (heads !== undefined && !inlineHeads(heads) && !existsSync(heads))
    throw new UsageError(`heads file not found: ${heads}`);

  const defaults: Partial<EngineDefaults> = {};
  for (const [flag, key, min] of ENGINE_DEFAULT_FLAGS) {
    const v = intFlag(flag, str(flag), min, 1 << 30);
    if (v !== undefined) defaults[key] = v;
  }
  const floor = numFlag("score-floor", str("score-floor"), 0, 1);
  if (floor !== undefined) defaults.scoreFloor = floor;
  const background = oneOf("score-background", str("score-background"), ["on", ...SCORE_BACKGROUNDS]);
  if (background !== undefined) defaults.scoreBackground = background === "on" ? DEFAULT_BACKGROUND : background;
  const maxDisk = intFlag("max-disk-bytes", str("max-disk-bytes"), 1);
  if (maxDisk !== undefined) defaults.maxDiskBytes = maxDisk;
  const resident = intFlag("resident-emb-bytes", str("resident-emb-bytes"), 0);
  if (resident !== undefined) defaults.residentEmbBytes = resident;
  if (values["no-compress-overlap"] === true || env.REFORM_COMPRESS_OVERLAP === "0") defaults.compressOverlap = false;
  const inlineContexts = intFlag("inline-max-contexts", str("inline-max-contexts"), 1, 1 << 20);
  if (inlineContexts !== undefined) defaults.inlineMaxContexts = inlineContexts;
  const inlineAge = intFlag("inline-max-age", str("inline-max-age"), 1);
  if (inlineAge !== undefined) defaults.inlineMaxAgeSec = inlineAge;
  const inlineDisk = intFlag("inline-max-disk-bytes", str("inline-max-disk-bytes"), 1);
  if (inlineDisk !== undefined) defaults.inlineMaxDiskBytes = inlineDisk;
  if (defaults.budget !== undefined && defaults.maxBudget !== undefined && defaults.budget > defaults.maxBudget) {
    throw new UsageError("--budget must not exceed --max-budget");
  }

  return {
    help: false,
    modelDir,
    dataDir: resolve(str("data") ?? DEFAULTS.dataDir),
    host: str("host") ?? DEFAULTS.host,
    port: intFlag("port", str("port"), 0, 65535) ?? DEFAULTS.port,
    apiKey: str("api-key") || undefined,
    maxBodyBytes: intFlag("max-body-bytes", str("max-body-bytes"), 1) ?? DEFAULTS.maxBodyBytes,
    maxJsonBytes: intFlag("max-json-bytes", str("max-json-bytes"), 1) ?? DEFAULTS.maxJsonBytes,
    idleTimeoutSec: intFlag("idle-timeout", str("idle-timeout"), 1, 255) ?? DEFAULTS.idleTimeoutSec,
    corsOrigin: str("cors-origin") ?? DEFAULTS.corsOrigin,
    servedName: str("served-name"),
    heads: heads !== undefined && !inlineHeads(heads) ? resolve(heads) : heads,
    logRequests: values["log-requests"] === true || env.REFORM_LOG_REQUESTS === "1",
    backend,
    library: library !== undefined ? resolve(library) : undefined,
    threads: intFlag("threads", str("threads"), 1, 1 << 30),
    defaults,
    allowBeyondWindow: values["allow-beyond-window"] === true,
    inline: !(values["no-inline"] === true || env.REFORM_INLINE === "0"),
    generationConfig: oneOf("generation-config", str("generation-config"), GENERATION_CONFIG_MODES) ?? "auto",
  };
}
