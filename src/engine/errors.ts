/** Maps anything thrown inside the engine to the EngineError callers see (with its HTTP status). */
import { NativeError, RF_ERR_OOM } from "../../ffi/native.ts";
import { EngineError } from "./api.ts";

export function toEngineError(e: unknown): EngineError {
  if (e instanceof EngineError) return e;
  const msg = e instanceof Error ? e.message : String(e);
  // Out of (device) memory is a capacity problem, not a bug: 503 so clients retry later or ask for less.
  if (e instanceof NativeError && e.code === RF_ERR_OOM) return new EngineError(503, "insufficient_memory", msg);
  return new EngineError(500, "internal_error", msg);
}

export function contextNotFound(id: string): EngineError {
  return new EngineError(404, "context_not_found", `context '${id}' not found`, "context_id");
}

/** For requests that were waiting on a context when it was deleted. */
export function contextDeleted(id: string): EngineError {
  return new EngineError(
    410,
    "context_deleted",
    `context '${id}' was deleted; its pending work was cancelled`,
    "context_id",
  );
}
