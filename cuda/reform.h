/*
 * reform.h — the one C ABI of the REFORM native engine.
 *
 * Two builds implement exactly this header:
 *   - build/libreform_cpu.so   (cuda/reform_cpu.cpp, g++ -O3 -fopenmp; always built)
 *   - build/libreform_cuda.so  (cuda/reform_cuda.cu, nvcc -arch=sm_90; built when nvcc exists;
 *                               cudart linked statically, cuBLAS dlopen'ed at run time so the
 *                               library loads and reports "no device" cleanly on machines without a GPU)
 *
 * Conventions
 *   - Every function that can fail returns an int status (0 = RF_OK, negative = error code) or a
 *     pointer (NULL on error). On error the thread-local message is available from rf_last_error().
 *     Nothing in the library aborts the process; out-of-memory is RF_ERR_OOM.
 *   - Token ids are int32. Sizes that can exceed 2^31 are int64.
 *   - All host pointers are borrowed for the duration of the call only (weights are copied).
 *   - Threading: objects are not thread-safe; the caller (one engine worker) serialises calls.
 *
 * Model: Llama-family decoder (Llama 2/3/3.1 incl. llama3 rope scaling, Mistral, Qwen2 qkv bias, Qwen3 per-head
 *   q/k RMSNorm): RMSNorm, RoPE (rotate_half / NeoX layout as in HF transformers), GQA, SwiGLU MLP,
 *   tied or untied lm_head.
 *
 * Compress step (REFORM phase 1): per-layer KV cache for layers 0..exit_layer with fixed capacity.
 *   - Keys are stored BEFORE RoPE; at every step cache entry i gets position i (contiguous
 *     re-assignment after eviction, as REFORM does), new chunk tokens get positions len..len+n-1.
 *   - H2O: each cache entry of each (layer, kv_head) has an accumulated score = sum over the chunk's
 *     last `obs_window` queries and over the query heads of that kv group of their softmax attention
 *     probability on that entry. After appending a chunk, if len > capacity, each (layer, kv_head)
 *     keeps the first n_sink entries, the last n_recent entries and the top-scoring others, in
 *     original order, down to `capacity`.
 *   - TOVA (p->eviction == RF_EVICT_TOVA; Oren et al. 2024): an entry's score is the softmax probability the chunk's
 *     LAST query gives it, summed over every query head of the layer (so every kv head of a layer holds the same
 *     score and keeps the same entries), recomputed at every chunk (nothing accumulates). The same sinks, recent
 *     window and capacity apply as for H2O: the policy only changes how the middle is ranked. The last query, not
 *     the mean over the chunk: TOVA evicts by the attention of the current query, and when a chunk's overflow is
 *     evicted at its end the current query is its last token; a mean over the chunk's queries would be an
 *     un-accumulated H2O window, not TOVA. StreamingLLM needs no policy: capacity == n_sink + n_recent.
 *   - Output: for every chunk token, for each selected head in order, the head's vector
 *     (q: after q_proj(+bias)(+q_norm), BEFORE RoPE; k: after k_proj(+bias)(+k_norm), before RoPE; v: after
 *     v_proj(+bias); o: the query head's attention output softmax(q k^T / sqrt(d)) v over the cache + chunk, before
 *     o_proj), L2-normalised (eps 1e-6), concatenated -> n_sel * head_dim values per token.
 *     (Normalisation is v / max(||v||_2, 1e-6), torch.nn.functional.normalize semantics.)
 *     One rule for every family: a q/k head is embedded as attention reads it, minus the position. With qk_norm
 *     (Qwen3) that is after the per-head norm: the same vectors the cache keeps as its pre-RoPE keys.
 *   - Layers after exit_layer are never run; for exit_layer itself only q/k/v are computed, and its cache is
 *     kept (with attention scores, H2O and eviction) only when it is the model's last layer (rf_seq_import_compressor
 *     needs every layer) or an o head sits at it (its attention reads that cache); otherwise nothing reads it.
 *   - CUDA build: the H2O keep-sets are selected on the device; a step waits on the host once, for its embeddings
 *     (rf_compressor_process), or not at all (rf_compressor_submit: the embeddings come back while the next chunk
 *     computes).
 */
#ifndef REFORM_H
#define REFORM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define RF_API __declspec(dllexport)
#else
#define RF_API __attribute__((visibility("default")))
#endif

/* 2: rf_smooth_select / rf_score_select take the pooling operator; RF_HEAD_O; rf_compress_params.eviction
 * 3: rf_smooth_select / rf_score_select / rf_embstore_score_select take the smoothing window's lag
 * 4: rf_map_file / rf_unmap_file
 * 5: rf_score_select / rf_embstore_score_select take per-query offsets (q_offset)
 * 6: rf_score_kth / rf_embstore_score_kth
 * 7: rf_score_kth / rf_score_select and their rf_embstore_ twins take query row pairs (bigram matching)
 * 8: rf_score_kth_select */
#define RF_ABI_VERSION 8

/* status codes */
#define RF_OK 0
#define RF_ERR_INVALID (-1)  /* bad argument (shape, name, range) */
#define RF_ERR_OOM (-2)      /* host or device allocation failed */
#define RF_ERR_DEVICE (-3)   /* CUDA / cuBLAS runtime failure */
#define RF_ERR_STATE (-4)    /* call not valid in the object's current state */
#define RF_ERR_NODEVICE (-5) /* no usable GPU (CUDA build only) */
#define RF_ERR_INTERNAL (-6)

/* dtypes */
#define RF_F32 0
#define RF_F16 1
#define RF_BF16 2

/* rope types */
#define RF_ROPE_DEFAULT 0
#define RF_ROPE_LLAMA3 1
#define RF_ROPE_LINEAR 2

/* head kinds in a head spec triple (layer, kind, head) */
#define RF_HEAD_Q 0
#define RF_HEAD_K 1
#define RF_HEAD_V 2
#define RF_HEAD_O 3 /* the query head's attention output, before o_proj (head index over the query heads) */

/* eviction policies of the compressor (rf_compress_params.eviction) */
#define RF_EVICT_H2O 0  /* accumulated attention of each chunk's last obs_window queries, per kv head */
#define RF_EVICT_TOVA 1 /* attention of each chunk's last query, summed over the layer's query heads */

/* pooling operators of the query-time smoothing (rf_smooth_select, rf_score_select) */
#define RF_POOL_MEAN 0
#define RF_POOL_MAX 1

/* Model configuration. Every field is 4 bytes (int32 or float32), laid out in this order,
 * followed by reserved int32 words up to 32 words (128 bytes) in total. */
typedef struct rf_config {
  int32_t vocab_size;
  int32_t hidden_size;
  int32_t intermediate_size;
  int32_t num_layers;
  int32_t num_heads;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t qkv_bias;       /* 1: q/k/v_proj have bias (Qwen2) */
  int32_t tie_embeddings; /* 1: lm_head = embed_tokens */
  int32_t rope_type;      /* RF_ROPE_* */
  float rms_eps;
  float rope_theta;
  float rope_factor;             /* llama3 / linear scaling factor */
  float rope_low_freq_factor;    /* llama3 */
  float rope_high_freq_factor;   /* llama3 */
  int32_t rope_original_max_pos; /* llama3 original_max_position_embeddings */
  int32_t weight_dtype;          /* CUDA: RF_BF16 or RF_F16 storage+compute; CPU: the type rf_model_init_random
                                  * stores matrices in (set_tensor keeps each tensor's own type), f32 compute */
  int32_t qk_norm;               /* 1: RMSNorm of every q and k head (weights self_attn.q_norm / k_norm, [head_dim],
                                  * eps rms_eps) after the projections, before RoPE (Qwen3) */
  int32_t reserved[14];
} rf_config;

/* Compressor parameters (all int32, 16 words = 64 bytes). */
typedef struct rf_compress_params {
  int32_t capacity;   /* KV entries kept per (layer, kv_head); >= n_sink + n_recent (equal: StreamingLLM) */
  int32_t n_sink;     /* always-kept first entries (e.g. 4) */
  int32_t n_recent;   /* always-kept most recent entries (e.g. obs_window) */
  int32_t obs_window; /* last queries of each chunk whose attention feeds H2O scores (default 128) */
  int32_t max_chunk;  /* largest n accepted by rf_compressor_process / rf_compressor_embed */
  int32_t emb_dtype;  /* RF_F32 or RF_F16: dtype written to out_emb */
  int32_t exit_layer; /* -1: max layer among the selected heads; otherwise run layers 0..exit_layer */
  int32_t eviction;   /* RF_EVICT_H2O (0, what a zeroed struct asks for) or RF_EVICT_TOVA */
  int32_t reserved[8];
} rf_compress_params;

typedef struct rf_model rf_model;
typedef struct rf_compressor rf_compressor;
typedef struct rf_seq rf_seq;

/* ---- library ---- */
RF_API int rf_abi_version(void);
RF_API const char* rf_backend_name(void);             /* "cpu" or "cuda" */
RF_API const char* rf_last_error(void);               /* thread-local, "" when none */
RF_API int rf_last_error_code(void);                  /* thread-local status code of the last error (0 = none) */
RF_API int rf_device_count(void);                     /* CPU build: 1; CUDA: #GPUs (0 if none / no driver) */
RF_API int rf_device_info(char* buf, int32_t buflen); /* NUL-terminated description; <0 on error */
RF_API int rf_set_threads(int32_t n);                 /* CPU build: OpenMP threads; CUDA: no-op */
/* Layout of the structs above as this library was compiled, for bindings that pack them by hand:
 * "rf_config <sizeof> <field>:<offset>:<type> ...\nrf_compress_params <sizeof> ..." with type i32, f32 or
 * i32x<count> (arrays), fields in declaration order. */
RF_API const char* rf_struct_layout(void);

/* ---- model ---- */
/* Pointer-returning functions (rf_model_create, rf_compressor_create, rf_seq_create) return NULL on error
 * with the message in rf_last_error() and the status code in rf_last_error_code(). */
RF_API rf_model* rf_model_create(const rf_config* cfg);
/* name: Hugging Face tensor name, e.g. "model.layers.3.self_attn.q_proj.weight", "model.norm.weight",
 * "model.embed_tokens.weight", "lm_head.weight". data: row-major, dtype RF_F32/F16/BF16.
 * Unknown names or wrong shapes -> RF_ERR_INVALID. */
RF_API int rf_model_set_tensor(rf_model* m, const char* name, const void* data, int32_t dtype, const int64_t* shape,
                               int32_t ndim);
/* Fill every weight with N(0, std^2) (norm weights = 1, biases = 0), deterministic per seed.
 * On CUDA the weights are generated on the device (dummy load for benchmarks). */
RF_API int rf_model_init_random(rf_model* m, uint64_t seed, float std);
/* Checks that every required tensor was set; must succeed before use (creating a compressor / seq from a
 * model that is not finalized fails with RF_ERR_STATE). A missing tensor -> RF_ERR_STATE naming it. */
RF_API int rf_model_finalize(rf_model* m);
RF_API int64_t rf_model_memory_bytes(const rf_model* m);
/* For a memory plan (bytes, -1 where unknown): out[0] free device memory now, out[1] total device memory (CPU build:
 * both -1), out[2] the model's weights, out[3] the per-step workspace its compressors and sequences share (CUDA: grown
 * to the largest of them, never per object; plus rf_score's buffers; CPU build: 0, each object has its own), out[4] the
 * KV-cache bytes per token of a sequence (rf_seq_create(m, T) holds about T times this). Writes min(n, 5) values and
 * returns that count, or an error code. */
RF_API int rf_memory_info(const rf_model* m, int64_t* out, int32_t n);
RF_API void rf_model_destroy(rf_model* m);

/* ---- compress (phase 1) ---- */
/* heads: n_heads * 3 int32 (layer, kind RF_HEAD_*, head index within that kind's heads: query heads for q and o,
 * kv heads for k and v). */
RF_API rf_compressor* rf_compressor_create(rf_model* m, const rf_compress_params* p, const int32_t* heads,
                                           int32_t n_heads);
RF_API int32_t rf_compressor_embed_dim(const rf_compressor* c); /* n_heads * head_dim */
RF_API int32_t rf_compressor_exit_layer(const rf_compressor* c);
/* Run one chunk (1 <= n <= max_chunk): write n * embed_dim values of emb_dtype to out_emb (may be
 * NULL), append the chunk's KV to the cache, update H2O scores, evict down to capacity. */
RF_API int rf_compressor_process(rf_compressor* c, const int32_t* tokens, int32_t n, void* out_emb);
/* Same forward against the current cache (positions len..len+n-1) but the cache is left unchanged:
 * used to embed a query "in context". */
RF_API int rf_compressor_embed(rf_compressor* c, const int32_t* tokens, int32_t n, void* out_emb);
/* Pipelined compress: rf_compressor_process split in two, so that the caller writes chunk i's embeddings (to the
 * embedding file) while chunk i + 1 computes. rf_compressor_submit runs one chunk exactly as rf_compressor_process
 * does (cache, H2O scores, eviction; seen / cache_len count it when the call returns; the same embedding bytes) but
 * returns without waiting for it; rf_compressor_collect waits for the oldest submitted chunk and writes its
 * embeddings (n * embed_dim values of emb_dtype) to out_emb, returning n (0: nothing pending). At most
 * RF_MAX_PENDING chunks are pending (another submit: RF_ERR_STATE). While any is pending, rf_compressor_process,
 * rf_compressor_state_save and rf_compressor_state_load are RF_ERR_STATE (they would lose the pending rows or save a
 * state that covers rows nobody collected); rf_compressor_embed and the counters work; rf_compressor_reset drops them.
 * CUDA build: the embeddings go device -> pinned host memory on a second stream behind the chunk's forward (events),
 * so that eviction and the next chunk run meanwhile; collect waits for that copy only. CPU build: submit computes at
 * once; the same results. */
#define RF_MAX_PENDING 2
RF_API int rf_compressor_submit(rf_compressor* c, const int32_t* tokens, int32_t n);
RF_API int rf_compressor_collect(rf_compressor* c, void* out_emb);
RF_API int32_t rf_compressor_pending(const rf_compressor* c);   /* chunks submitted, not yet collected */
RF_API int64_t rf_compressor_cache_len(const rf_compressor* c); /* current entries per (layer, head) */
RF_API int64_t rf_compressor_seen(const rf_compressor* c);      /* tokens processed so far */
/* bytes the compressor itself holds (its caches and scores; the CPU build: also its own scratch), not the shared
 * workspace of rf_memory_info */
RF_API int64_t rf_compressor_memory_bytes(const rf_compressor* c);
RF_API int rf_compressor_reset(rf_compressor* c);
/* Opaque, self-describing state blob (cache K/V, scores, counters) for persistence across restarts.
 * A blob saved by one backend must be loadable by the other (stored as f32). */
RF_API int64_t rf_compressor_state_size(const rf_compressor* c);
RF_API int rf_compressor_state_save(const rf_compressor* c, void* buf, int64_t size);
RF_API int rf_compressor_state_load(rf_compressor* c, const void* buf, int64_t size);
RF_API void rf_compressor_destroy(rf_compressor* c);

/* ---- query scoring (phase 2) ---- */
/* ctx: n_ctx rows of dim values (ctx_dtype RF_F32 or RF_F16) in host memory (may be an mmap).
 * q: n_q rows of dim f32. out[i] = max_j cos(ctx_i, q_j). n_q >= 1.
 * cos(a, b) = a.b / (max(|a|, 1e-12) * max(|b|, 1e-12)), so an all-zero row scores 0. */
RF_API int rf_score(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
                    float* out);
/* Query row pairs (bigram matching; this project's addition to the paper's scoring, README "Documents that are not
 * prose"): pairs (2 * n_pairs int32, may be NULL when n_pairs == 0) holds (a_p, b_p), query row indices in [0, n_q),
 * usually two tokens next to each other in the question. Pair p matches context rows (i - 1, i), i >= 1, with
 *   P_p(i) = min(cos(ctx_{i-1}, q_{a_p}), cos(ctx_i, q_{b_p}))   (NaN when either cosine is NaN),
 * the cosines being the ones of the single rows in the same call. A word of several common pieces (a 1024-token
 * vocabulary splits `virgin-tempo` into four) matches its own pieces everywhere, but the pieces in their order rarely:
 * the pair's k-th best match is far below its match at the word. 0 <= n_pairs <= RF_PAIRS_MAX, else RF_ERR_INVALID. */
#define RF_PAIRS_MAX 4096
/* Each query row's k-th best match over the context: out[j] = the k-th largest of cos(ctx_i, q_j) over i < n_ctx
 * (j < n_q; equal cosines count once each; rows whose cosine is NaN are left out; k is clamped to n_ctx; fewer rows
 * than that, or n_ctx == 0: -inf), then each pair's: out[n_q + p] = the k-th largest P_p(i) over 1 <= i < n_ctx
 * (k clamped to n_ctx - 1; NaN left out). out: n_q + n_pairs f32. The cosines are the ones rf_score_select takes its
 * offsets from in the same build (CPU: the same f32 sums bit for bit; CUDA: rf_score's kernels and cosine expression),
 * so a row at the k-th best scores exactly 0 after the offset (CUDA: when scored with the same query rows; cuBLAS may
 * pick another kernel for another number of rows, a difference of rounding). 1 <= k <= RF_KTH_MAX, else
 * RF_ERR_INVALID. The server takes each question token's (and pair's) k-th best match off its scores (q_offset,
 * pair_offset): a token then counts only where it matches better than nearly everywhere else, as a rare term does
 * (src/engine/background.ts). */
#define RF_KTH_MAX 1024
RF_API int rf_score_kth(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
                        const int32_t* pairs, int32_t n_pairs, int32_t k, float* out);

/* ---- resident context embeddings (phase 2 without reading the embedding file again) ---- */
/* An append-only matrix of f16 rows (embed_dim values each: a context's embedding file, mirrored) kept where the
 * model computes: CUDA build: device memory, allocated in blocks of RF_EMBSTORE_BLOCK_BYTES (rows per block:
 * max(1, RF_EMBSTORE_BLOCK_BYTES / (2 * dim))) plus 4 bytes per row (its inverse norm, computed at append), so that a
 * query scores the context with one GEMM per block without uploading it; CPU build: host memory. A store keeps its
 * model alive, like a compressor. Out of device memory: RF_ERR_OOM, the store unchanged. */
typedef struct rf_embstore rf_embstore;
#define RF_EMBSTORE_BLOCK_BYTES (16 << 20)
RF_API rf_embstore* rf_embstore_create(rf_model* m, int32_t dim);
RF_API int rf_embstore_append(rf_embstore* e, const uint16_t* rows, int64_t n); /* n f16 rows from host memory */
RF_API int64_t rf_embstore_rows(const rf_embstore* e);
RF_API int64_t rf_embstore_memory_bytes(const rf_embstore* e);
/* rf_score_select (below) over the store's first n_ctx rows: the same scores as rf_score_select over those rows in
 * host memory (CUDA: the same kernels and GEMM per row; the emulation checks bit equality) and the same selection. */
RF_API int64_t rf_embstore_score_select(rf_embstore* e, int64_t n_ctx, const float* q, int32_t n_q,
                                        const float* q_offset, const int32_t* pairs, int32_t n_pairs,
                                        const float* pair_offset, int32_t window, int32_t lag, int32_t pool,
                                        int64_t budget, int32_t edge, float* scores, int32_t* out_idx);
/* rf_score_kth over the store's first n_ctx rows (the same values as rf_score_kth over those rows in host memory) */
RF_API int rf_embstore_score_kth(rf_embstore* e, int64_t n_ctx, const float* q, int32_t n_q, const int32_t* pairs,
                                 int32_t n_pairs, int32_t k, float* out);
RF_API void rf_embstore_destroy(rf_embstore* e);

/* ---- recompute + generate ---- */
/* A fresh full-depth KV cache for up to max_tokens positions (positions 0..len-1). */
RF_API rf_seq* rf_seq_create(rf_model* m, int32_t max_tokens);
/* Append n tokens (prefill when n > 1, decode when n == 1) at positions len..len+n-1 and keep the
 * logits of the last token. logits_out (may be NULL) receives vocab_size f32.
 * CUDA build with REFORM_CUDA_GRAPH=1 in the environment when the sequence is created: a decode step replays a
 * captured CUDA graph of the same kernels (the same logits); a capture that fails turns it off for the sequence.
 * len + n > max_tokens or a token id outside [0, vocab) -> RF_ERR_INVALID and the sequence is unchanged. */
RF_API int rf_seq_forward(rf_seq* s, const int32_t* tokens, int32_t n, float* logits_out);
/* Sample from the last logits. temperature <= 0: greedy (argmax, lowest id on ties). Otherwise
 * softmax(logits / temperature), keep top_k (<= 0: all), then the smallest prefix with cumulative
 * prob >= top_p (top_p >= 1: all), renormalise, draw with the xorshift64* generator whose state is
 * *rng_state (advanced in place; a zero state is replaced by a fixed non-zero constant).
 * Returns the token id (>= 0) or an error code (RF_ERR_STATE when no logits exist yet: nothing forwarded
 * since create / reset / import). */
RF_API int32_t rf_seq_sample(rf_seq* s, float temperature, float top_p, int32_t top_k, uint64_t* rng_state);
/* The same sampler over caller-provided logits (e.g. after penalties / logit bias applied by the caller):
 * n logits, returns the token id in [0, n) or an error code. */
RF_API int32_t rf_sample_logits(const float* logits, int32_t n, float temperature, float top_p, int32_t top_k,
                                uint64_t* rng_state);
RF_API int32_t rf_seq_length(const rf_seq* s);
RF_API int rf_seq_reset(rf_seq* s);
/* Initialise the sequence from a compressor whose exit layer is the model's last layer
 * (H2O-only baseline): the cache entries become positions 0..cache_len-1. */
RF_API int rf_seq_import_compressor(rf_seq* s, const rf_compressor* c);
RF_API void rf_seq_destroy(rf_seq* s);

/* ---- query-time selection (phase 2, after rf_score) ---- */
/* scores: n f32 (n <= INT32_MAX). Smooths them over a window of width window (odd; an even width is rounded up; at the
 * ends the window is the part inside [0, n)) that trails each position i by `lag` (0 <= lag <= window / 2, else
 * RF_ERR_INVALID): it covers [i - lag - window/2, i - lag + window/2]; 0 centers it, a lag lets the tokens after a
 * match (a fact's value after its key) share the match's score. With `pool`: RF_POOL_MEAN, the moving average (from f64
 * prefix sums), or RF_POOL_MAX, the moving maximum (NaN counts as -inf) into `smoothed` (n f32, may be NULL; both
 * exactly src/engine/selection.ts smoothScores), then writes to out_idx (min(n, budget) int32, ascending) the positions
 * kept: all of them when n <= budget, else the first and last e = min(edge, budget / 4) and the budget - 2e others with
 * the highest smoothed score (ties: the earlier position; NaN ranks lowest). O(n), no sort. Returns the number of
 * indices written or an error code. */
RF_API int64_t rf_smooth_select(const float* scores, int64_t n, int32_t window, int32_t lag, int32_t pool,
                                int64_t budget, int32_t edge, float* smoothed, int32_t* out_idx);
/* rf_score then rf_smooth_select in one call (the query path after the query embedding): scores (n_ctx f32, may be
 * NULL) receives the raw scores, out_idx the selected positions; returns their count or an error code. The CPU build
 * scores with f32 sums (within 1e-5 of rf_score), the CUDA build with rf_score itself.
 * q_offset (n_q f32, may be NULL: all 0) is taken off each query row's cosine before the maximum:
 * score_i = max_j (cos(ctx_i, q_j) - q_offset[j]). The server passes each question token's background: by default its
 * k-th best match (rf_score_kth), or its mean cosine over the whole context (q_j . the mean normalised context row), so
 * that a token that matches every row (a log's digits and punctuation) no longer decides the maximum everywhere
 * (README, "Documents that are not prose").
 * pairs / n_pairs (see RF_PAIRS_MAX; n_pairs 0: none) with pair_offset (n_pairs f32, may be NULL: all 0) join the
 * maximum; a pair's match counts for both rows it spans:
 *   score_i = max(max_j (cos(ctx_i, q_j) - q_offset[j]), max_p (max(P_p(i), P_p(i + 1)) - pair_offset[p]))
 * over the P_p that exist (1 <= i, i + 1 < n_ctx) and are not NaN. */
RF_API int64_t rf_score_select(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q,
                               int32_t n_q, const float* q_offset, const int32_t* pairs, int32_t n_pairs,
                               const float* pair_offset, int32_t window, int32_t lag, int32_t pool, int64_t budget,
                               int32_t edge, float* scores, int32_t* out_idx);
/* rf_score_kth then rf_score_select with the k-th bests as the offsets, in one call (the server's default "kth"
 * backgrounds, src/engine/background.ts): kth (n_q + n_pairs f32, may be NULL) receives rf_score_kth's values; the
 * query scored is the question's n_q rows and a zero row (offset 0), each row's offset its k-th best (a -inf: 0), each
 * pair's offset its k-th best likewise; scores (n_ctx, may be NULL) and out_idx as rf_score_select's, the same values
 * (a -0 may read 0). The CPU build reads the context once, not twice: only the rows above a k-th best score above 0,
 * and the first pass keeps them (cuda/select.h score_kth_rows); the CUDA build runs the two calls. Errors: those of
 * the two calls. */
RF_API int64_t rf_score_kth_select(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q,
                                   int32_t n_q, const int32_t* pairs, int32_t n_pairs, int32_t k, int32_t window,
                                   int32_t lag, int32_t pool, int64_t budget, int32_t edge, float* kth, float* scores,
                                   int32_t* out_idx);
/* The whole file at `path` mapped read-only and shared (a context's embedding file, the `ctx` of rf_score_select:
 * JavaScript's own mmap stops at 4 GiB, 16.7M rows of 256 bytes). Returns the address and its size in *out_bytes, or
 * NULL with the reason in rf_last_error() (cannot open, empty, no address space: RF_ERR_OOM). Release with
 * rf_unmap_file(p, bytes) once no view of it is in use. */
RF_API const void* rf_map_file(const char* path, int64_t* out_bytes);
RF_API int rf_unmap_file(const void* p, int64_t bytes);

#ifdef __cplusplus
}
#endif
#endif /* REFORM_H */
