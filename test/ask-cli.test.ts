/**
 * `bun run ask` against a server on the in-memory fake engine: the context id is printed as soon as the context
 * exists, big files go up in pieces (no request waits for the whole compression), progress shows the rate and an
 * ETA, and after a failure the context is kept with the commands to resume or delete it — and resuming works.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ROOT_DIR } from "../ffi/native.ts";
import { type RunningServer, startServer } from "../src/server.ts";
import { FakeEngine } from "./helpers/fake-engine.ts";

const dir = mkdtempSync(join(tmpdir(), "reform-ask-"));
const file = join(dir, "book.txt");
// 300 KiB with multi-byte characters, so that pieces split characters
const text = "Chapter one. Die Brücke über den Fluß — 河 🌊 flows on.\n".repeat(5200);
writeFileSync(file, text);
const bytes = Buffer.byteLength(text);

let eng: FakeEngine;
let srv: RunningServer;

beforeAll(async () => {
  eng = new FakeEngine();
  srv = await startServer({ modelDir: "/nonexistent", dataDir: dir, port: 0, engineClient: eng, log: () => {} });
});
afterAll(async () => {
  await srv.stop();
  rmSync(dir, { recursive: true, force: true });
});

/** Runs the ask CLI; resolves with its exit code and output. */
function ask(args: string[]): Promise<{ code: number; out: string; err: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, ["src/cli/ask.ts", "--server", srv.url, ...args], { cwd: ROOT_DIR });
    let out = "";
    let err = "";
    p.stdout.on("data", (d) => (out += d));
    p.stderr.on("data", (d) => (err += d));
    p.on("close", (code) => resolve({ code: code ?? -1, out, err }));
  });
}

describe("bun run ask", () => {
  test("uploads in pieces, prints the context id first, reports rate and disk, answers", async () => {
    const r = await ask([file, "What flows on?", "--keep", "--piece-bytes", "65536"]);
    expect(r.code).toBe(0);
    const id = /context (ctx\d+) created/.exec(r.err)?.[1];
    expect(id).toBeDefined();
    expect(r.err.indexOf(`context ${id} created`)).toBe(0); // before anything else
    expect(eng.texts.get(id!)).toBe(text); // pieces joined exactly, characters split across them included
    expect(r.err).toMatch(/compressed [\d,]+ \/ ~[\d,]+ tokens, [\d,]+ tok\/s, ETA /); // from the events stream
    expect(r.err).toMatch(/tokens compressed in [\d.]+ s \([\d,]+ tok\/s\), .* on disk/);
    expect(r.err).toContain(`context kept: ${id}`);
    expect(r.out).toContain("the answer is");
  }, 60_000);

  test("a failed upload keeps the context, prints how to resume or delete it; the resume completes it", async () => {
    eng.failAppendPastBytes = 100_000;
    const r = await ask([file, "What flows on?", "--piece-bytes", "65536"]);
    eng.failAppendPastBytes = null;
    expect(r.code).toBe(1);
    const id = /context (ctx\d+) created/.exec(r.err)?.[1] ?? "missing";
    expect(r.err).toContain("upload failed: 500 device_error");
    expect(r.err).toContain(`the context ${id} is kept`);
    expect(r.err).toContain(`curl -X DELETE ${srv.url}/v1/contexts/${id}`);
    const resume = r.err.split("\n").find((l) => l.includes("--resume"))!;
    expect(resume).toContain(`--context ${id} --resume`);
    expect(await srv.engine.getContext(id)).not.toBeNull();
    const stored = (await srv.engine.getContext(id))!.bytesReceived;
    expect(stored).toBeGreaterThan(0);
    expect(stored).toBeLessThan(bytes);

    // the printed command, as a user would run it
    const again = await ask([file, "What flows on?", "--context", id, "--resume"]);
    expect(again.code).toBe(0);
    expect(eng.texts.get(id)).toBe(text); // nothing duplicated, nothing skipped
    expect(again.out).toContain("the answer is");
  }, 60_000);
});
