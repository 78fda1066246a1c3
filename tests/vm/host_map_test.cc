// HostMap: one-shot maps, their costs, and the stale mappings they leave
// when kept across host or memslot changes (the bug the seed fixes).
#include <gtest/gtest.h>

#include "support/params.h"
#include "vm_fixture.h"

namespace nestcache::vm {
namespace {

using testing::VmEnv;

class HostMapTest : public ::testing::TestWithParam<host::FrameKind> {
 protected:
  VmEnv env{GetParam()};
};

TEST_P(HostMapTest, MapReadsAndWritesTheGuestPage) {
  uint64_t v = 99;
  ASSERT_TRUE(env.vm->write_guest(0x2000 + 8, &v, 8));
  auto m = HostMap::map(*env.vm, 2);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->read<uint64_t>(8), 99u);
  m->write<uint64_t>(16, 5);
  m->unmap(true);
  uint64_t back = 0;
  ASSERT_TRUE(env.vm->read_guest(0x2000 + 16, &back, 8));
  EXPECT_EQ(back, 5u);
  EXPECT_EQ(env.phys->counters().get(Counter::stale_accesses), 0u);
}

TEST_P(HostMapTest, ManagedMapsPinAndUnmanagedMapsOpenAWindow) {
  {
    auto m = HostMap::map(*env.vm, 2);
    ASSERT_TRUE(m);
    bool managed = GetParam() == host::FrameKind::managed;
    EXPECT_EQ(env.phys->live_pins(), managed ? 1 : 0);
    EXPECT_EQ(env.phys->live_windows(), managed ? 0 : 1);
    EXPECT_EQ(env.vm->counters().get(Counter::remap_windows), managed ? 0u : 1u);
  }
  EXPECT_EQ(env.phys->live_pins(), 0);
  EXPECT_EQ(env.phys->live_windows(), 0);
  EXPECT_EQ(env.vm->counters().get(Counter::maps), 1u);
  EXPECT_EQ(env.vm->counters().get(Counter::unmaps), 1u);
}

TEST_P(HostMapTest, MappingAGfnOutsideEveryMemslotIsEfault) {
  auto m = HostMap::map(*env.vm, 0x100000);
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, EFAULT);
}

// kvm_vcpu_map asks kvm_follow_pfn for a writable page, which a
// KVM_MEM_READONLY memslot refuses; kvm_vcpu_map_readonly does not.
TEST_P(HostMapTest, AReadOnlyMemslotRefusesAWritableMapButNotAReadOnlyOne) {
  Hva hva = *env.mm->create_region(kPageSize, GetParam());
  ASSERT_TRUE(env.vm->set_memory_region({1, kMemReadonly, 0x100000, kPageSize, hva}));
  auto w = HostMap::map(*env.vm, 0x100);
  ASSERT_FALSE(w);
  EXPECT_EQ(w.error().code, EFAULT) << w.error().to_string();
  auto r = HostMap::map_readonly(*env.vm, 0x100);
  ASSERT_TRUE(r) << r.error().to_string();
  EXPECT_EQ(r->read<uint64_t>(0), 0u);
  EXPECT_TRUE(HostMap::map(*env.vm, 2)) << "a writable slot still maps";
}

TEST_P(HostMapTest, AMapKeptAcrossAMemslotMoveIsDetectedAsStale) {
  auto m = HostMap::map(*env.vm, 2);
  ASSERT_TRUE(m);
  EXPECT_TRUE(m->check());
  Memslot s;
  {
    rcu::ReadLock r;
    s = *env.vm->memslots().active()->by_id(0);
  }
  ASSERT_TRUE(env.vm->set_memory_region({0, 0, 0x10000000, s.npages * kPageSize, s.userspace_addr}));
  EXPECT_FALSE(m->check());
  EXPECT_GT(env.vm->counters().get(Counter::stale_accesses), 0u);
}

TEST(HostMapUnmanaged, AMapKeptAcrossAMigrationIsDetectedAsStale) {
  VmEnv env(host::FrameKind::unmanaged);
  uint64_t v = 1234;
  ASSERT_TRUE(env.vm->write_guest(0x5000, &v, 8));
  auto m = HostMap::map(*env.vm, 5);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->read<uint64_t>(0), 1234u);
  // Nothing stops the migration: unmanaged frames are not pinned, and
  // HostMap hears no notifier.
  ASSERT_TRUE(env.mm->migrate(env.hva_of(0x5000)));
  uint64_t guest_now = 4321;
  ASSERT_TRUE(env.vm->write_guest(0x5000, &guest_now, 8));
  EXPECT_EQ(m->read<uint64_t>(0), 1234u) << "the map still shows the old frame";
  EXPECT_GT(env.phys->counters().get(Counter::stale_accesses), 0u);
  EXPECT_GT(env.vm->counters().get(Counter::stale_accesses), 0u);
}

TEST(HostMapManaged, AMapPinsItsFrameSoMigrationFailsWithEbusy) {
  VmEnv env(host::FrameKind::managed);
  auto m = HostMap::map(*env.vm, 5);
  ASSERT_TRUE(m);
  auto st = env.mm->migrate(env.hva_of(0x5000));
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, EBUSY);
  EXPECT_TRUE(m->check());
}

TEST(HostMapManaged, AMapKeptAcrossADiscardIsStaleEvenThoughThePinKeepsTheFrame) {
  VmEnv env(host::FrameKind::managed);
  auto m = HostMap::map(*env.vm, 5);
  ASSERT_TRUE(m);
  ASSERT_TRUE(env.mm->discard(env.hva_of(0x5000), kPageSize));
  EXPECT_FALSE(m->check());
}

INSTANTIATE_TEST_SUITE_P(Memory, HostMapTest, ::testing::Values(host::FrameKind::managed, host::FrameKind::unmanaged),
                         test_support::memory_case_name);

}  // namespace
}  // namespace nestcache::vm
