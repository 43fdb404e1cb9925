/*
 * gpu/abi.cuh — the C ABI of cuda/reform.h for the CUDA build.
 * Part of the single translation unit cuda/reform_cuda.cu (included there, in order).
 */
/* ======================================================================================
 * C ABI
 * ====================================================================================== */
extern "C" {

RF_API int rf_abi_version(void) { return RF_ABI_VERSION; }
RF_API const char* rf_backend_name(void) { return "cuda"; }
RF_API const char* rf_last_error(void) { return rf::last_error_ref().c_str(); }
RF_API int rf_last_error_code(void) { return rf::last_error_code_ref(); }

RF_API int rf_device_count(void) {
  std::string why;
  int n = device_count_impl(&why);
  if (n <= 0) set_error(RF_ERR_NODEVICE, "no usable CUDA device: %s", why.c_str());
  return n;
}

RF_API int rf_device_info(char* buf, int32_t buflen) {
  if (!buf || buflen <= 0) return set_error(RF_ERR_INVALID, "buffer is NULL or empty");
  std::string why;
  int n = device_count_impl(&why);
  std::string s;
  const CublasLib& lib = cublas_lib();
  std::string gemm = lib.ok ? "cuBLAS (" + lib.name + ")" : "built-in tiled GEMM (cuBLAS unavailable: " + lib.why + ")";
  if (n <= 0) {
    s = "cuda: no usable device (" + why + "); GEMM: " + gemm;
  } else {
    int dev = device_index();
    cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, dev < n ? dev : 0);
    if (e != cudaSuccess) {
      cudaGetLastError();
      s = std::string("cuda: ") + std::to_string(n) + " device(s), properties unavailable: " + cudaGetErrorString(e);
    } else {
      char tmp[512];
      snprintf(tmp, sizeof tmp, "cuda: device %d/%d %s (sm_%d%d, %.1f GiB, %d SMs); GEMM: ", dev < n ? dev : 0, n,
               p.name, p.major, p.minor, p.totalGlobalMem / 1073741824.0, p.multiProcessorCount);
      s = tmp + gemm;
    }
  }
  snprintf(buf, (size_t)buflen, "%s", s.c_str());
  return RF_OK;
}

RF_API int rf_set_threads(int32_t n) {
  (void)n;
  return RF_OK;
}

RF_API rf_model* rf_model_create(const rf_config* cfg) {
  rf::clear_error();
  rf_model* m = nullptr;
  try {
    if (model_create_impl(cfg, &m) != RF_OK) return nullptr;
  } catch (const std::bad_alloc&) {
    set_error(RF_ERR_OOM, "host allocation failed");
    return nullptr;
  } catch (...) {
    set_error(RF_ERR_INTERNAL, "unexpected exception");
    return nullptr;
  }
  return m;
}

RF_API int rf_model_set_tensor(rf_model* m, const char* name, const void* data, int32_t dtype, const int64_t* shape,
                               int32_t ndim) {
  try {
    return set_tensor_impl(m, name, data, dtype, shape, ndim);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}

RF_API int rf_model_init_random(rf_model* m, uint64_t seed, float std) {
  try {
    return init_random_impl(m, seed, std);
  } catch (...) {
    return set_error(RF_ERR_INTERNAL, "unexpected exception");
  }
}

RF_API int rf_model_finalize(rf_model* m) {
  if (!m) return set_error(RF_ERR_INVALID, "model is NULL");
  RF_TRY(rf::check_complete(m->cfg, m->set));
  m->finalized = true;
  return RF_OK;
}

RF_API int64_t rf_model_memory_bytes(const rf_model* m) {
  if (!m) return set_error(RF_ERR_INVALID, "model is NULL");
  return m->arena.bytes;
}

RF_API void rf_model_destroy(rf_model* m) {
  if (!m || m->destroyed) return;
  m->destroyed = true;
  if (m->children > 0) return;  // the last compressor / seq frees it (CPU build semantics)
  model_free(m);
  delete m;
}

RF_API rf_compressor* rf_compressor_create(rf_model* m, const rf_compress_params* p, const int32_t* heads,
                                           int32_t n_heads) {
  rf::clear_error();
  rf_compressor* c = nullptr;
  try {
    if (comp_create_impl(m, p, heads, n_heads, &c) != RF_OK) return nullptr;
  } catch (...) {
    set_error(RF_ERR_OOM, "host allocation failed");
    return nullptr;
  }
  return c;
}

RF_API int32_t rf_compressor_embed_dim(const rf_compressor* c) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  return c->edim;
}
RF_API int32_t rf_compressor_exit_layer(const rf_compressor* c) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  return c->exit;
}

RF_API int rf_compressor_process(rf_compressor* c, const int32_t* tokens, int32_t n, void* out_emb) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  try {
    return comp_forward(c, tokens, n, out_emb, true);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}

RF_API int rf_compressor_embed(rf_compressor* c, const int32_t* tokens, int32_t n, void* out_emb) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  if (!out_emb) return set_error(RF_ERR_INVALID, "out_emb is NULL");
  try {
    return comp_forward(c, tokens, n, out_emb, false);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}

RF_API int64_t rf_compressor_cache_len(const rf_compressor* c) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  return c->len;
}
RF_API int64_t rf_compressor_seen(const rf_compressor* c) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  return c->seen;
}
RF_API int rf_compressor_reset(rf_compressor* c) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  c->len = 0;
  c->seen = 0;
  return RF_OK;
}
RF_API int64_t rf_compressor_state_size(const rf_compressor* c) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  return rf::state_size(c->exit + 1, c->m->nKV, c->m->hd, c->len);
}
RF_API int rf_compressor_state_save(const rf_compressor* c, void* buf, int64_t size) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  try {
    return state_save_impl(c, buf, size);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}
RF_API int rf_compressor_state_load(rf_compressor* c, const void* buf, int64_t size) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  try {
    return state_load_impl(c, buf, size);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}
RF_API void rf_compressor_destroy(rf_compressor* c) {
  if (!c) return;
  comp_free(c);
  delete c;
}

RF_API int rf_score(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
                    float* out) {
  try {
    return score_impl(ctx, ctx_dtype, n_ctx, dim, q, n_q, out);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}

RF_API rf_seq* rf_seq_create(rf_model* m, int32_t max_tokens) {
  rf::clear_error();
  rf_seq* s = nullptr;
  try {
    if (seq_create_impl(m, max_tokens, &s) != RF_OK) return nullptr;
  } catch (...) {
    set_error(RF_ERR_OOM, "host allocation failed");
    return nullptr;
  }
  return s;
}

RF_API int rf_seq_forward(rf_seq* s, const int32_t* tokens, int32_t n, float* logits_out) {
  if (!s) return set_error(RF_ERR_INVALID, "seq is NULL");
  try {
    return seq_forward_impl(s, tokens, n, logits_out);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}

RF_API int32_t rf_seq_sample(rf_seq* s, float temperature, float top_p, int32_t top_k, uint64_t* rng_state) {
  if (!s) return set_error(RF_ERR_INVALID, "seq is NULL");
  if (!s->has_logits) return set_error(RF_ERR_STATE, "no logits: call rf_seq_forward first");
  if (std::isnan(temperature) || std::isnan(top_p)) return set_error(RF_ERR_INVALID, "rf_seq_sample: NaN parameter");
  try {
    return rf::sample_logits(s->host_logits.data(), s->m->V, temperature, top_p, top_k, rng_state);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}

RF_API int32_t rf_sample_logits(const float* logits, int32_t n, float temperature, float top_p, int32_t top_k,
                                uint64_t* rng_state) {
  return rf::sample_logits_checked(logits, n, temperature, top_p, top_k, rng_state);
}

RF_API int32_t rf_seq_length(const rf_seq* s) {
  if (!s) return set_error(RF_ERR_INVALID, "seq is NULL");
  return s->len;
}
RF_API int rf_seq_reset(rf_seq* s) {
  if (!s) return set_error(RF_ERR_INVALID, "seq is NULL");
  s->len = 0;
  s->has_logits = false;
  return RF_OK;
}
RF_API int rf_seq_import_compressor(rf_seq* s, const rf_compressor* c) {
  if (!s || !c) return set_error(RF_ERR_INVALID, "seq or compressor is NULL");
  try {
    return seq_import_impl(s, c);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}
RF_API void rf_seq_destroy(rf_seq* s) {
  if (!s) return;
  seq_free(s);
  delete s;
}

}  // extern "C"
