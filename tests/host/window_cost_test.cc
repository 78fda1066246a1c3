// The remap window's modelled cost: the calibration, and a pool charging it.
#include "host/window_cost.h"

#include <gtest/gtest.h>

#include "base/model_time.h"
#include "host/phys_mem.h"

namespace nestcache::host {
namespace {

TEST(WindowCost, CalibrationTimesBothHalvesAndSaysWhatItsSamplesMet) {
  auto c = calibrate_window_cost();
  ASSERT_TRUE(c) << c.error().message;
  EXPECT_GT(c->cost.open_ns, 0u);
  EXPECT_GT(c->cost.close_ns, 0u);
  EXPECT_GE(c->samples, 1000u);
  EXPECT_LE(c->concurrent, c->samples);
  EXPECT_EQ(c->cost.total(), c->cost.open_ns + c->cost.close_ns);
}

TEST(WindowCost, TheProcessCalibratesOnce) {
  auto a = calibrated_window_cost();
  auto b = calibrated_window_cost();
  ASSERT_TRUE(a && b);
  EXPECT_EQ(a->cost.open_ns, b->cost.open_ns);
  EXPECT_EQ(a->cost.close_ns, b->cost.close_ns);
  EXPECT_EQ(a->samples, b->samples);
}

// Opens and closes `n` windows on a measuring clock; returns its remap part.
uint64_t charged_for_windows(PhysMem& mem, int n) {
  ModelClock clock;
  ModelClock::Binding bind(clock);
  clock.begin_measured();
  {
    ModelClock::PartScope scope(TimePart::remap_windows);
    for (int i = 0; i < n; i++) {
      auto w = mem.map_window(static_cast<Pfn>(i % 8));
      EXPECT_TRUE(w);
    }
  }
  clock.end_measured();
  return clock.stamp()[TimePart::remap_windows];
}

TEST(WindowCost, APoolWithACostChargesItPerWindowInsteadOfTheSyscalls) {
  auto mem = PhysMem::create({8, 8});
  ASSERT_TRUE(mem);
  EXPECT_FALSE((*mem)->window_cost());
  // A cost far above what an mmap and a munmap take, so that the charge,
  // not the measurement, makes the figure.
  const WindowCost cost{3'000'000, 7'000'000};
  (*mem)->set_window_cost(cost);
  ASSERT_TRUE((*mem)->window_cost());
  EXPECT_EQ((*mem)->window_cost()->close_ns, cost.close_ns);
  uint64_t charged = charged_for_windows(**mem, 10);
  EXPECT_GE(charged, 10 * cost.total());
  EXPECT_LT(charged, 10 * cost.total() + 10 * cost.total() / 2) << "the syscalls' own time was counted too";

  (*mem)->set_window_cost(std::nullopt);  // measured again
  EXPECT_FALSE((*mem)->window_cost());
  EXPECT_LT(charged_for_windows(**mem, 10), 10 * cost.total());
}

}  // namespace
}  // namespace nestcache::host
