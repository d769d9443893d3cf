// parallel_for: the work loop every r1jax CPU kernel shares.
#ifndef R1JAX_CPU_KERNELS_PARALLEL_H_
#define R1JAX_CPU_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace r1jax {

// Runs item(i) for every i in [0, n) on the calling thread and on XLA's intra-op pool, items
// claimed one at a time, and returns once all have run. Which thread runs which item varies, so
// each item must write only its own outputs; the kernels merge them in a fixed order after.
//
// Helper tasks may start after this returns (the pool was busy): they then find no item left.
// So the claim counters live in a shared_ptr the tasks hold, not in this stack frame, and the
// caller waits only for items already claimed, which run on threads that are working.
inline void parallel_for(xla::ffi::ThreadPool& pool, int64_t n,
                         std::function<void(int64_t)> item) {
  struct Work {
    int64_t n;
    std::function<void(int64_t)> item;
    std::atomic<int64_t> next{0}, done{0};
    void drain() {
      for (int64_t i; (i = next.fetch_add(1)) < n;) {
        item(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto work = std::make_shared<Work>();
  work->n = n;
  work->item = std::move(item);
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->drain(); });
  work->drain();
  while (work->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace r1jax

#endif  // R1JAX_CPU_KERNELS_PARALLEL_H_
