/**
 * Entry of the engine worker (a Bun Worker that owns the native library): loads the engine on `init`,
 * dispatches the typed messages of protocol.ts to EngineCore, streams query events back and pushes
 * metrics. The HTTP thread's side of this conversation is client.ts.
 */
import { EngineError } from "./api.ts";
import { EngineCore } from "./core.ts";
import { toEngineError } from "./errors.ts";
import type { CallMessage, FromWorker, ToWorker, WireError } from "./protocol.ts";

declare const self: Worker;

const METRICS_EVERY_MS = 50;

function wireError(e: unknown): WireError {
  const err = toEngineError(e);
  return { status: err.status, code: err.code, message: err.message, param: err.param };
}

/** Runs one call on the core; the op/args pairing is checked by CallMessage's type. */
function dispatch(core: EngineCore, m: CallMessage): unknown {
  switch (m.op) {
    case "createContext":
      return core.createContext(...m.args);
    case "append":
      return core.append(...m.args);
    case "finalize":
      return core.finalize(...m.args);
    case "getContext":
      return core.getContext(...m.args);
    case "listContexts":
      return core.listContexts(...m.args);
    case "deleteContext":
      return core.deleteContext(...m.args);
    case "countTokens":
      return core.countTokens(...m.args);
    case "tokenize":
      return core.tokenize(...m.args);
    case "detokenize":
      return core.detokenize(...m.args);
    case "close":
      return core.close();
  }
}

if (typeof Bun !== "undefined" && !Bun.isMainThread) {
  let core: EngineCore | null = null;
  let loadError: string | null = null;
  const post = (m: FromWorker) => self.postMessage(m);
  let lastMetrics = 0;
  const pushMetrics = (force = false) => {
    if (!core) return;
    const now = Date.now();
    if (!force && now - lastMetrics < METRICS_EVERY_MS) return;
    lastMetrics = now;
    post({ t: "metrics", m: core.snapshotMetrics() });
  };

  self.onmessage = async (ev: MessageEvent<ToWorker>) => {
    const m = ev.data;
    if (m.t === "init") {
      try {
        core = new EngineCore(
          m.opts,
          (info) => post({ t: "progress", info }),
          (id) => post({ t: "deleted", id }),
        );
        const c = core;
        c.sched.onStep = () => {
          c.metrics.queueDepth = c.sched.depth;
          pushMetrics();
        };
        post({ t: "loaded", info: c.info });
        pushMetrics(true);
      } catch (e) {
        loadError = e instanceof Error ? e.message : String(e);
        core = null;
        post({ t: "loadFailed", error: loadError });
      }
      return;
    }
    if (m.t === "abort") {
      core?.abort(String(m.id));
      return;
    }
    if (!core) {
      const error = new EngineError(503, "model_not_loaded", `model not loaded${loadError ? `: ${loadError}` : ""}`);
      post({ t: "res", id: m.id, ok: false, error: wireError(error) });
      return;
    }
    try {
      if (m.t === "query") {
        await core.query(String(m.id), m.req, (e) => {
          if (e.type === "done") pushMetrics(true);
          post({ t: "ev", id: m.id, ev: e });
        });
        post({ t: "res", id: m.id, ok: true, result: null });
      } else {
        post({ t: "res", id: m.id, ok: true, result: await dispatch(core, m) });
      }
    } catch (e) {
      post({ t: "res", id: m.id, ok: false, error: wireError(e) });
    }
    pushMetrics(true);
  };
}
