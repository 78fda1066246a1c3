// A nested context taken from a vCPU that is running L2 on its caches (L1
// made one vmcs12 current on two vCPUs: a handover; or VMCLEARed it on a vCPU
// that does not hold it): the taker rebinds the hardware-used caches to itself,
// and from then on invalidations kick and wait for the taker only. The vCPU
// that lost the context must be out of guest mode before the taker can do
// that, and must not re-enter with the context's pfns.
//
// Without a machine: vCPU A's "hardware" is a thread that enters guest mode
// with NestedVmx's last check and, in guest mode, checks the frame tag of the
// virtual-APIC pfn vmcs02 holds, as the CPU model does on every access; vCPU
// B is driven from the test thread.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "support/vm_env.h"
#include "vmx/nested.h"
#include "vmx/nested_state_format.h"
#include "vmx/vmx_nested_contexts.h"

namespace nestcache::vmx {
namespace {

constexpr Gpa kVmxonA = 0x10000, kVmxonB = 0x12000, kVmcs = 0x11000, kApicPage = 0x20000, kVapicPage = 0x21000;

NestedStateImage in_guest_mode(Gpa vmxon) {
  Vmcs12 v = minimal_vmcs12();
  v.launch_state = kLaunchStateLaunched;
  v.primary_proc_controls |= proc::kActivateSecondaryControls | proc::kUseTprShadow;
  v.secondary_proc_controls |= proc2::kVirtualizeApicAccesses;
  v.apic_access_addr = kApicPage;
  v.virtual_apic_page_addr = kVapicPage;
  NestedStateImage s;
  s.vmxon_gpa = vmxon;
  s.current_vmcs_gpa = kVmcs;
  s.vmcs12 = v;
  s.guest_mode = true;
  return s;
}

// vCPU A: L0's loop reduced to what matters here.
class HardwareVcpu : public vm::Vcpu {
 public:
  HardwareVcpu(int id, host::PhysMem& phys) : vm::Vcpu(id), phys_(phys) {}
  ~HardwareVcpu() override { stop(); }
  void start(NestedVmx& n) {
    thread_ = std::thread([this, &n] {
      vm::Vcpu::ThreadBinding bind(*this);
      while (!stop_.load()) {
        if (check_request(vm::Request::kRefreshGuestPages)) {
          EXPECT_TRUE(n.refresh_guest_pages());
        }
        for (uint32_t r = 0; r < static_cast<uint32_t>(vm::Request::kCount); r++) check_request(static_cast<vm::Request>(r));
        if (!enter_guest_mode()) continue;
        if (!n.check_before_hardware_entry()) {
          exit_guest_mode();
          continue;
        }
        while (!exit_requested() && !stop_.load()) {
          if (!phys_.check(n.vmcs02().vapic.tag, "virtual-APIC page (hardware)")) stale.fetch_add(1);
          ops.fetch_add(1);
        }
        exit_guest_mode();
      }
    });
  }
  void stop() {
    stop_.store(true);
    kick();
    if (thread_.joinable()) thread_.join();
  }
  std::atomic<uint64_t> ops{0}, stale{0};

 private:
  host::PhysMem& phys_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

struct Handover : ::testing::TestWithParam<bool> {
  Handover() : env({.kind = host::FrameKind::managed, .pages = 64, .spare = 256}), a(0, *env.phys), b(1) {
    env.vm->add_vcpu(&a);
    env.vm->add_vcpu(&b);
    contexts = std::make_unique<VmxNestedContexts>(*env.vm, nullptr);
    na = std::make_unique<NestedVmx>(*env.vm, a, StrategyKind::cache, nullptr, counters_a, contexts.get());
    nb = std::make_unique<NestedVmx>(*env.vm, b, StrategyKind::cache, nullptr, counters_b, contexts.get());
  }
  ~Handover() override {
    a.stop();
    na.reset();
    nb.reset();
    contexts->destroy();
    env.vm->remove_vcpu(&a);
    env.vm->remove_vcpu(&b);
  }
  // A's context (A in guest mode on its vmcs12) goes to B. handover: B
  // makes A's vmcs12 current; otherwise B VMCLEARs it while A holds it (the
  // table does not check the holder, as the seed), then makes it current,
  // which attaches the detached context to B. B's vmcs02 is then built from
  // the context's caches, which B's lock rebinds to B.
  void take_context(bool handover) {
    const VmxNestedContext* ctx = na->context();
    ASSERT_NE(ctx, nullptr);
    if (handover) {
      ASSERT_TRUE(nb->set_nested_state(encode(in_guest_mode(kVmxonB))));  // VMPTRLD of A's vmcs12: handed over
      EXPECT_EQ(env.vm->counters().get(Counter::nested_context_handovers), 1u);
    } else {
      NestedStateImage s;
      s.vmxon_gpa = kVmxonB;  // B in VMX operation, in L1, no current VMCS
      ASSERT_TRUE(nb->set_nested_state(encode(s)));
      ASSERT_TRUE(nb->vmclear(kVmcs).ok()) << "B VMCLEARs the vmcs12 A holds: the context is detached";
      ASSERT_TRUE(nb->set_nested_state(encode(in_guest_mode(kVmxonB))));
      EXPECT_EQ(env.vm->counters().get(Counter::nested_context_handovers), 0u);
    }
    ASSERT_EQ(nb->context(), ctx) << "B has A's context";
    ASSERT_TRUE(nb->get_nested_state_pages());
  }

  test_support::VmEnv env;
  HardwareVcpu a;
  vm::Vcpu b;
  CounterSet counters_a, counters_b;
  std::unique_ptr<VmxNestedContexts> contexts;
  std::unique_ptr<NestedVmx> na, nb;
};

// Param true: a handover; false: a foreign VMCLEAR, then a load (take_context).
TEST_P(Handover, TheVcpuThatLostAContextIsOutOfGuestModeBeforeTheTakerRebindsItsCaches) {
  ASSERT_TRUE(na->set_nested_state(encode(in_guest_mode(kVmxonA))));
  ASSERT_TRUE(na->get_nested_state_pages());
  a.start(*na);  // A's thread owns na from here
  while (a.ops.load() < 100) std::this_thread::yield();  // A runs L2 on the context's pfns
  take_context(GetParam());
  if (HasFatalFailure()) return;

  const uint64_t ops = a.ops.load();
  ASSERT_TRUE(env.mm->migrate(env.hva_of(kVapicPage)));
  while (a.ops.load() < ops + 100) std::this_thread::yield();  // A runs on after the old frame is freed
  a.stop();
  EXPECT_EQ(a.stale.load(), 0u) << "A's hardware used the virtual-APIC frame the host migrated away";
}

// A, out of guest mode but still handling the exit it was taking when the
// context went, reaches the virtual-APIC page in software (the
// posted-interrupt completion). It must not refresh the context's cache: the
// refresh would make the cache B's vmcs02 was built from valid again on the
// new frame, with the vmcs02 rewrite requested of A, and B's last check would
// let B in on the old frame.
TEST_P(Handover, TheVcpuThatLostAContextDoesNotRefreshTheTakersCaches) {
  ASSERT_TRUE(na->set_nested_state(encode(in_guest_mode(kVmxonA))));
  ASSERT_TRUE(na->get_nested_state_pages());
  take_context(GetParam());
  if (HasFatalFailure()) return;
  // The cache goes invalid; B is outside guest mode, so nothing waits.
  ASSERT_TRUE(env.mm->migrate(env.hva_of(kVapicPage)));
  EXPECT_TRUE(na->access_page(L1Page::vapic, kVapicPage, [](const PageView&) {}));
  EXPECT_TRUE(!nb->check_before_hardware_entry() || env.phys->check(nb->vmcs02().vapic.tag, "virtual-APIC page (B)"))
      << "B's last check let it enter with the virtual-APIC frame the host migrated away";
}

// A leaving VMX operation (here its teardown) releases what it holds, not
// the context B took from it: that stays attached to B, and B is not sent
// out of guest mode.
TEST_P(Handover, TheVcpuThatLostAContextLeavesItToTheTakerWhenItLeavesVmxOperation) {
  ASSERT_TRUE(na->set_nested_state(encode(in_guest_mode(kVmxonA))));
  ASSERT_TRUE(na->get_nested_state_pages());
  take_context(GetParam());
  if (HasFatalFailure()) return;
  const VmxNestedContext* ctx = nb->context();
  while (b.check_request(vm::Request::kRefreshGuestPages)) {
  }
  na.reset();
  EXPECT_EQ(ctx->vcpu_id(), b.id()) << "A's teardown detached the context B holds";
  EXPECT_FALSE(b.test_request(vm::Request::kRefreshGuestPages)) << "A's teardown sent B out of guest mode";
}

INSTANTIATE_TEST_SUITE_P(HandoverOrForeignVmclear, Handover, ::testing::Bool());

}  // namespace
}  // namespace nestcache::vmx
