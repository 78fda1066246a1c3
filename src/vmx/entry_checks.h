// Nested VM-entry consistency checks (SDM Vol. 3C, chapter 26) on a vmcs12.
//
// VMLAUNCH/VMRESUME by L1 runs these before L0 touches any page the vmcs12
// names (DESIGN §4, nested entry step 1). They read only the vmcs12 and the
// facts in EntryCheckEnv; no memory, no vCPU. The checks come in the SDM's
// three classes, which fail differently:
//
//   controls   26.2.1 (execution, exit and entry control fields)
//              -> VMfailValid(7, "VM entry with invalid control field(s)")
//   host state 26.2.2-26.2.4 (host control registers, RIP, address-space size)
//              -> VMfailValid(8, "VM entry with invalid host-state field(s)")
//   guest state 26.3 (the subset nestcache models)
//              -> the entry fails like a VM exit to L1: exit reason 33
//                 (kEntryFailInvalidGuestState) with bit 31 set, and the
//                 qualification the SDM gives (4 for the VMCS link pointer).
//
// Each function returns the first rule that fails, in SDM order, as a VmxFail
// whose `rule` is a short stable id (listed with each function) and whose
// message names the field, its value and what the rule demands.
//
// The check that needs the virtual-APIC page (TPR threshold against VTPR) is
// separate: L0 can only run it once it has reached that page (KVM does it in
// nested_vmx_check_controls_late after getting the vmcs12 pages). The VMCS
// link pointer's header is read through EntryCheckEnv::read_guest32.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>

#include "base/types.h"
#include "vmx/vmcs12.h"
#include "vmx/vmx_defs.h"

namespace nestcache::vmx {

// The allowed settings of the modelled CPU's VMX capability MSRs (the TRUE
// variants): a control bit in `*_must1` must be 1, a bit outside `*_may1`
// must be 0. Secondary controls have no must-be-1 bits.
struct VmxControlCaps {
  uint32_t pin_must1;
  uint32_t pin_may1;
  uint32_t proc_must1;
  uint32_t proc_may1;
  uint32_t proc2_may1;
  uint32_t exit_must1;
  uint32_t exit_may1;
  uint32_t entry_must1;
  uint32_t entry_may1;
  // IA32_VMX_EPT_VPID_CAP: EPT memory types and accessed/dirty flags.
  bool ept_uc = true;
  bool ept_wb = true;
  bool ept_accessed_dirty = true;
};

// What nestcache's CPU offers L1. Exiting controls for operations the CPU
// model never produces are allowed (they simply never fire); features the
// model does not implement (I/O bitmaps, MTF, the preemption timer, VMCS
// shadowing, PML, VM functions, #VE, 5-level EPT) are not.
inline constexpr VmxControlCaps kModelVmxCaps = {
    .pin_must1 = pin::kAlwaysOn,
    .pin_may1 = pin::kAlwaysOn | pin::kExternalInterruptExiting | pin::kNmiExiting |
                pin::kVirtualNmis | pin::kPostedInterrupts,
    .proc_must1 = proc::kAlwaysOn,
    .proc_may1 = proc::kAlwaysOn | proc::kInterruptWindowExiting | proc::kUseTscOffsetting |
                 proc::kHltExiting | proc::kInvlpgExiting | proc::kMwaitExiting |
                 proc::kRdpmcExiting | proc::kRdtscExiting | proc::kCr3LoadExiting |
                 proc::kCr3StoreExiting | proc::kCr8LoadExiting | proc::kCr8StoreExiting |
                 proc::kUseTprShadow | proc::kNmiWindowExiting | proc::kMovDrExiting |
                 proc::kUnconditionalIoExiting | proc::kUseMsrBitmaps | proc::kMonitorExiting |
                 proc::kPauseExiting | proc::kActivateSecondaryControls,
    .proc2_may1 = proc2::kVirtualizeApicAccesses | proc2::kEnableEpt |
                  proc2::kDescriptorTableExiting | proc2::kEnableRdtscp |
                  proc2::kVirtualizeX2apicMode | proc2::kEnableVpid | proc2::kWbinvdExiting |
                  proc2::kUnrestrictedGuest | proc2::kApicRegisterVirtualization |
                  proc2::kVirtualInterruptDelivery | proc2::kPauseLoopExiting |
                  proc2::kEnableInvpcid | proc2::kEnableXsaves,
    .exit_must1 = exit_ctl::kAlwaysOn,
    .exit_may1 = exit_ctl::kAlwaysOn | exit_ctl::kSaveDebugControls |
                 exit_ctl::kHostAddressSpaceSize | exit_ctl::kAckInterruptOnExit |
                 exit_ctl::kSavePat | exit_ctl::kLoadPat | exit_ctl::kSaveEfer |
                 exit_ctl::kLoadEfer,
    .entry_must1 = entry_ctl::kAlwaysOn,
    .entry_may1 = entry_ctl::kAlwaysOn | entry_ctl::kLoadDebugControls |
                  entry_ctl::kIa32eModeGuest | entry_ctl::kLoadPat | entry_ctl::kLoadEfer,
};

// Reads the 4 bytes of L1 memory at `gpa`; nullopt when no memslot backs it.
using GuestRead32 = std::function<std::optional<uint32_t>(Gpa gpa)>;

// Facts about the entering vCPU that the checks need besides the vmcs12.
struct EntryCheckEnv {
  VmxControlCaps caps = kModelVmxCaps;
  unsigned phys_addr_bits = kMaxPhysAddrBits;  // MAXPHYADDR
  // VTPR (byte 0x80 of the virtual-APIC page), when the caller has read it;
  // without it check_entry_controls skips the rule "tpr-threshold-vtpr".
  std::optional<uint8_t> vtpr;
  // L1 runs in IA-32e mode (always, for nestcache's L1 hypervisor); decides
  // the address-space-size rules of 26.2.4.
  bool l1_long_mode = true;
  // The vCPU has the enlightened VMCS enabled: its controls must be ones
  // eVMCS v1 can express, whether or not an eVMCS is in use (KVM's
  // nested_vmx_check_controls with guest_cpu_cap_has_evmcs).
  bool evmcs_enabled = false;
  // An entry is pending (VMLAUNCH/VMRESUME, or a restored run-pending
  // state): the guest IA32_EFER rules apply (KVM checks them only then).
  bool run_pending = true;
  // L1 memory, for the header of the VMCS a link pointer names. Without it
  // a link pointer other than all ones fails (nothing can be checked).
  GuestRead32 read_guest32;
};

// True when `addr` is 4 KiB aligned and has no bit at or above `bits` set
// (the SDM's condition on every page address a control field holds).
constexpr bool page_address_valid(uint64_t addr, unsigned bits = kMaxPhysAddrBits) {
  return page_aligned(addr) && (bits >= 64 || (addr >> bits) == 0);
}

// 26.2.1: control fields. VMfailValid(7) with one of these rules (and
// evmcs-unsupported-control when env.evmcs_enabled):
//   pin-reserved proc-reserved proc2-reserved exit-reserved entry-reserved
//   msr-bitmap-address virtual-apic-address tpr-threshold-reserved
//   tpr-threshold-vtpr tpr-shadow-required virtual-nmis-need-nmi-exiting
//   nmi-window-needs-virtual-nmis x2apic-with-apic-access apic-access-address
//   vid-needs-external-interrupt-exiting posted-interrupts-need-vid
//   posted-interrupts-need-ack-on-exit posted-interrupt-vector
//   posted-interrupt-descriptor vpid-zero ept-pointer
//   unrestricted-guest-needs-ept event-injection-reserved
//   event-injection-type event-injection-vector event-injection-error-code
//   event-injection-length
// The secondary controls count only when "activate secondary controls" is
// set (SDM: otherwise they are treated as 0).
VmxStatus check_entry_controls(const Vmcs12& v, const EntryCheckEnv& env = {});

// The late part of 26.2.1.1: with "use TPR shadow" set and both "virtualize
// APIC accesses" and "virtual-interrupt delivery" clear, TPR threshold bits
// 3:0 must not exceed VTPR bits 7:4. `vtpr` is byte 0x80 of the
// virtual-APIC page. VMfailValid(7), rule "tpr-threshold-vtpr".
VmxStatus check_entry_controls_late(const Vmcs12& v, uint8_t vtpr);

// The EPT pointer rules of 26.2.1.1 (also INVEPT's single-context operand,
// KVM's nested_vmx_check_eptp): memory type, page-walk length, A/D flags,
// reserved bits 11:7, physical-address width. VMfailValid(7), rule
// "ept-pointer".
VmxStatus check_ept_pointer(uint64_t eptp, const EntryCheckEnv& env = {});

// 26.2.2-26.2.4: host-state fields. VMfailValid(8) with rule
//   host-cr0-fixed host-cr4-fixed host-cr3-width host-pat host-efer
//   host-address-space-size host-ia32e-guest host-cr4-pae host-rip
//   host-cs-selector
// nestcache models only the host CS selector of the host segment state.
VmxStatus check_entry_host_state(const Vmcs12& v, const EntryCheckEnv& env = {});

// 26.3, the guest-state checks on fields nestcache models. An entry failure
// (exit reason 33) with rule
//   guest-cr0-fixed guest-cr4-fixed guest-cr0-pg-without-pe guest-ia32e-mode
//   guest-dr7 guest-pat guest-efer guest-rflags guest-activity-state
//   guest-interruptibility vmcs-link-pointer
// A VMCS link pointer other than all ones must name a 4 KiB-aligned page
// within the address width whose revision identifier is kVmcs12Revision
// with the shadow-VMCS indicator clear (nestcache offers no VMCS shadowing);
// otherwise the qualification is 4.
VmxStatus check_entry_guest_state(const Vmcs12& v, const EntryCheckEnv& env = {});

// All of the above in the SDM's order: controls, host state, guest state.
VmxStatus check_vm_entry(const Vmcs12& v, const EntryCheckEnv& env = {});

// The smallest vmcs12 that passes check_vm_entry: kVmcs12Revision, the
// always-on control bits, a 64-bit host (host address-space size, CR0
// PE|NE|PG, CR4 PAE|VMXE, CS selector 8) running a 64-bit guest (CR0
// PE|NE|PG, CR4 PAE|VMXE), RFLAGS 0x2, link pointer all ones. A starting
// point for tests and for L1 programs; every page-using control is off.
Vmcs12 minimal_vmcs12();

}  // namespace nestcache::vmx
