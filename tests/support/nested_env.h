// Nested-VMX environments for tests: the scenarios' NestedEnv (host memory,
// an L1 VM with its memory in memslot 0, a Machine running one page
// strategy), built with a GoogleTest failure instead of an error value.
#pragma once

#include <memory>

#include "workloads/nested_env.h"

namespace nestcache::test_support {

// NestedEnv::create(c); on failure records a test failure naming the error
// and returns null (callers ASSERT_TRUE the result).
std::unique_ptr<workloads::NestedEnv> make_nested_env(const workloads::NestedEnvConfig& c);

}  // namespace nestcache::test_support
