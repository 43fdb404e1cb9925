/**
 * A process for test/failure-paths.test.ts to kill -9: an engine (in process) that uploads a file to a new context
 * in pieces and prints `id <id>`, then `ack <bytesReceived>` after each acknowledged piece.
 *   bun test/helpers/upload-child.ts <modelDir> <dataDir> <textFile> <pieceBytes>
 */
import { readFileSync } from "node:fs";
import { EngineCore } from "../../src/engine/core.ts";

const [modelDir, dataDir, textFile, piece] = process.argv.slice(2) as [string, string, string, string];
const core = new EngineCore({ modelDir, dataDir, backend: "cpu", threads: 1, defaults: { stateSaveEvery: 2 } });
const id = core.createContext().id;
console.log(`id ${id}`);
const bytes = readFileSync(textFile);
const n = Number(piece);
for (let off = 0; off < bytes.length; off += n) {
  const info = await core.append(id, bytes.subarray(off, off + n));
  console.log(`ack ${info.bytesReceived}`);
}
console.log("done");
