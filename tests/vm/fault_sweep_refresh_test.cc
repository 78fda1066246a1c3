// Fault sweeps over a pfn-cache refresh on unmanaged memory: after the MMU
// notifier invalidated the cache (the page migrated, or was discarded), and
// after a memslot change moved its gpa to other memory (the generation
// check). Every mmap and munmap the refresh makes fails in turn, once and
// from it on, for both read sides. A refresh either succeeds (a failed
// munmap of the old window was retried, or parked) and reads the page's
// data, or fails with the errno, naming the mapping, and leaves the cache
// invalid; the stale detector is fatal throughout. Once the fault is gone
// the next lock refreshes and reads the data, and after deactivation no
// window is left.
#include <gtest/gtest.h>

#include <cstdio>
#include <functional>

#include "support/fault_sweep.h"
#include "vm_fixture.h"

namespace nestcache::vm {
namespace {

using host::FaultSite;
using test_support::fault_label;
using testing::VmEnv;

constexpr Gpa kGpa = 0x3000;
constexpr Gpa kSlot1Gpa = 0x100000;
constexpr uint64_t kMagic = 0x5eed5eed;

// One environment with an active cache that the set-up then makes stale.
struct Rig {
  explicit Rig(CacheReadSide side)
      : env({.kind = host::FrameKind::unmanaged, .pages = 64, .spare = 64, .stale_fatal = true, .cache_read_side = side}),
        cache(*env.vm) {}
  // Reads through the cache, refreshing it as needed, then drains the
  // mappings it retired (a lock-free cache's old window is unmapped there):
  // the step swept.
  Result<uint64_t> read(Gpa gpa) {
    Result<uint64_t> v = [&]() -> Result<uint64_t> {
      Result<CachePtr> p = cache.lock(gpa, 8);
      if (!p) return tl::unexpected(p.error());
      return p->read<uint64_t>(0);
    }();
    env.vm->caches().drain_retired();
    return v;
  }
  int64_t windows_in_use() const { return env.phys->live_windows() - static_cast<int64_t>(env.phys->parked_windows()); }

  VmEnv env;
  PfnCache cache;
};

// How the set-up makes the cache need a refresh, and where it then reads.
struct Staling {
  const char* name;
  std::function<void(Rig&)> prepare;
  Gpa gpa;
  uint64_t expect;  // what the refreshed cache reads
};

class RefreshFaultSweep : public ::testing::TestWithParam<CacheReadSide> {
 protected:
  void TearDown() override { host::clear_faults(); }

  void sweep(const Staling& s) {
    std::map<FaultSite, uint64_t> counts;
    for (FaultSite site : {FaultSite::mmap, FaultSite::munmap}) {
      Rig rig(GetParam());
      s.prepare(rig);
      if (HasFatalFailure()) return;
      Result<uint64_t> v = 0;
      counts[site] = test_support::count_site_operations(site, [&] { v = rig.read(s.gpa); });
      ASSERT_TRUE(v) << v.error().to_string();
      EXPECT_EQ(*v, s.expect);
    }
    std::printf("[ sweep    ] refresh after %s: %llu mmap, %llu munmap\n", s.name,
                static_cast<unsigned long long>(counts[FaultSite::mmap]),
                static_cast<unsigned long long>(counts[FaultSite::munmap]));
    EXPECT_GE(counts[FaultSite::mmap], 1u) << "the new frame's window";
    EXPECT_EQ(counts[FaultSite::munmap], 1u) << "the old frame's window";
    for (FaultSite site : {FaultSite::mmap, FaultSite::munmap}) {
      for (const host::FaultSpec& f : test_support::sweep_faults(site, counts[site], true)) {
        SCOPED_TRACE(fault_label(f) + " of " + std::to_string(counts[site]) + " after " + s.name);
        run_one(s, f);
        if (HasFatalFailure()) return;
      }
    }
  }

  void run_one(const Staling& s, const host::FaultSpec& f) {
    Rig rig(GetParam());
    s.prepare(rig);
    if (HasFatalFailure()) return;
    host::inject_fault(f);
    Result<uint64_t> v = rig.read(s.gpa);
    const uint64_t injected = host::faults_injected(f.site);
    host::clear_faults();
    EXPECT_GE(injected, 1u);
    if (v) {
      // Only the old window's munmap may fail without failing the refresh.
      EXPECT_EQ(f.site, FaultSite::munmap) << "an mmap failure went unreported";
      EXPECT_EQ(*v, s.expect);
    } else {
      EXPECT_EQ(v.error().code, f.error) << v.error().to_string();
      EXPECT_TRUE(test_support::names_resource(f.site, v.error().message)) << v.error().to_string();
      EXPECT_FALSE(rig.cache.check(8)) << "a failed refresh leaves the cache invalid";
    }
    EXPECT_EQ(rig.env.phys->counters().get(Counter::stale_accesses), 0u);
    // Fault gone: the next read refreshes as needed and sees the data.
    Result<uint64_t> again = rig.read(s.gpa);
    ASSERT_TRUE(again) << again.error().to_string();
    EXPECT_EQ(*again, s.expect);
    EXPECT_EQ(rig.windows_in_use(), 1) << "the cache's one window";
    rig.cache.deactivate();
    EXPECT_EQ(rig.env.phys->live_windows(), 0) << "deactivation closed it, and what was parked";
    EXPECT_EQ(rig.env.phys->parked_windows(), 0u);
    EXPECT_EQ(rig.env.phys->counters().get(Counter::stale_accesses), 0u);
  }
};

void activate_with_magic(Rig& r, Gpa gpa) {
  ASSERT_TRUE(r.env.vm->write_guest(gpa, &kMagic, sizeof kMagic));
  ASSERT_TRUE(r.cache.activate(gpa, 8));
}

TEST_P(RefreshFaultSweep, AfterTheNotifierInvalidatedAMigratedPage) {
  sweep({"migration",
         [](Rig& r) {
           activate_with_magic(r, kGpa);
           ASSERT_TRUE(r.env.mm->migrate(r.env.hva_of(kGpa)));
           ASSERT_TRUE(r.cache.invalid());
         },
         kGpa, kMagic});
}

TEST_P(RefreshFaultSweep, AfterTheNotifierInvalidatedADiscardedPage) {
  // The refresh faults the page in again (a page mmap in the VMM's address
  // space) before it maps the new frame's window: a zero page.
  sweep({"discard",
         [](Rig& r) {
           activate_with_magic(r, kGpa);
           ASSERT_TRUE(r.env.mm->discard(r.env.hva_of(kGpa), kPageSize));
           ASSERT_TRUE(r.cache.invalid());
         },
         kGpa, 0});
}

TEST_P(RefreshFaultSweep, AfterAMemslotChangeMovedTheGpaToOtherMemory) {
  sweep({"memslot change",
         [](Rig& r) {
           auto first = r.env.mm->create_region(kPageSize, host::FrameKind::unmanaged);
           auto second = r.env.mm->create_region(kPageSize, host::FrameKind::unmanaged);
           ASSERT_TRUE(first && second);
           const uint64_t other = kMagic + 1;
           ASSERT_TRUE(r.env.mm->copy_to(*second, &other, sizeof other));
           ASSERT_TRUE(r.env.vm->set_memory_region({1, 0, kSlot1Gpa, kPageSize, *first}));
           activate_with_magic(r, kSlot1Gpa);
           // Delete, then the same gpa over the other region: only the
           // generation tells the cache.
           ASSERT_TRUE(r.env.vm->set_memory_region({1, 0, kSlot1Gpa, 0, *first}));
           ASSERT_TRUE(r.env.vm->set_memory_region({1, 0, kSlot1Gpa, kPageSize, *second}));
           ASSERT_FALSE(r.cache.check(8));
         },
         kSlot1Gpa, kMagic + 1});
}

INSTANTIATE_TEST_SUITE_P(ReadSides, RefreshFaultSweep,
                         ::testing::Values(CacheReadSide::rwlock, CacheReadSide::lockfree),
                         [](const ::testing::TestParamInfo<CacheReadSide>& i) { return cache_read_side_name(i.param); });

}  // namespace
}  // namespace nestcache::vm
