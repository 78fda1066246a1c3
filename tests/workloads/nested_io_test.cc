// nested-io, the representative nested workload, through its public API:
// what every run must show whatever the timing — each request served with
// one doorbell exit, one completion posted and taken, the exits it causes
// accounted as nested round trips, no stale access for any strategy or
// memory kind, and the nested contexts keeping up to 8 L2s per L1 vCPU.
#include <gtest/gtest.h>

#include "workloads/nested_io.h"
#include "workloads/registry.h"

namespace nestcache::workloads {
namespace {

NestedIoConfig small(StrategyKind s, MemoryKind m, uint32_t l2, uint32_t l1) {
  NestedIoConfig c;
  c.strategy = s;
  c.memory = m;
  c.io.l2_vcpus = l2;
  c.io.l1_vcpus = l1;
  c.io.work = 8;
  c.io.msr_every = 3;
  c.requests_per_l2 = 10;
  c.exit_cost_ns = 0;
  return c;
}

NestedIoRun run(const NestedIoConfig& c) {
  auto r = run_nested_io(c);
  EXPECT_TRUE(r) << (r ? "" : r.error().to_string());
  return r ? *r : NestedIoRun{};
}

class NestedIoEveryKind : public ::testing::TestWithParam<std::tuple<StrategyKind, MemoryKind>> {};

TEST_P(NestedIoEveryKind, EveryRequestIsServedWithOneDoorbellAndOneCompletion) {
  auto [s, m] = GetParam();
  NestedIoConfig c = small(s, m, 3, 2);
  NestedIoRun r = run(c);
  EXPECT_TRUE(r.failures.empty()) << ::testing::PrintToString(r.failures);
  IoVcpuTally t = r.total();
  const uint64_t want = 3 * c.requests_per_l2;
  EXPECT_EQ(t.requests, want);
  EXPECT_EQ(t.doorbells, want);
  EXPECT_EQ(t.posted, want);
  EXPECT_EQ(t.received, want);
  EXPECT_EQ(t.bad, 0u);
  EXPECT_EQ(t.msr_exits, 3 * (c.requests_per_l2 / 3));
  // Every request ends with L2 halting in L1, and its completion is in the
  // virtual IRR whenever L2 comes back for it.
  EXPECT_EQ(t.idle_halts, want);
  EXPECT_EQ(t.waiting_halts, 0u);
  // Every reflected exit but the last VMCALL of each L2 is followed by a
  // VMRESUME: one nested round trip each.
  EXPECT_EQ(r.counters[Counter::nested_round_trips],
            t.doorbells + t.msr_exits + t.nested_ticks + t.idle_halts + t.waiting_halts);
  EXPECT_EQ(r.counters[Counter::stale_accesses], 0u);
  EXPECT_EQ(r.counters[Counter::lost_posted_interrupts], 0u);
  EXPECT_GE(r.counters[Counter::posted_interrupts_delivered], want);
  ASSERT_EQ(r.vcpus.size(), 2u);
  EXPECT_EQ(r.vcpus[0].requests, 2 * c.requests_per_l2) << "L2 0 and 2 run on L1 vCPU 0";
  EXPECT_EQ(r.vcpus[1].requests, c.requests_per_l2);
}

INSTANTIATE_TEST_SUITE_P(StrategiesAndMemory, NestedIoEveryKind,
                         ::testing::Combine(::testing::Values(StrategyKind::map, StrategyKind::cache,
                                                              StrategyKind::oracle),
                                            ::testing::Values(MemoryKind::managed, MemoryKind::unmanaged)));

TEST(NestedIo, WithoutTicksNoTickExits) {
  NestedIoConfig c = small(StrategyKind::cache, MemoryKind::unmanaged, 1, 1);
  c.l1_hz = 0;
  NestedIoRun r = run(c);
  EXPECT_TRUE(r.failures.empty());
  EXPECT_EQ(r.total().nested_ticks, 0u);
  EXPECT_EQ(r.total().idle_ticks, 0u);
}

TEST(NestedIo, TicksInterruptL2OrIdleL1) {
  // 10,000 Hz over about 20 requests at 1,000 requests/s: about 200 ticks
  // fall due, fewer are taken (ticks that fall due while a vCPU is parked
  // coalesce, and how many do depends on how fast the host runs). L2 is
  // busy for a few µs of each ms, so almost every tick finds L1 idle.
  NestedIoConfig c = small(StrategyKind::oracle, MemoryKind::unmanaged, 1, 1);
  c.io.rate = 1000;
  c.l1_hz = 10'000;
  c.requests_per_l2 = 20;
  NestedIoRun r = run(c);
  EXPECT_TRUE(r.failures.empty());
  EXPECT_GT(r.total().idle_ticks, 0u) << "an idle L1 takes its own ticks";
  EXPECT_GT(r.total().idle_ticks, r.total().nested_ticks) << "L1 is idle far more than L2 runs";
}

TEST(NestedIo, CacheMapsOnlyOnceWhileEveryL2HasAContext) {
  // Unmanaged memory: each remap window is one map of one vmcs12 page.
  NestedIoRun eight = run(small(StrategyKind::cache, MemoryKind::unmanaged, 8, 1));
  EXPECT_TRUE(eight.failures.empty());
  EXPECT_GT(eight.total().switches, 0u);
  EXPECT_EQ(eight.counters[Counter::remap_windows], 8u * 4) << "four pages per L2, mapped once";
  // Past the 8 contexts of one L1 vCPU, the L2s without one remap.
  NestedIoRun ten = run(small(StrategyKind::cache, MemoryKind::unmanaged, 10, 1));
  EXPECT_TRUE(ten.failures.empty());
  EXPECT_GT(ten.counters[Counter::remap_windows], 10u * 4);
  NestedIoRun map = run(small(StrategyKind::map, MemoryKind::unmanaged, 8, 1));
  EXPECT_GT(map.counters[Counter::remap_windows], map.counters[Counter::nested_round_trips])
      << "map maps the pages on every entry";
}

// --extra-caches are idle caches the VMM activated before the run: their
// remap windows are the set-up's, not the strategy's (8 L2s with cache: one
// window per page of each, as above), as the memslot tests count them.
TEST(NestedIo, ExtraCachesWindowsAreNotTheRunsWindows) {
  NestedIoConfig c = small(StrategyKind::cache, MemoryKind::unmanaged, 8, 1);
  c.extra_caches = 16;
  NestedIoRun r = run(c);
  EXPECT_TRUE(r.failures.empty());
  EXPECT_EQ(r.counters[Counter::remap_windows], 8u * 4);
}

TEST(NestedIoBench, RowsCarryThePerRequestFiguresAndTheComparison) {
  register_all();
  const BenchInfo* b = find_bench("nested-io");
  ASSERT_NE(b, nullptr);
  BenchOptions o;
  o.iterations = 8;
  o.io.work = 8;
  std::vector<BenchRow> rows;
  for (StrategyKind s : kAllStrategies) {
    auto row = b->run(o, s);
    ASSERT_TRUE(row) << row.error().to_string();
    EXPECT_TRUE(row->failures.empty());
    EXPECT_EQ(row->iterations, 8u);
    nlohmann::json j = row->to_json();
    for (const char* key : {"requests_per_second", "round_trips_per_request", "cost_per_request", "doorbell_exits"})
      EXPECT_TRUE(j.contains(key)) << key;
    EXPECT_EQ(j["io_l1_hz"], kDefaultIoL1Hz) << "nested-io ticks at 1000 Hz unless --l1-hz is given";
    EXPECT_DOUBLE_EQ(j["round_trips_per_request"].get<double>(),
                     static_cast<double>(row->counters[Counter::nested_round_trips]) / 8);
    rows.push_back(*row);
  }
  nlohmann::json cmp = nested_io_comparison(rows);
  for (const char* s : {"map", "cache", "oracle"}) {
    ASSERT_TRUE(cmp.contains(s)) << s;
    EXPECT_TRUE(cmp[s].contains("overhead_over_oracle_percent"));
  }
  EXPECT_DOUBLE_EQ(cmp["oracle"]["overhead_over_oracle_percent"].get<double>(), 0.0);
  EXPECT_NE(b->commentary, nullptr);
  EXPECT_FALSE(b->commentary(rows).empty());
}

// On the wall clock the row's views are wall time, as every other test's:
// they were the modelled busy time, under "clock": "wall" (`bench --tests
// nested-io --clock wall`). The busy time is within the loop's wall time.
TEST(NestedIoBench, WallClockRowsAreWallTime) {
  register_all();
  const BenchInfo* b = find_bench("nested-io");
  ASSERT_NE(b, nullptr);
  BenchOptions o;
  o.iterations = 4;
  o.io.work = 8;
  o.io.rate = 100000;
  o.clock = cpu::ClockKind::wall;
  auto row = b->run(o, StrategyKind::cache);
  ASSERT_TRUE(row) << row.error().to_string();
  EXPECT_TRUE(row->failures.empty());
  EXPECT_EQ(row->clock, cpu::ClockKind::wall);
  EXPECT_DOUBLE_EQ(row->cold_iteration_seconds, row->cold.wall_seconds);
  EXPECT_GT(row->seconds_per_iteration, 0.0);
  // Busy time is part of the loop's wall time. The vCPU's loop clock starts
  // a few instructions before the stopwatch does, so with no idle time at
  // all (a slow sanitizer build) the two can differ by that much: a
  // millisecond of slack covers it.
  EXPECT_LE(row->seconds_per_iteration * static_cast<double>(row->iterations), row->loop.wall_seconds + 1e-3);
  std::vector<std::string> lines = b->commentary(std::vector<BenchRow>{*row});
  EXPECT_TRUE(std::any_of(lines.begin(), lines.end(),
                          [](const std::string& l) { return l.find("wall time; the model's accounting") != std::string::npos; }));
}

// A row that served more requests per second than offered is explained;
// one at the offered rate is not.
TEST(NestedIoBench, CommentaryExplainsARateAboveTheOfferedOne) {
  register_all();
  const BenchInfo* b = find_bench("nested-io");
  ASSERT_NE(b, nullptr);
  std::vector<BenchRow> rows(2);
  rows[0].strategy = StrategyKind::map;
  rows[1].strategy = StrategyKind::cache;
  rows[0].extra = {{"offered_rate", 10000}, {"requests_per_second", 9990.0}, {"requests", 20}};
  rows[1].extra = {{"offered_rate", 10000}, {"requests_per_second", 15585.0}, {"requests", 20}};
  std::vector<std::string> lines = b->commentary(rows);
  auto it = std::find_if(lines.begin(), lines.end(),
                         [](const std::string& l) { return l.starts_with("Served more than the 10000 requests/s offered"); });
  ASSERT_NE(it, lines.end());
  EXPECT_NE(it->find("(cache 15585/s)"), std::string::npos) << *it << ": only the row above the offered rate";
}

// At a low offered rate the served one is printed with the digits that make
// it differ: "(oracle 1/s)" said it served more than 1/s.
TEST(NestedIoBench, ALowRateAboveTheOfferedOneShowsItsDigits) {
  register_all();
  const BenchInfo* b = find_bench("nested-io");
  ASSERT_NE(b, nullptr);
  std::vector<BenchRow> rows(1);
  rows[0].strategy = StrategyKind::oracle;
  rows[0].extra = {{"offered_rate", 1}, {"requests_per_second", 1.0612}, {"requests", 100}};
  std::vector<std::string> lines = b->commentary(rows);
  bool said = false;
  for (const std::string& l : lines) {
    if (l.starts_with("oracle: ")) {
      EXPECT_TRUE(l.starts_with("oracle: 1.06 requests/s,")) << l;
    }
    if (l.starts_with("Served more than the 1 requests/s offered")) {
      said = true;
      EXPECT_NE(l.find("(oracle 1.06/s)"), std::string::npos) << l;
    }
  }
  EXPECT_TRUE(said);
}

TEST(NestedIoOptions, ValidateNamesTheBadOption) {
  BenchOptions o;
  o.io.l1_vcpus = 2;
  o.io.l2_vcpus = 1;
  auto st = validate(o);
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("--l1-vcpus"), std::string::npos);
  o = {};
  o.io.rate = 0;
  EXPECT_FALSE(validate(o));
  o = {};
  o.io.l2_vcpus = kMaxIoL2Vcpus + 1;
  EXPECT_FALSE(validate(o));
  EXPECT_TRUE(validate(BenchOptions{}));
}

}  // namespace
}  // namespace nestcache::workloads
