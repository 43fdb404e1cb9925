/**
 * bench/gguf.ts (the llama.cpp peer benchmark's GGUF writer): a written file reads back with the same metadata,
 * tensor infos and bytes at 32-byte aligned offsets; the q/k RoPE row permutation is the one of llama.cpp's
 * convert_hf_to_gguf.py (reshape(n_head, 2, d/2, cols).swapaxes(1, 2)).
 */
import { afterAll, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { GGML_F16, GGML_F32, minimalVocab, permuteRope, readGgufHeader, writeGguf } from "../bench/gguf.ts";

const dir = mkdtempSync(join(tmpdir(), "reform-gguf-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

test("a written GGUF v3 reads back: metadata, tensor infos, aligned data", () => {
  const emb = Uint16Array.from({ length: 7 * 5 }, (_, i) => 0x3c00 + i); // odd byte size: padding follows
  const norm = Float32Array.from({ length: 5 }, (_, i) => 1 + i / 8);
  const out = Uint16Array.from({ length: 5 * 3 }, (_, i) => 0x4000 + i);
  const path = join(dir, "t.gguf");
  const vocab = minimalVocab(300);
  const size = writeGguf(
    path,
    [
      ["general.architecture", { str: "llama" }],
      ["llama.block_count", { u32: 0 }],
      ["llama.rope.freq_base", { f32: 10000 }],
      ...vocab,
    ],
    [
      { name: "token_embd.weight", ne: [5, 7], type: GGML_F16, data: emb },
      { name: "output_norm.weight", ne: [5], type: GGML_F32, data: norm },
      { name: "output.weight", ne: [5, 3], type: GGML_F16, data: out },
    ],
  );
  const buf = new Uint8Array(readFileSync(path));
  expect(buf.byteLength).toBe(size);
  const g = readGgufHeader(buf);
  expect(g.version).toBe(3);
  expect(g.meta.get("general.architecture")).toBe("llama");
  expect(g.meta.get("llama.block_count")).toBe(0);
  expect(g.meta.get("llama.rope.freq_base")).toBe(10000);
  expect(g.meta.get("tokenizer.ggml.model")).toBe("llama");
  const tokens = g.meta.get("tokenizer.ggml.tokens") as string[];
  expect(tokens.length).toBe(300);
  expect(new Set(tokens).size).toBe(300); // llama.cpp maps piece -> id
  expect(tokens.slice(0, 4)).toEqual(["<unk>", "<s>", "</s>", "<0x00>"]);
  expect(tokens[3 + 0x0a]).toBe("<0x0A>"); // the newline byte llama.cpp looks up
  expect((g.meta.get("tokenizer.ggml.token_type") as number[]).slice(0, 4)).toEqual([2, 3, 3, 6]);
  expect(g.meta.get("tokenizer.ggml.add_bos_token")).toBe(false);
  expect(g.tensors.map((t) => [t.name, t.ne, t.type])).toEqual([
    ["token_embd.weight", [5, 7], GGML_F16],
    ["output_norm.weight", [5], GGML_F32],
    ["output.weight", [5, 3], GGML_F16],
  ]);
  expect(g.dataStart % 32).toBe(0);
  for (const [t, data] of [
    [g.tensors[0]!, emb],
    [g.tensors[1]!, norm],
    [g.tensors[2]!, out],
  ] as const) {
    expect(t.offset % 32).toBe(0);
    const at = g.dataStart + t.offset;
    expect(Buffer.from(buf.subarray(at, at + data.byteLength)).equals(Buffer.from(data.buffer))).toBe(true);
  }
});

test("permuteRope: per head, row 2i+s <- row s*d/2+i (rotate-half pairs become adjacent)", () => {
  const cols = 2;
  // 2 heads of head_dim 4: row r holds [r, 100 + r]
  const w = Float32Array.from({ length: 8 * cols }, (_, k) => (k % cols === 0 ? k / cols : 100 + (k - 1) / cols));
  const p = permuteRope(w, 2, 4, cols);
  const rows = Array.from({ length: 8 }, (_, r) => p[r * cols]);
  expect(rows).toEqual([0, 2, 1, 3, 4, 6, 5, 7]);
  expect(p[2 * cols + 1]).toBe(101); // whole rows move
  const w16 = Uint16Array.from({ length: 8 * 4 * 3 }, (_, k) => k);
  const p16 = permuteRope(w16, 4, 8, 3);
  expect(p16).toBeInstanceOf(Uint16Array);
  // head 2, i = 1, s = 1: destination row 2*8 + 3 comes from row 2*8 + 4 + 1
  expect(Array.from(p16.subarray((2 * 8 + 3) * 3, (2 * 8 + 4) * 3))).toEqual([63, 64, 65]);
});
