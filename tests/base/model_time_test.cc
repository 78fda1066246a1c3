// Modelled clocks: parts, merges, and measured work in thread CPU time.
#include "base/model_time.h"

#include <gtest/gtest.h>

#include <chrono>
#include <thread>

namespace nestcache {
namespace {

// Burns about `ms` milliseconds of this thread's CPU time.
void burn_cpu(uint64_t ms) {
  uint64_t until = thread_cpu_ns() + ms * 1'000'000;
  volatile uint64_t x = 0;
  while (thread_cpu_ns() < until) x = x + 1;
}

TEST(ModelClock, ChargesAddUpToTheTotal) {
  ModelClock c;
  c.charge(TimePart::transitions, 612);
  c.charge(TimePart::guest_ops, 2);
  c.charge(TimePart::transitions, 612);
  EXPECT_EQ(c.stamp()[TimePart::transitions], 1224u);
  EXPECT_EQ(c.stamp()[TimePart::guest_ops], 2u);
  EXPECT_EQ(c.now(), 1226u);
}

TEST(ModelClock, MergeTakesTheLaterClockWithItsParts) {
  ModelClock waiter, writer;
  waiter.charge(TimePart::guest_ops, 500);
  writer.charge(TimePart::remap_windows, 7000);
  writer.charge(TimePart::transitions, 1000);
  waiter.merge(writer.stamp());
  EXPECT_EQ(waiter.stamp(), writer.stamp()) << "the waiter's path is now the writer's";
  ModelClock late;
  late.charge(TimePart::guest_ops, 100000);
  late.merge(writer.stamp());
  EXPECT_EQ(late.now(), 100000u) << "an earlier clock changes nothing";
  EXPECT_EQ(late.stamp()[TimePart::remap_windows], 0u);
}

TEST(ModelClock, AdvanceToMovesOnlyForward) {
  ModelClock c;
  c.charge(TimePart::guest_ops, 50);
  c.advance_to(1000, TimePart::idle);
  EXPECT_EQ(c.now(), 1000u);
  EXPECT_EQ(c.stamp()[TimePart::idle], 950u);
  c.advance_to(10, TimePart::idle);
  EXPECT_EQ(c.now(), 1000u);
}

TEST(TimeStamp, DifferenceIsPartByPartAndClamped) {
  TimeStamp a, b;
  a.ns[0] = 10;
  a.ns[1] = 5;
  b.ns[0] = 4;
  b.ns[1] = 9;
  TimeStamp d = a - b;
  EXPECT_EQ(d.ns[0], 6u);
  EXPECT_EQ(d.ns[1], 0u);
}

// A clock that took a later thread's stamp can end an interval with a part
// lower than at its start: the interval's parts still add up to its time.
TEST(TimeStamp, IntervalAddsUpToTheTimeBetween) {
  TimeStamp from, to;
  from.ns[0] = 100;  // the host's own part before the interval
  from.ns[1] = 10;
  to.ns[0] = 40;     // the later thread's stamp, taken in between
  to.ns[1] = 200;
  to.ns[2] = 30;
  TimeStamp d = TimeStamp::interval(from, to);
  EXPECT_EQ(d.total(), to.total() - from.total());
  EXPECT_EQ(d.ns[0], 0u);
  EXPECT_GT(d.ns[1], d.ns[2]);
  EXPECT_EQ(TimeStamp::interval(to, from).total(), 0u);
  TimeStamp plain = to;
  plain.ns[0] = 150;
  EXPECT_EQ(TimeStamp::interval(from, plain), plain - from);  // no part lower: the difference itself
}

TEST(ModelClock, MeasuredWorkGoesToTheScopesPart) {
  ModelClock c;
  ModelClock::Binding bind(c);
  c.begin_measured();
  burn_cpu(3);
  {
    ModelClock::PartScope scope(TimePart::remap_windows);
    burn_cpu(3);
    {
      ModelClock::PartScope inner(TimePart::pfn_cache);
      burn_cpu(3);
    }
  }
  c.end_measured();
  EXPECT_GT(c.stamp()[TimePart::other_l0], 1'000'000u);
  EXPECT_GT(c.stamp()[TimePart::remap_windows], 1'000'000u);
  EXPECT_GT(c.stamp()[TimePart::pfn_cache], 1'000'000u);
  EXPECT_EQ(c.stamp()[TimePart::transitions], 0u);
  EXPECT_EQ(c.stamp()[TimePart::guest_ops], 0u);
}

TEST(ModelClock, AFixedCostReplacesItsScopesCpuTime) {
  ModelClock c;
  ModelClock::Binding bind(c);
  c.begin_measured();
  {
    ModelClock::PartScope scope(TimePart::remap_windows);
    ModelClock::FixedCost fixed(1234);
    burn_cpu(20);  // dropped: the scope is worth 1234 ns whatever it costs
  }
  c.end_measured();
  EXPECT_GE(c.stamp()[TimePart::remap_windows], 1234u);
  EXPECT_LT(c.stamp()[TimePart::remap_windows], 5'000'000u) << "the 20 ms burnt inside the fixed cost counted";
  ModelClock idle;
  ModelClock::Binding rebind(idle);
  {
    ModelClock::FixedCost fixed(1234);  // not measuring: nothing
  }
  EXPECT_EQ(idle.now(), 0u);
}

TEST(ModelClock, OnlyMeasuredWorkIsCounted) {
  ModelClock c;
  ModelClock::Binding bind(c);
  {
    ModelClock::PartScope scope(TimePart::remap_windows);  // not measuring: nothing
    burn_cpu(2);
  }
  EXPECT_EQ(c.now(), 0u);
  c.begin_measured();
  std::this_thread::sleep_for(std::chrono::milliseconds(30));  // blocked: no CPU time
  c.end_measured();
  EXPECT_LT(c.now(), 15'000'000u) << "a sleeping thread accrues no L0 time";
}

TEST(ModelClock, BindingIsPerThread) {
  ModelClock c;
  EXPECT_EQ(ModelClock::current(), nullptr);
  {
    ModelClock::Binding bind(c);
    EXPECT_EQ(ModelClock::current(), &c);
    std::thread([] { EXPECT_EQ(ModelClock::current(), nullptr); }).join();
  }
  EXPECT_EQ(ModelClock::current(), nullptr);
}

}  // namespace
}  // namespace nestcache
