/**
 * The messages between the HTTP thread (client.ts) and the engine worker (worker.ts), derived from the
 * EngineClient contract: an operation's name, arguments and result are those of its EngineClient
 * method, so the client proxy, the worker's dispatch and the core cannot drift apart (tsc checks all three).
 */
import type { ContextInfo, EngineClient, EngineMetrics, ModelInfo, QueryEvent } from "./api.ts";
import type { EngineOptions } from "./load.ts";
import type { QueryWire } from "./schema.ts";

/** The request/response operations of EngineClient (queries stream and go by their own messages). */
export type CallName =
  | "createContext"
  | "append"
  | "finalize"
  | "getContext"
  | "listContexts"
  | "deleteContext"
  | "countTokens"
  | "tokenize"
  | "detokenize"
  | "close";

type Ops = Pick<EngineClient, CallName>;
export type CallArgs<K extends CallName> = Parameters<Ops[K]>;
export type CallResult<K extends CallName> = Awaited<ReturnType<Ops[K]>>;

/** What the worker side implements: each operation may answer synchronously or with a promise. */
export type EngineCalls = { [K in CallName]: (...args: CallArgs<K>) => CallResult<K> | Promise<CallResult<K>> };

export type CallMessage = { [K in CallName]: { t: "call"; id: number; op: K; args: CallArgs<K> } }[CallName];

export interface WireError {
  status: number;
  code: string;
  message: string;
  param: string | null;
}

export type ToWorker =
  | { t: "init"; opts: EngineOptions }
  | CallMessage
  | { t: "query"; id: number; req: QueryWire }
  | { t: "abort"; id: number };

export type FromWorker =
  | { t: "loaded"; info: ModelInfo }
  | { t: "loadFailed"; error: string }
  | { t: "res"; id: number; ok: true; result: unknown }
  | { t: "res"; id: number; ok: false; error: WireError }
  | { t: "ev"; id: number; ev: QueryEvent }
  | { t: "progress"; info: ContextInfo }
  | { t: "deleted"; id: string }
  | { t: "metrics"; m: EngineMetrics };
