/**
 * The HTTP API of the REFORM server (Hono). `createApp(engine, opts)` wires:
 *   /health, /metrics                       ops.ts
 *   /v1/contexts...                         contexts.ts (upload, progress SSE), query.ts
 *   /v1/chat/completions, /v1/models        openai.ts
 * Errors are OpenAI-style JSON (errors.ts); unknown routes answer 404, known routes with the
 * wrong method 405 (with an Allow header).
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { Hono } from "hono";
import { cors } from "hono/cors";
import type { EngineClient } from "../src/engine/api.ts";
import { contextRoutes } from "./contexts.ts";
import { ApiError, defaultLogger, jsonError, toErrorResponse } from "./errors.ts";
import { HttpStats } from "./metrics.ts";
import { openaiRoutes } from "./openai.ts";
import { opsRoutes } from "./ops.ts";
import { queryRoutes } from "./query.ts";
import type { AppOptions, Deps } from "./types.ts";

export type { AppOptions } from "./types.ts";
export { HttpStats } from "./metrics.ts";

/** Route table: labels for metrics and the 404-vs-405 decision. */
const ROUTES: { re: RegExp; route: string; methods: string[] }[] = [
  { re: /^\/health\/?$/, route: "/health", methods: ["GET", "HEAD"] },
  { re: /^\/metrics\/?$/, route: "/metrics", methods: ["GET", "HEAD"] },
  { re: /^\/v1\/models\/?$/, route: "/v1/models", methods: ["GET", "HEAD"] },
  { re: /^\/v1\/models\/.+$/, route: "/v1/models/:model", methods: ["GET", "HEAD"] },
  { re: /^\/v1\/chat\/completions\/?$/, route: "/v1/chat/completions", methods: ["POST"] },
  { re: /^\/v1\/contexts\/?$/, route: "/v1/contexts", methods: ["GET", "HEAD", "POST"] },
  { re: /^\/v1\/contexts\/[^/]+\/?$/, route: "/v1/contexts/:id", methods: ["GET", "HEAD", "DELETE"] },
  { re: /^\/v1\/contexts\/[^/]+\/content\/?$/, route: "/v1/contexts/:id/content", methods: ["PUT", "POST"] },
  { re: /^\/v1\/contexts\/[^/]+\/finalize\/?$/, route: "/v1/contexts/:id/finalize", methods: ["POST"] },
  { re: /^\/v1\/contexts\/[^/]+\/events\/?$/, route: "/v1/contexts/:id/events", methods: ["GET"] },
  { re: /^\/v1\/contexts\/[^/]+\/query\/?$/, route: "/v1/contexts/:id/query", methods: ["POST"] },
];

export function routeOf(path: string): { route: string; methods: string[] } | null {
  for (const r of ROUTES) if (r.re.test(path)) return r;
  return null;
}

/** Paths whose requests may legitimately stay open for long (uploads, SSE, long generations). */
export function isLongRequest(method: string, path: string): boolean {
  return (
    /^\/v1\/contexts\/[^/]+\/(content|events|query|finalize)\/?$/.test(path) ||
    (method === "POST" && /^\/v1\/chat\/completions\/?$/.test(path))
  );
}

function digest(s: string): Buffer {
  return createHash("sha256").update(s).digest();
}

function bearer(req: Request): string | null {
  const h = req.headers.get("authorization");
  if (h) {
    const m = /^Bearer\s+(.+)$/i.exec(h.trim());
    return m ? m[1]!.trim() : null;
  }
  return req.headers.get("x-api-key");
}

export function createApp(engine: EngineClient, options: AppOptions): Hono {
  const log = options.log ?? defaultLogger;
  const apiKey = options.apiKey !== undefined ? options.apiKey : process.env.REFORM_API_KEY;
  const stats = new HttpStats();
  const d: Deps = {
    engine,
    stats,
    log,
    opts: {
      apiKey: apiKey || undefined,
      servedName: options.servedName,
      maxBodyBytes: options.maxBodyBytes,
      maxJsonBytes: options.maxJsonBytes ?? 32 << 20,
      corsOrigin: options.corsOrigin ?? "*",
      sseHeartbeatSec: options.sseHeartbeatSec ?? 15,
      listContextModels: options.listContextModels ?? true,
      logRequests: options.logRequests ?? false,
    },
  };
  const keyDigest = d.opts.apiKey ? digest(d.opts.apiKey) : null;

  const app = new Hono();

  // Accounting + access log (outermost, so it sees every final status).
  app.use("*", async (c, next) => {
    const t0 = performance.now();
    stats.inFlight++;
    try {
      await next();
    } finally {
      stats.inFlight--;
      const path = new URL(c.req.url).pathname;
      const route = routeOf(path)?.route ?? "unmatched";
      const status = c.res?.status ?? 500;
      stats.countRequest(c.req.method, route, status);
      if (d.opts.logRequests) {
        log("info", `${c.req.method} ${path} ${status} ${(performance.now() - t0).toFixed(1)}ms`);
      }
    }
  });

  if (d.opts.corsOrigin) {
    app.use(
      "*",
      cors({
        origin: d.opts.corsOrigin,
        allowMethods: ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"],
        allowHeaders: ["authorization", "content-type", "x-api-key", "x-reform-final"],
        exposeHeaders: ["location"],
        maxAge: 600,
      }),
    );
  }

  // Bearer-token auth (everything but /health and CORS preflights).
  app.use("*", async (c, next) => {
    if (!keyDigest || c.req.method === "OPTIONS") return next();
    const path = new URL(c.req.url).pathname;
    if (/^\/health\/?$/.test(path)) return next();
    const token = bearer(c.req.raw);
    if (!token || !timingSafeEqual(digest(token), keyDigest)) {
      return jsonError(
        401,
        token ? "invalid_api_key" : "missing_api_key",
        token ? "invalid API key" : "missing API key: send 'Authorization: Bearer <key>'",
        null,
        { "www-authenticate": 'Bearer realm="reform"' },
      );
    }
    return next();
  });

  // The API needs the model: 503 while it loads (or if it failed to).
  app.use("/v1/*", async (c, next) => {
    const state = engine.state();
    if (state === "ready") return next();
    const path = new URL(c.req.url).pathname;
    if (!routeOf(path)) return next(); // let 404 win over 503
    if (state === "loading") {
      return jsonError(503, "model_loading", "the model is still loading; retry shortly", null, { "retry-after": "5" });
    }
    return jsonError(503, "engine_failed", `the engine failed to start: ${engine.loadError() ?? "unknown error"}`);
  });

  app.route("/", opsRoutes(d));
  app.route("/v1", openaiRoutes(d));
  app.route("/v1/contexts", queryRoutes(d));
  app.route("/v1/contexts", contextRoutes(d));

  app.notFound((c) => {
    const path = new URL(c.req.url).pathname;
    const r = routeOf(path);
    if (r && !r.methods.includes(c.req.method)) {
      return jsonError(405, "method_not_allowed", `method ${c.req.method} is not allowed on ${r.route}`, null, {
        allow: r.methods.join(", "),
      });
    }
    return jsonError(404, "not_found", `no route for ${c.req.method} ${path}`);
  });

  app.onError((err, c) => {
    if (err instanceof ApiError && err.status === 499) return new Response(null, { status: 499 });
    return toErrorResponse(err, log, `${c.req.method} ${new URL(c.req.url).pathname}`);
  });

  return app;
}

/** Stats object of an app made by createApp (for tests and the server). */
export type { Deps } from "./types.ts";
