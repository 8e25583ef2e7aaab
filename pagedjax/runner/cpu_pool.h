// Work items of a native kernel split between the calling thread and XLA's intra-op
// thread pool (shared by cpu_attention.cc and cpu_matmul.cc).

#ifndef PAGEDJAX_RUNNER_CPU_POOL_H_
#define PAGEDJAX_RUNNER_CPU_POOL_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace pagedjax {

// Runs item(i) for every i in [0, items) on the calling thread and on up to `helpers`
// tasks of `pool`; returns when all have run. Items are claimed one at a time. A task
// that starts after the last item was claimed touches only the counters (kept alive by a
// shared_ptr), never `item` or what it refers to: `item` is called only for a claimed
// item, and the caller waits for every claimed item to finish.
template <typename Item>
void RunItems(xla::ffi::ThreadPool& pool, int64_t items, int64_t helpers, const Item& item) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t items = 0;
    const Item* item = nullptr;
  };
  auto sh = std::make_shared<Shared>();
  sh->items = items;
  sh->item = &item;
  auto drain = [](Shared& s) {
    for (int64_t i; (i = s.next.fetch_add(1)) < s.items;) {
      (*s.item)(i);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([sh, drain] { drain(*sh); });
  drain(*sh);
  while (sh->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

}  // namespace pagedjax

#endif  // PAGEDJAX_RUNNER_CPU_POOL_H_
