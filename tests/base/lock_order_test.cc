#include <gtest/gtest.h>

#include "base/counters.h"
#include "base/error.h"
#include "base/mutex.h"

#include <nlohmann/json.hpp>

namespace nestcache {
namespace {

TEST(LockOrder, AscendingRanksAreAllowed) {
  Mutex outer(LockRank::kSlots), inner(LockRank::kMmu);
  MutexLock a(outer);
  MutexLock b(inner);
  SUCCEED();
}

#ifdef NESTCACHE_LOCK_CHECKS
TEST(LockOrderDeathTest, DescendingRanksAbort) {
  Mutex outer(LockRank::kSlots), inner(LockRank::kMmu);
  EXPECT_DEATH(
      {
        MutexLock b(inner);
        MutexLock a(outer);
      },
      "lock order violation: taking slots_lock while holding mmu_lock");
}

TEST(LockOrderDeathTest, AssertHeldAbortsWhenTheLockIsNotHeld) {
  Mutex mu(LockRank::kMmu);
  SharedMutex rw(LockRank::kCacheRw);
  {
    MutexLock l(mu);
    mu.assert_held();  // held: passes
  }
  {
    ReaderLock l(rw);
    rw.assert_shared_held();
  }
  EXPECT_DEATH(mu.assert_held(), "mmu_lock lock is not held");
  EXPECT_DEATH(rw.assert_held(), "cache_rw lock is not held");
}
#endif

TEST(Counters, NamesRoundTripAndJson) {
  CounterSet set;
  set.add(Counter::remap_windows, 3);
  EXPECT_EQ(counter_name(Counter::remap_windows), "remap_windows");
  EXPECT_EQ(counter_from_name("stale_accesses"), Counter::stale_accesses);
  EXPECT_FALSE(counter_from_name("no_such_counter"));
  auto j = CounterSnapshot::of(set).to_json();
  EXPECT_EQ(j["remap_windows"], 3);
  EXPECT_EQ(j["stale_accesses"], 0);
}

Result<int> half(int x) {
  if (x % 2) return errorf(EINVAL, "{} is odd", x);
  return x / 2;
}

Result<int> quarter(int x) {
  int h = NC_TRY(half(x));
  return NC_TRY(half(h));
}

TEST(Errors, TryPropagatesTheFirstError) {
  EXPECT_EQ(quarter(8).value(), 2);
  auto r = quarter(6);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().to_string(), "EINVAL: 3 is odd");
}

}  // namespace
}  // namespace nestcache
