// `nestcache bench`'s tests: memslot_perf in nested mode (memslot_perf.h),
// registered one bench test per upstream test, with the three views of
// DESIGN.md §6 and the seed's table printed beside the view it matches.
#include <algorithm>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include <fmt/ranges.h>

#include "cpu/machine.h"
#include "workloads/memslot_perf.h"
#include "workloads/window_cost.h"

namespace nestcache::workloads {

namespace {

// The seed's table (cover letter, 8192 memslots, unmanaged memory, EC2 Nitro).
constexpr uint64_t kSeedSlots = 8192;
struct SeedFigures {
  double before_s;  // kvm_vcpu_map/unmap: above upstream's 5 s limit, so ONE cold iteration
  double after_s;   // pfn caches: the average over hundreds of mostly warm iterations
  const char* ratio;
};

std::optional<SeedFigures> seed_figures(MemslotTest t) {
  switch (t) {
    case MemslotTest::map: return SeedFigures{26.12, 1.54, "~17x"};
    case MemslotTest::unmap: return SeedFigures{40.00, 0.017, "~2353x"};
    case MemslotTest::unmap_chunked: return SeedFigures{10.07, 0.005, "~2014x"};
    default: return std::nullopt;
  }
}

nlohmann::json phase_json(const CounterSnapshot& c, uint64_t discard_calls, double divide) {
  auto per = [&](uint64_t v) { return divide > 0 ? static_cast<double>(v) / divide : 0.0; };
  return {{"nested_round_trips", per(c[Counter::nested_round_trips])},
          {"shootdowns", per(c[Counter::shootdowns])},
          {"ept12_faults", per(c[Counter::ept12_faults])},
          {"remap_windows", per(c[Counter::remap_windows])},
          {"discard_calls", per(discard_calls)}};
}

// One run's row, its checks included.
Result<BenchRow> row_of_run(const MemslotPerfRun& run, MemslotTest test, const MemslotPerfConfig& c,
                            const BenchOptions& o, StrategyKind s) {
  BenchRow row;
  row.test = std::string(memslot_test_name(test));
  row.strategy = s;
  row.iterations = run.iteration_seconds.size();
  row.seconds_per_iteration = run.seconds_per_iteration();
  row.cold_iteration_seconds = run.iteration_seconds.empty() ? 0 : run.iteration_seconds.front();
  uint64_t trips = run.counters[Counter::nested_round_trips];
  row.seconds_per_round_trip = trips ? run.loop_seconds / static_cast<double>(trips) : 0;
  row.exit_cost_ns = c.exit_cost_ns;
  row.clock = o.clock;
  row.loop = run.loop_time;
  row.cold = run.cold_time;
  row.counters = run.counters;
  row.failures = run.failures;
  if (s != StrategyKind::map && run.counters[Counter::stale_accesses])
    row.failures.push_back(fmt::format("{} stale accesses with {}", run.counters[Counter::stale_accesses],
                                       strategy_name(s)));
  const MemslotLayout& l = run.layout;
  // Before the braces below: NC_TRY returning from inside a braced list
  // leaks the elements already built (GCC's statement expressions).
  const double window_ns = NC_TRY(remap_window_ns(o));
  double warm = row.iterations > 1 ? static_cast<double>(row.iterations - 1) : 0;
  row.extra = {
      {"memory", memory_kind_name(o.memory)},
      {"scale", o.scale},
      {"slots_used", l.data_slots + 1},
      {"slots_capped", l.slots_capped},
      {"area_pages", l.test_pages},
      {"pages_per_slot", l.pages_per_slot},
      {"loop_seconds", run.loop_seconds},
      {"discard_calls", run.discard_calls},
      {"fault_retries", run.fault_retries},
      {"flush_kicks", run.flush_kicks},
      {"timer_ticks", run.timer_ticks},
      {"remap_window_ns", window_ns},
      {"remap_window_cost_source", o.window_cost_ns ? "--window-cost-ns" : "calibrated"},
      {"remap_window_ns_in_run",
       run.windows ? static_cast<double>(run.work[TimePart::remap_windows]) / static_cast<double>(run.windows) : 0.0},
      {"windows_per_round_trip", trips ? static_cast<double>(run.counters[Counter::remap_windows]) / trips : 0.0},
      {"cold", phase_json(run.cold, run.cold_discard_calls, 1)},
      {"warm_per_iteration",
       phase_json(run.counters - run.cold, run.discard_calls - run.cold_discard_calls, warm)},
  };
  return row;
}

Result<BenchRow> run_bench_test(MemslotTest test, const BenchOptions& o, StrategyKind s) {
  MemslotPerfConfig c;
  c.test = test;
  c.strategy = s;
  c.memory = o.memory;
  c.slots = o.slots;
  c.seconds = o.seconds;
  c.iterations = o.iterations;
  c.exit_cost_ns = o.exit_cost_ns.value_or(cpu::kDefaultExitCostNs);
  c.l1_hz = o.l1_hz;
  c.scale = o.scale;
  c.verify = o.verify;
  c.clock = o.clock;
  c.costs = o.costs;
  c.window_cost_ns = o.window_cost_ns;
  c.extra_caches = o.extra_caches;
  std::string label = fmt::format("{} / {}", memslot_test_name(test), strategy_name(s));
  c.on_iteration = [&](uint64_t done) {
    o.report_progress(done, o.iterations, fmt::format("{}: iteration {}", label, done));
  };
  return fastest_of_runs(o.runs, [&](uint32_t) -> Result<BenchRow> {
    return row_of_run(NC_TRY(run_memslot_perf(c)), test, c, o, s);
  });
}

std::string ratio(double num, double den) {
  if (!(den > 0)) return "-";
  return fmt::format("{:.{}f}x", num / den, num / den >= 100 ? 0 : 1);
}

// What explains map − cache, and what the seed's ratio says of its remap cost.
std::vector<std::string> time_commentary(MemslotTest test, const BenchRow& map, const BenchRow& cache) {
  std::vector<std::string> out;
  double window_us = map.extra.value("remap_window_ns", 0.0) / 1e3;
  double in_run_us = map.extra.value("remap_window_ns_in_run", 0.0) / 1e3;
  double per_trip = map.extra.value("windows_per_round_trip", 0.0);
  double diff_us = (map.seconds_per_round_trip - cache.seconds_per_round_trip) * 1e6;
  double critical_us = map.breakdown()["per_round_trip"].value("remap_windows_ns", 0.0) / 1e3;
  if (map.counters[Counter::remap_windows] == 0 && map.extra.value("memory", std::string()) != "managed") {
    // Unmanaged memory with no window: map ran no HostMap map at all (a run
    // too short or too small for the guest to reach L1, e.g. move-active at
    // a small --scale), not the managed case below.
    out.push_back(fmt::format(
        "map opened no remap window: {} nested round trips and {} HostMap maps in its run, so there is no window "
        "cost to account for (map − cache = {:.1f} µs per iteration).",
        map.counters[Counter::nested_round_trips], map.counters[Counter::maps],
        (map.seconds_per_iteration - cache.seconds_per_iteration) * 1e6));
    return out;
  }
  if (map.counters[Counter::remap_windows] == 0) {
    // Managed memory: HostMap pins the page and points into the direct map,
    // so there is no window to account for (the breakdown's remap-window
    // part is HostMap's map and unmap, whatever they do).
    out.push_back(fmt::format(
        "map opens no remap window (managed memory: HostMap pins the page and uses the direct map, {:.2f} µs per "
        "map + unmap alone): map − cache = {:.2f} µs per round trip (HostMap's map and unmap: {:.2f} µs of it on the "
        "critical path) and {:.1f} µs per iteration.",
        window_us, diff_us, critical_us, (map.seconds_per_iteration - cache.seconds_per_iteration) * 1e6));
    return out;
  }
  out.push_back(fmt::format(
      "Remap window (HostMap map + unmap): {:.2f} µs alone, {:.2f} µs on average in map's run ({}).", window_us,
      in_run_us,
      map.clock != cpu::ClockKind::modelled
          ? "thread CPU time; munmap's TLB shootdown waits for another CPU only while one runs the process"
      : map.extra.value("remap_window_cost_source", std::string()) == "--window-cost-ns"
          ? "the mmap and munmap at the cost --window-cost-ns gave, plus the fault-in in CPU time"
          : "the mmap and munmap at their calibrated cost, with one TLB shootdown, plus the fault-in in CPU time"));
  out.push_back(fmt::format(
      "map opens {:.2f} windows per round trip: map − cache = {:.2f} µs per round trip; windows × cost in the run "
      "= {:.2f} µs ({}), of which {:.2f} µs on the critical path (the breakdown's remap-window part; the rest "
      "overlaps other threads' work).",
      per_trip, diff_us, per_trip * in_run_us, ratio(diff_us, per_trip * in_run_us), critical_us));
  // Round trips per iteration differ between strategies when a slower
  // iteration sees more shootdowns, so the same check per iteration, where
  // the work is the same for every strategy.
  double trips = static_cast<double>(map.counters[Counter::nested_round_trips]);
  double windows_per_iteration =
      map.iterations ? per_trip * trips / static_cast<double>(map.iterations) : 0.0;
  double diff_iteration_us = (map.seconds_per_iteration - cache.seconds_per_iteration) * 1e6;
  out.push_back(fmt::format("Per iteration: map − cache = {:.1f} µs; map's {:.1f} windows × cost in the run = {:.1f} µs "
                            "({}).",
                            diff_iteration_us, windows_per_iteration, windows_per_iteration * in_run_us,
                            ratio(diff_iteration_us, windows_per_iteration * in_run_us)));
  auto seed = seed_figures(test);
  double cold_windows = map.extra.contains("cold") ? map.extra["cold"].value("remap_windows", 0.0) : 0.0;
  if (seed && cold_windows > 0 && cache.seconds_per_iteration > 0) {
    // before = cache's cold iteration + its windows at the seed host's cost;
    // after = cache's warm average: the window cost that gives the seed's ratio.
    double r = seed->before_s / seed->after_s;
    double implied_us = (r * cache.seconds_per_iteration - cache.cold_iteration_seconds) / cold_windows * 1e6;
    if (implied_us > 0)
      out.push_back(fmt::format(
          "Implied remap cost on the seed's host: {:.1f} µs per window would give its {:.0f}x here (cache cold "
          "{:.3g} s + {:.0f} windows × cost, over cache's {:.3g} s per iteration); this machine's: {:.2f} µs alone, "
          "{:.2f} µs in the run.",
          implied_us, r, cache.cold_iteration_seconds, cold_windows, cache.seconds_per_iteration, window_us,
          in_run_us));
  }
  return out;
}

// How `row`'s run differs from the seed's set-up (8192 memslots, the whole
// area, unmanaged memory), as a sentence for the seed's line, or "".
std::string differs_from_seed(const BenchRow& row) {
  std::vector<std::string> d;
  if (uint64_t slots = row.extra.value("slots_used", uint64_t{0}); slots != kSeedSlots)
    d.push_back(fmt::format("{} memslots", slots));
  if (double scale = row.extra.value("scale", 1.0); scale != 1.0) d.push_back(fmt::format("the area scaled by {}", scale));
  if (std::string memory = row.extra.value("memory", std::string("unmanaged")); memory != "unmanaged")
    d.push_back(fmt::format("{} memory", memory));
  if (d.empty()) return "";
  return fmt::format(" Ours ran with {}: compare the ratios below with care.", fmt::join(d, ", "));
}

std::vector<std::string> commentary(MemslotTest test, std::span<const BenchRow> rows) {
  std::vector<std::string> out;
  const BenchRow* map = row_of(rows, StrategyKind::map);
  const BenchRow* cache = row_of(rows, StrategyKind::cache);
  // Both rows have a time to compare: a row with no iteration has none to
  // explain (its failure says so).
  const bool timed = map && cache && map->has_time(&BenchRow::seconds_per_iteration) &&
                     cache->has_time(&BenchRow::seconds_per_iteration);
  if (auto seed = seed_figures(test)) {
    out.push_back(fmt::format("seed ({} memslots, unmanaged memory, EC2 Nitro): before {:.2f} s, after {} s, {} faster.{}",
                              kSeedSlots, seed->before_s, seed->after_s, seed->ratio,
                              rows.empty() ? "" : differs_from_seed(rows.front())));
    out.push_back(
        "Its \"before\" is above upstream's 5 s limit, so it is ONE cold iteration (view: cold iteration, map); its "
        "\"after\" is an average over many warm iterations (view: per iteration, cache).");
    if (timed)
      out.push_back(fmt::format("Ours measured the seed's way: map cold {:.3g} s ÷ cache per iteration {:.3g} s = {}; "
                                "like for like: cold {}, per iteration {}, per round trip {}.",
                                map->cold_iteration_seconds, cache->seconds_per_iteration,
                                ratio(map->cold_iteration_seconds, cache->seconds_per_iteration),
                                ratio(map->cold_iteration_seconds, cache->cold_iteration_seconds),
                                ratio(map->seconds_per_iteration, cache->seconds_per_iteration),
                                ratio(map->seconds_per_round_trip, cache->seconds_per_round_trip)));
  }
  if (timed) {
    for (const std::string& s : time_commentary(test, *map, *cache)) out.push_back(s);
  }
  // One line per slot layout, naming every strategy that ran with it (the
  // area decides the cap, so the strategies usually share one line).
  std::vector<std::tuple<int, int, std::vector<std::string>>> capped;  // slots, pages per slot, strategies
  for (const BenchRow& r : rows) {
    if (!r.extra.value("slots_capped", false)) continue;
    const int slots = r.extra.value("slots_used", 0);
    const int pages = r.extra.value("pages_per_slot", 0);
    auto it = std::find_if(capped.begin(), capped.end(),
                           [&](const auto& c) { return std::get<0>(c) == slots && std::get<1>(c) == pages; });
    if (it == capped.end()) it = capped.insert(capped.end(), {slots, pages, {}});
    std::get<2>(*it).emplace_back(strategy_name(r.strategy));
  }
  for (const auto& [slots, pages, strategies] : capped)
    out.push_back(fmt::format("{}: too many slots for this area; ran with {} slots of {} page(s) (upstream refuses).",
                              fmt::join(strategies, ", "), slots, pages));
  return out;
}

void add(MemslotTest t, const char* summary, const char* description, bool in_default_job) {
  register_bench({
      .name = std::string(memslot_test_name(t)),
      .summary = summary,
      .description = description,
      .in_default_job = in_default_job,
      .options = {"--slots", "--scale", "--verify", "--l1-hz"},
      .run = [t](const BenchOptions& o, StrategyKind s) { return run_bench_test(t, o, s); },
      .commentary = [t](std::span<const BenchRow> rows) { return commentary(t, rows); },
      .l1_hz = [](const BenchOptions& o) { return o.l1_hz; },
  });
}

}  // namespace

void register_memslot_perf_bench() {
  add(MemslotTest::map, "guest maps one half (EPT12 faults) while the host discards the other, slot by slot",
      "Area 32 MiB (one page per slot at 8192 slots). L2 writes every page of one half while the VMM discards the "
      "other half one slot per call; they sync and swap.",
      true);
  add(MemslotTest::unmap, "host discards 128 MiB one page per call; the guest touches one page per half",
      "32,768 discard calls per iteration; each one that clears a populated page sends a shootdown IPI to the L2 "
      "vCPU: all of them in the cold first iteration, about 2 in a warm one.",
      true);
  add(MemslotTest::unmap_chunked, "as unmap, in 2 MiB chunks split per slot (16 KiB per call at 8192 slots)",
      "About 8,192 discard calls per iteration: a quarter of unmap's.", true);
  add(MemslotTest::move_active, "the last slot moves away and back while the guest writes into it",
      "Half of the guest's 192 KiB area lies in the moved slot: its writes there fault to L1 and complete as MMIO "
      "while the slot is away.",
      false);
  add(MemslotTest::move_inactive, "the last slot moves away and back; the guest writes next to it",
      "The guest's 192 KiB area ends where the moved slot starts.", false);
  add(MemslotTest::rw, "guest and host write and verify every page in turns",
      "Area 512 MiB: the guest writes every page, the host checks and clears, and the other way round.", false);
}

}  // namespace nestcache::workloads
