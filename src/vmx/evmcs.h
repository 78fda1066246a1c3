// Hyper-V enlightened VMCS (eVMCS) and VP-assist page: the page formats and
// the copies L0 makes between an eVMCS and the cached vmcs12.
//
// With the enlightenment, L1 does not VMPTRLD/VMWRITE. It writes VMCS fields
// straight into an eVMCS page in its memory, clears the page's clean-field
// bit of every group it changed, and names the page in its VP-assist page
// ("enlightened VM-entry" flag + current eVMCS gpa). On VMLAUNCH/VMRESUME L0:
//   1. reads the VP-assist page to find the eVMCS (a new address clears the
//      old nested context and loads the new one, DESIGN §4);
//   2. checks the eVMCS revision (check_evmcs_revision: VMfailInvalid);
//   3. takes an EvmcsSnapshot once: clean fields, MSR-bitmap enlightenment,
//      flush-hypercall enlightenment. Every later decision of this entry uses
//      the snapshot, never the page again (seed patch 6): a guest rewriting
//      the page mid-entry must not change what L0 does;
//   4. copy_evmcs_to_vmcs12(page, vmcs12, snapshot.clean_fields): only the
//      dirty groups are copied into the cached vmcs12, from which the entry
//      proceeds exactly as without eVMCS (entry checks, with
//      check_evmcs_controls as on every entry of such a vCPU; pages, vmcs02). An eVMCS has no launch state of
//      its own: L0 sets the cached vmcs12's to "launched" for VMRESUME and
//      "clear" for VMLAUNCH before the launch-state check;
//   5. after a successful entry marks every group clean in the page.
// On a reflected exit L0 writes the exit information and L2's guest state
// back with copy_vmcs12_to_evmcs. The nested-state blob carries the vmcs12
// copied with clean_fields = 0, so a restored L2 never trusts stale clean bits.
//
// VMREAD and VMWRITE while an eVMCS is current (what KVM does; the TLFS says
// both are unsupported then):
//   - VMREAD outside guest mode reads the eVMCS page (evmcs_vmread). KVM
//     allows this because some Windows 11 builds issue VMREADs anyway. A
//     field the eVMCS does not carry, and any "high" access, gives
//     VMfailValid(12).
//   - VMWRITE fails with VMfailInvalid (evmcs_vmwrite): there is no current
//     VMCS pointer, only the eVMCS, which L1 must write directly.
//   - In guest mode, VMREAD/VMWRITE by L2 always exit to L1 (no VMCS
//     shadowing), so these functions are never reached for L2.
//
// Layout. The TLFS fixes the real eVMCS layout; nestcache keeps its concepts
// (version number, clean fields, enlightenments control with the TLFS bit
// positions, field groups) but uses its own offsets: the header below, then
// the fields our Vmcs12 has, by width, named as in Vmcs12. Like eVMCS v1, the
// page does not carry the posted-interrupt, APIC-access, guest-interrupt-status
// or EOI-exit fields, and L1 may not use the controls that need them
// (check_evmcs_controls).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

#include "base/types.h"
#include "vmx/vmcs12.h"
#include "vmx/vmx_defs.h"

namespace nestcache::vmx {

// The eVMCS version nestcache's L0 supports (TLFS: eVMCS version 1).
inline constexpr uint32_t kEvmcsRevision = 1;

// Clean-field groups: a set bit means "L1 has not changed this group since
// the last entry; L0 may skip copying it". Values as in the TLFS.
namespace evmcs_clean {
inline constexpr uint32_t kNone = 0;  // fields in no group: always copied
inline constexpr uint32_t kIoBitmap = 1u << 0;
inline constexpr uint32_t kMsrBitmap = 1u << 1;
inline constexpr uint32_t kControlGrp2 = 1u << 2;
inline constexpr uint32_t kControlGrp1 = 1u << 3;
inline constexpr uint32_t kControlProc = 1u << 4;
inline constexpr uint32_t kControlEvent = 1u << 5;
inline constexpr uint32_t kControlEntry = 1u << 6;
inline constexpr uint32_t kControlExcpn = 1u << 7;
inline constexpr uint32_t kCrdr = 1u << 8;
inline constexpr uint32_t kControlXlat = 1u << 9;
inline constexpr uint32_t kGuestBasic = 1u << 10;
inline constexpr uint32_t kGuestGrp1 = 1u << 11;
inline constexpr uint32_t kGuestGrp2 = 1u << 12;
inline constexpr uint32_t kHostPointer = 1u << 13;
inline constexpr uint32_t kHostGrp1 = 1u << 14;
inline constexpr uint32_t kEnlightenmentsControl = 1u << 15;
inline constexpr uint32_t kAll = 0xffff;
}  // namespace evmcs_clean

// hv_enlightenments_control bits (TLFS).
namespace evmcs_enlightenment {
inline constexpr uint32_t kNestedFlushHypercall = 1u << 0;
inline constexpr uint32_t kMsrBitmap = 1u << 1;
}  // namespace evmcs_enlightenment

// X(member, encoding, clean group): the vmcs12 fields the eVMCS carries,
// grouped as the TLFS groups them, by width (no padding in the page).
#define NC_EVMCS_FIELDS(X)                                                              \
  /* 64-bit and natural-width */                                                        \
  X(guest_rip, field::kGuestRip, evmcs_clean::kNone)                                    \
  X(guest_physical_address, field::kGuestPhysicalAddress, evmcs_clean::kNone)           \
  X(exit_qualification, field::kExitQualification, evmcs_clean::kNone)                  \
  X(guest_linear_address, field::kGuestLinearAddress, evmcs_clean::kNone)               \
  X(guest_rsp, field::kGuestRsp, evmcs_clean::kGuestBasic)                              \
  X(guest_rflags, field::kGuestRflags, evmcs_clean::kGuestBasic)                        \
  X(host_ia32_pat, field::kHostIa32Pat, evmcs_clean::kHostGrp1)                         \
  X(host_ia32_efer, field::kHostIa32Efer, evmcs_clean::kHostGrp1)                       \
  X(host_cr0, field::kHostCr0, evmcs_clean::kHostGrp1)                                  \
  X(host_cr3, field::kHostCr3, evmcs_clean::kHostGrp1)                                  \
  X(host_cr4, field::kHostCr4, evmcs_clean::kHostGrp1)                                  \
  X(host_rip, field::kHostRip, evmcs_clean::kHostGrp1)                                  \
  X(msr_bitmap, field::kMsrBitmap, evmcs_clean::kMsrBitmap)                             \
  X(guest_cs_base, field::kGuestCsBase, evmcs_clean::kGuestGrp2)                        \
  X(tsc_offset, field::kTscOffset, evmcs_clean::kControlGrp2)                           \
  X(virtual_apic_page_addr, field::kVirtualApicPageAddr, evmcs_clean::kControlGrp2)     \
  X(cr0_guest_host_mask, field::kCr0GuestHostMask, evmcs_clean::kCrdr)                  \
  X(cr4_guest_host_mask, field::kCr4GuestHostMask, evmcs_clean::kCrdr)                  \
  X(cr0_read_shadow, field::kCr0ReadShadow, evmcs_clean::kCrdr)                         \
  X(cr4_read_shadow, field::kCr4ReadShadow, evmcs_clean::kCrdr)                         \
  X(guest_cr0, field::kGuestCr0, evmcs_clean::kCrdr)                                    \
  X(guest_cr3, field::kGuestCr3, evmcs_clean::kCrdr)                                    \
  X(guest_cr4, field::kGuestCr4, evmcs_clean::kCrdr)                                    \
  X(guest_dr7, field::kGuestDr7, evmcs_clean::kCrdr)                                    \
  X(host_rsp, field::kHostRsp, evmcs_clean::kHostPointer)                               \
  X(ept_pointer, field::kEptPointer, evmcs_clean::kControlXlat)                         \
  X(vmcs_link_pointer, field::kVmcsLinkPointer, evmcs_clean::kGuestGrp1)                \
  X(guest_ia32_pat, field::kGuestIa32Pat, evmcs_clean::kGuestGrp1)                      \
  X(guest_ia32_efer, field::kGuestIa32Efer, evmcs_clean::kGuestGrp1)                    \
  /* 32-bit */                                                                          \
  X(tpr_threshold, field::kTprThreshold, evmcs_clean::kNone)                            \
  X(vm_instruction_error, field::kVmInstructionError, evmcs_clean::kNone)               \
  X(exit_reason, field::kExitReason, evmcs_clean::kNone)                                \
  X(exit_interruption_info, field::kExitInterruptionInfo, evmcs_clean::kNone)           \
  X(exit_interruption_error_code, field::kExitInterruptionErrorCode, evmcs_clean::kNone) \
  X(idt_vectoring_info, field::kIdtVectoringInfo, evmcs_clean::kNone)                   \
  X(idt_vectoring_error_code, field::kIdtVectoringErrorCode, evmcs_clean::kNone)        \
  X(exit_instruction_length, field::kExitInstructionLength, evmcs_clean::kNone)         \
  X(vmx_instruction_info, field::kVmxInstructionInfo, evmcs_clean::kNone)               \
  X(guest_interruptibility, field::kGuestInterruptibility, evmcs_clean::kGuestBasic)    \
  X(primary_proc_controls, field::kPrimaryProcControls, evmcs_clean::kControlProc)      \
  X(exception_bitmap, field::kExceptionBitmap, evmcs_clean::kControlExcpn)              \
  X(entry_controls, field::kEntryControls, evmcs_clean::kControlEntry)                  \
  X(entry_interruption_info, field::kEntryInterruptionInfo, evmcs_clean::kControlEvent) \
  X(entry_exception_error_code, field::kEntryExceptionErrorCode, evmcs_clean::kControlEvent) \
  X(entry_instruction_length, field::kEntryInstructionLength, evmcs_clean::kControlEvent) \
  X(pin_based_controls, field::kPinBasedControls, evmcs_clean::kControlGrp1)            \
  X(exit_controls, field::kExitControls, evmcs_clean::kControlGrp1)                     \
  X(secondary_proc_controls, field::kSecondaryProcControls, evmcs_clean::kControlGrp1)  \
  X(guest_cs_limit, field::kGuestCsLimit, evmcs_clean::kGuestGrp2)                      \
  X(guest_cs_ar_bytes, field::kGuestCsArBytes, evmcs_clean::kGuestGrp2)                 \
  X(guest_activity_state, field::kGuestActivityState, evmcs_clean::kGuestGrp1)          \
  /* 16-bit */                                                                          \
  X(host_cs_selector, field::kHostCsSelector, evmcs_clean::kHostGrp1)                   \
  X(guest_cs_selector, field::kGuestCsSelector, evmcs_clean::kGuestGrp2)                \
  X(virtual_processor_id, field::kVirtualProcessorId, evmcs_clean::kControlXlat)

// The eVMCS page, decoded. Trivially copyable with no padding: load()/store()
// copy its bytes to and from the 4 KiB page in L1 memory; the rest of the
// page is reserved.
struct EvmcsPage {
  uint32_t revision_id = 0;  // must be kEvmcsRevision
  uint32_t abort_indicator = 0;
  uint32_t clean_fields = 0;            // evmcs_clean bits
  uint32_t enlightenments_control = 0;  // evmcs_enlightenment bits
  uint32_t vp_id = 0;                   // synthetic, informational
  uint32_t reserved0 = 0;
  uint64_t vm_id = 0;  // synthetic, informational

#define NC_EVMCS_MEMBER(name, enc, group) decltype(Vmcs12::name) name = 0;
  NC_EVMCS_FIELDS(NC_EVMCS_MEMBER)
#undef NC_EVMCS_MEMBER
  // Pads the struct to a multiple of 8 bytes so it has no implicit padding
  // (evmcs.cc checks; adjust when adding 16- or 32-bit fields).
  uint16_t tail_reserved = 0;

  // Copies sizeof(EvmcsPage) bytes from the start of `page`.
  static EvmcsPage load(std::span<const std::byte, kPageSize> page);
  // Writes the struct's bytes to the start of `page`; the rest is untouched.
  void store(std::span<std::byte, kPageSize> page) const;

  bool operator==(const EvmcsPage&) const = default;
};

// Byte offsets in the page, for L0 code that updates a single header word
// in guest memory (the "mark all clean" write after a successful entry).
inline constexpr size_t kEvmcsCleanFieldsOffset = offsetof(EvmcsPage, clean_fields);
inline constexpr size_t kEvmcsEnlightenmentsOffset = offsetof(EvmcsPage, enlightenments_control);

// One row of the eVMCS field table.
struct EvmcsFieldInfo {
  uint32_t encoding;
  std::string_view name;  // the same member name in Vmcs12 and EvmcsPage
  uint16_t page_offset;
  uint8_t size;
  uint32_t clean_group;  // an evmcs_clean bit, or kNone
};

// The fields the eVMCS carries, in page order.
std::span<const EvmcsFieldInfo> evmcs_fields();
// The row for a full-field encoding, or nullptr if the eVMCS does not carry it.
const EvmcsFieldInfo* find_evmcs_field(uint32_t encoding);

// The per-entry snapshot of seed patch 6.
struct EvmcsSnapshot {
  uint32_t clean_fields = 0;
  bool msr_bitmap = false;       // the MSR-bitmap enlightenment is on
  bool flush_hypercall = false;  // the nested-flush-hypercall enlightenment is on

  // Reads the three values from `page` once. With `force_dirty` (VMLAUNCH,
  // or an eVMCS address different from the last entry's) clean_fields is 0:
  // nothing L0 cached for another VMCS or launch may be trusted. KVM also
  // clears the bits in the page itself then; callers that want that write 0
  // at kEvmcsCleanFieldsOffset.
  static EvmcsSnapshot take(const EvmcsPage& page, bool force_dirty);

  // True when `group` (one evmcs_clean bit) is marked unchanged. kNone is
  // never clean.
  bool group_clean(uint32_t group) const { return group != 0 && (clean_fields & group) == group; }
  // L0 may reuse its merged MSR bitmap as is: the enlightenment is on and
  // the MSR_BITMAP group is clean (seed notes §0, step 2).
  bool msr_bitmap_unchanged() const { return msr_bitmap && group_clean(evmcs_clean::kMsrBitmap); }
};

// Fails with VMfailInvalid unless page.revision_id is kEvmcsRevision (KVM's
// EVMPTRLD_VMFAIL). nestcache's L1 has no need for KVM's workaround that also
// accepts the vmcs12 revision (a deliberate difference: docs/kvm-differences.md).
VmxStatus check_evmcs_revision(const EvmcsPage& page);

// Nested entry: copies into `dst` every carried, L1-writable field whose
// group is dirty in `clean_fields` (use EvmcsSnapshot::clean_fields; pass 0
// for a full copy). Fields of group kNone are always copied; read-only
// (exit-information) fields never are; fields the eVMCS does not carry keep
// their vmcs12 values.
void copy_evmcs_to_vmcs12(const EvmcsPage& src, Vmcs12& dst, uint32_t clean_fields);

// Nested exit: writes L2's guest state and the exit-information fields (the
// VM-instruction error included) from `src` into the page. Controls and host
// state belong to L1 and are not written; neither are the header words.
void copy_vmcs12_to_evmcs(const Vmcs12& src, EvmcsPage& dst);

// What an enlightened L1 does in place of VMWRITE: stores `value` (truncated
// to the field width) and clears the field's clean bit. VMfailValid(12) if
// the eVMCS does not carry the field. For guest programs and tests.
VmxStatus evmcs_guest_write(EvmcsPage& page, uint32_t encoding, uint64_t value);

// VMREAD with an eVMCS current, outside guest mode: the field's value in the
// page, zero-extended; VMfailValid(12) for a field the eVMCS does not carry
// or a high access.
VmxResult<uint64_t> evmcs_vmread(const EvmcsPage& page, uint32_t encoding);

// VMWRITE with an eVMCS current: always VMfailInvalid (see the header comment).
VmxStatus evmcs_vmwrite(uint32_t encoding);

// eVMCS v1 cannot express posted interrupts, APIC-access virtualization,
// APIC-register virtualization, virtual-interrupt delivery, PAUSE-loop
// exiting, VM functions, VMCS shadowing, PML, #VE or the preemption timer:
// on a vCPU with the enlightened VMCS enabled -- an eVMCS in use or a plain
// vmcs12 alike -- a vmcs12 that enables one fails the entry with
// VMfailValid(7), rule "evmcs-unsupported-control" (KVM's
// nested_evmcs_check_controls, which reads the secondary controls as written
// even when they are not active). check_entry_controls runs it when
// EntryCheckEnv::evmcs_enabled.
VmxStatus check_evmcs_controls(const Vmcs12& v);

// The Hyper-V VP-assist page, first 56 bytes (TLFS layout and offsets).
struct VpAssistPage {
  uint32_t apic_assist = 0;
  uint32_t reserved0 = 0;
  uint32_t vtl_entry_reason = 0;
  uint32_t vtl_reserved = 0;
  uint64_t vtl_ret_rax = 0;
  uint64_t vtl_ret_rcx = 0;
  uint32_t nested_features = 0;  // bit 0: direct hypercall
  uint32_t nested_hypercall_controls = 0;
  uint8_t enlighten_vmentry = 0;  // "enlightened VM-entry enabled"
  uint8_t reserved1[7] = {};
  uint64_t current_nested_vmcs = 0;  // gpa of the current eVMCS

  static VpAssistPage load(std::span<const std::byte, kPageSize> page);
  void store(std::span<std::byte, kPageSize> page) const;

  // The current eVMCS address when enlightened VM entry is enabled.
  std::optional<Gpa> current_evmcs() const {
    if (!enlighten_vmentry) return std::nullopt;
    return current_nested_vmcs;
  }
};

inline constexpr size_t kVpAssistEnlightenVmentryOffset = 40;
inline constexpr size_t kVpAssistCurrentNestedVmcsOffset = 48;
static_assert(offsetof(VpAssistPage, enlighten_vmentry) == kVpAssistEnlightenVmentryOffset);
static_assert(offsetof(VpAssistPage, current_nested_vmcs) == kVpAssistCurrentNestedVmcsOffset);

// HV_X64_MSR_VP_ASSIST_PAGE (TLFS): bit 0 enables the page, bits 63:12 its gpa.
inline constexpr uint32_t kHvX64MsrVpAssistPage = 0x40000073;
inline constexpr uint64_t kVpAssistPageEnable = 1;

}  // namespace nestcache::vmx
