/*
 * gpu/device.cuh — CUDA status -> RF status mapping, device allocations (DevArena) and device selection.
 * Part of the single translation unit cuda/reform_cuda.cu (included there, in order).
 */
namespace {

/* ======================================================================================
 * error helpers
 * ====================================================================================== */
/* Only an allocation failure is out-of-memory (retryable for the server); any other CUDA error is a device error. */
inline int cuda_status(cudaError_t e) { return e == cudaErrorMemoryAllocation ? RF_ERR_OOM : RF_ERR_DEVICE; }

#define CU_CHECK(call)                                                                                               \
  do {                                                                                                               \
    cudaError_t e_ = (call);                                                                                         \
    if (e_ != cudaSuccess) {                                                                                         \
      return set_error(cuda_status(e_), "%s failed: %s (%s:%d)", #call, cudaGetErrorString(e_), __FILE__, __LINE__); \
    }                                                                                                                \
  } while (0)

#define KERNEL_CHECK()                                                                                        \
  do {                                                                                                        \
    cudaError_t e_ = cudaGetLastError();                                                                      \
    if (e_ != cudaSuccess)                                                                                    \
      return set_error(cuda_status(e_), "kernel launch failed: %s (%s:%d)", cudaGetErrorString(e_), __FILE__, \
                       __LINE__);                                                                             \
  } while (0)

int dalloc(void** p, size_t bytes, const char* what) {
  *p = nullptr;
  if (bytes == 0) bytes = 16;
  cudaError_t e = cudaMalloc(p, bytes);
  if (e != cudaSuccess) {
    *p = nullptr;
    cudaGetLastError();  // clear (allocation errors are not sticky)
    if (e == cudaErrorMemoryAllocation)
      return set_error(RF_ERR_OOM, "cudaMalloc of %zu bytes (%.1f MiB) for %s failed: out of device memory", bytes,
                       bytes / 1048576.0, what);
    return set_error(RF_ERR_DEVICE, "cudaMalloc of %zu bytes (%.1f MiB) for %s failed: %s", bytes, bytes / 1048576.0,
                     what, cudaGetErrorString(e));
  }
  return RF_OK;
}

/* Owns a set of device allocations, freed together. */
struct DevArena {
  std::vector<void*> ptrs;
  int64_t bytes = 0;
  template <typename T>
  int alloc(T** p, size_t count, const char* what) {
    void* v = nullptr;
    int rc = dalloc(&v, count * sizeof(T), what);
    if (rc != RF_OK) return rc;
    ptrs.push_back(v);
    bytes += (int64_t)(count * sizeof(T));
    *p = (T*)v;
    return RF_OK;
  }
  void free_all() {
    for (void* p : ptrs) cudaFree(p);
    ptrs.clear();
    bytes = 0;
  }
};

int device_index() {
  const char* e = getenv("REFORM_CUDA_DEVICE");
  return e && *e ? atoi(e) : 0;
}

int device_count_impl(std::string* why) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    if (why) *why = cudaGetErrorString(e);
    return 0;
  }
  if (n == 0 && why) *why = "no CUDA device found";
  return n;
}

int ensure_device(int dev) {
  std::string why;
  int n = device_count_impl(&why);
  if (n <= 0) return set_error(RF_ERR_NODEVICE, "no usable CUDA device: %s", why.c_str());
  if (dev < 0 || dev >= n) return set_error(RF_ERR_NODEVICE, "CUDA device %d not present (%d devices)", dev, n);
  cudaError_t e = cudaSetDevice(dev);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return set_error(RF_ERR_NODEVICE, "cudaSetDevice(%d) failed: %s", dev, cudaGetErrorString(e));
  }
  return RF_OK;
}

inline unsigned nblocks(int64_t n, int t) {
  int64_t b = (n + t - 1) / t;
  if (b < 1) b = 1;
  if (b > 1048576) b = 1048576;  // kernels use grid-stride loops
  return (unsigned)b;
}

}  // namespace
