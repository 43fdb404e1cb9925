#!/usr/bin/env bun
/**
 * A long document with a few facts in it, for trying the server by hand (README, "A walk-through"):
 *
 *   bun bench/make-document.ts [--mb 3] [--facts 3] [--seed 7] --out doc.txt
 *
 * Held-out text (bench/data, never trained on) with one needle (training/templates.json) in each of `facts` equal
 * parts, at the middle of its part; prints one question per fact and the value its answer must contain.
 */
import { writeFileSync } from "node:fs";
import { DEFAULT_MODEL_DIR } from "../src/config.ts";
import { ModelTokenizer } from "../src/model/tokenizer.ts";
import { benchArgs } from "./common.ts";
import { SampleMaker } from "./ruler-tasks.ts";

const USAGE = "usage: bun bench/make-document.ts [--mb 3] [--facts 3] [--seed 7] --out FILE";
const a = benchArgs(USAGE, {
  mb: { type: "string", default: "3" },
  facts: { type: "string", default: "3" },
  seed: { type: "string", default: "7" },
  out: { type: "string" },
});
if (!a.out) {
  console.error(USAGE);
  process.exit(2);
}
const tok = ModelTokenizer.fromDir(DEFAULT_MODEL_DIR);
const facts = Number(a.facts);
const bytes = Number(a.mb) * 1024 * 1024;
const sample0 = new SampleMaker(0, (s) => tok.encode(s).length).make("single", 4000).text;
// a cheap token count for the haystack (characters per token measured on a sample): the size is what matters here
const charsPerToken = sample0.length / tok.encode(sample0).length;
const parts: string[] = [];
for (let i = 0; i < facts; i++) {
  const s = new SampleMaker(Number(a.seed) * 101 + i, (x) => x.length / charsPerToken).make(
    "single",
    Math.round(bytes / facts / charsPerToken),
    0.5,
  );
  parts.push(s.text);
  console.log(`${s.question}\t${s.expected[0]}`);
}
const text = `${parts.join("\n\n")}\n`;
writeFileSync(a.out, text);
console.error(`${a.out}: ${(Buffer.byteLength(text) / 1048576).toFixed(2)} MiB, ${facts} facts`);
