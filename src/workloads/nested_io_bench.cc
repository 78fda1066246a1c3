// `nestcache bench --tests nested-io`: the representative nested workload
// (nested_io.h) for each page strategy, reported per request — requests per
// second, nested round trips per request, the cost of a request split by
// part — and, across strategies, map's and cache's overhead over oracle.
#include "workloads/nested_io.h"

#include <algorithm>

#include <fmt/ranges.h>

#include "cpu/machine.h"
#include "workloads/registry.h"

namespace nestcache::workloads {

namespace {

// Requests each L2 vCPU serves: --iterations, else what the offered rate
// brings in --seconds of modelled time (at least one).
uint64_t requests_per_l2(const BenchOptions& o) {
  if (o.iterations) return o.iterations;
  double per_l2 = o.seconds * static_cast<double>(o.io.rate) / o.io.l2_vcpus;
  return std::max<uint64_t>(1, static_cast<uint64_t>(per_l2));
}

uint32_t io_l1_hz(const BenchOptions& o) { return o.l1_hz_is_default ? kDefaultIoL1Hz : o.l1_hz; }

// The busy time of a request (everything but idle), by part.
nlohmann::json per_request_parts(const TimeStamp& t, uint64_t requests) {
  nlohmann::json j = nlohmann::json::object();
  double n = static_cast<double>(std::max<uint64_t>(requests, 1));
  for (int p = 0; p < kTimeParts; p++) {
    if (static_cast<TimePart>(p) == TimePart::idle) continue;
    j[fmt::format("{}_ns", time_part_name(static_cast<TimePart>(p)))] = static_cast<double>(t.ns[p]) / n;
  }
  j["busy_ns"] = static_cast<double>(t.total() - t[TimePart::idle]) / n;
  return j;
}

BenchRow row_of_run(const NestedIoRun& run, const BenchOptions& o, StrategyKind s) {
  const IoVcpuTally t = run.total();
  const TimeStamp sum = run.loop_sum();
  // Busy time: every vCPU's loop but its waits for requests, on the run's
  // clock (on the wall clock the modelled parts are the model's accounting
  // only, as for every test).
  double busy_s = static_cast<double>(sum.total() - sum[TimePart::idle]) / 1e9;
  if (o.clock == cpu::ClockKind::wall) {
    uint64_t busy_ns = 0;
    for (const IoVcpuTally& v : run.vcpus) busy_ns += v.elapsed_ns - std::min(v.idle_ns, v.elapsed_ns);
    busy_s = static_cast<double>(busy_ns) / 1e9;
  }
  const uint64_t trips = run.counters[Counter::nested_round_trips];
  BenchRow row;
  row.strategy = s;
  row.iterations = t.requests;
  row.seconds_per_iteration = t.requests ? busy_s / static_cast<double>(t.requests) : 0;
  row.cold_iteration_seconds = run.vcpus.empty()                   ? 0
                               : o.clock == cpu::ClockKind::wall ? run.vcpus[0].cold.wall_seconds
                                                                 : static_cast<double>(run.vcpus[0].cold.modelled.total()) / 1e9;
  row.seconds_per_round_trip = trips ? busy_s / static_cast<double>(trips) : 0;
  row.exit_cost_ns = o.exit_cost_ns.value_or(cpu::kDefaultExitCostNs);
  row.clock = o.clock;
  row.loop.modelled = sum;
  for (const IoVcpuTally& v : run.vcpus) row.loop.wall_seconds = std::max(row.loop.wall_seconds, v.loop.wall_seconds);
  if (!run.vcpus.empty()) row.cold = run.vcpus[0].cold;
  row.counters = run.counters;
  row.failures = run.failures;
  const double requests = static_cast<double>(std::max<uint64_t>(t.requests, 1));
  row.extra = {
      {"requests", t.requests},
      {"requests_per_second", t.elapsed_ns ? static_cast<double>(t.requests) * 1e9 / static_cast<double>(t.elapsed_ns) : 0.0},
      {"round_trips_per_request", static_cast<double>(trips) / requests},
      {"cost_per_request", per_request_parts(sum, t.requests)},
      {"offered_rate", o.io.rate},
      {"work", o.io.work},
      {"l2_vcpus", o.io.l2_vcpus},
      {"l1_vcpus", o.io.l1_vcpus},
      {"msr_every", o.io.msr_every},
      {"io_l1_hz", io_l1_hz(o)},
      {"doorbell_exits", t.doorbells},
      {"completions_posted", t.posted},
      {"completions_taken", t.received},
      {"msr_exits", t.msr_exits},
      {"nested_ticks", t.nested_ticks},
      {"idle_ticks", t.idle_ticks},
      {"idle_halts", t.idle_halts},
      {"waiting_halts", t.waiting_halts},
      {"l2_switches", t.switches},
      {"nested_context_reuse", run.counters[Counter::nested_context_reuse]},
      {"nested_context_recycle", run.counters[Counter::nested_context_recycle]},
  };
  return row;
}

Result<BenchRow> run_bench_nested_io(const BenchOptions& o, StrategyKind s) {
  NestedIoConfig c;
  c.strategy = s;
  c.memory = o.memory;
  c.io = o.io;
  c.requests_per_l2 = requests_per_l2(o);
  c.l1_hz = io_l1_hz(o);
  c.exit_cost_ns = o.exit_cost_ns.value_or(cpu::kDefaultExitCostNs);
  c.clock = o.clock;
  c.costs = o.costs;
  c.window_cost_ns = o.window_cost_ns;
  c.extra_caches = o.extra_caches;
  std::string label = fmt::format("nested-io / {}", strategy_name(s));
  c.on_request = [&o, &c, label](uint64_t served) {
    if (served % 256 == 0) o.report_progress(served, c.requests_per_l2, label);
  };
  return fastest_of_runs(o.runs, [&](uint32_t) -> Result<BenchRow> {
    return row_of_run(NC_TRY(run_nested_io(c)), o, s);
  });
}

}  // namespace

nlohmann::json nested_io_comparison(std::span<const BenchRow> rows) {
  nlohmann::json j = nlohmann::json::object();
  const BenchRow* oracle = row_of(rows, StrategyKind::oracle);
  for (const BenchRow& r : rows) {
    nlohmann::json e = {{"cost_per_request_ns", r.seconds_per_iteration * 1e9},
                        {"round_trips_per_request", r.extra.value("round_trips_per_request", 0.0)}};
    if (oracle && oracle->seconds_per_iteration > 0)
      e["overhead_over_oracle_percent"] = (r.seconds_per_iteration / oracle->seconds_per_iteration - 1) * 100;
    j[std::string(strategy_name(r.strategy))] = e;
  }
  return j;
}

namespace {

// Requests per second as the commentary prints them: whole above 100, else
// three significant digits, so a rate just above a low offered one (1.06
// against 1) does not print as the same number.
std::string format_rate(double per_second) {
  return per_second >= 100 ? fmt::format("{:.0f}", per_second) : fmt::format("{:.3g}", per_second);
}

std::vector<std::string> commentary(std::span<const BenchRow> rows) {
  std::vector<std::string> out;
  if (rows.empty()) return out;
  const nlohmann::json& x = rows.front().extra;
  // --msr-every 0 and --l1-hz 0 mean none: said so, not "every 0 requests".
  const uint64_t msr_every = x.value("msr_every", uint64_t{0}), hz = x.value("io_l1_hz", uint64_t{0});
  out.push_back(fmt::format("{} L2 vCPU(s) on {} L1 vCPU(s), {} requests/s offered, {} memory operations per request, "
                            "{}, {}.",
                            x.value("l2_vcpus", 0), x.value("l1_vcpus", 0), x.value("offered_rate", 0),
                            x.value("work", 0),
                            msr_every ? fmt::format("an intercepted WRMSR every {} requests", msr_every)
                                      : std::string("no intercepted WRMSR"),
                            hz ? fmt::format("L1 timer {} Hz", hz) : std::string("L1 timer off")));
  for (const BenchRow& r : rows) {
    const nlohmann::json c = r.extra.value("cost_per_request", nlohmann::json::object());
    out.push_back(fmt::format(
        "{}: {} requests/s, {:.2f} nested round trips per request, {:.2f} µs per request ({}transitions {:.2f}, "
        "guest ops {:.2f}, remap windows {:.2f}, pfn cache {:.2f}, other L0 {:.2f})",
        strategy_name(r.strategy), format_rate(r.extra.value("requests_per_second", 0.0)),
        r.extra.value("round_trips_per_request", 0.0),
        r.seconds_per_iteration * 1e6,
        r.clock == cpu::ClockKind::wall
            ? fmt::format("wall time; the model's accounting: {:.2f} µs, ", c.value("busy_ns", 0.0) / 1e3)
            : "",
        c.value("transitions_ns", 0.0) / 1e3, c.value("guest_ops_ns", 0.0) / 1e3,
        c.value("remap_windows_ns", 0.0) / 1e3, c.value("pfn_cache_ns", 0.0) / 1e3, c.value("other_l0_ns", 0.0) / 1e3));
  }
  // requests/s counts the requests over the time to the last one served,
  // which spans one random gap between arrivals fewer than there are
  // requests: with few requests those gaps can sum well below their mean.
  const double offered = x.value("offered_rate", 0.0);
  std::vector<std::string> above;
  for (const BenchRow& r : rows) {
    const double served = r.extra.value("requests_per_second", 0.0);
    if (offered > 0 && served > offered * 1.05)
      above.push_back(fmt::format("{} {}/s", strategy_name(r.strategy), format_rate(served)));
  }
  const uint64_t requests = x.value("requests", uint64_t{0});
  if (!above.empty() && requests < 2)
    out.push_back(fmt::format("Served more than the {:.0f} requests/s offered ({}): one request has no gap between "
                              "arrivals, so its rate is one over its own time; more --iterations or --seconds bring "
                              "it to the offered rate.",
                              offered, fmt::join(above, ", ")));
  else if (!above.empty())
    out.push_back(fmt::format("Served more than the {:.0f} requests/s offered ({}): {} requests span one random gap "
                              "between arrivals fewer than their number, and few gaps can sum well below their mean; "
                              "more --iterations or --seconds bring it to the offered rate.",
                              offered, fmt::join(above, ", "), x.value("requests", 0)));
  nlohmann::json cmp = nested_io_comparison(rows);
  std::string over;
  for (const char* s : {"map", "cache"})
    if (cmp.contains(s) && cmp[s].contains("overhead_over_oracle_percent"))
      over += fmt::format("{}{} {:+.1f}%", over.empty() ? "" : ", ", s, cmp[s]["overhead_over_oracle_percent"].get<double>());
  if (!over.empty())
    out.push_back(fmt::format("Cost per request over oracle: {}. The difference is in the remap-window and "
                              "pfn-cache parts above: map maps and unmaps the four vmcs12 pages on every nested "
                              "entry and exit, cache only checks them.",
                              over));
  return out;
}

}  // namespace

void register_nested_io_bench() {
  register_bench({
      .name = "nested-io",
      .group = "",
      .summary = "L2 vCPUs serving requests as a virtio guest: MMIO doorbell, posted completion, HLT when idle",
      .description =
          "Each request: memory work in L2, an MMIO doorbell write reflected to L1, L1's device model completes it "
          "and posts a completion interrupt, L2 takes it, reads the virtual-APIC state and EOIs, then halts until "
          "its next request. An intercepted WRMSR every --msr-every requests, L1's timer at 1000 Hz unless --l1-hz "
          "is given. --rate, --work, --l2-vcpus, --l1-vcpus; --iterations is requests per L2 vCPU, otherwise "
          "--seconds of offered load. Per iteration = busy time per request (the breakdown's total adds the idle "
          "time between requests).",
      .in_default_job = false,
      .options = {"--l1-hz", "--rate", "--work", "--l2-vcpus", "--l1-vcpus", "--msr-every"},
      .run = run_bench_nested_io,
      .commentary = commentary,
      .compare = nested_io_comparison,
      .l1_hz = io_l1_hz,
  });
}

}  // namespace nestcache::workloads
