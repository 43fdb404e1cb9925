/*
 * gpu/objects.cuh — the device-side objects behind the ABI handles: rf_model, rf_compressor, rf_seq.
 * Part of the single translation unit cuda/reform_cuda.cu (included there, in order).
 */
namespace {

/* ======================================================================================
 * objects
 * ====================================================================================== */
struct LayerW {
  uint16_t* in_norm = nullptr;
  uint16_t* post_norm = nullptr;
  uint16_t* wqkv = nullptr;     // [qd + 2 kvd][H]
  uint16_t* bqkv = nullptr;     // [qd + 2 kvd]
  uint16_t* qk_norm = nullptr;  // [2][hd]: q_norm, then k_norm (qk_norm only)
  uint16_t* wo = nullptr;       // [H][qd]
  uint16_t* wgu = nullptr;      // [2I][H] (gate rows first)
  uint16_t* wdown = nullptr;    // [H][I]
};

/* Per-step scratch of the model's compressors and sequences: one step runs at a time (they share the model's stream),
 * so one set of buffers, grown to the largest user, serves all of them instead of one set per object. */
struct Workspace {
  DevArena arena;
  // sizes it was allocated for
  int64_t rows = 0;       // activation rows (chunk / prefill piece)
  int64_t krot_rows = 0;  // roped-key rows per kv head (compressor: capacity + max_chunk)
  int64_t cap = 0;        // eviction rows per kv head (compressor capacity)
  int64_t emb_bytes = 0;  // embedding output of one chunk
  bool mlp = false;
  uint16_t *x = nullptr, *xn = nullptr, *qkv = nullptr, *qrot = nullptr, *attn = nullptr, *gu = nullptr,
           *hbuf = nullptr;
  float *stat_m = nullptr, *stat_l = nullptr;  // [nH][rows]
  int32_t* tok = nullptr;                      // [rows]
  uint16_t* Krot = nullptr;                    // [nKV][krot_rows][hd]
  uint8_t* emb = nullptr;                      // [emb_bytes]
  uint8_t* emb_host = nullptr;                 // pinned [emb_bytes]: the embeddings' way back
  uint16_t* tmpK = nullptr;                    // [nKV][cap][hd]
  float* tmpS = nullptr;                       // [nKV][cap]
  int32_t* keep = nullptr;                     // [nKV][cap]
  void free_all() {
    arena.free_all();
    if (emb_host) cudaFreeHost(emb_host);
    *this = Workspace();
  }
};

/* The query row pairs (cuda/reform.h RF_PAIRS_MAX) of rf_score_select / rf_score_kth and their store twins, on the
 * device: allocated with the other query buffers (in their arena) the first time a query has pairs, then kept. The
 * blocks of similarities run in order on one stream; a pair spans two rows, so each block's last row of cosines is
 * carried to the next block in `prev` (k_last_row), and a row's score, which takes the pair matches ending at it and
 * at the next row, is finished once every block has run (k_pair_combine over pm). */
struct PairBufs {
  int* pairs = nullptr;   // [2 RF_PAIRS_MAX] (a_p, b_p)
  float* poff = nullptr;  // [RF_PAIRS_MAX] their offsets
  float* prev = nullptr;  // [n_q] the previous block's last row of cosines
  float* pm = nullptr;    // [n_ctx] rf_score_select: each row's best pair match ending there (k_pair_rowmax)
  int alloc(DevArena& A, int64_t nq, int64_t nout) {
    RF_TRY(A.alloc(&pairs, (size_t)2 * RF_PAIRS_MAX, "query row pairs"));
    RF_TRY(A.alloc(&poff, (size_t)RF_PAIRS_MAX, "query row pair offsets"));
    RF_TRY(A.alloc(&prev, (size_t)nq, "query row pairs: the previous block's cosines"));
    return A.alloc(&pm, (size_t)nout, "query row pairs: each row's best match");
  }
  /* n pairs (and their offsets, off: n f32 or NULL) to the device */
  int upload(cudaStream_t st, const int32_t* p, int32_t n, const float* off) const {
    if (n <= 0) return RF_OK;
    CU_CHECK(cudaMemcpyAsync(pairs, p, (size_t)n * 2 * sizeof(int32_t), cudaMemcpyHostToDevice, st));
    if (off) CU_CHECK(cudaMemcpyAsync(poff, off, (size_t)n * sizeof(float), cudaMemcpyHostToDevice, st));
    return RF_OK;
  }
  /* after a block's pair kernels (before the next block's GEMM): its last row of cosines to prev */
  int carry(cudaStream_t st, const float* S, int64_t rows, int32_t n_q, const float* inv) const {
    RF_LAUNCH(k_last_row, nblocks(n_q, 256), 256, 0, st)(S, rows, n_q, inv, prev);
    KERNEL_CHECK();
    return RF_OK;
  }
  /* rf_score_select after the last block: each of the n scores joined with the pair matches of its row and the next */
  int finish(cudaStream_t st, float* out, int64_t n) const {
    RF_LAUNCH(k_pair_combine, nblocks(n, 256), 256, 0, st)(out, pm, n);
    KERNEL_CHECK();
    return RF_OK;
  }
};

/* the query buffers of rf_embstore scoring (embstore.cuh), grown to the largest query, never per query */
struct QueryScratch {
  DevArena arena;
  int64_t dim = 0, nq = 0, tile = 0, nout = 0;  // sizes they were allocated for
  int64_t nheap = 0, ncnt = 0;                  // ... and rf_embstore_score_kth's candidates
  bool has_pairs = false;                       // ... and the query row pairs' buffers
  float *qraw = nullptr, *qn = nullptr, *qoff = nullptr, *S = nullptr, *out = nullptr;
  float* kheap = nullptr;  // rf_embstore_score_kth: k_kth_heaps' heaps, [k][groups * (n_q + n_pairs)]
  int* kcnt = nullptr;     // their sizes, [groups * (n_q + n_pairs)]
  PairBufs pb;             // query row pairs
  uint16_t* qh = nullptr;  // [2 nq][dim]: the normalised queries in f16 and their f16 residuals
};

}  // namespace

struct rf_model {
  rf_config cfg{};
  int dev = 0;
  bool f16 = false;
  int adt = RF_BF16;  // activation / weight dtype
  int H = 0, I = 0, V = 0, NL = 0, nH = 0, nKV = 0, hd = 0, qd = 0, kvd = 0, qkvd = 0, G = 1;
  DevArena arena;
  uint16_t* embed = nullptr;
  uint16_t* norm = nullptr;
  uint16_t* lm_head = nullptr;
  std::vector<LayerW> layers;
  float* inv_freq = nullptr;
  void* staging = nullptr;
  size_t staging_bytes = 0;
  std::vector<uint8_t> set;
  bool finalized = false;
  cudaStream_t stream = nullptr;
  /* Pipelined compress (rf_compressor_submit): a chunk's embeddings go device -> pinned host memory on this second
   * stream, after `emb_ready` (recorded on `stream` behind the chunk's forward), so that the next chunk's forward runs
   * meanwhile; `emb_free` (recorded on `copy` behind each such copy) is what a forward waits for before it writes the
   * shared embedding buffer (ws.emb) again. */
  cudaStream_t copy = nullptr;
  cudaEvent_t emb_ready = nullptr, emb_free = nullptr;
  Gemm gemm;
  /* resident embeddings (rf_embstore): their uploads and scoring, on a stream of their own with its cuBLAS handle */
  cudaStream_t aux = nullptr;
  Gemm gemm_aux;
  QueryScratch qs;
  size_t fa_smem = 0;
  Workspace ws;            // shared by its compressors and sequences
  uint64_t ws_gen = 0;     // bumped whenever ws is reallocated (a captured decode graph holds its pointers)
  bool counted = false;    // counted in rf_score's live models (score.cuh)
  int children = 0;        // live compressors / seqs (they keep the model alive, as in the CPU build)
  bool destroyed = false;  // rf_model_destroy called; freed when the last child goes
};

struct rf_compressor {
  rf_model* m = nullptr;
  rf_compress_params p{};
  std::vector<rf::HeadSel> heads;
  int exit = 0;
  bool exit_attn = false;  // an o head at the exit layer: its attention runs (rf::exit_attention)
  int ncache = 0;          // layers whose cache is kept (rf::cached_layers)
  int edim = 0;
  int T = 0;  // capacity + max_chunk rows per cache head
  int64_t len = 0, seen = 0;
  DevArena arena;                           // its own memory: the cache; per-step scratch is the model's Workspace
  std::vector<uint16_t*> Kc, Vc;            // per cached layer [nKV][T][hd] (keys pre-RoPE)
  std::vector<float*> score;                // per cached layer [nKV][T]
  int32_t* table = nullptr;                 // per layer pairs, concatenated: q/k/v heads, then o heads
  std::vector<int> table_off, table_cnt;    // per layer: its q/k/v heads (columns of the projection)
  std::vector<int> otable_off, otable_cnt;  // per layer: its o heads (columns of the attention output)
  /* chunks submitted and not yet collected (rf_compressor_submit / _collect): slot (head + k) % 2 holds the k-th
   * oldest; its embeddings land in pinned[slot] when copied[slot] completes (two slots: chunk i is read out on the host
   * while chunk i + 1's copy may already be queued) */
  uint8_t* pinned[2] = {nullptr, nullptr};  // [max_chunk * edim * emb element size], allocated at the first submit
  cudaEvent_t copied[2] = {nullptr, nullptr};
  int pend_rows[2] = {0, 0};
  int npend = 0, head = 0;
};

struct rf_embstore {
  rf_model* m = nullptr;
  int64_t dim = 0, rows = 0, block_rows = 0;
  std::vector<uint16_t*> blocks;  // [block_rows][dim] f16 each
  std::vector<float*> inv;        // [block_rows] per block: 1 / max(|row|, 1e-12)
};

#define SAMPLE_MAX_K 1024  // rf_seq_sample selects up to this many candidates on the device
struct rf_seq {
  rf_model* m = nullptr;
  int maxT = 0;
  int S = 0;  // rows per internal prefill chunk
  int len = 0;
  bool has_logits = false;
  DevArena arena;                 // its own memory: the cache, logits, decode partials; activations: the Workspace
  std::vector<uint16_t*> Kc, Vc;  // per layer [nKV][maxT][hd] (roped)
  float* logits = nullptr;        // [V]
  float* part = nullptr;          // decode partials
  int nsplit_max = 0;
  int32_t* sel_idx = nullptr;  // [SAMPLE_MAX_K] device sampler: the candidates' ids
  float* sel_val = nullptr;    // [SAMPLE_MAX_K] and their logits
  std::vector<float> host_logits;
  bool host_logits_valid = false;  // host_logits holds the last logits (copied only when someone needs them)
  /* The decode step as a CUDA graph (REFORM_CUDA_GRAPH=1, seq.cuh): captured once per decode split count (every
   * DEC_SPLIT positions) and workspace, replayed per token; the token and its position reach it through `pin`
   * (pinned, copied to the device by the graph's first nodes) and `dpos`. A failed capture turns it off for this
   * sequence (the plain path runs). */
  bool graph_on = false;
  cudaGraphExec_t graph = nullptr;
  int graph_nsplit = 0;     // the split count it was captured for
  uint64_t graph_ws = 0;    // the workspace generation it was captured with
  int32_t* pin = nullptr;   // pinned [2]: token id, position
  int32_t* dpos = nullptr;  // device [2]: the same, as the graph's kernels read them
};
