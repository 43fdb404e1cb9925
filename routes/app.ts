/**
 * The HTTP API of the REFORM server (Hono). `createApp(engine, opts)` wires:
 *   /health, /metrics                       ops.ts
 *   /v1/contexts...                         contexts.ts (upload, progress SSE), query.ts
 *   /v1/chat/completions, /v1/models        openai.ts
 *   /v1/completions, /v1/tokenize, /v1/detokenize
 *   /, /ui/...                              web.ts (the web page and its modules; open like /health)
 * Errors are OpenAI-style JSON (errors.ts); unknown routes answer 404, known routes with the
 * wrong method 405 (with an Allow header). What is known about each route (metrics label, methods,
 * idle timeout) comes from the handlers registered here (table.ts), never from a second list.
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
import { RouteTable } from "./table.ts";
import { bearer } from "./util.ts";
import type { AppOptions, Deps } from "./types.ts";
import { isWebPath, webRoutes } from "./web.ts";

export type { AppOptions } from "./types.ts";
export { HttpStats } from "./metrics.ts";
export type { RouteInfo } from "./table.ts";

/**
 * The idle-timeout rule, for every registered route: a request may stay open long (Bun's idle timeout off,
 * see src/server.ts) when it can wait for the engine or stream. Every POST/PUT does engine work that queues
 * behind uploads and generations (or streams an upload or an answer); of the GET routes only the event
 * streams do. The rest answer from memory at once and keep the timeout.
 */
const STREAMING_GETS = new Set(["/v1/contexts/:id/events"]);
export function mayStayOpen(method: string, route: string): boolean {
  return method === "POST" || method === "PUT" || (method === "GET" && STREAMING_GETS.has(route));
}

/** The Hono app and the metadata of its routes (the server needs the idle-timeout rule before dispatch). */
export interface ReformApp {
  app: Hono;
  routes: RouteTable;
}

function digest(s: string): Buffer {
  return createHash("sha256").update(s).digest();
}

export function createApp(engine: EngineClient, options: AppOptions): ReformApp {
  const log = options.log ?? defaultLogger;
  const stats = new HttpStats();
  const d: Deps = {
    engine,
    stats,
    log,
    opts: {
      apiKey: options.apiKey || undefined,
      servedName: options.servedName,
      maxBodyBytes: options.maxBodyBytes,
      maxJsonBytes: options.maxJsonBytes,
      corsOrigin: options.corsOrigin ?? "",
      sseHeartbeatSec: options.sseHeartbeatSec ?? 15,
      listContextModels: options.listContextModels ?? true,
      inline: options.inline ?? true,
      generationConfig: options.generationConfig ?? "auto",
      logRequests: options.logRequests ?? false,
    },
  };
  const keyDigest = d.opts.apiKey ? digest(d.opts.apiKey) : null;

  const app = new Hono();
  // Filled in from the registered handlers once they are all mounted (below); the middleware reads it per request.
  let routes: RouteTable | null = null;
  const routeOf = (path: string, method?: string) => routes?.match(path, method) ?? null;

  // Accounting + access log (outermost, so it sees every final status).
  app.use("*", async (c, next) => {
    const t0 = performance.now();
    stats.inFlight.inc();
    try {
      await next();
    } finally {
      stats.inFlight.dec();
      const path = c.req.path;
      const route = routeOf(path, c.req.method)?.route ?? "unmatched";
      const status = c.res?.status ?? 500;
      stats.countRequest(c.req.method, route, status);
      if (d.opts.logRequests) {
        log("info", `${c.req.method} ${path} ${status} ${(performance.now() - t0).toFixed(1)}ms`);
      }
    }
  });

  // Cross-origin access is off unless origins are named: a page on another site must not be able to drive a
  // server on localhost. "*" allows any origin (only sensible together with an API key).
  if (d.opts.corsOrigin) {
    const origins = d.opts.corsOrigin
      .split(",")
      .map((o) => o.trim())
      .filter(Boolean);
    app.use(
      "*",
      cors({
        origin: origins.includes("*") ? "*" : origins,
        allowMethods: () => [...new Set(routes?.all.flatMap((r) => r.methods))],
        // No fixed list: the preflight's Access-Control-Request-Headers are echoed (hono/cors does so when
        // allowHeaders is empty), because SDK clients send headers of their own (the openai JS client: the
        // x-stainless-* family, which grows with its versions). Only a named origin gets an
        // Access-Control-Allow-Origin, so for every other page the preflight still fails.
        exposeHeaders: ["location", "x-reform-inline", "x-reform-context-id"],
        maxAge: 600,
      }),
    );
  }

  // Bearer-token auth (everything but /health, the web page's static files and CORS preflights).
  app.use("*", async (c, next) => {
    if (!keyDigest || c.req.method === "OPTIONS") return next();
    if (c.req.path === "/health" || isWebPath(c.req.method, c.req.path)) return next();
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
    if (!routeOf(c.req.path)) return next(); // let 404 win over 503
    if (state === "loading") {
      return jsonError(503, "model_loading", "the model is still loading; retry shortly", null, { "retry-after": "5" });
    }
    return jsonError(503, "engine_failed", `the engine failed to start: ${engine.loadError() ?? "unknown error"}`);
  });

  app.route("/", opsRoutes(d));
  app.route("/", webRoutes());
  app.route("/v1", openaiRoutes(d));
  app.route("/v1/contexts", queryRoutes(d));
  app.route("/v1/contexts", contextRoutes(d));
  routes = new RouteTable(app.routes, mayStayOpen);

  app.notFound((c) => {
    const path = c.req.path;
    const r = routeOf(path, c.req.method);
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

  return { app, routes };
}

export type { Deps } from "./types.ts";
