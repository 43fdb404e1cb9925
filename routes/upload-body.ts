/**
 * An upload's body as the UTF-8 text the context stores: its Content-Encoding undone (gzip, deflate), its charset
 * converted (the content type's `charset=`; UTF-16 that no charset names is refused), and, when it starts the
 * context, a file that is not text refused before a byte is stored (415 `binary_content`, saying what it looks like
 * and how to send it as text). Byte counts and `?offset=` resumes count the stored UTF-8 bytes, so a converted body
 * cannot resume at an offset (it would name a byte of the source, not of the stored text).
 */
import type { Context } from "hono";
import { byteOrderMark, notTextReason, SNIFF_BYTES } from "../src/util/text-sniff.ts";
import { ApiError } from "./errors.ts";

/** Charset labels whose bytes are stored as they come (US-ASCII is a subset of UTF-8). */
const UTF8_LABELS = new Set(["utf-8", "utf8", "unicode-1-1-utf-8", "us-ascii", "ascii"]);
/** The `charset` parameter of the content type, lower-cased; null when none. */
function charsetOf(contentType: string | undefined): string | null {
  const m = /;\s*charset\s*=\s*"?([^";\s]+)"?/i.exec(contentType ?? "");
  return m ? m[1]!.toLowerCase() : null;
}

/** The Content-Encoding steps to undo, innermost first; 415 for one that cannot be. */
function decodings(header: string | undefined): ("gzip" | "deflate")[] {
  const steps: ("gzip" | "deflate")[] = [];
  for (const raw of (header ?? "").split(",")) {
    const e = raw.trim().toLowerCase();
    if (e === "" || e === "identity") continue;
    if (e === "gzip" || e === "x-gzip") steps.push("gzip");
    else if (e === "deflate") steps.push("deflate");
    else
      throw new ApiError(
        415,
        "unsupported_media_type",
        `unsupported content encoding '${e.slice(0, 40)}': send the body as is, or with Content-Encoding gzip or deflate`,
      );
  }
  return steps.reverse();
}

/** A decoder for a charset label (RangeError for a label the WHATWG Encoding standard does not name). */
function decoderFor(label: string): TextDecoder {
  // the DOM typings list a few labels; the runtime takes every label of the standard
  return new TextDecoder(label as ConstructorParameters<typeof TextDecoder>[0]);
}

/** Labels of the WHATWG standard that name UTF-16 without its byte order (TextDecoder reads them little-endian). */
const UTF16_ANY = new Set(["utf-16", "unicode", "ucs-2", "csunicode", "iso-10646-ucs-2", "unicodefeff"]);

/** A stream that converts `label`-encoded bytes to UTF-8 (the decoder drops a byte-order mark; a UTF-16 label that
 * names no byte order follows the mark, as the standard's BOM sniffing does). */
function toUtf8(label: string): TransformStream<Uint8Array, Uint8Array> {
  let dec: TextDecoder | null = null;
  const enc = new TextEncoder();
  return new TransformStream({
    transform(chunk, ctrl) {
      dec ??= decoderFor(UTF16_ANY.has(label) && byteOrderMark(chunk) === "utf-16be" ? "utf-16be" : label);
      const s = dec.decode(chunk, { stream: true });
      if (s) ctrl.enqueue(enc.encode(s));
    },
    flush(ctrl) {
      const s = dec?.decode() ?? "";
      if (s) ctrl.enqueue(enc.encode(s));
    },
  });
}

/** `s` with a read error turned into a 400 `invalid_content_encoding` saying `what` (the bytes before it are kept),
 * unless the client left (`client` aborted): that is an interrupted upload. */
function failingAs(s: ReadableStream<Uint8Array>, what: string, client: AbortSignal): ReadableStream<Uint8Array> {
  const reader = s.getReader();
  return new ReadableStream<Uint8Array>({
    async pull(ctrl) {
      let r: Awaited<ReturnType<typeof reader.read>>;
      try {
        r = await reader.read();
      } catch (e) {
        if (client.aborted) throw e;
        throw new ApiError(400, "invalid_content_encoding", `${what}: ${e instanceof Error ? e.message : String(e)}`);
      }
      if (r.done) ctrl.close();
      else ctrl.enqueue(r.value);
    },
    cancel(why) {
      return reader.cancel(why);
    },
  });
}

/** How long the sniff waits for SNIFF_BYTES once the first bytes are in: a slow stream is judged on what came. */
const SNIFF_WAIT_MS = 1000;

/**
 * Holds the body's first bytes: SNIFF_BYTES (or what came within SNIFF_WAIT_MS) when `startsContext`, else just the
 * first piece. When `check`, refuses UTF-16 that no charset names (415) and, when `startsContext`, a binary file (415
 * `binary_content`); then passes everything through. A read error while holding them (the client left) comes after
 * them, so that what arrived is stored.
 */
function sniffed(body: ReadableStream<Uint8Array>, check: boolean, startsContext: boolean) {
  const reader = body.getReader();
  return (async () => {
    const need = check && startsContext ? SNIFF_BYTES : 2; // 2: a byte-order mark
    const head: Uint8Array[] = [];
    let n = 0;
    let done = false;
    let failed: unknown = null;
    let pending: ReturnType<typeof reader.read> | null = null;
    let until = 0;
    const waited = Symbol("waited");
    try {
      while (n < need) {
        pending ??= reader.read();
        let timer: ReturnType<typeof setTimeout> | undefined;
        const r =
          n === 0
            ? await pending
            : await Promise.race([
                pending,
                new Promise<typeof waited>((res) => {
                  timer = setTimeout(() => res(waited), Math.max(0, until - performance.now()));
                }),
              ]);
        clearTimeout(timer);
        if (r === waited) break;
        pending = null;
        if (r.done) {
          done = true;
          break;
        }
        if (n === 0) until = performance.now() + SNIFF_WAIT_MS;
        head.push(r.value);
        n += r.value.byteLength;
      }
    } catch (e) {
      failed = e ?? new Error("upload aborted");
    }
    const first = new Uint8Array(n);
    let o = 0;
    for (const h of head) {
      first.set(h, o);
      o += h.byteLength;
    }
    const rest = new ReadableStream<Uint8Array>({
      start(ctrl) {
        if (first.byteLength) ctrl.enqueue(first);
        if (done && !failed) ctrl.close();
      },
      async pull(ctrl) {
        // the error after the bytes that came before it (an error from start would drop them from the queue)
        if (failed) throw failed;
        const r = await (pending ?? reader.read());
        pending = null;
        if (r.done) ctrl.close();
        else ctrl.enqueue(r.value);
      },
      cancel(why) {
        return reader.cancel(why);
      },
    });
    if (failed) return rest;
    // never valid UTF-8: converted it would be right for this request but not for the next piece of the same file,
    // which starts with no mark (a client sending a file in pieces would store half of it as UTF-16 bytes)
    if (check && byteOrderMark(first)) {
      reader.cancel().catch(() => {});
      throw new ApiError(
        415,
        "unsupported_media_type",
        "this is UTF-16 text (it starts with a byte-order mark): give its charset (content-type: text/plain; charset=utf-16), or send UTF-8 (iconv -f UTF-16 -t UTF-8); nothing was stored",
      );
    }
    const why = check && startsContext ? notTextReason(first) : null;
    if (why) {
      reader.cancel().catch(() => {});
      throw new ApiError(415, "binary_content", `${why}; nothing was stored. To store the bytes anyway: ?binary=true`);
    }
    return rest;
  })();
}

/**
 * The request body as UTF-8 text bytes, ready to append. `startsContext`: the context holds no byte yet (a file's
 * first bytes say whether it is text). 415 for an unknown content encoding or charset, or (unless `?binary=true`) a
 * body that starts the context and is not text.
 */
export async function textBody(
  c: Context,
  body: ReadableStream<Uint8Array>,
  at: { startsContext: boolean; offset: number | undefined },
): Promise<ReadableStream<Uint8Array>> {
  let s = body;
  const steps = decodings(c.req.header("content-encoding"));
  const charset = charsetOf(c.req.header("content-type"));
  const converting = steps.length > 0 || (charset !== null && !UTF8_LABELS.has(charset));
  if (converting && (at.offset ?? 0) > 0)
    throw new ApiError(
      400,
      "invalid_value",
      `offset: a resumed upload's offset counts the context's stored UTF-8 bytes, and this body is converted (${[
        ...steps,
        ...(charset !== null && !UTF8_LABELS.has(charset) ? [`charset ${charset}`] : []),
      ].join(", ")}), so the offset cannot name a byte of your file: send the rest decoded, as UTF-8, from that offset`,
      "offset",
    );
  for (const step of steps)
    s = s.pipeThrough(new DecompressionStream(step) as unknown as TransformStream<Uint8Array, Uint8Array>);
  if (steps.length)
    s = failingAs(s, `the body is not valid ${steps.join(" + ")} data (its Content-Encoding)`, c.req.raw.signal);
  if (charset !== null && !UTF8_LABELS.has(charset)) {
    try {
      decoderFor(charset);
    } catch {
      throw new ApiError(
        415,
        "unsupported_media_type",
        `unsupported charset '${charset.slice(0, 40)}': send UTF-8 (iconv -f <charset> -t UTF-8) or a charset the WHATWG Encoding standard names`,
      );
    }
    s = s.pipeThrough(toUtf8(charset));
  }
  const binaryOk = ["1", "true", "yes", "on"].includes((c.req.query("binary") ?? "").trim().toLowerCase());
  return sniffed(s, !binaryOk, at.startsContext);
}
