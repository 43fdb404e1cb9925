/**
 * The web page (web/, routes/web.ts) in a real browser: headless Chromium (Debian's `chromium`, which
 * `scripts/setup.sh --with-test-libs` installs) driven by playwright-core, against a server on the embedded default
 * model (models/reform-tiny) with an API key. Through the page only: the key is asked for once, a document with a
 * needle sentence is uploaded in small pieces (one piece's connection is dropped on purpose, and the page resumes
 * from the server's `bytes_received`), `ready` is reached, a needle question is asked, the answer streams in token
 * by token, and the passages REFORM gathered are shown in document order, the best of them on the needle. A screenshot
 * is saved to test-output/webui.png. Skipped, saying why, only where no Chromium is installed.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Browser, Page } from "playwright-core";
import { mulberry32 } from "../src/util/rng.ts";
import { startTestServer, type TestServer } from "./helpers/server.ts";

// biome-ignore lint/suspicious/noExplicitAny: tests read response bodies loosely typed
type Json = any;

const T = 240_000;
const ROOT = join(import.meta.dir, "..");
const MODEL = join(ROOT, "models", "reform-tiny");
const SHOT = join(ROOT, "test-output", "webui.png");
const KEY = "webui-test-key";

/** Debian's chromium (or one named by REFORM_CHROMIUM); null when there is none. */
function findChromium(): string | null {
  const env = process.env.REFORM_CHROMIUM;
  if (env && existsSync(env)) return env;
  for (const name of ["chromium", "chromium-browser"]) {
    const p = Bun.which(name);
    if (p) return p;
  }
  return null;
}
const chromiumPath = findChromium();
if (!chromiumPath)
  console.warn(
    "[webui.test] skipped: no Chromium found (as root, `bash scripts/setup.sh --with-test-libs` installs Debian's " +
      "chromium; or set REFORM_CHROMIUM to a Chromium binary)",
  );

const NEEDLE = "The secret number of silver-harbor is 4821937.";
const QUESTION = "What is the secret number of silver-harbor?";

/** A haystack of plain sentences (about 14 KB, ~8 windows of the model) with the needle at about 60 %. */
function documentText(): string {
  const rng = mulberry32(18);
  const subjects = ["The old mill", "A quiet river", "The town library", "Every spring the garden", "The night train"];
  const verbs = ["stands near", "runs past", "opens onto", "waits beside", "turns toward"];
  const objects = ["the stone bridge", "a field of barley", "the harbor wall", "the market square", "a row of pines"];
  const tails = ["in the morning light.", "while the bells ring.", "after the long winter.", "as the fog lifts."];
  const pick = (a: string[]) => a[Math.floor(rng() * a.length)]!;
  const sentences: string[] = [];
  for (let i = 0; i < 220; i++) sentences.push(`${pick(subjects)} ${pick(verbs)} ${pick(objects)} ${pick(tails)}`);
  sentences.splice(132, 0, NEEDLE);
  const paras: string[] = [];
  for (let i = 0; i < sentences.length; i += 6) paras.push(sentences.slice(i, i + 6).join(" "));
  return paras.join("\n\n") + "\n";
}

describe.skipIf(!chromiumPath)("web page in Chromium", () => {
  let srv: TestServer;
  let browser: Browser;
  let page: Page;
  const consoleErrors: string[] = [];

  beforeAll(async () => {
    srv = await startTestServer({ name: "webui", modelDir: MODEL, flags: ["--api-key", KEY, "--threads", "2"] });
    const { chromium } = await import("playwright-core");
    browser = await chromium.launch({
      executablePath: chromiumPath!,
      // as the machine notes ask: no background connections to hosts this closed network cannot reach
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
    page = await browser.newPage({ viewport: { width: 1360, height: 900 } });
    page.on("console", (m) => {
      if (m.type() === "error") consoleErrors.push(m.text());
    });
    page.on("pageerror", (e) => consoleErrors.push(String(e)));
  }, T);

  afterAll(async () => {
    await browser?.close();
    await srv?.stop();
  });

  test(
    "upload, ready, ask a needle question: streamed answer and the gathered passage",
    async () => {
      const doc = documentText();
      // gzip'ed: the page uploads its text (decompressed in the browser, so the byte offsets of a resume are the text's)
      const file = join(srv.root, "harbor-notes.txt.gz");
      writeFileSync(file, Bun.gzipSync(new TextEncoder().encode(doc)));

      // The page and its modules come from this server alone, without the key; the API needs it.
      const external: string[] = [];
      page.on("request", (r) => {
        if (!r.url().startsWith(srv.url)) external.push(r.url());
      });
      // Drop the connection of one upload piece (the third), to see the page resume where the server is.
      let puts = 0;
      await page.route(/\/content\?/, (route) => {
        if (route.request().method() === "PUT" && ++puts === 3) return route.abort("connectionreset");
        return route.continue();
      });

      await page.goto(`${srv.url}/?piece=2048`);
      await page.waitForSelector("#api-key", { timeout: 20_000 }); // 401 from the API: the key is asked for
      // no list yet: a loading state, not "no contexts" / "0 B on disk"
      expect(await page.locator("p.loading").count()).toBe(1);
      expect(await page.textContent("main")).not.toContain("No contexts yet");
      expect(await page.textContent("main")).not.toContain("on disk");
      // a key a request header cannot carry is refused in the dialog (it would break every request if stored)
      await page.fill("#api-key", "sékret✓");
      await page.click(".modal button[type=submit]");
      await page.waitForSelector(".modal .key-error");
      await page.fill("#api-key", KEY);
      await page.click(".modal button[type=submit]");
      await page.waitForSelector(".modal", { state: "detached" });
      // the first list arrives: the server has none yet
      await page.waitForSelector("text=No contexts yet", { timeout: 20_000 });
      expect(await page.textContent("main")).toContain("0 B on disk");
      await page.waitForSelector("header.top >> text=reform-tiny");

      // an empty file is refused on the page: no context is made for it
      const empty = join(srv.root, "empty.txt");
      writeFileSync(empty, "");
      await page.setInputFiles("#file", empty);
      await page.click("#upload");
      await page.waitForSelector(".upload-problem >> text=is empty");
      const none: Json = await (await fetch(`${srv.url}/v1/contexts`, { headers: { "x-api-key": KEY } })).json();
      expect(none.data).toEqual([]);

      await page.setInputFiles("#file", file);
      await page.click("#upload");
      const upload = page.locator(".upload");
      await upload.waitFor();
      // ready, as the page learns it from the events stream
      await page.waitForSelector('.upload[data-upload-state="ready"]', { timeout: 120_000 });
      const ctxId = (await upload.getAttribute("data-context"))!;
      await page.waitForSelector(`.ctx-row[data-id="${ctxId}"][data-state="ready"]`, { timeout: 20_000 });
      expect(await upload.locator(".stats").textContent()).toContain("tokens compressed");
      // the form is cleared once the context exists: a second click cannot upload the same file again
      expect(await page.inputValue("#file")).toBe("");
      expect(await page.isDisabled("#upload")).toBe(true);
      expect(puts).toBeGreaterThan(3); // several pieces, one of them dropped and sent again
      const info: Json = await (
        await fetch(`${srv.url}/v1/contexts/${ctxId}`, { headers: { "x-api-key": KEY } })
      ).json();
      expect(info.bytes_received).toBe(Buffer.byteLength(doc)); // nothing lost, nothing twice
      expect(info.metadata.name).toBe("harbor-notes.txt.gz");

      // every change of the answer's text, as the browser renders it
      // (runs in the page: its globals through globalThis, as this file is type-checked without the DOM's types)
      await page.evaluate(() => {
        const g = globalThis as Json;
        const seen: string[] = [];
        g.__answers = seen;
        new g.MutationObserver(() => {
          const a = g.document.querySelector(".turn:last-child .answer");
          if (a?.textContent && a.textContent !== seen.at(-1)) seen.push(a.textContent);
        }).observe(g.document.body, { subtree: true, childList: true, characterData: true });
      });
      await page.fill("#question", QUESTION);
      await page.click("#ask");
      await page.waitForSelector('.answer[data-done="true"]', { timeout: 120_000 });

      // The same request from here (greedy, so the same answer and the same selection), to check what the page shows.
      const props: Json = await (await fetch(`${srv.url}/props`, { headers: { "x-api-key": KEY } })).json();
      const same: Json = await (
        await fetch(`${srv.url}/v1/contexts/${ctxId}/query`, {
          method: "POST",
          headers: { "x-api-key": KEY, "content-type": "application/json" },
          body: JSON.stringify({
            messages: [{ role: "user", content: QUESTION }],
            method: "reform",
            budget: props.limits.budget,
            max_tokens: props.limits.max_tokens,
            stream: false,
            return_selection: true,
          }),
        })
      ).json();

      // streamed token by token: the page received several token events and showed the text growing, each
      // rendering a prefix of the next, ending with the whole answer
      const answer = (await page.locator(".answer").textContent()) ?? "";
      expect(answer).toBe(same.text);
      expect(answer.trim().length).toBeGreaterThan(0);
      expect(Number(await page.locator(".answer").getAttribute("data-tokens"))).toBeGreaterThan(1);
      const seen: string[] = await page.evaluate(() => (globalThis as Json).__answers);
      expect(seen.length).toBeGreaterThan(1);
      for (let i = 1; i < seen.length; i++) expect(seen[i]!.startsWith(seen[i - 1]!)).toBe(true);
      expect(seen.at(-1)).toBe(answer);
      expect(await page.locator(".turn .usage").textContent()).toMatch(/tokens/);

      // what REFORM gathered: passages in document order, the strip chart, the needle among the highlighted text
      const spans = same.selection.spans as { start: number; end: number; text: string }[];
      const passages = page.locator(".passage");
      expect(await passages.count()).toBe(spans.length);
      const bounds = await passages.evaluateAll((els) =>
        els.map((e) => [Number(e.getAttribute("data-start")), Number(e.getAttribute("data-end"))]),
      );
      expect(bounds).toEqual(spans.map((s) => [s.start, s.end]));
      for (let i = 0; i < bounds.length; i++) {
        expect(bounds[i]![0]!).toBeLessThan(bounds[i]![1]!);
        if (i > 0) expect(bounds[i]![0]!).toBeGreaterThan(bounds[i - 1]![1]!);
      }
      expect(await page.locator("svg.strip .band").count()).toBe(spans.length);
      expect(await page.locator("svg.strip .score").count()).toBe(same.selection.profile.buckets);
      // Where the answer came from: the best passage (highest smoothed score, highlighted as such) lies on the needle
      // sentence, and its text is the document's own text at the place it names. (With reform-tiny's interim
      // weights the selection is fragmented, budget 320 of ~3,400 tokens in runs of a few tokens: the needle's key
      // phrase is gathered, its value not always; the log line says which.)
      const docBytes = new TextEncoder().encode(doc);
      const needleStart = Buffer.byteLength(doc.slice(0, doc.indexOf(NEEDLE)));
      const needleEnd = needleStart + Buffer.byteLength(NEEDLE);
      const bestStart = Number(await page.locator(".passage.best").getAttribute("data-start"));
      const best = same.selection.spans.find((s: { start: number }) => s.start === bestStart);
      const bestText = (await page.locator(".passage.best mark").textContent()) ?? "";
      expect(bestText).toBe(best.text);
      expect(new TextDecoder().decode(docBytes.subarray(best.byte_start, best.byte_end))).toBe(best.text);
      const marked = (await page.locator(".passage mark").allTextContents()).join(" ");
      console.log(
        `[webui.test] answer ${JSON.stringify(answer)}; ${spans.length} passages; best ${JSON.stringify(bestText)} ` +
          `at bytes ${best.byte_start}-${best.byte_end}, needle at ${needleStart}-${needleEnd}; whole needle sentence ` +
          `highlighted: ${spans.some((s) => s.text.includes(NEEDLE))}`,
      );
      expect(best.byte_start).toBeLessThan(needleEnd);
      expect(best.byte_end).toBeGreaterThan(needleStart);
      expect(marked).toContain("silver-harbor");

      mkdirSync(join(ROOT, "test-output"), { recursive: true });
      await page.locator(".passage.best").scrollIntoViewIfNeeded();
      await page.screenshot({ path: SHOT, fullPage: true });

      // keyboard only: another context (made through the API) is picked with Tab focus and Enter
      const other: Json = await (
        await fetch(`${srv.url}/v1/contexts`, {
          method: "POST",
          headers: { "x-api-key": KEY, "content-type": "application/json" },
          body: JSON.stringify({ metadata: { name: "second-notes" } }),
        })
      ).json();
      await fetch(`${srv.url}/v1/contexts/${other.id}/content?final=true`, {
        method: "PUT",
        headers: { "x-api-key": KEY, "content-type": "text/plain" },
        body: doc.slice(0, 3000),
      });
      const otherRow = `.ctx-row[data-id="${other.id}"][data-state="ready"]`;
      await page.waitForSelector(otherRow, { timeout: 20_000 }); // the list refreshes every few seconds
      await page.focus(otherRow);
      await page.keyboard.press("Enter");
      await page.waitForSelector(".ask h2 >> text=second-notes");
      // streaming gathers no passages: the page says what it kept instead of an empty chart
      await page.selectOption("#method", "streaming");
      await page.fill("#question", QUESTION);
      await page.keyboard.press("Enter");
      await page.waitForSelector('.turn:last-child .answer[data-done="true"]', { timeout: 120_000 });
      expect(await page.locator(".turn:last-child svg.strip").count()).toBe(0);
      expect(await page.locator(".turn:last-child .selection").textContent()).toContain("attention sinks");
      // a finished upload's card closes
      await page.click(".upload button.close");
      await page.waitForSelector(".upload", { state: "detached" });

      // delete through the page
      page.once("dialog", (d) => d.accept());
      await page.click(`.ctx-row[data-id="${ctxId}"] .delete`);
      await page.waitForSelector(`.ctx-row[data-id="${ctxId}"]`, { state: "detached" });
      const list: Json = await (await fetch(`${srv.url}/v1/contexts`, { headers: { "x-api-key": KEY } })).json();
      expect(list.data.map((c: { id: string }) => c.id)).not.toContain(ctxId);

      expect(external).toEqual([]);
      // the one console error allowed is the browser's report of the 401 that made the page ask for the key
      expect(consoleErrors.filter((e) => !/401|Failed to load resource/.test(e))).toEqual([]);
    },
    T,
  );
});
