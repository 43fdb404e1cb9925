/**
 * Failure paths the README promises:
 *   - kill -9 during compression, then a restart: Session.reconcile brings the context back consistent (token and
 *     embedding files cut to what the metadata acknowledged), the upload resumes from bytes_received, and the result
 *     equals an upload that was never interrupted, bit for bit;
 *   - a different model under existing contexts (another checkpoint with the same config and file sizes) marks them
 *     failed (409 context_failed) instead of answering from embeddings of the old weights;
 *   - an allocation failure on the device is a 503 insufficient_memory and the server keeps serving (the CUDA source
 *     on the CPU emulation, whose device-memory limit is set from this process).
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { dlopen, FFIType, ptr } from "bun:ffi";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ROOT_DIR } from "../ffi/native.ts";
import type { EngineError } from "../src/engine/api.ts";
import { EngineCore } from "../src/engine/core.ts";
import { startServer } from "../src/server.ts";
import { makeTinyModel } from "./fixtures/tiny-model.ts";
import { expectError } from "./helpers/http.ts";

setDefaultTimeout(120_000);

let root: string;
let modelDir: string;
const DEFAULTS = { budget: 128, maxBudget: 192, maxTokens: 8, edge: 16, window: 9, stateSaveEvery: 2 };

function text(n: number): string {
  const w = ["river", "stone", "cloud", "the", "and", "alpha", "héllo", "中文", "emoji🎉", "data"];
  let x = 5;
  return Array.from({ length: n }, () => {
    x = (x * 1103515245 + 12345) >>> 0;
    return w[x % w.length];
  }).join(" ");
}

beforeAll(async () => {
  root = mkdtempSync(join(tmpdir(), "reform-fail-"));
  modelDir = await makeTinyModel(join(root, "model"));
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

const files = (dataDir: string, id: string) => {
  const d = join(dataDir, "contexts", id);
  return { tokens: readFileSync(join(d, "tokens.bin")), emb: readFileSync(join(d, "emb.bin")) };
};

describe("kill -9 during compression, then restart", () => {
  test("reconcile makes the context consistent; the resumed upload equals an uninterrupted one", async () => {
    const dataDir = join(root, "data-kill");
    const bytes = new TextEncoder().encode(text(3000));
    const textFile = join(root, "upload.txt");
    writeFileSync(textFile, bytes);
    const child = spawn(
      process.execPath,
      [join(ROOT_DIR, "test/helpers/upload-child.ts"), modelDir, dataDir, textFile, "2000"],
      { stdio: ["ignore", "pipe", "inherit"] },
    );
    let id = "";
    let acked = 0;
    let acks = 0;
    const exited = new Promise<number | null>((res) => child.on("exit", (_c, sig) => res(sig as unknown as null)));
    let buf = "";
    await new Promise<void>((resolve) => {
      child.stdout!.on("data", (d: Buffer) => {
        buf += d.toString();
        let nl = buf.indexOf("\n");
        while (nl >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          if (line.startsWith("id ")) id = line.slice(3);
          if (line.startsWith("ack ")) {
            acked = Number(line.slice(4));
            // the 4th piece is being compressed now (hundreds of chunks): kill it in the middle
            if (++acks === 3)
              setTimeout(() => {
                child.kill("SIGKILL");
                resolve();
              }, 30);
          }
          if (line === "done") resolve();
          nl = buf.indexOf("\n");
        }
      });
    });
    expect(String(await exited)).toBe("SIGKILL");
    expect(acked).toBeGreaterThan(0);
    expect(acked).toBeLessThan(bytes.length);

    const core = new EngineCore({ modelDir, dataDir, backend: "cpu", threads: 1, defaults: DEFAULTS });
    try {
      const info = core.getContext(id)!;
      expect(info.state).toBe("processing");
      expect(info.error).toBeUndefined();
      // everything acknowledged survived; what was not acknowledged may or may not have been kept
      expect(info.bytesReceived).toBeGreaterThanOrEqual(acked);
      expect(info.tokensProcessed).toBeLessThanOrEqual(info.tokensReceived);
      const f = files(dataDir, id);
      expect(f.tokens.byteLength).toBe(4 * info.tokensReceived);
      expect(f.emb.byteLength).toBe(info.embeddingBytes);
      await core.append(id, bytes.subarray(info.bytesReceived));
      const fin = await core.finalize(id);
      expect(fin.state).toBe("ready");
      const ref = core.createContext().id;
      await core.append(ref, bytes);
      await core.finalize(ref);
      const a = files(dataDir, ref);
      const b = files(dataDir, id);
      expect(Buffer.compare(b.tokens, a.tokens)).toBe(0);
      expect(Buffer.compare(b.emb, a.emb)).toBe(0);
    } finally {
      await core.close();
    }
  });
});

describe("a model change under existing contexts", () => {
  test("another checkpoint with the same config and file sizes: contexts fail (409 context_failed)", async () => {
    const dataDir = join(root, "data-swap");
    const other = await makeTinyModel(join(root, "model-other"), { seed: 999 }); // a "fine-tune": same shapes
    expect(readFileSync(join(other, "config.json"), "utf8")).toBe(readFileSync(join(modelDir, "config.json"), "utf8"));
    expect(statSync(join(other, "model.safetensors")).size).toBe(statSync(join(modelDir, "model.safetensors")).size);
    let core = new EngineCore({ modelDir, dataDir, backend: "cpu", threads: 1, defaults: DEFAULTS });
    const id = core.createContext().id;
    await core.append(id, new TextEncoder().encode(text(300)));
    await core.finalize(id);
    await core.close();

    // the same model again: still ready
    core = new EngineCore({ modelDir, dataDir, backend: "cpu", threads: 1, defaults: DEFAULTS });
    expect(core.getContext(id)!.state).toBe("ready");
    await core.close();

    core = new EngineCore({ modelDir: other, dataDir, backend: "cpu", threads: 1, defaults: DEFAULTS });
    try {
      const info = core.getContext(id)!;
      expect(info.state).toBe("failed");
      expect(info.error).toMatch(/different model/);
      const q = {
        contextId: id,
        question: "q",
        method: "reform",
        sampling: { maxTokens: 2, temperature: 0, topP: 1, topK: 0, stop: [] },
      };
      const err = (await core.query("q1", q, () => {}).catch((e) => e)) as EngineError;
      expect([err.status, err.code]).toEqual([409, "context_failed"]);
    } finally {
      await core.close();
    }
  });
});

const EMU = join(ROOT_DIR, "build", "libreform_cuda_emu.so");
describe.skipIf(process.arch !== "x64" || !existsSync(EMU))("out of device memory", () => {
  test("a 503 insufficient_memory, and the server keeps serving", async () => {
    const emuModel = await makeTinyModel(join(root, "model-emu"), { hidden: 64, heads: 4, kvHeads: 2 });
    const srv = await startServer({
      modelDir: emuModel,
      dataDir: join(root, "data-emu"),
      port: 0,
      backend: "cuda",
      library: EMU,
      defaults: DEFAULTS,
      log: () => {},
    });
    // the same library in this process: its device-memory limit is the worker's
    const h = dlopen(EMU, {
      rf_emu_set: { args: [FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
      rf_emu_stat: { args: [FFIType.ptr], returns: FFIType.i64 },
    }).symbols;
    const cs = (s: string) => ptr(new Uint8Array(Buffer.from(`${s}\0`)));
    const chat = () =>
      fetch(`${srv.url}/v1/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: "reform", messages: [{ role: "user", content: "hi" }], max_tokens: 2 }),
      });
    try {
      await srv.engine.ready();
      expect((await chat()).status).toBe(200);
      // the finished query's sequence may still be freed in the worker after its response: wait until the live
      // device memory is just the model's, then leave no room for another sequence
      let live = Number(h.rf_emu_stat(cs("live_bytes")));
      for (let i = 0; i < 100; i++) {
        await Bun.sleep(20);
        const now = Number(h.rf_emu_stat(cs("live_bytes")));
        if (now === live) break;
        live = now;
      }
      expect(h.rf_emu_set(cs("mem_limit"), cs(String(live + 1024)))).toBe(0);
      await expectError(await chat(), 503, "insufficient_memory");
      expect(h.rf_emu_set(cs("mem_limit"), cs(String(8 * 2 ** 30)))).toBe(0);
      const ok = await chat();
      expect(ok.status).toBe(200);
      expect(((await ok.json()) as { choices: { message: { role: string } }[] }).choices[0]!.message.role).toBe(
        "assistant",
      );
      expect((await fetch(`${srv.url}/health`)).status).toBe(200);
    } finally {
      h.rf_emu_set(cs("mem_limit"), cs(String(8 * 2 ** 30)));
      await srv.stop();
    }
  });
});
