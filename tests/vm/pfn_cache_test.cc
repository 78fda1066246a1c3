// PfnCache: activation, invalidation by the MMU notifier and by memslot
// generation, the refresh retry protocol, guest-uses-pfn.
#include <gtest/gtest.h>

#include "support/params.h"
#include "vm_fixture.h"

namespace nestcache::vm {
namespace {

using testing::HarnessVcpu;
using testing::KindAndSide;
using testing::VmEnv;

class PfnCacheTest : public ::testing::TestWithParam<KindAndSide> {
 protected:
  void SetUp() override { env.phys->set_stale_access_fatal(true); }
  static host::FrameKind kind() { return std::get<0>(GetParam()); }
  static CacheReadSide side() { return std::get<1>(GetParam()); }
  bool check(PfnCache& c, size_t len = 8) { return c.check(len); }
  // The pfn a checked cache maps (kInvalidPfn when the check fails).
  Pfn pfn(PfnCache& c) { return c.read(8).pfn(); }
  // Reads through the cache at c_gpa, refreshing it as needed.
  uint64_t read(PfnCache& c, size_t off = 0) {
    Result<CachePtr> p = c.lock(c_gpa, off + 8);
    EXPECT_TRUE(p);
    return p ? p->read<uint64_t>(off) : 0;
  }
  // Reads 8 bytes at gpa through the cache (activating it there if needed).
  uint64_t read_at(PfnCache& c, Gpa gpa) {
    Result<CachePtr> p = c.lock(gpa, 8);
    EXPECT_TRUE(p);
    return p ? p->read<uint64_t>(0) : 0;
  }
  VmEnv env{testing::env_config(GetParam())};
  Gpa c_gpa = 0x3000;
};

TEST_P(PfnCacheTest, ActivateMapsTheFrameBackingTheGpa) {
  uint64_t magic = 0x1122334455667788;
  ASSERT_TRUE(env.vm->write_guest(c_gpa, &magic, 8));
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(c_gpa, 8));
  EXPECT_TRUE(check(c));
  EXPECT_EQ(pfn(c), env.mm->lookup(env.hva_of(c_gpa))->pfn);
  EXPECT_EQ(read(c), magic);
}

TEST_P(PfnCacheTest, ALengthCrossingThePageFailsTheCheck) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(c_gpa + kPageSize - 8, 8));
  EXPECT_TRUE(check(c, 8));
  EXPECT_FALSE(check(c, 9));
  EXPECT_EQ(c.refresh(16).error().code, EINVAL);
}

TEST_P(PfnCacheTest, UnmanagedCachesHoldOneWindowUntilDeactivated) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(c_gpa, 8));
  int64_t expected = kind() == host::FrameKind::unmanaged ? 1 : 0;
  EXPECT_EQ(env.phys->live_windows(), expected);
  for (int i = 0; i < 100; i++) read(c);
  EXPECT_EQ(env.phys->counters().get(Counter::remap_windows), uint64_t(expected)) << "reads reuse the mapping";
  c.deactivate();
  EXPECT_EQ(env.phys->live_windows(), 0);
  EXPECT_FALSE(check(c));
}

TEST_P(PfnCacheTest, MigrationInvalidatesAndRefreshLandsOnTheNewFrameWithTheData) {
  uint64_t magic = 0xfeedface;
  ASSERT_TRUE(env.vm->write_guest(c_gpa + 16, &magic, 8));
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(c_gpa, 64));
  Pfn old = pfn(c);
  ASSERT_TRUE(env.mm->migrate(env.hva_of(c_gpa)));
  EXPECT_FALSE(check(c));
  EXPECT_TRUE(c.invalid());
  ASSERT_TRUE(c.refresh(64));
  EXPECT_TRUE(check(c));
  EXPECT_NE(pfn(c), old);
  EXPECT_EQ(pfn(c), env.mm->lookup(env.hva_of(c_gpa))->pfn);
  EXPECT_EQ(read(c, 16), magic);
  EXPECT_EQ(env.phys->counters().get(Counter::stale_accesses), 0u);
}

TEST_P(PfnCacheTest, DiscardInvalidatesAndRefreshSeesAZeroPage) {
  uint64_t magic = 0xfeedface;
  ASSERT_TRUE(env.vm->write_guest(c_gpa, &magic, 8));
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(c_gpa, 8));
  ASSERT_TRUE(env.mm->discard(env.hva_of(c_gpa), kPageSize));
  EXPECT_FALSE(check(c));
  EXPECT_EQ(read(c), 0u);
  // Writes through the refreshed cache reach the VMM's view of the page.
  {
    Result<CachePtr> p = c.lock(c_gpa, 8);
    ASSERT_TRUE(p);
    p->write<uint64_t>(0, 77);
  }
  uint64_t back = 0;
  ASSERT_TRUE(env.vm->read_guest(c_gpa, &back, 8));
  EXPECT_EQ(back, 77u);
  EXPECT_EQ(env.phys->counters().get(Counter::stale_accesses), 0u);
}

TEST_P(PfnCacheTest, ChangesOutsideTheCachedPageLeaveItValid) {
  uint64_t fill[3 * kPageSize / 8] = {};
  ASSERT_TRUE(env.vm->write_guest(c_gpa - kPageSize, fill, sizeof fill));  // populate the neighbours
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(c_gpa, 8));
  ASSERT_TRUE(env.mm->migrate(env.hva_of(c_gpa + kPageSize)));
  ASSERT_TRUE(env.mm->discard(env.hva_of(c_gpa - kPageSize), kPageSize));
  EXPECT_TRUE(check(c));
}

TEST_P(PfnCacheTest, MemslotMoveFailsTheCheckByGenerationAndRefreshFollowsTheSlot) {
  Hva extra = *env.mm->create_region(kPageSize, kind());
  uint64_t magic = 42;
  ASSERT_TRUE(env.mm->copy_to(extra, &magic, 8));
  ASSERT_TRUE(env.vm->set_memory_region({1, 0, 0x100000, kPageSize, extra}));
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(0x100000, 8));
  ASSERT_TRUE(env.vm->set_memory_region({1, 0, 0x200000, kPageSize, extra}));
  EXPECT_FALSE(check(c)) << "generation changed";
  EXPECT_FALSE(c.invalid()) << "a memslot change needs no notifier: invalid() stays false";
  auto st = c.refresh(8);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, EFAULT) << "the old gpa is unmapped now";
  ASSERT_TRUE(c.activate(0x200000, 8));
  EXPECT_TRUE(check(c));
  EXPECT_EQ(read_at(c, 0x200000), magic);
}

TEST_P(PfnCacheTest, MemslotDeleteThenRecreateAtTheSameGpaRefreshesToTheNewBacking) {
  Hva a = *env.mm->create_region(kPageSize, kind());
  Hva b = *env.mm->create_region(kPageSize, kind());
  uint64_t va = 1, vb = 2;
  ASSERT_TRUE(env.mm->copy_to(a, &va, 8));
  ASSERT_TRUE(env.mm->copy_to(b, &vb, 8));
  ASSERT_TRUE(env.vm->set_memory_region({1, 0, 0x100000, kPageSize, a}));
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(0x100000, 8));
  ASSERT_TRUE(env.vm->set_memory_region({1, 0, 0x100000, 0, 0}));
  ASSERT_TRUE(env.vm->set_memory_region({1, 0, 0x100000, kPageSize, b}));
  EXPECT_FALSE(check(c));
  ASSERT_TRUE(c.refresh(8));
  EXPECT_EQ(read_at(c, 0x100000), vb);
}

TEST_P(PfnCacheTest, AnInvalidationBetweenResolveAndInstallForcesARetry) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(c_gpa, 8));
  ASSERT_TRUE(env.mm->migrate(env.hva_of(c_gpa)));  // cache now invalid
  int hook_calls = 0;
  Pfn raced = kInvalidPfn;
  c.set_refresh_hook([&] {
    // First pass: the refresh has mapped the current frame. Migrate it away
    // now, so that frame is freed before the refresh installs it.
    // (From another thread, as a real host migration would be: the
    // refresh thread holds its refresh mutex here.)
    if (hook_calls++ == 0) {
      raced = env.mm->lookup(env.hva_of(c_gpa))->pfn;
      std::thread([&] { ASSERT_TRUE(env.mm->migrate(env.hva_of(c_gpa))); }).join();
    }
  });
  uint64_t retries = env.vm->counters().get(Counter::cache_refresh_retries);
  ASSERT_TRUE(c.refresh(8));
  EXPECT_EQ(hook_calls, 2);
  EXPECT_EQ(env.vm->counters().get(Counter::cache_refresh_retries), retries + 1);
  EXPECT_NE(pfn(c), raced) << "the frame freed under the refresh was never installed";
  EXPECT_EQ(pfn(c), env.mm->lookup(env.hva_of(c_gpa))->pfn);
  EXPECT_TRUE(check(c));
  c.set_refresh_hook(nullptr);
  read(c);  // fatal on a stale tag
}

TEST_P(PfnCacheTest, TheNotifierDoesNotReturnBeforeTheBoundVcpuLeftGuestMode) {
  HarnessVcpu vcpu(0);
  env.vm->add_vcpu(&vcpu);
  PfnCache c(*env.vm, &vcpu);
  ASSERT_TRUE(c.activate(c_gpa, 8));
  // The "hardware" uses the pfn it was given at entry for the whole guest-mode
  // episode, checking on each operation that the frame is still the page's.
  host::FrameTag hw_tag;
  std::atomic<int> ops{0};
  vcpu.start(
      [&] {
        EXPECT_TRUE(env.phys->check(hw_tag, "harness hardware"));
        ops.fetch_add(1);
      },
      [&] {
        if (!c.check(8) && !c.refresh(8)) return false;
        CachePtr p = c.read(8);
        if (!p) return false;
        hw_tag = p.tag();
        return true;
      },
      [&] { return !c.invalid(); });
  while (ops.load() < 100) std::this_thread::yield();
  int ended = vcpu.episodes_ended.load();
  uint64_t requests = vcpu.counters().get(Counter::requests);
  ASSERT_TRUE(env.mm->migrate(env.hva_of(c_gpa)));
  // migrate() frees the old frame only after the notifier returned; by then
  // the vCPU must have ended the guest-mode episode that used the old pfn
  // and been sent kOutsideGuestMode.
  EXPECT_GT(vcpu.episodes_ended.load(), ended);
  EXPECT_GT(vcpu.counters().get(Counter::requests), requests);
  while (ops.load() < 200) std::this_thread::yield();  // runs on with the new pfn
  vcpu.stop();
  env.vm->remove_vcpu(&vcpu);
  EXPECT_EQ(env.phys->counters().get(Counter::stale_accesses), 0u);
}

TEST_P(PfnCacheTest, RebindingMovesTheKickToTheNewVcpu) {
  HarnessVcpu a(0), b(1);
  PfnCache c(*env.vm, &a);
  ASSERT_TRUE(c.activate(c_gpa, 8));
  c.set_vcpu(&b);
  ASSERT_TRUE(env.mm->migrate(env.hva_of(c_gpa)));
  EXPECT_TRUE(b.test_request(Request::kOutsideGuestMode));
  EXPECT_FALSE(a.test_request(Request::kOutsideGuestMode));
}

// A vCPU that takes a cache over (CachePageSet::lock: set_vcpu, then read)
// while an invalidation is inside the cache must either see it invalid or be
// the vCPU the notifier kicks and waits for. The notifier named the bound vCPU
// before it marked the cache invalid, so B could rebind and read the old pfn in
// between, pass its last check and enter the guest with it, while the notifier
// waited for A only and the host freed the frame under B.
TEST_P(PfnCacheTest, ARebindDuringAnInvalidationSeesTheCacheInvalidOrIsWaitedFor) {
  if (side() != CacheReadSide::lockfree) GTEST_SKIP() << "under the rwlock the read waits for the notifier's write lock";
  HarnessVcpu a(0), b(1);
  PfnCache c(*env.vm, &a);
  ASSERT_TRUE(c.activate(c_gpa, 8));
  bool b_read_valid = false;
  c.set_invalidate_hook([&] {
    // On another thread, as B's vCPU thread would; the notifier waits here
    // until B has rebound the cache and read it.
    std::thread([&] {
      c.set_vcpu(&b);
      b_read_valid = c.check(8);
    }).join();
  });
  ASSERT_TRUE(env.mm->migrate(env.hva_of(c_gpa)));
  c.set_invalidate_hook(nullptr);
  EXPECT_TRUE(!b_read_valid || b.test_request(Request::kOutsideGuestMode))
      << "B read the old pfn, and the notifier neither kicked B nor waited for it";
  // With the hook between the mark and the naming, both happen: B reads the
  // cache invalid, and the notifier names B.
  EXPECT_FALSE(b_read_valid);
  EXPECT_TRUE(b.test_request(Request::kOutsideGuestMode));
  EXPECT_EQ(c.vcpu(), &b);
}

TEST_P(PfnCacheTest, InvalidationFindsOnlyTheAffectedCachesAmongMany) {
  std::vector<std::unique_ptr<PfnCache>> caches;
  for (int i = 0; i < 40; i++) {
    caches.push_back(std::make_unique<PfnCache>(*env.vm));
    ASSERT_TRUE(caches.back()->activate(Gpa(i) * kPageSize, 8));
  }
  EXPECT_EQ(env.vm->caches().active_count(), 40u);
  uint64_t before = env.vm->counters().get(Counter::cache_invalidations);
  ASSERT_TRUE(env.mm->migrate(env.hva_of(7 * kPageSize)));
  EXPECT_EQ(env.vm->counters().get(Counter::cache_invalidations), before + 1);
  for (int i = 0; i < 40; i++) EXPECT_EQ(check(*caches[i]), i != 7) << i;
  caches.clear();
  EXPECT_EQ(env.vm->caches().active_count(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Memory, PfnCacheTest, testing::kKindsAndSides, testing::kind_and_side_name);

}  // namespace
}  // namespace nestcache::vm
