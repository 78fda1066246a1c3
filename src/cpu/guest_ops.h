// The operations guest code issues, and the results the CPU model answers with.
//
// Guest code (the L1 mini-hypervisor, L2 test programs) never touches memory,
// MSRs or VMX state itself: it hands a GuestOp to the CPU model and waits for
// an OpResult (see cpu/guest_task.h for the coroutine side). This header is the
// vocabulary both sides share; it has no coroutine machinery in it.
#pragma once

#include <array>
#include <concepts>
#include <cstdint>
#include <exception>
#include <string>
#include <type_traits>
#include <variant>

#include "base/types.h"
#include "vmx/vmx_defs.h"

namespace nestcache::cpu {

// Exception vectors the CPU model injects most often (SDM Vol. 3 §6.15).
inline constexpr uint8_t kVectorDE = 0;   // divide error
inline constexpr uint8_t kVectorUD = 6;   // invalid opcode
inline constexpr uint8_t kVectorGP = 13;  // general protection
inline constexpr uint8_t kVectorPF = 14;  // page fault

namespace detail {
template <class T, class V>
struct is_variant_alternative : std::false_type {};
template <class T, class... Ts>
struct is_variant_alternative<T, std::variant<Ts...>>
    : std::bool_constant<(std::is_same_v<T, Ts> || ...)> {};
}  // namespace detail

// One operation of guest code: an instruction (or a tiny instruction sequence)
// whose outcome depends on the processor state the CPU model holds.
//
// Each alternative is an aggregate named after the instruction, with its name
// in lower case in kName; write `GuestOp::Read{.gpa = x, .size = 4}`. The value
// an operation produces is in OpResult::value; alternatives without one leave
// it 0.
struct GuestOp {
  // Load `size` (1, 2, 4 or 8) bytes at `gpa`, zero-extended into value.
  struct Read {
    static constexpr const char* kName = "read";
    Gpa gpa = 0;
    uint8_t size = 8;
  };
  // Store the low `size` (1, 2, 4 or 8) bytes of `value` at `gpa`.
  struct Write {
    static constexpr const char* kName = "write";
    Gpa gpa = 0;
    uint8_t size = 8;
    uint64_t value = 0;
  };
  // LOCK CMPXCHG of 8 bytes at `gpa` (8-aligned): if the qword equals
  // `expected` it becomes `desired`. value = the old qword either way. Used to
  // spin on sync pages: it never exits by itself (no PAUSE), as upstream's
  // guest loop.
  struct CmpXchg {
    static constexpr const char* kName = "cmpxchg";
    Gpa gpa = 0;
    uint64_t expected = 0;
    uint64_t desired = 0;
  };
  // RDMSR: value = the MSR's contents. An MSR the vCPU does not have → #GP(0).
  struct Rdmsr {
    static constexpr const char* kName = "rdmsr";
    uint32_t msr = 0;
  };
  // WRMSR of `value`. Includes x2APIC registers other than ICR and EOI, which
  // have their own operations below.
  struct Wrmsr {
    static constexpr const char* kName = "wrmsr";
    uint32_t msr = 0;
    uint64_t value = 0;
  };
  // MOV to CR8 (the TPR, bits 3:0 of `value`).
  struct WriteCr8 {
    static constexpr const char* kName = "write_cr8";
    uint64_t value = 0;
  };
  // MOV from CR8: value = the TPR's priority class.
  struct ReadCr8 {
    static constexpr const char* kName = "read_cr8";
  };
  // VMCALL with hypercall number `nr` (RAX) and up to three arguments
  // (RBX, RCX, RDX); value = what the handler put in RAX.
  struct Vmcall {
    static constexpr const char* kName = "vmcall";
    uint64_t nr = 0;
    std::array<uint64_t, 3> args{};
  };
  // HLT: completes once an interrupt has woken the vCPU (and been handled).
  struct Hlt {
    static constexpr const char* kName = "hlt";
  };
  // PAUSE: a spin-loop hint; may cause a PAUSE-loop exit.
  struct Pause {
    static constexpr const char* kName = "pause";
  };
  // WRMSR to the x2APIC ICR: a fixed interrupt `vector` to `dest_apic_id`.
  struct SendIpi {
    static constexpr const char* kName = "send_ipi";
    uint32_t dest_apic_id = 0;
    uint8_t vector = 0;
  };
  // WRMSR to the x2APIC EOI register.
  struct Eoi {
    static constexpr const char* kName = "eoi";
  };
  // A monotonic clock read (RDTSC scaled to ns): value = nanoseconds.
  struct Now {
    static constexpr const char* kName = "now";
  };
  // Nothing but an operation boundary: lets the CPU model deliver pending
  // events (kicks, interrupts) in code that otherwise issues no operation.
  struct Yield {
    static constexpr const char* kName = "yield";
  };

  // VMX instructions (L1 only; from L2 each one exits to L1). Each can end in
  // VMfailInvalid or VMfailValid (OpResult::outcome) besides faulting.
  struct Vmxon {
    static constexpr const char* kName = "vmxon";
    Gpa gpa = 0;  // the VMXON region
  };
  struct Vmxoff {
    static constexpr const char* kName = "vmxoff";
  };
  struct Vmclear {
    static constexpr const char* kName = "vmclear";
    Gpa gpa = 0;
  };
  struct Vmptrld {
    static constexpr const char* kName = "vmptrld";
    Gpa gpa = 0;
  };
  // value = the current-VMCS pointer (kInvalidGpa if none).
  struct Vmptrst {
    static constexpr const char* kName = "vmptrst";
  };
  // value = the field's contents. `field` is the SDM encoding.
  struct Vmread {
    static constexpr const char* kName = "vmread";
    uint32_t field = 0;
  };
  struct Vmwrite {
    static constexpr const char* kName = "vmwrite";
    uint32_t field = 0;
    uint64_t value = 0;
  };
  // VMLAUNCH / VMRESUME. A failed entry answers at once with a VMfail. A
  // successful one runs L2 and answers only when L2 exits back to L1: the CPU
  // model keeps this operation pending for the whole time L2 runs, then
  // completes it with `ok` (L1 reads the exit reason with VMREAD), just as L1
  // "returns" from VMRESUME at its host RIP.
  struct Vmlaunch {
    static constexpr const char* kName = "vmlaunch";
  };
  struct Vmresume {
    static constexpr const char* kName = "vmresume";
  };
  struct Invept {
    static constexpr const char* kName = "invept";
    vmx::InveptType type = vmx::InveptType::single_context;
    uint64_t eptp = 0;
  };
  struct Invvpid {
    static constexpr const char* kName = "invvpid";
    vmx::InvvpidType type = vmx::InvvpidType::single_context;
    uint16_t vpid = 0;
    uint64_t gla = 0;  // for individual_address only
  };

  using Variant =
      std::variant<Read, Write, CmpXchg, Rdmsr, Wrmsr, WriteCr8, ReadCr8, Vmcall, Hlt, Pause,
                   SendIpi, Eoi, Now, Yield, Vmxon, Vmxoff, Vmclear, Vmptrld, Vmptrst, Vmread,
                   Vmwrite, Vmlaunch, Vmresume, Invept, Invvpid>;

  // Whether T is one of the alternatives above.
  template <class T>
  static constexpr bool is_alternative = detail::is_variant_alternative<T, Variant>::value;

  // Implicit from any alternative: `GuestOp op = GuestOp::Hlt{};`.
  template <class T>
    requires is_alternative<T>
  GuestOp(const T& alternative) : v(alternative) {}

  // True if this operation is a T.
  template <class T>
    requires is_alternative<T>
  bool is() const {
    return std::holds_alternative<T>(v);
  }
  // The T inside, or null if this operation is something else.
  template <class T>
    requires is_alternative<T>
  const T* get_if() const {
    return std::get_if<T>(&v);
  }
  // std::visit over the alternative; `f` must accept every one of them.
  template <class F>
  decltype(auto) visit(F&& f) const {
    return std::visit(std::forward<F>(f), v);
  }

  // The instruction's name in lower case ("read", "vmresume", ...).
  const char* name() const {
    return visit([](const auto& alternative) { return alternative.kName; });
  }
  // True for the VMX instructions (VMXON … INVVPID), the only operations that
  // may end in VMfailInvalid / VMfailValid.
  bool is_vmx_instruction() const;

  Variant v;
};

// "read(gpa=0x1000, size=8)", for logs and test failures.
std::string to_string(const GuestOp& op);

// How an operation ended.
enum class Outcome : uint8_t {
  ok,            // it completed; value holds its result
  fail_invalid,  // VMX instruction: VMfailInvalid (CF=1), no current VMCS to hold an error
  fail_valid,    // VMX instruction: VMfailValid (ZF=1), vm_instruction_error says why
  fault,         // an exception was raised in the guest: vector, error_code
};

// The CPU model's answer to one GuestOp.
struct OpResult {
  uint64_t value = 0;
  Outcome outcome = Outcome::ok;
  uint8_t vector = 0;               // fault: the exception vector (< 32)
  uint32_t error_code = 0;          // fault: the exception's error code, if it has one
  uint32_t vm_instruction_error = 0;  // fail_valid: the SDM VM-instruction error number

  // Completed, producing `value`.
  static OpResult success(uint64_t value = 0) { return OpResult{.value = value}; }
  // VMfailInvalid.
  static OpResult fail_invalid() { return OpResult{.outcome = Outcome::fail_invalid}; }
  // VMfailValid with VM-instruction error `error` (SDM Vol. 3 §31.4).
  static OpResult fail_valid(uint32_t error) {
    return OpResult{.outcome = Outcome::fail_valid, .vm_instruction_error = error};
  }
  // Exception `vector` (e.g. kVectorGP) with `error_code`, injected into the guest.
  static OpResult exception(uint8_t vector, uint32_t error_code = 0) {
    return OpResult{.outcome = Outcome::fault, .vector = vector, .error_code = error_code};
  }

  bool ok() const { return outcome == Outcome::ok; }
  friend bool operator==(const OpResult&, const OpResult&) = default;
};

// "ok(0x2a)", "VMfailValid(7)", "#GP(0)", for logs and test failures.
std::string to_string(const OpResult& result);

// Thrown inside guest code when an operation whose awaitable returns a plain
// value (read64, rdmsr, ...) does not end `ok`: the guest's exception handler
// is the C++ catch. Guest code may catch it (an rdmsr_safe-style probe);
// uncaught, it ends the task and the driver sees it from rethrow_if_failed().
// VMX instructions never throw it: their awaitables return the OpResult.
class GuestFault : public std::exception {
 public:
  GuestFault(const GuestOp& op, const OpResult& result);

  const GuestOp& op() const { return op_; }
  const OpResult& result() const { return result_; }
  // "rdmsr(msr=0x123) raised #GP(0)".
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  GuestOp op_;
  OpResult result_;
  std::string message_;
};

}  // namespace nestcache::cpu
