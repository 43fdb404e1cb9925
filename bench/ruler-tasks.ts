/**
 * RULER-style samples over held-out text: a haystack of a given length in tokens with needles at spread depths,
 * the question, and the strings a correct answer contains (string_match_all). Reference: Hsieh et al. 2024,
 * RULER, section 3 (NIAH single, multi-key, multi-value, multi-query) plus a "quote the sentence" task.
 *
 * The needle templates are the trainer's own (training/templates.json); key/value words are the held-out words in
 * bench/data, and the haystack is held-out prose (bench/data) or, as users upload, a document that is not prose
 * (HAYSTACKS: license files, C headers, a log), none of it trained on. Used by bench/ruler.ts and
 * test/quality.test.ts.
 */
import { lstatSync, readdirSync, readFileSync } from "node:fs";
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

/**
 * What a haystack is made of: `units` (sentences or lines) joined by `sep`, and a needle as it stands among them
 * (`needle(sentence, unitBefore)`: a paragraph of a license, a comment in a C header, a line of a log).
 */
export interface HaystackSource {
  name: Haystack;
  /** one line for the benchmark's header */
  describe: string;
  units: string[];
  sep: string;
  needle(sentence: string, before: string | undefined): string;
}

export const HAYSTACKS = ["prose", "license", "code", "log"] as const;
export type Haystack = (typeof HAYSTACKS)[number];

/** Lines of the regular files in `dir` whose names pass `keep`, in name order, each file after a `==> name <==`
 * line (as `bun run ask DIR` uploads a folder); throws naming the Debian package when there are none. */
function fileLines(dir: string, keep: (name: string) => boolean, pkg: string): string[] {
  let names: string[] = [];
  try {
    names = readdirSync(dir)
      .filter((f) => keep(f) && lstatSync(join(dir, f)).isFile())
      .sort();
  } catch {}
  if (names.length === 0) throw new Error(`no files in ${dir}: this haystack needs Debian's ${pkg}`);
  return names.flatMap((f) => [`==> ${f} <==`, ...readFileSync(join(dir, f), "utf8").split("\n"), ""]);
}

/** A server log of `n` lines from a fixed seed: timestamps, levels, components, request ids, paths, sizes. */
function logLines(n: number): string[] {
  const r = mulberry32(20261130);
  const pick = <T>(xs: readonly T[]) => xs[Math.floor(r() * xs.length)]!;
  const hex = (k: number) => Array.from({ length: k }, () => "0123456789abcdef"[Math.floor(r() * 16)]).join("");
  const paths = ["/v1/contexts", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/v1/completions"];
  const msgs: (() => string)[] = [
    () =>
      `[http] ${pick(["GET", "POST", "PUT", "DELETE"])} ${pick(paths)} ${pick([200, 200, 200, 201, 204, 400, 404, 409, 503])} ${Math.floor(r() * 900)} ms req=${hex(12)}`,
    () =>
      `[upload] ctx_${hex(24)} chunk ${Math.floor(r() * 9000)} compressed ${pick([64, 128, 256])} tokens in ${(r() * 20).toFixed(1)} ms`,
    () =>
      `[scheduler] queue depth ${Math.floor(r() * 12)}, ${Math.floor(r() * 4)} running, ${Math.floor(r() * 300)} ms waited`,
    () => `[store] fsync ${hex(8)}.bin ${Math.floor(r() * 65536)} bytes, ${(r() * 3).toFixed(2)} ms`,
    () =>
      `[gc] heap ${(50 + r() * 400).toFixed(1)} MiB, collected ${(r() * 40).toFixed(1)} MiB in ${(r() * 9).toFixed(1)} ms`,
    () =>
      `[auth] token ${hex(6)}... ${pick(["accepted", "accepted", "rejected: expired", "rejected: unknown key"])} from 10.${Math.floor(r() * 255)}.${Math.floor(r() * 255)}.${Math.floor(r() * 255)}`,
    () =>
      `[worker-${Math.floor(r() * 8)}] job ${hex(10)} ${pick(["started", "finished", "retrying (attempt 2)", "failed: timeout after 30 s"])}`,
  ];
  const t0 = Date.UTC(2026, 2, 14, 9, 0, 0);
  const out: string[] = [];
  for (let i = 0, t = t0; i < n; i++) {
    t += Math.floor(r() * 900);
    const level = pick(["INFO ", "INFO ", "INFO ", "DEBUG", "WARN ", "ERROR"]);
    out.push(`${new Date(t).toISOString()} ${level} ${pick(msgs)()}`);
  }
  return out;
}

const sources = new Map<Haystack, HaystackSource>();
/** The haystack `name`, read once (license: /usr/share/common-licenses, base-files; code: the C library's headers
 * in /usr/include, libc6-dev, which the native build needs; log: 60,000 generated lines). */
export function haystackSource(name: Haystack): HaystackSource {
  const known = sources.get(name);
  if (known) return known;
  let src: HaystackSource;
  if (name === "prose") src = { name, describe: "held-out prose", units: SENTENCES, sep: " ", needle: (s) => s };
  else if (name === "license")
    src = {
      name,
      describe: "license files (/usr/share/common-licenses), needles as paragraphs",
      units: fileLines("/usr/share/common-licenses", () => true, "base-files"),
      sep: "\n",
      needle: (s) => `\n${s}\n`,
    };
  else if (name === "code")
    src = {
      name,
      describe: "C headers (/usr/include/*.h), needles as comments",
      units: fileLines("/usr/include", (f) => f.endsWith(".h"), "libc6-dev"),
      sep: "\n",
      needle: (s) => `/* ${s} */`,
    };
  else if (name === "log")
    src = {
      name,
      describe: "a generated server log, needles as log lines",
      units: logLines(60_000),
      sep: "\n",
      // the needle takes the timestamp of the line before it, as a line written in the same second would
      needle: (s, before) => `${before?.slice(0, 24) ?? "2026-03-14T09:00:00.000Z"} INFO  [notes] ${s}`,
    };
  else throw new Error(`unknown haystack ${name} (${HAYSTACKS.join(", ")})`);
  sources.set(name, src);
  return src;
}

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
  /** `countTokens`: the model's tokenizer, so that a haystack of N tokens is N tokens of that model; `source`: what
   * the haystack is made of (held-out prose unless named). Throws if `source` cannot be read. */
  constructor(
    seed: number,
    private readonly countTokens: (s: string) => number,
    private readonly source: HaystackSource = haystackSource("prose"),
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

  /** Haystack units of about `tokens` tokens, from a random start, wrapping around (held-out prose repeats beyond
   * ~320K tokens, license files beyond ~90K). */
  private haystack(tokens: number): string[] {
    const { units, sep } = this.source;
    const out: string[] = [];
    let n = 0;
    let i = this.int(units.length);
    // whole units up to the target; one that would pass it is skipped (a long line of code can be 150 tokens), for
    // at most 256 in a row: log lines are all ~35 tokens, and scanning 60,000 of them for a shorter one took seconds
    for (let skipped = 0; n < tokens && skipped < Math.min(256, units.length); ) {
      const s = units[i++ % units.length]!;
      const c = this.countTokens(`${sep}${s}`);
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
    if (task === "quote") {
      if (this.source.name !== "prose")
        throw new Error(`quote needs sentences: not asked on the ${this.source.name} haystack`);
      return this.quote(hay, depth);
    }
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

  /** Needles between units at the given fractions, each as the source writes it; returns the text and each
   * needle's character offset. */
  private insert(hay: string[], needles: string[], positions: number[]): { text: string; at: number[] } {
    const { sep, needle } = this.source;
    const slots = positions.map((p) => Math.min(hay.length, Math.max(0, Math.round(p * hay.length))));
    const parts: string[] = [];
    const at: number[] = new Array(needles.length).fill(0);
    let len = 0;
    for (let i = 0; i <= hay.length; i++) {
      for (let n = 0; n < needles.length; n++) {
        if (slots[n] === i) {
          const s = needle(needles[n]!, hay[i - 1]);
          at[n] = len;
          parts.push(s);
          len += s.length + sep.length;
        }
      }
      if (i < hay.length) {
        parts.push(hay[i]!);
        len += hay[i]!.length + sep.length;
      }
    }
    return { text: parts.join(sep), at };
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
