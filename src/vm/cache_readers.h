// Lock-free pfn-cache readers: which thread is reading which cache right now.
//
// A lock-free reader (PfnCache's lockfree read side) names the cache it reads
// in a slot of its thread's record *before* it checks the cache, and clears
// the slot when it is done. It takes no lock and makes no atomic
// read-modify-write: entering costs two loads (a free slot, the thread's
// `active` flag, below) and a store, leaving one store.
//
// Whoever must know that no reader still uses a cache's old mapping (an
// invalidation about to let the host copy and free the frame, a refresh about
// to unmap an old remap window) first makes the cache invalid, then calls
// wait_for_readers(). That issues one membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED),
// which makes every running thread of the process execute a full memory
// barrier, so each reader either has its slot visible (and is waited for) or
// will see the cache invalid when it checks; then it waits until no slot
// names the cache. This is the asymmetric fence of liburcu's "memb" flavour:
// the cost moves from every read to every invalidation that finds a
// lock-free cache. Where membarrier is missing (an old kernel, a seccomp
// filter) readers issue the full fence themselves and the waiter a plain one.
//
// The membarrier interrupts every CPU that runs a thread of the process, and
// on a virtual machine such an interrupt is an exit to its host: microseconds.
// Most of those threads are not reading caches at all, so each thread also
// says whether it is an *active* reader. A thread becomes active at its first
// read after quiescing, with one full fence; it stops being one when it
// quiesces (quiesce(): a vCPU about to block, a reading thread that ends),
// which it may do only with no read held. A waiter, after its own full fence,
// skips the membarrier when no thread but itself is active: a thread that is
// not active holds no read, and if it activates now its fence pairs with the
// waiter's, so its first check sees the caches invalid. Activation is
// Dekker's pattern with a real fence on both sides; it costs the reader only
// when it wakes up, not per read.
//
// A thread may hold up to kSlotsPerThread reads at once. A read belongs to
// the thread that entered it.
#pragma once

#include <atomic>
#include <cstdint>
#include <span>

namespace nestcache::vm::cache_readers {

inline constexpr int kSlotsPerThread = 7;  // with `active`, one cache line

// A reader slot: the cache a read names, or null.
using Slot = std::atomic<const void*>;

// One thread's slots. Records are never freed: a thread that ends hands its
// record (with every slot empty) to the next thread that starts reading.
struct alignas(64) ThreadRecord {
  // What every read touches, in the record's first cache line.
  Slot slots[kSlotsPerThread] = {};
  std::atomic<bool> active{false};  // an active reader: see the header comment
  // Touched only when a thread starts or ends.
  std::atomic<bool> in_use{false};
  ThreadRecord* next = nullptr;  // set once, before the record is published
};

namespace internal {
// The calling thread's record, or null before its first read. Constant
// initialisation, so reaching it is one TLS load with no guard.
inline thread_local ThreadRecord* t_record = nullptr;
// Set once before main: true when membarrier is unavailable and readers must
// fence themselves.
extern bool g_reader_fence;
// Gives the calling thread a record and returns it.
ThreadRecord* register_thread() noexcept;
// Marks `r` active, with the full fence that orders that before the
// thread's next loads of a cache's state.
void activate(ThreadRecord* r) noexcept;
[[noreturn]] void too_many_reads();
}  // namespace internal

// Publishes that the calling thread reads `cache` (any unique address) and
// orders that before whatever the caller loads next. Returns the slot to pass
// to exit(). Aborts if the thread already holds kSlotsPerThread reads.
inline Slot* enter(const void* cache) {
  ThreadRecord* r = internal::t_record;
  if (!r) [[unlikely]]
    r = internal::register_thread();
  if (!r->active.load(std::memory_order_relaxed)) [[unlikely]]
    internal::activate(r);
  // Unrolled: the first slot is free unless the thread holds another read,
  // and then the search is one load at a fixed offset, with no index.
#pragma GCC unroll 8
  for (int i = 0; i < kSlotsPerThread; i++) {
    // Only this thread writes its slots, so a relaxed look is exact.
    if (r->slots[i].load(std::memory_order_relaxed) == nullptr) {
      // The slot store must precede the caller's loads of the cache's state.
      // With membarrier the waiter supplies the CPU-level fence and only the
      // compiler must keep the order; without, a seq_cst exchange is the
      // reader's half of the fence pair.
      if (internal::g_reader_fence) [[unlikely]] {
        r->slots[i].exchange(cache, std::memory_order_seq_cst);
      } else {
        r->slots[i].store(cache, std::memory_order_relaxed);
        std::atomic_signal_fence(std::memory_order_seq_cst);
      }
      return &r->slots[i];
    }
  }
  internal::too_many_reads();
}

// Ends the read entered as `slot`: everything the reader did through the
// cache happens before a waiter sees the slot empty.
inline void exit(Slot* slot) { slot->store(nullptr, std::memory_order_release); }

// Returns once no thread is inside a read of any of `caches` that began
// before this call; a read that begins later sees what the caller stored
// before the call. The caller must not itself be reading any of them (that
// would wait for ever: aborts instead). Waits by spinning briefly, then
// yielding: reads are short. Returns true if it had to interrupt the other
// threads (the membarrier: another thread was an active reader), false if a
// fence of its own was enough.
bool wait_for_readers(std::span<const void* const> caches);

// The calling thread stops being an active reader, so that invalidations
// need not interrupt it: call before blocking for a while (a vCPU that
// halts). Does nothing while the thread holds a read. Its next read pays
// one fence.
void quiesce();

// True if the calling thread is an active reader (tests).
bool active();

// True if waits interrupt active readers with a membarrier; false where the
// kernel has none and every read fences for itself instead.
inline bool uses_membarrier() { return !internal::g_reader_fence; }

// True if the calling thread is inside a read of `cache`.
bool reading(const void* cache);

}  // namespace nestcache::vm::cache_readers
