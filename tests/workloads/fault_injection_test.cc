// Resource exhaustion through the public API: each fault the host seam can
// inject (host/fault_injection.h) at each step of a selftest and a bench
// row ends the run with an error naming the resource and its errno; the
// process goes on (every thread joined), and the next run without a fault
// passes.
#include <gtest/gtest.h>

#include "host/fault_injection.h"
#include "support/selftests.h"
#include "workloads/registry.h"

namespace nestcache::workloads {
namespace {

using host::FaultSite;

class Exhaustion : public ::testing::Test {
 protected:
  void TearDown() override { host::clear_faults(); }

  // Runs `name` with `fault` armed; expects a failure whose text has `want`.
  void expect_failure(const std::string& name, host::FaultSpec fault, const std::string& want,
                      std::map<std::string, std::string> extra = {}) {
    host::inject_fault(fault);
    SelftestResult r = test_support::run_named_selftest(name, StrategyKind::cache, MemoryKind::unmanaged, extra);
    host::clear_faults();
    EXPECT_FALSE(r.passed) << name;
    std::string all;
    for (const auto& f : r.failures) all += f + "\n";
    EXPECT_NE(all.find(want), std::string::npos) << name << ": " << all;
    EXPECT_EQ(all.find("threw an exception"), std::string::npos) << all;
  }
};

TEST_F(Exhaustion, EachThreadOfMigrateUnderL2) {
  // The host churn thread, then vCPU 0 and vCPU 1.
  expect_failure("migrate-under-l2", {FaultSite::thread, 1, false, EAGAIN}, "EAGAIN: cannot start the host churn thread");
  expect_failure("migrate-under-l2", {FaultSite::thread, 2, false, EAGAIN}, "EAGAIN: cannot start the vCPU 0 thread");
  expect_failure("migrate-under-l2", {FaultSite::thread, 3, false, EAGAIN}, "EAGAIN: cannot start the vCPU 1 thread");
  SelftestResult r = test_support::run_named_selftest("migrate-under-l2", StrategyKind::cache, MemoryKind::unmanaged);
  EXPECT_TRUE(r.passed) << (r.failures.empty() ? "" : r.failures[0]);
}

TEST_F(Exhaustion, NestedStateSetUp) {
  expect_failure("nested-state", {FaultSite::memfd, 1, false, EMFILE}, "EMFILE: memfd_create");
  expect_failure("nested-state", {FaultSite::mmap, 1, false, ENOMEM}, "ENOMEM: mapping the hardware view");
  expect_failure("nested-state", {FaultSite::thread, 1, false, EAGAIN}, "EAGAIN: cannot start the machine's runner thread");
  expect_failure("nested-state", {FaultSite::thread, 2, false, EAGAIN}, "EAGAIN: cannot start the vCPU 0 thread");
}

TEST_F(Exhaustion, RemapWindowsThatKeepFailingEndTheRunWithTheirCause) {
  // From the 30th mmap on (set-up is done, L2 is running) every remap
  // window fails: the vCPU retries the KVM internal error with backoff,
  // gives up after its bound and reports the mmap's ENOMEM.
  expect_failure("migrate-under-l2", {FaultSite::mmap, 30, true, ENOMEM},
                 "ENOMEM: vCPU 0: KVM internal error, still failing after");
}

TEST_F(Exhaustion, WindowsThatCannotBeUnmappedAtTeardownFailTheSelftest) {
  // With cache, these selftests close their remap windows only when the VM
  // goes. Every munmap failing then parks each window (RemapWindow); the
  // VM's destructor would unmap it outside the seam, so only the teardown
  // check can see it.
  const std::map<std::string, std::string> quick_apic = {{"mode", "discard"}, {"delay-ms", "1"}};
  expect_failure("nested-pages", {FaultSite::munmap, 1, true, ENOMEM}, "leaked at teardown: 4 remap windows");
  expect_failure("apic-update", {FaultSite::munmap, 1, true, ENOMEM}, "discard cache: leaked at teardown: ",
                 quick_apic);
  expect_failure("nested-state", {FaultSite::munmap, 1, true, ENOMEM}, "reference VM leaked at teardown: 4 remap windows");
  // Without the fault the same runs leave nothing (a context L1 left
  // attached goes with the machine and is not a leak).
  for (const char* name : {"nested-pages", "apic-update", "nested-state"}) {
    SelftestResult r = test_support::run_named_selftest(name, StrategyKind::cache, MemoryKind::unmanaged,
                                                        std::string_view(name) == "apic-update" ? quick_apic
                                                                                                : std::map<std::string, std::string>{});
    EXPECT_TRUE(r.passed) << name << ": " << (r.failures.empty() ? "" : r.failures[0]);
  }
}

TEST_F(Exhaustion, AMunmapFailureARetryAbsorbsIsCounted) {
  // One failed munmap, retried at once with success: the run passes, and
  // its counters say a munmap failed (PhysMem alone counts it).
  host::inject_fault({FaultSite::munmap, 1, false, ENOMEM});
  SelftestResult r = test_support::run_named_selftest("memslots", StrategyKind::cache, MemoryKind::unmanaged);
  host::clear_faults();
  EXPECT_TRUE(r.passed) << (r.failures.empty() ? "" : r.failures[0]);
  EXPECT_EQ(r.counters[Counter::remap_window_unmap_failures], 1u);
  EXPECT_EQ(r.counters[Counter::remap_windows], r.counters[Counter::remap_windows_closed]);
}

TEST_F(Exhaustion, BenchRows) {
  register_all();
  const BenchInfo* b = find_bench("map");
  ASSERT_NE(b, nullptr);
  BenchOptions o;
  o.iterations = 1;
  o.scale = 0.01;
  o.exit_cost_ns = 0;
  struct Case {
    host::FaultSpec fault;
    int code;
    const char* want;
  };
  for (const Case& c : {Case{{FaultSite::memfd, 1, false, EMFILE}, EMFILE, "memfd_create"},
                        Case{{FaultSite::mmap, 1, false, ENOMEM}, ENOMEM, "mapping the hardware view"},
                        Case{{FaultSite::thread, 1, false, EAGAIN}, EAGAIN, "cannot start the vCPU 0 thread"}}) {
    host::inject_fault(c.fault);
    auto row = b->run(o, StrategyKind::cache);
    host::clear_faults();
    ASSERT_FALSE(row) << c.want;
    EXPECT_EQ(row.error().code, c.code) << row.error().to_string();
    EXPECT_NE(row.error().message.find(c.want), std::string::npos) << row.error().to_string();
  }
  auto row = b->run(o, StrategyKind::cache);
  ASSERT_TRUE(row) << row.error().to_string();
  EXPECT_TRUE(row->failures.empty());
}

}  // namespace
}  // namespace nestcache::workloads
