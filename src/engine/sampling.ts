/**
 * Host-side logit processing for the sampler: penalties and bias (LogitProcessor) and OpenAI-style
 * log-probabilities (logprobsOf). Pure: tested without a model.
 */
import type { SamplingOptions } from "./api.ts";

/**
 * Logit adjustments before sampling: repetition penalty (prompt + generated tokens), presence / frequency penalties
 * (generated tokens), logit bias, then min-p. `adjust(raw, out)` writes the adjusted logits into `out`.
 */
export class LogitProcessor {
  readonly active: boolean;
  private readonly counts = new Map<number, number>();
  private readonly seen: Uint8Array | null;
  private readonly seenList: number[] = [];
  private readonly bias: [number, number][];
  private readonly minP: number;
  constructor(
    private readonly sp: SamplingOptions,
    vocab: number,
    prompt: ArrayLike<number>,
  ) {
    const rp = sp.repetitionPenalty ?? 1;
    this.bias = Object.entries(sp.logitBias ?? {})
      .map(([k, v]) => [Number(k), v] as [number, number])
      .filter(([, v]) => v !== 0);
    // min-p changes nothing for greedy decoding (the most likely token always passes)
    this.minP = (sp.minP ?? 0) > 0 && sp.temperature > 0 ? sp.minP! : 0;
    this.active = rp !== 1 || !!sp.presencePenalty || !!sp.frequencyPenalty || this.bias.length > 0 || this.minP > 0;
    this.seen = rp !== 1 ? new Uint8Array(vocab) : null;
    if (this.seen) for (let i = 0; i < prompt.length; i++) this.mark(prompt[i]!);
  }
  private mark(id: number): void {
    if (this.seen && id >= 0 && id < this.seen.length && !this.seen[id]) {
      this.seen[id] = 1;
      this.seenList.push(id);
    }
  }
  /** a token was generated */
  add(id: number): void {
    this.counts.set(id, (this.counts.get(id) ?? 0) + 1);
    this.mark(id);
  }
  adjust(raw: Float32Array, out: Float32Array): Float32Array {
    out.set(raw);
    const rp = this.sp.repetitionPenalty ?? 1;
    if (rp !== 1) for (const id of this.seenList) out[id] = out[id]! > 0 ? out[id]! / rp : out[id]! * rp;
    const pres = this.sp.presencePenalty ?? 0;
    const freq = this.sp.frequencyPenalty ?? 0;
    if (pres !== 0 || freq !== 0) for (const [id, c] of this.counts) out[id] = out[id]! - pres - freq * c;
    for (const [id, b] of this.bias) out[id] = out[id]! + b;
    if (this.minP > 0) {
      // p_i >= min_p * p_max after temperature T  <=>  logit_i >= max + T * ln(min_p) (as vLLM and llama.cpp)
      let mx = -Infinity;
      for (let i = 0; i < out.length; i++) if (out[i]! > mx) mx = out[i]!;
      const floor = mx + this.sp.temperature * Math.log(this.minP);
      for (let i = 0; i < out.length; i++) if (out[i]! < floor) out[i] = -Infinity;
    }
    return out;
  }
}

/** log-softmax of `logits` at `id`, and the `n` most likely tokens (ties: lower id first) */
export function logprobsOf(
  logits: Float32Array,
  id: number,
  n: number,
): { logprob: number; top: { id: number; logprob: number }[] } {
  let mx = -Infinity;
  for (let i = 0; i < logits.length; i++) if (logits[i]! > mx) mx = logits[i]!;
  let sum = 0;
  for (let i = 0; i < logits.length; i++) sum += Math.exp(logits[i]! - mx);
  const lse = mx + Math.log(sum);
  const top: { id: number; logprob: number }[] = [];
  if (n > 0) {
    // keep the n best in a small sorted array (n <= 20)
    for (let i = 0; i < logits.length; i++) {
      const v = logits[i]!;
      if (top.length === n && v <= top[n - 1]!.logprob) continue;
      let j = top.length < n ? top.length : n - 1;
      if (top.length < n) top.push({ id: i, logprob: v });
      while (j > 0 && top[j - 1]!.logprob < v) {
        top[j] = top[j - 1]!;
        j--;
      }
      top[j] = { id: i, logprob: v };
    }
    for (const t of top) t.logprob -= lse;
  }
  return { logprob: logits[id]! - lse, top };
}
