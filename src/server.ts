/**
 * startServer: starts listening at once (GET /health answers 503 while the model loads) and loads
 * the engine in the background. Upload, SSE and generation requests have no idle timeout.
 */
import type { Server } from "bun";
import { createApp } from "../routes/app.ts";
import { defaultLogger, type Logger } from "../routes/errors.ts";
import { DEFAULTS, type ServerConfig } from "./config.ts";
import type { EngineClient } from "./engine/api.ts";

/** How long a stopping server lets its requests in flight finish once the engine has closed, in ms. */
const CLOSE_GRACE_MS = 2000;

/** A ServerConfig (src/config.ts) in which everything but the model and data folders may be left out. */
export interface ServerOptions extends Partial<Omit<ServerConfig, "modelDir" | "dataDir">> {
  modelDir: string;
  dataDir: string;
  log?: Logger;
  /** Seconds between SSE keep-alive comments (and kept-alive JSON newlines); default 15. */
  sseHeartbeatSec?: number;
  /** Use this engine instead of creating one (tests). */
  engineClient?: EngineClient;
}

export interface RunningServer {
  url: string;
  server: Server<unknown>;
  engine: EngineClient;
  stop(): Promise<void>;
}

export async function startServer(opts: ServerOptions): Promise<RunningServer> {
  const log = opts.log ?? defaultLogger;
  const engine =
    opts.engineClient ??
    (await import("./engine/client.ts")).createEngine({
      modelDir: opts.modelDir,
      dataDir: opts.dataDir,
      backend: opts.backend ?? DEFAULTS.backend,
      library: opts.library,
      servedName: opts.servedName,
      heads: opts.heads,
      threads: opts.threads,
      defaults: opts.defaults,
      allowBeyondWindow: opts.allowBeyondWindow,
    });

  const maxBodyBytes = opts.maxBodyBytes ?? DEFAULTS.maxBodyBytes;
  const maxJsonBytes = opts.maxJsonBytes ?? DEFAULTS.maxJsonBytes;
  const { app, routes } = createApp(engine, {
    apiKey: opts.apiKey,
    maxBodyBytes,
    maxJsonBytes,
    servedName: opts.servedName,
    corsOrigin: opts.corsOrigin ?? DEFAULTS.corsOrigin,
    logRequests: opts.logRequests,
    inline: opts.inline ?? true,
    generationConfig: opts.generationConfig ?? "auto",
    ...(opts.sseHeartbeatSec !== undefined ? { sseHeartbeatSec: opts.sseHeartbeatSec } : {}),
    log,
  });

  const server = Bun.serve({
    hostname: opts.host ?? DEFAULTS.host,
    port: opts.port ?? DEFAULTS.port,
    // The app enforces its own limits with OpenAI-shaped 413s (declared length first, then counted bytes);
    // Bun's own cap would answer first with a bare 413, so it is out of the way.
    maxRequestBodySize: Number.MAX_SAFE_INTEGER,
    idleTimeout: Math.min(255, Math.max(1, opts.idleTimeoutSec ?? DEFAULTS.idleTimeoutSec)),
    fetch(req, srv) {
      // Decided before dispatch: a queued upload or generation must not be cut off while it waits.
      if (routes.isLong(req.method, new URL(req.url).pathname)) srv.timeout(req, 0);
      return app.fetch(req, srv);
    },
    error(err) {
      log("error", "unhandled server error", err.stack ?? err.message);
      return new Response(
        JSON.stringify({
          error: { message: "internal server error", type: "server_error", param: null, code: "internal_error" },
        }),
        { status: 500, headers: { "content-type": "application/json" } },
      );
    },
  });

  const url = `http://${server.hostname?.includes(":") ? `[${server.hostname}]` : server.hostname}:${server.port}`;
  engine.ready().then(
    () => {
      const info = engine.modelInfo();
      log("info", `engine ready: ${info?.id ?? "model"} on ${info?.backend ?? "?"} (${info?.device ?? "?"})`);
    },
    (err) => log("error", `engine failed to load: ${engine.loadError() ?? (err as Error)?.message ?? err}`),
  );

  let stopped = false;
  return {
    url,
    server,
    engine,
    async stop() {
      if (stopped) return;
      stopped = true;
      // No new connections; the requests in flight are answered first: an upload whose writes the closing engine
      // refuses gets its 503 shutting_down with the byte count to resume from, then the stragglers (event streams
      // that follow a context, generations) are cut after CLOSE_GRACE_MS.
      server.stop(false);
      await engine.close();
      const until = performance.now() + CLOSE_GRACE_MS;
      while (server.pendingRequests > 0 && performance.now() < until) await Bun.sleep(10);
      server.stop(true);
    },
  };
}
