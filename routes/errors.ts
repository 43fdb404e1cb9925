/**
 * OpenAI-style errors: every failure answers `{error: {message, type, param, code}}` with the
 * right HTTP status. Route code throws `ApiError` (or lets an `EngineError` / `ZodError` escape);
 * `toErrorResponse` turns any of them into a Response. Only real faults become 5xx, and those are
 * logged with their stack.
 */
import { z } from "zod";
import { EngineError } from "../src/engine/api.ts";
import { describeZodError } from "../src/engine/schema.ts";

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly param: string | null = null,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
    this.name = "ApiError";
  }
}

export interface ErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null };
}

export function errorType(status: number): string {
  if (status === 401) return "authentication_error";
  if (status === 403) return "permission_error";
  if (status === 429) return "rate_limit_error";
  if (status === 503) return "service_unavailable";
  if (status >= 500) return "server_error";
  return "invalid_request_error";
}

export function errorBody(
  status: number,
  code: string | null,
  message: string,
  param: string | null = null,
): ErrorBody {
  return { error: { message, type: errorType(status), param, code } };
}

export function jsonError(
  status: number,
  code: string | null,
  message: string,
  param: string | null = null,
  headers: Record<string, string> = {},
): Response {
  return new Response(JSON.stringify(errorBody(status, code, message, param)), {
    status,
    headers: { "content-type": "application/json; charset=utf-8", ...headers },
  });
}

export function fromZod(err: z.ZodError, prefix?: string): ApiError {
  const { param, message } = describeZodError(err, prefix);
  return new ApiError(400, "invalid_value", message, param);
}

export type Logger = (level: "info" | "warn" | "error", msg: string, extra?: unknown) => void;

export const defaultLogger: Logger = (level, msg, extra) => {
  const line = `[${new Date().toISOString()}] ${level.toUpperCase()} ${msg}`;
  if (level === "error") console.error(line, extra ?? "");
  else if (level === "warn") console.warn(line, extra ?? "");
  else console.log(line, extra === undefined ? "" : extra);
};

/** Maps anything thrown by a handler to an OpenAI-style error response. */
export function toErrorResponse(err: unknown, log: Logger = defaultLogger, where = ""): Response {
  if (err instanceof ApiError) {
    return jsonError(err.status, err.code, err.message, err.param, err.headers);
  }
  if (err instanceof EngineError || isEngineErrorLike(err)) {
    const e = err as EngineError;
    const status = Number.isInteger(e.status) && e.status >= 400 && e.status <= 599 ? e.status : 500;
    // 503s are the server's state (loading, shutting down, out of memory: the client retries), not its faults
    if (status === 503) log("warn", `engine error ${where}: ${e.code}: ${e.message}`);
    else if (status >= 500) log("error", `engine error ${where}: ${e.code}: ${e.message}`, e.stack);
    return jsonError(status, e.code ?? null, e.message, e.param ?? null);
  }
  if (err instanceof z.ZodError) {
    const e = fromZod(err);
    return jsonError(e.status, e.code, e.message, e.param);
  }
  if (err instanceof SyntaxError) {
    return jsonError(400, "invalid_json", `malformed JSON body: ${err.message}`);
  }
  log("error", `internal error ${where}`, err instanceof Error ? (err.stack ?? err.message) : err);
  return jsonError(500, "internal_error", "internal server error");
}

/** EngineError may be rebuilt on the other side of a worker boundary: accept the shape too. */
function isEngineErrorLike(err: unknown): boolean {
  return (
    typeof err === "object" &&
    err !== null &&
    (err as { name?: unknown }).name === "EngineError" &&
    typeof (err as { status?: unknown }).status === "number" &&
    typeof (err as { code?: unknown }).code === "string"
  );
}
