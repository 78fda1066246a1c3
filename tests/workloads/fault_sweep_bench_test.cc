// A fault sweep over a short benchmark row through the public API (the
// bench registry, as `nestcache bench` runs it): `unmap-chunked` at a small
// scale, one iteration, with `map` and `cache`. Each mmap, munmap, memfd
// step and thread start of the row fails in turn (mmap and munmap also from
// the Nth on). The row either ends with an error naming the resource and
// its errno (the CLI prints it and exits 1) or, where a failed munmap was
// retried or parked, completes with no failure; never a stale access. After
// each row every thread is joined, every descriptor closed and every remap
// window of the process unmapped, and the next row without a fault passes.
#include <dirent.h>
#include <gtest/gtest.h>

#include <cstdio>

#include "host/fault_injection.h"
#include "host/phys_mem.h"
#include "support/fault_sweep.h"
#include "workloads/registry.h"

namespace nestcache::workloads {
namespace {

using host::FaultSite;
using test_support::fault_label;

constexpr FaultSite kSites[] = {FaultSite::mmap, FaultSite::munmap, FaultSite::memfd, FaultSite::thread};

// Entries of a /proc/self directory: the process's descriptors.
int count_entries(const char* dir) {
  int n = 0;
  if (DIR* d = opendir(dir)) {
    while (dirent* e = readdir(d))
      if (e->d_name[0] != '.') n++;
    closedir(d);
  }
  return n;
}

struct Baseline {
  int64_t threads = host::running_threads();  // the project's own, not a sanitizer runtime's
  int fds = count_entries("/proc/self/fd");
  int64_t windows = host::windows_open_in_process();
};

class BenchFaultSweep : public ::testing::TestWithParam<StrategyKind> {
 protected:
  void SetUp() override {
    register_all();
    bench_ = find_bench("unmap-chunked");
    ASSERT_NE(bench_, nullptr);
    opts_.iterations = 1;
    opts_.scale = 0.01;
    opts_.slots = kMinBenchSlots;
    opts_.exit_cost_ns = 0;
    opts_.l1_hz = 0;  // no timer ticks: the same operations every run
  }
  void TearDown() override { host::clear_faults(); }

  Result<BenchRow> run() { return bench_->run(opts_, GetParam()); }

  static void expect_clean(const Result<BenchRow>& row) {
    ASSERT_TRUE(row) << row.error().to_string();
    EXPECT_TRUE(row->failures.empty()) << row->failures.front();
    EXPECT_EQ(row->counters[Counter::stale_accesses], 0u);
  }

  const BenchInfo* bench_ = nullptr;
  BenchOptions opts_;
};

TEST_P(BenchFaultSweep, EveryOperationOfEverySiteFailsInTurn) {
  expect_clean(run());  // warm: what a first run sets up once is not counted
  std::map<FaultSite, uint64_t> counts;
  for (FaultSite site : kSites) host::count_operations(site);
  expect_clean(run());
  for (FaultSite site : kSites) counts[site] = host::operations(site);
  host::clear_faults();
  std::printf("[ sweep    ] unmap-chunked/%s: %llu mmap, %llu munmap, %llu memfd, %llu thread\n",
              vmx::strategy_name(GetParam()), static_cast<unsigned long long>(counts[FaultSite::mmap]),
              static_cast<unsigned long long>(counts[FaultSite::munmap]),
              static_cast<unsigned long long>(counts[FaultSite::memfd]),
              static_cast<unsigned long long>(counts[FaultSite::thread]));
  for (FaultSite site : kSites) EXPECT_GT(counts[site], 0u) << host::fault_site_name(site);

  const Baseline before;
  for (FaultSite site : kSites) {
    const bool mapping = site == FaultSite::mmap || site == FaultSite::munmap;
    for (const host::FaultSpec& f : test_support::sweep_faults(site, counts[site], mapping)) {
      SCOPED_TRACE(fault_label(f) + " of " + std::to_string(counts[site]));
      host::inject_fault(f);
      Result<BenchRow> row = run();
      const uint64_t injected = host::faults_injected(f.site);
      host::clear_faults();
      EXPECT_GE(injected, 1u) << "the row made the operation the count saw";
      if (!row) {
        EXPECT_EQ(row.error().code, f.error) << row.error().to_string();
        EXPECT_TRUE(test_support::names_resource(site, row.error().message)) << row.error().to_string();
      } else {
        // Only munmap is retried or parked rather than failing the row.
        EXPECT_EQ(site, FaultSite::munmap) << "a failure went unreported";
        EXPECT_TRUE(row->failures.empty()) << row->failures.front();
        EXPECT_EQ(row->counters[Counter::stale_accesses], 0u);
      }
      const Baseline after;
      EXPECT_EQ(after.threads, before.threads) << "every thread joined";
      EXPECT_EQ(after.fds, before.fds) << "every descriptor closed";
      EXPECT_EQ(after.windows, before.windows) << "every remap window unmapped";
      if (HasFailure()) return;  // one failing fault says enough
    }
  }
  expect_clean(run());
}

// The remap window is measured once per cost (a process-wide cache), after
// the first row's run: the sweep above, warmed, never sees it fail. With a
// cost not measured before, the memfd after the run's own is the
// measurement's: the row could not run, and the figures it was building
// when the error returned are freed (LeakSanitizer reported them).
TEST_P(BenchFaultSweep, TheWindowMeasurementFailingAfterTheRun) {
  expect_clean(run());  // warm: the calibrated cost measured
  host::count_operations(FaultSite::memfd);
  expect_clean(run());
  const uint64_t run_memfds = host::operations(FaultSite::memfd);
  host::clear_faults();
  // A cost measured by no other test, nor by an earlier repeat of this one
  // (--gtest_repeat): the cache outlives a test.
  static uint64_t repeats = 0;
  opts_.window_cost_ns = 987'651 + 16 * repeats++ + static_cast<uint64_t>(GetParam());
  host::inject_fault({FaultSite::memfd, run_memfds + 1, false, EMFILE});
  Result<BenchRow> row = run();
  host::clear_faults();
  ASSERT_FALSE(row);
  EXPECT_EQ(row.error().code, EMFILE) << row.error().to_string();
  EXPECT_TRUE(test_support::names_resource(FaultSite::memfd, row.error().message)) << row.error().to_string();
  expect_clean(run());
}

INSTANTIATE_TEST_SUITE_P(Strategies, BenchFaultSweep, ::testing::Values(StrategyKind::map, StrategyKind::cache),
                         [](const ::testing::TestParamInfo<StrategyKind>& i) {
                           return std::string(vmx::strategy_name(i.param));
                         });

}  // namespace
}  // namespace nestcache::workloads
