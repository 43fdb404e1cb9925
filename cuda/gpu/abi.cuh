/*
 * gpu/abi.cuh — the C ABI of cuda/reform.h for the CUDA build: argument checks and the exception boundary
 * (both shared with the CPU build, cuda/abi_guard.h) around the *_impl functions of the parts before.
 * Part of the single translation unit cuda/reform_cuda.cu (included there, in order).
 */
extern "C" {

RF_API int rf_abi_version(void) { return RF_ABI_VERSION; }
RF_API const char* rf_backend_name(void) { return "cuda"; }
RF_API const char* rf_last_error(void) { return rf::last_error_ref().c_str(); }
RF_API int rf_last_error_code(void) { return rf::last_error_code_ref(); }
RF_API const char* rf_struct_layout(void) {
  return rf::guard("rf_struct_layout", [&]() -> const char* { return rf::struct_layout(); });
}

RF_API int rf_device_count(void) {
  return rf::guard("rf_device_count", [&]() -> int {
    std::string why;
    int n = device_count_impl(&why);
    if (n <= 0) set_error(RF_ERR_NODEVICE, "no usable CUDA device: %s", why.c_str());
    return n;
  });
}

RF_API int rf_device_info(char* buf, int32_t buflen) {
  return rf::guard("rf_device_info", [&]() -> int {
    if (!buf || buflen <= 0) return set_error(RF_ERR_INVALID, "rf_device_info: buffer is NULL or empty");
    std::string why;
    int n = device_count_impl(&why);
    std::string s;
    const CublasLib& lib = cublas_lib();
    std::string gemm = lib.ok ? "cuBLAS (" + lib.name + ")"
                              : "built-in tiled GEMM (WARNING: cuBLAS unavailable, matrix products are many times "
                                "slower: " +
                                    lib.why + ")";
    int drv = 0, rt = 0;
    cudaDriverGetVersion(&drv);
    cudaRuntimeGetVersion(&rt);
    cudaGetLastError();
    char ver[160];
    snprintf(ver, sizeof ver, "; driver %d.%d, runtime %d.%d%s", drv / 1000, drv % 1000 / 10, rt / 1000, rt % 1000 / 10,
             drv < rt ? " (WARNING: the driver is older than the CUDA runtime this library was built with)" : "");
    gemm += ver;
    if (decode_graphs_enabled()) gemm += "; decode steps: CUDA graphs (REFORM_CUDA_GRAPH=1)";
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
  });
}

RF_API int rf_set_threads(int32_t n) { return rf::check_threads(n); }  // no host thread pool in this build

/* ---- model ---- */
RF_API rf_model* rf_model_create(const rf_config* cfg) {
  return rf::guard("rf_model_create", [&]() -> rf_model* {
    rf_model* m = nullptr;
    return model_create_impl(cfg, &m) == RF_OK ? m : nullptr;
  });
}

RF_API int rf_model_set_tensor(rf_model* m, const char* name, const void* data, int32_t dtype, const int64_t* shape,
                               int32_t ndim) {
  return rf::guard("rf_model_set_tensor", [&]() -> int {
    RF_TRY(rf::check_set_tensor(m, name, data));
    return set_tensor_impl(m, name, data, dtype, shape, ndim);
  });
}

RF_API int rf_model_init_random(rf_model* m, uint64_t seed, float std) {
  return rf::guard("rf_model_init_random", [&]() -> int {
    RF_TRY(rf::check_init_random(m, std));
    return init_random_impl(m, seed, std);
  });
}

RF_API int rf_model_finalize(rf_model* m) {
  return rf::guard("rf_model_finalize", [&]() -> int {
    RF_TRY(rf::check_not_null(m, "model", "rf_model_finalize"));
    RF_TRY(rf::check_complete(m->cfg, m->set));
    m->finalized = true;
    return RF_OK;
  });
}

RF_API int64_t rf_model_memory_bytes(const rf_model* m) {
  RF_TRY(rf::check_not_null(m, "model", "rf_model_memory_bytes"));
  return m->arena.bytes;
}

RF_API int rf_memory_info(const rf_model* m, int64_t* out, int32_t n) {
  return rf::guard("rf_memory_info", [&]() -> int {
    RF_TRY(rf::check_not_null(m, "model", "rf_memory_info"));
    if (!out || n <= 0) return set_error(RF_ERR_INVALID, "rf_memory_info: output is NULL or empty");
    CU_CHECK(cudaSetDevice(m->dev));
    size_t fr = 0, tot = 0;
    CU_CHECK(cudaMemGetInfo(&fr, &tot));
    int64_t score_bytes = 0;
    {
      std::lock_guard<std::mutex> lk(g_score.mu);
      score_bytes = g_score.arena.bytes;
    }
    const int64_t v[5] = {(int64_t)fr, (int64_t)tot, m->arena.bytes,
                          m->ws.arena.bytes + m->qs.arena.bytes + score_bytes, (int64_t)m->NL * 2 * m->nKV * m->hd * 2};
    const int k = n < 5 ? n : 5;
    for (int i = 0; i < k; i++) out[i] = v[i];
    return k;
  });
}

RF_API void rf_model_destroy(rf_model* m) {
  if (!m || m->destroyed) return;
  m->destroyed = true;
  if (m->children > 0) return;  // the last compressor / seq frees it (CPU build semantics)
  model_free(m);
  delete m;
}

/* ---- compressor ---- */
RF_API rf_compressor* rf_compressor_create(rf_model* m, const rf_compress_params* p, const int32_t* heads,
                                           int32_t n_heads) {
  return rf::guard("rf_compressor_create", [&]() -> rf_compressor* {
    rf_compressor* c = nullptr;
    if (rf::check_model_ready(m, "rf_compressor_create") != RF_OK) return nullptr;
    return comp_create_impl(m, p, heads, n_heads, &c) == RF_OK ? c : nullptr;
  });
}

RF_API int32_t rf_compressor_embed_dim(const rf_compressor* c) {
  RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_embed_dim"));
  return c->edim;
}
RF_API int32_t rf_compressor_exit_layer(const rf_compressor* c) {
  RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_exit_layer"));
  return c->exit;
}

static int compressor_call(rf_compressor* c, const int32_t* tokens, int32_t n, void* out_emb, bool update,
                           const char* where) {
  return rf::guard(where, [&]() -> int {
    RF_TRY(rf::check_not_null(c, "compressor", where));
    RF_TRY(rf::check_chunk(tokens, n, c->p.max_chunk, c->m->V, out_emb, !update, where));
    if (update) RF_TRY(rf::check_no_pending(c->npend, where));
    return comp_forward(c, tokens, n, out_emb, update);
  });
}
RF_API int rf_compressor_submit(rf_compressor* c, const int32_t* tokens, int32_t n) {
  return rf::guard("rf_compressor_submit", [&]() -> int {
    RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_submit"));
    RF_TRY(rf::check_submit(tokens, n, c->p.max_chunk, c->m->V, c->npend));
    return comp_submit(c, tokens, n);
  });
}
RF_API int rf_compressor_collect(rf_compressor* c, void* out_emb) {
  return rf::guard("rf_compressor_collect", [&]() -> int {
    RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_collect"));
    RF_TRY(rf::check_not_null(out_emb, "out_emb", "rf_compressor_collect"));
    return comp_collect(c, out_emb);
  });
}
RF_API int32_t rf_compressor_pending(const rf_compressor* c) {
  RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_pending"));
  return c->npend;
}
RF_API int rf_compressor_process(rf_compressor* c, const int32_t* tokens, int32_t n, void* out_emb) {
  return compressor_call(c, tokens, n, out_emb, true, "rf_compressor_process");
}
RF_API int rf_compressor_embed(rf_compressor* c, const int32_t* tokens, int32_t n, void* out_emb) {
  return compressor_call(c, tokens, n, out_emb, false, "rf_compressor_embed");
}

RF_API int64_t rf_compressor_cache_len(const rf_compressor* c) {
  RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_cache_len"));
  return c->len;
}
RF_API int64_t rf_compressor_seen(const rf_compressor* c) {
  RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_seen"));
  return c->seen;
}
RF_API int64_t rf_compressor_memory_bytes(const rf_compressor* c) {
  RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_memory_bytes"));
  return c->arena.bytes;
}
RF_API int rf_compressor_reset(rf_compressor* c) {
  RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_reset"));
  c->len = 0;
  c->seen = 0;
  c->npend = 0;  // a pending copy still lands in its slot; the next submit's copy is queued behind it
  return RF_OK;
}
RF_API int64_t rf_compressor_state_size(const rf_compressor* c) {
  RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_state_size"));
  return rf::state_size(c->ncache, c->m->nKV, c->m->hd, c->len);
}
RF_API int rf_compressor_state_save(const rf_compressor* c, void* buf, int64_t size) {
  return rf::guard("rf_compressor_state_save", [&]() -> int {
    RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_state_save"));
    RF_TRY(rf::check_no_pending(c->npend, "rf_compressor_state_save"));
    RF_TRY(rf::check_state_save(buf, size, state_header_of(c)));
    return state_save_impl(c, buf);
  });
}
RF_API int rf_compressor_state_load(rf_compressor* c, const void* buf, int64_t size) {
  return rf::guard("rf_compressor_state_load", [&]() -> int {
    RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_state_load"));
    RF_TRY(rf::check_no_pending(c->npend, "rf_compressor_state_load"));
    rf::StateHeader blob{};
    RF_TRY(rf::check_state_load(buf, size, state_header_of(c), &blob));
    return state_load_impl(c, buf, blob);
  });
}
RF_API void rf_compressor_destroy(rf_compressor* c) {
  if (!c) return;
  comp_free(c);
  delete c;
}

/* ---- scoring ---- */
namespace {
/* rf_score's checks and scoring, each query row's offset (q_offset, or NULL) taken off, with the query row pairs'
 * matches (n_pairs 0: none): rf_score and rf_score_select */
int score_checked(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
                  const float* q_offset, const int32_t* pairs, int32_t n_pairs, const float* pair_offset, float* out) {
  RF_TRY(rf::check_score_args(ctx, ctx_dtype, n_ctx, dim, q, n_q, out));
  return n_ctx == 0 ? RF_OK
                    : score_impl(ctx, ctx_dtype, n_ctx, dim, q, n_q, q_offset, pairs, n_pairs, pair_offset, out);
}
}  // namespace

RF_API int rf_score(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
                    float* out) {
  return rf::guard("rf_score", [&]() -> int {
    return score_checked(ctx, ctx_dtype, n_ctx, dim, q, n_q, nullptr, nullptr, 0, nullptr, out);
  });
}

/* the k-th best cosine of each query row (and match of each query row pair): rf_score's blocks and cosines on the
 * device (score.cuh), each column's k largest kept per group of rows there, the last k-th of those on the host */
RF_API int rf_score_kth(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
                        const int32_t* pairs, int32_t n_pairs, int32_t k, float* out) {
  return rf::guard("rf_score_kth", [&]() -> int {
    RF_TRY(rf::check_score_kth(ctx, ctx_dtype, n_ctx, dim, q, n_q, k, out, "rf_score_kth"));
    RF_TRY(rf::check_pairs(pairs, n_pairs, nullptr, n_q, "rf_score_kth"));
    if (n_ctx == 0) {
      std::fill(out, out + n_q + n_pairs, -INFINITY);
      return RF_OK;
    }
    return score_kth_impl(ctx, ctx_dtype, n_ctx, dim, q, n_q, pairs, n_pairs, k, out);
  });
}

/* ---- resident context embeddings ---- */
RF_API rf_embstore* rf_embstore_create(rf_model* m, int32_t dim) {
  return rf::guard("rf_embstore_create", [&]() -> rf_embstore* {
    rf_embstore* e = nullptr;
    if (rf::check_model_ready(m, "rf_embstore_create") != RF_OK || rf::check_embstore_create(dim) != RF_OK)
      return nullptr;
    return embstore_create_impl(m, dim, &e) == RF_OK ? e : nullptr;
  });
}
RF_API int rf_embstore_append(rf_embstore* e, const uint16_t* rows, int64_t n) {
  return rf::guard("rf_embstore_append", [&]() -> int {
    RF_TRY(rf::check_not_null(e, "store", "rf_embstore_append"));
    RF_TRY(rf::check_embstore_append(rows, n));
    if (n == 0) return RF_OK;
    return embstore_append_impl(e, rows, n);
  });
}
RF_API int64_t rf_embstore_rows(const rf_embstore* e) {
  RF_TRY(rf::check_not_null(e, "store", "rf_embstore_rows"));
  return e->rows;
}
RF_API int64_t rf_embstore_memory_bytes(const rf_embstore* e) {
  RF_TRY(rf::check_not_null(e, "store", "rf_embstore_memory_bytes"));
  return embstore_bytes(e);
}
RF_API int64_t rf_embstore_score_select(rf_embstore* e, int64_t n_ctx, const float* q, int32_t n_q,
                                        const float* q_offset, const int32_t* pairs, int32_t n_pairs,
                                        const float* pair_offset, int32_t window, int32_t lag, int32_t pool,
                                        int64_t budget, int32_t edge, float* scores, int32_t* out_idx) {
  return rf::guard("rf_embstore_score_select", [&]() -> int64_t {
    RF_TRY(rf::check_not_null(e, "store", "rf_embstore_score_select"));
    RF_TRY(rf::check_embstore_score(n_ctx, e->rows, q, n_q, budget, out_idx));
    RF_TRY(rf::check_offsets(q_offset, n_q, "rf_embstore_score_select"));
    RF_TRY(rf::check_pairs(pairs, n_pairs, pair_offset, n_q, "rf_embstore_score_select"));
    return rf::score_select(
        [&](float* s) { return embstore_score_impl(e, n_ctx, q, n_q, q_offset, pairs, n_pairs, pair_offset, s); },
        n_ctx, window, lag, pool, budget, edge, scores, out_idx);
  });
}
RF_API int rf_embstore_score_kth(rf_embstore* e, int64_t n_ctx, const float* q, int32_t n_q, const int32_t* pairs,
                                 int32_t n_pairs, int32_t k, float* out) {
  return rf::guard("rf_embstore_score_kth", [&]() -> int {
    RF_TRY(rf::check_not_null(e, "store", "rf_embstore_score_kth"));
    RF_TRY(rf::check_embstore_kth(n_ctx, e->rows, "rf_embstore_score_kth"));
    // the rows are the store's (never NULL here)
    RF_TRY(rf::check_score_kth(e, RF_F16, n_ctx, e->dim, q, n_q, k, out, "rf_embstore_score_kth"));
    RF_TRY(rf::check_pairs(pairs, n_pairs, nullptr, n_q, "rf_embstore_score_kth"));
    return embstore_score_kth_impl(e, n_ctx, q, n_q, pairs, n_pairs, k, out);
  });
}
RF_API void rf_embstore_destroy(rf_embstore* e) {
  if (!e) return;
  embstore_free(e);
  delete e;
}

/* ---- recompute + generate ---- */
RF_API rf_seq* rf_seq_create(rf_model* m, int32_t max_tokens) {
  return rf::guard("rf_seq_create", [&]() -> rf_seq* {
    rf_seq* s = nullptr;
    if (rf::check_model_ready(m, "rf_seq_create") != RF_OK || rf::check_seq_create(max_tokens) != RF_OK) return nullptr;
    return seq_create_impl(m, max_tokens, &s) == RF_OK ? s : nullptr;
  });
}

RF_API int rf_seq_forward(rf_seq* s, const int32_t* tokens, int32_t n, float* logits_out) {
  return rf::guard("rf_seq_forward", [&]() -> int {
    RF_TRY(rf::check_not_null(s, "seq", "rf_seq_forward"));
    RF_TRY(rf::check_seq_append(tokens, n, s->len, s->maxT, s->m->V, "rf_seq_forward"));
    return seq_forward_impl(s, tokens, n, logits_out);
  });
}

RF_API int32_t rf_seq_sample(rf_seq* s, float temperature, float top_p, int32_t top_k, uint64_t* rng_state) {
  return rf::guard("rf_seq_sample", [&]() -> int32_t {
    RF_TRY(rf::check_not_null(s, "seq", "rf_seq_sample"));
    RF_TRY(rf::check_seq_sample(s->has_logits, temperature, top_p));
    return seq_sample_impl(s, temperature, top_p, top_k, rng_state);
  });
}

RF_API int32_t rf_sample_logits(const float* logits, int32_t n, float temperature, float top_p, int32_t top_k,
                                uint64_t* rng_state) {
  return rf::sample_logits_checked(logits, n, temperature, top_p, top_k, rng_state);
}

RF_API int32_t rf_seq_length(const rf_seq* s) {
  RF_TRY(rf::check_not_null(s, "seq", "rf_seq_length"));
  return s->len;
}
RF_API int rf_seq_reset(rf_seq* s) {
  RF_TRY(rf::check_not_null(s, "seq", "rf_seq_reset"));
  s->len = 0;
  s->has_logits = false;
  s->host_logits_valid = false;
  return RF_OK;
}
RF_API int rf_seq_import_compressor(rf_seq* s, const rf_compressor* c) {
  return rf::guard("rf_seq_import_compressor", [&]() -> int {
    RF_TRY(rf::check_not_null(s, "seq", "rf_seq_import_compressor"));
    RF_TRY(rf::check_not_null(c, "compressor", "rf_seq_import_compressor"));
    RF_TRY(rf::check_import(c->m == s->m, c->exit, s->m->NL, c->len, s->maxT));
    return seq_import_impl(s, c);
  });
}
RF_API void rf_seq_destroy(rf_seq* s) {
  if (!s) return;
  seq_free(s);
  delete s;
}

RF_API const void* rf_map_file(const char* path, int64_t* out_bytes) {
  return rf::guard("rf_map_file", [&]() -> const void* { return rf::map_file(path, out_bytes); });
}
RF_API int rf_unmap_file(const void* p, int64_t bytes) {
  return rf::guard("rf_unmap_file", [&]() -> int { return rf::unmap_file(p, bytes); });
}

RF_API int64_t rf_smooth_select(const float* scores, int64_t n, int32_t window, int32_t lag, int32_t pool,
                                int64_t budget, int32_t edge, float* smoothed, int32_t* out_idx) {
  return rf::guard("rf_smooth_select", [&]() -> int64_t {
    return rf::smooth_select(scores, n, window, lag, pool, budget, edge, smoothed, out_idx);
  });
}

/* scoring on the device (rf_score's kernels, with the offsets), smoothing and selection on the host */
RF_API int64_t rf_score_select(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q,
                               int32_t n_q, const float* q_offset, const int32_t* pairs, int32_t n_pairs,
                               const float* pair_offset, int32_t window, int32_t lag, int32_t pool, int64_t budget,
                               int32_t edge, float* scores, int32_t* out_idx) {
  return rf::guard("rf_score_select", [&]() -> int64_t {
    RF_TRY(rf::check_offsets(q_offset, n_q, "rf_score_select"));
    RF_TRY(rf::check_pairs(pairs, n_pairs, pair_offset, n_q, "rf_score_select"));
    return rf::score_select(
        [&](float* s) {
          return score_checked(ctx, ctx_dtype, n_ctx, dim, q, n_q, q_offset, pairs, n_pairs, pair_offset, s);
        },
        n_ctx, window, lag, pool, budget, edge, scores, out_idx);
  });
}

/* rf_score_kth, then rf_score_select over the question's rows and a zero row with the k-th bests as offsets (the
 * CPU build's one pass keeps the same values; on the device the second GEMM is cheap) */
RF_API int64_t rf_score_kth_select(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q,
                                   int32_t n_q, const int32_t* pairs, int32_t n_pairs, int32_t k, int32_t window,
                                   int32_t lag, int32_t pool, int64_t budget, int32_t edge, float* kth, float* scores,
                                   int32_t* out_idx) {
  return rf::guard("rf_score_kth_select", [&]() -> int64_t {
    return rf::kth_select(ctx, ctx_dtype, n_ctx, dim, q, n_q, pairs, n_pairs, k, window, lag, pool, budget, edge, kth,
                          scores, out_idx, [&](float* kv, float* s) -> int {
                            std::fill(kv, kv + n_q + n_pairs, -INFINITY);
                            if (n_ctx == 0) return RF_OK;
                            RF_TRY(score_kth_impl(ctx, ctx_dtype, n_ctx, dim, q, n_q, pairs, n_pairs, k, kv));
                            const rf::KthQuery kq = rf::kth_query(q, n_q, dim, kv, n_pairs);
                            return score_checked(ctx, ctx_dtype, n_ctx, dim, kq.q.data(), n_q + 1, kq.off.data(), pairs,
                                                 n_pairs, kq.pair_off.data(), s);
                          });
  });
}

}  // extern "C"
