#include "vmx/op_result.h"

#include <fmt/format.h>

namespace nestcache::vmx {
namespace {

// Exception mnemonics by vector (SDM Vol. 3A Table 6-1); 9, 15 and 22-31 are reserved.
constexpr const char* kVectorNames[32] = {"DE", "DB", "NMI", "BP", "OF", "BR", "UD", "NM", "DF", "09", "TS",
                                          "NP", "SS", "GP",  "PF", "15", "MF", "AC", "MC", "XM", "VE", "CP",
                                          "22", "23", "24",  "25", "26", "27", "28", "29", "30", "31"};

// Vectors that push an error code.
bool has_error_code(uint8_t vector) {
  return vector == 8 || (vector >= 10 && vector <= 14) || vector == 17 || vector == 21;
}

std::string plain(const OpResult& result) {
  switch (result.outcome) {
    case Outcome::ok: return fmt::format("ok({:#x})", result.value);
    case Outcome::fail_invalid: return "VMfailInvalid";
    case Outcome::fail_valid: return fmt::format("VMfailValid({})", result.vm_instruction_error);
    case Outcome::fault:
      if (result.vector >= 32) return fmt::format("fault(vector={})", unsigned{result.vector});
      if (has_error_code(result.vector)) return fmt::format("#{}({:#x})", kVectorNames[result.vector], result.error_code);
      return fmt::format("#{}", kVectorNames[result.vector]);
  }
  return "outcome?";
}

}  // namespace

std::string to_string(const OpResult& result) {
  std::string s = plain(result);
  if (!result.why.empty()) s += ": " + result.why;
  return s;
}

}  // namespace nestcache::vmx
