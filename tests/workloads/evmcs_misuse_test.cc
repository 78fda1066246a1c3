// An enlightened L1 that misuses its eVMCS, driven through a Machine: clean
// bits that claim an unchanged group L1 did change, a revision rewritten on
// an eVMCS in use, and the eVMCS memslot deleted and restored under it. The
// outcomes are KVM's; none may crash, read a stale page or let L0 act on a
// value the entry checks never saw.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "guest/enlightened.h"
#include "guest/vmx.h"
#include "support/nested_env.h"
#include "support/params.h"
#include "vmx/evmcs.h"
#include "workloads/nested_env.h"

namespace nestcache::workloads {
namespace {

namespace ops = cpu::ops;
using cpu::GuestTask;
using cpu::OpResult;

constexpr Gpa kEvmcs = 0xc0000000;  // memslot 1, one page
constexpr Gpa kVpAssist = 0x90000;

GuestTask l2_vmcalls() {
  for (;;) co_await ops::vmcall(0);
}

std::unique_ptr<NestedEnv> make_env(StrategyKind s) {
  NestedEnvConfig ec{s, MemoryKind::unmanaged};
  ec.vcpus = 1;
  ec.l1_bytes = 8 << 20;
  auto env = test_support::make_nested_env(ec);
  if (!env) return nullptr;
  EXPECT_TRUE(env->add_page_slot(1, kEvmcs));
  env->machine->vcpu(0).nested().enable_evmcs();
  env->machine->bind_l2_program(kEvmcs, l2_vmcalls());
  return env;
}

GuestTask setup() {
  guest::L1Pages pages(kL1PagesStart, kL1PagesStart + 0x20000);
  co_await guest::enter_vmx(pages);
  co_await guest::enable_vp_assist(kVpAssist);
  co_await guest::init_evmcs(kEvmcs);
  co_await guest::load_evmcs(kVpAssist, kEvmcs);
  co_await guest::write_evmcs(kEvmcs, vmx::minimal_vmcs12(), 0);
}

// The page offset of a field the eVMCS carries.
Gpa field_at(uint32_t encoding) { return kEvmcs + vmx::find_evmcs_field(encoding)->page_offset; }

Status run(NestedEnv& env) { return env.machine->run(std::chrono::seconds(30)); }

uint64_t stale_accesses(NestedEnv& env) {
  return std::max(env.counters()[Counter::stale_accesses], env.phys->counters().get(Counter::stale_accesses));
}

class EvmcsMisuse : public ::testing::TestWithParam<StrategyKind> {};

// KVM trusts the clean bits (the TLFS makes them L1's promise): a group
// marked clean is not copied, so L0 keeps using its cached vmcs12 for it. A
// control L1 slipped into a clean group is never used unchecked either; once
// L1 marks the group dirty the entry checks see it and fail the entry. The
// exit writes L2's guest state as L0 ran it back into the page, so L1 sees
// its unannounced guest-state change undone.
TEST_P(EvmcsMisuse, CleanBitsThatLieKeepL0OnItsCheckedCopy) {
  auto env = make_env(GetParam());
  ASSERT_TRUE(env);
  cpu::Vcpu& vcpu = env->machine->vcpu(0);
  uint64_t rsp_after_lie = 0, pin_after_lie = 0;
  OpResult lied, vmread_rsp, told;
  auto l1 = [&]() -> GuestTask {
    co_await setup();
    co_await guest::vmlaunch();  // every group clean in the page from here
    // Change fields without clearing their groups' clean bits.
    co_await ops::write64(field_at(vmx::field::kGuestRsp), 0x5000);
    co_await ops::write32(field_at(vmx::field::kPinBasedControls),
                          vmx::minimal_vmcs12().pin_based_controls | vmx::pin::kPostedInterrupts);
    lied = co_await ops::vmresume();
    rsp_after_lie = vcpu.nested().vmcs12().guest_rsp;
    pin_after_lie = vcpu.nested().vmcs12().pin_based_controls;
    vmread_rsp = co_await ops::vmread(vmx::field::kGuestRsp);
    // Now L1 says the control group changed.
    uint32_t clean = co_await ops::read32(kEvmcs + vmx::kEvmcsCleanFieldsOffset);
    co_await ops::write32(kEvmcs + vmx::kEvmcsCleanFieldsOffset, clean & ~vmx::evmcs_clean::kControlGrp1);
    told = co_await ops::vmresume();
    co_await guest::vmxoff();
  };
  env->machine->set_l1_program(0, l1());
  Status st = run(*env);
  ASSERT_TRUE(st) << st.error().to_string();
  EXPECT_TRUE(lied.ok()) << cpu::to_string(lied);
  EXPECT_NE(rsp_after_lie, 0x5000u) << "a clean group is not copied";
  EXPECT_EQ(pin_after_lie & vmx::pin::kPostedInterrupts, 0u) << "L0 never took the unchecked control";
  ASSERT_TRUE(vmread_rsp.ok()) << cpu::to_string(vmread_rsp);
  EXPECT_EQ(vmread_rsp.value, rsp_after_lie) << "the exit wrote L2's state as L0 ran it back into the page";
  EXPECT_EQ(told.outcome, cpu::Outcome::fail_valid) << cpu::to_string(told);
  EXPECT_EQ(told.vm_instruction_error, static_cast<uint32_t>(vmx::VmInstructionError::kEntryInvalidControlFields));
  EXPECT_EQ(stale_accesses(*env), 0u);
}

// KVM checks the revision only when the eVMCS address is new to the vCPU:
// a revision rewritten on the eVMCS in use is not looked at again, but once
// VMCLEAR released it the next entry checks it and fails (VMfailInvalid).
TEST_P(EvmcsMisuse, RevisionIsCheckedWhenTheAddressIsNewOnly) {
  auto env = make_env(GetParam());
  ASSERT_TRUE(env);
  OpResult same, after_clear, fixed;
  auto l1 = [&]() -> GuestTask {
    co_await setup();
    co_await guest::vmlaunch();
    co_await ops::write32(kEvmcs, 7);
    same = co_await ops::vmresume();
    co_await guest::vmclear(kEvmcs);
    after_clear = co_await ops::vmresume();
    co_await ops::write32(kEvmcs, vmx::kEvmcsRevision);
    fixed = co_await ops::vmresume();
    co_await guest::vmxoff();
  };
  env->machine->set_l1_program(0, l1());
  Status st = run(*env);
  ASSERT_TRUE(st) << st.error().to_string();
  EXPECT_TRUE(same.ok()) << cpu::to_string(same);
  EXPECT_EQ(after_clear.outcome, cpu::Outcome::fail_invalid) << cpu::to_string(after_clear);
  EXPECT_EQ(env->machine->vcpu(0).nested().evmcs_gpa(), kInvalidGpa);
  EXPECT_TRUE(fixed.ok()) << cpu::to_string(fixed);
}

// The VMM deletes the eVMCS memslot while the eVMCS is in use, then
// restores it. The caches find no slot: #UD, the eVMCS released, and the
// next VMRESUME after the restore maps it again. map keeps its HostMap (as
// KVM's kvm_vcpu_map does) and enters from the kept page, which the
// stale-access detector reports. Nothing crashes either way.
TEST_P(EvmcsMisuse, MemslotDeletedAndRestoredUnderTheEvmcs) {
  auto env = make_env(GetParam());
  ASSERT_TRUE(env);
  const Hva hva = *env->vm->gfn_to_hva(gpa_to_gfn(kEvmcs));
  OpResult away, back;
  auto l1 = [&]() -> GuestTask {
    co_await setup();
    co_await guest::vmlaunch();
    EXPECT_TRUE(env->vm->set_memory_region({1, 0, kEvmcs, 0, hva}));
    away = co_await ops::vmresume();
    EXPECT_TRUE(env->vm->set_memory_region({1, 0, kEvmcs, kPageSize, hva}));
    back = co_await ops::vmresume();
    co_await guest::vmxoff();
  };
  env->machine->set_l1_program(0, l1());
  Status st = run(*env);
  ASSERT_TRUE(st) << st.error().to_string();
  EXPECT_TRUE(back.ok()) << cpu::to_string(back);
  if (GetParam() == StrategyKind::map) {
    EXPECT_TRUE(away.ok()) << cpu::to_string(away);
    EXPECT_GT(stale_accesses(*env), 0u) << "the kept map's gfn resolves nowhere";
  } else {
    EXPECT_EQ(away.outcome, cpu::Outcome::fault) << cpu::to_string(away);
    EXPECT_EQ(away.vector, cpu::kVectorUD);
    EXPECT_GE(env->counters()[Counter::evmcs_map_failures], 1u);
    EXPECT_EQ(stale_accesses(*env), 0u);
  }
}

// The VMM discards the eVMCS page (MADV_DONTNEED) while it is in use: the
// next fault gives a zero page. The caches refresh onto it; the address did
// not change, so its revision is not looked at (as KVM), and a zero page
// has every clean bit clear: every group is copied, and the zero controls
// fail the entry checks (VMfailValid 7) -- never an entry from the freed
// frame. map's kept HostMap still shows the freed frame, which the
// stale-access detector reports.
TEST_P(EvmcsMisuse, DiscardedEvmcsPageIsReadAgainAsAZeroPage) {
  auto env = make_env(GetParam());
  ASSERT_TRUE(env);
  const Hva hva = *env->vm->gfn_to_hva(gpa_to_gfn(kEvmcs));
  OpResult after;
  auto l1 = [&]() -> GuestTask {
    co_await setup();
    co_await guest::vmlaunch();
    // The discard waits for this vCPU to take the invalidation, so L1 keeps
    // running guest operations until it is done.
    std::atomic<bool> done{false};
    std::thread discarder([&] {
      EXPECT_TRUE(env->mm->discard(hva, kPageSize));
      done = true;
    });
    while (!done.load()) co_await ops::read32(kVpAssist);
    discarder.join();
    after = co_await ops::vmresume();
    co_await guest::vmxoff();
  };
  env->machine->set_l1_program(0, l1());
  Status st = run(*env);
  ASSERT_TRUE(st) << st.error().to_string();
  if (GetParam() == StrategyKind::map) {
    EXPECT_GT(stale_accesses(*env), 0u) << "the kept map shows the discarded frame";
  } else {
    EXPECT_EQ(after.outcome, cpu::Outcome::fail_valid) << cpu::to_string(after);
    EXPECT_EQ(after.vm_instruction_error, static_cast<uint32_t>(vmx::VmInstructionError::kEntryInvalidControlFields));
    EXPECT_EQ(stale_accesses(*env), 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(All, EvmcsMisuse, ::testing::ValuesIn(kAllStrategies), test_support::strategy_case_name);

}  // namespace
}  // namespace nestcache::workloads
