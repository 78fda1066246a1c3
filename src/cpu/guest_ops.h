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
#include "vmx/op_result.h"
#include "vmx/vmx_defs.h"

namespace nestcache::cpu {

// How an operation ends is the VMX layer's OpResult (vmx/op_result.h): VMX
// instructions emulated by L0 and operations the CPU model executes end the
// same ways.
using vmx::kVectorDE;
using vmx::kVectorGP;
using vmx::kVectorPF;
using vmx::kVectorUD;
using vmx::OpResult;
using vmx::Outcome;
using vmx::to_string;

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
  // `expected` it becomes `desired`. value = the old qword either way. It
  // never exits by itself.
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
  // MONITOR the 64-byte line of `gpa`, then MWAIT unless the qword at `gpa`
  // (8-aligned) differs from `expected`: the vCPU sleeps until another agent
  // writes the line, an interrupt arrives for it, or it is kicked; value =
  // the qword when it wakes (guest code loops until it changed). This is how
  // guest code waits for another vCPU: its thread parks instead of spinning,
  // and in modelled time it wakes at the writer's clock. `timeout_ns` > 0
  // bounds the sleep in real time, for a condition outside guest memory (a
  // host thread's progress); gpa == kInvalidGpa monitors nothing (a timed
  // sleep). Never exits (no MWAIT exiting in the model's vmcs12s).
  struct Mwait {
    static constexpr const char* kName = "mwait";
    Gpa gpa = 0;
    uint64_t expected = 0;
    uint64_t timeout_ns = 0;
  };
  // TPAUSE until the clock reads `deadline_ns` (as Now reports it), or an
  // interrupt or kick comes first: a delay that parks the thread. In modelled
  // time the clock moves on to the deadline.
  struct Tpause {
    static constexpr const char* kName = "tpause";
    uint64_t deadline_ns = 0;
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
  // A clock read (RDTSC scaled to ns): value = nanoseconds of modelled time,
  // or of wall time when the machine runs on the wall clock.
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
      std::variant<Read, Write, CmpXchg, Rdmsr, Wrmsr, WriteCr8, ReadCr8, Vmcall, Hlt, Pause, Mwait,
                   Tpause, SendIpi, Eoi, Now, Yield, Vmxon, Vmxoff, Vmclear, Vmptrld, Vmptrst, Vmread,
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
