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
  s->arena.free_all();
  cudaGetLastError();
  if (s->m) model_release_child(s->m);
  s->m = nullptr;
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
  const size_t T = (size_t)max_tokens, hd = (size_t)m->hd, nKV = (size_t)m->nKV, N = (size_t)s->S;
  DevArena& A = s->arena;
  s->Kc.resize(m->NL);
  s->Vc.resize(m->NL);
  for (int l = 0; l < m->NL; l++) {
    RF_TRY(A.alloc(&s->Kc[l], nKV * T * hd, "sequence K cache"));
    RF_TRY(A.alloc(&s->Vc[l], nKV * T * hd, "sequence V cache"));
  }
  RF_TRY(A.alloc(&s->x, N * m->H, "activations x"));
  RF_TRY(A.alloc(&s->xn, N * m->H, "activations xn"));
  RF_TRY(A.alloc(&s->qkv, N * m->qkvd, "activations qkv"));
  RF_TRY(A.alloc(&s->qrot, N * m->qd, "activations q_rot"));
  RF_TRY(A.alloc(&s->attn, N * m->qd, "activations attn"));
  RF_TRY(A.alloc(&s->gu, N * 2 * m->I, "activations gate/up"));
  RF_TRY(A.alloc(&s->hbuf, N * m->I, "activations mlp"));
  RF_TRY(A.alloc(&s->logits, (size_t)m->V, "logits"));
  s->nsplit_max = (max_tokens + DEC_SPLIT - 1) / DEC_SPLIT;
  RF_TRY(A.alloc(&s->part, (size_t)m->nH * s->nsplit_max * (hd + 2), "decode partials"));
  RF_TRY(A.alloc(&s->tok, N, "tokens"));
  s->host_logits.resize(m->V);
  guard.p = nullptr;
  *out = s.release();
  return RF_OK;
}

int seq_forward_impl(rf_seq* s, const int32_t* tokens, int n, float* logits_out) {
  rf_model* m = s->m;
  CU_CHECK(cudaSetDevice(m->dev));
  s->has_logits = false;
  Acts a{s->x, s->xn, s->qkv, s->qrot, s->attn, s->gu, s->hbuf};
  const float scale = 1.f / sqrtf((float)m->hd);
  int nb = 0;
  for (int off = 0; off < n; off += nb) {
    nb = std::min(s->S, n - off);
    const int pos0 = s->len;
    RF_TRY(upload_tokens(m, s->tok, tokens + off, nb, s->x));
    for (int l = 0; l < m->NL; l++) {
      const LayerW& W = m->layers[l];
      RF_TRY(run_qkv(m, W, a, nb));
      RF_LAUNCH(k_rope_q, nblocks((int64_t)nb * m->nH * (m->hd / 2), 256), 256, 0, m->stream)
      (s->qkv, m->qkvd, s->qrot, nb, m->nH, m->hd, pos0, m->inv_freq, m->f16);
      KERNEL_CHECK();
      RF_LAUNCH(k_append_kv, nblocks((int64_t)nb * m->nKV * (m->hd / 2), 256), 256, 0, m->stream)
      (s->qkv, m->qkvd, m->qd, m->qd + m->kvd, s->Kc[l], s->Vc[l], s->maxT, nb, m->nKV, m->hd, pos0, true, m->inv_freq,
       m->f16);
      KERNEL_CHECK();
      const int total = pos0 + nb;
      if (nb == 1) {
        const int nsplit = (total + DEC_SPLIT - 1) / DEC_SPLIT;
        dim3 grid((unsigned)m->nH, (unsigned)nsplit);
        RF_LAUNCH(k_decode_partial, grid, 128, 0, m->stream)
        (s->qrot, s->Kc[l], s->Vc[l], s->maxT, s->part, s->nsplit_max, total, m->G, m->hd, scale, m->f16);
        KERNEL_CHECK();
        RF_LAUNCH(k_decode_combine, m->nH, 128, 0, m->stream)(s->part, s->nsplit_max, nsplit, m->hd, s->attn, m->f16);
        KERNEL_CHECK();
      } else {
        RF_TRY(launch_flash(m, s->qrot, s->Kc[l], s->Vc[l], s->maxT, s->attn, nullptr, nullptr, 0, 0, nb, pos0, total));
      }
      RF_TRY(run_post_attn(m, W, a, nb));
    }
    s->len += nb;
  }
  // logits of the last token
  RF_TRY(run_rmsnorm(m, s->x + (size_t)(nb - 1) * m->H, m->norm, s->xn, 1));
  RF_TRY(m->gemm.nt(1, m->V, m->H, s->xn, m->adt, m->H, m->lm_head, m->adt, m->H, s->logits, RF_F32, m->V, 0.f));
  CU_CHECK(cudaMemcpyAsync(s->host_logits.data(), s->logits, (size_t)m->V * 4, cudaMemcpyDeviceToHost, m->stream));
  CU_CHECK(cudaStreamSynchronize(m->stream));
  if (logits_out) memcpy(logits_out, s->host_logits.data(), (size_t)m->V * 4);
  s->has_logits = true;
  return RF_OK;
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
  return RF_OK;
}

}  // namespace
