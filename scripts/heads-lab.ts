/**
 * Measuring heads: one pass of the server's own upload compressor (its chunk, capacity, sinks, recent window and
 * eviction — H2O as served, or another policy of src/engine/eviction.ts — BOS on the first chunk) embeds every
 * candidate head at once; per-head cosine tables of each context token
 * against each question token; from them what any set of heads scores, pools and gathers. Used by
 * scripts/select-heads.ts (selection), bench/heads-ablation.ts (the README's ablations) and
 * test/heads-quality.test.ts.
 *
 * Why one pass serves every head set: the compressor's cache, its eviction scores and its evictions are per layer (and
 * per kv head), computed from the hidden states alone, so which heads are embedded never changes what is stored (an o
 * head reads its layer's cache, kept the same whether or not it is the exit layer); the
 * score of a head set is the mean of its heads' cosines (each head's vector is L2-normalised, rf_score takes the
 * cosine of their concatenation), max over the question tokens.
 */
import { loadNative, RF_F16, type Native, type NativeModel } from "../ffi/native.ts";
import { type EvictionPolicy, evictionParams } from "../src/engine/eviction.ts";
import { bosOf, resolveDefaults, templateTokensOf, type EngineDefaults } from "../src/engine/load.ts";
import { edgeFor, maxLag, selectTokens, smoothScores, type SmoothingOp } from "../src/engine/selection.ts";
import { loadModelConfig } from "../src/model/config.ts";
import { loadSafetensors } from "../src/model/safetensors.ts";
import { ModelTokenizer } from "../src/model/tokenizer.ts";
import { HEAD_KINDS, type HeadSpec, type ModelConfig } from "../src/model/types.ts";
import { f16ToF32 } from "../src/util/f16.ts";

export interface Lab {
  native: Native;
  model: NativeModel;
  mc: ModelConfig;
  tok: ModelTokenizer;
  bos: number | null;
  /** the serving defaults of this model (chunk, capacity, budget, window, edge, ...) */
  defaults: EngineDefaults;
  close(): void;
}

export function openLab(modelDir: string, o: { backend?: "cpu" | "cuda" | "auto"; threads?: number } = {}): Lab {
  const lc = loadModelConfig(modelDir);
  const tok = ModelTokenizer.fromDir(modelDir);
  const { defaults } = resolveDefaults(
    {},
    {},
    { trainedWindow: lc.maxPositionEmbeddings, templateTokens: templateTokensOf(tok), allowBeyondWindow: false },
  );
  const native = loadNative(o.backend ?? "auto");
  if (o.threads) native.setThreads(o.threads);
  const model = native.createModel(lc.config);
  try {
    loadSafetensors(modelDir, model);
    model.finalize();
  } catch (e) {
    model.destroy();
    native.close();
    throw e;
  }
  return {
    native,
    model,
    mc: lc.config,
    tok,
    bos: bosOf(tok),
    defaults,
    close() {
      model.destroy();
      native.close();
    },
  };
}

/** Every q, k, v and o (attention output) head of every layer (the paper's candidates, its MNR table's kinds). */
export function allHeads(mc: Pick<ModelConfig, "numLayers" | "numHeads" | "numKvHeads">): HeadSpec[] {
  const out: HeadSpec[] = [];
  for (let layer = 0; layer < mc.numLayers; layer++)
    for (const kind of HEAD_KINDS)
      for (let head = 0; head < (kind === "q" || kind === "o" ? mc.numHeads : mc.numKvHeads); head++)
        out.push({ layer, kind, head });
  return out;
}

export const headKey = (h: HeadSpec) => `L${h.layer}.${h.kind}${h.head}`;

export type { EvictionPolicy };

export interface CompressSettings {
  chunk: number;
  capacity: number;
  /** the compressor's eviction (src/engine/eviction.ts), default h2o as served */
  policy?: EvictionPolicy;
}

/** Per-head cosines of one context against one question: cos[(h * n + i) * nq + j]. */
export interface HeadTables {
  n: number;
  nq: number;
  heads: HeadSpec[];
  cos: Float32Array;
}

/** Compress `tokens` (no BOS; the first chunk gets the model's, as the server does) with every head of `heads` and
 * embed `question` on top of the compressed context: the rows the server writes to emb.bin (ctx, n x E f32, E =
 * heads x head_dim) and scores against (q, nq x E). */
export function embedRows(
  lab: Lab,
  tokens: Int32Array,
  question: Int32Array,
  heads: HeadSpec[],
  s: CompressSettings,
): { ctx: Float32Array; q: Float32Array; E: number } {
  const d = lab.defaults;
  const nSink = d.nSink;
  const obsWindow = Math.min(d.obsWindow, s.chunk);
  const comp = lab.model.createCompressor(
    {
      capacity: s.capacity,
      nSink,
      ...evictionParams(s.policy ?? "h2o", s.capacity, nSink, obsWindow),
      obsWindow,
      maxChunk: Math.max(s.chunk + 1, question.length),
      embDtype: RF_F16,
      exitLayer: -1,
    },
    heads,
  );
  const E = comp.embedDim;
  const n = tokens.length;
  const ctx = new Float32Array(n * E);
  let q: Float32Array;
  try {
    for (let off = 0; off < n; off += s.chunk) {
      let ids = tokens.subarray(off, Math.min(n, off + s.chunk));
      const bos = off === 0 && lab.bos !== null;
      if (bos) {
        const w = new Int32Array(ids.length + 1);
        w[0] = lab.bos!;
        w.set(ids, 1);
        ids = w;
      }
      const e = comp.process(ids)!;
      const f = e instanceof Uint16Array ? f16ToF32(e) : e;
      ctx.set(bos ? f.subarray(E) : f, off * E);
    }
    const qe = comp.embed(question);
    q = qe instanceof Uint16Array ? f16ToF32(qe) : qe;
  } finally {
    comp.destroy();
  }
  return { ctx, q, E };
}

/** embedRows, then the per-head cosine tables of the context against the question. */
export function embedTables(
  lab: Lab,
  tokens: Int32Array,
  question: Int32Array,
  heads: HeadSpec[],
  s: CompressSettings,
): HeadTables {
  const { ctx, q, E } = embedRows(lab, tokens, question, heads, s);
  const H = heads.length;
  const D = lab.mc.headDim;
  const n = tokens.length;
  const nq = question.length;
  const cos = new Float32Array(H * n * nq);
  for (let h = 0; h < H; h++) {
    const ho = h * D;
    for (let i = 0; i < n; i++) {
      const ci = i * E + ho;
      const row = (h * n + i) * nq;
      for (let j = 0; j < nq; j++) {
        const qj = j * E + ho;
        let acc = 0;
        for (let k = 0; k < D; k++) acc += ctx[ci + k]! * q[qj + k]!;
        cos[row + j] = acc;
      }
    }
  }
  return { n, nq, heads, cos };
}

/** The raw score of each context token for a set of heads (indices into t.heads): max over the question tokens of the
 * mean of the heads' cosines, as rf_score computes it on the concatenated embedding. */
export function scoreHeads(t: HeadTables, hs: number[]): Float32Array {
  const { n, nq, cos } = t;
  const out = new Float32Array(n);
  const acc = new Float32Array(nq);
  for (let i = 0; i < n; i++) {
    acc.fill(0);
    for (const h of hs) {
      const row = (h * n + i) * nq;
      for (let j = 0; j < nq; j++) acc[j]! += cos[row + j]!;
    }
    let m = Number.NEGATIVE_INFINITY;
    for (let j = 0; j < nq; j++) if (acc[j]! > m) m = acc[j]!;
    out[i] = m / hs.length;
  }
  return out;
}

/** Normalised rank of each token of `span` among all n pooled scores (0 = the best token, ~1 = the worst), averaged:
 * the paper's MNR for one sample. Ties count half. */
export function meanNormalisedRank(pooled: Float32Array, span: [number, number]): number {
  const n = pooled.length;
  let sum = 0;
  for (let t = span[0]; t < span[1]; t++) {
    const x = pooled[t]!;
    let above = 0;
    let eq = 0;
    for (let i = 0; i < n; i++) {
      const y = pooled[i]!;
      if (y > x) above++;
      else if (y === x) eq++;
    }
    sum += (above + (eq - 1) / 2) / Math.max(1, n - 1);
  }
  return sum / Math.max(1, span[1] - span[0]);
}

export interface GatherSettings {
  budget: number;
  window: number;
  /** how far the window trails each token (default 0, centered; kept within half the window) */
  lag?: number;
  edge: number;
  op: SmoothingOp;
}

/** The query path's selection (smoothing, top budget + edges) on raw scores: is every token of `span` gathered? */
export function gathers(scores: Float32Array, span: [number, number], g: GatherSettings): boolean {
  const lag = Math.min(g.lag ?? 0, maxLag(g.window));
  const idx = selectTokens(smoothScores(scores, g.window, g.op, lag), g.budget, edgeFor(g.budget, g.edge));
  let lo = 0;
  let hi = idx.length;
  while (lo < hi) {
    const m = (lo + hi) >> 1;
    if (idx[m]! < span[0]) lo = m + 1;
    else hi = m;
  }
  for (let t = span[0]; t < span[1]; t++) if (idx[lo + t - span[0]] !== t) return false;
  return true;
}

/** Token span [start, end) of the characters [a, b) of `text` tokenized as `ids` (tokens overlapping the range). */
export function tokenSpan(
  tok: ModelTokenizer,
  text: string,
  ids: ArrayLike<number>,
  a: number,
  b: number,
): [number, number] {
  const enc = new TextEncoder();
  const ba = enc.encode(text.slice(0, a)).length;
  const bb = enc.encode(text.slice(0, b)).length;
  let pos = 0;
  let start = -1;
  let end = -1;
  for (let i = 0; i < ids.length; i++) {
    const next = pos + tok.tokenBytes(ids[i]!).length;
    if (start < 0 && next > ba) start = i;
    if (pos < bb) end = i + 1;
    pos = next;
  }
  if (start < 0 || end <= start) throw new Error(`tokenSpan: characters ${a}..${b} not found in the tokens`);
  return [start, end];
}
