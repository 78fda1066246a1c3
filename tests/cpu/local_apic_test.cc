// The local APIC: interrupt requests, parking a vCPU thread, the APIC timer.
#include "cpu/local_apic.h"

#include <gtest/gtest.h>

#include <thread>

namespace nestcache::cpu {
namespace {

constexpr uint32_t kPeriodic = ApicTimer::kPeriodic;
constexpr uint32_t kDivideBy1 = 0xb;

TEST(ApicTimer, CountsAtOneGigahertzThroughTheDivider) {
  ApicTimer t;
  t.write_lvt(kPeriodic | 0xec);
  t.write_divide(kDivideBy1);
  t.write_initial_count(1000, 5000);
  EXPECT_EQ(t.deadline(), 6000u);
  EXPECT_EQ(t.current_count(5400), 600u);
  t.write_divide(0);  // divide by 2: the next start counts half as fast
  t.write_initial_count(1000, 0);
  EXPECT_EQ(t.deadline(), 2000u);
  t.write_divide(0x8);  // divide by 32
  t.write_initial_count(10, 0);
  EXPECT_EQ(t.deadline(), 320u);
}

TEST(ApicTimer, PeriodicRearmsAndCoalescesMissedPeriods) {
  ApicTimer t;
  t.write_lvt(kPeriodic | 0xec);
  t.write_divide(kDivideBy1);
  t.write_initial_count(100, 0);
  EXPECT_EQ(t.expire(99), std::nullopt);
  EXPECT_EQ(t.expire(100), 0xec);
  EXPECT_EQ(t.deadline(), 200u);
  EXPECT_EQ(t.expire(1050), 0xec) << "ten missed periods are one interrupt";
  EXPECT_EQ(t.deadline(), 1100u);
}

TEST(ApicTimer, OneShotStopsAndMaskedFiresNothing) {
  ApicTimer t;
  t.write_lvt(0x40);
  t.write_divide(kDivideBy1);
  t.write_initial_count(10, 0);
  EXPECT_EQ(t.expire(10), 0x40);
  EXPECT_EQ(t.deadline(), std::nullopt);
  t.write_lvt(ApicTimer::kMasked | kPeriodic | 0x40);
  t.write_initial_count(10, 0);
  EXPECT_EQ(t.expire(10), std::nullopt);
  EXPECT_EQ(t.deadline(), 20u) << "a masked timer keeps counting";
  t.write_initial_count(0, 0);
  EXPECT_EQ(t.deadline(), std::nullopt) << "an initial count of 0 stops it";
}

TEST(LocalApic, TakesTheHighestVectorFirstAndCanSkipOne) {
  LocalApic a;
  a.deliver(0x31);
  a.deliver(0xf2);
  a.deliver(0x80);
  EXPECT_TRUE(a.interrupt_arrived());
  EXPECT_FALSE(a.interrupt_arrived()) << "arrival is reported once";
  EXPECT_EQ(a.take(0xf2), 0x80);
  EXPECT_TRUE(a.take_vector(0xf2));
  EXPECT_FALSE(a.take_vector(0xf2));
  EXPECT_EQ(a.take(), 0x31);
  EXPECT_EQ(a.take(), std::nullopt);
}

TEST(LocalApic, ParkEndsOnAnInterruptFromAnotherThread) {
  LocalApic a;
  std::thread sender([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    a.deliver(0x40);
  });
  EXPECT_TRUE(a.park(false, std::nullopt, nullptr));
  sender.join();
  EXPECT_EQ(a.take(), 0x40);
}

TEST(LocalApic, ParkEndsAtItsDeadline) {
  LocalApic a;
  EXPECT_FALSE(a.park(true, std::chrono::steady_clock::now() + std::chrono::milliseconds(5), nullptr));
  a.deliver(0x40);
  EXPECT_TRUE(a.park(true, std::nullopt, nullptr)) << "a pending interrupt ends a park at once";
  a.take();
  EXPECT_TRUE(a.park(true, std::nullopt, [] { return true; })) << "so does the caller's condition";
}

}  // namespace
}  // namespace nestcache::cpu
