#include "base/counters.h"

#include <nlohmann/json.hpp>

namespace nestcache {

namespace {
constexpr std::string_view kNames[] = {
#define NC_COUNTER_NAME(name, desc) #name,
    NC_COUNTERS(NC_COUNTER_NAME)
#undef NC_COUNTER_NAME
};
}  // namespace

std::string_view counter_name(Counter c) { return kNames[static_cast<int>(c)]; }

std::optional<Counter> counter_from_name(std::string_view name) {
  for (int i = 0; i < kNumCounters; i++)
    if (kNames[i] == name) return static_cast<Counter>(i);
  return std::nullopt;
}

CounterSnapshot CounterSnapshot::of(const CounterSet& s) {
  CounterSnapshot r;
  for (int i = 0; i < kNumCounters; i++) r.v[i] = s.get(static_cast<Counter>(i));
  return r;
}

CounterSnapshot& CounterSnapshot::operator+=(const CounterSnapshot& o) {
  for (int i = 0; i < kNumCounters; i++) v[i] += o.v[i];
  return *this;
}

CounterSnapshot CounterSnapshot::operator-(const CounterSnapshot& o) const {
  CounterSnapshot r;
  for (int i = 0; i < kNumCounters; i++) r.v[i] = v[i] - o.v[i];
  return r;
}

nlohmann::json CounterSnapshot::to_json() const {
  nlohmann::json j = nlohmann::json::object();
  for (int i = 0; i < kNumCounters; i++) j[std::string(kNames[i])] = v[i];
  return j;
}

}  // namespace nestcache
