// Nested VM-entry consistency checks (see entry_checks.h). Each block below
// is one SDM rule; the comment above it says which.
#include "vmx/entry_checks.h"

#include <string>

#include "vmx/evmcs.h"

namespace nestcache::vmx {

namespace {

tl::unexpected<VmxFail> bad_control(std::string_view rule, std::string message) {
  return tl::unexpected(
      VmxFail::valid(VmInstructionError::kEntryInvalidControlFields, rule, std::move(message)));
}

tl::unexpected<VmxFail> bad_host(std::string_view rule, std::string message) {
  return tl::unexpected(
      VmxFail::valid(VmInstructionError::kEntryInvalidHostStateFields, rule, std::move(message)));
}

tl::unexpected<VmxFail> bad_guest(std::string_view rule, uint64_t qualification,
                                  std::string message) {
  return tl::unexpected(VmxFail::entry_failure(ExitReason::kEntryFailInvalidGuestState,
                                               qualification, rule, std::move(message)));
}

// Allowed-settings check of one control word against its capability MSR.
VmxStatus check_allowed(std::string_view rule, std::string_view what, uint32_t value,
                        uint32_t must1, uint32_t may1) {
  const uint32_t missing = must1 & ~value;
  const uint32_t extra = value & ~may1;
  if (missing)
    return bad_control(rule, fmt::format("{} {:#010x}: bits {:#x} must be 1 (always-on bits of "
                                         "the capability MSR)",
                                         what, value, missing));
  if (extra)
    return bad_control(rule, fmt::format("{} {:#010x}: bits {:#x} are not supported by the "
                                         "modelled CPU and must be 0",
                                         what, value, extra));
  return {};
}

// "bits 11:0 zero and no bit beyond the physical-address width".
VmxStatus check_page_address(std::string_view rule, std::string_view what, uint64_t addr,
                             unsigned bits) {
  if (!page_aligned(addr))
    return bad_control(rule, fmt::format("{} {:#x} is not 4 KiB aligned", what, addr));
  if (!page_address_valid(addr, bits))
    return bad_control(
        rule, fmt::format("{} {:#x} exceeds the {}-bit physical-address width", what, addr, bits));
  return {};
}

bool canonical48(uint64_t addr) {
  const int64_t s = static_cast<int64_t>(addr << 16) >> 16;
  return static_cast<uint64_t>(s) == addr;
}

// IA32_PAT: each of the eight entries is a memory type 0, 1, 4, 5, 6 or 7
// (KVM's kvm_pat_valid).
bool pat_valid(uint64_t pat) {
  for (int i = 0; i < 8; i++) {
    const uint64_t type = (pat >> (8 * i)) & 0xff;
    if (type > 7 || type == 2 || type == 3) return false;
  }
  return true;
}

// IA32_EFER bits the modelled CPU has: SCE, LME, LMA, NXE.
constexpr uint64_t kEferSce = 1ull << 0, kEferLme = 1ull << 8, kEferLma = 1ull << 10, kEferNxe = 1ull << 11;
constexpr uint64_t kEferKnown = kEferSce | kEferLme | kEferLma | kEferNxe;

}  // namespace

VmxStatus check_ept_pointer(uint64_t eptp, const EntryCheckEnv& env) {
  constexpr std::string_view kRule = "ept-pointer";
  const uint64_t type = eptp & eptp::kMemTypeMask;
  const bool type_ok = (type == eptp::kMemTypeUc && env.caps.ept_uc) ||
                       (type == eptp::kMemTypeWb && env.caps.ept_wb);
  if (!type_ok)
    return bad_control(kRule, fmt::format("EPT pointer {:#x}: memory type {} is not supported "
                                          "(UC=0 or WB=6)",
                                          eptp, type));
  if ((eptp & eptp::kWalkLengthMask) != eptp::kWalkLength4)
    return bad_control(kRule, fmt::format("EPT pointer {:#x}: page-walk length {} is not "
                                          "supported (bits 5:3 must be 3, a 4-level walk)",
                                          eptp, ((eptp & eptp::kWalkLengthMask) >> 3) + 1));
  if ((eptp & eptp::kAccessedDirty) && !env.caps.ept_accessed_dirty)
    return bad_control(kRule, fmt::format("EPT pointer {:#x}: accessed/dirty flags (bit 6) are "
                                          "not supported",
                                          eptp));
  if (eptp & eptp::kReservedLow)
    return bad_control(kRule, fmt::format("EPT pointer {:#x}: reserved bits 11:7 are set", eptp));
  if (env.phys_addr_bits < 64 && (eptp >> env.phys_addr_bits) != 0)
    return bad_control(kRule, fmt::format("EPT pointer {:#x} exceeds the {}-bit physical-address "
                                          "width",
                                          eptp, env.phys_addr_bits));
  return {};
}

namespace {

// 26.2.1.3: the VM-entry interruption-information field (event injection).
VmxStatus check_event_injection(const Vmcs12& v) {
  const uint32_t info = v.entry_interruption_info;
  if (!(info & intr_info::kValid)) return {};
  const uint32_t type = (info & intr_info::kTypeMask) >> intr_info::kTypeShift;
  const uint32_t vector = info & intr_info::kVectorMask;
  if (info & intr_info::kReservedEntry)
    return bad_control("event-injection-reserved",
                       fmt::format("VM-entry interruption information {:#x}: reserved bits 30:12 "
                                   "are set",
                                   info));
  // Type 1 is reserved; type 7 ("other event") needs MTF, which the model lacks.
  if (type == intr_info::kTypeReserved || type == intr_info::kTypeOtherEvent)
    return bad_control("event-injection-type",
                       fmt::format("VM-entry interruption information {:#x}: event type {} is "
                                   "not supported",
                                   info, type));
  if (type == intr_info::kTypeNmi && vector != 2)
    return bad_control("event-injection-vector",
                       fmt::format("VM-entry interruption information {:#x}: an NMI must use "
                                   "vector 2, not {}",
                                   info, vector));
  if (type == intr_info::kTypeHardwareException && vector > 31)
    return bad_control("event-injection-vector",
                       fmt::format("VM-entry interruption information {:#x}: hardware exception "
                                   "vector {} is above 31",
                                   info, vector));
  // Deliver-error-code must be set exactly for the hardware exceptions that
  // push an error code (#DF #TS #NP #SS #GP #PF #AC), in protected mode
  // (CR0.PE, or any mode without unrestricted guest). The model does not
  // report IA32_VMX_BASIC[56], so the rule is not relaxed.
  constexpr uint32_t kWithErrorCode = (1u << 8) | (1u << 10) | (1u << 11) | (1u << 12) |
                                      (1u << 13) | (1u << 14) | (1u << 17);
  const bool unrestricted = (v.primary_proc_controls & proc::kActivateSecondaryControls) &&
                            (v.secondary_proc_controls & proc2::kUnrestrictedGuest);
  const bool prot_mode = !unrestricted || (v.guest_cr0 & kCr0Pe);
  const bool should_deliver = type == intr_info::kTypeHardwareException && prot_mode &&
                              vector < 32 && ((kWithErrorCode >> vector) & 1);
  const bool delivers = (info & intr_info::kDeliverErrorCode) != 0;
  if (delivers != should_deliver)
    return bad_control("event-injection-error-code",
                       fmt::format("VM-entry interruption information {:#x}: deliver-error-code "
                                   "must be {} for this event",
                                   info, should_deliver ? 1 : 0));
  if (delivers && (v.entry_exception_error_code & 0xffff0000u))
    return bad_control("event-injection-error-code",
                       fmt::format("VM-entry exception error code {:#x}: bits 31:16 must be 0",
                                   v.entry_exception_error_code));
  if ((type == intr_info::kTypeSoftwareInterrupt ||
       type == intr_info::kTypePrivilegedSoftwareException ||
       type == intr_info::kTypeSoftwareException) &&
      (v.entry_instruction_length < 1 || v.entry_instruction_length > 15))
    return bad_control("event-injection-length",
                       fmt::format("VM-entry instruction length {} for a software event must be "
                                   "1 to 15",
                                   v.entry_instruction_length));
  return {};
}

// The three execution-control words as the checks read them. SDM 26.2.1.1:
// with "activate secondary controls" clear, the secondary controls are not
// checked and behave as 0.
struct ExecControls {
  explicit ExecControls(const Vmcs12& v)
      : pin(v.pin_based_controls),
        proc(v.primary_proc_controls),
        proc2((proc & proc::kActivateSecondaryControls) ? v.secondary_proc_controls : 0) {}
  bool pin_on(uint32_t b) const { return (pin & b) != 0; }
  bool proc_on(uint32_t b) const { return (proc & b) != 0; }
  bool proc2_on(uint32_t b) const { return (proc2 & b) != 0; }

  uint32_t pin, proc, proc2;
};

// The TPR shadow and the APIC virtualization built on it: the virtual-APIC
// and APIC-access addresses, the TPR threshold, x2APIC mode vs APIC accesses,
// virtual-interrupt delivery.
VmxStatus check_apic_controls(const Vmcs12& v, const ExecControls& c, const EntryCheckEnv& env) {
  const unsigned bits = env.phys_addr_bits;
  if (c.proc_on(proc::kUseTprShadow)) {
    NC_TRY(check_page_address("virtual-apic-address", "virtual-APIC address",
                              v.virtual_apic_page_addr, bits));
    // Without virtual-interrupt delivery, TPR-threshold bits 31:4 are reserved.
    if (!c.proc2_on(proc2::kVirtualInterruptDelivery) && (v.tpr_threshold & ~0xfu))
      return bad_control("tpr-threshold-reserved",
                         fmt::format("TPR threshold {:#x}: bits 31:4 must be 0 without "
                                     "virtual-interrupt delivery",
                                     v.tpr_threshold));
    if (env.vtpr) NC_TRY(check_entry_controls_late(v, *env.vtpr));
  } else if (c.proc2_on(proc2::kVirtualizeX2apicMode | proc2::kApicRegisterVirtualization |
                        proc2::kVirtualInterruptDelivery)) {
    // These three virtualize parts of the APIC that only exist with a TPR shadow.
    return bad_control("tpr-shadow-required",
                       fmt::format("secondary controls {:#x}: virtualize x2APIC mode, "
                                   "APIC-register virtualization and virtual-interrupt delivery "
                                   "need \"use TPR shadow\"",
                                   c.proc2));
  }
  if (c.proc2_on(proc2::kVirtualizeX2apicMode) && c.proc2_on(proc2::kVirtualizeApicAccesses))
    return bad_control("x2apic-with-apic-access",
                       "virtualize x2APIC mode and virtualize APIC accesses are both set");
  if (c.proc2_on(proc2::kVirtualizeApicAccesses))
    NC_TRY(check_page_address("apic-access-address", "APIC-access address", v.apic_access_addr,
                              bits));
  if (c.proc2_on(proc2::kVirtualInterruptDelivery) && !c.pin_on(pin::kExternalInterruptExiting))
    return bad_control("vid-needs-external-interrupt-exiting",
                       "virtual-interrupt delivery is set but external-interrupt exiting is not");
  return {};
}

// Posted interrupts need virtual-interrupt delivery and acknowledge interrupt
// on exit, a vector in 0-255 and a 64-byte aligned descriptor in the
// physical-address width.
VmxStatus check_posted_interrupt_controls(const Vmcs12& v, const ExecControls& c, unsigned bits) {
  if (!c.pin_on(pin::kPostedInterrupts)) return {};
  if (!c.proc2_on(proc2::kVirtualInterruptDelivery))
    return bad_control("posted-interrupts-need-vid",
                       "process posted interrupts is set but virtual-interrupt delivery is not");
  if (!(v.exit_controls & exit_ctl::kAckInterruptOnExit))
    return bad_control("posted-interrupts-need-ack-on-exit",
                       "process posted interrupts is set but the VM-exit control "
                       "\"acknowledge interrupt on exit\" is not");
  if (v.posted_intr_notification_vector & 0xff00)
    return bad_control("posted-interrupt-vector",
                       fmt::format("posted-interrupt notification vector {:#x}: bits 15:8 must "
                                   "be 0",
                                   v.posted_intr_notification_vector));
  if (v.posted_intr_desc_addr & 0x3f)
    return bad_control("posted-interrupt-descriptor",
                       fmt::format("posted-interrupt descriptor address {:#x} is not 64-byte "
                                   "aligned",
                                   v.posted_intr_desc_addr));
  if (bits < 64 && (v.posted_intr_desc_addr >> bits) != 0)
    return bad_control("posted-interrupt-descriptor",
                       fmt::format("posted-interrupt descriptor address {:#x} exceeds the "
                                   "{}-bit physical-address width",
                                   v.posted_intr_desc_addr, bits));
  return {};
}

// NMI controls, VPID, EPT and unrestricted guest.
VmxStatus check_other_exec_controls(const Vmcs12& v, const ExecControls& c,
                                    const EntryCheckEnv& env) {
  // Virtual NMIs need NMI exiting; NMI-window exiting needs virtual NMIs.
  if (c.pin_on(pin::kVirtualNmis) && !c.pin_on(pin::kNmiExiting))
    return bad_control("virtual-nmis-need-nmi-exiting",
                       fmt::format("pin-based controls {:#x}: virtual NMIs without NMI exiting",
                                   c.pin));
  if (c.proc_on(proc::kNmiWindowExiting) && !c.pin_on(pin::kVirtualNmis))
    return bad_control("nmi-window-needs-virtual-nmis",
                       "NMI-window exiting is set but virtual NMIs is not");
  // VPID 0 is L0's own; "enable VPID" needs another.
  if (c.proc2_on(proc2::kEnableVpid) && v.virtual_processor_id == 0)
    return bad_control("vpid-zero", "enable VPID is set but the VPID is 0");
  if (c.proc2_on(proc2::kEnableEpt)) NC_TRY(check_ept_pointer(v.ept_pointer, env));
  // Unrestricted guest runs real-mode code through EPT only.
  if (c.proc2_on(proc2::kUnrestrictedGuest) && !c.proc2_on(proc2::kEnableEpt))
    return bad_control("unrestricted-guest-needs-ept", "unrestricted guest is set but enable EPT is not");
  return {};
}

}  // namespace

VmxStatus check_entry_controls(const Vmcs12& v, const EntryCheckEnv& env) {
  const VmxControlCaps& caps = env.caps;
  const ExecControls c(v);

  // 26.2.1.1, reserved bits of the three execution-control words.
  NC_TRY(check_allowed("pin-reserved", "pin-based controls", c.pin, caps.pin_must1, caps.pin_may1));
  NC_TRY(check_allowed("proc-reserved", "primary processor-based controls", c.proc,
                       caps.proc_must1, caps.proc_may1));
  if (c.proc_on(proc::kActivateSecondaryControls))
    NC_TRY(check_allowed("proc2-reserved", "secondary processor-based controls", c.proc2, 0,
                         caps.proc2_may1));
  if (c.proc_on(proc::kUseMsrBitmaps))
    NC_TRY(check_page_address("msr-bitmap-address", "MSR-bitmap address", v.msr_bitmap,
                              env.phys_addr_bits));
  NC_TRY(check_apic_controls(v, c, env));
  NC_TRY(check_posted_interrupt_controls(v, c, env.phys_addr_bits));
  NC_TRY(check_other_exec_controls(v, c, env));

  // 26.2.1.2 and 26.2.1.3: exit and entry controls.
  NC_TRY(check_allowed("exit-reserved", "VM-exit controls", v.exit_controls, caps.exit_must1,
                       caps.exit_may1));
  NC_TRY(check_allowed("entry-reserved", "VM-entry controls", v.entry_controls, caps.entry_must1,
                       caps.entry_may1));
  NC_TRY(check_event_injection(v));
  // KVM runs the eVMCS filter as part of the control checks whenever the
  // vCPU has the enlightened VMCS enabled, in use or not.
  if (env.evmcs_enabled) NC_TRY(check_evmcs_controls(v));
  return {};
}

VmxStatus check_entry_controls_late(const Vmcs12& v, uint8_t vtpr) {
  const uint32_t proc2c = (v.primary_proc_controls & proc::kActivateSecondaryControls)
                              ? v.secondary_proc_controls
                              : 0;
  if (!(v.primary_proc_controls & proc::kUseTprShadow)) return {};
  if (proc2c & (proc2::kVirtualizeApicAccesses | proc2::kVirtualInterruptDelivery)) return {};
  if ((v.tpr_threshold & 0xf) > (vtpr >> 4u))
    return bad_control("tpr-threshold-vtpr",
                       fmt::format("TPR threshold {} is above VTPR bits 7:4 ({}, VTPR {:#x})",
                                   v.tpr_threshold & 0xf, vtpr >> 4u, vtpr));
  return {};
}

VmxStatus check_entry_host_state(const Vmcs12& v, const EntryCheckEnv& env) {
  // 26.2.2: CR0 and CR4 fixed bits (IA32_VMX_CR0_FIXED0 = PE|NE|PG, FIXED1
  // clears 63:32; IA32_VMX_CR4_FIXED0 = VMXE).
  constexpr uint64_t kCr0Fixed1 = kCr0Pe | kCr0Ne | kCr0Pg;
  if ((v.host_cr0 & kCr0Fixed1) != kCr0Fixed1 || (v.host_cr0 >> 32) != 0)
    return bad_host("host-cr0-fixed",
                    fmt::format("host CR0 {:#x}: PE, NE and PG must be 1 and bits 63:32 0",
                                v.host_cr0));
  if (!(v.host_cr4 & kCr4Vmxe))
    return bad_host("host-cr4-fixed", fmt::format("host CR4 {:#x}: VMXE must be 1", v.host_cr4));
  if (env.phys_addr_bits < 64 && (v.host_cr3 >> env.phys_addr_bits) != 0)
    return bad_host("host-cr3-width",
                    fmt::format("host CR3 {:#x} exceeds the {}-bit physical-address width",
                                v.host_cr3, env.phys_addr_bits));

  // 26.2.2: IA32_PAT and IA32_EFER when the exit loads them.
  const bool host64 = (v.exit_controls & exit_ctl::kHostAddressSpaceSize) != 0;
  if ((v.exit_controls & exit_ctl::kLoadPat) && !pat_valid(v.host_ia32_pat))
    return bad_host("host-pat", fmt::format("host IA32_PAT {:#x} holds a reserved memory type", v.host_ia32_pat));
  if (v.exit_controls & exit_ctl::kLoadEfer) {
    const uint64_t efer = v.host_ia32_efer;
    if ((efer & ~kEferKnown) || ((efer & kEferLma) != 0) != host64 || ((efer & kEferLme) != 0) != host64)
      return bad_host("host-efer", fmt::format("host IA32_EFER {:#x}: reserved bits must be 0 and LMA and LME must "
                                               "equal \"host address-space size\" ({})",
                                               efer, host64 ? 1 : 0));
  }

  // 26.2.4: address-space size. L1 in IA-32e mode must return to IA-32e mode.
  if (env.l1_long_mode && !host64)
    return bad_host("host-address-space-size",
                    "L1 runs in IA-32e mode but the VM-exit control \"host address-space size\" "
                    "is 0");
  if (!host64) {
    if (v.entry_controls & entry_ctl::kIa32eModeGuest)
      return bad_host("host-ia32e-guest",
                      "an IA-32e mode guest needs the \"host address-space size\" exit control");
    if (v.host_rip >> 32)
      return bad_host("host-rip",
                      fmt::format("host RIP {:#x}: bits 63:32 must be 0 for a 32-bit host",
                                  v.host_rip));
  } else if (!(v.host_cr4 & kCr4Pae))
    return bad_host("host-cr4-pae",
                    fmt::format("host CR4 {:#x}: PAE must be 1 for a 64-bit host", v.host_cr4));
  if (!canonical48(v.host_rip))
    return bad_host("host-rip", fmt::format("host RIP {:#x} is not canonical", v.host_rip));
  // 26.2.3: the host CS selector has RPL and TI 0 and is not null (the
  // other host selectors are not in the model's vmcs12).
  if ((v.host_cs_selector & 7) || v.host_cs_selector == 0)
    return bad_host("host-cs-selector",
                    fmt::format("host CS selector {:#x} must be non-null with RPL and TI 0", v.host_cs_selector));
  return {};
}

namespace {

// 26.3.1.5: the VMCS link pointer. Without VMCS shadowing it must be all
// ones or name a page holding an ordinary VMCS (KVM's
// nested_vmx_check_vmcs_link_ptr reads the header from L1 memory).
VmxStatus check_link_pointer(const Vmcs12& v, const EntryCheckEnv& env) {
  const uint64_t link = v.vmcs_link_pointer;
  if (link == ~uint64_t{0}) return {};
  std::string why;
  std::optional<uint32_t> header;
  if (!page_aligned(link))
    why = "is not 4 KiB aligned";
  else if (!page_address_valid(link, env.phys_addr_bits))
    why = fmt::format("exceeds the {}-bit physical-address width", env.phys_addr_bits);
  else if (!env.read_guest32 || !(header = env.read_guest32(link)))
    why = "names no memory holding a VMCS";
  else if (*header != kVmcs12Revision)
    why = fmt::format("names a region with revision {:#x}, not {:#x} with the shadow-VMCS indicator clear", *header,
                      kVmcs12Revision);
  else
    return {};
  return bad_guest("vmcs-link-pointer", entry_fail_qual::kVmcsLinkPointer, fmt::format("VMCS link pointer {:#x} {}", link, why));
}

// 26.3.1.1: control registers, debug controls, IA32_PAT and IA32_EFER, in
// KVM's order (nested_vmx_check_guest_state), with the link pointer where
// KVM checks it.
VmxStatus check_guest_registers(const Vmcs12& v, const EntryCheckEnv& env) {
  const bool ia32e = (v.entry_controls & entry_ctl::kIa32eModeGuest) != 0;
  const bool unrestricted = (v.primary_proc_controls & proc::kActivateSecondaryControls) &&
                            (v.secondary_proc_controls & proc2::kUnrestrictedGuest);
  // IA32_VMX_CR0_FIXED0 = PE|NE|PG; unrestricted guest frees PE and PG.
  const uint64_t cr0_fixed0 = unrestricted ? kCr0Ne : kCr0Pe | kCr0Ne | kCr0Pg;
  if ((v.guest_cr0 & cr0_fixed0) != cr0_fixed0 || (v.guest_cr0 >> 32) != 0)
    return bad_guest("guest-cr0-fixed", entry_fail_qual::kDefault,
                     fmt::format("guest CR0 {:#x}: {} must be 1 and bits 63:32 0", v.guest_cr0,
                                 unrestricted ? "NE" : "PE, NE and PG"));
  if (!(v.guest_cr4 & kCr4Vmxe))
    return bad_guest("guest-cr4-fixed", entry_fail_qual::kDefault,
                     fmt::format("guest CR4 {:#x}: VMXE must be 1 in VMX operation", v.guest_cr4));
  if ((v.entry_controls & entry_ctl::kLoadDebugControls) && (v.guest_dr7 >> 32))
    return bad_guest("guest-dr7", entry_fail_qual::kDefault,
                     fmt::format("guest DR7 {:#x}: bits 63:32 must be 0", v.guest_dr7));
  if ((v.entry_controls & entry_ctl::kLoadPat) && !pat_valid(v.guest_ia32_pat))
    return bad_guest("guest-pat", entry_fail_qual::kDefault,
                     fmt::format("guest IA32_PAT {:#x} holds a reserved memory type", v.guest_ia32_pat));
  NC_TRY(check_link_pointer(v, env));
  if ((v.guest_cr0 & (kCr0Pg | kCr0Pe)) == kCr0Pg)
    return bad_guest("guest-cr0-pg-without-pe", entry_fail_qual::kDefault,
                     fmt::format("guest CR0 {:#x}: paging without protected mode", v.guest_cr0));
  if (ia32e && (!(v.guest_cr4 & kCr4Pae) || !(v.guest_cr0 & kCr0Pg)))
    return bad_guest("guest-ia32e-mode", entry_fail_qual::kDefault,
                     fmt::format("an IA-32e mode guest needs CR0.PG and CR4.PAE (CR0 {:#x}, CR4 {:#x})", v.guest_cr0,
                                 v.guest_cr4));
  if (env.run_pending && (v.entry_controls & entry_ctl::kLoadEfer)) {
    const uint64_t efer = v.guest_ia32_efer;
    const bool lme_wrong = (v.guest_cr0 & kCr0Pg) && ((efer & kEferLme) != 0) != ia32e;
    if ((efer & ~kEferKnown) || ((efer & kEferLma) != 0) != ia32e || lme_wrong)
      return bad_guest("guest-efer", entry_fail_qual::kDefault,
                       fmt::format("guest IA32_EFER {:#x}: reserved bits must be 0, LMA must equal \"IA-32e mode "
                                   "guest\" ({}) and, with paging, so must LME",
                                   efer, ia32e ? 1 : 0));
  }
  return {};
}

}  // namespace

VmxStatus check_entry_guest_state(const Vmcs12& v, const EntryCheckEnv& env) {
  NC_TRY(check_guest_registers(v, env));
  // 26.3.1.5: activity state. The model supports active and HLT.
  if (v.guest_activity_state > activity::kHlt)
    return bad_guest("guest-activity-state", entry_fail_qual::kDefault,
                     fmt::format("guest activity state {} is not supported (0 active, 1 HLT)",
                                 v.guest_activity_state));
  // 26.3.1.4: RFLAGS reserved bits 0 and bit 1 set.
  if ((v.guest_rflags & kRflagsReserved) || !(v.guest_rflags & kRflagsFixed1))
    return bad_guest("guest-rflags", entry_fail_qual::kDefault,
                     fmt::format("guest RFLAGS {:#x}: reserved bits must be 0 and bit 1 must be 1",
                                 v.guest_rflags));
  // 26.3.1.5: interruptibility: bits 31:5 reserved; STI and MOV-SS
  // blocking not both.
  if ((v.guest_interruptibility & ~0x1fu) || (v.guest_interruptibility & 3) == 3)
    return bad_guest("guest-interruptibility", entry_fail_qual::kDefault,
                     fmt::format("guest interruptibility {:#x}: bits 31:5 must be 0 and "
                                 "blocking by STI and by MOV SS exclude each other",
                                 v.guest_interruptibility));
  return {};
}

VmxStatus check_vm_entry(const Vmcs12& v, const EntryCheckEnv& env) {
  NC_TRY(check_entry_controls(v, env));
  NC_TRY(check_entry_host_state(v, env));
  NC_TRY(check_entry_guest_state(v, env));
  return {};
}

Vmcs12 minimal_vmcs12() {
  Vmcs12 v;
  v.revision_id = kVmcs12Revision;
  v.pin_based_controls = pin::kAlwaysOn;
  v.primary_proc_controls = proc::kAlwaysOn;
  v.exit_controls = exit_ctl::kAlwaysOn | exit_ctl::kHostAddressSpaceSize;
  v.entry_controls = entry_ctl::kAlwaysOn | entry_ctl::kIa32eModeGuest;
  v.host_cr0 = kCr0Pe | kCr0Ne | kCr0Pg;
  v.host_cr4 = kCr4Pae | kCr4Vmxe;
  v.host_cs_selector = 8;
  v.guest_cr0 = kCr0Pe | kCr0Ne | kCr0Pg;
  v.guest_cr4 = kCr4Pae | kCr4Vmxe;
  v.guest_rflags = kRflagsFixed1;
  v.vmcs_link_pointer = ~uint64_t{0};
  return v;
}

}  // namespace nestcache::vmx
