/**
 * Reference Llama-family forward in plain TypeScript (Float64 math, naive loops), written independently of
 * the native engine, for tests only:
 *   - refLogits / refForward: full-sequence forward, logits of the last (or every) token;
 *   - RefCompressor: REFORM phase-1 compress step (chunked early-exit forward, pre-RoPE cache with contiguous
 *     position re-assignment, H2O score accumulation + eviction per (layer, kv head), head embeddings);
 *   - refScore: max cosine scoring; refSample: the documented sampling algorithm incl. xorshift64*.
 */

export interface RefConfig {
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  qkvBias: boolean;
  /** Qwen3: RMSNorm of every q and k head (weights qNorm / kNorm, [headDim]) after the projections, before RoPE */
  qkNorm: boolean;
  tieEmbeddings: boolean;
  ropeType: number; // 0 default, 1 llama3, 2 linear
  rmsEps: number;
  ropeTheta: number;
  ropeFactor: number;
  ropeLowFreqFactor: number;
  ropeHighFreqFactor: number;
  ropeOriginalMaxPos: number;
}

export interface RefLayer {
  inNorm: Float64Array;
  postNorm: Float64Array;
  wq: Float64Array; // [nh*hd][H]
  wk: Float64Array; // [nkv*hd][H]
  wv: Float64Array;
  wo: Float64Array; // [H][nh*hd]
  bq?: Float64Array;
  bk?: Float64Array;
  bv?: Float64Array;
  qNorm?: Float64Array; // [hd]
  kNorm?: Float64Array;
  gate: Float64Array; // [I][H]
  up: Float64Array;
  down: Float64Array; // [H][I]
}

export interface RefWeights {
  embed: Float64Array; // [V][H]
  norm: Float64Array;
  lmHead?: Float64Array; // [V][H], absent when tied
  layers: RefLayer[];
}

/* ---------------- basic ops ---------------- */

/** y[o] = sum_i W[o][i] x[i] (+ b[o]) */
export function linear(x: Float64Array, W: Float64Array, rows: number, cols: number, b?: Float64Array): Float64Array {
  const y = new Float64Array(rows);
  for (let o = 0; o < rows; o++) {
    let s = 0;
    for (let i = 0; i < cols; i++) s += W[o * cols + i] * x[i];
    y[o] = s + (b ? b[o] : 0);
  }
  return y;
}

export function rmsNorm(x: Float64Array, w: Float64Array, eps: number): Float64Array {
  let ss = 0;
  for (let i = 0; i < x.length; i++) ss += x[i] * x[i];
  const r = 1 / Math.sqrt(ss / x.length + eps);
  const y = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) y[i] = x[i] * r * w[i];
  return y;
}

/** HF rotary inverse frequencies (float32 like transformers), incl. llama3 and linear scaling. */
export function invFreq(c: RefConfig): Float64Array {
  const half = c.headDim / 2;
  const out = new Float64Array(half);
  for (let i = 0; i < half; i++) {
    let f = 1 / c.ropeTheta ** ((2 * i) / c.headDim);
    if (c.ropeType === 2) f /= c.ropeFactor;
    if (c.ropeType === 1) {
      const lowWl = c.ropeOriginalMaxPos / c.ropeLowFreqFactor;
      const highWl = c.ropeOriginalMaxPos / c.ropeHighFreqFactor;
      const wl = (2 * Math.PI) / f;
      if (wl > lowWl) f = f / c.ropeFactor;
      else if (wl >= highWl) {
        const smooth = (c.ropeOriginalMaxPos / wl - c.ropeLowFreqFactor) / (c.ropeHighFreqFactor - c.ropeLowFreqFactor);
        f = ((1 - smooth) * f) / c.ropeFactor + smooth * f;
      }
    }
    out[i] = Math.fround(f);
  }
  return out;
}

/** rotate_half RoPE of one head vector at position pos (returns a new vector). */
export function rope(v: ArrayLike<number>, pos: number, inv: Float64Array): Float64Array {
  const hd = v.length;
  const half = hd / 2;
  const o = new Float64Array(hd);
  for (let i = 0; i < half; i++) {
    const a = pos * inv[i];
    const c = Math.cos(a);
    const s = Math.sin(a);
    o[i] = v[i] * c - v[i + half] * s;
    o[i + half] = v[i + half] * c + v[i] * s;
  }
  return o;
}

function softmax(s: number[]): number[] {
  let mx = -Infinity;
  for (const x of s) mx = Math.max(mx, x);
  const e = s.map((x) => Math.exp(x - mx));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / sum);
}

function silu(x: number): number {
  return x / (1 + Math.exp(-x));
}

function head(v: Float64Array, h: number, hd: number): Float64Array {
  return v.slice(h * hd, (h + 1) * hd);
}

/** v / max(||v||, eps) */
export function l2normalize(v: ArrayLike<number>, eps = 1e-6): Float64Array {
  let ss = 0;
  for (let i = 0; i < v.length; i++) ss += v[i] * v[i];
  const n = Math.max(Math.sqrt(ss), eps);
  const o = new Float64Array(v.length);
  for (let i = 0; i < v.length; i++) o[i] = v[i] / n;
  return o;
}

/* ---------------- layer pieces ---------------- */

interface Qkv {
  q: Float64Array; // nh*hd, pre-RoPE (Qwen3: after q_norm)
  k: Float64Array; // nkv*hd, pre-RoPE (Qwen3: after k_norm)
  v: Float64Array;
}

/** HF Qwen3Attention: q_norm / k_norm over each head_dim slice of the projection */
function headNorm(v: Float64Array, w: Float64Array, hd: number, eps: number): Float64Array {
  const o = new Float64Array(v.length);
  for (let h = 0; h < v.length / hd; h++) o.set(rmsNorm(head(v, h, hd), w, eps), h * hd);
  return o;
}

function qkv(c: RefConfig, L: RefLayer, x: Float64Array): Qkv {
  const H = c.hiddenSize;
  const h = rmsNorm(x, L.inNorm, c.rmsEps);
  const q = linear(h, L.wq, c.numHeads * c.headDim, H, c.qkvBias ? L.bq : undefined);
  const k = linear(h, L.wk, c.numKvHeads * c.headDim, H, c.qkvBias ? L.bk : undefined);
  return {
    q: c.qkNorm ? headNorm(q, L.qNorm!, c.headDim, c.rmsEps) : q,
    k: c.qkNorm ? headNorm(k, L.kNorm!, c.headDim, c.rmsEps) : k,
    v: linear(h, L.wv, c.numKvHeads * c.headDim, H, c.qkvBias ? L.bv : undefined),
  };
}

/** residual + o_proj + MLP; returns the new hidden state */
function postAttn(c: RefConfig, L: RefLayer, x: Float64Array, att: Float64Array): Float64Array {
  const H = c.hiddenSize;
  const I = c.intermediateSize;
  const o = linear(att, L.wo, H, c.numHeads * c.headDim);
  const x1 = new Float64Array(H);
  for (let i = 0; i < H; i++) x1[i] = x[i] + o[i];
  const h = rmsNorm(x1, L.postNorm, c.rmsEps);
  const g = linear(h, L.gate, I, H);
  const u = linear(h, L.up, I, H);
  const a = new Float64Array(I);
  for (let i = 0; i < I; i++) a[i] = silu(g[i]) * u[i];
  const d = linear(a, L.down, H, I);
  for (let i = 0; i < H; i++) x1[i] += d[i];
  return x1;
}

/** attention probabilities of a rotated query head over rotated keys */
function attnProbs(q: Float64Array, keys: Float64Array[]): number[] {
  const scale = 1 / Math.sqrt(q.length);
  return softmax(
    keys.map((k) => {
      let s = 0;
      for (let i = 0; i < q.length; i++) s += q[i] * k[i];
      return s * scale;
    }),
  );
}

function embedRow(c: RefConfig, w: RefWeights, tok: number): Float64Array {
  return w.embed.slice(tok * c.hiddenSize, (tok + 1) * c.hiddenSize);
}

function lmLogits(c: RefConfig, w: RefWeights, x: Float64Array): Float64Array {
  const h = rmsNorm(x, w.norm, c.rmsEps);
  return linear(h, c.tieEmbeddings ? w.embed : w.lmHead!, c.vocabSize, c.hiddenSize);
}

/* ---------------- full forward ---------------- */

/** Full forward of `tokens` at positions 0..n-1; returns the logits of every token when `all`, else the last. */
export function refForward(c: RefConfig, w: RefWeights, tokens: number[], all = false): Float64Array[] {
  const inv = invFreq(c);
  const hd = c.headDim;
  const grp = c.numHeads / c.numKvHeads;
  let xs = tokens.map((t) => embedRow(c, w, t));
  for (let l = 0; l < c.numLayers; l++) {
    const L = w.layers[l];
    const p = xs.map((x) => qkv(c, L, x));
    // rotated keys per kv head
    const keys: Float64Array[][] = [];
    const vals: Float64Array[][] = [];
    for (let g = 0; g < c.numKvHeads; g++) {
      keys.push(p.map((t, i) => rope(head(t.k, g, hd), i, inv)));
      vals.push(p.map((t) => head(t.v, g, hd)));
    }
    xs = xs.map((x, j) => {
      const att = new Float64Array(c.numHeads * hd);
      for (let h = 0; h < c.numHeads; h++) {
        const g = Math.floor(h / grp);
        const q = rope(head(p[j].q, h, hd), j, inv);
        const pr = attnProbs(q, keys[g].slice(0, j + 1));
        for (let e = 0; e <= j; e++) for (let d = 0; d < hd; d++) att[h * hd + d] += pr[e] * vals[g][e][d];
      }
      return postAttn(c, L, x, att);
    });
  }
  if (all) return xs.map((x) => lmLogits(c, w, x));
  return [lmLogits(c, w, xs[xs.length - 1])];
}

export function refLogits(c: RefConfig, w: RefWeights, tokens: number[]): Float64Array {
  return refForward(c, w, tokens)[0];
}

export function argmax(v: ArrayLike<number>): number {
  let b = 0;
  for (let i = 1; i < v.length; i++) if (v[i] > v[b]) b = i;
  return b;
}

/** Greedy continuation of `prompt` for `steps` tokens (recomputes the full forward every step). */
export function refGreedy(c: RefConfig, w: RefWeights, prompt: number[], steps: number): number[] {
  const seq = prompt.slice();
  const out: number[] = [];
  for (let s = 0; s < steps; s++) {
    const t = argmax(refLogits(c, w, seq));
    out.push(t);
    seq.push(t);
  }
  return out;
}

/* ---------------- compress step ---------------- */

export interface RefCompressParams {
  capacity: number;
  nSink: number;
  nRecent: number;
  obsWindow: number;
  /** h2o (default): scores accumulate the last obsWindow queries' attention; tova: the chunk's last query only,
   * summed over every query head of the layer, not accumulated (cuda/reform.h) */
  eviction?: "h2o" | "tova";
}

export interface RefHead {
  layer: number;
  /** q / k / v: the projection (pre-RoPE); o: the query head's attention output (before o_proj) */
  kind: "q" | "k" | "v" | "o";
  head: number;
}

export interface CacheEntry {
  idx: number; // index of the token in the processed stream (for tests)
  k: Float64Array; // pre-RoPE
  v: Float64Array;
  s: number; // accumulated H2O score
}

/** Keep-set for eviction: first nSink, last nRecent, highest scores of the rest (ties: earlier), original order. */
export function refKeep(scores: number[], capacity: number, nSink: number, nRecent: number): number[] {
  const len = scores.length;
  if (len <= capacity) return scores.map((_, i) => i);
  const mid: number[] = [];
  for (let i = nSink; i < len - nRecent; i++) mid.push(i);
  mid.sort((a, b) => scores[b] - scores[a] || a - b);
  const keepMid = new Set(mid.slice(0, capacity - nSink - nRecent));
  const out: number[] = [];
  for (let i = 0; i < len; i++) if (i < nSink || i >= len - nRecent || keepMid.has(i)) out.push(i);
  return out;
}

export class RefCompressor {
  /** cache[layer][kvHead] = entries */
  cache: CacheEntry[][][];
  seen = 0;
  readonly exitLayer: number;
  private readonly inv: Float64Array;

  constructor(
    readonly c: RefConfig,
    readonly w: RefWeights,
    readonly p: RefCompressParams,
    readonly heads: RefHead[],
    exitLayer = -1,
  ) {
    this.exitLayer = exitLayer >= 0 ? exitLayer : Math.max(...heads.map((h) => h.layer));
    this.inv = invFreq(c);
    this.cache = [];
    this.reset();
  }

  reset(): void {
    this.cache = [];
    for (let l = 0; l <= this.exitLayer; l++) {
      const per: CacheEntry[][] = [];
      for (let g = 0; g < this.c.numKvHeads; g++) per.push([]);
      this.cache.push(per);
    }
    this.seen = 0;
  }

  cacheLen(): number {
    return this.cache[0][0].length;
  }

  /** Process a chunk: returns the embeddings (n rows of heads.length*headDim) and updates the cache. */
  process(tokens: number[]): Float64Array[] {
    return this.run(tokens, true);
  }

  /** Embed tokens against the current cache without changing it. */
  embed(tokens: number[]): Float64Array[] {
    return this.run(tokens, false);
  }

  private run(tokens: number[], commit: boolean): Float64Array[] {
    const tova = this.p.eviction === "tova";
    const c = this.c;
    const hd = c.headDim;
    const grp = c.numHeads / c.numKvHeads;
    const n = tokens.length;
    const emb = tokens.map(() => new Float64Array(this.heads.length * hd));
    let xs = tokens.map((t) => embedRow(c, this.w, t));
    const newCache: CacheEntry[][][] = [];
    for (let l = 0; l <= this.exitLayer; l++) {
      const L = this.w.layers[l];
      const p = xs.map((x) => qkv(c, L, x));
      this.heads.forEach((hs, si) => {
        if (hs.layer !== l || hs.kind === "o") return;
        for (let t = 0; t < n; t++) {
          const src = hs.kind === "q" ? p[t].q : hs.kind === "k" ? p[t].k : p[t].v;
          emb[t].set(l2normalize(head(src, hs.head, hd)), si * hd);
        }
      });
      const old = this.cache[l];
      const Lc = old[0].length;
      // all entries (old cache + chunk), scores copied; positions are the indices
      const entries: CacheEntry[][] = [];
      for (let g = 0; g < c.numKvHeads; g++) {
        const e: CacheEntry[] = old[g].map((x) => ({ idx: x.idx, k: x.k, v: x.v, s: tova ? 0 : x.s }));
        for (let t = 0; t < n; t++)
          e.push({ idx: this.seen + t, k: head(p[t].k, g, hd), v: head(p[t].v, g, hd), s: 0 });
        entries.push(e);
      }
      const rk = entries.map((e) => e.map((x, i) => rope(x.k, i, this.inv)));
      const obsStart = n - Math.min(tova ? 1 : this.p.obsWindow, n);
      const nextXs: Float64Array[] = [];
      for (let j = 0; j < n; j++) {
        const att = new Float64Array(c.numHeads * hd);
        for (let h = 0; h < c.numHeads; h++) {
          const g = Math.floor(h / grp);
          const q = rope(head(p[j].q, h, hd), Lc + j, this.inv);
          const pr = attnProbs(q, rk[g].slice(0, Lc + j + 1));
          if (j >= obsStart) for (let e = 0; e < pr.length; e++) entries[g][e].s += pr[e];
          for (let e = 0; e < pr.length; e++)
            for (let d = 0; d < hd; d++) att[h * hd + d] += pr[e] * entries[g][e].v[d];
        }
        this.heads.forEach((hs, si) => {
          if (hs.layer === l && hs.kind === "o") emb[j].set(l2normalize(head(att, hs.head, hd)), si * hd);
        });
        if (l < this.exitLayer) nextXs.push(postAttn(c, L, xs[j], att));
      }
      if (tova)
        for (let i = 0; i < entries[0].length; i++) {
          let sum = 0;
          for (let g = 0; g < c.numKvHeads; g++) sum += entries[g][i].s;
          for (let g = 0; g < c.numKvHeads; g++) entries[g][i].s = sum;
        }
      xs = nextXs;
      newCache.push(entries);
    }
    if (commit) {
      for (let l = 0; l <= this.exitLayer; l++)
        for (let g = 0; g < c.numKvHeads; g++) {
          const e = newCache[l][g];
          const keep = refKeep(
            e.map((x) => x.s),
            this.p.capacity,
            this.p.nSink,
            this.p.nRecent,
          );
          newCache[l][g] = keep.map((i) => e[i]);
        }
      this.cache = newCache;
      this.seen += n;
    }
    return emb;
  }
}

/* ---------------- scoring / sampling ---------------- */

/** out[i] = max_j cos(ctx_i, q_j) */
export function refScore(
  ctx: ArrayLike<number>,
  nCtx: number,
  dim: number,
  q: ArrayLike<number>,
  nQ: number,
): Float64Array {
  const out = new Float64Array(nCtx);
  const norm = (a: ArrayLike<number>, off: number) => {
    let s = 0;
    for (let d = 0; d < dim; d++) s += a[off + d] * a[off + d];
    return Math.max(Math.sqrt(s), 1e-12);
  };
  for (let i = 0; i < nCtx; i++) {
    let best = -Infinity;
    const nc = norm(ctx, i * dim);
    for (let j = 0; j < nQ; j++) {
      let s = 0;
      for (let d = 0; d < dim; d++) s += ctx[i * dim + d] * q[j * dim + d];
      best = Math.max(best, s / (nc * norm(q, j * dim)));
    }
    out[i] = best;
  }
  return out;
}

const M64 = (1n << 64n) - 1n;
/** xorshift64* as documented in reform.h; state[0] advanced in place. */
export function xorshift64star(state: BigUint64Array): bigint {
  if (state[0] === 0n) state[0] = 0x9e3779b97f4a7c15n;
  let x = state[0];
  x ^= x >> 12n;
  x = (x ^ (x << 25n)) & M64;
  x ^= x >> 27n;
  state[0] = x;
  return (x * 0x2545f4914f6cdd1dn) & M64;
}

/** The documented sampling algorithm (temperature, top-k, top-p, xorshift64* draw). */
export function refSample(
  logits: ArrayLike<number>,
  temperature: number,
  topP: number,
  topK: number,
  state: BigUint64Array,
): number {
  const V = logits.length;
  if (!(temperature > 0)) return argmax(logits);
  const idx = Array.from({ length: V }, (_, i) => i).sort((a, b) => logits[b] - logits[a] || a - b);
  const k = topK > 0 && topK < V ? topK : V;
  const kept = idx.slice(0, k);
  const mx = logits[kept[0]];
  const p = kept.map((i) => Math.exp((logits[i] - mx) / temperature));
  const sum = p.reduce((a, b) => a + b, 0);
  let n = kept.length;
  if (topP < 1) {
    let cum = 0;
    for (let i = 0; i < kept.length; i++) {
      cum += p[i] / sum;
      if (cum >= topP) {
        n = i + 1;
        break;
      }
    }
  }
  let tot = 0;
  for (let i = 0; i < n; i++) tot += p[i];
  const u = Number(xorshift64star(state) >> 11n) / 9007199254740992;
  let r = u * tot;
  for (let i = 0; i < n; i++) {
    r -= p[i];
    if (r < 0) return kept[i];
  }
  return kept[n - 1];
}
