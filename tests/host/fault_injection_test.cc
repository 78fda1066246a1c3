// The resource-exhaustion seam (host/fault_injection.h): specs, and each
// host operation failing cleanly with the injected errno, once or from the
// Nth on, leaving nothing mapped behind.
#include "host/fault_injection.h"

#include <atomic>
#include <thread>

#include <gtest/gtest.h>

#include "host/host_mm.h"
#include "host/phys_mem.h"

namespace nestcache::host {
namespace {

class FaultInjection : public ::testing::Test {
 protected:
  void TearDown() override { clear_faults(); }
};

TEST_F(FaultInjection, SpecsParseWithTheirDefaultsAndRefuseNonsense) {
  auto s = parse_fault_spec("mmap:3");
  ASSERT_TRUE(s) << s.error().to_string();
  EXPECT_EQ(s->site, FaultSite::mmap);
  EXPECT_EQ(s->nth, 3u);
  EXPECT_FALSE(s->and_later);
  EXPECT_EQ(s->error, ENOMEM);
  s = parse_fault_spec("thread:2+");
  ASSERT_TRUE(s);
  EXPECT_TRUE(s->and_later);
  EXPECT_EQ(s->error, EAGAIN);
  s = parse_fault_spec("munmap:4+");
  ASSERT_TRUE(s);
  EXPECT_EQ(s->site, FaultSite::munmap);
  EXPECT_TRUE(s->and_later);
  EXPECT_EQ(s->error, ENOMEM);
  s = parse_fault_spec("memfd:1:ENFILE");
  ASSERT_TRUE(s);
  EXPECT_EQ(s->error, ENFILE);
  // The second names <errno.h> gives some numbers are errno names too.
  s = parse_fault_spec("thread:1:EWOULDBLOCK");
  ASSERT_TRUE(s) << s.error().to_string();
  EXPECT_EQ(s->error, EAGAIN);
  s = parse_fault_spec("mmap:1:EDEADLOCK");
  ASSERT_TRUE(s) << s.error().to_string();
  EXPECT_EQ(s->error, EDEADLK);
  s = parse_fault_spec("mmap:1:ENOTSUP");
  ASSERT_TRUE(s) << s.error().to_string();
  EXPECT_EQ(s->error, EOPNOTSUPP);
  for (const char* bad : {"", "mmap", "mmap:", "mmap:0", "mmap:-1", "mmap:x", "disk:1", "mmap:1:ENOSUCH",
                          "mmap:99999999999999999999", "munmap:1:EINVAL", "munmap:2+:EINVAL"}) {
    auto e = parse_fault_spec(bad);
    ASSERT_FALSE(e) << bad;
    EXPECT_EQ(e.error().code, EINVAL) << bad;
    EXPECT_FALSE(e.error().message.empty());
  }
}

TEST_F(FaultInjection, TheNthOperationFailsOnceThenTheSiteIsDisarmed) {
  inject_fault({FaultSite::mmap, 2, false, ENOMEM});
  EXPECT_EQ(take_fault(FaultSite::mmap), 0);
  EXPECT_EQ(take_fault(FaultSite::mmap), ENOMEM);
  EXPECT_EQ(take_fault(FaultSite::mmap), 0);
  EXPECT_EQ(take_fault(FaultSite::thread), 0);  // other sites are untouched
  EXPECT_EQ(faults_injected(FaultSite::mmap), 1u);
}

TEST_F(FaultInjection, AndLaterKeepsFailingUntilCleared) {
  inject_fault({FaultSite::thread, 1, true, EAGAIN});
  for (int i = 0; i < 5; i++) EXPECT_EQ(take_fault(FaultSite::thread), EAGAIN);
  clear_faults();
  EXPECT_EQ(take_fault(FaultSite::thread), 0);
}

TEST_F(FaultInjection, CountingFailsNothingAndArmingCountsToo) {
  EXPECT_EQ(operations(FaultSite::mmap), 0u);
  EXPECT_EQ(take_fault(FaultSite::mmap), 0);
  EXPECT_EQ(operations(FaultSite::mmap), 0u) << "an idle site counts nothing";
  count_operations(FaultSite::mmap);
  for (int i = 0; i < 3; i++) EXPECT_EQ(take_fault(FaultSite::mmap), 0);
  EXPECT_EQ(take_fault(FaultSite::munmap), 0);
  EXPECT_EQ(operations(FaultSite::mmap), 3u);
  EXPECT_EQ(operations(FaultSite::munmap), 0u);
  EXPECT_EQ(faults_injected(FaultSite::mmap), 0u);
  inject_fault({FaultSite::mmap, 2, false, ENOMEM});
  EXPECT_EQ(operations(FaultSite::mmap), 0u) << "arming restarts the count";
  EXPECT_EQ(take_fault(FaultSite::mmap), 0);
  EXPECT_EQ(take_fault(FaultSite::mmap), ENOMEM);
  EXPECT_EQ(take_fault(FaultSite::mmap), 0);
  EXPECT_EQ(operations(FaultSite::mmap), 3u);
  clear_faults();
  EXPECT_EQ(operations(FaultSite::mmap), 0u);
}

TEST_F(FaultInjection, AFailedMunmapIsRetriedOnceAndTheWindowClosed) {
  auto m = PhysMem::create({4, 4});
  ASSERT_TRUE(m);
  auto pfn = (*m)->alloc(FrameKind::unmanaged);
  ASSERT_TRUE(pfn);
  auto w = (*m)->map_window(*pfn);
  ASSERT_TRUE(w);
  inject_fault({FaultSite::munmap, 1, false, ENOMEM});
  w->reset();
  EXPECT_EQ(faults_injected(FaultSite::munmap), 1u);
  EXPECT_EQ(operations(FaultSite::munmap), 2u) << "the failure, then the retry";
  EXPECT_EQ((*m)->counters().get(Counter::remap_window_unmap_failures), 1u);
  EXPECT_EQ((*m)->live_windows(), 0);
  EXPECT_EQ((*m)->parked_windows(), 0u);
}

TEST_F(FaultInjection, AWindowWhoseMunmapKeepsFailingStaysCountedOpenAndBlocksNewWindows) {
  auto m = PhysMem::create({4, 4});
  ASSERT_TRUE(m);
  PhysMem& mem = **m;
  auto pfn = mem.alloc(FrameKind::unmanaged);
  ASSERT_TRUE(pfn);
  auto w = mem.map_window(*pfn);
  ASSERT_TRUE(w);
  std::byte* data = w->data();
  data[0] = std::byte{0x5a};
  inject_fault({FaultSite::munmap, 1, true, ENOMEM});
  w->reset();
  EXPECT_EQ(mem.live_windows(), 1) << "never counted closed while mapped";
  EXPECT_EQ(mem.parked_windows(), 1u);
  EXPECT_EQ(data[0], std::byte{0x5a}) << "the mapping is still there";
  // No new window while the old one cannot be unmapped: the caller sees
  // munmap's errno, and the count of open windows stays bounded.
  auto w2 = mem.map_window(*pfn);
  ASSERT_FALSE(w2);
  EXPECT_EQ(w2.error().code, ENOMEM);
  EXPECT_NE(w2.error().to_string().find("munmap failed"), std::string::npos) << w2.error().to_string();
  EXPECT_EQ(mem.live_windows(), 1);
  Status st = mem.close_parked_windows();
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, ENOMEM);
  // Once munmap works again the next window first unmaps the parked one.
  clear_faults();
  auto w3 = mem.map_window(*pfn);
  ASSERT_TRUE(w3) << w3.error().to_string();
  EXPECT_EQ(mem.parked_windows(), 0u);
  EXPECT_EQ(mem.live_windows(), 1);
  EXPECT_EQ((*w3).data()[0], std::byte{0x5a});
  w3->reset();
  EXPECT_EQ(mem.live_windows(), 0);
  EXPECT_TRUE(mem.close_parked_windows());
}

TEST_F(FaultInjection, PhysMemCreationReportsEachFailedStepByErrno) {
  inject_fault({FaultSite::memfd, 1, false, EMFILE});
  auto m = PhysMem::create({4, 4});
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, EMFILE);
  EXPECT_NE(m.error().to_string().find("EMFILE: memfd_create"), std::string::npos) << m.error().to_string();

  inject_fault({FaultSite::memfd, 2, false, ENOSPC});
  m = PhysMem::create({4, 4});
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, ENOSPC);
  EXPECT_NE(m.error().message.find("sizing physical memory"), std::string::npos);

  for (uint64_t nth : {1, 2}) {  // the hardware view, then the direct map
    inject_fault({FaultSite::mmap, nth, false, ENOMEM});
    m = PhysMem::create({4, 4});
    ASSERT_FALSE(m) << nth;
    EXPECT_EQ(m.error().code, ENOMEM);
    EXPECT_NE(m.error().to_string().find("ENOMEM: mapping the"), std::string::npos) << m.error().to_string();
  }
  clear_faults();
  EXPECT_TRUE(PhysMem::create({4, 4}));
}

TEST_F(FaultInjection, AFailedRemapWindowIsAnErrorAndTheNextOneWorks) {
  auto m = PhysMem::create({4, 4});
  ASSERT_TRUE(m);
  auto pfn = (*m)->alloc(FrameKind::unmanaged);
  ASSERT_TRUE(pfn);
  inject_fault({FaultSite::mmap, 1, false, ENOMEM});
  auto w = (*m)->map_window(*pfn);
  ASSERT_FALSE(w);
  EXPECT_EQ(w.error().code, ENOMEM);
  EXPECT_EQ((*m)->counters().get(Counter::remap_windows), 0u);
  auto w2 = (*m)->map_window(*pfn);
  ASSERT_TRUE(w2) << w2.error().to_string();
  w2->reset();
  EXPECT_EQ((*m)->counters().get(Counter::remap_windows), (*m)->counters().get(Counter::remap_windows_closed));
}

TEST_F(FaultInjection, ARegionWhoseMappingFailsGivesItsFramesBack) {
  auto m = PhysMem::create({4, 64});
  ASSERT_TRUE(m);
  HostMm mm(**m);
  const size_t free_before = (*m)->free_frames(FrameKind::unmanaged);
  for (uint64_t nth : {1, 2}) {  // the reservation, then mapping the frames
    inject_fault({FaultSite::mmap, nth, false, ENOMEM});
    auto r = mm.create_region(16 * kPageSize, FrameKind::unmanaged);
    ASSERT_FALSE(r) << nth;
    EXPECT_EQ(r.error().code, ENOMEM);
    EXPECT_EQ((*m)->free_frames(FrameKind::unmanaged), free_before) << nth;
  }
  clear_faults();
  EXPECT_TRUE(mm.create_region(16 * kPageSize, FrameKind::unmanaged));
}

TEST_F(FaultInjection, AThreadThatCannotStartIsAnErrorNamingIt) {
  inject_fault({FaultSite::thread, 1, false, EAGAIN});
  bool ran = false;
  auto t = start_thread("the test thread", [&] { ran = true; });
  ASSERT_FALSE(t);
  EXPECT_EQ(t.error().code, EAGAIN);
  EXPECT_NE(t.error().to_string().find("EAGAIN: cannot start the test thread"), std::string::npos);
  t = start_thread("the test thread", [&] { ran = true; });
  ASSERT_TRUE(t);
  t->join();
  EXPECT_TRUE(ran);
}

TEST_F(FaultInjection, AStartedThreadIsRunningUntilItsFunctionReturnsAndAFailedStartNever) {
  const int64_t before = running_threads();
  std::atomic<bool> release{false};
  auto t = start_thread("the test thread", [&] {
    while (!release.load()) std::this_thread::yield();
  });
  ASSERT_TRUE(t);
  EXPECT_EQ(running_threads(), before + 1);
  release.store(true);
  t->join();
  EXPECT_EQ(running_threads(), before);

  inject_fault({FaultSite::thread, 1, false, EAGAIN});
  ASSERT_FALSE(start_thread("the test thread", [] {}));
  EXPECT_EQ(running_threads(), before);
}

TEST_F(FaultInjection, AThreadNotStartedThroughTheSeamIsNotCounted) {
  const int64_t before = running_threads();
  std::atomic<bool> release{false};
  std::thread other([&] {
    while (!release.load()) std::this_thread::yield();
  });
  EXPECT_EQ(running_threads(), before);
  release.store(true);
  other.join();
}

}  // namespace
}  // namespace nestcache::host
