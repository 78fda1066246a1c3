#include "host/host_mm.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <utility>

namespace nestcache::host {
namespace {

class Recorder : public MmuNotifier {
 public:
  void invalidate_range_start(Hva s, Hva e) override {
    starts++;
    last = {s, e};
  }
  void invalidate_range_end(Hva s, Hva e) override { ends++; }
  int starts = 0, ends = 0;
  std::pair<Hva, Hva> last{};
};

size_t process_mappings() {
  std::ifstream f("/proc/self/maps");
  std::string line;
  size_t n = 0;
  while (std::getline(f, line)) n++;
  return n;
}

struct HostMmTest : ::testing::Test {
  void SetUp() override {
    auto m = PhysMem::create({4096, 4096});
    ASSERT_TRUE(m);
    phys = std::move(*m);
    mm = std::make_unique<HostMm>(*phys);
    mm->add_notifier(&rec);
  }
  Recorder rec;  // outlives mm, whose destructor still notifies
  std::unique_ptr<PhysMem> phys;
  std::unique_ptr<HostMm> mm;
};

TEST_F(HostMmTest, RegionSizeMustBeAPositiveMultipleOfAPage) {
  EXPECT_EQ(mm->create_region(0, FrameKind::managed).error().code, EINVAL);
  EXPECT_EQ(mm->create_region(100, FrameKind::managed).error().code, EINVAL);
}

TEST_F(HostMmTest, ManagedPagesArePopulatedOnFirstFault) {
  Hva base = *mm->create_region(16 * kPageSize, FrameKind::managed);
  EXPECT_FALSE(mm->lookup(base));
  auto t = mm->fault_in(base + 5, true);
  ASSERT_TRUE(t);
  EXPECT_EQ(mm->lookup(base)->pfn, t->pfn);
  std::memcpy(reinterpret_cast<void*>(base), "hello", 6);
  EXPECT_STREQ(reinterpret_cast<char*>(phys->direct(t->pfn)), "hello");
}

TEST_F(HostMmTest, UnmanagedRegionsAreMappedAtCreationAndCannotBePinned) {
  Hva base = *mm->create_region(8 * kPageSize, FrameKind::unmanaged);
  ASSERT_TRUE(mm->lookup(base + 7 * kPageSize));
  EXPECT_EQ(phys->kind(mm->lookup(base)->pfn), FrameKind::unmanaged);
  EXPECT_EQ(mm->fault_in_pinned(base, true).error().code, EINVAL);
}

TEST_F(HostMmTest, FaultOutsideAnyRegionIsEfault) {
  EXPECT_EQ(mm->fault_in(0x1000, false).error().code, EFAULT);
}

TEST_F(HostMmTest, MigrationMovesThePageKeepsItsDataAndNotifies) {
  for (FrameKind kind : {FrameKind::managed, FrameKind::unmanaged}) {
    Hva base = *mm->create_region(4 * kPageSize, kind);
    Hva page = base + kPageSize;
    ASSERT_TRUE(mm->copy_to(page + 8, "payload", 8));
    FrameTag before = *mm->fault_in(page, false);
    int starts = rec.starts;
    ASSERT_TRUE(mm->migrate(page));
    FrameTag after = *mm->lookup(page);
    EXPECT_NE(after.pfn, before.pfn);
    EXPECT_EQ(rec.starts, starts + 1);
    EXPECT_EQ(rec.last, (std::pair<Hva, Hva>{page, page + kPageSize}));
    EXPECT_FALSE(phys->check(before, "test"));
    char buf[8];
    ASSERT_TRUE(mm->copy_from(page + 8, buf, 8));
    EXPECT_STREQ(buf, "payload");
    EXPECT_STREQ(reinterpret_cast<char*>(page + 8), "payload");
  }
}

TEST_F(HostMmTest, MigrationOfAPinnedPageIsEbusyAndCounted) {
  Hva base = *mm->create_region(kPageSize, FrameKind::managed);
  auto pinned = mm->fault_in_pinned(base, true);
  ASSERT_TRUE(pinned);
  auto st = mm->migrate(base);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, EBUSY);
  EXPECT_EQ(mm->counters().get(Counter::migrate_ebusy), 1u);
  pinned->pin.reset();
  EXPECT_TRUE(mm->migrate(base));
}

TEST_F(HostMmTest, DiscardDropsPagesAndTheNextFaultSeesZeroes) {
  for (FrameKind kind : {FrameKind::managed, FrameKind::unmanaged}) {
    Hva base = *mm->create_region(4 * kPageSize, kind);
    ASSERT_TRUE(mm->copy_to(base + kPageSize, "data", 5));
    FrameTag old = *mm->lookup(base + kPageSize);
    ASSERT_TRUE(mm->discard(base + kPageSize, 2 * kPageSize));
    EXPECT_FALSE(mm->lookup(base + kPageSize));
    EXPECT_FALSE(phys->check(old, "test"));
    char buf[5] = {1, 1, 1, 1, 1};
    ASSERT_TRUE(mm->copy_from(base + kPageSize, buf, 5));
    EXPECT_EQ(std::string(buf, 5), std::string(5, '\0'));
  }
}

TEST_F(HostMmTest, DiscardOfAPinnedPageStalesTheTagButKeepsTheFrameUntilUnpinned) {
  Hva base = *mm->create_region(kPageSize, FrameKind::managed);
  auto pinned = mm->fault_in_pinned(base, true);
  ASSERT_TRUE(pinned);
  size_t free_before = phys->free_frames(FrameKind::managed);
  ASSERT_TRUE(mm->discard(base, kPageSize));
  EXPECT_FALSE(phys->check(pinned->tag, "test"));
  EXPECT_EQ(phys->free_frames(FrameKind::managed), free_before);
  pinned->pin.reset();
  EXPECT_EQ(phys->free_frames(FrameKind::managed), free_before + 1);
}

// A subscriber sees every invalidation whole or not at all: one that
// subscribes while an invalidation is between its start and its end must not
// get the end alone (a Vm would take it for the end of one of its own
// invalidations still in progress, or abort on a count of zero). Linux makes
// mmu_notifier_register wait out invalidations under the mmap lock; HostMm
// used to take its notifier lock once for the start and again for the end.
// (The subscription and the migrations race freely; with the lock taken twice
// a subscription landed between the two within a few hundred migrations.)
TEST_F(HostMmTest, ASubscriberAddedDuringAnInvalidationNeverGetsItsEndAlone) {
  struct Balance : MmuNotifier {
    void invalidate_range_start(Hva, Hva) override { open.fetch_add(1); }
    void invalidate_range_end(Hva, Hva) override {
      if (open.load() == 0)
        unmatched_ends.fetch_add(1);
      else
        open.fetch_sub(1);
    }
    std::atomic<int> open{0}, unmatched_ends{0};
  } late;
  Hva base = *mm->create_region(kPageSize, FrameKind::managed);
  ASSERT_TRUE(mm->fault_in(base, true));
  std::atomic<bool> done{false};
  std::thread subscriber([&] {
    while (!done.load()) {
      mm->add_notifier(&late);
      mm->remove_notifier(&late);
      late.open.store(0);  // unsubscribed: a start whose end it missed is forgotten
    }
  });
  for (int i = 0; i < 3000 && late.unmatched_ends.load() == 0; i++) ASSERT_TRUE(mm->migrate(base));
  done.store(true);
  subscriber.join();
  EXPECT_EQ(late.unmatched_ends.load(), 0);
}

TEST_F(HostMmTest, DestroyFreesEveryFrame) {
  size_t managed = phys->free_frames(FrameKind::managed);
  Hva base = *mm->create_region(64 * kPageSize, FrameKind::managed);
  ASSERT_TRUE(mm->fault_in(base, true));
  ASSERT_TRUE(mm->migrate(base));
  ASSERT_TRUE(mm->destroy_region(base));
  EXPECT_EQ(phys->free_frames(FrameKind::managed), managed);
}

// A notifier that destroys the region at `base` inside the first
// invalidation's start, on a thread of its own: a destroy_region that lands
// while another host change is between its notifier calls.
struct DestroyOnFirstStart : MmuNotifier {
  DestroyOnFirstStart(HostMm& mm, Hva base) : mm(mm), base(base) {}
  void invalidate_range_start(Hva, Hva) override {
    if (std::exchange(armed, false)) std::thread([this] { result = mm.destroy_region(base); }).join();
  }
  void invalidate_range_end(Hva, Hva) override {}
  HostMm& mm;
  const Hva base;
  bool armed = true;
  Status result = ok();
};

// A region destroyed while a migration of one of its pages is between its
// notifier calls: the migration finds the region again and fails, instead of
// writing the freed region (AddressSanitizer: heap-use-after-free before),
// and frees only its own new frame (destroy_region freed the old one).
TEST_F(HostMmTest, ARegionDestroyedDuringAMigrationFailsItCleanly) {
  size_t managed = phys->free_frames(FrameKind::managed);
  Hva base = *mm->create_region(4 * kPageSize, FrameKind::managed);
  ASSERT_TRUE(mm->fault_in(base, true));
  DestroyOnFirstStart destroyer(*mm, base);
  mm->add_notifier(&destroyer);
  Status st = mm->migrate(base);
  mm->remove_notifier(&destroyer);
  ASSERT_FALSE(destroyer.armed);
  ASSERT_TRUE(destroyer.result);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, EFAULT);
  EXPECT_FALSE(mm->region_kind(base));
  EXPECT_EQ(phys->free_frames(FrameKind::managed), managed);
}

// Two destroys of one region: the one that finds it gone after its notifier
// start fails with EINVAL instead of erasing a region that is not there.
TEST_F(HostMmTest, ARegionDestroyedTwiceAtOnceIsDestroyedOnce) {
  size_t managed = phys->free_frames(FrameKind::managed);
  Hva base = *mm->create_region(4 * kPageSize, FrameKind::managed);
  ASSERT_TRUE(mm->fault_in(base, true));
  DestroyOnFirstStart destroyer(*mm, base);
  mm->add_notifier(&destroyer);
  Status outer = mm->destroy_region(base);
  mm->remove_notifier(&destroyer);
  ASSERT_FALSE(destroyer.armed);
  EXPECT_TRUE(destroyer.result) << "the destroy that ran whole inside the other's start";
  ASSERT_FALSE(outer);
  EXPECT_EQ(outer.error().code, EINVAL);
  EXPECT_FALSE(mm->region_kind(base));
  EXPECT_EQ(phys->free_frames(FrameKind::managed), managed);
}

TEST(HostMmLarge, AGigabyteRegionWithThousandsOfMigratedPagesStaysWithinTheMappingLimit) {
  const size_t pages = (size_t{1} << 30) / kPageSize;
  auto phys = std::move(*PhysMem::create({0, pages + 8192}));
  HostMm mm(*phys);
  size_t maps_before = process_mappings();
  auto base = mm.create_region(pages * kPageSize, FrameKind::unmanaged);
  ASSERT_TRUE(base) << base.error().to_string();
  EXPECT_LT(process_mappings(), maps_before + 16) << "consecutive frames should merge into few mappings";
  for (size_t i = 0; i < 4096; i++) ASSERT_TRUE(mm.migrate(*base + (i * 61 % pages) * kPageSize));
  EXPECT_EQ(mm.counters().get(Counter::migrations), 4096u);
  EXPECT_LT(process_mappings(), maps_before + 3 * 4096 + 16);
  ASSERT_TRUE(mm.destroy_region(*base));
}

TEST(HostMmLarge, RunningOutOfMappingsIsEnomemWithNothingHalfDone) {
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "sanitizer runtimes need mappings of their own and abort when the process runs out";
#endif
  // Every other page migrated splits the region into one mapping per page,
  // which exhausts vm.max_map_count (65,530 by default) before 40,000
  // migrations.
  const size_t pages = 80000;
  auto phys = std::move(*PhysMem::create({0, pages + 45000}));
  HostMm mm(*phys);
  Hva base = *mm.create_region(pages * kPageSize, FrameKind::unmanaged);
  Status st = ok();
  size_t i = 0;
  for (; i < pages / 2 && st; i++) {
    Hva page = base + 2 * i * kPageSize;
    uint64_t v = i;
    ASSERT_TRUE(mm.copy_to(page, &v, sizeof v));
    FrameTag before = *mm.lookup(page);
    st = mm.migrate(page);
    if (!st) {
      EXPECT_EQ(st.error().code, ENOMEM) << st.error().to_string();
      EXPECT_EQ(*mm.lookup(page), before) << "a failed migration leaves the page on its old frame";
      uint64_t back = 0;
      ASSERT_TRUE(mm.copy_from(page, &back, sizeof back));
      EXPECT_EQ(back, i);
    }
  }
  EXPECT_FALSE(st) << "expected to run out of mappings";
  ASSERT_TRUE(mm.destroy_region(base));
  EXPECT_EQ(phys->free_frames(FrameKind::unmanaged), pages + 45000);
}

}  // namespace
}  // namespace nestcache::host
