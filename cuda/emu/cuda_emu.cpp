/*
 * cuda_emu.cpp — runtime of the CPU CUDA emulation (see cuda_emu.h): fibers for CUDA threads, barriers,
 * warp exchanges, the device-memory registry, streams, kernel attributes and launch checks.
 * Test hooks (exported): rf_emu_set(key, value), rf_emu_stat(key), rf_emu_last_violation().
 */
#include "cuda_emu.h"

#include <sys/mman.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#include <sanitizer/common_interface_defs.h>
#endif

#define EMU_API extern "C" __attribute__((visibility("default")))

/* reform_cuda.cu, emulation build: forget the cached cuBLAS lookup (so a test can switch GEMM backends) */
void rf_emu_reset_cublas_state();

namespace emu {

/* ============================================================ f16 conversions (round to nearest even) */
uint16_t f32_to_f16_bits(float f) {
  uint32_t x = f2u(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);   // NaN
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {                                    // subnormal or zero in f16
    if (ax < 0x33000000u) return (uint16_t)sign;             // < 2^-25: rounds to 0 (2^-25 exactly: tie to 0)
    int e = (int)(ax >> 23);
    uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    int shift = 126 - e;  // 14 + (127 - 1 - e) + ... -> value = m * 2^(e-150); f16 sub unit = 2^-24
    // result = m * 2^(e - 150) / 2^-24 = m >> (126 - e)
    uint32_t r = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) r++;
    return (uint16_t)(sign | r);
  }
  uint32_t e = (ax >> 23) - 127 + 15;
  uint32_t m = ax & 0x7fffffu;
  uint32_t r = (e << 10) | (m >> 13);
  uint32_t rem = m & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
  return (uint16_t)(sign | r);
}
float f16_bits_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    float v = (float)m * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  if (e == 31) return u2f(sign | 0x7f800000u | (m << 13));
  return u2f(sign | ((e - 15 + 127) << 23) | (m << 13));
}

/* ============================================================ state */
std::mutex g_mu;         // registry, streams, attributes, last error
std::mutex g_launch_mu;  // one kernel at a time
cudaError_t g_last = cudaSuccess;
int g_devices = -1;  // -1: read REFORM_EMU_DEVICES (default 1)
int g_cur_dev = 0;
size_t g_mem_limit = (size_t)8 << 30;
std::string g_throw_on_launch;  // "bad_alloc" / "runtime_error": the next launch throws it (host exceptions in the ABI)
size_t g_mem_used = 0;
std::map<uintptr_t, size_t> g_allocs;
std::set<cudaStream_t> g_streams;
std::map<uintptr_t, size_t> g_host_allocs;  // cudaMallocHost: start -> bytes
std::set<cudaEvent_t> g_events;
int g_driver_version = 13000, g_runtime_version = 13000;
std::map<const void*, int> g_max_dyn;  // per kernel
const size_t kDefaultDynSmem = 48 * 1024;
const size_t kOptinSmem = 232448;  // H100: 227 KiB
bool g_reverse = false;
int64_t g_launches = 0, g_blocks = 0, g_threads = 0, g_launch_errors = 0, g_violations = 0;
int64_t g_peak_bytes = 0;
int64_t g_syncs = 0, g_d2h_bytes = 0, g_mallocs = 0;  // host waits, bytes copied device -> host, cudaMalloc calls
int64_t g_h2d_bytes = 0, g_stream_waits = 0;          // bytes copied host -> device, cudaStreamWaitEvent calls
bool g_ignore_waits = false;                          // fault injection: cudaStreamWaitEvent does nothing
std::map<std::string, int64_t> g_knobs;               // rf_emu_set("knob:NAME", value)
std::string g_last_violation;

void violation(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  g_violations++;
  g_last_violation = buf;
  if (getenv("REFORM_EMU_VERBOSE")) fprintf(stderr, "[cuda-emu] violation: %s\n", buf);
}

[[noreturn]] void fail(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  fprintf(stderr, "[cuda-emu] FATAL: %s\n", buf);
  fflush(stderr);
  abort();
}

int devices() {
  if (g_devices < 0) {
    const char* e = getenv("REFORM_EMU_DEVICES");
    g_devices = e && *e ? atoi(e) : 1;
  }
  return g_devices;
}

/* [p, p+n) inside one live allocation (n == 0: p inside or one past the end) */
bool in_device_locked(const void* p, size_t n) {
  uintptr_t a = (uintptr_t)p;
  auto it = g_allocs.upper_bound(a);
  if (it == g_allocs.begin()) return false;
  --it;
  uintptr_t end = it->first + it->second;
  if (n == 0) return a <= end;
  return a < end && n <= end - a;
}
bool is_device_ptr(const void* p) {
  std::lock_guard<std::mutex> lk(g_mu);
  return in_device_locked(p, 0);
}
int64_t knob(const char* name) {
  std::lock_guard<std::mutex> lk(g_mu);
  auto it = g_knobs.find(name);
  return it == g_knobs.end() ? 0 : it->second;
}

/* ============================================================ fibers */
enum FState { RUNNABLE = 0, AT_BLOCK_BARRIER = 1, AT_WARP_OP = 2, DONE = 3 };

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;
  ThreadState ts{};
  int state = RUNNABLE;
  const char* op = nullptr;  // warp op the fiber waits in
#if EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

const size_t kStackSize = 256 * 1024;
std::vector<char*> g_stack_pool;
std::vector<Fiber> g_fibers;
int g_nthreads = 0;
Fiber* g_running = nullptr;
void* g_sched_sp = nullptr;
const std::function<void()>* g_body = nullptr;
void* g_dyn = nullptr;
uint32_t g_xchg[1024];
const void* g_arg_p[1024];
unsigned g_arg_ldm[1024];
const char* g_kernel_name = "";
#if EMU_ASAN
const void* g_sched_stack_bottom = nullptr;
size_t g_sched_stack_size = 0;
void* g_sched_fake = nullptr;
#endif

extern "C" void emu_switch(void** save_sp, void* to_sp);
#if defined(__x86_64__)
/* save callee-saved registers + mxcsr/x87 control word on the current stack, swap stacks, restore */
__asm__(
    ".text\n"
    ".globl emu_switch\n"
    ".hidden emu_switch\n"
    ".type emu_switch,@function\n"
    "emu_switch:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  subq $8, %rsp\n"
    "  stmxcsr (%rsp)\n"
    "  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n"
    "  fldcw 4(%rsp)\n"
    "  addq $8, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size emu_switch,.-emu_switch\n");
#else
#error "cuda_emu: fiber switch implemented for x86-64 only"
#endif

void to_scheduler(Fiber* f, bool finished) {
#if EMU_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f->fake_stack, g_sched_stack_bottom, g_sched_stack_size);
#else
  (void)finished;
#endif
  emu_switch(&f->sp, g_sched_sp);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(f->fake_stack, &g_sched_stack_bottom, &g_sched_stack_size);
#endif
}

extern "C" void emu_fiber_main() {
  Fiber* f = g_running;
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_sched_stack_bottom, &g_sched_stack_size);
#endif
  (*g_body)();
  f->state = DONE;
  to_scheduler(f, true);
  fail("finished fiber resumed");
}

void resume(Fiber* f) {
  g_running = f;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(&g_sched_fake, f->stack, kStackSize);
#endif
  emu_switch(&g_sched_sp, f->sp);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(g_sched_fake, nullptr, nullptr);
#endif
  g_running = nullptr;
}

char* get_stack(int i) {
  while ((int)g_stack_pool.size() <= i) {
    void* p = mmap(nullptr, kStackSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fail("mmap of a fiber stack failed");
    g_stack_pool.push_back((char*)p);
  }
  return g_stack_pool[i];
}

void init_fiber(Fiber& f, int i) {
  f.stack = get_stack(i);
  f.state = RUNNABLE;
  f.op = nullptr;
  uintptr_t top = ((uintptr_t)f.stack + kStackSize) & ~(uintptr_t)15;
  uint64_t* s = (uint64_t*)top;
  *--s = 0;                                              // fake return address of emu_fiber_main (never returns)
  *--s = (uint64_t)(void*)&emu_fiber_main;               // popped by `ret` (rsp then = top - 8: ABI entry alignment)
  for (int r = 0; r < 6; r++) *--s = 0;                  // rbp rbx r12 r13 r14 r15
  *--s = (uint64_t)0x1F80u | ((uint64_t)0x037Fu << 32);  // mxcsr, x87 control word
  f.sp = s;
}

ThreadState* cur() {
  if (!g_running) fail("CUDA thread state used outside a kernel");
  return &g_running->ts;
}

void wait(int state, const char* op) {
  Fiber* f = g_running;
  if (!f) fail("%s called outside a kernel", op);
  f->state = state;
  f->op = op;
  to_scheduler(f, false);
}

void syncthreads() { wait(AT_BLOCK_BARRIER, "__syncthreads"); }
void syncwarp() { wait(AT_WARP_OP, "__syncwarp"); }

uint32_t shfl_xor_bits(uint32_t v, int lane_mask, const char* op) {
  const int me = g_running->ts.linear, base = me & ~31, lane = me & 31;
  if (lane_mask < 0 || lane_mask > 31) fail("%s in %s: lane mask %d out of range", op, g_kernel_name, lane_mask);
  g_xchg[me] = v;
  wait(AT_WARP_OP, op);
  uint32_t r = g_xchg[base + (lane ^ lane_mask)];
  wait(AT_WARP_OP, op);
  return r;
}
float shfl_xor_f(float v, int m) { return u2f(shfl_xor_bits(f2u(v), m, "__shfl_xor_sync(float)")); }
int shfl_xor_i(int v, int m) { return (int)shfl_xor_bits((uint32_t)v, m, "__shfl_xor_sync(int)"); }

void warp_same_args(const void* p, unsigned ldm, const char* what) {
  const int me = g_running->ts.linear, base = me & ~31;
  g_arg_p[me] = p;
  g_arg_ldm[me] = ldm;
  wait(AT_WARP_OP, what);
  if (g_arg_p[base] != p || g_arg_ldm[base] != ldm)
    fail("%s in %s: lanes of warp %d pass different arguments (lane 0: %p ldm %u, thread %d: %p ldm %u)", what,
         g_kernel_name, me / 32, g_arg_p[base], g_arg_ldm[base], me, p, ldm);
  wait(AT_WARP_OP, what);
}

void* dyn_smem() {
  if (!g_running) fail("dynamic shared memory used outside a kernel");
  return g_dyn;
}

void run_block(const dim3& grid, const dim3& block, const uint3& bid) {
  const int nt = (int)(block.x * block.y * block.z);
  g_nthreads = nt;
  if ((int)g_fibers.size() < nt) g_fibers.resize(nt);
  for (int i = 0; i < nt; i++) {
    Fiber& f = g_fibers[i];
    init_fiber(f, i);
    f.ts.tid = uint3{(unsigned)(i % block.x), (unsigned)((i / block.x) % block.y), (unsigned)(i / (block.x * block.y))};
    f.ts.bid = bid;
    f.ts.bdim = block;
    f.ts.gdim = grid;
    f.ts.linear = i;
  }
  const int nwarps = (nt + 31) / 32;
  /* Warp-serial schedule: each warp runs as far as it can (its warp operations complete as soon as all its lanes
   * arrive) before the next warp starts; only __syncthreads lets other warps catch up. A read of shared memory
   * written by another warp without a __syncthreads in between therefore sees stale data (NaN-poisoned at block
   * start) in one of the two orders. */
  for (;;) {
    for (int wi = 0; wi < nwarps; wi++) {
      const int w = g_reverse ? nwarps - 1 - wi : wi;
      const int lo = w * 32, hi = std::min(nt, lo + 32);
      for (;;) {
        if (g_reverse) {
          for (int i = hi - 1; i >= lo; i--)
            if (g_fibers[i].state == RUNNABLE) resume(&g_fibers[i]);
        } else {
          for (int i = lo; i < hi; i++)
            if (g_fibers[i].state == RUNNABLE) resume(&g_fibers[i]);
        }
        int waiting = 0, done = 0;
        const char* op = nullptr;
        for (int i = lo; i < hi; i++) {
          if (g_fibers[i].state == AT_WARP_OP) {
            waiting++;
            if (!op) op = g_fibers[i].op;
            else if (strcmp(op, g_fibers[i].op) != 0)
              fail("%s: lanes of warp %d wait in different warp operations (%s / %s)", g_kernel_name, w, op,
                   g_fibers[i].op);
          }
          done += g_fibers[i].state == DONE;
        }
        if (waiting == 0) break;  // the warp is at __syncthreads or finished
        if (waiting == hi - lo) {
          for (int i = lo; i < hi; i++) g_fibers[i].state = RUNNABLE;
          continue;
        }
        if (hi - lo < 32)
          fail("%s: %s in a partial warp (%d threads): undefined on the GPU", g_kernel_name, op, hi - lo);
        if (done + waiting == hi - lo)
          fail("%s: %s with %d lanes of warp %d exited (full-mask warp operation): undefined on the GPU", g_kernel_name,
               op, done, w);
        fail("%s block (%u,%u,%u): deadlock in warp %d: %d lanes in %s, %d at __syncthreads", g_kernel_name, bid.x,
             bid.y, bid.z, w, waiting, op, hi - lo - waiting - done);
      }
    }
    int live = 0;
    for (int i = 0; i < nt; i++) live += g_fibers[i].state != DONE;
    if (live == 0) break;
    for (int i = 0; i < nt; i++)  // every live thread is at __syncthreads here
      if (g_fibers[i].state == AT_BLOCK_BARRIER) g_fibers[i].state = RUNNABLE;
  }
}

/* ============================================================ streams (see "streams" in cuda_emu.h) */
struct Op {
  uint64_t seq;
  std::function<void()> run;
};
}  // namespace emu

struct emu_graph {
  std::vector<std::function<void()>> ops;  // recorded in stream order
  bool invalid = false;                    // a refused call happened while capturing
};
struct emu_stream {
  EmuStreamHead head;
  std::deque<emu::Op> q;           // queued, not yet run, in stream order
  uint64_t queued = 0;             // seq of the last op queued
  uint64_t done = 0;               // seq of the last op run
  emu_graph* capturing = nullptr;  // cudaStreamBeginCapture .. EndCapture
};
struct emu_event {
  cudaStream_t stream = nullptr;  // where it was last recorded (nullptr: never)
  uint64_t seq = 0;               // the op that completes it
};

namespace emu {
enum StreamMode { EAGER, LAZY, DRAIN };
StreamMode initial_mode() {  // REFORM_EMU_STREAMS=eager|lazy|drain (default lazy), e.g. to rerun a test file
  const char* e = getenv("REFORM_EMU_STREAMS");
  if (e && !strcmp(e, "eager")) return EAGER;
  if (e && !strcmp(e, "drain")) return DRAIN;
  return LAZY;
}
StreamMode g_mode = initial_mode();
std::recursive_mutex g_exec_mu;  // queues and their execution (taken before g_launch_mu and g_mu, never after)
emu_stream g_legacy;             // the NULL stream
int64_t g_pending = 0;           // ops queued, not yet run

void enqueue_host(void* stream, void (*fn)(void*), void* arg, void (*release)(void*));
void init_stream(emu_stream* s) {
  s->head.magic = EMU_STREAM_MAGIC;
  s->head.enqueue = enqueue_host;
}
emu_stream* stream_of(cudaStream_t s) {
  if (s) return s;
  if (!g_legacy.head.magic) init_stream(&g_legacy);
  return &g_legacy;
}

/* runs the ops of s up to and including seq */
void run_until(emu_stream* s, uint64_t seq) {
  std::lock_guard<std::recursive_mutex> ex(g_exec_mu);
  while (s->done < seq && !s->q.empty()) {
    Op op = std::move(s->q.front());
    s->q.pop_front();
    g_pending--;
    op.run();
    s->done = op.seq;
  }
}
void run_all() {
  std::lock_guard<std::recursive_mutex> ex(g_exec_mu);
  for (bool more = true; more;) {
    more = false;
    for (cudaStream_t t : g_streams) {
      if (t->done < t->queued) {
        run_until(t, t->queued);
        more = true;
      }
    }
    if (g_legacy.done < g_legacy.queued) {
      run_until(&g_legacy, g_legacy.queued);
      more = true;
    }
  }
}
/* a call that would make the host wait for a capturing stream: refused, and the capture is invalid */
bool refuse_while_capturing(emu_stream* s, const char* what) {
  if (!s->capturing) return false;
  s->capturing->invalid = true;
  std::lock_guard<std::mutex> lk(g_mu);
  violation("%s while the stream is capturing a graph (not permitted on the GPU)", what);
  return true;
}

/* the host waits for op seq of s: in "drain" mode everything else runs first */
void host_wait(emu_stream* s, uint64_t seq) {
  std::lock_guard<std::recursive_mutex> ex(g_exec_mu);
  if (g_mode == DRAIN) {
    std::vector<cudaStream_t> others(g_streams.begin(), g_streams.end());
    for (cudaStream_t t : others)
      if (t != s && g_streams.count(t)) run_until(t, t->queued);
    if (s != &g_legacy) run_until(&g_legacy, g_legacy.queued);
  }
  run_until(s, seq);
}
int64_t g_graph_launches = 0, g_graph_captures = 0, g_live_graphs = 0;
bool g_fail_next_capture = false;  // rf_emu_set("fail_next_capture", "1"): the next cudaStreamEndCapture fails

/* queues op on stream s (NULL: the legacy stream) and returns its seq; eager mode runs it now; a capturing stream
 * records it instead (seq 0) */
uint64_t enqueue_op(cudaStream_t st, std::function<void()> fn) {
  std::lock_guard<std::recursive_mutex> ex(g_exec_mu);
  emu_stream* s = stream_of(st);
  if (s->capturing) {
    s->capturing->ops.push_back(std::move(fn));
    return 0;
  }
  const uint64_t seq = ++s->queued;
  s->q.push_back(Op{seq, std::move(fn)});
  g_pending++;
  if (g_mode == EAGER) run_until(s, seq);
  return seq;
}
void enqueue_host(void* stream, void (*fn)(void*), void* arg, void (*release)(void*)) {
  // the closure may be copied into a graph and run again: arg lives until the last copy goes
  std::shared_ptr<void> owned(
      arg, release ? release : [](void*) {});
  enqueue_op((cudaStream_t)stream, [fn, owned]() { fn(owned.get()); });
}

bool in_pinned_locked(const void* p, size_t n) {
  uintptr_t a = (uintptr_t)p;
  auto it = g_host_allocs.upper_bound(a);
  if (it == g_host_allocs.begin()) return false;
  --it;
  return a >= it->first && a + n <= it->first + it->second;
}

void set_last(cudaError_t e) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (g_last == cudaSuccess) g_last = e;
}

void execute_kernel(const LaunchCfg& cfg, const std::function<void()>& body);

/* checks a launch (the errors cudaGetLastError reports right after it) and queues its blocks on the stream */
void run_kernel(const LaunchCfg& cfg, const std::function<void()>& body, bool args_ok, const char* bad_arg) {
  std::string throw_now;
  {
    std::lock_guard<std::mutex> lk(g_mu);
    throw_now.swap(g_throw_on_launch);
  }
  if (throw_now == "bad_alloc") throw std::bad_alloc();
  if (!throw_now.empty()) throw std::runtime_error(std::string("emulated host exception at launch of ") + cfg.name);
  std::lock_guard<std::recursive_mutex> ex(g_exec_mu);
  const uint64_t nt = (uint64_t)cfg.block.x * cfg.block.y * cfg.block.z;
  size_t max_dyn;
  {
    std::lock_guard<std::mutex> lk(g_mu);
    g_launches++;
    auto it = g_max_dyn.find(cfg.fn);
    max_dyn = it == g_max_dyn.end() ? kDefaultDynSmem : (size_t)it->second;
    if (cfg.stream && !g_streams.count(cfg.stream)) {
      violation("%s launched on a destroyed or unknown stream", cfg.name);
      g_launch_errors++;
      if (g_last == cudaSuccess) g_last = cudaErrorInvalidResourceHandle;
      return;
    }
  }
  const char* bad = nullptr;
  cudaError_t code = cudaSuccess;
  if (nt < 1 || nt > 1024 || cfg.block.z > 64) bad = "block size", code = cudaErrorInvalidConfiguration;
  else if (cfg.grid.x < 1 || cfg.grid.x > 2147483647u || cfg.grid.y < 1 || cfg.grid.y > 65535 || cfg.grid.z < 1 ||
           cfg.grid.z > 65535)
    bad = "grid size", code = cudaErrorInvalidConfiguration;
  else if (cfg.smem > max_dyn) bad = "dynamic shared memory above the kernel's limit", code = cudaErrorInvalidValue;
  if (bad) {
    std::lock_guard<std::mutex> lk(g_mu);
    g_launch_errors++;
    if (g_last == cudaSuccess) g_last = code;
    if (getenv("REFORM_EMU_VERBOSE"))
      fprintf(stderr, "[cuda-emu] launch of %s (%p) refused: %s (grid %u,%u,%u block %u,%u,%u smem %zu, limit %zu)\n",
              cfg.name, cfg.fn, bad, cfg.grid.x, cfg.grid.y, cfg.grid.z, cfg.block.x, cfg.block.y, cfg.block.z,
              cfg.smem, max_dyn);
    return;
  }
  if (!args_ok) {
    std::lock_guard<std::mutex> lk(g_mu);
    violation("%s: %s (an illegal address on the GPU)", cfg.name, bad_arg);
    g_launch_errors++;
    if (g_last == cudaSuccess) g_last = 700;  // cudaErrorIllegalAddress
    return;
  }
  enqueue_op(cfg.stream, [cfg, body]() { execute_kernel(cfg, body); });
}

/* runs every block of a launch that was checked and queued by run_kernel */
void execute_kernel(const LaunchCfg& cfg, const std::function<void()>& body) {
  std::lock_guard<std::mutex> launch(g_launch_mu);
  const uint64_t nt = (uint64_t)cfg.block.x * cfg.block.y * cfg.block.z;
  g_kernel_name = cfg.name;
  g_body = &body;
  // dynamic shared memory: exactly the requested bytes (ASan sees overruns), 256-byte aligned like the GPU's
  void* dyn = nullptr;
  if (cfg.smem && posix_memalign(&dyn, 256, cfg.smem) != 0)
    fail("host allocation of %zu bytes of shared memory failed", cfg.smem);
  g_dyn = dyn;
  for (unsigned z = 0; z < cfg.grid.z; z++)
    for (unsigned y = 0; y < cfg.grid.y; y++)
      for (unsigned x = 0; x < cfg.grid.x; x++) {
        if (cfg.smem) memset(dyn, 0xFF, cfg.smem);  // NaN: data another block (or launch) left is never seen
        run_block(cfg.grid, cfg.block, uint3{x, y, z});
      }
  free(dyn);
  g_body = nullptr;
  g_dyn = nullptr;
  std::lock_guard<std::mutex> lk(g_mu);
  g_blocks += (int64_t)cfg.grid.x * cfg.grid.y * cfg.grid.z;
  g_threads += (int64_t)cfg.grid.x * cfg.grid.y * cfg.grid.z * (int64_t)nt;
}

}  // namespace emu

using namespace emu;

/* ============================================================ runtime API */
static const char* err_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case 700: return "an illegal memory access was encountered";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    default: return "unknown error";
  }
}
const char* cudaGetErrorString(cudaError_t e) { return err_name(e); }

cudaError_t cudaGetLastError(void) {
  std::lock_guard<std::mutex> lk(g_mu);
  cudaError_t e = g_last;
  g_last = cudaSuccess;
  return e;
}

cudaError_t cudaGetDeviceCount(int* n) {
  std::lock_guard<std::mutex> lk(g_mu);
  *n = devices();
  if (*n <= 0) {
    *n = 0;
    return cudaErrorNoDevice;
  }
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int dev) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (dev < 0 || dev >= devices()) return cudaErrorInvalidDevice;
  g_cur_dev = dev;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int dev) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (dev < 0 || dev >= devices()) return cudaErrorInvalidDevice;
  memset(p, 0, sizeof *p);
  snprintf(p->name, sizeof p->name, "CPU emulation of an sm_90 device");
  p->totalGlobalMem = g_mem_limit;
  p->sharedMemPerBlock = kDefaultDynSmem;
  p->sharedMemPerBlockOptin = kOptinSmem;
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = 132;
  p->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = nullptr;
  std::lock_guard<std::mutex> lk(g_mu);
  if (devices() <= 0) return cudaErrorNoDevice;
  if (bytes == 0) return cudaSuccess;
  g_mallocs++;
  // (a limit lowered below what is in use leaves nothing free)
  if (g_mem_used >= g_mem_limit || bytes > g_mem_limit - g_mem_used) return cudaErrorMemoryAllocation;
  void* q = nullptr;
  if (posix_memalign(&q, 256, bytes) != 0 || !q) return cudaErrorMemoryAllocation;
  memset(q, 0xFF, bytes);  // NaN everywhere: unwritten device memory shows up in results
  g_allocs[(uintptr_t)q] = bytes;
  g_mem_used += bytes;
  if ((int64_t)g_mem_used > g_peak_bytes) g_peak_bytes = (int64_t)g_mem_used;
  *p = q;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  run_all();  // the runtime completes the device's pending work before it frees (none of it may use p)
  std::lock_guard<std::mutex> lk(g_mu);
  auto it = g_allocs.find((uintptr_t)p);
  if (it == g_allocs.end()) {
    violation("cudaFree(%p): not a live device allocation", p);
    return cudaErrorInvalidDevicePointer;
  }
  g_mem_used -= it->second;
  g_allocs.erase(it);
  free(p);
  return cudaSuccess;
}

static cudaError_t check_copy(void* dst, size_t dext, const void* src, size_t sext, cudaMemcpyKind kind,
                              const char* what) {
  bool d_dev = in_device_locked(dst, dext), s_dev = in_device_locked(src, sext);
  bool d_any = in_device_locked(dst, 0), s_any = in_device_locked(src, 0);
  const char* bad = nullptr;
  switch (kind) {
    case cudaMemcpyHostToDevice:
      if (!d_dev) bad = d_any ? "destination runs past its device allocation" : "destination is not device memory";
      else if (s_any) bad = "source is device memory";
      break;
    case cudaMemcpyDeviceToHost:
      if (!s_dev) bad = s_any ? "source runs past its device allocation" : "source is not device memory";
      else if (d_any) bad = "destination is device memory";
      break;
    case cudaMemcpyDeviceToDevice:
      if (!d_dev) bad = d_any ? "destination runs past its device allocation" : "destination is not device memory";
      else if (!s_dev) bad = s_any ? "source runs past its device allocation" : "source is not device memory";
      break;
    case cudaMemcpyHostToHost:
      if (d_any || s_any) bad = "host-to-host copy touches device memory";
      break;
    default: break;
  }
  if (bad) {
    violation("%s(dst %p, src %p, kind %d): %s", what, dst, src, (int)kind, bad);
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
static bool stream_ok_locked(cudaStream_t s) { return s == nullptr || g_streams.count(s) > 0; }

/* Queues a copy of `height` rows of `width` bytes on s with the runtime's host synchronisation: a pageable source
 * is read now, a pageable destination is written before the call returns (with the stream's earlier work), pinned
 * memory and device memory are read / written when the copy runs. */
static cudaError_t queue_copy(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind kind, cudaStream_t s, const char* what) {
  std::lock_guard<std::recursive_mutex> ex(g_exec_mu);
  bool pageable_src = false, pageable_dst = false;
  {
    std::lock_guard<std::mutex> lk(g_mu);
    if (!stream_ok_locked(s)) {
      violation("%s on a destroyed or unknown stream", what);
      return cudaErrorInvalidResourceHandle;
    }
    cudaError_t e = check_copy(dst, dpitch * (height - 1) + width, src, spitch * (height - 1) + width, kind, what);
    if (e != cudaSuccess) return e;
    const size_t ext_s = spitch * (height - 1) + width, ext_d = dpitch * (height - 1) + width;
    if (kind == cudaMemcpyDeviceToHost) {
      g_d2h_bytes += (int64_t)(width * height);
      pageable_dst = !in_pinned_locked(dst, ext_d);
    }
    if (kind == cudaMemcpyHostToDevice) {
      g_h2d_bytes += (int64_t)(width * height);
      pageable_src = !in_pinned_locked(src, ext_s);
    }
  }
  auto rows = [=](void* d, const void* sp, size_t spt) {
    for (size_t r = 0; r < height; r++) memmove((char*)d + r * dpitch, (const char*)sp + r * spt, width);
  };
  if (kind == cudaMemcpyHostToHost) {
    rows(dst, src, spitch);
    return cudaSuccess;
  }
  if ((pageable_src || pageable_dst) && refuse_while_capturing(stream_of(s), "a copy from or to pageable memory"))
    return cudaErrorStreamCaptureUnsupported;
  if (pageable_src) {  // staged now: the caller may reuse its buffer as soon as the call returns
    std::shared_ptr<std::vector<char>> staged = std::make_shared<std::vector<char>>(width * height);
    for (size_t r = 0; r < height; r++) memcpy(staged->data() + r * width, (const char*)src + r * spitch, width);
    enqueue_op(s, [=]() { rows(dst, staged->data(), width); });
    return cudaSuccess;
  }
  const uint64_t seq = enqueue_op(s, [=]() { rows(dst, src, spitch); });
  if (pageable_dst) host_wait(stream_of(s), seq);  // returns once the data is there
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s) {
  if (bytes == 0) return cudaSuccess;
  return queue_copy(dst, bytes, src, bytes, bytes, 1, kind, s, "cudaMemcpyAsync");
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  if (bytes == 0) return cudaSuccess;
  cudaError_t e = queue_copy(dst, bytes, src, bytes, bytes, 1, kind, nullptr, "cudaMemcpy");
  if (e == cudaSuccess) host_wait(stream_of(nullptr), stream_of(nullptr)->queued);  // synchronous
  return e;
}
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind kind, cudaStream_t s) {
  if (width == 0 || height == 0) return cudaSuccess;
  if (width > dpitch || width > spitch) {
    std::lock_guard<std::mutex> lk(g_mu);
    violation("cudaMemcpy2DAsync: width %zu larger than a pitch (%zu, %zu)", width, dpitch, spitch);
    return cudaErrorInvalidValue;
  }
  return queue_copy(dst, dpitch, src, spitch, width, height, kind, s, "cudaMemcpy2DAsync");
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
  (void)flags;
  std::lock_guard<std::mutex> lk(g_mu);
  if (devices() <= 0) return cudaErrorNoDevice;
  cudaStream_t st = new emu_stream();
  init_stream(st);
  g_streams.insert(st);
  *s = st;
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  std::lock_guard<std::recursive_mutex> ex(g_exec_mu);
  {
    std::lock_guard<std::mutex> lk(g_mu);
    if (!g_streams.count(s)) {
      violation("cudaStreamDestroy of an unknown stream");
      return cudaErrorInvalidResourceHandle;
    }
  }
  run_until(s, s->queued);  // the runtime lets queued work finish; the handle goes at once
  std::lock_guard<std::mutex> lk(g_mu);
  g_streams.erase(s);
  delete s;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  std::lock_guard<std::recursive_mutex> ex(g_exec_mu);
  {
    std::lock_guard<std::mutex> lk(g_mu);
    if (!stream_ok_locked(s)) {
      violation("cudaStreamSynchronize on a destroyed or unknown stream");
      return cudaErrorInvalidResourceHandle;
    }
    g_syncs++;
  }
  emu_stream* st = stream_of(s);
  if (refuse_while_capturing(st, "cudaStreamSynchronize")) return cudaErrorStreamCaptureUnsupported;
  host_wait(st, st->queued);
  return cudaSuccess;
}
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode) {
  std::lock_guard<std::recursive_mutex> ex(g_exec_mu);
  emu_stream* st = stream_of(s);
  if (!s || st->capturing) {
    std::lock_guard<std::mutex> lk(g_mu);
    violation("cudaStreamBeginCapture on the legacy stream or a stream already capturing");
    return cudaErrorStreamCaptureUnsupported;
  }
  (void)mode;
  st->capturing = new emu_graph();
  std::lock_guard<std::mutex> lk(g_mu);
  g_live_graphs++;
  return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* g) {
  std::lock_guard<std::recursive_mutex> ex(g_exec_mu);
  emu_stream* st = stream_of(s);
  *g = nullptr;
  if (!st->capturing) return cudaErrorInvalidValue;
  emu_graph* graph = st->capturing;
  st->capturing = nullptr;
  std::lock_guard<std::mutex> lk(g_mu);
  if (g_fail_next_capture) {
    g_fail_next_capture = false;
    graph->invalid = true;
  }
  if (graph->invalid) {
    delete graph;
    g_live_graphs--;
    return cudaErrorStreamCaptureInvalidated;
  }
  g_graph_captures++;
  *g = graph;
  return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* e, cudaGraph_t g, unsigned long long flags) {
  (void)flags;
  *e = nullptr;
  if (!g) return cudaErrorInvalidValue;
  emu_graph* x = new emu_graph();
  x->ops = g->ops;  // the same closures: the same kernels, arguments and copies each launch
  std::lock_guard<std::mutex> lk(g_mu);
  g_live_graphs++;
  *e = x;
  return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t s) {
  if (!e) return cudaErrorInvalidValue;
  {
    std::lock_guard<std::mutex> lk(g_mu);
    if (!stream_ok_locked(s)) return cudaErrorInvalidResourceHandle;
    g_graph_launches++;
  }
  enqueue_op(s, [e]() {
    for (const auto& op : e->ops) op();
  });
  return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e) {
  if (!e) return cudaSuccess;
  run_all();  // a launch still queued runs its list first
  delete e;
  std::lock_guard<std::mutex> lk(g_mu);
  g_live_graphs--;
  return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t g) {
  if (!g) return cudaSuccess;
  delete g;
  std::lock_guard<std::mutex> lk(g_mu);
  g_live_graphs--;
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize(void) {
  {
    std::lock_guard<std::mutex> lk(g_mu);
    g_syncs++;
  }
  run_all();
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, const void* f) {
  std::lock_guard<std::mutex> lk(g_mu);
  auto it = g_max_dyn.find(f);
  a->maxDynamicSharedSizeBytes = it == g_max_dyn.end() ? (int)kDefaultDynSmem : it->second;
  a->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* f, cudaFuncAttribute attr, int value) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || (size_t)value > kOptinSmem) return cudaErrorInvalidValue;
  g_max_dyn[f] = value;
  if (getenv("REFORM_EMU_VERBOSE")) fprintf(stderr, "[cuda-emu] kernel %p: max dynamic shared memory %d\n", f, value);
  return cudaSuccess;
}

cudaError_t cudaMallocHost(void** p, size_t bytes) {
  std::lock_guard<std::mutex> lk(g_mu);
  *p = nullptr;
  if (devices() <= 0) return cudaErrorNoDevice;
  void* q = malloc(bytes ? bytes : 1);
  if (!q) return cudaErrorMemoryAllocation;
  memset(q, 0xFF, bytes);
  g_host_allocs[(uintptr_t)q] = bytes ? bytes : 1;
  *p = q;
  return cudaSuccess;
}
cudaError_t cudaFreeHost(void* p) {
  if (!p) return cudaSuccess;
  run_all();  // as cudaFree: pending copies may still use it
  std::lock_guard<std::mutex> lk(g_mu);
  if (!g_host_allocs.erase((uintptr_t)p)) {
    violation("cudaFreeHost(%p): not a live pinned allocation", p);
    return cudaErrorInvalidValue;
  }
  free(p);
  return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (devices() <= 0) return cudaErrorNoDevice;
  *total_bytes = g_mem_limit;
  *free_bytes = g_mem_limit > g_mem_used ? g_mem_limit - g_mem_used : 0;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  std::lock_guard<std::mutex> lk(g_mu);
  *v = g_driver_version;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* v) {
  std::lock_guard<std::mutex> lk(g_mu);
  *v = g_runtime_version;
  return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags) {
  (void)flags;
  std::lock_guard<std::mutex> lk(g_mu);
  if (devices() <= 0) return cudaErrorNoDevice;
  cudaEvent_t ev = new emu_event();
  g_events.insert(ev);
  *e = ev;
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (!g_events.erase(e)) {
    violation("cudaEventDestroy of an unknown event");
    return cudaErrorInvalidResourceHandle;
  }
  delete e;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  std::lock_guard<std::recursive_mutex> ex(g_exec_mu);
  {
    std::lock_guard<std::mutex> lk(g_mu);
    if (!g_events.count(e) || !stream_ok_locked(s)) {
      violation("cudaEventRecord on an unknown event or stream");
      return cudaErrorInvalidResourceHandle;
    }
  }
  e->seq = enqueue_op(s, []() {});
  e->stream = stream_of(s);
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  std::lock_guard<std::recursive_mutex> ex(g_exec_mu);
  {
    std::lock_guard<std::mutex> lk(g_mu);
    if (!g_events.count(e)) {
      violation("cudaEventSynchronize on an unknown event");
      return cudaErrorInvalidResourceHandle;
    }
    g_syncs++;
  }
  if (e->stream && refuse_while_capturing(e->stream, "cudaEventSynchronize")) return cudaErrorStreamCaptureUnsupported;
  if (e->stream) host_wait(e->stream, e->seq);  // never recorded: complete
  return cudaSuccess;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags) {
  std::lock_guard<std::recursive_mutex> ex(g_exec_mu);
  {
    std::lock_guard<std::mutex> lk(g_mu);
    if (!g_events.count(e) || !stream_ok_locked(s) || flags != 0) {
      violation("cudaStreamWaitEvent on an unknown event or stream, or with flags %u", flags);
      return cudaErrorInvalidResourceHandle;
    }
    g_stream_waits++;
    if (g_ignore_waits) return cudaSuccess;
  }
  if (!e->stream) return cudaSuccess;  // never recorded: nothing to wait for
  emu_stream* other = e->stream;
  const uint64_t seq = e->seq;  // the work the event marks now, not at a later record
  enqueue_op(s, [other, seq]() { run_until(other, seq); });
  return cudaSuccess;
}

/* ============================================================ test hooks */
EMU_API int rf_emu_set(const char* key, const char* value) {
  if (!key || !value) return -1;
  std::string k = key;
  if (k == "cublas_lib") {  // "" = none (the built-in GEMM), else a path dlopen'ed instead of libcublas
    if (*value) setenv("REFORM_CUBLAS_LIB", value, 1);
    else setenv("REFORM_CUBLAS_LIB", "/nonexistent/libcublas-disabled.so", 1);
    rf_emu_reset_cublas_state();
    return 0;
  }
  if (k == "streams") {  // see cuda_emu.h; switching completes what is queued
    StreamMode m;
    if (!strcmp(value, "lazy")) m = LAZY;
    else if (!strcmp(value, "drain")) m = DRAIN;
    else if (!strcmp(value, "eager")) m = EAGER;
    else return -1;
    std::lock_guard<std::recursive_mutex> ex(g_exec_mu);
    run_all();
    g_mode = m;
    return 0;
  }
  std::lock_guard<std::mutex> lk(g_mu);
  if (k == "schedule") {
    if (!strcmp(value, "reverse")) g_reverse = true;
    else if (!strcmp(value, "forward")) g_reverse = false;
    else return -1;
    return 0;
  }
  if (k == "mem_limit") {
    g_mem_limit = (size_t)strtoull(value, nullptr, 10);
    return 0;
  }
  if (k == "throw_on_launch") {
    g_throw_on_launch = value;
    return 0;
  }
  if (k.rfind("setenv:", 0) == 0) {  // an environment variable the code under test reads (e.g. REFORM_CUDA_GRAPH)
    if (*value) setenv(k.substr(7).c_str(), value, 1);
    else unsetenv(k.substr(7).c_str());
    return 0;
  }
  if (k == "fail_next_capture") {  // e.g. a cuBLAS that cannot be captured: the caller's fallback runs
    g_fail_next_capture = strcmp(value, "0") != 0 && *value;
    return 0;
  }
  if (k == "ignore_stream_waits") {
    g_ignore_waits = strcmp(value, "0") != 0 && *value;
    return 0;
  }
  if (k.rfind("knob:", 0) == 0) {
    g_knobs[k.substr(5)] = strtoll(value, nullptr, 10);
    return 0;
  }
  if (k == "driver_version") {  // a driver older than the runtime: the mismatch the library must report
    g_driver_version = atoi(value);
    return 0;
  }
  if (k == "devices") {
    g_devices = atoi(value);
    return 0;
  }
  if (k == "reset_counters") {
    g_launches = g_blocks = g_threads = g_launch_errors = g_violations = 0;
    g_peak_bytes = (int64_t)g_mem_used;
    g_last_violation.clear();
    return 0;
  }
  return -1;
}

EMU_API int64_t rf_emu_stat(const char* key) {
  std::lock_guard<std::mutex> lk(g_mu);
  std::string k = key ? key : "";
  if (k == "live_allocs") return (int64_t)g_allocs.size();
  if (k == "live_bytes") return (int64_t)g_mem_used;
  if (k == "peak_bytes") return g_peak_bytes;
  if (k == "live_streams") return (int64_t)g_streams.size();
  if (k == "syncs") return g_syncs;
  if (k == "d2h_bytes") return g_d2h_bytes;
  if (k == "mallocs") return g_mallocs;
  if (k == "live_host_allocs") return (int64_t)g_host_allocs.size();
  if (k == "h2d_bytes") return g_h2d_bytes;
  if (k == "stream_waits") return g_stream_waits;
  if (k == "pending_ops") return g_pending;
  if (k == "graph_launches") return g_graph_launches;
  if (k == "graph_captures") return g_graph_captures;
  if (k == "live_graphs") return g_live_graphs;
  if (k == "live_events") return (int64_t)g_events.size();
  if (k == "launches") return g_launches;
  if (k == "blocks") return g_blocks;
  if (k == "threads") return g_threads;
  if (k == "launch_errors") return g_launch_errors;
  if (k == "violations") return g_violations;
  return -1;
}

EMU_API const char* rf_emu_last_violation(void) {
  static thread_local std::string s;
  std::lock_guard<std::mutex> lk(g_mu);
  s = g_last_violation;
  return s.c_str();
}
