/*
 * gpu/kernels.cuh — elementwise, normalisation, RoPE, KV-cache, embedding and scoring kernels, and the fallback GEMM
 * kernel used when cuBLAS is unavailable.
 * Part of the single translation unit cuda/reform_cuda.cu (included there, in order).
 */
namespace {

/* ======================================================================================
 * device helpers
 * ====================================================================================== */
__device__ __forceinline__ float h2f(uint16_t v, bool f16) {
  return f16 ? __half2float(__ushort_as_half(v)) : __bfloat162float(__ushort_as_bfloat16(v));
}
__device__ __forceinline__ uint16_t f2h(float x, bool f16) {
  return f16 ? __half_as_ushort(__float2half_rn(x)) : __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
/* round an f32 value to the activation dtype and back (HF rounding points) */
__device__ __forceinline__ float rnd(float x, bool f16) { return h2f(f2h(x, f16), f16); }
/* load any RF dtype element */
__device__ __forceinline__ float ld_any(const void* p, int dt, int64_t i) {
  if (dt == RF_F32) return ((const float*)p)[i];
  uint16_t v = ((const uint16_t*)p)[i];
  return dt == RF_F16 ? __half2float(__ushort_as_half(v)) : __bfloat162float(__ushort_as_bfloat16(v));
}
__device__ __forceinline__ void st_any(void* p, int dt, int64_t i, float x) {
  if (dt == RF_F32) ((float*)p)[i] = x;
  else if (dt == RF_F16) ((uint16_t*)p)[i] = __half_as_ushort(__float2half_rn(x));
  else ((uint16_t*)p)[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/* ======================================================================================
 * elementwise / small kernels
 * ====================================================================================== */
__global__ void k_convert(const void* __restrict__ src, int sdt, uint16_t* __restrict__ dst, int64_t n, bool f16) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = f2h(ld_any(src, sdt, i), f16);
}

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
__global__ void k_init_normal(uint16_t* __restrict__ dst, int64_t n, uint64_t key, float std, bool f16) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    uint64_t h = splitmix64(key ^ splitmix64((uint64_t)i));
    float u1 = ((float)(h >> 40) + 1.0f) * (1.0f / 16777216.0f);  // (0, 1]
    float u2 = (float)(h & 0xFFFFFFull) * (1.0f / 16777216.0f);   // [0, 1)
    float z = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
    dst[i] = f2h(z * std, f16);
  }
}
__global__ void k_fill(uint16_t* __restrict__ dst, int64_t n, float v, bool f16) {
  uint16_t h = f2h(v, f16);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = h;
}

/* x[i][:] = embed[tok[i]][:] */
__global__ void k_embed(const int32_t* __restrict__ tok, const uint16_t* __restrict__ emb, uint16_t* __restrict__ x,
                        int n, int H) {
  int64_t total = (int64_t)n * H;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t r = i / H, c = i % H;
    x[i] = emb[(int64_t)tok[r] * H + c];
  }
}

/* RMSNorm, HF semantics: y = w * to_dtype(x * rsqrt(mean(x^2) + eps)) over H values. One block per H values: segment
 * blockIdx.y (at blockIdx.y * H) of row blockIdx.x (rows ld apart): the hidden state (one segment per row), or the q/k
 * heads of the qkv rows (Qwen3's per-head norm, in place: x and y may be the same buffer). */
__global__ void k_rmsnorm(const uint16_t* x, const uint16_t* __restrict__ w, uint16_t* y, int64_t ld, int H, float eps,
                          bool f16) {
  const int64_t off = (int64_t)blockIdx.x * ld + (int64_t)blockIdx.y * H;
  const uint16_t* xr = x + off;
  uint16_t* yr = y + off;
  float ss = 0.f;
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    float v = h2f(xr[c], f16);
    ss += v * v;
  }
  __shared__ float red[32];
  ss = warp_sum(ss);
  int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  if (lane == 0) red[wid] = ss;
  __syncthreads();
  if (wid == 0) {
    float v = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) red[0] = v;
  }
  __syncthreads();
  float r = rsqrtf(red[0] / (float)H + eps);
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    float v = rnd(h2f(xr[c], f16) * r, f16);
    yr[c] = f2h(h2f(w[c], f16) * v, f16);
  }
}

/* rows of y (n x cols, stride ld) = bias */
__global__ void k_bias_fill(uint16_t* __restrict__ y, const uint16_t* __restrict__ b, int n, int cols) {
  int64_t total = (int64_t)n * cols;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = b[i % cols];
}

/* h[i][c] = silu(g) * u with gu = [n][2I] (gate first). HF rounding: silu result rounded, product rounded. */
__global__ void k_swiglu(const uint16_t* __restrict__ gu, uint16_t* __restrict__ h, int n, int I, bool f16) {
  int64_t total = (int64_t)n * I;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t r = i / I, c = i % I;
    float g = h2f(gu[r * 2 * I + c], f16);
    float u = h2f(gu[r * 2 * I + I + c], f16);
    float s = rnd(g / (1.f + expf(-g)), f16);
    h[i] = f2h(s * u, f16);
  }
}

/* x = x + y (rounded) */
__global__ void k_residual(uint16_t* __restrict__ x, const uint16_t* __restrict__ y, int64_t n, bool f16) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    x[i] = f2h(h2f(x[i], f16) + h2f(y[i], f16), f16);
}

/* HF apply_rotary_pos_emb in the activation dtype: cos/sin rounded, q*cos + rotate_half(q)*sin. */
__device__ __forceinline__ void rope_pair(float x1, float x2, float ang, bool f16, float* o1, float* o2) {
  float s, c;
  sincosf(ang, &s, &c);
  c = rnd(c, f16);
  s = rnd(s, f16);
  *o1 = rnd(x1 * c, f16) - rnd(x2 * s, f16);
  *o2 = rnd(x2 * c, f16) + rnd(x1 * s, f16);
}

/* q_rot[i][h*hd + d] = rope(qkv[i][h*hd + d]) at position pos0 + i (+ *dpos when given: a decode step replayed from a
 * CUDA graph reads its position from the device, seq.cuh) */
__global__ void k_rope_q(const uint16_t* __restrict__ qkv, int qkv_stride, uint16_t* __restrict__ out, int n, int nH,
                         int hd, int pos0, const float* __restrict__ inv_freq, bool f16,
                         const int32_t* __restrict__ dpos) {
  if (dpos) pos0 += *dpos;
  int half = hd / 2;
  int64_t total = (int64_t)n * nH * half;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int d = (int)(i % half);
    int64_t t = i / half;
    int h = (int)(t % nH);
    int r = (int)(t / nH);
    const uint16_t* src = qkv + (int64_t)r * qkv_stride + (int64_t)h * hd;
    uint16_t* dst = out + (int64_t)r * nH * hd + (int64_t)h * hd;
    float ang = (float)(pos0 + r) * inv_freq[d];
    float o1, o2;
    rope_pair(h2f(src[d], f16), h2f(src[d + half], f16), ang, f16, &o1, &o2);
    dst[d] = f2h(o1, f16);
    dst[d + half] = f2h(o2, f16);
  }
}

/* Append chunk K/V (from qkv rows) into head-major caches at rows pos0..pos0+n-1 (+ *dpos when given, as k_rope_q);
 * keys roped at their position when `rope`, else stored pre-RoPE. */
__global__ void k_append_kv(const uint16_t* __restrict__ qkv, int qkv_stride, int k_off, int v_off,
                            uint16_t* __restrict__ Kc, uint16_t* __restrict__ Vc, int64_t Tstride, int n, int nKV,
                            int hd, int pos0, bool rope, const float* __restrict__ inv_freq, bool f16,
                            const int32_t* __restrict__ dpos) {
  if (dpos) pos0 += *dpos;
  int half = hd / 2;
  int64_t total = (int64_t)n * nKV * half;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int d = (int)(i % half);
    int64_t t = i / half;
    int h = (int)(t % nKV);
    int r = (int)(t / nKV);
    const uint16_t* ks = qkv + (int64_t)r * qkv_stride + k_off + (int64_t)h * hd;
    const uint16_t* vs = qkv + (int64_t)r * qkv_stride + v_off + (int64_t)h * hd;
    int64_t dst = ((int64_t)h * Tstride + pos0 + r) * hd;
    if (rope) {
      float o1, o2;
      rope_pair(h2f(ks[d], f16), h2f(ks[d + half], f16), (float)(pos0 + r) * inv_freq[d], f16, &o1, &o2);
      Kc[dst + d] = f2h(o1, f16);
      Kc[dst + d + half] = f2h(o2, f16);
    } else {
      Kc[dst + d] = ks[d];
      Kc[dst + d + half] = ks[d + half];
    }
    Vc[dst + d] = vs[d];
    Vc[dst + d + half] = vs[d + half];
  }
}

/* dst[h][j] = rope(src[h][j]) at position pos0 + j, j < count (head-major, separate T strides) */
__global__ void k_rope_rows(const uint16_t* __restrict__ src, int64_t sT, uint16_t* __restrict__ dst, int64_t dT,
                            int nKV, int count, int hd, int pos0, const float* __restrict__ inv_freq, bool f16) {
  int half = hd / 2;
  int64_t total = (int64_t)nKV * count * half;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int d = (int)(i % half);
    int64_t t = i / half;
    int j = (int)(t % count);
    int h = (int)(t / count);
    const uint16_t* s = src + ((int64_t)h * sT + j) * hd;
    uint16_t* o = dst + ((int64_t)h * dT + j) * hd;
    float o1, o2;
    rope_pair(h2f(s[d], f16), h2f(s[d + half], f16), (float)(pos0 + j) * inv_freq[d], f16, &o1, &o2);
    o[d] = f2h(o1, f16);
    o[d + half] = f2h(o2, f16);
  }
}

/* Zero scores of rows [pos0, pos0+n) of every head */
__global__ void k_zero_scores(float* __restrict__ score, int64_t Tstride, int nKV, int pos0, int n) {
  int64_t total = (int64_t)nKV * n;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int h = (int)(i / n), r = (int)(i % n);
    score[(int64_t)h * Tstride + pos0 + r] = 0.f;
  }
}

/* TOVA (rf::tova_layer_scores): score[g][j] = sum over the layer's kv heads of score[.][j], j < count, for every g —
 * one layer score, so every kv head keeps the same entries. Summed in kv-head order, as the CPU build does. */
__global__ void k_tova_layer(float* __restrict__ score, int64_t Tstride, int nKV, int count) {
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < count; j += (int64_t)gridDim.x * blockDim.x) {
    float s = 0.f;
    for (int g = 0; g < nKV; g++) s += score[(int64_t)g * Tstride + j];
    for (int g = 0; g < nKV; g++) score[(int64_t)g * Tstride + j] = s;
  }
}

/* Embedding extraction: one warp per (token, selected head). table[2e] = column in the source rows (the q|k|v
 * projection, or the attention output for o heads), table[2e+1] = column in the embedding row. L2-normalise
 * (F.normalize semantics, eps 1e-6). */
__global__ void k_emb_extract(const uint16_t* __restrict__ qkv, int qkv_stride, const int32_t* __restrict__ table,
                              void* __restrict__ emb, int edim, int hd, bool emb_f16, bool f16) {
  int i = blockIdx.x, e = blockIdx.y, lane = threadIdx.x;
  const uint16_t* src = qkv + (int64_t)i * qkv_stride + table[2 * e];
  int64_t dst = (int64_t)i * edim + table[2 * e + 1];
  float ss = 0.f;
  for (int d = lane; d < hd; d += 32) {
    float v = h2f(src[d], f16);
    ss += v * v;
  }
  ss = warp_sum(ss);
  float inv = 1.f / fmaxf(sqrtf(ss), 1e-6f);
  for (int d = lane; d < hd; d += 32) {
    float v = h2f(src[d], f16) * inv;
    if (emb_f16) ((__half*)emb)[dst + d] = __float2half_rn(v);
    else ((float*)emb)[dst + d] = v;
  }
}

/* gather rows: dst[h][i][:] = src[h][keep[h*cap + i]][:] for i < cap */
template <typename E>
__global__ void k_gather_rows(const E* __restrict__ src, int64_t sT, E* __restrict__ dst, int64_t dT,
                              const int32_t* __restrict__ keep, int nKV, int cap, int width) {
  int64_t total = (int64_t)nKV * cap * width;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    int c = (int)(i % width);
    int64_t t = i / width;
    int r = (int)(t % cap);
    int h = (int)(t / cap);
    int srow = keep[(int64_t)h * cap + r];
    dst[((int64_t)h * dT + r) * width + c] = src[((int64_t)h * sT + srow) * width + c];
  }
}

/* ---- selection on the device (H2O keep-sets, top-k sampling candidates) ---- */
/* Order-preserving map of a float to uint32 (rf::select_key): larger value, larger key; -0 == +0; NaN lowest. */
__device__ __forceinline__ unsigned sel_key(float f) {
  if (f != f) return 0u;
  if (f == 0.f) f = 0.f;
  unsigned u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* Inclusive block-wide prefix sum of v (blockDim.x <= SEL_THREADS); *total gets the block's sum. */
#define SEL_THREADS 1024
__device__ int block_scan(int v, int* buf, int* total) {
  const int tid = threadIdx.x, nt = blockDim.x;
  buf[tid] = v;
  __syncthreads();
  for (int o = 1; o < nt; o <<= 1) {
    int add = tid >= o ? buf[tid - o] : 0;
    __syncthreads();
    buf[tid] += add;
    __syncthreads();
  }
  int r = buf[tid];
  *total = buf[nt - 1];
  __syncthreads();
  return r;
}

/* Keep-set selection, one block per row h (grid.x rows, one block of up to SEL_THREADS threads each): of the
 * entries [0, total) of s + h * stride, keep [0, lo) and [hi, total) and the k highest of [lo, hi) (ties: the earlier
 * index), written in ascending order to keep + h * kstride (lo + k + total - hi entries); val (may be NULL) gets their
 * values. rf::h2o_select's result exactly (lo = n_sink, hi = total - n_recent), without a host round trip: the k-th
 * largest key by a 4-pass radix select (8 bits a pass) over a shared histogram, then one ordered compaction. */
__global__ void __launch_bounds__(SEL_THREADS)
    k_select_keep(const float* __restrict__ score, int64_t stride, int total, int lo, int hi, int k,
                  int32_t* __restrict__ keep, int64_t kstride, float* __restrict__ val) {
  __shared__ unsigned hist[256];
  __shared__ unsigned s_prefix, s_need;
  __shared__ int scan[SEL_THREADS];
  const int tid = threadIdx.x, nt = blockDim.x;
  const float* s = score + (int64_t)blockIdx.x * stride;
  int32_t* out = keep + (int64_t)blockIdx.x * kstride;
  float* ov = val ? val + (int64_t)blockIdx.x * kstride : nullptr;
  unsigned prefix = 0, need = (unsigned)(k > 0 ? k : 0);
  if (k > 0) {
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += nt) hist[b] = 0u;
      __syncthreads();
      const unsigned hi_mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
      for (int i = lo + tid; i < hi; i += nt) {
        const unsigned key = sel_key(s[i]);
        if ((key & hi_mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        unsigned above = 0;
        int b = 255;
        while (b > 0 && above + hist[b] < need) above += hist[b--];
        s_prefix = prefix | ((unsigned)b << shift);
        s_need = need - above;
      }
      __syncthreads();
      prefix = s_prefix;
      need = s_need;
    }
  }
  // prefix: the k-th largest key of the middle; need: how many entries equal to it are kept (the earliest)
  int base = 0, eq_before = 0;
  for (int t0 = 0; t0 < total; t0 += nt) {
    const int i = t0 + tid;
    int always = 0, gt = 0, eq = 0;
    if (i < total) {
      if (i < lo || i >= hi) {
        always = 1;
      } else if (k > 0) {
        const unsigned key = sel_key(s[i]);
        gt = key > prefix;
        eq = key == prefix;
      }
    }
    int eq_tile = 0;
    const int eq_rank = eq_before + block_scan(eq, scan, &eq_tile) - eq;  // equal entries before this one
    const int take = always | gt | (eq && (unsigned)eq_rank < need);
    int kept_tile = 0;
    const int pos = base + block_scan(take, scan, &kept_tile) - take;
    if (take) {
      out[pos] = i;
      if (ov) ov[pos] = s[i];
    }
    base += kept_tile;
    eq_before += eq_tile;
  }
}

/* ---- scoring helpers ---- */
/* one warp's 1 / max(||src[r]||, 1e-12), in every lane (an all-zero row gets 1e12 and stays zero when scaled) */
__device__ __forceinline__ float warp_row_invnorm(const void* __restrict__ src, int sdt, int64_t r, int dim, int lane) {
  float ss = 0.f;
  for (int d = lane; d < dim; d += 32) {
    float v = ld_any(src, sdt, r * dim + d);
    ss += v * v;
  }
  return 1.f / fmaxf(sqrtf(warp_sum(ss)), 1e-12f);
}
/* one warp per row: dst[r][:] = src[r][:] / ||src[r]|| (f32 out), zero rows stay zero */
__global__ void k_normalize_rows(const void* __restrict__ src, int sdt, float* __restrict__ dst, int64_t rows,
                                 int dim) {
  const int lane = threadIdx.x & 31;
  const int64_t wpb = blockDim.x >> 5;
  for (int64_t r = blockIdx.x * wpb + (threadIdx.x >> 5); r < rows; r += (int64_t)gridDim.x * wpb) {
    const float inv = warp_row_invnorm(src, sdt, r, dim, lane);
    for (int d = lane; d < dim; d += 32) dst[r * dim + d] = ld_any(src, sdt, r * dim + d) * inv;
  }
}
/* one warp per row: inv[r] = 1 / max(||src[r]||, 1e-12) */
__global__ void k_row_invnorm(const void* __restrict__ src, int sdt, float* __restrict__ inv, int64_t rows, int dim) {
  const int lane = threadIdx.x & 31;
  const int64_t wpb = blockDim.x >> 5;
  for (int64_t r = blockIdx.x * wpb + (threadIdx.x >> 5); r < rows; r += (int64_t)gridDim.x * wpb) {
    const float v = warp_row_invnorm(src, sdt, r, dim, lane);
    if (lane == 0) inv[r] = v;
  }
}
/* x (f32, n values) -> dst[0..n) = f16(x), dst[n..2n) = f16(x - f16(x)): an f16 pair whose sum is x to ~2^-22 */
__global__ void k_split_f16(const float* __restrict__ x, uint16_t* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const uint16_t hi = f2h(x[i], true);
    dst[i] = hi;
    dst[n + i] = f2h(x[i] - h2f(hi, true), true);
  }
}
/* cos_rj = (s[r][j] + s[r][nq + j]) * inv[r] of an f16-pair similarity row (`row` = s[r]): k_rowmax_pair's and
 * k_kth_heaps' one expression, the product rounded on its own (never fused with the subtraction of an offset, so that
 * an offset equal to a cosine rf_score_kth returned takes it to exactly 0) */
__device__ __forceinline__ float pair_cos(const float* __restrict__ row, int nq, int c, float iv) {
  return __fmul_rn(row[c] + row[nq + c], iv);
}
/* out[r] = max_j (cos_rj - off[j]) with cos_rj = pair_cos (s: [rows][2 nq], the hi and lo halves of the query pair);
 * off NULL: max_j cos_rj, the row norm applied once after the maximum (the same value: multiplying by a positive scale
 * is monotone in every rounding) */
__global__ void k_rowmax_pair(const float* __restrict__ s, int64_t rows, int nq, const float* __restrict__ inv,
                              const float* __restrict__ off, float* __restrict__ out) {
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < rows; r += (int64_t)gridDim.x * blockDim.x) {
    float m = -INFINITY;
    const float* row = s + r * 2 * (int64_t)nq;
    if (off) {
      const float iv = inv[r];
      for (int c = 0; c < nq; c++) m = fmaxf(m, pair_cos(row, nq, c, iv) - off[c]);
      out[r] = m;
    } else {
      for (int c = 0; c < nq; c++) m = fmaxf(m, row[c] + row[nq + c]);
      out[r] = m * inv[r];
    }
  }
}
__global__ void k_rowmax(const float* __restrict__ s, int64_t rows, int cols, const float* __restrict__ off,
                         float* __restrict__ out) {
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < rows; r += (int64_t)gridDim.x * blockDim.x) {
    float m = -INFINITY;
    for (int c = 0; c < cols; c++) m = fmaxf(m, off ? s[r * cols + c] - off[c] : s[r * cols + c]);
    out[r] = m;
  }
}

/* C[r][c], the cosine of row r and query column c of a block of similarities: inv given, pair_cos of the f16 pair's
 * halves (s: [rows][2 nq]); inv NULL, s[r][c] ([rows][nq] cosines) */
__device__ __forceinline__ float sim_cos(const float* __restrict__ s, int nq, const float* __restrict__ inv, int64_t r,
                                         int c) {
  return inv ? pair_cos(s + r * 2 * (int64_t)nq, nq, c, inv[r]) : s[r * nq + c];
}

/* A query row pair's match at row r of a block (cuda/reform.h RF_PAIRS_MAX): P = min(C[r - 1][a], C[r][b]), NaN when
 * either cosine is; row r - 1 of the block's first row is the previous block's last, whose cosines k_last_row kept in
 * prev (n_q f32) */
__device__ __forceinline__ float pair_match(const float* __restrict__ s, int nq, const float* __restrict__ inv,
                                            const float* __restrict__ prev, int64_t r, int a, int b) {
  const float x = r > 0 ? sim_cos(s, nq, inv, r - 1, a) : prev[a];
  const float y = sim_cos(s, nq, inv, r, b);
  if (x != x || y != y) return NAN;
  return y < x ? y : x;  // std::min(x, y), as the CPU build
}

/* prev[c] = C[rows - 1][c]: a block's last row of cosines, for the pairs that start there and end in the next block
 * (launched after the block's pair kernels, before the next block's GEMM overwrites s) */
__global__ void k_last_row(const float* __restrict__ s, int64_t rows, int nq, const float* __restrict__ inv,
                           float* __restrict__ prev) {
  for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < nq; c += gridDim.x * blockDim.x)
    prev[c] = sim_cos(s, nq, inv, rows - 1, c);
}

/* rf_score_select's pair pass over one block of similarities (k_rowmax's layouts), context rows off..off+rows-1:
 * pm[r] = max_p (P_p(off + r) - poff[p]) over the np pairs (a_p, b_p at pairs[2p], pairs[2p + 1]) whose P is not NaN;
 * -inf where none is, and for context row 0 (no P). poff NULL: no offsets. k_pair_combine joins pm to the scores. */
__global__ void k_pair_rowmax(const float* __restrict__ s, int64_t rows, int nq, const float* __restrict__ inv,
                              const float* __restrict__ prev, const int* __restrict__ pairs, int np,
                              const float* __restrict__ poff, int64_t off, float* __restrict__ pm) {
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < rows; r += (int64_t)gridDim.x * blockDim.x) {
    float m = -INFINITY;
    if (off + r > 0) {
      for (int p = 0; p < np; p++) {
        float v = pair_match(s, nq, inv, prev, r, pairs[2 * p], pairs[2 * p + 1]);
        if (v != v) continue;
        if (poff) v -= poff[p];
        if (m < v) m = v;
      }
    }
    pm[r] = m;
  }
}

/* score_i = std::max(score_i, max(pm[i], pm[i + 1])) for i < n (row n - 1 has no pair after it): a pair's match counts
 * for both rows it spans; a NaN score stays NaN (std::max keeps its first argument), pm is never NaN */
__global__ void k_pair_combine(float* __restrict__ out, const float* __restrict__ pm, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float v = pm[i];
    if (i + 1 < n && v < pm[i + 1]) v = pm[i + 1];
    if (out[i] < v) out[i] = v;
  }
}

/* rf_score_kth's pass over one block of similarities (s: [rows][2 nq] f16-pair halves with the rows' inverse norms
 * inv, k_rowmax_pair's cosines; inv NULL: [rows][nq] cosines, k_rowmax's), context rows off..off+rows-1. The columns
 * are the nq query rows, then the np pairs (pairs, prev: k_pair_rowmax's; a pair's values P_p(i), i >= 1). Thread
 * t = g * (nq + np) + c (column c, row group g of ngrp) keeps a min-heap of the largest values (k of a query row's
 * cosines, kp of a pair's) of the rows r = g (mod ngrp) it has seen, across the calls of one query: element i at
 * heap[i * nt + t] (nt = ngrp * (nq + np) threads; a warp's roots are adjacent), its size in cnt[t] (off == 0: the
 * query's first block, the heaps start empty). NaN values are left out; a value equal to the smallest of a full heap
 * changes nothing. */
__global__ void k_kth_heaps(const float* __restrict__ s, int64_t rows, int nq, const float* __restrict__ inv,
                            const int* __restrict__ pairs, int np, const float* __restrict__ prev, int64_t off,
                            int64_t ngrp, int k, int kp, float* __restrict__ heap, int* __restrict__ cnt) {
  const int ncol = nq + np;
  const int64_t nt = ngrp * ncol;
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < nt; t += (int64_t)gridDim.x * blockDim.x) {
    const int c = (int)(t % ncol);
    const bool pair = c >= nq;
    const int kc = pair ? kp : k;
    const int a = pair ? pairs[2 * (c - nq)] : 0, b = pair ? pairs[2 * (c - nq) + 1] : 0;
    float* h = heap + t;
    int n = off == 0 ? 0 : cnt[t];
    int64_t r0 = t / ncol;
    if (pair && off + r0 == 0) r0 += ngrp;  // a pair has no value at context row 0
    for (int64_t r = r0; kc > 0 && r < rows; r += ngrp) {
      const float v = pair ? pair_match(s, nq, inv, prev, r, a, b) : sim_cos(s, nq, inv, r, c);
      if (n == kc && !(v > h[0])) continue;  // most rows: one comparison (false for NaN too)
      if (v != v) continue;
      int64_t i;
      if (n < kc) {  // sift up from the end
        i = n++;
        while (i > 0) {
          const int64_t p = (i - 1) / 2;
          const float pv = h[p * nt];
          if (!(pv > v)) break;
          h[i * nt] = pv;
          i = p;
        }
      } else {  // replace the smallest, sift down
        i = 0;
        for (;;) {
          int64_t m = 2 * i + 1;
          if (m >= kc) break;
          float mv = h[m * nt];
          if (m + 1 < kc && h[(m + 1) * nt] < mv) {
            m++;
            mv = h[m * nt];
          }
          if (!(mv < v)) break;
          h[i * nt] = mv;
          i = m;
        }
      }
      h[i * nt] = v;
    }
    cnt[t] = n;
  }
}

/* ======================================================================================
 * fallback GEMM: C[M][N] = alpha * A[M][K] . B[N][K]^T + beta * C   (row-major, any RF dtypes)
 * ====================================================================================== */
#define FG_BM 64
#define FG_BN 64
#define FG_BK 16
__global__ void __launch_bounds__(256)
    k_gemm_nt(int M, int N, int K, const void* __restrict__ A, int adt, int64_t lda, const void* __restrict__ B,
              int bdt, int64_t ldb, void* C, int cdt, int64_t ldc, float alpha, float beta) {
  __shared__ float As[FG_BK][FG_BM + 4];
  __shared__ float Bs[FG_BK][FG_BN + 4];
  int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  int64_t m0 = (int64_t)blockIdx.y * FG_BM, n0 = (int64_t)blockIdx.x * FG_BN;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 4; j++) acc[i][j] = 0.f;
  for (int k0 = 0; k0 < K; k0 += FG_BK) {
#pragma unroll
    for (int e = 0; e < 4; e++) {
      int idx = tid + 256 * e;
      int r = idx / FG_BK, k = idx % FG_BK;
      int64_t gm = m0 + r, gn = n0 + r;
      int gk = k0 + k;
      As[k][r] = (gm < M && gk < K) ? ld_any(A, adt, gm * lda + gk) : 0.f;
      Bs[k][r] = (gn < N && gk < K) ? ld_any(B, bdt, gn * ldb + gk) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < FG_BK; k++) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; i++) a[i] = As[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; j++) b[j] = Bs[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; i++) {
    int64_t gm = m0 + ty + 16 * i;
    if (gm >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      int64_t gn = n0 + tx + 16 * j;
      if (gn >= N) continue;
      float v = alpha * acc[i][j];
      if (beta != 0.f) v += beta * ld_any(C, cdt, gm * ldc + gn);
      st_any(C, cdt, gm * ldc + gn, v);
    }
  }
}

}  // namespace
