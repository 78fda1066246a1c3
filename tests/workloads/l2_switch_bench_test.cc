// `nestcache bench --tests l2-switch`, the cost of an L2 switch: the rows for N = 2,
// 8 and 16 carry the context counters, follow the seed's sched formulas, and
// show what the contexts save: no remap window after the cold round with
// cache while every L2 has a context, one set of windows per switch with map.
#include <gtest/gtest.h>

#include "workloads/registry.h"

namespace nestcache::workloads {
namespace {

constexpr uint64_t kRounds = 3;

BenchOptions no_exit_cost() {
  BenchOptions o;
  o.exit_cost_ns = 0;
  return o;
}

// Test `name`'s row for `s`, kRounds rounds of it with options `o`.
BenchRow run(const std::string& name, StrategyKind s, BenchOptions o = no_exit_cost()) {
  register_all();
  const BenchInfo* b = find_bench(name);
  EXPECT_NE(b, nullptr) << name;
  if (!b) return BenchRow{};
  o.iterations = kRounds;
  auto row = b->run(o, s);
  EXPECT_TRUE(row) << (row ? "" : row.error().to_string());
  return row ? *row : BenchRow{};
}

TEST(L2SwitchBench, TheGroupNamesTheThreeSizes) {
  register_all();
  std::vector<std::string> names;
  for (const BenchInfo* b : find_bench_group("l2-switch")) names.push_back(b->name);
  EXPECT_EQ(names, (std::vector<std::string>{"l2-switch-2", "l2-switch-8", "l2-switch-16"}));
  EXPECT_EQ(find_bench("l2-switch"), nullptr) << "the group is not a test of its own";
}

TEST(L2SwitchBench, CacheKeepsEveryL2sPagesWhenEachHasAContext) {
  BenchRow r = run("l2-switch-8", StrategyKind::cache);
  EXPECT_TRUE(r.failures.empty()) << r.to_json().dump();
  EXPECT_EQ(r.iterations, kRounds);
  EXPECT_EQ(r.extra["nested_context_reuse"].get<uint64_t>(), 8 * (kRounds - 1));
  EXPECT_EQ(r.extra["nested_context_recycle"].get<uint64_t>(), 0u);
  EXPECT_EQ(r.counters[Counter::nested_round_trips], 8 * (kRounds - 1));
  // Unmanaged memory: windows open in the cold round only (MSR bitmap,
  // APIC-access and virtual-APIC page of each L2).
  EXPECT_EQ(r.counters[Counter::remap_windows], 8u * 3);
  EXPECT_EQ(r.counters[Counter::stale_accesses], 0u);
}

TEST(L2SwitchBench, MapRemapsOnEverySwitchAndUsesNoContexts) {
  BenchRow r = run("l2-switch-2", StrategyKind::map);
  EXPECT_TRUE(r.failures.empty()) << r.to_json().dump();
  EXPECT_EQ(r.extra["nested_context_reuse"].get<uint64_t>(), 0u);
  EXPECT_EQ(r.extra["contexts"].get<uint64_t>(), 0u);
  // Three pages per entry, every entry of every round.
  EXPECT_EQ(r.counters[Counter::remap_windows], 2u * kRounds * 3);
  EXPECT_GT(r.seconds_per_round_trip, 0);
}

// On managed memory map opens no remap window (HostMap pins): the check
// line says so instead of multiplying 0 windows by a window's cost.
TEST(L2SwitchBench, ManagedMemoryCheckCountsPinsNotWindows) {
  BenchOptions o = no_exit_cost();
  o.memory = MemoryKind::managed;
  std::vector<BenchRow> rows;
  for (StrategyKind s : {StrategyKind::map, StrategyKind::cache}) rows.push_back(run("l2-switch-2", s, o));
  ASSERT_FALSE(HasFailure()) << "a row did not run";
  const BenchInfo* b = find_bench("l2-switch-2");
  ASSERT_EQ(rows[0].counters[Counter::remap_windows], 0u);
  ASSERT_GT(rows[0].counters[Counter::maps], 0u);
  // Map pins each of the vmcs12 pages on every entry; cache keeps its pins.
  EXPECT_GE(rows[0].extra["pins_per_warm_switch"].get<double>(), 3.0);
  EXPECT_EQ(rows[1].extra["pins_per_warm_switch"].get<double>(), 0.0);
  bool said = false;
  for (const std::string& line : b->commentary(rows)) {
    EXPECT_EQ(line.find("more remap windows per switch"), std::string::npos) << line;
    said |= line.find("map opens no remap window on managed memory") != std::string::npos &&
            line.find("more pins per switch") != std::string::npos;
  }
  EXPECT_TRUE(said);
}

TEST(L2SwitchBench, SixteenL2sShareTheEightContexts) {
  BenchRow r = run("l2-switch-16", StrategyKind::oracle);
  EXPECT_TRUE(r.failures.empty()) << r.to_json().dump();
  EXPECT_EQ(r.extra["nested_context_reuse"].get<uint64_t>(), 8 * (kRounds - 1));
  EXPECT_EQ(r.extra["l2"].get<int>(), 16);
  nlohmann::json j = r.to_json();
  for (const char* key : {"nested_context_reuse", "nested_context_recycle", "seconds_per_switch"})
    EXPECT_TRUE(j.contains(key)) << key;
}

// The breakdown's per-round-trip view divides the same time as the row's
// per-round-trip figure: the warm rounds only, as the round trips counted
// leave out the cold round's VMLAUNCHes. (Modelled time with costs, so the
// parts are not all zero.)
TEST(L2SwitchBench, BreakdownPerRoundTripIsTheWarmTimePerRoundTrip) {
  const BenchRow row = run("l2-switch-2", StrategyKind::cache, BenchOptions{});
  nlohmann::json b = row.breakdown();
  ASSERT_FALSE(b["per_round_trip"].empty()) << b.dump();
  double total_ns = b["per_round_trip"]["total_ns"].get<double>();
  EXPECT_NEAR(total_ns, row.seconds_per_round_trip * 1e9, 1) << b.dump();
  double parts_ns = 0;
  for (const auto& [part, ns] : b["per_round_trip"].items())
    if (part != "total_ns") parts_ns += ns.get<double>();
  EXPECT_NEAR(parts_ns, total_ns, 1e-6) << b.dump();
}

// The windows of --extra-caches open when the VMM activates them, before
// the run: oracle's row has none, as in the memslot tests.
TEST(L2SwitchBench, ExtraCachesWindowsAreNotTheRunsWindows) {
  BenchOptions o = no_exit_cost();
  o.extra_caches = 16;
  const BenchRow row = run("l2-switch-2", StrategyKind::oracle, o);
  EXPECT_TRUE(row.failures.empty()) << row.to_json().dump();
  EXPECT_EQ(row.counters[Counter::remap_windows], 0u);
}

// The cold view's time is the time its breakdown splits: the loop from its
// start to the end of round 0 (it was round 0 alone, which left out the
// clock read that opens the round: a guest operation's 2 ns).
TEST(L2SwitchBench, ColdIterationTimeIsItsBreakdownsTotal) {
  const BenchRow row = run("l2-switch-2", StrategyKind::cache, BenchOptions{});
  nlohmann::json b = row.breakdown();
  ASSERT_FALSE(b["cold_iteration"].empty()) << b.dump();
  EXPECT_NEAR(b["cold_iteration"]["total_ns"].get<double>(), row.cold_iteration_seconds * 1e9, 0.5) << b.dump();
}

}  // namespace
}  // namespace nestcache::workloads
