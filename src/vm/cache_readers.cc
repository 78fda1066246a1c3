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
#include "base/sanitizers.h"

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

// A full memory barrier: the seq_cst fence of activate() and of a waiter.
// ThreadSanitizer does not model fences (and warns about them); under it, a
// locked read-modify-write of a word private to the thread is the same
// barrier on x86 and adds no cross-thread ordering that could hide a race.
void full_fence() {
#ifdef NC_TSAN
  thread_local std::atomic<int> word{0};
  word.fetch_add(1, std::memory_order_seq_cst);
#else
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

// True if the thread that owns `r` (the caller) holds no read.
bool holds_no_read(const ThreadRecord& r) {
  for (const auto& s : r.slots)
    if (s.load(std::memory_order_relaxed) != nullptr) return false;
  return true;
}

// Hands the thread's record back when the thread ends.
struct RecordOwner {
  ThreadRecord* record = nullptr;
  ~RecordOwner() {
    if (!record) return;
    NC_CHECK(holds_no_read(*record));  // a read outlived its thread
    record->active.store(false, std::memory_order_release);
    t_record = nullptr;
    record->in_use.store(false, std::memory_order_release);
  }
};
thread_local RecordOwner t_owner;

}  // namespace

// Dynamic initialisation: runs before main, before any thread reads.
bool g_reader_fence = !register_membarrier();

ThreadRecord* register_thread() noexcept {
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

void activate(ThreadRecord* r) noexcept {
  r->active.store(true, std::memory_order_relaxed);
  // The reader's half of the pair: a waiter that fenced before this either
  // sees the thread active, or this thread's next check sees the caches the
  // waiter made invalid (wait_for_readers).
  full_fence();
}

void too_many_reads() {
  std::fprintf(stderr, "nestcache: a thread holds more than %d pfn-cache reads at once\n", kSlotsPerThread);
  std::abort();
}

}  // namespace internal

namespace {

// True if a thread other than the caller may be inside a read. The fence
// orders the caller's stores that made the caches invalid before the loads of
// the active flags; it pairs with activate()'s. A flag seen clear was cleared
// by quiesce() with no read held (acquire: the reads it did are over), or is
// about to be set, and then that thread's next check sees the caches invalid.
bool other_active_readers() {
  internal::full_fence();
  for (const ThreadRecord* r = internal::g_records.load(std::memory_order_acquire); r; r = r->next)
    if (r != internal::t_record && r->active.load(std::memory_order_acquire)) return true;
  return false;
}

// The full barrier on every running thread that pairs with the readers'
// compiler-only fence. The system call is itself a full barrier on the
// calling thread, between the caller's store that made the caches invalid
// and the loads of the slots that follow.
void barrier_on_every_reader() { NC_CHECK(internal::membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0); }

}  // namespace

bool reading(const void* cache) {
  const ThreadRecord* r = internal::t_record;
  if (!r) return false;
  for (const auto& s : r->slots)
    if (s.load(std::memory_order_relaxed) == cache) return true;
  return false;
}

bool wait_for_readers(std::span<const void* const> caches) {
  if (caches.empty()) return false;
  for (const void* c : caches) {
    if (reading(c)) {
      std::fprintf(stderr, "nestcache: a thread waits for its own pfn-cache read to end\n");
      std::abort();
    }
  }
  // Without membarrier, readers exchange their slots seq_cst, which pairs
  // with the caller's seq_cst store and the seq_cst slot loads below.
  bool interrupted = false;
  if (!internal::g_reader_fence) {
    if (!other_active_readers()) return false;
    barrier_on_every_reader();
    interrupted = true;
  }
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
  return interrupted;
}

void quiesce() {
  ThreadRecord* r = internal::t_record;
  if (!r || !r->active.load(std::memory_order_relaxed) || !internal::holds_no_read(*r)) return;
  // Release: the reads this thread did happen before a waiter that sees the
  // flag clear and skips waiting for it.
  r->active.store(false, std::memory_order_release);
}

bool active() {
  const ThreadRecord* r = internal::t_record;
  return r && r->active.load(std::memory_order_relaxed);
}

}  // namespace nestcache::vm::cache_readers
