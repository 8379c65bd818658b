// Work sharing for the server's large native calls (parse_payloads, accumulate): threads started for the call
// and joined, so an idle thread blocks instead of spinning. OpenMP's idle threads spin between regions
// (GOMP_SPINCOUNT): free on an idle machine, but with another process busy on both cores a region's end waits
// for a descheduled spinner; measured on 2 cores, aggregate() of 100 x 1M-parameter payloads took 134 ms
// that way against 24 ms on one thread. Starting a thread costs ~20 us, so callers use this only for work of
// a millisecond or more.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#ifdef FEDSPARSE_OPENMP
#include <omp.h>
#endif

namespace fedsparse {

// Threads to use: OpenMP's setting (OMP_NUM_THREADS, omp_set_num_threads) where built with it.
inline int max_threads() {
#ifdef FEDSPARSE_OPENMP
  return std::max(1, omp_get_max_threads());
#else
  return int(std::max(1u, std::thread::hardware_concurrency()));
#endif
}

// fn(unit, thread) for unit in [0, n), units handed out one at a time (dynamic schedule) to at most
// `threads` threads (thread 0 is the caller). The first exception is rethrown after every thread has stopped.
template <class Fn>
void parallel_units(int64_t n, int threads, Fn fn) {
  threads = int(std::min<int64_t>(threads, n));
  if (threads <= 1) {
    for (int64_t u = 0; u < n; ++u) fn(u, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex mu;
  const auto work = [&](int tid) {
    try {
      for (int64_t u; (u = next.fetch_add(1)) < n;) fn(u, tid);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!error) error = std::current_exception();
      next = n;
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(size_t(threads - 1));
  for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace fedsparse
