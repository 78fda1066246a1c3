// vCPU requests, kicks and KVM_REQUEST_WAIT semantics; EPT01 zaps and the
// TLB flushes they cause.
#include <gtest/gtest.h>

#include "vm_fixture.h"

namespace nestcache::vm {
namespace {

using testing::HarnessVcpu;
using testing::VmEnv;

TEST(Vcpu, ARequestPendingBeforeEntryCancelsTheEntry) {
  Vcpu v(0);
  v.make_request(Request::kTlbFlush);
  EXPECT_FALSE(v.enter_guest_mode());
  EXPECT_EQ(v.mode(), VcpuMode::outside);
  EXPECT_TRUE(v.check_request(Request::kTlbFlush));
  EXPECT_FALSE(v.check_request(Request::kTlbFlush));
  EXPECT_TRUE(v.enter_guest_mode());
  v.exit_guest_mode();
}

TEST(Vcpu, AKickOfAnInGuestVcpuAsksItToExit) {
  Vcpu v(0);
  ASSERT_TRUE(v.enter_guest_mode());
  EXPECT_FALSE(v.exit_requested());
  v.kick();
  EXPECT_TRUE(v.exit_requested());
  v.exit_guest_mode();
  EXPECT_EQ(v.mode(), VcpuMode::outside);
}

TEST(Vcpu, RequestAndWaitReturnsAtOnceForAVcpuOutsideGuestMode) {
  Vcpu v(0);
  Vcpu* vs[] = {&v};
  Vcpu::make_request_and_wait(vs, Request::kOutsideGuestMode);
  EXPECT_TRUE(v.test_request(Request::kOutsideGuestMode));
}

TEST(Vcpu, RequestAndWaitBlocksUntilTheVcpuLeavesGuestMode) {
  Vcpu v(0);
  ASSERT_TRUE(v.enter_guest_mode());
  std::atomic<bool> returned{false};
  std::thread requester([&] {
    Vcpu* vs[] = {&v};
    Vcpu::make_request_and_wait(vs, Request::kOutsideGuestMode);
    returned.store(true);
  });
  while (!v.exit_requested()) std::this_thread::yield();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_FALSE(returned.load()) << "must wait while the vCPU is still in guest mode";
  v.exit_guest_mode();
  requester.join();
  EXPECT_TRUE(returned.load());
  EXPECT_TRUE(v.check_request(Request::kOutsideGuestMode));
}

TEST(Vcpu, ManyRequestersAndARunningVcpuNeverLoseARequest) {
  HarnessVcpu v(0);
  std::atomic<int> ops{0};
  v.start([&] { ops.fetch_add(1); });
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; t++)
    ts.emplace_back([&] {
      Vcpu* vs[] = {&v};
      for (int i = 0; i < 500; i++) Vcpu::make_request_and_wait(vs, Request::kTlbFlush);
    });
  for (auto& t : ts) t.join();
  v.stop();
  EXPECT_GE(v.tlb_flushes.load(), 1);
  EXPECT_FALSE(v.test_request(Request::kTlbFlush)) << "every request was consumed";
}

TEST(Ept01, FaultsFillAndNotifierZapsFlushTheVcpus) {
  VmEnv env(host::FrameKind::unmanaged);
  HarnessVcpu v(0);
  env.vm->add_vcpu(&v);
  v.start([] {});
  auto e = env.vm->ept01_fault(3, true);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->tag.pfn, env.mm->lookup(env.hva_of(0x3000))->pfn);
  EXPECT_TRUE(env.vm->ept01_lookup(3));
  ASSERT_TRUE(env.mm->migrate(env.hva_of(0x3000)));
  EXPECT_FALSE(env.vm->ept01_lookup(3));
  v.stop();
  EXPECT_GE(v.tlb_flushes.load(), 1);
  EXPECT_EQ(env.vm->counters().get(Counter::ept01_zaps), 1u);
  auto again = env.vm->ept01_fault(3, false);
  ASSERT_TRUE(again);
  EXPECT_TRUE(env.phys->check(again->tag, "ept01"));
  env.vm->remove_vcpu(&v);
}

TEST(Ept01, AFaultOutsideEveryMemslotIsEfault) {
  VmEnv env(host::FrameKind::managed);
  EXPECT_EQ(env.vm->ept01_fault(0x100000, false).error().code, EFAULT);
}

TEST(Ept01, ChangesToPagesWithoutEntriesSendNoFlush) {
  VmEnv env(host::FrameKind::unmanaged);
  HarnessVcpu v(0);
  env.vm->add_vcpu(&v);
  v.start([] {});
  ASSERT_TRUE(env.vm->ept01_fault(3, true));
  ASSERT_TRUE(env.mm->migrate(env.hva_of(0x9000)));
  v.stop();
  EXPECT_EQ(v.tlb_flushes.load(), 0);
  EXPECT_TRUE(env.vm->ept01_lookup(3));
  env.vm->remove_vcpu(&v);
}

}  // namespace
}  // namespace nestcache::vm
