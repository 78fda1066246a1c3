// Selftest `vmx-instructions`: every emulated VMX instruction's success and
// failure paths, as L1 observes them, checked against the SDM's outcomes
// (VMsucceed, VMfailInvalid, VMfailValid with its error number, #UD).

#include "guest/l1_pages.h"
#include "guest/mailbox.h"
#include "guest/program.h"
#include "guest/vmx.h"
#include "vmx/entry_checks.h"
#include "workloads/nested_env.h"

namespace nestcache::workloads {

namespace {

using namespace guest::program;
using vmx::VmInstructionError;

// Operands no VMX implementation accepts: a revision that is not the
// model's, a field encoding no VMCS has, an address past the
// physical-address width.
constexpr uint32_t kBadRevision = 0x1234;
constexpr uint32_t kUnsupportedField = 0x7ffe;
constexpr Gpa kBeyondWidth = uint64_t{1} << 50;

struct Expect {
  Outcome outcome;
  uint32_t error = 0;  // fail_valid: the VM-instruction error number
  uint8_t vector = 0;  // fault
};
constexpr Expect kOk{Outcome::ok};
constexpr Expect kInvalid{Outcome::fail_invalid};
constexpr Expect valid(VmInstructionError e) { return {Outcome::fail_valid, static_cast<uint32_t>(e)}; }
constexpr Expect kUd{Outcome::fault, 0, cpu::kVectorUD};

struct Checker {
  SelftestResult& result;
  int checks = 0;
  nlohmann::json log = nlohmann::json::array();

  // Runs `op`, compares its outcome with `e`; for VMfailValid also reads the
  // VM-instruction error field back with VMREAD, as L1 would.
  GuestTask run(const char* what, GuestOp op, Expect e) {
    OpResult r = co_await ops::exec(op);
    checks++;
    bool good = r.outcome == e.outcome && (e.outcome != Outcome::fail_valid || r.vm_instruction_error == e.error) &&
                (e.outcome != Outcome::fault || r.vector == e.vector);
    if (good && e.outcome == Outcome::fail_valid) {
      OpResult err = co_await ops::vmread(vmx::field::kVmInstructionError);
      good = err.ok() && err.value == e.error;
      if (!good) result.fail(fmt::format("{}: VM-instruction error field reads {}, expected {}", what, err.value, e.error));
    } else if (!good) {
      result.fail(fmt::format("{}: got {}, expected outcome {} error {}", what, cpu::to_string(r),
                              static_cast<int>(e.outcome), e.error));
    }
    log.push_back({{"check", what}, {"result", cpu::to_string(r)}, {"ok", good}});
  }
};

// The regions the checks use: VMXON, two VMCSs and one with a bad revision.
struct Regions {
  Gpa vmxon, vmcs_a, vmcs_b, bad_rev;
};

// Out of VMX operation, VMXON, and VMX operation without a current VMCS.
GuestTask check_before_a_current_vmcs(Checker& c, Regions r) {
  auto [vmxon, vmcs_a, vmcs_b, bad_rev] = r;
  // Outside VMX operation every VMX instruction but VMXON is #UD.
  co_await c.run("VMPTRLD outside VMX operation", GuestOp{GuestOp::Vmptrld{vmcs_a}}, kUd);
  co_await c.run("VMXOFF outside VMX operation", GuestOp{GuestOp::Vmxoff{}}, kUd);
  co_await c.run("VMLAUNCH outside VMX operation", GuestOp{GuestOp::Vmlaunch{}}, kUd);
  // VMXON.
  co_await c.run("VMXON with a misaligned region", GuestOp{GuestOp::Vmxon{vmxon + 8}}, kInvalid);
  co_await c.run("VMXON with a bad revision", GuestOp{GuestOp::Vmxon{bad_rev}}, kInvalid);
  co_await c.run("VMXON beyond the physical-address width", GuestOp{GuestOp::Vmxon{kBeyondWidth}}, kInvalid);
  co_await c.run("VMXON", GuestOp{GuestOp::Vmxon{vmxon}}, kOk);
  co_await c.run("VMXON in VMX root without a current VMCS", GuestOp{GuestOp::Vmxon{vmxon}}, kInvalid);
  // No current VMCS yet.
  co_await c.run("VMPTRST without a current VMCS", GuestOp{GuestOp::Vmptrst{}}, kOk);
  co_await c.run("VMREAD without a current VMCS", GuestOp{GuestOp::Vmread{vmx::field::kGuestRip}}, kInvalid);
  co_await c.run("VMWRITE without a current VMCS", GuestOp{GuestOp::Vmwrite{vmx::field::kGuestRip, 1}}, kInvalid);
  co_await c.run("VMLAUNCH without a current VMCS", GuestOp{GuestOp::Vmlaunch{}}, kInvalid);
  co_await c.run("VMPTRLD of a misaligned address (no current VMCS)", GuestOp{GuestOp::Vmptrld{vmcs_a + 1}}, kInvalid);
}

// With A current: every VMfail is VMfailValid with an error number.
GuestTask check_with_a_current_vmcs(Checker& c, Regions r) {
  auto [vmxon, vmcs_a, vmcs_b, bad_rev] = r;
  co_await c.run("VMCLEAR A", GuestOp{GuestOp::Vmclear{vmcs_a}}, kOk);
  co_await c.run("VMPTRLD A", GuestOp{GuestOp::Vmptrld{vmcs_a}}, kOk);
  OpResult st = co_await ops::vmptrst();
  c.result.check(st.ok() && st.value == vmcs_a, "VMPTRST returned {:#x}, expected {:#x}", st.value, vmcs_a);
  co_await c.run("VMXON in VMX root operation", GuestOp{GuestOp::Vmxon{vmxon}}, valid(VmInstructionError::kVmxonInVmxRoot));
  co_await c.run("VMCLEAR of a misaligned address", GuestOp{GuestOp::Vmclear{vmcs_b + 4}},
                 valid(VmInstructionError::kVmclearInvalidAddress));
  co_await c.run("VMCLEAR of the VMXON pointer", GuestOp{GuestOp::Vmclear{vmxon}},
                 valid(VmInstructionError::kVmclearVmxonPointer));
  co_await c.run("VMPTRLD of a misaligned address", GuestOp{GuestOp::Vmptrld{vmcs_b + 4}},
                 valid(VmInstructionError::kVmptrldInvalidAddress));
  co_await c.run("VMPTRLD of the VMXON pointer", GuestOp{GuestOp::Vmptrld{vmxon}},
                 valid(VmInstructionError::kVmptrldVmxonPointer));
  co_await c.run("VMPTRLD of a bad revision", GuestOp{GuestOp::Vmptrld{bad_rev}},
                 valid(VmInstructionError::kVmptrldIncorrectRevision));
  co_await c.run("VMREAD of an unsupported field", GuestOp{GuestOp::Vmread{kUnsupportedField}},
                 valid(VmInstructionError::kUnsupportedVmcsComponent));
  co_await c.run("VMWRITE of an unsupported field", GuestOp{GuestOp::Vmwrite{kUnsupportedField, 0}},
                 valid(VmInstructionError::kUnsupportedVmcsComponent));
  // The model's CPU offers "VMWRITE to any supported field" (IA32_VMX_MISC
  // bit 29), as KVM does: the exit-information fields are writable.
  co_await c.run("VMWRITE of a read-only field", GuestOp{GuestOp::Vmwrite{vmx::field::kExitReason, 0x12}}, kOk);
  OpResult reason = co_await ops::vmread(vmx::field::kExitReason);
  c.result.check(reason.ok() && reason.value == 0x12, "VMREAD of the written exit reason returned {:#x}", reason.value);
  co_await c.run("VMWRITE guest RIP", GuestOp{GuestOp::Vmwrite{vmx::field::kGuestRip, 0x1234}}, kOk);
  OpResult rip = co_await ops::vmread(vmx::field::kGuestRip);
  c.result.check(rip.ok() && rip.value == 0x1234, "VMREAD guest RIP returned {:#x}", rip.value);
  co_await c.run("VMRESUME of a VMCS never launched", GuestOp{GuestOp::Vmresume{}},
                 valid(VmInstructionError::kVmresumeNonLaunchedVmcs));
  // The current VMCS is empty: its controls fail the entry checks.
  co_await c.run("VMLAUNCH with invalid control fields", GuestOp{GuestOp::Vmlaunch{}},
                 valid(VmInstructionError::kEntryInvalidControlFields));
  co_await c.run("INVEPT of an unsupported type", GuestOp{GuestOp::Invept{static_cast<vmx::InveptType>(7), 0}},
                 valid(VmInstructionError::kInvalidInveptInvvpidOperand));
  co_await c.run("INVEPT all-context", GuestOp{GuestOp::Invept{vmx::InveptType::global, 0}}, kOk);
  co_await c.run("INVVPID of an unsupported type", GuestOp{GuestOp::Invvpid{static_cast<vmx::InvvpidType>(9), 1, 0}},
                 valid(VmInstructionError::kInvalidInveptInvvpidOperand));
  co_await c.run("INVVPID single-context of VPID 0", GuestOp{GuestOp::Invvpid{vmx::InvvpidType::single_context, 0, 0}},
                 valid(VmInstructionError::kInvalidInveptInvvpidOperand));
  co_await c.run("INVVPID all-context", GuestOp{GuestOp::Invvpid{vmx::InvvpidType::all_context, 0, 0}}, kOk);
}

// Launch state, VMCLEAR of the current VMCS, switching VMCSs, VMXOFF.
GuestTask check_launch_clear_and_switch(Checker& c, Regions r) {
  // A launched VMCS refuses VMLAUNCH. Run a real L2 to launch it.
  co_await guest::write_vmcs(vmx::minimal_vmcs12());
  co_await c.run("VMLAUNCH of a valid VMCS (L2 exits with VMCALL)", GuestOp{GuestOp::Vmlaunch{}}, kOk);
  co_await c.run("VMLAUNCH of a launched VMCS", GuestOp{GuestOp::Vmlaunch{}},
                 valid(VmInstructionError::kVmlaunchNonClearVmcs));
  co_await c.run("VMRESUME of the launched VMCS", GuestOp{GuestOp::Vmresume{}}, kOk);
  // VMCLEAR of the current VMCS: no current VMCS afterwards; VMPTRLD again
  // and VMRESUME sees it cleared.
  co_await c.run("VMCLEAR A (current)", GuestOp{GuestOp::Vmclear{r.vmcs_a}}, kOk);
  OpResult st = co_await ops::vmptrst();
  c.result.check(st.value == ~uint64_t{0}, "VMPTRST after VMCLEAR returned {:#x}", st.value);
  co_await c.run("VMPTRLD A again", GuestOp{GuestOp::Vmptrld{r.vmcs_a}}, kOk);
  co_await c.run("VMRESUME of a cleared VMCS", GuestOp{GuestOp::Vmresume{}},
                 valid(VmInstructionError::kVmresumeNonLaunchedVmcs));
  // Switching between two VMCSs keeps each one's fields.
  co_await c.run("VMCLEAR B", GuestOp{GuestOp::Vmclear{r.vmcs_b}}, kOk);
  co_await c.run("VMPTRLD B", GuestOp{GuestOp::Vmptrld{r.vmcs_b}}, kOk);
  co_await c.run("VMWRITE guest RIP of B", GuestOp{GuestOp::Vmwrite{vmx::field::kGuestRip, 0xb}}, kOk);
  co_await c.run("VMPTRLD A back", GuestOp{GuestOp::Vmptrld{r.vmcs_a}}, kOk);
  OpResult rip = co_await ops::vmread(vmx::field::kGuestRip);
  c.result.check(rip.value == 0x1234, "A's guest RIP after switching is {:#x}, expected 0x1234", rip.value);
  // VMXOFF leaves VMX operation.
  co_await c.run("VMXOFF", GuestOp{GuestOp::Vmxoff{}}, kOk);
  co_await c.run("VMREAD after VMXOFF", GuestOp{GuestOp::Vmread{vmx::field::kGuestRip}}, kUd);
}

GuestTask l1_program(Checker& c) {
  guest::L1Pages pages(kL1PagesStart, 16 << 20);
  Regions r{pages.alloc(), pages.alloc(), pages.alloc(), pages.alloc()};
  co_await guest::init_region(r.vmxon);
  co_await guest::init_region(r.vmcs_a);
  co_await guest::init_region(r.vmcs_b);
  co_await ops::write32(r.bad_rev, kBadRevision);
  co_await check_before_a_current_vmcs(c, r);
  co_await check_with_a_current_vmcs(c, r);
  co_await check_launch_clear_and_switch(c, r);
}

SelftestResult run(const RunOptions& o) {
  SelftestResult result;
  auto env = NestedEnv::create({o.strategy, o.memory});
  if (!env) {
    result.fail(env.error().to_string());
    return result;
  }
  NestedEnv& e = **env;
  Checker c{result};
  // The L2 that makes VMLAUNCH succeed: one VMCALL per entry, forever. Its
  // vmcs12 is the first page L1 allocates after the VMXON region.
  e.machine->bind_l2_program(kL1PagesStart + kPageSize, guest::vmcall_forever());
  e.machine->set_l1_program(0, l1_program(c));
  if (auto st = e.machine->run(std::chrono::seconds(60)); !st) result.fail(st.error().to_string());
  result.counters = e.counters();
  result.details["counters_by_vcpu"] = e.counters_by_vcpu();
  result.details["checks"] = c.checks;
  if (o.verbose) result.details["log"] = c.log;
  result.check(c.checks >= 40, "only {} checks ran", c.checks);
  result.check(result.counters[Counter::stale_accesses] == 0, "{} stale accesses", result.counters[Counter::stale_accesses]);
  return result;
}

}  // namespace

void register_vmx_instructions_selftest() {
  register_selftest({
      "vmx-instructions",
      "every VMX instruction's success and failure paths, checked against the SDM",
      "L1 guest code executes VMXON, VMXOFF, VMCLEAR, VMPTRLD, VMPTRST, VMREAD, VMWRITE, VMLAUNCH, "
      "VMRESUME, INVEPT and INVVPID with good and bad operands, in and out of VMX operation, with and "
      "without a current VMCS, and checks each outcome (VMsucceed, VMfailInvalid, VMfailValid with the "
      "SDM's error number read back from the VM-instruction error field, #UD).",
      {},
      run,
  });
}

}  // namespace nestcache::workloads
