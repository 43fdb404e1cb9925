/**
 * config.json (Hugging Face) -> native ModelConfig.
 *
 * Supported: LlamaForCausalLM (Llama 2/3/3.1), MistralForCausalLM, Qwen2ForCausalLM (qkv bias), Qwen3ForCausalLM
 * (per-head q/k RMSNorm, head_dim given explicitly).
 * rope_scaling: null | {rope_type|type: "default" | "llama3" | "linear"}; or, as transformers 5 writes them,
 * rope_parameters: {rope_type, rope_theta, factor, ...} (the same fields in one object).
 * Anything else is rejected with an error naming the unsupported / missing field.
 */
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { RF_BF16, RF_F16, RF_ROPE_DEFAULT, RF_ROPE_LINEAR, RF_ROPE_LLAMA3, type DType } from "../../ffi/native.ts";
import type { ModelConfig } from "./types.ts";

export const SUPPORTED_ARCHITECTURES = [
  "LlamaForCausalLM",
  "MistralForCausalLM",
  "Qwen2ForCausalLM",
  "Qwen3ForCausalLM",
] as const;

export class ModelConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ModelConfigError";
  }
}

export interface LoadedConfig {
  architecture: string;
  modelType: string;
  config: ModelConfig;
  maxPositionEmbeddings: number;
  torchDtype: string;
  bosTokenId: number | null;
  eosTokenIds: number[];
  raw: Record<string, any>;
}

function int(raw: Record<string, any>, key: string, fallback?: number): number {
  const v = raw[key];
  if (v === undefined || v === null) {
    if (fallback !== undefined) return fallback;
    throw new ModelConfigError(`config.json: missing required field "${key}"`);
  }
  if (typeof v !== "number" || !Number.isInteger(v) || v <= 0) {
    throw new ModelConfigError(`config.json: field "${key}" must be a positive integer (got ${JSON.stringify(v)})`);
  }
  return v;
}

function num(raw: Record<string, any>, key: string, fallback: number): number {
  const v = raw[key];
  if (v === undefined || v === null) return fallback;
  if (typeof v !== "number" || !Number.isFinite(v)) {
    throw new ModelConfigError(`config.json: field "${key}" must be a number (got ${JSON.stringify(v)})`);
  }
  return v;
}

function idList(v: unknown): number[] {
  if (typeof v === "number") return [v];
  if (Array.isArray(v)) return v.filter((x) => typeof x === "number");
  return [];
}

/** Parse an already-loaded config.json object. */
export function parseModelConfig(raw: Record<string, any>): LoadedConfig {
  if (!raw || typeof raw !== "object") throw new ModelConfigError("config.json: not a JSON object");
  const archs: unknown = raw.architectures;
  if (!Array.isArray(archs) || archs.length === 0 || typeof archs[0] !== "string") {
    throw new ModelConfigError(
      `config.json: missing "architectures" (supported: ${SUPPORTED_ARCHITECTURES.join(", ")})`,
    );
  }
  const architecture = archs[0] as string;
  if (!(SUPPORTED_ARCHITECTURES as readonly string[]).includes(architecture)) {
    throw new ModelConfigError(
      `unsupported architecture "${architecture}" (supported: ${SUPPORTED_ARCHITECTURES.join(", ")})`,
    );
  }
  const isQwen2 = architecture === "Qwen2ForCausalLM";
  const isQwen3 = architecture === "Qwen3ForCausalLM";

  const hidden = int(raw, "hidden_size");
  const numHeads = int(raw, "num_attention_heads");
  const numKv = int(raw, "num_key_value_heads", numHeads);
  const headDim = raw.head_dim == null ? hidden / numHeads : int(raw, "head_dim");
  if (!Number.isInteger(headDim)) {
    throw new ModelConfigError(
      `config.json: hidden_size ${hidden} is not divisible by num_attention_heads ${numHeads} and head_dim is missing`,
    );
  }
  if (headDim % 2 !== 0) throw new ModelConfigError(`config.json: head_dim ${headDim} must be even for RoPE`);
  if (numHeads % numKv !== 0) {
    throw new ModelConfigError(
      `config.json: num_attention_heads ${numHeads} is not a multiple of num_key_value_heads ${numKv}`,
    );
  }
  const act = raw.hidden_act ?? raw.hidden_activation ?? "silu";
  if (act !== "silu") throw new ModelConfigError(`unsupported hidden_act "${act}" (only "silu" is supported)`);

  const maxPos = int(raw, "max_position_embeddings", 4096);

  // rope scaling
  let ropeType = RF_ROPE_DEFAULT;
  let ropeFactor = 1;
  let lowFreq = 1;
  let highFreq = 4;
  let origMax = maxPos;
  // transformers 5 moved rope_theta and the scaling into rope_parameters; older keys win where both are present
  const rp = raw.rope_parameters;
  if (rp != null && typeof rp !== "object")
    throw new ModelConfigError(`config.json: rope_parameters must be an object or null`);
  const rs = raw.rope_scaling ?? ((rp?.rope_type ?? rp?.type ?? "default") !== "default" ? rp : null);
  if (rs != null) {
    if (typeof rs !== "object") throw new ModelConfigError(`config.json: rope_scaling must be an object or null`);
    const t = rs.rope_type ?? rs.type ?? "default";
    if (t === "default") {
      ropeType = RF_ROPE_DEFAULT;
    } else if (t === "llama3") {
      ropeType = RF_ROPE_LLAMA3;
      ropeFactor = num(rs, "factor", NaN);
      if (!Number.isFinite(ropeFactor))
        throw new ModelConfigError(`config.json: rope_scaling (llama3) is missing "factor"`);
      lowFreq = num(rs, "low_freq_factor", 1);
      highFreq = num(rs, "high_freq_factor", 4);
      if (rs.original_max_position_embeddings == null) {
        throw new ModelConfigError(`config.json: rope_scaling (llama3) is missing "original_max_position_embeddings"`);
      }
      origMax = int(rs, "original_max_position_embeddings");
    } else if (t === "linear") {
      ropeType = RF_ROPE_LINEAR;
      ropeFactor = num(rs, "factor", NaN);
      if (!Number.isFinite(ropeFactor))
        throw new ModelConfigError(`config.json: rope_scaling (linear) is missing "factor"`);
    } else {
      throw new ModelConfigError(`unsupported rope_scaling type "${t}" (supported: default, llama3, linear)`);
    }
  }

  const torchDtype = String(raw.torch_dtype ?? raw.dtype ?? "bfloat16");
  let weightDtype: DType;
  if (torchDtype === "bfloat16" || torchDtype === "float32") weightDtype = RF_BF16;
  else if (torchDtype === "float16") weightDtype = RF_F16;
  else throw new ModelConfigError(`unsupported torch_dtype "${torchDtype}" (supported: bfloat16, float16, float32)`);

  // Qwen2 always has q/k/v biases; Qwen3 has none unless attention_bias says so, like Llama
  const qkvBias = isQwen2 ? true : raw.attention_bias === true;

  const config: ModelConfig = {
    vocabSize: int(raw, "vocab_size"),
    hiddenSize: hidden,
    intermediateSize: int(raw, "intermediate_size"),
    numLayers: int(raw, "num_hidden_layers"),
    numHeads,
    numKvHeads: numKv,
    headDim,
    qkvBias,
    qkNorm: isQwen3,
    tieEmbeddings: raw.tie_word_embeddings === true,
    ropeType,
    rmsEps: num(raw, "rms_norm_eps", 1e-6),
    ropeTheta: num(raw, "rope_theta", num(rp ?? {}, "rope_theta", 10000)),
    ropeFactor,
    ropeLowFreqFactor: lowFreq,
    ropeHighFreqFactor: highFreq,
    ropeOriginalMaxPos: origMax,
    weightDtype,
  };
  return {
    architecture,
    modelType: String(raw.model_type ?? ""),
    config,
    maxPositionEmbeddings: maxPos,
    torchDtype,
    bosTokenId: typeof raw.bos_token_id === "number" ? raw.bos_token_id : null,
    eosTokenIds: idList(raw.eos_token_id),
    raw,
  };
}

/** Read `<dir>/config.json`. */
export function loadModelConfig(dir: string): LoadedConfig {
  const p = join(dir, "config.json");
  if (!existsSync(p)) throw new ModelConfigError(`model directory ${dir} has no config.json`);
  let raw: any;
  try {
    raw = JSON.parse(readFileSync(p, "utf8"));
  } catch (e) {
    throw new ModelConfigError(`config.json: invalid JSON (${(e as Error).message})`);
  }
  return parseModelConfig(raw);
}
