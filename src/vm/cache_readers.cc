// Lock-free pfn-cache readers (see cache_readers.h).
#include "vm/cache_readers.h"

#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string_view>
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

// A full memory barrier: the seq_cst fence of activation (enter_slow) and of
// a waiter.
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

// True if `v`, a slot's value, names a cache (not kFree or a marker).
bool names_cache(uintptr_t v) { return v > kLastMarker; }

// True if the thread that owns `r` (the caller) holds no read.
bool holds_no_read(const ThreadRecord& r) {
  for (const auto& s : r.slots)
    if (names_cache(s.load(std::memory_order_relaxed))) return false;
  return true;
}

// Set when the thread's RecordOwner has run: a read after that (from a
// thread-local destructor that runs later) could not hand its record back.
thread_local bool t_released = false;

// Hands the thread's record back when the thread ends.
struct RecordOwner {
  ThreadRecord* record = nullptr;
  ~RecordOwner() {
    t_released = true;
    if (!record) return;
    NC_CHECK(holds_no_read(*record));  // a read outlived its thread
    record->slots[0].store(kParked, std::memory_order_release);
    t_record = &g_unregistered;
    record->in_use.store(false, std::memory_order_release);
  }
};
thread_local RecordOwner t_owner;

}  // namespace

namespace {
// True if the environment asks for fence mode (NESTCACHE_NO_MEMBARRIER set
// and not "0"): the path of a kernel without membarrier, for tests.
bool fence_mode_asked() {
  const char* v = std::getenv("NESTCACHE_NO_MEMBARRIER");
  return v && *v && std::string_view(v) != "0";
}
}  // namespace

bool reader_fence() noexcept {
  static const bool fence = fence_mode_asked() || !register_membarrier();
  return fence;
}

namespace {

// Gives the calling thread a record, slot 0 parked (or in fence mode), and
// returns it.
ThreadRecord* register_thread() noexcept {
  if (t_released) {
    std::fprintf(stderr, "nestcache: a pfn-cache read after its thread's reader record was released "
                         "(a thread-local destructor reads a cache)\n");
    std::abort();
  }
  ThreadRecord* r = nullptr;
  for (ThreadRecord* p = g_records.load(std::memory_order_acquire); p && !r; p = p->next) {
    bool free = false;
    if (!p->in_use.load(std::memory_order_relaxed) && p->in_use.compare_exchange_strong(free, true)) r = p;
  }
  if (!r) {
    r = new ThreadRecord;  // never freed: waiters may be walking the list
    r->slots[0].store(kParked, std::memory_order_relaxed);
    r->in_use.store(true, std::memory_order_relaxed);
    r->next = g_records.load(std::memory_order_relaxed);
    while (!g_records.compare_exchange_weak(r->next, r, std::memory_order_release, std::memory_order_relaxed)) {
    }
  }
  // Without membarrier slot 0 stays marked for good, so that every entry
  // takes enter_slow and fences; waiters then never read the marker.
  if (reader_fence()) r->slots[0].store(kFenceMode, std::memory_order_relaxed);
  t_owner.record = r;
  t_record = r;
  return r;
}

[[noreturn]] void too_many_reads() {
  std::fprintf(stderr, "nestcache: a thread holds more than %d pfn-cache reads at once\n",
               reader_fence() ? kSlotsPerThread - 1 : kSlotsPerThread);
  std::abort();
}

}  // namespace

Slot* enter_slow(ThreadRecord* r, uintptr_t cache) noexcept {
  if (r == &g_unregistered) r = register_thread();
  const uintptr_t gate = r->slots[0].load(std::memory_order_relaxed);
  if (gate == kParked || gate == kFree) {  // kFree: enter() takes that itself
    // Activation names the cache in slot 0, which also marks the thread
    // active. The reader's half of the pair: a waiter that fenced before
    // this either sees the slot no longer parked (and interrupts or waits
    // for this thread), or this thread's next check sees the caches the
    // waiter made invalid (wait_for_readers).
    r->slots[0].store(cache, std::memory_order_relaxed);
    full_fence();
    return &r->slots[0];
  }
  // Slot 0 holds a read (or is in fence mode): another slot.
  for (int i = 1; i < kSlotsPerThread; i++) {
    Slot& s = r->slots[i];
    if (s.load(std::memory_order_relaxed) != kFree) continue;
    s.store(cache, std::memory_order_relaxed);
    if (reader_fence()) {
      // No membarrier: a full fence after naming the cache is the reader's
      // half of the pair with the waiter's seq_cst store and slot loads
      // (a fence, not a seq_cst exchange: the loads of the cache's state
      // that follow are acquire loads, which an exchange alone would not
      // order after it).
      full_fence();
    } else {
      std::atomic_signal_fence(std::memory_order_seq_cst);
    }
    return &s;
  }
  too_many_reads();
}

}  // namespace internal

namespace {

// True if a thread other than the caller may be inside a read. The fence
// orders the caller's stores that made the caches invalid before the loads of
// the gates; it pairs with activation's (enter_slow). A slot 0 seen parked was
// parked by quiesce() or a thread's end with no read held (acquire: the reads
// it did are over), or is about to be unparked, and then that thread's next
// check sees the caches invalid.
bool other_active_readers() {
  internal::full_fence();
  for (const ThreadRecord* r = internal::g_records.load(std::memory_order_acquire); r; r = r->next)
    if (r != internal::t_record && r->slots[0].load(std::memory_order_acquire) != kParked) return true;
  return false;
}

// The full barrier on every running thread that pairs with the readers'
// compiler-only fence. The system call is itself a full barrier on the
// calling thread, between the caller's store that made the caches invalid
// and the loads of the slots that follow.
void barrier_on_every_reader() { NC_CHECK(internal::membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0); }

}  // namespace

bool reading(const void* cache) {
  const auto c = reinterpret_cast<uintptr_t>(cache);
  for (const auto& s : internal::t_record->slots)
    if (s.load(std::memory_order_relaxed) == c) return true;
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
  // Without membarrier, readers fence after naming the cache, which pairs
  // with the caller's seq_cst store and the seq_cst slot loads below.
  bool interrupted = false;
  if (!internal::reader_fence()) {
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
        const uintptr_t v = slot.load(std::memory_order_seq_cst);
        if (!internal::names_cache(v) ||
            std::find(caches.begin(), caches.end(), reinterpret_cast<const void*>(v)) == caches.end())
          break;
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
  // Only an active thread (slot 0 free, not a marker) with no read held.
  if (r->slots[0].load(std::memory_order_relaxed) != kFree || !internal::holds_no_read(*r)) return;
  // Release: the reads this thread did happen before a waiter that sees the
  // slot parked and skips waiting for it.
  r->slots[0].store(kParked, std::memory_order_release);
}

bool active() {
  const uintptr_t gate = internal::t_record->slots[0].load(std::memory_order_relaxed);
  return gate != kParked && gate != kUnregistered;
}

}  // namespace nestcache::vm::cache_readers
