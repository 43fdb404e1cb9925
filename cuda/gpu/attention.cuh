/*
 * gpu/attention.cuh — attention kernels: tensor-core flash attention (prefill / compress), H2O score accumulation and
 * split-K decode attention.
 * Part of the single translation unit cuda/reform_cuda.cu (included there, in order).
 */
namespace {

/* ======================================================================================
 * attention (tensor cores via wmma): flash-style, causal, GQA
 *   Q: [n][q_stride] rows, head h at column h*hd (already roped)
 *   K, V: head-major [nKV][Tstride][hd]; keys 0..total-1; query i sees key j iff j <= len + i
 *   O: [n][o_stride], head h at column h*hd
 *   stat_m / stat_l (optional): per (head, query) row max (scaled logits) and sum of exp.
 * Block: 128 threads (4 warps), 64 queries x one head, key tiles of 64.
 * ====================================================================================== */
#define FA_BQ 64
#define FA_BK 64
#define FA_THREADS 128

struct FaLayout {
  int ldh, lds, ldp, ldo;
  size_t q, k, v, s, p, o, m, l, total;
};
__host__ __device__ inline size_t fa_align(size_t x) { return (x + 127) & ~(size_t)127; }
__host__ __device__ inline FaLayout fa_layout(int hd) {
  FaLayout L;
  L.ldh = hd + 8;
  L.lds = FA_BK + 4;
  L.ldp = FA_BK + 8;
  L.ldo = hd + 4;
  size_t off = 0;
  L.q = off;
  off = fa_align(off + (size_t)FA_BQ * L.ldh * 2);
  L.k = off;
  off = fa_align(off + (size_t)FA_BK * L.ldh * 2);
  L.v = off;
  off = fa_align(off + (size_t)FA_BK * L.ldh * 2);
  L.s = off;
  off = fa_align(off + (size_t)FA_BQ * L.lds * 4);
  L.p = off;
  off = fa_align(off + (size_t)FA_BQ * L.ldp * 2);
  L.o = off;
  off = fa_align(off + (size_t)FA_BQ * L.ldo * 4);
  L.m = off;
  off = fa_align(off + (size_t)FA_BQ * 4);
  L.l = off;
  off = fa_align(off + (size_t)FA_BQ * 4);
  L.total = off;
  return L;
}

template <typename T>
__device__ __forceinline__ T to_t(float x);
template <>
__device__ __forceinline__ __half to_t<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 to_t<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
__global__ void __launch_bounds__(FA_THREADS)
    k_flash_attn(const uint16_t* __restrict__ Q, int q_stride, const uint16_t* __restrict__ K,
                 const uint16_t* __restrict__ V, int64_t Tstride, uint16_t* __restrict__ O, int o_stride,
                 float* __restrict__ stat_m, float* __restrict__ stat_l, int stat_stride, int q_begin, int n, int len,
                 int total, int G, int hd, float scale, bool f16) {
  using namespace nvcuda;
  RF_EXTERN_SHARED(unsigned char, smem);
  const FaLayout L = fa_layout(hd);
  uint16_t* Qs = (uint16_t*)(smem + L.q);
  uint16_t* Ks = (uint16_t*)(smem + L.k);
  uint16_t* Vs = (uint16_t*)(smem + L.v);
  float* Ss = (float*)(smem + L.s);
  T* Ps = (T*)(smem + L.p);
  float* Os = (float*)(smem + L.o);
  float* row_m = (float*)(smem + L.m);
  float* row_l = (float*)(smem + L.l);

  const int h = blockIdx.y, kvh = h / G;
  const int q0 = q_begin + blockIdx.x * FA_BQ;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int vpr = hd / 8;  // uint4 vectors per row

  for (int idx = tid; idx < FA_BQ * vpr; idx += FA_THREADS) {
    int r = idx / vpr, c = (idx % vpr) * 8;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (q0 + r < n) val = *(const uint4*)(Q + (int64_t)(q0 + r) * q_stride + (int64_t)h * hd + c);
    *(uint4*)(Qs + r * L.ldh + c) = val;
  }
  for (int idx = tid; idx < FA_BQ * hd; idx += FA_THREADS) Os[(idx / hd) * L.ldo + idx % hd] = 0.f;
  if (tid < FA_BQ) {
    row_m[tid] = -INFINITY;
    row_l[tid] = 0.f;
  }
  const int q_hi = min(n, q0 + FA_BQ);
  const int kend = min(total, len + q_hi);
  const uint16_t* Kh = K + (int64_t)kvh * Tstride * hd;
  const uint16_t* Vh = V + (int64_t)kvh * Tstride * hd;
  __syncthreads();

  for (int k0 = 0; k0 < kend; k0 += FA_BK) {
    for (int idx = tid; idx < FA_BK * vpr; idx += FA_THREADS) {
      int r = idx / vpr, c = (idx % vpr) * 8;
      uint4 kv = make_uint4(0u, 0u, 0u, 0u), vv = make_uint4(0u, 0u, 0u, 0u);
      if (k0 + r < kend) {
        kv = *(const uint4*)(Kh + (int64_t)(k0 + r) * hd + c);
        vv = *(const uint4*)(Vh + (int64_t)(k0 + r) * hd + c);
      }
      *(uint4*)(Ks + r * L.ldh + c) = kv;
      *(uint4*)(Vs + r * L.ldh + c) = vv;
    }
    __syncthreads();
    {  // S = Q K^T for this warp's 16 rows
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
      for (int j = 0; j < 4; j++) wmma::fill_fragment(acc[j], 0.f);
      for (int kk = 0; kk < hd; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, (const T*)(Qs + warp * 16 * L.ldh + kk), L.ldh);
#pragma unroll
        for (int j = 0; j < 4; j++) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(b, (const T*)(Ks + j * 16 * L.ldh + kk), L.ldh);
          wmma::mma_sync(acc[j], a, b, acc[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; j++)
        wmma::store_matrix_sync(Ss + warp * 16 * L.lds + j * 16, acc[j], L.lds, wmma::mem_row_major);
    }
    __syncthreads();
    {  // online softmax: 2 threads per row, 32 columns each
      const int r = tid >> 1, hf = tid & 1;
      const int lim = len + q0 + r;  // last visible key for this row
      const float* srow = Ss + r * L.lds + hf * 32;
      float sv[32];
      float mx = -INFINITY;
#pragma unroll
      for (int c = 0; c < 32; c++) {
        int j = k0 + hf * 32 + c;
        float s = srow[c] * scale;
        if (j > lim || j >= kend) s = -INFINITY;
        sv[c] = s;
        mx = fmaxf(mx, s);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      const float m_old = row_m[r];
      const float m_new = fmaxf(m_old, mx);
      float corr = 1.f;
      if (m_new == -INFINITY) corr = 1.f;
      else if (m_old == -INFINITY) corr = 0.f;
      else corr = expf(m_old - m_new);
      float sum = 0.f;
      T* prow = Ps + r * L.ldp + hf * 32;
#pragma unroll
      for (int c = 0; c < 32; c++) {
        float p = (sv[c] == -INFINITY) ? 0.f : expf(sv[c] - m_new);
        sum += p;
        prow[c] = to_t<T>(p);
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      const float l_old = row_l[r];
      __syncwarp();
      if (hf == 0) {
        row_m[r] = m_new;
        row_l[r] = l_old * corr + sum;
      }
      if (corr != 1.f) {
        float* orow = Os + r * L.ldo;
        for (int c = hf; c < hd; c += 2) orow[c] *= corr;
      }
    }
    __syncthreads();
    // O += P V (this warp's 16 rows)
    for (int cf = 0; cf < hd; cf += 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
      wmma::load_matrix_sync(o, Os + warp * 16 * L.ldo + cf, L.ldo, wmma::mem_row_major);
#pragma unroll
      for (int ks = 0; ks < FA_BK; ks += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, Ps + warp * 16 * L.ldp + ks, L.ldp);
        wmma::load_matrix_sync(b, (const T*)(Vs + ks * L.ldh + cf), L.ldh);
        wmma::mma_sync(o, a, b, o);
      }
      wmma::store_matrix_sync(Os + warp * 16 * L.ldo + cf, o, L.ldo, wmma::mem_row_major);
    }
    __syncthreads();
  }
  for (int idx = tid; idx < FA_BQ * hd; idx += FA_THREADS) {
    int r = idx / hd, c = idx % hd;
    if (q0 + r < n) {
      float l = row_l[r];
      float v = l > 0.f ? Os[r * L.ldo + c] / l : 0.f;
      O[(int64_t)(q0 + r) * o_stride + (int64_t)h * hd + c] = f2h(v, f16);
    }
  }
  if (stat_m && tid < FA_BQ && q0 + tid < n) {
    stat_m[(int64_t)h * stat_stride + q0 + tid] = row_m[tid];
    stat_l[(int64_t)h * stat_stride + q0 + tid] = row_l[tid];
  }
}

/* H2O accumulation: score[kvh][j] += sum over queries qi in [qs, n) and heads g of the group of
 * exp(s*scale - m) / l. One thread per key, 128 keys per block; K tile in smem (f32). */
#define H2O_KEYS 128
#define H2O_QB 16
__host__ __device__ inline size_t h2o_smem(int hd) {
  return ((size_t)H2O_KEYS * (hd + 1) + (size_t)H2O_QB * hd + 3 * H2O_QB) * 4;
}
__global__ void __launch_bounds__(H2O_KEYS)
    k_h2o(const uint16_t* __restrict__ Q, int q_stride, const uint16_t* __restrict__ K, int64_t Tstride,
          const float* __restrict__ stat_m, const float* __restrict__ stat_l, int stat_stride,
          float* __restrict__ score, int qs, int n, int len, int total, int G, int hd, float scale, bool f16) {
  RF_EXTERN_SHARED(float, hsm);
  float* Ks = hsm;                               // [H2O_KEYS][hd+1]
  float* Qs = Ks + (size_t)H2O_KEYS * (hd + 1);  // [H2O_QB][hd]
  float* qm = Qs + (size_t)H2O_QB * hd;          // [H2O_QB]
  float* ql = qm + H2O_QB;                       // [H2O_QB]
  int* qidx = (int*)(ql + H2O_QB);               // [H2O_QB]
  const int kvh = blockIdx.y, tid = threadIdx.x;
  const int j0 = blockIdx.x * H2O_KEYS;
  const int j = j0 + tid;
  const uint16_t* Kh = K + (int64_t)kvh * Tstride * hd;
  for (int idx = tid; idx < H2O_KEYS * hd; idx += H2O_KEYS) {
    int r = idx / hd, c = idx % hd;
    Ks[r * (hd + 1) + c] = (j0 + r < total) ? h2f(Kh[(int64_t)(j0 + r) * hd + c], f16) : 0.f;
  }
  const int W = n - qs;
  const int R = G * W;
  float tot = 0.f;
  for (int base = 0; base < R; base += H2O_QB) {
    __syncthreads();
    for (int idx = tid; idx < H2O_QB * hd; idx += H2O_KEYS) {
      int rr = idx / hd, c = idx % hd;
      int p = base + rr;
      float v = 0.f;
      if (p < R) {
        int g = p / W, qi = qs + p % W;
        v = h2f(Q[(int64_t)qi * q_stride + (int64_t)(kvh * G + g) * hd + c], f16);
      }
      Qs[rr * hd + c] = v;
    }
    if (tid < H2O_QB) {
      int p = base + tid;
      if (p < R) {
        int g = p / W, qi = qs + p % W, hh = kvh * G + g;
        qm[tid] = stat_m[(int64_t)hh * stat_stride + qi];
        ql[tid] = stat_l[(int64_t)hh * stat_stride + qi];
        qidx[tid] = qi;
      } else {
        qm[tid] = 0.f;
        ql[tid] = 0.f;
        qidx[tid] = -1;
      }
    }
    __syncthreads();
    float acc[H2O_QB];
#pragma unroll
    for (int rr = 0; rr < H2O_QB; rr++) acc[rr] = 0.f;
    const float* kr = Ks + tid * (hd + 1);
    for (int d = 0; d < hd; d++) {
      float kv = kr[d];
#pragma unroll
      for (int rr = 0; rr < H2O_QB; rr++) acc[rr] += kv * Qs[rr * hd + d];
    }
    if (j < total) {
#pragma unroll
      for (int rr = 0; rr < H2O_QB; rr++) {
        int qi = qidx[rr];
        if (qi >= 0 && j <= len + qi && ql[rr] > 0.f) tot += expf(acc[rr] * scale - qm[rr]) / ql[rr];
      }
    }
  }
  if (j < total) score[(int64_t)kvh * Tstride + j] += tot;
}

/* Decode attention (one query): split-K partials then combine. part: [nH][nsplit_max][hd+2]. total: keys (+ *dpos
 * when given: a replayed CUDA graph's position, seq.cuh; its split count is the graph's) */
#define DEC_SPLIT 256
__global__ void __launch_bounds__(128)
    k_decode_partial(const uint16_t* __restrict__ Q, const uint16_t* __restrict__ K, const uint16_t* __restrict__ V,
                     int64_t Tstride, float* __restrict__ part, int nsplit_max, int total, int G, int hd, float scale,
                     bool f16, const int32_t* __restrict__ dpos) {
  if (dpos) total += *dpos;
  __shared__ float qs[256];
  __shared__ float wm[4], wl[4];
  __shared__ float wo[4][256];
  const int h = blockIdx.x, split = blockIdx.y, kvh = h / G;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int d = tid; d < hd; d += 128) qs[d] = h2f(Q[(int64_t)h * hd + d], f16);
  __syncthreads();
  const int j0 = split * DEC_SPLIT, j1 = min(total, j0 + DEC_SPLIT);
  const uint16_t* Kh = K + (int64_t)kvh * Tstride * hd;
  const uint16_t* Vh = V + (int64_t)kvh * Tstride * hd;
  float o[8];
#pragma unroll
  for (int i = 0; i < 8; i++) o[i] = 0.f;
  float m = -INFINITY, l = 0.f;
  for (int j = j0 + warp; j < j1; j += 4) {
    const uint16_t* kr = Kh + (int64_t)j * hd;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 8; i++) {
      int d = lane + 32 * i;
      if (d < hd) s += qs[d] * h2f(kr[d], f16);
    }
    s = warp_sum(s) * scale;
    float m_new = fmaxf(m, s);
    float corr = (m == -INFINITY) ? 0.f : expf(m - m_new);
    float p = expf(s - m_new);
    l = l * corr + p;
    const uint16_t* vr = Vh + (int64_t)j * hd;
#pragma unroll
    for (int i = 0; i < 8; i++) {
      int d = lane + 32 * i;
      if (d < hd) o[i] = o[i] * corr + p * h2f(vr[d], f16);
    }
    m = m_new;
  }
  if (lane == 0) {
    wm[warp] = m;
    wl[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < 8; i++) {
    int d = lane + 32 * i;
    if (d < hd) wo[warp][d] = o[i];
  }
  __syncthreads();
  float M = fmaxf(fmaxf(wm[0], wm[1]), fmaxf(wm[2], wm[3]));
  float* out = part + ((int64_t)h * nsplit_max + split) * (hd + 2);
  for (int d = tid; d < hd; d += 128) {
    float acc = 0.f;
    if (M != -INFINITY)
      for (int w = 0; w < 4; w++)
        if (wm[w] != -INFINITY) acc += wo[w][d] * expf(wm[w] - M);
    out[d] = acc;
  }
  if (tid == 0) {
    float Ls = 0.f;
    if (M != -INFINITY)
      for (int w = 0; w < 4; w++)
        if (wm[w] != -INFINITY) Ls += wl[w] * expf(wm[w] - M);
    out[hd] = M;
    out[hd + 1] = Ls;
  }
}
__global__ void k_decode_combine(const float* __restrict__ part, int nsplit_max, int nsplit, int hd,
                                 uint16_t* __restrict__ O, bool f16) {
  const int h = blockIdx.x;
  const float* ph = part + (int64_t)h * nsplit_max * (hd + 2);
  float M = -INFINITY;
  for (int s = 0; s < nsplit; s++) M = fmaxf(M, ph[(int64_t)s * (hd + 2) + hd]);
  float Ls = 0.f;
  for (int s = 0; s < nsplit; s++) {
    float m = ph[(int64_t)s * (hd + 2) + hd];
    if (m != -INFINITY) Ls += ph[(int64_t)s * (hd + 2) + hd + 1] * expf(m - M);
  }
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < nsplit; s++) {
      float m = ph[(int64_t)s * (hd + 2) + hd];
      if (m != -INFINITY) acc += ph[(int64_t)s * (hd + 2) + d] * expf(m - M);
    }
    O[(int64_t)h * hd + d] = f2h(Ls > 0.f ? acc / Ls : 0.f, f16);
  }
}

}  // namespace
