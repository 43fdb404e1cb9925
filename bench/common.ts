/**
 * What the benchmarks share (and the tests that measure the same things): the command line (options plus -h/--help),
 * the report's text lines (silent under --json), the median, llama.cpp offline (llama-peer, test/llama-cpp.test.ts),
 * and the model shapes with random weights: Llama architectures built through rf_model_set_tensor or
 * rf_model_init_random (engine-bench, llama-peer, test/cuda-build.test.ts), and the small Hugging Face directory of
 * the test fixture that million and ttft-under-upload serve.
 */
import { parseArgs, type ParseArgsOptionsConfig } from "node:util";
import type { Llama, LlamaOptions } from "node-llama-cpp";
import { RF_BF16, RF_ROPE_DEFAULT, RF_ROPE_LLAMA3 } from "../ffi/native.ts";
import type { ModelConfig } from "../src/model/types.ts";
import type { TinyModelOptions } from "../test/fixtures/tiny-model.ts";

type BenchValues<O extends ParseArgsOptionsConfig> = ReturnType<
  typeof parseArgs<{ args: string[]; options: O; strict: true }>
>["values"];

/** The command line: `options` and -h/--help, which prints `usage` and exits. An unknown option throws. */
export function benchArgs<const O extends ParseArgsOptionsConfig>(usage: string, options: O): BenchValues<O> {
  let values: Record<string, unknown>;
  try {
    ({ values } = parseArgs({
      args: process.argv.slice(2),
      options: { ...options, help: { type: "boolean", short: "h" } },
      strict: true,
    }));
  } catch (e) {
    // an unknown flag or a missing value: say which, then how to call it (exit 2, as the CLIs do)
    console.error(`${(e as Error).message}\n${usage}`);
    process.exit(2);
  }
  if ((values as { help?: boolean }).help) {
    console.log(usage);
    process.exit(0);
  }
  return values as BenchValues<O>;
}

/** llama.cpp through node-llama-cpp (`mod`: the package, imported or installed on demand), offline: its prebuilt CPU
 * binary or an error, never a download or a build; its log quiet but for errors. */
export function offlineLlama(
  mod: Pick<typeof import("node-llama-cpp"), "getLlama" | "LlamaLogLevel">,
  extra: LlamaOptions = {},
): Promise<Llama> {
  return mod.getLlama({
    gpu: false,
    build: "never",
    usePrebuiltBinaries: true,
    skipDownload: true,
    progressLogs: false,
    logLevel: mod.LlamaLogLevel.error,
    ...extra,
  });
}

/** Prints a line of the text report, unless the report is one JSON object (--json). */
export function textLog(json: boolean): (s: string) => void {
  return (s) => {
    if (!json) console.log(s);
  };
}

/** The median (the mean of the middle two of an even count). */
/** A context length as the benches take it: "2048", "16k" (x 1024) or "1m" (x 1048576). */
export function parseLength(s: string): number {
  const m = /^(\d+(?:\.\d+)?)([km]?)$/i.exec(s.trim());
  if (!m) throw new Error(`bad length ${s}`);
  const unit = m[2]!.toLowerCase();
  return Math.round(Number(m[1]) * (unit === "k" ? 1024 : unit === "m" ? 1048576 : 1));
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

// ---------------------------------------------------------------- model shapes with random weights

export type ShapeName = "tiny" | "small" | "llama3-8b";

export interface ShapeDefaults {
  config: ModelConfig;
  tokens: number[];
  chunk: number;
  capacity: number;
  budget: number;
  decode: number;
}

/** A plain Llama architecture's fields beyond its dimensions (rope scaling off, bf16 storage on the device). */
export const LLAMA_BASE = {
  qkvBias: false,
  qkNorm: false,
  tieEmbeddings: false,
  rmsEps: 1e-5,
  ropeFactor: 1,
  ropeLowFreqFactor: 1,
  ropeHighFreqFactor: 4,
  ropeOriginalMaxPos: 8192,
  weightDtype: RF_BF16,
} as const;

/** engine-bench's --shape: the dimensions and the per-shape defaults of its figures (llama-peer uses `small`). */
export const SHAPES: Record<ShapeName, ShapeDefaults> = {
  // a few-layer toy model: runs in seconds on a laptop CPU
  tiny: {
    config: {
      ...LLAMA_BASE,
      vocabSize: 4096,
      hiddenSize: 256,
      intermediateSize: 768,
      numLayers: 4,
      numHeads: 4,
      numKvHeads: 2,
      headDim: 64,
      ropeType: RF_ROPE_DEFAULT,
      ropeTheta: 10000,
    },
    tokens: [8192, 32768],
    chunk: 512,
    capacity: 1024,
    budget: 1024,
    decode: 32,
  },
  // ~150M parameters (GPT-2-small-like Llama)
  small: {
    config: {
      ...LLAMA_BASE,
      vocabSize: 32000,
      hiddenSize: 768,
      intermediateSize: 2048,
      numLayers: 12,
      numHeads: 12,
      numKvHeads: 4,
      headDim: 64,
      ropeType: RF_ROPE_DEFAULT,
      ropeTheta: 10000,
    },
    tokens: [2048, 8192],
    chunk: 512,
    capacity: 1024,
    budget: 512,
    decode: 16,
  },
  // Llama-3 / 3.1 8B
  "llama3-8b": {
    config: {
      ...LLAMA_BASE,
      vocabSize: 128256,
      hiddenSize: 4096,
      intermediateSize: 14336,
      numLayers: 32,
      numHeads: 32,
      numKvHeads: 8,
      headDim: 128,
      ropeType: RF_ROPE_LLAMA3,
      ropeTheta: 500000,
      ropeFactor: 8,
      ropeLowFreqFactor: 1,
      ropeHighFreqFactor: 4,
      ropeOriginalMaxPos: 8192,
    },
    tokens: [131072, 1048576],
    chunk: 1024,
    capacity: 4096,
    budget: 8192,
    decode: 32,
  },
};

/** The small random model of million and ttft-under-upload, a Hugging Face directory made by the test fixture (its
 * tokenizer's vocab): 4 layers, hidden 256, 4 heads / 2 KV heads, FFN 768, REFORM heads q/k/v head 0 at layer 1. */
export function benchModelOptions(o: { maxPositions: number; chunk: number; capacity: number }): TinyModelOptions {
  return {
    layers: 4,
    hidden: 256,
    heads: 4,
    kvHeads: 2,
    intermediate: 768,
    maxPositions: o.maxPositions,
    std: 0.02,
    seed: 5,
    reformHeads: {
      heads: (["q", "k", "v"] as const).map((kind) => ({ layer: 1, kind, head: 0 })),
      chunk_size: o.chunk,
      capacity: o.capacity,
    },
  };
}
