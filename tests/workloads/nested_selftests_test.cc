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
    return r;
  }
};

TEST_P(NestedSelftests, VmxInstructionsMatchTheSdm) {
  SelftestResult r = run("vmx-instructions");
  EXPECT_TRUE(r.passed);
  EXPECT_GE(r.details.value("checks", 0), 40);
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
