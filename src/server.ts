/**
 * startServer: starts listening at once (GET /health answers 503 while the model loads) and loads
 * the engine in the background. Upload, SSE and generation requests have no idle timeout.
 */
import type { Server } from "bun";
import { createApp, isLongRequest } from "../routes/app.ts";
import { defaultLogger, type Logger } from "../routes/errors.ts";
import type { EngineClient } from "./engine/api.ts";
import type { EngineOptions } from "./engine/client.ts";

export interface ServerOptions {
  modelDir: string;
  dataDir: string;
  host?: string; // default 127.0.0.1
  port?: number; // default 8080; 0 = any free port
  apiKey?: string; // default env REFORM_API_KEY; "" = no auth
  /** Largest single content upload (bytes); default 64 GiB. */
  maxBodyBytes?: number;
  /** Largest JSON request body (bytes); default 32 MiB. */
  maxJsonBytes?: number;
  /** Seconds a quiet ordinary connection may stay open (Bun caps it at 255); default 120. */
  idleTimeoutSec?: number;
  backend?: "auto" | "cpu" | "cuda";
  servedName?: string;
  /** Head-selection file (JSON) overriding the model dir's reform_heads.json. */
  heads?: string;
  corsOrigin?: string;
  logRequests?: boolean;
  log?: Logger;
  /** Extra options passed through to createEngine (threads, defaults...). */
  engine?: Partial<EngineOptions>;
  /** Use this engine instead of creating one (tests). */
  engineClient?: EngineClient;
}

export interface RunningServer {
  url: string;
  server: Server<unknown>;
  engine: EngineClient;
  stop(): Promise<void>;
}

export const DEFAULT_MAX_BODY_BYTES = 64 * 1024 ** 3;

export async function startServer(opts: ServerOptions): Promise<RunningServer> {
  const log = opts.log ?? defaultLogger;
  const engine =
    opts.engineClient ??
    (await import("./engine/client.ts")).createEngine({
      modelDir: opts.modelDir,
      dataDir: opts.dataDir,
      backend: opts.backend,
      servedName: opts.servedName,
      heads: opts.heads,
      ...(opts.engine ?? {}),
    });

  const maxBodyBytes = opts.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
  const maxJsonBytes = opts.maxJsonBytes ?? 32 << 20;
  const app = createApp(engine, {
    apiKey: opts.apiKey,
    maxBodyBytes,
    maxJsonBytes,
    servedName: opts.servedName,
    corsOrigin: opts.corsOrigin,
    logRequests: opts.logRequests,
    log,
  });

  const server = Bun.serve({
    hostname: opts.host ?? "127.0.0.1",
    port: opts.port ?? 8080,
    // The app enforces its own limits (JSON 413s); Bun's cap only has to stay above them.
    maxRequestBodySize: Math.max(maxBodyBytes, maxJsonBytes) + 1024 * 1024,
    idleTimeout: Math.min(255, Math.max(1, opts.idleTimeoutSec ?? 120)),
    fetch(req, srv) {
      const path = new URL(req.url).pathname;
      if (isLongRequest(req.method, path)) srv.timeout(req, 0);
      return app.fetch(req, srv);
    },
    error(err) {
      log("error", "unhandled server error", err.stack ?? err.message);
      return new Response(
        JSON.stringify({ error: { message: "internal server error", type: "server_error", param: null, code: "internal_error" } }),
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
      server.stop(true);
      await engine.close();
    },
  };
}
