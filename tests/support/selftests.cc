#include "support/selftests.h"

#include <gtest/gtest.h>

namespace nestcache::test_support {

workloads::SelftestResult run_named_selftest(std::string_view name, vmx::StrategyKind strategy,
                                             host::FrameKind memory,
                                             const std::map<std::string, std::string>& extra) {
  workloads::register_all();
  const workloads::SelftestInfo* info = workloads::find_selftest(name);
  EXPECT_NE(info, nullptr) << name;
  if (!info) return {};
  workloads::RunOptions o;
  o.strategy = strategy;
  o.memory = memory;
  o.extra = workloads::default_extra(*info);
  for (const auto& [k, v] : extra) o.extra[k] = v;
  return workloads::run_selftest(*info, o);
}

}  // namespace nestcache::test_support
