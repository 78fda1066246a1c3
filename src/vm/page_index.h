// PageIndex: a flat hash multimap from a page address to pointers, for the
// pfn-cache registry's per-page lookups.
//
// Open addressing with linear probing over one array of {key, value} pairs,
// kept at most half full, so a lookup reads one or two cache lines at any
// size: what the MMU notifier pays for "which caches map this page" does not
// grow with the number of caches registered. Several values may share a key
// (two caches of the same page); they sit in the same probe run. Erase shifts
// later entries of the run back (no tombstones), so lookups never slow down
// with churn.
//
// Not thread-safe: the registry serialises every use under its mutex.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "base/huge_pages.h"
#include "base/types.h"

namespace nestcache::vm {

class PageIndex {
 public:
  PageIndex();

  // Adds (page, value); `page` must be non-zero and page aligned.
  void insert(Hva page, const void* value);
  // Removes one (page, value) pair; false if there is none.
  bool erase(Hva page, const void* value);
  // Calls fn(value) for every value stored under `page`.
  template <class Fn>
  void for_each(Hva page, Fn&& fn) const {
    for (size_t i = home(page);; i = (i + 1) & mask_) {
      const Entry& e = table_[i];
      if (e.page == 0) return;
      if (e.page == page) fn(e.value);
    }
  }
  size_t size() const { return size_; }
  // Starts loading the cache line where `page`'s probe run begins, so that
  // a for_each(page) soon after finds it in the processor's cache. Unlike
  // the rest, safe to call without the caller's lock, concurrently with any
  // change: it reads only the table's published address and size (atomics,
  // perhaps an older pair), and a prefetch of a stale address is harmless
  // (it never faults and changes nothing).
  void prefetch(Hva page) const {
    const int shift = published_shift_.load(std::memory_order_relaxed);
    const Entry* table = published_table_.load(std::memory_order_relaxed);
    __builtin_prefetch(table + home(page, shift));
  }

 private:
  struct Entry {
    Hva page = 0;  // 0: empty
    const void* value = nullptr;
  };
  // Fibonacci hashing of the page number: consecutive pages spread over the
  // table instead of filling one run.
  static size_t home(Hva page, int shift) {
    return static_cast<size_t>(((page >> kPageShift) * 0x9e3779b97f4a7c15ull) >> shift);
  }
  size_t home(Hva page) const { return home(page, shift_); }
  void grow();
  // Publishes the table's address and shift_ for prefetch().
  void publish();
  void place(Hva page, const void* value);

  std::vector<Entry, HugePageAllocator<Entry>> table_;  // large tables on huge pages
  size_t mask_ = 0;
  int shift_ = 0;  // 64 - log2(table size)
  size_t size_ = 0;
  std::atomic<const Entry*> published_table_{nullptr};
  std::atomic<int> published_shift_{0};
};

}  // namespace nestcache::vm
