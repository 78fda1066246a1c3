// Nested entry through an enlightened VMCS (seed patches 6-7, 9), driven by
// an enlightened L1 program on a Machine: the once-per-entry snapshot, #UD
// and VMfail, VMREAD/VMWRITE/VMPTRLD/VMCLEAR with an eVMCS in use, map's
// kept HostMap going stale, and nothing left after VMXOFF and teardown.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <thread>

#include "support/nested_env.h"
#include "support/params.h"
#include "support/selftests.h"
#include "guest/enlightened.h"
#include "guest/ept12.h"
#include "guest/vmx.h"
#include "vmx/entry_checks.h"
#include "vmx/vmx_nested_contexts.h"
#include "workloads/nested_env.h"
#include "workloads/registry.h"

namespace nestcache::workloads {
namespace {

namespace ops = cpu::ops;
using cpu::GuestOp;
using cpu::GuestTask;
using cpu::OpResult;

constexpr Gpa kEvmcs = 0xc0000000;  // memslot 1
constexpr Gpa kVpAssist = 0x90000;
constexpr Gpa kMsrBitmap = 0x91000;
constexpr uint32_t kMsr = 0x10;  // IA32_TIME_STAMP_COUNTER: a low MSR L1 may intercept

std::unique_ptr<NestedEnv> make_env(StrategyKind s, MemoryKind m = MemoryKind::unmanaged, bool evmcs_slot = true) {
  NestedEnvConfig ec{s, m};
  ec.vcpus = 1;
  ec.l1_bytes = 8 << 20;
  auto env = test_support::make_nested_env(ec);
  if (!env) return nullptr;
  if (evmcs_slot) {
    EXPECT_TRUE(env->add_page_slot(1, kEvmcs));
  }
  env->machine->vcpu(0).nested().enable_evmcs();
  return env;
}

GuestTask l2_vmcall_rdmsr_vmcall() {
  co_await ops::vmcall(0);
  co_await ops::rdmsr(kMsr);
  for (;;) co_await ops::vmcall(0);
}

GuestTask l2_vmcalls() {
  for (;;) co_await ops::vmcall(0);
}

// Enlightened set-up: VMXON, VP-assist page, eVMCS at `evmcs` current, every
// field of a minimal vmcs12 with MSR bitmaps written into it.
GuestTask enlightened_setup(Gpa evmcs, uint32_t revision = vmx::kEvmcsRevision) {
  guest::L1Pages pages(kL1PagesStart, kL1PagesStart + 0x20000);
  co_await guest::enter_vmx(pages);
  co_await guest::enable_vp_assist(kVpAssist);
  co_await ops::write32(evmcs, revision);
  co_await guest::load_evmcs(kVpAssist, evmcs);
  vmx::Vmcs12 v = vmx::minimal_vmcs12();
  v.primary_proc_controls |= vmx::proc::kUseMsrBitmaps;
  v.msr_bitmap = kMsrBitmap;
  co_await guest::write_evmcs(evmcs, v, vmx::evmcs_enlightenment::kMsrBitmap);
}

// Runs the machine and returns its status.
Status run(NestedEnv& env) { return env.machine->run(std::chrono::seconds(30)); }

TEST(EvmcsEntry, EntryUsesOneSnapshotEvenIfThePageChangesMidEntry) {
  auto env = make_env(StrategyKind::cache);
  ASSERT_TRUE(env);
  cpu::Vcpu& vcpu = env->machine->vcpu(0);
  env->machine->bind_l2_program(kEvmcs, l2_vmcall_rdmsr_vmcall());

  // Second entry: right after L0's snapshot another thread rewrites the page
  // as a racing L1 would: every group clean (so the MSR-bitmap merge would
  // be skipped), the flush-hypercall enlightenment on, a new guest RIP and a
  // pin control eVMCS cannot express (the entry checks would fail on it).
  bool armed = false;
  std::atomic<int> fired{0};
  vmx::EvmcsSnapshot snap;
  vcpu.nested().set_evmcs_snapshot_hook([&] {
    if (!armed || fired.fetch_add(1) != 0) return;
    snap = vcpu.nested().evmcs_snapshot();
    std::thread writer([&] {
      std::array<std::byte, kPageSize> buf{};
      ASSERT_TRUE(env->vm->read_guest(kEvmcs, buf.data(), buf.size()));
      vmx::EvmcsPage page = vmx::EvmcsPage::load(buf);
      page.clean_fields = vmx::evmcs_clean::kAll;
      page.enlightenments_control |= vmx::evmcs_enlightenment::kNestedFlushHypercall;
      page.guest_rip = 0xdead;
      page.pin_based_controls |= vmx::pin::kPostedInterrupts;
      page.store(buf);
      ASSERT_TRUE(env->vm->write_guest(kEvmcs, buf.data(), buf.size()));
    });
    writer.join();
  });
  // What the rest of that entry built, seen just before the hardware entry.
  bool captured = false;
  uint64_t rip = 0, pin_controls = 0;
  bool use_bitmap = false, intercepted = false;
  vcpu.set_before_last_check_hook([&] {
    if (fired.load() == 0 || captured) return;
    captured = true;
    rip = vcpu.nested().vmcs12().guest_rip;
    pin_controls = vcpu.nested().vmcs12().pin_based_controls;
    use_bitmap = vcpu.nested().vmcs02().use_msr_bitmap;
    intercepted = (vcpu.nested().vmcs02().msr_bitmap[kMsr / 8] >> (kMsr % 8)) & 1;
  });

  uint64_t second_exit = 0;
  auto l1 = [&]() -> GuestTask {
    co_await enlightened_setup(kEvmcs);
    co_await guest::vmlaunch();
    // L1 now intercepts RDMSR of kMsr and says so: MSR_BITMAP group dirty.
    co_await ops::write8(kMsrBitmap + kMsr / 8, 1u << (kMsr % 8));
    co_await guest::evmcs_write(kEvmcs, vmx::field::kMsrBitmap, kMsrBitmap);
    co_await guest::evmcs_write(kEvmcs, vmx::field::kGuestRip, 0x1234);
    armed = true;
    co_await guest::vmresume();
    second_exit = co_await guest::evmcs_read(kEvmcs, vmx::field::kExitReason);
    co_await guest::vmxoff();
  };
  env->machine->set_l1_program(0, l1());
  Status st = run(*env);
  ASSERT_TRUE(st) << st.error().to_string();

  ASSERT_EQ(fired.load(), 1);
  EXPECT_EQ(snap.clean_fields, vmx::evmcs_clean::kAll & ~vmx::evmcs_clean::kMsrBitmap);
  EXPECT_TRUE(snap.msr_bitmap);
  EXPECT_FALSE(snap.flush_hypercall);
  ASSERT_TRUE(captured);
  EXPECT_EQ(rip, 0x1234u) << "vmcs12 holds the RIP of the snapshot's copy";
  EXPECT_EQ(pin_controls & vmx::pin::kPostedInterrupts, 0u) << "the entry checks saw the copy, not the page";
  EXPECT_TRUE(use_bitmap);
  EXPECT_TRUE(intercepted) << "the MSR_BITMAP group was dirty in the snapshot: L0 merged L1's new bitmap";
  EXPECT_EQ(vmx::basic_exit_reason(static_cast<uint32_t>(second_exit)), vmx::ExitReason::kMsrRead)
      << "L2's RDMSR reached L1 through the merged bitmap";
  EXPECT_EQ(env->counters()[Counter::stale_accesses], 0u);
}

class EvmcsEntryStrategies : public ::testing::TestWithParam<StrategyKind> {};

TEST_P(EvmcsEntryStrategies, EvmcsWithNoMemslotIsUndefinedOpcode) {
  auto env = make_env(GetParam(), MemoryKind::unmanaged, /*evmcs_slot=*/false);
  ASSERT_TRUE(env);
  env->machine->bind_l2_program(kEvmcs, l2_vmcalls());
  OpResult launch;
  auto l1 = [&]() -> GuestTask {
    co_await enlightened_setup(kEvmcs);  // writes reach no memslot: MMIO, dropped
    launch = co_await ops::vmlaunch();
  };
  env->machine->set_l1_program(0, l1());
  Status st = run(*env);
  ASSERT_TRUE(st) << st.error().to_string();
  EXPECT_EQ(launch.outcome, cpu::Outcome::fault) << cpu::to_string(launch);
  EXPECT_EQ(launch.vector, cpu::kVectorUD);
  EXPECT_EQ(env->machine->vcpu(0).nested().evmcs_gpa(), kInvalidGpa) << "released after the failed lock";
  EXPECT_GE(env->counters()[Counter::evmcs_map_failures], 1u);
  EXPECT_EQ(env->counters()[Counter::nested_entries], 0u);
}

TEST_P(EvmcsEntryStrategies, BadRevisionIsVmfailInvalidAndAFixedPageEnters) {
  auto env = make_env(GetParam());
  ASSERT_TRUE(env);
  env->machine->bind_l2_program(kEvmcs, l2_vmcalls());
  OpResult bad, good;
  auto l1 = [&]() -> GuestTask {
    co_await enlightened_setup(kEvmcs, /*revision=*/7);
    bad = co_await ops::vmlaunch();
    co_await guest::init_evmcs(kEvmcs);
    good = co_await ops::vmlaunch();
    co_await guest::vmxoff();
  };
  env->machine->set_l1_program(0, l1());
  Status st = run(*env);
  ASSERT_TRUE(st) << st.error().to_string();
  EXPECT_EQ(bad.outcome, cpu::Outcome::fail_invalid) << cpu::to_string(bad);
  EXPECT_TRUE(good.ok()) << cpu::to_string(good);
  EXPECT_EQ(env->counters()[Counter::nested_entries], 1u);
}

TEST_P(EvmcsEntryStrategies, VmxInstructionsWhileAnEvmcsIsInUse) {
  auto env = make_env(GetParam());
  ASSERT_TRUE(env);
  cpu::Vcpu& vcpu = env->machine->vcpu(0);
  env->machine->bind_l2_program(kEvmcs, l2_vmcalls());
  OpResult read_reason, read_uncarried, write, ptrld, ptrst, clear, resume;
  Gpa in_use_before_clear = 0, in_use_after_clear = 0;
  uint32_t clean_after_clear = 0;
  auto l1 = [&]() -> GuestTask {
    co_await enlightened_setup(kEvmcs);
    co_await guest::vmlaunch();
    read_reason = co_await ops::vmread(vmx::field::kExitReason);
    read_uncarried = co_await ops::vmread(vmx::field::kPostedIntrDescAddr);
    write = co_await ops::vmwrite(vmx::field::kGuestRip, 0x42);
    Gpa vmcs = 0x92000;
    co_await guest::init_region(vmcs);
    ptrld = co_await ops::vmptrld(vmcs);
    ptrst = co_await ops::vmptrst();
    in_use_before_clear = vcpu.nested().evmcs_gpa();
    clear = co_await ops::vmclear(kEvmcs);
    in_use_after_clear = vcpu.nested().evmcs_gpa();
    clean_after_clear = co_await ops::read32(kEvmcs + vmx::kEvmcsCleanFieldsOffset);
    resume = co_await ops::vmresume();  // the VP-assist page still names it
    co_await guest::vmxoff();
  };
  env->machine->set_l1_program(0, l1());
  Status st = run(*env);
  ASSERT_TRUE(st) << st.error().to_string();
  ASSERT_TRUE(read_reason.ok()) << cpu::to_string(read_reason);
  EXPECT_EQ(read_reason.value, static_cast<uint64_t>(vmx::ExitReason::kVmcall)) << "VMREAD reads the eVMCS";
  EXPECT_EQ(read_uncarried.outcome, cpu::Outcome::fail_valid);
  EXPECT_EQ(read_uncarried.vm_instruction_error,
            static_cast<uint32_t>(vmx::VmInstructionError::kUnsupportedVmcsComponent));
  EXPECT_EQ(write.outcome, cpu::Outcome::fail_invalid) << "no VMWRITE with an eVMCS";
  EXPECT_EQ(ptrld.outcome, cpu::Outcome::fail_invalid) << "no VMPTRLD with an eVMCS in use";
  EXPECT_EQ(ptrst.value, ~uint64_t{0}) << "no current VMCS pointer";
  EXPECT_EQ(in_use_before_clear, kEvmcs);
  EXPECT_TRUE(clear.ok());
  EXPECT_EQ(in_use_after_clear, kInvalidGpa) << "VMCLEAR of the eVMCS releases it";
  EXPECT_TRUE(resume.ok()) << cpu::to_string(resume);
  // A vmcs12's launch state would sit where the eVMCS keeps its clean fields.
  EXPECT_EQ(clean_after_clear, vmx::evmcs_clean::kAll) << "VMCLEAR wrote no launch state into the eVMCS";
}

TEST_P(EvmcsEntryStrategies, MemslotMoveUnderACurrentEvmcs) {
  // map keeps the HostMap while the eVMCS is current and goes stale; the
  // caches see the new memslot generation, find no slot and #UD.
  auto env = make_env(GetParam());
  ASSERT_TRUE(env);
  env->machine->bind_l2_program(kEvmcs, l2_vmcalls());
  OpResult resume;
  auto l1 = [&]() -> GuestTask {
    co_await enlightened_setup(kEvmcs);
    co_await guest::vmlaunch();
    // The VMM moves the eVMCS memslot (the hva stays, the gpa changes).
    Hva hva = *env->vm->gfn_to_hva(gpa_to_gfn(kEvmcs));
    EXPECT_TRUE(env->vm->set_memory_region({1, 0, kEvmcs + 0x10000, kPageSize, hva}));
    resume = co_await ops::vmresume();
    co_await guest::vmxoff();
  };
  env->machine->set_l1_program(0, l1());
  Status st = run(*env);
  ASSERT_TRUE(st) << st.error().to_string();
  uint64_t stale = env->counters()[Counter::stale_accesses];
  stale = std::max(stale, env->phys->counters().get(Counter::stale_accesses));
  if (GetParam() == StrategyKind::map) {
    EXPECT_TRUE(resume.ok()) << cpu::to_string(resume);
    EXPECT_GT(stale, 0u) << "the detector sees the kept map's gfn resolve nowhere";
  } else {
    EXPECT_EQ(resume.outcome, cpu::Outcome::fault) << cpu::to_string(resume);
    EXPECT_EQ(resume.vector, cpu::kVectorUD);
    EXPECT_EQ(stale, 0u);
  }
}

TEST_P(EvmcsEntryStrategies, VmxoffAndTeardownFreeEverything) {
  auto env = make_env(GetParam());
  ASSERT_TRUE(env);
  cpu::Vcpu& vcpu = env->machine->vcpu(0);
  env->machine->bind_l2_program(kEvmcs, l2_vmcalls());
  auto l1 = [&]() -> GuestTask {
    co_await enlightened_setup(kEvmcs);
    co_await guest::vmlaunch();
    co_await guest::vmresume();
    co_await guest::vmxoff();
  };
  env->machine->set_l1_program(0, l1());
  Status st = run(*env);
  ASSERT_TRUE(st) << st.error().to_string();
  // After VMXOFF: no eVMCS, nothing mapped by map, every context detached.
  EXPECT_EQ(vcpu.nested().evmcs_gpa(), kInvalidGpa);
  CounterSnapshot k = env->counters();
  EXPECT_EQ(k[Counter::maps], k[Counter::unmaps]);
  if (auto* table = env->machine->nested_contexts()) {
    EXPECT_EQ(table->table().attached_count(), 0u);
    EXPECT_NE(table->table().find(kEvmcs), nullptr) << "the context is keyed by the eVMCS address";
  }
  env->machine.reset();  // VM teardown frees the contexts and their caches
  const CounterSet& pc = env->phys->counters();
  EXPECT_EQ(pc.get(Counter::remap_windows), pc.get(Counter::remap_windows_closed));
  EXPECT_EQ(pc.get(Counter::pins), pc.get(Counter::unpins));
  EXPECT_EQ(env->vm->caches().active_count(), 0u);
}

INSTANTIATE_TEST_SUITE_P(All, EvmcsEntryStrategies, ::testing::ValuesIn(kAllStrategies), test_support::strategy_case_name);

// The `evmcs` selftest through the registry, as the CLI runs it.
class EvmcsSelftest : public ::testing::TestWithParam<test_support::StrategyAndMemory> {};

TEST_P(EvmcsSelftest, MovesAndMigrationsUnderAnEnlightenedL1) {
  SelftestResult r =
      test_support::run_named_selftest("evmcs", GetParam().strategy, GetParam().memory, {{"rounds", "10"}});
  for (auto& f : r.failures) ADD_FAILURE() << f;
  EXPECT_TRUE(r.passed);
  uint64_t stale = r.counters[Counter::stale_accesses];
  if (GetParam().strategy == StrategyKind::map) {
    EXPECT_GT(stale, 0u);
    EXPECT_EQ(r.details["transcript"]["entered_while_away"], 10);
  } else {
    EXPECT_EQ(stale, 0u);
    EXPECT_EQ(r.details["transcript"]["ud_while_away"], 10);
    EXPECT_GT(r.details["migrations"].get<uint64_t>(), 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(All, EvmcsSelftest, ::testing::ValuesIn(test_support::every_strategy_and_memory()),
                         test_support::case_name);

}  // namespace
}  // namespace nestcache::workloads
