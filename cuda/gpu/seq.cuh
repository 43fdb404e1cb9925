/*
 * gpu/seq.cuh — recompute + generate: the full-depth sequence (prefill, decode, import of a compressor cache).
 * The *_impl functions take arguments already checked by the ABI layer (gpu/abi.cuh, cuda/abi_guard.h).
 * Part of the single translation unit cuda/reform_cuda.cu (included there, in order).
 */
namespace {

/* ---------------- seq ---------------- */
void seq_free(rf_seq* s) {
  if (!s) return;
  if (s->m) {
    cudaSetDevice(s->m->dev);
    cudaStreamSynchronize(s->m->stream);
  }
  if (s->graph) cudaGraphExecDestroy(s->graph);
  if (s->pin) cudaFreeHost(s->pin);
  s->graph = nullptr;
  s->pin = nullptr;
  s->arena.free_all();
  cudaGetLastError();
  if (s->m) model_release_child(s->m);
  s->m = nullptr;
}

/* REFORM_CUDA_GRAPH=1: decode steps replay a captured CUDA graph (one launch instead of ~15 per layer); off by default
 * until a GPU run has measured it (scripts/gpu-session.sh) */
bool decode_graphs_enabled() {
  const char* e = getenv("REFORM_CUDA_GRAPH");
  return e && strcmp(e, "1") == 0;
}

/* what one forward piece of s needs from the model's shared workspace */
WsNeed seq_need(const rf_seq* s) {
  WsNeed n;
  n.rows = s->S;
  n.mlp = true;
  return n;
}

int seq_create_impl(rf_model* m, int32_t max_tokens, rf_seq** out) {
  CU_CHECK(cudaSetDevice(m->dev));
  std::unique_ptr<rf_seq> s(new rf_seq());
  s->m = m;
  m->children++;
  struct Guard {
    rf_seq* p;
    ~Guard() {
      if (p) seq_free(p);
    }
  } guard{s.get()};
  s->maxT = max_tokens;
  s->S = std::min(max_tokens, 4096);
  const size_t T = (size_t)max_tokens, hd = (size_t)m->hd, nKV = (size_t)m->nKV;
  DevArena& A = s->arena;
  s->Kc.resize(m->NL);
  s->Vc.resize(m->NL);
  for (int l = 0; l < m->NL; l++) {
    RF_TRY(A.alloc(&s->Kc[l], nKV * T * hd, "sequence K cache"));
    RF_TRY(A.alloc(&s->Vc[l], nKV * T * hd, "sequence V cache"));
  }
  RF_TRY(A.alloc(&s->logits, (size_t)m->V, "logits"));
  s->nsplit_max = (max_tokens + DEC_SPLIT - 1) / DEC_SPLIT;
  RF_TRY(A.alloc(&s->part, (size_t)m->nH * s->nsplit_max * (hd + 2), "decode partials"));
  RF_TRY(A.alloc(&s->sel_idx, SAMPLE_MAX_K, "sampler candidates"));
  RF_TRY(A.alloc(&s->sel_val, SAMPLE_MAX_K, "sampler candidate logits"));
  s->host_logits.resize(m->V);
  if (decode_graphs_enabled()) {
    void* h = nullptr;
    cudaError_t e = cudaMallocHost(&h, 2 * sizeof(int32_t));
    if (e != cudaSuccess) {
      cudaGetLastError();
      return set_error(RF_ERR_OOM, "cudaMallocHost (decode graph inputs) failed: %s", cudaGetErrorString(e));
    }
    s->pin = (int32_t*)h;
    RF_TRY(A.alloc(&s->dpos, 2, "decode graph inputs"));
    s->graph_on = true;
  }
  RF_TRY(ws_ensure(m, seq_need(s.get())));
  guard.p = nullptr;
  *out = s.release();
  return RF_OK;
}

/* The layers of one decode step (one token, already embedded in a.x) at position pos0, plus *dpos when given, over
 * `total` keys (plus *dpos): the plain step passes its position (dpos NULL); the captured graph passes 0 and the
 * device copy of its position, so that both run exactly these kernels. */
int decode_layers(rf_seq* s, const Acts& a, int pos0, const int32_t* dpos, int total, int nsplit) {
  rf_model* m = s->m;
  const float scale = 1.f / sqrtf((float)m->hd);
  for (int l = 0; l < m->NL; l++) {
    const LayerW& W = m->layers[l];
    RF_TRY(run_qkv(m, W, a, 1));
    RF_LAUNCH(k_rope_q, nblocks((int64_t)m->nH * (m->hd / 2), 256), 256, 0, m->stream)
    (a.qkv, m->qkvd, a.qrot, 1, m->nH, m->hd, pos0, m->inv_freq, m->f16, dpos);
    KERNEL_CHECK();
    RF_LAUNCH(k_append_kv, nblocks((int64_t)m->nKV * (m->hd / 2), 256), 256, 0, m->stream)
    (a.qkv, m->qkvd, m->qd, m->qd + m->kvd, s->Kc[l], s->Vc[l], s->maxT, 1, m->nKV, m->hd, pos0, true, m->inv_freq,
     m->f16, dpos);
    KERNEL_CHECK();
    dim3 grid((unsigned)m->nH, (unsigned)nsplit);
    RF_LAUNCH(k_decode_partial, grid, 128, 0, m->stream)
    (a.qrot, s->Kc[l], s->Vc[l], s->maxT, s->part, s->nsplit_max, total, m->G, m->hd, scale, m->f16, dpos);
    KERNEL_CHECK();
    RF_LAUNCH(k_decode_combine, m->nH, 128, 0, m->stream)(s->part, s->nsplit_max, nsplit, m->hd, a.attn, m->f16);
    KERNEL_CHECK();
    RF_TRY(run_post_attn(m, W, a, 1));
  }
  return RF_OK;
}

/* logits of activation row `row` (f32, on the device) */
int logits_head(rf_seq* s, const Acts& a, int row) {
  rf_model* m = s->m;
  RF_TRY(run_rmsnorm(m, a.x + (size_t)row * m->H, m->norm, a.xn, 1));
  return m->gemm.nt(1, m->V, m->H, a.xn, m->adt, m->H, m->lm_head, m->adt, m->H, s->logits, RF_F32, m->V, 0.f);
}

/* Captures the decode step for split count nsplit into s->graph: the token and position copied from the pinned
 * inputs, the embedding, decode_layers and the logits, all queued on the model's stream. */
int seq_capture(rf_seq* s, int nsplit) {
  rf_model* m = s->m;
  const Acts a = ws_acts(m);
  if (s->graph) cudaGraphExecDestroy(s->graph);
  s->graph = nullptr;
  CU_CHECK(cudaStreamBeginCapture(m->stream, cudaStreamCaptureModeThreadLocal));
  // a host exception inside (the ABI guard turns it into a status) must not leave the model's stream capturing
  struct EndOnThrow {
    cudaStream_t st;
    bool armed = true;
    ~EndOnThrow() {
      if (!armed) return;
      cudaGraph_t g = nullptr;
      cudaStreamEndCapture(st, &g);
      if (g) cudaGraphDestroy(g);
      cudaGetLastError();
    }
  } end_on_throw{m->stream};
  int rc = [&]() -> int {
    CU_CHECK(cudaMemcpyAsync(s->dpos, s->pin, 2 * sizeof(int32_t), cudaMemcpyHostToDevice, m->stream));
    RF_LAUNCH(k_embed, nblocks((int64_t)m->H, 256), 256, 0, m->stream)(s->dpos, m->embed, a.x, 1, m->H);
    KERNEL_CHECK();
    RF_TRY(decode_layers(s, a, 0, s->dpos + 1, 1, nsplit));
    return logits_head(s, a, 0);
  }();
  end_on_throw.armed = false;
  cudaGraph_t g = nullptr;
  const cudaError_t e = cudaStreamEndCapture(m->stream, &g);  // always: the stream leaves capture mode
  if (rc == RF_OK && e != cudaSuccess)
    rc = set_error(RF_ERR_DEVICE, "capturing the decode step failed: %s", cudaGetErrorString(e));
  if (rc == RF_OK) {
    const cudaError_t ie = cudaGraphInstantiate(&s->graph, g, 0);
    if (ie != cudaSuccess) {
      s->graph = nullptr;
      rc = set_error(RF_ERR_DEVICE, "instantiating the decode graph failed: %s", cudaGetErrorString(ie));
    }
  }
  if (g) cudaGraphDestroy(g);
  cudaGetLastError();
  if (rc != RF_OK) return rc;
  s->graph_nsplit = nsplit;
  s->graph_ws = m->ws_gen;
  return RF_OK;
}

/* One decode step through the graph (captured again when the split count or the workspace changed) */
int seq_decode_graph(rf_seq* s, int32_t token) {
  rf_model* m = s->m;
  const int nsplit = (s->len + 1 + DEC_SPLIT - 1) / DEC_SPLIT;
  if (!s->graph || s->graph_nsplit != nsplit || s->graph_ws != m->ws_gen) RF_TRY(seq_capture(s, nsplit));
  // the previous step's graph has read these (every step ends with a stream sync)
  s->pin[0] = token;
  s->pin[1] = s->len;
  CU_CHECK(cudaGraphLaunch(s->graph, m->stream));
  return RF_OK;
}

int seq_forward_impl(rf_seq* s, const int32_t* tokens, int n, float* logits_out) {
  rf_model* m = s->m;
  CU_CHECK(cudaSetDevice(m->dev));
  s->has_logits = false;
  s->host_logits_valid = false;
  RF_TRY(ws_ensure(m, seq_need(s)));
  const Acts a = ws_acts(m);
  int nb = 0;
  bool graphed = false;
  if (n == 1 && s->graph_on) {
    if (seq_decode_graph(s, tokens[0]) == RF_OK) {
      graphed = true;
      nb = 1;
      s->len += 1;
    } else {
      // loud once per sequence, then the plain step (the same kernels, launched one by one)
      fprintf(stderr, "[reform] CUDA graph decode off for this sequence: %s\n", rf::last_error_ref().c_str());
      s->graph_on = false;
      rf::clear_error();
    }
  }
  for (int off = 0; off < n && !graphed; off += nb) {
    nb = std::min(s->S, n - off);
    const int pos0 = s->len;
    RF_TRY(upload_tokens(m, m->ws.tok, tokens + off, nb, a.x));
    if (nb == 1) {
      const int total = pos0 + 1;
      RF_TRY(decode_layers(s, a, pos0, nullptr, total, (total + DEC_SPLIT - 1) / DEC_SPLIT));
      s->len += 1;
      continue;
    }
    for (int l = 0; l < m->NL; l++) {
      const LayerW& W = m->layers[l];
      RF_TRY(run_qkv(m, W, a, nb));
      RF_LAUNCH(k_rope_q, nblocks((int64_t)nb * m->nH * (m->hd / 2), 256), 256, 0, m->stream)
      (a.qkv, m->qkvd, a.qrot, nb, m->nH, m->hd, pos0, m->inv_freq, m->f16, nullptr);
      KERNEL_CHECK();
      RF_LAUNCH(k_append_kv, nblocks((int64_t)nb * m->nKV * (m->hd / 2), 256), 256, 0, m->stream)
      (a.qkv, m->qkvd, m->qd, m->qd + m->kvd, s->Kc[l], s->Vc[l], s->maxT, nb, m->nKV, m->hd, pos0, true, m->inv_freq,
       m->f16, nullptr);
      KERNEL_CHECK();
      const int total = pos0 + nb;
      RF_TRY(launch_flash(m, a.qrot, s->Kc[l], s->Vc[l], s->maxT, a.attn, nullptr, nullptr, 0, 0, nb, pos0, total));
      RF_TRY(run_post_attn(m, W, a, nb));
    }
    s->len += nb;
  }
  // logits of the last token (the graph computed them); they stay on the device unless the caller asks for them
  // (rf_seq_sample samples there)
  if (!graphed) RF_TRY(logits_head(s, a, nb - 1));
  if (logits_out) {
    CU_CHECK(cudaMemcpyAsync(s->host_logits.data(), s->logits, (size_t)m->V * 4, cudaMemcpyDeviceToHost, m->stream));
    s->host_logits_valid = true;
  }
  CU_CHECK(cudaStreamSynchronize(m->stream));
  if (logits_out) memcpy(logits_out, s->host_logits.data(), (size_t)m->V * 4);
  s->has_logits = true;
  return RF_OK;
}

/* rf_seq_sample on the device: the candidates (greedy: the argmax; top_k <= SAMPLE_MAX_K: the top_k logits) are
 * selected by k_select_keep and only they come back (4 bytes / 8 bytes each instead of the whole vocabulary), then
 * drawn with the host sampler over them, which gives exactly rf::sample_logits over the full logits (they are in
 * ascending id order, so its tie rule is the same). Other cases (top_k 0 or above SAMPLE_MAX_K at temperature > 0)
 * copy the logits once and sample on the host. */
int32_t seq_sample_impl(rf_seq* s, float temperature, float top_p, int32_t top_k, uint64_t* rng) {
  rf_model* m = s->m;
  CU_CHECK(cudaSetDevice(m->dev));
  const int V = m->V;
  const bool greedy = !(temperature > 0.f);
  const int k = greedy ? 1 : (top_k > 0 && top_k < V) ? top_k : V;
  if (k <= SAMPLE_MAX_K) {
    if (!greedy && !rng) return set_error(RF_ERR_INVALID, "rng_state is NULL");
    const int threads = std::min(SEL_THREADS, std::max(32, (V + 31) / 32 * 32));
    RF_LAUNCH(k_select_keep, 1, threads, 0, m->stream)(s->logits, V, V, 0, V, k, s->sel_idx, k, s->sel_val);
    KERNEL_CHECK();
    int32_t ids[SAMPLE_MAX_K];
    float vals[SAMPLE_MAX_K];
    CU_CHECK(cudaMemcpyAsync(ids, s->sel_idx, (size_t)k * 4, cudaMemcpyDeviceToHost, m->stream));
    if (!greedy) CU_CHECK(cudaMemcpyAsync(vals, s->sel_val, (size_t)k * 4, cudaMemcpyDeviceToHost, m->stream));
    CU_CHECK(cudaStreamSynchronize(m->stream));
    if (greedy) return ids[0];
    const int32_t r = rf::sample_logits(vals, k, temperature, top_p, 0, rng);
    return r < 0 ? r : ids[r];
  }
  if (!s->host_logits_valid) {
    CU_CHECK(cudaMemcpyAsync(s->host_logits.data(), s->logits, (size_t)V * 4, cudaMemcpyDeviceToHost, m->stream));
    CU_CHECK(cudaStreamSynchronize(m->stream));
    s->host_logits_valid = true;
  }
  return rf::sample_logits(s->host_logits.data(), V, temperature, top_p, top_k, rng);
}

int seq_import_impl(rf_seq* s, const rf_compressor* c) {
  rf_model* m = s->m;
  CU_CHECK(cudaSetDevice(m->dev));
  const int len = (int)c->len;
  if (len > 0) {
    for (int l = 0; l < m->NL; l++) {
      RF_LAUNCH(k_rope_rows, nblocks((int64_t)m->nKV * len * (m->hd / 2), 256), 256, 0, m->stream)
      (c->Kc[l], c->T, s->Kc[l], s->maxT, m->nKV, len, m->hd, 0, m->inv_freq, m->f16);
      KERNEL_CHECK();
      const size_t rb = (size_t)len * m->hd * 2;
      CU_CHECK(cudaMemcpy2DAsync(s->Vc[l], (size_t)s->maxT * m->hd * 2, c->Vc[l], (size_t)c->T * m->hd * 2, rb, m->nKV,
                                 cudaMemcpyDeviceToDevice, m->stream));
    }
  }
  CU_CHECK(cudaStreamSynchronize(m->stream));
  s->len = len;
  s->has_logits = false;
  s->host_logits_valid = false;
  return RF_OK;
}

}  // namespace
