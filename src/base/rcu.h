// Read-copy-update, from liburcu's "bulletproof" flavour.
//
// The bp flavour registers reader threads on their first read-side critical
// section, so vCPU threads, host threads and test threads need no set-up.
// Readers never block; an updater publishes a new pointer and calls
// synchronize() before freeing what readers may still see.
#pragma once

// Without _LGPL_SOURCE the read-side calls go into liburcu-bp.so instead of
// being inlined: the inline versions touch the library's thread-local reader
// record, whose declared 128-byte alignment the shared library's TLS does not
// honour, and UBSan's alignment check stops on it.
#include <urcu-bp.h>

#include <atomic>

namespace nestcache::rcu {

class ReadLock {
 public:
  ReadLock() { urcu_bp_read_lock(); }
  ~ReadLock() { urcu_bp_read_unlock(); }
  ReadLock(const ReadLock&) = delete;
  ReadLock& operator=(const ReadLock&) = delete;
};

// An RCU-published pointer. The pointer itself is a C++ atomic (release on
// publish, acquire on read) so ThreadSanitizer sees the publication; only the
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
// pointer has ended.
inline void synchronize() { urcu_bp_synchronize_rcu(); }

}  // namespace nestcache::rcu
