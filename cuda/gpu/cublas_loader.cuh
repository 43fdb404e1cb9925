/*
 * gpu/cublas_loader.cuh — cuBLAS loaded with dlopen at run time, so the library loads (and reports "no device") on
 * machines without CUDA libraries; the GEMM falls back to the built-in kernel when it is missing. Part of the single
 * translation unit cuda/reform_cuda.cu (included there, in order).
 */
namespace {

/* ======================================================================================
 * cuBLAS via dlopen
 * ====================================================================================== */
typedef void* cublasHandle_t;
typedef int cublasStatus_t;
enum { CUBLAS_OP_N_ = 0, CUBLAS_OP_T_ = 1 };
enum { CUBLAS_COMPUTE_32F_ = 68 };
enum { CUBLAS_GEMM_DEFAULT_ = -1 };
enum { CUBLAS_DEFAULT_MATH_ = 0 };

typedef cublasStatus_t (*fn_cublasCreate)(cublasHandle_t*);
typedef cublasStatus_t (*fn_cublasDestroy)(cublasHandle_t);
typedef cublasStatus_t (*fn_cublasSetStream)(cublasHandle_t, cudaStream_t);
typedef cublasStatus_t (*fn_cublasSetMathMode)(cublasHandle_t, int);
typedef cublasStatus_t (*fn_cublasGemmEx)(cublasHandle_t, int transa, int transb, int m, int n, int k,
                                          const void* alpha, const void* A, cudaDataType_t Atype, int lda,
                                          const void* B, cudaDataType_t Btype, int ldb, const void* beta, void* C,
                                          cudaDataType_t Ctype, int ldc, int computeType, int algo);

struct CublasLib {
  bool tried = false;
  bool ok = false;
  std::string name;
  std::string why;
  fn_cublasCreate create = nullptr;
  fn_cublasDestroy destroy = nullptr;
  fn_cublasSetStream set_stream = nullptr;
  fn_cublasSetMathMode set_math = nullptr;
  fn_cublasGemmEx gemm_ex = nullptr;
};
std::mutex g_cublas_mu;
CublasLib g_cublas;

const CublasLib& cublas_lib() {
  std::lock_guard<std::mutex> lk(g_cublas_mu);
  if (g_cublas.tried) return g_cublas;
  g_cublas.tried = true;
  const char* no = getenv("REFORM_NO_CUBLAS");
  if (no && *no && strcmp(no, "0") != 0) {
    g_cublas.why = "disabled by REFORM_NO_CUBLAS";
    return g_cublas;
  }
  // REFORM_CUBLAS_LIB: a path (or soname) to load instead of the default search
  const char* forced = getenv("REFORM_CUBLAS_LIB");
  static const char* names[] = {"libcublas.so.13", "libcublas.so.12", "libcublas.so"};
  void* h = nullptr;
  if (forced && *forced) {
    h = dlopen(forced, RTLD_NOW | RTLD_LOCAL);
    if (h) g_cublas.name = forced;
  } else {
    for (const char* n : names) {
      h = dlopen(n, RTLD_NOW | RTLD_LOCAL);
      if (h) {
        g_cublas.name = n;
        break;
      }
    }
  }
  if (!h) {
    const char* e = dlerror();
    g_cublas.why = std::string("dlopen failed: ") + (e ? e : "?");
    return g_cublas;
  }
  g_cublas.create = (fn_cublasCreate)dlsym(h, "cublasCreate_v2");
  g_cublas.destroy = (fn_cublasDestroy)dlsym(h, "cublasDestroy_v2");
  g_cublas.set_stream = (fn_cublasSetStream)dlsym(h, "cublasSetStream_v2");
  g_cublas.set_math = (fn_cublasSetMathMode)dlsym(h, "cublasSetMathMode");
  g_cublas.gemm_ex = (fn_cublasGemmEx)dlsym(h, "cublasGemmEx");
  if (!g_cublas.create || !g_cublas.destroy || !g_cublas.set_stream || !g_cublas.gemm_ex) {
    g_cublas.why = g_cublas.name + ": missing symbols";
    g_cublas.name.clear();
    return g_cublas;  // keep the handle open (harmless)
  }
  g_cublas.ok = true;
  return g_cublas;
}

}  // namespace

#ifdef RF_CUDA_EMU
/* emulation build only (test hook, see cuda/emu): forget the cached cuBLAS lookup */
void rf_emu_reset_cublas_state() {
  std::lock_guard<std::mutex> lk(g_cublas_mu);
  g_cublas = CublasLib();
}
#endif
