// Test parameters shared by the layers' tests: the page strategies and memory
// kinds nested tests run under, and the names GoogleTest gives each case.
//
//   INSTANTIATE_TEST_SUITE_P(All, MyTest, ::testing::ValuesIn(test_support::every_strategy_and_memory()),
//                            test_support::case_name);
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "host/phys_mem.h"
#include "vmx/page_strategy.h"

namespace nestcache::test_support {

// One strategy on one memory kind.
struct StrategyAndMemory {
  vmx::StrategyKind strategy = vmx::StrategyKind::cache;
  host::FrameKind memory = host::FrameKind::unmanaged;
};

// Every strategy on every memory kind: map, cache, oracle, each managed then
// unmanaged.
std::vector<StrategyAndMemory> every_strategy_and_memory();
// The same without oracle on managed memory (the oracle's hardware-view
// pointers are the same on both kinds).
std::vector<StrategyAndMemory> strategies_and_memory_without_managed_oracle();

// Case names for INSTANTIATE_TEST_SUITE_P: "cache_unmanaged", "map", "managed".
std::string case_name(const ::testing::TestParamInfo<StrategyAndMemory>& info);
std::string strategy_case_name(const ::testing::TestParamInfo<vmx::StrategyKind>& info);
std::string memory_case_name(const ::testing::TestParamInfo<host::FrameKind>& info);

}  // namespace nestcache::test_support
