/**
 * Context sessions: create / list / status / delete, streamed content upload, finalize, and the
 * SSE progress stream.
 */
import { Hono, type Context } from "hono";
import { z } from "zod";
import type { ContextInfo } from "../src/engine/api.ts";
import { ApiError, fromZod } from "./errors.ts";
import type { Deps } from "./types.ts";
import { contextView, CreateContextBody, JsonContentBody } from "./protocol.ts";
import { textBody } from "./upload-body.ts";
import { contentLength, contextIdParam, mediaType, parseJsonBody, sseResponse, tooLarge } from "./util.ts";

const BoolFlag = z
  .enum(["1", "0", "true", "false", "yes", "no", "on", "off", ""])
  .transform((v) => v === "1" || v === "true" || v === "yes" || v === "on" || v === "");

/** `?final=...` or `X-Reform-Final: ...` (query wins). */
function finalFlag(c: Context): boolean {
  const q = c.req.query("final");
  const h = c.req.header("x-reform-final");
  const raw = q ?? h;
  if (raw === undefined) return false;
  const r = BoolFlag.safeParse(raw.trim().toLowerCase());
  if (!r.success) throw fromZod(r.error, "final");
  return r.data;
}

/**
 * `?offset=N`: the upload continues the context at byte N. A resumed upload that names where it starts is
 * refused (409 `offset_mismatch`, with the right offset) instead of duplicating or skipping bytes.
 */
function offsetParam(c: Context): number | undefined {
  const raw = c.req.query("offset");
  if (raw === undefined) return undefined;
  const t = raw.trim();
  const n = /^\d+$/.test(t) ? Number(t) : Number.NaN;
  if (!Number.isSafeInteger(n))
    throw new ApiError(
      400,
      "invalid_value",
      `offset: must be a non-negative integer byte offset (where this upload starts in the context), got '${raw.slice(0, 40)}'`,
      "offset",
    );
  return n;
}

/** Media types accepted as raw context bytes. */
function isRawType(t: string): boolean {
  return (
    t === "" || t.startsWith("text/") || t === "application/octet-stream" || t === "application/x-www-form-urlencoded" // curl --data-binary default; the bytes are taken as-is
  );
}

const PROGRESS_MIN_MS = 100; // progress events are coalesced to at most ~10/s
const HIGH_WATER = 8 << 20; // bytes buffered from the socket while an append is in flight
const MAX_PIECE = 4 << 20; // bytes per engine.append call

function takePiece(q: Uint8Array[], max: number): Uint8Array {
  const first = q.shift()!;
  if (first.byteLength >= max || q.length === 0) return first;
  let n = first.byteLength;
  let k = 0;
  while (k < q.length && n + q[k]!.byteLength <= max) n += q[k++]!.byteLength;
  if (k === 0) return first;
  const out = new Uint8Array(n);
  out.set(first, 0);
  let off = first.byteLength;
  for (let i = 0; i < k; i++) {
    out.set(q[i]!, off);
    off += q[i]!.byteLength;
  }
  q.splice(0, k);
  return out;
}

/**
 * Reads `body` and appends it piece by piece. Network reads run ahead of the (slower) appends up
 * to HIGH_WATER bytes; each append is awaited (backpressure). If the client disconnects or the
 * limit is exceeded, everything received before that point is still appended, then the error is
 * thrown.
 */
async function pumpUpload(
  body: ReadableStream<Uint8Array>,
  limit: number,
  append: (piece: Uint8Array) => Promise<void>,
): Promise<number> {
  const reader = body.getReader();
  const q: Uint8Array[] = [];
  let qBytes = 0;
  let received = 0;
  let readDone = false;
  let readError: unknown = null;
  let stopped = false;
  let wakeAppender: (() => void) | null = null;
  let wakeReader: (() => void) | null = null;
  const signalData = () => {
    const w = wakeAppender;
    wakeAppender = null;
    w?.();
  };
  const signalSpace = () => {
    const w = wakeReader;
    wakeReader = null;
    w?.();
  };

  const readerTask = (async () => {
    try {
      for (;;) {
        while (qBytes >= HIGH_WATER && !stopped) await new Promise<void>((r) => (wakeReader = r));
        if (stopped) break;
        const r = await reader.read();
        if (r.done) break;
        const chunk = r.value;
        if (!chunk || chunk.byteLength === 0) continue;
        const room = limit - received;
        received += chunk.byteLength;
        // the piece that crosses the limit is cut there: every byte before the limit is stored
        const kept = received > limit ? chunk.subarray(0, room) : chunk;
        if (kept.byteLength > 0) {
          q.push(kept);
          qBytes += kept.byteLength;
          signalData();
        }
        if (received > limit) {
          readError = tooLarge(limit);
          break;
        }
      }
    } catch (e) {
      readError = e ?? new Error("upload aborted");
    } finally {
      readDone = true;
      signalData();
    }
  })();

  let appended = 0;
  try {
    for (;;) {
      if (q.length === 0) {
        if (readDone) break;
        await new Promise<void>((r) => (wakeAppender = r));
        continue;
      }
      const piece = takePiece(q, MAX_PIECE);
      qBytes -= piece.byteLength;
      signalSpace();
      await append(piece);
      appended += piece.byteLength;
    }
  } catch (e) {
    stopped = true;
    signalSpace();
    reader.cancel().catch(() => {});
    await readerTask.catch(() => {});
    throw e;
  }
  await readerTask;
  if (readError) {
    if (readError instanceof ApiError) reader.cancel().catch(() => {});
    throw Object.assign(readError instanceof Error ? readError : new Error(String(readError)), { appended });
  }
  return appended;
}

/** How long a second writer waits for the first to finish or lose its client before a 409 context_busy. */
const WRITER_GRACE_MS = 500;

/** True once `w.done` settles or `w.client` aborts, false after `ms`. */
async function endsWithin(w: { client: AbortSignal; done: Promise<unknown> }, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  let onAbort: (() => void) | undefined;
  try {
    return await Promise.race([
      w.done.then(
        () => true,
        () => true,
      ),
      new Promise<boolean>((r) => {
        onAbort = () => r(true);
        w.client.addEventListener("abort", onAbort, { once: true });
      }),
      new Promise<boolean>((r) => {
        timer = setTimeout(() => r(false), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
    if (onAbort) w.client.removeEventListener("abort", onAbort);
  }
}

function isTerminal(info: ContextInfo): boolean {
  return info.state === "ready" || info.state === "failed";
}

export function contextRoutes(d: Deps): Hono {
  const { engine, opts, stats, log } = d;
  const r = new Hono();

  const mustGet = async (id: string): Promise<ContextInfo> => {
    const info = await engine.getContext(id);
    if (!info) throw new ApiError(404, "context_not_found", `context '${id}' not found`, "id");
    return info;
  };

  /** A context a client may write to: not one of inline REFORM's implicit contexts, which are the server's prefix
   * cache (a write would change what the cache answers other requests with, or leave it unfinished for them). */
  const mustGetWritable = async (id: string): Promise<ContextInfo> => {
    const info = await mustGet(id);
    if (info.metadata?.inline === true)
      throw new ApiError(
        409,
        "context_read_only",
        `context '${id}' is an implicit context of inline REFORM (the server's prefix cache): it cannot be appended ` +
          "to or finalized; upload your document to a context of your own (POST /v1/contexts)",
        "id",
      );
    return info;
  };

  r.post("/", async (c) => {
    const body = await parseJsonBody(c, CreateContextBody, opts.maxJsonBytes, true);
    const info = await engine.createContext({ metadata: body.metadata });
    return c.json(contextView(info), 201, { location: `/v1/contexts/${info.id}` });
  });

  // One writer per context: a second upload (or a finalize) while one is open would interleave its
  // bytes with the first one's, so it is refused. A writer whose client has gone away is only storing what
  // it received; the next one (a resumed upload) waits for it instead of being refused. A resume sent the moment a
  // client drops can arrive before the server has seen that drop, so a busy context is refused only after
  // WRITER_GRACE_MS in which its writer neither finished nor lost its client.
  const writing = new Map<string, { client: AbortSignal; done: Promise<unknown> }>();
  // `upload_in_progress`: an upload holds the context now (another client's, or another tab's: not one to resume);
  // `upload_storing`: an upload whose client has gone is still storing what it received, so bytes_received is not
  // final yet (a resume sent now waits for it; one that names the offset should read it again once this is false)
  const withWriter = (info: ContextInfo) => {
    const w = writing.get(info.id);
    return {
      ...contextView(info),
      upload_in_progress: w !== undefined && !w.client.aborted,
      upload_storing: w?.client.aborted === true,
    };
  };

  r.get("/", async (c) => {
    const list = await engine.listContexts();
    return c.json({ object: "list", data: list.map(withWriter) });
  });

  r.get("/:id", async (c) => {
    const id = contextIdParam(c);
    return c.json(withWriter(await mustGet(id)));
  });

  r.delete("/:id", async (c) => {
    const id = contextIdParam(c);
    const ok = await engine.deleteContext(id);
    if (!ok) throw new ApiError(404, "context_not_found", `context '${id}' not found`, "id");
    return c.json({ id, object: "context", deleted: true });
  });

  const exclusive = async <T>(c: Context, id: string, fn: () => Promise<T>): Promise<T> => {
    for (let w = writing.get(id); w; w = writing.get(id)) {
      if (!w.client.aborted && !(await endsWithin(w, WRITER_GRACE_MS)))
        throw new ApiError(
          409,
          "context_busy",
          `context '${id}' has an upload in progress; retry when it has finished`,
          "id",
        );
      await w.done.catch(() => {});
    }
    // claimed before anything is awaited: requests that arrive in order hold the context in that order
    const done = fn();
    writing.set(id, { client: c.req.raw.signal, done });
    try {
      return await done;
    } finally {
      // only this writer's own entry: a waiter may already hold the context
      if (writing.get(id)?.done === done) writing.delete(id);
    }
  };

  // A resume that names more bytes than are stored while no writer holds the context: the dropped upload that sent
  // them may not have reached its handler yet. Waiting for it (not claiming the context first) lets it store them.
  const untilStored = async (id: string, offset: number) => {
    const until = performance.now() + WRITER_GRACE_MS;
    while (!writing.has(id) && (await mustGet(id)).bytesReceived < offset && performance.now() < until)
      await Bun.sleep(10);
  };

  const upload = async (c: Context) => {
    const id = contextIdParam(c);
    const final = finalFlag(c);
    const t = mediaType(c);
    const json = t === "application/json";
    if (!json && !isRawType(t)) {
      throw new ApiError(
        415,
        "unsupported_media_type",
        `unsupported content type '${t}': send the context as text/plain or application/octet-stream (or JSON {"text": ...})`,
      );
    }
    const len = contentLength(c);
    if (len !== null && len > opts.maxBodyBytes) throw tooLarge(opts.maxBodyBytes);
    const offset = offsetParam(c);
    if (offset !== undefined) await untilStored(id, offset);
    return exclusive(c, id, async () => {
      // checked once this upload holds the context: a dropped upload before it has stored all it received
      const have = (await mustGetWritable(id)).bytesReceived;
      if (offset !== undefined && offset !== have)
        throw new ApiError(
          409,
          "offset_mismatch",
          `context '${id}' has ${have} bytes; this upload starts at byte ${offset}: resume from ${have}`,
          "offset",
        );
      return receive(c, id, final, json, { startsContext: have === 0, offset });
    });
  };

  const receive = async (
    c: Context,
    id: string,
    final: boolean,
    json: boolean,
    at: { startsContext: boolean; offset: number | undefined },
  ) => {
    let appended = 0;
    let last: ContextInfo | null = null;
    let doFinal = final;
    if (json) {
      const body = await parseJsonBody(c, JsonContentBody, opts.maxBodyBytes);
      const bytes = new TextEncoder().encode(body.text);
      if (bytes.byteLength > 0) {
        last = await engine.append(id, bytes);
        appended = bytes.byteLength;
        stats.uploadBytes.inc(appended);
      }
      doFinal = doFinal || body.final === true;
    } else if (c.req.raw.body) {
      let stored = 0;
      try {
        const text = await textBody(c, c.req.raw.body, at);
        appended = await pumpUpload(text, opts.maxBodyBytes, async (piece) => {
          last = await engine.append(id, piece);
          stats.uploadBytes.inc(piece.byteLength);
          stored += piece.byteLength;
        });
      } catch (e) {
        const engineErr = e as { status?: number; code?: string; message?: string };
        if (engineErr.code === "disk_quota_exceeded")
          throw new ApiError(
            413,
            engineErr.code,
            `${engineErr.message}; the first ${stored} bytes of this upload were stored`,
          );
        if (e instanceof ApiError) {
          const n = (e as unknown as { appended?: number }).appended ?? 0;
          if (e.status === 413 && n > 0) {
            throw new ApiError(413, e.code, `${e.message}; the first ${n} bytes were stored`, null);
          }
          throw e;
        }
        if ((e as { status?: unknown }).status !== undefined) throw e; // engine error
        const n = (e as { appended?: number }).appended;
        if (n !== undefined || c.req.raw.signal.aborted) {
          // The client went away: what was received is stored; nobody reads this response.
          log("info", `upload to ${id} interrupted by the client after ${n ?? "?"} bytes (kept)`);
          throw new ApiError(400, "upload_interrupted", `upload interrupted after ${n ?? 0} bytes; they were stored`);
        }
        throw e;
      }
    }
    if (doFinal) last = await engine.finalize(id);
    if (!last) last = await mustGet(id);
    return c.json({ ...contextView(last), appended_bytes: appended, finalized: doFinal });
  };
  r.put("/:id/content", upload);
  r.post("/:id/content", upload);

  r.post("/:id/finalize", async (c) => {
    const id = contextIdParam(c);
    return c.json(
      contextView(
        await exclusive(c, id, async () => {
          await mustGetWritable(id);
          return engine.finalize(id);
        }),
      ),
    );
  });

  r.get("/:id/events", async (c) => {
    const id = contextIdParam(c);
    const followRaw = c.req.query("follow");
    let follow = false;
    if (followRaw !== undefined) {
      const p = BoolFlag.safeParse(followRaw.trim().toLowerCase());
      if (!p.success) throw fromZod(p.error, "follow");
      follow = p.data;
    }
    await mustGet(id); // a 404 before the stream starts
    stats.sseActive.inc();
    return sseResponse(
      c.req.raw,
      async (w) => {
        let finish!: () => void;
        const ended = new Promise<void>((res) => (finish = res));
        // At most one progress event per PROGRESS_MIN_MS while the state stays the same (a fast
        // GPU compresses many chunks per second); state changes and the last update always go out.
        let lastKey = "";
        let lastState = "";
        let lastSent = 0;
        let trailing: ReturnType<typeof setTimeout> | null = null;
        let latest: ContextInfo | null = null;
        const emit = (info: ContextInfo) => {
          const key = `${info.state}|${info.bytesReceived}|${info.tokensReceived}|${info.tokensProcessed}|${info.pendingChars}|${info.error ?? ""}`;
          if (key === lastKey) return;
          lastKey = key;
          lastState = info.state;
          lastSent = Date.now();
          if (!w.send({ type: "progress", ...contextView(info) }, "progress")) finish();
          if (info.state === "failed" || (!follow && isTerminal(info))) finish();
        };
        let deleted = false;
        const push = (info: ContextInfo | null) => {
          if (!info) {
            // deleted (by a client, or by the inline cache): nothing more will come
            deleted = true;
            finish();
            return;
          }
          latest = info;
          const wait = PROGRESS_MIN_MS - (Date.now() - lastSent);
          if (info.state !== lastState || wait <= 0) {
            if (trailing) clearTimeout(trailing);
            trailing = null;
            emit(info);
          } else if (!trailing) {
            trailing = setTimeout(() => {
              trailing = null;
              if (latest) emit(latest);
            }, wait);
          }
        };
        const unsubscribe = engine.subscribe(id, push);
        w.signal.addEventListener("abort", () => finish(), { once: true });
        try {
          // Current state after subscribing, so no update can fall in between.
          const now = await engine.getContext(id);
          push(now);
          await ended;
        } finally {
          unsubscribe();
          if (trailing) clearTimeout(trailing);
          stats.sseActive.dec();
        }
        // an error event (then [DONE]), as a query the deletion cut short gets
        if (deleted) throw new ApiError(410, "context_deleted", `context '${id}' was deleted`, "id");
        if (!w.signal.aborted) w.send("[DONE]");
      },
      { heartbeatSec: opts.sseHeartbeatSec, log },
    );
  });

  return r;
}
