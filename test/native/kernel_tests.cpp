// kernel_tests.cpp — checks every rf::cpu kernel (cuda/cpu_kernels.h) and the shared host helpers
// (cuda/reform_common.h) against plain naive double-precision references.
// Build: g++ -O2 -fopenmp-simd -pthread -std=c++17 -Icuda test/native/kernel_tests.cpp -o build/kernel_tests
// Prints one line per check; exits 1 when any check fails.
#include "reform_common.h"
#include "cpu_kernels.h"

#include <cstdio>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <atomic>
#include <string>

namespace {

int g_fail = 0, g_pass = 0;

void check(const char* name, bool ok, const char* fmt = "", double v = 0) {
  if (ok) g_pass++;
  else g_fail++;
  printf("[%s] %s", ok ? "PASS" : "FAIL", name);
  if (*fmt) {
    printf(" (");
    printf(fmt, v);
    printf(")");
  }
  printf("\n");
}

std::mt19937_64 rng(1234);
std::vector<float> randn(size_t n, float std = 1.f) {
  std::normal_distribution<float> d(0.f, std);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}
double max_rel(const std::vector<float>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); i++) {
    num = std::max(num, std::fabs((double)a[i] - b[i]));
    den = std::max(den, std::fabs(b[i]));
  }
  return num / std::max(den, 1e-30);
}

// Every instruction set this CPU runs (forced with cpu_isa_named, as REFORM_CPU_ISA does) x every weight type,
// on odd sizes that leave tails in m (register tile rows), n (panel width) and k (k blocks).
void test_matmul() {
  using namespace rf::cpu;
  std::vector<const CpuIsa*> sets;
  for (const char* nm : {"portable", "avx2", "avx512"})
    if (const CpuIsa* s = cpu_isa_named(nm)) sets.push_back(s);
  check("the default instruction set is the best one the CPU runs",
        cpu_isa() == sets.back() || getenv("REFORM_CPU_ISA"));
  printf("[INFO] instruction sets run here:");
  for (auto* s : sets) printf(" %s", s->name);
  printf("; default %s\n", cpu_isa()->name);
  struct Case {
    int m, k, n;
    bool bias;
  };
  const std::vector<Case> cases = {{1, 64, 37, false},    {7, 33, 100, true},  {70, 128, 19, true},
                                   {1, 4096, 300, false}, {13, 600, 65, true}, {25, 1030, 97, false}};
  std::map<std::string, std::vector<float>> by_set;  // "case/dtype/set" -> y
  for (size_t ci = 0; ci < cases.size(); ci++) {
    const Case cs = cases[ci];
    auto x = randn((size_t)cs.m * cs.k), Wf = randn((size_t)cs.n * cs.k), b = randn(cs.n);
    for (int dt : {RF_F32, RF_BF16, RF_F16}) {
      // the weights as stored (16-bit types rounded), and their exact f32 values for the reference
      std::vector<uint16_t> w16((size_t)cs.n * cs.k);
      std::vector<float> wv(Wf);
      if (dt != RF_F32)
        for (size_t i = 0; i < wv.size(); i++) {
          w16[i] = dt == RF_BF16 ? rf::f32_to_bf16(Wf[i]) : rf::f32_to_f16(Wf[i]);
          wv[i] = rf::load_as_f32(w16.data(), dt, (int64_t)i);
        }
      const void* wdata = dt == RF_F32 ? (const void*)Wf.data() : (const void*)w16.data();
      std::vector<double> r((size_t)cs.m * cs.n);
      for (int t = 0; t < cs.m; t++)
        for (int o = 0; o < cs.n; o++) {
          double s = cs.bias ? b[o] : 0;
          for (int i = 0; i < cs.k; i++) s += (double)x[(size_t)t * cs.k + i] * wv[(size_t)o * cs.k + i];
          r[(size_t)t * cs.n + o] = s;
        }
      for (const CpuIsa* set : sets) {
        WSrc src{wdata, dt, cs.n};
        PackedW pw = pack_weights(&src, 1, cs.k, set);
        std::vector<float> y((size_t)cs.m * cs.n);
        gemm(x.data(), cs.m, pw, cs.bias ? b.data() : nullptr, y.data());
        double e = max_rel(y, r);
        char name[160];
        snprintf(name, sizeof name, "matmul %s %s m=%d k=%d n=%d bias=%d", set->name,
                 dt == RF_F32    ? "f32"
                 : dt == RF_BF16 ? "bf16"
                                 : "f16",
                 cs.m, cs.k, cs.n, (int)cs.bias);
        check(name, e < 1e-5, "rel err %.3g", e);
        // row by row (the decode path) == all rows at once (the prefill path), bitwise
        bool same = true;
        for (int t = 0; t < cs.m && same; t++) {
          std::vector<float> y1(cs.n);
          gemm(x.data() + (size_t)t * cs.k, 1, pw, cs.bias ? b.data() : nullptr, y1.data());
          for (int o = 0; o < cs.n; o++) same = same && y1[o] == y[(size_t)t * cs.n + o];
        }
        snprintf(name, sizeof name, "matmul %s m=%d k=%d: per-row == batched (bitwise)", set->name, cs.m, cs.k);
        check(name, same);
        by_set[std::to_string(ci) + "/" + std::to_string(dt) + "/" + set->name] = y;
      }
      // AVX2 and AVX-512 run the same FMA chains: identical bits
      auto a2 = by_set.find(std::to_string(ci) + "/" + std::to_string(dt) + "/avx2");
      auto a5 = by_set.find(std::to_string(ci) + "/" + std::to_string(dt) + "/avx512");
      if (a2 != by_set.end() && a5 != by_set.end()) {
        char name[128];
        snprintf(name, sizeof name, "matmul avx2 == avx512 (bitwise) case %zu dtype %d", ci, dt);
        check(name, a2->second == a5->second);
      }
    }
  }
  // fused packing (q/k/v style): one packed matrix of several sources == each alone; mixed types -> f32 panels
  for (const CpuIsa* set : sets) {
    const int k = 96, m = 9, na = 40, nb = 24;
    auto x = randn((size_t)m * k), A = randn((size_t)na * k), B = randn((size_t)nb * k);
    std::vector<uint16_t> B16(B.size());
    for (size_t i = 0; i < B.size(); i++) B16[i] = rf::f32_to_bf16(B[i]);
    WSrc both[2] = {{A.data(), RF_F32, na}, {B16.data(), RF_BF16, nb}};
    PackedW pf = pack_weights(both, 2, k, set), pa = pack_weights(&both[0], 1, k, set),
            pb = pack_weights(&both[1], 1, k, set);
    std::vector<float> yf((size_t)m * (na + nb)), ya((size_t)m * na), yb((size_t)m * nb);
    gemm(x.data(), m, pf, nullptr, yf.data());
    gemm(x.data(), m, pa, nullptr, ya.data());
    gemm(x.data(), m, pb, nullptr, yb.data());
    bool ok = pf.dtype == RF_F32 && pb.dtype == RF_BF16;
    for (int t = 0; t < m; t++) {
      for (int o = 0; o < na; o++) ok = ok && yf[(size_t)t * (na + nb) + o] == ya[(size_t)t * na + o];
      for (int o = 0; o < nb; o++) ok = ok && yf[(size_t)t * (na + nb) + na + o] == yb[(size_t)t * nb + o];
    }
    char name[128];
    snprintf(name, sizeof name, "matmul %s fused [f32 | bf16] == separate (bitwise), mixed -> f32 panels", set->name);
    check(name, ok);
    // strided output (ldy > n) and the embedding lookup from packed panels
    std::vector<float> ys((size_t)m * 70, -7.f);
    gemm(x.data(), m, pa, nullptr, ys.data(), 70);
    bool sok = true;
    for (int t = 0; t < m; t++)
      for (int o = 0; o < 70; o++) sok = sok && ys[(size_t)t * 70 + o] == (o < na ? ya[(size_t)t * na + o] : -7.f);
    std::vector<float> row(k);
    packed_row(pf, na + 5, row.data());
    for (int i = 0; i < k; i++) sok = sok && row[i] == rf::bf16_to_f32(B16[(size_t)5 * k + i]);
    snprintf(name, sizeof name, "matmul %s strided output leaves other columns; packed_row", set->name);
    check(name, sok);
  }
}

void test_rmsnorm() {
  const int n = 5, d = 48;
  const float eps = 1e-5f;
  auto x = randn(n * d, 3.f), w = randn(d);
  std::vector<float> y(n * d);
  rf::cpu::rmsnorm(x.data(), n, d, w.data(), eps, y.data());
  std::vector<double> r(n * d);
  for (int t = 0; t < n; t++) {
    double ss = 0;
    for (int i = 0; i < d; i++) ss += (double)x[t * d + i] * x[t * d + i];
    double inv = 1.0 / std::sqrt(ss / d + eps);
    for (int i = 0; i < d; i++) r[t * d + i] = x[t * d + i] * inv * w[i];
  }
  double e = max_rel(y, r);
  check("rmsnorm", e < 1e-6, "rel err %.3g", e);
  rf::cpu::rmsnorm(x.data(), n, d, w.data(), eps, x.data());  // in place
  check("rmsnorm in place", max_rel(x, r) < 1e-6);
}

// naive HF inv_freq (default / linear / llama3) in double
std::vector<double> naive_inv_freq(const rf_config& c) {
  std::vector<double> v(c.head_dim / 2);
  for (int i = 0; i < c.head_dim / 2; i++) {
    double base = std::pow((double)c.rope_theta, -(2.0 * i) / c.head_dim);
    if (c.rope_type == RF_ROPE_LINEAR) base /= c.rope_factor;
    if (c.rope_type == RF_ROPE_LLAMA3) {
      double wl = 2 * M_PI / base;
      double lo_wl = c.rope_original_max_pos / c.rope_low_freq_factor;
      double hi_wl = c.rope_original_max_pos / c.rope_high_freq_factor;
      if (wl < hi_wl) {
        // high frequency: unchanged
      } else if (wl > lo_wl) {
        base /= c.rope_factor;
      } else {
        double sm = (c.rope_original_max_pos / wl - c.rope_low_freq_factor) /
                    (c.rope_high_freq_factor - c.rope_low_freq_factor);
        base = (1 - sm) * base / c.rope_factor + sm * base;
      }
    }
    v[i] = base;
  }
  return v;
}

void test_rope() {
  rf_config c{};
  c.head_dim = 64;
  c.rope_theta = 500000.f;
  c.rope_factor = 8.f;
  c.rope_low_freq_factor = 1.f;
  c.rope_high_freq_factor = 4.f;
  c.rope_original_max_pos = 8192;
  const char* names[] = {"default", "llama3", "linear"};
  for (int type : {RF_ROPE_DEFAULT, RF_ROPE_LLAMA3, RF_ROPE_LINEAR}) {
    c.rope_type = type;
    if (type == RF_ROPE_LINEAR) c.rope_factor = 4.f;
    auto inv = rf::rope_inv_freq(c);
    auto ref = naive_inv_freq(c);
    double e = 0;
    for (size_t i = 0; i < inv.size(); i++) e = std::max(e, std::fabs(inv[i] - ref[i]) / ref[i]);
    char name[128];
    snprintf(name, sizeof name, "rope inv_freq %s", names[type]);
    check(name, e < 1e-6, "rel err %.3g", e);
    if (type == RF_ROPE_LLAMA3) {  // all three bands must occur with these settings
      int lo = 0, mid = 0, hi = 0;
      for (int i = 0; i < c.head_dim / 2; i++) {
        double base = std::pow((double)c.rope_theta, -(2.0 * i) / c.head_dim), wl = 2 * M_PI / base;
        if (wl < c.rope_original_max_pos / c.rope_high_freq_factor) hi++;
        else if (wl > c.rope_original_max_pos / c.rope_low_freq_factor) lo++;
        else mid++;
      }
      check("rope llama3: low/medium/high bands all exercised", lo > 0 && mid > 0 && hi > 0);
    }
    // rotate_half application at a few positions
    const int hd = c.head_dim, half = hd / 2;
    bool ok = true;
    double worst = 0;
    for (int64_t pos : {0LL, 1LL, 17LL, 1000LL, 100000LL}) {
      auto v = randn(hd);
      std::vector<float> cs(half), sn(half), o(hd);
      rf::cpu::rope_cos_sin(inv.data(), half, pos, cs.data(), sn.data());
      rf::cpu::rope_head_to(v.data(), o.data(), hd, cs.data(), sn.data());
      std::vector<float> ip = v;
      rf::cpu::rope_head(ip.data(), hd, cs.data(), sn.data());
      std::vector<double> r(hd);
      for (int i = 0; i < half; i++) {
        double a = (double)pos * (double)inv[i];
        r[i] = v[i] * std::cos(a) - v[i + half] * std::sin(a);
        r[i + half] = v[i + half] * std::cos(a) + v[i] * std::sin(a);
      }
      worst = std::max(worst, max_rel(o, r));
      ok = ok && ip == o;
    }
    snprintf(name, sizeof name, "rope rotate_half %s", names[type]);
    check(name, worst < 1e-6, "rel err %.3g", worst);
    snprintf(name, sizeof name, "rope in place == out of place %s", names[type]);
    check(name, ok);
  }
}

// naive causal GQA attention: returns outputs and, for queries >= obs_start, accumulated probs per kv head
void naive_attention(const std::vector<float>& q, int n, int nh, int nkv, int hd, const std::vector<float>& K,
                     const std::vector<float>& V, int ld, int past, int obs_start, std::vector<double>& out,
                     std::vector<double>& score) {
  int grp = nh / nkv;
  out.assign((size_t)n * nh * hd, 0);
  score.assign((size_t)nkv * ld, 0);
  for (int j = 0; j < n; j++)
    for (int h = 0; h < nh; h++) {
      int g = h / grp, m = past + j + 1;
      std::vector<double> s(m);
      double mx = -1e300;
      for (int e = 0; e < m; e++) {
        double d = 0;
        for (int i = 0; i < hd; i++) d += (double)q[((size_t)j * nh + h) * hd + i] * K[((size_t)g * ld + e) * hd + i];
        s[e] = d / std::sqrt((double)hd);
        mx = std::max(mx, s[e]);
      }
      double sum = 0;
      for (auto& x : s) sum += (x = std::exp(x - mx));
      for (int e = 0; e < m; e++) {
        double p = s[e] / sum;
        for (int i = 0; i < hd; i++) out[((size_t)j * nh + h) * hd + i] += p * V[((size_t)g * ld + e) * hd + i];
        if (j >= obs_start) score[(size_t)g * ld + e] += p;
      }
    }
}

void test_attention() {
  struct Case {
    int n, nh, nkv, hd, past, obs;
  };
  // tiny heads (head_dim below the tile width), the model's shape (12 heads / 4 kv, head_dim 64) with key
  // blocks and query blocks that end in tails, head_dim 128, a 16-head group, decode (n = 1) on a long past
  for (Case cs : std::vector<Case>{{1, 4, 2, 8, 0, 4},
                                   {6, 4, 2, 8, 10, 4},
                                   {9, 8, 2, 16, 30, 3},
                                   {5, 4, 4, 8, 0, 8},
                                   {3, 6, 1, 8, 50, 1},
                                   {37, 12, 4, 64, 70, 20},
                                   {13, 4, 2, 128, 33, 13},
                                   {11, 16, 1, 64, 5, 11},
                                   {1, 12, 4, 64, 300, 1}}) {
    const int ld = cs.past + cs.n + 3;  // stride larger than used
    auto q = randn((size_t)cs.n * cs.nh * cs.hd, 1.5f);
    auto K = randn((size_t)cs.nkv * ld * cs.hd, 1.5f), V = randn((size_t)cs.nkv * ld * cs.hd);
    std::vector<float> out((size_t)cs.n * cs.nh * cs.hd), stats((size_t)cs.n * cs.nh * 2);
    std::vector<float> scratch(rf::cpu::attn_scratch_size(cs.n, cs.nh, cs.nkv, cs.hd));
    rf::cpu::attn_forward(q.data(), cs.n, cs.nh, cs.nkv, cs.hd, K.data(), nullptr, 0, V.data(), ld, cs.past, out.data(),
                          stats.data(), scratch.data());
    const int obs_start = cs.n - std::min(cs.obs, cs.n);
    std::vector<float> score((size_t)cs.nkv * ld, 0.f);
    for (int g = 0; g < cs.nkv; g++) score[(size_t)g * ld] = 0.25f;  // accumulation onto existing scores
    rf::cpu::attn_scores(q.data(), cs.n, cs.nh, cs.nkv, cs.hd, K.data(), nullptr, 0, ld, cs.past, obs_start,
                         stats.data(), score.data(), ld, scratch.data());
    std::vector<double> ro, rs;
    naive_attention(q, cs.n, cs.nh, cs.nkv, cs.hd, K, V, ld, cs.past, obs_start, ro, rs);
    for (int g = 0; g < cs.nkv; g++) rs[(size_t)g * ld] += 0.25;
    char name[160];
    double e = max_rel(out, ro);
    snprintf(name, sizeof name, "attention GQA n=%d nh=%d nkv=%d hd=%d past=%d (%s)", cs.n, cs.nh, cs.nkv, cs.hd,
             cs.past, rf::cpu::cpu_isa()->name);
    check(name, e < 1e-5, "rel err %.3g", e);
    double es = 0;
    for (size_t i = 0; i < rs.size(); i++) es = std::max(es, std::fabs(score[i] - rs[i]));
    snprintf(name, sizeof name, "H2O score accumulation n=%d obs=%d nkv=%d", cs.n, cs.obs, cs.nkv);
    check(name, es < 1e-5, "abs err %.3g", es);
    // total mass: each (query, head) in the window contributes exactly 1
    double tot = 0;
    for (float s : score) tot += s;
    double want = 0.25 * cs.nkv + (double)(cs.n - obs_start) * cs.nh;
    snprintf(name, sizeof name, "H2O score mass n=%d", cs.n);
    check(name, std::fabs(tot - want) < 1e-3 * std::max(1.0, want / 100), "diff %.3g", tot - want);
    // the exit layer's statistics-only pass over the window == the forward's statistics of those rows (bitwise),
    // and so are the scores built on them
    std::vector<float> st2((size_t)cs.n * cs.nh * 2, -7.f), score2((size_t)cs.nkv * ld, 0.f);
    for (int g = 0; g < cs.nkv; g++) score2[(size_t)g * ld] = 0.25f;
    rf::cpu::attn_stats(q.data(), cs.n, cs.nh, cs.nkv, cs.hd, K.data(), nullptr, 0, ld, cs.past, obs_start, st2.data(),
                        scratch.data());
    rf::cpu::attn_scores(q.data(), cs.n, cs.nh, cs.nkv, cs.hd, K.data(), nullptr, 0, ld, cs.past, obs_start, st2.data(),
                         score2.data(), ld, scratch.data());
    bool same = score2 == score;
    for (size_t i = (size_t)obs_start * cs.nh * 2; i < st2.size(); i++) same = same && st2[i] == stats[i];
    for (size_t i = 0; i < (size_t)obs_start * cs.nh * 2; i++) same = same && st2[i] == -7.f;
    snprintf(name, sizeof name, "attention stats-only window pass == forward's stats, same scores (bitwise) n=%d",
             cs.n);
    check(name, same);
    // keys given in the caches' blocked layout (kt_store) == row-major keys packed per block, bitwise
    {
      const int64_t kld = rf::cpu::kt_round(ld);
      std::vector<float> KT((size_t)(cs.nkv * kld * cs.hd), 0.f), o3(out.size()), s3(stats.size()),
          sc3(score.size(), 0.f);
      for (int g = 0; g < cs.nkv; g++) {
        sc3[(size_t)g * ld] = 0.25f;
        for (int e = 0; e < ld; e++)
          rf::cpu::kt_store(KT.data() + (size_t)g * kld * cs.hd, cs.hd, e, K.data() + ((size_t)g * ld + e) * cs.hd);
      }
      rf::cpu::attn_forward(q.data(), cs.n, cs.nh, cs.nkv, cs.hd, nullptr, KT.data(), kld, V.data(), ld, cs.past,
                            o3.data(), s3.data(), scratch.data());
      rf::cpu::attn_scores(q.data(), cs.n, cs.nh, cs.nkv, cs.hd, nullptr, KT.data(), kld, ld, cs.past, obs_start,
                           s3.data(), sc3.data(), ld, scratch.data());
      bool kt_ok = o3 == out && s3 == stats && sc3 == score;
      for (int e = 0; e < ld && kt_ok; e++)
        for (int d = 0; d < cs.hd; d++)
          kt_ok = kt_ok && KT[(size_t)rf::cpu::kt_offset(e, d, cs.hd)] == K[(size_t)e * cs.hd + d];
      snprintf(name, sizeof name, "attention from blocked keys (kt_store) == from row-major keys (bitwise) n=%d", cs.n);
      check(name, kt_ok);
    }
    // queries in two calls (prefill in pieces, the second sees the first as past) == one call, bitwise
    if (cs.n > 1) {
      const int n1 = cs.n / 2 + 1;
      std::vector<float> o2((size_t)cs.n * cs.nh * cs.hd), s2((size_t)cs.n * cs.nh * 2);
      const size_t row = (size_t)cs.nh * cs.hd;
      rf::cpu::attn_forward(q.data(), n1, cs.nh, cs.nkv, cs.hd, K.data(), nullptr, 0, V.data(), ld, cs.past, o2.data(),
                            s2.data(), scratch.data());
      rf::cpu::attn_forward(q.data() + n1 * row, cs.n - n1, cs.nh, cs.nkv, cs.hd, K.data(), nullptr, 0, V.data(), ld,
                            cs.past + n1, o2.data() + n1 * row, s2.data() + (size_t)n1 * cs.nh * 2, scratch.data());
      snprintf(name, sizeof name, "attention in pieces == at once (bitwise) n=%d", cs.n);
      check(name, o2 == out && s2 == stats);
    }
  }
  // the vectorised exp of the softmax, over its whole range, against the double exp
  {
    double worst = 0;
    std::vector<float> xs;
    for (float x = -90.f; x <= 0.f; x += 0.0137f) xs.push_back(x);
    // through attention: one query whose scores against one-hot keys are exactly xs (scale 1/sqrt(hd) undone)
    const int hd = 4, m = (int)xs.size();
    std::vector<float> q1 = {2.f, 0.f, 0.f, 0.f}, K1((size_t)m * hd, 0.f), V1((size_t)m * hd, 0.f);
    for (int e = 0; e < m; e++) K1[(size_t)e * hd] = xs[(size_t)e];  // q.k * (1/2) = xs[e]
    std::vector<float> st(2), sc((size_t)m, 0.f), scr(rf::cpu::attn_scratch_size(1, 1, 1, hd)), o1(hd);
    rf::cpu::attn_forward(q1.data(), 1, 1, 1, hd, K1.data(), nullptr, 0, V1.data(), m, m - 1, o1.data(), st.data(),
                          scr.data());
    rf::cpu::attn_scores(q1.data(), 1, 1, 1, hd, K1.data(), nullptr, 0, m, m - 1, 0, st.data(), sc.data(), m,
                         scr.data());
    // normalised by the engine's own f32 sum (its rounding over thousands of terms is not the exp's error)
    double mx = -1e300;
    for (int e = 0; e < m; e++) mx = std::max(mx, (double)xs[(size_t)e]);
    for (int e = 0; e < m; e++) {
      const double want = std::exp((double)xs[(size_t)e] - mx) / (double)st[1];
      // beyond the exp's own error: x - max is rounded to f32 first (|x - max| * 2^-24 relative), as before
      const double input = std::fabs((double)xs[(size_t)e] - mx) * 0x1p-24;
      if (want > 1e-30) worst = std::max(worst, std::fabs(sc[(size_t)e] - want) / want - input);
    }
    check("softmax exp (vectorised) vs double over [-90, 0]: relative error beyond input rounding", worst < 5e-7,
          "%.3g", worst);
  }
}

void test_swiglu_l2() {
  const int n = 7, I = 143;  // rows of the fused gate|up projection
  auto gu = randn((size_t)n * 2 * I, 3.f);
  std::vector<float> gg((size_t)n * I);
  rf::cpu::swiglu_rows(gu.data(), n, I, gg.data());
  std::vector<double> r((size_t)n * I);
  for (int t = 0; t < n; t++)
    for (int i = 0; i < I; i++) {
      const double g = gu[(size_t)t * 2 * I + i], u = gu[(size_t)t * 2 * I + I + i];
      r[(size_t)t * I + i] = g / (1 + std::exp(-g)) * u;
    }
  double e = max_rel(gg, r);
  check("swiglu silu(gate)*up over fused gate|up rows", e < 1e-6, "rel err %.3g", e);

  auto v = randn(24, 5.f);
  std::vector<float> o(24);
  rf::cpu::l2_normalize(v.data(), 24, 1e-6f, o.data());
  double ss = 0;
  for (float x : v) ss += (double)x * x;
  std::vector<double> rr(24);
  for (int i = 0; i < 24; i++) rr[i] = v[i] / std::sqrt(ss);
  check("l2 normalize", max_rel(o, rr) < 1e-6);
  std::vector<float> z(8, 0.f), zo(8, 1.f);
  rf::cpu::l2_normalize(z.data(), 8, 1e-6f, zo.data());
  bool zero_ok = true;
  for (float x : zo) zero_ok = zero_ok && x == 0.f;
  check("l2 normalize of a zero vector is zero (eps)", zero_ok);
  std::vector<float> tiny(4, 1e-9f), to(4);
  rf::cpu::l2_normalize(tiny.data(), 4, 1e-6f, to.data());
  check("l2 normalize uses max(norm, eps)", std::fabs(to[0] - 1e-9f / 1e-6f) < 1e-9);
}

void test_score() {
  const int n = 200, dim = 16, nq = 3;
  auto ctx = randn((size_t)n * dim), q = randn((size_t)nq * dim);
  std::fill(ctx.begin(), ctx.begin() + dim, 0.f);
  std::vector<float> qn((size_t)nq * dim);
  for (int j = 0; j < nq; j++) {
    double ss = 0;
    for (int d = 0; d < dim; d++) ss += (double)q[j * dim + d] * q[j * dim + d];
    for (int d = 0; d < dim; d++) qn[j * dim + d] = (float)(q[j * dim + d] / std::sqrt(ss));
  }
  std::vector<float> out(n), tmp((size_t)rf::cpu::pool_threads() * dim);
  rf::cpu::cosine_max([&](int64_t i, float* row) { memcpy(row, &ctx[(size_t)i * dim], dim * 4); }, n, dim, qn.data(),
                      nq, out.data(), tmp.data());
  double e = 0;
  for (int i = 0; i < n; i++) {
    double na = 0, best = -1e300;
    for (int d = 0; d < dim; d++) na += (double)ctx[i * dim + d] * ctx[i * dim + d];
    na = std::max(std::sqrt(na), 1e-12);
    for (int j = 0; j < nq; j++) {
      double dot = 0, nb = 0;
      for (int d = 0; d < dim; d++) {
        dot += (double)ctx[i * dim + d] * q[j * dim + d];
        nb += (double)q[j * dim + d] * q[j * dim + d];
      }
      best = std::max(best, dot / (na * std::sqrt(nb)));
    }
    e = std::max(e, std::fabs(out[i] - best));
  }
  check("cosine max scoring", e < 1e-6, "abs err %.3g", e);
  check("cosine of a zero context row is 0", out[0] == 0.f);
}

void test_h2o_select() {
  // brute-force reference on random scores (with ties)
  std::uniform_int_distribution<int> d(0, 5);
  bool ok = true;
  for (int trial = 0; trial < 200 && ok; trial++) {
    int len = 5 + trial % 40, cap = 4 + trial % 13, sink = trial % 3, recent = trial % 4;
    if (cap <= sink + recent) cap = sink + recent + 1;
    std::vector<float> s(len);
    for (auto& x : s) x = (float)d(rng);
    std::vector<int32_t> keep;
    rf::h2o_select(s.data(), len, cap, sink, recent, &keep);
    std::vector<int32_t> ref;
    if (len <= cap) {
      for (int i = 0; i < len; i++) ref.push_back(i);
    } else {
      std::vector<int> mid;
      for (int i = sink; i < len - recent; i++) mid.push_back(i);
      std::stable_sort(mid.begin(), mid.end(), [&](int a, int b) { return s[a] > s[b]; });
      std::set<int> k(mid.begin(), mid.begin() + (cap - sink - recent));
      for (int i = 0; i < len; i++)
        if (i < sink || i >= len - recent || k.count(i)) ref.push_back(i);
    }
    ok = keep == ref;
  }
  check("h2o_select == brute force (sinks, recent, top scores, ties -> earlier)", ok);
}

void test_dtype() {
  // bf16: every finite bf16 value round-trips; rounding is to nearest even
  bool ok = true;
  for (uint32_t h = 0; h < 65536; h++) {
    float f = rf::bf16_to_f32((uint16_t)h);
    if (std::isnan(f)) {
      ok = ok && std::isnan(rf::bf16_to_f32(rf::f32_to_bf16(f)));
      continue;
    }
    ok = ok && rf::f32_to_bf16(f) == h;
  }
  check("bf16 round trip (all 65536 values)", ok);
  float half_way = rf::bf16_to_f32(0x3f80) + std::ldexp(1.f, -8);  // 1 + half ulp -> ties to even (1.0)
  check("bf16 ties to even",
        rf::f32_to_bf16(half_way) == 0x3f80 && rf::f32_to_bf16(std::nextafter(half_way, 2.f)) == 0x3f81);
  // f16: every value round-trips; conversion agrees with a naive double-based rounding for random floats
  ok = true;
  for (uint32_t h = 0; h < 65536; h++) {
    float f = rf::f16_to_f32((uint16_t)h);
    if (std::isnan(f)) {
      ok = ok && std::isnan(rf::f16_to_f32(rf::f32_to_f16(f)));
      continue;
    }
    ok = ok && rf::f32_to_f16(f) == h;
  }
  check("f16 round trip (all 65536 values incl. subnormals, inf)", ok);
  // nearest: for random floats, the chosen f16 is the closest representable (ties to even)
  std::vector<std::pair<double, uint16_t>> table;
  for (uint32_t h = 0; h < 0x7c01; h++) table.push_back({rf::f16_to_f32((uint16_t)h), (uint16_t)h});
  std::uniform_real_distribution<double> ud(-20, 17);
  ok = true;
  int bad = 0;
  for (int i = 0; i < 20000; i++) {
    float f = (float)(std::ldexp(1.0, (int)ud(rng)) * (1 + (double)(rng() % 1000000) / 1e6));
    if (f > 65504.f) continue;
    uint16_t got = rf::f32_to_f16(f);
    auto it = std::lower_bound(table.begin(), table.end(), std::make_pair((double)f, (uint16_t)0));
    uint16_t lo = (it == table.begin()) ? it->second : (it - 1)->second;
    uint16_t hi = it->second;
    double dl = std::fabs(f - rf::f16_to_f32(lo)), dh = std::fabs(rf::f16_to_f32(hi) - f);
    uint16_t want = dl < dh ? lo : dh < dl ? hi : ((lo & 1) ? hi : lo);
    if (it != table.end() && it->first == f) want = it->second;
    if (got != want) bad++;
  }
  check("f16 rounding to nearest even", bad == 0, "mismatches %.0f", bad);
  check("f16 overflow -> inf", rf::f32_to_f16(70000.f) == 0x7c00 && rf::f32_to_f16(-1e10f) == 0xfc00);
  // load_as_f32
  uint16_t hb = rf::f32_to_bf16(1.5f), hh = rf::f32_to_f16(-2.25f);
  float ff = 3.5f;
  check("load_as_f32 f32/f16/bf16", rf::load_as_f32(&ff, RF_F32, 0) == 3.5f &&
                                        rf::load_as_f32(&hh, RF_F16, 0) == -2.25f &&
                                        rf::load_as_f32(&hb, RF_BF16, 0) == 1.5f);
}

void test_sampling() {
  const int V = 50;
  auto lg = randn(V, 2.f);
  int am = 0;
  for (int i = 1; i < V; i++)
    if (lg[i] > lg[am]) am = i;
  uint64_t st = 5;
  check("sample temperature 0 = argmax", rf::sample_logits(lg.data(), V, 0.f, 1.f, 0, &st) == am && st == 5);
  bool ok = true;
  for (int i = 0; i < 50; i++) ok = ok && rf::sample_logits(lg.data(), V, 1.f, 1.f, 1, &st) == am;
  check("sample top_k 1 = argmax", ok);
  ok = true;
  for (int i = 0; i < 50; i++) ok = ok && rf::sample_logits(lg.data(), V, 1.f, 1e-6f, 0, &st) == am;
  check("sample tiny top_p = argmax", ok);
  std::vector<float> tie(5, 1.f);
  check("greedy ties -> lowest id", rf::sample_logits(tie.data(), 5, 0.f, 1.f, 0, &st) == 0);
  uint64_t a = 77, b = 77;
  ok = true;
  for (int i = 0; i < 100; i++)
    ok = ok &&
         rf::sample_logits(lg.data(), V, 0.8f, 0.9f, 10, &a) == rf::sample_logits(lg.data(), V, 0.8f, 0.9f, 10, &b);
  check("same seed -> same draws", ok && a == b);
  uint64_t z = 0;
  rf::xorshift64star(&z);
  check("zero rng state replaced by a non-zero constant", z != 0);
  // distribution: chi-square-ish tolerance per token
  const int N = 40000;
  std::vector<int> cnt(V, 0);
  uint64_t s2 = 99;
  for (int i = 0; i < N; i++) cnt[rf::sample_logits(lg.data(), V, 1.f, 1.f, 0, &s2)]++;
  double mx = *std::max_element(lg.begin(), lg.end()), sum = 0;
  for (float x : lg) sum += std::exp(x - mx);
  double worst = 0;
  for (int i = 0; i < V; i++) {
    double p = std::exp(lg[i] - mx) / sum;
    double sd = std::sqrt(p * (1 - p) / N);
    worst = std::max(worst, std::fabs(cnt[i] / (double)N - p) / (sd + 1e-4));
  }
  check("sample distribution ~ softmax", worst < 5, "worst z %.2f", worst);
  // top_k / top_p support
  std::vector<int> idx(V);
  for (int i = 0; i < V; i++) idx[i] = i;
  std::sort(idx.begin(), idx.end(), [&](int x, int y) { return lg[x] > lg[y]; });
  ok = true;
  for (int i = 0; i < 2000; i++) {
    int t = rf::sample_logits(lg.data(), V, 2.f, 1.f, 4, &s2);
    ok = ok && std::find(idx.begin(), idx.begin() + 4, t) != idx.begin() + 4;
  }
  check("top_k restricts support", ok);
  // top_p: smallest prefix with cumulative prob >= p
  double cum = 0;
  int need = 0;
  for (int i = 0; i < V; i++) {
    cum += std::exp(lg[idx[i]] - mx) / sum;
    if (cum >= 0.7) {
      need = i + 1;
      break;
    }
  }
  std::set<int> seen;
  for (int i = 0; i < 20000; i++) seen.insert(rf::sample_logits(lg.data(), V, 1.f, 0.7f, 0, &s2));
  ok = (int)seen.size() <= need;
  for (int t : seen) ok = ok && std::find(idx.begin(), idx.begin() + need, t) != idx.begin() + need;
  check("top_p keeps the smallest prefix", ok && (int)seen.size() == need, "support %.0f", (double)seen.size());
}

void test_misc() {
  rf::TensorId id;
  check("parse tensor names",
        rf::parse_tensor_name("model.layers.12.mlp.down_proj.weight", &id) && id.kind == rf::T_DOWN && id.layer == 12 &&
            !rf::parse_tensor_name("model.layers.x.mlp.down_proj.weight", &id) &&
            !rf::parse_tensor_name("model.layers.1.mlp.down_proj", &id) && !rf::parse_tensor_name(nullptr, &id));
  std::vector<float> x = {1, 2, 3}, y = {0.5f, 0.5f, 0.5f};
  rf::cpu::add_inplace(x.data(), y.data(), 3);
  check("add_inplace", x[0] == 1.5f && x[2] == 3.5f);
}

}  // namespace

// the worker pool: every index exactly once, for any thread count; nested calls run inline; repeated jobs
void test_pool() {
  using namespace rf::cpu;
  const int before = pool_threads();
  bool ok = true;
  for (int nt : {1, 2, 3, 5}) {
    Pool::get().set_threads(nt);
    ok = ok && pool_threads() == nt;
    for (int64_t n : {0, 1, 2, 7, 1000}) {
      std::vector<int> hits((size_t)n, 0), dyn((size_t)n, 0);
      std::vector<int> ids(64, 0);
      parallel_for(n, true, [&](int64_t b, int64_t e, int id) {
        ids[(size_t)id] = 1;
        for (int64_t i = b; i < e; i++) hits[(size_t)i]++;
        // nested: inline on this thread, whole range
        int inner = 0;
        parallel_for(10, true, [&](int64_t b2, int64_t e2, int id2) { inner += (int)(e2 - b2) + id2; });
        if (inner != 10) hits[(size_t)b] += 100;
      });
      parallel_dynamic(n, true, [&](int64_t i, int) { dyn[(size_t)i]++; });
      for (int64_t i = 0; i < n; i++) ok = ok && hits[(size_t)i] == 1 && dyn[(size_t)i] == 1;
      int used = 0;
      for (int v : ids) used += v;
      ok = ok && used == (int)std::min<int64_t>(nt, n);
    }
    // many short jobs back to back (the decode pattern)
    std::atomic<int64_t> sum{0};
    for (int rep = 0; rep < 2000; rep++) parallel_for(4, true, [&](int64_t b, int64_t e, int) { sum += e - b; });
    ok = ok && sum == 8000;
  }
  Pool::get().set_threads(before);
  check("worker pool: each index once (1,2,3,5 threads), nested inline, 2000 short jobs",
        ok && pool_threads() == before);
}

int main() {
  test_pool();
  test_matmul();
  test_rmsnorm();
  test_rope();
  test_attention();
  test_swiglu_l2();
  test_score();
  test_h2o_select();
  test_dtype();
  test_sampling();
  test_misc();
  printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
