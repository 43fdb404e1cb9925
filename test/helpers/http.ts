/** HTTP test helpers: SSE events (src/util/sse.ts, eventsource-parser), streamed bodies, JSON shortcuts, contexts. */
import { expect } from "bun:test";
import { type SseEvent, sseEvents } from "../../src/util/sse.ts";

export { type SseEvent, sseEvents };

export async function collectSse(res: Response): Promise<SseEvent[]> {
  const out: SseEvent[] = [];
  for await (const e of sseEvents(res)) out.push(e);
  return out;
}

/** A ReadableStream that yields `bytes` in pieces of the given sizes (cycled), with optional delay. */
export function pieceStream(bytes: Uint8Array, sizes: number[], delayMs = 0): ReadableStream<Uint8Array> {
  let off = 0;
  let k = 0;
  return new ReadableStream<Uint8Array>({
    async pull(ctrl) {
      if (off >= bytes.byteLength) {
        ctrl.close();
        return;
      }
      if (delayMs) await Bun.sleep(delayMs);
      const n = Math.max(1, sizes[k++ % sizes.length]!);
      ctrl.enqueue(bytes.slice(off, off + n));
      off += n;
    },
  });
}

export function jsonPost(url: string, body: unknown, headers: Record<string, string> = {}, method = "POST") {
  return fetch(url, {
    method,
    headers: { "content-type": "application/json", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
}

export async function expectError(res: Response, status: number, code?: string) {
  const text = await res.text();
  let body: { error?: { message?: string; type?: string; param?: string | null; code?: string | null } };
  try {
    body = JSON.parse(text);
  } catch {
    throw new Error(`expected JSON error ${status}, got ${res.status}: ${text}`);
  }
  if (
    res.status !== status ||
    !body.error ||
    typeof body.error.message !== "string" ||
    (code && body.error.code !== code)
  ) {
    throw new Error(`expected ${status}${code ? ` ${code}` : ""}, got ${res.status}: ${text}`);
  }
  if (!("param" in body.error) || !("type" in body.error) || !("code" in body.error)) {
    throw new Error(`error body is not OpenAI-shaped: ${text}`);
  }
  return body.error;
}

export async function waitFor(cond: () => boolean | Promise<boolean>, timeoutMs = 10_000, stepMs = 20) {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > timeoutMs) throw new Error("timed out waiting for condition");
    await Bun.sleep(stepMs);
  }
}

/** res.json() typed loosely for tests. */
// biome-ignore lint/suspicious/noExplicitAny: tests read response bodies loosely typed
export async function j(res: Response | Promise<Response>): Promise<any> {
  return (await res).json();
}

/** POSTs a JSON body: the answer's status and its JSON body. */
// biome-ignore lint/suspicious/noExplicitAny: tests read response bodies loosely typed
export async function postJson(url: string, body: unknown): Promise<{ status: number; body: any }> {
  const r = await jsonPost(url, body);
  return { status: r.status, body: await r.json() };
}

/** A new, empty context on the server at `base`: its id. */
export async function createContext(base: string): Promise<string> {
  return (await j(jsonPost(`${base}/v1/contexts`, {}))).id;
}

/** Uploads `text` as the whole content of context `id` (`?final=true`); expects the server to answer 200. */
export async function putFinalText(base: string, id: string, text: string): Promise<void> {
  const r = await fetch(`${base}/v1/contexts/${id}/content?final=true`, {
    method: "PUT",
    headers: { "content-type": "text/plain; charset=utf-8" },
    body: text,
  });
  const detail = r.status === 200 ? "" : await r.text();
  expect(r.status, `upload: ${r.status} ${detail}`).toBe(200);
}

/** A new context holding `text` (created, uploaded and finalized): its id. */
export async function uploadContext(base: string, text: string): Promise<string> {
  const id = await createContext(base);
  await putFinalText(base, id, text);
  return id;
}
