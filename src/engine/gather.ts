/**
 * Gather: which context tokens the recompute sees, for each query method.
 *   reform     score every context token against the question as the recompute prompt has it (embedding file),
 *              smooth (mean or max over the window, trailing each token by the lag: the heads file's "smoothing"),
 *              keep the best `budget` tokens plus the edges, drop those far below the best (the score floor) and
 *              complete the passages' sentences with what that and the sentence tail free (selection.ts)
 *   full       the whole context
 *   streaming  StreamingLLM: the whole context compressed again at full depth through a cache of attention sinks +
 *              the most recent tokens (no other entries), the cache imported into the sequence
 *   h2o        the same with H2O eviction (sinks + recent + the entries with the most attention)
 * The two recurrent baselines get a cache of `cache` entries (planQuery: 4x the budget, bounded by the window).
 */
import { type NativeCompressor, RF_F16 } from "../../ffi/native.ts";
import { f16ToF32 } from "../util/f16.ts";
import type { Method, Selection } from "./api.ts";
import type { CompressorPool } from "./compressors.ts";
import { evictionParams } from "./eviction.ts";
import type { LoadedEngine } from "./load.ts";
import type { ResidentPool } from "./resident.ts";
import {
  adjacentPairs,
  BACKGROUND_K,
  backgroundOffsets,
  kthQuery,
  type ScoreBackground,
  type ScoreQuery,
  scoresPairs,
  usesKth,
} from "./background.ts";
import { selectionReport } from "./report.ts";
import { gather, refineSelection, selectionFor, smoothScores } from "./selection.ts";
import type { Task } from "./scheduler.ts";
import type { Session } from "./session.ts";

export interface GatherInput {
  s: Session;
  method: Method;
  budget: number;
  /** the score floor (selection.ts keepNearBest; 0: the budget filled by score) */
  floor: number;
  /** which background each question token's scores count from (background.ts) */
  background: ScoreBackground;
  /** template tokens before and after the context */
  pre: number[];
  suf: number[];
  /** the token turns whose embeddings score the context (reform; see PlannedQuery) */
  queryTurns: number[][];
  /** cache entries of the recurrent baselines */
  cache: number;
  /** true once the query should stop (abort); throws when it must fail (context deleted) */
  cancelled: () => boolean;
  /** reports long work (the baselines' full-depth pass) token by token */
  progress: (done: number, total: number) => void;
  /** also report what was gathered (opt-in `returnSelection`: the raw scores are kept and smoothed once more) */
  report: boolean;
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
  /** what was gathered, when asked for (report) */
  selection?: Selection;
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
  resident: ResidentPool | null = null,
): Task<Gathered> {
  const { s, pre, suf, budget } = g;
  const d = e.defaults;
  const n = s.meta.tokens;
  if (g.method === "h2o" || g.method === "streaming") {
    const nSink = Math.min(d.nSink, g.cache);
    const policy = g.method; // narrowed here; a closure would not keep the narrowing
    const create = () =>
      e.model.createCompressor(
        {
          capacity: g.cache,
          nSink,
          // streaming keeps nothing but the sinks and the recent window; h2o fills the rest by attention
          ...evictionParams(policy, g.cache, nSink, d.obsWindow),
          obsWindow: d.obsWindow,
          maxChunk: d.chunkSize,
          embDtype: RF_F16,
          exitLayer: e.cfg.config.numLayers - 1,
        },
        s.meta.heads,
      );
    const comp = resident ? resident.withMemory(create) : create();
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
    const selected = Math.min(n, Math.max(0, cached - pre.length));
    return {
      prompt: Int32Array.from(suf),
      promptLen: cached + suf.length,
      selected,
      h2o: comp,
      // a cache, not a set of tokens: no spans, no scores
      ...(g.report ? { selection: { ...emptySelection(g.method, n), selectedTokens: selected } } : {}),
    };
  }
  let ctx: Int32Array;
  let selection: Selection | undefined;
  // a context within the budget is taken whole, unscored, unless the caller wants to see the scores
  if (g.method === "full" || (n <= budget && !g.report)) {
    ctx = s.readTokens(0, n);
    if (g.report)
      selection = selectionReport(e.tok, {
        method: g.method,
        tokens: ctx,
        idx: Int32Array.from({ length: n }, (_, i) => i),
        smoothed: null,
        window: 0,
        lag: 0,
        edge: 0,
      });
  } else {
    const comp = yield* pool.ensure(s, sessionOf);
    // the compressor's cache and the scored rows must describe the same tokens: write any chunk still in flight
    pool.settle(s);
    // each turn embedded whole on top of the compressed context; the scorer takes the best match over the rows of
    // their own tokens (not the template's markup and whitespace: selection.ts queryScorers), or over all rows
    // when no token is the question's own
    const turns = g.queryTurns.filter((t) => t.length > 0);
    const scorers = turns.flat().filter((id) => e.queryScorers[id] === 1).length;
    const keep = (id: number) => scorers === 0 || e.queryScorers[id] === 1;
    const nq = scorers || turns.reduce((k, t) => k + t.length, 0);
    const dim = s.meta.params.embDim;
    const qf = new Float32Array(nq * dim);
    let row = 0;
    for (const turn of turns) {
      const qe = comp.embed(Int32Array.from(turn));
      const qrows = qe instanceof Uint16Array ? f16ToF32(qe) : qe;
      for (let j = 0; j < turn.length; j++)
        if (keep(turn[j]!)) qf.set(qrows.subarray(j * dim, (j + 1) * dim), row++ * dim);
    }
    const sel = selectionFor(d, budget);
    const op = e.headsFile.smoothing ?? "mean";
    const rows = s.meta.processed;
    // before any yield: an upload running alongside may append rows at the next step, and the mean's row sum must
    // describe exactly the rows scored (the k-th best is taken over `rows` explicitly)
    const mean = g.background === "mean" ? backgroundOffsets(s.rowSum(e.native), qf, nq, dim) : undefined;
    // the context's rows resident on the device (uploaded once, resident.ts), else the mapped file: the same scores
    const store = resident ? yield* resident.forQuery(s, rows) : null;
    // short of device memory for the scoring buffers, the stores give way and the file is streamed
    const scored = <T>(fromStore: () => T, fromFile: () => T): T =>
      resident ? resident.withMemory(store ? fromStore : fromFile, fromFile) : fromFile();
    // score, pool (the heads file's operator, mean or max) and select in one native call (no copy, no sort), the
    // sentence tail kept back; the raw scores come back for a report and for the score floor
    const floor = g.floor;
    const scores = g.report || floor > 0 ? new Float32Array(rows) : undefined;
    const what = { window: sel.window, lag: sel.lag, budget: budget - sel.tail, edge: sel.edge, pool: op };
    const withQuery = (q: ScoreQuery) => ({ ...what, offsets: q.offsets, pairs: q.pairs, pairOffsets: q.pairOffsets });
    let picked: Int32Array;
    if (usesKth(g.background)) {
      const pairs = scoresPairs(g.background)
        ? adjacentPairs(turns, keep, (id) => e.wordContinuations[id] === 1)
        : undefined;
      picked = scored(
        // on the device: the k-th bests, then the scores with them taken off
        () => {
          const q = kthQuery(qf, nq, dim, store!.scoreKth(rows, qf, nq, BACKGROUND_K, pairs), pairs);
          return store!.scoreSelect(rows, q.q, q.nq, withQuery(q), scores);
        },
        // from the file, in one call: the CPU build reads the context once for both
        () =>
          s.withEmbeddings(e.native, (emb) =>
            e.native.scoreKthSelect(emb.mapped, rows, dim, qf, nq, BACKGROUND_K, { ...what, pairs }, scores),
          ),
      );
    } else {
      const query: ScoreQuery = { q: qf, nq, offsets: mean };
      picked = scored(
        () => store!.scoreSelect(rows, qf, nq, withQuery(query), scores),
        () =>
          s.withEmbeddings(e.native, (emb) =>
            e.native.scoreSelect(emb.mapped, rows, dim, qf, nq, withQuery(query), scores),
          ),
      );
    }
    const tokens = s.readTokens(0, n);
    const idx = refineSelection(picked, scores ?? null, tokens, e.sentenceEnds, { ...sel, op, floor });
    ctx = gather(tokens, idx);
    if (scores && g.report) {
      yield;
      // the same smoothing as the native selection (selection.ts is its reference), for the profile and span scores
      const smoothed = smoothScores(scores, sel.window, op, sel.lag);
      selection = selectionReport(e.tok, {
        method: g.method,
        tokens,
        idx,
        smoothed,
        ...sel,
        scoreFloor: floor,
        scoreBackground: g.background,
      });
    }
    yield;
  }
  const prompt = concat(pre, ctx, suf);
  return { prompt, promptLen: prompt.length, selected: ctx.length, h2o: null, ...(selection ? { selection } : {}) };
}

function emptySelection(method: Method, n: number): Selection {
  return {
    method,
    contextTokens: n,
    selectedTokens: 0,
    window: 0,
    lag: 0,
    edge: 0,
    scoreFloor: 0,
    scoreBackground: "off",
    spans: [],
    profile: null,
  };
}
