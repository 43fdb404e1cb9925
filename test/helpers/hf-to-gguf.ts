/**
 * A Hugging Face model (its config.json object and the tensors the test fixture wrote) as a GGUF file for llama.cpp,
 * following llama.cpp's convert_hf_to_gguf.py, not our loader: the reference side of test/llama-cpp.test.ts.
 *
 * - LlamaForCausalLM / MistralForCausalLM -> GGUF architecture "llama": q/k rows permuted from rotate-half to
 *   llama.cpp's interleaved RoPE order (LlamaModel.permute); rope_scaling llama3 -> a `rope_freqs.weight` tensor of
 *   per-frequency divisors (LlamaModel.generate_extra_tensors); head_dim -> attention.key_length / value_length.
 * - Qwen2ForCausalLM -> "qwen2" (NeoX RoPE: rows unpermuted; q/k/v biases), Qwen3ForCausalLM -> "qwen3" (per-head
 *   attn_q_norm / attn_k_norm).
 * - Tied embeddings: no output.weight (llama.cpp then uses token_embd).
 * 1-D tensors (norms, biases) are stored as F32, as the converter does; matrices keep their checkpoint dtype
 * (BF16, F16, F32). The vocabulary is the minimal SentencePiece one of bench/gguf.ts (the tests feed token ids).
 */
import {
  GGML_BF16,
  GGML_F16,
  GGML_F32,
  type GgufTensor,
  type GgufValue,
  minimalVocab,
  permuteRope,
  writeGguf,
} from "../../bench/gguf.ts";
import type { TensorSpec } from "../fixtures/tiny-model.ts";

const f16 = new DataView(new ArrayBuffer(2));
function widen(t: TensorSpec): Float32Array {
  const n = t.shape.reduce((a, b) => a * b, 1);
  if (t.dtype === "F32") return new Float32Array(t.data.slice().buffer);
  const u16 = new Uint16Array(t.data.slice().buffer);
  const out = new Float32Array(n);
  const u32 = new Uint32Array(out.buffer);
  for (let i = 0; i < n; i++) {
    if (t.dtype === "BF16") u32[i] = u16[i]! << 16;
    else {
      f16.setUint16(0, u16[i]!, true);
      out[i] = f16.getFloat16(0, true);
    }
  }
  return out;
}

/** convert_hf_to_gguf.py LlamaModel.generate_extra_tensors for rope_type llama3. */
export function llama3RopeFreqs(theta: number, headDim: number, rs: Record<string, number>): Float32Array {
  const factor = rs.factor ?? 8;
  const low = rs.low_freq_factor ?? 1;
  const high = rs.high_freq_factor ?? 4;
  const old = rs.original_max_position_embeddings ?? 8192;
  const lowWl = old / low;
  const highWl = old / high;
  const out = new Float32Array(headDim / 2);
  for (let i = 0; i < headDim / 2; i++) {
    const freq = Math.fround(1 / Math.fround(theta ** Math.fround((2 * i) / headDim)));
    const wl = (2 * Math.PI) / freq;
    if (wl < highWl) out[i] = 1;
    else if (wl > lowWl) out[i] = factor;
    else {
      const smooth = (old / wl - low) / (high - low);
      out[i] = 1 / ((1 - smooth) / factor + smooth);
    }
  }
  return out;
}

const LAYER_NAMES: [RegExp, string][] = [
  [/^input_layernorm\.weight$/, "attn_norm.weight"],
  [/^self_attn\.q_proj\.(weight|bias)$/, "attn_q.$1"],
  [/^self_attn\.k_proj\.(weight|bias)$/, "attn_k.$1"],
  [/^self_attn\.v_proj\.(weight|bias)$/, "attn_v.$1"],
  [/^self_attn\.o_proj\.weight$/, "attn_output.weight"],
  [/^self_attn\.q_norm\.weight$/, "attn_q_norm.weight"],
  [/^self_attn\.k_norm\.weight$/, "attn_k_norm.weight"],
  [/^post_attention_layernorm\.weight$/, "ffn_norm.weight"],
  [/^mlp\.gate_proj\.weight$/, "ffn_gate.weight"],
  [/^mlp\.up_proj\.weight$/, "ffn_up.weight"],
  [/^mlp\.down_proj\.weight$/, "ffn_down.weight"],
];

function ggufName(hf: string): string | null {
  if (hf === "model.embed_tokens.weight") return "token_embd.weight";
  if (hf === "model.norm.weight") return "output_norm.weight";
  if (hf === "lm_head.weight") return "output.weight";
  const m = /^model\.layers\.(\d+)\.(.+)$/.exec(hf);
  if (!m) return null;
  for (const [re, to] of LAYER_NAMES) if (re.test(m[2]!)) return `blk.${m[1]}.${m[2]!.replace(re, to)}`;
  return null;
}

/** Write `path` from a config.json object and the checkpoint's tensors; returns the GGUF architecture name. */
export function hfToGguf(config: Record<string, any>, tensors: TensorSpec[], path: string): string {
  const archName = String(config.architectures[0]);
  const arch =
    archName === "Qwen2ForCausalLM"
      ? "qwen2"
      : archName === "Qwen3ForCausalLM"
        ? "qwen3"
        : archName === "LlamaForCausalLM" || archName === "MistralForCausalLM"
          ? "llama"
          : null;
  if (!arch) throw new Error(`hfToGguf: no conversion for ${archName}`);
  const nHead = config.num_attention_heads as number;
  const nKv = (config.num_key_value_heads ?? nHead) as number;
  const headDim = (config.head_dim ?? config.hidden_size / nHead) as number;
  const theta = (config.rope_theta ?? 10000) as number;
  const out: GgufTensor[] = [];
  for (const t of tensors) {
    const name = ggufName(t.name);
    if (!name) continue; // rotary inv_freq and other buffers
    if (t.shape.length === 1) {
      out.push({ name, ne: [t.shape[0]!], type: GGML_F32, data: widen(t) });
      continue;
    }
    const [rows, cols] = t.shape as [number, number];
    let data: Float32Array | Uint16Array =
      t.dtype === "F32" ? new Float32Array(t.data.slice().buffer) : new Uint16Array(t.data.slice().buffer);
    if (arch === "llama" && /attn_q\.weight$/.test(name)) data = permuteRope(data, nHead, headDim, cols);
    if (arch === "llama" && /attn_k\.weight$/.test(name)) data = permuteRope(data, nKv, headDim, cols);
    out.push({
      name,
      ne: [cols, rows],
      type: t.dtype === "F32" ? GGML_F32 : t.dtype === "F16" ? GGML_F16 : GGML_BF16,
      data,
    });
  }
  const rs = config.rope_scaling as Record<string, any> | null;
  const ropeType = rs ? (rs.rope_type ?? rs.type) : null;
  if (ropeType === "llama3") {
    out.push({
      name: "rope_freqs.weight",
      ne: [headDim / 2],
      type: GGML_F32,
      data: llama3RopeFreqs(theta, headDim, rs!),
    });
  } else if (ropeType && ropeType !== "default") throw new Error(`hfToGguf: rope_scaling ${ropeType} not converted`);
  const k = (s: string) => `${arch}.${s}`;
  const meta: [string, GgufValue][] = [
    ["general.architecture", { str: arch }],
    ["general.name", { str: `reform-test-${arch}` }],
    [k("context_length"), { u32: config.max_position_embeddings }],
    [k("embedding_length"), { u32: config.hidden_size }],
    [k("block_count"), { u32: config.num_hidden_layers }],
    [k("feed_forward_length"), { u32: config.intermediate_size }],
    [k("attention.head_count"), { u32: nHead }],
    [k("attention.head_count_kv"), { u32: nKv }],
    [k("attention.key_length"), { u32: headDim }],
    [k("attention.value_length"), { u32: headDim }],
    [k("rope.dimension_count"), { u32: headDim }],
    [k("rope.freq_base"), { f32: theta }],
    [k("attention.layer_norm_rms_epsilon"), { f32: config.rms_norm_eps ?? 1e-6 }],
    [k("vocab_size"), { u32: config.vocab_size }],
    ...minimalVocab(config.vocab_size),
  ];
  writeGguf(path, meta, out);
  return arch;
}
