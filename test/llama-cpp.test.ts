/**
 * The forward pass against an independent implementation: llama.cpp (npm node-llama-cpp, its prebuilt CPU binary,
 * a dev dependency). For each supported family a small random model is written as a Hugging Face directory with the
 * family's real config features, loaded by the engine's own start-up path (loadEngine: config.json, safetensors),
 * and converted to GGUF the way llama.cpp's convert_hf_to_gguf.py does (test/helpers/hf-to-gguf.ts). The last
 * token's logits after a prompt must agree within the dtype's tolerance and greedy continuations must be equal.
 * Negative controls show the comparison would catch a loader that ignored rope_theta, llama3 rope scaling or Qwen3's
 * q/k norm.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { getLlama, type Llama, LlamaLogLevel, type Token } from "node-llama-cpp";
import { RF_ROPE_DEFAULT, type NativeModel } from "../ffi/native.ts";
import { type LoadedEngine, loadEngine } from "../src/engine/load.ts";
import { loadSafetensors } from "../src/model/safetensors.ts";
import { makeTinyModel, type TinyModelOptions, tinyModelTensors } from "./fixtures/tiny-model.ts";
import { hfToGguf } from "./helpers/hf-to-gguf.ts";
import { offlineLlama } from "../bench/common.ts";

setDefaultTimeout(120_000);

const root = mkdtempSync(join(tmpdir(), "reform-llamacpp-"));
let llama: Llama;
beforeAll(async () => {
  llama = await offlineLlama({ getLlama, LlamaLogLevel });
});
afterAll(async () => {
  await llama?.dispose();
  rmSync(root, { recursive: true, force: true });
});

const PROMPT = 48;
const GREEDY = 8;

/** Max |difference| allowed on the last token's logits, relative to their largest magnitude, per checkpoint dtype.
 * llama.cpp rounds the activations to the weights' type before each matmul (F16: 11 significant bits, BF16: 8);
 * our CPU engine computes in f32. Every family also runs as an f32 checkpoint, where both engines compute in f32
 * and a misread config shows as a difference many orders of magnitude above the tolerance. Measured (this file's
 * models, 2-core x86-64): f32 <= 1.2e-6, f16 <= 1.2e-3, bf16 <= 8.6e-3. */
const TOLERANCE: Record<string, number> = { f32: 1e-4, f16: 4e-3, bf16: 2.5e-2 };

interface Family {
  name: string;
  opts: TinyModelOptions;
}

const base: TinyModelOptions = { layers: 2, hidden: 64, heads: 4, kvHeads: 2, intermediate: 128, maxPositions: 256 };
const FAMILIES: Family[] = [
  {
    name: "Llama-3.1 (rope_theta 500000, llama3 rope scaling, GQA)",
    opts: {
      ...base,
      seed: 31,
      dtype: "bf16",
      ropeTheta: 500000,
      // original_max_position_embeddings small enough that the prompt spans all three frequency bands
      ropeScaling: {
        rope_type: "llama3",
        factor: 8,
        low_freq_factor: 1,
        high_freq_factor: 4,
        original_max_position_embeddings: 64,
      },
    },
  },
  {
    name: "Qwen2.5 (QKV bias, tied embeddings, rope_theta 1e6)",
    opts: { ...base, seed: 25, arch: "qwen2", dtype: "bf16", tieEmbeddings: true, ropeTheta: 1e6 },
  },
  {
    name: "Mistral (head_dim 32 != hidden/heads, rope_theta 1e6, sliding_window null)",
    opts: {
      ...base,
      seed: 7,
      arch: "mistral",
      dtype: "f16",
      headDim: 32,
      kvHeads: 1,
      ropeTheta: 1e6,
      extraConfig: { sliding_window: null },
    },
  },
  { name: "Llama 2 (MHA)", opts: { ...base, seed: 2, dtype: "f16", kvHeads: 4 } },
  // Qwen3 tied as its small checkpoints are (0.6B-4B), where greedy decoding of these random weights repeats the last
  // token, and untied as the larger ones, where the greedy continuation depends on the attention (and so on q/k norm)
  {
    name: "Qwen3 (per-head q/k RMSNorm, head_dim 32 != hidden/heads, tied embeddings, rope_theta 1e6)",
    opts: { ...base, seed: 3, arch: "qwen3", dtype: "bf16", headDim: 32, tieEmbeddings: true, ropeTheta: 1e6 },
  },
  {
    name: "Qwen3 (per-head q/k RMSNorm, head_dim 32, untied, rope_theta 1e6)",
    opts: { ...base, seed: 4, arch: "qwen3", dtype: "bf16", headDim: 32, ropeTheta: 1e6 },
  },
];

function promptTokens(seed: number): number[] {
  let x = seed * 2654435761 || 1;
  return Array.from({ length: PROMPT }, () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return 3 + ((x >>> 0) % 300);
  });
}

function oursRun(model: NativeModel, prompt: number[]): { logits: Float32Array; greedy: number[] } {
  const seq = model.createSeq(PROMPT + GREEDY + 1);
  try {
    const logits = seq.forward(Int32Array.from(prompt), true)!.slice();
    const greedy: number[] = [];
    for (let i = 0; i < GREEDY; i++) {
      const t = seq.sample({ temperature: 0, topP: 1, topK: 0 });
      greedy.push(t);
      seq.forward(Int32Array.of(t));
    }
    return { logits, greedy };
  } finally {
    seq.destroy();
  }
}

async function llamaRun(gguf: string, prompt: number[], vocab: number) {
  const model = await llama.loadModel({ modelPath: gguf, gpuLayers: 0 });
  // f32 KV cache and no flash attention: llama.cpp's attention in f32 like ours, so what is left is the rounding of
  // activations to the weights' type before each of its matmuls
  const ctx = await model.createContext({
    contextSize: 256,
    batchSize: 128,
    threads: 1,
    sequences: 1,
    flashAttention: false,
    experimentalKvCacheKeyType: "F32",
    experimentalKvCacheValueType: "F32",
  });
  try {
    const seq = ctx.getSequence();
    const items = prompt.map((t, i) =>
      i === prompt.length - 1 ? ([t, { generateNext: { logits: true } }] as const) : t,
    );
    const res = await seq.controlledEvaluate(items as any);
    const map = res[prompt.length - 1]?.next?.logits as Map<number, number> | undefined;
    if (!map || map.size !== vocab) throw new Error(`llama.cpp returned ${map?.size ?? 0} logits, not ${vocab}`);
    const logits = Float32Array.from({ length: vocab }, (_, v) => map.get(v)!);
    await seq.clearHistory();
    const greedy: number[] = [];
    for await (const t of seq.evaluate(prompt as Token[], { temperature: 0 })) {
      greedy.push(t);
      if (greedy.length >= GREEDY) break;
    }
    return { logits, greedy };
  } finally {
    await ctx.dispose();
    await model.dispose();
  }
}

function maxDiff(a: Float32Array, b: Float32Array): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}
const maxAbs = (a: Float32Array) => a.reduce((m, x) => Math.max(m, Math.abs(x)), 0);

describe("forward pass = llama.cpp (node-llama-cpp) on the same checkpoint", () => {
  for (const fam of FAMILIES)
    for (const dtype of [fam.opts.dtype!, "f32" as const]) {
      const f = { name: `${fam.name}, ${dtype}`, opts: { ...fam.opts, dtype } };
      test(f.name, async () => {
        const dir = await makeTinyModel(join(root, f.name.replace(/\W+/g, "_")), f.opts);
        const config = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"));
        const gguf = join(dir, "model.gguf");
        hfToGguf(config, tinyModelTensors(f.opts), gguf);
        const prompt = promptTokens(f.opts.seed ?? 1);
        const eng: LoadedEngine = loadEngine({ modelDir: dir, dataDir: dir, backend: "cpu", threads: 1 });
        let ours: ReturnType<typeof oursRun>;
        try {
          ours = oursRun(eng.model, prompt);
          const ref = await llamaRun(gguf, prompt, config.vocab_size);
          const d = maxDiff(ours.logits, ref.logits);
          const tol = TOLERANCE[dtype]! * maxAbs(ref.logits);
          console.log(
            `  ${f.name}: max |ours - llama.cpp| = ${d.toExponential(2)} = ${(d / maxAbs(ref.logits)).toExponential(2)} of max |logit| ${maxAbs(ref.logits).toFixed(2)} (tolerance ${TOLERANCE[dtype]}); greedy ours ${ours.greedy} / llama.cpp ${ref.greedy}`,
          );
          expect(d).toBeLessThan(tol);
          expect(ours.greedy).toEqual(ref.greedy);

          // negative controls: the comparison sees a loader that ignored rope_theta / the llama3 scaling / q/k norm
          const controls: [string, Partial<typeof eng.cfg.config>][] = [];
          if (config.rope_theta !== 10000) controls.push(["rope_theta ignored", { ropeTheta: 10000 }]);
          if (config.rope_scaling)
            controls.push(["rope_scaling ignored", { ropeType: RF_ROPE_DEFAULT, ropeFactor: 1 }]);
          if (eng.cfg.config.qkNorm) controls.push(["q/k norm ignored", { qkNorm: false }]);
          for (const [what, change] of dtype === "f32" ? controls : []) {
            const wrong = eng.native.createModel({ ...eng.cfg.config, ...change });
            try {
              // a model without q/k norm refuses those tensors: leave them out
              const skip = change.qkNorm === false ? /\.[qk]_norm\.weight$/ : /^$/;
              loadSafetensors(dir, {
                setTensor: (name, data, dt, shape) => {
                  if (!skip.test(name)) wrong.setTensor(name, data, dt, shape);
                },
              });
              wrong.finalize();
              const w = oursRun(wrong, prompt);
              const dw = maxDiff(w.logits, ref.logits);
              console.log(`    control (${what}): max diff ${dw.toExponential(2)}`);
              expect(dw).toBeGreaterThan(5 * tol);
            } finally {
              wrong.destroy();
            }
          }
        } finally {
          eng.model.destroy();
        }
      });
    }
});
