// Names, expressions and outcomes of scenario files (see scenario_values.h).
#include "workloads/scenario_values.h"

#include <cctype>
#include <charconv>

#include "base/counters.h"
#include "vmx/evmcs.h"
#include "vmx/nested_state_format.h"
#include "vmx/vmcs12.h"
#include "vmx/vmx_defs.h"

namespace nestcache::workloads::scenario {

namespace {

struct NamedValue {
  std::string_view name;
  uint64_t value;
};

// Control bits and other architectural constants, by the names vmx_defs.h
// gives them (lower case, without the k), qualified by their namespace.
constexpr NamedValue kControlBits[] = {
    {"pin.external_interrupt_exiting", vmx::pin::kExternalInterruptExiting},
    {"pin.nmi_exiting", vmx::pin::kNmiExiting},
    {"pin.virtual_nmis", vmx::pin::kVirtualNmis},
    {"pin.preemption_timer", vmx::pin::kPreemptionTimer},
    {"pin.posted_interrupts", vmx::pin::kPostedInterrupts},
    {"pin.always_on", vmx::pin::kAlwaysOn},
    {"proc.interrupt_window_exiting", vmx::proc::kInterruptWindowExiting},
    {"proc.use_tsc_offsetting", vmx::proc::kUseTscOffsetting},
    {"proc.hlt_exiting", vmx::proc::kHltExiting},
    {"proc.invlpg_exiting", vmx::proc::kInvlpgExiting},
    {"proc.mwait_exiting", vmx::proc::kMwaitExiting},
    {"proc.rdpmc_exiting", vmx::proc::kRdpmcExiting},
    {"proc.rdtsc_exiting", vmx::proc::kRdtscExiting},
    {"proc.cr3_load_exiting", vmx::proc::kCr3LoadExiting},
    {"proc.cr3_store_exiting", vmx::proc::kCr3StoreExiting},
    {"proc.cr8_load_exiting", vmx::proc::kCr8LoadExiting},
    {"proc.cr8_store_exiting", vmx::proc::kCr8StoreExiting},
    {"proc.use_tpr_shadow", vmx::proc::kUseTprShadow},
    {"proc.nmi_window_exiting", vmx::proc::kNmiWindowExiting},
    {"proc.mov_dr_exiting", vmx::proc::kMovDrExiting},
    {"proc.unconditional_io_exiting", vmx::proc::kUnconditionalIoExiting},
    {"proc.use_io_bitmaps", vmx::proc::kUseIoBitmaps},
    {"proc.monitor_trap_flag", vmx::proc::kMonitorTrapFlag},
    {"proc.use_msr_bitmaps", vmx::proc::kUseMsrBitmaps},
    {"proc.monitor_exiting", vmx::proc::kMonitorExiting},
    {"proc.pause_exiting", vmx::proc::kPauseExiting},
    {"proc.activate_secondary_controls", vmx::proc::kActivateSecondaryControls},
    {"proc.always_on", vmx::proc::kAlwaysOn},
    {"proc2.virtualize_apic_accesses", vmx::proc2::kVirtualizeApicAccesses},
    {"proc2.enable_ept", vmx::proc2::kEnableEpt},
    {"proc2.descriptor_table_exiting", vmx::proc2::kDescriptorTableExiting},
    {"proc2.enable_rdtscp", vmx::proc2::kEnableRdtscp},
    {"proc2.virtualize_x2apic_mode", vmx::proc2::kVirtualizeX2apicMode},
    {"proc2.enable_vpid", vmx::proc2::kEnableVpid},
    {"proc2.wbinvd_exiting", vmx::proc2::kWbinvdExiting},
    {"proc2.unrestricted_guest", vmx::proc2::kUnrestrictedGuest},
    {"proc2.apic_register_virtualization", vmx::proc2::kApicRegisterVirtualization},
    {"proc2.virtual_interrupt_delivery", vmx::proc2::kVirtualInterruptDelivery},
    {"proc2.pause_loop_exiting", vmx::proc2::kPauseLoopExiting},
    {"proc2.enable_invpcid", vmx::proc2::kEnableInvpcid},
    {"proc2.enable_vm_functions", vmx::proc2::kEnableVmFunctions},
    {"proc2.vmcs_shadowing", vmx::proc2::kVmcsShadowing},
    {"proc2.enable_pml", vmx::proc2::kEnablePml},
    {"proc2.ept_violation_ve", vmx::proc2::kEptViolationVe},
    {"proc2.enable_xsaves", vmx::proc2::kEnableXsaves},
    {"exit.save_debug_controls", vmx::exit_ctl::kSaveDebugControls},
    {"exit.host_address_space_size", vmx::exit_ctl::kHostAddressSpaceSize},
    {"exit.load_perf_global_ctrl", vmx::exit_ctl::kLoadPerfGlobalCtrl},
    {"exit.ack_interrupt_on_exit", vmx::exit_ctl::kAckInterruptOnExit},
    {"exit.save_pat", vmx::exit_ctl::kSavePat},
    {"exit.load_pat", vmx::exit_ctl::kLoadPat},
    {"exit.save_efer", vmx::exit_ctl::kSaveEfer},
    {"exit.load_efer", vmx::exit_ctl::kLoadEfer},
    {"exit.save_preemption_timer", vmx::exit_ctl::kSavePreemptionTimer},
    {"exit.always_on", vmx::exit_ctl::kAlwaysOn},
    {"entry.load_debug_controls", vmx::entry_ctl::kLoadDebugControls},
    {"entry.ia32e_mode_guest", vmx::entry_ctl::kIa32eModeGuest},
    {"entry.entry_to_smm", vmx::entry_ctl::kEntryToSmm},
    {"entry.load_perf_global_ctrl", vmx::entry_ctl::kLoadPerfGlobalCtrl},
    {"entry.load_pat", vmx::entry_ctl::kLoadPat},
    {"entry.load_efer", vmx::entry_ctl::kLoadEfer},
    {"entry.always_on", vmx::entry_ctl::kAlwaysOn},
    {"eptp.uc", vmx::eptp::kMemTypeUc},
    {"eptp.wb", vmx::eptp::kMemTypeWb},
    {"eptp.walk4", vmx::eptp::kWalkLength4},
    {"eptp.ad", vmx::eptp::kAccessedDirty},
    {"intr.valid", vmx::intr_info::kValid},
    {"intr.deliver_error_code", vmx::intr_info::kDeliverErrorCode},
    {"intr.type_external", uint64_t{vmx::intr_info::kTypeExternalInterrupt} << vmx::intr_info::kTypeShift},
    {"intr.type_reserved", uint64_t{vmx::intr_info::kTypeReserved} << vmx::intr_info::kTypeShift},
    {"intr.type_nmi", uint64_t{vmx::intr_info::kTypeNmi} << vmx::intr_info::kTypeShift},
    {"intr.type_hardware_exception", uint64_t{vmx::intr_info::kTypeHardwareException} << vmx::intr_info::kTypeShift},
    {"intr.type_software_interrupt", uint64_t{vmx::intr_info::kTypeSoftwareInterrupt} << vmx::intr_info::kTypeShift},
    {"intr.type_privileged_software_exception",
     uint64_t{vmx::intr_info::kTypePrivilegedSoftwareException} << vmx::intr_info::kTypeShift},
    {"intr.type_software_exception", uint64_t{vmx::intr_info::kTypeSoftwareException} << vmx::intr_info::kTypeShift},
    {"intr.type_other_event", uint64_t{vmx::intr_info::kTypeOtherEvent} << vmx::intr_info::kTypeShift},
    {"cr0.pe", vmx::kCr0Pe},
    {"cr0.ne", vmx::kCr0Ne},
    {"cr0.pg", vmx::kCr0Pg},
    {"cr4.pae", vmx::kCr4Pae},
    {"cr4.vmxe", vmx::kCr4Vmxe},
    {"rflags.fixed1", vmx::kRflagsFixed1},
    {"vp_assist.enable", vmx::kVpAssistPageEnable},
    {"evmcs.msr_bitmap", vmx::evmcs_enlightenment::kMsrBitmap},
    {"evmcs.flush_hypercall", vmx::evmcs_enlightenment::kNestedFlushHypercall},
    {"msr.vp_assist_page", vmx::kHvX64MsrVpAssistPage},
    {"msr.efer", vmx::msr::kIa32Efer},
    {"msr.pat", vmx::msr::kIa32Pat},
    {"msr.fs_base", vmx::msr::kIa32FsBase},
    {"msr.x2apic_tpr", vmx::msr::kX2apicTpr},
    {"ns.guest_mode", vmx::nested_state_flag::kGuestMode},
    {"ns.run_pending", vmx::nested_state_flag::kRunPending},
    {"ns.evmcs", vmx::nested_state_flag::kEvmcs},
};

constexpr NamedValue kConstants[] = {
    {"invalid", ~uint64_t{0}},
    {"vmcs12_revision", vmx::kVmcs12Revision},
    {"evmcs_revision", vmx::kEvmcsRevision},
    {"page", kPageSize},
};

struct HeaderFieldName {
  std::string_view name;
  HeaderField field;
};
constexpr HeaderFieldName kHeaderFields[] = {
    {"magic", {vmx::nested_state_offset::kMagic, 4}},
    {"version", {vmx::nested_state_offset::kVersion, 2}},
    {"header_size", {vmx::nested_state_offset::kHeaderSize, 2}},
    {"total_size", {vmx::nested_state_offset::kTotalSize, 4}},
    {"flags", {vmx::nested_state_offset::kFlags, 4}},
    {"vmxon_gpa", {vmx::nested_state_offset::kVmxonGpa, 8}},
    {"current_vmcs_gpa", {vmx::nested_state_offset::kCurrentVmcsGpa, 8}},
    {"vmcs12_size", {vmx::nested_state_offset::kVmcs12Size, 4}},
    {"reserved", {vmx::nested_state_offset::kReserved, 4}},
};

struct ErrnoName {
  std::string_view name;
  int code;
};
constexpr ErrnoName kErrnos[] = {
    {"EINVAL", EINVAL}, {"EEXIST", EEXIST}, {"EFAULT", EFAULT}, {"E2BIG", E2BIG},   {"ENOENT", ENOENT},
    {"EBUSY", EBUSY},   {"ENOMEM", ENOMEM}, {"EIO", EIO},       {"ENOSPC", ENOSPC}, {"EPERM", EPERM},
    {"ENXIO", ENXIO},   {"ERANGE", ERANGE}, {"EAGAIN", EAGAIN}, {"ETIMEDOUT", ETIMEDOUT},
    {"EOPNOTSUPP", EOPNOTSUPP},
};

bool is_name_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.'; }

std::optional<uint64_t> parse_number(std::string_view s) {
  if (s.empty()) return std::nullopt;
  int base = 10;
  if (s.size() > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
    base = 16;
    s.remove_prefix(2);
  }
  uint64_t mult = 1;
  if (base == 10 && !s.empty()) {
    switch (s.back()) {
      case 'K': mult = uint64_t{1} << 10; break;
      case 'M': mult = uint64_t{1} << 20; break;
      case 'G': mult = uint64_t{1} << 30; break;
      default: break;
    }
    if (mult != 1) s.remove_suffix(1);
  }
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v, base);
  if (ec != std::errc() || p != s.data() + s.size()) return std::nullopt;
  if (mult != 1 && v > ~uint64_t{0} / mult) return std::nullopt;
  return v * mult;
}

std::string join_keys(const std::map<std::string, uint64_t>* m) {
  std::string out;
  if (!m) return out;
  for (const auto& [k, v] : *m) out += (out.empty() ? "" : ", ") + k;
  return out;
}

// Resolves one atom of an expression into `t`.
Status resolve_atom(std::string_view atom, const NameScope& scope, Expr::Term& t) {
  if (auto n = parse_number(atom)) {
    t.value = *n;
    return ok();
  }
  // Names start with a letter: an atom starting with a digit is a number
  // parse_number refused (too large, a bad digit or suffix).
  if (std::isdigit(static_cast<unsigned char>(atom[0])))
    return errorf(EINVAL, "'{}' is not a number: digits of its base, an optional K, M or G, at most 2^64-1", atom);
  const std::string name(atom);
  if (scope.pages && scope.pages->count(name)) {
    t.value = scope.pages->at(name);
    return ok();
  }
  if (scope.regions && scope.regions->count(name)) {
    t.region = name;
    return ok();
  }
  if (auto c = constant_value(atom)) {
    t.value = *c;
    return ok();
  }
  if (scope.control_bits) {
    if (auto b = control_bit(atom)) {
      t.value = *b;
      return ok();
    }
  }
  return errorf(EINVAL,
                "unknown name '{}' (pages: {}; regions: {}; constants: invalid, vmcs12_revision, evmcs_revision, "
                "page; or a control bit such as proc.use_tpr_shadow)",
                atom, join_keys(scope.pages), join_keys(scope.regions));
}

}  // namespace

Expr Expr::of(uint64_t v) {
  Expr e;
  e.terms.push_back({'+', v, {}, 0});
  e.text = fmt::format("{:#x}", v);
  return e;
}

uint64_t Expr::eval(const std::map<std::string, Hva>& regions) const {
  uint64_t acc = 0;
  for (const Term& t : terms) {
    uint64_t v = t.value;
    if (!t.region.empty()) {
      auto it = regions.find(t.region);
      v = it == regions.end() ? 0 : it->second;
    }
    v = t.shift >= 64 ? 0 : v << t.shift;
    switch (t.op) {
      case '-': acc -= v; break;
      case '|': acc |= v; break;
      default: acc += v; break;
    }
  }
  return invert ? ~acc : acc;
}

bool Expr::uses_regions() const {
  for (const Term& t : terms)
    if (!t.region.empty()) return true;
  return false;
}

Result<Expr> parse_expr(std::string_view text, const NameScope& scope) {
  Expr e;
  e.text = std::string(text);
  size_t i = 0;
  auto skip = [&] {
    while (i < text.size() && text[i] == ' ') i++;
  };
  skip();
  if (i < text.size() && text[i] == '~') {
    e.invert = true;
    i++;
  }
  char op = '+';
  for (;;) {
    skip();
    bool negative = false;
    if (e.terms.empty() && i < text.size() && text[i] == '-') {  // "-1"
      negative = true;
      i++;
    }
    size_t start = i;
    while (i < text.size() && is_name_char(text[i])) i++;
    if (start == i) return errorf(EINVAL, "expression '{}': expected a number or a name at position {}", text, start);
    Expr::Term t;
    t.op = negative ? '-' : op;
    NC_TRY(resolve_atom(text.substr(start, i - start), scope, t));
    skip();
    if (text.substr(i, 2) == "<<") {
      i += 2;
      skip();
      size_t s = i;
      while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) i++;
      auto sh = parse_number(text.substr(s, i - s));
      if (!sh || *sh > 63) return errorf(EINVAL, "expression '{}': a shift needs a count 0..63", text);
      t.shift = static_cast<unsigned>(*sh);
      skip();
    }
    e.terms.push_back(t);
    if (i == text.size()) break;
    if (text[i] != '+' && text[i] != '-' && text[i] != '|')
      return errorf(EINVAL, "expression '{}': unexpected '{}' at position {} (terms join with +, - or |)", text,
                    text[i], i);
    op = text[i++];
  }
  return e;
}

std::optional<uint64_t> constant_value(std::string_view name) {
  for (const auto& c : kConstants)
    if (c.name == name) return c.value;
  return std::nullopt;
}

std::optional<uint64_t> control_bit(std::string_view name) {
  for (const auto& c : kControlBits)
    if (c.name == name) return c.value;
  return std::nullopt;
}

std::string control_bit_names() {
  std::string out;
  for (const auto& c : kControlBits) out += fmt::format("{}{}", out.empty() ? "" : ", ", c.name);
  return out;
}

Result<uint32_t> parse_field(std::string_view text) {
  std::string_view name = text;
  bool high = false;
  if (name.size() > 5 && name.substr(name.size() - 5) == ".high") {
    high = true;
    name.remove_suffix(5);
  }
  for (const vmx::FieldInfo& f : vmx::vmcs12_fields()) {
    if (f.name != name) continue;
    if (high && f.width() != vmx::FieldWidth::k64)
      return errorf(EINVAL, "field '{}': only 64-bit fields have a .high half", text);
    return f.encoding | (high ? 1u : 0u);
  }
  if (auto n = parse_number(text); n && *n <= 0xffffffffu) return static_cast<uint32_t>(*n);
  return errorf(EINVAL, "unknown VMCS field '{}': use a vmcs12 member name (guest_rip, tpr_threshold, ...) or an "
                        "encoding such as 0x681e", text);
}

std::string field_name(uint32_t encoding) {
  const bool high = encoding & 1;
  if (const vmx::FieldInfo* f = vmx::find_vmcs12_field(encoding & ~1u); f && (!high || f->width() == vmx::FieldWidth::k64))
    return high ? fmt::format("{}.high", f->name) : std::string(f->name);
  return fmt::format("{:#x}", encoding);
}

std::optional<int> errno_from_name(std::string_view name) {
  for (const auto& e : kErrnos)
    if (e.name == name) return e.code;
  return std::nullopt;
}

std::string errno_name(int code) {
  for (const auto& e : kErrnos)
    if (e.code == code) return std::string(e.name);
  return fmt::format("errno {}", code);
}

std::optional<uint32_t> exit_reason_from_name(std::string_view name) {
  if (auto n = parse_number(name); n && *n <= 0xffff) return static_cast<uint32_t>(*n);
  for (uint32_t r = 0; r < 80; r++)
    if (vmx::exit_reason_name(static_cast<vmx::ExitReason>(r)) == name) return r;
  return std::nullopt;
}

std::string exit_reason_text(uint32_t basic_reason) {
  std::string_view n = vmx::exit_reason_name(static_cast<vmx::ExitReason>(basic_reason));
  return n == "UNKNOWN" ? std::to_string(basic_reason) : std::string(n);
}

std::optional<HeaderField> nested_state_header_field(std::string_view name) {
  for (const auto& h : kHeaderFields)
    if (h.name == name) return h.field;
  return std::nullopt;
}

std::string nested_state_header_field_names() {
  std::string out;
  for (const auto& h : kHeaderFields) out += fmt::format("{}{}", out.empty() ? "" : ", ", h.name);
  return out + ", size, vmcs12.<field>";
}

std::string Outcome::to_string() const {
  switch (kind) {
    case Kind::ok: return "ok";
    case Kind::errno_code: return errno_name(static_cast<int>(code));
    case Kind::fail_invalid: return "VMfailInvalid";
    case Kind::fail_valid: return fmt::format("VMfailValid({})", code);
    case Kind::fault:
      switch (code) {
        case 6: return "#UD";
        case 13: return "#GP";
        case 14: return "#PF";
        default: return fmt::format("#{}", code);
      }
    case Kind::exit: return fmt::format("exit({})", exit_reason_text(static_cast<uint32_t>(code)));
    case Kind::entry_failure: return fmt::format("entry_failure({})", exit_reason_text(static_cast<uint32_t>(code)));
    case Kind::internal_error: return "internal_error";
    case Kind::error: return "error";
  }
  return "?";
}

namespace {

// "name(arg)" -> arg, if `text` has that shape.
std::optional<std::string_view> call_arg(std::string_view text, std::string_view name) {
  if (text.size() < name.size() + 2 || text.substr(0, name.size()) != name || text[name.size()] != '(' ||
      text.back() != ')')
    return std::nullopt;
  return text.substr(name.size() + 1, text.size() - name.size() - 2);
}

}  // namespace

Result<Outcome> parse_outcome(std::string_view text) {
  using K = Outcome::Kind;
  auto bad = [&] {
    return errorf(EINVAL,
                  "unknown outcome '{}': expected ok, an errno name (EINVAL, EEXIST, E2BIG, EFAULT, ...), "
                  "VMfailInvalid, VMfailValid(N), #UD, #GP, #N, exit(REASON), entry_failure(REASON) or "
                  "internal_error",
                  text);
  };
  if (text == "ok") return Outcome{K::ok, 0};
  if (text == "VMfailInvalid") return Outcome{K::fail_invalid, 0};
  if (text == "internal_error") return Outcome{K::internal_error, 0};
  if (text == "#UD") return Outcome{K::fault, 6};
  if (text == "#GP") return Outcome{K::fault, 13};
  if (text == "#PF") return Outcome{K::fault, 14};
  if (!text.empty() && text[0] == '#') {
    auto v = parse_number(text.substr(1));
    if (!v || *v > 31) return bad();
    return Outcome{K::fault, *v};
  }
  if (auto e = errno_from_name(text)) return Outcome{K::errno_code, static_cast<uint64_t>(*e)};
  if (auto arg = call_arg(text, "VMfailValid")) {
    auto v = parse_number(*arg);
    if (!v || *v > 28) return errorf(EINVAL, "outcome '{}': VMfailValid takes an error number 1..28", text);
    return Outcome{K::fail_valid, *v};
  }
  for (auto [name, kind] : {std::pair{std::string_view("exit"), K::exit},
                            std::pair{std::string_view("entry_failure"), K::entry_failure}}) {
    if (auto arg = call_arg(text, name)) {
      auto r = exit_reason_from_name(*arg);
      if (!r) return errorf(EINVAL, "outcome '{}': unknown exit reason '{}' (a name such as VMCALL, or a number)", text, *arg);
      return Outcome{kind, *r};
    }
  }
  return bad();
}

}  // namespace nestcache::workloads::scenario
