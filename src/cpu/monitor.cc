#include "cpu/monitor.h"

#include <algorithm>

#include "cpu/vcpu.h"

namespace nestcache::cpu {

MonitorTable::MonitorTable(uint64_t frames) : frames_(frames), watched_(new std::atomic<bool>[frames]) {
  for (uint64_t i = 0; i < frames; i++) watched_[i].store(false, std::memory_order_relaxed);
}

void MonitorTable::stored_locked(Line& line, const ModelClock& clock) {
  mu_.assert_held();
  line.last_write = TimeStamp::later(line.last_write, clock.stamp());
  for (Vcpu* w : line.waiters) w->monitor_fired();
}

void MonitorTable::stored_late(Pfn pfn, uint64_t offset, const ModelClock& clock) {
  MutexLock l(mu_);
  stored_locked(lines_[key(pfn, offset)], clock);
}

void MonitorTable::disarm(Pfn pfn, uint64_t offset, Vcpu* waiter, ModelClock& clock) {
  MutexLock l(mu_);
  Line& line = lines_[key(pfn, offset)];
  auto& w = line.waiters;
  w.erase(std::remove(w.begin(), w.end(), waiter), w.end());
  clock.merge(line.last_write);
}

}  // namespace nestcache::cpu
