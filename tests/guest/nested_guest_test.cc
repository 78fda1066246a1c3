// The simulated CPU running a real nested guest: L1 guest code enters VMX
// operation, builds a vmcs12 and EPT12, and runs an L2 program; under every
// page strategy and memory kind.
#include <gtest/gtest.h>

#include "base/check.h"
#include "cpu/machine.h"
#include "guest/l1.h"
#include "vmx/entry_checks.h"

namespace nestcache::cpu {
namespace {

namespace ops = cpu::ops;
using guest::Ept12;
using guest::L1Pages;
using vmx::StrategyKind;

constexpr size_t kL1Bytes = 16 << 20;
constexpr Gpa kL2DataGpa = 0x200000;  // where L2 sees its data page

struct Param {
  StrategyKind strategy;
  host::FrameKind memory;
};

std::string name(const ::testing::TestParamInfo<Param>& p) {
  return std::string(vmx::strategy_name(p.param.strategy)) + "_" + host::frame_kind_name(p.param.memory);
}

class MachineTest : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    size_t frames = kL1Bytes / kPageSize + 64;
    phys = std::move(*host::PhysMem::create({frames, frames}));
    phys->set_stale_access_fatal(true);
    mm = std::make_unique<host::HostMm>(*phys);
    vm = std::make_unique<vm::Vm>(*mm, 1);
    Hva base = *mm->create_region(kL1Bytes, GetParam().memory);
    NC_CHECK(vm->set_memory_region({0, 0, 0, kL1Bytes, base}));
    machine = std::make_unique<Machine>(*vm, MachineConfig{1, GetParam().strategy, 0});
  }
  std::unique_ptr<host::PhysMem> phys;
  std::unique_ptr<host::HostMm> mm;
  std::unique_ptr<vm::Vm> vm;
  std::unique_ptr<Machine> machine;
};

TEST_P(MachineTest, L1RunsAnL2ThatWritesMemoryAndExitsWithVmcall) {
  uint64_t seen_by_l1 = 0;
  int vmcalls = 0;
  auto l1 = [&](Machine& m) -> GuestTask {
    L1Pages pages(0x100000, kL1Bytes);
    co_await guest::enter_vmx(pages);
    Gpa vmcs = pages.alloc();
    co_await guest::init_region(vmcs);
    co_await guest::vmx_ok(GuestOp{GuestOp::Vmclear{vmcs}}, "VMCLEAR");
    co_await guest::vmx_ok(GuestOp{GuestOp::Vmptrld{vmcs}}, "VMPTRLD");
    Ept12 ept(pages);
    Gpa data = pages.alloc();
    co_await ept.map(kL2DataGpa, data);
    vmx::Vmcs12 v = vmx::minimal_vmcs12();
    v.primary_proc_controls |= vmx::proc::kActivateSecondaryControls;
    v.secondary_proc_controls |= vmx::proc2::kEnableEpt;
    v.ept_pointer = ept.eptp();
    co_await guest::write_vmcs(v);
    m.bind_l2_program(vmcs, [](uint64_t* unused) -> GuestTask {
      co_await ops::write64(kL2DataGpa + 8, 0xfeed);
      for (int i = 0; i < 3; i++) co_await ops::vmcall(i);
      for (;;) co_await ops::vmcall(99);
    }(nullptr));
    OpResult r = co_await ops::vmlaunch();
    EXPECT_TRUE(r.ok()) << to_string(r);
    for (int i = 0; i < 3; i++) {
      EXPECT_EQ(co_await guest::exit_reason(), static_cast<uint64_t>(vmx::ExitReason::kVmcall));
      vmcalls++;
      r = co_await ops::vmresume();
      EXPECT_TRUE(r.ok()) << to_string(r);
    }
    seen_by_l1 = co_await ops::read64(data + 8);
  };
  machine->set_l1_program(0, l1(*machine));
  auto st = machine->run(std::chrono::seconds(20));
  ASSERT_TRUE(st) << st.error().to_string();
  EXPECT_EQ(seen_by_l1, 0xfeedu);
  EXPECT_EQ(vmcalls, 3);
  CounterSnapshot c = machine->counters();
  EXPECT_EQ(c[Counter::nested_entries], 4u);
  EXPECT_EQ(c[Counter::reflected_exits], 4u);
  EXPECT_EQ(c[Counter::nested_round_trips], 3u);
  EXPECT_EQ(c[Counter::stale_accesses], 0u);
}

TEST_P(MachineTest, AnInterruptForL1ExitsL2WhenL1AsksForExternalInterruptExiting) {
  auto machine2 = std::make_unique<Machine>(*vm, MachineConfig{2, GetParam().strategy, 0});
  machine.reset();
  constexpr Gpa kFlag = 0x80000;  // L1 word: L2 is running
  uint64_t info = 0, reason = 0;
  auto l1 = [&](Machine& m) -> GuestTask {
    L1Pages pages(0x100000, kL1Bytes);
    co_await guest::enter_vmx(pages);
    Gpa vmcs = pages.alloc();
    co_await guest::init_region(vmcs);
    co_await guest::vmx_ok(GuestOp{GuestOp::Vmptrld{vmcs}}, "VMPTRLD");
    Ept12 ept(pages);
    co_await ept.map(kL2DataGpa, pages.alloc());
    vmx::Vmcs12 v = vmx::minimal_vmcs12();
    v.pin_based_controls |= vmx::pin::kExternalInterruptExiting;
    v.exit_controls |= vmx::exit_ctl::kAckInterruptOnExit;
    v.primary_proc_controls |= vmx::proc::kActivateSecondaryControls;
    v.secondary_proc_controls |= vmx::proc2::kEnableEpt;
    v.ept_pointer = ept.eptp();
    co_await guest::write_vmcs(v);
    m.bind_l2_program(vmcs, []() -> GuestTask {
      co_await ops::write64(0x80000 - 0x80000 + kL2DataGpa, 1);
      for (;;) co_await ops::pause();  // spins without exiting until interrupted
    }());
    co_await ops::write64(kFlag, 1);
    OpResult r = co_await ops::vmlaunch();
    EXPECT_TRUE(r.ok());
    reason = co_await guest::exit_reason();
    info = co_await guest::vmread(vmx::field::kExitInterruptionInfo);
  };
  auto sender = []() -> GuestTask {
    while (co_await ops::read64(kFlag) == 0) co_await ops::pause();
    co_await ops::send_ipi(0, 0x31);
  };
  machine2->set_l1_program(0, l1(*machine2));
  machine2->set_l1_program(1, sender());
  auto st = machine2->run(std::chrono::seconds(20));
  ASSERT_TRUE(st) << st.error().to_string();
  EXPECT_EQ(reason, static_cast<uint64_t>(vmx::ExitReason::kExternalInterrupt));
  EXPECT_EQ(info, 0x31u | vmx::intr_info::kValid);
  EXPECT_EQ(machine2->counters()[Counter::reflected_exits], 1u);
}

INSTANTIATE_TEST_SUITE_P(All, MachineTest,
                         ::testing::Values(Param{StrategyKind::map, host::FrameKind::managed},
                                           Param{StrategyKind::map, host::FrameKind::unmanaged},
                                           Param{StrategyKind::cache, host::FrameKind::managed},
                                           Param{StrategyKind::cache, host::FrameKind::unmanaged},
                                           Param{StrategyKind::oracle, host::FrameKind::unmanaged}),
                         name);

}  // namespace
}  // namespace nestcache::cpu
