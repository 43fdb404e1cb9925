/**
 * Per-context storage under `<data>/contexts/<id>/`:
 *   tokens.bin        int32 LE token ids, appended as text is committed (fsync'd per append batch)
 *   emb.bin           rows of embed_dim values (f16 by default), one row per compressed token,
 *                     appended per compressed chunk (fsync'd per chunk)
 *   meta.msgpack      metadata (msgpackr), rewritten atomically (tmp + rename)
 *   compressor.state  [u64 LE seen][native rf_compressor state blob], written atomically
 *
 * Durability / restart model
 *   - The commit point of an append is meta.msgpack: tokens.bin is fsync'd first, then meta (with the
 *     new token count and the new tokenizer tail) is written+fsync'd; the append is acknowledged after.
 *     On load tokens.bin is truncated to meta.tokens (a crash between the two writes loses only the
 *     unacknowledged append).
 *   - Embedding rows are fsync'd per chunk; on load `processed` = rows in emb.bin (partial rows are
 *     truncated), capped at the token count.
 *   - The compressor state is NOT saved per chunk (for real models it is hundreds of MB). It is saved
 *     on finalize, when a live compressor is evicted (idle / LRU), on engine close, and every
 *     `stateSaveEvery` chunks. Between two saves every processed chunk is a full `chunkSize` chunk
 *     starting at the saved `seen` (only finalize processes a partial chunk, and it always saves), so a
 *     restart restores the exact compressor by loading the state and replaying the stored tokens from
 *     `seen` to `processed` in chunkSize chunks (deterministic, without rewriting embeddings).
 *
 * Text handling: bytes are decoded with a streaming TextDecoder (a multi-byte character split across
 * pieces is held as `partial` bytes). Decoded text goes to a tail buffer; only the prefix up to the
 * last *safe boundary* (just before a space that follows a non-space and precedes a non-space) is
 * committed and tokenized; the rest stays in the tail until more text arrives or finalize flushes it.
 * Pieces after the first are tokenized with tokenizer.encodeContinuation so that the concatenation
 * equals the tokenization of the whole text (checked at tokenizer load time). A tail without any safe
 * boundary is force-committed when it exceeds MAX_TAIL_CHARS (may differ from one-shot tokenization
 * at that point only).
 */
import { Packr } from "msgpackr";
import {
  closeSync,
  existsSync,
  fsyncSync,
  ftruncateSync,
  mkdirSync,
  openSync,
  readFileSync,
  readSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { join } from "node:path";
import { type Pointer, toArrayBuffer } from "bun:ffi";
import { type MappedFile, type MappedRows, RF_F16, RF_F32 } from "../../ffi/native.ts";
import type { ContextInfo, ContextState } from "./api.ts";
import { addNormalisedRows, type RowSum } from "./background.ts";
import type { HeadSpec } from "../model/types.ts";

export const MAX_TAIL_CHARS = 1 << 16;

const packr = new Packr({ useRecords: false, moreTypes: true });

export interface SessionParams {
  chunkSize: number;
  capacity: number;
  nSink: number;
  nRecent: number;
  obsWindow: number;
  embDim: number;
  embDtype: number; // RF_F16 (1) or RF_F32 (0)
}

export interface SessionMeta {
  v: 1;
  id: string;
  createdAt: number;
  updatedAt: number;
  bytesReceived: number;
  tokens: number; // tokens committed to tokens.bin
  processed: number; // rows in emb.bin
  started: boolean; // some text has been committed (later pieces use continuation tokenization)
  finalized: boolean; // finalize called since the last append that added content
  failed: string | null;
  metadata?: Record<string, unknown>;
  tail: string;
  partial: Uint8Array; // undecoded trailing bytes of an incomplete UTF-8 character
  fingerprint: string;
  heads: HeadSpec[];
  params: SessionParams;
  stateSeen: number; // tokens covered by compressor.state (0: no state file)
  invalid?: number; // invalid UTF-8 sequences read as U+FFFD (absent in sessions stored before it was counted)
  /** the f64 sum (embDim values, as bytes) of the first rowSumRows embedding rows, each L2-normalised: the question
   * tokens' background (background.ts); absent in sessions stored before it was kept, then summed at their first query */
  rowSum?: Uint8Array;
  rowSumRows?: number;
}

/** Document text in, token ids out: special-token strings in an upload are plain text (src/model/tokenizer.ts). */
export interface SessionTokenizer {
  encodeText(text: string): number[];
  encodeContinuation(text: string): number[];
}

function isSpace(c: string | undefined): boolean {
  return c === undefined ? false : /\s/.test(c);
}

function countChar(s: string, code: number): number {
  let n = 0;
  for (let i = s.indexOf(String.fromCharCode(code)); i >= 0; i = s.indexOf(String.fromCharCode(code), i + 1)) n++;
  return n;
}

/** U+FFFD as the bytes hold it (EF BF BD): a replacement character that was in the text, not made by decoding. */
function countReplacementBytes(b: Uint8Array): number {
  let n = 0;
  for (let i = b.indexOf(0xef); i >= 0 && i + 2 < b.byteLength; i = b.indexOf(0xef, i + 1))
    if (b[i + 1] === 0xbf && b[i + 2] === 0xbd) n++;
  return n;
}

/** Index of the last safe boundary in `s` (0 when none). */
export function lastSafeBoundary(s: string): number {
  for (let i = s.length - 2; i >= 1; i--) {
    if (s[i] === " " && !isSpace(s[i - 1]) && !isSpace(s[i + 1])) return i;
  }
  return 0;
}

function fsyncDir(dir: string): void {
  try {
    const fd = openSync(dir, "r");
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  } catch {
    /* best effort */
  }
}

/** Writes all of `data` to `path` opened with `flags` ("w", "a"), fsync'd when `sync`. */
function writeFully(path: string, flags: string, data: Uint8Array, sync: boolean): void {
  const fd = openSync(path, flags);
  try {
    let off = 0;
    while (off < data.byteLength) off += writeSync(fd, data, off, data.byteLength - off);
    if (sync) fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

function atomicWrite(path: string, data: Uint8Array, sync: boolean): void {
  writeFully(path + ".tmp", "w", data, sync);
  renameSync(path + ".tmp", path);
}

function appendSync(path: string, data: Uint8Array, sync: boolean): void {
  writeFully(path, "a", data, sync);
}

/** What maps and unmaps a file (the native library: Native.mapFile / unmapFile). */
export interface FileMapper {
  mapFile(path: string): MappedFile;
  unmapFile(m: MappedFile): void;
}

/** A context's embedding rows inside Session.withEmbeddings: valid only while its callback runs. */
export interface EmbeddingRows {
  rows: number;
  /** rows 0..rows as Native.scoreSelect reads them in place */
  mapped: MappedRows;
  /** rows [from, to) as a typed array over the mapping (f16 bits or f32; at most 4 GiB at a time) */
  slice(from: number, to: number): Float32Array | Uint16Array;
}

/** rows summed per slice when rowSum catches up from the file (bounded temporary f32 copies) */
const ROW_SUM_SLICE = 65_536;

export class Session {
  readonly dir: string;
  meta: SessionMeta;
  private decoder = new TextDecoder("utf-8", { fatal: false, ignoreBOM: true });
  /** emb.bin as last mapped (withEmbeddings), and who unmaps it */
  private embMap: { file: MappedFile; mapper: FileMapper } | null = null;
  /** sizes of the files whose length is not a count in the metadata (kept so that disk use needs no stat) */
  private metaBytes = 0;
  private stateBytes = 0;

  private constructor(dir: string, meta: SessionMeta) {
    this.dir = dir;
    this.meta = meta;
    if (meta.partial.byteLength > 0) this.decoder.decode(meta.partial, { stream: true });
  }

  get id(): string {
    return this.meta.id;
  }
  get rowBytes(): number {
    return this.meta.params.embDim * (this.meta.params.embDtype === 1 ? 2 : 4);
  }
  private p(name: string): string {
    return join(this.dir, name);
  }

  static create(
    dataDir: string,
    id: string,
    init: { fingerprint: string; heads: HeadSpec[]; params: SessionParams; metadata?: Record<string, unknown> },
  ): Session {
    const dir = join(dataDir, "contexts", id);
    mkdirSync(dir, { recursive: true });
    const now = Date.now();
    const meta: SessionMeta = {
      v: 1,
      id,
      createdAt: now,
      updatedAt: now,
      bytesReceived: 0,
      tokens: 0,
      processed: 0,
      started: false,
      finalized: false,
      failed: null,
      metadata: init.metadata,
      tail: "",
      partial: new Uint8Array(0),
      fingerprint: init.fingerprint,
      heads: init.heads,
      params: init.params,
      stateSeen: 0,
      rowSum: new Uint8Array(init.params.embDim * 8),
      rowSumRows: 0,
    };
    writeFileSync(join(dir, "tokens.bin"), new Uint8Array(0));
    writeFileSync(join(dir, "emb.bin"), new Uint8Array(0));
    const s = new Session(dir, meta);
    s.saveMeta(true);
    fsyncDir(join(dataDir, "contexts"));
    return s;
  }

  /** Load and reconcile a session directory. Returns null when it has no (readable) metadata. */
  static load(dir: string): Session | null {
    const mp = join(dir, "meta.msgpack");
    if (!existsSync(mp)) return null;
    let meta: SessionMeta;
    try {
      meta = packr.unpack(readFileSync(mp)) as SessionMeta;
    } catch {
      return null;
    }
    if (!meta || meta.v !== 1 || typeof meta.id !== "string") return null;
    meta.partial = meta.partial ? new Uint8Array(meta.partial) : new Uint8Array(0);
    if (meta.rowSum) meta.rowSum = new Uint8Array(meta.rowSum); // aligned, own buffer (a Float64Array views it)
    const s = new Session(dir, meta);
    s.reconcile();
    return s;
  }

  private reconcile(): void {
    const m = this.meta;
    const tp = this.p("tokens.bin");
    if (!existsSync(tp)) writeFileSync(tp, new Uint8Array(0));
    const nTok = Math.floor(statSync(tp).size / 4);
    if (nTok > m.tokens || statSync(tp).size % 4 !== 0) {
      const fd = openSync(tp, "r+");
      ftruncateSync(fd, Math.min(nTok, m.tokens) * 4);
      fsyncSync(fd);
      closeSync(fd);
    }
    if (nTok < m.tokens) {
      m.failed = `token file has ${nTok} tokens but metadata acknowledged ${m.tokens}`;
      m.tokens = nTok;
    }
    const ep = this.p("emb.bin");
    if (!existsSync(ep)) writeFileSync(ep, new Uint8Array(0));
    const size = statSync(ep).size;
    const rows = Math.min(Math.floor(size / this.rowBytes), m.tokens);
    if (rows * this.rowBytes !== size) {
      const fd = openSync(ep, "r+");
      ftruncateSync(fd, rows * this.rowBytes);
      fsyncSync(fd);
      closeSync(fd);
    }
    m.processed = rows;
    // rows dropped here leave the sum covering more than the file: summed again at the next query (rowSum)
    if ((m.rowSumRows ?? 0) > rows) {
      m.rowSum = undefined;
      m.rowSumRows = undefined;
    }
    const st = this.readStateSeen();
    m.stateSeen = st !== null && st <= rows ? st : 0;
    const sp = this.p("compressor.state");
    this.stateBytes = existsSync(sp) ? statSync(sp).size : 0;
    this.saveMeta(true);
  }

  // ---------- state ----------
  get state(): ContextState {
    const m = this.meta;
    if (m.failed) return "failed";
    if (m.bytesReceived === 0 && m.tokens === 0) return m.finalized ? "ready" : "empty";
    if (m.tail.length === 0 && m.partial.byteLength === 0 && m.processed === m.tokens && m.finalized) return "ready";
    return "processing";
  }

  info(cacheLen = 0): ContextInfo {
    const m = this.meta;
    const i: ContextInfo = {
      id: m.id,
      state: this.state,
      createdAt: m.createdAt,
      updatedAt: m.updatedAt,
      bytesReceived: m.bytesReceived,
      tokensReceived: m.tokens,
      tokensProcessed: m.processed,
      pendingChars: m.tail.length,
      embeddingBytes: m.processed * this.rowBytes,
      diskBytes: this.diskBytes,
      cacheLen,
      invalidUtf8: m.invalid ?? 0,
    };
    if (m.metadata) i.metadata = m.metadata;
    if (m.failed) i.error = m.failed;
    return i;
  }

  /** Bytes of this context's files: tokens, embeddings, saved compressor state, metadata. */
  get diskBytes(): number {
    return this.meta.tokens * 4 + this.meta.processed * this.rowBytes + this.stateBytes + this.metaBytes;
  }

  /**
   * Disk bytes one more byte of text will cost once tokenized and compressed: this context's own tokens per byte
   * once it has enough text to tell, else a prior of 0.35 (English is about 0.25, code and CJK text more).
   */
  diskBytesPerTextByte(): number {
    const m = this.meta;
    const tokensPerByte = m.bytesReceived >= 1 << 16 && m.tokens > 0 ? m.tokens / m.bytesReceived : 0.35;
    return tokensPerByte * (4 + this.rowBytes);
  }

  saveMeta(sync: boolean): void {
    this.meta.updatedAt = Date.now();
    const packed = packr.pack(this.meta);
    atomicWrite(this.p("meta.msgpack"), packed, sync);
    this.metaBytes = packed.byteLength;
  }

  fail(msg: string): void {
    this.meta.failed = msg;
    this.saveMeta(true);
  }

  // ---------- text -> tokens ----------
  /**
   * Accept a piece of raw UTF-8; commit text up to the last safe boundary (all of it when `flush`).
   * Tokens are appended to tokens.bin (fsync) and the metadata committed. Returns new token count.
   */
  appendBytes(bytes: Uint8Array, tok: SessionTokenizer, flush = false): number {
    const m = this.meta;
    let text = bytes.byteLength ? this.decoder.decode(bytes, { stream: !flush }) : "";
    if (flush && bytes.byteLength === 0) text = this.decoder.decode(new Uint8Array(0));
    // each U+FFFD the decoder made (not one the text holds as EF BF BD): byte offsets then leave the file's
    const made = countChar(text, 0xfffd) - countReplacementBytes(concatBytes(m.partial, bytes));
    if (made > 0) m.invalid = (m.invalid ?? 0) + made;
    m.bytesReceived += bytes.byteLength;
    // track undecoded trailing bytes so a restart can resume the decoder
    m.partial = flush ? new Uint8Array(0) : trailingPartial(concatBytes(m.partial, bytes));
    let tail = m.tail + text;
    let commit = "";
    if (flush) {
      commit = tail;
      tail = "";
    } else {
      let b = lastSafeBoundary(tail);
      if (b === 0 && tail.length > MAX_TAIL_CHARS) {
        // no safe boundary for a long stretch: force one (before the last whitespace, else mid-text)
        b = Math.max(tail.lastIndexOf(" ", tail.length - 2), tail.lastIndexOf("\n", tail.length - 2));
        if (b <= 0) b = tail.length - 16;
        const c = tail.charCodeAt(b);
        if (c >= 0xdc00 && c <= 0xdfff) b--; // never split a surrogate pair
      }
      if (b > 0) {
        commit = tail.slice(0, b);
        tail = tail.slice(b);
      }
    }
    let ids: number[] = [];
    if (commit.length > 0) {
      ids = m.started ? tok.encodeContinuation(commit) : tok.encodeText(commit);
      m.started = true;
    }
    if (ids.length > 0) appendSync(this.p("tokens.bin"), new Uint8Array(Int32Array.from(ids).buffer), true);
    m.tokens += ids.length;
    m.tail = tail;
    if (bytes.byteLength > 0 || ids.length > 0) m.finalized = false;
    this.saveMeta(true);
    return ids.length;
  }

  /**
   * Appends token ids as they are (an inline context: its text was tokenized by the caller, see inline.ts);
   * `textBytes` is the UTF-8 size of the text they stand for. Durable like appendBytes (tokens, then metadata).
   */
  appendTokens(ids: Int32Array, textBytes: number): void {
    const m = this.meta;
    if (ids.length > 0)
      appendSync(this.p("tokens.bin"), new Uint8Array(ids.buffer, ids.byteOffset, ids.byteLength), true);
    m.tokens += ids.length;
    m.bytesReceived += textBytes;
    m.started = true;
    if (ids.length > 0) m.finalized = false;
    this.saveMeta(true);
  }

  readTokens(start: number, end: number): Int32Array {
    const n = Math.max(0, end - start);
    const out = new Int32Array(n);
    if (n === 0) return out;
    const fd = openSync(this.p("tokens.bin"), "r");
    try {
      const u8 = new Uint8Array(out.buffer);
      let off = 0;
      while (off < u8.byteLength) {
        const r = readSync(fd, u8, off, u8.byteLength - off, start * 4 + off);
        if (r <= 0) throw new Error(`tokens.bin of ${this.id} is shorter than expected`);
        off += r;
      }
    } finally {
      closeSync(fd);
    }
    return out;
  }

  // ---------- embeddings ----------
  appendEmbeddings(rows: Float32Array | Uint16Array, n: number): void {
    const bytes = new Uint8Array(rows.buffer, rows.byteOffset, n * this.rowBytes);
    appendSync(this.p("emb.bin"), bytes, true);
    const m = this.meta;
    // the sum follows the rows while it covers all of them (else the next query catches it up from the file)
    const sum = this.storedRowSum();
    if (sum && m.rowSumRows === m.processed) {
      addNormalisedRows(sum, rows, n, m.params.embDim);
      m.rowSumRows += n;
    }
    m.processed += n;
    this.saveMeta(false);
  }

  /**
   * The sum of the context's L2-normalised embedding rows 0..processed (embDim f64) and their count: the question
   * tokens' background (background.ts). Kept as rows are written; rows it does not cover yet (a session stored before
   * it was kept, rows written before a crash) are read from emb.bin here, and a sum over more rows than the file holds
   * (rows dropped by reconcile) is summed again. The returned array is a copy.
   */
  rowSum(mapper: FileMapper): RowSum {
    const m = this.meta;
    const dim = m.params.embDim;
    let sum = this.storedRowSum();
    if (!sum || (m.rowSumRows ?? 0) > m.processed) {
      m.rowSum = new Uint8Array(dim * 8);
      m.rowSumRows = 0;
      sum = this.storedRowSum()!;
    }
    const from = m.rowSumRows ?? 0;
    if (from < m.processed) {
      this.withEmbeddings(mapper, (emb) => {
        for (let i = from; i < emb.rows; i += ROW_SUM_SLICE) {
          const to = Math.min(emb.rows, i + ROW_SUM_SLICE);
          addNormalisedRows(sum, emb.slice(i, to), to - i, dim);
        }
        m.rowSumRows = emb.rows;
      });
      this.saveMeta(false); // kept, so a finished context is not summed again after a restart
    }
    return { sum: Float64Array.from(sum), rows: m.rowSumRows ?? 0 };
  }

  /** meta.rowSum as the f64 values it holds (a view), or null when absent or of another embed dim */
  private storedRowSum(): Float64Array | null {
    const { rowSum, params } = this.meta;
    if (!rowSum || rowSum.byteLength !== params.embDim * 8) return null;
    return new Float64Array(rowSum.buffer, rowSum.byteOffset, params.embDim);
  }

  /**
   * Runs `fn` over embedding rows 0..processed of emb.bin, mapped by the native library (any size: Bun.mmap stops at
   * 4 GiB, 16.7M rows of 256 bytes, and a query then failed with "Out of memory"). The mapping follows the rows
   * written since the last call and is released when it is replaced or the session is destroyed, so the views `fn`
   * gets are valid only while it runs (no view may be kept). Throws NativeError when the file cannot be mapped.
   */
  withEmbeddings<T>(mapper: FileMapper, fn: (rows: EmbeddingRows) => T): T {
    const rows = this.meta.processed;
    const dim = this.meta.params.embDim;
    const f16 = this.meta.params.embDtype === 1;
    const rowBytes = this.rowBytes;
    if (rows > 0 && (!this.embMap || this.embMap.file.bytes < rows * rowBytes)) {
      this.releaseEmbeddings();
      this.embMap = { file: mapper.mapFile(this.p("emb.bin")), mapper };
    }
    const m = rows > 0 ? this.embMap!.file : null;
    const view: EmbeddingRows = {
      rows,
      mapped: { ptr: (m?.ptr ?? 0) as Pointer, dtype: f16 ? RF_F16 : RF_F32, length: rows * dim },
      slice(from: number, to: number) {
        if (!m || to <= from) return f16 ? new Uint16Array(0) : new Float32Array(0);
        if (from < 0 || to > rows) throw new RangeError(`embedding rows ${from}..${to} outside 0..${rows}`);
        const ab = toArrayBuffer((m.ptr + from * rowBytes) as Pointer, 0, (to - from) * rowBytes);
        return f16 ? new Uint16Array(ab) : new Float32Array(ab);
      },
    };
    return fn(view);
  }

  private releaseEmbeddings(): void {
    if (this.embMap) this.embMap.mapper.unmapFile(this.embMap.file);
    this.embMap = null;
  }

  // ---------- compressor state ----------
  saveCompressorState(blob: Uint8Array, seen: number): void {
    const out = new Uint8Array(8 + blob.byteLength);
    new DataView(out.buffer).setBigUint64(0, BigInt(seen), true);
    out.set(blob, 8);
    atomicWrite(this.p("compressor.state"), out, true);
    this.stateBytes = out.byteLength;
    this.meta.stateSeen = seen;
    this.saveMeta(true);
  }

  private readStateSeen(): number | null {
    const p = this.p("compressor.state");
    if (!existsSync(p)) return null;
    const fd = openSync(p, "r");
    try {
      const b = new Uint8Array(8);
      if (readSync(fd, b, 0, 8, 0) !== 8) return null;
      return Number(new DataView(b.buffer).getBigUint64(0, true));
    } finally {
      closeSync(fd);
    }
  }

  loadCompressorState(): { seen: number; blob: Uint8Array } | null {
    const p = this.p("compressor.state");
    if (!existsSync(p) || this.meta.stateSeen === 0) return null;
    const all = readFileSync(p);
    const seen = Number(new DataView(all.buffer, all.byteOffset, 8).getBigUint64(0, true));
    return { seen, blob: new Uint8Array(all.buffer, all.byteOffset + 8, all.byteLength - 8) };
  }

  /** Remove the session directory. */
  destroy(): void {
    this.releaseEmbeddings();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

function concatBytes(a: Uint8Array, b: Uint8Array): Uint8Array {
  if (a.byteLength === 0) return b;
  const o = new Uint8Array(a.byteLength + b.byteLength);
  o.set(a);
  o.set(b, a.byteLength);
  return o;
}

/** The trailing bytes of `b` that form an incomplete UTF-8 sequence (0..3 bytes). */
export function trailingPartial(b: Uint8Array): Uint8Array {
  const n = b.byteLength;
  for (let k = 1; k <= Math.min(3, n); k++) {
    const c = b[n - k]!;
    if ((c & 0xc0) === 0x80) continue; // continuation byte, keep looking back
    const need = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 1;
    return need > k ? b.slice(n - k) : new Uint8Array(0);
  }
  return new Uint8Array(0);
}
