/**
 * Domain types of a loaded model: its architecture (what the native library is built for) and the
 * attention heads REFORM embeds with. The FFI binding packs these into the C structs; it does not own them.
 */
import type { DType } from "../../ffi/native.ts";

export interface ModelConfig {
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  qkvBias: boolean;
  qkNorm: boolean; // per-head RMSNorm of q and k before RoPE (Qwen3)
  tieEmbeddings: boolean;
  ropeType: number; // RF_ROPE_*
  rmsEps: number;
  ropeTheta: number;
  ropeFactor: number;
  ropeLowFreqFactor: number;
  ropeHighFreqFactor: number;
  ropeOriginalMaxPos: number;
  weightDtype: DType; // CUDA storage dtype (bf16/f16); ignored by the CPU build
}

export interface HeadSpec {
  layer: number;
  kind: "q" | "k" | "v";
  head: number;
}
