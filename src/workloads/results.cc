// Selftest and benchmark results and their JSON (see results.h).
#include "workloads/results.h"

#include "base/check.h"
#include "workloads/window_cost.h"

namespace nestcache::workloads {

void SelftestResult::refuse(std::string message) {
  fail(std::move(message));
  usage_error = true;
}

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
      {"usage_error", r.usage_error},
      {"failures", r.failures},
      {"notes", r.notes},
      {"counters", r.counters.to_json()},
      {"details", r.details},
      {"options", opts.extra},
  };
}

namespace {

// {"transitions_ns": ..., ..., "total_ns": ...}: `t`'s parts divided by `by`.
nlohmann::json parts_json(const TimeStamp& t, double by) {
  nlohmann::json j = nlohmann::json::object();
  if (!(by > 0)) return j;
  for (int p = 0; p < kTimeParts; p++)
    j[fmt::format("{}_ns", time_part_name(static_cast<TimePart>(p)))] = static_cast<double>(t.ns[p]) / by;
  j["total_ns"] = static_cast<double>(t.total()) / by;
  return j;
}

}  // namespace

nlohmann::json BenchRow::breakdown() const {
  // A view the row has no time for is empty, as in the table.
  return {{"per_iteration", parts_json(loop.modelled, static_cast<double>(iterations))},
          {"per_round_trip",
           has_time(&BenchRow::seconds_per_round_trip)
               ? parts_json(round_trips_after_cold ? TimeStamp::interval(cold.modelled, loop.modelled) : loop.modelled,
                            static_cast<double>(counters[Counter::nested_round_trips]))
               : nlohmann::json::object()},
          {"cold_iteration", parts_json(cold.modelled, iterations > 0 ? 1 : 0)}};
}

nlohmann::json BenchRow::to_json() const {
  // A view the row has no time for (no iteration, or no round trip) is
  // null, as the table prints "-": never a 0 s a reader could take for one.
  nlohmann::json j = {
      {"test", test},
      {"strategy", vmx::strategy_name(strategy)},
      {"clock", clock_kind_name(clock)},
      {"seconds_per_iteration", time_json(&BenchRow::seconds_per_iteration)},
      {"iterations", iterations},
      {"cold_iteration_seconds", time_json(&BenchRow::cold_iteration_seconds)},
      {"seconds_per_round_trip", time_json(&BenchRow::seconds_per_round_trip)},
      {"wall_seconds_per_iteration",
       iterations ? nlohmann::json(loop.wall_seconds / static_cast<double>(iterations)) : nlohmann::json()},
      {"breakdown", breakdown()},
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

nlohmann::json BenchReport::window_cost() const {
  if (options.clock != cpu::ClockKind::modelled) return nullptr;
  auto j = window_cost_json(options.window_cost_ns);
  return j ? *j : nlohmann::json(nullptr);
}

nlohmann::json BenchReport::to_json() const {
  nlohmann::json strategies = nlohmann::json::array();
  for (vmx::StrategyKind s : options.strategies) strategies.push_back(vmx::strategy_name(s));
  nlohmann::json results = nlohmann::json::array();
  for (const BenchRow& row : rows) results.push_back(row.to_json());
  nlohmann::json j = {
      {"clock", clock_kind_name(options.clock)},
      {"guest_op_ns", options.costs.op_ns},
      {"locked_op_ns", options.costs.locked_op_ns},
      {"pause_ns", options.costs.pause_ns},
      {"exit_cost_ns", exit_cost_ns()},
      {"window_cost", window_cost()},
      {"extra_caches", options.extra_caches},
      {"l1_hz", options.l1_hz},
      {"slots", options.slots},
      {"memory", memory_kind_name(options.memory)},
      {"seconds_limit", options.iterations > 0 ? nlohmann::json() : nlohmann::json(options.seconds)},
      {"iterations_limit", options.iterations > 0 ? nlohmann::json(options.iterations) : nlohmann::json()},
      {"runs", options.runs},
      {"scale", options.scale},
      {"verify", options.verify},
      {"strategies", strategies},
      {"io",
       {{"rate", options.io.rate},
        {"work", options.io.work},
        {"l2_vcpus", options.io.l2_vcpus},
        {"l1_vcpus", options.io.l1_vcpus},
        {"msr_every", options.io.msr_every}}},
      {"results", results},
      {"comparisons", comparisons},
  };
  if (!could_not_run.empty()) j["could_not_run"] = could_not_run;
  return j;
}

CounterSnapshot merge_run_counters(const CounterSnapshot& phys, std::span<const CounterSnapshot> others) {
  // The pool's own counters: every event in them reaches PhysMem, whichever
  // object also counted it. A failed window munmap is counted by PhysMem
  // alone, so it must come from `phys` too, or a run reports windows left
  // open with no munmap failure behind them.
  static constexpr Counter kPoolCounters[] = {Counter::remap_windows, Counter::remap_windows_closed,
                                              Counter::remap_window_unmap_failures, Counter::pins,
                                              Counter::unpins, Counter::stale_accesses};
  CounterSnapshot sum;
  for (const CounterSnapshot& o : others) sum += o;
  for (Counter c : kPoolCounters) sum[c] = phys[c];
  return sum;
}

}  // namespace nestcache::workloads
