#!/usr/bin/env bun
/**
 * bun run ask FILE "question" [--server URL] [--method reform|full|streaming|h2o] [--budget N]
 *             [--max-tokens N] [--temperature T] [--context ID] [--keep] [--api-key KEY]
 * Uploads FILE (streamed; "-" = stdin) to a running server as a new context, shows compression
 * progress on stderr, then streams the answer to stdout. --context ID reuses an uploaded context
 * (FILE is then ignored, pass "-" or any placeholder... or omit it with --context).
 */
import { existsSync, statSync } from "node:fs";
import { intFlag, numFlag, parseFlags, runCli, UsageError, valueFlags } from "./args.ts";

const USAGE = `usage: bun run ask FILE "question" [options]
       bun run ask --context ID "question" [options]

  --server URL         server address (default http://127.0.0.1:8080)   env REFORM_SERVER
  --api-key KEY        bearer token                                     env REFORM_API_KEY
  --method M           reform (default) | full | streaming | h2o
  --budget N           recompute budget in context tokens (server default when omitted)
  --max-tokens N       answer length limit
  --temperature T      sampling temperature (default 0 = greedy)
  --context ID         ask an already uploaded context (no upload)
  --keep               keep the uploaded context (prints its id for --context)
  -q, --quiet          no progress output
  -h, --help           show this help
FILE "-" reads the context from stdin.`;

interface SseEvent {
  event: string;
  data: string;
}

async function* sse(res: Response): AsyncGenerator<SseEvent> {
  const dec = new TextDecoder();
  let buf = "";
  for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
    buf += dec.decode(chunk, { stream: true });
    let i: number;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      let event = "message";
      const data: string[] = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

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
      ...valueFlags("api-key", "method", "budget", "max-tokens", "temperature", "context"),
      server: { type: "string", short: "s" },
      keep: { type: "boolean" },
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
    if (file !== "-" && (!existsSync(file!) || !statSync(file!).isFile())) throw new Error(`file not found: ${file}`);
  }
  if (!question?.trim()) throw new UsageError("the question is empty");

  const server = (values.server ?? process.env.REFORM_SERVER ?? "http://127.0.0.1:8080").replace(/\/+$/, "");
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
      h = await fetch(`${server}/health`);
    } catch (e) {
      throw new Error(
        `cannot reach the server at ${server}: ${(e as Error).message} (start it with: bun run serve --model DIR)`,
      );
    }
    if (h.ok) break;
    const j = (await h.json().catch(() => ({}))) as { status?: string; reason?: string };
    if (j.status === "failed") throw new Error(`the server failed to load its model: ${j.reason}`);
    if (i === 0) status("waiting for the server to load its model...");
    await Bun.sleep(1000);
  }

  let contextId = reuse;
  const created = !reuse;
  if (!contextId) {
    const res = await fetch(`${server}/v1/contexts`, {
      method: "POST",
      headers: { ...headers, "content-type": "application/json" },
      body: JSON.stringify({ metadata: { source: file === "-" ? "stdin" : file } }),
    });
    if (res.status !== 201) throw new Error(`creating the context failed: ${await apiError(res)}`);
    contextId = ((await res.json()) as { id: string }).id;
    const total = file === "-" ? 0 : statSync(file!).size;

    // Progress stream (follow: stays open across the whole upload; closed by us).
    const progressAc = new AbortController();
    let last = { bytes: 0, tokens: 0, processed: 0 };
    const progress = (async () => {
      try {
        const ev = await fetch(`${server}/v1/contexts/${contextId}/events?follow=true`, {
          headers,
          signal: progressAc.signal,
        });
        if (!ev.ok) return;
        for await (const e of sse(ev)) {
          if (e.event !== "progress") continue;
          const p = JSON.parse(e.data);
          last = { bytes: p.bytes_received, tokens: p.tokens_received, processed: p.tokens_processed };
          const pct = total > 0 ? ` ${((100 * p.bytes_received) / total).toFixed(1)}%` : "";
          status(
            `uploading${pct}: ${fmtBytes(p.bytes_received)}${total ? ` / ${fmtBytes(total)}` : ""}, ${p.tokens_processed}/${p.tokens_received} tokens compressed`,
            false,
          );
        }
      } catch {
        /* aborted */
      }
    })();

    const t0 = performance.now();
    const stream = file === "-" ? (Bun.stdin.stream() as ReadableStream<Uint8Array>) : Bun.file(file!).stream();
    const up = await fetch(`${server}/v1/contexts/${contextId}/content?final=true`, {
      method: "PUT",
      headers: { ...headers, "content-type": "text/plain; charset=utf-8" },
      body: stream,
      duplex: "half",
    });
    progressAc.abort();
    await progress;
    if (!up.ok) {
      endStatus();
      const msg = await apiError(up);
      await fetch(`${server}/v1/contexts/${contextId}`, { method: "DELETE", headers }).catch(() => {});
      throw new Error(`upload failed: ${msg}`);
    }
    const info = (await up.json()) as { bytes_received: number; tokens_processed: number };
    void last;
    const secs = (performance.now() - t0) / 1000;
    status(
      `context ${contextId}: ${fmtBytes(info.bytes_received)}, ${info.tokens_processed} tokens compressed in ${secs.toFixed(1)} s (${Math.round(info.tokens_processed / Math.max(secs, 1e-3))} tok/s)`,
    );
    endStatus();
  }

  const ac = new AbortController();
  process.on("SIGINT", () => {
    ac.abort();
  });
  let exitCode = 0;
  try {
    const res = await fetch(`${server}/v1/contexts/${contextId}/query`, {
      method: "POST",
      headers: { ...headers, "content-type": "application/json" },
      body: JSON.stringify(body),
      signal: ac.signal,
    });
    if (!res.ok) {
      console.error(`ask: query failed: ${await apiError(res)}`);
      exitCode = 1;
    } else {
      for await (const e of sse(res)) {
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

  if (created) {
    if (values.keep) console.error(`context kept: ${contextId} (ask again with --context ${contextId})`);
    else await fetch(`${server}/v1/contexts/${contextId}`, { method: "DELETE", headers }).catch(() => {});
  }
  process.exit(exitCode);
}

await runCli("ask", USAGE, main);
