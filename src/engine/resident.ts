/**
 * Resident context embeddings: each context's embedding rows mirrored in device memory (rf_embstore), so that a
 * query scores them with one GEMM per block instead of reading the memory-mapped emb.bin and uploading all of it
 * again (a million-token context is 1 GiB of f16 rows at embed dim 512).
 *   - Budget: the device memory the memory plan leaves free after the weights, the shared workspace, one recompute
 *     sequence, the margin and the live compressors' caches (memoryPlan in load.ts), or --resident-emb-bytes; 0 on
 *     the CPU backend (no device: streaming the mapped file is what it does anyway).
 *   - Uploaded once: a context compressed while this pool has room is appended chunk by chunk as its rows are written
 *     (CompressorPool calls `appended`); any other context is uploaded from its file by its first query
 *     (`forQuery`, a slice per scheduler step).
 *   - Dropped under memory pressure: least recently used first, when another context needs the room, and all of them
 *     when a device allocation elsewhere (a compressor, a recompute sequence) fails (`withMemory`); a context without
 *     a store is scored from its file as before (rf_score_select), with the same result.
 */
import { embStoreBytes, type NativeEmbStore, type NativeModel, NativeError, RF_ERR_OOM } from "../../ffi/native.ts";
import type { Task } from "./scheduler.ts";
import type { Session } from "./session.ts";

/** rows uploaded from a context's file per scheduler step (64 MiB at embed dim 512) */
const UPLOAD_SLICE_ROWS = 65_536;

interface Entry {
  store: NativeEmbStore;
  bytes: number;
  lastUsed: number;
}

const isOom = (e: unknown) => e instanceof NativeError && e.code === RF_ERR_OOM;

export class ResidentPool {
  private stores = new Map<string, Entry>();
  private used = 0;
  /** stores dropped to make room or under memory pressure (metrics) */
  evictions = 0;

  constructor(
    private readonly model: NativeModel,
    private readonly dim: number,
    /** device bytes all stores may hold together; 0: none is kept */
    readonly budget: number,
  ) {}

  /** bytes the stores hold */
  bytes(): number {
    return this.used;
  }

  /** contexts resident now */
  count(): number {
    return this.stores.size;
  }

  has(id: string): boolean {
    return this.stores.has(id);
  }

  drop(id: string): void {
    const e = this.stores.get(id);
    if (!e) return;
    this.stores.delete(id);
    this.used -= e.bytes;
    e.store.destroy();
  }

  dropAll(): void {
    for (const id of [...this.stores.keys()]) this.drop(id);
  }

  /** Frees least recently used stores other than `keep`'s until `need` more bytes fit; false when they cannot. */
  private makeRoom(need: number, keep: string): boolean {
    if (need > this.budget) return false;
    while (this.used + need > this.budget) {
      let oldest: string | null = null;
      let t = Number.POSITIVE_INFINITY;
      for (const [id, e] of this.stores)
        if (id !== keep && e.lastUsed < t) {
          t = e.lastUsed;
          oldest = id;
        }
      if (oldest === null) return false;
      this.drop(oldest);
      this.evictions++;
    }
    return true;
  }

  /** Appends rows to id's store within the budget; on a failure (no room, out of device memory) the store goes. */
  private append(id: string, e: Entry, rows: Uint16Array, n: number): boolean {
    const after = embStoreBytes(e.store.rows() + n, this.dim);
    if (!this.makeRoom(after - e.bytes, id)) {
      this.drop(id);
      return false;
    }
    try {
      e.store.append(rows, n);
    } catch (err) {
      this.drop(id);
      if (isOom(err)) return false;
      throw err;
    }
    this.used += e.store.memoryBytes() - e.bytes;
    e.bytes = e.store.memoryBytes();
    e.lastUsed = Date.now();
    return true;
  }

  private create(id: string): Entry | null {
    let store: NativeEmbStore;
    try {
      store = this.model.createEmbStore(this.dim);
    } catch (err) {
      if (isOom(err)) return null;
      throw err;
    }
    const e: Entry = { store, bytes: 0, lastUsed: Date.now() };
    this.stores.set(id, e);
    return e;
  }

  /**
   * Rows [from, from + n) of `s` were just written to its embedding file: its store takes them too. A context whose
   * first rows these are starts a store when it fits; one that was not resident from its start is left to its first
   * query.
   */
  appended(s: Session, rows: Float32Array | Uint16Array, n: number, from: number): void {
    if (this.budget <= 0 || !(rows instanceof Uint16Array) || n === 0) return;
    let e = this.stores.get(s.id);
    if (!e) {
      if (from !== 0 || embStoreBytes(n, this.dim) > this.budget) return;
      e = this.create(s.id) ?? undefined;
      if (!e) return;
    }
    if (e.store.rows() !== from) {
      this.drop(s.id); // out of step with the file (cannot happen: rows are written in order); the file stays right
      return;
    }
    this.append(s.id, e, rows, n);
  }

  /**
   * The store holding the first `rows` rows of `s`'s embeddings, uploading from its file what it lacks (a slice per
   * step) when the context fits the budget; null: score from the file.
   */
  *forQuery(s: Session, rows: number): Task<NativeEmbStore | null> {
    if (this.budget <= 0 || s.meta.params.embDtype !== 1) return null;
    let e = this.stores.get(s.id);
    if (e && e.store.rows() >= rows) {
      e.lastUsed = Date.now();
      return e.store;
    }
    if (!e) {
      if (!this.makeRoom(embStoreBytes(rows, this.dim), s.id)) return null;
      e = this.create(s.id) ?? undefined;
      if (!e) return null;
    }
    while (e.store.rows() < rows) {
      const from = e.store.rows();
      const n = Math.min(UPLOAD_SLICE_ROWS, rows - from);
      // the mapped file, re-read per slice (its mapping follows the rows written meanwhile)
      const sent = s.withEmbeddings(this.model.native, (emb) =>
        this.append(s.id, e!, emb.slice(from, from + n) as Uint16Array, n),
      );
      if (!sent) return null;
      if (e.store.rows() < rows) yield;
      if (this.stores.get(s.id) !== e) return null; // dropped meanwhile (memory pressure, deletion)
    }
    return e.store;
  }

  /** Runs `fn`; when it fails for want of device memory and stores hold some, frees them and runs `retry` (by
   * default `fn` again; a caller whose `fn` used a store passes one that does not). */
  withMemory<T>(fn: () => T, retry: () => T = fn): T {
    try {
      return fn();
    } catch (err) {
      if (!isOom(err) || this.stores.size === 0) throw err;
      this.evictions += this.stores.size;
      this.dropAll();
      return retry();
    }
  }
}
