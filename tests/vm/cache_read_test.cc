// The read side of PfnCache: CachePtr (a held, bounds-checked handle) under
// both read sides, invalidations waiting for held handles, and refresh that
// waits for an in-flight invalidation instead of spinning.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "vm/cache_readers.h"
#include "vm/cache_registry.h"
#include "vm_fixture.h"

namespace nestcache::vm {
namespace {

using testing::KindAndSide;
using testing::VmEnv;

class CacheReadTest : public ::testing::TestWithParam<KindAndSide> {
 protected:
  void SetUp() override {
    env.phys->set_stale_access_fatal(true);
    for (Gpa g = 0; g < 16 * kPageSize; g += kPageSize) {
      uint64_t v = stamp(g);
      ASSERT_TRUE(env.vm->write_guest(g, &v, 8));
    }
  }
  static uint64_t stamp(Gpa g) { return 0x5eed000000000000ull | g; }
  // The end of a test where a cache left page 4 for page 5 while a handle on
  // page 4 wrote 0x77 at offset 8 and the host migrated page 4: the write
  // reached the page, the cache serves page 5, and nothing was stale.
  void expect_the_write_kept_and_the_cache_moved(PfnCache& c) {
    uint64_t back = 0;
    ASSERT_TRUE(env.vm->read_guest(4 * kPageSize + 8, &back, 8));
    EXPECT_EQ(back, 0x77u) << "a write through the handle was lost to the migration";
    Result<CachePtr> q = c.lock(5 * kPageSize, 16);
    ASSERT_TRUE(q);
    EXPECT_EQ(q->read<uint64_t>(0), stamp(5 * kPageSize));
    EXPECT_EQ(env.phys->counters().get(Counter::stale_accesses), 0u);
  }
  static host::FrameKind kind() { return std::get<0>(GetParam()); }
  static CacheReadSide side() { return std::get<1>(GetParam()); }
  VmEnv env{testing::env_config(GetParam())};
};

TEST_P(CacheReadTest, TheCacheTakesTheVmsReadSideUnlessGivenOne) {
  PfnCache a(*env.vm);
  EXPECT_EQ(a.read_side(), side());
  PfnCache b(*env.vm, CacheReadSide::rwlock), c(*env.vm, CacheReadSide::lockfree);
  EXPECT_EQ(b.read_side(), CacheReadSide::rwlock);
  EXPECT_EQ(c.read_side(), CacheReadSide::lockfree);
}

TEST_P(CacheReadTest, AHandleReachesExactlyTheCheckedBytes) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(3 * kPageSize + 16, 32));
  CachePtr p = c.read(3 * kPageSize + 16, 32);
  ASSERT_TRUE(p);
  EXPECT_EQ(p.gpa(), 3 * kPageSize + 16);
  EXPECT_EQ(p.size(), 32u);
  EXPECT_EQ(p.pfn(), env.mm->lookup(env.hva_of(3 * kPageSize))->pfn);
  p.write<uint64_t>(24, 0xabc);
  EXPECT_EQ(p.read<uint64_t>(24), 0xabcu);
  EXPECT_EQ(p.fetch_or<uint32_t>(0, 0x10), 0u);
  EXPECT_EQ(p.exchange<uint32_t>(0, 7), 0x10u);
  EXPECT_EQ(p.bytes(8, 24).size(), 24u);
  p.reset();
  EXPECT_FALSE(p);
  uint64_t back = 0;
  ASSERT_TRUE(env.vm->read_guest(3 * kPageSize + 40, &back, 8));
  EXPECT_EQ(back, 0xabcu) << "the handle wrote the page the VMM sees";
}

TEST_P(CacheReadTest, AHandleWhoseFrameChangedHandsCountsAStaleAccess) {
  // A frame retagged behind the cache's back (no invalidation: the bug the
  // detector is there for) is caught on the handle's next access, in the
  // host's and the VM's counters, and the handle still names its frame.
  env.phys->set_stale_access_fatal(false);
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(5 * kPageSize, 8));
  CachePtr p = c.read(5 * kPageSize, 8);
  ASSERT_TRUE(p);
  const host::FrameTag tag = p.tag();
  EXPECT_EQ(tag, env.phys->tag(p.pfn()));
  EXPECT_TRUE(p.check_tag());
  env.phys->retag(p.pfn());
  EXPECT_FALSE(p.check_tag());
  (void)p.read<uint64_t>(0);
  EXPECT_EQ(env.phys->counters().get(Counter::stale_accesses), 2u);
  EXPECT_EQ(env.vm->counters().get(Counter::stale_accesses), 2u);
  EXPECT_EQ(p.tag(), tag);
  p.reset();
  EXPECT_EQ(p.tag(), host::FrameTag{}) << "an empty handle names no frame";
}

TEST_P(CacheReadTest, AFailedCheckGivesAnEmptyHandle) {
  PfnCache c(*env.vm);
  const Gpa g = 2 * kPageSize + 8;
  EXPECT_FALSE(c.read(0, 8)) << "inactive";
  ASSERT_TRUE(c.activate(g, 8));
  EXPECT_TRUE(c.read(g, kPageSize - 8));
  EXPECT_FALSE(c.read(g, kPageSize - 7)) << "beyond the page";
  EXPECT_FALSE(c.read(3 * kPageSize, 8)) << "another gpa";
  ASSERT_TRUE(env.mm->migrate(env.hva_of(2 * kPageSize)));
  EXPECT_FALSE(c.read(g, 8)) << "invalidated";
  // An empty handle holds nothing: refreshing on this thread does not wait.
  ASSERT_TRUE(c.refresh(8));
  CachePtr p = c.read(g, 8);
  ASSERT_TRUE(p);
  EXPECT_EQ(p.pfn(), env.mm->lookup(env.hva_of(2 * kPageSize))->pfn);
}

TEST_P(CacheReadTest, LockActivatesRefreshesAndReportsErrors) {
  PfnCache c(*env.vm);
  Result<CachePtr> p = c.lock(5 * kPageSize, 8);
  ASSERT_TRUE(p);
  EXPECT_EQ(p->read<uint64_t>(0), stamp(5 * kPageSize));
  *p = CachePtr();
  ASSERT_TRUE(env.mm->migrate(env.hva_of(5 * kPageSize)));
  p = c.lock(5 * kPageSize, 8);
  ASSERT_TRUE(p);
  EXPECT_EQ(p->read<uint64_t>(0), stamp(5 * kPageSize)) << "refreshed onto the new frame";
  *p = CachePtr();
  p = c.lock(0x40000000, 8);
  ASSERT_FALSE(p);
  EXPECT_EQ(p.error().code, EFAULT) << "no memslot";
}

TEST_P(CacheReadTest, AMovedHandleKeepsTheReadAndTheOldOneIsEmpty) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(kPageSize, 8));
  CachePtr a = c.read(kPageSize, 8);
  ASSERT_TRUE(a);
  CachePtr b = std::move(a);
  EXPECT_FALSE(a);
  ASSERT_TRUE(b);
  EXPECT_EQ(b.read<uint64_t>(0), stamp(kPageSize));
  CachePtr d;
  d = std::move(b);
  EXPECT_FALSE(b);
  EXPECT_EQ(d.read<uint64_t>(0), stamp(kPageSize));
}

// While a handle is held, a migration of its page cannot get past the
// notifier: the frame the handle reads is neither copied nor freed.
TEST_P(CacheReadTest, AnInvalidationWaitsForAHeldHandle) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(4 * kPageSize, 16));
  CachePtr p = c.read(4 * kPageSize, 16);
  ASSERT_TRUE(p);
  std::atomic<bool> migrated{false};
  std::thread host([&] {
    EXPECT_TRUE(env.mm->migrate(env.hva_of(4 * kPageSize)));
    migrated.store(true);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(migrated.load()) << "the migration went ahead under a held handle";
  // Written after the migration started: it must reach the new frame.
  p.write<uint64_t>(8, 0x77);
  EXPECT_TRUE(p.check_tag());
  p.reset();
  host.join();
  EXPECT_TRUE(c.invalid());
  Result<CachePtr> q = c.lock(4 * kPageSize, 16);
  ASSERT_TRUE(q);
  EXPECT_EQ(q->read<uint64_t>(8), 0x77u) << "a write through the handle was lost to the migration";
  EXPECT_EQ(env.phys->counters().get(Counter::stale_accesses), 0u);
}

// A cache that moves to another page may still have a reader on the page it
// left: a lock-free cache moves on without waiting for it (its old mapping
// is retired, not unmapped), a cache under the rwlock waits. Either way the
// host cannot migrate the page the cache left while the reader's handle
// lives, and a write through the handle reaches the page.
TEST_P(CacheReadTest, AnInvalidationOfAPageTheCacheLeftWaitsForAHandleOnIt) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(4 * kPageSize, 16));
  CachePtr p = c.read(4 * kPageSize, 16);
  ASSERT_TRUE(p);
  std::atomic<bool> moved{false}, migrated{false};
  std::thread host([&] {
    EXPECT_TRUE(c.activate(5 * kPageSize, 16));
    moved.store(true);
    EXPECT_TRUE(env.mm->migrate(env.hva_of(4 * kPageSize)));
    migrated.store(true);
  });
  if (side() == CacheReadSide::lockfree) {
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!moved.load() && std::chrono::steady_clock::now() < give_up) std::this_thread::yield();
    EXPECT_TRUE(moved.load()) << "a lock-free cache waited for a handle on the page it left";
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(migrated.load()) << "the page the cache left migrated under a handle on it";
  p.write<uint64_t>(8, 0x77);
  EXPECT_TRUE(p.check_tag());
  p.reset();
  host.join();
  expect_the_write_kept_and_the_cache_moved(c);
}

// The same with the activation and the migration on two threads, so that the
// migration can start while the cache is on its way to the new page (under
// the rwlock, the activation waits for the handle): the cache is invalid and
// still findable at the page it is leaving until it is indexed at the new
// one, so the migration finds it, or its retired mapping, and waits. It was
// indexed at the new page first, and a migration meanwhile found neither.
TEST_P(CacheReadTest, AnInvalidationOfThePageACacheIsLeavingWaitsForAHandleOnIt) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(4 * kPageSize, 16));
  CachePtr p = c.read(4 * kPageSize, 16);
  ASSERT_TRUE(p);
  std::atomic<bool> migrated{false};
  std::thread vcpu([&] { EXPECT_TRUE(c.activate(5 * kPageSize, 16)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the activation under way
  std::thread host([&] {
    EXPECT_TRUE(env.mm->migrate(env.hva_of(4 * kPageSize)));
    migrated.store(true);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(migrated.load()) << "the page the cache was leaving migrated under a handle on it";
  p.write<uint64_t>(8, 0x77);
  EXPECT_TRUE(p.check_tag());
  p.reset();
  vcpu.join();
  host.join();
  expect_the_write_kept_and_the_cache_moved(c);
}

// A lock-free cache that moves from page to page retires each old mapping
// (the hva it left and, on unmanaged memory, its remap window); the registry
// waits for their readers once per kRetiredBatch, and deactivation drains the
// rest, so no window outlives the cache. Under the rwlock nothing is retired.
TEST_P(CacheReadTest, MappingsACacheLeftAreDrainedInBatchesAndNoneOutlivesDeactivation) {
  constexpr int kMoves = 40;
  const CounterSet& n = env.vm->counters();
  {
    PfnCache c(*env.vm);
    ASSERT_TRUE(c.activate(6 * kPageSize, 8));
    for (int i = 1; i <= kMoves; i++) {
      ASSERT_TRUE(c.activate((i % 2 ? 7 : 6) * kPageSize, 8));
      ASSERT_LT(env.vm->caches().retired_count(), CacheRegistry::kRetiredBatch);
    }
    const uint64_t retired = n.get(Counter::cache_mappings_retired);
    if (side() == CacheReadSide::rwlock) {
      EXPECT_EQ(retired, 0u);
      EXPECT_EQ(n.get(Counter::cache_retired_drains), 0u);
    } else {
      // Each move leaves an hva, and on unmanaged memory a window.
      EXPECT_EQ(retired, uint64_t{kMoves} * (kind() == host::FrameKind::unmanaged ? 2 : 1));
      EXPECT_EQ(n.get(Counter::cache_retired_drains), retired / CacheRegistry::kRetiredBatch);
      EXPECT_EQ(env.vm->caches().retired_count(), retired % CacheRegistry::kRetiredBatch);
    }
    EXPECT_EQ(env.phys->live_windows(),
              kind() == host::FrameKind::unmanaged ? int64_t(1 + env.vm->caches().retired_count() / 2) : 0);
  }
  EXPECT_EQ(env.vm->caches().retired_count(), 0u);
  EXPECT_EQ(env.phys->live_windows(), 0) << "a window outlived its cache";
  EXPECT_EQ(env.phys->counters().get(Counter::stale_accesses), 0u);
}

// An invalidation that finds a lock-free cache interrupts the other CPUs
// (a membarrier) only while some other thread is an active reader: not for
// the invalidating thread's own reads, not for a thread that quiesced, and
// again once that thread reads.
TEST_P(CacheReadTest, InvalidationsInterruptOtherCpusOnlyForAnotherActiveReader) {
  if (side() != CacheReadSide::lockfree) GTEST_SKIP() << "rwlock readers are waited for by the lock";
  if (!cache_readers::uses_membarrier()) GTEST_SKIP() << "no membarrier: every read fences for itself";
  PfnCache c(*env.vm), theirs(*env.vm);
  ASSERT_TRUE(c.activate(2 * kPageSize, 8));
  ASSERT_TRUE(theirs.activate(3 * kPageSize, 8));
  ASSERT_TRUE(c.read(2 * kPageSize, 8));
  EXPECT_TRUE(cache_readers::active());
  const Hva hva = env.hva_of(2 * kPageSize);
  auto barriers_for_one_invalidation = [&] {
    const uint64_t before = env.vm->counters().get(Counter::cache_reader_barriers);
    const uint64_t waits = env.vm->counters().get(Counter::cache_reader_waits);
    env.vm->invalidate_range_start(hva, hva + kPageSize);
    env.vm->invalidate_range_end(hva, hva + kPageSize);
    EXPECT_EQ(env.vm->counters().get(Counter::cache_reader_waits), waits + 1);
    EXPECT_TRUE(c.invalid());
    const uint64_t barriers = env.vm->counters().get(Counter::cache_reader_barriers) - before;
    EXPECT_TRUE(c.refresh(8));
    return barriers;
  };
  EXPECT_EQ(barriers_for_one_invalidation(), 0u) << "the only active reader is the invalidating thread";

  // The other thread goes through: read (active), quiesce, read again.
  std::atomic<int> asked{0}, done{0};
  auto step = [&](int n) {
    asked.store(n);
    while (done.load() != n) std::this_thread::yield();
  };
  std::thread reader([&] {
    auto await = [&](int n) {
      while (asked.load() != n) std::this_thread::yield();
    };
    await(1);
    EXPECT_TRUE(theirs.read(3 * kPageSize, 8));
    done.store(1);
    await(2);
    cache_readers::quiesce();
    EXPECT_FALSE(cache_readers::active());
    done.store(2);
    await(3);
    EXPECT_TRUE(theirs.read(3 * kPageSize, 8));
    EXPECT_TRUE(cache_readers::active());
    done.store(3);
    await(4);
  });
  step(1);
  EXPECT_EQ(barriers_for_one_invalidation(), 1u) << "another thread is an active reader";
  step(2);
  EXPECT_EQ(barriers_for_one_invalidation(), 0u) << "the other reader quiesced";
  step(3);
  EXPECT_EQ(barriers_for_one_invalidation(), 1u) << "the other reader read again";
  asked.store(4);
  reader.join();
  EXPECT_EQ(barriers_for_one_invalidation(), 0u) << "a reader that ended is not active";
}

TEST_P(CacheReadTest, AQuiesceWithAReadHeldKeepsTheThreadActive) {
  if (side() != CacheReadSide::lockfree) GTEST_SKIP() << "rwlock readers hold no reader slot";
  if (!cache_readers::uses_membarrier()) GTEST_SKIP() << "no membarrier: threads never quiesce, every read fences";
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(2 * kPageSize, 8));
  CachePtr p = c.read(2 * kPageSize, 8);
  ASSERT_TRUE(p);
  cache_readers::quiesce();
  EXPECT_TRUE(cache_readers::active()) << "a thread holding a read must stay visible to waiters";
  p.reset();
  cache_readers::quiesce();
  EXPECT_FALSE(cache_readers::active());
}

TEST_P(CacheReadTest, AnInFlightInvalidationMakesRefreshWaitNotSpin) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(6 * kPageSize, 8));
  const Hva h = env.hva_of(6 * kPageSize);
  env.vm->invalidate_range_start(h, h + kPageSize);  // in flight until _end below
  ASSERT_TRUE(c.invalid());
  const CounterSnapshot before = CounterSnapshot::of(env.vm->counters());
  std::atomic<bool> done{false};
  std::thread vcpu([&] {
    EXPECT_TRUE(c.refresh(8));
    done.store(true);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(done.load()) << "refreshed while an invalidation of its page was in flight";
  EXPECT_EQ(env.vm->counters().get(Counter::cache_refresh_retries), before[Counter::cache_refresh_retries])
      << "spinning";
  env.vm->invalidate_range_end(h, h + kPageSize);
  vcpu.join();
  const CounterSnapshot after = CounterSnapshot::of(env.vm->counters());
  EXPECT_EQ(after[Counter::cache_refresh_waits] - before[Counter::cache_refresh_waits], 1u);
  EXPECT_GT(after[Counter::cache_refresh_wait_ns], before[Counter::cache_refresh_wait_ns]);
  EXPECT_EQ(after[Counter::cache_refresh_retries], before[Counter::cache_refresh_retries]);
  EXPECT_TRUE(c.check(8));
}

// The refresh that KVM's maintainers saw retry "for ever": a thread
// invalidates other pages of the VM without a pause. Only invalidations of
// the cache's own page make it retry, so it finishes every time, never
// retrying.
TEST_P(CacheReadTest, RefreshFinishesWhileOtherPagesAreInvalidatedNonStop) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(0, 8));
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> others{0};
  std::thread host([&] {  // MMU-notifier events on pages 1 .. 63, back to back
    for (Gpa g = kPageSize; !stop.load(); g = g % (63 * kPageSize) + kPageSize) {
      env.vm->invalidate_range_start(env.hva_of(g), env.hva_of(g + kPageSize));
      env.vm->invalidate_range_end(env.hva_of(g), env.hva_of(g + kPageSize));
      others.fetch_add(1);
    }
  });
  const CounterSnapshot before = CounterSnapshot::of(env.vm->counters());
  // At least 200 refreshes, and on until the other thread has made 20,000
  // invalidations meanwhile, however the threads are scheduled.
  uint64_t refreshes = 0;
  for (; refreshes < 200 || others.load() < 20000; refreshes++) {
    ASSERT_TRUE(env.mm->migrate(env.hva_of(0)));
    ASSERT_TRUE(c.refresh(8));
    Result<CachePtr> p = c.lock(0, 8);
    ASSERT_TRUE(p);
    EXPECT_EQ(p->read<uint64_t>(0), stamp(0));
  }
  stop.store(true);
  host.join();
  const CounterSnapshot after = CounterSnapshot::of(env.vm->counters());
  EXPECT_EQ(after[Counter::cache_refreshes] - before[Counter::cache_refreshes], refreshes);
  EXPECT_EQ(after[Counter::cache_refresh_retries] - before[Counter::cache_refresh_retries], 0u);
  EXPECT_EQ(env.phys->counters().get(Counter::stale_accesses), 0u);
}

// The same, made certain: between the resolve and the install of every pass,
// another page of the VM is invalidated (the worst timing for a refresh that
// retries on any invalidation: it would retry as long as invalidations come).
// Only an invalidation of the cache's own page forces a retry.
TEST_P(CacheReadTest, AnInvalidationOfAnotherPageBetweenResolveAndInstallForcesNoRetry) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(0, 8));
  ASSERT_TRUE(env.mm->migrate(env.hva_of(0)));
  int passes = 0;
  c.set_refresh_hook([&] {
    if (passes++ >= 100) return;  // a bound, so that a refresh that does retry still ends
    // From another thread, as the host's would be: this one holds the
    // cache's refresh mutex.
    std::thread([&] { ASSERT_TRUE(env.mm->migrate(env.hva_of(3 * kPageSize))); }).join();
  });
  const uint64_t retries = env.vm->counters().get(Counter::cache_refresh_retries);
  ASSERT_TRUE(c.refresh(8));
  EXPECT_EQ(passes, 1);
  EXPECT_EQ(env.vm->counters().get(Counter::cache_refresh_retries), retries);
  c.set_refresh_hook(nullptr);
  Result<CachePtr> p = c.lock(0, 8);
  ASSERT_TRUE(p);
  EXPECT_EQ(p->read<uint64_t>(0), stamp(0));
}

INSTANTIATE_TEST_SUITE_P(Memory, CacheReadTest, testing::kKindsAndSides, testing::kind_and_side_name);

using CacheReadDeathTest = CacheReadTest;

TEST_P(CacheReadDeathTest, AnAccessOutsideTheHandleAborts) {
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(kPageSize, 16));
  EXPECT_DEATH(
      {
        CachePtr p = c.read(kPageSize, 16);
        (void)p.read<uint64_t>(12);
      },
      "invariant failed");
  EXPECT_DEATH(
      {
        CachePtr p = c.read(kPageSize, 16);
        (void)p.bytes(0, 17);
      },
      "invariant failed");
  EXPECT_DEATH((void)CachePtr().read<uint8_t>(0), "invariant failed");
}

TEST_P(CacheReadDeathTest, WaitingForOnesOwnReadAborts) {
  // Refreshing a cache after a migration while holding a handle on it would
  // deadlock (rwlock: the lock; lockfree: the reader wait); the lock-free
  // side says so instead of hanging.
  if (side() != CacheReadSide::lockfree) GTEST_SKIP() << "rwlock self-deadlocks silently, as KVM's would";
  PfnCache c(*env.vm);
  ASSERT_TRUE(c.activate(kPageSize, 8));
  EXPECT_DEATH(
      {
        CachePtr p = c.read(kPageSize, 8);
        (void)env.mm->migrate(env.hva_of(kPageSize));
      },
      // (Lock-checking builds count the handle as the cache's read lock and
      // stop earlier, at the notifier's lock.)
      "waits for its own pfn-cache read|lock order violation");
}

INSTANTIATE_TEST_SUITE_P(Memory, CacheReadDeathTest, testing::kKindsAndSides, testing::kind_and_side_name);

TEST(CacheReadSide, NamesRoundTrip) {
  for (CacheReadSide s : {CacheReadSide::rwlock, CacheReadSide::lockfree})
    EXPECT_EQ(parse_cache_read_side(cache_read_side_name(s)), s);
  EXPECT_FALSE(parse_cache_read_side("seqlock"));
  EXPECT_EQ(VmOptions{}.cache_read_side, CacheReadSide::lockfree) << "the default is the faster side";
}

}  // namespace
}  // namespace nestcache::vm
