// A bounded multi-threaded soak: readers check and read through pfn caches
// (some bound to a running vCPU) while other threads migrate and discard
// pages and move and re-create memslots. Stale accesses are fatal; at the end
// every window and pin must be released.
#include <gtest/gtest.h>

#include <chrono>
#include <random>

#include "support/params.h"
#include "vm_fixture.h"

namespace nestcache::vm {
namespace {

using testing::HarnessVcpu;
using testing::KindAndSide;
using testing::VmEnv;

constexpr size_t kPages = 64;
constexpr size_t kStablePages = 32;  // migrated only: data must survive
constexpr Gpa kMovingGpaA = 0x1000000, kMovingGpaB = 0x2000000;

uint64_t stamp(Gpa gpa) { return 0xabcd000000000000ull | gpa; }

// Reads 8 bytes at gpa through c, activating or refreshing it as needed.
Result<uint64_t> read_through(PfnCache& c, Gpa gpa) {
  CachePtr p = NC_TRY(c.lock(gpa, 8));
  return p.read<uint64_t>(0);
}

class SoakTest : public ::testing::TestWithParam<KindAndSide> {};

TEST_P(SoakTest, CachesStayCorrectUnderMigrationDiscardAndMemslotChurn) {
  const host::FrameKind kind = std::get<0>(GetParam());
  VmEnv env(testing::env_config(GetParam(), kPages));
  env.phys->set_stale_access_fatal(true);
  for (Gpa g = 0; g < kPages * kPageSize; g += kPageSize) {
    uint64_t v = stamp(g);
    ASSERT_TRUE(env.vm->write_guest(g, &v, 8));
  }
  Hva moving = *env.mm->create_region(kPageSize, kind);
  uint64_t mv = 0x5a5a;
  ASSERT_TRUE(env.mm->copy_to(moving, &mv, 8));
  ASSERT_TRUE(env.vm->set_memory_region({1, 0, kMovingGpaA, kPageSize, moving}));

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> reads{0}, moving_reads{0}, failures{0};
  HarnessVcpu vcpu(0);
  env.vm->add_vcpu(&vcpu);
  {
    // The vCPU's hardware uses the pfns of two bound caches, as vmcs02 would.
    PfnCache hw0(*env.vm, &vcpu), hw1(*env.vm, &vcpu);
    ASSERT_TRUE(hw0.activate(0, 8));
    ASSERT_TRUE(hw1.activate(kStablePages * kPageSize, 8));
    host::FrameTag t0, t1;
    vcpu.start(
        [&] {
          if (!env.phys->check(t0, "hw0") || !env.phys->check(t1, "hw1")) failures.fetch_add(1);
        },
        [&] {
          // (check, not invalid(): a memslot change elsewhere moves the
          // generation, which only a refresh adopts.)
          for (PfnCache* c : {&hw0, &hw1})
            if (!c->check(8) && !c->refresh(8)) return false;
          CachePtr p0 = hw0.read(8);
          if (!p0) return false;
          t0 = p0.tag();
          p0.reset();
          CachePtr p1 = hw1.read(8);
          if (!p1) return false;
          t1 = p1.tag();
          return true;
        },
        [&] { return !hw0.invalid() && !hw1.invalid(); });

    std::vector<std::thread> ts;
    for (int r = 0; r < 2; r++) {
      ts.emplace_back([&, r] {
        std::mt19937 rng(r);
        std::vector<std::unique_ptr<PfnCache>> caches;
        for (int i = 0; i < 8; i++) caches.push_back(std::make_unique<PfnCache>(*env.vm));
        PfnCache moving_cache(*env.vm);
        while (!stop.load()) {
          // Stable pages: the data written at the start must always be there.
          Gpa g = (rng() % kStablePages) * kPageSize;
          PfnCache& c = *caches[rng() % caches.size()];
          Result<uint64_t> v = read_through(c, g);
          if (!v || *v != stamp(g)) failures.fetch_add(1);
          // Churned pages: zero after a discard, the stamp otherwise.
          Gpa d = (kStablePages + rng() % (kPages - kStablePages)) * kPageSize;
          v = read_through(c, d);
          if (!v || (*v != 0 && *v != stamp(d))) failures.fetch_add(1);
          // The moving slot: mapped at A or B, or momentarily at neither.
          for (Gpa m : {kMovingGpaA, kMovingGpaB}) {
            v = read_through(moving_cache, m);
            if (v) {
              moving_reads.fetch_add(1);
              if (*v != 0x5a5a) failures.fetch_add(1);
            } else if (v.error().code != EFAULT) {
              failures.fetch_add(1);
            }
          }
          reads.fetch_add(2);
        }
      });
    }
    ts.emplace_back([&] {  // host: migrations everywhere
      std::mt19937 rng(7);
      while (!stop.load()) {
        Hva h = env.hva_of((rng() % kPages) * kPageSize);
        auto st = env.mm->migrate(h);
        if (!st && st.error().code != EFAULT && st.error().code != EAGAIN) failures.fetch_add(1);
        (void)env.mm->migrate(moving);
      }
    });
    ts.emplace_back([&] {  // host: discards of churned pages, then the VMM rewrites them
      std::mt19937 rng(8);
      while (!stop.load()) {
        Gpa d = (kStablePages + rng() % (kPages - kStablePages)) * kPageSize;
        if (!env.mm->discard(env.hva_of(d), kPageSize)) failures.fetch_add(1);
        uint64_t v = stamp(d);
        if (!env.vm->write_guest(d, &v, 8)) failures.fetch_add(1);
      }
    });
    ts.emplace_back([&] {  // VMM: move the slot back and forth, delete and re-create it
      for (int i = 0; !stop.load(); i++) {
        Status st = i % 3 == 2 ? env.vm->set_memory_region({1, 0, kMovingGpaA, 0, 0})
                                     .and_then([&] { return env.vm->set_memory_region({1, 0, kMovingGpaB, kPageSize, moving}); })
                               : env.vm->set_memory_region({1, 0, i % 3 ? kMovingGpaA : kMovingGpaB, kPageSize, moving});
        if (!st) failures.fetch_add(1);
      }
    });
    // At least 2 s, and on until every thread has made the progress checked
    // below (a loaded machine can starve one of them for a while), 60 s at most.
    auto enough = [&] {
      return reads.load() > 1000 && moving_reads.load() > 0 && env.mm->counters().get(Counter::migrations) > 100 &&
             env.vm->counters().get(Counter::cache_invalidations) > 100 && vcpu.in_guest_episodes.load() > 10;
    };
    auto start = std::chrono::steady_clock::now();
    while (std::chrono::steady_clock::now() - start < std::chrono::seconds(2) ||
           (!enough() && std::chrono::steady_clock::now() - start < std::chrono::seconds(60)))
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    stop.store(true);
    for (auto& t : ts) t.join();
    vcpu.stop();
  }
  env.vm->remove_vcpu(&vcpu);

  EXPECT_EQ(failures.load(), 0u);
  EXPECT_GT(reads.load(), 1000u);
  EXPECT_GT(moving_reads.load(), 0u);
  EXPECT_GT(env.mm->counters().get(Counter::migrations), 100u);
  EXPECT_GT(env.vm->counters().get(Counter::cache_invalidations), 100u);
  EXPECT_GT(vcpu.in_guest_episodes.load(), 10);
  EXPECT_EQ(env.phys->counters().get(Counter::stale_accesses), 0u);
  EXPECT_EQ(env.vm->caches().active_count(), 0u);
  EXPECT_EQ(env.phys->live_windows(), 0);
  EXPECT_EQ(env.phys->live_pins(), 0);
}

INSTANTIATE_TEST_SUITE_P(Memory, SoakTest, testing::kKindsAndSides, testing::kind_and_side_name);

}  // namespace
}  // namespace nestcache::vm
