// `nestcache bench --tests l2-switch`: what an L2 switch costs with each page
// strategy, at N = 2, 8 and 16 L2 vCPUs on one L1 vCPU.
//
// L1 multiplexes N L2s as the selftest's sched mode does: round 0 VMCLEARs,
// VMPTRLDs, writes and VMLAUNCHes each L2 (the cold iteration: every page is
// reached for the first time), later rounds VMPTRLD + VMRESUME each L2, which
// VMCALLs straight back. One switch is one VMPTRLD and one nested round trip.
// Timing is upstream's: rounds run while the elapsed time is under --seconds
// (a started round finishes), or exactly --iterations rounds.
//
// With map every entry maps and unmaps the L2's MSR bitmap, APIC-access and
// virtual-APIC pages (remap windows on unmanaged memory); with cache and
// oracle the nested contexts keep each vmcs12's caches mapped, up to 8 per L1
// vCPU. The row checks the seed's sched-mode formulas on the counters it
// reports: reuse = min(N, 8)·(rounds − 1), recycle = 0.
#include <algorithm>
#include <functional>

#include "guest/l1_pages.h"
#include "guest/l2_switch.h"
#include "guest/mailbox.h"
#include "guest/program.h"
#include "guest/vmx.h"
#include "vmx/nested_context_table.h"
#include "workloads/nested_env.h"
#include "workloads/stopwatch.h"
#include "workloads/window_cost.h"

namespace nestcache::workloads {

namespace {

using namespace guest::program;
using guest::SwitchedL2;

constexpr int kSwitchBenchL2[] = {2, 8, 16};
constexpr size_t kL1Bytes = 8 << 20;
constexpr Gpa kL2PagesStart = 0x400000;

struct SwitchConfig {
  int l2 = 2;
  double seconds = kDefaultBenchSeconds;
  uint64_t iterations = 0;  // > 0: exactly this many rounds
};

// What the L1 program measured: each round on the machine's clock (Now),
// and the loop and its cold round in modelled time by part and wall time.
struct SwitchTimes {
  std::vector<uint64_t> round_ns;
  uint64_t loop_ns = 0;
  uint64_t cold_ns = 0;  // loop_ns when the cold round ended, as `cold` is timed
  LoopTime loop;
  LoopTime cold;
  // PhysMem's remap windows and frame pins when the cold round ended: map's
  // cost per entry on unmanaged memory (windows) and on managed memory (pins).
  uint64_t windows_after_cold = 0, pins_after_cold = 0;
};

GuestTask l1_switcher(SwitchConfig c, const std::vector<SwitchedL2>& l2, SwitchTimes& out,
                      std::function<void(SwitchTimes&)> mark_cold_end) {
  guest::L1Pages pages(kL1PagesStart, kL2PagesStart);
  co_await guest::enter_vmx(pages);
  const uint64_t limit_ns = static_cast<uint64_t>(c.seconds * 1e9);
  const uint64_t start = co_await ops::now();
  const Stopwatch watch;
  for (uint64_t round = 0;; round++) {
    uint64_t t0 = co_await ops::now();
    for (const SwitchedL2& p : l2) co_await guest::switch_to(p, guest::SwitchMode::sched, round == 0);
    uint64_t t1 = co_await ops::now();
    out.round_ns.push_back(t1 - t0);
    out.loop_ns = t1 - start;
    out.loop = watch.elapsed();
    if (round == 0) {
      out.cold_ns = out.loop_ns;
      out.cold = out.loop;
      mark_cold_end(out);
    }
    bool done = c.iterations ? round + 1 >= c.iterations : t1 - start >= limit_ns;
    if (done) break;
  }
  for (const SwitchedL2& p : l2) co_await guest::vmclear(p.vmcs);
  co_await guest::vmxoff();
}

struct SwitchRun {
  SwitchTimes times;
  CounterSnapshot counters;
  size_t contexts = 0;
  uint64_t warm_windows = 0;  // remap windows opened after the cold round
  uint64_t warm_pins = 0;     // frame pins taken after the cold round
  std::vector<std::string> failures;
  double seconds_per_iteration() const {
    return times.round_ns.empty() ? 0 : static_cast<double>(times.loop_ns) / 1e9 / times.round_ns.size();
  }
};

Result<SwitchRun> run_switches(const SwitchConfig& c, const BenchOptions& o, StrategyKind s) {
  NestedEnvConfig ec{s, o.memory};
  ec.vcpus = 1;
  ec.l1_bytes = kL1Bytes;
  ec.exit_cost_ns = o.exit_cost_ns.value_or(cpu::kDefaultExitCostNs);
  ec.clock = o.clock;
  ec.costs = o.costs;
  ec.window_cost_ns = o.window_cost_ns;
  ec.extra_caches = o.extra_caches;
  auto env = NC_TRY(NestedEnv::create(ec));
  // What the set-up counted (the activation of --extra-caches) is not the
  // run's: the row counts from here, as the memslot tests do.
  const CounterSnapshot setup = env->counters();
  std::vector<SwitchedL2> l2 = guest::lay_out_switched_l2s(kL2PagesStart, c.l2);
  for (const SwitchedL2& p : l2) {
    uint32_t rev = vmx::kVmcs12Revision;
    NC_TRY(env->vm->write_guest(p.vmcs, &rev, sizeof rev));
    env->machine->bind_l2_program(p.vmcs, guest::vmcall_forever());
  }
  SwitchRun run;
  host::PhysMem* phys = env->phys.get();
  env->machine->set_l1_program(
      0, l1_switcher(c, l2, run.times, [phys](SwitchTimes& t) {
        t.windows_after_cold = phys->counters().get(Counter::remap_windows);
        t.pins_after_cold = phys->counters().get(Counter::pins);
      }));
  // A round switches to each of at most 16 L2s: a second is far more than
  // one takes in any build.
  Status st = env->machine->run(bench_watchdog(c.seconds, c.iterations, std::chrono::seconds(1)));
  if (!st) return tl::unexpected(st.error());
  run.counters = NestedEnv::counted_since_setup(env->counters(), setup);
  run.warm_windows = phys->counters().get(Counter::remap_windows) - run.times.windows_after_cold;
  run.warm_pins = phys->counters().get(Counter::pins) - run.times.pins_after_cold;
  if (auto* t = env->machine->nested_contexts()) run.contexts = t->table().size();
  if (run.times.round_ns.empty()) run.failures.push_back("L1 completed no round");
  return run;
}

// One run's row, its checks included (the seed's formulas hold per run).
BenchRow row_of_run(const SwitchRun& run, int n, const BenchOptions& o, StrategyKind s) {
  BenchRow row;
  row.strategy = s;
  row.iterations = run.times.round_ns.size();
  row.seconds_per_iteration = run.seconds_per_iteration();
  row.cold_iteration_seconds = static_cast<double>(run.times.cold_ns) / 1e9;
  // Every warm switch is one round trip (VMRESUME after the VMCALL exit);
  // the cold round enters by VMLAUNCH, so it is left out of this view.
  uint64_t trips = run.counters[Counter::nested_round_trips];
  double warm_seconds = static_cast<double>(run.times.loop_ns - run.times.cold_ns) / 1e9;
  row.seconds_per_round_trip = trips ? warm_seconds / static_cast<double>(trips) : 0;
  row.round_trips_after_cold = true;
  row.exit_cost_ns = o.exit_cost_ns.value_or(cpu::kDefaultExitCostNs);
  row.clock = o.clock;
  row.loop = run.times.loop;
  row.cold = run.times.cold;
  row.counters = run.counters;
  row.failures = run.failures;
  if (s != StrategyKind::map && run.counters[Counter::stale_accesses])
    row.failures.push_back(fmt::format("{} stale accesses with {}", run.counters[Counter::stale_accesses],
                                       strategy_name(s)));
  uint64_t rounds = row.iterations, warm_rounds = rounds ? rounds - 1 : 0;
  uint64_t warm_switches = static_cast<uint64_t>(n) * warm_rounds;
  // The seed's formulas for sched mode, with capacity 8 for one L1 vCPU.
  uint64_t cap = vmx::kNestedOversubRatio;
  uint64_t want_reuse = s == StrategyKind::map ? 0 : std::min<uint64_t>(n, cap) * warm_rounds;
  uint64_t reuse = run.counters[Counter::nested_context_reuse];
  uint64_t recycle = run.counters[Counter::nested_context_recycle];
  if (reuse != want_reuse || recycle != 0)
    row.failures.push_back(fmt::format("reuse {} recycle {}, the seed's sched formula says {} and 0", reuse, recycle,
                                       want_reuse));
  if (trips != warm_switches)
    row.failures.push_back(fmt::format("{} round trips for {} warm switches", trips, warm_switches));
  row.extra = {
      {"l2", n},
      {"mode", "sched"},
      {"memory", memory_kind_name(o.memory)},
      {"switches", static_cast<uint64_t>(n) * rounds},
      {"seconds_per_switch", row.seconds_per_round_trip},
      {"nested_context_reuse", reuse},
      {"nested_context_recycle", recycle},
      {"contexts", run.contexts},
      {"remap_windows_per_warm_switch",
       warm_switches ? static_cast<double>(run.warm_windows) / static_cast<double>(warm_switches)
                     : 0.0},
      {"pins_per_warm_switch",
       warm_switches ? static_cast<double>(run.warm_pins) / static_cast<double>(warm_switches) : 0.0},
  };
  return row;
}

Result<BenchRow> run_bench_l2_switch(int n, const BenchOptions& o, StrategyKind s) {
  SwitchConfig c{n, o.seconds, o.iterations};
  BenchRow row = NC_TRY(fastest_of_runs(o.runs, [&](uint32_t r) -> Result<BenchRow> {
    SwitchRun run = NC_TRY(run_switches(c, o, s));
    o.report_progress(r + 1, o.runs, fmt::format("l2-switch N={} / {}", n, strategy_name(s)));
    return row_of_run(run, n, o, s);
  }));
  if (s == StrategyKind::map) row.extra["remap_window_ns"] = NC_TRY(remap_window_ns(o));
  return row;
}

std::vector<std::string> commentary(int n, std::span<const BenchRow> rows) {
  std::vector<std::string> out;
  // One round is the cold one alone: no warm switch was timed, so there is
  // no per-switch figure to print (not 0.00 µs).
  if (std::all_of(rows.begin(), rows.end(), [](const BenchRow& r) { return r.iterations < 2; })) {
    out.push_back(fmt::format("No warm L2 switch with {} L2s: only the cold round ran (VMLAUNCH of each L2); "
                              "per-switch figures need 2 or more rounds (--iterations 2, or a longer --seconds).",
                              n));
    return out;
  }
  std::string per;
  for (const BenchRow& r : rows)
    per += fmt::format("{}{} {:.2f} µs ({} reuses, {} recycles)", per.empty() ? "" : "; ", strategy_name(r.strategy),
                       r.seconds_per_round_trip * 1e6, r.extra.value("nested_context_reuse", uint64_t{0}),
                       r.extra.value("nested_context_recycle", uint64_t{0}));
  out.push_back(fmt::format("Per warm L2 switch (VMPTRLD + VMRESUME + VMCALL exit) with {} L2s on one L1 vCPU: {}.",
                            n, per));
  const BenchRow* map = row_of(rows, StrategyKind::map);
  const BenchRow* cache = row_of(rows, StrategyKind::cache);
  if (map && cache && cache->seconds_per_round_trip > 0)
    out.push_back(fmt::format("map/cache per switch: {:.1f}x. {}", map->seconds_per_round_trip / cache->seconds_per_round_trip,
                              n <= static_cast<int>(vmx::kNestedOversubRatio)
                                  ? "Every L2 keeps its context: cache maps nothing after the cold round."
                                  : "More L2s than the 8 contexts: 8 L2s keep theirs, the others fall back to the "
                                    "vCPU's own caches, which remap on every switch (windows column)."));
  if (map && cache && map->extra.contains("remap_window_ns")) {
    // Map's cost per switch: a remap window per page on unmanaged memory; on
    // managed memory no window (HostMap pins each page and uses the direct
    // map), a pin, at HostMap's map + unmap cost.
    const bool managed = map->extra.value("memory", "") == memory_kind_name(MemoryKind::managed);
    const char* field = managed ? "pins_per_warm_switch" : "remap_windows_per_warm_switch";
    auto per_switch = [field](const BenchRow* r) { return r->extra.value(field, 0.0); };
    const double cost_ns = map->extra["remap_window_ns"].get<double>();
    const double extra = per_switch(map) - per_switch(cache);
    out.push_back(fmt::format("Check: map − cache = {:.2f} µs per switch; {}{:.2f} more {} per switch × {:.2f} µs per "
                              "{} (measured alone) = {:.2f} µs.",
                              (map->seconds_per_round_trip - cache->seconds_per_round_trip) * 1e6,
                              managed ? "map opens no remap window on managed memory (HostMap pins each page and uses "
                                        "the direct map): "
                                      : "",
                              extra, managed ? "pins" : "remap windows", cost_ns / 1e3,
                              managed ? "HostMap map + unmap" : "window", extra * cost_ns / 1e3));
  }
  return out;
}

}  // namespace

void register_l2_switch_bench() {
  for (int n : kSwitchBenchL2) {
    register_bench({
        .name = fmt::format("l2-switch-{}", n),
        .group = "l2-switch",
        .summary = fmt::format("one L1 vCPU switches between {} L2s (VMPTRLD + VMRESUME each)", n),
        .description = "The seed's l2-switch in sched mode, timed: round 0 launches every L2 (cold), later rounds "
                       "VMPTRLD and VMRESUME each; the per-round-trip view is the time per warm switch.",
        .in_default_job = false,
        .run = [n](const BenchOptions& o, StrategyKind s) { return run_bench_l2_switch(n, o, s); },
        .commentary = [n](std::span<const BenchRow> rows) { return commentary(n, rows); },
    });
  }
}

}  // namespace nestcache::workloads
