/**
 * The compressor's eviction policies, in one place: which entries a cache of `capacity` entries per (layer, kv head)
 * keeps once it is full, and the native parameters that say so (cuda/reform.h, rf_compress_params). Every policy keeps
 * the first `nSink` entries (attention sinks); they differ in the rest:
 *   h2o        the recent window (recentFor) + the entries with the most attention accumulated over each chunk's last
 *              obs_window queries (Zhang et al. 2023; the server's default and the REFORM paper's)
 *   streaming  StreamingLLM (Xiao et al. 2023): the recent window fills the rest, nothing is ranked
 *   tova       TOVA (Oren et al. 2024): the same recent window + the entries the chunk's last query attends most,
 *              summed over the layer's query heads (so a layer keeps one set of tokens), recomputed at every chunk
 *              (cuda/reform.h defines it and says why the last query rather than the mean over the chunk).
 * h2o and tova share the sinks and the recent window so that the two differ only in how the middle is ranked.
 * The upload compressor takes the heads file's "eviction" (src/model/heads.ts, resolved in load.ts); the baselines
 * "h2o" and "streaming" of gather.ts and the head tools (scripts/heads-lab.ts) name theirs.
 */
import type { CompressParams } from "../../ffi/native.ts";

export type EvictionPolicy = "h2o" | "streaming" | "tova";
export const EVICTION_POLICIES: readonly EvictionPolicy[] = ["h2o", "streaming", "tova"];

/** Recent tokens a ranked policy (h2o, tova) always keeps, for a cache of `capacity` entries. */
export function recentFor(capacity: number, obsWindow: number): number {
  return Math.max(1, Math.min(obsWindow, Math.floor(capacity / 4)));
}

/** The native parameters of a policy's cache: how many recent entries are always kept and how the rest is ranked. */
export function evictionParams(
  policy: EvictionPolicy,
  capacity: number,
  nSink: number,
  obsWindow: number,
): Pick<CompressParams, "nRecent" | "eviction"> {
  if (policy === "streaming") return { nRecent: capacity - nSink, eviction: "h2o" }; // no middle left to rank
  return { nRecent: recentFor(capacity, obsWindow), eviction: policy };
}
