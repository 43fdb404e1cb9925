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

/** What a head embeds: its query, key or value projection (before RoPE), or (o) the query head's attention output
 * before o_proj. `head` indexes the query heads for q and o, the kv heads for k and v. */
export type HeadKind = "q" | "k" | "v" | "o";
export const HEAD_KINDS: readonly HeadKind[] = ["q", "k", "v", "o"];

export interface HeadSpec {
  layer: number;
  kind: HeadKind;
  head: number;
}
