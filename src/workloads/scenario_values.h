// The vocabulary of scenario files (docs/scenarios.md): value expressions,
// outcomes, and the names a file may use for VMCS fields, control bits,
// errnos, exit reasons, nested-state header fields and counters.
//
// Every table here is built from the project's own definitions (vmx_defs.h,
// vmcs12.h, nested_state_format.h, counters.h), so a name means exactly what
// the model means by it.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/error.h"
#include "base/types.h"

namespace nestcache::workloads::scenario {

// A numeric expression: terms joined by '+', '-' or '|', each a number
// (decimal, 0x hex, optional K/M/G suffix), a name, or a term shifted
// ("1<<50"); a leading '~' inverts the result. Names are resolved when the
// expression is parsed, except region names, which stand for the region's
// host-virtual address and are known only once the VM exists.
struct Expr {
  struct Term {
    char op = '+';       // how it joins the terms before it: '+', '-', '|'
    uint64_t value = 0;  // literal, page address, constant, control bit
    std::string region;  // set: the value is this region's hva (then shifted)
    unsigned shift = 0;
  };
  std::vector<Term> terms;
  bool invert = false;
  std::string text;  // as written, for messages

  // A literal expression.
  static Expr of(uint64_t v);
  // Evaluates with `regions` (name -> hva). Region names were checked at
  // parse time, so a missing one is a programming error (returns 0).
  uint64_t eval(const std::map<std::string, Hva>& regions = {}) const;
  bool uses_regions() const;
};

// What names an expression may use besides numbers.
struct NameScope {
  const std::map<std::string, uint64_t>* pages = nullptr;    // gpa names
  const std::map<std::string, uint64_t>* regions = nullptr;  // region names (sizes; value at run time)
  bool control_bits = true;  // "pin.posted_interrupts", "proc2.enable_ept", ...
};

// Parses an expression written as a JSON string. JSON integers are taken as
// they are (negative ones as two's complement). EINVAL naming the bad token.
Result<Expr> parse_expr(std::string_view text, const NameScope& scope);

// Names always available: invalid (all ones), vmcs12_revision, evmcs_revision,
// page (4096).
std::optional<uint64_t> constant_value(std::string_view name);
// "pin.posted_interrupts" -> the bit; every name of vmx_defs.h's control
// namespaces (pin, proc, proc2, exit, entry) and eptp.wb etc.
std::optional<uint64_t> control_bit(std::string_view name);
// Comma-separated list of the control-bit names, for messages.
std::string control_bit_names();

// A VMCS field by vmcs12 member name ("guest_rip"), by encoding ("0x681e"),
// or the high half of a 64-bit field ("msr_bitmap.high"). The encoding need
// not be one the model supports (that is what VMfailValid(12) is for).
Result<uint32_t> parse_field(std::string_view text);
// The vmcs12 member name of an encoding, or "0x681e" for an unknown one.
std::string field_name(uint32_t encoding);

// errno names understood in expectations: EINVAL, EEXIST, EFAULT, E2BIG, ...
std::optional<int> errno_from_name(std::string_view name);
std::string errno_name(int code);

// Exit reasons by the names vmx::exit_reason_name gives ("VMCALL") or number.
std::optional<uint32_t> exit_reason_from_name(std::string_view name);
std::string exit_reason_text(uint32_t basic_reason);

// A nested-state header field by name: its byte offset and size.
struct HeaderField {
  size_t offset;
  size_t size;
};
std::optional<HeaderField> nested_state_header_field(std::string_view name);
std::string nested_state_header_field_names();

// The outcome of one step, expected or observed.
struct Outcome {
  enum class Kind {
    ok,              // completed (VMsucceed, an ioctl returning 0, a load/store)
    errno_code,      // an ioctl-style error: code = errno
    fail_invalid,    // VMfailInvalid
    fail_valid,      // VMfailValid: code = VM-instruction error
    fault,           // an exception in L1: code = vector
    exit,            // VMLAUNCH/VMRESUME/run ended in an L2 exit to L1: code = basic reason
    entry_failure,   // ... in a VM-entry failure (exit reason bit 31): code = basic reason
    internal_error,  // a KVM internal error: the VMM's KVM_RUN failed
    error,           // the runner itself could not do the step (never expected)
  };
  Kind kind = Kind::ok;
  uint64_t code = 0;

  // "ok", "EINVAL", "VMfailInvalid", "VMfailValid(11)", "#UD", "exit(VMCALL)",
  // "entry_failure(INVALID_GUEST_STATE)", "internal_error", "error".
  std::string to_string() const;
  bool operator==(const Outcome&) const = default;
};

// Parses an expected outcome written as Outcome::to_string prints it (exit
// reasons and vectors also by number: "exit(18)", "#6"). EINVAL listing the
// accepted forms.
Result<Outcome> parse_outcome(std::string_view text);

}  // namespace nestcache::workloads::scenario
