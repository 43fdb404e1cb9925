#!/usr/bin/env bun
/**
 * bun run ask FILE|DIR "question" [--server URL] [--method reform|full|streaming|h2o] [--budget N]
 *             [--max-tokens N] [--temperature T] [--context ID [--resume]] [--keep] [--api-key KEY]
 * Uploads FILE ("-" = stdin; a directory: its text files, each after a `==> path <==` line) to a running server as
 * a new context, shows compression progress on stderr
 * (tokens compressed, rate, ETA, from the context's events stream), then streams the answer to stdout.
 *
 * Big inputs take minutes to compress, and an upload request answers only once its bytes are compressed, so
 * the file goes up in pieces (`?offset=`, the server's resume protocol) sized to take about 30 s each: no
 * request waits long for its answer, and Bun's fetch timeouts are switched off besides. The context id is
 * printed as soon as the context exists; after any failure the context is kept and the commands to resume
 * (`--context ID --resume`) or delete it are printed.
 */
import { closeSync, existsSync, lstatSync, openSync, readdirSync, readFileSync, readSync, statSync } from "node:fs";
import { basename, join, relative, resolve } from "node:path";
import { sseEvents } from "../util/sse.ts";
import { byteOrderMark, isGzip, notTextReason, SNIFF_BYTES } from "../util/text-sniff.ts";
import { intFlag, numFlag, parseFlags, runCli, UsageError, valueFlags } from "./args.ts";
import { type PropsLimits, preflight } from "./ask-preflight.ts";

const USAGE = `usage: bun run ask FILE|DIR "question" [options]
       bun run ask --context ID "question" [options]

  --server URL         server address (default http://127.0.0.1:8080)   env REFORM_SERVER
  --api-key KEY        bearer token                                     env REFORM_API_KEY
  --method M           reform (default) | full | streaming | h2o
  --budget N           recompute budget in context tokens (server default when omitted)
  --max-tokens N       answer length limit
  --temperature T      sampling temperature (default 0 = greedy)
  --context ID         ask an already uploaded context (no upload)
  --resume             with --context ID and FILE: upload the rest of FILE (from the bytes the context
                       has), finalize, then ask: what a failed or interrupted upload tells you to run
  --keep               keep the uploaded context after a successful answer (it is always kept after a
                       failure, with the commands to resume or delete it)
  --piece-bytes N      first upload request size (default 1 MiB; later ones aim at ~30 s each)
  -q, --quiet          no progress output
  -h, --help           show this help
FILE "-" reads the context from stdin. DIR (a code base): its text files in path order, each after a line
"==> path <==" (hidden entries, node_modules and files that are not text or cannot be read are left out, and counted).`;

const DEFAULT_SERVER = "http://127.0.0.1:8080";

function fmtBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const u = ["KiB", "MiB", "GiB", "TiB"];
  let v = n / 1024;
  let k = 0;
  while (v >= 1024 && k < u.length - 1) {
    v /= 1024;
    k++;
  }
  return `${v.toFixed(1)} ${u[k]}`;
}

/** fetch without Bun's own timeout (5 minutes without a byte): compression may legitimately take longer. */
function call(url: string, init: RequestInit = {}): Promise<Response> {
  return fetch(url, { ...init, timeout: false } as RequestInit);
}

function fmtSecs(s: number): string {
  if (!Number.isFinite(s)) return "?";
  if (s < 60) return `${Math.round(s)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.round((s % 3600) / 60)).padStart(2, "0")}m`;
}

/** Seconds each upload request should take: short enough that no request waits long for its answer. */
const PIECE_TARGET_S = 30;
/** How often, and how far apart, the first piece of a resume is retried while the server stores a dropped piece. */
const RESUME_RETRIES = 10;
const RESUME_WAIT_MS = 500;

/**
 * A directory as one document: its text files in path order, each after a line "==> path <==" (as `head` prints
 * several files), so that an answer can name the file. Hidden entries and node_modules are left out, and so are
 * symbolic links, empty files and files whose first bytes are not text (text-sniff.ts). The same tree gives the
 * same bytes, so an interrupted upload resumes from its offset.
 */
export function directoryDocument(dir: string): { doc: Blob; files: number; skipped: string[] } {
  const parts: Uint8Array[] = [];
  const skipped: string[] = [];
  let files = 0;
  const enc = new TextEncoder();
  const walk = (d: string) => {
    for (const name of readdirSync(d).sort()) {
      if (name.startsWith(".") || name === "node_modules") continue;
      const p = join(d, name);
      const st = lstatSync(p);
      if (st.isDirectory()) walk(p);
      else if (st.isFile() && st.size > 0) {
        // the first bytes say whether it is text: a large binary (a checkpoint, a build artefact) is not read whole
        let bytes: Uint8Array;
        try {
          const head = readHead(p, SNIFF_BYTES);
          if (notTextReason(head) !== null) {
            skipped.push(relative(dir, p));
            continue;
          }
          bytes = readFileSync(p);
        } catch {
          skipped.push(relative(dir, p)); // unreadable (permissions, gone meanwhile): left out and counted
          continue;
        }
        parts.push(enc.encode(`${files ? "\n" : ""}==> ${relative(dir, p)} <==\n`), bytes);
        files++;
      }
    }
  };
  walk(dir);
  return { doc: new Blob(parts), files, skipped };
}

/** The first `n` bytes of a file (fewer when it is shorter). */
function readHead(file: string, n: number): Uint8Array {
  const head = new Uint8Array(n);
  const fd = openSync(file, "r");
  try {
    return head.subarray(0, readSync(fd, head, 0, n, 0));
  } finally {
    closeSync(fd);
  }
}

/** A gzip file decompressed, a UTF-16 one (byte-order mark) converted to UTF-8; null for any other file. */
export function fileAsText(file: string): { doc: Blob; how: string } | null {
  const head = readHead(file, 2);
  let bytes: Uint8Array | null = null;
  let how = "";
  if (isGzip(head)) {
    bytes = Bun.gunzipSync(readFileSync(file));
    how = "gzip, decompressed";
  }
  const b = bytes ?? head;
  const utf16 = byteOrderMark(b);
  if (utf16) {
    const text = new TextDecoder(utf16).decode(bytes ?? readFileSync(file));
    bytes = new TextEncoder().encode(text);
    how = how ? `${how}, UTF-16 converted` : "UTF-16, converted";
  }
  return bytes ? { doc: new Blob([bytes]), how } : null;
}

interface UploadArgs {
  server: string;
  headers: Record<string, string>;
  id: string;
  file: string;
  /** the document, when it is not the file itself (a directory's text files) */
  doc?: Blob;
  /** continue from the bytes the context already has */
  resume: boolean;
  status: (s: string, force?: boolean) => void;
  endStatus: () => void;
  signal: AbortSignal;
  firstPiece?: number;
}

/**
 * Uploads `file` in pieces, then finalizes; shows progress from the events stream meanwhile. Throws on failure
 * (the caller prints how to resume or delete the context).
 */
async function upload(a: UploadArgs): Promise<void> {
  const { server, headers, id, status } = a;
  const ctxUrl = `${server}/v1/contexts/${id}`;
  const stdin = a.file === "-";
  const doc = a.doc ?? (stdin ? null : Bun.file(a.file));
  const total = doc ? doc.size : 0;
  let offset = 0;
  const readOffset = async () => {
    const info = await call(ctxUrl, { headers });
    if (!info.ok) throw new Error(await apiError(info));
    offset = ((await info.json()) as { bytes_received: number }).bytes_received;
    if (offset > total) throw new Error(`the context has ${offset} bytes, more than ${a.file} (${total})`);
  };
  if (a.resume) await readOffset();
  /**
   * Right after an interrupted upload the server may still be storing the piece it was receiving: the offset read
   * above is then short of it (409 offset_mismatch) or the dropped upload still holds the context (409
   * context_busy). The first piece of a resume then re-reads the context's bytes and tries again, a few times.
   */
  let resumeRetries = a.resume ? RESUME_RETRIES : 0;

  // progress from the events stream: rate over the last ~10 s, ETA from the tokens per byte so far
  const t0 = performance.now();
  const progressAc = new AbortController();
  const samples: { t: number; processed: number }[] = [];
  const progress = (async () => {
    try {
      const ev = await call(`${ctxUrl}/events?follow=true`, { headers, signal: progressAc.signal });
      if (!ev.ok) return;
      for await (const e of sseEvents(ev)) {
        if (e.event !== "progress") continue;
        const p = JSON.parse(e.data) as { bytes_received: number; tokens_received: number; tokens_processed: number };
        const t = performance.now();
        samples.push({ t, processed: p.tokens_processed });
        while (samples.length > 2 && t - samples[0]!.t > 10_000) samples.shift();
        const first = samples[0]!;
        const rate = t > first.t ? ((p.tokens_processed - first.processed) * 1000) / (t - first.t) : 0;
        const perByte = p.bytes_received > 0 ? p.tokens_received / p.bytes_received : 0;
        const expected = total > 0 ? Math.max(p.tokens_received, Math.round(perByte * total)) : p.tokens_received;
        const eta = rate > 0 ? (expected - p.tokens_processed) / rate : Number.NaN;
        const sent =
          total > 0
            ? `${((100 * p.bytes_received) / total).toFixed(1)}% of ${fmtBytes(total)}`
            : fmtBytes(p.bytes_received);
        status(
          `uploaded ${sent}; compressed ${p.tokens_processed.toLocaleString("en-US")} / ${total > 0 ? "~" : ""}${expected.toLocaleString("en-US")} tokens, ` +
            `${Math.round(rate).toLocaleString("en-US")} tok/s, ETA ${fmtSecs(eta)}`,
          false,
        );
      }
    } catch {
      /* closed by us, or the server went away (the upload itself reports that) */
    }
  })();

  try {
    let piece = a.firstPiece ?? 1 << 20;
    const put = async (body: Blob | Uint8Array, n: number) => {
      const t = performance.now();
      const res = await call(`${ctxUrl}/content?offset=${offset}`, {
        method: "PUT",
        headers: { ...headers, "content-type": "text/plain; charset=utf-8" },
        body,
        signal: a.signal,
      });
      if (!res.ok) {
        const msg = await apiError(res);
        if (res.status === 409 && resumeRetries > 0 && /^409 (offset_mismatch|context_busy):/.test(msg)) {
          resumeRetries--;
          await Bun.sleep(RESUME_WAIT_MS);
          await readOffset();
          return;
        }
        throw new Error(msg);
      }
      resumeRetries = 0;
      await res.arrayBuffer();
      offset += n;
      const secs = (performance.now() - t) / 1000;
      piece = Math.round(Math.min(64 << 20, Math.max(64 << 10, (piece * PIECE_TARGET_S) / Math.max(secs, 0.05))));
    };
    if (doc) {
      while (offset < total) {
        const n = Math.min(piece, total - offset);
        await put(doc.slice(offset, offset + n), n);
      }
    } else {
      const reader = (Bun.stdin.stream() as ReadableStream<Uint8Array>).getReader();
      let buf: Uint8Array[] = [];
      let have = 0;
      for (;;) {
        const r = await reader.read();
        if (!r.done) {
          buf.push(r.value);
          have += r.value.byteLength;
        }
        if ((r.done && have > 0) || have >= piece) {
          const all = new Uint8Array(have);
          let o = 0;
          for (const b of buf) {
            all.set(b, o);
            o += b.byteLength;
          }
          buf = [];
          have = 0;
          await put(all, all.byteLength);
        }
        if (r.done) break;
      }
    }
    const fin = await call(`${ctxUrl}/finalize`, { method: "POST", headers, signal: a.signal });
    if (!fin.ok) throw new Error(await apiError(fin));
    const info = (await fin.json()) as { bytes_received: number; tokens_processed: number; disk_bytes?: number };
    const secs = (performance.now() - t0) / 1000;
    status(
      `context ${id}: ${fmtBytes(info.bytes_received)}, ${info.tokens_processed.toLocaleString("en-US")} tokens compressed in ${secs.toFixed(1)} s ` +
        `(${Math.round(info.tokens_processed / Math.max(secs, 1e-3)).toLocaleString("en-US")} tok/s)` +
        (info.disk_bytes !== undefined ? `, ${fmtBytes(info.disk_bytes)} on disk` : ""),
    );
    a.endStatus();
  } finally {
    progressAc.abort();
    await progress;
  }
}

async function apiError(res: Response): Promise<string> {
  const text = await res.text();
  try {
    const j = JSON.parse(text);
    return `${res.status} ${j.error?.code ?? ""}: ${j.error?.message ?? text}`;
  } catch {
    return `${res.status}: ${text.slice(0, 500)}`;
  }
}

async function main() {
  const { values, positionals } = parseFlags(
    process.argv.slice(2),
    {
      ...valueFlags("api-key", "method", "budget", "max-tokens", "temperature", "context", "piece-bytes"),
      server: { type: "string", short: "s" },
      keep: { type: "boolean" },
      resume: { type: "boolean" },
      quiet: { type: "boolean", short: "q" },
    },
    true,
  );
  if (values.help) {
    console.log(USAGE);
    return;
  }
  const reuse = values.context;
  let file: string | undefined;
  let question: string | undefined;
  if (reuse) {
    if (positionals.length === 1) question = positionals[0];
    else if (positionals.length === 2) [file, question] = positionals;
    else throw new UsageError("expected a question");
  } else {
    if (positionals.length !== 2) throw new UsageError("expected FILE and a question");
    [file, question] = positionals;
    if (file !== "-" && !existsSync(file!)) throw new Error(`file not found: ${file}`);
    if (file !== "-" && !statSync(file!).isFile() && !statSync(file!).isDirectory())
      throw new Error(
        `${file} is neither a file nor a directory (a pipe?): send it on stdin: cmd | bun run ask - "question"`,
      );
  }
  if (!question?.trim()) throw new UsageError("the question is empty");
  if (values.resume && !reuse) throw new UsageError("--resume needs --context ID (the context to continue)");
  if (values.resume && file !== undefined && file !== "-" && !existsSync(file))
    throw new Error(`file not found: ${file}`);

  const server = (values.server ?? process.env.REFORM_SERVER ?? DEFAULT_SERVER).replace(/\/+$/, "");
  const apiKey = values["api-key"] ?? process.env.REFORM_API_KEY;
  const headers: Record<string, string> = apiKey ? { authorization: `Bearer ${apiKey}` } : {};
  const quiet = values.quiet === true;
  const tty = process.stderr.isTTY;
  let lastStatus = 0;
  const status = (s: string, force = true) => {
    if (quiet) return;
    const now = Date.now();
    if (!force && now - lastStatus < (tty ? 100 : 2000)) return; // throttle progress redraws
    lastStatus = now;
    if (tty) process.stderr.write(`\r\x1b[K${s}`);
    else process.stderr.write(`${s}\n`);
  };
  const endStatus = () => {
    if (!quiet && tty) process.stderr.write("\n");
  };

  const body: Record<string, unknown> = {
    question,
    method: values.method ?? "reform",
    stream: true,
  };
  const budget = intFlag("budget", values.budget);
  const maxTokens = intFlag("max-tokens", values["max-tokens"]);
  const temperature = numFlag("temperature", values.temperature);
  if (budget !== undefined) body.budget = budget;
  if (maxTokens !== undefined) body.max_tokens = maxTokens;
  if (temperature !== undefined) body.temperature = temperature;

  // Is the server up (and the model loaded)?
  for (let i = 0; ; i++) {
    let h: Response;
    try {
      h = await call(`${server}/health`);
    } catch (e) {
      throw new Error(
        `cannot reach the server at ${server}: ${(e as Error).message} (start it with: bun run serve, add --port N for another port than 8080 and pass --server here)`,
      );
    }
    if (h.ok) break;
    const j = (await h.json().catch(() => ({}))) as { status?: string; reason?: string };
    if (j.status === "failed") throw new Error(`the server failed to load its model: ${j.reason}`);
    if (i === 0) status("waiting for the server to load its model...");
    await Bun.sleep(1000);
  }

  // a directory (a code base) goes up as one document of its text files; a gzip file decompressed and UTF-16 converted
  // here, so that the offsets of a resume are the text's (the server refuses to resume a body it converts)
  let doc: Blob | undefined;
  if (file !== undefined && file !== "-" && statSync(file).isFile()) {
    const text = fileAsText(file);
    if (text) {
      doc = text.doc;
      status(`${file}: ${text.how}, ${fmtBytes(doc.size)} of text`);
      endStatus();
    }
  }
  if (file !== undefined && file !== "-" && statSync(file).isDirectory()) {
    const d = directoryDocument(file);
    if (d.files === 0)
      throw new Error(`no text file in ${file}${d.skipped.length ? ` (${d.skipped.length} not text)` : ""}`);
    doc = d.doc;
    const left = d.skipped.length
      ? `; ${d.skipped.length} left out (not text, or unreadable): ${d.skipped.slice(0, 5).join(", ")}${d.skipped.length > 5 ? ", ..." : ""}`
      : "";
    status(`${file}: ${d.files} text files, ${fmtBytes(doc.size)}${left}`);
    endStatus();
  }

  // an empty document would be uploaded, then refused by every query (409 context_empty)
  if (!reuse && file !== undefined && file !== "-" && (doc?.size ?? statSync(file).size) === 0)
    throw new Error(`${file} is empty: there is nothing to ask about; nothing was uploaded`);

  // what the server would refuse only after the whole upload is checked against GET /props first
  if (!reuse || values.resume) {
    const props = await call(`${server}/props`, { headers }).catch(() => null);
    const limits = props?.ok ? ((await props.json().catch(() => ({}))) as { limits?: PropsLimits }).limits : undefined;
    if (limits) {
      const size = doc?.size ?? (file !== undefined && file !== "-" ? statSync(file).size : undefined);
      const tokenize = async (text: string) => {
        const r = await call(`${server}/v1/tokenize`, {
          method: "POST",
          headers: { ...headers, "content-type": "application/json" },
          body: JSON.stringify({ prompt: text, add_special_tokens: false }),
        }).catch(() => null);
        return r?.ok ? (((await r.json().catch(() => ({}))) as { count?: number }).count ?? null) : null;
      };
      const why = await preflight(limits, {
        method: body.method as string,
        budget,
        maxTokens,
        documentBytes: size,
        questionTokens: () => tokenize(question!),
      });
      if (why) throw new Error(`${why}; nothing was uploaded`);
    }
  }

  let contextId = reuse;
  const created = !reuse;
  /**
   * What to do with the context after a failure: it is kept, so say how to resume, ask again or delete it, with
   * the server and key this run used. After an upload was cut off the context is not ready: asking it again would
   * only be refused (409 context_not_ready), so then only resuming and deleting are offered.
   */
  // the flags a printed command repeats: the key from --api-key must be given again; one from REFORM_API_KEY is
  // still in the environment
  const opts =
    (server !== DEFAULT_SERVER ? ` --server ${server}` : "") +
    (values["api-key"] !== undefined ? " --api-key KEY" : "");
  const hints = (id: string, uploadCut: boolean) => {
    const auth = apiKey ? ` -H 'authorization: Bearer ${apiKey}'` : "";
    const q = JSON.stringify(question);
    const lines = [`ask: the context ${id} is kept on the server.`];
    if (uploadCut && file !== undefined && file !== "-")
      lines.push(`  resume the upload and ask:  bun run ask ${file} ${q} --context ${id} --resume${opts}`);
    if (!uploadCut) lines.push(`  ask it again:               bun run ask --context ${id} ${q}${opts}`);
    lines.push(`  delete it:                  curl -X DELETE${auth} ${server}/v1/contexts/${id}`);
    console.error(lines.join("\n"));
  };
  const ac = new AbortController();
  process.on("SIGINT", () => ac.abort());

  if (!contextId) {
    const res = await call(`${server}/v1/contexts`, {
      method: "POST",
      headers: { ...headers, "content-type": "application/json" },
      // `name` is what GET /v1/models shows a chat frontend's model picker (routes/openai.ts contextName)
      body: JSON.stringify({
        metadata: file === "-" ? { source: "stdin", name: "stdin" } : { source: file, name: basename(resolve(file!)) },
      }),
    });
    if (res.status !== 201) throw new Error(`creating the context failed: ${await apiError(res)}`);
    contextId = ((await res.json()) as { id: string }).id;
    // printed at once (not only with --keep): a failure later must never leave a context nobody knows about
    console.error(`context ${contextId} created on ${server}`);
  }
  if (created || values.resume) {
    if (values.resume && (file === undefined || file === "-"))
      throw new UsageError("--resume needs the FILE the context was uploaded from (not stdin)");
    try {
      await upload({
        server,
        headers,
        id: contextId,
        file: file!,
        ...(doc ? { doc } : {}),
        resume: values.resume === true,
        status,
        endStatus,
        signal: ac.signal,
        firstPiece: intFlag("piece-bytes", values["piece-bytes"], 1),
      });
    } catch (e) {
      endStatus();
      console.error(ac.signal.aborted ? "ask: upload interrupted" : `ask: upload failed: ${(e as Error).message}`);
      hints(contextId, true);
      process.exit(ac.signal.aborted ? 130 : 1);
    }
  }

  let exitCode = 0;
  let missing = false;
  try {
    const res = await call(`${server}/v1/contexts/${contextId}/query`, {
      method: "POST",
      headers: { ...headers, "content-type": "application/json" },
      body: JSON.stringify(body),
      signal: ac.signal,
    });
    if (!res.ok) {
      console.error(`ask: query failed: ${await apiError(res)}`);
      exitCode = 1;
      // no such context (never was, or deleted meanwhile): nothing is kept to ask again or delete
      missing = res.status === 404 || res.status === 410;
    } else {
      for await (const e of sseEvents(res)) {
        if (e.data === "[DONE]") break;
        const j = JSON.parse(e.data);
        if (e.event === "token") process.stdout.write(j.text);
        else if (e.event === "finish") {
          process.stdout.write("\n");
          if (!quiet) {
            const u = j.usage;
            const t = j.timings;
            console.error(
              `[${j.finish_reason}] ${u.completion_tokens} tokens; attended ${u.prompt_tokens} prompt tokens (${u.selected_tokens} of ${u.context_tokens} context tokens); ttft ${(t.ttft_ms / 1000).toFixed(2)} s, ${t.tpot_ms.toFixed(1)} ms/token`,
            );
          }
        } else if (e.event === "error") {
          console.error(`\nask: ${j.error?.message ?? e.data}`);
          exitCode = 1;
        }
      }
    }
  } catch (e) {
    if (!ac.signal.aborted) {
      console.error(`ask: ${(e as Error).message}`);
      exitCode = 1;
    } else exitCode = 130;
  }

  if (exitCode !== 0) {
    if (!missing) hints(contextId, false);
  }
  // this run uploaded it (or finished the upload of an earlier run): it goes, as after an uninterrupted run
  else if (created || values.resume) {
    if (values.keep) console.error(`context kept: ${contextId} (ask again with --context ${contextId}${opts})`);
    else await call(`${server}/v1/contexts/${contextId}`, { method: "DELETE", headers }).catch(() => {});
  }
  process.exit(exitCode);
}

await runCli("ask", USAGE, main);
