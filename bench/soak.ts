#!/usr/bin/env bun
/**
 * Soak campaign against a real server process on 127.0.0.1 (issue 9's closing figures):
 *
 *   bun bench/soak.ts [--seconds 60] [--uploaders 3] [--queriers 3] [--kill-bytes 1048576] [--json] [--keep]
 *
 *   1. bad inputs: hostile / malformed requests must each get a 4xx with an OpenAI-shaped JSON error,
 *      never a 5xx, and /health must stay 200;
 *   2. the client hangs up mid-upload, then resumes from `bytes_received` (no byte lost, tokens as the
 *      tokenizer gives them); kill -9 during a slow streamed upload, restart, resume from `bytes_received`,
 *      finalize: no byte lost, and tokens.bin / emb.bin / a greedy answer identical to a one-shot upload;
 *   3. for --seconds: uploaders, queriers (native SSE, chat stream / non-stream, completions, some
 *      disconnecting early) and a deleter (deleting contexts under in-flight uploads and queries), with
 *      the server's VmRSS sampled every 500 ms.
 * Prints one table and (with --json) one JSON line; exits 1 if an invariant broke (a 5xx, a connection
 * error nobody caused, an unexpected status, a lost byte, a token or answer mismatch).
 * A benchmark, not a test: the figures depend on the machine and its load.
 */
import { mkdtempSync, readFileSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { makeTinyModel, TINY_EOS_ID, TINY_EOT_ID } from "../test/fixtures/tiny-model.ts";
import { pieceStream, sseEvents } from "../test/helpers/http.ts";
import { benchArgs } from "./common.ts";

const HOST = "127.0.0.1"; // never anything else: this sends hostile requests
const REPO = resolve(import.meta.dir, "..");
const SERVED = "soak-tiny";

const args = benchArgs(
  "usage: bun bench/soak.ts [--seconds 60] [--uploaders 3] [--queriers 3] [--kill-bytes 1048576] [--json] [--keep]",
  {
    seconds: { type: "string", default: "60" },
    uploaders: { type: "string", default: "3" },
    queriers: { type: "string", default: "3" },
    "kill-bytes": { type: "string", default: String(1 << 20) },
    json: { type: "boolean", default: false },
    keep: { type: "boolean", default: false },
  },
);
const SECONDS = Number(args.seconds);
const UPLOADERS = Number(args.uploaders);
const QUERIERS = Number(args.queriers);
const KILL_BYTES = Number(args["kill-bytes"]);
const MAX_BODY = 4 << 20; // small enough that an oversize upload is cheap to send

/** The one place the server command line is built (flag names may change; change them here). */
function serverArgv(modelDir: string, dataDir: string, port: number): string[] {
  return [
    process.execPath,
    "run",
    join(REPO, "src/cli/serve.ts"),
    "--model",
    modelDir,
    "--data",
    dataDir,
    "--host",
    HOST,
    "--port",
    String(port),
    "--backend",
    "cpu",
    "--served-name",
    SERVED,
    "--max-body-bytes",
    String(MAX_BODY),
    // large chunks: per-chunk overhead dominates the tiny model's compression (chunk 32 takes minutes per MB)
    "--chunk-size",
    "1024",
    "--capacity",
    "1024",
  ];
}

// ---------------------------------------------------------------- recording

type Outcome = number | "conn_error" | "aborted"; // aborted = a disconnect this campaign made on purpose

interface Sample {
  kind: string;
  outcome: Outcome;
  ms: number; // total latency, or time to first token for streams
}

const samples: Sample[] = [];
let disconnects = 0;
const problems: string[] = [];

function problem(msg: string): void {
  if (problems.length < 200) problems.push(msg);
}

function record(kind: string, outcome: Outcome, ms: number): void {
  samples.push({ kind, outcome, ms });
  if (typeof outcome === "number" && outcome >= 500) problem(`${kind}: HTTP ${outcome}`);
}

function statusClass(o: Outcome): string {
  return typeof o === "number" ? `${Math.floor(o / 100)}xx` : o;
}

function pct(sorted: number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

// ---------------------------------------------------------------- server process

let base = "";
let server: { proc: ReturnType<typeof Bun.spawn>; pid: number } | null = null;
const rss: { phase: string; kb: number }[] = [];
let phase = "start";

async function freePort(): Promise<number> {
  const s = Bun.listen({ hostname: HOST, port: 0, socket: { data() {} } });
  const p = s.port;
  s.stop(true);
  return p;
}

async function startServer(modelDir: string, dataDir: string, port: number, logFile: string): Promise<void> {
  const proc = Bun.spawn(serverArgv(modelDir, dataDir, port), {
    cwd: REPO,
    stdout: Bun.file(logFile),
    stderr: Bun.file(`${logFile}.err`),
  });
  server = { proc, pid: proc.pid };
  const t0 = Date.now();
  for (;;) {
    if (proc.exitCode !== null)
      throw new Error(`server exited with ${proc.exitCode} during start-up (see ${logFile}.err)`);
    try {
      if ((await fetch(`${base}/health`)).status === 200) return;
    } catch {
      /* not listening yet */
    }
    if (Date.now() - t0 > 60_000) throw new Error("server not healthy after 60 s");
    await Bun.sleep(100);
  }
}

async function kill9(): Promise<void> {
  if (!server) return;
  server.proc.kill(9);
  await server.proc.exited;
  server = null;
}

async function stopServer(): Promise<void> {
  if (!server) return;
  const { proc } = server;
  proc.kill("SIGTERM");
  const t = setTimeout(() => proc.kill(9), 35_000);
  await proc.exited;
  clearTimeout(t);
  server = null;
}

function sampleRss(): void {
  if (!server) return;
  try {
    const m = /VmRSS:\s+(\d+)\s+kB/.exec(readFileSync(`/proc/${server.pid}/status`, "utf8"));
    if (m) rss.push({ phase, kb: Number(m[1]) });
  } catch {
    /* the process is between a kill and a restart */
  }
}

// ---------------------------------------------------------------- HTTP helpers

interface Reply {
  status: Outcome;
  body: string;
  headers: Headers | null;
}

async function call(kind: string, path: string, init: RequestInit = {}): Promise<Reply> {
  const t0 = performance.now();
  try {
    const res = await fetch(`${base}${path}`, init);
    const body = await res.text();
    record(kind, res.status, performance.now() - t0);
    return { status: res.status, body, headers: res.headers };
  } catch (e) {
    const aborted = init.signal?.aborted === true;
    record(kind, aborted ? "aborted" : "conn_error", performance.now() - t0);
    if (!aborted) problem(`${kind} ${init.method ?? "GET"} ${path}: connection error ${(e as Error).message}`);
    return { status: aborted ? "aborted" : "conn_error", body: "", headers: null };
  }
}

const jsonInit = (body: unknown, method = "POST"): RequestInit => ({
  method,
  headers: { "content-type": "application/json" },
  body: typeof body === "string" ? body : JSON.stringify(body),
});

// biome-ignore lint/suspicious/noExplicitAny: loose JSON
function parse(r: Reply): any {
  try {
    return JSON.parse(r.body);
  } catch {
    return null;
  }
}

/** Why `r` is not an OpenAI-shaped error, or null when it is one. */
function notOpenAIError(r: Reply): string | null {
  const e = parse(r)?.error;
  if (!e || typeof e.message !== "string" || typeof e.type !== "string") return "no {error: {message, type}} body";
  if (!("param" in e) || !("code" in e)) return "error without param / code";
  return null;
}

async function getContext(
  id: string,
  kind = "get",
): Promise<{ status: Outcome; info: Record<string, unknown> | null }> {
  const r = await call(kind, `/v1/contexts/${id}`);
  return { status: r.status, info: r.status === 200 ? parse(r) : null };
}

async function createContext(): Promise<string> {
  const r = await call("create", "/v1/contexts", jsonInit({ metadata: { soak: true } }));
  if (r.status !== 201) throw new Error(`create context: ${r.status} ${r.body}`);
  return parse(r).id;
}

function upload(
  id: string,
  body: RequestInit["body"],
  final: boolean,
  kind = "upload",
  signal?: AbortSignal,
  offset?: number,
): Promise<Reply> {
  const q = [final ? "final=true" : "", offset !== undefined ? `offset=${offset}` : ""].filter(Boolean).join("&");
  return call(kind, `/v1/contexts/${id}/content${q ? `?${q}` : ""}`, {
    method: "PUT",
    headers: { "content-type": "text/plain" },
    body,
    signal,
  });
}

/** Deterministic text with multi-byte characters, so that pieces and the kill split them anywhere. */
function makeText(bytes: number, seed: number): Uint8Array {
  const vocab = [
    "the",
    "river",
    "stone",
    "lamp",
    "über",
    "café",
    "北京",
    "mañana",
    "naïve",
    "🦊",
    "seven",
    "and",
    "quiet",
    "δέλτα",
  ];
  let x = seed >>> 0;
  const parts: string[] = [];
  let n = 0;
  while (n < bytes + 16) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    const w = vocab[x % vocab.length]! + ((x >>> 8) % 17 === 0 ? ".\n" : " ");
    parts.push(w);
    n += Buffer.byteLength(w);
  }
  return new Uint8Array(Buffer.from(parts.join("")).subarray(0, bytes));
}

// ---------------------------------------------------------------- SSE queries

type QueryKind = "query_sse" | "chat_stream" | "chat" | "completion_stream";

interface QueryResult {
  outcome: Outcome;
  errorCode: string | null; // an error event inside a 200 stream, or the error body's code
  text: string;
}

/** Runs one query; streams record TTFT, and with `disconnectAfterFirst` the client hangs up after it. */
async function query(
  kind: QueryKind,
  ctx: string,
  opts: {
    disconnectAfterFirst?: boolean;
    maxTokens?: number;
    temperature?: number;
    extra?: Record<string, unknown>;
  } = {},
): Promise<QueryResult> {
  const maxTokens = opts.maxTokens ?? 12;
  const temperature = opts.temperature ?? 0.8;
  const seed = samples.length;
  let path: string;
  let body: unknown;
  if (kind === "query_sse") {
    path = `/v1/contexts/${ctx}/query`;
    body = { question: "what does the river say?", max_tokens: maxTokens, temperature, seed };
  } else if (kind === "completion_stream") {
    path = "/v1/completions";
    body = {
      model: `context:${ctx}`,
      prompt: "\nQ: lamp?\nA:",
      max_tokens: maxTokens,
      temperature,
      seed,
      stream: true,
    };
  } else {
    path = "/v1/chat/completions";
    body = {
      model: SERVED,
      context_id: ctx,
      messages: [{ role: "user", content: "Summarise the stone." }],
      max_tokens: maxTokens,
      temperature,
      seed,
      stream: kind === "chat_stream",
      ...(kind === "chat_stream" ? { stream_options: { include_usage: true } } : {}),
    };
  }
  body = { ...(body as object), ...opts.extra };
  if (kind === "chat") {
    const r = await call(kind, path, jsonInit(body));
    const p = parse(r);
    return { outcome: r.status, errorCode: p?.error?.code ?? null, text: p?.choices?.[0]?.message?.content ?? "" };
  }
  const ac = new AbortController();
  const t0 = performance.now();
  let res: Response;
  try {
    res = await fetch(`${base}${path}`, { ...jsonInit(body), signal: ac.signal });
  } catch (e) {
    record(kind, "conn_error", performance.now() - t0);
    problem(`${kind} on ${ctx}: connection error ${(e as Error).message}`);
    return { outcome: "conn_error", errorCode: null, text: "" };
  }
  if (res.status !== 200) {
    const r: Reply = { status: res.status, body: await res.text(), headers: res.headers };
    record(kind, res.status, performance.now() - t0);
    return { outcome: res.status, errorCode: parse(r)?.error?.code ?? null, text: "" };
  }
  let first = true;
  let errorCode: string | null = null;
  let text = "";
  let done = false;
  try {
    for await (const ev of sseEvents(res)) {
      if (ev.data === "[DONE]") {
        done = true;
        continue;
      }
      const d = JSON.parse(ev.data);
      if (ev.event === "error" || d.error) {
        errorCode = d.error?.code ?? "unknown";
        continue;
      }
      const piece: string | undefined =
        ev.event === "token" ? d.text : (d.choices?.[0]?.delta?.content ?? d.choices?.[0]?.text);
      if (piece === undefined || (ev.event !== "token" && piece === "")) continue;
      text += piece;
      if (first) {
        first = false;
        record(kind, 200, performance.now() - t0);
        if (opts.disconnectAfterFirst) {
          disconnects++;
          ac.abort();
          return { outcome: "aborted", errorCode: null, text };
        }
      }
    }
  } catch (e) {
    // closing the body after our own abort may throw out of the iterator's cleanup
    if (ac.signal.aborted) return { outcome: "aborted", errorCode: null, text };
    if (first) record(kind, "conn_error", performance.now() - t0);
    problem(`${kind} on ${ctx}: stream broke: ${(e as Error).message}`);
    return { outcome: "conn_error", errorCode, text };
  }
  // a stream that ended before any token (error event, or an empty answer) is timed to its end
  if (first) record(kind, 200, performance.now() - t0);
  if (!done) problem(`${kind} on ${ctx}: stream ended without [DONE]`);
  return { outcome: 200, errorCode, text };
}

// ---------------------------------------------------------------- 1. bad inputs

interface BadCase {
  name: string;
  method: string;
  path: string;
  body?: RequestInit["body"];
  type?: string | null; // content-type; default application/json when there is a body
  expect: number[]; // acceptable statuses (all 4xx)
}

async function badInputs(
  ready: string,
  processing: string,
  emptyFinal: string,
): Promise<{ sent: number; failed: number }> {
  const chat = (extra: Record<string, unknown>) =>
    JSON.stringify({ model: SERVED, messages: [{ role: "user", content: "hi" }], max_tokens: 2, ...extra });
  const q = (extra: Record<string, unknown>) => JSON.stringify({ question: "hi", max_tokens: 2, ...extra });
  const huge = "stone ".repeat(200_000); // 1.2 MB: far beyond any recompute window
  const deep = "[".repeat(200_000) + "]".repeat(200_000);
  const cases: BadCase[] = [
    { name: "malformed JSON", method: "POST", path: "/v1/contexts", body: "{bad json", expect: [400] },
    {
      name: "invalid UTF-8 JSON",
      method: "POST",
      path: "/v1/chat/completions",
      body: new Uint8Array([0xff, 0xfe, 0x7b, 0x7d]),
      expect: [400],
    },
    { name: "JSON array body", method: "POST", path: "/v1/contexts", body: "[]", expect: [400] },
    { name: "200k-deep nested JSON", method: "POST", path: "/v1/chat/completions", body: deep, expect: [400, 413] },
    { name: "metadata of wrong type", method: "POST", path: "/v1/contexts", body: '{"metadata": 5}', expect: [400] },
    {
      name: "text/plain JSON on a JSON endpoint",
      method: "POST",
      path: "/v1/chat/completions",
      body: chat({}),
      type: "text/plain",
      expect: [415],
    },
    {
      name: "form body on a JSON endpoint",
      method: "POST",
      path: "/v1/contexts",
      body: "metadata=1",
      type: "application/x-www-form-urlencoded",
      expect: [415],
    },
    {
      name: "messages not an array",
      method: "POST",
      path: "/v1/chat/completions",
      body: '{"messages": "hi"}',
      expect: [400],
    },
    { name: "empty messages", method: "POST", path: "/v1/chat/completions", body: '{"messages": []}', expect: [400] },
    {
      name: "null user content",
      method: "POST",
      path: "/v1/chat/completions",
      body: '{"messages": [{"role": "user", "content": null}]}',
      expect: [400],
    },
    {
      name: "unknown role",
      method: "POST",
      path: "/v1/chat/completions",
      body: '{"messages": [{"role": "god", "content": "x"}]}',
      expect: [400],
    },
    {
      name: "unknown model",
      method: "POST",
      path: "/v1/chat/completions",
      body: chat({ model: "gpt-4" }),
      expect: [404],
    },
    {
      name: "bare ctx_ model",
      method: "POST",
      path: "/v1/chat/completions",
      body: chat({ model: "ctx_0123456789abcdef01234567" }),
      expect: [404],
    },
    {
      name: "context:<missing> model",
      method: "POST",
      path: "/v1/chat/completions",
      body: chat({ model: "context:ctx_0123456789abcdef01234567" }),
      expect: [404],
    },
    {
      name: "5 stop strings",
      method: "POST",
      path: "/v1/chat/completions",
      body: chat({ stop: ["a", "b", "c", "d", "e"] }),
      expect: [400],
    },
    {
      name: "logit_bias out of range",
      method: "POST",
      path: "/v1/chat/completions",
      body: chat({ logit_bias: { "5": 500 } }),
      expect: [400],
    },
    {
      name: "logit_bias non-numeric key",
      method: "POST",
      path: "/v1/chat/completions",
      body: chat({ logit_bias: { abc: 1 } }),
      expect: [400],
    },
    {
      name: "temperature as string",
      method: "POST",
      path: "/v1/chat/completions",
      body: chat({ temperature: "hot" }),
      expect: [400],
    },
    {
      name: "temperature 5",
      method: "POST",
      path: "/v1/chat/completions",
      body: chat({ temperature: 5 }),
      expect: [400],
    },
    { name: "top_p 0", method: "POST", path: "/v1/chat/completions", body: chat({ top_p: 0 }), expect: [400] },
    { name: "n = 3", method: "POST", path: "/v1/chat/completions", body: chat({ n: 3 }), expect: [400] },
    {
      name: "tools",
      method: "POST",
      path: "/v1/chat/completions",
      body: chat({ tools: [{ type: "function", function: { name: "f" } }] }),
      expect: [400],
    },
    {
      name: "stream_options without stream",
      method: "POST",
      path: "/v1/chat/completions",
      body: chat({ stream_options: { include_usage: true } }),
      expect: [400],
    },
    {
      name: "max_tokens negative",
      method: "POST",
      path: "/v1/chat/completions",
      body: chat({ max_tokens: -1 }),
      expect: [400],
    },
    {
      name: "max_tokens 1e9",
      method: "POST",
      path: "/v1/chat/completions",
      body: chat({ max_tokens: 1_000_000_000 }),
      expect: [400],
    },
    {
      name: "max_tokens NaN-ish 1.5",
      method: "POST",
      path: "/v1/chat/completions",
      body: chat({ max_tokens: 1.5 }),
      expect: [400],
    },
    {
      name: "1.2 MB chat message",
      method: "POST",
      path: "/v1/chat/completions",
      body: chat({ messages: [{ role: "user", content: huge }] }),
      expect: [400],
    },
    {
      name: "JSON body of 32.5 MiB",
      method: "POST",
      path: "/v1/chat/completions",
      body: `{"messages":[{"role":"user","content":"${"x".repeat((32 << 20) + (1 << 19))}"}]}`,
      expect: [413],
    },
    // above every limit the app knows of, so the HTTP layer's own request-size cap is what answers
    {
      name: "40 MiB upload",
      method: "PUT",
      path: `/v1/contexts/${processing}/content`,
      body: new Uint8Array(40 << 20).fill(0x61),
      type: "text/plain",
      expect: [413],
    },
    {
      name: "completions: two prompts",
      method: "POST",
      path: "/v1/completions",
      body: '{"prompt": ["a", "b"]}',
      expect: [400],
    },
    {
      name: "completions: echo + logprobs",
      method: "POST",
      path: "/v1/completions",
      body: '{"prompt": "a", "echo": true, "logprobs": 2}',
      expect: [400],
    },
    {
      name: "1.2 MB question",
      method: "POST",
      path: `/v1/contexts/${ready}/query`,
      body: q({ question: huge }),
      expect: [400],
    },
    {
      name: "negative budget",
      method: "POST",
      path: `/v1/contexts/${ready}/query`,
      body: q({ budget: -5 }),
      expect: [400],
    },
    {
      name: "budget 1e9",
      method: "POST",
      path: `/v1/contexts/${ready}/query`,
      body: q({ budget: 1_000_000_000 }),
      expect: [400],
    },
    {
      name: "question and messages",
      method: "POST",
      path: `/v1/contexts/${ready}/query`,
      body: q({ messages: [{ role: "user", content: "x" }] }),
      expect: [400],
    },
    {
      name: "neither question nor messages",
      method: "POST",
      path: `/v1/contexts/${ready}/query`,
      body: '{"max_tokens": 2}',
      expect: [400],
    },
    {
      name: "unknown method",
      method: "POST",
      path: `/v1/contexts/${ready}/query`,
      body: q({ method: "magic" }),
      expect: [400],
    },
    {
      name: "logprobs 50",
      method: "POST",
      path: `/v1/contexts/${ready}/query`,
      body: q({ logprobs: 50 }),
      expect: [400],
    },
    {
      name: "unknown field",
      method: "POST",
      path: `/v1/contexts/${ready}/query`,
      body: q({ frobnicate: 1 }),
      expect: [400],
    },
    {
      name: "query an unknown context",
      method: "POST",
      path: "/v1/contexts/ctx_0123456789abcdef01234567/query",
      body: q({}),
      expect: [404],
    },
    {
      name: "path traversal context id",
      method: "GET",
      path: "/v1/contexts/..%2F..%2Fetc%2Fpasswd",
      expect: [400, 404],
    },
    {
      name: "query a processing context",
      method: "POST",
      path: `/v1/contexts/${processing}/query`,
      body: q({}),
      expect: [409],
    },
    {
      name: "query an empty finalized context",
      method: "POST",
      path: `/v1/contexts/${emptyFinal}/query`,
      body: q({}),
      expect: [409],
    },
    {
      name: "upload as image/png",
      method: "PUT",
      path: `/v1/contexts/${processing}/content`,
      body: "x",
      type: "image/png",
      expect: [415],
    },
    {
      name: "upload ?final=maybe",
      method: "PUT",
      path: `/v1/contexts/${processing}/content?final=maybe`,
      body: "x",
      type: "text/plain",
      expect: [400],
    },
    {
      name: "JSON upload with numeric text",
      method: "POST",
      path: `/v1/contexts/${processing}/content`,
      body: '{"text": 5}',
      expect: [400],
    },
    {
      name: "upload over --max-body-bytes",
      method: "PUT",
      path: `/v1/contexts/${processing}/content`,
      body: new Uint8Array(MAX_BODY + 1024).fill(0x61),
      type: "text/plain",
      expect: [413],
    },
    {
      name: "upload to an unknown context",
      method: "PUT",
      path: "/v1/contexts/ctx_0123456789abcdef01234567/content",
      body: "x",
      type: "text/plain",
      expect: [404],
    },
    {
      name: "finalize an unknown context",
      method: "POST",
      path: "/v1/contexts/ctx_0123456789abcdef01234567/finalize",
      expect: [404],
    },
    {
      name: "events of an unknown context",
      method: "GET",
      path: "/v1/contexts/ctx_0123456789abcdef01234567/events",
      expect: [404],
    },
    {
      name: "detokenize an id outside the vocabulary",
      method: "POST",
      path: "/v1/detokenize",
      body: '{"tokens": [99999999]}',
      expect: [400],
    },
    { name: "tokenize without text", method: "POST", path: "/v1/tokenize", body: "{}", expect: [400] },
    { name: "DELETE on chat completions", method: "DELETE", path: "/v1/chat/completions", expect: [405] },
    { name: "PATCH on contexts", method: "PATCH", path: "/v1/contexts", body: "{}", expect: [405] },
    { name: "unknown route", method: "GET", path: "/v1/nope", expect: [404] },
  ];
  let failed = 0;
  for (const c of cases) {
    const headers: Record<string, string> = {};
    const type = c.type === undefined ? (c.body !== undefined ? "application/json" : null) : c.type;
    if (type) headers["content-type"] = type;
    const r = await call("bad_input", c.path, { method: c.method, headers, body: c.body });
    let why: string | null = null;
    if (!c.expect.includes(r.status as number)) why = `status ${r.status}, expected ${c.expect.join("/")}`;
    else why = notOpenAIError(r);
    if (!why && r.status === 405 && !r.headers?.get("allow")) why = "405 without an Allow header";
    if (why) {
      failed++;
      problem(`bad input "${c.name}" (${c.method} ${c.path}): ${why}: ${r.body.slice(0, 200)}`);
    }
    const h = await call("health", "/health");
    if (h.status !== 200) {
      failed++;
      problem(`after bad input "${c.name}": /health ${h.status}`);
    }
  }
  return { sent: cases.length, failed };
}

// ---------------------------------------------------------------- 2. kill -9 during an upload

interface KillResult {
  bytes: number;
  receivedAtRestart: number;
  sentBeforeKill: number;
  bytesLost: number;
  tokensResumed: number;
  tokensOneShot: number;
  tokensBinEqual: boolean | null;
  embBinEqual: boolean | null;
  answerEqual: boolean;
}

async function killDuringUpload(restart: () => Promise<void>, dataDir: string): Promise<KillResult> {
  const text = makeText(KILL_BYTES, 99);
  const resumed = await createContext();
  let sent = 0;
  let stopSending = false;
  // slow (8 KiB every 20 ms), so the kill lands in the middle of the body
  const slow = new ReadableStream<Uint8Array>({
    async pull(ctrl) {
      if (stopSending || sent >= text.byteLength) return ctrl.close();
      await Bun.sleep(20);
      const piece = text.subarray(sent, sent + 8192);
      sent += piece.byteLength;
      ctrl.enqueue(piece);
    },
  });
  const pending = upload(resumed, slow, true, "kill_upload");
  const t0 = Date.now();
  for (;;) {
    // half of the body sent and some of it stored: the server holds a partly received upload
    const info = (await getContext(resumed, "kill_poll")).info;
    if (sent >= text.byteLength / 2 && Number(info?.bytes_received ?? 0) > 0) break;
    if (Date.now() - t0 > 60_000)
      throw new Error(`kill -9: nothing of the slow upload was stored in 60 s (${JSON.stringify(info)})`);
    await Bun.sleep(30);
  }
  await kill9();
  const sentBeforeKill = sent; // an upper bound: what the server read is at most this
  stopSending = true;
  const cut = await pending;
  // the connection error of the upload we cut is ours, not the server's
  if (cut.status !== "conn_error") problem(`kill -9: the cut upload answered ${cut.status}`);
  for (const s of samples) if (s.kind === "kill_upload" && s.outcome === "conn_error") s.outcome = "aborted";
  dropProblems(/^kill_upload /);
  await restart();
  const at = (await getContext(resumed)).info;
  const receivedAtRestart = Number(at?.bytes_received ?? -1);
  if (receivedAtRestart < 0 || receivedAtRestart > sentBeforeKill)
    problem(`kill -9: bytes_received ${receivedAtRestart} after restart, but only ${sentBeforeKill} bytes were sent`);
  const rest = await upload(
    resumed,
    pieceStream(text.subarray(Math.max(0, receivedAtRestart)), [65536], 2),
    true,
    "resume_upload",
  );
  if (rest.status !== 200) problem(`resume upload: ${rest.status} ${rest.body.slice(0, 200)}`);

  const oneShot = await createContext();
  const full = await upload(oneShot, text, true, "oneshot_upload");
  if (full.status !== 200) problem(`one-shot upload: ${full.status} ${full.body.slice(0, 200)}`);

  const a = (await getContext(resumed)).info ?? {};
  const b = (await getContext(oneShot)).info ?? {};
  const same = (file: string): boolean | null => {
    const pa = join(dataDir, "contexts", resumed, file);
    const pb = join(dataDir, "contexts", oneShot, file);
    if (!existsSync(pa) || !existsSync(pb)) return null; // the layout changed: only the API figures count
    return Buffer.compare(readFileSync(pa), readFileSync(pb)) === 0;
  };
  const ask = async (id: string) => {
    const r = await call(
      "kill_answer",
      `/v1/contexts/${id}/query`,
      jsonInit({ question: "Who crossed the river?", max_tokens: 24, temperature: 0, seed: 5, stream: false }),
    );
    return r.status === 200 ? String(parse(r)?.text) : `HTTP ${r.status} ${r.body.slice(0, 100)}`;
  };
  const [ansA, ansB] = [await ask(resumed), await ask(oneShot)];
  const res: KillResult = {
    bytes: text.byteLength,
    receivedAtRestart,
    sentBeforeKill,
    bytesLost: text.byteLength - Number(a.bytes_received ?? 0),
    tokensResumed: Number(a.tokens_received ?? -1),
    tokensOneShot: Number(b.tokens_received ?? -2),
    tokensBinEqual: same("tokens.bin"),
    embBinEqual: same("emb.bin"),
    answerEqual: ansA === ansB && !ansA.startsWith("HTTP"),
  };
  if (res.bytesLost !== 0)
    problem(`kill -9: ${res.bytesLost} bytes lost (${a.bytes_received} of ${text.byteLength} stored)`);
  if (res.tokensResumed !== res.tokensOneShot)
    problem(`kill -9: ${res.tokensResumed} tokens after resume vs ${res.tokensOneShot} one-shot`);
  if (a.state !== "ready" || b.state !== "ready") problem(`kill -9: states ${a.state} / ${b.state}, expected ready`);
  if (res.tokensBinEqual === false) problem("kill -9: tokens.bin differs from the one-shot upload's");
  if (res.embBinEqual === false) problem("kill -9: emb.bin differs from the one-shot upload's");
  if (!res.answerEqual) problem(`kill -9: greedy answers differ: ${JSON.stringify(ansA)} vs ${JSON.stringify(ansB)}`);
  return res;
}

interface HangUpResult {
  bytes: number;
  storedAtHangUp: number;
  busyMs: number; // how long resumes were answered 409 offset_mismatch after the client left
  bytesLost: number;
  tokensMatch: boolean;
}

/**
 * The client (not the server) goes away mid-upload. Resuming follows the README: read `bytes_received` and
 * send the rest with `?offset=`; while the interrupted request still stores what it read, the resume waits
 * for it, and a stale offset is answered 409 offset_mismatch (read again and retry).
 */
async function hangUpDuringUpload(): Promise<HangUpResult> {
  const text = makeText(256 << 10, 7);
  const id = await createContext();
  const ac = new AbortController();
  let sent = 0;
  const body = new ReadableStream<Uint8Array>({
    async pull(ctrl) {
      if (sent >= text.byteLength / 2) {
        await Bun.sleep(200);
        ac.abort();
        return;
      }
      await Bun.sleep(10);
      ctrl.enqueue(text.subarray(sent, sent + 4096));
      sent += 4096;
    },
  });
  await upload(id, body, true, "hangup_upload", ac.signal);
  const storedAtHangUp = Number((await getContext(id)).info?.bytes_received ?? -1);
  const t0 = performance.now();
  let busyMs = 0;
  for (;;) {
    const from = Number((await getContext(id)).info?.bytes_received ?? 0);
    if (from > sent) problem(`after a client hang-up: bytes_received ${from} but only ${sent} bytes were sent`);
    const rest = await upload(id, text.subarray(from), true, "hangup_resume", undefined, from);
    if (rest.status === 200) break;
    if (rest.status !== 409 || parse(rest)?.error?.code !== "offset_mismatch") {
      problem(`resume after a client hang-up: ${rest.status} ${rest.body.slice(0, 200)}`);
      break;
    }
    busyMs = performance.now() - t0;
    if (busyMs > 120_000) {
      problem("after a client hang-up: no resume succeeded for 120 s");
      break;
    }
  }
  const info = (await getContext(id)).info ?? {};
  const count = parse(
    await call("audit", "/v1/tokenize", jsonInit({ text: new TextDecoder().decode(text), add_special_tokens: false })),
  )?.count;
  const res: HangUpResult = {
    bytes: text.byteLength,
    storedAtHangUp,
    busyMs,
    bytesLost: text.byteLength - Number(info.bytes_received ?? 0),
    tokensMatch: count === info.tokens_received,
  };
  if (res.bytesLost !== 0)
    problem(`client hang-up: ${res.bytesLost} bytes lost (${info.bytes_received} of ${text.byteLength} stored)`);
  if (!res.tokensMatch)
    problem(`client hang-up: ${info.tokens_received} tokens stored, the tokenizer gives ${count} for the text`);
  return res;
}

function dropProblems(re: RegExp): void {
  for (let i = problems.length - 1; i >= 0; i--) if (re.test(problems[i]!)) problems.splice(i, 1);
}

// ---------------------------------------------------------------- 3. concurrency

interface UploadLedger {
  sent: number;
  text: Uint8Array[];
  finalized: boolean;
  deleted: boolean;
}

async function concurrency(seedReady: string[]): Promise<{ ledgers: Map<string, UploadLedger>; deletes: number }> {
  const deadline = Date.now() + SECONDS * 1000;
  const live = () => Date.now() < deadline;
  const ready = [...seedReady]; // contexts queriers may use
  const doomed = new Set<string>(); // deleted or about to be: 404 / 410 expected there
  const ledgers = new Map<string, UploadLedger>();
  let rnd = 12345;
  const rand = () => (rnd = (Math.imul(rnd, 1664525) + 1013904223) >>> 0) / 2 ** 32;

  const expectOk = (
    what: string,
    ctx: string,
    r: { outcome: Outcome; errorCode?: string | null },
    okCodes: number[] = [200],
  ) => {
    if (typeof r.outcome !== "number") return;
    if (okCodes.includes(r.outcome) && !r.errorCode) return;
    if (doomed.has(ctx) && (r.outcome === 404 || r.outcome === 410 || r.errorCode === "context_deleted")) return;
    if (r.outcome < 500) problem(`${what} on ${ctx}: unexpected ${r.outcome}${r.errorCode ? ` (${r.errorCode})` : ""}`);
  };

  const uploader = async (k: number) => {
    while (live()) {
      const id = await createContext();
      const led: UploadLedger = { sent: 0, text: [], finalized: false, deleted: false };
      ledgers.set(id, led);
      const pieces = 2 + Math.floor(rand() * 4);
      const finalize = rand() < 0.6;
      for (let i = 0; i < pieces && live(); i++) {
        const bytes = makeText(8192 + Math.floor(rand() * 32768), k * 1000 + i + samples.length);
        const last = finalize && i === pieces - 1;
        const streamed = rand() < 0.5;
        const r = await upload(
          id,
          streamed ? pieceStream(bytes, [1500, 4096, 777], 3) : bytes,
          last,
          streamed ? "upload_stream" : "upload",
        );
        if (r.status === 200) {
          led.sent += bytes.byteLength;
          led.text.push(bytes);
          led.finalized = last;
        } else expectOk("upload", id, { outcome: r.status });
      }
      if (led.finalized) ready.push(id);
    }
  };

  const querier = async () => {
    const kinds: QueryKind[] = ["query_sse", "chat_stream", "chat", "completion_stream"];
    while (live()) {
      const ctx = ready[Math.floor(rand() * ready.length)]!;
      const kind = kinds[Math.floor(rand() * kinds.length)]!;
      const disconnect = kind !== "chat" && rand() < 0.2;
      const r = await query(kind, ctx, { disconnectAfterFirst: disconnect });
      expectOk(kind, ctx, r);
    }
  };

  let deletes = 0;
  const deleter = async () => {
    while (live()) {
      await Bun.sleep(2000);
      if (!live()) break;
      // a victim queried (long answer) and a victim uploaded (slow body), both deleted mid-way
      const qv = await createContext();
      await upload(qv, makeText(20_000, deletes), true, "upload");
      ready.push(qv);
      const uv = await createContext();
      // end-of-text banned, so the answer is still running when the context goes
      const noEnd = { logit_bias: { [TINY_EOS_ID]: -100, [TINY_EOT_ID]: -100 } };
      const q = query("query_sse", qv, { maxTokens: 4000, temperature: 1, extra: noEnd });
      const u = upload(uv, pieceStream(makeText(400_000, deletes + 7), [2048], 5), false, "upload_victim");
      await Bun.sleep(300);
      doomed.add(qv);
      doomed.add(uv);
      for (const id of [qv, uv]) {
        const d = await call("delete", `/v1/contexts/${id}`, { method: "DELETE" });
        if (d.status !== 200) problem(`delete ${id}: ${d.status} ${d.body.slice(0, 200)}`);
        deletes++;
      }
      const [qr, ur] = await Promise.all([q, u]);
      if (!(qr.errorCode === "context_deleted" || qr.outcome === 410 || qr.outcome === 404))
        problem(`query on a deleted context ended with ${qr.outcome} ${qr.errorCode ?? "(no error event)"}`);
      if (!(ur.status === 410 || ur.status === 404))
        problem(`upload into a deleted context ended with ${ur.status} ${ur.body.slice(0, 200)}`);
      const after = await getContext(qv);
      if (after.status !== 404) problem(`GET a deleted context: ${after.status}`);
    }
  };

  await Promise.all([
    ...Array.from({ length: UPLOADERS }, (_, k) => uploader(k)),
    ...Array.from({ length: QUERIERS }, () => querier()),
    deleter(),
  ]);
  return { ledgers, deletes };
}

/** Bytes and tokens stored for every upload this campaign completed (deleted contexts excluded). */
async function auditUploads(
  ledgers: Map<string, UploadLedger>,
): Promise<{ contexts: number; bytesSent: number; bytesLost: number; tokenMismatches: number }> {
  let contexts = 0;
  let bytesSent = 0;
  let bytesLost = 0;
  let tokenMismatches = 0;
  for (const [id, led] of ledgers) {
    const { status, info } = await getContext(id, "audit");
    if (status !== 200 || !info) {
      problem(`audit ${id}: GET ${status}`);
      continue;
    }
    contexts++;
    bytesSent += led.sent;
    const lost = led.sent - Number(info.bytes_received);
    if (lost !== 0) problem(`upload ${id}: sent ${led.sent} bytes, stored ${info.bytes_received}`);
    bytesLost += Math.abs(lost);
    if (!led.finalized) continue;
    // decoded as the server decodes a stream: a character cut at a piece's end becomes U+FFFD
    const whole = new TextDecoder().decode(Buffer.concat(led.text));
    const t = await call("audit", "/v1/tokenize", jsonInit({ text: whole, add_special_tokens: false }));
    const count = parse(t)?.count;
    if (count !== info.tokens_received) {
      tokenMismatches++;
      problem(`upload ${id}: ${info.tokens_received} tokens stored, the tokenizer gives ${count} for the same text`);
    }
  }
  return { contexts, bytesSent, bytesLost, tokenMismatches };
}

// ---------------------------------------------------------------- main

async function main(): Promise<number> {
  const root = mkdtempSync(join(tmpdir(), "reform-soak-"));
  const modelDir = await makeTinyModel(join(root, "model"));
  const dataDir = join(root, "data");
  const port = await freePort();
  base = `http://${HOST}:${port}`;
  const logFile = join(root, "server.log");
  const sampler = setInterval(sampleRss, 500);
  const t0 = Date.now();
  let exit = 1;
  try {
    await startServer(modelDir, dataDir, port, logFile);

    phase = "bad_inputs";
    const ready = await createContext();
    await upload(ready, makeText(30_000, 1), true, "upload");
    const processing = await createContext();
    await upload(processing, makeText(3000, 2), false, "upload");
    const emptyFinal = await createContext();
    await call("finalize", `/v1/contexts/${emptyFinal}/finalize`, { method: "POST" });
    const bad = await badInputs(ready, processing, emptyFinal);

    phase = "hangup";
    const hangup = await hangUpDuringUpload();

    phase = "kill9";
    const kill = await killDuringUpload(() => startServer(modelDir, dataDir, port, `${logFile}.2`), dataDir);

    phase = "concurrency";
    const seeds: string[] = [];
    for (let i = 0; i < 3; i++) {
      const id = await createContext();
      await upload(id, makeText(60_000 + i * 20_000, 10 + i), true, "upload");
      seeds.push(id);
    }
    const tc = Date.now();
    const conc = await concurrency(seeds);
    const concSeconds = (Date.now() - tc) / 1000;
    phase = "audit";
    const audit = await auditUploads(conc.ledgers);
    const h = await call("health", "/health");
    if (h.status !== 200) problem(`/health after the campaign: ${h.status}`);
    const concRss = rss.filter((s) => s.phase === "concurrency").map((s) => s.kb);
    exit = report({
      bad,
      hangup,
      kill,
      conc: { seconds: concSeconds, deletes: conc.deletes, ...audit },
      concRss,
      totalSeconds: (Date.now() - t0) / 1000,
    });
  } catch (e) {
    problem(`campaign aborted: ${(e as Error).stack ?? e}`);
    console.error(problems.join("\n"));
  } finally {
    clearInterval(sampler);
    await stopServer();
    if (args.keep) console.error(`kept ${root}`);
    else rmSync(root, { recursive: true, force: true });
  }
  return exit;
}

function report(r: {
  bad: { sent: number; failed: number };
  hangup: HangUpResult;
  kill: KillResult;
  conc: {
    seconds: number;
    deletes: number;
    contexts: number;
    bytesSent: number;
    bytesLost: number;
    tokenMismatches: number;
  };
  concRss: number[];
  totalSeconds: number;
}): number {
  const byClass: Record<string, number> = {};
  for (const s of samples) byClass[statusClass(s.outcome)] = (byClass[statusClass(s.outcome)] ?? 0) + 1;
  const unexpected = samples.filter(
    (s) => s.outcome === "conn_error" || (typeof s.outcome === "number" && s.outcome >= 500),
  ).length;
  const kinds = [...new Set(samples.map((s) => s.kind))].sort();
  const lat: Record<string, { n: number; p50: number; p90: number; p99: number }> = {};
  for (const k of kinds) {
    const ms = samples
      .filter((s) => s.kind === k && typeof s.outcome === "number")
      .map((s) => s.ms)
      .sort((a, b) => a - b);
    lat[k] = { n: ms.length, p50: pct(ms, 50), p90: pct(ms, 90), p99: pct(ms, 99) };
  }
  const allRss = rss.map((s) => s.kb);
  const mib = (kb: number) => (kb / 1024).toFixed(1);
  const bytesLost = r.hangup.bytesLost + r.kill.bytesLost + r.conc.bytesLost;
  const ok = problems.length === 0;
  const streams = new Set<string>(["query_sse", "chat_stream", "completion_stream"]);

  const lines: string[] = [];
  lines.push(
    `soak: ${samples.length} requests in ${r.totalSeconds.toFixed(1)} s (concurrency phase ${r.conc.seconds.toFixed(1)} s, ${UPLOADERS} uploaders, ${QUERIERS} queriers, 1 deleter)`,
  );
  lines.push(
    `  by outcome            ${Object.entries(byClass)
      .sort()
      .map(([k, v]) => `${k} ${v}`)
      .join(", ")}`,
  );
  lines.push(
    `  deliberate hang-ups   ${disconnects} streams closed after their first token, 1 upload abandoned by the client, 1 cut by kill -9`,
  );
  lines.push(`  unexpected errors     ${unexpected} (5xx + connection errors not caused on purpose)`);
  lines.push(
    `  bad inputs            ${r.bad.sent} sent, ${r.bad.failed} not a 4xx OpenAI error (or /health not 200 after)`,
  );
  lines.push(
    `  client hang-up        ${r.hangup.bytes} B upload, ${r.hangup.storedAtHangUp} B stored when the client left, stale-offset retries for ${r.hangup.busyMs.toFixed(0)} ms; resumed: lost ${r.hangup.bytesLost} B, tokens ${r.hangup.tokensMatch ? "match" : "DIFFER"}`,
  );
  lines.push(
    `  kill -9 upload        ${r.kill.bytes} B, killed with ${r.kill.sentBeforeKill} B sent, ${r.kill.receivedAtRestart} B stored at restart; resumed: lost ${r.kill.bytesLost} B`,
  );
  lines.push(
    `                        tokens ${r.kill.tokensResumed} resumed vs ${r.kill.tokensOneShot} one-shot; tokens.bin ${eq(r.kill.tokensBinEqual)}, emb.bin ${eq(r.kill.embBinEqual)}, greedy answer ${r.kill.answerEqual ? "identical" : "DIFFERS"}`,
  );
  lines.push(
    `  uploads audited       ${r.conc.contexts} contexts, ${r.conc.bytesSent} B sent, ${r.conc.bytesLost} B lost, ${r.conc.tokenMismatches} token-count mismatches; ${r.conc.deletes} deletes under load`,
  );
  lines.push(`  bytes lost (total)    ${bytesLost}`);
  lines.push(
    `  server RSS            concurrency ${mib(Math.min(...r.concRss))}-${mib(Math.max(...r.concRss))} MiB; whole run ${mib(Math.min(...allRss))}-${mib(Math.max(...allRss))} MiB (${allRss.length} samples)`,
  );
  lines.push("");
  lines.push(
    `  ${"request kind".padEnd(26)}${"n".padStart(7)}${"p50 ms".padStart(10)}${"p90 ms".padStart(10)}${"p99 ms".padStart(10)}`,
  );
  for (const k of kinds) {
    const l = lat[k]!;
    if (l.n === 0) continue;
    const name = streams.has(k) ? `${k} (TTFT)` : k;
    lines.push(`  ${name.padEnd(26)}${String(l.n).padStart(7)}${fmt(l.p50)}${fmt(l.p90)}${fmt(l.p99)}`);
  }
  lines.push("");
  lines.push(ok ? "  invariants            all held" : `  invariants            ${problems.length} BROKEN:`);
  for (const p of problems) lines.push(`    - ${p}`);
  console.log(lines.join("\n"));
  if (args.json) {
    console.log(
      JSON.stringify({
        ok,
        requests: samples.length,
        by_outcome: byClass,
        unexpected_errors: unexpected,
        disconnects,
        bad_inputs: r.bad,
        hangup: r.hangup,
        kill9: r.kill,
        uploads: r.conc,
        bytes_lost: bytesLost,
        rss_kib: {
          concurrency: [Math.min(...r.concRss), Math.max(...r.concRss)],
          run: [Math.min(...allRss), Math.max(...allRss)],
        },
        latency_ms: lat,
        problems,
      }),
    );
  }
  return ok ? 0 : 1;
}

function eq(v: boolean | null): string {
  return v === null ? "not found" : v ? "identical" : "DIFFERS";
}

function fmt(v: number): string {
  return (Number.isNaN(v) ? "-" : v.toFixed(1)).padStart(10);
}

process.exit(await main());
