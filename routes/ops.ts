/**
 * GET /health (open, 503 until the model is loaded), GET /metrics (Prometheus text) and GET /props (the model's
 * effective limits, heads and compressor settings, in the spirit of llama.cpp's /props).
 */
import { Hono } from "hono";
import { jsonError } from "./errors.ts";
import { limitsView, openaiSamplingView } from "./protocol.ts";
import type { MemoryPlan } from "../src/engine/api.ts";
import type { Deps } from "./types.ts";

function memoryView(m: MemoryPlan) {
  return {
    weights_bytes: m.weights,
    workspace_bytes: m.workspace,
    per_compressor_bytes: m.perCompressor,
    recompute_seq_bytes: m.recomputeSeq,
    max_model_len: m.maxModelLen,
    device_free_bytes: m.deviceFree,
    device_total_bytes: m.deviceTotal,
    max_live_compressors: m.maxLiveCompressors,
    fits: m.fits,
    resident_budget_bytes: m.residentBudget,
    resident_budget_tokens: m.residentTokens,
  };
}

export function opsRoutes(d: Deps): Hono {
  const { engine, stats } = d;
  const r = new Hono();

  r.get("/health", (c) => {
    const state = engine.state();
    if (state === "ready") {
      const info = engine.modelInfo();
      const maxDisk = info?.defaults.maxDiskBytes ?? 0;
      return c.json({
        status: "ok",
        model: d.opts.servedName ?? info?.id ?? null,
        backend: info?.backend ?? null,
        device: info?.device ?? null,
        // slow paths the backend fell back to (no cuBLAS, driver older than the runtime); empty when none
        warnings: info?.deviceWarnings ?? [],
        memory: info
          ? {
              ...memoryView(info.memory),
              // what the plan's resident budget holds now (contexts scored without reading their embedding file)
              resident_bytes: engine.metrics().residentBytes,
              resident_contexts: engine.metrics().residentContexts,
            }
          : null,
        uptime_s: Math.round((Date.now() - stats.startedAt) / 1000),
        // what the contexts hold on disk, and the cap uploads are refused beyond (null: none)
        disk_bytes: engine.metrics().diskBytes,
        max_disk_bytes: maxDisk > 0 ? maxDisk : null,
      });
    }
    if (state === "loading") {
      return c.json({ status: "loading", reason: "the model is loading" }, 503, { "retry-after": "5" });
    }
    return c.json({ status: "failed", reason: engine.loadError() ?? "the engine failed to start" }, 503);
  });

  r.get("/props", (c) => {
    const info = engine.modelInfo();
    if (engine.state() !== "ready" || !info) {
      return engine.state() === "loading"
        ? jsonError(503, "model_loading", "the model is still loading; retry shortly", null, { "retry-after": "5" })
        : jsonError(503, "engine_failed", `the engine failed to start: ${engine.loadError() ?? "unknown error"}`);
    }
    return c.json({
      model: d.opts.servedName ?? info.id,
      model_path: info.path,
      architecture: info.architecture,
      backend: info.backend,
      device: info.device,
      vocab_size: info.vocabSize,
      num_layers: info.numLayers,
      ...limitsView(info),
      // llama.cpp's field names for the two values its clients read
      n_ctx: info.defaults.maxModelLen,
      // and what an OpenAI request that names no sampling field gets (the model's generation_config.json or OpenAI's)
      default_generation_settings: {
        n_ctx: info.defaults.maxModelLen,
        max_tokens: info.defaults.maxTokens,
        ...openaiSamplingView(info, d.opts.generationConfig),
      },
    });
  });

  r.get("/metrics", async (c) =>
    c.body(await stats.render(engine), 200, { "content-type": stats.registry.contentType }),
  );

  return r;
}
