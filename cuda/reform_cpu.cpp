/*
 * reform_cpu.cpp — CPU (float32 compute, own worker threads) implementation of cuda/reform.h.
 * Kernels live in cuda/cpu_kernels.h (rf::cpu); host helpers in cuda/reform_common.h.
 */
#include "reform.h"
#include "reform_common.h"
#include "abi_guard.h"
#include "cpu_kernels.h"
#include "select.h"

#include <exception>
#include <memory>
#include <new>
#include <stdexcept>
#include <thread>

using rf::guard;
using rf::set_error;
namespace k = rf::cpu;

/* ------------------------------------------------------------------------------------------------ */
/* objects                                                                                          */
/* ------------------------------------------------------------------------------------------------ */
namespace {

bool is_matrix(rf::TensorKind k) {
  return k == rf::T_EMBED || k == rf::T_LM_HEAD || k == rf::T_Q || k == rf::T_K || k == rf::T_V || k == rf::T_O ||
         k == rf::T_GATE || k == rf::T_UP || k == rf::T_DOWN;
}

/* a weight matrix as given (row-major, in its own dtype) until finalize packs it */
struct Raw {
  int32_t dtype = RF_F32;
  std::vector<uint8_t> bytes;
};

struct Layer {
  std::vector<float> in_norm, post_norm, bq, bk, bv, bqkv;  // bqkv = bq|bk|bv, the fused projection's bias
  std::vector<float> q_norm, k_norm;                        // [head_dim] each, qk_norm only
  k::PackedW qkv, o, gu, down;                              // packed at finalize; qkv = q|k|v, gu = gate|up
};

}  // namespace

/* Matrices are kept in their checkpoint's type (f32, bf16 or f16) and packed into the matmul's panels by
 * rf_model_finalize (q/k/v fused into one matrix, gate/up into another); norms and biases are f32. */
struct rf_model {
  rf_config cfg;
  std::vector<float> norm;
  std::vector<Layer> layers;
  std::vector<uint8_t> set;
  std::vector<Raw> raw;  // per tensor slot: matrices not packed yet (emptied by finalize)
  Raw embed;             // untied: the embedding rows for lookup; tied: empty (rows are read from lm)
  k::PackedW lm;
  std::vector<float> inv_freq;
  bool finalized = false;
  int refs = 1;  // 1 for the caller's handle + 1 per live compressor / seq
  bool destroyed = false;

  /* a norm or bias */
  std::vector<float>& vec(rf::TensorId id) {
    if (id.layer < 0) return norm;
    Layer& L = layers[(size_t)id.layer];
    switch (id.kind) {
      case rf::T_IN_NORM: return L.in_norm;
      case rf::T_POST_NORM: return L.post_norm;
      case rf::T_QB: return L.bq;
      case rf::T_KB: return L.bk;
      case rf::T_QN: return L.q_norm;
      case rf::T_KN: return L.k_norm;
      default: return L.bv;
    }
  }
};

namespace {

void model_release(rf_model* m) {
  if (!m) return;
  if (--m->refs <= 0) delete m;
}

/* working buffers for one forward over n tokens */
struct Work {
  std::vector<float> x, h, q, kk, vv, att, o, g, f, stats, scratch;  // f: fused q|k|v or gate|up rows
  void ensure(const rf_config& c, int64_t n) {
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
    grow(f, n * std::max(2 * I, qd + 2 * kvd));
    grow(stats, n * c.num_heads * 2);
    grow(scratch, k::attn_scratch_size(n, c.num_heads, c.num_kv_heads, c.head_dim));
  }
};

void embed_tokens(const rf_model* m, const int32_t* tokens, int64_t n, float* x) {
  const int64_t H = m->cfg.hidden_size;
  for (int64_t t = 0; t < n; t++) {
    if (m->cfg.tie_embeddings) {
      k::packed_row(m->lm, tokens[t], x + t * H);
      continue;
    }
    const int64_t base = (int64_t)tokens[t] * H;
    for (int64_t i = 0; i < H; i++) x[t * H + i] = rf::load_as_f32(m->embed.bytes.data(), m->embed.dtype, base + i);
  }
}

/* h = rmsnorm(x); q,k,v = projections (+bias) (+ q/k norm per head) — pre-RoPE; one fused matmul, split into
 * q / kk / vv rows. Every path that computes q/k (compress, embed, prefill, decode) comes through here. */
void qkv_proj(const rf_model* m, const Layer& L, Work& w, int64_t n) {
  const rf_config& c = m->cfg;
  const int64_t H = c.hidden_size, qd = (int64_t)c.num_heads * c.head_dim, kvd = (int64_t)c.num_kv_heads * c.head_dim;
  const int64_t fd = qd + 2 * kvd;
  k::rmsnorm(w.x.data(), n, H, L.in_norm.data(), c.rms_eps, w.h.data());
  k::gemm(w.h.data(), n, L.qkv, c.qkv_bias ? L.bqkv.data() : nullptr, w.f.data());
  for (int64_t t = 0; t < n; t++) {
    const float* r = w.f.data() + t * fd;
    memcpy(w.q.data() + t * qd, r, (size_t)qd * 4);
    memcpy(w.kk.data() + t * kvd, r + qd, (size_t)kvd * 4);
    memcpy(w.vv.data() + t * kvd, r + qd + kvd, (size_t)kvd * 4);
  }
  if (c.qk_norm) {  // q and k rows are heads of head_dim values back to back: one RMSNorm row per head
    k::rmsnorm(w.q.data(), n * c.num_heads, c.head_dim, L.q_norm.data(), c.rms_eps, w.q.data());
    k::rmsnorm(w.kk.data(), n * c.num_kv_heads, c.head_dim, L.k_norm.data(), c.rms_eps, w.kk.data());
  }
}

/* x += o_proj(att); x += down(silu(gate(h)) * up(h)) with h = rmsnorm(x) */
void post_attn(const rf_model* m, const Layer& L, Work& w, int64_t n) {
  const rf_config& c = m->cfg;
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  k::gemm(w.att.data(), n, L.o, nullptr, w.o.data());
  k::add_inplace(w.x.data(), w.o.data(), n * H);
  k::rmsnorm(w.x.data(), n, H, L.post_norm.data(), c.rms_eps, w.h.data());
  k::gemm(w.h.data(), n, L.gu, nullptr, w.f.data());
  k::swiglu_rows(w.f.data(), n, I, w.g.data());
  k::gemm(w.g.data(), n, L.down, nullptr, w.o.data());
  k::add_inplace(w.x.data(), w.o.data(), n * H);
}

/* rotate all heads of n token rows (row stride nheads*hd) starting at position pos0 */
void rope_rows(const rf_model* m, float* v, int64_t n, int nheads, int64_t pos0) {
  const int hd = m->cfg.head_dim, half = hd / 2;
  std::vector<float> cs((size_t)n * hd);
  for (int64_t t = 0; t < n; t++) k::rope_cos_sin(m->inv_freq.data(), half, pos0 + t, &cs[t * hd], &cs[t * hd + half]);
  k::parallel_for(n, n * nheads * hd > 65536, [&](int64_t t0, int64_t t1, int) {
    for (int64_t t = t0; t < t1; t++)
      for (int h = 0; h < nheads; h++) k::rope_head(v + (t * nheads + h) * hd, hd, &cs[t * hd], &cs[t * hd + half]);
  });
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
  bool exit_attn;  // an o head at the exit layer: its attention runs (rf::exit_attention)
  int ncache;      // layers whose cache is kept: rf::cached_layers (the exit layer's at full depth or for an o head)
  int64_t alloc;   // entries allocated per (layer, kv head) = capacity + max_chunk
  int64_t len = 0, seen = 0;
  std::vector<std::vector<float>> K, V, S;  // per layer: [nkv][alloc][hd], [nkv][alloc][hd], [nkv][alloc]
  std::vector<float> cos_tab, sin_tab;      // [alloc][hd/2]
  Work w;
  std::vector<float> kr, va, sa, emb;  // rotated keys (k::kt_store blocks) / values / scores of len+n entries;
                                       // f32 embeddings
  // rf_compressor_submit: computed at once here; the embeddings wait in slot (head + k) % 2 for rf_compressor_collect
  std::vector<uint8_t> pend[2];
  int pend_rows[2] = {0, 0};
  int npend = 0, head = 0;
};

struct rf_seq {
  rf_model* m;
  int64_t max_tokens;
  int64_t len = 0;
  int64_t stride = 0;  // entries allocated per (layer, kv head); grows up to max_tokens (rounded up to k::kt_round)
  std::vector<std::vector<float>> K, V;  // per layer [nkv][stride][hd]; K rotated, in k::kt_store blocks
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
  const bool tova = c->p.eviction == RF_EVICT_TOVA;
  Work& w = c->w;
  w.ensure(cfg, n);
  const int64_t Tk = k::kt_round(T);
  c->kr.resize((size_t)(nkv * Tk * hd));
  c->va.resize((size_t)(nkv * T * hd));
  if (commit) c->sa.resize((size_t)(nkv * T));
  c->emb.resize((size_t)(n * edim));

  embed_tokens(m, tokens, n, w.x.data());
  for (int l = 0; l <= E; l++) {
    const Layer& Ly = m->layers[(size_t)l];
    qkv_proj(m, Ly, w, n);
    // selected heads of this layer, L2-normalised: q / k / v now (pre-RoPE), o once the attention has run
    const auto embed_heads = [&](bool attn_out) {
      for (size_t si = 0; si < c->heads.size(); si++) {
        const rf::HeadSel& hs = c->heads[si];
        if (hs.layer != l || (hs.kind == RF_HEAD_O) != attn_out) continue;
        const float* src = hs.kind == RF_HEAD_Q   ? w.q.data()
                           : hs.kind == RF_HEAD_K ? w.kk.data()
                           : hs.kind == RF_HEAD_V ? w.vv.data()
                                                  : w.att.data();
        const int64_t rs = hs.kind == RF_HEAD_K || hs.kind == RF_HEAD_V ? kvd : qd;
        for (int64_t t = 0; t < n; t++)
          k::l2_normalize(src + t * rs + (int64_t)hs.head * hd, hd, 1e-6f, &c->emb[t * edim + (int64_t)si * hd]);
      }
    };
    embed_heads(false);
    if (l >= c->ncache) break;  // the exit layer below full depth: nothing reads its cache or H2O scores
    // keys of every entry at contiguous positions 0..T-1 (cache pre-RoPE), values
    const float* Kc = c->K[(size_t)l].data();
    const float* Vc = c->V[(size_t)l].data();
    float* kr = c->kr.data();
    float* va = c->va.data();
    k::parallel_for(T, T * nkv * hd > 65536, [&](int64_t e0, int64_t e1, int) {
      for (int64_t e = e0; e < e1; e++) {
        const float* cs = &c->cos_tab[e * half];
        const float* sn = &c->sin_tab[e * half];
        for (int g = 0; g < nkv; g++) {
          const float* ksrc =
              e < L ? Kc + ((int64_t)g * c->alloc + e) * hd : w.kk.data() + (e - L) * kvd + (int64_t)g * hd;
          const float* vsrc =
              e < L ? Vc + ((int64_t)g * c->alloc + e) * hd : w.vv.data() + (e - L) * kvd + (int64_t)g * hd;
          k::kt_rope_store(kr + (int64_t)g * Tk * hd, hd, e, ksrc, cs, sn);
          memcpy(va + ((int64_t)g * T + e) * hd, vsrc, (size_t)hd * 4);
        }
      }
    });
    // rotate queries at positions L..T-1
    for (int64_t t = 0; t < n; t++)
      for (int h = 0; h < nh; h++)
        k::rope_head(w.q.data() + t * qd + (int64_t)h * hd, hd, &c->cos_tab[(L + t) * half],
                     &c->sin_tab[(L + t) * half]);
    // attention below the exit layer (and at it for an o head); the eviction pass reuses its softmax statistics (at
    // the exit layer, reached here only at full depth, only the observation window's statistics are computed). The
    // observed queries: rf::observed_queries
    const int64_t obs_start = n - rf::observed_queries(c->p, n);
    if (l < E || c->exit_attn)
      k::attn_forward(w.q.data(), n, nh, nkv, hd, nullptr, kr, Tk, va, T, L, w.att.data(), w.stats.data(),
                      w.scratch.data());
    else if (commit)
      k::attn_stats(w.q.data(), n, nh, nkv, hd, nullptr, kr, Tk, T, L, obs_start, w.stats.data(), w.scratch.data());
    embed_heads(true);
    if (commit) {
      // H2O adds this chunk's attention to the entries' scores; TOVA ranks by this chunk's alone
      float* sa = c->sa.data();
      const float* Sc = c->S[(size_t)l].data();
      for (int g = 0; g < nkv; g++)
        for (int64_t e = 0; e < T; e++) sa[(int64_t)g * T + e] = e < L && !tova ? Sc[(int64_t)g * c->alloc + e] : 0.f;
      k::attn_scores(w.q.data(), n, nh, nkv, hd, nullptr, kr, Tk, T, L, obs_start, w.stats.data(), sa, T,
                     w.scratch.data());
      if (tova) rf::tova_layer_scores(sa, nkv, T, T);
    }
    if (l < E) post_attn(m, Ly, w, n);
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
    const int64_t newlen = T > c->p.capacity ? c->p.capacity : T;
    if (T > c->p.capacity) {
      std::vector<int32_t> keep;
      for (int l = 0; l < c->ncache; l++)
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
  w.ensure(cfg, n);
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
        k::kt_store(Kd + (int64_t)g * s->stride * hd, hd, p0 + t, w.kk.data() + t * kvd + (int64_t)g * hd);
        memcpy(Vd + ((int64_t)g * s->stride + p0 + t) * hd, w.vv.data() + t * kvd + (int64_t)g * hd, (size_t)hd * 4);
      }
    k::attn_forward(w.q.data(), n, nh, nkv, hd, nullptr, Kd, s->stride, Vd, s->stride, p0, w.att.data(), w.stats.data(),
                    w.scratch.data());
    post_attn(m, Ly, w, n);
  }
  s->len = p0 + n;
  if (last) {
    const float* xl = w.x.data() + (n - 1) * H;
    k::rmsnorm(xl, 1, H, m->norm.data(), cfg.rms_eps, w.h.data());
    k::gemm(w.h.data(), 1, m->lm, nullptr, s->logits.data());
    s->has_logits = true;
  }
}

/* grow the seq KV cache (lazily, doubling, capped at max_tokens) so that `need` entries fit; keeps the first
 * s->len entries. All new buffers are allocated before anything is modified (bad_alloc leaves s intact). */
void seq_reserve(rf_seq* s, int64_t need) {
  if (need <= s->stride) return;
  const rf_config& cfg = s->m->cfg;
  const int nkv = cfg.num_kv_heads, hd = cfg.head_dim;
  const int64_t cap = k::kt_round(std::min(s->max_tokens, std::max({need, 2 * s->stride, (int64_t)256})));
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
               (size_t)(k::kt_round(s->len) * hd) * 4);
        memcpy(V2[(size_t)l].data() + (int64_t)g * cap * hd, s->V[(size_t)l].data() + (int64_t)g * s->stride * hd,
               (size_t)(s->len * hd) * 4);
      }
  s->K.swap(K2);
  s->V.swap(V2);
  s->stride = cap;
}

/* a tensor given in `dtype`: matrices are kept as they are until finalize packs them, norms and biases in f32 */
void store_tensor(rf_model* m, rf::TensorId id, const void* data, int32_t dtype) {
  int64_t r, cc;
  rf::expected_shape(m->cfg, id.kind, &r, &cc);
  const int64_t cnt = r * (cc ? cc : 1);
  const size_t slot = rf::tensor_slot(m->cfg, id);
  if (is_matrix(id.kind)) {
    Raw raw;
    raw.dtype = dtype;
    raw.bytes.resize((size_t)(cnt * rf::dtype_size(dtype)));
    memcpy(raw.bytes.data(), data, raw.bytes.size());
    m->raw[slot] = std::move(raw);
  } else {
    std::vector<float> v((size_t)cnt);
    for (int64_t i = 0; i < cnt; i++) v[(size_t)i] = rf::load_as_f32(data, dtype, i);
    m->vec(id).swap(v);
  }
  m->set[slot] = 1;
}

/* packs every matrix for the matmul (all allocations first: a bad_alloc leaves the model unpacked) */
void pack_model(rf_model* m) {
  const rf_config& c = m->cfg;
  auto src = [&](rf::TensorKind kind, int layer) {
    const Raw& r = m->raw[rf::tensor_slot(c, {kind, layer})];
    int64_t rows, cols;
    rf::expected_shape(c, kind, &rows, &cols);
    return k::WSrc{r.bytes.data(), r.dtype, rows};
  };
  const int64_t H = c.hidden_size, qd = (int64_t)c.num_heads * c.head_dim;
  std::vector<Layer> packed((size_t)c.num_layers);
  for (int l = 0; l < c.num_layers; l++) {
    Layer& P = packed[(size_t)l];
    const k::WSrc qkv[3] = {src(rf::T_Q, l), src(rf::T_K, l), src(rf::T_V, l)};
    const k::WSrc gu[2] = {src(rf::T_GATE, l), src(rf::T_UP, l)};
    const k::WSrc o = src(rf::T_O, l), down = src(rf::T_DOWN, l);
    P.qkv = k::pack_weights(qkv, 3, H);
    P.o = k::pack_weights(&o, 1, qd);
    P.gu = k::pack_weights(gu, 2, H);
    P.down = k::pack_weights(&down, 1, c.intermediate_size);
  }
  const k::WSrc lm = src(c.tie_embeddings ? rf::T_EMBED : rf::T_LM_HEAD, -1);
  k::PackedW lmp = k::pack_weights(&lm, 1, H);
  for (int l = 0; l < c.num_layers; l++) {
    Layer& L = m->layers[(size_t)l];
    Layer& P = packed[(size_t)l];
    L.qkv = std::move(P.qkv);
    L.o = std::move(P.o);
    L.gu = std::move(P.gu);
    L.down = std::move(P.down);
    if (c.qkv_bias) {
      L.bqkv = L.bq;
      L.bqkv.insert(L.bqkv.end(), L.bk.begin(), L.bk.end());
      L.bqkv.insert(L.bqkv.end(), L.bv.begin(), L.bv.end());
    }
  }
  m->lm = std::move(lmp);
  if (!c.tie_embeddings) m->embed = std::move(m->raw[rf::T_EMBED]);
  std::vector<Raw>().swap(m->raw);
}

int64_t model_bytes(const rf_model* m) {
  int64_t b = (int64_t)m->embed.bytes.size() + m->lm.bytes + (int64_t)m->norm.size() * 4;
  for (const Raw& r : m->raw) b += (int64_t)r.bytes.size();
  for (const Layer& L : m->layers)
    b += L.qkv.bytes + L.o.bytes + L.gu.bytes + L.down.bytes +
         (int64_t)(L.in_norm.size() + L.post_norm.size() + L.bq.size() + L.bk.size() + L.bv.size() + L.bqkv.size() +
                   L.q_norm.size() + L.k_norm.size()) *
             4;
  return b;
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
RF_API const char* rf_struct_layout(void) {
  return guard("rf_struct_layout", [&]() -> const char* { return rf::struct_layout(); });
}
RF_API int rf_device_count(void) { return 1; }

RF_API int rf_device_info(char* buf, int32_t buflen) {
  return guard("rf_device_info", [&]() -> int {
    if (!buf || buflen <= 0) return set_error(RF_ERR_INVALID, "rf_device_info: buffer is NULL or empty");
    std::string s = "CPU: " + cpu_model_name() + ", " + std::to_string(k::pool_threads()) + " threads, " +
                    std::to_string(std::thread::hardware_concurrency()) + " hardware threads, float32 compute (" +
                    k::cpu_isa()->name + " kernels)";
    snprintf(buf, (size_t)buflen, "%s", s.c_str());
    return RF_OK;
  });
}

RF_API int rf_set_threads(int32_t n) {
  RF_TRY(rf::check_threads(n));
  k::Pool::get().set_threads(n);
  return RF_OK;
}

/* ---- model ---- */
RF_API rf_model* rf_model_create(const rf_config* cfg) {
  return guard("rf_model_create", [&]() -> rf_model* {
    if (rf::validate_config(cfg) != RF_OK) return nullptr;
    rf_model* m = new rf_model();
    m->cfg = *cfg;
    m->layers.resize((size_t)cfg->num_layers);
    m->set.assign(rf::tensor_slot_count(*cfg), 0);
    m->raw.resize(m->set.size());
    m->inv_freq = rf::rope_inv_freq(*cfg);
    return m;
  });
}

RF_API int rf_model_set_tensor(rf_model* m, const char* name, const void* data, int32_t dtype, const int64_t* shape,
                               int32_t ndim) {
  return guard("rf_model_set_tensor", [&]() -> int {
    RF_TRY(rf::check_set_tensor(m, name, data));
    rf::TensorId id{};
    RF_TRY(rf::check_tensor(m->cfg, name, dtype, shape, ndim, &id));
    if (m->finalized)
      return set_error(RF_ERR_STATE,
                       "rf_model_set_tensor: tensor '%s': the model is finalized (its weights are packed)", name);
    store_tensor(m, id, data, dtype);
    return RF_OK;
  });
}

RF_API int rf_model_init_random(rf_model* m, uint64_t seed, float stdv) {
  return guard("rf_model_init_random", [&]() -> int {
    RF_TRY(rf::check_init_random(m, stdv));
    if (m->finalized) return set_error(RF_ERR_STATE, "rf_model_init_random: the model is finalized");
    const rf_config& c = m->cfg;
    for (size_t slot = 0; slot < m->set.size(); slot++) {
      rf::TensorId id;
      if (slot < 3) id = {(rf::TensorKind)slot, -1};
      else id = {(rf::TensorKind)(3 + (slot - 3) % (rf::T_COUNT - 3)), (int)((slot - 3) / (rf::T_COUNT - 3))};
      if (!rf::has_tensor(c, id.kind)) continue;
      int64_t r, cc;
      rf::expected_shape(c, id.kind, &r, &cc);
      const int64_t cnt = r * (cc ? cc : 1);
      std::vector<float> v((size_t)cnt);
      const bool is_norm =
          id.kind == rf::T_NORM || id.kind == rf::T_IN_NORM || id.kind == rf::T_POST_NORM || rf::is_qk_norm(id.kind);
      const bool is_bias = id.kind == rf::T_QB || id.kind == rf::T_KB || id.kind == rf::T_VB;
      if (is_norm || is_bias) {
        std::fill(v.begin(), v.end(), is_norm ? 1.f : 0.f);
      } else {
        const int64_t B = 1 << 16, nb = (cnt + B - 1) / B;
        float* dst = v.data();
        k::parallel_dynamic(nb, true, [&](int64_t b, int) {
          uint64_t st = splitmix64(seed ^ splitmix64((uint64_t)slot * 0x100000001ull + (uint64_t)b)) | 1ull;
          const int64_t e = std::min(cnt, (b + 1) * B);
          for (int64_t i = b * B; i < e; i += 2) {  // Box-Muller
            double u1 = (double)((rf::xorshift64star(&st) >> 11) + 1) * (1.0 / 9007199254740993.0);
            double u2 = rf::rng_uniform(&st);
            double rr = std::sqrt(-2.0 * std::log(u1));
            dst[i] = (float)(stdv * rr * std::cos(6.283185307179586 * u2));
            if (i + 1 < e) dst[i + 1] = (float)(stdv * rr * std::sin(6.283185307179586 * u2));
          }
        });
      }
      // matrices in the configured 16-bit type, as a checkpoint of that type would give them
      const int32_t wdt = c.weight_dtype == RF_BF16 || c.weight_dtype == RF_F16 ? c.weight_dtype : RF_F32;
      if (!is_matrix(id.kind) || wdt == RF_F32) {
        store_tensor(m, id, v.data(), RF_F32);
      } else {
        std::vector<uint16_t> h(v.size());
        for (size_t i = 0; i < v.size(); i++) h[i] = wdt == RF_BF16 ? rf::f32_to_bf16(v[i]) : rf::f32_to_f16(v[i]);
        store_tensor(m, id, h.data(), wdt);
      }
    }
    return RF_OK;
  });
}

RF_API int rf_model_finalize(rf_model* m) {
  return guard("rf_model_finalize", [&]() -> int {
    RF_TRY(rf::check_not_null(m, "model", "rf_model_finalize"));
    if (m->finalized) return RF_OK;
    RF_TRY(rf::check_complete(m->cfg, m->set));
    pack_model(m);
    m->finalized = true;
    return RF_OK;
  });
}

RF_API int64_t rf_model_memory_bytes(const rf_model* m) {
  RF_TRY(rf::check_not_null(m, "model", "rf_model_memory_bytes"));
  return model_bytes(m);
}

RF_API int rf_memory_info(const rf_model* m, int64_t* out, int32_t n) {
  return guard("rf_memory_info", [&]() -> int {
    RF_TRY(rf::check_not_null(m, "model", "rf_memory_info"));
    if (!out || n <= 0) return set_error(RF_ERR_INVALID, "rf_memory_info: output is NULL or empty");
    const rf_config& c = m->cfg;
    const int64_t v[5] = {-1, -1, model_bytes(m), 0, (int64_t)c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4};
    const int k = n < 5 ? n : 5;
    for (int i = 0; i < k; i++) out[i] = v[i];
    return k;
  });
}

RF_API void rf_model_destroy(rf_model* m) {
  if (!m || m->destroyed) return;
  m->destroyed = true;
  model_release(m);
}

/* ---- compressor ---- */
RF_API rf_compressor* rf_compressor_create(rf_model* m, const rf_compress_params* p, const int32_t* heads,
                                           int32_t n_heads) {
  return guard("rf_compressor_create", [&]() -> rf_compressor* {
    if (rf::check_model_ready(m, "rf_compressor_create") != RF_OK) return nullptr;
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
    c->exit_attn = rf::exit_attention(hs, el);
    c->ncache = rf::cached_layers(el, cfg.num_layers, c->exit_attn);
    c->alloc = (int64_t)p->capacity + p->max_chunk;
    c->K.resize((size_t)c->ncache);
    c->V.resize((size_t)c->ncache);
    c->S.resize((size_t)c->ncache);
    for (int l = 0; l < c->ncache; l++) {
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
  RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_embed_dim"));
  return (int32_t)(c->heads.size() * (size_t)c->m->cfg.head_dim);
}
RF_API int32_t rf_compressor_exit_layer(const rf_compressor* c) {
  RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_exit_layer"));
  return c->exit_layer;
}

static int compressor_call(rf_compressor* c, const int32_t* tokens, int32_t n, void* out_emb, bool commit,
                           const char* where) {
  return guard(where, [&]() -> int {
    RF_TRY(rf::check_not_null(c, "compressor", where));
    RF_TRY(rf::check_chunk(tokens, n, c->p.max_chunk, c->m->cfg.vocab_size, out_emb, !commit, where));
    if (commit) RF_TRY(rf::check_no_pending(c->npend, where));
    return compressor_run(c, tokens, n, out_emb, commit);
  });
}

RF_API int rf_compressor_submit(rf_compressor* c, const int32_t* tokens, int32_t n) {
  return guard("rf_compressor_submit", [&]() -> int {
    RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_submit"));
    RF_TRY(rf::check_submit(tokens, n, c->p.max_chunk, c->m->cfg.vocab_size, c->npend));
    const int slot = (c->head + c->npend) & 1;
    const size_t es = c->p.emb_dtype == RF_F16 ? 2 : 4;
    c->pend[slot].resize((size_t)n * c->heads.size() * (size_t)c->m->cfg.head_dim * es);  // grows to the largest chunk
    RF_TRY(compressor_run(c, tokens, n, c->pend[slot].data(), true));
    c->pend_rows[slot] = n;
    c->npend++;
    return RF_OK;
  });
}
RF_API int rf_compressor_collect(rf_compressor* c, void* out_emb) {
  return guard("rf_compressor_collect", [&]() -> int {
    RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_collect"));
    RF_TRY(rf::check_not_null(out_emb, "out_emb", "rf_compressor_collect"));
    if (c->npend == 0) return 0;
    const int slot = c->head, n = c->pend_rows[slot];
    const size_t es = c->p.emb_dtype == RF_F16 ? 2 : 4;
    memcpy(out_emb, c->pend[slot].data(), (size_t)n * c->heads.size() * (size_t)c->m->cfg.head_dim * es);
    c->head ^= 1;
    c->npend--;
    return n;
  });
}
RF_API int32_t rf_compressor_pending(const rf_compressor* c) {
  RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_pending"));
  return c->npend;
}

RF_API int rf_compressor_process(rf_compressor* c, const int32_t* tokens, int32_t n, void* out_emb) {
  return compressor_call(c, tokens, n, out_emb, true, "rf_compressor_process");
}
RF_API int rf_compressor_embed(rf_compressor* c, const int32_t* tokens, int32_t n, void* out_emb) {
  return compressor_call(c, tokens, n, out_emb, false, "rf_compressor_embed");
}
RF_API int64_t rf_compressor_cache_len(const rf_compressor* c) {
  RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_cache_len"));
  return c->len;
}
RF_API int64_t rf_compressor_seen(const rf_compressor* c) {
  RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_seen"));
  return c->seen;
}
RF_API int64_t rf_compressor_memory_bytes(const rf_compressor* c) {
  RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_memory_bytes"));
  int64_t b = 0;
  for (int l = 0; l < c->ncache; l++)
    b += (int64_t)(c->K[(size_t)l].size() + c->V[(size_t)l].size() + c->S[(size_t)l].size());
  return (b + (int64_t)(c->cos_tab.size() + c->sin_tab.size())) * 4;
}
RF_API int rf_compressor_reset(rf_compressor* c) {
  RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_reset"));
  c->len = 0;
  c->seen = 0;
  c->npend = 0;
  return RF_OK;
}

/* the state blob header of this compressor (its shape and counters) */
static rf::StateHeader state_header_of(const rf_compressor* c) {
  const rf_config& cfg = c->m->cfg;
  return rf::state_header(c->ncache, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, c->p.capacity, c->len, c->seen);
}

RF_API int64_t rf_compressor_state_size(const rf_compressor* c) {
  RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_state_size"));
  return rf::state_size(c->ncache, c->m->cfg.num_kv_heads, c->m->cfg.head_dim, c->len);
}

RF_API int rf_compressor_state_save(const rf_compressor* c, void* buf, int64_t size) {
  return guard("rf_compressor_state_save", [&]() -> int {
    RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_state_save"));
    RF_TRY(rf::check_no_pending(c->npend, "rf_compressor_state_save"));
    const int nkv = c->m->cfg.num_kv_heads, hd = c->m->cfg.head_dim;
    const rf::StateHeader h = state_header_of(c);
    RF_TRY(rf::check_state_save(buf, size, h));
    char* o = (char*)buf;
    memcpy(o, &h, sizeof h);
    o += sizeof h;
    for (int l = 0; l < c->ncache; l++)
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
    RF_TRY(rf::check_not_null(c, "compressor", "rf_compressor_state_load"));
    RF_TRY(rf::check_no_pending(c->npend, "rf_compressor_state_load"));
    const int nkv = c->m->cfg.num_kv_heads, hd = c->m->cfg.head_dim;
    rf::StateHeader h{};
    RF_TRY(rf::check_state_load(buf, size, state_header_of(c), &h));
    const char* in = (const char*)buf + sizeof h;
    for (int l = 0; l < c->ncache; l++)
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
    RF_TRY(rf::check_score_args(ctx, ctx_dtype, n_ctx, dim, q, n_q, out));
    if (n_ctx == 0) return RF_OK;
    std::vector<float> qn((size_t)n_q * dim);
    for (int j = 0; j < n_q; j++) {
      const float* src = q + (int64_t)j * dim;
      double ss = 0;
      for (int d = 0; d < dim; d++) ss += (double)src[d] * src[d];
      const float inv = (float)(1.0 / std::max(std::sqrt(ss), 1e-12));
      for (int d = 0; d < dim; d++) qn[(size_t)j * dim + d] = src[d] * inv;
    }
    std::vector<float> tmp((size_t)k::pool_threads() * dim);
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
  return guard("rf_seq_create", [&]() -> rf_seq* {
    if (rf::check_model_ready(m, "rf_seq_create") != RF_OK || rf::check_seq_create(max_tokens) != RF_OK) return nullptr;
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
    RF_TRY(rf::check_not_null(s, "seq", "rf_seq_forward"));
    RF_TRY(rf::check_seq_append(tokens, n, s->len, s->max_tokens, s->m->cfg.vocab_size, "rf_seq_forward"));
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
  return guard("rf_seq_sample", [&]() -> int32_t {
    RF_TRY(rf::check_not_null(s, "seq", "rf_seq_sample"));
    RF_TRY(rf::check_seq_sample(s->has_logits, temperature, top_p));
    return rf::sample_logits(s->logits.data(), s->m->cfg.vocab_size, temperature, top_p, top_k, rng_state);
  });
}

RF_API int32_t rf_sample_logits(const float* logits, int32_t n, float temperature, float top_p, int32_t top_k,
                                uint64_t* rng_state) {
  return rf::sample_logits_checked(logits, n, temperature, top_p, top_k, rng_state);
}

RF_API int32_t rf_seq_length(const rf_seq* s) {
  RF_TRY(rf::check_not_null(s, "seq", "rf_seq_length"));
  return (int32_t)s->len;
}

RF_API int rf_seq_reset(rf_seq* s) {
  RF_TRY(rf::check_not_null(s, "seq", "rf_seq_reset"));
  s->len = 0;
  s->has_logits = false;
  return RF_OK;
}

RF_API int rf_seq_import_compressor(rf_seq* s, const rf_compressor* c) {
  return guard("rf_seq_import_compressor", [&]() -> int {
    RF_TRY(rf::check_not_null(s, "seq", "rf_seq_import_compressor"));
    RF_TRY(rf::check_not_null(c, "compressor", "rf_seq_import_compressor"));
    const rf_config& cfg = s->m->cfg;
    RF_TRY(rf::check_import(c->m == s->m, c->exit_layer, cfg.num_layers, c->len, s->max_tokens));
    const int nkv = cfg.num_kv_heads, hd = cfg.head_dim, half = hd / 2;
    s->len = 0;
    s->has_logits = false;
    seq_reserve(s, c->len);
    for (int l = 0; l < cfg.num_layers; l++)
      for (int g = 0; g < nkv; g++)
        for (int64_t e = 0; e < c->len; e++) {
          const float* ks = c->K[(size_t)l].data() + ((int64_t)g * c->alloc + e) * hd;
          const float* vs = c->V[(size_t)l].data() + ((int64_t)g * c->alloc + e) * hd;
          k::kt_rope_store(s->K[(size_t)l].data() + (int64_t)g * s->stride * hd, hd, e, ks, &c->cos_tab[e * half],
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

RF_API int64_t rf_smooth_select(const float* scores, int64_t n, int32_t window, int32_t lag, int32_t pool,
                                int64_t budget, int32_t edge, float* smoothed, int32_t* out_idx) {
  return guard("rf_smooth_select", [&]() -> int64_t {
    return rf::smooth_select(scores, n, window, lag, pool, budget, edge, smoothed, out_idx);
  });
}

RF_API const void* rf_map_file(const char* path, int64_t* out_bytes) {
  return guard("rf_map_file", [&]() -> const void* { return rf::map_file(path, out_bytes); });
}
RF_API int rf_unmap_file(const void* p, int64_t bytes) {
  return guard("rf_unmap_file", [&]() -> int { return rf::unmap_file(p, bytes); });
}

/* the worker pool over blocks of context rows, for select.h's scorer passes (one thread for small work) */
static auto score_ranges(int32_t dim, int32_t n_q) {
  return [=](int64_t nblk, auto&& f) {
    k::parallel_for(nblk, nblk * (int64_t)dim * n_q > 65536, [&](int64_t b, int64_t e, int) { f(b, e); });
  };
}

RF_API int rf_score_kth(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q, int32_t n_q,
                        const int32_t* pairs, int32_t n_pairs, int32_t k, float* out) {
  return guard("rf_score_kth", [&]() -> int {
    RF_TRY(rf::check_score_kth(ctx, ctx_dtype, n_ctx, dim, q, n_q, k, out, "rf_score_kth"));
    RF_TRY(rf::check_pairs(pairs, n_pairs, nullptr, n_q, "rf_score_kth"));
    rf::kth_of(ctx, ctx_dtype, n_ctx, dim, q, n_q, rf::Pairs{pairs, n_pairs, nullptr}, k, out, score_ranges(dim, n_q));
    return RF_OK;
  });
}

RF_API int64_t rf_score_select(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q,
                               int32_t n_q, const float* q_offset, const int32_t* pairs, int32_t n_pairs,
                               const float* pair_offset, int32_t window, int32_t lag, int32_t pool, int64_t budget,
                               int32_t edge, float* scores, int32_t* out_idx) {
  return guard("rf_score_select", [&]() -> int64_t {
    RF_TRY(rf::check_offsets(q_offset, n_q, "rf_score_select"));
    RF_TRY(rf::check_pairs(pairs, n_pairs, pair_offset, n_q, "rf_score_select"));
    const auto pool_ranges = score_ranges(dim, n_q);
    const rf::Pairs pr{pairs, n_pairs, pair_offset};
    return rf::score_select(
        [&](float* s) { return rf::score_rows(ctx, ctx_dtype, n_ctx, dim, q, n_q, q_offset, pr, s, pool_ranges); },
        n_ctx, window, lag, pool, budget, edge, scores, out_idx);
  });
}

RF_API int64_t rf_score_kth_select(const void* ctx, int32_t ctx_dtype, int64_t n_ctx, int32_t dim, const float* q,
                                   int32_t n_q, const int32_t* pairs, int32_t n_pairs, int32_t k, int32_t window,
                                   int32_t lag, int32_t pool, int64_t budget, int32_t edge, float* kth, float* scores,
                                   int32_t* out_idx) {
  return guard("rf_score_kth_select", [&]() -> int64_t {
    return rf::kth_select(ctx, ctx_dtype, n_ctx, dim, q, n_q, pairs, n_pairs, k, window, lag, pool, budget, edge, kth,
                          scores, out_idx, [&](float* kv, float* s) {
                            return rf::score_kth_rows(ctx, ctx_dtype, n_ctx, dim, q, n_q,
                                                      rf::Pairs{pairs, n_pairs, nullptr}, k, kv, s,
                                                      score_ranges(dim, n_q));
                          });
  });
}

/* ---- resident context embeddings: host memory here (the same ABI as the CUDA build's device blocks) ---- */
struct rf_embstore {
  rf_model* m;
  int32_t dim;
  std::vector<uint16_t> rows;  // [n][dim] f16 bits
};

RF_API rf_embstore* rf_embstore_create(rf_model* m, int32_t dim) {
  return guard("rf_embstore_create", [&]() -> rf_embstore* {
    if (rf::check_model_ready(m, "rf_embstore_create") != RF_OK || rf::check_embstore_create(dim) != RF_OK)
      return nullptr;
    rf_embstore* e = new rf_embstore{m, dim, {}};
    m->refs++;
    return e;
  });
}
RF_API int rf_embstore_append(rf_embstore* e, const uint16_t* rows, int64_t n) {
  return guard("rf_embstore_append", [&]() -> int {
    RF_TRY(rf::check_not_null(e, "store", "rf_embstore_append"));
    RF_TRY(rf::check_embstore_append(rows, n));
    e->rows.insert(e->rows.end(), rows, rows + n * e->dim);
    return RF_OK;
  });
}
RF_API int64_t rf_embstore_rows(const rf_embstore* e) {
  RF_TRY(rf::check_not_null(e, "store", "rf_embstore_rows"));
  return (int64_t)(e->rows.size() / (size_t)e->dim);
}
RF_API int64_t rf_embstore_memory_bytes(const rf_embstore* e) {
  RF_TRY(rf::check_not_null(e, "store", "rf_embstore_memory_bytes"));
  return (int64_t)(e->rows.capacity() * 2);
}
RF_API int64_t rf_embstore_score_select(rf_embstore* e, int64_t n_ctx, const float* q, int32_t n_q,
                                        const float* q_offset, const int32_t* pairs, int32_t n_pairs,
                                        const float* pair_offset, int32_t window, int32_t lag, int32_t pool,
                                        int64_t budget, int32_t edge, float* scores, int32_t* out_idx) {
  return guard("rf_embstore_score_select", [&]() -> int64_t {
    RF_TRY(rf::check_not_null(e, "store", "rf_embstore_score_select"));
    RF_TRY(rf::check_embstore_score(n_ctx, (int64_t)(e->rows.size() / (size_t)e->dim), q, n_q, budget, out_idx));
    return rf_score_select(e->rows.data(), RF_F16, n_ctx, e->dim, q, n_q, q_offset, pairs, n_pairs, pair_offset, window,
                           lag, pool, budget, edge, scores, out_idx);
  });
}
RF_API int rf_embstore_score_kth(rf_embstore* e, int64_t n_ctx, const float* q, int32_t n_q, const int32_t* pairs,
                                 int32_t n_pairs, int32_t k, float* out) {
  return guard("rf_embstore_score_kth", [&]() -> int {
    RF_TRY(rf::check_not_null(e, "store", "rf_embstore_score_kth"));
    RF_TRY(rf::check_embstore_kth(n_ctx, (int64_t)(e->rows.size() / (size_t)e->dim), "rf_embstore_score_kth"));
    return rf_score_kth(e->rows.data(), RF_F16, n_ctx, e->dim, q, n_q, pairs, n_pairs, k, out);
  });
}
RF_API void rf_embstore_destroy(rf_embstore* e) {
  if (!e) return;
  rf_model* m = e->m;
  delete e;
  model_release(m);
}

}  // extern "C"
