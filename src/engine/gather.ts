/**
 * Gather: which context tokens the recompute sees, for each query method.
 *   reform     score every context token against the question (embedding file), smooth, keep the best `budget`
 *   full       the whole context
 *   streaming  attention sinks + the last `budget` tokens
 *   h2o        a full-depth H2O compressor over the whole context, its cache imported into the sequence
 */
import { type NativeCompressor, RF_F16 } from "../../ffi/native.ts";
import { f16ToF32 } from "../util/f16.ts";
import type { Method } from "./api.ts";
import type { CompressorPool } from "./compressors.ts";
import { type LoadedEngine, recentFor } from "./load.ts";
import { gather, streamingSelection } from "./selection.ts";
import type { Task } from "./scheduler.ts";
import type { Session } from "./session.ts";

export interface GatherInput {
  s: Session;
  method: Method;
  budget: number;
  /** template tokens before and after the context */
  pre: number[];
  suf: number[];
  /** the text whose embedding scores the context (reform) */
  question: string;
  /** true once the query should stop (abort); throws when it must fail (context deleted) */
  cancelled: () => boolean;
  /** reports long work (h2o's full-depth pass) token by token */
  progress: (done: number, total: number) => void;
}

export interface Gathered {
  /** tokens to prefill: pre + selected context + suf, or only suf after an imported H2O cache */
  prompt: Int32Array;
  /** tokens the model attends to in total (the H2O cache counts) */
  promptLen: number;
  /** context tokens among them */
  selected: number;
  /** the H2O compressor whose cache the sequence imports (h2o only); the caller destroys it */
  h2o: NativeCompressor | null;
}

function concat(...parts: ArrayLike<number>[]): Int32Array {
  const out = new Int32Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

export function* gatherContext(
  e: LoadedEngine,
  pool: CompressorPool,
  sessionOf: (id: string) => Session | undefined,
  g: GatherInput,
): Task<Gathered> {
  const { s, pre, suf, budget } = g;
  const d = e.defaults;
  const n = s.meta.tokens;
  if (g.method === "h2o") {
    const comp = e.model.createCompressor(
      {
        capacity: budget + pre.length,
        nSink: d.nSink,
        nRecent: recentFor(budget, d.obsWindow),
        obsWindow: d.obsWindow,
        maxChunk: Math.max(d.chunkSize, 512),
        embDtype: RF_F16,
        exitLayer: e.cfg.config.numLayers - 1,
      },
      s.meta.heads,
    );
    try {
      const full = concat(pre, s.readTokens(0, n));
      for (let off = 0; off < full.length; off += d.chunkSize) {
        if (g.cancelled()) break;
        const end = Math.min(full.length, off + d.chunkSize);
        comp.process(full.subarray(off, end), null);
        g.progress(end, full.length);
        yield;
      }
    } catch (err) {
      comp.destroy();
      throw err;
    }
    const cached = comp.cacheLen();
    return {
      prompt: Int32Array.from(suf),
      promptLen: cached + suf.length,
      selected: Math.min(n, Math.max(0, cached - pre.length)),
      h2o: comp,
    };
  }
  let ctx: Int32Array;
  if (g.method === "full" || n <= budget) ctx = s.readTokens(0, n);
  else if (g.method === "streaming") ctx = gather(s.readTokens(0, n), streamingSelection(n, budget, d.nSink));
  else {
    const comp = yield* pool.ensure(s, sessionOf);
    let q = e.tok.encode(g.question);
    if (q.length === 0) q = suf.slice();
    const maxQ = Math.max(d.chunkSize, 512);
    if (q.length > maxQ) q = q.slice(q.length - maxQ);
    const qe = comp.embed(Int32Array.from(q));
    const qf = qe instanceof Uint16Array ? f16ToF32(qe) : qe;
    // score, smooth and select in one native call over the mapped embedding file (no copy, no sort)
    const idx = e.native.scoreSelect(s.embeddings(), s.meta.processed, s.meta.params.embDim, qf, q.length, {
      window: d.window,
      budget,
      edge: d.edge,
    });
    ctx = gather(s.readTokens(0, n), idx);
    yield;
  }
  const prompt = concat(pre, ctx, suf);
  return { prompt, promptLen: prompt.length, selected: ctx.length, h2o: null };
}
