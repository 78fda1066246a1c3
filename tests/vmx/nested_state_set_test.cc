// NestedVmx::get_nested_state / set_nested_state / get_nested_state_pages on
// one vCPU, without a machine: what set checks before it changes anything,
// what it installs, and what it leaves to the request before the next entry.
#include "vmx/nested.h"

#include <gtest/gtest.h>

#include "base/check.h"
#include "support/vm_env.h"
#include "vmx/entry_checks.h"

namespace nestcache::vmx {
namespace {

constexpr size_t kPages = 64;  // memslot 0: [0, 256 KiB)
constexpr Gpa kVmxon = 0x10000, kVmcs = 0x11000, kApicPage = 0x20000, kVapicPage = 0x21000;
constexpr Gpa kNoSlot = 0x800000;

struct Fixture : test_support::VmEnv {
  Fixture(StrategyKind strategy = StrategyKind::cache)
      : VmEnv({.kind = host::FrameKind::managed, .pages = kPages, .spare = 256}) {
    vcpu = std::make_unique<vm::Vcpu>(0);
    nested = std::make_unique<NestedVmx>(*vm, *vcpu, strategy, nullptr, counters);
  }
  ~Fixture() { nested.reset(); }

  std::unique_ptr<vm::Vcpu> vcpu;
  CounterSet counters;
  std::unique_ptr<NestedVmx> nested;
};

Vmcs12 launched_vmcs12() {
  Vmcs12 v = minimal_vmcs12();
  v.launch_state = kLaunchStateLaunched;
  v.primary_proc_controls |= proc::kActivateSecondaryControls | proc::kUseTprShadow;
  v.secondary_proc_controls |= proc2::kVirtualizeApicAccesses;
  v.apic_access_addr = kApicPage;
  v.virtual_apic_page_addr = kVapicPage;
  return v;
}

NestedStateImage in_guest_mode(Vmcs12 v = launched_vmcs12()) {
  NestedStateImage s;
  s.vmxon_gpa = kVmxon;
  s.current_vmcs_gpa = kVmcs;
  s.vmcs12 = v;
  s.guest_mode = true;
  return s;
}

TEST(NestedStateSet, VmxOffVcpuReportsVmxOff) {
  Fixture f;
  NestedStateImage s = f.nested->get_nested_state();
  EXPECT_FALSE(s.vmx_on());
  EXPECT_EQ(s, NestedStateImage{});
}

TEST(NestedStateSet, GuestModeStateIsInstalledAndThePagesAreLeftToTheRequest) {
  Fixture f;
  const NestedStateImage s = in_guest_mode();
  ASSERT_TRUE(f.nested->set_nested_state(encode(s)));
  EXPECT_TRUE(f.nested->vmx_on());
  EXPECT_TRUE(f.nested->guest_mode());
  EXPECT_EQ(f.nested->current_vmptr(), kVmcs);
  EXPECT_EQ(f.nested->get_nested_state(), s) << "get returns what set installed";
  EXPECT_TRUE(f.vcpu->test_request(vm::Request::kGetNestedStatePages)) << "pages are resolved before the next entry";
  EXPECT_FALSE(f.nested->vmcs02().apic_access.valid()) << "set resolves no page";
  EXPECT_EQ(f.counters.get(Counter::cache_refreshes), 0u);

  ASSERT_TRUE(f.nested->get_nested_state_pages());
  EXPECT_TRUE(f.nested->vmcs02().apic_access.valid());
  EXPECT_TRUE(f.nested->vmcs02().vapic.valid());
}

TEST(NestedStateSet, RunPendingSurvivesTheRoundTrip) {
  Fixture f;
  NestedStateImage s = in_guest_mode();
  s.run_pending = true;
  ASSERT_TRUE(f.nested->set_nested_state(encode(s)));
  EXPECT_TRUE(f.nested->run_pending());
  EXPECT_EQ(f.nested->get_nested_state(), s);
  f.nested->set_run_pending(false);  // the cpu layer, at the hardware entry
  EXPECT_FALSE(f.nested->get_nested_state().run_pending);
}

TEST(NestedStateSet, ApicAccessPageWithoutMemslotFailsOnlyTheEntry) {
  Fixture f;
  Vmcs12 v = launched_vmcs12();
  v.apic_access_addr = kNoSlot;
  ASSERT_TRUE(f.nested->set_nested_state(encode(in_guest_mode(v)))) << "the vmcs12's pages are not set's business";
  auto st = f.nested->get_nested_state_pages();
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("no backing for APIC-access address 0x800000"), std::string::npos)
      << st.error().message;
  EXPECT_TRUE(f.nested->guest_mode()) << "the state stays; the VMM decides what to do";
}

TEST(NestedStateSet, VirtualApicPageWithoutMemslotGetsKvmsFallbacks) {
  Fixture f;
  Vmcs12 v = launched_vmcs12();
  v.virtual_apic_page_addr = kNoSlot;
  ASSERT_TRUE(f.nested->set_nested_state(encode(in_guest_mode(v))));
  auto st = f.nested->get_nested_state_pages();
  ASSERT_FALSE(st) << "APIC-access virtualization on: vmcs02 gets an invalid address, the entry fails";
  EXPECT_NE(st.error().message.find("virtual-APIC page 0x800000 has no backing"), std::string::npos);

  // CR8-load and CR8-store exiting, no APIC-access virtualization: the TPR
  // shadow is cleared and the entry goes on.
  v.secondary_proc_controls &= ~proc2::kVirtualizeApicAccesses;
  v.primary_proc_controls |= proc::kCr8LoadExiting | proc::kCr8StoreExiting;
  ASSERT_TRUE(f.nested->set_nested_state(encode(in_guest_mode(v))));
  ASSERT_TRUE(f.nested->get_nested_state_pages());
  EXPECT_FALSE(f.nested->vmcs02().proc & proc::kUseTprShadow);
}

// Every rejection leaves the vCPU exactly as it was.
TEST(NestedStateSet, RejectedBlobsChangeNothing) {
  Fixture f;
  const NestedStateImage s = in_guest_mode();
  ASSERT_TRUE(f.nested->set_nested_state(encode(s)));
  ASSERT_TRUE(f.nested->get_nested_state_pages());
  const uint64_t generation = f.nested->vmcs02().generation;
  f.vcpu->check_request(vm::Request::kGetNestedStatePages);

  struct Case {
    std::vector<std::byte> blob;
    int code;
    const char* expect;
  };
  NestedStateImage unbacked_vmxon = s, unbacked_vmcs = s, evmcs = s;
  unbacked_vmxon.vmxon_gpa = kNoSlot;
  unbacked_vmcs.current_vmcs_gpa = kNoSlot;
  evmcs.evmcs = true;  // this vCPU never enabled the enlightened VMCS
  evmcs.guest_mode = false;
  std::vector<std::byte> huge(kNestedStateMaxSize + 1);
  std::vector<std::byte> cut = encode(s);
  cut.resize(100);
  const Case cases[] = {
      {huge, E2BIG, "exceeds the largest version-1 state (4160 bytes)"},
      {cut, EINVAL, "truncated"},
      {encode(unbacked_vmxon), EINVAL, "VMXON region 0x800000 is not backed by a memslot"},
      {encode(unbacked_vmcs), EINVAL, "current vmcs12 region 0x800000 is not backed by a memslot"},
      {encode(evmcs), EINVAL, "eVMCS flag is set but vCPU 0 has not enabled the enlightened VMCS"},
  };
  for (const Case& c : cases) {
    auto st = f.nested->set_nested_state(c.blob);
    ASSERT_FALSE(st) << c.expect;
    EXPECT_EQ(st.error().code, c.code) << st.error().to_string();
    EXPECT_NE(st.error().message.find(c.expect), std::string::npos) << st.error().message;
    EXPECT_EQ(f.nested->get_nested_state(), s);
    EXPECT_EQ(f.nested->vmcs02().generation, generation) << "vmcs02 untouched";
    EXPECT_TRUE(f.nested->vmcs02().apic_access.valid());
    EXPECT_FALSE(f.vcpu->test_request(vm::Request::kGetNestedStatePages));
  }
}

TEST(NestedStateSet, VmxOffBlobLeavesVmxOperation) {
  Fixture f;
  ASSERT_TRUE(f.nested->set_nested_state(encode(in_guest_mode())));
  ASSERT_TRUE(f.nested->set_nested_state(encode(NestedStateImage{})));
  EXPECT_FALSE(f.nested->vmx_on());
  EXPECT_FALSE(f.nested->guest_mode());
  EXPECT_FALSE(f.nested->run_pending());
}

TEST(NestedStateSet, WorksWithEveryStrategyThatNeedsNoHardwareView) {
  for (StrategyKind k : {StrategyKind::map, StrategyKind::cache}) {
    Fixture f(k);
    ASSERT_TRUE(f.nested->set_nested_state(encode(in_guest_mode())));
    ASSERT_TRUE(f.nested->get_nested_state_pages()) << strategy_name(k);
    EXPECT_TRUE(f.nested->vmcs02().apic_access.valid()) << strategy_name(k);
  }
}

}  // namespace
}  // namespace nestcache::vmx
