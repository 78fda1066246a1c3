// Sweeps (`nestcache bench --tests T --sweep PARAM=v1,v2,...`): one
// parameter of a bench test over a list of values, every chosen strategy at
// each value, as a table, JSON and CSV.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "workloads/registry.h"

namespace nestcache::workloads {

enum class SweepParam : uint8_t {
  slots,         // --slots: L2 memslots
  l2_per_l1,     // nested-io: L2 vCPUs per L1 vCPU (l2_vcpus = value x l1_vcpus)
  exit_cost_ns,  // --exit-cost-ns: the hardware exit + entry cost
  rate,          // nested-io --rate
  work,          // nested-io --work
  caches,        // --extra-caches: idle pfn caches registered beside the strategy's
};

// "slots", "l2-per-l1", "exit-cost-ns", "rate", "work", "caches".
std::string_view sweep_param_name(SweepParam p);
// The bench option a parameter replaces at each point: "--slots",
// "--l2-vcpus" (l2-per-l1 sets the L2 vCPU count), "--exit-cost-ns",
// "--rate", "--work", "--extra-caches".
std::string_view sweep_option_name(SweepParam p);
// Every parameter's name, for messages.
std::vector<std::string> sweep_param_names();

struct SweepSpec {
  SweepParam param = SweepParam::slots;
  std::vector<uint64_t> values;
};

// Parses "PARAM=v1,v2,...". EINVAL for a missing '=', an unknown parameter
// (the message lists the known ones), an empty list, an empty or
// non-numeric value, or a value given twice.
Result<SweepSpec> parse_sweep(std::string_view text);

// `base` with the sweep's parameter set to `value`. EINVAL when the result
// fails validate() (the value is out of range: "--slots: 1 is outside
// 2..32764") or the value does not fit the field.
Result<BenchOptions> sweep_options(const BenchOptions& base, SweepParam p, uint64_t value);

// EINVAL unless `p` changes what `test` does: the nested-io parameters
// (l2-per-l1, rate, work) apply to nested-io alone, slots to the memslot_perf
// tests (not nested-io, not l2-switch); the exit cost and caches to all.
Status check_sweep_applies(const BenchInfo& test, SweepParam p);

// Every value checked with sweep_options() and what `test` needs of its
// options (validate_for) before anything runs: EINVAL for the first bad one,
// its message naming the value given ("--sweep slots=1: --slots: 1 is
// outside 2..32764").
Status validate_sweep(const BenchInfo& test, const BenchOptions& base, const SweepSpec& spec);

struct SweepPoint {
  uint64_t value = 0;
  BenchRow row;
};

// Runs `test` for each value and each strategy of `base`, in that order;
// `base.progress` (may be null) shows how far it got, and `on_point` (may be
// null) is called with each point as it finishes. An error stops the sweep
// (the test could not run at a value).
Result<std::vector<SweepPoint>> run_sweep(const BenchInfo& test, const BenchOptions& base, const SweepSpec& spec,
                                          const std::function<void(const SweepPoint&)>& on_point = nullptr);

// The remap window's cost every point's run charged, as bench --json's
// "window_cost" (null on the wall clock).
nlohmann::json sweep_window_cost(const BenchOptions& o);

// {"test", "parameter", "values": [...], "strategies": [...], "memory",
//  "clock", "window_cost", "points": [{"value", "strategy", "seconds_per_iteration",
//  "seconds_per_round_trip", "iterations", "nested_round_trips",
//  "remap_windows", "stale_accesses", "exit_cost_ns", "failures", "breakdown_per_round_trip",
//  "requests_per_second"?, "round_trips_per_request"?, "slots_used"?,
//  "slots_capped"?}]} (the memslot tests' slots as applied: an area with
//  fewer pages than the value runs with fewer slots).
nlohmann::json sweep_json(std::string_view test, const SweepSpec& spec, const BenchOptions& base,
                          const std::vector<SweepPoint>& points);
// The same points as CSV, one line per point after a header line:
// PARAM,strategy,seconds_per_iteration,seconds_per_round_trip,iterations,
// nested_round_trips,remap_windows,stale_accesses,requests_per_second,
// round_trips_per_request (the last two empty for tests without them).
std::string sweep_csv(const SweepSpec& spec, const std::vector<SweepPoint>& points);

}  // namespace nestcache::workloads
