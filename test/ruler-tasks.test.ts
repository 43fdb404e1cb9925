/**
 * bench/ruler-tasks.ts: what bench/ruler.ts relies on to compare REFORM with `full` on the same task class. The
 * in-window reference shrinks a sample's haystack until its prompt fits the window, and a sample whose facts alone do
 * not fit is refused, not redrawn: so a seed must give the same facts, question and answers at any haystack length.
 */
import { describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { type Haystack, haystackSource, SampleMaker, TASKS } from "../bench/ruler-tasks.ts";
import { DEFAULT_MODEL_DIR } from "../src/config.ts";
import { ModelTokenizer } from "../src/model/tokenizer.ts";

const tok = ModelTokenizer.fromDir(DEFAULT_MODEL_DIR);
const count = (s: string) => tok.encode(s).length;

describe("ruler tasks", () => {
  test("a seed gives the same facts, question and answers at any haystack length", () => {
    for (const task of TASKS.filter((t) => t !== "quote"))
      for (let seed = 1; seed <= 6; seed++) {
        const long = new SampleMaker(seed, count).make(task, 4096, 0.3);
        const short = new SampleMaker(seed, count).make(task, 16, 0.3);
        expect(short.question).toBe(long.question);
        expect(short.expected).toEqual(long.expected);
        expect(count(short.text)).toBeLessThan(count(long.text) / 8);
        for (const v of long.expected) expect(short.text).toContain(v);
      }
  });

  test("different seeds give different facts", () => {
    const a = new SampleMaker(1, count).make("multivalue", 256, 0.5);
    const b = new SampleMaker(2, count).make("multivalue", 256, 0.5);
    expect(a.expected).not.toEqual(b.expected);
  });

  // documents that are not prose (bench/ruler.ts --haystack): the needles in the document's idiom, between its lines
  const fact = "(The|One) [^\\n]+\\.";
  const idiom: [Haystack, string, RegExp][] = [
    ["license", "/usr/share/common-licenses", new RegExp(`\\n\\n${fact}\\n\\n`)], // a paragraph of its own
    ["code", "/usr/include", new RegExp(`\\n/\\* ${fact} \\*/\\n`)], // a C comment line
    ["log", "", new RegExp(`\\n\\d{4}-\\d\\d-\\d\\dT[\\d:.]{12}Z INFO {2}\\[notes\\] ${fact}\\n`)], // a log line
  ];
  for (const [name, dir, needleLines] of idiom)
    test.skipIf(dir !== "" && !existsSync(dir))(
      `${name} haystack: its own lines, needles in its idiom, same facts at any length`,
      () => {
        const src = haystackSource(name);
        const units = new Set(src.units);
        for (const task of TASKS.filter((t) => t !== "quote"))
          for (let seed = 1; seed <= 4; seed++) {
            const long = new SampleMaker(seed, count, src).make(task, 2048, 0.5);
            const short = new SampleMaker(seed, count, src).make(task, 16, 0.5);
            expect(short.expected).toEqual(long.expected);
            expect(count(long.text)).toBeGreaterThan(1800);
            const text = `\n${long.text}\n`;
            for (const v of long.expected) {
              const at = text.indexOf(v);
              // the needle's line, with the blank line before and after it where the source writes paragraphs
              const around = text.slice(
                text.lastIndexOf("\n", at) - (name === "license" ? 1 : 0),
                text.indexOf("\n", at) + (name === "license" ? 2 : 1),
              );
              expect(around).toMatch(needleLines);
            }
            // every other line is the source's own
            const other = long.text.split("\n").filter((l) => l !== "" && !new RegExp(fact).test(l));
            expect(other.filter((l) => !units.has(l))).toEqual([]);
          }
        expect(() => new SampleMaker(1, count, src).make("quote", 512)).toThrow(/sentences/);
      },
    );
});
