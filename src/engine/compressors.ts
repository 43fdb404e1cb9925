/**
 * Live upload compressors, one per session that is being written or queried, kept in LRU order up to
 * `maxLiveCompressors`. A compressor that is dropped saves its state first (when it has unsaved chunks),
 * and one that is needed again is restored from the saved state plus a replay of the stored tokens, so
 * the result is the same compressor as if it had never been dropped.
 *
 * The compressed stream starts with BOS when the model uses one (as in training): the first chunk of a context is
 * processed as [BOS, ...chunk] and the BOS row of its embeddings is dropped, so tokens.bin and emb.bin hold the
 * context's own tokens only and the saved `seen` counts those (the compressor's own count includes the BOS).
 */
import type { NativeCompressor, NativeModel } from "../../ffi/native.ts";
import { type EngineDefaults, uploadCompressParams } from "./load.ts";
import { contextDeleted } from "./errors.ts";
import type { Task } from "./scheduler.ts";
import type { Session } from "./session.ts";

interface Live {
  comp: NativeCompressor;
  dirty: number; // chunks processed since the last state save
  lastUsed: number;
}

export class CompressorPool {
  private live = new Map<string, Live>();

  constructor(
    private readonly model: NativeModel,
    private readonly defaults: EngineDefaults,
    private readonly bos: number | null,
  ) {}

  /** Context tokens `comp` has compressed (its own count includes the BOS of the first chunk). */
  private seenTokens(comp: NativeCompressor): number {
    const seen = comp.seen();
    return this.bos !== null && seen > 0 ? seen - 1 : seen;
  }

  /** Compresses the context tokens `ids` that start at `offset`; returns their embeddings (without BOS's). */
  private process(comp: NativeCompressor, ids: Int32Array, offset: number): Float32Array | Uint16Array {
    if (offset > 0 || this.bos === null) return comp.process(ids)!;
    const withBos = new Int32Array(ids.length + 1);
    withBos[0] = this.bos;
    withBos.set(ids, 1);
    const emb = comp.process(withBos)!;
    return emb.subarray(emb.length / withBos.length);
  }

  cacheLen(id: string): number {
    return this.live.get(id)?.comp.cacheLen() ?? 0;
  }

  ids(): string[] {
    return [...this.live.keys()];
  }

  /** Destroys the live compressor of `id` (after saving its state into `s`, when asked and useful). */
  drop(id: string, saveInto: Session | null): void {
    const l = this.live.get(id);
    if (!l) return;
    this.live.delete(id);
    if (saveInto && l.dirty > 0 && !saveInto.meta.failed) {
      try {
        saveInto.saveCompressorState(l.comp.saveState(), this.seenTokens(l.comp));
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
    const comp = this.model.createCompressor(uploadCompressParams(this.defaults, this.bos), s.meta.heads);
    const l: Live = { comp, dirty: 0, lastUsed: Date.now() };
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
        this.process(comp, s.readTokens(seen, seen + n), seen);
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

  /** Saves the state of `s`'s live compressor if it has chunks the saved state does not cover. */
  private saveIfDirty(s: Session): void {
    const l = this.live.get(s.id);
    if (l && l.dirty > 0) {
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
    const pending = () => s.meta.tokens - s.meta.processed;
    if (pending() < (final ? 1 : chunk)) {
      if (final) this.saveIfDirty(s);
      return;
    }
    while (pending() >= (final ? 1 : chunk)) {
      if (stopped()) return;
      // re-fetched every chunk: between two steps another session's ensure() may have evicted this one (LRU)
      const comp = yield* this.ensure(s, sessionOf);
      const l = this.live.get(s.id)!;
      const n = Math.min(chunk, pending());
      const emb = this.process(comp, s.readTokens(s.meta.processed, s.meta.processed + n), s.meta.processed);
      s.appendEmbeddings(emb, n);
      l.dirty++;
      l.lastUsed = Date.now();
      if (n < chunk || l.dirty >= this.defaults.stateSaveEvery) this.saveIfDirty(s);
      onChunk(n);
      yield;
    }
    if (final) this.saveIfDirty(s);
  }
}
