// MonitorTable: MONITOR/MWAIT for the simulated CPUs of one machine, and the
// clock hand-over that makes waiting free in modelled time.
//
// A vCPU that MWAITs arms a monitor on a 64-byte line of host-physical memory
// (a frame and an offset, as hardware monitors physical addresses: an L1 and
// an L2 address of the same word meet here). A guest store to the line wakes
// every vCPU armed on it. From the first monitor armed on a frame, the frame
// is *watched*: every guest access to it goes through the table's lock, and
// keeps time causal — the accessing clock moves on to the line's last-write
// time, and a store sets that time to the storing clock. So a vCPU that waits
// for a word, or finds it already changed, continues at the writer's time.
// Frames nobody waits on are accessed directly, at no cost.
//
// A reader that finds a word already changed, on a frame no monitor watched
// yet, cannot know when it was written: so the memory guest programs
// synchronize through is declared before they run (Machine::watch), and only
// then do clocks carry across every hand-over, whatever the scheduler does.
//
// Races: a store to an unwatched frame rechecks the watched flag after the
// store (seq_cst on both sides), so a monitor armed concurrently either sees
// the new value when it looks under the lock or is woken by the recheck.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "base/model_time.h"
#include "base/mutex.h"
#include "base/types.h"

namespace nestcache::cpu {

class Vcpu;

class MonitorTable {
 public:
  static constexpr uint64_t kLineSize = 64;

  explicit MonitorTable(uint64_t frames);

  bool watched(Pfn pfn) const { return pfn < frames_ && watched_[pfn].load(std::memory_order_seq_cst); }
  // Every guest access to `pfn` goes through the table from now on.
  void watch(Pfn pfn) {
    if (pfn < frames_) watched_[pfn].store(true, std::memory_order_seq_cst);
  }

  // A guest access to (pfn, offset) by a vCPU with `clock`: runs `access` (a
  // load, store or locked RMW of that word; it returns whether it wrote) with
  // the time hand-over described above. `access` runs exactly once.
  template <class Access>
  void access(Pfn pfn, uint64_t offset, ModelClock& clock, Access&& access);

  // MWAIT, first half: arms `waiter`'s monitor on the line of (pfn, offset)
  // and runs `unchanged` under the lock (it reads the monitored word and says
  // whether it still holds the value the guest waits past). Returns true if
  // the vCPU should sleep; false if the word changed (the monitor is disarmed
  // and `clock` took the line's time).
  template <class Check>
  bool arm(Pfn pfn, uint64_t offset, Vcpu* waiter, ModelClock& clock, Check&& unchanged);
  // MWAIT, second half, after the sleep: disarms the monitor; `clock` takes
  // the line's last-write time.
  void disarm(Pfn pfn, uint64_t offset, Vcpu* waiter, ModelClock& clock) NC_EXCLUDES(mu_);

 private:
  struct Line {
    TimeStamp last_write;
    std::vector<Vcpu*> waiters;
  };
  static uint64_t key(Pfn pfn, uint64_t offset) { return pfn * (kPageSize / kLineSize) + offset / kLineSize; }
  // A store to `line` at `clock`'s time: the line's time, and its waiters woken.
  void stored_locked(Line& line, const ModelClock& clock) NC_REQUIRES(mu_);
  // A store the fast path made to a frame that became watched meanwhile.
  void stored_late(Pfn pfn, uint64_t offset, const ModelClock& clock) NC_EXCLUDES(mu_);

  const uint64_t frames_;
  std::unique_ptr<std::atomic<bool>[]> watched_;
  Mutex mu_{LockRank::kMonitor};
  std::unordered_map<uint64_t, Line> lines_ NC_GUARDED_BY(mu_);
};

template <class Access>
void MonitorTable::access(Pfn pfn, uint64_t offset, ModelClock& clock, Access&& access) {
  if (!watched(pfn)) {
    if (!access()) return;
    // Dekker with arm(): our store, then its flag; its flag, then our store.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (watched(pfn)) stored_late(pfn, offset, clock);
    return;
  }
  MutexLock l(mu_);
  Line& line = lines_[key(pfn, offset)];
  clock.merge(line.last_write);
  if (access()) stored_locked(line, clock);
}

template <class Check>
bool MonitorTable::arm(Pfn pfn, uint64_t offset, Vcpu* waiter, ModelClock& clock, Check&& unchanged) {
  if (pfn >= frames_) return false;
  watched_[pfn].store(true, std::memory_order_seq_cst);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  MutexLock l(mu_);
  Line& line = lines_[key(pfn, offset)];
  clock.merge(line.last_write);
  if (!unchanged()) return false;
  line.waiters.push_back(waiter);
  return true;
}

}  // namespace nestcache::cpu
