// PfnCache used wrongly through its public API: every misuse is an error
// value or an empty handle, never a crash, a mapping left behind or a
// change of what the cache holds.
#include <gtest/gtest.h>

#include "support/params.h"
#include "vm_fixture.h"

namespace nestcache::vm {
namespace {

using testing::KindAndSide;
using testing::VmEnv;

class PfnCacheMisuseTest : public ::testing::TestWithParam<KindAndSide> {
 protected:
  void SetUp() override { env.phys->set_stale_access_fatal(true); }
  int64_t windows_open() const {
    return static_cast<int64_t>(env.phys->counters().get(Counter::remap_windows)) -
           static_cast<int64_t>(env.phys->counters().get(Counter::remap_windows_closed));
  }
  VmEnv env{testing::env_config(GetParam())};
  const Gpa outside = 0x10000000;  // far past the 64 pages of memslot 0
};

TEST_P(PfnCacheMisuseTest, AGpaOutsideEveryMemslotIsEfaultAndMapsNothing) {
  PfnCache c(*env.vm);
  Status st = c.activate(outside, 8);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, EFAULT) << st.error().to_string();
  EXPECT_FALSE(c.check(8));
  EXPECT_EQ(windows_open(), 0);
  Result<CachePtr> p = c.lock(outside, 8);
  ASSERT_FALSE(p);
  EXPECT_EQ(p.error().code, EFAULT);
  c.deactivate();
  EXPECT_FALSE(c.active());
}

TEST_P(PfnCacheMisuseTest, ALengthPastThePageIsEinvalAndAZeroLengthFitsAnywhere) {
  PfnCache c(*env.vm);
  Status st = c.activate(0x3000, kPageSize + 1);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, EINVAL) << st.error().to_string();
  EXPECT_FALSE(c.check(8));
  EXPECT_EQ(c.refresh(kPageSize + 1).error().code, EINVAL);
  // A huge length must not wrap around the page-fit arithmetic.
  EXPECT_EQ(c.refresh(SIZE_MAX).error().code, EINVAL);
  EXPECT_FALSE(c.lock(0x3000, SIZE_MAX));
  EXPECT_FALSE(c.read(0x3000, SIZE_MAX));
  ASSERT_TRUE(c.activate(0x3000, kPageSize));  // the whole page is fine
  EXPECT_TRUE(c.check(kPageSize));
  EXPECT_FALSE(c.check(SIZE_MAX));
  EXPECT_TRUE(c.check(0));
  c.deactivate();
  EXPECT_EQ(windows_open(), 0);
}

// The page-fit test must not wrap for a gpa that is not at the start of its
// page either: there, offset + SIZE_MAX is a small number.
TEST_P(PfnCacheMisuseTest, AHugeLengthAtAnUnalignedGpaDoesNotWrapThePageFit) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(0x3ff8, 8));
  EXPECT_FALSE(c.read(0x3ff8, SIZE_MAX));
  EXPECT_FALSE(c.read(SIZE_MAX));
  EXPECT_FALSE(c.lock(0x3ff8, SIZE_MAX));
  EXPECT_EQ(c.refresh(SIZE_MAX).error().code, EINVAL);
  EXPECT_EQ(c.activate(0x3ff8, SIZE_MAX).error().code, EINVAL);
  EXPECT_TRUE(c.read(0x3ff8, 8)) << "the failed calls changed nothing";
}

TEST_P(PfnCacheMisuseTest, RefreshOfAnInactiveCacheIsEinval) {
  PfnCache c(*env.vm);
  EXPECT_EQ(c.refresh(8).error().code, EINVAL);
  ASSERT_TRUE(c.activate(0x3000, 8));
  c.deactivate();
  EXPECT_EQ(c.refresh(8).error().code, EINVAL);
  EXPECT_FALSE(c.check(8));
}

// (The lock-free read side retires a replaced mapping until its readers
// drain, so only the end state is checked for windows.)
TEST_P(PfnCacheMisuseTest, DoubleActivateAndDoubleDeactivateLeaveNoMappingBehind) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(0x3000, 8));
  ASSERT_TRUE(c.activate(0x3000, 8));
  ASSERT_TRUE(c.activate(0x5000, 8));  // moves the cache: the old mapping goes
  EXPECT_EQ(c.gpa(), Gpa{0x5000});
  EXPECT_FALSE(c.read(0x3000, 8));
  EXPECT_TRUE(c.read(0x5000, 8));
  c.deactivate();
  c.deactivate();
  EXPECT_FALSE(c.active());
  EXPECT_EQ(windows_open(), 0);
}

TEST_P(PfnCacheMisuseTest, AFailedActivateAfterAGoodOneDropsTheOldMapping) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(0x3000, 8));
  EXPECT_FALSE(c.activate(outside, 8));
  EXPECT_FALSE(c.read(0x3000, 8)) << "the cache must not keep serving the gpa it left";
  EXPECT_FALSE(c.check(8));
  c.deactivate();
  EXPECT_EQ(windows_open(), 0);
}

TEST_P(PfnCacheMisuseTest, AnUnalignedGpaThatFitsItsPageIsServed) {
  uint64_t v = 0xfeedface;
  ASSERT_TRUE(env.vm->write_guest(0x3ff8, &v, 8));
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(0x3ff8, 8));
  CachePtr p = c.read(0x3ff8, 8);
  ASSERT_TRUE(p);
  EXPECT_EQ(p.read<uint64_t>(0), v);
  p.reset();  // a handle holds the read side: no second read under it
  EXPECT_FALSE(c.read(0x3ff8, 9));
}

INSTANTIATE_TEST_SUITE_P(Memory, PfnCacheMisuseTest, testing::kKindsAndSides, testing::kind_and_side_name);

}  // namespace
}  // namespace nestcache::vm
