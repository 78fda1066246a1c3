// Lock-free pfn-cache readers (see cache_readers.h).
#include "vm/cache_readers.h"

#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "base/check.h"

namespace nestcache::vm::cache_readers {
namespace internal {
namespace {

long membarrier(int cmd) { return syscall(__NR_membarrier, cmd, 0, 0); }

// Registers this process for private expedited membarriers; false when the
// kernel (or a seccomp filter) does not offer them.
bool register_membarrier() {
  const long supported = membarrier(MEMBARRIER_CMD_QUERY);
  if (supported < 0 || !(supported & MEMBARRIER_CMD_PRIVATE_EXPEDITED)) return false;
  return membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0;
}

std::atomic<ThreadRecord*> g_records{nullptr};

// Hands the thread's record back when the thread ends.
struct RecordOwner {
  ThreadRecord* record = nullptr;
  ~RecordOwner() {
    if (!record) return;
    for (auto& s : record->slots) NC_CHECK(s.load(std::memory_order_relaxed) == nullptr);  // a read outlived its thread
    t_record = nullptr;
    record->in_use.store(false, std::memory_order_release);
  }
};
thread_local RecordOwner t_owner;

}  // namespace

// Dynamic initialisation: runs before main, before any thread reads.
bool g_reader_fence = !register_membarrier();

ThreadRecord* register_thread() {
  ThreadRecord* r = nullptr;
  for (ThreadRecord* p = g_records.load(std::memory_order_acquire); p && !r; p = p->next) {
    bool free = false;
    if (!p->in_use.load(std::memory_order_relaxed) && p->in_use.compare_exchange_strong(free, true)) r = p;
  }
  if (!r) {
    r = new ThreadRecord;  // never freed: waiters may be walking the list
    r->in_use.store(true, std::memory_order_relaxed);
    r->next = g_records.load(std::memory_order_relaxed);
    while (!g_records.compare_exchange_weak(r->next, r, std::memory_order_release, std::memory_order_relaxed)) {
    }
  }
  t_owner.record = r;
  t_record = r;
  return r;
}

void too_many_reads() {
  std::fprintf(stderr, "nestcache: a thread holds more than %d pfn-cache reads at once\n", kSlotsPerThread);
  std::abort();
}

}  // namespace internal

namespace {

// The full barrier on every running thread that pairs with the readers'
// compiler-only fence. The system call is itself a full barrier on the
// calling thread, between the caller's store that made the caches invalid
// and the loads of the slots that follow. Without membarrier the readers
// exchange their slots seq_cst, which pairs with the caller's seq_cst store
// and the seq_cst slot loads below: nothing to do here.
void barrier_on_every_reader() {
  if (internal::g_reader_fence) return;
  NC_CHECK(internal::membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0);
}

}  // namespace

bool reading(const void* cache) {
  const ThreadRecord* r = internal::t_record;
  if (!r) return false;
  for (const auto& s : r->slots)
    if (s.load(std::memory_order_relaxed) == cache) return true;
  return false;
}

void wait_for_readers(std::span<const void* const> caches) {
  if (caches.empty()) return;
  for (const void* c : caches) {
    if (reading(c)) {
      std::fprintf(stderr, "nestcache: a thread waits for its own pfn-cache read to end\n");
      std::abort();
    }
  }
  barrier_on_every_reader();
  for (const ThreadRecord* r = internal::g_records.load(std::memory_order_acquire); r; r = r->next) {
    for (const auto& slot : r->slots) {
      for (int spins = 0;; spins++) {
        // Acquire (seq_cst for the fence pair above): the reader's accesses
        // happen before its release of the slot, so they happen before
        // whatever the caller does next.
        const void* c = slot.load(std::memory_order_seq_cst);
        if (!c || std::find(caches.begin(), caches.end(), c) == caches.end()) break;
        if (spins < 64) {
#if defined(__x86_64__)
          __builtin_ia32_pause();
#endif
        } else {
          std::this_thread::yield();
        }
      }
    }
  }
}

}  // namespace nestcache::vm::cache_readers
