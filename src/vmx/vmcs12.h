// vmcs12: the VMCS that L1 builds for its L2, as L0 sees it.
//
// L1 owns a 4 KiB VMCS region in its memory. Its format is implementation
// specific except for the first 8 bytes (SDM 24.2), so nestcache defines it:
// Vmcs12 is that region decoded, one named member per supported field, and
// serialize()/deserialize() convert between the two. L0 reads the region at
// VMPTRLD, keeps this decoded copy while the VMCS is current (all VMREAD,
// VMWRITE and nested entries use it), and writes it back at VMCLEAR or at the
// VMPTRLD of another VMCS.
//
// Region layout (little-endian):
//   0   u32  revision identifier (bits 30:0) | shadow-VMCS indicator (bit 31)
//   4   u32  VMX-abort indicator
//   8   u32  launch state: 0 clear, 1 launched
//   12  u32  reserved, 0
//   16+      the fields, each at FieldInfo::page_offset with its own width;
//            every other byte is 0.
// The offsets are the member offsets of Vmcs12 (a standard-layout struct).
// Adding, removing or moving a field therefore changes the format of VMCS
// regions and of nested-state blobs: bump kNestedStateVersion with it and
// update the layout test (tests/vmx/vmcs12_test.cc pins the offsets). Keep
// the fields grouped by width so none needs padding before it.
//
// VMREAD/VMWRITE semantics (SDM Vol. 3C 30.3, VMREAD and VMWRITE):
//   - an encoding that is not in the field table, has reserved bits set, or
//     is the "high" access of a field that is not 64 bits wide
//     -> VMfailValid(12, unsupported VMCS component);
//   - VMWRITE to a read-only (exit-information) field -> VMfailValid(13),
//     unless the CPU reports "VMWRITE to any supported field" (IA32_VMX_MISC
//     bit 29), which the model's CPU does for L1 as KVM's does
//     (kModelVmcsAccess);
//   - values are truncated to the field width on write and zero-extended on
//     read; the high access of a 64-bit field reads/writes bits 63:32;
//   - a VMWRITE of a guest segment's access-rights field keeps only bits
//     16:12 and 7:0 (Intel CPUs drop the reserved bits, and KVM does so for
//     L1 so VMREAD returns what hardware would).
// Whether there is a current VMCS at all (VMfailInvalid otherwise) and
// whether eVMCS is in use is the instruction emulator's business (evmcs.h
// says what VMREAD/VMWRITE do then).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

#include "base/types.h"
#include "vmx/vmx_defs.h"

namespace nestcache::vmx {

// X(member, encoding, C++ type). Grouped by width so no field needs
// padding before it; see the layout note above before changing the list.
#define NC_VMCS12_FIELDS(X)                                                          \
  /* 64-bit and natural-width fields */                                              \
  X(msr_bitmap, field::kMsrBitmap, uint64_t)                                         \
  X(tsc_offset, field::kTscOffset, uint64_t)                                         \
  X(virtual_apic_page_addr, field::kVirtualApicPageAddr, uint64_t)                   \
  X(apic_access_addr, field::kApicAccessAddr, uint64_t)                              \
  X(posted_intr_desc_addr, field::kPostedIntrDescAddr, uint64_t)                     \
  X(ept_pointer, field::kEptPointer, uint64_t)                                       \
  X(eoi_exit_bitmap0, field::kEoiExitBitmap0, uint64_t)                              \
  X(eoi_exit_bitmap1, field::kEoiExitBitmap1, uint64_t)                              \
  X(eoi_exit_bitmap2, field::kEoiExitBitmap2, uint64_t)                              \
  X(eoi_exit_bitmap3, field::kEoiExitBitmap3, uint64_t)                              \
  X(guest_physical_address, field::kGuestPhysicalAddress, uint64_t)                  \
  X(vmcs_link_pointer, field::kVmcsLinkPointer, uint64_t)                            \
  X(guest_ia32_pat, field::kGuestIa32Pat, uint64_t)                                  \
  X(guest_ia32_efer, field::kGuestIa32Efer, uint64_t)                                \
  X(host_ia32_pat, field::kHostIa32Pat, uint64_t)                                    \
  X(host_ia32_efer, field::kHostIa32Efer, uint64_t)                                  \
  X(cr0_guest_host_mask, field::kCr0GuestHostMask, uint64_t)                         \
  X(cr4_guest_host_mask, field::kCr4GuestHostMask, uint64_t)                         \
  X(cr0_read_shadow, field::kCr0ReadShadow, uint64_t)                                \
  X(cr4_read_shadow, field::kCr4ReadShadow, uint64_t)                                \
  X(exit_qualification, field::kExitQualification, uint64_t)                         \
  X(guest_linear_address, field::kGuestLinearAddress, uint64_t)                      \
  X(guest_cr0, field::kGuestCr0, uint64_t)                                           \
  X(guest_cr3, field::kGuestCr3, uint64_t)                                           \
  X(guest_cr4, field::kGuestCr4, uint64_t)                                           \
  X(guest_cs_base, field::kGuestCsBase, uint64_t)                                    \
  X(guest_dr7, field::kGuestDr7, uint64_t)                                           \
  X(guest_rsp, field::kGuestRsp, uint64_t)                                           \
  X(guest_rip, field::kGuestRip, uint64_t)                                           \
  X(guest_rflags, field::kGuestRflags, uint64_t)                                     \
  X(host_cr0, field::kHostCr0, uint64_t)                                             \
  X(host_cr3, field::kHostCr3, uint64_t)                                             \
  X(host_cr4, field::kHostCr4, uint64_t)                                             \
  X(host_rsp, field::kHostRsp, uint64_t)                                             \
  X(host_rip, field::kHostRip, uint64_t)                                             \
  /* 32-bit fields */                                                                \
  X(pin_based_controls, field::kPinBasedControls, uint32_t)                          \
  X(primary_proc_controls, field::kPrimaryProcControls, uint32_t)                    \
  X(exception_bitmap, field::kExceptionBitmap, uint32_t)                             \
  X(exit_controls, field::kExitControls, uint32_t)                                   \
  X(entry_controls, field::kEntryControls, uint32_t)                                 \
  X(entry_interruption_info, field::kEntryInterruptionInfo, uint32_t)                \
  X(entry_exception_error_code, field::kEntryExceptionErrorCode, uint32_t)           \
  X(entry_instruction_length, field::kEntryInstructionLength, uint32_t)              \
  X(tpr_threshold, field::kTprThreshold, uint32_t)                                   \
  X(secondary_proc_controls, field::kSecondaryProcControls, uint32_t)                \
  X(vm_instruction_error, field::kVmInstructionError, uint32_t)                      \
  X(exit_reason, field::kExitReason, uint32_t)                                       \
  X(exit_interruption_info, field::kExitInterruptionInfo, uint32_t)                  \
  X(exit_interruption_error_code, field::kExitInterruptionErrorCode, uint32_t)       \
  X(idt_vectoring_info, field::kIdtVectoringInfo, uint32_t)                          \
  X(idt_vectoring_error_code, field::kIdtVectoringErrorCode, uint32_t)               \
  X(exit_instruction_length, field::kExitInstructionLength, uint32_t)                \
  X(vmx_instruction_info, field::kVmxInstructionInfo, uint32_t)                      \
  X(guest_cs_limit, field::kGuestCsLimit, uint32_t)                                  \
  X(guest_cs_ar_bytes, field::kGuestCsArBytes, uint32_t)                             \
  X(guest_interruptibility, field::kGuestInterruptibility, uint32_t)                 \
  X(guest_activity_state, field::kGuestActivityState, uint32_t)                      \
  /* 16-bit fields */                                                                \
  X(virtual_processor_id, field::kVirtualProcessorId, uint16_t)                      \
  X(posted_intr_notification_vector, field::kPostedIntrNotificationVector, uint16_t) \
  X(guest_cs_selector, field::kGuestCsSelector, uint16_t)                            \
  X(guest_interrupt_status, field::kGuestInterruptStatus, uint16_t)                  \
  X(host_cs_selector, field::kHostCsSelector, uint16_t)

// Launch state of a VMCS (SDM 24.1): VMLAUNCH needs "clear", VMRESUME
// "launched"; VMCLEAR makes it clear, a successful VMLAUNCH launched.
inline constexpr uint32_t kLaunchStateClear = 0;
inline constexpr uint32_t kLaunchStateLaunched = 1;

// Model options for VMREAD/VMWRITE.
struct VmcsAccessOptions {
  // IA32_VMX_MISC bit 29: VMWRITE may write the read-only (exit-information)
  // fields. Off here, so that a bare Vmcs12::write keeps the SDM's error 13.
  bool vmwrite_any_field = false;
};

// What the model's CPU offers L1: VMWRITE to any supported field, as KVM
// always advertises in IA32_VMX_MISC (nested_vmx_setup_misc_data), and L1
// hypervisors rely on (they restore exit information that way).
inline constexpr VmcsAccessOptions kModelVmcsAccess{.vmwrite_any_field = true};

// What a VM exit records in the exit-information fields. L0 fills one per
// reflected exit and applies it with Vmcs12::set_exit_info().
struct ExitInfo {
  // The whole exit-reason field: basic reason in 15:0, kExitReasonEntryFailure
  // in bit 31 for a failed VM entry.
  uint32_t exit_reason = 0;
  uint64_t qualification = 0;
  Gpa guest_physical_address = 0;  // EPT violations/misconfigurations
  uint64_t guest_linear_address = 0;
  uint32_t interruption_info = 0;  // external interrupts (with ack-on-exit), exceptions
  uint32_t interruption_error_code = 0;
  uint32_t idt_vectoring_info = 0;
  uint32_t idt_vectoring_error_code = 0;
  uint32_t instruction_length = 0;  // instruction-caused exits (VMCALL, HLT, ...)
  uint32_t instruction_info = 0;

  static ExitInfo of(ExitReason r, uint64_t qualification = 0) {
    ExitInfo e;
    e.exit_reason = static_cast<uint32_t>(r);
    e.qualification = qualification;
    return e;
  }
};

struct Vmcs12 {
  uint32_t revision_id = 0;  // bits 30:0 revision, bit 31 shadow-VMCS indicator
  uint32_t abort_indicator = 0;
  uint32_t launch_state = kLaunchStateClear;
  uint32_t header_reserved = 0;

#define NC_VMCS12_MEMBER(name, enc, type) type name = 0;
  NC_VMCS12_FIELDS(NC_VMCS12_MEMBER)
#undef NC_VMCS12_MEMBER

  // VMREAD: the value of the field `encoding`, zero-extended. Fails with
  // VMfailValid(12) for an unsupported component (see the header comment).
  VmxResult<uint64_t> read(uint32_t encoding) const;

  // VMWRITE: stores `value` truncated to the field's width. Fails with
  // VMfailValid(12) for an unsupported component and VMfailValid(13) for a
  // read-only field (unless opts.vmwrite_any_field); on failure nothing changes.
  VmxStatus write(uint32_t encoding, uint64_t value, VmcsAccessOptions opts = {});

  // L0's own write of any supported field, read-only ones included (the
  // processor writes exit information; so does L0 on L1's behalf). Fails only
  // for an unsupported component.
  VmxStatus write_any(uint32_t encoding, uint64_t value);

  // Records a VM exit: writes every exit-information field from `info`
  // (fields `info` leaves at 0 become 0). The VM-instruction error field is
  // not an exit-information field and is left alone.
  void set_exit_info(const ExitInfo& info);

  // Records VMfailValid's error number.
  void set_vm_instruction_error(VmInstructionError e) {
    vm_instruction_error = static_cast<uint32_t>(e);
  }

  bool launched() const { return launch_state == kLaunchStateLaunched; }

  // Writes the region image described above into `page`, every byte of it.
  void serialize(std::span<std::byte, kPageSize> page) const;

  // Decodes a region image. Never fails: whatever L1 left in its region is
  // taken as is (the revision check is VMPTRLD's, the launch-state sanity
  // check is the nested-state decoder's). Bytes outside the fields are ignored.
  static Vmcs12 deserialize(std::span<const std::byte, kPageSize> page);

  bool operator==(const Vmcs12&) const = default;
};

static_assert(sizeof(Vmcs12) <= kVmcsRegionSize, "vmcs12 must fit in its 4 KiB region");

// One row of the field table.
struct FieldInfo {
  uint32_t encoding;
  std::string_view name;  // the Vmcs12 member name, e.g. "msr_bitmap"
  uint16_t page_offset;   // where serialize() puts it in the region
  uint8_t size;           // bytes in the region: 2, 4 or 8

  FieldWidth width() const { return field_width(encoding); }
  FieldType type() const { return field_type(encoding); }
  bool read_only() const { return type() == FieldType::kReadOnly; }
};

// Every field Vmcs12 supports, in region order.
std::span<const FieldInfo> vmcs12_fields();

// The table row of a full-field encoding, or nullptr (unsupported, reserved
// bits set, or the high access of a 64-bit field: use read()/write() for that).
const FieldInfo* find_vmcs12_field(uint32_t encoding);

}  // namespace nestcache::vmx
