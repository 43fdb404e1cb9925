/**
 * `bun run ask` against a server on the in-memory fake engine: the context id is printed as soon as the context
 * exists, big files go up in pieces (no request waits for the whole compression), progress shows the rate and an
 * ETA, and after a failure the context is kept with the commands to resume or delete it — and resuming works.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ROOT_DIR } from "../ffi/native.ts";
import { type RunningServer, startServer } from "../src/server.ts";
import { FakeEngine } from "./helpers/fake-engine.ts";
import { preflight } from "../src/cli/ask-preflight.ts";

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
    // the follow-up command names the same server (the default one would be another)
    expect(r.err).toContain(`context kept: ${id} (ask again with --context ${id} --server ${srv.url})`);
    expect(r.out).toContain("the answer is");
    // listed for chat frontends under the file's name, not its id
    const models = (await (await fetch(`${srv.url}/v1/models`)).json()) as { data: { id: string; name?: string }[] };
    expect(models.data.find((m) => m.id === `context:${id}`)?.name).toBe("book.txt");
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
    // the server this run used (not the default), and no "ask it again" while the upload is cut off (409)
    expect(resume).toContain(`--context ${id} --resume --server ${srv.url}`);
    expect(r.err).not.toContain("ask it again");
    expect(await srv.engine.getContext(id)).not.toBeNull();
    const stored = (await srv.engine.getContext(id))!.bytesReceived;
    expect(stored).toBeGreaterThan(0);
    expect(stored).toBeLessThan(bytes);

    // the printed command, as a user would run it
    const again = await ask([file, "What flows on?", "--context", id, "--resume"]);
    expect(again.code).toBe(0);
    expect(eng.texts.get(id)).toBe(text); // nothing duplicated, nothing skipped
    expect(again.out).toContain("the answer is");
    expect(await srv.engine.getContext(id)).toBeNull(); // the finished upload's context goes, as after one run
  }, 60_000);

  test("a directory (a code base) goes up as one document: its text files in path order, each after its path", async () => {
    const tree = join(dir, "tree");
    mkdirSync(join(tree, "src", "lib"), { recursive: true });
    mkdirSync(join(tree, ".git"), { recursive: true });
    mkdirSync(join(tree, "node_modules", "x"), { recursive: true });
    writeFileSync(join(tree, "README.md"), "# Tree\nThe secret number of cobalt-lantern is 4417203.\n");
    writeFileSync(join(tree, "src", "main.py"), "print('héllo')\n");
    writeFileSync(join(tree, "src", "lib", "util.ts"), "export const x = 1;");
    writeFileSync(join(tree, "src", "logo.png"), Uint8Array.from([0x89, 0x50, 0x4e, 0x47, 0, 1, 2]));
    writeFileSync(join(tree, "src", "empty.txt"), "");
    writeFileSync(join(tree, ".git", "HEAD"), "ref: refs/heads/main\n");
    writeFileSync(join(tree, "node_modules", "x", "index.js"), "module.exports = 1;\n");
    const r = await ask([tree, "What is the secret number of cobalt-lantern?"]);
    expect(r.code).toBe(0);
    const id = /context (ctx\d+) created/.exec(r.err)?.[1] ?? "missing";
    expect(eng.texts.get(id)).toBe(
      "==> README.md <==\n# Tree\nThe secret number of cobalt-lantern is 4417203.\n\n" +
        "==> src/lib/util.ts <==\nexport const x = 1;\n" +
        "==> src/main.py <==\nprint('héllo')\n",
    );
    expect(r.err).toContain("3 text files");
    expect(r.err).toContain("1 left out (not text, or unreadable): src/logo.png");
    expect(r.out).toContain("the answer is");
  }, 60_000);

  test("a gzip file and a UTF-16 file go up as their text (converted here: a resume's offsets are the text's)", async () => {
    const gz = join(dir, "book.txt.gz");
    writeFileSync(gz, Bun.gzipSync(new TextEncoder().encode(text)));
    const utf16 = join(dir, "book-utf16.txt");
    writeFileSync(utf16, Buffer.concat([Buffer.from([0xff, 0xfe]), Buffer.from(text, "utf16le")]));
    for (const [f, how] of [
      [gz, "gzip, decompressed"],
      [utf16, "UTF-16, converted"],
    ]) {
      const r = await ask([f!, "What flows on?", "--piece-bytes", "65536"]);
      expect(r.code).toBe(0);
      const id = /context (ctx\d+) created/.exec(r.err)?.[1] ?? "missing";
      expect(eng.texts.get(id)).toBe(text);
      expect(r.err).toContain(how!);
    }
  }, 60_000);

  test("a failed query offers to ask again with the same server (and says a key is needed)", async () => {
    const up = await ask([file, "q", "--keep", "--quiet"]);
    const id = /context (ctx\d+) created/.exec(up.err)?.[1] ?? "missing";
    eng.failAfterTokens = 0;
    const r = await ask(["--context", id, "What flows on?", "--api-key", "k"]);
    eng.failAfterTokens = null;
    expect(r.code).toBe(1);
    const again = r.err.split("\n").find((l) => l.includes("ask it again"))!;
    expect(again).toContain(`--context ${id} "What flows on?" --server ${srv.url} --api-key KEY`);
    expect(r.err).not.toContain("--resume");
  }, 60_000);

  test("a context that does not exist: the error, and no command to ask it again or delete it", async () => {
    const r = await ask(["--context", "ctx_doesnotexist", "What flows on?"]);
    expect(r.code).toBe(1);
    expect(r.err).toContain("404 context_not_found");
    expect(r.err).not.toContain("is kept on the server");
    expect(r.err).not.toContain("ask it again");
  }, 60_000);

  test("an empty file is refused before any upload", async () => {
    const empty = join(dir, "empty.txt");
    writeFileSync(empty, "");
    const before = eng.texts.size;
    const r = await ask([empty, "What flows on?"]);
    expect(r.code).not.toBe(0);
    expect(r.err).toContain("empty.txt is empty: there is nothing to ask about; nothing was uploaded");
    expect(r.err).not.toContain("created");
    expect(eng.texts.size).toBe(before);
  }, 60_000);

  test("--max-tokens over the server's maximum (GET /props) is refused before any upload", async () => {
    const before = eng.texts.size;
    const r = await ask([file, "q", "--max-tokens", "300"]);
    expect(r.code).toBe(1);
    expect(r.err).toContain("--max-tokens 300 exceeds the server's maximum of 64 new tokens");
    expect(r.err).not.toContain("created");
    expect(eng.texts.size).toBe(before);
  }, 60_000);

  test("a budget or an answer length that cannot fit the model is refused before any upload, naming the numbers", async () => {
    const before = eng.texts.size;
    // the fake model: max_model_len 256, template 8, max_budget 128; one token per character
    const long = `${"Which river flows on under the bridge in chapter one of the book ".repeat(1)}?`;
    const tooLong = await ask([file, long, "--budget", "128", "--max-tokens", "64"]);
    expect(tooLong.code).toBe(1);
    const need = 8 + 128 + long.length + 64;
    expect(tooLong.err).toContain(
      `template 8 + gathered budget 128 + question ${long.length} + max_tokens 64 = ${need}; ask with --max-tokens ${256 - 8 - 128 - long.length} or less or a --budget below 128`,
    );
    expect(tooLong.err).toContain("nothing was uploaded");
    const overBudget = await ask([file, "q", "--budget", "200"]);
    expect(overBudget.code).toBe(1);
    expect(overBudget.err).toContain("--budget 200 exceeds the server's maximum of 128 tokens");
    for (const r of [tooLong, overBudget]) expect(r.err).not.toContain("created");
    expect(eng.texts.size).toBe(before);
    // what fits goes up and is answered
    const fits = await ask([file, long, "--budget", "128", "--max-tokens", `${256 - 8 - 128 - long.length}`]);
    expect(fits.code).toBe(0);
  }, 60_000);

  test("preflight: checks only what surely fails", async () => {
    const l = {
      max_model_len: 512,
      template_tokens: 13,
      budget: 320,
      max_budget: 448,
      max_tokens: 64,
      max_new_tokens: 256,
    };
    let asked = 0;
    const q = (n: number | null) => async () => {
      asked++;
      return n;
    };
    const big = 320 * 16;
    expect(await preflight(l, { method: "reform", documentBytes: big, questionTokens: q(20) })).toBeNull();
    expect(
      await preflight(l, { method: "reform", maxTokens: 200, documentBytes: big, questionTokens: q(20) }),
    ).toContain("= 553; ask with --max-tokens 159 or less");
    // a document shorter than the budget may be gathered whole; another method gathers otherwise; an unknown question
    asked = 0;
    expect(
      await preflight(l, { method: "reform", maxTokens: 200, documentBytes: big - 1, questionTokens: q(20) }),
    ).toBeNull();
    expect(
      await preflight(l, { method: "full", maxTokens: 200, documentBytes: big, questionTokens: q(20) }),
    ).toBeNull();
    expect(asked).toBe(0);
    expect(
      await preflight(l, { method: "reform", maxTokens: 200, documentBytes: big, questionTokens: q(null) }),
    ).toBeNull();
    // two tokens of slack for the template's boundaries
    expect(
      await preflight(l, { method: "reform", maxTokens: 161, documentBytes: big, questionTokens: q(20) }),
    ).toBeNull();
    expect(await preflight(l, { method: "reform", maxTokens: 300, documentBytes: 1, questionTokens: q(1) })).toContain(
      "exceeds the server's maximum of 256 new tokens",
    );
    expect(
      await preflight(
        {},
        { method: "reform", budget: 9999, maxTokens: 9999, documentBytes: big, questionTokens: q(1) },
      ),
    ).toBeNull();
  });

  test("cannot reach the server: says how to start it (no --model needed)", async () => {
    const p = Bun.spawn([process.execPath, "src/cli/ask.ts", "--server", "http://127.0.0.1:1", file, "q"], {
      cwd: ROOT_DIR,
      stderr: "pipe",
    });
    const err = await new Response(p.stderr).text();
    expect(await p.exited).toBe(1);
    expect(err).toContain("start it with: bun run serve");
    expect(err).not.toContain("--model DIR");
  }, 60_000);

  test("--resume right after an interrupted upload waits for the server to store the dropped piece", async () => {
    const ctx = (await (
      await fetch(`${srv.url}/v1/contexts`, {
        method: "POST",
        body: "{}",
        headers: { "content-type": "application/json" },
      })
    ).json()) as { id: string };
    const id = ctx.id;
    const first = Buffer.from(text).subarray(0, 100_000);
    eng.appendDelayMs = 1500;
    eng.countBytesWhenStored = true;
    try {
      const ac = new AbortController();
      const body = new ReadableStream<Uint8Array>({
        start(c) {
          c.enqueue(first); // then the client goes away with the stream open (a Ctrl-C)
        },
      });
      const put = fetch(`${srv.url}/v1/contexts/${id}/content`, {
        method: "PUT",
        body,
        signal: ac.signal,
        headers: { "content-type": "text/plain" },
      }).catch(() => null);
      // the piece reached the engine and is being stored: the context does not count it yet
      for (
        let i = 0;
        i < 100 && eng.texts.get(id) === undefined && !(await srv.engine.getContext(id))?.tokensReceived;
        i++
      )
        await Bun.sleep(20);
      ac.abort();
      await put;
      expect((await srv.engine.getContext(id))!.bytesReceived).toBe(0);
      const r = await ask([file, "What flows on?", "--context", id, "--resume"]);
      expect(r.err).not.toContain("offset_mismatch");
      expect(r.code).toBe(0);
      expect(eng.texts.get(id)).toBe(text); // nothing duplicated, nothing skipped
    } finally {
      eng.appendDelayMs = 0;
      eng.countBytesWhenStored = false;
    }
  }, 60_000);
});
