#!/usr/bin/env bun
/**
 * Peer benchmark: our CPU engine against llama.cpp on the same random F16 weights, on this machine, alternating.
 *
 *   bun bench/llama-peer.ts [--quick] [--threads 1,2] [--pp 512,2048] [--tg N] [--reps N] [--flash on|off] [--json]
 *
 * llama.cpp comes from the npm package node-llama-cpp (its prebuilt CPU binary), installed by this script into a
 * folder outside the project (REFORM_LLAMA_DIR, default $TMPDIR/reform-llama-peer) with the package's download /
 * build step switched off: it runs offline, and a missing prebuilt binary is an error, never a compile.
 * The weights: the bench's `small` shape (vocab 32000, hidden 768, FFN 2048, 12 layers, 12 heads / 4 KV heads,
 * head_dim 64), N(0, 0.02²)-like F16 values and random RMSNorm weights, given to our engine through
 * rf_model_set_tensor (F16) and written to a GGUF v3 (llama architecture, q/k rows permuted) for llama.cpp.
 *
 * 1. correctness: the last-token logits of a 32-token prompt from both engines (max |difference|) and 16 greedy
 *    tokens (how many agree);
 * 2. speed, per thread count: prompt processing of each --pp length from an empty cache, and decode (tg tokens after
 *    a 16-token prompt, greedy), our engine and llama.cpp alternating (the order flips every rep), medians;
 *    ratios ours / llama.cpp (> 1: we are faster). llama.cpp runs with flash attention (--flash) and its default
 *    f16 KV cache, batch = ubatch = 512; our engine prefills the whole prompt in one rf_seq_forward.
 * Figures only. Both engines live in this process; our OpenMP pool waits passively (OMP_WAIT_POLICY=passive unless
 * set) so that its idle threads do not steal llama.cpp's cores.
 */
process.env.OMP_WAIT_POLICY ??= "passive";

import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadNative, RF_F16, RF_F32, type NativeModel } from "../ffi/native.ts";
import type { ModelConfig } from "../src/model/types.ts";
import { f32ToF16 } from "../test/fixtures/tiny-model.ts";
import { benchArgs, median, offlineLlama, SHAPES, textLog } from "./common.ts";
import { GGML_F16, GGML_F32, minimalVocab, permuteRope, writeGguf, type GgufTensor } from "./gguf.ts";

const NODE_LLAMA_CPP = "node-llama-cpp@3.22.1";

const a = benchArgs(
  "usage: bun bench/llama-peer.ts [--quick] [--threads 1,2] [--pp 512,2048] [--tg N] [--reps N] [--flash on|off] [--json]",
  {
    quick: { type: "boolean" },
    threads: { type: "string" },
    pp: { type: "string" },
    tg: { type: "string" },
    reps: { type: "string" },
    flash: { type: "string" },
    json: { type: "boolean" },
  },
);
const list = (s: string | undefined, d: number[]) => (s ? s.split(",").map((x) => Number(x.trim())) : d);
const quick = !!a.quick;
const THREADS = list(a.threads, [1, 2]);
const PP = list(a.pp, [512, 2048]);
const TG = Number(a.tg ?? (quick ? 16 : 64));
const REPS = Number(a.reps ?? (quick ? 3 : 5));
const FLASH = (a.flash ?? "on") !== "off";
const json = !!a.json;
const log = textLog(json);
const now = () => performance.now();

/** engine-bench's `small` shape, stored as F16 (what the GGUF holds). */
const cfg: ModelConfig = { ...SHAPES.small.config, weightDtype: RF_F16 };

// ---------------------------------------------------------------- llama.cpp (node-llama-cpp), offline

// node-llama-cpp (the module and its objects) untyped: it may be an install of our own outside the project
type LlamaCpp = any;

async function loadLlamaCpp(): Promise<LlamaCpp> {
  // the project's dev dependency (bun install), else an install of our own outside the project
  try {
    return await import("node-llama-cpp");
  } catch {}
  const dir = process.env.REFORM_LLAMA_DIR ?? join(tmpdir(), "reform-llama-peer");
  const entry = join(dir, "node_modules", "node-llama-cpp", "dist", "index.js");
  if (!existsSync(entry)) {
    mkdirSync(dir, { recursive: true });
    log(`installing ${NODE_LLAMA_CPP} into ${dir} (npm; prebuilt binaries, no build step) ...`);
    // --ignore-scripts: its postinstall would look for a binary to download or compile; the prebuilt
    // @node-llama-cpp/linux-x64 package arrives as an ordinary optional dependency.
    const r = spawnSync(
      "npm",
      ["install", "--prefix", dir, "--no-audit", "--no-fund", "--ignore-scripts", NODE_LLAMA_CPP],
      {
        stdio: json ? "ignore" : "inherit",
        env: { ...process.env, NODE_LLAMA_CPP_SKIP_DOWNLOAD: "true" },
      },
    );
    if (r.status !== 0 || !existsSync(entry)) throw new Error(`npm install of ${NODE_LLAMA_CPP} into ${dir} failed`);
  }
  return await import(entry);
}

// ---------------------------------------------------------------- weights

/** Deterministic F16 values: a 4096-entry table of N(0, std²) draws indexed by an xorshift stream. */
function f16Weights(n: number, seed: number, std: number): Uint16Array {
  let x = (seed * 2654435761) >>> 0 || 1;
  const next = () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
  const table = new Uint16Array(4096);
  for (let i = 0; i < 4096; i++) {
    const u1 = (next() + 1) / 4294967297;
    const u2 = next() / 4294967296;
    table[i] = f32ToF16(std * Math.sqrt(-2 * Math.log(u1)) * Math.cos(2 * Math.PI * u2));
  }
  const out = new Uint16Array(n);
  for (let i = 0; i < n; i++) out[i] = table[next() & 4095]!;
  return out;
}

/** RMSNorm weights in [0.8, 1.2) (f32 on both sides, as llama.cpp keeps norms). */
function normWeights(n: number, seed: number): Float32Array {
  let x = (seed * 2246822519) >>> 0 || 1;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = 0.8 + 0.4 * ((x >>> 0) / 4294967296);
  }
  return out;
}

interface Weight {
  hf: string;
  gguf: string;
  rows: number; // HF [rows, cols]; 1-D tensors have rows = 1
  cols: number;
  data: Uint16Array | Float32Array;
  rope?: number; // heads of a q/k projection (rows permuted for GGUF)
}

function makeWeights(c: ModelConfig): Weight[] {
  const H = c.hiddenSize,
    I = c.intermediateSize,
    hd = c.headDim,
    qd = c.numHeads * hd,
    kvd = c.numKvHeads * hd;
  let seed = 100;
  const mat = (hf: string, gguf: string, rows: number, cols: number, rope?: number): Weight => ({
    hf,
    gguf,
    rows,
    cols,
    rope,
    data: f16Weights(rows * cols, seed++, 0.02),
  });
  const norm = (hf: string, gguf: string): Weight => ({ hf, gguf, rows: 1, cols: H, data: normWeights(H, seed++) });
  const w: Weight[] = [mat("model.embed_tokens.weight", "token_embd.weight", c.vocabSize, H)];
  for (let l = 0; l < c.numLayers; l++) {
    const p = `model.layers.${l}.`,
      g = `blk.${l}.`;
    w.push(
      norm(p + "input_layernorm.weight", g + "attn_norm.weight"),
      mat(p + "self_attn.q_proj.weight", g + "attn_q.weight", qd, H, c.numHeads),
      mat(p + "self_attn.k_proj.weight", g + "attn_k.weight", kvd, H, c.numKvHeads),
      mat(p + "self_attn.v_proj.weight", g + "attn_v.weight", kvd, H),
      mat(p + "self_attn.o_proj.weight", g + "attn_output.weight", H, qd),
      norm(p + "post_attention_layernorm.weight", g + "ffn_norm.weight"),
      mat(p + "mlp.gate_proj.weight", g + "ffn_gate.weight", I, H),
      mat(p + "mlp.up_proj.weight", g + "ffn_up.weight", I, H),
      mat(p + "mlp.down_proj.weight", g + "ffn_down.weight", H, I),
    );
  }
  w.push(norm("model.norm.weight", "output_norm.weight"), mat("lm_head.weight", "output.weight", c.vocabSize, H));
  return w;
}

function ggufOf(c: ModelConfig, weights: Weight[], path: string): number {
  const tensors: GgufTensor[] = weights.map((w) => ({
    name: w.gguf,
    ne: w.rows === 1 ? [w.cols] : [w.cols, w.rows],
    type: w.data instanceof Float32Array ? GGML_F32 : GGML_F16,
    data: w.rope ? permuteRope(w.data, w.rope, c.headDim, w.cols) : w.data,
  }));
  return writeGguf(
    path,
    [
      ["general.architecture", { str: "llama" }],
      ["general.name", { str: "reform-peer-small-random" }],
      ["general.file_type", { u32: 1 }], // mostly F16
      ["llama.context_length", { u32: 4096 }],
      ["llama.embedding_length", { u32: c.hiddenSize }],
      ["llama.block_count", { u32: c.numLayers }],
      ["llama.feed_forward_length", { u32: c.intermediateSize }],
      ["llama.attention.head_count", { u32: c.numHeads }],
      ["llama.attention.head_count_kv", { u32: c.numKvHeads }],
      ["llama.rope.dimension_count", { u32: c.headDim }],
      ["llama.rope.freq_base", { f32: c.ropeTheta }],
      ["llama.attention.layer_norm_rms_epsilon", { f32: c.rmsEps }],
      ["llama.vocab_size", { u32: c.vocabSize }],
      ...minimalVocab(c.vocabSize),
    ],
    tensors,
  );
}

function randomTokens(n: number, vocab: number, seed: number): number[] {
  let x = seed >>> 0 || 1;
  return Array.from({ length: n }, () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return 3 + ((x >>> 0) % (vocab - 3)); // no <unk>/<s>/</s>
  });
}

// ---------------------------------------------------------------- main

const work = join(tmpdir(), `reform-llama-peer-${process.pid}`);
mkdirSync(work, { recursive: true });
try {
  const llama: LlamaCpp = await offlineLlama(await loadLlamaCpp(), {
    maxThreads: 0, // a context's `threads` is then exactly what it uses
  });

  const t0 = now();
  const weights = makeWeights(cfg);
  const ggufPath = join(work, "small-f16.gguf");
  const ggufBytes = ggufOf(cfg, weights, ggufPath);
  const native = loadNative("cpu");
  const ours: NativeModel = native.createModel(cfg);
  for (const w of weights)
    ours.setTensor(
      w.hf,
      w.data,
      w.data instanceof Float32Array ? RF_F32 : RF_F16,
      w.rows === 1 ? [w.cols] : [w.rows, w.cols],
    );
  ours.finalize();
  const lmodel = await llama.loadModel({ modelPath: ggufPath, gpuLayers: 0, useMmap: true });
  log(`llama.cpp peer benchmark — ${NODE_LLAMA_CPP} (prebuilt CPU binary, offline) vs our engine (${native.path})`);
  log(`  device: ${native.deviceInfo()}`);
  log(
    `  model: small, random F16 weights (vocab ${cfg.vocabSize}, hidden ${cfg.hiddenSize}, FFN ${cfg.intermediateSize}, ` +
      `${cfg.numLayers} layers, ${cfg.numHeads} heads / ${cfg.numKvHeads} KV); GGUF ${(ggufBytes / 2 ** 20).toFixed(0)} MiB ` +
      `(${(statSync(ggufPath).size / 2 ** 20).toFixed(0)} MiB on disk), prepared in ${((now() - t0) / 1e3).toFixed(1)} s`,
  );
  log(
    `  llama.cpp: flash attention ${FLASH ? "on" : "off"}, f16 KV cache, batch 512; reps ${REPS}, decode ${TG} tokens`,
  );

  const maxCtx = Math.max(...PP, 32) + TG + 32;
  const result: Record<string, unknown> = {
    model: "small",
    nodeLlamaCpp: NODE_LLAMA_CPP,
    device: native.deviceInfo(),
    flashAttention: FLASH,
    reps: REPS,
    tg: TG,
    runs: [] as unknown[],
  };

  for (const threads of THREADS) {
    native.setThreads(threads);
    const lctx = await lmodel.createContext({
      contextSize: maxCtx,
      batchSize: 512,
      threads: { ideal: threads, min: threads },
      flashAttention: FLASH,
      sequences: 1,
    });
    const lseq = lctx.getSequence();
    const seq = ours.createSeq(maxCtx);
    log(`\n  threads ${threads}`);

    // ---- correctness (first thread count only)
    if (threads === THREADS[0]) {
      const prompt = randomTokens(32, cfg.vocabSize, 99);
      seq.reset();
      const ourLogits = seq.forward(Int32Array.from(prompt), true)!;
      await lseq.clearHistory();
      const items = prompt.map((t, i) =>
        i === prompt.length - 1 ? ([t, { generateNext: { logits: true } }] as const) : t,
      );
      const res = await lseq.controlledEvaluate(items as any);
      const ll = res[prompt.length - 1]?.next?.logits as Map<number, number> | undefined;
      if (!ll || ll.size !== cfg.vocabSize)
        throw new Error(`llama.cpp returned ${ll?.size ?? 0} logits, expected ${cfg.vocabSize}`);
      let maxDiff = 0,
        maxAbs = 0,
        argOurs = 0,
        argLlama = 0;
      for (let v = 0; v < cfg.vocabSize; v++) {
        const d = Math.abs(ourLogits[v]! - ll.get(v)!);
        maxDiff = Math.max(maxDiff, d);
        maxAbs = Math.max(maxAbs, Math.abs(ourLogits[v]!));
        if (ourLogits[v]! > ourLogits[argOurs]!) argOurs = v;
        if (ll.get(v)! > ll.get(argLlama)!) argLlama = v;
      }
      // greedy continuation, each engine from its own state
      const greedy = 16;
      const oursTok: number[] = [];
      let tok = seq.sample({ temperature: 0, topP: 1, topK: 0 });
      for (let i = 0; i < greedy; i++) {
        oursTok.push(tok);
        seq.forward(Int32Array.of(tok));
        tok = seq.sample({ temperature: 0, topP: 1, topK: 0 });
      }
      await lseq.clearHistory();
      const llamaTok: number[] = [];
      for await (const t of lseq.evaluate(prompt, { temperature: 0 })) {
        llamaTok.push(t);
        if (llamaTok.length >= greedy) break;
      }
      const agree = oursTok.filter((t, i) => t === llamaTok[i]).length;
      let prefix = 0;
      while (prefix < greedy && oursTok[prefix] === llamaTok[prefix]) prefix++;
      result.correctness = {
        maxLogitDiff: maxDiff,
        maxAbsLogit: maxAbs,
        argmaxOurs: argOurs,
        argmaxLlama: argLlama,
        greedy,
        greedyAgree: agree,
        greedyCommonPrefix: prefix,
        ours: oursTok,
        llama: llamaTok,
      };
      log(
        `    logits (32-token prompt, last token): max |ours - llama.cpp| = ${maxDiff.toExponential(2)} (max |logit| ${maxAbs.toFixed(3)}), argmax ${argOurs} / ${argLlama}`,
      );
      log(`    greedy ${greedy} tokens: ${agree}/${greedy} equal, common prefix ${prefix}`);
    }

    // ---- speed
    const row: Record<string, unknown> = { threads };
    const tokens = randomTokens(Math.max(...PP), cfg.vocabSize, 7);
    const warm = tokens.slice(0, 64);
    seq.reset();
    seq.forward(Int32Array.from(warm));
    await lseq.clearHistory();
    await lseq.evaluateWithoutGeneratingNewTokens(warm);

    const runOurs = {
      pp: (n: number) => {
        seq.reset();
        const t = now();
        seq.forward(Int32Array.from(tokens.slice(0, n)));
        return (now() - t) / 1e3;
      },
      tg: () => {
        seq.reset();
        seq.forward(Int32Array.from(tokens.slice(0, 16)));
        const one = new Int32Array(1);
        const t = now();
        for (let i = 0; i < TG; i++) {
          one[0] = seq.sample({ temperature: 0, topP: 1, topK: 0 });
          seq.forward(one);
        }
        return (now() - t) / 1e3;
      },
    };
    const runLlama = {
      pp: async (n: number) => {
        await lseq.clearHistory();
        const t = now();
        await lseq.evaluateWithoutGeneratingNewTokens(tokens.slice(0, n));
        return (now() - t) / 1e3;
      },
      tg: async () => {
        await lseq.clearHistory();
        await lseq.evaluateWithoutGeneratingNewTokens(tokens.slice(0, 15));
        // evaluating the 16th prompt token yields the first new token; each further one is a decode step
        let n = 0;
        let t = 0;
        for await (const _ of lseq.evaluate(tokens.slice(15, 16), { temperature: 0 })) {
          if (n === 0) t = now();
          if (++n > TG) break;
        }
        return (now() - t) / 1e3;
      },
    };

    for (const n of PP) {
      const o: number[] = [],
        l: number[] = [];
      for (let r = 0; r < REPS; r++) {
        // alternate who goes first, so drift in the machine's load hits both sides alike
        if (r % 2 === 0) {
          o.push(runOurs.pp(n));
          l.push(await runLlama.pp(n));
        } else {
          l.push(await runLlama.pp(n));
          o.push(runOurs.pp(n));
        }
      }
      const ours = n / median(o),
        lc = n / median(l);
      row[`pp${n}`] = { oursTokS: ours, llamaTokS: lc, ratio: ours / lc, oursS: o, llamaS: l };
      log(
        `    pp${String(n).padEnd(5)} ours ${ours.toFixed(1).padStart(8)} tok/s   llama.cpp ${lc.toFixed(1).padStart(8)} tok/s   ours/llama ${(ours / lc).toFixed(2)}x`,
      );
    }
    {
      const o: number[] = [],
        l: number[] = [];
      for (let r = 0; r < REPS; r++) {
        if (r % 2 === 0) {
          o.push(runOurs.tg());
          l.push(await runLlama.tg());
        } else {
          l.push(await runLlama.tg());
          o.push(runOurs.tg());
        }
      }
      const ours = TG / median(o),
        lc = TG / median(l);
      row[`tg${TG}`] = { oursTokS: ours, llamaTokS: lc, ratio: ours / lc, oursS: o, llamaS: l };
      log(
        `    tg${String(TG).padEnd(5)} ours ${ours.toFixed(1).padStart(8)} tok/s   llama.cpp ${lc.toFixed(1).padStart(8)} tok/s   ours/llama ${(ours / lc).toFixed(2)}x`,
      );
    }
    (result.runs as unknown[]).push(row);
    seq.destroy();
    await lctx.dispose();
  }
  await lmodel.dispose();
  ours.destroy();
  native.close();
  await llama.dispose();
  const ratios: Record<string, number> = {};
  for (const r of result.runs as Record<string, any>[])
    for (const [k, v] of Object.entries(r))
      if (k !== "threads") ratios[`${k}@${r.threads}t`] = Number(v.ratio.toFixed(3));
  result.ratios = ratios;
  console.log(
    json
      ? JSON.stringify(result)
      : `\n--json ${JSON.stringify({ ratios, correctness: { maxLogitDiff: (result.correctness as any)?.maxLogitDiff, greedyAgree: (result.correctness as any)?.greedyAgree } })}`,
  );
} finally {
  rmSync(work, { recursive: true, force: true });
}
