/**
 * bench/ruler-tasks.ts: what bench/ruler.ts relies on to compare REFORM with `full` on the same task class. The
 * in-window reference shrinks a sample's haystack until its prompt fits the window, and a sample whose facts alone do
 * not fit is refused, not redrawn: so a seed must give the same facts, question and answers at any haystack length.
 */
import { describe, expect, test } from "bun:test";
import { SampleMaker, TASKS } from "../bench/ruler-tasks.ts";
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
});
