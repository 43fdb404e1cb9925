import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";

// tiny-model forwards on a loaded 2-core CI machine can exceed the 5 s default
setDefaultTimeout(60_000);
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { RF_BF16, RF_F16, RF_F32, RF_ROPE_DEFAULT, RF_ROPE_LINEAR, RF_ROPE_LLAMA3, type DType } from "../ffi/native.ts";
import { loadEngine } from "../src/engine/load.ts";
import { loadModelConfig, parseModelConfig } from "../src/model/config.ts";
import { defaultHeads, loadHeads } from "../src/model/heads.ts";
import { listTensors, loadSafetensors } from "../src/model/safetensors.ts";
import { FALLBACK_CHAT_TEMPLATE, ModelTokenizer } from "../src/model/tokenizer.ts";
import {
  encodeSafetensors,
  makeTinyModel,
  tinyModelTensors,
  TINY_BOS_ID,
  TINY_EOS_ID,
  TINY_EOT_ID,
  TINY_VOCAB_SIZE,
} from "./fixtures/tiny-model.ts";

let root: string;
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), "reform-ml-"));
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

class Sink {
  got = new Map<string, { dtype: DType; shape: number[]; bytes: number; first: number }>();
  setTensor(name: string, data: ArrayBufferView, dtype: DType, shape: number[]) {
    const u8 = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    this.got.set(name, { dtype, shape, bytes: data.byteLength, first: u8[0]! });
  }
}

/** Keeps each tensor's bytes (a copy: the loader's views point into a private mmap). */
class ValueSink {
  got = new Map<string, { dtype: DType; shape: number[]; bytes: Uint8Array; alignedOk: boolean }>();
  setTensor(name: string, data: ArrayBufferView, dtype: DType, shape: number[]) {
    const u8 = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    const esz = dtype === RF_F32 ? 4 : 2;
    this.got.set(name, { dtype, shape, bytes: u8.slice(), alignedOk: data.byteOffset % esz === 0 });
  }
}

describe("config", () => {
  const base = {
    architectures: ["LlamaForCausalLM"],
    hidden_size: 64,
    intermediate_size: 128,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    vocab_size: 100,
    max_position_embeddings: 8192,
    torch_dtype: "bfloat16",
  };

  test("tiny model config", async () => {
    const dir = await makeTinyModel(join(root, "m1"));
    const c = loadModelConfig(dir);
    expect(c.architecture).toBe("LlamaForCausalLM");
    expect(c.config.vocabSize).toBe(TINY_VOCAB_SIZE);
    expect(c.config.headDim).toBe(8);
    expect(c.config.numKvHeads).toBe(2);
    expect(c.config.qkvBias).toBe(false);
    expect(c.config.qkNorm).toBe(false);
    expect(c.config.tieEmbeddings).toBe(false);
    expect(c.maxPositionEmbeddings).toBe(256);
    expect(c.config.weightDtype).toBe(RF_BF16);
  });

  test("defaults, qwen2 bias, qwen3 q/k norm, mistral, tie, head_dim", () => {
    const c = parseModelConfig({ ...base, num_key_value_heads: undefined });
    expect(c.config.numKvHeads).toBe(4);
    expect(c.config.headDim).toBe(16);
    const q = parseModelConfig({
      ...base,
      architectures: ["Qwen2ForCausalLM"],
      tie_word_embeddings: true,
      torch_dtype: "float16",
    });
    expect(q.config.qkvBias).toBe(true);
    expect(q.config.qkNorm).toBe(false);
    expect(q.config.tieEmbeddings).toBe(true);
    expect(q.config.weightDtype).toBe(RF_F16);
    // Qwen3 (as Qwen3-0.6B's config.json has it): head_dim 128 != hidden / heads, no bias, per-head q/k norm
    const q3 = parseModelConfig({
      ...base,
      architectures: ["Qwen3ForCausalLM"],
      model_type: "qwen3",
      head_dim: 128,
      attention_bias: false,
      tie_word_embeddings: true,
      rope_theta: 1000000,
      use_sliding_window: false,
    });
    expect(q3.config.qkNorm).toBe(true);
    expect(q3.config.qkvBias).toBe(false);
    expect(q3.config.headDim).toBe(128);
    expect(q3.config.tieEmbeddings).toBe(true);
    expect(q3.config.ropeTheta).toBe(1000000);
    expect(q3.modelType).toBe("qwen3");
    const m = parseModelConfig({ ...base, architectures: ["MistralForCausalLM"], head_dim: 32 });
    expect(m.config.headDim).toBe(32);
  });

  test("rope scaling", () => {
    const l3 = parseModelConfig({
      ...base,
      rope_scaling: {
        rope_type: "llama3",
        factor: 8,
        low_freq_factor: 1,
        high_freq_factor: 4,
        original_max_position_embeddings: 8192,
      },
    });
    expect(l3.config.ropeType).toBe(RF_ROPE_LLAMA3);
    expect(l3.config.ropeFactor).toBe(8);
    expect(l3.config.ropeOriginalMaxPos).toBe(8192);
    const lin = parseModelConfig({ ...base, rope_scaling: { type: "linear", factor: 2 } });
    expect(lin.config.ropeType).toBe(RF_ROPE_LINEAR);
    expect(lin.config.ropeFactor).toBe(2);
    // transformers 5: rope_theta and the scaling in rope_parameters (base has no top-level rope_theta)
    const v5 = parseModelConfig({
      ...base,
      rope_parameters: {
        rope_type: "llama3",
        rope_theta: 500000,
        factor: 8,
        low_freq_factor: 1,
        high_freq_factor: 4,
        original_max_position_embeddings: 8192,
      },
    });
    expect(v5.config.ropeTheta).toBe(500000);
    expect(v5.config.ropeType).toBe(RF_ROPE_LLAMA3);
    expect(v5.config.ropeOriginalMaxPos).toBe(8192);
    const v5plain = parseModelConfig({ ...base, rope_parameters: { rope_type: "default", rope_theta: 1e6 } });
    expect(v5plain.config.ropeTheta).toBe(1e6);
    expect(v5plain.config.ropeType).toBe(RF_ROPE_DEFAULT);
  });

  test("errors name what is unsupported or missing", () => {
    expect(() => parseModelConfig({ ...base, architectures: ["GPT2LMHeadModel"] })).toThrow(/GPT2LMHeadModel/);
    expect(() => parseModelConfig({ ...base, architectures: undefined })).toThrow(/architectures/);
    expect(() => parseModelConfig({ ...base, rope_scaling: { rope_type: "yarn", factor: 4 } })).toThrow(/yarn/);
    expect(() => parseModelConfig({ ...base, torch_dtype: "float8" })).toThrow(/float8/);
    expect(() => parseModelConfig({ ...base, hidden_size: undefined })).toThrow(/hidden_size/);
    expect(() => parseModelConfig({ ...base, rope_scaling: { rope_type: "llama3", factor: 8 } })).toThrow(
      /original_max_position_embeddings/,
    );
  });
});

describe("safetensors", () => {
  test("single file, all model tensors, inv_freq skipped", async () => {
    const dir = await makeTinyModel(join(root, "st1"), { extraTensors: true });
    const all = listTensors(dir);
    expect(all.some((t) => t.name.endsWith("inv_freq"))).toBe(true);
    const sink = new Sink();
    const n = loadSafetensors(dir, sink);
    expect(n).toBe(2 + 2 * 9 + 1 - 0); // embed, lm_head, 9 per layer, norm
    expect(sink.got.has("model.layers.0.self_attn.rotary_emb.inv_freq")).toBe(false);
    const q = sink.got.get("model.layers.1.self_attn.q_proj.weight")!;
    expect(q.dtype).toBe(RF_BF16);
    expect(q.shape).toEqual([32, 32]);
    expect(q.bytes).toBe(32 * 32 * 2);
  });

  test("sharded equals single", async () => {
    const a = await makeTinyModel(join(root, "st2a"), { seed: 7 });
    const b = await makeTinyModel(join(root, "st2b"), { seed: 7, shards: 3 });
    const sa = new Sink();
    const sb = new Sink();
    loadSafetensors(a, sa);
    loadSafetensors(b, sb);
    expect([...sb.got.keys()].sort()).toEqual([...sa.got.keys()].sort());
    for (const [k, v] of sa.got) expect(sb.got.get(k)).toEqual(v);
  });

  test("loaded tensor values are the written ones (f32, f16, bf16; single file and 3 shards; Qwen2 biases, Qwen3 q/k norms)", async () => {
    const decode = (dtype: string, b: Uint8Array): number[] => {
      const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
      const n = b.byteLength / (dtype === "F32" ? 4 : 2);
      return Array.from({ length: n }, (_, i) =>
        dtype === "F32"
          ? dv.getFloat32(4 * i, true)
          : dtype === "F16"
            ? dv.getFloat16(2 * i, true)
            : new Float32Array(Uint32Array.of(dv.getUint16(2 * i, true) << 16).buffer)[0]!,
      );
    };
    for (const dtype of ["f32", "f16", "bf16"] as const)
      for (const [arch, shards] of [
        ["qwen2", 1],
        ["qwen2", 3],
        ["qwen3", 3],
      ] as const) {
        const opts = { seed: 11, dtype, shards, arch };
        const dir = await makeTinyModel(join(root, `vals-${arch}-${dtype}-${shards}`), opts);
        const sink = new ValueSink();
        loadSafetensors(dir, sink);
        const written = tinyModelTensors(opts);
        expect([...sink.got.keys()].sort()).toEqual(written.map((t) => t.name).sort());
        const native: DType = { f32: RF_F32, f16: RF_F16, bf16: RF_BF16 }[dtype] as DType;
        for (const t of written) {
          const got = sink.got.get(t.name)!;
          expect({ name: t.name, dtype: got.dtype, shape: got.shape }).toEqual({
            name: t.name,
            dtype: native,
            shape: t.shape,
          });
          const a = decode(t.dtype, got.bytes);
          const b = decode(t.dtype, t.data);
          expect(a.length).toBe(t.shape.reduce((x, y) => x * y, 1));
          // bit-exact values (NaN-free fixture: element-wise equality is exact equality)
          let same = a.length === b.length;
          for (let i = 0; same && i < a.length; i++) same = a[i] === b[i];
          expect({ name: t.name, same }).toEqual({ name: t.name, same: true });
        }
      }
  });

  test("a tensor at an unaligned offset is handed over aligned with its values intact", () => {
    const dir = join(root, "unaligned");
    require("node:fs").mkdirSync(dir, { recursive: true });
    const f32 = Float32Array.of(1.5, -2.25, 3e-8, 65504.5);
    writeFileSync(
      join(dir, "model.safetensors"),
      encodeSafetensors([
        { name: "model.a", shape: [1], dtype: "F16", data: new Uint8Array(Uint16Array.of(0x3c00).buffer) },
        { name: "model.b", shape: [4], dtype: "F32", data: new Uint8Array(f32.buffer) },
      ]),
    );
    const sink = new ValueSink();
    loadSafetensors(dir, sink);
    const b = sink.got.get("model.b")!;
    expect(b.alignedOk).toBe(true);
    expect(Array.from(new Float32Array(b.bytes.slice().buffer))).toEqual(Array.from(f32));
  });

  test("the native model computes with the loaded values: sharded f32 = single file, bit for bit", async () => {
    const outs: Float32Array[] = [];
    for (const shards of [1, 3]) {
      const dir = await makeTinyModel(join(root, `fwd-${shards}`), { seed: 5, dtype: "f32", shards });
      const eng = loadEngine({ modelDir: dir, dataDir: dir, backend: "cpu", threads: 1 });
      try {
        const seq = eng.model.createSeq(16);
        outs.push(seq.forward(Int32Array.of(5, 70, 200, 9), true)!.slice());
        seq.destroy();
      } finally {
        eng.model.destroy();
      }
    }
    expect(Array.from(outs[1]!)).toEqual(Array.from(outs[0]!));
  });

  test("f32 / f16 dtypes", async () => {
    const d = await makeTinyModel(join(root, "st3"), { dtype: "f32" });
    const s = new Sink();
    loadSafetensors(d, s);
    expect(s.got.get("model.norm.weight")!.dtype).toBe(RF_F32);
    const d2 = await makeTinyModel(join(root, "st4"), { dtype: "f16" });
    const s2 = new Sink();
    loadSafetensors(d2, s2);
    expect(s2.got.get("model.norm.weight")!.dtype).toBe(RF_F16);
  });

  test("unsupported dtype names tensor and dtype", () => {
    const dir = join(root, "st5");
    require("node:fs").mkdirSync(dir, { recursive: true });
    writeFileSync(
      join(dir, "model.safetensors"),
      encodeSafetensors([{ name: "model.norm.weight", shape: [4], dtype: "I32" as any, data: new Uint8Array(16) }]),
    );
    expect(() => loadSafetensors(dir, new Sink())).toThrow(/model\.norm\.weight.*I32/);
  });

  test("corrupt files give clear errors", async () => {
    const dir = await makeTinyModel(join(root, "st6"));
    const p = join(dir, "model.safetensors");
    const good = readFileSync(p);
    // header length beyond the file
    const bad1 = new Uint8Array(good);
    new DataView(bad1.buffer).setBigUint64(0, BigInt(good.length * 2), true);
    writeFileSync(p, bad1);
    expect(() => loadSafetensors(dir, new Sink())).toThrow(/corrupt safetensors header length/);
    // truncated data section
    writeFileSync(p, good.subarray(0, good.length - 100));
    expect(() => loadSafetensors(dir, new Sink())).toThrow(/outside the data section/);
    // garbage JSON
    const bad3 = new Uint8Array(good);
    bad3[9] = 0x7b;
    bad3[10] = 0x7b;
    writeFileSync(p, bad3);
    expect(() => loadSafetensors(dir, new Sink())).toThrow(/corrupt safetensors header/);
    writeFileSync(p, new Uint8Array(3));
    expect(() => loadSafetensors(dir, new Sink())).toThrow(/too small/);
  });

  test("missing shard", async () => {
    const dir = await makeTinyModel(join(root, "st7"), { shards: 2 });
    rmSync(join(dir, "model-00002-of-00002.safetensors"));
    expect(() => loadSafetensors(dir, new Sink())).toThrow(/model-00002-of-00002.safetensors.*missing/);
  });
});

describe("tokenizer", () => {
  let tok: ModelTokenizer;
  beforeAll(async () => {
    tok = ModelTokenizer.fromDir(await makeTinyModel(join(root, "tk")));
  });

  test("round trip of arbitrary UTF-8", () => {
    const texts = [
      "hello the world and things",
      "héllo 🎉 emoji 中文  spaces\n\n\ttabs",
      "👩‍👩‍👧‍👦 family, ZWJ; combining é; RTL שלום; math 𝔘𝔫𝔦",
      "",
    ];
    for (const t of texts) expect(tok.decode(tok.encode(t))).toBe(t);
  });

  test("special ids, BOS, EOS", () => {
    expect(tok.bosId).toBe(TINY_BOS_ID);
    expect(tok.usesBos).toBe(true);
    expect(tok.isEos(TINY_EOS_ID)).toBe(true);
    expect(tok.isEos(TINY_EOT_ID)).toBe(true);
    expect(tok.withBos([1, 2])).toEqual([TINY_BOS_ID, 1, 2]);
    expect(tok.withBos([TINY_BOS_ID, 1])).toEqual([TINY_BOS_ID, 1]);
    expect(tok.continuationMode).toBe("direct");
  });

  test("chat template renders, BOS only once", () => {
    const r = tok.renderChat([{ role: "user", content: "hi" }], true);
    expect(r).toBe("<|begin_of_text|><|user|>\nhi<|eot|><|assistant|>\n");
    const ids = tok.encodePrompt(r);
    expect(ids[0]).toBe(TINY_BOS_ID);
    expect(ids[1]).not.toBe(TINY_BOS_ID);
    expect(ids.filter((i) => i === TINY_BOS_ID).length).toBe(1);
  });

  test("fallback template when the model has none", async () => {
    const t2 = ModelTokenizer.fromDir(await makeTinyModel(join(root, "tk2"), { chatTemplate: false }));
    expect(t2.hasChatTemplate).toBe(false);
    expect(t2.chatTemplate).toBe(FALLBACK_CHAT_TEMPLATE);
    const r = t2.renderChat([{ role: "user", content: "hi" }], true);
    expect(r).toContain("User: hi");
    expect(r.endsWith("Assistant:")).toBe(true);
  });

  test("stream decoder emits complete characters only", () => {
    const text = "a🎉b中c é";
    const ids = tok.encode(text);
    const d = tok.streamDecoder();
    let out = "";
    for (const id of ids) {
      const piece = d.push(id);
      expect(piece.includes("\uFFFD")).toBe(false);
      out += piece;
    }
    out += d.flush();
    expect(out).toBe(text);
  });
});

describe("heads", () => {
  const cfg = { numLayers: 10, numHeads: 8, numKvHeads: 2 };
  test("default heuristic at ~45% depth", () => {
    const h = defaultHeads(cfg);
    expect(h.map((x) => x.layer)).toEqual([4, 4, 4]);
    expect(h.map((x) => x.kind)).toEqual(["q", "k", "v"]);
    expect(loadHeads(join(root, "nonexistent"), cfg).source).toBe("default");
  });
  test("file next to the model and CLI string", async () => {
    const dir = await makeTinyModel(join(root, "hd"));
    const f = loadHeads(dir, { numLayers: 2, numHeads: 4, numKvHeads: 2 });
    expect(f.heads.length).toBe(3);
    expect(f.chunkSize).toBe(32);
    const c = loadHeads(dir, cfg, '{"heads":[{"layer":9,"kind":"q","head":7}]}');
    expect(c.source).toBe("cli");
    expect(c.heads).toEqual([{ layer: 9, kind: "q", head: 7 }]);
  });
  test("validation", () => {
    expect(() => loadHeads("/x", cfg, '{"heads":[{"layer":10,"kind":"q","head":0}]}')).toThrow(/layer 10 out of range/);
    expect(() => loadHeads("/x", cfg, '{"heads":[{"layer":1,"kind":"k","head":2}]}')).toThrow(
      /head 2 out of range 0..1/,
    );
    expect(() => loadHeads("/x", cfg, '{"heads":[{"layer":1,"kind":"x","head":0}]}')).toThrow(/kind/);
    // o (the attention output) counts query heads, as q does
    expect(loadHeads("/x", cfg, '{"heads":[{"layer":1,"kind":"o","head":2}]}').heads[0]!.kind).toBe("o");
    expect(() => loadHeads("/x", cfg, '{"heads":[]}')).toThrow(/at least one head/);
  });
});
