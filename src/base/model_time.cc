#include "base/model_time.h"

#include <time.h>

#include <algorithm>
#include <vector>

namespace nestcache {

namespace {
thread_local ModelClock* tls_clock = nullptr;

uint64_t measure_read_overhead() {
  // Back-to-back reads: what lies between them is the second half of one
  // read and the first half of the next, i.e. what every measured interval
  // carries on top of the work it bounds. The median ignores preemptions.
  std::vector<uint64_t> deltas(501);
  for (auto& d : deltas) {
    uint64_t a = thread_cpu_ns();
    uint64_t b = thread_cpu_ns();
    d = b - a;
  }
  std::nth_element(deltas.begin(), deltas.begin() + deltas.size() / 2, deltas.end());
  return deltas[deltas.size() / 2];
}
}  // namespace

std::string_view time_part_name(TimePart p) {
  switch (p) {
    case TimePart::transitions: return "transitions";
    case TimePart::guest_ops: return "guest_ops";
    case TimePart::remap_windows: return "remap_windows";
    case TimePart::pfn_cache: return "pfn_cache";
    case TimePart::other_l0: return "other_l0";
    case TimePart::idle: return "idle";
    case TimePart::kCount: break;
  }
  return "?";
}

uint64_t TimeStamp::total() const {
  uint64_t t = 0;
  for (uint64_t n : ns) t += n;
  return t;
}

TimeStamp operator-(const TimeStamp& a, const TimeStamp& b) {
  TimeStamp d;
  for (int i = 0; i < kTimeParts; i++) d.ns[i] = a.ns[i] > b.ns[i] ? a.ns[i] - b.ns[i] : 0;
  return d;
}

TimeStamp TimeStamp::interval(const TimeStamp& from, const TimeStamp& to) {
  TimeStamp d = to - from;
  const uint64_t want = to.total() > from.total() ? to.total() - from.total() : 0;
  const uint64_t have = d.total();  // at least `want`: each clamped part is at least its difference
  if (have == want) return d;
  TimeStamp scaled;
  uint64_t sum = 0;
  int largest = 0;
  for (int i = 0; i < kTimeParts; i++) {
    scaled.ns[i] = static_cast<uint64_t>(static_cast<unsigned __int128>(d.ns[i]) * want / have);
    sum += scaled.ns[i];
    if (d.ns[i] > d.ns[largest]) largest = i;
  }
  scaled.ns[largest] += want - sum;  // what rounding down left
  return scaled;
}

uint64_t thread_cpu_ns() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<uint64_t>(t.tv_sec) * 1'000'000'000u + static_cast<uint64_t>(t.tv_nsec);
}

uint64_t thread_cpu_read_overhead_ns() {
  static const uint64_t overhead = measure_read_overhead();
  return overhead;
}

ModelClock* ModelClock::current() { return tls_clock; }

ModelClock::Binding::Binding(ModelClock& clock) : previous_(tls_clock) { tls_clock = &clock; }
ModelClock::Binding::~Binding() { tls_clock = previous_; }

void ModelClock::advance_to(uint64_t total, TimePart p) {
  uint64_t now = stamp_.total();
  if (total > now) charge(p, total - now);
}

void ModelClock::settle() {
  uint64_t t = thread_cpu_ns();
  uint64_t spent = t - last_cpu_ns_;
  uint64_t overhead = thread_cpu_read_overhead_ns();
  charge(part_, spent > overhead ? spent - overhead : 0);
  last_cpu_ns_ = t;
}

void ModelClock::begin_measured() {
  if (measuring_) return;
  (void)thread_cpu_read_overhead_ns();  // calibrate outside any interval
  measuring_ = true;
  part_ = TimePart::other_l0;
  last_cpu_ns_ = thread_cpu_ns();
}

void ModelClock::end_measured() {
  if (!measuring_) return;
  settle();
  measuring_ = false;
}

ModelClock::PartScope::PartScope(TimePart part) : clock_(tls_clock) {
  if (!clock_ || !clock_->measuring_) {
    clock_ = nullptr;
    return;
  }
  clock_->settle();
  outer_ = clock_->part_;
  clock_->part_ = part;
}

ModelClock::PartScope::~PartScope() {
  if (!clock_ || !clock_->measuring_) return;
  clock_->settle();
  clock_->part_ = outer_;
}

ModelClock::FixedCost::FixedCost(uint64_t ns) : clock_(tls_clock), ns_(ns) {
  if (!clock_ || !clock_->measuring_) {
    clock_ = nullptr;
    return;
  }
  clock_->settle();
}

ModelClock::FixedCost::~FixedCost() {
  if (!clock_ || !clock_->measuring_) return;
  clock_->last_cpu_ns_ = thread_cpu_ns();  // the scope's own CPU time is dropped
  clock_->charge(clock_->part_, ns_);
}

}  // namespace nestcache
