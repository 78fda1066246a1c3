// Annotated mutexes and scoped lockers.
//
// Thin wrappers over std::mutex and std::shared_mutex that (1) carry Clang
// thread-safety capabilities so NC_GUARDED_BY fields are checked at compile
// time, and (2) carry a LockRank (base/lock_order.h) that debug builds check
// at run time. Use the scoped lockers; call lock()/unlock() directly only
// where a protocol really drops and retakes a lock (and say why there).
#pragma once

#include <condition_variable>
#include <mutex>
#include <shared_mutex>

#include "base/lock_order.h"
#include "base/model_time.h"
#include "base/sanitizers.h"
#include "base/thread_annotations.h"

#ifdef NC_TSAN
#include <pthread.h>
#endif

namespace nestcache {

namespace lock_checks {
// Record that the calling thread takes / drops a lock of `rank`. No-ops unless
// NESTCACHE_LOCK_CHECKS is defined.
void acquire(LockRank rank, const void* lock);
void release(LockRank rank, const void* lock);
// Aborts unless the calling thread holds `lock` (any mode). Unranked locks are
// not tracked, so the check passes for them. No-op without NESTCACHE_LOCK_CHECKS.
void assert_held(LockRank rank, const void* lock);
}  // namespace lock_checks

class NC_CAPABILITY("mutex") Mutex {
 public:
  explicit Mutex(LockRank rank = LockRank::kNone) : rank_(rank) {}
#ifdef NC_TSAN
  // libstdc++'s std::mutex never destroys its pthread mutex, so
  // ThreadSanitizer would not learn that this lock died: a later lock at the
  // same address (another test's object on the same stack slot) would inherit
  // its place in the lock-order graph and make a cycle of two unrelated
  // objects. (std::shared_mutex destroys its rwlock itself.)
  ~Mutex() { pthread_mutex_destroy(mu_.native_handle()); }
#endif
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void lock() NC_ACQUIRE() {
    lock_checks::acquire(rank_, this);
    mu_.lock();
  }
  void unlock() NC_RELEASE() {
    mu_.unlock();
    lock_checks::release(rank_, this);
  }
  // Aborts (in lock-checking builds) unless the calling thread holds this
  // lock; tells the compile-time analysis the same. For `*_locked` functions,
  // next to their NC_REQUIRES.
  void assert_held() const NC_ASSERT_CAPABILITY(this) { lock_checks::assert_held(rank_, this); }
  // For condition variables: std::condition_variable_any calls lock/unlock.
  std::mutex& native() { return mu_; }
  LockRank rank() const { return rank_; }

 private:
  std::mutex mu_;
  LockRank rank_;
};

class NC_CAPABILITY("shared_mutex") SharedMutex {
 public:
  explicit SharedMutex(LockRank rank = LockRank::kNone) : rank_(rank) {}
  SharedMutex(const SharedMutex&) = delete;
  SharedMutex& operator=(const SharedMutex&) = delete;

  void lock() NC_ACQUIRE() {
    lock_checks::acquire(rank_, this);
    mu_.lock();
  }
  void unlock() NC_RELEASE() {
    mu_.unlock();
    lock_checks::release(rank_, this);
  }
  void lock_shared() NC_ACQUIRE_SHARED() {
    lock_checks::acquire(rank_, this);
    mu_.lock_shared();
  }
  void unlock_shared() NC_RELEASE_SHARED() {
    mu_.unlock_shared();
    lock_checks::release(rank_, this);
  }
  // As Mutex::assert_held: held exclusively or shared (the run-time check
  // cannot tell the two apart; the compile-time annotation asks for exclusive).
  void assert_held() const NC_ASSERT_CAPABILITY(this) { lock_checks::assert_held(rank_, this); }
  void assert_shared_held() const NC_ASSERT_SHARED_CAPABILITY(this) { lock_checks::assert_held(rank_, this); }

 private:
  std::shared_mutex mu_;
  LockRank rank_;
};

class NC_SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex& mu) NC_ACQUIRE(mu) : mu_(mu) { mu_.lock(); }
  ~MutexLock() NC_RELEASE() { mu_.unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex& mu_;
};

class NC_SCOPED_CAPABILITY WriterLock {
 public:
  explicit WriterLock(SharedMutex& mu) NC_ACQUIRE(mu) : mu_(mu) { mu_.lock(); }
  ~WriterLock() NC_RELEASE() { mu_.unlock(); }
  WriterLock(const WriterLock&) = delete;
  WriterLock& operator=(const WriterLock&) = delete;

 private:
  SharedMutex& mu_;
};

class NC_SCOPED_CAPABILITY ReaderLock {
 public:
  explicit ReaderLock(SharedMutex& mu) NC_ACQUIRE_SHARED(mu) : mu_(mu) { mu_.lock_shared(); }
  ~ReaderLock() NC_RELEASE() { mu_.unlock_shared(); }
  ReaderLock(const ReaderLock&) = delete;
  ReaderLock& operator=(const ReaderLock&) = delete;

 private:
  SharedMutex& mu_;
};

// A condition variable usable with Mutex. wait() must be called with `mu`
// held; it is released while blocked and held again on return.
class CondVar {
 public:
  template <class Pred>
  void wait(Mutex& mu, Pred pred) NC_REQUIRES(mu) {
    // std::condition_variable_any drives Mutex::lock/unlock, keeping the
    // lock-order bookkeeping right across the wait.
    cv_.wait(mu, pred);
  }
  template <class Pred, class Duration>
  bool wait_for(Mutex& mu, Duration d, Pred pred) NC_REQUIRES(mu) {
    return cv_.wait_for(mu, d, pred);
  }
  // Waking a waiter is the simulator's hand-off, not L0 work (on hardware a
  // store ends an MWAIT for free and an IPI's cost lands on the receiver, as
  // its exit): modelled time does not count it. Its CPU time would depend on
  // the load besides — waking a thread whose CPU is idle takes an IPI.
  void notify_one() {
    ModelClock::FixedCost handoff(0);
    cv_.notify_one();
  }
  void notify_all() {
    ModelClock::FixedCost handoff(0);
    cv_.notify_all();
  }

 private:
  std::condition_variable_any cv_;
};

}  // namespace nestcache
