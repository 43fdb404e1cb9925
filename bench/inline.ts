/**
 * Inline REFORM end to end: starts a server on `--model` (default models/reform-tiny), and the official `openai`
 * client sends a long document (~200K tokens by default) inside one chat message with a question about a fact
 * planted in it, then a second question about another planted fact on the same document (a prefix-cache hit).
 * Prints both times, their ratio, the answers and whether they hold the planted values.
 *
 *   bun bench/inline.ts [--model DIR] [--tokens 200000] [--max-tokens 48] [--threads N] [--json]
 */
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import OpenAI from "openai";
import { resolveConfig } from "../src/config.ts";
import { startServer } from "../src/server.ts";
import { mulberry32 } from "../src/util/rng.ts";
import { benchArgs } from "./common.ts";

const values = benchArgs(
  "usage: bun bench/inline.ts [--model DIR] [--tokens 200000] [--max-tokens 48] [--threads N] [--seed 7] [--json]",
  {
    model: { type: "string", default: "models/reform-tiny" },
    tokens: { type: "string", default: "200000" },
    "max-tokens": { type: "string", default: "48" },
    threads: { type: "string" },
    seed: { type: "string", default: "7" },
    json: { type: "boolean", default: false },
  },
);
const target = Number(values.tokens);
const rand = mulberry32(Number(values.seed));

/** Filler prose: the sentences of this repository's documentation, shuffled. */
function fillerSentences(): string[] {
  const out: string[] = [];
  const walk = (dir: string) => {
    for (const f of readdirSync(dir)) {
      const p = join(dir, f);
      if (statSync(p).isDirectory()) {
        if (f !== "node_modules" && !f.startsWith(".")) walk(p);
      } else if (f.endsWith(".md"))
        for (const s of readFileSync(p, "utf8").split(/(?<=[.!?])\s+/))
          if (/^[A-Z][^`|#<>\n]{20,200}[.!?]$/.test(s)) out.push(s);
    }
  };
  walk(resolve(import.meta.dir, ".."));
  return out;
}

const key = () => String(Math.floor(rand() * 9e6) + 1e6);
const facts = [
  { id: key(), value: key() },
  { id: key(), value: key() },
];
const sentences = fillerSentences();

const root = mkdtempSync(join(tmpdir(), "reform-bench-inline-"));
const cfg = resolveConfig(
  [
    "--model",
    values.model!,
    "--data",
    join(root, "data"),
    "--port",
    "0",
    ...(values.threads ? ["--threads", values.threads] : []),
  ],
  process.env,
);
if (cfg.help) process.exit(0);
const srv = await startServer({ ...cfg, log: () => {} });
try {
  await srv.engine.ready();
  // the document: filler sentences with the two facts planted at 30% and 70% of its length
  const parts: string[] = [];
  let tokens = 0;
  const planted = new Set<number>();
  while (tokens < target) {
    let s = sentences[Math.floor(rand() * sentences.length)]!;
    for (const [i, at] of [0.3, 0.7].entries())
      if (!planted.has(i) && tokens >= at * target) {
        planted.add(i);
        s = `The value corresponding to the id ${facts[i]!.id} is ${facts[i]!.value}. ${s}`;
      }
    parts.push(s);
    tokens += Math.ceil(s.length / 2.4); // estimate (reform-tiny: about 2.4 characters per token); counted below
  }
  const doc = parts.join(" ");
  const docTokens = (await srv.engine.tokenize(doc)).length;
  const client = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: "bench", maxRetries: 0, timeout: 3600_000 });
  const ask = async (fact: (typeof facts)[number]) => {
    const t0 = performance.now();
    const { data, response } = await client.chat.completions
      .create({
        model: "reform",
        messages: [{ role: "user", content: `${doc}\n\nWhat is the value corresponding to the id ${fact.id}?` }],
        max_tokens: Number(values["max-tokens"]),
        temperature: 0,
      })
      .withResponse();
    const ms = performance.now() - t0;
    const answer = data.choices[0]?.message.content ?? "";
    return {
      ms,
      answer,
      right: answer.includes(fact.value),
      expected: fact.value,
      header: response.headers.get("x-reform-inline"),
    };
  };
  const first = await ask(facts[0]!);
  const second = await ask(facts[1]!);
  const ratio = first.ms / second.ms;
  const info = srv.engine.modelInfo()!;
  console.log(
    `inline REFORM, model ${info.id} (window ${info.trainedContext}, ${info.backend}), document ${docTokens} tokens ` +
      `(${(Buffer.byteLength(doc) / 1024).toFixed(0)} KiB) in one chat message, openai client`,
  );
  for (const [name, r] of [
    ["first ", first],
    ["second", second],
  ] as const)
    console.log(
      `  ${name} question ${r.ms.toFixed(0).padStart(8)} ms   [${r.header}]\n` +
        `    answer ${JSON.stringify(r.answer)}  expected ${r.expected}: ${r.right ? "right" : "wrong"}`,
    );
  console.log(`  second / first: ${ratio.toFixed(1)}x faster (target >= 50x: ${ratio >= 50 ? "met" : "MISSED"})`);
  if (values.json)
    console.log(JSON.stringify({ docTokens, firstMs: first.ms, secondMs: second.ms, ratio, first, second }));
} finally {
  await srv.stop();
  rmSync(root, { recursive: true, force: true });
}
