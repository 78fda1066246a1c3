// Modelled time on a running machine: fixed costs for guest operations and
// transitions, waits that park the thread and hand the waker's clock over
// (MWAIT, IPIs), TPAUSE and the APIC timer in modelled time.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>

#include "base/check.h"
#include "cpu/machine.h"

namespace nestcache::cpu {
namespace {

namespace ops = cpu::ops;

constexpr size_t kL1Bytes = 4 << 20;
constexpr Gpa kWord = 0x3000;      // a word two vCPUs share
constexpr Gpa kOther = 0x3008;     // another word of the same line
constexpr uint64_t kExitCost = 1000;
constexpr GuestCosts kCosts{.op_ns = 3, .locked_op_ns = 11, .pause_ns = 57};
constexpr uint8_t kVector = 0x40;

class TimeModel : public ::testing::Test {
 protected:
  void make(int vcpus, ClockKind clock = ClockKind::modelled) {
    size_t frames = kL1Bytes / kPageSize + 64;
    phys = std::move(*host::PhysMem::create({frames, frames}));
    phys->set_stale_access_fatal(true);
    mm = std::make_unique<host::HostMm>(*phys);
    vm = std::make_unique<vm::Vm>(*mm, vcpus);
    Hva base = *mm->create_region(kL1Bytes, host::FrameKind::managed);
    NC_CHECK(vm->set_memory_region({0, 0, 0, kL1Bytes, base}));
    machine = std::make_unique<Machine>(*vm, MachineConfig{.vcpus = vcpus,
                                                           .strategy = vmx::StrategyKind::cache,
                                                           .exit_cost_ns = kExitCost,
                                                           .costs = kCosts,
                                                           .clock = clock});
  }
  void run() {
    ASSERT_TRUE(machine->watch(kWord & kPageMask, kPageSize));
    Status st = machine->run(std::chrono::seconds(60));
    ASSERT_TRUE(st) << st.error().to_string();
  }
  const TimeStamp& clock(int i) { return machine->vcpu(i).clock().stamp(); }

  std::unique_ptr<host::PhysMem> phys;
  std::unique_ptr<host::HostMm> mm;
  std::unique_ptr<vm::Vm> vm;
  std::unique_ptr<Machine> machine;
};

TEST_F(TimeModel, OperationsAndTransitionsCostTheirFixedCosts) {
  make(1);
  auto l1 = [](uint64_t* seen) -> GuestTask {
    for (int i = 0; i < 10; i++) co_await ops::write64(kWord, i);
    for (int i = 0; i < 3; i++) co_await ops::cmpxchg64(kWord, 9, 9);
    co_await ops::pause();
    co_await ops::pause();
    for (int i = 0; i < 4; i++) co_await ops::vmcall(0);  // each exits to L0
    *seen = co_await ops::now();
  };
  uint64_t seen = 0;
  machine->set_l1_program(0, l1(&seen));
  run();
  const TimeStamp& t = clock(0);
  EXPECT_EQ(t[TimePart::guest_ops], 10 * kCosts.op_ns + 3 * kCosts.locked_op_ns + 2 * kCosts.pause_ns + kCosts.op_ns)
      << "Now is an operation too; an operation that exits is the transition's";
  uint64_t exits = machine->counters()[Counter::l1_exits];
  EXPECT_EQ(exits, 4u) << "four VMCALLs (watch() filled EPT01 for the word)";
  EXPECT_EQ(t[TimePart::transitions], exits * kExitCost);
  EXPECT_EQ(t[TimePart::idle], 0u);
  EXPECT_GE(seen, t[TimePart::transitions]) << "Now reads the modelled clock";
  EXPECT_LE(seen, t.total());
}

TEST_F(TimeModel, MwaitParksUntilTheWordChangesAndTakesTheWritersClock) {
  make(2);
  std::atomic<int> waits{0};
  uint64_t written_at = 0;
  auto waiter = [&]() -> GuestTask {
    for (;;) {
      if (co_await ops::read64(kWord) == 7) break;
      waits++;
      co_await ops::mwait(kWord, 0);
    }
  };
  auto writer = [&]() -> GuestTask {
    co_await ops::write64(kOther, 1);  // the same line: wakes the waiter, which waits again
    co_await ops::tpause(co_await ops::now() + 3'000'000);  // 3 ms of modelled time
    written_at = co_await ops::now();
    co_await ops::write64(kWord, 7);
  };
  machine->set_l1_program(0, waiter());
  machine->set_l1_program(1, writer());
  run();
  EXPECT_GE(clock(0).total(), written_at) << "the waiter continues at the writer's time";
  EXPECT_GE(clock(0)[TimePart::idle], 2'990'000u) << "and its time is the writer's path";
  EXPECT_LE(waits.load(), 3) << "the thread parked instead of spinning";
}

TEST_F(TimeModel, MwaitOnAWordThatAlreadyChangedReturnsAtOnce) {
  make(1);
  auto l1 = []() -> GuestTask {
    co_await ops::write64(kWord, 5);
    co_await ops::mwait(kWord, 4);  // expects 4, finds 5: no sleep
    co_await ops::mwait(kInvalidGpa, 0, 1'000'000);  // nothing monitored: a 1 ms sleep
  };
  machine->set_l1_program(0, l1());
  run();
}

TEST_F(TimeModel, TpauseIsModelledTimeNotAWait) {
  make(1);
  auto l1 = []() -> GuestTask { co_await ops::tpause(co_await ops::now() + 20'000'000'000); };
  machine->set_l1_program(0, l1());
  auto t0 = std::chrono::steady_clock::now();
  run();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10)) << "twenty modelled seconds";
  EXPECT_GE(clock(0)[TimePart::idle], 19'000'000'000u);
}

TEST_F(TimeModel, AnIpiCarriesTheSendersClock) {
  make(2);
  uint64_t sent_at = 0, vector = 0;
  auto receiver = [&]() -> GuestTask { vector = (co_await ops::exec(GuestOp{GuestOp::Hlt{}})).value; };
  auto sender = [&]() -> GuestTask {
    co_await ops::tpause(co_await ops::now() + 5'000'000);
    sent_at = co_await ops::now();
    co_await ops::send_ipi(0, kVector);
  };
  machine->set_l1_program(0, receiver());
  machine->set_l1_program(1, sender());
  run();
  EXPECT_EQ(vector, kVector);
  EXPECT_GE(clock(0).total(), sent_at) << "a woken vCPU starts at the waker's clock";
}

TEST_F(TimeModel, TheApicTimerTicksInModelledTime) {
  make(1);
  std::vector<uint64_t> vectors;
  auto l1 = [&]() -> GuestTask {
    co_await ops::wrmsr(vmx::x2apic::kTimerDivide, 0xb);
    co_await ops::wrmsr(vmx::x2apic::kLvtTimer, ApicTimer::kPeriodic | 0xec);
    co_await ops::wrmsr(vmx::x2apic::kTimerInitialCount, 1'000'000);  // 1 ms
    for (int i = 0; i < 5; i++) vectors.push_back((co_await ops::exec(GuestOp{GuestOp::Hlt{}})).value);
    co_await ops::wrmsr(vmx::x2apic::kTimerInitialCount, 0);
  };
  machine->set_l1_program(0, l1());
  run();
  EXPECT_EQ(vectors, std::vector<uint64_t>(5, 0xec));
  EXPECT_GE(clock(0).total(), 5'000'000u);
  EXPECT_LT(clock(0).total(), 6'000'000u + 20 * kExitCost + 10'000'000u);
  EXPECT_GE(clock(0)[TimePart::idle], 4'000'000u) << "a halted vCPU idles until its timer";
}

TEST_F(TimeModel, WallClockModeReadsTheSteadyClock) {
  make(1, ClockKind::wall);
  uint64_t a = 0, b = 0;
  auto l1 = [&]() -> GuestTask {
    a = co_await ops::now();
    co_await ops::tpause(a + 2'000'000);
    b = co_await ops::now();
  };
  machine->set_l1_program(0, l1());
  run();
  EXPECT_GE(b - a, 2'000'000u) << "TPAUSE waits on the wall clock";
}

}  // namespace
}  // namespace nestcache::cpu
