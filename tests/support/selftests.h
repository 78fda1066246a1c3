// Running registered scenarios from tests, as the CLI runs them.
#pragma once

#include <map>
#include <string>
#include <string_view>

#include "workloads/registry.h"

namespace nestcache::test_support {

// Runs the registered selftest `name` (register_all() first) with `strategy`
// and `memory`, the test's default options and `extra` on top of them,
// through workloads::run_selftest. A name nobody registered is a test
// failure and an empty result.
workloads::SelftestResult run_named_selftest(std::string_view name, vmx::StrategyKind strategy,
                                             host::FrameKind memory,
                                             const std::map<std::string, std::string>& extra = {});

}  // namespace nestcache::test_support
