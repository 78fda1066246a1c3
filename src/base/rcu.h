// Read-copy-update, from liburcu's "bulletproof" flavour.
//
// The bp flavour registers reader threads on their first read-side critical
// section, so vCPU threads, host threads and test threads need no set-up.
// Readers never block; an updater publishes a new pointer and calls
// synchronize() before freeing or rewriting what readers may still see.
//
// Under ThreadSanitizer the grace period is also told to TSan (see
// detail::section_ends), since liburcu is not instrumented and TSan would
// otherwise report every write an updater makes after synchronize() as a race
// with the readers it waited for.
#pragma once

// Without _LGPL_SOURCE the read-side calls go into liburcu-bp.so instead of
// being inlined: the inline versions touch the library's thread-local reader
// record, whose declared 128-byte alignment the shared library's TLS does not
// honour, and UBSan's alignment check stops on it.
#include <urcu-bp.h>

#include <atomic>

#include "base/check.h"
#include "base/sanitizers.h"

#ifdef NC_TSAN
#include <sanitizer/tsan_interface.h>
#endif

namespace nestcache::rcu {

namespace detail {
#ifdef NC_TSAN
// liburcu orders a grace period with its own fences and membarrier() around
// per-thread counters in an uninstrumented library, so TSan sees no
// happens-before from a reader's section to the updater's return from
// synchronize(). This is that edge, and only that one: the end of every
// read-side section releases this address, and synchronize() acquires it
// once liburcu has waited. What a thread does outside its sections is not
// covered, so a reader that keeps a pointer past its section is still
// reported. (It orders a little more than RCU promises — a section that began
// after the grace period did, and ended before it ended, is ordered too — so
// it can hide a race only in an interleaving TSan did not run; it cannot
// report one.)
inline char grace_period_edge;
inline void section_ends() { __tsan_release(&grace_period_edge); }
inline void grace_period_ended() { __tsan_acquire(&grace_period_edge); }
#else
inline void section_ends() {}
inline void grace_period_ended() {}
#endif
}  // namespace detail

class ReadLock {
 public:
  ReadLock() { urcu_bp_read_lock(); }
  ~ReadLock() {
    detail::section_ends();  // before the unlock: the section's accesses come first
    urcu_bp_read_unlock();
  }
  ReadLock(const ReadLock&) = delete;
  ReadLock& operator=(const ReadLock&) = delete;
};

// Aborts unless the calling thread is inside a read-side section (a
// ReadLock). Checked only with NESTCACHE_LOCK_CHECKS, like the lock order.
inline void assert_read_locked() {
#ifdef NESTCACHE_LOCK_CHECKS
  NC_CHECK(urcu_bp_read_ongoing());
#endif
}

// An RCU-published pointer. The pointer itself is a C++ atomic (release on
// publish, acquire on read) so ThreadSanitizer sees the publication; the
// grace period comes from liburcu.
template <class T>
class Pointer {
 public:
  // Call inside a ReadLock; the object stays alive until the ReadLock ends.
  T* read() const { return p_.load(std::memory_order_acquire); }
  // Returns the previous pointer, to be freed after synchronize().
  T* publish(T* v) { return p_.exchange(v, std::memory_order_acq_rel); }

 private:
  std::atomic<T*> p_{nullptr};
};

// Waits until every read-side critical section that might have seen an old
// pointer has ended. Must not be called inside a ReadLock.
inline void synchronize() {
  urcu_bp_synchronize_rcu();
  detail::grace_period_ended();
}

}  // namespace nestcache::rcu
