// abi_guard_tests.cpp — the C ABI's shared exception boundary and argument checks (cuda/abi_guard.h), which
// both libraries use: every exception type maps to the right status code (only an allocation failure is
// RF_ERR_OOM), pointer-returning bodies yield NULL with the code, and the state-blob / struct-layout helpers.
// Build: g++ -O1 -std=c++17 -Icuda test/native/abi_guard_tests.cpp -o build/abi_guard_tests
// Prints one line per check; exits 1 when any check fails.
#include "abi_guard.h"

#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

int g_fail = 0, g_pass = 0;

void check(const std::string& name, bool ok) {
  if (ok) g_pass++;
  else g_fail++;
  printf("[%s] %s\n", ok ? "PASS" : "FAIL", name.c_str());
}

bool last_is(int code, const char* needle) {
  return rf::last_error_code_ref() == code && rf::last_error_ref().find(needle) != std::string::npos;
}

struct Thing {
  int x = 0;
};

void test_status_guard() {
  check("no exception: the body's value", rf::guard("f", [] { return 7; }) == 7);
  check("no exception: a negative status passes through", rf::guard("f", [] { return RF_ERR_STATE; }) == RF_ERR_STATE);
  check("std::bad_alloc -> RF_ERR_OOM", rf::guard("f", []() -> int { throw std::bad_alloc(); }) == RF_ERR_OOM);
  check("  message names the function", last_is(RF_ERR_OOM, "f: out of host memory"));
  check("std::runtime_error -> RF_ERR_INTERNAL",
        rf::guard("g", []() -> int { throw std::runtime_error("boom"); }) == RF_ERR_INTERNAL);
  check("  message carries what()", last_is(RF_ERR_INTERNAL, "g: internal error: boom"));
  check("std::length_error (not an allocation failure) -> RF_ERR_INTERNAL", rf::guard("h", []() -> int {
                                                                              std::vector<float> v;
                                                                              v.reserve(v.max_size() + 1);
                                                                              return 0;
                                                                            }) == RF_ERR_INTERNAL);
  check("std::out_of_range -> RF_ERR_INTERNAL",
        rf::guard("i", []() -> int { return std::vector<int>(2).at(5); }) == RF_ERR_INTERNAL);
  check("a non-std exception -> RF_ERR_INTERNAL", rf::guard("j", []() -> int { throw 42; }) == RF_ERR_INTERNAL);
  check("  message says unknown", last_is(RF_ERR_INTERNAL, "j: internal error: unknown exception"));
  check("int64_t body: the code as int64_t",
        rf::guard("k", []() -> int64_t { throw std::bad_alloc(); }) == (int64_t)RF_ERR_OOM);
}

void test_pointer_guard() {
  Thing t;
  rf::set_error(RF_ERR_DEVICE, "stale");
  check("pointer body: its pointer", rf::guard("p", [&]() -> Thing* { return &t; }) == &t);
  check("pointer body: a stale error is cleared first", rf::last_error_code_ref() == 0);
  check("pointer body + bad_alloc -> NULL", rf::guard("p", []() -> Thing* { throw std::bad_alloc(); }) == nullptr);
  check("  code RF_ERR_OOM", last_is(RF_ERR_OOM, "p: out of host memory"));
  check("pointer body + logic_error -> NULL",
        rf::guard("q", []() -> Thing* { throw std::logic_error("bug"); }) == nullptr);
  check("  code RF_ERR_INTERNAL", last_is(RF_ERR_INTERNAL, "q: internal error: bug"));
  check("pointer body returning NULL after a check keeps the check's code",
        rf::guard("r",
                  []() -> Thing* {
                    rf::check_not_null(nullptr, "model", "r");
                    return nullptr;
                  }) == nullptr &&
            last_is(RF_ERR_INVALID, "r: model is NULL"));
}

void test_checks() {
  const int32_t ok[3] = {0, 5, 9}, bad[3] = {0, 10, 1};
  check("check_tokens: in range", rf::check_tokens(ok, 3, 10, "w") == RF_OK);
  check("check_tokens: out of range -> INVALID naming the index",
        rf::check_tokens(bad, 3, 10, "w") == RF_ERR_INVALID && last_is(RF_ERR_INVALID, "index 1 out of range"));
  check("check_tokens: NULL", rf::check_tokens(nullptr, 1, 10, "w") == RF_ERR_INVALID);
  check("check_chunk: n above max_chunk", rf::check_chunk(ok, 3, 2, 10, nullptr, false, "w") == RF_ERR_INVALID &&
                                              last_is(RF_ERR_INVALID, "max_chunk = 2"));
  check("check_chunk: missing required output", rf::check_chunk(ok, 3, 8, 10, nullptr, true, "w") == RF_ERR_INVALID);
  check("check_seq_append: past max_tokens",
        rf::check_seq_append(ok, 3, 6, 8, 10, "w") == RF_ERR_INVALID && last_is(RF_ERR_INVALID, "max_tokens 8"));
  check("check_seq_append: fits", rf::check_seq_append(ok, 3, 5, 8, 10, "w") == RF_OK);
  check("check_seq_sample: no logits -> STATE", rf::check_seq_sample(false, 1.f, 1.f) == RF_ERR_STATE);
  check("check_seq_sample: NaN -> INVALID", rf::check_seq_sample(true, NAN, 1.f) == RF_ERR_INVALID);
  struct M {
    bool finalized;
  } fin{true}, unfin{false};
  check("check_model_ready: NULL -> INVALID", rf::check_model_ready((const M*)nullptr, "w") == RF_ERR_INVALID);
  check("check_model_ready: not finalized -> STATE", rf::check_model_ready(&unfin, "w") == RF_ERR_STATE);
  check("check_model_ready: finalized", rf::check_model_ready(&fin, "w") == RF_OK);
  float q[4] = {0};
  check("check_score_args: n_ctx 0 with NULL pointers is a no-op",
        rf::check_score_args(nullptr, RF_F32, 0, 4, nullptr, 1, nullptr) == RF_OK);
  check("check_score_args: NULL ctx", rf::check_score_args(nullptr, RF_F32, 1, 4, q, 1, q) == RF_ERR_INVALID);
  check("check_score_args: bf16 ctx", rf::check_score_args(q, RF_BF16, 1, 4, q, 1, q) == RF_ERR_INVALID);
  check("check_threads: negative", rf::check_threads(-1) == RF_ERR_INVALID && rf::check_threads(0) == RF_OK);
}

void test_state_blob() {
  const rf::StateHeader own = rf::state_header(2, 2, 4, 16, 8, 3, 5);
  const int64_t size = rf::state_size(2, 2, 4, 3);
  std::vector<char> blob((size_t)size, 0);
  memcpy(blob.data(), &own, sizeof own);
  rf::StateHeader got{};
  check("check_state_load: its own blob",
        rf::check_state_load(blob.data(), size, own, &got) == RF_OK && got.len == 3 && got.seen == 5);
  check("check_state_load: one byte short", rf::check_state_load(blob.data(), size - 1, own, &got) == RF_ERR_INVALID);
  rf::StateHeader other = rf::state_header(2, 2, 4, 32, 8, 0, 0);
  check("check_state_load: another hidden size",
        rf::check_state_load(blob.data(), size, other, &got) == RF_ERR_INVALID && last_is(RF_ERR_INVALID, "hidden 16"));
  blob[0] = 'X';
  check("check_state_load: bad magic",
        rf::check_state_load(blob.data(), size, own, &got) == RF_ERR_INVALID && last_is(RF_ERR_INVALID, "bad magic"));
  check("check_state_save: small buffer", rf::check_state_save(blob.data(), size - 1, own) == RF_ERR_INVALID);
  check("check_state_save: exact buffer", rf::check_state_save(blob.data(), size, own) == RF_OK);
}

void test_struct_layout() {
  const std::string s = rf::struct_layout();
  check("layout: rf_config line with its size", s.rfind("rf_config 128 vocab_size:0:i32 ", 0) == 0);
  check("layout: float field typed f32", s.find(" rms_eps:40:f32 ") != std::string::npos);
  check("layout: reserved array with its count", s.find(" qk_norm:68:i32 reserved:72:i32x14\n") != std::string::npos);
  check("layout: rf_compress_params line",
        s.find("\nrf_compress_params 64 capacity:0:i32 ") != std::string::npos &&
            s.find(" exit_layer:24:i32 eviction:28:i32 reserved:32:i32x8") != std::string::npos);
}

}  // namespace

int main() {
  test_status_guard();
  test_pointer_guard();
  test_checks();
  test_state_blob();
  test_struct_layout();
  printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
