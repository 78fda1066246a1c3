// Lock-free pfn-cache readers: which thread is reading which cache right now.
//
// A lock-free reader (PfnCache's lockfree read side) names the cache it reads
// in a slot of its thread's record *before* it checks the cache, and clears
// the slot when it is done. It takes no lock and makes no atomic
// read-modify-write: entering costs two loads (the thread's record, its
// slot 0, below) and a store, leaving one store.
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
// filter) readers issue the full fence themselves after naming the cache,
// and the waiter's seq_cst store and slot loads are its half.
//
// The membarrier interrupts every CPU that runs a thread of the process, and
// on a virtual machine such an interrupt is an exit to its host: microseconds.
// Most of those threads are not reading caches at all, so each thread also
// says whether it is an *active* reader (slot 0 not kParked, below). A thread
// becomes active at its first read after quiescing, with one full fence; it
// stops being one when it quiesces (quiesce(): a vCPU about to block, a
// reading thread that ends), which it may do only with no read held. A
// waiter, after its own full fence, skips the membarrier when no thread but
// itself is active: a thread that is not active holds no read, and if it
// activates now its fence pairs with the waiter's, so its first check sees
// the caches invalid. Activation is Dekker's pattern with a real fence on
// both sides; it costs the reader only when it wakes up, not per read.
//
// Slot 0 is also the thread's gate. It holds a cache, nothing (kFree), or a
// marker: kParked (the thread is not an active reader), kFenceMode (readers
// fence for themselves: no membarrier) or kUnregistered (the placeholder
// record a thread reads through before its first read). So the common entry
// (an active thread holding no other read, with membarrier) is one test of
// slot 0 being free, and everything else (registering, activating, fencing,
// a second read held at once) takes one out-of-line path behind that test.
// A thread may hold up to kSlotsPerThread - 1 reads at once (kSlotsPerThread
// where membarrier works and slot 0 is free for one of them). A read belongs
// to the thread that entered it.
#pragma once

#include <atomic>
#include <cstdint>
#include <span>

namespace nestcache::vm::cache_readers {

inline constexpr int kSlotsPerThread = 8;  // one cache line

// A reader slot: the address of the cache a read names, kFree, or (slot 0
// only) a marker. Markers are below any cache's address.
using Slot = std::atomic<uintptr_t>;
inline constexpr uintptr_t kFree = 0;
inline constexpr uintptr_t kParked = 1;
inline constexpr uintptr_t kFenceMode = 2;
inline constexpr uintptr_t kUnregistered = 3;
inline constexpr uintptr_t kLastMarker = kUnregistered;

// One thread's slots. Records are never freed: a thread that ends hands its
// record (with every slot empty and slot 0 parked) to the next thread that
// starts reading.
struct alignas(64) ThreadRecord {
  // What every read touches: the record's first cache line.
  Slot slots[kSlotsPerThread] = {};
  // Touched only when a thread starts or ends.
  std::atomic<bool> in_use{false};
  ThreadRecord* next = nullptr;  // set once, before the record is published
};

namespace internal {
// Slot 0 kUnregistered, the others free; never written, never in the list.
inline constinit ThreadRecord g_unregistered = {{kUnregistered}};
// The calling thread's record, &g_unregistered before its first read.
// Constant initialisation, so reaching it is one TLS load with no guard,
// and never null, so with the slot test that is all an entry loads.
inline constinit thread_local ThreadRecord* t_record = &g_unregistered;
// True when membarrier is unavailable and readers must fence themselves (or
// when NESTCACHE_NO_MEMBARRIER is set, to test that path on a kernel that
// has it). Decided, and membarrier registered, at the first call, before any
// thread registers as a reader, so every thread's record agrees with it.
bool reader_fence() noexcept;
// enter() when slot 0 is not free: registers the thread, activates it,
// fences, or finds a free slot among 1..kSlotsPerThread-1 (aborting when
// there is none). Returns the slot the read now names.
[[gnu::returns_nonnull, gnu::noinline]] Slot* enter_slow(ThreadRecord* r, uintptr_t cache) noexcept;
}  // namespace internal

// Publishes that the calling thread reads `cache` (any address aligned to 8
// or more) and orders that before whatever the caller loads next. Returns the
// slot to pass to exit(). Aborts if the thread holds too many reads.
[[gnu::always_inline]] inline Slot* enter(const void* cache) {
  ThreadRecord* const r = internal::t_record;
  if (r == nullptr) __builtin_unreachable();
  const auto c = reinterpret_cast<uintptr_t>(cache);
  // Only this thread writes its slots, so a relaxed look is exact.
  if (r->slots[0].load(std::memory_order_relaxed) == kFree) [[likely]] {
    // The slot store must precede the caller's loads of the cache's state:
    // the waiter's membarrier supplies the CPU-level fence, and only the
    // compiler must keep the order.
    r->slots[0].store(c, std::memory_order_relaxed);
    std::atomic_signal_fence(std::memory_order_seq_cst);
    return &r->slots[0];
  }
  return internal::enter_slow(r, c);
}

// Ends the read entered as `slot`: everything the reader did through the
// cache happens before a waiter sees the slot empty.
inline void exit(Slot* slot) { slot->store(kFree, std::memory_order_release); }

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
// halts). Does nothing while the thread holds a read, or without
// membarrier. Its next read pays one fence.
void quiesce();

// True if the calling thread is an active reader (tests). Without membarrier
// a registered thread always is: it never quiesces, as its reads fence.
bool active();

// True if waits interrupt active readers with a membarrier; false where the
// kernel has none and every read fences for itself instead.
inline bool uses_membarrier() { return !internal::reader_fence(); }

// True if the calling thread is inside a read of `cache`.
bool reading(const void* cache);

}  // namespace nestcache::vm::cache_readers
