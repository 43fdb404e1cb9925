/** Shared request helpers: bounded JSON body parsing with zod, id validation, SSE responses. */
import type { Context } from "hono";
import type { z } from "zod";
import { ApiError, errorBody, fromZod, type Logger } from "./errors.ts";
import { ContextIdSchema } from "../src/engine/schema.ts";

export function contextIdParam(c: Context): string {
  const r = ContextIdSchema.safeParse(c.req.param("id"));
  if (!r.success) throw fromZod(r.error, "id");
  return r.data;
}

/** Media type without parameters, lower-cased; "" when absent. */
export function mediaType(c: Context): string {
  const ct = c.req.header("content-type") ?? "";
  return ct.split(";")[0]!.trim().toLowerCase();
}

function isJsonType(t: string): boolean {
  return t === "application/json" || (t.startsWith("application/") && t.endsWith("+json"));
}

/** Content-Length header as a number, or null when absent/invalid. */
export function contentLength(c: Context): number | null {
  const v = c.req.header("content-length");
  if (v === undefined || !/^\d+$/.test(v.trim())) return null;
  return Number(v);
}

/** Reads the whole body (at most `limit` bytes, else 413). */
export async function readBodyLimited(c: Context, limit: number): Promise<Uint8Array> {
  const len = contentLength(c);
  if (len !== null && len > limit) throw tooLarge(limit);
  const body = c.req.raw.body;
  if (!body) return new Uint8Array(0);
  const parts: Uint8Array[] = [];
  let total = 0;
  for await (const chunk of body as unknown as AsyncIterable<Uint8Array>) {
    total += chunk.byteLength;
    if (total > limit) throw tooLarge(limit);
    parts.push(chunk);
  }
  if (parts.length === 1) return parts[0]!;
  const out = new Uint8Array(total);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.byteLength;
  }
  return out;
}

export function tooLarge(limit: number): ApiError {
  return new ApiError(413, "payload_too_large", `request body exceeds the limit of ${limit} bytes`);
}

/**
 * Parses a JSON body against `schema`. The body must be declared application/json (or +json; a missing
 * content type is tolerated for curl users): text/plain and form bodies are what a cross-origin page can
 * send without a CORS preflight, so they are refused with a 415 rather than parsed. An empty body parses
 * as `{}` when `allowEmpty`.
 */
export async function parseJsonBody<S extends z.ZodType>(
  c: Context,
  schema: S,
  limit: number,
  allowEmpty = false,
): Promise<z.output<S>> {
  const t = mediaType(c);
  if (t !== "" && !isJsonType(t)) {
    // `curl -d` labels a JSON body as a form unless told otherwise: the most common way to get here
    const fix =
      t === "application/x-www-form-urlencoded"
        ? " (curl -d sends this type: add -H 'content-type: application/json')"
        : "";
    throw new ApiError(
      415,
      "unsupported_media_type",
      `unsupported content type '${t}': this endpoint takes a JSON body sent with 'Content-Type: application/json'${fix}`,
    );
  }
  const bytes = await readBodyLimited(c, limit);
  let value: unknown;
  const text = new TextDecoder().decode(bytes);
  if (text.trim() === "") {
    if (!allowEmpty) throw new ApiError(400, "invalid_json", "request body is empty: expected a JSON object");
    value = {};
  } else {
    try {
      value = JSON.parse(text);
    } catch (e) {
      throw new ApiError(400, "invalid_json", `malformed JSON body: ${(e as Error).message}`);
    }
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new ApiError(400, "invalid_json", "request body must be a JSON object");
  }
  const r = schema.safeParse(value);
  if (!r.success) throw fromZod(r.error);
  return r.data;
}

/** The API key a request presents (`Authorization: Bearer KEY`, or `X-Api-Key: KEY`), or null. */
export function bearer(req: Request): string | null {
  const h = req.headers.get("authorization");
  if (h) {
    const m = /^Bearer\s+(.+)$/i.exec(h.trim());
    return m ? m[1]!.trim() : null;
  }
  return req.headers.get("x-api-key");
}

/**
 * A JSON response whose body may take long (an inline prompt that compresses first): the status and headers go out
 * at once and a newline every `heartbeatSec` keeps the connection alive (JSON allows leading whitespace); then the
 * body. An error after the start can only be the body: an OpenAI error object, with status 200 already sent.
 */
export function keepAliveJson(
  req: Request,
  run: (signal: AbortSignal) => Promise<unknown>,
  opts: { heartbeatSec: number; headers?: Record<string, string>; log?: Logger },
): Response {
  const enc = new TextEncoder();
  const ac = new AbortController();
  const onAbort = () => ac.abort();
  if (req.signal.aborted) ac.abort();
  else req.signal.addEventListener("abort", onAbort, { once: true });
  let timer: ReturnType<typeof setInterval> | undefined;
  const stream = new ReadableStream<Uint8Array>({
    start(ctrl) {
      const push = (s: string) => {
        try {
          ctrl.enqueue(enc.encode(s));
        } catch {
          /* cancelled */
        }
      };
      push("\n");
      if (opts.heartbeatSec > 0) timer = setInterval(() => push("\n"), opts.heartbeatSec * 1000);
      queueMicrotask(async () => {
        try {
          push(JSON.stringify(await run(ac.signal)));
        } catch (err) {
          const status = (err as { status?: number }).status;
          const st = typeof status === "number" ? status : 500;
          if (st >= 500)
            opts.log?.("error", "error during a kept-alive JSON response", err instanceof Error ? err.stack : err);
          const msg = st >= 500 && typeof status !== "number" ? "internal server error" : (err as Error).message;
          push(JSON.stringify(errorBody(st, (err as { code?: string }).code ?? "internal_error", msg)));
        } finally {
          if (timer) clearInterval(timer);
          req.signal.removeEventListener("abort", onAbort);
          try {
            ctrl.close();
          } catch {
            /* cancelled */
          }
        }
      });
    },
    cancel() {
      if (timer) clearInterval(timer);
      ac.abort();
    },
  });
  return new Response(stream, {
    status: 200,
    headers: { "content-type": "application/json", "cache-control": "no-cache", ...opts.headers },
  });
}

// ---------------------------------------------------------------------------------------------
// Server-sent events

export interface SseWriter {
  /** Sends one event; `data` objects are JSON-encoded. Returns false once the stream is closed. */
  send(data: unknown, event?: string): boolean;
  comment(text: string): boolean;
  readonly closed: boolean;
  /** Aborted when the client goes away (or the stream is closed by us). */
  readonly signal: AbortSignal;
}

export interface SseOptions {
  /** Seconds between keep-alive comments (proxies drop silent connections); 0 = none. */
  heartbeatSec?: number;
  log?: Logger;
  headers?: Record<string, string>;
}

/**
 * Builds an SSE response driven by `run`. The stream closes when `run` settles. When the client
 * disconnects (request aborted or body cancelled), `writer.signal` aborts so `run` can stop work.
 * An error thrown by `run` after the stream started is reported as an `error` event.
 */
export function sseResponse(req: Request, run: (w: SseWriter) => Promise<void>, opts: SseOptions = {}): Response {
  const enc = new TextEncoder();
  const ac = new AbortController();
  let closed = false;
  let controller!: ReadableStreamDefaultController<Uint8Array>;
  let heartbeat: ReturnType<typeof setInterval> | undefined;

  const close = () => {
    if (closed) return;
    closed = true;
    if (heartbeat) clearInterval(heartbeat);
    try {
      controller.close();
    } catch {
      /* already closed or cancelled */
    }
  };
  const enqueue = (s: string): boolean => {
    if (closed) return false;
    try {
      controller.enqueue(enc.encode(s));
      return true;
    } catch {
      closed = true;
      if (!ac.signal.aborted) ac.abort();
      return false;
    }
  };
  const writer: SseWriter = {
    send(data, event) {
      const payload = typeof data === "string" ? data : JSON.stringify(data);
      let s = event ? `event: ${event}\n` : "";
      for (const line of payload.split("\n")) s += `data: ${line}\n`;
      return enqueue(s + "\n");
    },
    comment(text) {
      return enqueue(`: ${text}\n\n`);
    },
    get closed() {
      return closed;
    },
    signal: ac.signal,
  };

  const onReqAbort = () => {
    if (!ac.signal.aborted) ac.abort();
    close();
  };
  if (req.signal.aborted) onReqAbort();
  else req.signal.addEventListener("abort", onReqAbort, { once: true });

  const stream = new ReadableStream<Uint8Array>({
    start(ctrl) {
      controller = ctrl;
      const hb = opts.heartbeatSec ?? 15;
      if (hb > 0) heartbeat = setInterval(() => writer.comment("keep-alive"), hb * 1000);
      queueMicrotask(async () => {
        try {
          await run(writer);
        } catch (err) {
          if (!ac.signal.aborted) {
            const status = (err as { status?: number }).status;
            const code = (err as { code?: string }).code ?? "internal_error";
            const st = typeof status === "number" ? status : 500;
            if (st >= 500) opts.log?.("error", "error during SSE stream", err instanceof Error ? err.stack : err);
            writer.send(
              errorBody(
                st,
                code,
                st >= 500 && typeof status !== "number" ? "internal server error" : (err as Error).message,
                (err as { param?: string | null }).param ?? null,
              ),
              "error",
            );
            writer.send("[DONE]");
          }
        } finally {
          req.signal.removeEventListener("abort", onReqAbort);
          close();
        }
      });
    },
    cancel() {
      closed = true;
      if (heartbeat) clearInterval(heartbeat);
      if (!ac.signal.aborted) ac.abort();
    },
  });

  return new Response(stream, {
    status: 200,
    headers: {
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-cache, no-transform",
      connection: "keep-alive",
      "x-accel-buffering": "no",
      ...opts.headers,
    },
  });
}
