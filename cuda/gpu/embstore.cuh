/*
 * gpu/embstore.cuh — resident context embeddings (rf_embstore): a context's f16 embedding rows kept in device memory,
 * so that a query scores them without reading and uploading the embedding file again. Rows live in blocks (allocated
 * as rows arrive, never moved), each with the inverse norms of its rows (computed once, at append). Appends and
 * scoring run on the model's `aux` stream with its own cuBLAS handle: an append queues its upload and returns (no
 * host wait, so it never waits for a compress chunk in flight on the model's stream), and scoring can overlap
 * compression. Scoring uses exactly rf_score's f16 path (score.cuh: normalised queries split into an f16 pair, one
 * tensor-core GEMM per tile, row maximum times the inverse norm), so a resident context scores as the same rows
 * streamed from the file do. The *_impl functions take arguments already checked by the ABI layer.
 * Part of the single translation unit cuda/reform_cuda.cu (included there, in order).
 */
namespace {

int64_t embstore_block_rows(int dim) {
#ifdef RF_CUDA_EMU
  // tests cross block boundaries with a few hundred rows (rf_emu_set("knob:embstore_block_rows", N))
  if (const int64_t r = emu::knob("embstore_block_rows")) return r;
#endif
  return std::max<int64_t>(1, (int64_t)RF_EMBSTORE_BLOCK_BYTES / (2 * dim));
}

int64_t embstore_bytes(const rf_embstore* e) {
  return (int64_t)e->blocks.size() * (e->block_rows * e->dim * 2 + e->block_rows * 4);
}

void embstore_free(rf_embstore* e) {
  if (!e) return;
  if (e->m) {
    cudaSetDevice(e->m->dev);
    cudaStreamSynchronize(e->m->aux);
  }
  for (size_t i = 0; i < e->blocks.size(); i++) {
    cudaFree(e->blocks[i]);
    cudaFree(e->inv[i]);
  }
  e->blocks.clear();
  e->inv.clear();
  cudaGetLastError();
  if (e->m) model_release_child(e->m);
  e->m = nullptr;
}

int embstore_create_impl(rf_model* m, int32_t dim, rf_embstore** out) {
  CU_CHECK(cudaSetDevice(m->dev));
  std::unique_ptr<rf_embstore> e(new rf_embstore());
  e->m = m;
  m->children++;
  e->dim = dim;
  e->block_rows = embstore_block_rows(dim);
  *out = e.release();
  return RF_OK;
}

/* n rows from host memory (pageable: the runtime reads them before the call returns) */
int embstore_append_impl(rf_embstore* e, const uint16_t* rows, int64_t n) {
  rf_model* m = e->m;
  CU_CHECK(cudaSetDevice(m->dev));
  const int64_t B = e->block_rows, dim = e->dim;
  // the blocks this append needs, first: out of memory leaves the store as it was
  const size_t had = e->blocks.size();
  while ((int64_t)e->blocks.size() * B < e->rows + n) {
    void* blk = nullptr;
    void* inv = nullptr;
    int rc = dalloc(&blk, (size_t)(B * dim * 2), "resident embeddings");
    if (rc == RF_OK) rc = dalloc(&inv, (size_t)(B * 4), "resident embedding norms");
    if (rc != RF_OK) {
      cudaFree(blk);
      while (e->blocks.size() > had) {
        cudaFree(e->blocks.back());
        cudaFree(e->inv.back());
        e->blocks.pop_back();
        e->inv.pop_back();
      }
      return rc;
    }
    e->blocks.push_back((uint16_t*)blk);
    e->inv.push_back((float*)inv);
  }
  for (int64_t done = 0; done < n;) {
    const int64_t r = e->rows + done, b = r / B, off = r % B, k = std::min(n - done, B - off);
    CU_CHECK(cudaMemcpyAsync(e->blocks[b] + off * dim, rows + done * dim, (size_t)(k * dim * 2), cudaMemcpyHostToDevice,
                             m->aux));
    RF_LAUNCH(k_row_invnorm, nblocks(k, 8), 256, 0, m->aux)
    (e->blocks[b] + off * dim, RF_F16, e->inv[b] + off, k, (int)dim);
    KERNEL_CHECK();
    done += k;
  }
  e->rows += n;
  return RF_OK;
}

/* the query buffers of embstore scoring (the model's, grown, never per query); nheap / ncnt: rf_embstore_score_kth's
 * candidates (0: none, or those of an earlier call kept); pairs: the query row pairs' buffers (false: none, or those
 * of an earlier call kept) */
int embstore_scratch(rf_model* m, int64_t dim, int64_t nq, int64_t tile, int64_t nout, int64_t nheap = 0,
                     int64_t ncnt = 0, bool pairs = false) {
  QueryScratch& s = m->qs;
  if (dim == s.dim && nq <= s.nq && tile <= s.tile && nout <= s.nout && nheap <= s.nheap && ncnt <= s.ncnt &&
      (!pairs || s.has_pairs))
    return RF_OK;
  if (dim == s.dim) {
    nheap = std::max(nheap, s.nheap);
    ncnt = std::max(ncnt, s.ncnt);
    pairs = pairs || s.has_pairs;
  }
  CU_CHECK(cudaStreamSynchronize(m->aux));
  s.arena.free_all();
  s = QueryScratch();
  const int64_t NQ = nq, T = tile, N = nout;
  DevArena& A = s.arena;
  int rc = RF_OK;
  auto grow = [&]() -> int {
    RF_TRY(A.alloc(&s.qraw, (size_t)(NQ * dim), "resident scoring: queries"));
    RF_TRY(A.alloc(&s.qn, (size_t)(NQ * dim), "resident scoring: normalised queries"));
    RF_TRY(A.alloc(&s.qoff, (size_t)NQ, "resident scoring: query offsets"));
    RF_TRY(A.alloc(&s.qh, (size_t)(2 * NQ * dim), "resident scoring: f16 query pairs"));
    RF_TRY(A.alloc(&s.S, (size_t)(T * 2 * NQ), "resident scoring: similarity tile"));
    RF_TRY(A.alloc(&s.out, (size_t)N, "resident scoring: scores"));
    if (nheap > 0) RF_TRY(A.alloc(&s.kheap, (size_t)nheap, "resident scoring: k-th best candidates"));
    if (ncnt > 0) RF_TRY(A.alloc(&s.kcnt, (size_t)ncnt, "resident scoring: k-th best candidate counts"));
    if (pairs) RF_TRY(s.pb.alloc(A, NQ, N));
    return RF_OK;
  };
  rc = grow();
  if (rc != RF_OK) {
    s.arena.free_all();
    s = QueryScratch();
    return rc;
  }
  s.dim = dim;
  s.nq = NQ;
  s.tile = T;
  s.nout = N;
  s.nheap = nheap;
  s.ncnt = ncnt;
  s.has_pairs = pairs;
  return RF_OK;
}

/* the similarity tiles of the store's rows [0, n_ctx) for the queries uploaded to s.qh (score_run's f16 path): tiles of
 * at most T rows within a block, each tile's GEMM into s.S [k][2 n_q], then epilogue(k, r0, inv) with the tile's
 * rows r0.. and their inverse norms; in order on the model's aux stream, so that a query row pair spanning two tiles
 * (or two blocks) takes the first one's last row as score_stream's blocks do (PairBufs) */
template <class Epilogue>
int embstore_tiles(rf_embstore* e, int64_t n_ctx, int32_t n_q, int64_t T, Epilogue&& epilogue) {
  rf_model* m = e->m;
  QueryScratch& s = m->qs;
  const int64_t dim = e->dim, B = e->block_rows;
  for (int64_t r0 = 0; r0 < n_ctx;) {
    const int64_t b = r0 / B, off = r0 % B, k = std::min({n_ctx - r0, B - off, T});
    const uint16_t* rows = e->blocks[b] + off * dim;
    RF_TRY(m->gemm_aux.nt((int)k, 2 * n_q, (int)dim, rows, RF_F16, dim, s.qh, RF_F16, dim, s.S, RF_F32, 2 * n_q, 0.f));
    RF_TRY(epilogue(k, r0, (const float*)(e->inv[b] + off)));
    r0 += k;
  }
  return RF_OK;
}

/* the rows per similarity tile: within a block, the tile [T][2 n_q] f32 at most 64 MiB */
int64_t embstore_tile_rows(const rf_embstore* e, int32_t n_q) {
  return std::min<int64_t>(e->block_rows, std::max<int64_t>(1, ((int64_t)8 << 20) / (2 * (int64_t)n_q)));
}

/* the queries to s.qh: normalised, split into their f16 pair */
int embstore_queries(rf_model* m, int64_t dim, const float* q, int32_t n_q) {
  QueryScratch& s = m->qs;
  cudaStream_t st = m->aux;
  CU_CHECK(cudaMemcpyAsync(s.qraw, q, (size_t)n_q * dim * 4, cudaMemcpyHostToDevice, st));
  RF_LAUNCH(k_normalize_rows, nblocks(n_q, 8), 256, 0, st)(s.qraw, RF_F32, s.qn, (int64_t)n_q, (int)dim);
  KERNEL_CHECK();
  RF_LAUNCH(k_split_f16, nblocks((int64_t)n_q * dim, 256), 256, 0, st)(s.qn, s.qh, (int64_t)n_q * dim);
  KERNEL_CHECK();
  return RF_OK;
}

/* rf_score over rows [0, n_ctx) of the store into out (host), each query row's offset (q_offset, n_q or NULL) taken off
 * its cosine, with the query row pairs' matches (pairs, n_pairs, pair_offset: rf_score_select's), as score_run's f16
 * path computes them */
int embstore_score_impl(rf_embstore* e, int64_t n_ctx, const float* q, int32_t n_q, const float* q_offset,
                        const int32_t* pairs, int32_t n_pairs, const float* pair_offset, float* out) {
  rf_model* m = e->m;
  CU_CHECK(cudaSetDevice(m->dev));
  if (n_ctx == 0) return RF_OK;
  const int64_t dim = e->dim;
  const int64_t T = embstore_tile_rows(e, n_q);
  QueryScratch& s = m->qs;
  // keep the buffers of an earlier, larger query (no reallocation per query)
  RF_TRY(embstore_scratch(m, dim, std::max<int64_t>(n_q, s.dim == dim ? s.nq : 0),
                          std::max(T, s.dim == dim ? s.tile : 0), std::max(n_ctx, s.dim == dim ? s.nout : 0), 0, 0,
                          n_pairs > 0));
  cudaStream_t st = m->aux;
  if (q_offset) CU_CHECK(cudaMemcpyAsync(s.qoff, q_offset, (size_t)n_q * 4, cudaMemcpyHostToDevice, st));
  const float* qoff = q_offset ? s.qoff : nullptr;
  RF_TRY(s.pb.upload(st, pairs, n_pairs, pair_offset));
  const float* poff = pair_offset ? s.pb.poff : nullptr;
  RF_TRY(embstore_queries(m, dim, q, n_q));
  RF_TRY(embstore_tiles(e, n_ctx, n_q, T, [&](int64_t k, int64_t r0, const float* inv) -> int {
    return block_scores(st, s.S, k, r0, n_q, inv, qoff, s.pb, n_pairs, poff, s.out);
  }));
  if (n_pairs > 0) RF_TRY(s.pb.finish(st, s.out, n_ctx));
  // 4 bytes per context token come back: the smoothing and selection run on the host (select.h), where their
  // sequential f64 prefix sums define the selection bit for bit (a parallel sum on the device would not)
  CU_CHECK(cudaMemcpyAsync(out, s.out, (size_t)n_ctx * 4, cudaMemcpyDeviceToHost, st));
  CU_CHECK(cudaStreamSynchronize(st));
  return RF_OK;
}

/* rf_score_kth over rows [0, n_ctx) of the store (arguments checked): embstore_score_impl's tiles and cosines, each
 * tile folded into the heaps by k_kth_heaps (the query rows' and the pairs'), finished on the host as the file path is
 * (score.cuh block_kth, kth_finish) */
int embstore_score_kth_impl(rf_embstore* e, int64_t n_ctx, const float* q, int32_t n_q, const int32_t* pairs,
                            int32_t n_pairs, int32_t k, float* out) {
  std::fill(out, out + n_q + n_pairs, -INFINITY);
  rf_model* m = e->m;
  CU_CHECK(cudaSetDevice(m->dev));
  if (n_ctx == 0) return RF_OK;
  const int64_t dim = e->dim;
  const KthPlan plan(n_ctx, n_q, n_pairs, k);
  const int64_t T = embstore_tile_rows(e, n_q);
  QueryScratch& s = m->qs;
  RF_TRY(embstore_scratch(m, dim, std::max<int64_t>(n_q, s.dim == dim ? s.nq : 0),
                          std::max(T, s.dim == dim ? s.tile : 0), s.dim == dim ? s.nout : 0, plan.nt * plan.kk, plan.nt,
                          n_pairs > 0));
  cudaStream_t st = m->aux;
  RF_TRY(s.pb.upload(st, pairs, n_pairs, nullptr));
  RF_TRY(embstore_queries(m, dim, q, n_q));
  RF_TRY(embstore_tiles(e, n_ctx, n_q, T, [&](int64_t rows, int64_t r0, const float* inv) -> int {
    return block_kth(st, plan, s.S, rows, r0, n_q, inv, s.pb, n_pairs, s.kheap, s.kcnt);
  }));
  return kth_finish(st, plan, s.kheap, s.kcnt, n_q, out);
}

}  // namespace
