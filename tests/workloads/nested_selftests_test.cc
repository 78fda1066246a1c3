// The nested-VMX selftests, run through the registry as the CLI runs them,
// under every page strategy and memory kind.
#include <gtest/gtest.h>

#include "workloads/registry.h"
#include "workloads/selftests.h"

namespace nestcache::workloads {
namespace {

struct Case {
  Strategy strategy;
  MemoryKind memory;
};

std::string case_name(const ::testing::TestParamInfo<Case>& c) {
  return std::string(strategy_name(c.param.strategy)) + "_" + std::string(memory_kind_name(c.param.memory));
}

class NestedSelftests : public ::testing::TestWithParam<Case> {
 protected:
  SelftestResult run(const std::string& name, std::map<std::string, std::string> extra = {}) {
    register_all();
    if (!find_selftest("vmx-instructions")) register_vmx_instructions_selftest();
    if (!find_selftest("nested-pages")) register_nested_pages_selftest();
    if (!find_selftest("migrate-under-l2")) register_migrate_under_l2_selftest();
    const SelftestInfo* info = find_selftest(name);
    EXPECT_NE(info, nullptr) << name;
    if (!info) return {};
    RunOptions o;
    o.strategy = GetParam().strategy;
    o.memory = GetParam().memory;
    o.extra = default_extra(*info);
    for (auto& [k, v] : extra) o.extra[k] = v;
    SelftestResult r = info->run(o);
    for (auto& f : r.failures) ADD_FAILURE() << name << ": " << f;
    if (!r.failures.empty()) {
      for (auto& n : r.notes) ADD_FAILURE() << name << " (note): " << n;
      ADD_FAILURE() << name << " (details): " << r.details.dump();
    }
    return r;
  }
};

TEST_P(NestedSelftests, VmxInstructionsMatchTheSdm) {
  SelftestResult r = run("vmx-instructions");
  EXPECT_TRUE(r.passed);
  EXPECT_GE(r.details.value("checks", 0), 40);
}

TEST_P(NestedSelftests, NestedPagesGiveTheSameGuestVisibleResults) {
  SelftestResult r = run("nested-pages");
  EXPECT_TRUE(r.passed);
  // Strategy-independent: the transcript is fully determined by the rounds.
  EXPECT_EQ(r.details["transcript"]["interrupts_received"], 32);
  EXPECT_EQ(r.details["transcript"]["apic_access_exits"], 8);
}

TEST_P(NestedSelftests, MigrateUnderL2) {
  SelftestResult r = run("migrate-under-l2", {{"rounds", "20"}});
  EXPECT_TRUE(r.passed);
  uint64_t stale = r.counters[Counter::stale_accesses];
  if (GetParam().strategy == Strategy::map && GetParam().memory == MemoryKind::unmanaged) {
    EXPECT_GT(stale, 0u) << "the detector must see the map strategy's stale pfns";
  } else if (GetParam().strategy != Strategy::map) {
    EXPECT_EQ(stale, 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(All, NestedSelftests,
                         ::testing::Values(Case{Strategy::map, MemoryKind::managed},
                                           Case{Strategy::map, MemoryKind::unmanaged},
                                           Case{Strategy::cache, MemoryKind::managed},
                                           Case{Strategy::cache, MemoryKind::unmanaged},
                                           Case{Strategy::oracle, MemoryKind::managed},
                                           Case{Strategy::oracle, MemoryKind::unmanaged}),
                         case_name);

}  // namespace
}  // namespace nestcache::workloads
