/*
 * pool.h — the CPU build's worker threads (instead of OpenMP in the forward pass).
 *
 * Why not OpenMP: libgomp reads its wait policy from the environment once, when it is loaded (before this
 * library can set anything), and by default a waiting thread spins for ~300k iterations. On a machine whose
 * cores are shared (other processes, a server's other work), a spinning thread holds a core that the thread
 * it waits for needs: 2 threads ran prefill 5-6x slower than 1 next to one busy process. Here a waiting
 * thread spins for at most ~20 us, then sleeps on a condition variable.
 *
 * parallel(nt, f) runs f(id, nt) for id in [0, nt) — id 0 on the calling thread — and returns when all are
 * done. Called from inside a task it runs f(0, 1) inline. The tasks must not throw.
 */
#ifndef REFORM_CPU_POOL_H
#define REFORM_CPU_POOL_H

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace rf {
namespace cpu {

class Pool {
 public:
  static Pool& get() {
    static Pool p;
    return p;
  }
  /* total threads including the caller; 0 = one per hardware thread */
  void set_threads(int n) {
    if (n <= 0) n = (int)std::max(1u, std::thread::hardware_concurrency());
    if (n == nthreads_) return;
    stop_workers();
    nthreads_ = n;
    stop_ = false;
    // the generation is read here, not in the new thread: a job posted before that thread runs is still its
    const uint64_t g = gen_.load();
    for (int i = 1; i < n; i++) workers_.emplace_back([this, i, g] { worker(i, g); });
  }
  int threads() const { return nthreads_; }
  static bool in_task() { return in_task_flag(); }

  template <class F>
  void parallel(int nt, F&& f) {
    nt = std::min(nt, nthreads_);
    if (in_task_flag()) return f(0, 1);
    if (nt <= 1) {  // still a task: what it calls runs inline too, as on the pool's threads
      in_task_flag() = true;
      f(0, 1);
      in_task_flag() = false;
      return;
    }
    job_fn_ = [](void* ctx, int id, int n) { (*(F*)ctx)(id, n); };
    job_ctx_ = (void*)&f;
    job_nt_ = nt;
    // every worker acknowledges every job (a worker past nt just decrements): none can still be reading
    // this job's fields when the next one writes them
    pending_.store(nthreads_ - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_start_.notify_all();
    in_task_flag() = true;
    f(0, nt);
    in_task_flag() = false;
    if (!spin_until([&] { return pending_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lk(mu_);
      cv_done_.wait(lk, [&] { return pending_.load(std::memory_order_acquire) == 0; });
    }
  }

  ~Pool() { stop_workers(); }

 private:
  Pool() { set_threads(0); }

  static bool& in_task_flag() {
    static thread_local bool f = false;
    return f;
  }
  /* true when cond() became true within the spin budget */
  template <class C>
  static bool spin_until(C cond) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0;; i++) {
      if (cond()) return true;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      if ((i & 63) == 63 && std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(20)) return false;
    }
  }

  void worker(int id, uint64_t seen) {
    in_task_flag() = true;
    for (;;) {
      if (!spin_until([&] { return gen_.load(std::memory_order_acquire) != seen || stop_.load(); })) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_start_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen || stop_.load(); });
      }
      if (stop_.load()) return;
      seen = gen_.load(std::memory_order_acquire);
      if (id < job_nt_) job_fn_(job_ctx_, id, job_nt_);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lk(mu_);
        cv_done_.notify_one();
      }
    }
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_start_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::vector<std::thread> workers_;
  int nthreads_ = 1;
  std::mutex mu_;
  std::condition_variable cv_start_, cv_done_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  void (*job_fn_)(void*, int, int) = nullptr;
  void* job_ctx_ = nullptr;
  int job_nt_ = 0;
};

inline int pool_threads() { return Pool::get().threads(); }

/* f(begin, end, id) over `nt` contiguous, balanced slices of [0, n) (nt = the pool's threads when `par`) */
template <class F>
void parallel_for(int64_t n, bool par, F&& f) {
  if (n <= 0) return;
  const int nt = par ? (int)std::min<int64_t>(pool_threads(), n) : 1;
  Pool::get().parallel(nt, [&](int id, int parts) {
    const int64_t q = n / parts, r = n % parts;
    const int64_t b = id * q + std::min<int64_t>(id, r);
    const int64_t e = b + q + (id < r ? 1 : 0);
    if (b < e) f(b, e, id);
  });
}

/* f(i, id) for i in [0, n), handed out one at a time (tasks of unequal cost, e.g. causal attention rows) */
template <class F>
void parallel_dynamic(int64_t n, bool par, F&& f) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int nt = par ? (int)std::min<int64_t>(pool_threads(), n) : 1;
  Pool::get().parallel(nt, [&](int id, int) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) f(i, id);
  });
}

}  // namespace cpu
}  // namespace rf

#endif
