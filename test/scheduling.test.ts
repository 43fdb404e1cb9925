/**
 * The scheduler's promises, observed from outside (EngineCore's public operations, in process, so that no message
 * latency blurs the count; nothing here depends on how the queue is ordered inside):
 *   - a query that arrives during a long compression starts being served at once, not after the upload: only a
 *     few compress chunks run before its first event, and it finishes while the upload is still going;
 *   - an abort stops a generation within one step (no token after the step that saw it);
 *   - answers at temperature 0 are the same whether queries run one after another or all at once.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { ContextInfo, QueryEvent } from "../src/engine/api.ts";
import { EngineCore } from "../src/engine/core.ts";
import { makeTinyModel } from "./fixtures/tiny-model.ts";

setDefaultTimeout(120_000);

let root: string;
let core: EngineCore;
const progress: ContextInfo[] = [];

function words(n: number, seed: number): string {
  const w = ["river", "stone", "cloud", "the", "and", "alpha", "beta", "héllo", "中文", "data"];
  let x = seed;
  return Array.from({ length: n }, () => {
    x = (x * 1103515245 + 12345) >>> 0;
    return w[x % w.length];
  }).join(" ");
}

const sampling = (maxTokens: number) => ({ maxTokens, temperature: 0, topP: 1, topK: 0, seed: 1, stop: [] });
let qn = 0;
async function ask(
  contextId: string,
  question: string,
  maxTokens = 6,
  onEvent?: (ev: QueryEvent, qid: string) => void,
) {
  const qid = `q${qn++}`;
  const evs: QueryEvent[] = [];
  await core.query(qid, { contextId, question, method: "reform", sampling: sampling(maxTokens) }, (ev) => {
    evs.push(ev);
    onEvent?.(ev, qid);
  });
  return evs;
}
/** generated token ids (a token event with id -1 carries held-back text at the end, not a token) */
const tokens = (evs: QueryEvent[]) => evs.flatMap((e) => (e.type === "token" && e.tokenId >= 0 ? [e.tokenId] : []));

let ready = "";
beforeAll(async () => {
  root = mkdtempSync(join(tmpdir(), "reform-sched-"));
  const modelDir = await makeTinyModel(join(root, "model"));
  core = new EngineCore(
    {
      modelDir,
      dataDir: join(root, "data"),
      backend: "cpu",
      threads: 1,
      defaults: { budget: 128, maxBudget: 192, maxTokens: 16, edge: 16, window: 9 },
    },
    (i) => progress.push(i),
  );
  ready = core.createContext().id;
  await core.append(ready, new TextEncoder().encode(words(600, 1)));
  await core.finalize(ready);
});
afterAll(async () => {
  await core?.close();
  rmSync(root, { recursive: true, force: true });
});

describe("scheduler (observable behaviour)", () => {
  test("a query during a long compression is served at once, not after the upload", async () => {
    const up = core.createContext().id;
    const big = new TextEncoder().encode(words(4_000, 2)); // hundreds of 32-token chunks
    const chunks = () => progress.filter((p) => p.id === up).length;
    let uploadDone = false;
    const upload = core.append(up, big).then(() => (uploadDone = true));
    while (chunks() < 5) await new Promise((r) => setTimeout(r, 1));
    const atSubmit = chunks();
    let atFirstEvent = -1;
    let doneDuringUpload = false;
    await ask(ready, "what about the river?", 6, (ev) => {
      if (atFirstEvent < 0) atFirstEvent = chunks();
      if (ev.type === "done") doneDuringUpload = !uploadDone;
    });
    const atDone = chunks();
    await upload;
    const total = chunks();
    console.log(
      `  compress chunks: ${atFirstEvent - atSubmit} before the query's first event, ${atDone - atSubmit} until it was done (upload: ${total})`,
    );
    // the query's gather (embed, score) takes a few steps; the compression may take turns with it, no more
    expect(atFirstEvent - atSubmit).toBeLessThanOrEqual(4);
    expect(doneDuringUpload).toBe(true);
    expect(atDone - atSubmit).toBeLessThan(total / 10);
  });

  test("an abort stops a generation within one step", async () => {
    let n = 0;
    const evs = await ask(ready, "go on", 100, (ev, qid) => {
      if (ev.type === "token" && ++n === 3) core.abort(qid);
    });
    const done = evs.at(-1)!;
    if (done.type !== "done") throw new Error("no done event");
    expect(done.finishReason).toBe("abort");
    // aborted while the 3rd token was emitted: at most the step already under way may add one
    expect(tokens(evs).length).toBeLessThanOrEqual(4);
    expect(done.usage.completionTokens).toBe(tokens(evs).length);
  });

  test("concurrent answers equal sequential ones at temperature 0", async () => {
    const qs = ["what about the river?", "and the stone?", "tell me about clouds", "中文?"];
    const seq: number[][] = [];
    for (const q of qs) seq.push(tokens(await ask(ready, q, 8)));
    const par = await Promise.all(qs.map((q) => ask(ready, q, 8).then(tokens)));
    expect(par).toEqual(seq);
    expect(seq.flat().length).toBeGreaterThan(8); // (a random model may stop at once on some questions)
  });
});
