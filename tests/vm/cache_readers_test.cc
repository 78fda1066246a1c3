// The lock-free readers' slots (cache_readers.h) on their own: how many reads
// a thread holds at once, in any order, what slot 0's gate says about the
// thread, and what a thread that ends leaves behind. The caches are stand-in
// addresses: the slots only name them.
#include "vm/cache_readers.h"

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

namespace nestcache::vm::cache_readers {
namespace {

struct alignas(64) StandIn {
  char bytes[64];
};

// The reads one thread can hold at once: slot 0 takes one only where
// membarrier works (in fence mode it stays marked).
int capacity() { return uses_membarrier() ? kSlotsPerThread : kSlotsPerThread - 1; }

TEST(CacheReaders, AThreadHoldsAReadPerSlotAndReleasesThemInAnyOrder) {
  std::array<StandIn, kSlotsPerThread> caches{};
  std::vector<Slot*> slots;
  for (int i = 0; i < capacity(); i++) slots.push_back(enter(&caches[i]));
  for (int i = 0; i < capacity(); i++) EXPECT_TRUE(reading(&caches[i])) << i;
  EXPECT_TRUE(active());
  // A thread that holds reads stays visible to waiters.
  quiesce();
  EXPECT_TRUE(active());
  // The first read goes in the middle, the others out of order.
  const std::vector<int> order = {2, 0, capacity() - 1, 1};
  for (int i : order) {
    if (i >= capacity()) continue;
    exit(slots[i]);
    slots[i] = nullptr;
    EXPECT_FALSE(reading(&caches[i])) << i;
  }
  // A read entered now reuses a free slot (slot 0 first, with membarrier).
  Slot* again = enter(&caches[0]);
  EXPECT_TRUE(reading(&caches[0]));
  exit(again);
  for (int i = 0; i < capacity(); i++)
    if (slots[i]) exit(slots[i]);
  for (int i = 0; i < capacity(); i++) EXPECT_FALSE(reading(&caches[i])) << i;
  if (uses_membarrier()) {
    quiesce();
    EXPECT_FALSE(active());
    // The next read activates the thread again (slot 0 unparked).
    Slot* s = enter(&caches[1]);
    EXPECT_TRUE(active());
    EXPECT_TRUE(reading(&caches[1]));
    exit(s);
    EXPECT_TRUE(active());
  }
}

TEST(CacheReadersDeathTest, OneReadMoreThanTheSlotsAborts) {
  std::array<StandIn, kSlotsPerThread + 1> caches{};
  EXPECT_DEATH(
      {
        for (int i = 0; i <= capacity(); i++) (void)enter(&caches[i]);
      },
      "holds more than [0-9]+ pfn-cache reads at once");
}

// A thread's first read registers it; when it ends, its record is parked for
// the next thread, so a waiter neither waits for nor interrupts it.
TEST(CacheReaders, AThreadThatEndsLeavesNoActiveReaderBehind) {
  StandIn cache{};
  const void* const caches[] = {&cache};
  for (int round = 0; round < 3; round++) {  // the later rounds reuse a record
    std::thread t([&] {
      EXPECT_FALSE(reading(&cache));
      Slot* s = enter(&cache);
      EXPECT_TRUE(active());
      EXPECT_TRUE(reading(&cache));
      exit(s);
    });
    t.join();
    EXPECT_FALSE(reading(&cache));
    EXPECT_FALSE(wait_for_readers(caches)) << "no other thread is an active reader, round " << round;
  }
}

// A waiter waits for a read of the cache it names held by another thread,
// whichever slot that read is in, and not for reads of other caches.
TEST(CacheReaders, AWaiterWaitsForAReadInAnySlotOfAnotherThread) {
  std::array<StandIn, 3> caches{};
  std::atomic<bool> holding{false}, go{false}, ending{false}, done{false};
  std::thread reader([&] {
    Slot* other = enter(&caches[0]);  // the first slot (0, or 1 in fence mode)
    Slot* mine = enter(&caches[1]);   // the next one
    holding.store(true);
    while (!go.load()) std::this_thread::yield();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    ending.store(true);
    exit(mine);
    while (!done.load()) std::this_thread::yield();
    exit(other);
  });
  while (!holding.load()) std::this_thread::yield();
  const void* const unread[] = {&caches[2]};
  (void)wait_for_readers(unread);  // returns at once: nobody reads it
  go.store(true);
  const void* const read[] = {&caches[1]};
  (void)wait_for_readers(read);
  EXPECT_TRUE(ending.load()) << "the waiter returned before the read in the thread's second slot ended";
  done.store(true);
  reader.join();
}

}  // namespace
}  // namespace nestcache::vm::cache_readers
