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
  RF_LAUNCH(k_rmsnorm, rows, 256, 0, m->stream)(x, w, y, m->H, m->cfg.rms_eps, m->f16);
  KERNEL_CHECK();
  return RF_OK;
}

/* xn = rmsnorm(x); qkv = xn Wqkv^T (+bias) */
int run_qkv(rf_model* m, const LayerW& w, const Acts& a, int n) {
  RF_TRY(run_rmsnorm(m, a.x, w.in_norm, a.xn, n));
  float beta = 0.f;
  if (m->cfg.qkv_bias) {
    RF_LAUNCH(k_bias_fill, nblocks((int64_t)n * m->qkvd, 256), 256, 0, m->stream)(a.qkv, w.bqkv, n, m->qkvd);
    KERNEL_CHECK();
    beta = 1.f;
  }
  return m->gemm.nt(n, m->qkvd, m->H, a.xn, m->adt, m->H, w.wqkv, m->adt, m->H, a.qkv, m->adt, m->qkvd, beta);
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

}  // namespace
