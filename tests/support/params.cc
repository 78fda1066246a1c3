#include "support/params.h"

namespace nestcache::test_support {

namespace {
constexpr vmx::StrategyKind kStrategies[] = {vmx::StrategyKind::map, vmx::StrategyKind::cache,
                                             vmx::StrategyKind::oracle};
constexpr host::FrameKind kKinds[] = {host::FrameKind::managed, host::FrameKind::unmanaged};
}  // namespace

std::vector<StrategyAndMemory> every_strategy_and_memory() {
  std::vector<StrategyAndMemory> v;
  for (vmx::StrategyKind s : kStrategies)
    for (host::FrameKind m : kKinds) v.push_back({s, m});
  return v;
}

std::vector<StrategyAndMemory> strategies_and_memory_without_managed_oracle() {
  std::vector<StrategyAndMemory> v;
  for (const StrategyAndMemory& c : every_strategy_and_memory())
    if (!(c.strategy == vmx::StrategyKind::oracle && c.memory == host::FrameKind::managed)) v.push_back(c);
  return v;
}

std::string case_name(const ::testing::TestParamInfo<StrategyAndMemory>& info) {
  return std::string(vmx::strategy_name(info.param.strategy)) + "_" + host::frame_kind_name(info.param.memory);
}

std::string strategy_case_name(const ::testing::TestParamInfo<vmx::StrategyKind>& info) {
  return vmx::strategy_name(info.param);
}

std::string memory_case_name(const ::testing::TestParamInfo<host::FrameKind>& info) {
  return host::frame_kind_name(info.param);
}

}  // namespace nestcache::test_support
