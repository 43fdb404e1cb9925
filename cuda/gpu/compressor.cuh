/*
 * gpu/compressor.cuh — the compress step (REFORM phase 1): chunk forward to the exit layer, H2O or TOVA scores,
 * eviction on the device (no host round trip inside a chunk), state blob. The *_impl functions take arguments already
 * checked by the ABI layer (gpu/abi.cuh, cuda/abi_guard.h). Part of the single translation unit cuda/reform_cuda.cu
 * (included there, in order).
 */
namespace {

/* ---------------- compressor ---------------- */
void comp_free(rf_compressor* c) {
  if (!c) return;
  if (c->m) {
    cudaSetDevice(c->m->dev);
    cudaStreamSynchronize(c->m->stream);
    cudaStreamSynchronize(c->m->copy);  // a pending chunk's copy writes this compressor's pinned slots
  }
  for (int i = 0; i < 2; i++) {
    if (c->pinned[i]) cudaFreeHost(c->pinned[i]);
    if (c->copied[i]) cudaEventDestroy(c->copied[i]);
    c->pinned[i] = nullptr;
    c->copied[i] = nullptr;
  }
  c->npend = 0;
  c->arena.free_all();
  cudaGetLastError();
  if (c->m) model_release_child(c->m);
  c->m = nullptr;
}

/* what one step of c needs from the model's shared workspace */
WsNeed comp_need(const rf_compressor* c) {
  WsNeed n;
  n.rows = c->p.max_chunk;
  n.krot_rows = c->T;
  n.cap = c->p.capacity;
  n.emb_bytes = (int64_t)c->p.max_chunk * c->edim * (c->p.emb_dtype == RF_F16 ? 2 : 4);
  n.mlp = c->exit > 0;
  return n;
}

int comp_create_impl(rf_model* m, const rf_compress_params* p, const int32_t* heads, int32_t n_heads,
                     rf_compressor** out) {
  std::unique_ptr<rf_compressor> c(new rf_compressor());
  int exit_layer = 0;
  RF_TRY(rf::validate_compress(m->cfg, p, heads, n_heads, &c->heads, &exit_layer));
  if ((int64_t)p->capacity + p->max_chunk > (int64_t)INT32_MAX / 2)
    return set_error(RF_ERR_INVALID, "capacity + max_chunk too large");
  CU_CHECK(cudaSetDevice(m->dev));
  c->m = m;
  m->children++;
  struct Guard {
    rf_compressor* p;
    ~Guard() {
      if (p) comp_free(p);
    }
  } guard{c.get()};
  c->p = *p;
  c->exit = exit_layer;
  c->exit_attn = rf::exit_attention(c->heads, exit_layer);
  c->ncache = rf::cached_layers(exit_layer, m->NL, c->exit_attn);
  c->edim = n_heads * m->hd;
  c->T = p->capacity + p->max_chunk;
  const int nl = exit_layer + 1;
  const size_t T = (size_t)c->T, hd = (size_t)m->hd, nKV = (size_t)m->nKV;
  DevArena& A = c->arena;
  c->Kc.resize(c->ncache);
  c->Vc.resize(c->ncache);
  c->score.resize(c->ncache);
  for (int l = 0; l < c->ncache; l++) {
    RF_TRY(A.alloc(&c->Kc[l], nKV * T * hd, "compressor K cache"));
    RF_TRY(A.alloc(&c->Vc[l], nKV * T * hd, "compressor V cache"));
    RF_TRY(A.alloc(&c->score[l], nKV * T, "compressor H2O scores"));
  }
  // embedding table: per layer, pairs (source column, embedding column); the source of q/k/v heads is the qkv
  // projection, that of o heads the attention output (query head h at column h * hd)
  std::vector<int32_t> tab;
  c->table_off.assign(nl, 0);
  c->table_cnt.assign(nl, 0);
  c->otable_off.assign(nl, 0);
  c->otable_cnt.assign(nl, 0);
  for (int l = 0; l < nl; l++)
    for (const bool o : {false, true}) {
      (o ? c->otable_off : c->table_off)[l] = (int)(tab.size() / 2);
      for (size_t i = 0; i < c->heads.size(); i++) {
        const rf::HeadSel& h = c->heads[i];
        if (h.layer != l || (h.kind == RF_HEAD_O) != o) continue;
        int col = h.kind == RF_HEAD_Q || h.kind == RF_HEAD_O ? h.head * m->hd
                  : h.kind == RF_HEAD_K                      ? m->qd + h.head * m->hd
                                                             : m->qd + m->kvd + h.head * m->hd;
        tab.push_back(col);
        tab.push_back((int32_t)i * m->hd);
        (o ? c->otable_cnt : c->table_cnt)[l]++;
      }
    }
  RF_TRY(A.alloc(&c->table, tab.size(), "head table"));
  CU_CHECK(cudaMemcpyAsync(c->table, tab.data(), tab.size() * 4, cudaMemcpyHostToDevice, m->stream));
  RF_TRY(ws_ensure(m, comp_need(c.get())));  // a compressor whose step does not fit fails here, not mid-upload
  CU_CHECK(cudaStreamSynchronize(m->stream));
  guard.p = nullptr;
  *out = c.release();
  return RF_OK;
}

/* H2O eviction of every cached layer down to `capacity`, all on the device and queued on the model's stream: the
 * keep-set of each (layer, kv head) by k_select_keep (rf::h2o_select's result), then K, V and scores gathered. */
int comp_evict(rf_compressor* c, int total) {
  rf_model* m = c->m;
  Workspace& w = m->ws;
  const int cap = c->p.capacity, nKV = m->nKV, hd = m->hd;
  const int lo = c->p.n_sink, hi = total - c->p.n_recent, k = cap - c->p.n_sink - c->p.n_recent;
  const int threads = std::min(SEL_THREADS, std::max(32, (total + 31) / 32 * 32));
  const int64_t nel = (int64_t)nKV * cap * hd;
  const size_t row_bytes = (size_t)cap * hd * 2;
  for (int l = 0; l < c->ncache; l++) {
    RF_LAUNCH(k_select_keep, nKV, threads, 0, m->stream)(c->score[l], c->T, total, lo, hi, k, w.keep, cap, w.tmpS);
    KERNEL_CHECK();
    CU_CHECK(cudaMemcpy2DAsync(c->score[l], (size_t)c->T * 4, w.tmpS, (size_t)cap * 4, (size_t)cap * 4, nKV,
                               cudaMemcpyDeviceToDevice, m->stream));
    RF_LAUNCH(k_gather_rows<uint16_t>, nblocks(nel, 256), 256, 0, m->stream)
    (c->Kc[l], c->T, w.tmpK, cap, w.keep, nKV, cap, hd);
    KERNEL_CHECK();
    CU_CHECK(cudaMemcpy2DAsync(c->Kc[l], (size_t)c->T * hd * 2, w.tmpK, row_bytes, row_bytes, nKV,
                               cudaMemcpyDeviceToDevice, m->stream));
    RF_LAUNCH(k_gather_rows<uint16_t>, nblocks(nel, 256), 256, 0, m->stream)
    (c->Vc[l], c->T, w.tmpK, cap, w.keep, nKV, cap, hd);
    KERNEL_CHECK();
    CU_CHECK(cudaMemcpy2DAsync(c->Vc[l], (size_t)c->T * hd * 2, w.tmpK, row_bytes, row_bytes, nKV,
                               cudaMemcpyDeviceToDevice, m->stream));
  }
  return RF_OK;
}

size_t emb_bytes_of(const rf_compressor* c, int n) { return (size_t)n * c->edim * (c->p.emb_dtype == RF_F16 ? 2 : 4); }

/* the pinned slots and their events, at the first submit (a compressor that is never pipelined holds none) */
int comp_pipeline_init(rf_compressor* c) {
  if (c->pinned[0]) return RF_OK;
  for (int i = 0; i < 2; i++) {
    void* h = nullptr;
    cudaError_t e = cudaMallocHost(&h, emb_bytes_of(c, c->p.max_chunk));
    if (e != cudaSuccess) {
      cudaGetLastError();
      return set_error(RF_ERR_OOM, "cudaMallocHost of %zu bytes (pipelined embedding slot) failed: %s",
                       emb_bytes_of(c, c->p.max_chunk), cudaGetErrorString(e));
    }
    c->pinned[i] = (uint8_t*)h;
    CU_CHECK(cudaEventCreateWithFlags(&c->copied[i], cudaEventDisableTiming));
  }
  return RF_OK;
}

/* One chunk forward. update: append to cache + H2O + eviction; else cache unchanged. Everything is queued on the
 * model's stream. Embeddings: out_emb (process / embed): the host waits once, at the end (pinned staging, then the
 * caller's buffer); slot >= 0 (submit): they go to the compressor's pinned slot on the copy stream and nothing waits.
 */
int comp_forward(rf_compressor* c, const int32_t* tokens, int n, void* out_emb, bool update, int slot = -1) {
  rf_model* m = c->m;
  CU_CHECK(cudaSetDevice(m->dev));
  RF_TRY(ws_ensure(m, comp_need(c)));
  Workspace& ws = m->ws;
  const int len = (int)c->len, total = len + n;
  const bool tova = c->p.eviction == RF_EVICT_TOVA;
  const int w = (int)rf::observed_queries(c->p, n);  // the chunk's last w queries score the entries
  const float scale = 1.f / sqrtf((float)m->hd);
  const Acts a = ws_acts(m);
  const size_t emb_bytes = emb_bytes_of(c, n);
  const bool want_emb = out_emb || slot >= 0;
  // the copy of an earlier pipelined chunk (this compressor's or another's: ws.emb is shared) reads ws.emb first
  if (want_emb) CU_CHECK(cudaStreamWaitEvent(m->stream, m->emb_free, 0));
  RF_TRY(upload_tokens(m, ws.tok, tokens, n, a.x));
  for (int l = 0; l <= c->exit; l++) {
    const LayerW& W = m->layers[l];
    RF_TRY(run_qkv(m, W, a, n));
    if (want_emb && c->table_cnt[l] > 0) {
      dim3 grid((unsigned)n, (unsigned)c->table_cnt[l]);
      RF_LAUNCH(k_emb_extract, grid, 32, 0, m->stream)
      (a.qkv, m->qkvd, c->table + 2 * c->table_off[l], ws.emb, c->edim, m->hd, c->p.emb_dtype == RF_F16, m->f16);
      KERNEL_CHECK();
    }
    if (l >= c->ncache) break;  // the exit layer below full depth: nothing reads its cache, attention or H2O scores
    const bool last = l == c->exit;
    if (last && !update && !c->exit_attn) break;  // embedding only: q/k/v of the exit layer is all that is needed
    // append pre-RoPE K and V at rows len..len+n-1 (beyond the logical cache when !update)
    RF_LAUNCH(k_append_kv, nblocks((int64_t)n * m->nKV * (m->hd / 2), 256), 256, 0, m->stream)
    (a.qkv, m->qkvd, m->qd, m->qd + m->kvd, c->Kc[l], c->Vc[l], c->T, n, m->nKV, m->hd, len, false, m->inv_freq, m->f16,
     nullptr);
    KERNEL_CHECK();
    if (update) {  // H2O adds this chunk's attention to the kept entries' scores; TOVA ranks by this chunk's alone
      const int z0 = tova ? 0 : len, zn = tova ? total : n;
      RF_LAUNCH(k_zero_scores, nblocks((int64_t)m->nKV * zn, 256), 256, 0, m->stream)
      (c->score[l], c->T, m->nKV, z0, zn);
      KERNEL_CHECK();
    }
    RF_LAUNCH(k_rope_q, nblocks((int64_t)n * m->nH * (m->hd / 2), 256), 256, 0, m->stream)
    (a.qkv, m->qkvd, a.qrot, n, m->nH, m->hd, len, m->inv_freq, m->f16, nullptr);
    KERNEL_CHECK();
    // cache entry i is at position i: rope all keys
    RF_LAUNCH(k_rope_rows, nblocks((int64_t)m->nKV * total * (m->hd / 2), 256), 256, 0, m->stream)
    (c->Kc[l], c->T, ws.Krot, c->T, m->nKV, total, m->hd, 0, m->inv_freq, m->f16);
    KERNEL_CHECK();
    // at the exit layer only the observed queries' statistics are needed, unless an o head embeds its attention
    const int q_begin = last && !c->exit_attn ? n - w : 0;
    RF_TRY(launch_flash(m, a.qrot, ws.Krot, c->Vc[l], c->T, a.attn, update ? ws.stat_m : nullptr,
                        update ? ws.stat_l : nullptr, (int)ws.rows, q_begin, n, len, total));
    if (out_emb && c->otable_cnt[l] > 0) {
      dim3 grid((unsigned)n, (unsigned)c->otable_cnt[l]);
      RF_LAUNCH(k_emb_extract, grid, 32, 0, m->stream)
      (a.attn, m->qd, c->table + 2 * c->otable_off[l], ws.emb, c->edim, m->hd, c->p.emb_dtype == RF_F16, m->f16);
      KERNEL_CHECK();
    }
    if (update) {
      dim3 grid((unsigned)((total + H2O_KEYS - 1) / H2O_KEYS), (unsigned)m->nKV);
      RF_LAUNCH(k_h2o, grid, H2O_KEYS, h2o_smem(m->hd), m->stream)
      (a.qrot, m->qd, ws.Krot, c->T, ws.stat_m, ws.stat_l, (int)ws.rows, c->score[l], n - w, n, len, total, m->G, m->hd,
       scale, m->f16);
      KERNEL_CHECK();
      if (tova) {
        RF_LAUNCH(k_tova_layer, nblocks(total, 256), 256, 0, m->stream)(c->score[l], c->T, m->nKV, total);
        KERNEL_CHECK();
      }
    }
    if (!last) RF_TRY(run_post_attn(m, W, a, n));
  }
  if (slot >= 0) {
    // pipelined: the copy stream takes the embeddings once the forward above has written them, into this chunk's
    // pinned slot; the eviction below overlaps the copy, and the next forward waits for emb_free (top of this function)
    CU_CHECK(cudaEventRecord(m->emb_ready, m->stream));
    CU_CHECK(cudaStreamWaitEvent(m->copy, m->emb_ready, 0));
    CU_CHECK(cudaMemcpyAsync(c->pinned[slot], ws.emb, emb_bytes, cudaMemcpyDeviceToHost, m->copy));
    CU_CHECK(cudaEventRecord(c->copied[slot], m->copy));
    CU_CHECK(cudaEventRecord(m->emb_free, m->copy));
  } else if (out_emb) {
    // the embeddings go back first (pinned, asynchronous); the eviction below is queued behind them
    CU_CHECK(cudaMemcpyAsync(ws.emb_host, ws.emb, emb_bytes, cudaMemcpyDeviceToHost, m->stream));
  }
  const bool evict = update && total > c->p.capacity;
  if (evict) RF_TRY(comp_evict(c, total));
  // the one host wait of a process / embed step; a submitted chunk returns without any
  if (slot < 0) CU_CHECK(cudaStreamSynchronize(m->stream));
  if (out_emb) memcpy(out_emb, ws.emb_host, emb_bytes);
  if (!update) return RF_OK;
  c->seen += n;
  c->len = evict ? c->p.capacity : total;
  return RF_OK;
}

/* rf_compressor_submit: the chunk is queued; its embeddings will be in the next free slot (checked: npend < 2) */
int comp_submit(rf_compressor* c, const int32_t* tokens, int n) {
  RF_TRY(comp_pipeline_init(c));
  const int slot = (c->head + c->npend) & 1;
  RF_TRY(comp_forward(c, tokens, n, nullptr, true, slot));
  c->pend_rows[slot] = n;
  c->npend++;
  return RF_OK;
}

/* rf_compressor_collect: waits for the oldest pending chunk's copy only (not for the forward queued after it) */
int comp_collect(rf_compressor* c, void* out_emb) {
  if (c->npend == 0) return 0;
  const int slot = c->head;
  CU_CHECK(cudaSetDevice(c->m->dev));
  CU_CHECK(cudaEventSynchronize(c->copied[slot]));
  const int n = c->pend_rows[slot];
  memcpy(out_emb, c->pinned[slot], emb_bytes_of(c, n));
  c->head ^= 1;
  c->npend--;
  return n;
}

/* the state blob header of this compressor (its shape and counters) */
rf::StateHeader state_header_of(const rf_compressor* c) {
  return rf::state_header(c->ncache, c->m->nKV, c->m->hd, c->m->H, c->p.capacity, c->len, c->seen);
}

/* buf holds at least rf::state_size(...) bytes (checked by the ABI) */
int state_save_impl(const rf_compressor* c, void* buf) {
  rf_model* m = c->m;
  const int nl = c->ncache, nKV = m->nKV, hd = m->hd;
  const int64_t len = c->len;
  CU_CHECK(cudaSetDevice(m->dev));
  const rf::StateHeader hdr = state_header_of(c);
  uint8_t* o = (uint8_t*)buf;
  memcpy(o, &hdr, sizeof hdr);
  float* f = (float*)(o + sizeof hdr);
  std::vector<uint16_t> k((size_t)nKV * len * hd), v((size_t)nKV * len * hd);
  std::vector<float> s((size_t)nKV * len);
  for (int l = 0; l < nl; l++) {
    if (len > 0) {
      const size_t rb = (size_t)len * hd * 2, pitch = (size_t)c->T * hd * 2;
      CU_CHECK(cudaMemcpy2DAsync(k.data(), rb, c->Kc[l], pitch, rb, nKV, cudaMemcpyDeviceToHost, m->stream));
      CU_CHECK(cudaMemcpy2DAsync(v.data(), rb, c->Vc[l], pitch, rb, nKV, cudaMemcpyDeviceToHost, m->stream));
      CU_CHECK(cudaMemcpy2DAsync(s.data(), (size_t)len * 4, c->score[l], (size_t)c->T * 4, (size_t)len * 4, nKV,
                                 cudaMemcpyDeviceToHost, m->stream));
      CU_CHECK(cudaStreamSynchronize(m->stream));
    }
    for (int h = 0; h < nKV; h++) {
      const size_t base = (size_t)h * len * hd;
      for (int64_t i = 0; i < len * hd; i++) *f++ = m->f16 ? rf::f16_to_f32(k[base + i]) : rf::bf16_to_f32(k[base + i]);
      for (int64_t i = 0; i < len * hd; i++) *f++ = m->f16 ? rf::f16_to_f32(v[base + i]) : rf::bf16_to_f32(v[base + i]);
      for (int64_t i = 0; i < len; i++) *f++ = s[(size_t)h * len + i];
    }
  }
  return RF_OK;
}

/* hdr: the blob's header, checked against the compressor by rf::check_state_load */
int state_load_impl(rf_compressor* c, const void* buf, const rf::StateHeader& hdr) {
  rf_model* m = c->m;
  const int nl = c->ncache, nKV = m->nKV, hd = m->hd;  // a legacy blob's extra exit layer is not read
  const int64_t len = hdr.len;
  CU_CHECK(cudaSetDevice(m->dev));
  const float* f = (const float*)((const uint8_t*)buf + sizeof hdr);
  std::vector<uint16_t> k((size_t)nKV * len * hd), v((size_t)nKV * len * hd);
  std::vector<float> s((size_t)nKV * len);
  for (int l = 0; l < nl; l++) {
    for (int h = 0; h < nKV; h++) {
      const size_t base = (size_t)h * len * hd;
      for (int64_t i = 0; i < len * hd; i++) {
        float x = *f++;
        k[base + i] = m->f16 ? rf::f32_to_f16(x) : rf::f32_to_bf16(x);
      }
      for (int64_t i = 0; i < len * hd; i++) {
        float x = *f++;
        v[base + i] = m->f16 ? rf::f32_to_f16(x) : rf::f32_to_bf16(x);
      }
      for (int64_t i = 0; i < len; i++) s[(size_t)h * len + i] = *f++;
    }
    if (len > 0) {
      const size_t rb = (size_t)len * hd * 2, pitch = (size_t)c->T * hd * 2;
      CU_CHECK(cudaMemcpy2DAsync(c->Kc[l], pitch, k.data(), rb, rb, nKV, cudaMemcpyHostToDevice, m->stream));
      CU_CHECK(cudaMemcpy2DAsync(c->Vc[l], pitch, v.data(), rb, rb, nKV, cudaMemcpyHostToDevice, m->stream));
      CU_CHECK(cudaMemcpy2DAsync(c->score[l], (size_t)c->T * 4, s.data(), (size_t)len * 4, (size_t)len * 4, nKV,
                                 cudaMemcpyHostToDevice, m->stream));
      CU_CHECK(cudaStreamSynchronize(m->stream));
    }
  }
  c->len = len;
  c->seen = hdr.seen;
  return RF_OK;
}

}  // namespace
