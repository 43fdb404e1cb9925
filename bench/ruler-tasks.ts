/**
 * RULER-style samples over held-out text: a haystack of a given length in tokens with needles at spread depths,
 * the question, and the strings a correct answer contains (string_match_all). Reference: Hsieh et al. 2024,
 * RULER, section 3 (NIAH single, multi-key, multi-value, multi-query) plus a "quote the sentence" task.
 *
 * The needle templates are the trainer's own (training/templates.json); haystack and key/value words are the
 * held-out sources in bench/data (never trained on). Used by bench/ruler.ts and test/quality.test.ts.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { mulberry32 } from "../src/util/rng.ts";

export const TASKS = ["single", "multikey", "multivalue", "multiquery", "quote"] as const;
export type Task = (typeof TASKS)[number];

const ROOT = join(import.meta.dir, "..");
const TEMPLATES: { needles: [string, string, string, string][]; quote: string } = JSON.parse(
  readFileSync(join(ROOT, "training", "templates.json"), "utf8"),
);
const SENTENCES = readFileSync(join(ROOT, "bench", "data", "heldout-haystack.txt"), "utf8")
  .split("\n")
  .filter((s) => s.length > 0);
const WORDS: { adj: string[]; noun: string[] } = JSON.parse(
  readFileSync(join(ROOT, "bench", "data", "heldout-words.json"), "utf8"),
);

export interface Sample {
  task: Task;
  /** the context to upload */
  text: string;
  question: string;
  /** every one must appear in the answer */
  expected: string[];
  /** where the asked needles sit, as fractions of the text */
  depths: number[];
}

/** Answer tokens each task needs: the answer restates the needles, and a needle with a uuid value and a random id
 * is 65 tokens of the embedded model's 1024-token vocabulary (multi-value restates 4, multi-query 2; 256 is the
 * most a 512-token window allows). */
export const ANSWER_TOKENS: Record<Task, number> = {
  single: 72,
  multikey: 72,
  multivalue: 256,
  multiquery: 136,
  quote: 96,
};

/** RULER's string_match_all: the fraction of expected strings found in the answer (case-insensitive). */
export function stringMatchAll(answer: string, expected: string[]): number {
  const a = answer.toLowerCase();
  return expected.filter((e) => a.includes(e.toLowerCase())).length / expected.length;
}

export class SampleMaker {
  private readonly rng: () => number;
  /** `countTokens`: the model's tokenizer, so that a haystack of N tokens is N tokens of that model */
  constructor(
    seed: number,
    private readonly countTokens: (s: string) => number,
  ) {
    this.rng = mulberry32(seed);
  }

  private int(n: number): number {
    return Math.floor(this.rng() * n);
  }
  private pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]!;
  }
  private words(): string {
    return `${this.pick(WORDS.adj)}-${this.pick(WORDS.noun)}`;
  }
  private key(): string {
    const r = this.rng();
    if (r < 0.6) return this.words();
    if (r < 0.8) {
      const cs = "abcdefghijklmnopqrstuvwxyz0123456789";
      return Array.from({ length: 10 }, () => cs[this.int(cs.length)]).join("");
    }
    return String(1_000_000 + this.int(9_000_000));
  }
  private value(kind: string): string {
    if (kind === "number") return String(1_000_000 + this.int(9_000_000));
    if (kind === "uuid") {
      const h = Array.from({ length: 32 }, () => "0123456789abcdef"[this.int(16)]).join("");
      return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
    }
    return this.words();
  }

  /** Haystack sentences of about `tokens` tokens, from a random start, wrapping around (repeated beyond ~320K). */
  private haystack(tokens: number): string[] {
    const out: string[] = [];
    let n = 0;
    let i = this.int(SENTENCES.length);
    // whole sentences up to the target; one that would pass it is skipped (a long line of code can be 150 tokens)
    for (let skipped = 0; n < tokens && skipped < SENTENCES.length; ) {
      const s = SENTENCES[i++ % SENTENCES.length]!;
      const c = this.countTokens(` ${s}`);
      if (n + c > tokens && n + 24 >= tokens) break;
      if (n + c > tokens) {
        skipped++;
        continue;
      }
      out.push(s);
      n += c;
      skipped = 0;
    }
    return out;
  }

  /**
   * A sample of about `tokens` haystack tokens (the needles come on top). `depth` in [0, 1] places the asked needle (the others of a
   * multi-needle task spread around it); null spreads them at random.
   */
  make(task: Task, tokens: number, depth: number | null = null): Sample {
    const hay = this.haystack(tokens);
    if (task === "quote") return this.quote(hay, depth);
    const tpl = this.pick(TEMPLATES.needles);
    const kind = this.pick(["number", "number", "uuid", "words"]);
    const noun = kind === "words" ? "word" : kind;
    const fill = (s: string, k: Record<string, string>) =>
      s.replaceAll("{n}", noun).replace(/\{(k|v|ks)\}/g, (_, name: string) => k[name]!);
    let facts: [string, string][];
    let asked: [string, string][];
    let question: string;
    if (task === "single") {
      facts = [[this.key(), this.value(kind)]];
      asked = facts;
      question = fill(tpl[1], { k: facts[0]![0] });
    } else if (task === "multikey") {
      const keys = [...new Set(Array.from({ length: 4 }, () => this.key()))];
      facts = keys.map((k) => [k, this.value(kind)]);
      asked = [facts[0]!];
      question = fill(tpl[1], { k: asked[0]![0] });
    } else if (task === "multivalue") {
      const k = this.key();
      facts = Array.from({ length: 4 }, () => [k, this.value(kind)] as [string, string]);
      asked = facts;
      question = fill(tpl[2], { k });
    } else {
      const keys = [...new Set(Array.from({ length: 4 }, () => this.key()))];
      facts = keys.map((k) => [k, this.value(kind)]);
      asked = facts.slice(0, 2);
      question = fill(tpl[3], { ks: `${asked[0]![0]} and ${asked[1]![0]}` });
    }
    // the first fact sits at `depth`, the others at random depths
    const positions = facts.map((_, i) => (i === 0 && depth !== null ? depth : this.rng()));
    const needles = facts.map(([k, v]) => fill(tpl[0], { k, v }));
    const { text, at } = this.insert(hay, needles, positions);
    const askedIdx = asked.map((f) => facts.indexOf(f));
    return {
      task,
      text,
      question,
      expected: asked.map(([, v]) => v),
      depths: askedIdx.map((i) => at[i]! / text.length),
    };
  }

  /** Needles between sentences at the given fractions; returns the text and each needle's character offset. */
  private insert(hay: string[], needles: string[], positions: number[]): { text: string; at: number[] } {
    const slots = positions.map((p) => Math.min(hay.length, Math.max(0, Math.round(p * hay.length))));
    const parts: string[] = [];
    const at: number[] = new Array(needles.length).fill(0);
    let len = 0;
    for (let i = 0; i <= hay.length; i++) {
      for (let n = 0; n < needles.length; n++) {
        if (slots[n] === i) {
          at[n] = len;
          parts.push(needles[n]!);
          len += needles[n]!.length + 1;
        }
      }
      if (i < hay.length) {
        parts.push(hay[i]!);
        len += hay[i]!.length + 1;
      }
    }
    return { text: parts.join(" "), at };
  }

  /** Quote the sentence that holds a word found in no other sentence of the haystack. */
  private quote(hay: string[], depth: number | null): Sample {
    const count = new Map<string, number>();
    const wordsOf = (s: string) => new Set(s.toLowerCase().match(/[a-z]+/g) ?? []);
    // distinct sentences: beyond ~320K tokens the haystack repeats, and a sentence's copies are the same quote
    for (const s of new Set(hay)) for (const w of wordsOf(s)) count.set(w, (count.get(w) ?? 0) + 1);
    const start = depth === null ? this.int(hay.length) : Math.round(depth * (hay.length - 1));
    for (let d = 0; d < hay.length; d++) {
      const i = (start + d) % hay.length;
      const s = hay[i]!;
      if (s.length > 200) continue;
      const unique = [...wordsOf(s)].filter((w) => w.length >= 5 && count.get(w) === 1 && s.includes(w));
      if (unique.length === 0) continue;
      const w = this.pick(unique);
      const text = hay.join(" ");
      const at = hay.slice(0, i).reduce((n, x) => n + x.length + 1, 0);
      return {
        task: "quote",
        text,
        question: TEMPLATES.quote.replace("{w}", w),
        expected: [s],
        depths: [at / text.length],
      };
    }
    throw new Error("no sentence with a unique word in the haystack");
  }
}
