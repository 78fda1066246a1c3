// The soak run (workloads/stress.h) through its public API, short: one
// epoch of a few rounds per strategy, checked for what it asserts and for
// its teardown figures; and the teardown counts themselves.
#include <fcntl.h>
#include <unistd.h>

#include <thread>

#include <gtest/gtest.h>

#include "host/fault_injection.h"
#include "workloads/stress.h"
#include "workloads/teardown.h"

namespace nestcache::workloads {
namespace {

StressOptions short_run() {
  StressOptions o;
  o.seconds = 0.01;  // one epoch: a started epoch always finishes
  o.rounds = 4;
  return o;
}

void expect_nothing_left(const nlohmann::json& t) {
  for (const char* field : {"remap_windows_open", "pins", "active_caches", "contexts", "threads", "fds_leaked"}) {
    ASSERT_TRUE(t.contains(field)) << field;
    EXPECT_EQ(t[field].get<int64_t>(), 0) << field;
  }
}

SelftestResult run_and_report(StrategyKind s) {
  SelftestResult r = run_stress(short_run(), s);
  for (const auto& f : r.failures) ADD_FAILURE() << strategy_name(s) << ": " << f;
  if (!r.passed) ADD_FAILURE() << r.details.dump();
  return r;
}

class StressPerStrategy : public ::testing::TestWithParam<StrategyKind> {};

TEST_P(StressPerStrategy, RunsEveryChurnAndLeavesNothing) {
  SelftestResult r = run_and_report(GetParam());
  EXPECT_TRUE(r.passed);
  EXPECT_GE(r.details["epochs"].get<int>(), 1);
  EXPECT_GT(r.details["pages_churn_operations"].get<uint64_t>(), 0u);
  EXPECT_GT(r.details["nested_state_saves"].get<uint64_t>(), 0u);
  EXPECT_GT(r.details["nested_state_migrations"].get<uint64_t>(), 0u);
  EXPECT_GT(r.details["migrations"].get<uint64_t>() + r.details["migrate_ebusy"].get<uint64_t>(), 0u);
  EXPECT_GT(r.details["discards"].get<uint64_t>(), 0u);
  EXPECT_GT(r.details["l2_vcpus"].get<int>(), r.details["context_capacity"].get<int>());
  EXPECT_GT(r.counters[Counter::nested_entries], 0u);
  expect_nothing_left(r.details["teardown"]);
}

INSTANTIATE_TEST_SUITE_P(Strategies, StressPerStrategy,
                         ::testing::Values(StrategyKind::cache, StrategyKind::oracle, StrategyKind::map),
                         [](const auto& info) { return std::string(strategy_name(info.param)); });

TEST(Stress, CacheAndOracleSeeNothingStaleOrLostAndRecycleContexts) {
  for (StrategyKind s : {StrategyKind::cache, StrategyKind::oracle}) {
    SelftestResult r = run_and_report(s);
    EXPECT_EQ(r.counters[Counter::stale_accesses], 0u) << strategy_name(s);
    EXPECT_EQ(r.counters[Counter::lost_tpr_writes], 0u) << strategy_name(s);
    EXPECT_EQ(r.counters[Counter::lost_posted_interrupts], 0u) << strategy_name(s);
    EXPECT_GT(r.counters[Counter::nested_context_recycle], 0u) << strategy_name(s);
  }
}

TEST(Stress, MapReportsTheDetectorsInsteadOfFailing) {
  SelftestResult r = run_and_report(StrategyKind::map);
  EXPECT_TRUE(r.passed);
  EXPECT_EQ(r.counters[Counter::nested_context_recycle], 0u);  // map has no contexts
  bool reported = false;
  for (const auto& n : r.notes) reported = reported || n.find("stale accesses") != std::string::npos;
  EXPECT_TRUE(reported);
}

TEST(Stress, AStopRequestEndsTheRunAfterTheEpochUnderWayAndStillChecksTeardown) {
  StressOptions o = short_run();
  o.seconds = kMaxStressSeconds;  // only the stop request can end it
  std::atomic<bool> stop{true};
  o.stop = &stop;
  SelftestResult r = run_stress(o, StrategyKind::cache);
  for (const auto& f : r.failures) ADD_FAILURE() << f;
  EXPECT_TRUE(r.passed);
  EXPECT_EQ(r.details["epochs"].get<int>(), 1);
  EXPECT_TRUE(r.details["stopped_early"].get<bool>());
  EXPECT_GT(r.counters[Counter::nested_entries], 0u);
  expect_nothing_left(r.details["teardown"]);
}

TEST(Stress, ARunThatReachesItsTimeWasNotStoppedEarly) {
  std::atomic<bool> stop{false};
  StressOptions o = short_run();
  o.stop = &stop;
  SelftestResult r = run_stress(o, StrategyKind::oracle);
  EXPECT_TRUE(r.passed);
  EXPECT_FALSE(r.details["stopped_early"].get<bool>());
}

TEST(Stress, OptionsOutOfRangeAreRefusedAsUsageErrors) {
  StressOptions o = short_run();
  o.seconds = 0;
  SelftestResult r = run_stress(o, StrategyKind::cache);
  EXPECT_FALSE(r.passed);
  EXPECT_TRUE(r.usage_error);
  ASSERT_EQ(r.failures.size(), 1u);
  EXPECT_NE(r.failures[0].find("--seconds"), std::string::npos);

  o = short_run();
  o.rounds = 0;
  r = run_stress(o, StrategyKind::cache);
  EXPECT_TRUE(r.usage_error);
  EXPECT_NE(r.failures.at(0).find("--rounds"), std::string::npos);

  o = short_run();
  o.rounds = int64_t{1} << 40;  // checked as given, not after narrowing
  EXPECT_FALSE(validate(o));
  o = short_run();
  o.strategies.clear();
  EXPECT_FALSE(validate(o));
}

TEST(Teardown, CountsADescriptorLeftOpen) {
  ProcessResources before = ProcessResources::now();
  int fd = open("/dev/null", O_RDONLY);
  ASSERT_GE(fd, 0);
  Teardown t;
  t.take_process(before);
  EXPECT_EQ(t.fds_leaked, 1);
  EXPECT_FALSE(t.none());
  close(fd);
  t.take_process(before);
  EXPECT_EQ(t.fds_leaked, 0);
  EXPECT_TRUE(t.none());
}

TEST(Teardown, CountsAThreadStillRunning) {
  ProcessResources before = ProcessResources::now();
  std::atomic<bool> stop{false};
  auto th = host::start_thread("the test thread", [&] {
    while (!stop.load()) std::this_thread::yield();
  });
  ASSERT_TRUE(th);
  Teardown t;
  t.take_process(before);
  EXPECT_EQ(t.threads, 1);
  EXPECT_FALSE(t.none());
  stop.store(true);
  th->join();
  t.take_process(before);
  EXPECT_EQ(t.threads, 0);
  EXPECT_TRUE(t.none());
}

TEST(Teardown, AVmLeftBehindCountsItsWindowsAndPins) {
  Teardown t;
  t.add(Leaks{.open_windows = 2, .held_pins = 1, .active_caches = 3});
  EXPECT_FALSE(t.none());
  nlohmann::json j = t;
  EXPECT_EQ(j["remap_windows_open"], 2);
  EXPECT_EQ(j["pins"], 1);
  EXPECT_EQ(j["active_caches"], 3);
}

}  // namespace
}  // namespace nestcache::workloads
