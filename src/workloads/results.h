// What scenarios return: a selftest's verdict and a benchmark's rows, with the
// JSON shapes every command prints and the rule for counting a run's events
// once.
#pragma once

#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "base/counters.h"
#include "workloads/options.h"
#include "workloads/stopwatch.h"

namespace nestcache::workloads {

// What a selftest found. `passed` is true exactly when `failures` is empty;
// fail() and check() keep the two in step.
struct SelftestResult {
  bool passed = true;
  // Assertion messages, one per failed check: "stale_accesses = 3, expected 0".
  std::vector<std::string> failures = {};
  // Plain sentences for the human summary: "map on unmanaged memory: 12 stale
  // accesses detected — the bug the seed fixes".
  std::vector<std::string> notes = {};
  // Anything else worth keeping in the JSON output (sizes, timings, ...).
  nlohmann::json details = nlohmann::json::object();
  // The run's counters, each event counted once (see merge_run_counters).
  CounterSnapshot counters = {};

  void fail(std::string message);
  // A failure caused by the options, not the system under test (a value
  // out of range, options that exclude each other): recorded as fail() does
  // and marked, so the CLI exits with its usage status (2).
  void refuse(std::string message);
  bool usage_error = false;
  void note(std::string sentence) { notes.push_back(std::move(sentence)); }
  // Records a failure formatted from `f` if `cond` is false (the message is
  // formatted only then). Returns `cond`, for early returns.
  template <class... Args>
  bool check(bool cond, fmt::format_string<Args...> f, Args&&... args) {
    if (!cond) fail(fmt::format(f, std::forward<Args>(args)...));
    return cond;
  }
};

// {"test", "strategy", "memory", "passed", "failures", "notes", "counters",
//  "details", "options"}: the selftest JSON object (counters by snake_case
// name, CounterSnapshot::to_json).
nlohmann::json selftest_json(std::string_view test, const RunOptions& opts, const SelftestResult& r);

// One (test, strategy) result of a benchmark. The three views of DESIGN.md
// §6: upstream's average per iteration, the cold first iteration, the time
// per nested round trip; the counts come from `counters`.
struct BenchRow {
  std::string test = {};
  vmx::StrategyKind strategy = vmx::StrategyKind::cache;
  double seconds_per_iteration = 0;   // (1) average per iteration, best of --runs
  uint64_t iterations = 0;            //     iterations behind that average
  double cold_iteration_seconds = 0;  // (2) the first, cold iteration
  double seconds_per_round_trip = 0;  // (3) time per nested round trip
  uint64_t exit_cost_ns = 0;          // the exit cost the model used
  // The clock the three views are on (DESIGN.md §5), and the timed loop and
  // its first iteration in both clocks: modelled time by part, wall time.
  cpu::ClockKind clock = cpu::ClockKind::modelled;
  LoopTime loop;
  LoopTime cold;
  // True when the nested_round_trips counted leave the cold iteration out
  // (l2-switch: its first round enters by VMLAUNCH): the per-round-trip
  // view then divides the warm iterations' time, loop − cold.
  bool round_trips_after_cold = false;
  CounterSnapshot counters = {};      // of the best run (merge_run_counters)
  // Failed value checks (--verify) and broken invariants; empty = good.
  std::vector<std::string> failures = {};
  // Test-specific fields, merged into the row's JSON (must not reuse a
  // standard field's name).
  nlohmann::json extra = nlohmann::json::object();

  // The row has a time for the view `field` (one of the three above): an
  // iteration completed, and for the per-round-trip view a round trip too.
  // Tables print "-" and give no ratio for a view it has no time for.
  bool has_time(double BenchRow::*field) const {
    return iterations > 0 &&
           (field != &BenchRow::seconds_per_round_trip || counters[Counter::nested_round_trips] > 0);
  }
  // That view's time for JSON: null when the row has none (never 0 s).
  nlohmann::json time_json(double BenchRow::*field) const {
    return has_time(field) ? nlohmann::json(this->*field) : nlohmann::json();
  }

  // The loop's modelled time by part, per iteration, per nested round trip
  // (the time seconds_per_round_trip divides) and for the cold iteration: {"per_iteration": {"transitions_ns": ...,
  // "total_ns": ...}, "per_round_trip": {...}, "cold_iteration": {...}}.
  nlohmann::json breakdown() const;

  // {test, strategy, clock, seconds_per_iteration, iterations,
  //  cold_iteration_seconds, seconds_per_round_trip, wall_seconds_per_iteration,
  //  breakdown, nested_round_trips, shootdowns, ept12_faults, maps, unmaps,
  //  remap_windows, stale_accesses, failures, counters, ...extra}.
  nlohmann::json to_json() const;
};

// The row of `rows` for strategy `s`, or null.
const BenchRow* row_of(std::span<const BenchRow> rows, vmx::StrategyKind s);

// A whole `nestcache bench` run as one JSON object.
struct BenchReport {
  BenchOptions options;
  std::vector<BenchRow> rows;
  // Per test with BenchInfo::compare: what compares its rows.
  nlohmann::json comparisons = nlohmann::json::object();
  // The rows that could not run at all (a resource the run could not have):
  // {test, strategy, error} each; in the JSON only when there is one.
  nlohmann::json could_not_run = nlohmann::json::array();

  // The exit cost to report: the option if given, else what the rows used.
  uint64_t exit_cost_ns() const;
  // What modelled time charged per remap window (window_cost_json), or null
  // on the wall clock.
  nlohmann::json window_cost() const;
  // {exit_cost_ns, l1_hz, slots, memory, seconds_limit, iterations_limit
  //  (whichever limit the run had; the other null), runs, scale, strategies,
  //  io, results: [row...], comparisons}. Ratios
  // are not stored in rows: every ratio derives from them; comparisons holds
  // what a test derives itself.
  nlohmann::json to_json() const;
};

// The counters of one run, each event once. PhysMem counts every remap
// window, pin and stale access in the pool, and a Vm or vCPU counts some of
// the same events again for its own report (HostMap passes it as `also`).
// So those pool counters are taken from `phys` alone, and every other
// counter is the sum over `others` (HostMm, Vm, vCPUs, ...).
CounterSnapshot merge_run_counters(const CounterSnapshot& phys, std::span<const CounterSnapshot> others);

}  // namespace nestcache::workloads
