#include "support/nested_env.h"

#include <gtest/gtest.h>

namespace nestcache::test_support {

std::unique_ptr<workloads::NestedEnv> make_nested_env(const workloads::NestedEnvConfig& c) {
  auto env = workloads::NestedEnv::create(c);
  EXPECT_TRUE(env) << env.error().to_string();
  return env ? std::move(*env) : nullptr;
}

}  // namespace nestcache::test_support
