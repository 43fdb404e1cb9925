#!/usr/bin/env bun
/**
 * RULER-style benchmark through the public HTTP API: does REFORM answer beyond the trained window?
 *
 *   bun bench/ruler.ts [--model DIR] [--lengths 2k,8k,32k,128k,1m] [--methods reform,streaming,h2o]
 *                      [--tasks single,multikey,multivalue,multiquery,quote] [--samples 4] [--json out.json]
 *                      [--haystack prose|license|code|log]   (what the context is: held-out prose, or a document
 *                                               that is not prose, with the needles in its idiom; quote: prose only)
 *                      [--heads FILE_OR_JSON]   (heads and selection settings, as `serve --heads`)
 *                      [--server-flags="..."]   (more `serve` flags, space-separated: --server-flags="--sentence-tail 96")
 *                      [--show-misses]          (each answer that misses a value, on stderr: what to look at)
 *                      [--paired]               (also `full` on each sample's own facts, its haystack shrunk into the
 *                                               window: rows `full-same`, and 'vs full' compares the same questions)
 *
 * Starts the server in process on the model (default: the embedded one) with its derived defaults, and for every
 * context length uploads one context per sample (held-out haystack, needles at spread depths: bench/ruler-tasks.ts),
 * then asks the sample's question with each method (greedy). Scores are RULER's string_match_all in percent.
 * `full` runs at the in-window reference length (the longest context whose whole prompt fits the window): the
 * figure REFORM's scores are compared to (the issue's target: >= 90% of it at 128K and 1M), on the same task class:
 * `full` keeps a sample's facts and shrinks only its haystack, and a sample whose facts, question and answer alone do
 * not fit the window is refused there and left out of every method's "vs full" (listed, with the other samples'
 * score, under the table). `streaming` and `h2o`
 * run up to the server's --max-h2o-tokens. Prints a table (tasks x methods x lengths), upload throughput and time
 * to first token per length; --json writes everything.
 */
import { writeFileSync } from "node:fs";
import { DEFAULT_MODEL_DIR } from "../src/config.ts";
import { ModelTokenizer } from "../src/model/tokenizer.ts";
import { createContext, postJson, putFinalText } from "../test/helpers/http.ts";
import { startTestServer } from "../test/helpers/server.ts";
import { benchArgs, parseLength } from "./common.ts";
import {
  ANSWER_TOKENS,
  type Haystack,
  HAYSTACKS,
  haystackSource,
  type Sample,
  SampleMaker,
  stringMatchAll,
  TASKS,
  type Task,
} from "./ruler-tasks.ts";

const a = benchArgs(
  "usage: bun bench/ruler.ts [--model DIR] [--lengths 2k,...] [--methods ...] [--tasks ...] [--samples N] [--haystack prose|license|code|log] [--json FILE]",
  {
    model: { type: "string", default: DEFAULT_MODEL_DIR },
    lengths: { type: "string", default: "2k,8k,32k,128k,1m" },
    methods: { type: "string", default: "reform,streaming,h2o" },
    tasks: { type: "string", default: TASKS.join(",") },
    samples: { type: "string", default: "4" },
    "full-samples": { type: "string", default: "20" },
    seed: { type: "string", default: "1" },
    haystack: { type: "string", default: "prose" },
    threads: { type: "string" },
    heads: { type: "string" },
    "server-flags": { type: "string" },
    json: { type: "string" },
    "show-misses": { type: "boolean", default: false },
    paired: { type: "boolean", default: false },
  },
);

const lengths = a.lengths!.split(",").map(parseLength);
const methods = a.methods!.split(",").filter(Boolean);
const tasks = a.tasks!.split(",") as Task[];
const samples = Number(a.samples);
const fullSamples = Number(a["full-samples"]);
if (!(HAYSTACKS as readonly string[]).includes(a.haystack!)) {
  console.error(`--haystack ${a.haystack}: one of ${HAYSTACKS.join(", ")}`);
  process.exit(2);
}
if (a.haystack !== "prose" && tasks.includes("quote")) {
  console.error(
    `--haystack ${a.haystack}: quote asks for a sentence, so it runs on prose only (--tasks without quote)`,
  );
  process.exit(2);
}
// read before the server starts: a source that is not on this machine is an error, not a run
let source: ReturnType<typeof haystackSource>;
try {
  source = haystackSource(a.haystack as Haystack);
} catch (e) {
  console.error(`--haystack ${a.haystack}: ${(e as Error).message}`);
  process.exit(2);
}

const srv = await startTestServer({
  name: "ruler",
  modelDir: a.model!,
  flags: [
    ...(a.threads ? ["--threads", a.threads] : []),
    // a heads file or inline JSON (heads, chunk_size, capacity, window, ...): the sweeps of the ablations
    ...(a.heads !== undefined ? ["--heads", a.heads] : []),
    // any other serve flag, for sweeps of a server setting (the server refuses unknown flags at start)
    ...(a["server-flags"] ?? "").split(/\s+/).filter(Boolean),
  ],
});
const base = srv.url;
// biome-ignore lint/suspicious/noExplicitAny: the benchmark reads JSON bodies loosely
const props: any = await (await fetch(`${base}/props`)).json();
const L = props.limits;
const window: number = L.trained_window;
const tok = ModelTokenizer.fromDir(a.model!);
const countTokens = (s: string) => tok.encode(s).length;

const post = (path: string, body: unknown) => postJson(`${base}${path}`, body);

/** Uploads a context; returns its id, tokens and the upload time (until ready). */
async function upload(text: string): Promise<{ id: string; tokens: number; ms: number }> {
  const id = await createContext(base);
  const t0 = performance.now();
  await putFinalText(base, id, text);
  for (;;) {
    // biome-ignore lint/suspicious/noExplicitAny: a context object
    const c: any = await (await fetch(`${base}/v1/contexts/${id}`)).json();
    if (c.state === "ready") return { id, tokens: c.tokens_received, ms: performance.now() - t0 };
    if (c.state === "failed") throw new Error(`context failed: ${c.error}`);
    await Bun.sleep(50);
  }
}

/** Budget for a question: the window minus the answer, the question and the template (the server says if not). */
function budgetFor(task: Task, question: string): number {
  const room = window - ANSWER_TOKENS[task] - tok.encode(question).length - L.template_tokens - 8;
  return Math.max(16, Math.min(L.max_budget, room));
}

interface Row {
  length: number;
  method: string;
  task: Task;
  score: number;
  n: number;
  /** reform: fraction of the expected strings that lie inside the gathered spans (retrieval, before answering) */
  gathered: number;
  ttftMs: number[];
  /** samples the server refused (e.g. a recurrent baseline beyond --max-h2o-tokens, a prompt that cannot fit) */
  refused: number;
  /** score and count over the samples whose facts, question and answer fit the window (what `full` can be asked) */
  scoreFit: number;
  nFit: number;
}
const rows: Row[] = [];
const uploads: { length: number; tokens: number; ms: number }[] = [];

/** Tokens of the window a sample's whole prompt (template, context, question, answer) leaves free; < 0: it does not
 * fit, and `full` cannot take it. */
const roomOf = (task: Task, sample: Sample) =>
  window - ANSWER_TOKENS[task] - L.template_tokens - countTokens(sample.question) - countTokens(sample.text) - 24;

async function runSample(length: number, task: Task, s: number, nSamples: number, ms: string[]) {
  const seed = Number(a.seed) * 1_000_003 + length * 31 + s * 7 + TASKS.indexOf(task);
  // the haystack takes one draw whatever its length: the same seed gives the same facts and question at any length
  const make = (tokens: number) => new SampleMaker(seed, countTokens, source).make(task, tokens, (s + 0.5) / nSamples);
  // the in-window reference: the haystack shrinks until the whole prompt fits the window (the facts stay: a
  // sample whose needles, question and answer alone do not fit is refused, not replaced by a shorter one)
  const inWindowOf = (from: number) => {
    let x = make(from);
    for (let h = from, room = roomOf(task, x); room < 0 && h > 16; room = roomOf(task, x)) {
      h = Math.max(16, h + room);
      x = make(h);
    }
    return x;
  };
  const sample = ms.includes("full") ? inWindowOf(length) : make(length);
  // the same task class as `full`: could this sample's facts, question and answer be asked inside the window at all?
  // (four uuid values under a random id need more room than a 512-token window leaves beside a 256-token answer).
  // A quote always can: its sentence is the haystack's own, and a short haystack may have none to ask about.
  const fits = task === "quote" || roomOf(task, make(16)) >= 0;
  const up = await upload(sample.text);
  uploads.push({ length, tokens: up.tokens, ms: up.ms });
  await ask(length, task, s, up.id, sample, ms, fits);
  await fetch(`${base}/v1/contexts/${up.id}`, { method: "DELETE" });
  // --paired: the same facts and question inside the window, answered by `full` (what this sample's REFORM answer
  // is compared to); only where the facts fit the window, as for 'vs full'
  if (a.paired && fits && !ms.includes("full") && ms.includes("reform")) {
    const small = inWindowOf(length);
    const inside = await upload(small.text);
    await ask(length, task, s, inside.id, small, ["full"], fits, "full-same");
    await fetch(`${base}/v1/contexts/${inside.id}`, { method: "DELETE" });
  }
}

/** Asks one uploaded sample's question with each method; rows are keyed by `rowMethod` (default: the method). */
async function ask(
  length: number,
  task: Task,
  s: number,
  id: string,
  sample: Sample,
  ms: string[],
  fits: boolean,
  rowMethod?: string,
) {
  for (const method of ms) {
    const rowName = rowMethod ?? method;
    let row = rows.find((r) => r.length === length && r.method === rowName && r.task === task);
    if (!row) {
      row = {
        length,
        method: rowName,
        task,
        score: 0,
        n: 0,
        gathered: 0,
        ttftMs: [],
        refused: 0,
        scoreFit: 0,
        nFit: 0,
      };
      rows.push(row);
    }
    const { status, body } = await post(`/v1/contexts/${id}/query`, {
      question: sample.question,
      method,
      budget: budgetFor(task, sample.question),
      max_tokens: ANSWER_TOKENS[task],
      temperature: 0,
      stream: false,
      return_selection: method === "reform",
    });
    if (status !== 200) {
      row.refused += 1;
      process.stderr.write(`[ruler] ${method} at ${length} tokens: ${status} ${body.error?.message ?? ""}\n`);
      continue;
    }
    const score = stringMatchAll(body.text, sample.expected);
    row.score += score;
    let gathered = 1;
    if (method === "reform") {
      const spans: { char_start: number; char_end: number; text: string }[] = body.selection?.spans ?? [];
      const inside = sample.expected.filter((e) => {
        const at = sample.text.indexOf(e);
        return at >= 0 && spans.some((sp) => sp.char_start <= at && sp.char_end >= at + e.length);
      });
      gathered = inside.length / sample.expected.length;
      row.gathered += gathered;
      if (a["show-misses"] && score < 1)
        process.stderr.write(
          `[miss] ${method} ${length} ${task} #${s}: gathered ${gathered.toFixed(2)}\n  q: ${sample.question}\n` +
            `  expected: ${JSON.stringify(sample.expected)}\n  answer: ${JSON.stringify(body.text)}\n` +
            `  passages: ${JSON.stringify(spans.filter((sp) => sp.text.length > 20).map((sp) => sp.text))}\n`,
        );
    } else if (a["show-misses"] && score < 1)
      process.stderr.write(`[miss] ${method} ${length} ${task} #${s}: ${JSON.stringify(body.text)}\n`);
    row.n += 1;
    if (fits) {
      row.scoreFit += score;
      row.nFit += 1;
    }
    row.ttftMs.push(body.timings.ttft_ms);
  }
}

/** Room the question and the needles take on top of the haystack (4 needles of up to ~35 tokens with uuids). */
const t0 = performance.now();
// in-window reference: `full` on contexts whose whole prompt fits the window
const inWindow: Record<Task, number> = Object.fromEntries(
  // a first guess of the haystack that fits with the needles and the question; runSample shrinks it to fit
  tasks.map((t) => [t, Math.max(16, window - ANSWER_TOKENS[t] - L.template_tokens - 120)]),
) as Record<Task, number>;
for (const task of tasks) {
  for (let s = 0; s < fullSamples; s++) await runSample(inWindow[task], task, s, fullSamples, ["full"]);
}
for (const length of lengths) {
  for (const task of tasks) {
    const ms = methods.filter((m) => m !== "full" || length + 200 < window);
    for (let s = 0; s < samples; s++) await runSample(length, task, s, samples, ms);
  }
  process.stderr.write(`[ruler] ${length} tokens done (${((performance.now() - t0) / 1000).toFixed(0)} s)\n`);
}

const fmtLen = (n: number) => (n >= 1048576 ? `${n / 1048576}M` : n >= 1024 ? `${Math.round(n / 1024)}K` : `${n}`);
const pct = (r: Row | undefined) => (!r ? "-" : r.n ? ((100 * r.score) / r.n).toFixed(1) : r.refused ? "n/a" : "-");
const median = (xs: number[]) => (xs.length ? [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]! : Number.NaN);
const fullRef = (task: Task) => rows.find((r) => r.method === "full" && r.task === task && r.length === inWindow[task]);

console.log(`RULER-style benchmark — model ${a.model} (trained window ${window}), backend ${props.backend}`);
console.log(
  `  limits: chunk ${L.chunk_size}, capacity ${L.capacity}, default budget ${L.budget}, max budget ${L.max_budget}, ` +
    `smoothing window ${L.smoothing_window}, edge ${L.edge}; heads ${props.heads.map((h: { layer: number; kind: string; head: number }) => `${h.layer}:${h.kind}:${h.head}`).join(",")}; ` +
    `${source.name === "prose" ? "held-out haystack and keys" : `haystack: ${source.describe}; held-out keys`}; greedy; string_match_all (%); ${samples} samples per cell, ${fullSamples} for full`,
);
console.log(
  `  full (in window, ~${fmtLen(Math.min(...Object.values(inWindow)))}-${fmtLen(Math.max(...Object.values(inWindow)))} tokens): ` +
    tasks.map((t) => `${t} ${pct(fullRef(t))}`).join(", "),
);
console.log("");
const header = ["length", "method", ...tasks, "mean", "vs full"];
console.log(header.map((h, i) => (i < 2 ? h.padEnd(10) : h.padStart(11))).join(""));
for (const length of lengths) {
  for (const method of [...methods, ...(a.paired ? ["full-same"] : [])]) {
    const cells = tasks.map((t) => rows.find((r) => r.length === length && r.method === method && r.task === t));
    if (cells.every((c) => !c)) continue;
    const vals = cells.map((c) => (c?.n ? (100 * c.score) / c.n : null));
    const ok = vals.filter((v): v is number => v !== null);
    const mean = ok.length ? ok.reduce((x, y) => x + y, 0) / ok.length : null;
    // --paired: `full` on the same samples' facts at this length; else the in-window reference run
    const refs = tasks.map((t) => {
      const same = rows.find((r) => r.length === length && r.method === "full-same" && r.task === t);
      const f = method !== "full-same" && same ? same : fullRef(t);
      return f && f.n ? (100 * f.score) / f.n : null;
    });
    // against `full` on the same task class: the samples whose facts, question and answer fit the window
    const fitVals = cells.map((c) => (c?.nFit ? (100 * c.scoreFit) / c.nFit : null));
    const ratios = fitVals
      .map((v, i) => (v !== null && refs[i] ? v / refs[i]! : null))
      .filter((x): x is number => x !== null);
    const minRatio = ratios.length ? Math.min(...ratios) : null;
    console.log(
      fmtLen(length).padEnd(10) +
        method.padEnd(10) +
        cells.map((c) => pct(c).padStart(11)).join("") +
        (mean === null ? "n/a" : mean.toFixed(1)).padStart(11) +
        (minRatio === null ? "-" : `min ${minRatio.toFixed(2)}x`).padStart(11),
    );
  }
}
const unfit = rows.filter((r) => !r.method.startsWith("full") && r.nFit < r.n);
if (unfit.length) {
  console.log("");
  console.log(
    "samples whose facts, question and answer alone do not fit the window (full refuses them; 'vs full' leaves them out):",
  );
  for (const r of unfit)
    console.log(
      `  ${fmtLen(r.length).padEnd(6)} ${r.method.padEnd(10)} ${r.task.padEnd(11)} ${r.n - r.nFit} of ${r.n}; ` +
        `on the other ${r.nFit}: ${r.nFit ? ((100 * r.scoreFit) / r.nFit).toFixed(1) : "-"}`,
    );
}
console.log("");
console.log("reform, answer inside the gathered tokens (%; retrieval before the model answers):");
console.log(["length", "", ...tasks].map((h, i) => (i < 2 ? h.padEnd(10) : h.padStart(11))).join(""));
for (const length of lengths) {
  const cells = tasks.map((t) => rows.find((r) => r.length === length && r.method === "reform" && r.task === t));
  if (cells.every((c) => !c?.n)) continue;
  console.log(
    fmtLen(length).padEnd(10) +
      "gathered".padEnd(10) +
      cells.map((c) => (c?.n ? ((100 * c.gathered) / c.n).toFixed(1) : "-").padStart(11)).join(""),
  );
}
console.log("");
console.log("  length   upload tok/s (median)   reform TTFT ms (median, server)");
for (const length of lengths) {
  const us = uploads.filter((u) => u.length === length);
  const rate = median(us.map((u) => u.tokens / (u.ms / 1000)));
  const ttft = median(rows.filter((r) => r.length === length && r.method === "reform").flatMap((r) => r.ttftMs));
  const toks = median(us.map((u) => u.tokens));
  console.log(
    `  ${fmtLen(length).padEnd(8)} ${rate.toFixed(0).padStart(12)} (${toks} tokens)   ${ttft.toFixed(1).padStart(10)}`,
  );
}
console.log(`  total ${((performance.now() - t0) / 1000).toFixed(0)} s`);
if (a.json) {
  writeFileSync(
    a.json,
    JSON.stringify({ model: a.model, haystack: source.name, window, limits: L, rows, uploads, inWindow }, null, 1),
  );
}
await srv.stop();
process.exit(0);
