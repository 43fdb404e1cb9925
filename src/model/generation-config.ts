/**
 * The sampling defaults a model directory's generation_config.json sets (Hugging Face `GenerationConfig`), applied as
 * vLLM applies them with `--generation-config auto`, its default: an OpenAI request that leaves out `temperature`,
 * `top_p`, `top_k`, `min_p` or `repetition_penalty` gets the model's value before the API's own default (OpenAI's
 * temperature 1). Only the fields the file names count (vLLM reads the file's diff against the defaults, so
 * transformers' implicit top_k 50 does not apply). `do_sample: false` means greedy, as in transformers' `generate()`:
 * temperature 0, whatever temperature the file names. A value outside what a request may send is left out (with the
 * reason in `ignored`), never an error: the file was written for another program.
 */
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { Field } from "../engine/schema.ts";

/** The engine's names; each absent when the file does not set it. */
export interface SamplingDefaults {
  temperature?: number;
  topP?: number;
  topK?: number;
  minP?: number;
  repetitionPenalty?: number;
}

const FIELDS = [
  ["temperature", "temperature", Field.temperature],
  ["top_p", "topP", Field.topP],
  ["top_k", "topK", Field.topK],
  ["min_p", "minP", Field.minP],
  ["repetition_penalty", "repetitionPenalty", Field.repetitionPenalty],
] as const;

/** The defaults of a parsed generation_config.json (null or not an object: none), and the fields left out, why. */
export function samplingDefaultsOf(gen: unknown): { defaults: SamplingDefaults; ignored: string[] } {
  const defaults: SamplingDefaults = {};
  const ignored: string[] = [];
  if (!gen || typeof gen !== "object" || Array.isArray(gen)) return { defaults, ignored };
  const g = gen as Record<string, unknown>;
  for (const [name, key, schema] of FIELDS) {
    if (g[name] === undefined || g[name] === null) continue;
    const v = schema.safeParse(g[name]);
    if (v.success) defaults[key] = v.data;
    else ignored.push(`${name} ${JSON.stringify(g[name])}: ${v.error.issues[0]?.message ?? "invalid"}`);
  }
  if (g.do_sample === false) defaults.temperature = 0;
  return { defaults, ignored };
}

/** samplingDefaultsOf(<dir>/generation_config.json); no file: no defaults. Throws on a file that is not JSON. */
export function readSamplingDefaults(dir: string): { defaults: SamplingDefaults; ignored: string[] } {
  const p = join(dir, "generation_config.json");
  if (!existsSync(p)) return { defaults: {}, ignored: [] };
  try {
    return samplingDefaultsOf(JSON.parse(readFileSync(p, "utf8")));
  } catch (e) {
    throw new Error(`${p}: ${(e as Error).message}`);
  }
}
