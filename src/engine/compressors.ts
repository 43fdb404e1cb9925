/**
 * Live upload compressors, one per session that is being written or queried, kept in LRU order up to
 * `maxLiveCompressors`. A compressor that is dropped saves its state first (when it has unsaved chunks),
 * and one that is needed again is restored from the saved state plus a replay of the stored tokens, so
 * the result is the same compressor as if it had never been dropped.
 *
 * Overlap (defaults.compressOverlap): a compress step submits chunk i + 1 (rf_compressor_submit) before it collects
 * chunk i's embeddings and writes them to emb.bin, so the file write (and fsync) of chunk i runs while the device
 * computes chunk i + 1. What stays as before, by construction:
 *   - emb.bin and meta.processed only ever hold collected, written rows (in order, fsync'd per chunk, as before);
 *     a submitted chunk is counted by its Live entry (`pending`), not by the session;
 *   - every compress task ends with nothing pending (the last chunk is collected and written before it returns),
 *     so an upload, finalize or inline compression that has returned has all its chunks on disk, as before;
 *   - a compressor's state is saved only with nothing pending (settle first; the native call refuses otherwise), so
 *     a saved state never covers rows that are not in emb.bin (a restart replays from the state's `seen`);
 *   - a compressor is dropped (LRU, idle, close) only after its pending chunks are written to its session's file;
 *   - a query embeds its question only after the context's pending chunks are written (settle in gatherContext), so
 *     the compressor's cache and the scored rows describe the same tokens.
 * The rows are the same bytes either way (rf_compressor_submit is rf_compressor_process in two halves).
 *
 * The compressed stream starts with BOS when the model uses one (as in training): the first chunk of a context is
 * processed as [BOS, ...chunk] and the BOS row of its embeddings is dropped, so tokens.bin and emb.bin hold the
 * context's own tokens only and the saved `seen` counts those (the compressor's own count includes the BOS).
 */
import type { NativeCompressor, NativeModel } from "../../ffi/native.ts";
import { type EngineDefaults, uploadCompressParams } from "./load.ts";
import { contextDeleted } from "./errors.ts";
import type { ResidentPool } from "./resident.ts";
import type { Task } from "./scheduler.ts";
import type { Session } from "./session.ts";

/** a chunk submitted and not yet written to the session's file */
interface Pending {
  n: number; // context tokens (rows written)
  bos: boolean; // processed as [BOS, ...chunk]: its first row is dropped
  onWritten: (n: number) => void;
}

interface Live {
  comp: NativeCompressor;
  dirty: number; // chunks processed since the last state save
  lastUsed: number;
  pending: Pending[]; // oldest first
}

export class CompressorPool {
  private live = new Map<string, Live>();

  constructor(
    private readonly model: NativeModel,
    private readonly defaults: EngineDefaults,
    private readonly bos: number | null,
    private readonly resident: ResidentPool | null = null,
  ) {}

  /** Context tokens `comp` has compressed (its own count includes the BOS of the first chunk). */
  private seenTokens(comp: NativeCompressor): number {
    const seen = comp.seen();
    return this.bos !== null && seen > 0 ? seen - 1 : seen;
  }

  cacheLen(id: string): number {
    return this.live.get(id)?.comp.cacheLen() ?? 0;
  }

  ids(): string[] {
    return [...this.live.keys()];
  }

  /** Tokens `ids` (context tokens at `offset`) as the compressor takes them: BOS first at the start of a context. */
  private withBos(ids: Int32Array, offset: number): { toks: Int32Array; bos: boolean } {
    if (offset > 0 || this.bos === null) return { toks: ids, bos: false };
    const withBos = new Int32Array(ids.length + 1);
    withBos[0] = this.bos;
    withBos.set(ids, 1);
    return { toks: withBos, bos: true };
  }

  /** Collects the oldest pending chunk of `l` and writes its rows to `s`'s file (and resident store). */
  private writeOldest(s: Session, l: Live): void {
    const p = l.pending.shift()!;
    const emb = l.comp.collect()!;
    const rows = p.bos ? emb.subarray(emb.length / (p.n + 1)) : emb;
    const from = s.meta.processed;
    s.appendEmbeddings(rows, p.n);
    this.resident?.appended(s, rows, p.n, from);
    p.onWritten(p.n);
  }

  /** Writes every pending chunk of `s`'s live compressor to its file (a no-op without overlap or pending chunks). */
  settle(s: Session): void {
    const l = this.live.get(s.id);
    while (l && l.pending.length > 0) this.writeOldest(s, l);
  }

  /** Destroys the live compressor of `id` (after writing its pending chunks and saving its state into `s`, when asked
   * and useful; without `s` its pending chunks are dropped: the session is gone or failed). */
  drop(id: string, saveInto: Session | null): void {
    const l = this.live.get(id);
    if (!l) return;
    this.live.delete(id);
    if (saveInto && !saveInto.meta.failed) {
      try {
        while (l.pending.length > 0) this.writeOldest(saveInto, l);
        if (l.dirty > 0) saveInto.saveCompressorState(l.comp.saveState(), this.seenTokens(l.comp));
      } catch (e) {
        console.error(`[engine] saving compressor state of ${id} failed: ${(e as Error).message}`);
      }
    }
    l.comp.destroy();
  }

  /** Saves and drops compressors idle for longer than `idleMs`, except those `busy` says are in use. */
  evictIdle(sessionOf: (id: string) => Session | undefined, busy: (id: string) => boolean): void {
    const now = Date.now();
    for (const [id, l] of this.live) {
      if (now - l.lastUsed > this.defaults.idleMs && !busy(id)) this.drop(id, sessionOf(id) ?? null);
    }
  }

  /** The live compressor of a session; restored from its saved state + replay of stored tokens. */
  *ensure(s: Session, sessionOf: (id: string) => Session | undefined): Task<NativeCompressor> {
    const have = this.live.get(s.id);
    if (have) {
      this.live.delete(s.id);
      this.live.set(s.id, have); // LRU order
      have.lastUsed = Date.now();
      return have.comp;
    }
    // make room first (the memory plan sized maxLiveCompressors so that this many caches fit on the device)
    while (this.live.size >= this.defaults.maxLiveCompressors) {
      const oldest = this.live.keys().next().value as string;
      this.drop(oldest, sessionOf(oldest) ?? null);
    }
    const params = uploadCompressParams(this.defaults, this.bos);
    const create = () => this.model.createCompressor(params, s.meta.heads);
    const comp = this.resident ? this.resident.withMemory(create) : create();
    const l: Live = { comp, dirty: 0, lastUsed: Date.now(), pending: [] };
    try {
      let seen = 0;
      const st = s.loadCompressorState();
      if (st) {
        comp.loadState(st.blob);
        seen = st.seen;
      }
      const chunk = s.meta.params.chunkSize;
      while (seen < s.meta.processed) {
        if (!sessionOf(s.id)) throw contextDeleted(s.id);
        const n = Math.min(chunk, s.meta.processed - seen);
        comp.process(this.withBos(s.readTokens(seen, seen + n), seen).toks, null); // rows already in the file
        seen += n;
        l.dirty++;
        yield;
      }
    } catch (e) {
      comp.destroy();
      throw e;
    }
    this.live.set(s.id, l);
    while (this.live.size > this.defaults.maxLiveCompressors) {
      const oldest = this.live.keys().next().value as string;
      if (oldest === s.id) break;
      this.drop(oldest, sessionOf(oldest) ?? null);
    }
    return comp;
  }

  /** Saves the state of `s`'s live compressor if it has chunks the saved state does not cover (after writing the
   * pending ones: a saved state never covers rows that are not in the file). */
  private saveIfDirty(s: Session): void {
    const l = this.live.get(s.id);
    if (l && l.dirty > 0) {
      this.settle(s);
      s.saveCompressorState(l.comp.saveState(), this.seenTokens(l.comp));
      l.dirty = 0;
    }
  }

  /**
   * Compresses the stored-but-unprocessed tokens of `s`: complete chunks only, or everything when
   * `final`. `onChunk(n)` runs after each chunk's embeddings are on disk; `stopped()` ends the work early
   * (the session was deleted).
   */
  *compress(
    s: Session,
    final: boolean,
    sessionOf: (id: string) => Session | undefined,
    onChunk: (n: number) => void,
    stopped: () => boolean,
  ): Task<void> {
    const chunk = s.meta.params.chunkSize;
    // tokens submitted and not yet written count as compressed here (the session counts written rows only)
    const inFlight = () => (this.live.get(s.id)?.pending ?? []).reduce((a, p) => a + p.n, 0);
    const next = () => s.meta.processed + inFlight();
    const todo = () => s.meta.tokens - next();
    if (todo() < (final ? 1 : chunk)) {
      if (final) this.saveIfDirty(s);
      return;
    }
    while (todo() >= (final ? 1 : chunk)) {
      if (stopped()) break;
      // re-fetched every chunk: between two steps another session's ensure() may have evicted this one (LRU),
      // writing its pending chunks first
      const comp = yield* this.ensure(s, sessionOf);
      const l = this.live.get(s.id)!;
      const n = Math.min(chunk, todo());
      const { toks, bos } = this.withBos(s.readTokens(next(), next() + n), next());
      if (this.defaults.compressOverlap) {
        // chunk i + 1 goes to the device first; chunk i's rows are written while it computes
        comp.submit(toks);
        l.pending.push({ n, bos, onWritten: onChunk });
        while (l.pending.length > 1) this.writeOldest(s, l);
      } else {
        const emb = comp.process(toks)!;
        const rows = bos ? emb.subarray(emb.length / toks.length) : emb;
        const from = s.meta.processed;
        s.appendEmbeddings(rows, n);
        this.resident?.appended(s, rows, n, from);
        onChunk(n);
      }
      l.dirty++;
      l.lastUsed = Date.now();
      if (n < chunk || l.dirty >= this.defaults.stateSaveEvery) this.saveIfDirty(s);
      yield;
    }
    // done or stopped, nothing is left pending for a session that still exists: what was computed is on disk when
    // the task returns (a deleted session's chunks went with its compressor; an error fails the session, whose
    // compressor is then dropped without writing)
    if (sessionOf(s.id)) this.settle(s);
    if (final && !stopped()) this.saveIfDirty(s);
  }
}
