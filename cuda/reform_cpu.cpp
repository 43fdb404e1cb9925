/*
 * reform_cpu.cpp — CPU (float32, OpenMP) implementation of cuda/reform.h.
 * Kernels live in cuda/cpu_kernels.h (rf::cpu); host helpers in cuda/reform_common.h.
 */
#include "reform.h"
#include "reform_common.h"
#include "cpu_kernels.h"
#include "select.h"

#include <exception>
#include <memory>
#include <new>
#include <stdexcept>
#include <thread>

using rf::set_error;
namespace k = rf::cpu;

/* ------------------------------------------------------------------------------------------------ */
/* objects                                                                                          */
/* ------------------------------------------------------------------------------------------------ */
namespace {

struct Layer {
  std::vector<float> in_norm, post_norm, wq, wk, wv, wo, bq, bk, bv, gate, up, down;
};

}  // namespace

struct rf_model {
  rf_config cfg;
  std::vector<float> embed, norm, lm_head;
  std::vector<Layer> layers;
  std::vector<uint8_t> set;
  std::vector<float> inv_freq;
  bool finalized = false;
  int refs = 1;       // 1 for the caller's handle + 1 per live compressor / seq
  bool destroyed = false;

  std::vector<float>& tensor(rf::TensorId id) {
    if (id.layer < 0) {
      switch (id.kind) {
        case rf::T_EMBED: return embed;
        case rf::T_NORM: return norm;
        default: return lm_head;
      }
    }
    Layer& L = layers[(size_t)id.layer];
    switch (id.kind) {
      case rf::T_IN_NORM: return L.in_norm;
      case rf::T_POST_NORM: return L.post_norm;
      case rf::T_Q: return L.wq;
      case rf::T_K: return L.wk;
      case rf::T_V: return L.wv;
      case rf::T_O: return L.wo;
      case rf::T_QB: return L.bq;
      case rf::T_KB: return L.bk;
      case rf::T_VB: return L.bv;
      case rf::T_GATE: return L.gate;
      case rf::T_UP: return L.up;
      default: return L.down;
    }
  }
  const float* lm() const { return cfg.tie_embeddings ? embed.data() : lm_head.data(); }
};

namespace {

void model_release(rf_model* m) {
  if (!m) return;
  if (--m->refs <= 0) delete m;
}

/* working buffers for one forward over n tokens */
struct Work {
  std::vector<float> x, h, q, kk, vv, att, o, g, u, scratch;
  void ensure(const rf_config& c, int64_t n, int64_t entries) {
    const int64_t H = c.hidden_size, I = c.intermediate_size;
    const int64_t qd = (int64_t)c.num_heads * c.head_dim, kvd = (int64_t)c.num_kv_heads * c.head_dim;
    auto grow = [](std::vector<float>& v, int64_t sz) {
      if ((int64_t)v.size() < sz) v.resize((size_t)sz);
    };
    grow(x, n * H);
    grow(h, n * H);
    grow(q, n * qd);
    grow(kk, n * kvd);
    grow(vv, n * kvd);
    grow(att, n * qd);
    grow(o, n * H);
    grow(g, n * I);
    grow(u, n * I);
    grow(scratch, k::attn_scratch_size(entries));
  }
};

void embed_tokens(const rf_model* m, const int32_t* tokens, int64_t n, float* x) {
  const int64_t H = m->cfg.hidden_size;
  for (int64_t t = 0; t < n; t++) memcpy(x + t * H, m->embed.data() + (int64_t)tokens[t] * H, (size_t)H * 4);
}

/* h = rmsnorm(x); q,k,v = projections (+bias) — pre-RoPE */
void qkv_proj(const rf_model* m, const Layer& L, Work& w, int64_t n) {
  const rf_config& c = m->cfg;
  const int64_t H = c.hidden_size, qd = (int64_t)c.num_heads * c.head_dim, kvd = (int64_t)c.num_kv_heads * c.head_dim;
  k::rmsnorm(w.x.data(), n, H, L.in_norm.data(), c.rms_eps, w.h.data());
  const bool b = c.qkv_bias != 0;
  k::matmul(w.h.data(), n, H, L.wq.data(), qd, b ? L.bq.data() : nullptr, w.q.data());
  k::matmul(w.h.data(), n, H, L.wk.data(), kvd, b ? L.bk.data() : nullptr, w.kk.data());
  k::matmul(w.h.data(), n, H, L.wv.data(), kvd, b ? L.bv.data() : nullptr, w.vv.data());
}

/* x += o_proj(att); x += down(silu(gate(h)) * up(h)) with h = rmsnorm(x) */
void post_attn(const rf_model* m, const Layer& L, Work& w, int64_t n) {
  const rf_config& c = m->cfg;
  const int64_t H = c.hidden_size, I = c.intermediate_size, qd = (int64_t)c.num_heads * c.head_dim;
  k::matmul(w.att.data(), n, qd, L.wo.data(), H, nullptr, w.o.data());
  k::add_inplace(w.x.data(), w.o.data(), n * H);
  k::rmsnorm(w.x.data(), n, H, L.post_norm.data(), c.rms_eps, w.h.data());
  k::matmul(w.h.data(), n, H, L.gate.data(), I, nullptr, w.g.data());
  k::matmul(w.h.data(), n, H, L.up.data(), I, nullptr, w.u.data());
  k::swiglu(w.g.data(), w.u.data(), n * I);
  k::matmul(w.g.data(), n, I, L.down.data(), H, nullptr, w.o.data());
  k::add_inplace(w.x.data(), w.o.data(), n * H);
}

/* rotate all heads of n token rows (row stride nheads*hd) starting at position pos0 */
void rope_rows(const rf_model* m, float* v, int64_t n, int nheads, int64_t pos0) {
  const int hd = m->cfg.head_dim, half = hd / 2;
  std::vector<float> cs((size_t)n * hd);
  for (int64_t t = 0; t < n; t++) k::rope_cos_sin(m->inv_freq.data(), half, pos0 + t, &cs[t * hd], &cs[t * hd + half]);
#pragma omp parallel for schedule(static) if (n * nheads * hd > 65536)
  for (int64_t t = 0; t < n; t++)
    for (int h = 0; h < nheads; h++) k::rope_head(v + (t * nheads + h) * hd, hd, &cs[t * hd], &cs[t * hd + half]);
}

bool tokens_valid(const rf_model* m, const int32_t* tokens, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    if (tokens[i] < 0 || tokens[i] >= m->cfg.vocab_size) {
      set_error(RF_ERR_INVALID, "token id %d at index %lld out of range [0,%d)", tokens[i], (long long)i,
                m->cfg.vocab_size);
      return false;
    }
  return true;
}

template <class F>
int guard(const char* where, F&& f) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return set_error(RF_ERR_OOM, "%s: out of host memory", where);
  } catch (const std::exception& e) {
    return set_error(RF_ERR_INTERNAL, "%s: %s", where, e.what());
  } catch (...) {
    return set_error(RF_ERR_INTERNAL, "%s: unknown exception", where);
  }
}
template <class T, class F>
T* guard_ptr(const char* where, F&& f) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    set_error(RF_ERR_OOM, "%s: out of host memory", where);
  } catch (const std::exception& e) {
    set_error(RF_ERR_INTERNAL, "%s: %s", where, e.what());
  } catch (...) {
    set_error(RF_ERR_INTERNAL, "%s: unknown exception", where);
  }
  return nullptr;
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace

struct rf_compressor {
  rf_model* m;
  rf_compress_params p;
  std::vector<rf::HeadSel> heads;
  int exit_layer;
  int64_t alloc;  // entries allocated per (layer, kv head) = capacity + max_chunk
  int64_t len = 0, seen = 0;
  std::vector<std::vector<float>> K, V, S;  // per layer: [nkv][alloc][hd], [nkv][alloc][hd], [nkv][alloc]
  std::vector<float> cos_tab, sin_tab;      // [alloc][hd/2]
  Work w;
  std::vector<float> kr, va, sa, emb;  // rotated keys / all values / scores for len+n entries; f32 embeddings
};

struct rf_seq {
  rf_model* m;
  int64_t max_tokens;
  int64_t len = 0;
  int64_t stride = 0;                    // entries allocated per (layer, kv head); grows up to max_tokens
  std::vector<std::vector<float>> K, V;  // per layer [nkv][stride][hd]; K rotated
  std::vector<float> logits;
  bool has_logits = false;
  Work w;
};

namespace {

/* One compressor forward over a chunk. commit: append + score + evict (process); else read-only (embed). */
int compressor_run(rf_compressor* c, const int32_t* tokens, int64_t n, void* out_emb, bool commit) {
  const rf_model* m = c->m;
  const rf_config& cfg = m->cfg;
  const int nh = cfg.num_heads, nkv = cfg.num_kv_heads, hd = cfg.head_dim, half = hd / 2;
  const int64_t L = c->len, T = L + n, qd = (int64_t)nh * hd, kvd = (int64_t)nkv * hd;
  const int E = c->exit_layer;
  const int64_t edim = (int64_t)c->heads.size() * hd;
  Work& w = c->w;
  w.ensure(cfg, n, T);
  c->kr.resize((size_t)(nkv * T * hd));
  c->va.resize((size_t)(nkv * T * hd));
  if (commit) c->sa.resize((size_t)(nkv * T));
  c->emb.resize((size_t)(n * edim));

  embed_tokens(m, tokens, n, w.x.data());
  for (int l = 0; l <= E; l++) {
    const Layer& Ly = m->layers[(size_t)l];
    qkv_proj(m, Ly, w, n);
    // selected heads of this layer (pre-RoPE), L2-normalised
    for (size_t si = 0; si < c->heads.size(); si++) {
      const rf::HeadSel& hs = c->heads[si];
      if (hs.layer != l) continue;
      const float* src = hs.kind == RF_HEAD_Q ? w.q.data() : hs.kind == RF_HEAD_K ? w.kk.data() : w.vv.data();
      const int64_t rs = hs.kind == RF_HEAD_Q ? qd : kvd;
      for (int64_t t = 0; t < n; t++)
        k::l2_normalize(src + t * rs + (int64_t)hs.head * hd, hd, 1e-6f, &c->emb[t * edim + (int64_t)si * hd]);
    }
    // keys of every entry at contiguous positions 0..T-1 (cache pre-RoPE), values
    const float* Kc = c->K[(size_t)l].data();
    const float* Vc = c->V[(size_t)l].data();
    float* kr = c->kr.data();
    float* va = c->va.data();
#pragma omp parallel for schedule(static) if (T * nkv * hd > 65536)
    for (int64_t e = 0; e < T; e++) {
      const float* cs = &c->cos_tab[e * half];
      const float* sn = &c->sin_tab[e * half];
      for (int g = 0; g < nkv; g++) {
        const float* ksrc = e < L ? Kc + ((int64_t)g * c->alloc + e) * hd : w.kk.data() + (e - L) * kvd + (int64_t)g * hd;
        const float* vsrc = e < L ? Vc + ((int64_t)g * c->alloc + e) * hd : w.vv.data() + (e - L) * kvd + (int64_t)g * hd;
        k::rope_head_to(ksrc, kr + ((int64_t)g * T + e) * hd, hd, cs, sn);
        memcpy(va + ((int64_t)g * T + e) * hd, vsrc, (size_t)hd * 4);
      }
    }
    // rotate queries at positions L..T-1
    for (int64_t t = 0; t < n; t++)
      for (int h = 0; h < nh; h++)
        k::rope_head(w.q.data() + t * qd + (int64_t)h * hd, hd, &c->cos_tab[(L + t) * half], &c->sin_tab[(L + t) * half]);
    if (commit) {
      float* sa = c->sa.data();
      const float* Sc = c->S[(size_t)l].data();
      for (int g = 0; g < nkv; g++)
        for (int64_t e = 0; e < T; e++) sa[(int64_t)g * T + e] = e < L ? Sc[(int64_t)g * c->alloc + e] : 0.f;
      const int64_t obs_start = n - std::min<int64_t>(c->p.obs_window, n);
      k::attn_scores(w.q.data(), n, nh, nkv, hd, kr, T, L, obs_start, sa, T, w.scratch.data());
    }
    if (l < E) {
      k::attn_forward(w.q.data(), n, nh, nkv, hd, kr, va, T, L, w.att.data(), w.scratch.data());
      post_attn(m, Ly, w, n);
    }
    if (commit) {  // append the chunk (pre-RoPE K, V) and the updated scores
      float* Kd = c->K[(size_t)l].data();
      float* Vd = c->V[(size_t)l].data();
      float* Sd = c->S[(size_t)l].data();
      for (int g = 0; g < nkv; g++) {
        for (int64_t t = 0; t < n; t++) {
          memcpy(Kd + ((int64_t)g * c->alloc + L + t) * hd, w.kk.data() + t * kvd + (int64_t)g * hd, (size_t)hd * 4);
          memcpy(Vd + ((int64_t)g * c->alloc + L + t) * hd, w.vv.data() + t * kvd + (int64_t)g * hd, (size_t)hd * 4);
        }
        memcpy(Sd + (int64_t)g * c->alloc, c->sa.data() + (int64_t)g * T, (size_t)T * 4);
      }
    }
  }
  if (commit) {
    int64_t newlen = T;
    if (T > c->p.capacity) {
      std::vector<int32_t> keep;
      for (int l = 0; l <= E; l++)
        for (int g = 0; g < nkv; g++) {
          float* Kd = c->K[(size_t)l].data() + (int64_t)g * c->alloc * hd;
          float* Vd = c->V[(size_t)l].data() + (int64_t)g * c->alloc * hd;
          float* Sd = c->S[(size_t)l].data() + (int64_t)g * c->alloc;
          rf::h2o_select(Sd, T, c->p.capacity, c->p.n_sink, c->p.n_recent, &keep);
          for (size_t i = 0; i < keep.size(); i++) {
            const int64_t src = keep[i];
            if (src == (int64_t)i) continue;
            memmove(Kd + (int64_t)i * hd, Kd + src * hd, (size_t)hd * 4);
            memmove(Vd + (int64_t)i * hd, Vd + src * hd, (size_t)hd * 4);
            Sd[i] = Sd[src];
          }
          newlen = (int64_t)keep.size();
        }
    }
    c->len = newlen;
    c->seen += n;
  }
  if (out_emb) {
    if (c->p.emb_dtype == RF_F32) {
      memcpy(out_emb, c->emb.data(), (size_t)(n * edim) * 4);
    } else {
      uint16_t* o = (uint16_t*)out_emb;
      for (int64_t i = 0; i < n * edim; i++) o[i] = rf::f32_to_f16(c->emb[(size_t)i]);
    }
  }
  return RF_OK;
}

/* seq forward of n tokens at positions s->len.. ; writes logits of the last token */
void seq_block(rf_seq* s, const int32_t* tokens, int64_t n, bool last) {
  const rf_model* m = s->m;
  const rf_config& cfg = m->cfg;
  const int nh = cfg.num_heads, nkv = cfg.num_kv_heads, hd = cfg.head_dim;
  const int64_t H = cfg.hidden_size, kvd = (int64_t)nkv * hd;
  const int64_t p0 = s->len;
  Work& w = s->w;
  w.ensure(cfg, n, p0 + n);
  embed_tokens(m, tokens, n, w.x.data());
  for (int l = 0; l < cfg.num_layers; l++) {
    const Layer& Ly = m->layers[(size_t)l];
    qkv_proj(m, Ly, w, n);
    rope_rows(m, w.q.data(), n, nh, p0);
    rope_rows(m, w.kk.data(), n, nkv, p0);
    float* Kd = s->K[(size_t)l].data();
    float* Vd = s->V[(size_t)l].data();
    for (int g = 0; g < nkv; g++)
      for (int64_t t = 0; t < n; t++) {
        memcpy(Kd + ((int64_t)g * s->stride + p0 + t) * hd, w.kk.data() + t * kvd + (int64_t)g * hd, (size_t)hd * 4);
        memcpy(Vd + ((int64_t)g * s->stride + p0 + t) * hd, w.vv.data() + t * kvd + (int64_t)g * hd, (size_t)hd * 4);
      }
    k::attn_forward(w.q.data(), n, nh, nkv, hd, Kd, Vd, s->stride, p0, w.att.data(), w.scratch.data());
    post_attn(m, Ly, w, n);
  }
  s->len = p0 + n;
  if (last) {
    const float* xl = w.x.data() + (n - 1) * H;
    k::rmsnorm(xl, 1, H, m->norm.data(), cfg.rms_eps, w.h.data());
    k::matmul(w.h.data(), 1, H, m->lm(), cfg.vocab_size, nullptr, s->logits.data());
    s->has_logits = true;
  }
}

/* grow the seq KV cache (lazily, doubling, capped at max_tokens) so that `need` entries fit; keeps the first
 * s->len entries. All new buffers are allocated before anything is modified (bad_alloc leaves s intact). */
void seq_reserve(rf_seq* s, int64_t need) {
  if (need <= s->stride) return;
  const rf_config& cfg = s->m->cfg;
  const int nkv = cfg.num_kv_heads, hd = cfg.head_dim;
  const int64_t cap = std::min(s->max_tokens, std::max({need, 2 * s->stride, (int64_t)256}));
  const size_t per = (size_t)nkv * (size_t)cap * (size_t)hd;
  std::vector<std::vector<float>> K2((size_t)cfg.num_layers), V2((size_t)cfg.num_layers);
  for (int l = 0; l < cfg.num_layers; l++) {
    K2[(size_t)l].resize(per);
    V2[(size_t)l].resize(per);
  }
  if (s->len > 0)
    for (int l = 0; l < cfg.num_layers; l++)
      for (int g = 0; g < nkv; g++) {
        memcpy(K2[(size_t)l].data() + (int64_t)g * cap * hd, s->K[(size_t)l].data() + (int64_t)g * s->stride * hd,
               (size_t)(s->len * hd) * 4);
        memcpy(V2[(size_t)l].data() + (int64_t)g * cap * hd, s->V[(size_t)l].data() + (int64_t)g * s->stride * hd,
               (size_t)(s->len * hd) * 4);
      }
  s->K.swap(K2);
  s->V.swap(V2);
  s->stride = cap;
}

bool model_ready(const rf_model* m) {
  if (!m) {
    set_error(RF_ERR_INVALID, "model is NULL");
    return false;
  }
  if (!m->finalized) {
    set_error(RF_ERR_STATE, "model is not finalized");
    return false;
  }
  return true;
}

std::string cpu_model_name() {
  FILE* f = fopen("/proc/cpuinfo", "r");
  std::string name = "unknown CPU";
  if (!f) return name;
  char line[512];
  while (fgets(line, sizeof line, f)) {
    if (strncmp(line, "model name", 10) == 0) {
      const char* p = strchr(line, ':');
      if (p) {
        p++;
        while (*p == ' ' || *p == '\t') p++;
        name = p;
        while (!name.empty() && (name.back() == '\n' || name.back() == '\r')) name.pop_back();
      }
      break;
    }
  }
  fclose(f);
  return name;
}

}  // namespace

/* ------------------------------------------------------------------------------------------------ */
/* library                                                                                          */
/* ------------------------------------------------------------------------------------------------ */
extern "C" {

RF_API int rf_abi_version(void) { return RF_ABI_VERSION; }
RF_API const char* rf_backend_name(void) { return "cpu"; }
RF_API const char* rf_last_error(void) { return rf::last_error_ref().c_str(); }
RF_API int rf_last_error_code(void) { return rf::last_error_code_ref(); }
RF_API int rf_device_count(void) { return 1; }

RF_API int rf_device_info(char* buf, int32_t buflen) {
  return guard("rf_device_info", [&]() -> int {
    if (!buf || buflen <= 0) return set_error(RF_ERR_INVALID, "rf_device_info: buffer is NULL or empty");
    std::string s = "CPU: " + cpu_model_name() + ", " + std::to_string(k::max_threads()) + " OpenMP threads, " +
                    std::to_string(std::thread::hardware_concurrency()) + " hardware threads, float32 compute";
    snprintf(buf, (size_t)buflen, "%s", s.c_str());
    return RF_OK;
  });
}

RF_API int rf_set_threads(int32_t n) {
  if (n < 0) return set_error(RF_ERR_INVALID, "rf_set_threads: n must be >= 0 (0 = all cores)");
#ifdef _OPENMP
  omp_set_num_threads(n == 0 ? omp_get_num_procs() : n);
#endif
  return RF_OK;
}

/* ---- model ---- */
RF_API rf_model* rf_model_create(const rf_config* cfg) {
  return guard_ptr<rf_model>("rf_model_create", [&]() -> rf_model* {
    if (rf::validate_config(cfg) != RF_OK) return nullptr;
    rf_model* m = new rf_model();
    m->cfg = *cfg;
    m->layers.resize((size_t)cfg->num_layers);
    m->set.assign(rf::tensor_slot_count(*cfg), 0);
    m->inv_freq = rf::rope_inv_freq(*cfg);
    return m;
  });
}

RF_API int rf_model_set_tensor(rf_model* m, const char* name, const void* data, int32_t dtype, const int64_t* shape,
                               int32_t ndim) {
  return guard("rf_model_set_tensor", [&]() -> int {
    if (!m) return set_error(RF_ERR_INVALID, "rf_model_set_tensor: model is NULL");
    if (!name) return set_error(RF_ERR_INVALID, "rf_model_set_tensor: name is NULL");
    rf::TensorId id;
    int rc = rf::check_tensor(m->cfg, name, dtype, shape, ndim, &id);
    if (rc != RF_OK) return rc;
    if (!data) return set_error(RF_ERR_INVALID, "tensor '%s': data is NULL", name);
    int64_t r, cc;
    rf::expected_shape(m->cfg, id.kind, &r, &cc);
    const int64_t cnt = r * (cc ? cc : 1);
    std::vector<float> v((size_t)cnt);
    if (dtype == RF_F32) {
      memcpy(v.data(), data, (size_t)cnt * 4);
    } else {
      float* dst = v.data();
#pragma omp parallel for schedule(static) if (cnt > 1 << 20)
      for (int64_t i = 0; i < cnt; i++) dst[i] = rf::load_as_f32(data, dtype, i);
    }
    m->tensor(id).swap(v);
    m->set[rf::tensor_slot(m->cfg, id)] = 1;
    return RF_OK;
  });
}

RF_API int rf_model_init_random(rf_model* m, uint64_t seed, float stdv) {
  return guard("rf_model_init_random", [&]() -> int {
    if (!m) return set_error(RF_ERR_INVALID, "rf_model_init_random: model is NULL");
    if (!(stdv >= 0.f) || !std::isfinite(stdv)) return set_error(RF_ERR_INVALID, "rf_model_init_random: bad std");
    const rf_config& c = m->cfg;
    for (size_t slot = 0; slot < m->set.size(); slot++) {
      rf::TensorId id;
      if (slot < 3) {
        id = {(rf::TensorKind)slot, -1};
        if (id.kind == rf::T_LM_HEAD && c.tie_embeddings) continue;
      } else {
        id = {(rf::TensorKind)(3 + (slot - 3) % (rf::T_COUNT - 3)), (int)((slot - 3) / (rf::T_COUNT - 3))};
        if ((id.kind == rf::T_QB || id.kind == rf::T_KB || id.kind == rf::T_VB) && !c.qkv_bias) continue;
      }
      int64_t r, cc;
      rf::expected_shape(c, id.kind, &r, &cc);
      const int64_t cnt = r * (cc ? cc : 1);
      std::vector<float> v((size_t)cnt);
      const bool is_norm = id.kind == rf::T_NORM || id.kind == rf::T_IN_NORM || id.kind == rf::T_POST_NORM;
      const bool is_bias = id.kind == rf::T_QB || id.kind == rf::T_KB || id.kind == rf::T_VB;
      if (is_norm || is_bias) {
        std::fill(v.begin(), v.end(), is_norm ? 1.f : 0.f);
      } else {
        const int64_t B = 1 << 16, nb = (cnt + B - 1) / B;
        float* dst = v.data();
#pragma omp parallel for schedule(static)
        for (int64_t b = 0; b < nb; b++) {
          uint64_t st = splitmix64(seed ^ splitmix64((uint64_t)slot * 0x100000001ull + (uint64_t)b)) | 1ull;
          const int64_t e = std::min(cnt, (b + 1) * B);
          for (int64_t i = b * B; i < e; i += 2) {  // Box-Muller
            double u1 = (double)((rf::xorshift64star(&st) >> 11) + 1) * (1.0 / 9007199254740993.0);
            double u2 = rf::rng_uniform(&st);
            double rr = std::sqrt(-2.0 * std::log(u1));
            dst[i] = (float)(stdv * rr * std::cos(6.283185307179586 * u2));
            if (i + 1 < e) dst[i + 1] = (float)(stdv * rr * std::sin(6.283185307179586 * u2));
          }
        }
      }
      m->tensor(id).swap(v);
      m->set[slot] = 1;
    }
    return RF_OK;
  });
}

RF_API int rf_model_finalize(rf_model* m) {
  return guard("rf_model_finalize", [&]() -> int {
    if (!m) return set_error(RF_ERR_INVALID, "rf_model_finalize: model is NULL");
    int rc = rf::check_complete(m->cfg, m->set);
    if (rc != RF_OK) return rc;
    m->finalized = true;
    return RF_OK;
  });
}

RF_API int64_t rf_model_memory_bytes(const rf_model* m) {
  if (!m) return set_error(RF_ERR_INVALID, "rf_model_memory_bytes: model is NULL");
  int64_t b = (int64_t)(m->embed.size() + m->norm.size() + m->lm_head.size());
  for (const Layer& L : m->layers)
    b += (int64_t)(L.in_norm.size() + L.post_norm.size() + L.wq.size() + L.wk.size() + L.wv.size() + L.wo.size() +
                   L.bq.size() + L.bk.size() + L.bv.size() + L.gate.size() + L.up.size() + L.down.size());
  return b * 4;
}

RF_API void rf_model_destroy(rf_model* m) {
  if (!m || m->destroyed) return;
  m->destroyed = true;
  model_release(m);
}

/* ---- compressor ---- */
RF_API rf_compressor* rf_compressor_create(rf_model* m, const rf_compress_params* p, const int32_t* heads,
                                           int32_t n_heads) {
  return guard_ptr<rf_compressor>("rf_compressor_create", [&]() -> rf_compressor* {
    if (!model_ready(m)) return nullptr;
    std::vector<rf::HeadSel> hs;
    int el = 0;
    if (rf::validate_compress(m->cfg, p, heads, n_heads, &hs, &el) != RF_OK) return nullptr;
    const rf_config& cfg = m->cfg;
    const int hd = cfg.head_dim, half = hd / 2, nkv = cfg.num_kv_heads;
    std::unique_ptr<rf_compressor> c(new rf_compressor());
    c->m = m;
    c->p = *p;
    c->heads = hs;
    c->exit_layer = el;
    c->alloc = (int64_t)p->capacity + p->max_chunk;
    c->K.resize((size_t)el + 1);
    c->V.resize((size_t)el + 1);
    c->S.resize((size_t)el + 1);
    for (int l = 0; l <= el; l++) {
      c->K[(size_t)l].assign((size_t)(nkv * c->alloc * hd), 0.f);
      c->V[(size_t)l].assign((size_t)(nkv * c->alloc * hd), 0.f);
      c->S[(size_t)l].assign((size_t)(nkv * c->alloc), 0.f);
    }
    c->cos_tab.resize((size_t)(c->alloc * half));
    c->sin_tab.resize((size_t)(c->alloc * half));
    for (int64_t e = 0; e < c->alloc; e++)
      k::rope_cos_sin(m->inv_freq.data(), half, e, &c->cos_tab[e * half], &c->sin_tab[e * half]);
    m->refs++;
    return c.release();
  });
}

RF_API int32_t rf_compressor_embed_dim(const rf_compressor* c) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  return (int32_t)(c->heads.size() * (size_t)c->m->cfg.head_dim);
}
RF_API int32_t rf_compressor_exit_layer(const rf_compressor* c) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  return c->exit_layer;
}

static int compressor_call(rf_compressor* c, const int32_t* tokens, int32_t n, void* out_emb, bool commit,
                           const char* where) {
  return guard(where, [&]() -> int {
    if (!c) return set_error(RF_ERR_INVALID, "%s: compressor is NULL", where);
    if (n < 1 || n > c->p.max_chunk)
      return set_error(RF_ERR_INVALID, "%s: n = %d must be in [1, max_chunk = %d]", where, n, c->p.max_chunk);
    if (!tokens) return set_error(RF_ERR_INVALID, "%s: tokens is NULL", where);
    if (!commit && !out_emb) return set_error(RF_ERR_INVALID, "%s: out_emb is NULL", where);
    if (!tokens_valid(c->m, tokens, n)) return RF_ERR_INVALID;
    return compressor_run(c, tokens, n, out_emb, commit);
  });
}

RF_API int rf_compressor_process(rf_compressor* c, const int32_t* tokens, int32_t n, void* out_emb) {
  return compressor_call(c, tokens, n, out_emb, true, "rf_compressor_process");
}
RF_API int rf_compressor_embed(rf_compressor* c, const int32_t* tokens, int32_t n, void* out_emb) {
  return compressor_call(c, tokens, n, out_emb, false, "rf_compressor_embed");
}
RF_API int64_t rf_compressor_cache_len(const rf_compressor* c) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  return c->len;
}
RF_API int64_t rf_compressor_seen(const rf_compressor* c) {
  if (!c) return set_error(RF_ERR_INVALID, "compressor is NULL");
  return c->seen;
}
RF_API int rf_compressor_reset(rf_compressor* c) {
  if (!c) return set_error(RF_ERR_INVALID, "rf_compressor_reset: compressor is NULL");
  c->len = 0;
  c->seen = 0;
  return RF_OK;
}

RF_API int64_t rf_compressor_state_size(const rf_compressor* c) {
  if (!c) return set_error(RF_ERR_INVALID, "rf_compressor_state_size: compressor is NULL");
  return rf::state_size(c->exit_layer + 1, c->m->cfg.num_kv_heads, c->m->cfg.head_dim, c->len);
}

RF_API int rf_compressor_state_save(const rf_compressor* c, void* buf, int64_t size) {
  return guard("rf_compressor_state_save", [&]() -> int {
    if (!c || !buf) return set_error(RF_ERR_INVALID, "rf_compressor_state_save: NULL argument");
    const int nkv = c->m->cfg.num_kv_heads, hd = c->m->cfg.head_dim;
    const int64_t need = rf::state_size(c->exit_layer + 1, nkv, hd, c->len);
    if (size < need)
      return set_error(RF_ERR_INVALID, "rf_compressor_state_save: buffer of %lld bytes, need %lld", (long long)size,
                       (long long)need);
    rf::StateHeader h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, "RFCSTAT1", 8);
    h.num_layers_cached = c->exit_layer + 1;
    h.num_kv_heads = nkv;
    h.head_dim = hd;
    h.capacity = c->p.capacity;
    h.len = c->len;
    h.seen = c->seen;
    h.hidden_size = c->m->cfg.hidden_size;
    char* o = (char*)buf;
    memcpy(o, &h, sizeof h);
    o += sizeof h;
    for (int l = 0; l <= c->exit_layer; l++)
      for (int g = 0; g < nkv; g++) {
        const size_t kvb = (size_t)(c->len * hd) * 4;
        memcpy(o, c->K[(size_t)l].data() + (int64_t)g * c->alloc * hd, kvb);
        o += kvb;
        memcpy(o, c->V[(size_t)l].data() + (int64_t)g * c->alloc * hd, kvb);
        o += kvb;
        memcpy(o, c->S[(size_t)l].data() + (int64_t)g * c->alloc, (size_t)c->len * 4);
        o += (size_t)c->len * 4;
      }
    return RF_OK;
  });
}

RF_API int rf_compressor_state_load(rf_compressor* c, const void* buf, int64_t size) {
  return guard("rf_compressor_state_load", [&]() -> int {
    if (!c || !buf) return set_error(RF_ERR_INVALID, "rf_compressor_state_load: NULL argument");
    if (size < (int64_t)sizeof(rf::StateHeader))
      return set_error(RF_ERR_INVALID, "rf_compressor_state_load: blob too small (%lld bytes)", (long long)size);
    rf::StateHeader h;
    memcpy(&h, buf, sizeof h);
    const int nkv = c->m->cfg.num_kv_heads, hd = c->m->cfg.head_dim;
    if (memcmp(h.magic, "RFCSTAT1", 8) != 0) return set_error(RF_ERR_INVALID, "rf_compressor_state_load: bad magic");
    if (h.num_layers_cached != c->exit_layer + 1 || h.num_kv_heads != nkv || h.head_dim != hd ||
        h.hidden_size != c->m->cfg.hidden_size)
      return set_error(RF_ERR_INVALID,
                       "rf_compressor_state_load: blob is for %d layers x %d kv heads x head_dim %d (hidden %d), "
                       "compressor has %d x %d x %d (hidden %d)",
                       h.num_layers_cached, h.num_kv_heads, h.head_dim, h.hidden_size, c->exit_layer + 1, nkv, hd,
                       c->m->cfg.hidden_size);
    if (h.len < 0 || h.len > c->p.capacity || h.seen < h.len)
      return set_error(RF_ERR_INVALID, "rf_compressor_state_load: blob len %lld invalid for capacity %d",
                       (long long)h.len, c->p.capacity);
    const int64_t need = rf::state_size(h.num_layers_cached, nkv, hd, h.len);
    if (size != need)
      return set_error(RF_ERR_INVALID, "rf_compressor_state_load: blob has %lld bytes, expected %lld", (long long)size,
                       (long long)need);
    const char* in = (const char*)buf + sizeof h;
    for (int l = 0; l <= c->exit_layer; l++)
      for (int g = 0; g < nkv; g++) {
        const size_t kvb = (size_t)(h.len * hd) * 4;
        memcpy(c->K[(size_t)l].data() + (int64_t)g * c->alloc * hd, in, kvb);
        in += kvb;
        memcpy(c->V[(size_t)l].data() + (int64_t)g * c->alloc * hd, in, kvb);
        in += kvb;
        memcpy(c->S[(size_t)l].data() + (int64_t)g * c->alloc, in, (size_t)h.len * 4);
        in += (size_t)h.len * 4;
      }
    c->len = h.len;
    c->seen = h.seen;
    return RF_OK;
  });
}

RF_API void rf_compressor_destroy(rf_compressor* c) {
  if (!c) return;
  rf_model* m = c->m;
  delete c;
  model_release(m);
}

/* ---- scoring ---- */
RF_API int rf_score(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
                    float* out) {
  return guard("rf_score", [&]() -> int {
    if (n_ctx < 0 || dim <= 0 || n_q < 1) return set_error(RF_ERR_INVALID, "rf_score: bad sizes");
    if (ctx_dtype != RF_F32 && ctx_dtype != RF_F16) return set_error(RF_ERR_INVALID, "rf_score: ctx dtype must be f32/f16");
    if (n_ctx == 0) return RF_OK;
    if (!ctx || !q || !out) return set_error(RF_ERR_INVALID, "rf_score: NULL argument");
    std::vector<float> qn((size_t)n_q * dim);
    for (int j = 0; j < n_q; j++) {
      const float* src = q + (int64_t)j * dim;
      double ss = 0;
      for (int d = 0; d < dim; d++) ss += (double)src[d] * src[d];
      const float inv = (float)(1.0 / std::max(std::sqrt(ss), 1e-12));
      for (int d = 0; d < dim; d++) qn[(size_t)j * dim + d] = src[d] * inv;
    }
    std::vector<float> tmp((size_t)k::max_threads() * dim);
    if (ctx_dtype == RF_F32) {
      const float* cf = (const float*)ctx;
      k::cosine_max([&](int64_t i, float* row) { memcpy(row, cf + i * dim, (size_t)dim * 4); }, n_ctx, dim, qn.data(),
                    n_q, out, tmp.data());
    } else {
      const uint16_t* ch = (const uint16_t*)ctx;
      k::cosine_max(
          [&](int64_t i, float* row) {
            for (int d = 0; d < dim; d++) row[d] = rf::f16_to_f32(ch[i * dim + d]);
          },
          n_ctx, dim, qn.data(), n_q, out, tmp.data());
    }
    return RF_OK;
  });
}

/* ---- recompute + generate ---- */
RF_API rf_seq* rf_seq_create(rf_model* m, int32_t max_tokens) {
  return guard_ptr<rf_seq>("rf_seq_create", [&]() -> rf_seq* {
    if (!model_ready(m)) return nullptr;
    if (max_tokens < 1) {
      set_error(RF_ERR_INVALID, "rf_seq_create: max_tokens must be >= 1");
      return nullptr;
    }
    const rf_config& cfg = m->cfg;
    std::unique_ptr<rf_seq> s(new rf_seq());
    s->m = m;
    s->max_tokens = max_tokens;
    s->K.resize((size_t)cfg.num_layers);  // allocated lazily by seq_reserve
    s->V.resize((size_t)cfg.num_layers);
    s->logits.assign((size_t)cfg.vocab_size, 0.f);
    m->refs++;
    return s.release();
  });
}

RF_API int rf_seq_forward(rf_seq* s, const int32_t* tokens, int32_t n, float* logits_out) {
  return guard("rf_seq_forward", [&]() -> int {
    if (!s) return set_error(RF_ERR_INVALID, "rf_seq_forward: seq is NULL");
    if (n < 1) return set_error(RF_ERR_INVALID, "rf_seq_forward: n must be >= 1");
    if (!tokens) return set_error(RF_ERR_INVALID, "rf_seq_forward: tokens is NULL");
    if ((int64_t)n > s->max_tokens - s->len)
      return set_error(RF_ERR_INVALID, "rf_seq_forward: %d tokens at length %lld exceed max_tokens %lld", n,
                       (long long)s->len, (long long)s->max_tokens);
    if (!tokens_valid(s->m, tokens, n)) return RF_ERR_INVALID;
    seq_reserve(s, s->len + n);
    const int64_t BLK = 256;  // bounds activation memory for long prefills
    for (int64_t t0 = 0; t0 < n; t0 += BLK) {
      const int64_t nb = std::min<int64_t>(BLK, n - t0);
      seq_block(s, tokens + t0, nb, t0 + nb == n);
    }
    if (logits_out) memcpy(logits_out, s->logits.data(), (size_t)s->m->cfg.vocab_size * 4);
    return RF_OK;
  });
}

RF_API int32_t rf_seq_sample(rf_seq* s, float temperature, float top_p, int32_t top_k, uint64_t* rng_state) {
  return guard("rf_seq_sample", [&]() -> int {
    if (!s) return set_error(RF_ERR_INVALID, "rf_seq_sample: seq is NULL");
    if (!s->has_logits) return set_error(RF_ERR_STATE, "rf_seq_sample: no logits yet (call rf_seq_forward first)");
    if (std::isnan(temperature) || std::isnan(top_p)) return set_error(RF_ERR_INVALID, "rf_seq_sample: NaN parameter");
    return rf::sample_logits(s->logits.data(), s->m->cfg.vocab_size, temperature, top_p, top_k, rng_state);
  });
}

RF_API int32_t rf_sample_logits(const float* logits, int32_t n, float temperature, float top_p, int32_t top_k,
                                uint64_t* rng_state) {
  return rf::sample_logits_checked(logits, n, temperature, top_p, top_k, rng_state);
}

RF_API int32_t rf_seq_length(const rf_seq* s) {
  if (!s) return set_error(RF_ERR_INVALID, "rf_seq_length: seq is NULL");
  return (int32_t)s->len;
}

RF_API int rf_seq_reset(rf_seq* s) {
  if (!s) return set_error(RF_ERR_INVALID, "rf_seq_reset: seq is NULL");
  s->len = 0;
  s->has_logits = false;
  return RF_OK;
}

RF_API int rf_seq_import_compressor(rf_seq* s, const rf_compressor* c) {
  return guard("rf_seq_import_compressor", [&]() -> int {
    if (!s || !c) return set_error(RF_ERR_INVALID, "rf_seq_import_compressor: NULL argument");
    if (c->m != s->m) return set_error(RF_ERR_INVALID, "rf_seq_import_compressor: compressor uses a different model");
    const rf_config& cfg = s->m->cfg;
    if (c->exit_layer != cfg.num_layers - 1)
      return set_error(RF_ERR_INVALID, "rf_seq_import_compressor: compressor exit layer %d is not the last layer %d",
                       c->exit_layer, cfg.num_layers - 1);
    if (c->len > s->max_tokens)
      return set_error(RF_ERR_INVALID, "rf_seq_import_compressor: %lld cache entries exceed max_tokens %lld",
                       (long long)c->len, (long long)s->max_tokens);
    const int nkv = cfg.num_kv_heads, hd = cfg.head_dim, half = hd / 2;
    s->len = 0;
    s->has_logits = false;
    seq_reserve(s, c->len);
    for (int l = 0; l < cfg.num_layers; l++)
      for (int g = 0; g < nkv; g++)
        for (int64_t e = 0; e < c->len; e++) {
          const float* ks = c->K[(size_t)l].data() + ((int64_t)g * c->alloc + e) * hd;
          const float* vs = c->V[(size_t)l].data() + ((int64_t)g * c->alloc + e) * hd;
          k::rope_head_to(ks, s->K[(size_t)l].data() + ((int64_t)g * s->stride + e) * hd, hd, &c->cos_tab[e * half],
                          &c->sin_tab[e * half]);
          memcpy(s->V[(size_t)l].data() + ((int64_t)g * s->stride + e) * hd, vs, (size_t)hd * 4);
        }
    s->len = c->len;
    s->has_logits = false;
    return RF_OK;
  });
}

RF_API void rf_seq_destroy(rf_seq* s) {
  if (!s) return;
  rf_model* m = s->m;
  delete s;
  model_release(m);
}

RF_API int64_t rf_smooth_select(const float* scores, int64_t n, int32_t window, int64_t budget, int32_t edge,
                                float* smoothed, int32_t* out_idx) {
  try {
    return rf::smooth_select(scores, n, window, budget, edge, smoothed, out_idx);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}

RF_API int64_t rf_score_select(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q,
                               int32_t n_q, int32_t window, int64_t budget, int32_t edge, float* scores,
                               int32_t* out_idx) {
  try {
    return rf::score_select([&](float* s) { return rf::score_rows(ctx, ctx_dtype, n_ctx, dim, q, n_q, s); }, n_ctx, window, budget, edge,
                            scores, out_idx);
  } catch (...) {
    return set_error(RF_ERR_OOM, "host allocation failed");
  }
}

}  // extern "C"
