// GuestTask, GuestFn and the ops:: awaitables, driven by a tiny fake CPU: a
// map for guest memory, a map for MSRs and a toy VMX state machine.
#include "cpu/guest_task.h"

#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace nestcache::cpu {
namespace {

namespace ops = nestcache::cpu::ops;

template <class... Fs>
struct Overloaded : Fs... {
  using Fs::operator()...;
};
template <class... Fs>
Overloaded(Fs...) -> Overloaded<Fs...>;

constexpr uint32_t kMsrKnown = 0x10;  // the only MSR the fake CPU has (a "TSC")
constexpr uint32_t kFieldExitReason = 0x4402;
constexpr uint64_t kExitHlt = 12;
constexpr uint64_t kExitVmcall = 18;
constexpr Gpa kVmxonRegion = 0x10000;

// A driver: executes each operation at once (no exits) and records it.
class FakeCpu {
 public:
  std::map<Gpa, uint8_t> mem;
  std::map<uint32_t, uint64_t> msrs{{kMsrKnown, 0x1234}};
  uint64_t cr8 = 0;
  uint64_t clock_ns = 1000;
  std::vector<std::string> log;  // to_string() of every operation, in order

  // VMX: the VMXON region (kInvalidGpa when off), the current VMCS, and per
  // VMCS its fields and launch state.
  Gpa vmxon = kInvalidGpa;
  Gpa current = kInvalidGpa;
  std::map<Gpa, std::map<uint32_t, uint64_t>> vmcs;
  std::map<Gpa, bool> launched;

  // Starts `task` and answers its operations until it ends.
  void run(GuestTask& task) {
    task.start();
    while (!task.done()) step(task);
  }
  // Answers the pending operation of `task`.
  void step(GuestTask& task) {
    const GuestOp* op = task.pending();
    ASSERT_NE(op, nullptr);
    task.resume_with(execute(*op));
  }

  OpResult execute(const GuestOp& op) {
    log.push_back(to_string(op));
    if (op.is_vmx_instruction() && vmxon == kInvalidGpa && !op.is<GuestOp::Vmxon>()) {
      return OpResult::exception(kVectorUD);
    }
    using G = GuestOp;
    return op.visit(Overloaded{
        [&](const G::Read& o) {
          uint64_t v = 0;
          for (unsigned i = 0; i < o.size; ++i) v |= uint64_t{mem[o.gpa + i]} << (8 * i);
          return OpResult::success(v);
        },
        [&](const G::Write& o) {
          for (unsigned i = 0; i < o.size; ++i) mem[o.gpa + i] = uint8_t(o.value >> (8 * i));
          return OpResult::success();
        },
        [&](const G::CmpXchg& o) {
          uint64_t old = execute_read(o.gpa);
          if (old == o.expected) {
            for (unsigned i = 0; i < 8; ++i) mem[o.gpa + i] = uint8_t(o.desired >> (8 * i));
          }
          return OpResult::success(old);
        },
        [&](const G::Rdmsr& o) {
          auto it = msrs.find(o.msr);
          if (it == msrs.end()) return OpResult::exception(kVectorGP, 0);
          return OpResult::success(it->second);
        },
        [&](const G::Wrmsr& o) {
          if (!msrs.contains(o.msr)) return OpResult::exception(kVectorGP, 0);
          msrs[o.msr] = o.value;
          return OpResult::success();
        },
        [&](const G::WriteCr8& o) {
          cr8 = o.value & 0xf;
          return OpResult::success();
        },
        [&](const G::ReadCr8&) { return OpResult::success(cr8); },
        [&](const G::Vmcall& o) {
          return OpResult::success(o.nr * 1000 + o.args[0] + o.args[1] + o.args[2]);
        },
        [&](const G::Now&) { return OpResult::success(clock_ns += 10); },
        [&](const G::Vmxon& o) {
          if (!page_aligned(o.gpa)) return OpResult::fail_invalid();
          if (vmxon != kInvalidGpa) return OpResult::fail_valid(15);  // VMXON in VMX root
          vmxon = o.gpa;
          return OpResult::success();
        },
        [&](const G::Vmxoff&) {
          vmxon = current = kInvalidGpa;
          return OpResult::success();
        },
        [&](const G::Vmclear& o) {
          if (!page_aligned(o.gpa)) return OpResult::fail_valid(2);
          if (o.gpa == vmxon) return OpResult::fail_valid(3);
          launched[o.gpa] = false;
          if (current == o.gpa) current = kInvalidGpa;
          return OpResult::success();
        },
        [&](const G::Vmptrld& o) {
          if (!page_aligned(o.gpa)) return OpResult::fail_valid(9);
          if (o.gpa == vmxon) return OpResult::fail_valid(10);
          current = o.gpa;
          return OpResult::success();
        },
        [&](const G::Vmptrst&) { return OpResult::success(current); },
        [&](const G::Vmread& o) {
          if (current == kInvalidGpa) return OpResult::fail_invalid();
          return OpResult::success(vmcs[current][o.field]);
        },
        [&](const G::Vmwrite& o) {
          if (current == kInvalidGpa) return OpResult::fail_invalid();
          vmcs[current][o.field] = o.value;
          return OpResult::success();
        },
        [&](const G::Vmlaunch&) {
          if (current == kInvalidGpa) return OpResult::fail_invalid();
          if (launched[current]) return OpResult::fail_valid(4);
          launched[current] = true;
          vmcs[current][kFieldExitReason] = kExitHlt;  // "L2 ran, then exited on HLT"
          return OpResult::success();
        },
        [&](const G::Vmresume&) {
          if (current == kInvalidGpa) return OpResult::fail_invalid();
          if (!launched[current]) return OpResult::fail_valid(5);
          vmcs[current][kFieldExitReason] = kExitVmcall;  // "... then on VMCALL"
          return OpResult::success();
        },
        [&](const G::Invept& o) {
          bool known = o.type == vmx::InveptType::single_context || o.type == vmx::InveptType::global;
          return known ? OpResult::success() : OpResult::fail_valid(28);
        },
        // Hlt, Pause, Yield, SendIpi, Eoi, Invvpid: nothing to model.
        [&](const auto&) { return OpResult::success(); },
    });
  }

 private:
  uint64_t execute_read(Gpa gpa) {
    uint64_t v = 0;
    for (unsigned i = 0; i < 8; ++i) v |= uint64_t{mem[gpa + i]} << (8 * i);
    return v;
  }
};

// Counts its own destruction: a stand-in for any local a guest frame holds.
class DestroyCounter {
 public:
  explicit DestroyCounter(int* count) : count_(count) {}
  DestroyCounter(DestroyCounter&& other) noexcept : count_(std::exchange(other.count_, nullptr)) {}
  DestroyCounter(const DestroyCounter&) = delete;
  DestroyCounter& operator=(const DestroyCounter&) = delete;
  ~DestroyCounter() {
    if (count_) ++*count_;
  }

 private:
  int* count_;
};

// --- Starting and basic driving ---

GuestTask sets_flag_then_halts(bool* ran) {
  *ran = true;
  co_await ops::hlt();
}

TEST(GuestTask, RunsNothingUntilStarted) {
  bool ran = false;
  GuestTask task = sets_flag_then_halts(&ran);
  EXPECT_FALSE(ran);
  EXPECT_FALSE(task.started());
  EXPECT_FALSE(task.done());
  EXPECT_EQ(task.pending(), nullptr);

  task.start();
  EXPECT_TRUE(ran);
  EXPECT_TRUE(task.started());
  ASSERT_NE(task.pending(), nullptr);
  EXPECT_TRUE(task.pending()->is<GuestOp::Hlt>());

  task.resume_with(OpResult::success());
  EXPECT_TRUE(task.done());
  EXPECT_EQ(task.pending(), nullptr);
  EXPECT_FALSE(task.failed());
  EXPECT_NO_THROW(task.rethrow_if_failed());
}

GuestTask no_operations(int* ran) {
  ++*ran;
  co_return;
}

TEST(GuestTask, TaskWithoutOperationsEndsInStart) {
  int ran = 0;
  GuestTask task = no_operations(&ran);
  task.start();
  EXPECT_EQ(ran, 1);
  EXPECT_TRUE(task.done());
  EXPECT_EQ(task.pending(), nullptr);
}

GuestTask every_operation() {
  co_await ops::read8(0x1001);
  co_await ops::read16(0x1002);
  co_await ops::read32(0x1004);
  co_await ops::read64(0x1008);
  co_await ops::write8(0x2001, 0xab);
  co_await ops::write16(0x2002, 0xabcd);
  co_await ops::write32(0x2004, 0xabcdef01);
  co_await ops::write64(0x2008, 0x0123456789abcdef);
  co_await ops::cmpxchg64(0x3000, 1, 2);
  co_await ops::rdmsr(kMsrKnown);
  co_await ops::wrmsr(kMsrKnown, 7);
  co_await ops::write_cr8(3);
  co_await ops::read_cr8();
  co_await ops::vmcall(9, 1, 2, 3);
  co_await ops::hlt();
  co_await ops::pause();
  co_await ops::yield();
  co_await ops::now();
  co_await ops::send_ipi(5, 0xf2);
  co_await ops::eoi();
  co_await ops::vmxon(kVmxonRegion);
  co_await ops::vmclear(0x11000);
  co_await ops::vmptrld(0x11000);
  co_await ops::vmptrst();
  co_await ops::vmwrite(0x6800, 0x42);
  co_await ops::vmread(0x6800);
  co_await ops::vmlaunch();
  co_await ops::vmresume();
  co_await ops::invept(vmx::InveptType::global, 0x5000);
  co_await ops::invvpid(vmx::InvvpidType::individual_address, 3, 0x7000);
  co_await ops::vmxoff();
  co_await ops::exec(GuestOp::Pause{});
}

TEST(GuestTask, OperationsReachTheDriverInOrderWithTheirOperands) {
  FakeCpu cpu;
  GuestTask task = every_operation();
  cpu.run(task);
  task.rethrow_if_failed();
  const std::vector<std::string> expected = {
      "read(gpa=0x1001, size=1)",
      "read(gpa=0x1002, size=2)",
      "read(gpa=0x1004, size=4)",
      "read(gpa=0x1008, size=8)",
      "write(gpa=0x2001, size=1, value=0xab)",
      "write(gpa=0x2002, size=2, value=0xabcd)",
      "write(gpa=0x2004, size=4, value=0xabcdef01)",
      "write(gpa=0x2008, size=8, value=0x123456789abcdef)",
      "cmpxchg(gpa=0x3000, expected=0x1, desired=0x2)",
      "rdmsr(msr=0x10)",
      "wrmsr(msr=0x10, value=0x7)",
      "write_cr8(value=0x3)",
      "read_cr8()",
      "vmcall(nr=0x9, args=0x1, 0x2, 0x3)",
      "hlt()",
      "pause()",
      "yield()",
      "now()",
      "send_ipi(dest=5, vector=0xf2)",
      "eoi()",
      "vmxon(gpa=0x10000)",
      "vmclear(gpa=0x11000)",
      "vmptrld(gpa=0x11000)",
      "vmptrst()",
      "vmwrite(field=0x6800, value=0x42)",
      "vmread(field=0x6800)",
      "vmlaunch()",
      "vmresume()",
      "invept(type=2, eptp=0x5000)",
      "invvpid(type=0, vpid=3, gla=0x7000)",
      "vmxoff()",
      "pause()",
  };
  EXPECT_EQ(cpu.log, expected);
}

GuestTask one_store(Gpa gpa, uint64_t value) { co_await ops::write32(gpa, uint32_t(value)); }

TEST(GuestTask, PendingOperationExposesTypedOperands) {
  GuestTask task = one_store(0x4000, 0xdeadbeef);
  task.start();
  const GuestOp* op = task.pending();
  ASSERT_NE(op, nullptr);
  EXPECT_STREQ(op->name(), "write");
  EXPECT_FALSE(op->is_vmx_instruction());
  const auto* w = op->get_if<GuestOp::Write>();
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->gpa, 0x4000u);
  EXPECT_EQ(w->size, 4);
  EXPECT_EQ(w->value, 0xdeadbeefu);
  EXPECT_EQ(op->get_if<GuestOp::Read>(), nullptr);
}

TEST(GuestTask, AnUnansweredOperationStaysPendingAcrossAnExit) {
  // A VM exit is the driver not answering yet: the same operation is still
  // there when the vCPU re-enters the guest, however long that takes.
  GuestTask task = one_store(0x4000, 1);
  task.start();
  const GuestOp* before = task.pending();
  ASSERT_NE(before, nullptr);
  EXPECT_EQ(task.pending(), before);
  EXPECT_FALSE(task.done());
  FakeCpu cpu;
  cpu.step(task);
  EXPECT_TRUE(task.done());
  EXPECT_EQ(cpu.mem[0x4000], 1);
}

// --- Results ---

struct Seen {
  uint8_t r8 = 0;
  uint16_t r16 = 0;
  uint32_t r32 = 0;
  uint64_t r64 = 0;
  uint64_t cmpxchg_hit = 0, cmpxchg_miss = 0, after_cmpxchg = 0;
  uint64_t msr = 0, cr8 = 0, vmcall = 0, t0 = 0, t1 = 0;
};

GuestTask uses_results(Seen* s) {
  co_await ops::write64(0x100, 0x8877665544332211);
  s->r8 = co_await ops::read8(0x100);
  s->r16 = co_await ops::read16(0x100);
  s->r32 = co_await ops::read32(0x100);
  s->r64 = co_await ops::read64(0x100);
  s->cmpxchg_hit = co_await ops::cmpxchg64(0x100, 0x8877665544332211, 5);
  s->cmpxchg_miss = co_await ops::cmpxchg64(0x100, 0x8877665544332211, 6);
  s->after_cmpxchg = co_await ops::read64(0x100);
  co_await ops::wrmsr(kMsrKnown, 0x99);
  s->msr = co_await ops::rdmsr(kMsrKnown);
  co_await ops::write_cr8(0x1f);
  s->cr8 = co_await ops::read_cr8();
  s->vmcall = co_await ops::vmcall(2, 10, 20, 30);
  s->t0 = co_await ops::now();
  s->t1 = co_await ops::now();
}

TEST(GuestTask, ResultsReachTheGuest) {
  FakeCpu cpu;
  Seen s;
  GuestTask task = uses_results(&s);
  cpu.run(task);
  task.rethrow_if_failed();
  EXPECT_EQ(s.r8, 0x11);
  EXPECT_EQ(s.r16, 0x2211);
  EXPECT_EQ(s.r32, 0x44332211u);
  EXPECT_EQ(s.r64, 0x8877665544332211u);
  EXPECT_EQ(s.cmpxchg_hit, 0x8877665544332211u);  // matched: old value, and swapped
  EXPECT_EQ(s.cmpxchg_miss, 5u);                  // no match: the current value, unchanged
  EXPECT_EQ(s.after_cmpxchg, 5u);
  EXPECT_EQ(s.msr, 0x99u);
  EXPECT_EQ(s.cr8, 0xfu);
  EXPECT_EQ(s.vmcall, 2060u);
  EXPECT_LT(s.t0, s.t1);
}

// --- Faults ---

GuestTask probes_missing_msr(uint64_t* probed, OpResult* raw) {
  try {
    co_await ops::rdmsr(0xdead);
    *probed = 1;
  } catch (const GuestFault& fault) {
    *probed = fault.result().vector;
  }
  *raw = co_await ops::exec(GuestOp::Rdmsr{0xdead});
  co_await ops::hlt();
}

TEST(GuestTask, FaultThrowsGuestFaultTheGuestCanCatch) {
  FakeCpu cpu;
  uint64_t probed = 0;
  OpResult raw;
  GuestTask task = probes_missing_msr(&probed, &raw);
  cpu.run(task);
  task.rethrow_if_failed();
  EXPECT_EQ(probed, kVectorGP);
  EXPECT_EQ(raw, OpResult::exception(kVectorGP, 0));  // exec() hands over the result as is
  EXPECT_EQ(cpu.log.back(), "hlt()");
}

GuestTask writes_missing_msr() {
  co_await ops::wrmsr(0xdead, 1);
  co_await ops::hlt();  // never reached
}

TEST(GuestTask, UncaughtFaultSurfacesThroughRethrowIfFailed) {
  FakeCpu cpu;
  GuestTask task = writes_missing_msr();
  cpu.run(task);
  EXPECT_TRUE(task.done());
  EXPECT_TRUE(task.failed());
  EXPECT_EQ(cpu.log.size(), 1u);
  try {
    task.rethrow_if_failed();
    FAIL() << "no exception";
  } catch (const GuestFault& fault) {
    EXPECT_TRUE(fault.op().is<GuestOp::Wrmsr>());
    EXPECT_STREQ(fault.what(), "wrmsr(msr=0xdead, value=0x1) raised #GP(0x0)");
  }
  // Asked once, still there.
  EXPECT_THROW(task.rethrow_if_failed(), GuestFault);
}

GuestTask throws_unobserved() {
  co_await ops::pause();
  throw std::runtime_error("lost?");
}

TEST(GuestTask, AFailureNobodyAskedAboutIsReportedOnDestruction) {
  FakeCpu cpu;
  testing::internal::CaptureStderr();
  {
    GuestTask task = throws_unobserved();
    cpu.run(task);
  }
  std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("exception nobody asked about: lost?"), std::string::npos) << err;
}

// --- VMX instructions: the whole result, L1 style ---

struct VmxSeen {
  OpResult vmxon_unaligned, vmxon, vmxon_again, vmread_no_vmcs, vmclear_vmxon, vmptrld;
  OpResult vmresume_unlaunched, vmlaunch, vmlaunch_again, vmread_exit, vmptrst, invept_bad;
  OpResult ud_after_vmxoff;
};

GuestTask l1_vmx_sequence(VmxSeen* s) {
  constexpr Gpa kVmcs12 = 0x20000;
  s->vmxon_unaligned = co_await ops::vmxon(kVmxonRegion + 8);
  s->vmxon = co_await ops::vmxon(kVmxonRegion);
  s->vmxon_again = co_await ops::vmxon(kVmxonRegion);
  s->vmread_no_vmcs = co_await ops::vmread(kFieldExitReason);
  s->vmclear_vmxon = co_await ops::vmclear(kVmxonRegion);
  s->vmptrld = co_await ops::vmptrld(kVmcs12);
  s->vmresume_unlaunched = co_await ops::vmresume();
  s->vmlaunch = co_await ops::vmlaunch();
  s->vmlaunch_again = co_await ops::vmlaunch();
  s->vmread_exit = co_await ops::vmread(kFieldExitReason);
  s->vmptrst = co_await ops::vmptrst();
  s->invept_bad = co_await ops::invept(static_cast<vmx::InveptType>(7), 0);
  co_await ops::vmxoff();
  s->ud_after_vmxoff = co_await ops::vmptrst();
}

TEST(GuestTask, VmxInstructionsReturnVmFailInsteadOfThrowing) {
  FakeCpu cpu;
  VmxSeen s;
  GuestTask task = l1_vmx_sequence(&s);
  cpu.run(task);
  task.rethrow_if_failed();
  EXPECT_EQ(s.vmxon_unaligned.outcome, Outcome::fail_invalid);
  EXPECT_TRUE(s.vmxon.ok());
  EXPECT_EQ(s.vmxon_again, OpResult::fail_valid(15));
  EXPECT_EQ(s.vmread_no_vmcs.outcome, Outcome::fail_invalid);
  EXPECT_EQ(s.vmclear_vmxon, OpResult::fail_valid(3));
  EXPECT_TRUE(s.vmptrld.ok());
  EXPECT_EQ(s.vmresume_unlaunched.vm_instruction_error, 5u);
  EXPECT_TRUE(s.vmlaunch.ok());
  EXPECT_EQ(s.vmlaunch_again, OpResult::fail_valid(4));
  EXPECT_EQ(s.vmread_exit, OpResult::success(kExitHlt));
  EXPECT_EQ(s.vmptrst.value, 0x20000u);
  EXPECT_EQ(s.invept_bad, OpResult::fail_valid(28));
  EXPECT_EQ(s.ud_after_vmxoff, OpResult::exception(kVectorUD));
}

// The shape L1 code takes: value-returning helpers and VMfail checks.
GuestFn<uint64_t> vmread_or_throw(uint32_t field) {
  OpResult r = co_await ops::vmread(field);
  if (!r.ok()) throw std::runtime_error("vmread: " + to_string(r));
  co_return r.value;
}

GuestTask run_l2_until_vmcall(Gpa vmcs12, int* exits) {
  if (!(co_await ops::vmptrld(vmcs12)).ok()) co_return;
  OpResult entry = co_await ops::vmlaunch();  // returns when L2 exits (or fails to enter)
  while (entry.ok()) {
    ++*exits;
    if (co_await vmread_or_throw(kFieldExitReason) == kExitVmcall) break;
    entry = co_await ops::vmresume();
  }
}

TEST(GuestTask, L1StyleRunLoopHandlesExitsUntilVmcall) {
  FakeCpu cpu;
  cpu.vmxon = kVmxonRegion;
  int exits = 0;
  GuestTask task = run_l2_until_vmcall(0x20000, &exits);
  cpu.run(task);
  task.rethrow_if_failed();
  EXPECT_EQ(exits, 2);
  EXPECT_EQ(cpu.log, (std::vector<std::string>{"vmptrld(gpa=0x20000)", "vmlaunch()",
                                                "vmread(field=0x4402)", "vmresume()",
                                                "vmread(field=0x4402)"}));
}

// --- Nested subtasks ---

GuestFn<uint32_t> level3(Gpa base, int* destroyed) {
  DestroyCounter local(destroyed);
  uint32_t a = co_await ops::read32(base);
  uint32_t b = co_await ops::read32(base + 4);
  co_return a + b;
}

GuestFn<uint64_t> level2(Gpa base, int* destroyed) {
  DestroyCounter local(destroyed);
  uint64_t sum = co_await level3(base, destroyed);
  co_await ops::write64(base + 8, sum);
  co_return sum * 2;
}

GuestFn<uint64_t> level1(Gpa base, int* destroyed) {
  DestroyCounter local(destroyed);
  uint64_t doubled = co_await level2(base, destroyed);
  uint64_t msr = co_await ops::rdmsr(kMsrKnown);
  co_return doubled + msr;
}

GuestTask nested_root(Gpa base, int* destroyed, uint64_t* out) {
  DestroyCounter local(destroyed);
  *out = co_await level1(base, destroyed);
  co_await ops::vmcall(1, *out);
}

TEST(GuestTask, NestedSubtasksReturnValuesAndRouteOperationsToTheRoot) {
  FakeCpu cpu;
  cpu.mem[0x500] = 3;
  cpu.mem[0x504] = 4;
  int destroyed = 0;
  uint64_t out = 0;
  GuestTask task = nested_root(0x500, &destroyed, &out);
  cpu.run(task);
  task.rethrow_if_failed();
  const std::vector<std::string> expected = {
      "read(gpa=0x500, size=4)",           "read(gpa=0x504, size=4)",
      "write(gpa=0x508, size=8, value=0x7)", "rdmsr(msr=0x10)",
      "vmcall(nr=0x1, args=0x1242, 0x0, 0x0)",
  };
  EXPECT_EQ(cpu.log, expected);
  EXPECT_EQ(out, 14u + 0x1234u);
  EXPECT_EQ(destroyed, 4);  // every frame's local went out of scope as it returned
}

GuestFn<uint32_t> throws_after_a_read(Gpa gpa, int* destroyed) {
  DestroyCounter local(destroyed);
  uint32_t v = co_await ops::read32(gpa);
  if (v == 0) throw std::runtime_error("level 3 saw zero");
  co_return v;
}

GuestFn<uint64_t> middle(Gpa gpa, int* destroyed) {
  DestroyCounter local(destroyed);
  co_return co_await throws_after_a_read(gpa, destroyed) + 1;
}

GuestTask outer(Gpa gpa, int* destroyed, bool catch_it, std::string* caught) {
  DestroyCounter local(destroyed);
  if (catch_it) {
    try {
      co_await middle(gpa, destroyed);
    } catch (const std::runtime_error& e) {
      *caught = e.what();
    }
    co_await ops::hlt();
  } else {
    co_await middle(gpa, destroyed);
    co_await ops::hlt();  // never reached
  }
}

TEST(GuestTask, ExceptionInANestedSubtaskSurfacesAtTheDriver) {
  FakeCpu cpu;
  int destroyed = 0;
  std::string caught;
  GuestTask task = outer(0x600, &destroyed, /*catch_it=*/false, &caught);
  cpu.run(task);
  EXPECT_TRUE(task.done());
  EXPECT_TRUE(task.failed());
  EXPECT_EQ(cpu.log, std::vector<std::string>{"read(gpa=0x600, size=4)"});
  EXPECT_EQ(destroyed, 3);  // unwinding ran every frame's destructors
  try {
    task.rethrow_if_failed();
    FAIL() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "level 3 saw zero");
  }
}

TEST(GuestTask, ExceptionInANestedSubtaskCanBeCaughtByAnOuterFrame) {
  FakeCpu cpu;
  int destroyed = 0;
  std::string caught;
  GuestTask task = outer(0x600, &destroyed, /*catch_it=*/true, &caught);
  cpu.run(task);
  EXPECT_FALSE(task.failed());
  EXPECT_EQ(caught, "level 3 saw zero");
  EXPECT_EQ(cpu.log.back(), "hlt()");
  EXPECT_EQ(destroyed, 3);
}

GuestTask void_subtask(Gpa gpa, int* destroyed) {
  DestroyCounter local(destroyed);
  co_await ops::write8(gpa, 1);
}

GuestTask awaits_void_subtasks(int* destroyed) {
  co_await void_subtask(0x700, destroyed);
  GuestTask later = void_subtask(0x701, destroyed);
  co_await ops::pause();
  co_await std::move(later);
}

TEST(GuestTask, AGuestTaskCanBeAwaitedAsASubtask) {
  FakeCpu cpu;
  int destroyed = 0;
  GuestTask task = awaits_void_subtasks(&destroyed);
  cpu.run(task);
  task.rethrow_if_failed();
  EXPECT_EQ(cpu.log, (std::vector<std::string>{"write(gpa=0x700, size=1, value=0x1)", "pause()",
                                                "write(gpa=0x701, size=1, value=0x1)"}));
  EXPECT_EQ(destroyed, 2);
}

GuestFn<std::unique_ptr<int>> makes_box(Gpa gpa) {
  co_return std::make_unique<int>(static_cast<int>(co_await ops::read8(gpa)));
}

GuestTask takes_box(int* out) {
  std::unique_ptr<int> box = co_await makes_box(0x800);
  *out = *box;
}

TEST(GuestTask, SubtaskMayReturnAMoveOnlyValue) {
  FakeCpu cpu;
  cpu.mem[0x800] = 42;
  int out = 0;
  GuestTask task = takes_box(&out);
  cpu.run(task);
  task.rethrow_if_failed();
  EXPECT_EQ(out, 42);
}

GuestFn<uint64_t> returns_at_once(uint64_t i) { co_return i; }

GuestTask many_subtask_calls(uint64_t n, uint64_t* sum) {
  for (uint64_t i = 0; i < n; ++i) *sum += co_await returns_at_once(i);
  co_await ops::hlt();
}

TEST(GuestTask, BackToBackSubtaskCallsDoNotGrowTheStack) {
  // A million subtasks that finish without an operation: were each start and
  // return a nested resume() (as GCC 12 compiles symmetric transfer below
  // -O2), the stack would overflow.
  constexpr uint64_t kCalls = 1'000'000;
  uint64_t sum = 0;
  GuestTask task = many_subtask_calls(kCalls, &sum);
  task.start();
  ASSERT_NE(task.pending(), nullptr);
  EXPECT_TRUE(task.pending()->is<GuestOp::Hlt>());
  EXPECT_EQ(sum, kCalls * (kCalls - 1) / 2);
}

// --- Lifetime ---

TEST(GuestTask, DestroyingASuspendedTaskDestroysEveryFrameOfItsStack) {
  FakeCpu cpu;
  int destroyed = 0;
  uint64_t out = 0;
  {
    GuestTask task = nested_root(0x500, &destroyed, &out);
    task.start();
    ASSERT_NE(task.pending(), nullptr);  // suspended three subtasks deep, at the first read
    EXPECT_EQ(to_string(*task.pending()), "read(gpa=0x500, size=4)");
    cpu.step(task);                     // and at the second one
    EXPECT_EQ(destroyed, 0);
  }
  EXPECT_EQ(destroyed, 4);  // root, level1, level2, level3 (ASan: no frame leaked)
}

GuestTask holds_an_argument(DestroyCounter arg) {
  co_await ops::hlt();
}

TEST(GuestTask, DestroyingAnUnstartedTaskDestroysItsArguments) {
  int destroyed = 0;
  {
    GuestTask task = holds_an_argument(DestroyCounter(&destroyed));
    EXPECT_EQ(destroyed, 0);  // the argument was moved into the frame
  }
  EXPECT_EQ(destroyed, 1);
}

TEST(GuestTask, MovingATaskMovesOwnershipOfTheFrame) {
  FakeCpu cpu;
  int destroyed = 0;
  GuestTask a = void_subtask(0x900, &destroyed);
  a.start();
  GuestTask b = std::move(a);
  EXPECT_FALSE(a);
  ASSERT_TRUE(b);
  cpu.step(b);
  EXPECT_TRUE(b.done());
  EXPECT_EQ(destroyed, 1);

  GuestTask c = void_subtask(0x901, &destroyed);
  c.start();
  c = GuestTask();  // assignment destroys the suspended task held before
  EXPECT_EQ(destroyed, 2);
}

// --- Lambdas (see "Lambdas" in cpu/guest_task.h) ---

// A store, then a spin until another thread's flag reaches n: the subtask a
// user reported crashing, as a lambda awaited on its temporary closure (which
// lives to the end of the co_await's full-expression) and as a named lambda.
GuestTask spins_in_lambda_subtasks(Gpa out, Gpa in, uint64_t n) {
  co_await [&]() -> GuestTask {
    co_await ops::write64(out, 1);
    while (co_await ops::read64(in) != n) co_await ops::pause();
  }();
  auto wait_for = [&](uint64_t value) -> GuestTask {
    while (co_await ops::read64(in) != value) co_await ops::pause();
  };
  co_await wait_for(n + 1);
  co_await ops::write64(out, 2);
}

TEST(GuestTask, ALambdaSubtaskCapturingByReferenceReturnsToItsCaller) {
  constexpr Gpa kOut = 0xb00, kIn = 0xb08;
  FakeCpu cpu;
  GuestTask task = spins_in_lambda_subtasks(kOut, kIn, 7);
  task.start();
  // Spin a while on each flag value before "another thread" stores it.
  for (uint64_t value : {7, 8}) {
    for (int i = 0; i < 3; ++i) {
      while (!task.pending()->is<GuestOp::Pause>()) cpu.step(task);
      cpu.step(task);
    }
    cpu.execute(GuestOp::Write{.gpa = kIn, .size = 8, .value = value});
  }
  while (!task.done()) cpu.step(task);
  task.rethrow_if_failed();
  EXPECT_EQ(cpu.execute(GuestOp::Read{.gpa = kOut, .size = 8}).value, 2u);
}

// A subtask that needs values with destructors takes them as parameters: the
// frame owns its parameters, so the task may outlive the (captureless)
// closure, and each is destroyed once, with the frame.
GuestTask awaits_a_lambda_subtask_later(int* destroyed) {
  GuestTask later = [](std::vector<Gpa> flags, DestroyCounter counter) -> GuestTask {
    co_await ops::write64(flags[1], 1);
    while (co_await ops::read64(flags[0]) != 0) co_await ops::pause();
  }(std::vector<Gpa>{0xc00, 0xc08}, DestroyCounter(destroyed));
  co_await ops::pause();
  co_await std::move(later);
  co_await ops::hlt();
}

TEST(GuestTask, ALambdaSubtaskOwnsItsParametersNotItsCaptures) {
  FakeCpu cpu;
  int destroyed = 0;
  GuestTask task = awaits_a_lambda_subtask_later(&destroyed);
  cpu.run(task);
  task.rethrow_if_failed();
  EXPECT_EQ(cpu.log, (std::vector<std::string>{"pause()", "write(gpa=0xc08, size=8, value=0x1)",
                                                "read(gpa=0xc00, size=8)", "hlt()"}));
  EXPECT_EQ(destroyed, 1);
}

// Which closures may not be guest coroutines: those whose captures have
// destructors (GCC 12 destroys such a temporary closure twice when it is called
// in a co_await expression). Classes with destructors stay allowed as the
// object of a member coroutine.
TEST(GuestTask, OnlyClosuresWithDestructorsAreRefusedAsCoroutines) {
  std::vector<Gpa> flags{0xd00};
  auto by_value = [flags] { return flags.size(); };
  auto by_reference = [&flags] { return flags.size(); };
  auto trivially_by_value = [n = flags.size()] { return n; };
  auto captureless = [] {};
  struct NotAClosure {
    std::vector<Gpa> flags;
  };
  static_assert(detail::kIsClosureWithDestructors<decltype(by_value)>);
  static_assert(detail::kIsClosureWithDestructors<const decltype(by_value)>);
  static_assert(!detail::kIsClosureWithDestructors<decltype(by_reference)>);
  static_assert(!detail::kIsClosureWithDestructors<decltype(trivially_by_value)>);
  static_assert(!detail::kIsClosureWithDestructors<decltype(captureless)>);
  static_assert(!detail::kIsClosureWithDestructors<NotAClosure>);
  static_assert(!detail::kIsClosureWithDestructors<std::vector<Gpa>>);

  // The compilers' spellings of closure types, and names that only contain one.
  static_assert(detail::spells_closure_type("f()::<lambda(int, std::vector<long unsigned int>)>"));
  static_assert(detail::spells_closure_type("<lambda()>"));
  static_assert(detail::spells_closure_type("(lambda at src/a.cc:12:7)"));
  static_assert(!detail::spells_closure_type("f()::<lambda()>::Local"));
  static_assert(!detail::spells_closure_type("Box<f()::<lambda()> >"));
  static_assert(!detail::spells_closure_type("std::function<void(int)>"));
  static_assert(!detail::spells_closure_type("Local"));
  (void)by_value, (void)by_reference, (void)trivially_by_value, (void)captureless;
}

// --- Threads ---

GuestTask records_threads(std::vector<std::thread::id>* seen, int rounds) {
  for (int i = 0; i < rounds; ++i) {
    seen->push_back(std::this_thread::get_id());
    co_await ops::write64(0xa00 + 8 * i, i);
  }
  seen->push_back(std::this_thread::get_id());
}

TEST(GuestTask, ATaskSuspendedOnOneThreadResumesOnAnother) {
  // As an L2 program does when its vmcs12 is loaded on another L1 vCPU: one
  // thread runs it to an exit, another re-enters it. join() orders the two.
  FakeCpu cpu;
  std::vector<std::thread::id> seen;
  GuestTask task = records_threads(&seen, 4);
  std::thread::id first, second;

  std::thread a([&] {
    first = std::this_thread::get_id();
    task.start();
    cpu.step(task);
    cpu.step(task);
  });
  a.join();
  ASSERT_FALSE(task.done());
  ASSERT_NE(task.pending(), nullptr);

  std::thread b([&] {
    second = std::this_thread::get_id();
    while (!task.done()) cpu.step(task);
  });
  b.join();

  task.rethrow_if_failed();
  ASSERT_EQ(seen.size(), 5u);
  EXPECT_EQ(seen[0], first);
  EXPECT_EQ(seen[2], first);
  EXPECT_EQ(seen[3], second);
  EXPECT_EQ(seen[4], second);
  EXPECT_EQ(cpu.log.size(), 4u);
  EXPECT_EQ(cpu.mem[0xa18], 3);
}

// --- Formatting ---

TEST(GuestOpFormat, NamesOperandsAndOutcomes) {
  EXPECT_EQ(to_string(GuestOp(GuestOp::Vmread{0x4402})), "vmread(field=0x4402)");
  EXPECT_EQ(to_string(GuestOp(GuestOp::Eoi{})), "eoi()");
  EXPECT_STREQ(GuestOp(GuestOp::Invvpid{}).name(), "invvpid");
  EXPECT_TRUE(GuestOp(GuestOp::Vmresume{}).is_vmx_instruction());
  EXPECT_FALSE(GuestOp(GuestOp::Vmcall{}).is_vmx_instruction());
  EXPECT_EQ(to_string(OpResult::success(42)), "ok(0x2a)");
  EXPECT_EQ(to_string(OpResult::fail_invalid()), "VMfailInvalid");
  EXPECT_EQ(to_string(OpResult::fail_valid(7)), "VMfailValid(7)");
  EXPECT_EQ(to_string(OpResult::exception(kVectorUD)), "#UD");
  EXPECT_EQ(to_string(OpResult::exception(kVectorPF, 2)), "#PF(0x2)");
}

// --- Misuse is caught by the driver API ---

GuestTask single_pause() { co_await ops::pause(); }

TEST(GuestTaskDeathTest, VmFailForANonVmxOperationAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        GuestTask task = single_pause();
        task.start();
        task.resume_with(OpResult::fail_valid(7));
      },
      "is_vmx_instruction");
}

TEST(GuestTaskDeathTest, ResumeWithoutAPendingOperationAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        GuestTask task = single_pause();
        task.start();
        task.resume_with(OpResult::success());
        task.resume_with(OpResult::success());
      },
      "pending != nullptr");
}

TEST(GuestTaskDeathTest, StartingTwiceAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        GuestTask task = single_pause();
        task.start();
        task.start();
      },
      "root_ == nullptr");
}

}  // namespace
}  // namespace nestcache::cpu
