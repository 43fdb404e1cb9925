#!/usr/bin/env bun
/**
 * Time to first token of a small ready context while uploads compress, over HTTP (startServer on the CPU backend,
 * a small random model: 4 layers, hidden 256, the fixture tokenizer), as a user meets it: the client's time from
 * sending `POST /v1/contexts/:id/query` (SSE, max_tokens 1) to the first `token` event.
 *
 *   bun bench/ttft-under-upload.ts [--queries N] [--uploads 1,3] [--chunk N] [--capacity N] [--threads N] [--json]
 *
 * Phases: idle, then during 1 and during 3 concurrent uploads (each an endless text stream, PUT, cut off by a DELETE
 * of its context once the queries are done). It prints p50 / p99 per phase, the compression rate during the uploads
 * and the time of one compression step (chunk tokens / rate of one upload), and whether p99 during the uploads
 * stays within idle p99 + one compression step (the scheduler's promise: interactive work waits at most one step).
 * The rate is measured for 2 s before the queries of a phase start (queries would slow it down).
 * Figures only, no assertions.
 */
import { uploadContext } from "../test/helpers/http.ts";
import { startTestServer } from "../test/helpers/server.ts";
import { benchArgs, benchModelOptions, textLog } from "./common.ts";

const a = benchArgs(
  "usage: bun bench/ttft-under-upload.ts [--queries 40] [--uploads 1,3] [--chunk 512] [--capacity 1024] [--threads N] [--json]",
  {
    queries: { type: "string" },
    uploads: { type: "string" },
    chunk: { type: "string" },
    capacity: { type: "string" },
    threads: { type: "string" },
    json: { type: "boolean" },
  },
);
const QUERIES = Number(a.queries ?? 40);
const UPLOADS = (a.uploads ?? "1,3").split(",").map(Number);
const CHUNK = Number(a.chunk ?? 512);
const CAPACITY = Number(a.capacity ?? 1024);
const log = textLog(!!a.json);
const now = () => performance.now();
const pct = (xs: number[], q: number) => {
  const s = [...xs].sort((x, y) => x - y);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!;
};

const WORDS = "the quick brown fox jumps over the lazy dog while a river runs past the old mill and".split(" ");
/** An endless text stream (until cancelled), in 64 KiB pieces, like a big file read from disk. */
function endlessText(seed: number): ReadableStream<Uint8Array> {
  let x = seed;
  const enc = new TextEncoder();
  return new ReadableStream<Uint8Array>({
    pull(ctrl) {
      const parts: string[] = [];
      let n = 0;
      while (n < 64 * 1024) {
        x = (x * 1103515245 + 12345) & 0x7fffffff;
        const w = WORDS[x % WORDS.length]!;
        parts.push(w);
        n += w.length + 1;
      }
      ctrl.enqueue(enc.encode(`${parts.join(" ")} `));
    },
  });
}

const srv = await startTestServer({
  name: "ttft",
  modelOptions: benchModelOptions({ maxPositions: 4096, chunk: CHUNK, capacity: CAPACITY }),
  flags: a.threads === undefined ? [] : ["--threads", a.threads],
});

try {
  const base = srv.url;
  const post = (path: string, body: unknown) =>
    fetch(`${base}${path}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });

  const text = Array.from({ length: 400 }, (_, i) => WORDS[(i * 7) % WORDS.length]).join(" ");
  const small = await uploadContext(base, text);

  /** Client-side time to the first token event of one streamed query. */
  const ttft = async (): Promise<number> => {
    const t0 = now();
    const res = await post(`/v1/contexts/${small}/query`, { question: "What runs past the mill?", max_tokens: 1 });
    const reader = res.body!.getReader();
    const dec = new TextDecoder();
    let buf = "";
    let t = Number.NaN;
    for (;;) {
      const r = await reader.read();
      if (r.done) break;
      buf += dec.decode(r.value, { stream: true });
      if (Number.isNaN(t) && buf.includes("event: token")) t = now() - t0;
    }
    return t;
  };
  const measure = async () => {
    const xs: number[] = [];
    for (let i = 0; i < QUERIES; i++) {
      xs.push(await ttft());
      await Bun.sleep(20); // queries arrive at random points of a compression step, not right after one
    }
    return xs;
  };

  for (let i = 0; i < 3; i++) await ttft(); // warm up
  const idle = await measure();
  const rows: { phase: string; p50: number; p99: number; rate?: number }[] = [
    { phase: "idle", p50: pct(idle, 0.5), p99: pct(idle, 0.99) },
  ];

  for (const k of UPLOADS) {
    const ids: string[] = [];
    for (let i = 0; i < k; i++) ids.push(((await (await post("/v1/contexts", {})).json()) as { id: string }).id);
    const uploads = ids.map((id, i) =>
      fetch(`${base}/v1/contexts/${id}/content`, {
        method: "PUT",
        body: endlessText(i + 1),
        headers: { "content-type": "text/plain" },
        duplex: "half",
      } as RequestInit).catch(() => null),
    );
    const processed = async () => {
      let n = 0;
      for (const id of ids)
        n += ((await (await fetch(`${base}/v1/contexts/${id}`)).json()) as { tokens_processed: number })
          .tokens_processed;
      return n;
    };
    // let the uploads get going (compressing, not just reading), then their rate without queries for 2 s
    while ((await processed()) < CHUNK * 4) await Bun.sleep(50);
    const p0 = await processed();
    const t0 = now();
    await Bun.sleep(2000);
    const rate = ((await processed()) - p0) / ((now() - t0) / 1000);
    const xs = await measure();
    for (const id of ids) await fetch(`${base}/v1/contexts/${id}`, { method: "DELETE" });
    await Promise.all(uploads);
    rows.push({ phase: `during ${k} upload${k > 1 ? "s" : ""}`, p50: pct(xs, 0.5), p99: pct(xs, 0.99), rate });
  }

  const one = rows.find((r) => r.phase === "during 1 upload");
  const stepMs = one?.rate ? (CHUNK / one.rate) * 1000 : Number.NaN;
  const idleP99 = rows[0]!.p99;
  log(`TTFT of a small ready context, native query (SSE, max_tokens 1), ${QUERIES} queries per phase, client side`);
  for (const r of rows) {
    const extra =
      r.rate === undefined
        ? ""
        : `   compress ${Math.round(r.rate)} tok/s, p99 - idle p99 = ${(r.p99 - idleP99).toFixed(1)} ms (${((r.p99 - idleP99) / stepMs).toFixed(2)} steps)`;
    log(
      `  ${r.phase.padEnd(18)} p50 ${r.p50.toFixed(1).padStart(7)} ms   p99 ${r.p99.toFixed(1).padStart(7)} ms${extra}`,
    );
  }
  log(`  one compression step: ${CHUNK} tokens at the 1-upload rate = ${stepMs.toFixed(1)} ms`);
  for (const r of rows.slice(1))
    log(
      `  target p99 <= idle p99 + one step (${(idleP99 + stepMs).toFixed(1)} ms) ${r.phase}: ${r.p99 <= idleP99 + stepMs ? "met" : "MISSED"}`,
    );
  if (a.json) console.log(JSON.stringify({ chunk: CHUNK, queries: QUERIES, stepMs, phases: rows }));
} finally {
  await srv.stop();
}
