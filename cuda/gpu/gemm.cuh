/*
 * gpu/gemm.cuh — the GEMM dispatcher: cuBLAS when loaded, else the fallback kernel (kernels.cuh).
 * Part of the single translation unit cuda/reform_cuda.cu (included there, in order).
 */
namespace {

/* ======================================================================================
 * GEMM dispatcher
 * ====================================================================================== */
cudaDataType_t cuda_dt(int dt) { return dt == RF_F32 ? CUDA_R_32F : dt == RF_F16 ? CUDA_R_16F : CUDA_R_16BF; }

struct Gemm {
  cublasHandle_t h = nullptr;
  cudaStream_t stream = nullptr;
  std::string why_fallback;
  fn_cublasGemmEx gemm_ex = nullptr;  // entry points of the library the handle came from
  fn_cublasDestroy destroy_fn = nullptr;

  int init(cudaStream_t s) {
    stream = s;
    const CublasLib& lib = cublas_lib();
    if (!lib.ok) {
      why_fallback = lib.why;
      return RF_OK;
    }
    cublasHandle_t hh = nullptr;
    int st = lib.create(&hh);
    if (st != 0 || !hh) {
      why_fallback = "cublasCreate failed (status " + std::to_string(st) + ")";
      return RF_OK;
    }
    if (lib.set_stream(hh, s) != 0) {
      lib.destroy(hh);
      return set_error(RF_ERR_DEVICE, "cublasSetStream failed");
    }
    if (lib.set_math) lib.set_math(hh, CUBLAS_DEFAULT_MATH_);
    h = hh;
    gemm_ex = lib.gemm_ex;
    destroy_fn = lib.destroy;
    return RF_OK;
  }
  void destroy() {
    if (h) destroy_fn(h);
    h = nullptr;
  }
  /* C[M][N] (ldc) = A[M][K] (lda) . B[N][K]^T (ldb) + beta*C, row-major */
  int nt(int M, int N, int K, const void* A, int adt, int64_t lda, const void* B, int bdt, int64_t ldb, void* C,
         int cdt, int64_t ldc, float beta) {
    if (M <= 0 || N <= 0) return RF_OK;
    float alpha = 1.f;
    if (h) {
      int st = gemm_ex(h, CUBLAS_OP_T_, CUBLAS_OP_N_, N, M, K, &alpha, B, cuda_dt(bdt), (int)ldb, A, cuda_dt(adt),
                       (int)lda, &beta, C, cuda_dt(cdt), (int)ldc, CUBLAS_COMPUTE_32F_, CUBLAS_GEMM_DEFAULT_);
      if (st != 0) return set_error(RF_ERR_DEVICE, "cublasGemmEx(M=%d N=%d K=%d) failed with status %d", M, N, K, st);
      return RF_OK;
    }
    dim3 grid((unsigned)((N + FG_BN - 1) / FG_BN), (unsigned)((M + FG_BM - 1) / FG_BM));
    RF_LAUNCH(k_gemm_nt, grid, 256, 0, stream)(M, N, K, A, adt, lda, B, bdt, ldb, C, cdt, ldc, alpha, beta);
    KERNEL_CHECK();
    return RF_OK;
  }
};

}  // namespace
