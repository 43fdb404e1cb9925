/*
 * gpu/score.cuh — query scoring (REFORM phase 2): max cosine of context rows against query rows, on a shared stream.
 * The *_impl functions take arguments already checked by the ABI layer (gpu/abi.cuh, cuda/abi_guard.h).
 * Part of the single translation unit cuda/reform_cuda.cu (included there, in order).
 */
namespace {

/* ---------------- scoring ---------------- */
/* rf_score's device state: a stream, a GEMM handle and buffers that persist across queries (grown, never allocated per
 * query) while any model is alive — the server's case; with no model alive they are released after each call, so a
 * process that only scores holds nothing. Blocks of context rows stream through two pinned host buffers: the copy of
 * block i+1 into pinned memory (the read of the memory-mapped file) overlaps the transfer and scoring of block i. */
struct ScoreCtx {
  std::mutex mu;
  bool ready = false;
  int dev = -1;
  cudaStream_t stream = nullptr;
  Gemm gemm;
  int live_models = 0;
  DevArena arena;
  int64_t B = 0, dim = 0, nq = 0, nout = 0;  // sizes the buffers were allocated for (rows per block, ...)
  int64_t nheap = 0, ncnt = 0;               // ... and rf_score_kth's candidates (kept by later rf_score calls)
  bool has_pairs = false;                    // ... and the query row pairs' buffers (kept likewise)
  float *qraw = nullptr, *qn = nullptr, *qoff = nullptr, *cn = nullptr, *S = nullptr, *inv = nullptr, *out = nullptr;
  float* kheap = nullptr;  // rf_score_kth: k_kth_heaps' heaps, [k][groups * (n_q + n_pairs)]
  int* kcnt = nullptr;     // their sizes, [groups * (n_q + n_pairs)]
  PairBufs pb;             // query row pairs (RF_PAIRS_MAX): the pairs, their offsets, the carried row, pm
  uint16_t* qh = nullptr;  // [2 n_q][dim] f16: rows 0..n_q-1 the normalised queries, then their f16 residuals
  uint8_t* raw[2] = {nullptr, nullptr};
  uint8_t* pinned[2] = {nullptr, nullptr};
  cudaEvent_t done[2] = {nullptr, nullptr};
  void release_buffers() {
    if (stream) cudaStreamSynchronize(stream);
    arena.free_all();
    for (int i = 0; i < 2; i++) {
      if (pinned[i]) cudaFreeHost(pinned[i]);
      if (done[i]) cudaEventDestroy(done[i]);
      pinned[i] = nullptr;
      done[i] = nullptr;
      raw[i] = nullptr;
    }
    B = dim = nq = nout = nheap = ncnt = 0;
    has_pairs = false;
    pb = PairBufs();
    cudaGetLastError();
  }
};
ScoreCtx g_score;

/* model lifetime hooks (model.cuh): the scoring buffers live while a model does */
void score_model_created() {
  std::lock_guard<std::mutex> lk(g_score.mu);
  g_score.live_models++;
}
void score_model_freed() {
  std::lock_guard<std::mutex> lk(g_score.mu);
  if (--g_score.live_models <= 0) {
    g_score.live_models = 0;
    g_score.release_buffers();
  }
}

/* nheap / ncnt: rf_score_kth's candidate buffers (0 for rf_score: those of an earlier rf_score_kth call are kept);
 * pairs: the query row pairs' buffers (false: those of an earlier call are kept) */
int score_buffers(int64_t B, int64_t dim, int64_t nq, int64_t n_ctx, int64_t nheap = 0, int64_t ncnt = 0,
                  bool pairs = false) {
  ScoreCtx& g = g_score;
  if (B <= g.B && dim == g.dim && nq <= g.nq && n_ctx <= g.nout && nheap <= g.nheap && ncnt <= g.ncnt &&
      (!pairs || g.has_pairs))
    return RF_OK;
  if (dim == g.dim) {
    nheap = std::max(nheap, g.nheap);
    ncnt = std::max(ncnt, g.ncnt);
    pairs = pairs || g.has_pairs;
  }
  g.release_buffers();
  DevArena& A = g.arena;
  RF_TRY(A.alloc(&g.qraw, (size_t)nq * dim, "score queries"));
  RF_TRY(A.alloc(&g.qn, (size_t)nq * dim, "score queries (normalised)"));
  RF_TRY(A.alloc(&g.qoff, (size_t)nq, "score query offsets"));
  RF_TRY(A.alloc(&g.qh, (size_t)2 * nq * dim, "score queries (f16 pair)"));
  RF_TRY(A.alloc(&g.cn, (size_t)B * dim, "score ctx block (normalised, f32 context)"));
  RF_TRY(A.alloc(&g.S, (size_t)B * 2 * nq, "score similarity block"));
  RF_TRY(A.alloc(&g.inv, (size_t)B, "score ctx inverse norms"));
  RF_TRY(A.alloc(&g.out, (size_t)n_ctx, "score output"));
  if (nheap > 0) RF_TRY(A.alloc(&g.kheap, (size_t)nheap, "score k-th best candidates"));
  if (ncnt > 0) RF_TRY(A.alloc(&g.kcnt, (size_t)ncnt, "score k-th best candidate counts"));
  if (pairs) RF_TRY(g.pb.alloc(A, nq, n_ctx));
  for (int i = 0; i < 2; i++) {
    RF_TRY(A.alloc(&g.raw[i], (size_t)B * dim * 4, "score ctx block"));
    void* h = nullptr;
    cudaError_t e = cudaMallocHost(&h, (size_t)B * dim * 4);
    if (e != cudaSuccess) {
      cudaGetLastError();
      return set_error(RF_ERR_OOM, "cudaMallocHost of %lld bytes (score staging) failed: %s", (long long)(B * dim * 4),
                       cudaGetErrorString(e));
    }
    g.pinned[i] = (uint8_t*)h;
    CU_CHECK(cudaEventCreateWithFlags(&g.done[i], cudaEventDisableTiming));
  }
  g.B = B;
  g.dim = dim;
  g.nq = nq;
  g.nout = n_ctx;
  g.nheap = nheap;
  g.ncnt = ncnt;
  g.has_pairs = pairs;
  return RF_OK;
}

/* rows per block of score_stream: rf_score_select's and rf_score_kth's the same for the same sizes (the same GEMM
 * calls, so the same cosines) */
int64_t score_block_rows(int64_t n_ctx, int32_t dim, int32_t n_q) {
  const ScoreCtx& g = g_score;
  int64_t B = std::max<int64_t>(1, ((int64_t)16 << 20) / dim);
  B = std::min<int64_t>(B, std::max<int64_t>(1, ((int64_t)32 << 20) / n_q));
  B = std::min<int64_t>(B, (int64_t)1 << 20);  // fallback GEMM grid.y = B / 64 must stay <= 65535
  B = std::min<int64_t>(B, n_ctx);
  // keep the buffers of an earlier, larger call (no reallocation per query)
  if (g.B > B && g.dim == dim && g.nq >= n_q && g.nout >= n_ctx) B = std::min<int64_t>(g.B, n_ctx);
#ifdef RF_CUDA_EMU
  // tests cross blocks with a few hundred rows (rf_emu_set("knob:score_block_rows", N))
  if (const int64_t r = emu::knob("score_block_rows")) B = std::min<int64_t>(r, n_ctx);
#endif
  return B;
}

/* The queries uploaded and normalised, then the context rows streamed in blocks of B through the GEMM into g.S; after
 * each block's GEMM, epilogue(b, off, inv) launches what reads the similarities of its b rows (context rows off..):
 * f16 context: g.S [b][2 n_q], the f16 pair's halves, inv the rows' inverse norms; f32: g.S [b][n_q] cosines, inv NULL.
 * The buffers are sized by the caller (score_buffers). */
template <class Epilogue>
int score_stream(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q, int64_t B,
                 Epilogue&& epilogue) {
  ScoreCtx& g = g_score;
  cudaStream_t st = g.stream;
  const int es = ctx_dtype == RF_F32 ? 4 : 2;
  const bool tc = ctx_dtype == RF_F16;  // f16 context: tensor-core GEMM straight on the stored rows
  CU_CHECK(cudaMemcpyAsync(g.qraw, q, (size_t)n_q * dim * 4, cudaMemcpyHostToDevice, st));
  RF_LAUNCH(k_normalize_rows, nblocks(n_q, 8), 256, 0, st)(g.qraw, RF_F32, g.qn, n_q, dim);
  KERNEL_CHECK();
  if (tc) {
    RF_LAUNCH(k_split_f16, nblocks((int64_t)n_q * dim, 256), 256, 0, st)(g.qn, g.qh, (int64_t)n_q * dim);
    KERNEL_CHECK();
  }
  int64_t i = 0;
  for (int64_t off = 0; off < n_ctx; off += B, i++) {
    const int64_t b = std::min(B, n_ctx - off);
    const int slot = (int)(i & 1);
    CU_CHECK(cudaEventSynchronize(g.done[slot]));  // the transfer that last read this pinned buffer has finished
    memcpy(g.pinned[slot], (const uint8_t*)ctx + off * dim * es, (size_t)(b * dim * es));
    CU_CHECK(cudaMemcpyAsync(g.raw[slot], g.pinned[slot], (size_t)(b * dim * es), cudaMemcpyHostToDevice, st));
    CU_CHECK(cudaEventRecord(g.done[slot], st));
    if (tc) {
      // S[r][j] = ctx_r . (q_hi_j) and S[r][n_q + j] = ctx_r . (q_lo_j): q = hi + lo is exact to ~2^-22, so the f16
      // tensor-core product is as accurate as the f32 one; the row norm divides afterwards
      RF_LAUNCH(k_row_invnorm, nblocks(b, 8), 256, 0, st)(g.raw[slot], RF_F16, g.inv, b, dim);
      KERNEL_CHECK();
      RF_TRY(g.gemm.nt((int)b, 2 * n_q, dim, g.raw[slot], RF_F16, dim, g.qh, RF_F16, dim, g.S, RF_F32, 2 * n_q, 0.f));
      RF_TRY(epilogue(b, off, (const float*)g.inv));
    } else {
      RF_LAUNCH(k_normalize_rows, nblocks(b, 8), 256, 0, st)(g.raw[slot], ctx_dtype, g.cn, b, dim);
      KERNEL_CHECK();
      RF_TRY(g.gemm.nt((int)b, n_q, dim, g.cn, RF_F32, dim, g.qn, RF_F32, dim, g.S, RF_F32, n_q, 0.f));
      RF_TRY(epilogue(b, off, (const float*)nullptr));
    }
  }
  return RF_OK;
}

/* The scores of one block of similarities (score_stream's or embstore_tiles' epilogue), context rows off..off+b-1:
 * each row's maximum over the query rows into out[off..) and, with pairs, the pairs' into pb.pm[off..) (joined to the
 * scores by PairBufs::finish once every block has run) */
int block_scores(cudaStream_t st, const float* S, int64_t b, int64_t off, int32_t n_q, const float* inv,
                 const float* qoff, const PairBufs& pb, int32_t n_pairs, const float* poff, float* out) {
  if (inv) {
    RF_LAUNCH(k_rowmax_pair, nblocks(b, 256), 256, 0, st)(S, b, n_q, inv, qoff, out + off);
  } else {
    RF_LAUNCH(k_rowmax, nblocks(b, 256), 256, 0, st)(S, b, n_q, qoff, out + off);
  }
  KERNEL_CHECK();
  if (n_pairs > 0) {
    RF_LAUNCH(k_pair_rowmax, nblocks(b, 256), 256, 0, st)
    (S, b, n_q, inv, pb.prev, pb.pairs, n_pairs, poff, off, pb.pm + off);
    KERNEL_CHECK();
    RF_TRY(pb.carry(st, S, b, n_q, inv));
  }
  return RF_OK;
}

int score_run(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
              const float* q_offset, const int32_t* pairs, int32_t n_pairs, const float* pair_offset, float* out) {
  ScoreCtx& g = g_score;
  cudaStream_t st = g.stream;
  const int64_t B = score_block_rows(n_ctx, dim, n_q);
  RF_TRY(score_buffers(B, dim, n_q, n_ctx, 0, 0, n_pairs > 0));
  if (q_offset) CU_CHECK(cudaMemcpyAsync(g.qoff, q_offset, (size_t)n_q * 4, cudaMemcpyHostToDevice, st));
  const float* qoff = q_offset ? g.qoff : nullptr;
  RF_TRY(g.pb.upload(st, pairs, n_pairs, pair_offset));
  const float* poff = pair_offset ? g.pb.poff : nullptr;
  RF_TRY(score_stream(ctx, ctx_dtype, n_ctx, dim, q, n_q, B, [&](int64_t b, int64_t off, const float* inv) -> int {
    return block_scores(st, g.S, b, off, n_q, inv, qoff, g.pb, n_pairs, poff, g.out);
  }));
  if (n_pairs > 0) RF_TRY(g.pb.finish(st, g.out, n_ctx));
  CU_CHECK(cudaMemcpyAsync(out, g.out, (size_t)n_ctx * 4, cudaMemcpyDeviceToHost, st));
  CU_CHECK(cudaStreamSynchronize(st));
  return RF_OK;
}

/* ---------------- rf_score_kth ---------------- */
/* The row groups of k_kth_heaps: each (column, group) thread keeps k candidates (ncol columns: the query rows, then the
 * pairs), and all of them come back, so a group takes >= 8 k rows on average, the candidates stay <= 4 Mi floats (16
 * MiB: far less than the n_ctx x n_q cosines of a long context) where ncol allows, and <= 128 Ki threads run. */
int64_t kth_groups(int64_t n_ctx, int64_t ncol, int32_t kk) {
  int64_t ng = std::min<int64_t>((131072 + ncol - 1) / ncol, n_ctx / (8 * (int64_t)kk));
  ng = std::min<int64_t>(ng, ((int64_t)1 << 22) / (ncol * kk));
  return std::max<int64_t>(1, ng);
}

/* rf_score_kth's sizes for n_ctx > 0 rows: kk = k clamped to the rows (a query row's heap), kp = to the n_ctx - 1 pair
 * values (a pair's heap; 0 for one row: -inf), the row groups and the threads of k_kth_heaps */
struct KthPlan {
  int32_t kk, kp;
  int64_t ncol, ngrp, nt;
  KthPlan(int64_t n_ctx, int32_t n_q, int32_t n_pairs, int32_t k)
      : kk((int32_t)std::min<int64_t>(k, n_ctx)),
        kp((int32_t)std::min<int64_t>(k, n_ctx - 1)),
        ncol((int64_t)n_q + n_pairs),
        ngrp(kth_groups(n_ctx, ncol, kk)),
        nt(ngrp * ncol) {}
};

/* one block's rows (context rows off..off+b-1) folded into the heaps (score_stream's or embstore_tiles' epilogue) */
int block_kth(cudaStream_t st, const KthPlan& plan, const float* S, int64_t b, int64_t off, int32_t n_q,
              const float* inv, const PairBufs& pb, int32_t n_pairs, float* heap, int* cnt) {
  RF_LAUNCH(k_kth_heaps, nblocks(plan.nt, 256), 256, 0, st)
  (S, b, n_q, inv, pb.pairs, n_pairs, pb.prev, off, plan.ngrp, plan.kk, plan.kp, heap, cnt);
  KERNEL_CHECK();
  if (n_pairs > 0) RF_TRY(pb.carry(st, S, b, n_q, inv));
  return RF_OK;
}

/* rf_score_kth's end on the host: the heaps and their sizes (device) come back, and each column's k-th largest
 * candidate is its answer (as select.h's kth_of ends): out[0..n_q) the query rows', out[n_q..n_q + n_pairs) the
 * pairs', -inf where fewer values than the (clamped) k had one. Synchronises. */
int kth_finish(cudaStream_t st, const KthPlan& plan, const float* heap, const int* cnt, int32_t n_q, float* out) {
  const int64_t nt = plan.nt;
  std::vector<float> h((size_t)(nt * plan.kk));
  std::vector<int> c((size_t)nt);
  CU_CHECK(cudaMemcpyAsync(c.data(), cnt, (size_t)nt * sizeof(int), cudaMemcpyDeviceToHost, st));
  CU_CHECK(cudaMemcpyAsync(h.data(), heap, (size_t)(nt * plan.kk) * sizeof(float), cudaMemcpyDeviceToHost, st));
  CU_CHECK(cudaStreamSynchronize(st));
  std::vector<float> cand;
  for (int64_t j = 0; j < plan.ncol; j++) {
    const int32_t kj = j < n_q ? plan.kk : plan.kp;
    cand.clear();
    for (int64_t g = 0; g < plan.ngrp; g++) {
      const int64_t t = g * plan.ncol + j;
      for (int64_t i = 0; i < c[t]; i++) cand.push_back(h[i * nt + t]);
    }
    out[j] = kj > 0 ? rf::kth_largest(cand, kj) : -INFINITY;
  }
  return RF_OK;
}

/* rf_score_kth over the file path (n_ctx > 0): score_stream's blocks, each folded into the heaps by k_kth_heaps */
int score_kth_run(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
                  const int32_t* pairs, int32_t n_pairs, int32_t k, float* out) {
  ScoreCtx& g = g_score;
  cudaStream_t st = g.stream;
  const KthPlan plan(n_ctx, n_q, n_pairs, k);
  const int64_t B = score_block_rows(n_ctx, dim, n_q);
  RF_TRY(score_buffers(B, dim, n_q, n_ctx, plan.nt * plan.kk, plan.nt, n_pairs > 0));
  RF_TRY(g.pb.upload(st, pairs, n_pairs, nullptr));
  RF_TRY(score_stream(ctx, ctx_dtype, n_ctx, dim, q, n_q, B, [&](int64_t b, int64_t off, const float* inv) -> int {
    return block_kth(st, plan, g.S, b, off, n_q, inv, g.pb, n_pairs, g.kheap, g.kcnt);
  }));
  return kth_finish(st, plan, g.kheap, g.kcnt, n_q, out);
}

/* runs run() (score_run or score_kth_run) on the scoring stream, set up for the current device on first use */
template <class Run>
int score_with(Run&& run) {
  int dev = device_index();
  RF_TRY(ensure_device(dev));
  std::lock_guard<std::mutex> lk(g_score.mu);
  if (!g_score.ready || g_score.dev != dev) {
    if (g_score.ready) {
      g_score.release_buffers();
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
  int rc = run();
  // on failure, or when no model holds them, the buffers go (the next call allocates afresh)
  if (rc != RF_OK || g_score.live_models <= 0) g_score.release_buffers();
  return rc;
}

/* rf_score / rf_score_select (arguments checked, n_ctx > 0; n_pairs 0: no pairs) */
int score_impl(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
               const float* q_offset, const int32_t* pairs, int32_t n_pairs, const float* pair_offset, float* out) {
  return score_with(
      [&]() { return score_run(ctx, ctx_dtype, n_ctx, dim, q, n_q, q_offset, pairs, n_pairs, pair_offset, out); });
}

/* rf_score_kth (arguments checked, n_ctx > 0) */
int score_kth_impl(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
                   const int32_t* pairs, int32_t n_pairs, int32_t k, float* out) {
  return score_with([&]() { return score_kth_run(ctx, ctx_dtype, n_ctx, dim, q, n_q, pairs, n_pairs, k, out); });
}

}  // namespace
