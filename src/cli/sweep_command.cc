// `nestcache bench --sweep`: one parameter of one bench test over a list of
// values (workloads/sweep.h), printed as a table per strategy, as JSON, and
// written as CSV.
#include <cstdio>

#include "cli/commands.h"
#include "workloads/progress.h"
#include "workloads/sweep.h"

namespace nestcache::cli {

namespace {

void print_sweep_table(const workloads::BenchInfo& test, const workloads::SweepSpec& spec,
                       const std::vector<workloads::SweepPoint>& points) {
  const bool io = !points.empty() && points.front().row.extra.contains("requests_per_second");
  fmt::print("{} — sweep of {}\n", test.name, workloads::sweep_param_name(spec.param));
  fmt::print("  {:>12} {:<8} {:>14} {:>14} {:>11} {:>9} {:>6}{}\n", workloads::sweep_param_name(spec.param),
             "strategy", io ? "per request" : "per iteration", "per round trip", "round trips", "windows", "stale",
             io ? "   requests/s  trips/request" : "");
  for (const auto& p : points) {
    const workloads::BenchRow& r = p.row;
    std::string tail;
    if (io)
      tail = fmt::format(" {:>12.0f} {:>14.2f}", r.extra.value("requests_per_second", 0.0),
                         r.extra.value("round_trips_per_request", 0.0));
    fmt::print("  {:>12} {:<8} {:>14} {:>14} {:>11} {:>9} {:>6}{}\n", p.value, vmx::strategy_name(r.strategy),
               format_seconds(r.seconds_per_iteration), format_seconds(r.seconds_per_round_trip),
               r.counters[Counter::nested_round_trips], r.counters[Counter::remap_windows],
               r.counters[Counter::stale_accesses], tail);
    for (const auto& f : r.failures) fmt::print("  FAILED {}={} / {}: {}\n", workloads::sweep_param_name(spec.param),
                                                p.value, vmx::strategy_name(r.strategy), f);
  }
}

}  // namespace

int run_sweep(const workloads::BenchInfo& test, workloads::BenchOptions o, const std::string& sweep,
              const std::string& csv_path) {
  auto spec = workloads::parse_sweep(sweep);
  Status st = spec ? workloads::check_sweep_applies(test, spec->param) : Status(tl::unexpected(spec.error()));
  if (st) st = workloads::validate_sweep(o, *spec);
  if (!st) {
    fmt::print(stderr, "nestcache bench: {}\n", st.error().message);
    return kExitUsage;
  }
  // The progress display draws on stderr only, and only on a terminal, so
  // --json output stays pure data.
  workloads::Progress progress(true);
  o.progress = &progress;
  auto points = workloads::run_sweep(test, o, *spec);
  o.progress = nullptr;
  if (!points) {
    fmt::print(stderr, "nestcache bench: {} could not run: {}\n", test.name, points.error().to_string());
    return kExitFailed;
  }
  bool ok = true;
  for (const auto& p : *points) ok = ok && p.row.failures.empty();
  if (!csv_path.empty()) {
    std::FILE* f = std::fopen(csv_path.c_str(), "w");
    std::string csv = workloads::sweep_csv(*spec, *points);
    if (!f || std::fwrite(csv.data(), 1, csv.size(), f) != csv.size()) {
      if (f) std::fclose(f);
      fmt::print(stderr, "nestcache bench: cannot write {}\n", csv_path);
      return kExitFailed;
    }
    std::fclose(f);
  }
  if (o.json)
    print_json(workloads::sweep_json(test.name, *spec, o, *points));
  else
    print_sweep_table(test, *spec, *points);
  return ok ? kExitOk : kExitFailed;
}

}  // namespace nestcache::cli
