/**
 * The scheduler's promise to interactive work: a query waits at most one background (compression) step, however
 * many chunks the uploads have queued, and long interactive work still leaves uploads a share of the steps.
 * Counted in steps, not timed (bench/ttft-under-upload.ts gives the times).
 */
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { EngineCore } from "../src/engine/core.ts";
import { type Priority, Scheduler, type Task } from "../src/engine/scheduler.ts";
import { makeTinyModel } from "./fixtures/tiny-model.ts";

/** A task of `n` steps that logs each one as `name`. */
function* steps(name: string, n: number, log: string[]): Task<void> {
  for (let i = 0; i < n; i++) {
    log.push(name);
    if (i < n - 1) yield;
  }
}

describe("Scheduler", () => {
  test("a query that arrives while uploads compress waits for the step in progress only", async () => {
    const s = new Scheduler();
    const log: string[] = [];
    const uploads = [s.run(steps("u1", 200, log), "background"), s.run(steps("u2", 200, log), "background")];
    while (log.length < 5) await new Promise((r) => setImmediate(r));
    const at = log.length;
    await s.run(steps("q", 4, log), "interactive");
    // from its arrival to its end: at most the one upload step already running, then all of the query's steps
    const during = log.slice(at, log.lastIndexOf("q") + 1);
    expect(during.filter((x) => x !== "q").length).toBeLessThanOrEqual(1);
    expect(during.filter((x) => x === "q").length).toBe(4);
    await Promise.all(uploads);
  });

  test("interactive tasks take turns; long ones leave uploads one step in FAIR_SHARE + 1, never before a new query", async () => {
    const s = new Scheduler();
    const log: string[] = [];
    const run = (name: string, n: number, p: Priority) => s.run(steps(name, n, log), p);
    const all = [run("u", 50, "background"), run("g1", 90, "interactive"), run("g2", 90, "interactive")];
    await new Promise((r) => setTimeout(r, 0));
    const arrived = log.length;
    const fresh = run("q", 1, "interactive");
    await fresh;
    await Promise.all(all);
    // the two generations alternate; uploads are not stalled by them for good
    const gens = log.filter((x) => x !== "u" && x !== "q");
    expect(gens.slice(0, 6)).toEqual(["g1", "g2", "g1", "g2", "g1", "g2"]);
    const uploadSteps = log.slice(0, log.lastIndexOf("g2")).filter((x) => x === "u").length;
    expect(uploadSteps).toBeGreaterThanOrEqual(Math.floor(180 / 9) - 1);
    // the fresh query ran after one turn of the other interactive tasks, with no upload step in between
    const before = log.slice(arrived, log.indexOf("q"));
    expect(before).not.toContain("u");
    expect(before.length).toBeLessThanOrEqual(2);
  });
});

describe("EngineCore: a query during an upload", () => {
  const root = mkdtempSync(join(tmpdir(), "reform-sched-"));
  afterAll(() => rmSync(root, { recursive: true, force: true }));

  test("needs at most one step more to its first token than when the engine is idle", async () => {
    const modelDir = await makeTinyModel(join(root, "model"), {
      reformHeads: { heads: [{ layer: 1, kind: "q", head: 0 }], chunk_size: 16, capacity: 64 },
    });
    const core = new EngineCore({
      modelDir,
      dataDir: join(root, "data"),
      backend: "cpu",
      defaults: { budget: 64, maxBudget: 192, maxTokens: 2 },
    });
    let stepsRun = 0;
    core.sched.onStep = () => stepsRun++;
    const small = core.createContext().id;
    await core.append(small, new TextEncoder().encode("the old mill stands by the river. ".repeat(20)));
    await core.finalize(small);

    /** scheduler steps from sending a query to its first token */
    const stepsToFirstToken = async () => {
      const at = stepsRun;
      let first = -1;
      await core.query(
        `q${at}`,
        {
          contextId: small,
          question: "What stands by the river?",
          method: "reform",
          sampling: { maxTokens: 2, temperature: 0, topP: 1, topK: 0, stop: [] },
        },
        (ev) => {
          if (ev.type === "token" && first < 0) first = stepsRun - at;
        },
      );
      return first;
    };
    const idle = await stepsToFirstToken();

    // one big piece: 256 KiB of text is thousands of 16-token chunks (and several tokenizer slices)
    const big = core.createContext().id;
    const upload = core.append(big, new TextEncoder().encode("a river runs past the old mill and on. ".repeat(6800)));
    while ((core.getContext(big)?.tokensProcessed ?? 0) < 64) await new Promise((r) => setImmediate(r));
    const during = await stepsToFirstToken();
    expect(core.getContext(big)!.tokensProcessed).toBeLessThan(core.getContext(big)!.tokensReceived); // still busy
    expect(during).toBeLessThanOrEqual(idle + 1);
    await core.deleteContext(big);
    await upload.catch(() => {});
    await core.close();
  }, 120_000);
});
