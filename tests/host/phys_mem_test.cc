#include "host/phys_mem.h"

#include <gtest/gtest.h>

#include <cstring>

namespace nestcache::host {

struct HardwareKeyForTests {
  static HardwareKey make() { return HardwareKey(); }
};

namespace {

std::unique_ptr<PhysMem> make_mem(size_t managed = 64, size_t unmanaged = 64) {
  auto m = PhysMem::create({managed, unmanaged});
  EXPECT_TRUE(m) << m.error().to_string();
  return std::move(*m);
}

TEST(PhysMem, FramesAreCarvedIntoManagedThenUnmanaged) {
  auto m = make_mem(4, 8);
  EXPECT_EQ(m->num_frames(), 12u);
  EXPECT_EQ(m->kind(3), FrameKind::managed);
  EXPECT_EQ(m->kind(4), FrameKind::unmanaged);
  auto p = m->alloc(FrameKind::unmanaged);
  ASSERT_TRUE(p);
  EXPECT_GE(*p, 4u);
}

TEST(PhysMem, AllocationFailsWithEnomemWhenTheKindRunsOut) {
  auto m = make_mem(2, 1);
  ASSERT_TRUE(m->alloc(FrameKind::unmanaged));
  auto e = m->alloc(FrameKind::unmanaged);
  ASSERT_FALSE(e);
  EXPECT_EQ(e.error().code, ENOMEM);
  EXPECT_TRUE(m->alloc(FrameKind::managed));
}

TEST(PhysMem, RunsAreConsecutiveAndFreedFramesAreReusedZeroed) {
  auto m = make_mem(16, 0);
  auto run = m->alloc_run(FrameKind::managed, 16);
  ASSERT_TRUE(run);
  EXPECT_EQ(run->count, 16u);
  std::memset(m->direct(run->first + 3), 0xab, kPageSize);
  m->free(run->first + 3);
  auto again = m->alloc(FrameKind::managed);
  ASSERT_TRUE(again);
  EXPECT_EQ(*again, run->first + 3);
  EXPECT_EQ(m->direct(*again)[100], std::byte{0});
}

TEST(PhysMem, DirectMapAndRemapWindowAndHardwareViewSeeTheSameFrame) {
  auto m = make_mem(4, 4);
  Pfn managed = *m->alloc(FrameKind::managed);
  Pfn unmanaged = *m->alloc(FrameKind::unmanaged);
  std::memcpy(m->direct(managed), "direct", 7);
  {
    auto w = m->map_window(unmanaged);
    ASSERT_TRUE(w);
    std::memcpy(w->data(), "window", 7);
    EXPECT_EQ(m->live_windows(), 1);
  }
  EXPECT_EQ(m->live_windows(), 0);
  EXPECT_EQ(m->counters().get(Counter::remap_windows), 1u);
  HardwareView hw = m->hardware_view(HardwareKeyForTests::make());
  EXPECT_STREQ(reinterpret_cast<char*>(hw.frame(managed)), "direct");
  EXPECT_STREQ(reinterpret_cast<char*>(hw.frame(unmanaged)), "window");
}

TEST(PhysMem, UnmanagedFramesCannotBePinned) {
  auto m = make_mem(4, 4);
  Pfn unmanaged = *m->alloc(FrameKind::unmanaged);
  auto pin = m->pin(unmanaged);
  ASSERT_FALSE(pin);
  EXPECT_EQ(pin.error().code, EINVAL);
}

TEST(PhysMem, AFrameFreedWhilePinnedReturnsAtTheLastUnpin) {
  auto m = make_mem(1, 0);
  Pfn p = *m->alloc(FrameKind::managed);
  auto pin = m->pin(p);
  ASSERT_TRUE(pin);
  m->free(p);
  EXPECT_EQ(m->free_frames(FrameKind::managed), 0u);
  pin->reset();
  EXPECT_EQ(m->free_frames(FrameKind::managed), 1u);
  EXPECT_EQ(m->live_pins(), 0);
}

TEST(PhysMem, ATagGoesStaleWhenItsFrameIsFreedAndTheCheckCountsIt) {
  auto m = make_mem(4, 0);
  Pfn p = *m->alloc(FrameKind::managed);
  FrameTag t = m->tag(p);
  CounterSet vm_counters;
  EXPECT_TRUE(m->check(t, "test", &vm_counters));
  m->free(p);
  EXPECT_FALSE(m->check(t, "test", &vm_counters));
  EXPECT_EQ(m->counters().get(Counter::stale_accesses), 1u);
  EXPECT_EQ(vm_counters.get(Counter::stale_accesses), 1u);
}

TEST(PhysMem, AVersionCellChecksItsFrameAsTheTagDoes) {
  auto m = make_mem(4, 0);
  Pfn p = *m->alloc(FrameKind::managed);
  Pfn other = *m->alloc(FrameKind::managed);
  const VersionCell* cell = m->version_cell(p);
  EXPECT_EQ(m->pfn_of(cell), p);
  EXPECT_NE(m->version_cell(other), cell);
  const uint64_t version = m->tag(p).version;
  CounterSet vm_counters;
  EXPECT_TRUE(PhysMem::holds(cell, version));
  EXPECT_TRUE(m->check(cell, version, "test", &vm_counters));
  m->free(other);
  EXPECT_TRUE(m->check(cell, version, "test", &vm_counters)) << "another frame's change moved this one's version";
  m->free(p);
  EXPECT_FALSE(PhysMem::holds(cell, version));
  EXPECT_EQ(m->counters().get(Counter::stale_accesses), 0u) << "holds() counts nothing";
  EXPECT_FALSE(m->check(cell, version, "test", &vm_counters));
  EXPECT_EQ(m->counters().get(Counter::stale_accesses), 1u);
  EXPECT_EQ(vm_counters.get(Counter::stale_accesses), 1u);
}

TEST(PhysMemDeathTest, StaleAccessesAbortWhenFatal) {
  auto m = make_mem(4, 0);
  Pfn p = *m->alloc(FrameKind::managed);
  FrameTag t = m->tag(p);
  m->retag(p);
  m->set_stale_access_fatal(true);
  EXPECT_DEATH(m->check(t, "a test mapping"), "stale access through a test mapping");
}

}  // namespace
}  // namespace nestcache::host
