/*
 * gpu/score.cuh — query scoring (REFORM phase 2): max cosine of context rows against query rows, on a shared stream.
 * The *_impl functions take arguments already checked by the ABI layer (gpu/abi.cuh, cuda/abi_guard.h).
 * Part of the single translation unit cuda/reform_cuda.cu (included there, in order).
 */
namespace {

/* ---------------- scoring ---------------- */
struct ScoreCtx {
  std::mutex mu;
  bool ready = false;
  int dev = -1;
  cudaStream_t stream = nullptr;
  Gemm gemm;
};
ScoreCtx g_score;

int score_impl(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
               float* out) {
  int dev = device_index();
  RF_TRY(ensure_device(dev));
  std::lock_guard<std::mutex> lk(g_score.mu);
  if (!g_score.ready || g_score.dev != dev) {
    if (g_score.ready) {
      g_score.gemm.destroy();
      cudaStreamDestroy(g_score.stream);
      g_score.ready = false;
    }
    CU_CHECK(cudaStreamCreateWithFlags(&g_score.stream, cudaStreamNonBlocking));
    if (g_score.gemm.init(g_score.stream) != RF_OK) {
      cudaStreamDestroy(g_score.stream);
      g_score.stream = nullptr;
      return rf::last_error_code_ref();
    }
    g_score.dev = dev;
    g_score.ready = true;
  }
  cudaStream_t st = g_score.stream;
  const int es = ctx_dtype == RF_F32 ? 4 : 2;
  int64_t B = std::max<int64_t>(1, ((int64_t)16 << 20) / dim);
  B = std::min<int64_t>(B, std::max<int64_t>(1, ((int64_t)64 << 20) / n_q));
  B = std::min<int64_t>(B, (int64_t)1 << 20);  // fallback GEMM grid.y = B / 64 must stay <= 65535
  B = std::min<int64_t>(B, n_ctx);
  DevArena A;
  struct Free {
    DevArena* a;
    cudaStream_t s;
    ~Free() {
      cudaStreamSynchronize(s);
      a->free_all();
    }
  } fr{&A, st};
  float *qraw = nullptr, *qn = nullptr, *cn = nullptr, *S = nullptr, *od = nullptr;
  uint8_t* raw = nullptr;
  RF_TRY(A.alloc(&qraw, (size_t)n_q * dim, "score queries"));
  RF_TRY(A.alloc(&qn, (size_t)n_q * dim, "score queries (normalised)"));
  RF_TRY(A.alloc(&raw, (size_t)B * dim * es, "score ctx block"));
  RF_TRY(A.alloc(&cn, (size_t)B * dim, "score ctx block (normalised)"));
  RF_TRY(A.alloc(&S, (size_t)B * n_q, "score similarity block"));
  RF_TRY(A.alloc(&od, (size_t)B, "score output block"));
  CU_CHECK(cudaMemcpyAsync(qraw, q, (size_t)n_q * dim * 4, cudaMemcpyHostToDevice, st));
  RF_LAUNCH(k_normalize_rows, nblocks(n_q, 8), 256, 0, st)(qraw, RF_F32, qn, n_q, dim);
  KERNEL_CHECK();
  for (int64_t off = 0; off < n_ctx; off += B) {
    int64_t b = std::min(B, n_ctx - off);
    CU_CHECK(
        cudaMemcpyAsync(raw, (const uint8_t*)ctx + off * dim * es, (size_t)(b * dim * es), cudaMemcpyHostToDevice, st));
    RF_LAUNCH(k_normalize_rows, nblocks(b, 8), 256, 0, st)(raw, ctx_dtype, cn, b, dim);
    KERNEL_CHECK();
    RF_TRY(g_score.gemm.nt((int)b, n_q, dim, cn, RF_F32, dim, qn, RF_F32, dim, S, RF_F32, n_q, 0.f));
    RF_LAUNCH(k_rowmax, nblocks(b, 256), 256, 0, st)(S, b, n_q, od);
    KERNEL_CHECK();
    CU_CHECK(cudaMemcpyAsync(out + off, od, (size_t)b * 4, cudaMemcpyDeviceToHost, st));
    CU_CHECK(cudaStreamSynchronize(st));
  }
  return RF_OK;
}

}  // namespace
