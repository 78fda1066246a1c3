// The last check before hardware entry (seed patch 3) and patch 4's
// deactivation of a vCPU-bound cache whose activation fails, made
// deterministic with the vCPU's before-last-check hook.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "support/nested_env.h"
#include "guest/enlightened.h"
#include "guest/ept12.h"
#include "guest/vmx.h"
#include "vmx/entry_checks.h"
#include "workloads/nested_env.h"

namespace nestcache::workloads {
namespace {

namespace ops = cpu::ops;
using cpu::GuestOp;
using cpu::GuestTask;

constexpr Gpa kApicGpa = 0xc0000000;
constexpr Gpa kVapicGpa = 0xd0000000;

struct Seen {
  int apic_access_exits = 0;
  int vmcalls = 0;
};

GuestTask l2_apic_then_vmcall() {
  co_await ops::write32(kApicGpa + vmx::vapic::kTpr, 1);
  for (;;) co_await ops::vmcall(0);
}

GuestTask l2_vmcalls() {
  for (;;) co_await ops::vmcall(0);
}

// L1: one vmcs12 `v` (pages filled in by the caller), launch, then resume
// after each exit until `vmcalls` VMCALL exits; `between` runs (host side)
// after the first exit.
GuestTask l1_program(cpu::Machine& m, vmx::Vmcs12 v, GuestTask l2, int vmcalls, Seen& seen,
                     std::function<void()> between) {
  guest::L1Pages pages(kL1PagesStart, 16 << 20);
  Gpa vmcs = co_await guest::enter_vmx_with_current_vmcs(pages);
  guest::Ept12 ept(pages);
  co_await ept.map(kApicGpa, kApicGpa);
  v.ept_pointer = ept.eptp();
  co_await guest::write_vmcs(v);
  m.bind_l2_program(vmcs, std::move(l2));
  co_await guest::vmlaunch();
  for (bool first = true;; first = false) {
    vmx::ExitReason reason = co_await guest::basic_exit_reason();
    if (reason == vmx::ExitReason::kApicAccess) seen.apic_access_exits++;
    if (reason == vmx::ExitReason::kVmcall && ++seen.vmcalls == vmcalls) break;
    if (first && between) between();
    co_await guest::vmresume();
  }
}

std::unique_ptr<NestedEnv> make_env() {
  NestedEnvConfig ec{StrategyKind::cache, MemoryKind::unmanaged};
  ec.vcpus = 1;
  ec.l1_bytes = 8 << 20;
  ec.stale_fatal = false;
  return test_support::make_nested_env(ec);
}

TEST(LastCheck, InvalidationBetweenVmcs02BuildAndEntryCancelsTheEntryAndRefreshes) {
  auto env = make_env();
  ASSERT_TRUE(env);
  auto apic_hva = env->add_page_slot(1, kApicGpa);
  ASSERT_TRUE(apic_hva);
  cpu::Vcpu& vcpu = env->machine->vcpu(0);

  // At the first entry into L2: discard the APIC-access page from another
  // thread (as the VMM would), and return once the notifier has marked the
  // cache invalid; the notifier then waits for this vCPU to leave guest mode.
  std::thread discarder;
  std::atomic<bool> fired{false};
  uint64_t gen_before = 0;
  Pfn pfn_before = 0;
  vcpu.set_before_last_check_hook([&] {
    if (fired.exchange(true)) return;
    gen_before = vcpu.nested().vmcs02().generation;
    pfn_before = vcpu.nested().vmcs02().apic_access.pfn();
    vm::PfnCache* c = vcpu.nested().pages().cache(vmx::L1Page::apic_access);
    ASSERT_NE(c, nullptr);
    ASSERT_FALSE(c->invalid());
    discarder = std::thread([&] { EXPECT_TRUE(env->mm->discard(*apic_hva, kPageSize)); });
    while (!c->invalid()) std::this_thread::yield();
  });

  vmx::Vmcs12 v = vmx::minimal_vmcs12();
  v.primary_proc_controls |= vmx::proc::kActivateSecondaryControls;
  v.secondary_proc_controls |= vmx::proc2::kEnableEpt | vmx::proc2::kVirtualizeApicAccesses;
  v.apic_access_addr = kApicGpa;
  Seen seen;
  env->machine->set_l1_program(0, l1_program(*env->machine, v, l2_apic_then_vmcall(), 1, seen, nullptr));
  Status st = env->machine->run(std::chrono::seconds(20));
  if (discarder.joinable()) discarder.join();
  ASSERT_TRUE(st) << st.error().to_string();

  CounterSnapshot k = env->counters();
  EXPECT_TRUE(fired.load());
  EXPECT_EQ(k[Counter::entry_cancels], 1u) << "the last check cancels exactly the entry the discard raced";
  EXPECT_GE(k[Counter::cache_refreshes], 2u) << "activation, then the refresh the request ran";
  const vmx::Vmcs02& vmcs02 = vcpu.nested().vmcs02();
  EXPECT_GT(vmcs02.generation, gen_before) << "vmcs02 pfns rewritten";
  EXPECT_NE(vmcs02.apic_access.pfn(), pfn_before) << "the discarded frame is no longer in vmcs02";
  EXPECT_EQ(seen.apic_access_exits, 1) << "L2's write hit the refreshed page and exited";
  EXPECT_EQ(k[Counter::stale_accesses], 0u);
}

TEST(LastCheck, VcpuBoundCacheWhoseActivationFailsIsDeactivatedSoEntriesGoOn) {
  auto env = make_env();
  ASSERT_TRUE(env);
  auto vapic_hva = env->add_page_slot(2, kVapicGpa);
  ASSERT_TRUE(vapic_hva);
  cpu::Vcpu& vcpu = env->machine->vcpu(0);

  // TPR shadow with CR8-load and CR8-store exiting, no APIC-access
  // virtualization: KVM's fallback for an unusable virtual-APIC page is to
  // clear the TPR shadow and enter.
  vmx::Vmcs12 v = vmx::minimal_vmcs12();
  v.primary_proc_controls |= vmx::proc::kActivateSecondaryControls | vmx::proc::kUseTprShadow |
                             vmx::proc::kCr8LoadExiting | vmx::proc::kCr8StoreExiting;
  v.secondary_proc_controls |= vmx::proc2::kEnableEpt;
  v.virtual_apic_page_addr = kVapicGpa;
  Seen seen;
  // After the first exit the VMM deletes the page's memslot: the cache is
  // active, and its re-activation at the next entry fails.
  auto remove_slot = [&] { EXPECT_TRUE(env->vm->set_memory_region({2, 0, kVapicGpa, 0, *vapic_hva})); };
  env->machine->set_l1_program(0, l1_program(*env->machine, v, l2_vmcalls(), 3, seen, remove_slot));
  Status st = env->machine->run(std::chrono::seconds(20));
  ASSERT_TRUE(st) << st.error().to_string() << " (entries cancelled forever?)";

  EXPECT_EQ(seen.vmcalls, 3);
  CounterSnapshot k = env->counters();
  EXPECT_EQ(k[Counter::entry_cancels], 0u);
  vm::PfnCache* c = vcpu.nested().pages().cache(vmx::L1Page::vapic);
  ASSERT_NE(c, nullptr);
  EXPECT_FALSE(c->active()) << "patch 4: deactivated, so invalid() cannot cancel entries";
  EXPECT_FALSE(c->invalid());
  EXPECT_FALSE(vcpu.nested().vmcs02().proc & vmx::proc::kUseTprShadow) << "KVM's fallback: TPR shadow cleared";
  EXPECT_EQ(k[Counter::stale_accesses], 0u);
}

// L0 software reaching a hardware-used page (the posted-interrupt completion)
// refreshes an invalidated cache: valid again, possibly at a new pfn, while
// vmcs02 still holds the old one. The last check looks only for invalid
// caches, so the refresh itself must ask for vmcs02 to be rewritten. Driven
// through NestedVmx directly, with the vCPU thread not running, so each step
// happens in exactly this order.
TEST(LastCheck, SoftwareRefreshOfAHardwareUsedPageRewritesVmcs02BeforeTheNextEntry) {
  auto env = make_env();
  ASSERT_TRUE(env);
  auto vapic_hva = env->add_page_slot(2, kVapicGpa);
  ASSERT_TRUE(vapic_hva);
  cpu::Vcpu& vcpu = env->machine->vcpu(0);
  vmx::NestedVmx& n = vcpu.nested();

  constexpr Gpa kVmxon = 0x10000, kVmcs = 0x11000;
  uint32_t rev = vmx::kVmcs12Revision;
  ASSERT_TRUE(env->vm->write_guest(kVmxon, &rev, sizeof rev));
  vmx::Vmcs12 v = vmx::minimal_vmcs12();
  v.primary_proc_controls |= vmx::proc::kUseTprShadow;
  v.virtual_apic_page_addr = kVapicGpa;
  std::array<std::byte, kPageSize> image;
  v.serialize(image);
  ASSERT_TRUE(env->vm->write_guest(kVmcs, image.data(), image.size()));
  ASSERT_TRUE(n.vmxon(kVmxon).ok());
  ASSERT_TRUE(n.vmptrld(kVmcs).ok());
  vmx::EntryResult e = n.enter(true);
  ASSERT_EQ(e.kind, vmx::EntryResult::Kind::entered) << to_string(e.result);
  host::FrameTag before = n.vmcs02().vapic.tag;
  while (vcpu.check_request(vm::Request::kRefreshGuestPages)) {
  }

  // The host migrates the page (the vCPU is outside guest mode: no wait),
  // then L0 software reaches it before the next entry.
  ASSERT_TRUE(env->mm->migrate(*vapic_hva));
  EXPECT_TRUE(n.last_check_fails()) << "invalidated";
  ASSERT_TRUE(n.access_page(vmx::L1Page::vapic, kVapicGpa, [](const vmx::PageView&) {}));
  EXPECT_FALSE(n.last_check_fails()) << "the refresh made the cache valid again";
  EXPECT_NE(env->phys->tag(before.pfn), before) << "vmcs02's pfn is the migrated-away frame";
  EXPECT_TRUE(vcpu.check_request(vm::Request::kRefreshGuestPages))
      << "without this request the entry would use the old pfn";
  ASSERT_TRUE(n.refresh_guest_pages());
  host::FrameTag after = n.vmcs02().vapic.tag;
  EXPECT_EQ(env->phys->tag(after.pfn), after) << "vmcs02 rewritten to the live frame";
  EXPECT_NE(after, before);
}

}  // namespace
}  // namespace nestcache::workloads
