// The pfn-cache registry: PageIndex (the flat per-page hash) against a plain
// multimap, and invalidation through both of the registry's indexes.
#include <gtest/gtest.h>

#include <map>
#include <random>

#include "vm/page_index.h"
#include "vm_fixture.h"

namespace nestcache::vm {
namespace {

using testing::VmEnv;
using testing::VmEnvConfig;

// Every value stored under `page`, as a sorted list.
std::vector<const void*> values_at(const PageIndex& idx, Hva page) {
  std::vector<const void*> v;
  idx.for_each(page, [&](const void* x) { v.push_back(x); });
  std::sort(v.begin(), v.end());
  return v;
}

TEST(PageIndex, RandomInsertsAndErasesMatchAMultimap) {
  PageIndex idx;
  std::multimap<Hva, const void*> model;
  std::mt19937_64 rng(11);
  // Few distinct pages and values, so that runs, duplicates of a key and
  // growth all happen; page numbers chosen to collide in a small table.
  auto page = [&] { return Hva(1 + rng() % 300) << (kPageShift + (rng() % 2 ? 0 : 6)); };
  auto value = [&] { return reinterpret_cast<const void*>(uintptr_t(8 + 8 * (rng() % 5))); };
  for (int step = 0; step < 20000; step++) {
    const Hva p = page();
    const void* v = value();
    if (rng() % 3) {
      idx.insert(p, v);
      model.emplace(p, v);
    } else {
      auto [lo, hi] = model.equal_range(p);
      auto it = std::find_if(lo, hi, [&](auto& e) { return e.second == v; });
      const bool present = it != hi;
      ASSERT_EQ(idx.erase(p, v), present) << step;
      if (present) model.erase(it);
    }
    ASSERT_EQ(idx.size(), model.size());
    if (step % 97 == 0) {
      for (Hva q = Hva(1) << kPageShift; q <= Hva(300) << (kPageShift + 6); q += kPageSize) {
        std::vector<const void*> want;
        for (auto [lo, hi] = model.equal_range(q); lo != hi; ++lo) want.push_back(lo->second);
        std::sort(want.begin(), want.end());
        ASSERT_EQ(values_at(idx, q), want) << "page " << q << " step " << step;
      }
    }
  }
}

class RegistryTest : public ::testing::TestWithParam<CacheReadSide> {
 protected:
  RegistryTest() : env(VmEnvConfig{.kind = host::FrameKind::managed, .pages = 256, .spare = 64, .cache_read_side = GetParam()}) {
    env.phys->set_stale_access_fatal(true);
  }
  VmEnv env;
};

TEST_P(RegistryTest, AShortRangeFindsOnlyTheCachesOfItsPages) {
  std::vector<std::unique_ptr<PfnCache>> caches;
  for (int i = 0; i < 64; i++) {
    caches.push_back(std::make_unique<PfnCache>(*env.vm));
    ASSERT_TRUE(caches.back()->activate(Gpa(i) * kPageSize, 8));
  }
  const uint64_t before = env.vm->counters().get(Counter::cache_invalidations);
  // 3 pages, under the one-by-one limit: the per-page hash index.
  env.vm->invalidate_range_start(env.hva_of(10 * kPageSize), env.hva_of(13 * kPageSize));
  env.vm->invalidate_range_end(env.hva_of(10 * kPageSize), env.hva_of(13 * kPageSize));
  EXPECT_EQ(env.vm->counters().get(Counter::cache_invalidations), before + 3);
  for (int i = 0; i < 64; i++) EXPECT_EQ(caches[i]->invalid(), i >= 10 && i < 13) << i;
}

TEST_P(RegistryTest, ALongRangeWalksTheOrderedIndex) {
  static_assert(CacheRegistry::kPagesLookedUpOneByOne < 40);
  std::vector<std::unique_ptr<PfnCache>> caches;
  for (int i = 0; i < 64; i++) {
    caches.push_back(std::make_unique<PfnCache>(*env.vm));
    ASSERT_TRUE(caches.back()->activate(Gpa(i) * kPageSize, 8));
  }
  const uint64_t before = env.vm->counters().get(Counter::cache_invalidations);
  // 40 pages, from the middle of page 5: caches 5 .. 44.
  const Hva start = env.hva_of(5 * kPageSize + 100), end = env.hva_of(45 * kPageSize);
  env.vm->invalidate_range_start(start, end);
  env.vm->invalidate_range_end(start, end);
  EXPECT_EQ(env.vm->counters().get(Counter::cache_invalidations), before + 40);
  for (int i = 0; i < 64; i++) EXPECT_EQ(caches[i]->invalid(), i >= 5 && i < 45) << i;
}

TEST_P(RegistryTest, TwoCachesOfOnePageAreBothFoundAndUnindexedOneByOne) {
  PfnCache a(*env.vm), b(*env.vm);
  ASSERT_TRUE(a.activate(7 * kPageSize, 8));
  ASSERT_TRUE(b.activate(7 * kPageSize + 64, 8));
  EXPECT_EQ(env.vm->caches().active_count(), 2u);
  ASSERT_TRUE(env.mm->migrate(env.hva_of(7 * kPageSize)));
  EXPECT_TRUE(a.invalid());
  EXPECT_TRUE(b.invalid());
  a.deactivate();
  ASSERT_TRUE(b.refresh(8));
  ASSERT_TRUE(env.mm->migrate(env.hva_of(7 * kPageSize)));
  EXPECT_FALSE(a.invalid()) << "inactive";
  EXPECT_TRUE(b.invalid()) << "still indexed after a's entry went";
  b.deactivate();
  EXPECT_EQ(env.vm->caches().active_count(), 0u);
}

TEST_P(RegistryTest, ACacheMovedToAnotherPageIsFoundThereOnly) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(3 * kPageSize, 8));
  ASSERT_TRUE(c.activate(9 * kPageSize, 8));
  ASSERT_TRUE(env.mm->migrate(env.hva_of(3 * kPageSize)));
  EXPECT_FALSE(c.invalid());
  ASSERT_TRUE(env.mm->migrate(env.hva_of(9 * kPageSize)));
  EXPECT_TRUE(c.invalid());
}

TEST_P(RegistryTest, OnlyLockFreeCachesMakeTheInvalidationWaitForReaders) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(0, 8));
  ASSERT_TRUE(env.mm->fault_in(env.hva_of(kPageSize), true));
  const uint64_t before = env.vm->counters().get(Counter::cache_reader_waits);
  ASSERT_TRUE(env.mm->migrate(env.hva_of(0)));
  ASSERT_TRUE(env.mm->migrate(env.hva_of(kPageSize)));  // no cache: no wait either way
  EXPECT_EQ(env.vm->counters().get(Counter::cache_reader_waits) - before,
            GetParam() == CacheReadSide::lockfree ? 1u : 0u);
}

INSTANTIATE_TEST_SUITE_P(ReadSide, RegistryTest, ::testing::Values(CacheReadSide::rwlock, CacheReadSide::lockfree),
                         [](const auto& info) { return std::string(cache_read_side_name(info.param)); });

}  // namespace
}  // namespace nestcache::vm
