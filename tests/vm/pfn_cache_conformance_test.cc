// PfnCache against KVM's gfn_to_pfn_cache (virt/kvm/pfncache.c): one test per
// behaviour of kvm_gpc_activate, kvm_gpc_check, kvm_gpc_refresh,
// kvm_gpc_deactivate and the notifier hook, each naming the function it
// follows, and what every error leaves in the cache (active, valid, gpa,
// mapping). docs/conformance-audit.md, "pfn cache", lists them with the
// cases other files already held.
#include <gtest/gtest.h>

#include "support/params.h"
#include "vm_fixture.h"

namespace nestcache::vm {
namespace {

using testing::HarnessVcpu;
using testing::KindAndSide;
using testing::VmEnv;

class PfnCacheConformanceTest : public ::testing::TestWithParam<KindAndSide> {
 protected:
  void SetUp() override { env.phys->set_stale_access_fatal(true); }
  static host::FrameKind kind() { return std::get<0>(GetParam()); }
  uint64_t count(Counter c) const { return env.vm->counters().get(c); }
  uint64_t windows_made() const { return env.phys->counters().get(Counter::remap_windows); }
  // A memslot `slot` of one page at `gpa` on a region of its own; its hva.
  Hva add_page_slot(uint32_t slot, Gpa gpa) {
    Hva hva = *env.mm->create_region(kPageSize, kind());
    EXPECT_TRUE(env.vm->set_memory_region({slot, 0, gpa, kPageSize, hva}));
    return hva;
  }
  VmEnv env{testing::env_config(GetParam())};
  const Gpa outside = 0x10000000;  // in no memslot
};

// __kvm_gpc_activate checks the length before it takes any lock (since
// "KVM: Check validity of offset+length of gfn_to_pfn_cache prior to
// activation", 2024): an activation whose length crosses the page fails and
// the cache, valid at another gpa, keeps serving that one.
TEST_P(PfnCacheConformanceTest, ActivateWithALengthCrossingThePageChangesNothing) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(0x3000, 8));
  const uint64_t windows = windows_made();
  Status st = c.activate(0x5ff8, 16);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, EINVAL) << st.error().to_string();
  EXPECT_EQ(c.gpa(), Gpa{0x3000});
  EXPECT_TRUE(c.active());
  EXPECT_FALSE(c.invalid());
  EXPECT_TRUE(c.read(0x3000, 8));
  EXPECT_EQ(windows_made(), windows);
}

// The same check keeps an inactive cache inactive: before that fix KVM put
// it on the VM's list and marked it active with no gpa, which syzbot found
// refreshing a cache with neither a gpa nor an hva.
TEST_P(PfnCacheConformanceTest, ActivateOfAnInactiveCacheWithABadLengthLeavesItInactive) {
  PfnCache c(*env.vm);
  const uint64_t activations = count(Counter::cache_activations);
  EXPECT_EQ(c.activate(0x3000, kPageSize + 1).error().code, EINVAL);
  EXPECT_EQ(c.activate(0x3001, SIZE_MAX).error().code, EINVAL) << "offset + len wraps";
  EXPECT_FALSE(c.active());
  EXPECT_EQ(c.gpa(), kInvalidGpa);
  EXPECT_EQ(count(Counter::cache_activations), activations);
  EXPECT_EQ(c.refresh(1).error().code, EINVAL) << "a refresh of an inactive cache";
  ASSERT_TRUE(c.activate(0x3000, 8)) << "the cache is as new";
  EXPECT_TRUE(c.read(0x3000, 8));
}

// __kvm_gpc_refresh: a gpa in no memslot records the gpa, fails with
// EFAULT, and drops the pfn and mapping; the cache stays active (the nested
// code deactivates a vCPU-bound one itself).
TEST_P(PfnCacheConformanceTest, ActivateAtAGpaInNoMemslotIsEfaultAndLeavesItActiveAndInvalidThere) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(0x3000, 8));
  Status st = c.activate(outside, 8);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, EFAULT) << st.error().to_string();
  EXPECT_TRUE(c.active());
  EXPECT_TRUE(c.invalid());
  EXPECT_EQ(c.gpa(), outside);
  EXPECT_FALSE(c.read(0x3000, 8));
  c.deactivate();
  EXPECT_EQ(env.phys->live_windows(), 0);
}

// __kvm_gpc_activate of an active cache is a refresh; with the gpa, the
// memslot generation and the hva unchanged and the cache valid, nothing is
// mapped again.
TEST_P(PfnCacheConformanceTest, ActivateTwiceAtTheSameGpaKeepsTheMapping) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(0x3000, 8));
  const uint64_t windows = windows_made(), refreshes = count(Counter::cache_refreshes);
  const Pfn pfn = c.read(8).pfn();
  ASSERT_TRUE(c.activate(0x3000, 8));
  EXPECT_EQ(windows_made(), windows);
  EXPECT_EQ(count(Counter::cache_refreshes), refreshes);
  EXPECT_EQ(count(Counter::cache_activations), 1u);
  EXPECT_EQ(c.read(8).pfn(), pfn);
}

// __kvm_gpc_refresh: "even if the GPA changed, the HVA may still be the
// same", and a valid mapping of the same host page is kept; only the offset
// into it follows the new gpa.
TEST_P(PfnCacheConformanceTest, AGpaChangeWithinThePageKeepsTheMapping) {
  uint64_t a = 0xa, b = 0xb;
  ASSERT_TRUE(env.vm->write_guest(0x3000, &a, 8));
  ASSERT_TRUE(env.vm->write_guest(0x3100, &b, 8));
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(0x3000, 8));
  const uint64_t windows = windows_made(), refreshes = count(Counter::cache_refreshes);
  ASSERT_TRUE(c.activate(0x3100, 8));
  EXPECT_EQ(c.gpa(), Gpa{0x3100});
  EXPECT_FALSE(c.read(0x3000, 8));
  CachePtr p = c.read(0x3100, 8);
  ASSERT_TRUE(p);
  EXPECT_EQ(p.read<uint64_t>(0), b);
  p.reset();
  EXPECT_EQ(windows_made(), windows);
  EXPECT_EQ(count(Counter::cache_refreshes), refreshes);
}

// The same for a gpa of another memslot whose hva is the cached page (KVM
// does not forbid memslots that share host memory).
TEST_P(PfnCacheConformanceTest, AGpaInAMemslotAliasingTheCachedHostPageKeepsTheMapping) {
  ASSERT_TRUE(env.vm->set_memory_region({1, 0, 0x100000, kPageSize, env.hva_of(0x3000)}));
  uint64_t v = 0x5a5a;
  ASSERT_TRUE(env.vm->write_guest(0x3000, &v, 8));
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(0x3000, 8));
  const uint64_t windows = windows_made(), refreshes = count(Counter::cache_refreshes);
  const Pfn pfn = c.read(8).pfn();
  ASSERT_TRUE(c.activate(0x100000, 8));
  CachePtr p = c.read(0x100000, 8);
  ASSERT_TRUE(p);
  EXPECT_EQ(p.pfn(), pfn);
  EXPECT_EQ(p.read<uint64_t>(0), v);
  p.reset();
  EXPECT_EQ(windows_made(), windows);
  EXPECT_EQ(count(Counter::cache_refreshes), refreshes);
}

// kvm_gpc_check fails on any memslot generation change (kvm_gpc_invalid
// does not look at it); the refresh resolves the same hva and keeps the
// valid mapping.
TEST_P(PfnCacheConformanceTest, AMemslotChangeElsewhereFailsTheCheckAndRefreshKeepsTheMapping) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(0x3000, 8));
  const uint64_t windows = windows_made(), refreshes = count(Counter::cache_refreshes);
  add_page_slot(1, 0x200000);
  EXPECT_FALSE(c.check(8));
  EXPECT_FALSE(c.invalid());
  ASSERT_TRUE(c.refresh(8));
  EXPECT_TRUE(c.check(8));
  EXPECT_EQ(windows_made(), windows);
  EXPECT_EQ(count(Counter::cache_refreshes), refreshes);
}

// __kvm_gpc_refresh takes the hva from gfn_to_hva_memslot, which asks for a
// writable hva and gets KVM_HVA_ERR_RO_BAD from a KVM_MEM_READONLY memslot:
// EFAULT, as for a gpa in no memslot.
TEST_P(PfnCacheConformanceTest, AGpaInAReadOnlyMemslotIsEfault) {
  Hva hva = *env.mm->create_region(kPageSize, kind());
  ASSERT_TRUE(env.vm->set_memory_region({1, kMemReadonly, 0x100000, kPageSize, hva}));
  PfnCache c(*env.vm);
  Status st = c.activate(0x100000, 8);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, EFAULT) << st.error().to_string();
  EXPECT_TRUE(c.active());
  EXPECT_TRUE(c.invalid());
  EXPECT_EQ(env.phys->live_windows(), 0);
}

// kvm_gpc_check / __kvm_gpc_refresh: the cached gpa's memslot deleted, the
// check fails by generation and the refresh is EFAULT; the cache stays
// active, at its gpa, without a mapping.
TEST_P(PfnCacheConformanceTest, AMemslotDeleteFailsTheCheckAndRefreshIsEfault) {
  Hva hva = add_page_slot(1, 0x100000);
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(0x100000, 8));
  ASSERT_TRUE(env.vm->set_memory_region({1, 0, 0x100000, 0, hva}));
  EXPECT_FALSE(c.check(8));
  Status st = c.refresh(8);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, EFAULT);
  EXPECT_TRUE(c.active());
  EXPECT_TRUE(c.invalid());
  EXPECT_EQ(c.gpa(), Gpa{0x100000});
  c.deactivate();
  EXPECT_EQ(env.phys->live_windows(), 0);
}

// kvm_gpc_check: an inactive cache never passes, before its first
// activation or after a deactivation.
TEST_P(PfnCacheConformanceTest, CheckOfAnInactiveCacheFails) {
  PfnCache c(*env.vm);
  EXPECT_FALSE(c.check(8));
  EXPECT_FALSE(c.invalid()) << "kvm_gpc_invalid is active && !valid";
  ASSERT_TRUE(c.activate(0x3000, 8));
  c.deactivate();
  EXPECT_FALSE(c.check(8));
  EXPECT_FALSE(c.read(0x3000, 8));
  EXPECT_FALSE(c.invalid());
}

// kvm_gpc_deactivate keeps the gpa (protected by the generation) and drops
// the pfn; kvm_gpc_refresh of an inactive cache is EINVAL; a new activation
// maps the page again.
TEST_P(PfnCacheConformanceTest, DeactivateKeepsTheGpaAndRefreshAfterItIsEinval) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(0x3000, 8));
  c.deactivate();
  EXPECT_FALSE(c.active());
  EXPECT_EQ(c.gpa(), Gpa{0x3000});
  EXPECT_EQ(c.refresh(8).error().code, EINVAL);
  EXPECT_FALSE(c.active());
  ASSERT_TRUE(c.activate(0x3000, 8));
  EXPECT_TRUE(c.check(8));
}

// gfn_to_pfn_cache_invalidate_start: a valid cache whose page is in the
// range becomes invalid (kvm_gpc_invalid), and a cache bound to a vCPU
// (seed patch 2) gets it KVM_REQ_OUTSIDE_GUEST_MODE.
TEST_P(PfnCacheConformanceTest, TheNotifierInvalidatesACacheInItsRangeAndSendsItsVcpuOut) {
  HarnessVcpu vcpu(0);
  PfnCache c(*env.vm, &vcpu);
  ASSERT_TRUE(c.activate(0x3000, 8));
  const uint64_t invalidations = count(Counter::cache_invalidations);
  ASSERT_TRUE(env.mm->migrate(env.hva_of(0x3000)));
  EXPECT_TRUE(c.invalid());
  EXPECT_FALSE(c.check(8));
  EXPECT_EQ(count(Counter::cache_invalidations), invalidations + 1);
  EXPECT_TRUE(vcpu.test_request(Request::kOutsideGuestMode));
}

// kvm_gpc_deactivate takes the cache off the VM's list: the notifier no
// longer finds it.
TEST_P(PfnCacheConformanceTest, ADeactivatedCacheIsNotFoundByTheNotifier) {
  HarnessVcpu vcpu(0);
  PfnCache c(*env.vm, &vcpu);
  ASSERT_TRUE(c.activate(0x3000, 8));
  c.deactivate();
  ASSERT_TRUE(env.mm->migrate(env.hva_of(0x3000)));
  EXPECT_FALSE(vcpu.test_request(Request::kOutsideGuestMode));
  EXPECT_EQ(env.vm->caches().active_count(), 0u);
}

// Deliberate difference (docs/kvm-differences.md): KVM's failed refresh
// sets the cache's hva to an error value, so no later invalidation matches
// it. nestcache keeps a cache that failed to refresh findable at the page it
// last mapped until it maps another or deactivates, so an invalidation of
// that page still sends the bound vCPU out of guest mode.
TEST_P(PfnCacheConformanceTest, AFailedRefreshKeepsTheCacheFindableAtItsLastPage) {
  HarnessVcpu vcpu(0);
  Hva hva = add_page_slot(1, 0x100000);
  PfnCache c(*env.vm, &vcpu);
  ASSERT_TRUE(c.activate(0x100000, 8));
  ASSERT_TRUE(env.vm->set_memory_region({1, 0, 0x100000, 0, hva}));
  ASSERT_EQ(c.refresh(8).error().code, EFAULT);
  EXPECT_FALSE(vcpu.test_request(Request::kOutsideGuestMode));
  ASSERT_TRUE(env.mm->migrate(hva));
  EXPECT_TRUE(vcpu.test_request(Request::kOutsideGuestMode));
  EXPECT_EQ(env.vm->caches().active_count(), 1u);
}

INSTANTIATE_TEST_SUITE_P(Memory, PfnCacheConformanceTest, testing::kKindsAndSides, testing::kind_and_side_name);

}  // namespace
}  // namespace nestcache::vm
