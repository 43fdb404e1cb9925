/*
 * reform_common.h — host-side helpers shared by the CPU build (reform_cpu.cpp) and the CUDA build
 * (reform_cuda.cu). Header-only, C++17, no device code. Included by exactly one translation unit
 * per library.
 */
#ifndef REFORM_COMMON_H
#define REFORM_COMMON_H

#include "reform.h"

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace rf {

/* ---------------- errors ---------------- */
inline std::string& last_error_ref() {
  static thread_local std::string e;
  return e;
}
inline int& last_error_code_ref() {
  static thread_local int code = 0;
  return code;
}
inline int set_error(int code, const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  last_error_ref() = buf;
  last_error_code_ref() = code;
  return code;
}
inline void clear_error() {
  last_error_ref().clear();
  last_error_code_ref() = 0;
}

/* ---------------- dtype conversion ---------------- */
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {  // round to nearest even
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        exp--;
      }
      mant &= 0x3ffu;
      u = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_f16(float f) {  // round to nearest even, saturating to inf
  uint32_t u;
  memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);   // NaN
  if (absu >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // overflow -> inf
  if (absu < 0x38800000u) {                                    // subnormal or zero in f16
    if (absu < 0x33000000u) return (uint16_t)sign;
    uint32_t e = absu >> 23;
    uint32_t m = (absu & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;  // 14 + (113 - e) ... result mantissa = m >> (shift)
    uint32_t r = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) r++;
    return (uint16_t)(sign | r);
  }
  uint32_t r = ((absu - 0x38000000u) >> 13);
  uint32_t rem = absu & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
  return (uint16_t)(sign | r);
}
inline float load_as_f32(const void* data, int32_t dtype, int64_t i) {
  switch (dtype) {
    case RF_F32: return ((const float*)data)[i];
    case RF_F16: return f16_to_f32(((const uint16_t*)data)[i]);
    case RF_BF16: return bf16_to_f32(((const uint16_t*)data)[i]);
  }
  return 0.f;
}
inline int dtype_size(int32_t dtype) { return dtype == RF_F32 ? 4 : 2; }
inline bool dtype_valid(int32_t dtype) { return dtype == RF_F32 || dtype == RF_F16 || dtype == RF_BF16; }

/* ---------------- config ---------------- */
inline int validate_config(const rf_config* c) {
  if (!c) return set_error(RF_ERR_INVALID, "config is NULL");
  if (c->vocab_size <= 0 || c->hidden_size <= 0 || c->intermediate_size <= 0 || c->num_layers <= 0 ||
      c->num_heads <= 0 || c->num_kv_heads <= 0 || c->head_dim <= 0)
    return set_error(RF_ERR_INVALID, "config sizes must be positive");
  if (c->num_heads % c->num_kv_heads != 0)
    return set_error(RF_ERR_INVALID, "num_heads (%d) must be a multiple of num_kv_heads (%d)", c->num_heads,
                     c->num_kv_heads);
  if (c->head_dim % 2 != 0) return set_error(RF_ERR_INVALID, "head_dim must be even");
  if (c->rope_type < RF_ROPE_DEFAULT || c->rope_type > RF_ROPE_LINEAR)
    return set_error(RF_ERR_INVALID, "unknown rope_type %d", c->rope_type);
  if (!(c->rms_eps > 0.f)) return set_error(RF_ERR_INVALID, "rms_eps must be > 0");
  if (!(c->rope_theta > 0.f)) return set_error(RF_ERR_INVALID, "rope_theta must be > 0");
  return RF_OK;
}

/* RoPE inverse frequencies, HF transformers semantics (default, llama3, linear). Size head_dim/2.
 * For linear scaling the factor divides the frequencies (positions / factor). */
inline std::vector<float> rope_inv_freq(const rf_config& c) {
  int half = c.head_dim / 2;
  std::vector<float> inv(half);
  for (int i = 0; i < half; i++) {
    double f = 1.0 / std::pow((double)c.rope_theta, (2.0 * i) / (double)c.head_dim);
    if (c.rope_type == RF_ROPE_LINEAR && c.rope_factor > 0) f /= c.rope_factor;
    if (c.rope_type == RF_ROPE_LLAMA3) {
      const double pi = 3.14159265358979323846;
      double factor = c.rope_factor, lo = c.rope_low_freq_factor, hi = c.rope_high_freq_factor;
      double old_ctx = c.rope_original_max_pos;
      double low_freq_wavelen = old_ctx / lo, high_freq_wavelen = old_ctx / hi;
      double wavelen = 2 * pi / f;
      if (wavelen > low_freq_wavelen) {
        f = f / factor;
      } else if (wavelen >= high_freq_wavelen) {  // medium band: smooth interpolation
        double smooth = (old_ctx / wavelen - lo) / (hi - lo);
        f = (1 - smooth) * f / factor + smooth * f;
      }
    }
    inv[i] = (float)f;
  }
  return inv;
}

/* ---------------- tensor names ---------------- */
enum TensorKind {
  T_EMBED = 0,
  T_NORM,
  T_LM_HEAD,
  T_IN_NORM,    // per layer
  T_POST_NORM,  // per layer
  T_Q,
  T_K,
  T_V,
  T_O,
  T_QB,
  T_KB,
  T_VB,
  T_QN,  // q_norm (qk_norm only)
  T_KN,  // k_norm (qk_norm only)
  T_GATE,
  T_UP,
  T_DOWN,
  T_COUNT
};
struct TensorId {
  TensorKind kind;
  int layer;  // -1 for global
};
/* Parses a HF Llama/Mistral/Qwen2/Qwen3 tensor name; returns false for unknown names. */
inline bool parse_tensor_name(const char* name, TensorId* out) {
  std::string n(name ? name : "");
  if (n == "model.embed_tokens.weight") {
    *out = {T_EMBED, -1};
    return true;
  }
  if (n == "model.norm.weight") {
    *out = {T_NORM, -1};
    return true;
  }
  if (n == "lm_head.weight") {
    *out = {T_LM_HEAD, -1};
    return true;
  }
  const std::string pre = "model.layers.";
  if (n.compare(0, pre.size(), pre) != 0) return false;
  size_t p = pre.size(), q = p;
  while (q < n.size() && n[q] >= '0' && n[q] <= '9') q++;
  if (q == p || q >= n.size() || n[q] != '.' || q - p > 6) return false;
  int layer = atoi(n.substr(p, q - p).c_str());
  std::string rest = n.substr(q + 1);
  static const struct {
    const char* s;
    TensorKind k;
  } table[] = {
      {"input_layernorm.weight", T_IN_NORM}, {"post_attention_layernorm.weight", T_POST_NORM},
      {"self_attn.q_proj.weight", T_Q},      {"self_attn.k_proj.weight", T_K},
      {"self_attn.v_proj.weight", T_V},      {"self_attn.o_proj.weight", T_O},
      {"self_attn.q_proj.bias", T_QB},       {"self_attn.k_proj.bias", T_KB},
      {"self_attn.v_proj.bias", T_VB},       {"self_attn.q_norm.weight", T_QN},
      {"self_attn.k_norm.weight", T_KN},     {"mlp.gate_proj.weight", T_GATE},
      {"mlp.up_proj.weight", T_UP},          {"mlp.down_proj.weight", T_DOWN},
  };
  for (auto& t : table)
    if (rest == t.s) {
      *out = {t.k, layer};
      return true;
    }
  return false;
}
/* Expected shape (rows, cols); cols == 0 for 1-D tensors. */
inline void expected_shape(const rf_config& c, TensorKind k, int64_t* rows, int64_t* cols) {
  int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  int64_t qd = (int64_t)c.num_heads * c.head_dim, kvd = (int64_t)c.num_kv_heads * c.head_dim;
  switch (k) {
    case T_EMBED:
    case T_LM_HEAD:
      *rows = V;
      *cols = H;
      break;
    case T_NORM:
    case T_IN_NORM:
    case T_POST_NORM:
      *rows = H;
      *cols = 0;
      break;
    case T_Q:
      *rows = qd;
      *cols = H;
      break;
    case T_K:
    case T_V:
      *rows = kvd;
      *cols = H;
      break;
    case T_O:
      *rows = H;
      *cols = qd;
      break;
    case T_QB:
      *rows = qd;
      *cols = 0;
      break;
    case T_KB:
    case T_VB:
      *rows = kvd;
      *cols = 0;
      break;
    case T_QN:
    case T_KN:
      *rows = c.head_dim;
      *cols = 0;
      break;
    case T_GATE:
    case T_UP:
      *rows = I;
      *cols = H;
      break;
    case T_DOWN:
      *rows = H;
      *cols = I;
      break;
    default: *rows = 0; *cols = 0;
  }
}
inline bool is_qk_norm(TensorKind k) { return k == T_QN || k == T_KN; }
/* whether a model of config c has this tensor at all (lm_head when untied, biases with qkv_bias, q/k norms with
 * qk_norm) */
inline bool has_tensor(const rf_config& c, TensorKind k) {
  if (k == T_LM_HEAD) return !c.tie_embeddings;
  if (k == T_QB || k == T_KB || k == T_VB) return c.qkv_bias != 0;
  if (is_qk_norm(k)) return c.qk_norm != 0;
  return true;
}
inline int check_tensor(const rf_config& c, const char* name, int32_t dtype, const int64_t* shape, int32_t ndim,
                        TensorId* id) {
  if (!parse_tensor_name(name, id)) return set_error(RF_ERR_INVALID, "unknown tensor name '%s'", name ? name : "");
  if (id->layer >= c.num_layers)
    return set_error(RF_ERR_INVALID, "tensor '%s': layer %d >= num_layers %d", name, id->layer, c.num_layers);
  if (!dtype_valid(dtype)) return set_error(RF_ERR_INVALID, "tensor '%s': unsupported dtype %d", name, dtype);
  bool is_bias = id->kind == T_QB || id->kind == T_KB || id->kind == T_VB;
  if (is_bias && !c.qkv_bias) return set_error(RF_ERR_INVALID, "tensor '%s': model config has no qkv bias", name);
  if (is_qk_norm(id->kind) && !c.qk_norm)
    return set_error(RF_ERR_INVALID, "tensor '%s': model config has no q/k norm", name);
  if (id->kind == T_LM_HEAD && c.tie_embeddings)
    return set_error(RF_ERR_INVALID, "tensor '%s': embeddings are tied, lm_head must not be set", name);
  int64_t r, cc;
  expected_shape(c, id->kind, &r, &cc);
  int want_nd = cc == 0 ? 1 : 2;
  if (!shape || ndim != want_nd || shape[0] != r || (want_nd == 2 && shape[1] != cc))
    return set_error(RF_ERR_INVALID, "tensor '%s': shape mismatch, expected [%lld%s%lld]", name, (long long)r,
                     want_nd == 2 ? ", " : "", want_nd == 2 ? (long long)cc : 0LL);
  return RF_OK;
}
/* Index of a tensor in a flat "was it set" table: global kinds first, then per layer. */
inline size_t tensor_slot(const rf_config& c, TensorId id) {
  if (id.layer < 0) return (size_t)id.kind;
  return 3 + (size_t)id.layer * (T_COUNT - 3) + (size_t)(id.kind - 3);
}
inline size_t tensor_slot_count(const rf_config& c) { return 3 + (size_t)c.num_layers * (T_COUNT - 3); }
/* Which tensors must be present; returns RF_OK or RF_ERR_STATE naming the first missing one. */
inline int check_complete(const rf_config& c, const std::vector<uint8_t>& set) {
  static const char* gname[] = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"};
  for (int k = 0; k < 3; k++) {
    if (!has_tensor(c, (TensorKind)k)) continue;
    if (!set[k]) return set_error(RF_ERR_STATE, "missing tensor '%s'", gname[k]);
  }
  static const char* lname[] = {"input_layernorm.weight",  "post_attention_layernorm.weight",
                                "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                "self_attn.q_proj.bias",   "self_attn.k_proj.bias",
                                "self_attn.v_proj.bias",   "self_attn.q_norm.weight",
                                "self_attn.k_norm.weight", "mlp.gate_proj.weight",
                                "mlp.up_proj.weight",      "mlp.down_proj.weight"};
  static_assert(sizeof lname / sizeof lname[0] == T_COUNT - 3, "one name per layer tensor kind");
  for (int l = 0; l < c.num_layers; l++)
    for (int k = T_IN_NORM; k < T_COUNT; k++) {
      if (!has_tensor(c, (TensorKind)k)) continue;
      if (!set[tensor_slot(c, {(TensorKind)k, l})])
        return set_error(RF_ERR_STATE, "missing tensor 'model.layers.%d.%s'", l, lname[k - 3]);
    }
  return RF_OK;
}

/* ---------------- compressor params / heads ---------------- */
struct HeadSel {
  int layer, kind, head;
};
inline int validate_compress(const rf_config& c, const rf_compress_params* p, const int32_t* heads, int32_t n_heads,
                             std::vector<HeadSel>* out, int* exit_layer) {
  if (!p) return set_error(RF_ERR_INVALID, "compress params are NULL");
  if (!heads || n_heads <= 0) return set_error(RF_ERR_INVALID, "at least one head is required");
  if (p->obs_window <= 0) return set_error(RF_ERR_INVALID, "obs_window must be > 0");
  if (p->max_chunk <= 0) return set_error(RF_ERR_INVALID, "max_chunk must be > 0");
  if (p->n_sink < 0 || p->n_recent < 0) return set_error(RF_ERR_INVALID, "n_sink/n_recent must be >= 0");
  /* capacity == n_sink + n_recent keeps no heavy hitters: StreamingLLM (sinks + recent window) */
  if (p->capacity < 1 || p->capacity < p->n_sink + p->n_recent)
    return set_error(RF_ERR_INVALID, "capacity (%d) must be >= 1 and >= n_sink + n_recent (%d)", p->capacity,
                     p->n_sink + p->n_recent);
  if (p->emb_dtype != RF_F32 && p->emb_dtype != RF_F16)
    return set_error(RF_ERR_INVALID, "emb_dtype must be f32 or f16");
  if (p->eviction != RF_EVICT_H2O && p->eviction != RF_EVICT_TOVA)
    return set_error(RF_ERR_INVALID, "eviction must be RF_EVICT_H2O (0) or RF_EVICT_TOVA (1), got %d", p->eviction);
  int maxl = -1;
  out->clear();
  for (int i = 0; i < n_heads; i++) {
    HeadSel h{heads[3 * i], heads[3 * i + 1], heads[3 * i + 2]};
    if (h.layer < 0 || h.layer >= c.num_layers)
      return set_error(RF_ERR_INVALID, "head %d: layer %d out of range [0,%d)", i, h.layer, c.num_layers);
    if (h.kind < RF_HEAD_Q || h.kind > RF_HEAD_O) return set_error(RF_ERR_INVALID, "head %d: bad kind %d", i, h.kind);
    int nh = h.kind == RF_HEAD_Q || h.kind == RF_HEAD_O ? c.num_heads : c.num_kv_heads;
    if (h.head < 0 || h.head >= nh)
      return set_error(RF_ERR_INVALID, "head %d: index %d out of range [0,%d)", i, h.head, nh);
    maxl = std::max(maxl, h.layer);
    out->push_back(h);
  }
  int el = p->exit_layer < 0 ? maxl : p->exit_layer;
  if (el < maxl || el >= c.num_layers)
    return set_error(RF_ERR_INVALID, "exit_layer %d must be in [%d, %d)", p->exit_layer, maxl, c.num_layers);
  *exit_layer = el;
  return RF_OK;
}

/* ---------------- H2O keep-set selection ---------------- */
/* Given `len` entries with scores, choose which to keep (ascending indices): the first n_sink, the last
 * n_recent, and the highest-scoring of the rest (ties -> earlier index), `capacity` in total. */
inline void h2o_select(const float* score, int64_t len, int capacity, int n_sink, int n_recent,
                       std::vector<int32_t>* keep) {
  keep->clear();
  if (len <= capacity) {
    for (int64_t i = 0; i < len; i++) keep->push_back((int32_t)i);
    return;
  }
  int64_t mid_lo = n_sink, mid_hi = len - n_recent;  // [mid_lo, mid_hi) is evictable
  int64_t n_mid_keep = capacity - n_sink - n_recent;
  std::vector<int32_t> mid;
  mid.reserve((size_t)(mid_hi - mid_lo));
  for (int64_t i = mid_lo; i < mid_hi; i++) mid.push_back((int32_t)i);
  std::nth_element(mid.begin(), mid.begin() + n_mid_keep, mid.end(),
                   [&](int32_t a, int32_t b) { return score[a] > score[b] || (score[a] == score[b] && a < b); });
  mid.resize((size_t)n_mid_keep);
  std::sort(mid.begin(), mid.end());
  for (int64_t i = 0; i < n_sink; i++) keep->push_back((int32_t)i);
  for (int32_t i : mid) keep->push_back(i);
  for (int64_t i = mid_hi; i < len; i++) keep->push_back((int32_t)i);
}

/* ---------------- sampling ---------------- */
inline uint64_t xorshift64star(uint64_t* s) {
  if (*s == 0) *s = 0x9E3779B97F4A7C15ull;
  uint64_t x = *s;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *s = x;
  return x * 0x2545F4914F6CDD1Dull;
}
inline double rng_uniform(uint64_t* s) { return (double)(xorshift64star(s) >> 11) * (1.0 / 9007199254740992.0); }

/* Host-side sampling over f32 logits (both builds use it; the CUDA build copies logits to the host). */
inline int32_t sample_logits(const float* logits, int32_t vocab, float temperature, float top_p, int32_t top_k,
                             uint64_t* rng) {
  if (vocab <= 0) return set_error(RF_ERR_INVALID, "empty vocabulary");
  if (!(temperature > 0.f)) {
    int32_t best = 0;
    for (int32_t i = 1; i < vocab; i++)
      if (logits[i] > logits[best]) best = i;
    return best;
  }
  if (!rng) return set_error(RF_ERR_INVALID, "rng_state is NULL");
  std::vector<int32_t> idx(vocab);
  for (int32_t i = 0; i < vocab; i++) idx[i] = i;
  int32_t k = (top_k > 0 && top_k < vocab) ? top_k : vocab;
  auto cmp = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  if (k < vocab) {
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), cmp);
    idx.resize(k);
  } else {
    std::sort(idx.begin(), idx.end(), cmp);
  }
  double mx = logits[idx[0]];
  std::vector<double> p(idx.size());
  double sum = 0;
  for (size_t i = 0; i < idx.size(); i++) {
    p[i] = std::exp(((double)logits[idx[i]] - mx) / temperature);
    sum += p[i];
  }
  size_t n = idx.size();
  if (top_p < 1.f) {
    double cum = 0;
    for (size_t i = 0; i < idx.size(); i++) {
      cum += p[i] / sum;
      if (cum >= top_p) {
        n = i + 1;
        break;
      }
    }
  }
  double tot = 0;
  for (size_t i = 0; i < n; i++) tot += p[i];
  double r = rng_uniform(rng) * tot;
  for (size_t i = 0; i < n; i++) {
    r -= p[i];
    if (r < 0) return idx[i];
  }
  return idx[n - 1];
}

/* ---------------- compressor state blob ---------------- */
/* Whether an o head (an attention output) sits at the exit layer: then the exit layer runs its attention. */
inline bool exit_attention(const std::vector<HeadSel>& heads, int exit_layer) {
  for (const HeadSel& h : heads)
    if (h.kind == RF_HEAD_O && h.layer == exit_layer) return true;
  return false;
}

/* Layers whose KV cache a compressor keeps: 0..exit_layer-1. The exit layer's cache (and its attention, H2O scores
 * and eviction) is read by nothing below full depth — its q/k/v depend only on the layers before it — so it is kept
 * only when the exit layer is the model's last (the H2O-only baseline imports every layer into a sequence) or its
 * attention is embedded (an o head at the exit layer attends over that cache). */
inline int cached_layers(int exit_layer, int num_layers, bool exit_attn) {
  return exit_layer == num_layers - 1 || exit_attn ? exit_layer + 1 : exit_layer;
}

/* The chunk's queries whose attention scores the entries, counted from its end: H2O the last obs_window, TOVA the
 * last one (reform.h says why). */
inline int64_t observed_queries(const rf_compress_params& p, int64_t n) {
  return std::min<int64_t>(p.eviction == RF_EVICT_TOVA ? 1 : p.obs_window, n);
}

/* TOVA's score of every entry of one layer: the sum over its kv heads of their scores (each already the sum over the
 * kv head's query heads of the last query's probability), written back to every kv head, so each kv head of the layer
 * ranks — and keeps — the same entries. score: [nkv][stride], entries [0, len). */
inline void tova_layer_scores(float* score, int nkv, int64_t stride, int64_t len) {
  for (int64_t e = 0; e < len; e++) {
    float s = 0.f;
    for (int g = 0; g < nkv; g++) s += score[(int64_t)g * stride + e];
    for (int g = 0; g < nkv; g++) score[(int64_t)g * stride + e] = s;
  }
}

/* Layout: StateHeader, then for each cached layer (cached_layers), for each kv head: K[len][head_dim] f32,
 * V[len][head_dim] f32, score[len] f32. Magic "RFCSTAT2"; an "RFCSTAT1" blob (saved before the exit layer's cache
 * was dropped) holds exit_layer + 1 layers and still loads: its last layer is ignored. */
struct StateHeader {
  char magic[8];  // "RFCSTAT2" (or the legacy "RFCSTAT1")
  int32_t num_layers_cached;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t capacity;
  int64_t len;
  int64_t seen;
  int32_t hidden_size;
  int32_t reserved[7];
};
inline int64_t state_size(int layers, int kvh, int hd, int64_t len) {
  return (int64_t)sizeof(StateHeader) + (int64_t)layers * kvh * len * (2 * (int64_t)hd + 1) * 4;
}

}  // namespace rf

#endif
