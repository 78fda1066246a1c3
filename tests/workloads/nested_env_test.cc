// NestedEnv's own features: the idle pfn caches a run can keep registered
// (--extra-caches) and the teardown that releases them.
#include "workloads/nested_env.h"

#include <gtest/gtest.h>

#include "support/nested_env.h"
#include "vm/cache_registry.h"
#include "workloads/memslot_perf.h"
#include "workloads/pages_workload.h"

namespace nestcache::workloads {
namespace {

class ExtraCaches : public ::testing::TestWithParam<MemoryKind> {};

TEST_P(ExtraCaches, AreRegisteredSeeInvalidationsAndGoAtTeardown) {
  NestedEnvConfig c;
  c.strategy = StrategyKind::map;
  c.memory = GetParam();
  c.l1_bytes = 4 << 20;
  c.extra_caches = 40;
  auto env = test_support::make_nested_env(c);
  ASSERT_TRUE(env);
  EXPECT_EQ(env->extra_caches.size(), 40u);
  EXPECT_EQ(env->vm->caches().active_count(), 40u);
  EXPECT_EQ(env->extra_cache_windows, GetParam() == MemoryKind::unmanaged ? 40u : 0u);

  // Discarding L1's first page invalidates the caches on it: the 40 are
  // spread round-robin over kL1PagesStart / kPageSize pages.
  const uint64_t pages = kL1PagesStart / kPageSize;
  const uint64_t on_page0 = (40 + pages - 1) / pages;
  const uint64_t before = env->vm->counters().get(Counter::cache_invalidations);
  ASSERT_TRUE(env->mm->discard(env->l1_base, kPageSize));
  EXPECT_EQ(env->vm->counters().get(Counter::cache_invalidations) - before, on_page0);

  Leaks l = env->tear_down();
  EXPECT_TRUE(l.none()) << l.to_string();
  EXPECT_TRUE(env->extra_caches.empty());
}

INSTANTIATE_TEST_SUITE_P(Memory, ExtraCaches, ::testing::Values(MemoryKind::managed, MemoryKind::unmanaged),
                         [](const auto& info) { return std::string(memory_kind_name(info.param)); });

// A run's watchdog grows with the work its options ask for, so the largest
// runs the options allow are not cut off, and saturates instead of wrapping.
TEST(RunWatchdog, GrowsWithTheWorkAndSaturates) {
  using std::chrono::milliseconds;
  EXPECT_EQ(run_watchdog(0, kPagesRoundAllowance), milliseconds(120'000));
  EXPECT_EQ(run_watchdog(100'000, kPagesRoundAllowance), milliseconds(120'000 + 100'000 * 500));
  EXPECT_EQ(run_watchdog(UINT64_MAX, std::chrono::seconds(1)), milliseconds(int64_t{1} << 40));
  EXPECT_EQ(run_watchdog(UINT64_MAX, std::chrono::microseconds(0)), milliseconds(120'000));
}

// A bench run's watchdog follows the time or the iterations it is asked for:
// a wall-clock run of 700 s is not cut off at a fixed 600 s.
TEST(RunWatchdog, BenchRunsGetTheirTimeOrIterations) {
  using std::chrono::milliseconds;
  EXPECT_GT(bench_watchdog(700, 0, std::chrono::seconds(1)), milliseconds(700'000));
  EXPECT_GE(bench_watchdog(0.001, 0, std::chrono::seconds(1)), milliseconds(120'000));
  EXPECT_EQ(bench_watchdog(5, 1000, kMemslotIterationAllowance), run_watchdog(1000, kMemslotIterationAllowance));
  EXPECT_EQ(bench_watchdog(86400, 0, std::chrono::seconds(1)), run_watchdog(86'400'001, std::chrono::seconds(1)));
}

// The pages workload reports each round L2 completes (the selftests' progress).
TEST(PagesWorkload, ReportsEveryRound) {
  NestedEnvConfig c;
  c.vcpus = 2;
  auto env = test_support::make_nested_env(c);
  ASSERT_TRUE(env);
  PagesWorkloadConfig pc;
  pc.rounds = 5;
  pc.interrupts_per_round = 1;
  std::vector<int> seen;
  pc.on_round = [&seen](int done) { seen.push_back(done); };
  SelftestResult r;
  PagesTranscript t = run_pages_workload(*env, pc, r);
  EXPECT_TRUE(r.failures.empty()) << r.failures.front();
  EXPECT_EQ(t.rounds, 5);
  EXPECT_EQ(seen, (std::vector<int>{1, 2, 3, 4, 5}));
}

}  // namespace
}  // namespace nestcache::workloads
