// The simulated CPU running a real nested guest: L1 guest code enters VMX
// operation, builds a vmcs12 and EPT12, and runs an L2 program; under every
// page strategy and memory kind.
#include <gtest/gtest.h>

#include "guest/ept12.h"
#include "guest/vmcs12_pages.h"
#include "guest/vmx.h"
#include "guest/wait.h"
#include "support/nested_env.h"
#include "support/params.h"

namespace nestcache::cpu {
namespace {

namespace ops = cpu::ops;
using guest::Ept12;
using guest::L1Pages;
using vmx::StrategyKind;

constexpr size_t kL1Bytes = 16 << 20;
constexpr Gpa kL2DataGpa = 0x200000;  // where L2 sees its data page

class MachineTest : public ::testing::TestWithParam<test_support::StrategyAndMemory> {
 protected:
  void SetUp() override {
    workloads::NestedEnvConfig c{GetParam().strategy, GetParam().memory};
    c.l1_bytes = kL1Bytes;
    c.extra_frames = 64;
    c.stale_fatal = true;
    env = test_support::make_nested_env(c);
    ASSERT_TRUE(env);
    vm = env->vm.get();
    machine = env->machine.get();
  }
  std::unique_ptr<workloads::NestedEnv> env;
  vm::Vm* vm = nullptr;
  Machine* machine = nullptr;
};

TEST_P(MachineTest, L1RunsAnL2ThatWritesMemoryAndExitsWithVmcall) {
  uint64_t seen_by_l1 = 0;
  int vmcalls = 0;
  auto l1 = [&](Machine& m) -> GuestTask {
    L1Pages pages(0x100000, kL1Bytes);
    Gpa vmcs = co_await guest::enter_vmx_with_current_vmcs(pages);
    Ept12 ept(pages);
    Gpa data = pages.alloc();
    co_await ept.map(kL2DataGpa, data);
    co_await guest::write_vmcs(guest::vmcs12_for({.eptp = ept.eptp()}));
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
  env->machine.reset();
  auto machine2 = std::make_unique<Machine>(*vm, MachineConfig{2, GetParam().strategy, 0});
  constexpr Gpa kFlag = 0x80000;  // L1 word: L2 is running
  uint64_t info = 0, reason = 0;
  auto l1 = [&](Machine& m) -> GuestTask {
    L1Pages pages(0x100000, kL1Bytes);
    Gpa vmcs = co_await guest::enter_vmx_with_current_vmcs(pages);
    Ept12 ept(pages);
    co_await ept.map(kL2DataGpa, pages.alloc());
    co_await guest::write_vmcs(guest::vmcs12_for({.eptp = ept.eptp(), .exit_on_interrupts = true}));
    m.bind_l2_program(vmcs, []() -> GuestTask {
      co_await ops::write64(kL2DataGpa, 1);
      // Spins without exiting until interrupted.
      co_await guest::wait_while_eq(kL2DataGpa, 1);
    }());
    co_await ops::write64(kFlag, 1);
    OpResult r = co_await ops::vmlaunch();
    EXPECT_TRUE(r.ok());
    reason = co_await guest::exit_reason();
    info = co_await guest::vmread(vmx::field::kExitInterruptionInfo);
  };
  auto sender = []() -> GuestTask {
    co_await guest::wait_while_eq(kFlag, 0);
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
                         ::testing::ValuesIn(test_support::strategies_and_memory_without_managed_oracle()),
                         test_support::case_name);

}  // namespace
}  // namespace nestcache::cpu
