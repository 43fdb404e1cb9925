/**
 * The web page at `/` (web/): upload a document, watch it compress, ask about it and see what REFORM gathered.
 * Its files and the few ES modules it imports from npm packages (preact, htm, eventsource-parser: dependencies of
 * this server, so nothing comes from a CDN) are read once, here, into memory and served from a fixed table:
 * no path from a request ever reaches the file system. The page holds no data of its own, so these GETs need no
 * API key (routes/app.ts lets them through); everything it shows comes from the API with the key the user gives.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { Hono } from "hono";

/** URL prefix of the page's assets. */
export const WEB_PREFIX = "/ui/";

const WEB_DIR = join(import.meta.dir, "..", "web");

const TYPES: Record<string, string> = {
  html: "text/html; charset=utf-8",
  js: "text/javascript; charset=utf-8",
  mjs: "text/javascript; charset=utf-8",
  css: "text/css; charset=utf-8",
  png: "image/png",
};

/** asset path under /ui/ -> file on disk; the vendor modules are resolved like any import of this server */
function assetTable(): Map<string, string> {
  const dep = (spec: string) => Bun.resolveSync(spec, import.meta.dir);
  const parser = dep("eventsource-parser/stream");
  const parserDir = join(parser, "..");
  return new Map([
    ["app.js", join(WEB_DIR, "app.js")],
    ["style.css", join(WEB_DIR, "style.css")],
    ["vendor/preact.mjs", dep("preact")],
    ["vendor/hooks.mjs", dep("preact/hooks")],
    ["vendor/htm.mjs", dep("htm")],
    // stream.js imports ./parse.js, which imports ./errors.js: the package's own files side by side
    ["vendor/eventsource-parser/stream.js", parser],
    ["vendor/eventsource-parser/parse.js", join(parserDir, "parse.js")],
    ["vendor/eventsource-parser/errors.js", join(parserDir, "errors.js")],
  ]);
}

interface Asset {
  body: Uint8Array;
  type: string;
}

let cached: { index: Asset; assets: Map<string, Asset>; csp: string } | null = null;

function load() {
  if (cached) return cached;
  const read = (file: string): Asset => ({
    body: new Uint8Array(readFileSync(file)),
    type: TYPES[file.slice(file.lastIndexOf(".") + 1)] ?? "application/octet-stream",
  });
  const assets = new Map<string, Asset>();
  for (const [name, file] of assetTable()) assets.set(name, read(file));
  const index = read(join(WEB_DIR, "index.html"));
  // the page talks to this server only; its one inline script, the import map, is allowed by its hash
  const m = /<script type="importmap">([\s\S]*?)<\/script>/.exec(new TextDecoder().decode(index.body));
  const mapHash = m ? new Bun.CryptoHasher("sha256").update(m[1]!).digest("base64") : "";
  const csp =
    `default-src 'self'; script-src 'self'${mapHash ? ` 'sha256-${mapHash}'` : ""}; style-src 'self'; ` +
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; frame-ancestors 'none'";
  cached = { index, assets, csp };
  return cached;
}

/** Whether a request is for the page (open without an API key, like /health). */
export function isWebPath(method: string, path: string): boolean {
  return (method === "GET" || method === "HEAD") && (path === "/" || path.startsWith(WEB_PREFIX));
}

function send(a: Asset, csp: string): Response {
  return new Response(a.body, {
    headers: {
      "content-type": a.type,
      "cache-control": "no-cache",
      "x-content-type-options": "nosniff",
      "content-security-policy": csp,
    },
  });
}

export function webRoutes(): Hono {
  const { index, assets, csp } = load();
  const r = new Hono();
  r.get("/", () => send(index, csp));
  r.get(`${WEB_PREFIX}:path{.+}`, (c) => {
    const a = assets.get(c.req.param("path"));
    return a ? send(a, csp) : c.notFound();
  });
  return r;
}
