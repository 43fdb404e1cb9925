import type { GenerationConfigMode } from "../src/config.ts";
import type { EngineClient } from "../src/engine/api.ts";
import type { Logger } from "./errors.ts";
import type { HttpStats } from "./metrics.ts";

export interface AppOptions {
  /** Bearer token required on every route but /health (and CORS preflights); undefined or "" = no auth. */
  apiKey?: string;
  /** Largest body of one content upload request (bytes). */
  maxBodyBytes: number;
  /** Largest JSON body (queries, chat) in bytes. */
  maxJsonBytes: number;
  /** Name reported by /v1/models and in chat responses; default: the engine's model id. */
  servedName?: string;
  /** Origins allowed cross-origin, comma-separated ("*" = any); "" or absent: same-origin only. */
  corsOrigin?: string;
  /** Seconds between SSE keep-alive comments; default 15. */
  sseHeartbeatSec?: number;
  /** Answer OpenAI requests whose prompt exceeds the window with REFORM (inline contexts); default true. */
  inline?: boolean;
  /** OpenAI requests' left-out sampling fields: the model's generation_config.json ("auto", default) or OpenAI's. */
  generationConfig?: GenerationConfigMode;
  /** List ready contexts in /v1/models as `context:<id>` (chat frontends can then pick one). */
  listContextModels?: boolean;
  /** Log each request (method, path, status, ms). Default false. */
  logRequests?: boolean;
  log?: Logger;
}

export interface Deps {
  engine: EngineClient;
  opts: Required<Omit<AppOptions, "apiKey" | "servedName" | "log">> & { apiKey?: string; servedName?: string };
  stats: HttpStats;
  log: Logger;
}
