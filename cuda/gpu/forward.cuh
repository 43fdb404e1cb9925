/*
 * gpu/forward.cuh — forward-pass pieces shared by the compressor and the sequence (embedding upload, q/k/v, attention
 * launch, o_proj + MLP).
 * Part of the single translation unit cuda/reform_cuda.cu (included there, in order).
 */
namespace {

/* ---------------- shared forward pieces ---------------- */
struct Acts {
  uint16_t *x, *xn, *qkv, *qrot, *attn, *gu, *hbuf;
};

int launch_flash(rf_model* m, const uint16_t* Q, const uint16_t* K, const uint16_t* V, int64_t Tstride, uint16_t* O,
                 float* sm, float* sl, int stat_stride, int q_begin, int n, int len, int total) {
  int rows = n - q_begin;
  if (rows <= 0) return RF_OK;
  dim3 grid((unsigned)((rows + FA_BQ - 1) / FA_BQ), (unsigned)m->nH);
  float scale = 1.f / sqrtf((float)m->hd);
  if (m->f16) RF_LAUNCH(k_flash_attn<__half>, grid, FA_THREADS, m->fa_smem, m->stream)
  (Q, m->qd, K, V, Tstride, O, m->qd, sm, sl, stat_stride, q_begin, n, len, total, m->G, m->hd, scale, true);
  else RF_LAUNCH(k_flash_attn<__nv_bfloat16>, grid, FA_THREADS, m->fa_smem, m->stream)(
      Q, m->qd, K, V, Tstride, O, m->qd, sm, sl, stat_stride, q_begin, n, len, total, m->G, m->hd, scale, false);
  KERNEL_CHECK();
  return RF_OK;
}

int run_rmsnorm(rf_model* m, const uint16_t* x, const uint16_t* w, uint16_t* y, int rows) {
  RF_LAUNCH(k_rmsnorm, rows, 256, 0, m->stream)(x, w, y, (int64_t)m->H, m->H, m->cfg.rms_eps, m->f16);
  KERNEL_CHECK();
  return RF_OK;
}

/* Qwen3's q_norm / k_norm: RMSNorm of every q and k head of the qkv rows, in place, before anything reads them (RoPE,
 * the caches, the compressor's head embeddings) */
int run_qk_norm(rf_model* m, const LayerW& w, uint16_t* qkv, int n) {
  const int threads = std::min(256, (m->hd + 31) / 32 * 32);
  RF_LAUNCH(k_rmsnorm, dim3((unsigned)n, (unsigned)m->nH), threads, 0, m->stream)
  (qkv, w.qk_norm, qkv, (int64_t)m->qkvd, m->hd, m->cfg.rms_eps, m->f16);
  KERNEL_CHECK();
  RF_LAUNCH(k_rmsnorm, dim3((unsigned)n, (unsigned)m->nKV), threads, 0, m->stream)
  (qkv + m->qd, w.qk_norm + m->hd, qkv + m->qd, (int64_t)m->qkvd, m->hd, m->cfg.rms_eps, m->f16);
  KERNEL_CHECK();
  return RF_OK;
}

/* xn = rmsnorm(x); qkv = xn Wqkv^T (+bias) (+ q/k norm per head) */
int run_qkv(rf_model* m, const LayerW& w, const Acts& a, int n) {
  RF_TRY(run_rmsnorm(m, a.x, w.in_norm, a.xn, n));
  float beta = 0.f;
  if (m->cfg.qkv_bias) {
    RF_LAUNCH(k_bias_fill, nblocks((int64_t)n * m->qkvd, 256), 256, 0, m->stream)(a.qkv, w.bqkv, n, m->qkvd);
    KERNEL_CHECK();
    beta = 1.f;
  }
  RF_TRY(m->gemm.nt(n, m->qkvd, m->H, a.xn, m->adt, m->H, w.wqkv, m->adt, m->H, a.qkv, m->adt, m->qkvd, beta));
  return m->cfg.qk_norm ? run_qk_norm(m, w, a.qkv, n) : RF_OK;
}

/* x += attn Wo^T; x += MLP(rmsnorm(x)) */
int run_post_attn(rf_model* m, const LayerW& w, const Acts& a, int n) {
  const int64_t nh = (int64_t)n * m->H;
  RF_TRY(m->gemm.nt(n, m->H, m->qd, a.attn, m->adt, m->qd, w.wo, m->adt, m->qd, a.xn, m->adt, m->H, 0.f));
  RF_LAUNCH(k_residual, nblocks(nh, 256), 256, 0, m->stream)(a.x, a.xn, nh, m->f16);
  KERNEL_CHECK();
  RF_TRY(run_rmsnorm(m, a.x, w.post_norm, a.xn, n));
  RF_TRY(m->gemm.nt(n, 2 * m->I, m->H, a.xn, m->adt, m->H, w.wgu, m->adt, m->H, a.gu, m->adt, 2 * m->I, 0.f));
  RF_LAUNCH(k_swiglu, nblocks((int64_t)n * m->I, 256), 256, 0, m->stream)(a.gu, a.hbuf, n, m->I, m->f16);
  KERNEL_CHECK();
  RF_TRY(m->gemm.nt(n, m->H, m->I, a.hbuf, m->adt, m->I, w.wdown, m->adt, m->I, a.xn, m->adt, m->H, 0.f));
  RF_LAUNCH(k_residual, nblocks(nh, 256), 256, 0, m->stream)(a.x, a.xn, nh, m->f16);
  KERNEL_CHECK();
  return RF_OK;
}

int upload_tokens(rf_model* m, int32_t* dtok, const int32_t* tokens, int n, uint16_t* x) {
  CU_CHECK(cudaMemcpyAsync(dtok, tokens, sizeof(int32_t) * n, cudaMemcpyHostToDevice, m->stream));
  RF_LAUNCH(k_embed, nblocks((int64_t)n * m->H, 256), 256, 0, m->stream)(dtok, m->embed, x, n, m->H);
  KERNEL_CHECK();
  return RF_OK;
}

/* ---------------- the model's shared workspace ---------------- */
struct WsNeed {
  int64_t rows = 0, krot_rows = 0, cap = 0, emb_bytes = 0;
  bool mlp = false;
};

/* Grows the model's workspace (objects.cuh) to cover `need`: every buffer at the larger of the old and the new size.
 * It never shrinks while the model lives. A failed growth leaves it empty (the next step grows it again) and is
 * out-of-memory like any allocation, so a compressor or sequence that does not fit gets a clean RF_ERR_OOM. */
int ws_ensure(rf_model* m, const WsNeed& need) {
  Workspace& w = m->ws;
  if (need.rows <= w.rows && need.krot_rows <= w.krot_rows && need.cap <= w.cap && need.emb_bytes <= w.emb_bytes &&
      (!need.mlp || w.mlp))
    return RF_OK;
  WsNeed n;
  n.rows = std::max(need.rows, w.rows);
  n.krot_rows = std::max(need.krot_rows, w.krot_rows);
  n.cap = std::max(need.cap, w.cap);
  n.emb_bytes = std::max(need.emb_bytes, w.emb_bytes);
  n.mlp = need.mlp || w.mlp;
  CU_CHECK(cudaStreamSynchronize(m->stream));  // queued work may still use the old buffers
  CU_CHECK(cudaStreamSynchronize(m->copy));    // and a pipelined chunk's copy may still read ws.emb
  w.free_all();
  const size_t N = (size_t)std::max<int64_t>(n.rows, 1), hd = (size_t)m->hd, nKV = (size_t)m->nKV;
  DevArena& A = w.arena;
  int rc = RF_OK;
  auto grow = [&]() -> int {
    RF_TRY(A.alloc(&w.x, N * m->H, "workspace: activations x"));
    RF_TRY(A.alloc(&w.xn, N * m->H, "workspace: activations xn"));
    RF_TRY(A.alloc(&w.qkv, N * m->qkvd, "workspace: activations qkv"));
    RF_TRY(A.alloc(&w.qrot, N * m->qd, "workspace: activations q_rot"));
    RF_TRY(A.alloc(&w.attn, N * m->qd, "workspace: activations attn"));
    if (n.mlp) {
      RF_TRY(A.alloc(&w.gu, N * 2 * m->I, "workspace: activations gate/up"));
      RF_TRY(A.alloc(&w.hbuf, N * m->I, "workspace: activations mlp"));
    }
    RF_TRY(A.alloc(&w.tok, N, "workspace: tokens"));
    if (n.krot_rows > 0) {
      RF_TRY(A.alloc(&w.stat_m, (size_t)m->nH * N, "workspace: attention row max"));
      RF_TRY(A.alloc(&w.stat_l, (size_t)m->nH * N, "workspace: attention row sum"));
      RF_TRY(A.alloc(&w.Krot, nKV * (size_t)n.krot_rows * hd, "workspace: roped keys"));
    }
    if (n.cap > 0) {
      RF_TRY(A.alloc(&w.tmpK, nKV * (size_t)n.cap * hd, "workspace: eviction rows"));
      RF_TRY(A.alloc(&w.tmpS, nKV * (size_t)n.cap, "workspace: eviction scores"));
      RF_TRY(A.alloc(&w.keep, nKV * (size_t)n.cap, "workspace: eviction keep-set"));
    }
    if (n.emb_bytes > 0) {
      RF_TRY(A.alloc(&w.emb, (size_t)n.emb_bytes, "workspace: embedding output"));
      void* h = nullptr;
      cudaError_t e = cudaMallocHost(&h, (size_t)n.emb_bytes);
      if (e != cudaSuccess) {
        cudaGetLastError();
        return set_error(RF_ERR_OOM, "cudaMallocHost of %lld bytes (pinned embedding staging) failed: %s",
                         (long long)n.emb_bytes, cudaGetErrorString(e));
      }
      w.emb_host = (uint8_t*)h;
    }
    return RF_OK;
  };
  rc = grow();
  if (rc != RF_OK) {
    w.free_all();
    return rc;
  }
  m->ws_gen++;
  w.rows = n.rows;
  w.krot_rows = n.krot_rows;
  w.cap = n.cap;
  w.emb_bytes = n.emb_bytes;
  w.mlp = n.mlp;
  return RF_OK;
}

Acts ws_acts(rf_model* m) {
  Workspace& w = m->ws;
  return Acts{w.x, w.xn, w.qkv, w.qrot, w.attn, w.gu, w.hbuf};
}

}  // namespace
