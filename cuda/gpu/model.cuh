/*
 * gpu/model.cuh — model lifetime: create (device buffers), set_tensor (upload + dtype conversion), init_random, free.
 * The *_impl functions take arguments already checked by the ABI layer (gpu/abi.cuh, cuda/abi_guard.h).
 * Part of the single translation unit cuda/reform_cuda.cu (included there, in order).
 */
namespace {

/* rf_score's buffers live while a model does (score.cuh) */
void score_model_created();
void score_model_freed();

/* ---------------- model helpers ---------------- */
uint16_t* tensor_dst(rf_model* m, const rf::TensorId& id, int64_t* count) {
  const int64_t H = m->H;
  switch (id.kind) {
    case rf::T_EMBED: *count = (int64_t)m->V * H; return m->embed;
    case rf::T_NORM: *count = H; return m->norm;
    case rf::T_LM_HEAD: *count = (int64_t)m->V * H; return m->lm_head;
    default: break;
  }
  LayerW& w = m->layers[id.layer];
  switch (id.kind) {
    case rf::T_IN_NORM: *count = H; return w.in_norm;
    case rf::T_POST_NORM: *count = H; return w.post_norm;
    case rf::T_Q: *count = (int64_t)m->qd * H; return w.wqkv;
    case rf::T_K: *count = (int64_t)m->kvd * H; return w.wqkv + (int64_t)m->qd * H;
    case rf::T_V: *count = (int64_t)m->kvd * H; return w.wqkv + (int64_t)(m->qd + m->kvd) * H;
    case rf::T_O: *count = H * m->qd; return w.wo;
    case rf::T_QB: *count = m->qd; return w.bqkv;
    case rf::T_KB: *count = m->kvd; return w.bqkv + m->qd;
    case rf::T_VB: *count = m->kvd; return w.bqkv + m->qd + m->kvd;
    case rf::T_QN: *count = m->hd; return w.qk_norm;
    case rf::T_KN: *count = m->hd; return w.qk_norm + m->hd;
    case rf::T_GATE: *count = (int64_t)m->I * H; return w.wgu;
    case rf::T_UP: *count = (int64_t)m->I * H; return w.wgu + (int64_t)m->I * H;
    case rf::T_DOWN: *count = H * m->I; return w.wdown;
    default: break;
  }
  *count = 0;
  return nullptr;
}

void model_free(rf_model* m) {
  if (!m) return;
  cudaSetDevice(m->dev);
  if (m->stream) cudaStreamSynchronize(m->stream);
  if (m->copy) cudaStreamSynchronize(m->copy);
  if (m->aux) cudaStreamSynchronize(m->aux);
  m->gemm.destroy();
  m->gemm_aux.destroy();
  m->qs.arena.free_all();
  m->ws.free_all();
  if (m->counted) score_model_freed();
  m->arena.free_all();
  if (m->emb_ready) cudaEventDestroy(m->emb_ready);
  if (m->emb_free) cudaEventDestroy(m->emb_free);
  if (m->copy) cudaStreamDestroy(m->copy);
  if (m->aux) cudaStreamDestroy(m->aux);
  if (m->stream) cudaStreamDestroy(m->stream);
  m->stream = m->copy = m->aux = nullptr;
  m->emb_ready = m->emb_free = nullptr;
  cudaGetLastError();
}

/* a compressor / seq of m went away: free m if the caller already destroyed it and this was the last child */
void model_release_child(rf_model* m) {
  if (--m->children <= 0 && m->destroyed) {
    model_free(m);
    delete m;
  }
}

int model_create_impl(const rf_config* cfg, rf_model** out) {
  RF_TRY(rf::validate_config(cfg));
  if (cfg->head_dim % 16 != 0 || cfg->head_dim > 256)
    return set_error(RF_ERR_INVALID, "CUDA build requires head_dim to be a multiple of 16 and <= 256 (got %d)",
                     cfg->head_dim);
  int dev = device_index();
  RF_TRY(ensure_device(dev));
  std::unique_ptr<rf_model> m(new rf_model());
  m->cfg = *cfg;
  m->dev = dev;
  m->f16 = cfg->weight_dtype == RF_F16;
  m->adt = m->f16 ? RF_F16 : RF_BF16;
  m->H = cfg->hidden_size;
  m->I = cfg->intermediate_size;
  m->V = cfg->vocab_size;
  m->NL = cfg->num_layers;
  m->nH = cfg->num_heads;
  m->nKV = cfg->num_kv_heads;
  m->hd = cfg->head_dim;
  m->qd = m->nH * m->hd;
  m->kvd = m->nKV * m->hd;
  m->qkvd = m->qd + 2 * m->kvd;
  m->G = m->nH / m->nKV;

  cudaDeviceProp prop;
  CU_CHECK(cudaGetDeviceProperties(&prop, dev));
  m->fa_smem = fa_layout(m->hd).total;
  size_t need = std::max(m->fa_smem, h2o_smem(m->hd));
  if (need > (size_t)prop.sharedMemPerBlockOptin)
    return set_error(RF_ERR_INVALID, "head_dim %d needs %zu bytes of shared memory, device allows %zu", m->hd, need,
                     (size_t)prop.sharedMemPerBlockOptin);
  // Opt in to > 48 KB of dynamic shared memory. Only ever raise the limit: the attribute is per kernel (process
  // wide), so lowering it for a model with a smaller head_dim would break launches of a live model with a larger one.
  auto raise_smem = [](const void* f, size_t bytes) -> int {
    cudaFuncAttributes fa;
    CU_CHECK(cudaFuncGetAttributes(&fa, f));
    if ((size_t)fa.maxDynamicSharedSizeBytes < bytes)
      CU_CHECK(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    return RF_OK;
  };
  RF_TRY(raise_smem((const void*)k_flash_attn<__half>, m->fa_smem));
  RF_TRY(raise_smem((const void*)k_flash_attn<__nv_bfloat16>, m->fa_smem));
  RF_TRY(raise_smem((const void*)k_h2o, h2o_smem(m->hd)));

  CU_CHECK(cudaStreamCreateWithFlags(&m->stream, cudaStreamNonBlocking));
  struct Guard {
    rf_model* p;
    ~Guard() {
      if (p) model_free(p);
    }
  } guard{m.get()};
  CU_CHECK(cudaStreamCreateWithFlags(&m->copy, cudaStreamNonBlocking));
  CU_CHECK(cudaEventCreateWithFlags(&m->emb_ready, cudaEventDisableTiming));
  CU_CHECK(cudaEventCreateWithFlags(&m->emb_free, cudaEventDisableTiming));
  CU_CHECK(cudaStreamCreateWithFlags(&m->aux, cudaStreamNonBlocking));
  RF_TRY(m->gemm.init(m->stream));
  RF_TRY(m->gemm_aux.init(m->aux));

  const int64_t H = m->H;
  DevArena& A = m->arena;
  RF_TRY(A.alloc(&m->embed, (size_t)m->V * H, "embed_tokens"));
  RF_TRY(A.alloc(&m->norm, (size_t)H, "norm"));
  if (cfg->tie_embeddings) m->lm_head = m->embed;
  else RF_TRY(A.alloc(&m->lm_head, (size_t)m->V * H, "lm_head"));
  m->layers.resize(m->NL);
  for (int l = 0; l < m->NL; l++) {
    LayerW& w = m->layers[l];
    RF_TRY(A.alloc(&w.in_norm, (size_t)H, "input_layernorm"));
    RF_TRY(A.alloc(&w.post_norm, (size_t)H, "post_attention_layernorm"));
    RF_TRY(A.alloc(&w.wqkv, (size_t)m->qkvd * H, "q/k/v_proj"));
    if (cfg->qkv_bias) RF_TRY(A.alloc(&w.bqkv, (size_t)m->qkvd, "q/k/v bias"));
    if (cfg->qk_norm) RF_TRY(A.alloc(&w.qk_norm, (size_t)2 * m->hd, "q/k norm"));
    RF_TRY(A.alloc(&w.wo, (size_t)H * m->qd, "o_proj"));
    RF_TRY(A.alloc(&w.wgu, (size_t)2 * m->I * H, "gate/up_proj"));
    RF_TRY(A.alloc(&w.wdown, (size_t)H * m->I, "down_proj"));
  }
  std::vector<float> inv = rf::rope_inv_freq(*cfg);
  RF_TRY(A.alloc(&m->inv_freq, inv.size(), "rope inv_freq"));
  CU_CHECK(cudaMemcpyAsync(m->inv_freq, inv.data(), inv.size() * 4, cudaMemcpyHostToDevice, m->stream));
  m->staging_bytes = (size_t)32 << 20;
  {
    uint8_t* st = nullptr;
    RF_TRY(A.alloc(&st, m->staging_bytes, "upload staging"));
    m->staging = st;
  }
  CU_CHECK(cudaStreamSynchronize(m->stream));
  m->set.assign(rf::tensor_slot_count(*cfg), 0);
  score_model_created();
  m->counted = true;
  guard.p = nullptr;
  *out = m.release();
  return RF_OK;
}

int set_tensor_impl(rf_model* m, const char* name, const void* data, int32_t dtype, const int64_t* shape,
                    int32_t ndim) {
  rf::TensorId id{};
  RF_TRY(rf::check_tensor(m->cfg, name, dtype, shape, ndim, &id));
  CU_CHECK(cudaSetDevice(m->dev));
  int64_t count = 0;
  uint16_t* dst = tensor_dst(m, id, &count);
  if (!dst) return set_error(RF_ERR_INTERNAL, "no destination for tensor '%s'", name);
  if (dtype == m->adt) {
    CU_CHECK(cudaMemcpyAsync(dst, data, (size_t)count * 2, cudaMemcpyHostToDevice, m->stream));
  } else {
    const int es = rf::dtype_size(dtype);
    const int64_t chunk = (int64_t)(m->staging_bytes / es);
    for (int64_t off = 0; off < count; off += chunk) {
      int64_t c = std::min(chunk, count - off);
      CU_CHECK(cudaMemcpyAsync(m->staging, (const uint8_t*)data + off * es, (size_t)(c * es), cudaMemcpyHostToDevice,
                               m->stream));
      RF_LAUNCH(k_convert, nblocks(c, 256), 256, 0, m->stream)(m->staging, dtype, dst + off, c, m->f16);
      KERNEL_CHECK();
    }
  }
  CU_CHECK(cudaStreamSynchronize(m->stream));
  m->set[rf::tensor_slot(m->cfg, id)] = 1;
  return RF_OK;
}

int init_random_impl(rf_model* m, uint64_t seed, float std) {
  CU_CHECK(cudaSetDevice(m->dev));
  uint64_t tix = 0;
  auto normal = [&](uint16_t* p, int64_t n) -> int {
    uint64_t key = seed * 0x9E3779B97F4A7C15ull + (++tix) * 0xD1B54A32D192ED03ull;
    RF_LAUNCH(k_init_normal, nblocks(n, 256), 256, 0, m->stream)(p, n, key, std, m->f16);
    KERNEL_CHECK();
    return RF_OK;
  };
  auto fill = [&](uint16_t* p, int64_t n, float v) -> int {
    RF_LAUNCH(k_fill, nblocks(n, 256), 256, 0, m->stream)(p, n, v, m->f16);
    KERNEL_CHECK();
    return RF_OK;
  };
  const int64_t H = m->H;
  RF_TRY(normal(m->embed, (int64_t)m->V * H));
  if (!m->cfg.tie_embeddings) RF_TRY(normal(m->lm_head, (int64_t)m->V * H));
  RF_TRY(fill(m->norm, H, 1.f));
  for (int l = 0; l < m->NL; l++) {
    LayerW& w = m->layers[l];
    RF_TRY(fill(w.in_norm, H, 1.f));
    RF_TRY(fill(w.post_norm, H, 1.f));
    RF_TRY(normal(w.wqkv, (int64_t)m->qkvd * H));
    if (w.bqkv) RF_TRY(fill(w.bqkv, m->qkvd, 0.f));
    if (w.qk_norm) RF_TRY(fill(w.qk_norm, 2 * (int64_t)m->hd, 1.f));
    RF_TRY(normal(w.wo, H * m->qd));
    RF_TRY(normal(w.wgu, 2 * (int64_t)m->I * H));
    RF_TRY(normal(w.wdown, H * m->I));
  }
  CU_CHECK(cudaStreamSynchronize(m->stream));
  std::fill(m->set.begin(), m->set.end(), (uint8_t)1);
  return RF_OK;
}

}  // namespace
