/**
 * The recompute's second half: prefill the prompt into a sequence, then decode token by token with
 * the sampler, stop strings and EOS, streaming `token` events and ending with one `done` event.
 * One native job per scheduler step (a prefill piece or a decode step).
 */
import type { NativeSeq } from "../../ffi/native.ts";
import type { ModelTokenizer } from "../model/tokenizer.ts";
import type { FinishReason, QueryEvent, SamplingOptions, TokenLogprob, Usage } from "./api.ts";
import { StopMatcher } from "./stop.ts";
import { LogitProcessor, logprobsOf } from "./sampling.ts";
import type { Task } from "./scheduler.ts";

export interface GenerateArgs {
  seq: NativeSeq;
  /** tokens still to prefill (after an imported H2O cache: just the suffix) */
  prompt: Int32Array;
  sampling: SamplingOptions;
  tok: ModelTokenizer;
  vocabSize: number;
  prefillChunk: number;
  /** why to stop now, or null to go on (abort, deleted context) */
  cancelled: () => FinishReason | null;
  emit: (ev: QueryEvent) => void;
  usage: Omit<Usage, "completionTokens">;
  /** performance.now() when the request arrived and when its work started */
  tReq: number;
  tStart: number;
  onFirstToken: (ttftMs: number) => void;
  onToken: () => void;
}

/** Generates and emits; returns the time per output token (ms) for metrics. */
export function* generate(a: GenerateArgs): Task<number> {
  const { seq, prompt, sampling: sp, tok } = a;
  // logits come back to the host only when the sampler needs adjusting or logprobs are asked for
  const proc = new LogitProcessor(sp, a.vocabSize, prompt);
  const wantLp = sp.logprobs != null;
  const raw = proc.active || wantLp ? new Float32Array(a.vocabSize) : null;
  const adj = proc.active ? new Float32Array(a.vocabSize) : null;

  let finish: FinishReason = "length";
  // only a matched stop string drops the text held back after it; every other end (EOS, length, abort) sends it
  let stopMatched = false;
  for (let off = 0; off < prompt.length; off += a.prefillChunk) {
    const why = a.cancelled();
    if (why) {
      finish = why;
      break;
    }
    const end = Math.min(prompt.length, off + a.prefillChunk);
    seq.forward(prompt.subarray(off, end), raw !== null && end === prompt.length, raw ?? undefined);
    yield;
  }

  const dec = tok.streamDecoder();
  const stop = new StopMatcher(sp.stop ?? []);
  const sampling = { temperature: sp.temperature ?? 0, topP: sp.topP ?? 1, topK: sp.topK ?? 0 };
  const tokenInfo = (t: number, l: number): TokenLogprob => ({
    tokenId: t,
    token: tok.tokenText(t),
    bytes: Array.from(tok.tokenBytes(t)),
    logprob: l,
  });
  const one = new Int32Array(1);
  let generated = 0;
  let tFirst = 0;
  let tLast = 0;
  while (finish === "length") {
    const why = a.cancelled();
    if (why) {
      finish = why;
      break;
    }
    if (generated >= sp.maxTokens) break;
    const id = adj ? seq.sampleFrom(proc.adjust(raw!, adj), sampling) : seq.sample(sampling);
    let lp: (TokenLogprob & { top: TokenLogprob[] }) | undefined;
    if (wantLp) {
      const r = logprobsOf(raw!, id, sp.logprobs!);
      lp = { ...tokenInfo(id, r.logprob), top: r.top.map((t) => tokenInfo(t.id, t.logprob)) };
    }
    proc.add(id);
    generated++;
    const now = performance.now();
    if (generated === 1) {
      tFirst = now;
      a.onFirstToken(now - a.tReq);
    }
    tLast = now;
    a.onToken();
    if (tok.isEos(id)) {
      finish = "stop";
      break;
    }
    const r = stop.push(dec.push(id));
    // a token whose text is held back (partial character, possible stop string) is still reported, with ""
    if (r.emit.length > 0 || !r.stopped)
      a.emit({ type: "token", text: r.emit, tokenId: id, ...(lp ? { logprob: lp } : {}) });
    if (r.stopped) {
      finish = "stop";
      stopMatched = true;
      break;
    }
    if (generated >= sp.maxTokens) break;
    one[0] = id;
    seq.forward(one, raw !== null, raw ?? undefined);
    yield;
  }
  if (!stopMatched) {
    // flush held-back text: a stop-string prefix that never completed, and the bytes of an incomplete
    // character (U+FFFD), so a stop string that never occurs cannot change the output
    const r = stop.push(dec.flush());
    if (r.stopped) finish = "stop";
    const rest = r.stopped ? r.emit : r.emit + stop.flush();
    if (rest.length > 0) a.emit({ type: "token", text: rest, tokenId: -1 });
  }
  const tpot = generated > 1 ? (tLast - tFirst) / (generated - 1) : 0;
  a.emit({
    type: "done",
    finishReason: finish,
    usage: { ...a.usage, completionTokens: generated },
    timings: {
      queueMs: a.tStart - a.tReq,
      ttftMs: generated > 0 ? tFirst - a.tReq : 0,
      tpotMs: tpot,
      totalMs: performance.now() - a.tReq,
    },
  });
  return tpot;
}
