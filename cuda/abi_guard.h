/*
 * abi_guard.h — the one exception boundary and the argument checks of the C ABI (cuda/reform.h), shared by
 * the CPU build (reform_cpu.cpp) and the CUDA build (gpu/abi.cuh). Header-only host code; included after
 * reform_common.h by exactly one translation unit per library.
 *
 * Why one layer: the server turns RF_ERR_OOM into a retryable 503, so only a real allocation failure
 * (std::bad_alloc here, cudaErrorMemoryAllocation in gpu/device.cuh) may say out-of-memory; any other
 * exception is RF_ERR_INTERNAL. Bad arguments get the same code and wording from both builds.
 */
#ifndef REFORM_ABI_GUARD_H
#define REFORM_ABI_GUARD_H

#include "reform_common.h"

#include <cstddef>
#include <exception>
#include <new>
#include <string>
#include <type_traits>

namespace rf {

/* Status of the exception being handled; call from a catch block only. */
inline int status_from_current_exception(const char* where) {
  try {
    throw;
  } catch (const std::bad_alloc&) {
    return set_error(RF_ERR_OOM, "%s: out of host memory", where);
  } catch (const std::exception& e) {
    return set_error(RF_ERR_INTERNAL, "%s: internal error: %s", where, e.what());
  } catch (...) {
    return set_error(RF_ERR_INTERNAL, "%s: internal error: unknown exception", where);
  }
}

/* Runs the body of an ABI function so that no exception crosses the C boundary. A status-returning body
 * (int, int32_t, int64_t) yields the mapped code; a pointer-returning one yields NULL, with the code in
 * rf_last_error_code() (cleared first, so a NULL never carries a stale code). */
template <class F>
auto guard(const char* where, F&& body) -> decltype(body()) {
  using R = decltype(body());
  static_assert(std::is_pointer<R>::value || std::is_integral<R>::value, "ABI functions return a status or a pointer");
  if constexpr (std::is_pointer<R>::value) clear_error();
  try {
    return body();
  } catch (...) {
    const int code = status_from_current_exception(where);
    if constexpr (std::is_pointer<R>::value) {
      (void)code;
      return nullptr;
    } else {
      return (R)code;
    }
  }
}

/* ---------------- argument checks (RF_OK or the error code, message set) ---------------- */
/* return the status of a check or step unless it is RF_OK */
#define RF_TRY(expr)              \
  do {                            \
    int rc_ = (expr);             \
    if (rc_ != RF_OK) return rc_; \
  } while (0)

inline int check_not_null(const void* p, const char* what, const char* where) {
  return p ? RF_OK : set_error(RF_ERR_INVALID, "%s: %s is NULL", where, what);
}

/* a model that compressors / sequences may be created from (both builds' rf_model have `finalized`) */
template <class Model>
int check_model_ready(const Model* m, const char* where) {
  if (!m) return set_error(RF_ERR_INVALID, "%s: model is NULL", where);
  if (!m->finalized) return set_error(RF_ERR_STATE, "%s: model is not finalized", where);
  return RF_OK;
}

inline int check_tokens(const int32_t* tokens, int64_t n, int32_t vocab, const char* where) {
  if (!tokens) return set_error(RF_ERR_INVALID, "%s: tokens is NULL", where);
  for (int64_t i = 0; i < n; i++)
    if (tokens[i] < 0 || tokens[i] >= vocab)
      return set_error(RF_ERR_INVALID, "%s: token id %d at index %lld out of range [0,%d)", where, tokens[i],
                       (long long)i, vocab);
  return RF_OK;
}

/* rf_compressor_process / _embed: chunk size, tokens, output */
inline int check_chunk(const int32_t* tokens, int32_t n, int32_t max_chunk, int32_t vocab, const void* out_emb,
                       bool out_required, const char* where) {
  if (n < 1 || n > max_chunk)
    return set_error(RF_ERR_INVALID, "%s: n = %d must be in [1, max_chunk = %d]", where, n, max_chunk);
  if (out_required && !out_emb) return set_error(RF_ERR_INVALID, "%s: out_emb is NULL", where);
  return check_tokens(tokens, n, vocab, where);
}

/* Pipelined compress (rf_compressor_submit / _collect): a call that would lose the pending chunks' embeddings, or
 * give the caller rows out of order, or save / replace a state that covers rows nobody collected, waits until they are
 * collected. */
inline int check_no_pending(int npend, const char* where) {
  if (npend > 0)
    return set_error(RF_ERR_STATE, "%s: %d submitted chunk(s) not collected (rf_compressor_collect them first)", where,
                     npend);
  return RF_OK;
}
inline int check_submit(const int32_t* tokens, int32_t n, int32_t max_chunk, int32_t vocab, int npend) {
  const char* where = "rf_compressor_submit";
  if (npend >= RF_MAX_PENDING)
    return set_error(RF_ERR_STATE, "%s: %d chunks pending already (rf_compressor_collect one first)", where, npend);
  return check_chunk(tokens, n, max_chunk, vocab, nullptr, false, where);
}

/* rf_embstore_*: f16 rows of dim values; scoring over its first n_ctx rows */
inline int check_embstore_create(int32_t dim) {
  if (dim <= 0) return set_error(RF_ERR_INVALID, "rf_embstore_create: dim = %d must be >= 1", dim);
  return RF_OK;
}
inline int check_embstore_append(const void* rows, int64_t n) {
  if (n < 0) return set_error(RF_ERR_INVALID, "rf_embstore_append: n = %lld must be >= 0", (long long)n);
  if (n > 0 && !rows) return set_error(RF_ERR_INVALID, "rf_embstore_append: rows is NULL");
  return RF_OK;
}
inline int check_embstore_score(int64_t n_ctx, int64_t rows, const float* q, int32_t n_q, int64_t budget,
                                const int32_t* out_idx) {
  const char* where = "rf_embstore_score_select";
  if (n_ctx < 0 || n_ctx > rows)
    return set_error(RF_ERR_INVALID, "%s: n_ctx = %lld outside the store's %lld rows", where, (long long)n_ctx,
                     (long long)rows);
  if (n_ctx > INT32_MAX || budget < 0 || n_q < 1) return set_error(RF_ERR_INVALID, "%s: bad sizes", where);
  if (!q || (n_ctx > 0 && !out_idx)) return set_error(RF_ERR_INVALID, "%s: NULL argument", where);
  return RF_OK;
}

/* rf_score_select / rf_embstore_score_select: the query rows' offsets, when given, are finite */
inline int check_offsets(const float* q_offset, int32_t n_q, const char* where) {
  for (int32_t j = 0; q_offset && j < n_q; j++)
    if (!std::isfinite(q_offset[j])) return set_error(RF_ERR_INVALID, "%s: q_offset[%d] is not finite", where, j);
  return RF_OK;
}

/* rf_score_kth / rf_score_select and their store twins: n_pairs in [0, RF_PAIRS_MAX], each pair's rows in [0, n_q),
 * its offset (when given) finite */
inline int check_pairs(const int32_t* pairs, int32_t n_pairs, const float* pair_offset, int32_t n_q,
                       const char* where) {
  if (n_pairs < 0 || n_pairs > RF_PAIRS_MAX)
    return set_error(RF_ERR_INVALID, "%s: n_pairs = %d outside [0, %d]", where, n_pairs, RF_PAIRS_MAX);
  if (n_pairs > 0 && !pairs) return set_error(RF_ERR_INVALID, "%s: pairs is NULL", where);
  for (int32_t p = 0; p < 2 * n_pairs; p++)
    if (pairs[p] < 0 || pairs[p] >= n_q)
      return set_error(RF_ERR_INVALID, "%s: pairs[%d] = %d outside the %d query rows", where, p, pairs[p], n_q);
  for (int32_t p = 0; pair_offset && p < n_pairs; p++)
    if (!std::isfinite(pair_offset[p])) return set_error(RF_ERR_INVALID, "%s: pair_offset[%d] is not finite", where, p);
  return RF_OK;
}

/* rf_seq_forward: n tokens appended at length len of a sequence of max_tokens positions */
inline int check_seq_append(const int32_t* tokens, int32_t n, int64_t len, int64_t max_tokens, int32_t vocab,
                            const char* where) {
  if (n < 1) return set_error(RF_ERR_INVALID, "%s: n must be >= 1", where);
  if ((int64_t)n > max_tokens - len)
    return set_error(RF_ERR_INVALID, "%s: %d tokens at length %lld exceed max_tokens %lld", where, n, (long long)len,
                     (long long)max_tokens);
  return check_tokens(tokens, n, vocab, where);
}

inline int check_sample_params(float temperature, float top_p, const char* where) {
  if (std::isnan(temperature) || std::isnan(top_p)) return set_error(RF_ERR_INVALID, "%s: NaN parameter", where);
  return RF_OK;
}

inline int check_seq_sample(bool has_logits, float temperature, float top_p) {
  if (!has_logits) return set_error(RF_ERR_STATE, "rf_seq_sample: no logits yet (call rf_seq_forward first)");
  return check_sample_params(temperature, top_p, "rf_seq_sample");
}

/* rf_sample_logits: the shared sampler behind the shared checks */
inline int32_t sample_logits_checked(const float* logits, int32_t n, float temperature, float top_p, int32_t top_k,
                                     uint64_t* rng_state) {
  return guard("rf_sample_logits", [&]() -> int32_t {
    if (!logits || n <= 0) return set_error(RF_ERR_INVALID, "rf_sample_logits: logits is NULL or n <= 0");
    if (!rng_state) return set_error(RF_ERR_INVALID, "rf_sample_logits: rng_state is NULL");
    int rc = check_sample_params(temperature, top_p, "rf_sample_logits");
    if (rc != RF_OK) return rc;
    return sample_logits(logits, n, temperature, top_p, top_k, rng_state);
  });
}

inline int check_set_tensor(const void* m, const char* name, const void* data) {
  const char* where = "rf_model_set_tensor";
  int rc = check_not_null(m, "model", where);
  if (rc == RF_OK) rc = check_not_null(name, "name", where);
  if (rc == RF_OK && !data) rc = set_error(RF_ERR_INVALID, "%s: tensor '%s': data is NULL", where, name);
  return rc;
}

inline int check_init_random(const void* m, float stdv) {
  int rc = check_not_null(m, "model", "rf_model_init_random");
  if (rc == RF_OK && !(stdv >= 0.f && std::isfinite(stdv)))
    rc = set_error(RF_ERR_INVALID, "rf_model_init_random: std must be finite and >= 0");
  return rc;
}

inline int check_threads(int32_t n) {
  return n >= 0 ? RF_OK : set_error(RF_ERR_INVALID, "rf_set_threads: n must be >= 0 (0 = all cores)");
}

inline int check_seq_create(int32_t max_tokens) {
  return max_tokens >= 1 ? RF_OK : set_error(RF_ERR_INVALID, "rf_seq_create: max_tokens must be >= 1");
}

/* rf_score; pointers are checked only when there is work (n_ctx == 0 is a valid no-op) */
inline int check_score_args(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
                            const float* out, const char* where = "rf_score") {
  if (n_ctx < 0 || dim <= 0 || n_q < 1)
    return set_error(RF_ERR_INVALID, "%s: bad sizes (n_ctx %lld, dim %d, n_q %d)", where, (long long)n_ctx, dim, n_q);
  if (ctx_dtype != RF_F32 && ctx_dtype != RF_F16)
    return set_error(RF_ERR_INVALID, "%s: ctx dtype must be f32/f16", where);
  if (n_ctx > 0 && (!ctx || !q || !out)) return set_error(RF_ERR_INVALID, "%s: NULL argument", where);
  return RF_OK;
}

/* rf_score_kth / rf_embstore_score_kth: rf_score's checks, k in [1, RF_KTH_MAX], and q and out even for n_ctx == 0
 * (out gets -inf per query row) */
inline int check_score_kth(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
                           int32_t k, const float* out, const char* where) {
  RF_TRY(check_score_args(ctx, ctx_dtype, n_ctx, dim, q, n_q, out, where));
  if (k < 1 || k > RF_KTH_MAX) return set_error(RF_ERR_INVALID, "%s: k = %d outside [1, %d]", where, k, RF_KTH_MAX);
  if (!q || !out) return set_error(RF_ERR_INVALID, "%s: NULL argument", where);
  return RF_OK;
}
inline int check_embstore_kth(int64_t n_ctx, int64_t rows, const char* where) {
  if (n_ctx < 0 || n_ctx > rows)
    return set_error(RF_ERR_INVALID, "%s: n_ctx = %lld outside the store's %lld rows", where, (long long)n_ctx,
                     (long long)rows);
  return RF_OK;
}

/* rf_seq_import_compressor: the compressor's cache (exit layer, length) must fit the sequence */
inline int check_import(bool same_model, int exit_layer, int num_layers, int64_t cache_len, int64_t max_tokens) {
  const char* where = "rf_seq_import_compressor";
  if (!same_model) return set_error(RF_ERR_INVALID, "%s: compressor uses a different model", where);
  if (exit_layer != num_layers - 1)
    return set_error(RF_ERR_INVALID, "%s: compressor exit layer %d is not the last layer %d", where, exit_layer,
                     num_layers - 1);
  if (cache_len > max_tokens)
    return set_error(RF_ERR_INVALID, "%s: %lld cache entries exceed max_tokens %lld", where, (long long)cache_len,
                     (long long)max_tokens);
  return RF_OK;
}

/* ---------------- compressor state blob (layout in reform_common.h) ---------------- */
/* The header a compressor of this shape writes; len / seen are its counters. */
inline StateHeader state_header(int layers_cached, int num_kv_heads, int head_dim, int hidden_size, int capacity,
                                int64_t len, int64_t seen) {
  StateHeader h;
  memset(&h, 0, sizeof h);
  memcpy(h.magic, "RFCSTAT2", 8);
  h.num_layers_cached = layers_cached;
  h.num_kv_heads = num_kv_heads;
  h.head_dim = head_dim;
  h.capacity = capacity;
  h.len = len;
  h.seen = seen;
  h.hidden_size = hidden_size;
  return h;
}

inline int check_state_save(const void* buf, int64_t size, const StateHeader& own) {
  if (!buf) return set_error(RF_ERR_INVALID, "rf_compressor_state_save: buffer is NULL");
  const int64_t need = state_size(own.num_layers_cached, own.num_kv_heads, own.head_dim, own.len);
  if (size < need)
    return set_error(RF_ERR_INVALID, "rf_compressor_state_save: buffer of %lld bytes, need %lld", (long long)size,
                     (long long)need);
  return RF_OK;
}

/* A blob for rf_compressor_state_load (a legacy RFCSTAT1 blob may hold one layer more, the exit layer's, which the
 * loaders skip: they read the compressor's own layers, in order): its header must match the compressor's shape (`own`,
 * whose len / seen are ignored), its cache fit `own.capacity`, and its size be exact. On success *out is the blob's
 * header. */
inline int check_state_load(const void* buf, int64_t size, const StateHeader& own, StateHeader* out) {
  const char* where = "rf_compressor_state_load";
  if (!buf) return set_error(RF_ERR_INVALID, "%s: blob is NULL", where);
  if (size < (int64_t)sizeof(StateHeader))
    return set_error(RF_ERR_INVALID, "%s: blob too small (%lld bytes)", where, (long long)size);
  StateHeader h;
  memcpy(&h, buf, sizeof h);
  const bool legacy = memcmp(h.magic, "RFCSTAT1", 8) == 0;  // exit layer included: one more layer than kept now
  if (!legacy && memcmp(h.magic, "RFCSTAT2", 8) != 0) return set_error(RF_ERR_INVALID, "%s: bad magic", where);
  const bool layers_ok =
      h.num_layers_cached == own.num_layers_cached || (legacy && h.num_layers_cached == own.num_layers_cached + 1);
  if (!layers_ok || h.num_kv_heads != own.num_kv_heads || h.head_dim != own.head_dim ||
      h.hidden_size != own.hidden_size)
    return set_error(RF_ERR_INVALID,
                     "%s: blob is for %d layers x %d kv heads x head_dim %d (hidden %d), compressor has %d x %d x %d "
                     "(hidden %d)",
                     where, h.num_layers_cached, h.num_kv_heads, h.head_dim, h.hidden_size, own.num_layers_cached,
                     own.num_kv_heads, own.head_dim, own.hidden_size);
  if (h.len < 0 || h.len > own.capacity || h.seen < h.len)
    return set_error(RF_ERR_INVALID, "%s: blob len %lld invalid for capacity %d", where, (long long)h.len,
                     own.capacity);
  const int64_t need = state_size(h.num_layers_cached, h.num_kv_heads, h.head_dim, h.len);
  if (size != need)
    return set_error(RF_ERR_INVALID, "%s: blob has %lld bytes, expected %lld", where, (long long)size, (long long)need);
  *out = h;
  return RF_OK;
}

/* ---------------- struct layout (rf_struct_layout) ---------------- */
/* "rf_config 128 vocab_size:0:i32 ... reserved:72:i32x14\nrf_compress_params 64 ...": every field of the
 * structs the caller packs by hand, with offset and type, so a binding can check its offsets at load. */
template <class T>
std::string layout_type() {
  using E = typename std::remove_all_extents<T>::type;
  static_assert(sizeof(E) == 4 && (std::is_same<E, int32_t>::value || std::is_same<E, float>::value),
                "the hand-packed ABI structs hold int32 and float32 fields only");
  std::string t = std::is_same<E, float>::value ? "f32" : "i32";
  if (std::is_array<T>::value) t += "x" + std::to_string(sizeof(T) / sizeof(E));
  return t;
}
#define RF_LAYOUT_FIELD(S, f) \
  (std::string(" ") + #f + ":" + std::to_string(offsetof(S, f)) + ":" + rf::layout_type<decltype(S::f)>())

inline const char* struct_layout() {
  static const std::string s =
      std::string("rf_config ") + std::to_string(sizeof(rf_config)) + RF_LAYOUT_FIELD(rf_config, vocab_size) +
      RF_LAYOUT_FIELD(rf_config, hidden_size) + RF_LAYOUT_FIELD(rf_config, intermediate_size) +
      RF_LAYOUT_FIELD(rf_config, num_layers) + RF_LAYOUT_FIELD(rf_config, num_heads) +
      RF_LAYOUT_FIELD(rf_config, num_kv_heads) + RF_LAYOUT_FIELD(rf_config, head_dim) +
      RF_LAYOUT_FIELD(rf_config, qkv_bias) + RF_LAYOUT_FIELD(rf_config, tie_embeddings) +
      RF_LAYOUT_FIELD(rf_config, rope_type) + RF_LAYOUT_FIELD(rf_config, rms_eps) +
      RF_LAYOUT_FIELD(rf_config, rope_theta) + RF_LAYOUT_FIELD(rf_config, rope_factor) +
      RF_LAYOUT_FIELD(rf_config, rope_low_freq_factor) + RF_LAYOUT_FIELD(rf_config, rope_high_freq_factor) +
      RF_LAYOUT_FIELD(rf_config, rope_original_max_pos) + RF_LAYOUT_FIELD(rf_config, weight_dtype) +
      RF_LAYOUT_FIELD(rf_config, qk_norm) + RF_LAYOUT_FIELD(rf_config, reserved) + "\nrf_compress_params " +
      std::to_string(sizeof(rf_compress_params)) + RF_LAYOUT_FIELD(rf_compress_params, capacity) +
      RF_LAYOUT_FIELD(rf_compress_params, n_sink) + RF_LAYOUT_FIELD(rf_compress_params, n_recent) +
      RF_LAYOUT_FIELD(rf_compress_params, obs_window) + RF_LAYOUT_FIELD(rf_compress_params, max_chunk) +
      RF_LAYOUT_FIELD(rf_compress_params, emb_dtype) + RF_LAYOUT_FIELD(rf_compress_params, exit_layer) +
      RF_LAYOUT_FIELD(rf_compress_params, eviction) + RF_LAYOUT_FIELD(rf_compress_params, reserved);
  return s.c_str();
}
#undef RF_LAYOUT_FIELD

}  // namespace rf

#endif
