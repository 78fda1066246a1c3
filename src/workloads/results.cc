// Selftest and benchmark results and their JSON (see results.h).
#include "workloads/results.h"

#include "base/check.h"

namespace nestcache::workloads {

void SelftestResult::fail(std::string message) {
  failures.push_back(std::move(message));
  passed = false;
}

nlohmann::json selftest_json(std::string_view test, const RunOptions& opts, const SelftestResult& r) {
  return {
      {"test", test},
      {"strategy", vmx::strategy_name(opts.strategy)},
      {"memory", memory_kind_name(opts.memory)},
      {"passed", r.passed},
      {"failures", r.failures},
      {"notes", r.notes},
      {"counters", r.counters.to_json()},
      {"details", r.details},
      {"options", opts.extra},
  };
}

nlohmann::json BenchRow::to_json() const {
  nlohmann::json j = {
      {"test", test},
      {"strategy", vmx::strategy_name(strategy)},
      {"seconds_per_iteration", seconds_per_iteration},
      {"iterations", iterations},
      {"cold_iteration_seconds", cold_iteration_seconds},
      {"seconds_per_round_trip", seconds_per_round_trip},
      {"failures", failures},
      {"counters", counters.to_json()},
  };
  for (Counter c : {Counter::nested_round_trips, Counter::shootdowns, Counter::ept12_faults, Counter::maps,
                    Counter::unmaps, Counter::remap_windows, Counter::stale_accesses})
    j[std::string(counter_name(c))] = counters[c];
  for (const auto& [key, value] : extra.items()) {
    NC_CHECK(!j.contains(key));  // a test-specific field must not shadow a standard one
    j[key] = value;
  }
  return j;
}

const BenchRow* row_of(std::span<const BenchRow> rows, vmx::StrategyKind s) {
  for (const BenchRow& r : rows)
    if (r.strategy == s) return &r;
  return nullptr;
}

uint64_t BenchReport::exit_cost_ns() const {
  if (options.exit_cost_ns) return *options.exit_cost_ns;
  return rows.empty() ? 0 : rows.front().exit_cost_ns;
}

nlohmann::json BenchReport::to_json() const {
  nlohmann::json strategies = nlohmann::json::array();
  for (vmx::StrategyKind s : options.strategies) strategies.push_back(vmx::strategy_name(s));
  nlohmann::json results = nlohmann::json::array();
  for (const BenchRow& row : rows) results.push_back(row.to_json());
  return {
      {"exit_cost_ns", exit_cost_ns()},
      {"l1_hz", options.l1_hz},
      {"slots", options.slots},
      {"memory", memory_kind_name(options.memory)},
      {"seconds_limit", options.seconds},
      {"iterations_limit", options.iterations > 0 ? nlohmann::json(options.iterations) : nlohmann::json()},
      {"runs", options.runs},
      {"scale", options.scale},
      {"verify", options.verify},
      {"strategies", strategies},
      {"results", results},
  };
}

CounterSnapshot merge_run_counters(const CounterSnapshot& phys, std::span<const CounterSnapshot> others) {
  // The pool's own counters: every event in them reaches PhysMem, whichever
  // object also counted it.
  static constexpr Counter kPoolCounters[] = {Counter::remap_windows, Counter::remap_windows_closed, Counter::pins,
                                              Counter::unpins, Counter::stale_accesses};
  CounterSnapshot sum;
  for (const CounterSnapshot& o : others) sum += o;
  for (Counter c : kPoolCounters) sum[c] = phys[c];
  return sum;
}

}  // namespace nestcache::workloads
