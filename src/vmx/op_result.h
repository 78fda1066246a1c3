// OpResult: how one instruction ended, as the guest that ran it observes it.
//
// The one outcome type of the project: the VMX instructions L0 emulates for
// L1 (NestedVmx) and the operations the CPU model executes (cpu::GuestOp)
// end in the same four ways — completed with a value, VMfailInvalid,
// VMfailValid with a VM-instruction error number (SDM Vol. 3C 30.2,
// "Conventions"), or an exception injected into the guest.
#pragma once

#include <cstdint>
#include <string>

#include "vmx/vmx_defs.h"

namespace nestcache::vmx {

// Exception vectors the model injects most often (SDM Vol. 3A 6.15).
inline constexpr uint8_t kVectorDE = 0;   // divide error
inline constexpr uint8_t kVectorUD = 6;   // invalid opcode
inline constexpr uint8_t kVectorGP = 13;  // general protection
inline constexpr uint8_t kVectorPF = 14;  // page fault

enum class Outcome : uint8_t {
  ok,            // it completed; value holds its result
  fail_invalid,  // VMX instruction: VMfailInvalid (CF=1), no current VMCS to hold an error
  fail_valid,    // VMX instruction: VMfailValid (ZF=1), vm_instruction_error says why
  fault,         // an exception was raised in the guest: vector, error_code
};

struct OpResult {
  uint64_t value = 0;
  Outcome outcome = Outcome::ok;
  uint8_t vector = 0;                 // fault: the exception vector (< 32)
  uint32_t error_code = 0;            // fault: the exception's error code, if it has one
  uint32_t vm_instruction_error = 0;  // fail_valid: the SDM VM-instruction error number
  // Why L0 ended the instruction so ("VMXON region revision 0x80000001 is
  // not 0x1"), for logs and failure messages; empty when it is plain. Not
  // architectural: operator== ignores it.
  std::string why = {};

  // Completed, producing `value`.
  static OpResult success(uint64_t value = 0) { return OpResult{.value = value}; }
  // VMfailInvalid.
  static OpResult fail_invalid(std::string why = {}) {
    return OpResult{.outcome = Outcome::fail_invalid, .why = std::move(why)};
  }
  // VMfailValid with VM-instruction error `error`.
  static OpResult fail_valid(uint32_t error, std::string why = {}) {
    return OpResult{.outcome = Outcome::fail_valid, .vm_instruction_error = error, .why = std::move(why)};
  }
  static OpResult fail_valid(VmInstructionError error, std::string why = {}) {
    return fail_valid(static_cast<uint32_t>(error), std::move(why));
  }
  // Exception `vector` (e.g. kVectorGP) with `error_code`, injected into the guest.
  static OpResult exception(uint8_t vector, uint32_t error_code = 0, std::string why = {}) {
    return OpResult{.outcome = Outcome::fault, .vector = vector, .error_code = error_code, .why = std::move(why)};
  }
  // #UD: the instruction is not valid here (VMX off, an enlightened entry
  // whose eVMCS cannot be reached...).
  static OpResult undefined(std::string why = {}) { return exception(kVectorUD, 0, std::move(why)); }

  bool ok() const { return outcome == Outcome::ok; }
  friend bool operator==(const OpResult& a, const OpResult& b) {
    return a.value == b.value && a.outcome == b.outcome && a.vector == b.vector && a.error_code == b.error_code &&
           a.vm_instruction_error == b.vm_instruction_error;
  }
};

// "ok(0x2a)", "VMfailValid(7)", "#GP(0)"; with ": why" appended when the
// result carries a reason.
std::string to_string(const OpResult& result);

}  // namespace nestcache::vmx
