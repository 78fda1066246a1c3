// The workload registry: option parsers, test-specific options, the
// selftest runner's guarantees, the JSON shapes, counter merging.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <stdexcept>

#include "workloads/progress.h"
#include "workloads/registry.h"

namespace nestcache::workloads {
namespace {

// --- parsers ----------------------------------------------------------------

TEST(RegistryParse, EveryStrategyNameParsesAndRoundTrips) {
  for (StrategyKind s : kAllStrategies) {
    auto r = parse_strategy(strategy_name(s));
    ASSERT_TRUE(r);
    EXPECT_EQ(*r, s);
  }
}

TEST(RegistryParse, AnUnknownStrategyIsEinvalNamingTheChoices) {
  auto r = parse_strategy("x");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, EINVAL);
  EXPECT_EQ(r.error().message, "unknown strategy 'x': expected map, cache or oracle");
}

TEST(RegistryParse, AStrategyListKeepsTheOrderGiven) {
  auto r = parse_strategy_list("oracle, map");
  ASSERT_TRUE(r);
  EXPECT_EQ(*r, (std::vector<StrategyKind>{StrategyKind::oracle, StrategyKind::map}));
}

TEST(RegistryParse, AllMeansEveryStrategy) {
  auto r = parse_strategy_list("all");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->size(), kAllStrategies.size());
}

TEST(RegistryParse, AStrategyListRejectsUnknownDuplicateAndEmptyItems) {
  EXPECT_EQ(parse_strategy_list("map,bogus").error().message, "unknown strategy 'bogus': expected map, cache or oracle");
  EXPECT_EQ(parse_strategy_list("map,map").error().message, "strategy 'map' given twice in 'map,map'");
  EXPECT_FALSE(parse_strategy_list("map,,cache"));
  EXPECT_FALSE(parse_strategy_list(""));
}

TEST(RegistryParse, MemoryKinds) {
  EXPECT_EQ(*parse_memory_kind("managed"), MemoryKind::managed);
  EXPECT_EQ(*parse_memory_kind("unmanaged"), MemoryKind::unmanaged);
  auto r = parse_memory_kind("both");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().message, "unknown memory kind 'both': expected managed or unmanaged");
}

TEST(RegistryParse, SplitListTrimsAndKeepsEmptyItems) {
  EXPECT_EQ(split_list(" a , b,,c "), (std::vector<std::string>{"a", "b", "", "c"}));
  EXPECT_EQ(split_list("one"), (std::vector<std::string>{"one"}));
}

TEST(RegistryParse, JoinNamesReadsAsAList) {
  std::vector<std::string> v = {"a", "b", "c"};
  EXPECT_EQ(join_names(v), "a, b and c");
  EXPECT_EQ(join_names(std::span(v).first(2), "or"), "a or b");
  EXPECT_EQ(join_names(std::span(v).first(1)), "a");
}

// --- RunOptions and OptionSpec -------------------------------------------------

TEST(RegistryOptions, TypedViewsOfExtraUseTheFallbackWhenAbsent) {
  RunOptions o;
  o.extra = {{"slots", "64"}, {"ratio", "0.5"}, {"bad", "12x"}, {"fast", "true"}};
  EXPECT_EQ(*o.int_option("slots", 1), 64);
  EXPECT_EQ(*o.int_option("missing", 7), 7);
  EXPECT_DOUBLE_EQ(*o.double_option("ratio", 1), 0.5);
  auto bad = o.int_option("bad", 0);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().message, "option --bad: '12x' is not a number");
  EXPECT_EQ(o.string_option("missing", "d"), "d");
  EXPECT_TRUE(o.flag_option("fast"));
  EXPECT_FALSE(o.flag_option("missing"));
}

TEST(RegistryOptions, OptionSpecsNameTheirValuesAndDefaults) {
  const OptionSpec specs[] = {int_option("--delay-ms", "delay", "10", 0, 100), value_option("-m,--mode", "mode"),
                              flag_option("--fast", "flag")};
  EXPECT_EQ(specs[0].name(), "delay-ms");
  EXPECT_EQ(specs[1].name(), "mode");
  EXPECT_EQ(specs[2].name(), "fast");
  EXPECT_EQ(specs[0].range, (std::pair<int64_t, int64_t>{0, 100}));
  EXPECT_EQ(default_values(specs), (std::map<std::string, std::string>{{"delay-ms", "10"}}));
}

// --- the selftest registry and runner --------------------------------------------

// A test's L1 timer must leave L2 time to run: options whose ticks would take
// (nearly) all of it are refused before anything runs, naming the options.
TEST(RegistryBenchOptions, TicksThatLeaveL2NoTimeAreRefused) {
  register_all();
  const BenchInfo* map = find_bench("map");
  const BenchInfo* io = find_bench("nested-io");
  const BenchInfo* l2_switch = find_bench("l2-switch-2");
  ASSERT_TRUE(map && io && l2_switch);
  BenchOptions o;
  EXPECT_TRUE(validate_for(*map, o));  // the defaults
  EXPECT_TRUE(validate_for(*io, o));
  // The transitions alone: map's remap windows (next test) left out.
  o.strategies = {StrategyKind::cache, StrategyKind::oracle};
  o.exit_cost_ns = 1'000'000;  // four exits per tick: 4 ms, the whole 250 Hz period
  Status st = validate_for(*map, o);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, EINVAL);
  EXPECT_NE(st.error().message.find("--exit-cost-ns 1000000 with L1 timer ticks at 250 Hz"), std::string::npos)
      << st.error().message;
  EXPECT_TRUE(validate_for(*l2_switch, o));  // no timer there
  o.l1_hz = 0;
  EXPECT_TRUE(validate_for(*map, o));
  o.exit_cost_ns = 900'000;  // 90 % of the period
  o.l1_hz = 250;
  EXPECT_TRUE(validate_for(*map, o));
  o.exit_cost_ns = 900'001;
  EXPECT_FALSE(validate_for(*map, o));
  // nested-io ticks at 1000 Hz unless --l1-hz is given.
  o.exit_cost_ns = 250'000;
  o.l1_hz_is_default = true;
  EXPECT_FALSE(validate_for(*io, o));
  o.l1_hz_is_default = false;
  EXPECT_TRUE(validate_for(*io, o));
}

// With map on unmanaged memory a tick's round trip also opens a remap window
// for each of the four vmcs12 pages; ticks whose windows fill the period hung
// the run as surely as a large exit cost did.
TEST(RegistryBenchOptions, TicksWhoseRemapWindowsLeaveL2NoTimeAreRefused) {
  register_all();
  const BenchInfo* map = find_bench("map");
  ASSERT_TRUE(map);
  BenchOptions o;
  o.exit_cost_ns = 0;
  o.window_cost_ns = 1'000'000;  // four windows per tick: 4 ms, the whole 250 Hz period
  Status st = validate_for(*map, o);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, EINVAL);
  EXPECT_NE(st.error().message.find("map on unmanaged memory with L1 timer ticks at 250 Hz"), std::string::npos)
      << st.error().message;
  EXPECT_NE(st.error().message.find("--l1-hz at most 224"), std::string::npos) << st.error().message;
  o.l1_hz = 224;  // 4 ms of each 4.46 ms: under 90 %
  EXPECT_TRUE(validate_for(*map, o));
  o.l1_hz = 250;
  o.window_cost_ns = 900'000;  // 90 % of the period
  EXPECT_TRUE(validate_for(*map, o));
  o.window_cost_ns = 900'004;
  EXPECT_FALSE(validate_for(*map, o));
  // Only map opens windows, and only on unmanaged memory.
  o.strategies = {StrategyKind::cache, StrategyKind::oracle};
  EXPECT_TRUE(validate_for(*map, o));
  o.strategies = {StrategyKind::map};
  o.memory = MemoryKind::managed;
  EXPECT_TRUE(validate_for(*map, o));
  // The calibrated cost (about 20 µs here, 80 µs per tick) at the highest
  // --l1-hz: the windows alone are eight times the 10 µs period.
  o.memory = MemoryKind::unmanaged;
  o.window_cost_ns.reset();
  o.l1_hz = 100'000;
  EXPECT_FALSE(validate_for(*map, o));
}

TEST(RegistrySelftests, RegisterAllIsIdempotentAndRegistersMemslots) {
  register_all();
  size_t n = selftests().size();
  register_all();
  EXPECT_EQ(selftests().size(), n);
  ASSERT_NE(find_selftest("memslots"), nullptr);
  EXPECT_EQ(find_selftest("no-such-test"), nullptr);
  auto names = selftest_names();
  EXPECT_NE(std::find(names.begin(), names.end(), "memslots"), names.end());
}

TEST(RegistrySelftests, EveryRegisteredTestHasASummaryAndUniqueName) {
  register_all();
  std::set<std::string> seen;
  for (const SelftestInfo& t : selftests()) {
    EXPECT_FALSE(t.summary.empty()) << t.name;
    EXPECT_TRUE(seen.insert(t.name).second) << t.name;
  }
}

TEST(RegistrySelftests, DefaultExtraHoldsTheDeclaredDefaults) {
  register_all();
  auto extra = default_extra(*find_selftest("memslots"));
  EXPECT_EQ(extra, (std::map<std::string, std::string>{{"slots", "512"}}));
}

TEST(RegistrySelftests, AnExceptionEscapingATestBecomesAFailure) {
  SelftestInfo t{.name = "throws", .run = [](const RunOptions&) -> SelftestResult {
                   throw std::runtime_error("boom");
                 }};
  SelftestResult r = run_selftest(t, RunOptions{});
  EXPECT_FALSE(r.passed);
  ASSERT_EQ(r.failures.size(), 1u);
  EXPECT_EQ(r.failures[0], "the test threw an exception: boom");
}

TEST(RegistrySelftests, PassedAgreesWithFailures) {
  SelftestInfo silent{.name = "silent", .run = [](const RunOptions&) {
                        SelftestResult r;
                        r.passed = false;  // but no message
                        return r;
                      }};
  SelftestResult a = run_selftest(silent, RunOptions{});
  EXPECT_FALSE(a.passed);
  EXPECT_EQ(a.failures.size(), 1u);

  SelftestInfo listed{.name = "listed", .run = [](const RunOptions&) {
                        SelftestResult r;
                        r.failures.push_back("x != y");  // but passed left true
                        return r;
                      }};
  EXPECT_FALSE(run_selftest(listed, RunOptions{}).passed);
}

TEST(RegistrySelftests, CheckFormatsOnlyFailures) {
  SelftestResult r;
  EXPECT_TRUE(r.check(1 + 1 == 2, "never {}", "shown"));
  EXPECT_FALSE(r.check(false, "stale_accesses = {}, expected 0", 3));
  EXPECT_FALSE(r.passed);
  EXPECT_EQ(r.failures, (std::vector<std::string>{"stale_accesses = 3, expected 0"}));
}

TEST(RegistrySelftests, TheJsonObjectHasTheDocumentedFields) {
  RunOptions o;
  o.strategy = StrategyKind::map;
  o.memory = MemoryKind::managed;
  o.extra = {{"slots", "4"}};
  SelftestResult r;
  r.note("a sentence");
  r.counters[Counter::stale_accesses] = 12;
  auto j = selftest_json("memslots", o, r);
  EXPECT_EQ(j["test"], "memslots");
  EXPECT_EQ(j["strategy"], "map");
  EXPECT_EQ(j["memory"], "managed");
  EXPECT_EQ(j["passed"], true);
  EXPECT_TRUE(j["failures"].is_array());
  EXPECT_EQ(j["notes"][0], "a sentence");
  EXPECT_EQ(j["counters"]["stale_accesses"], 12);
  EXPECT_EQ(j["counters"].size(), size_t(kNumCounters));
  EXPECT_TRUE(j["details"].is_object());
  EXPECT_EQ(j["options"]["slots"], "4");
}

// --- benchmarks --------------------------------------------------------------------

TEST(RegistryBench, DefaultOptionsAreValidAndRangesAreEnforced) {
  BenchOptions o;
  EXPECT_TRUE(validate(o));
  EXPECT_EQ(o.slots, 8192u);
  EXPECT_EQ(o.strategies.size(), 3u);
  EXPECT_EQ(o.memory, MemoryKind::unmanaged);
  auto bad = [](auto mutate) {
    BenchOptions b;
    mutate(b);
    return !validate(b);
  };
  EXPECT_TRUE(bad([](BenchOptions& b) { b.slots = 1; }));
  EXPECT_TRUE(bad([](BenchOptions& b) { b.slots = 32765; }));
  EXPECT_FALSE(bad([](BenchOptions& b) { b.slots = 32764; }));
  EXPECT_TRUE(bad([](BenchOptions& b) { b.seconds = 0; }));
  EXPECT_TRUE(bad([](BenchOptions& b) { b.runs = 0; }));
  EXPECT_TRUE(bad([](BenchOptions& b) { b.scale = 1.5; }));
  EXPECT_TRUE(bad([](BenchOptions& b) { b.scale = 0; }));
  EXPECT_TRUE(bad([](BenchOptions& b) { b.strategies.clear(); }));
  EXPECT_TRUE(bad([](BenchOptions& b) { b.exit_cost_ns = kMaxExitCostNs + 1; }));
}

TEST(RegistryBench, ARowCarriesTheStandardFieldsAndItsExtras) {
  BenchRow row;
  row.test = "unmap";
  row.strategy = StrategyKind::cache;
  row.seconds_per_iteration = 0.5;
  row.iterations = 10;
  row.cold_iteration_seconds = 2;
  row.seconds_per_round_trip = 1e-6;
  row.counters[Counter::nested_round_trips] = 100;
  row.counters[Counter::shootdowns] = 7;
  row.counters[Counter::remap_windows] = 3;
  row.extra["nested_context_reuse_per_switch"] = 1.0;
  auto j = row.to_json();
  for (const char* key : {"test", "strategy", "seconds_per_iteration", "iterations", "cold_iteration_seconds",
                          "seconds_per_round_trip", "nested_round_trips", "shootdowns", "ept12_faults", "maps",
                          "unmaps", "remap_windows", "stale_accesses"})
    EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_EQ(j["strategy"], "cache");
  EXPECT_EQ(j["nested_round_trips"], 100);
  EXPECT_EQ(j["shootdowns"], 7);
  EXPECT_EQ(j["counters"]["remap_windows"], 3);
  EXPECT_EQ(j["nested_context_reuse_per_switch"], 1.0);
}

// A view a row has no time for is null in JSON, as the table prints "-":
// never 0 s, which a reader could take for a measured time.
TEST(RegistryBench, RowJsonHasNullForATimeItDoesNotHave) {
  BenchRow none;  // no iteration completed
  none.failures.push_back("no iteration completed in the run");
  nlohmann::json j = none.to_json();
  for (const char* key : {"seconds_per_iteration", "cold_iteration_seconds", "seconds_per_round_trip",
                          "wall_seconds_per_iteration"})
    EXPECT_TRUE(j[key].is_null()) << key << ": " << j[key];
  for (const char* view : {"per_iteration", "per_round_trip", "cold_iteration"})
    EXPECT_TRUE(j["breakdown"][view].empty()) << view;
  BenchRow no_trip;  // an iteration but no round trip (l2-switch's single cold round)
  no_trip.iterations = 1;
  no_trip.seconds_per_iteration = no_trip.cold_iteration_seconds = 2e-5;
  j = no_trip.to_json();
  EXPECT_EQ(j["seconds_per_iteration"], 2e-5);
  EXPECT_EQ(j["cold_iteration_seconds"], 2e-5);
  EXPECT_TRUE(j["seconds_per_round_trip"].is_null());
  EXPECT_TRUE(j["breakdown"]["per_round_trip"].empty());
}

TEST(RegistryBench, TheReportHasTheDocumentedTopLevelFields) {
  BenchReport rep;
  rep.options.slots = 512;
  BenchRow row;
  row.test = "map";
  row.exit_cost_ns = 700;
  rep.rows.push_back(row);
  auto j = rep.to_json();
  EXPECT_EQ(j["exit_cost_ns"], 700) << "the model's default, as the row reports it";
  EXPECT_EQ(j["l1_hz"], 250);
  EXPECT_EQ(j["slots"], 512);
  EXPECT_EQ(j["memory"], "unmanaged");
  EXPECT_EQ(j["seconds_limit"], 5.0);
  EXPECT_TRUE(j["iterations_limit"].is_null());
  ASSERT_EQ(j["results"].size(), 1u);
  EXPECT_EQ(j["results"][0]["test"], "map");
  rep.options.exit_cost_ns = 0;
  EXPECT_EQ(rep.to_json()["exit_cost_ns"], 0) << "an explicit --exit-cost-ns wins, even 0";
  rep.options.iterations = 3;
  EXPECT_TRUE(rep.to_json()["seconds_limit"].is_null()) << "--iterations replaces the time limit";
  EXPECT_EQ(rep.to_json()["iterations_limit"], 3);
}

// The seed's line names what of our run differs from the seed's set-up
// (8192 memslots, the whole area, unmanaged memory), and nothing when the
// run is the seed's.
TEST(RegistryBench, TheSeedsLineSaysHowOurRunDiffersFromTheSeeds) {
  register_all();
  const BenchInfo* map = find_bench("map");
  ASSERT_NE(map, nullptr);
  ASSERT_TRUE(map->commentary);
  auto seed_line = [&](nlohmann::json extra) {
    std::vector<BenchRow> rows(2);
    rows[0].strategy = vmx::StrategyKind::map;
    rows[1].strategy = vmx::StrategyKind::cache;
    for (BenchRow& r : rows) r.extra = extra;
    for (const std::string& line : map->commentary(rows))
      if (line.starts_with("seed ")) return line;
    return std::string();
  };
  const std::string same = seed_line({{"slots_used", 8192}, {"scale", 1.0}, {"memory", "unmanaged"}});
  ASSERT_FALSE(same.empty());
  EXPECT_EQ(same.find("Ours ran with"), std::string::npos) << same;
  const std::string other = seed_line({{"slots_used", 16}, {"scale", 0.01}, {"memory", "managed"}});
  EXPECT_NE(other.find("Ours ran with 16 memslots, the area scaled by 0.01, managed memory"), std::string::npos)
      << other;
}

// map with no remap window on unmanaged memory (no round trip reached L0,
// as move-inactive's guest often makes none): the line says so, and does not
// explain it by managed memory, which this run did not use.
TEST(RegistryBench, NoWindowOnUnmanagedMemoryIsNotCalledManaged) {
  register_all();
  const BenchInfo* b = find_bench("move-inactive");
  ASSERT_NE(b, nullptr);
  ASSERT_TRUE(b->commentary);
  auto lines_for = [&](const char* memory) {
    std::vector<BenchRow> rows(2);
    rows[0].strategy = vmx::StrategyKind::map;
    rows[1].strategy = vmx::StrategyKind::cache;
    for (BenchRow& r : rows) {
      r.iterations = 1;  // a row with a result (the commentary leaves a row with none alone)
      r.extra = {{"memory", memory}, {"remap_window_ns", 15000.0}};
    }
    return b->commentary(rows);
  };
  bool said = false;
  for (const std::string& line : lines_for("unmanaged")) {
    EXPECT_EQ(line.find("managed memory:"), std::string::npos) << line;
    said |= line.starts_with("map opened no remap window: 0 nested round trips and 0 HostMap maps");
  }
  EXPECT_TRUE(said);
  bool managed = false;
  for (const std::string& line : lines_for("managed"))
    managed |= line.find("(managed memory: HostMap pins") != std::string::npos;
  EXPECT_TRUE(managed) << "managed memory keeps its own explanation";
}

TEST(RegistryBench, FindBenchOfAnUnknownNameIsNull) {
  register_all();
  EXPECT_EQ(find_bench("no-such-test"), nullptr);
}

// --- helpers -------------------------------------------------------------------------

TEST(RegistryCounters, PoolCountersComeFromPhysMemAndTheRestAreSummed) {
  CounterSnapshot phys, mm, vm;
  phys[Counter::remap_windows] = 5;  // every window in the pool
  vm[Counter::remap_windows] = 2;    // the VM's HostMap windows, counted again
  phys[Counter::stale_accesses] = 1;
  vm[Counter::stale_accesses] = 1;
  mm[Counter::migrations] = 3;
  vm[Counter::maps] = 4;
  CounterSnapshot others[] = {mm, vm};
  CounterSnapshot m = merge_run_counters(phys, others);
  EXPECT_EQ(m[Counter::remap_windows], 5u);
  EXPECT_EQ(m[Counter::stale_accesses], 1u);
  EXPECT_EQ(m[Counter::migrations], 3u);
  EXPECT_EQ(m[Counter::maps], 4u);
}

TEST(RegistryProgress, RenderDrawsABarAndCounts) {
  EXPECT_EQ(Progress::render(1, 4, "map / cache", 8), "[##......]  25% 1/4 map / cache");
  EXPECT_EQ(Progress::render(9, 4, "x", 4), "[####] 100% 4/4 x");
  EXPECT_EQ(Progress::render(3, 0, "pages"), "pages 3");
}

TEST(RegistryProgress, ADisabledDisplayIgnoresUpdates) {
  Progress p(false);
  EXPECT_FALSE(p.active());
  p.update(1, 2, "nothing drawn");
  p.finish();
}

// --runs N keeps the fastest run's figures, but a check that failed in any
// run fails the row: the kept run's failures first, then every other run's,
// each naming its run.
TEST(RegistryBench, FailuresOfEveryRunAreKept) {
  const std::vector<std::vector<std::string>> per_run = {{"2 stale accesses with cache"}, {}, {"a", "b"}};
  EXPECT_EQ(failures_of_runs(per_run, 1),
            (std::vector<std::string>{"run 1 of 3: 2 stale accesses with cache", "run 3 of 3: a", "run 3 of 3: b"}));
  EXPECT_EQ(failures_of_runs(per_run, 2),
            (std::vector<std::string>{"a", "b", "run 1 of 3: 2 stale accesses with cache"}));
  EXPECT_TRUE(failures_of_runs({{}, {}}, 0).empty());
  EXPECT_EQ(failures_of_runs({{"x"}}, 0), std::vector<std::string>{"x"});
}

// fastest_of_runs keeps the row with the least time per iteration, never
// one with no iteration over one that has some, with every run's failures;
// the first error ends it.
TEST(RegistryBench, FastestOfRunsKeepsTheFastestRowWithEveryRunsFailures) {
  auto row = [](uint64_t iterations, double seconds, std::vector<std::string> failures) {
    BenchRow r;
    r.iterations = iterations;
    r.seconds_per_iteration = seconds;
    r.failures = std::move(failures);
    return r;
  };
  const std::vector<BenchRow> rows = {row(4, 2.0, {"slow"}), row(0, 0.0, {"no iteration"}), row(4, 1.0, {})};
  auto kept = fastest_of_runs(3, [&](uint32_t r) -> Result<BenchRow> { return rows[r]; });
  ASSERT_TRUE(kept) << kept.error().to_string();
  EXPECT_EQ(kept->seconds_per_iteration, 1.0);
  EXPECT_EQ(kept->failures, (std::vector<std::string>{"run 1 of 3: slow", "run 2 of 3: no iteration"}));
  // A first run with no iteration (0 s per iteration) is displaced by a
  // later one that has some: it was kept, as the fastest.
  const std::vector<BenchRow> late = {row(0, 0.0, {}), row(4, 3.0, {})};
  auto kept_late = fastest_of_runs(2, [&](uint32_t r) -> Result<BenchRow> { return late[r]; });
  ASSERT_TRUE(kept_late) << kept_late.error().to_string();
  EXPECT_EQ(kept_late->iterations, 4u);
  EXPECT_EQ(kept_late->seconds_per_iteration, 3.0);
  // No run with an iteration: the row is flagged, not a result of 0 s.
  const std::vector<BenchRow> none = {row(0, 0.0, {}), row(0, 0.0, {})};
  auto kept_none = fastest_of_runs(2, [&](uint32_t r) -> Result<BenchRow> { return none[r]; });
  ASSERT_TRUE(kept_none) << kept_none.error().to_string();
  ASSERT_EQ(kept_none->failures.size(), 1u);
  EXPECT_NE(kept_none->failures[0].find("no iteration completed"), std::string::npos) << kept_none->failures[0];
  int calls = 0;
  auto failed = fastest_of_runs(3, [&](uint32_t r) -> Result<BenchRow> {
    calls++;
    if (r == 1) return errorf(ENOMEM, "run {} could not start", r);
    return rows[r];
  });
  ASSERT_FALSE(failed);
  EXPECT_EQ(failed.error().code, ENOMEM);
  EXPECT_EQ(calls, 2);
}

}  // namespace
}  // namespace nestcache::workloads

