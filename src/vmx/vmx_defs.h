// Architectural VMX vocabulary, named once: VMCS field encodings, control bits,
// exit reasons, VM-instruction error numbers and MSR numbers, EPT entries, MSR
// bitmaps, the virtual-APIC page, the posted-interrupt descriptor and x2APIC
// registers, with the values the Intel SDM (Vol. 3A chapter 10, Vol. 3C
// chapters 24-30 and appendices A-C) gives them. Also the
// outcome type every VMX-emulation function returns (VmxFail).
//
// Only what nestcache models is here; adding a field or a bit is one line.
// Nothing in this header reaches memory or a vCPU.
//
// Section numbers follow the SDM edition KVM's sources cite (VMCS in chapter
// 24, VM entries in 26, VMX instruction reference in 30); recent editions
// number each of these chapters one higher.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

#include <fmt/format.h>
#include <tl/expected.hpp>

#include "base/error.h"
#include "base/types.h"

namespace nestcache::vmx {

// ---------------------------------------------------------------------------
// VMCS field encodings (SDM Vol. 3C, Appendix B).
//
// Encoding bits: 0 access type (1 = high 32 bits of a 64-bit field), 9:1
// index, 11:10 type, 13 and 14 width, 31:15 reserved (must be 0).
// ---------------------------------------------------------------------------

enum class FieldWidth : uint8_t { k16 = 0, k64 = 1, k32 = 2, kNatural = 3 };
enum class FieldType : uint8_t { kControl = 0, kReadOnly = 1, kGuestState = 2, kHostState = 3 };

// The width and type an encoding names (bits 14:13 and 11:10); defined for
// any value, including encodings no VMCS supports.
constexpr FieldWidth field_width(uint32_t encoding) {
  return static_cast<FieldWidth>((encoding >> 13) & 3);
}
constexpr FieldType field_type(uint32_t encoding) {
  return static_cast<FieldType>((encoding >> 10) & 3);
}
// True for the "high" half of a 64-bit field (encoding of the full field + 1).
constexpr bool field_is_high_access(uint32_t encoding) { return (encoding & 1) != 0; }

// "16-bit", "natural-width", "read-only data", ... for messages.
constexpr std::string_view field_width_name(FieldWidth w) {
  switch (w) {
    case FieldWidth::k16: return "16-bit";
    case FieldWidth::k64: return "64-bit";
    case FieldWidth::k32: return "32-bit";
    case FieldWidth::kNatural: return "natural-width";
  }
  return "?";
}
constexpr std::string_view field_type_name(FieldType t) {
  switch (t) {
    case FieldType::kControl: return "control";
    case FieldType::kReadOnly: return "read-only data";
    case FieldType::kGuestState: return "guest-state";
    case FieldType::kHostState: return "host-state";
  }
  return "?";
}

namespace field {
// 16-bit control
inline constexpr uint32_t kVirtualProcessorId = 0x0000;
inline constexpr uint32_t kPostedIntrNotificationVector = 0x0002;
// 16-bit guest state
inline constexpr uint32_t kGuestCsSelector = 0x0802;
inline constexpr uint32_t kGuestInterruptStatus = 0x0810;  // RVI (7:0), SVI (15:8)
// 16-bit host state
inline constexpr uint32_t kHostCsSelector = 0x0c02;
// 64-bit control
inline constexpr uint32_t kMsrBitmap = 0x2004;
inline constexpr uint32_t kTscOffset = 0x2010;
inline constexpr uint32_t kVirtualApicPageAddr = 0x2012;
inline constexpr uint32_t kApicAccessAddr = 0x2014;
inline constexpr uint32_t kPostedIntrDescAddr = 0x2016;
inline constexpr uint32_t kEptPointer = 0x201a;
inline constexpr uint32_t kEoiExitBitmap0 = 0x201c;
inline constexpr uint32_t kEoiExitBitmap1 = 0x201e;
inline constexpr uint32_t kEoiExitBitmap2 = 0x2020;
inline constexpr uint32_t kEoiExitBitmap3 = 0x2022;
// 64-bit read-only data
inline constexpr uint32_t kGuestPhysicalAddress = 0x2400;
// 64-bit guest state
inline constexpr uint32_t kVmcsLinkPointer = 0x2800;
inline constexpr uint32_t kGuestIa32Pat = 0x2804;
inline constexpr uint32_t kGuestIa32Efer = 0x2806;
// 64-bit host state
inline constexpr uint32_t kHostIa32Pat = 0x2c00;
inline constexpr uint32_t kHostIa32Efer = 0x2c02;
// 32-bit control
inline constexpr uint32_t kPinBasedControls = 0x4000;
inline constexpr uint32_t kPrimaryProcControls = 0x4002;
inline constexpr uint32_t kExceptionBitmap = 0x4004;
inline constexpr uint32_t kExitControls = 0x400c;
inline constexpr uint32_t kEntryControls = 0x4012;
inline constexpr uint32_t kEntryInterruptionInfo = 0x4016;
inline constexpr uint32_t kEntryExceptionErrorCode = 0x4018;
inline constexpr uint32_t kEntryInstructionLength = 0x401a;
inline constexpr uint32_t kTprThreshold = 0x401c;
inline constexpr uint32_t kSecondaryProcControls = 0x401e;
// 32-bit read-only data
inline constexpr uint32_t kVmInstructionError = 0x4400;
inline constexpr uint32_t kExitReason = 0x4402;
inline constexpr uint32_t kExitInterruptionInfo = 0x4404;
inline constexpr uint32_t kExitInterruptionErrorCode = 0x4406;
inline constexpr uint32_t kIdtVectoringInfo = 0x4408;
inline constexpr uint32_t kIdtVectoringErrorCode = 0x440a;
inline constexpr uint32_t kExitInstructionLength = 0x440c;
inline constexpr uint32_t kVmxInstructionInfo = 0x440e;
// 32-bit guest state
inline constexpr uint32_t kGuestCsLimit = 0x4802;
inline constexpr uint32_t kGuestCsArBytes = 0x4816;
inline constexpr uint32_t kGuestInterruptibility = 0x4824;
inline constexpr uint32_t kGuestActivityState = 0x4826;
// natural-width control
inline constexpr uint32_t kCr0GuestHostMask = 0x6000;
inline constexpr uint32_t kCr4GuestHostMask = 0x6002;
inline constexpr uint32_t kCr0ReadShadow = 0x6004;
inline constexpr uint32_t kCr4ReadShadow = 0x6006;
// natural-width read-only data
inline constexpr uint32_t kExitQualification = 0x6400;
inline constexpr uint32_t kGuestLinearAddress = 0x640a;
// natural-width guest state
inline constexpr uint32_t kGuestCr0 = 0x6800;
inline constexpr uint32_t kGuestCr3 = 0x6802;
inline constexpr uint32_t kGuestCr4 = 0x6804;
inline constexpr uint32_t kGuestCsBase = 0x6808;
inline constexpr uint32_t kGuestDr7 = 0x681a;
inline constexpr uint32_t kGuestRsp = 0x681c;
inline constexpr uint32_t kGuestRip = 0x681e;
inline constexpr uint32_t kGuestRflags = 0x6820;
// natural-width host state
inline constexpr uint32_t kHostCr0 = 0x6c00;
inline constexpr uint32_t kHostCr3 = 0x6c02;
inline constexpr uint32_t kHostCr4 = 0x6c04;
inline constexpr uint32_t kHostRsp = 0x6c14;
inline constexpr uint32_t kHostRip = 0x6c16;
}  // namespace field

// ---------------------------------------------------------------------------
// VM-execution, VM-exit and VM-entry control bits (SDM 24.6-24.8).
// ---------------------------------------------------------------------------

namespace pin {  // pin-based VM-execution controls
inline constexpr uint32_t kExternalInterruptExiting = 1u << 0;
inline constexpr uint32_t kNmiExiting = 1u << 3;
inline constexpr uint32_t kVirtualNmis = 1u << 5;
inline constexpr uint32_t kPreemptionTimer = 1u << 6;
inline constexpr uint32_t kPostedInterrupts = 1u << 7;
// Bits 1, 2 and 4 are "default1": even IA32_VMX_TRUE_PINBASED_CTLS reports
// them as must-be-1, so every VMCS sets them.
inline constexpr uint32_t kAlwaysOn = 0x00000016;
}  // namespace pin

namespace proc {  // primary processor-based VM-execution controls
inline constexpr uint32_t kInterruptWindowExiting = 1u << 2;
inline constexpr uint32_t kUseTscOffsetting = 1u << 3;
inline constexpr uint32_t kHltExiting = 1u << 7;
inline constexpr uint32_t kInvlpgExiting = 1u << 9;
inline constexpr uint32_t kMwaitExiting = 1u << 10;
inline constexpr uint32_t kRdpmcExiting = 1u << 11;
inline constexpr uint32_t kRdtscExiting = 1u << 12;
inline constexpr uint32_t kCr3LoadExiting = 1u << 15;
inline constexpr uint32_t kCr3StoreExiting = 1u << 16;
inline constexpr uint32_t kCr8LoadExiting = 1u << 19;
inline constexpr uint32_t kCr8StoreExiting = 1u << 20;
inline constexpr uint32_t kUseTprShadow = 1u << 21;
inline constexpr uint32_t kNmiWindowExiting = 1u << 22;
inline constexpr uint32_t kMovDrExiting = 1u << 23;
inline constexpr uint32_t kUnconditionalIoExiting = 1u << 24;
inline constexpr uint32_t kUseIoBitmaps = 1u << 25;
inline constexpr uint32_t kMonitorTrapFlag = 1u << 27;
inline constexpr uint32_t kUseMsrBitmaps = 1u << 28;
inline constexpr uint32_t kMonitorExiting = 1u << 29;
inline constexpr uint32_t kPauseExiting = 1u << 30;
inline constexpr uint32_t kActivateSecondaryControls = 1u << 31;
// Default1 bits that the TRUE capability MSR still reports as must-be-1
// (1, 4-6, 8, 13, 14, 26; CR3-load/store exiting may be 0 with TRUE MSRs).
inline constexpr uint32_t kAlwaysOn = 0x04006172;
}  // namespace proc

namespace proc2 {  // secondary processor-based VM-execution controls
inline constexpr uint32_t kVirtualizeApicAccesses = 1u << 0;
inline constexpr uint32_t kEnableEpt = 1u << 1;
inline constexpr uint32_t kDescriptorTableExiting = 1u << 2;
inline constexpr uint32_t kEnableRdtscp = 1u << 3;
inline constexpr uint32_t kVirtualizeX2apicMode = 1u << 4;
inline constexpr uint32_t kEnableVpid = 1u << 5;
inline constexpr uint32_t kWbinvdExiting = 1u << 6;
inline constexpr uint32_t kUnrestrictedGuest = 1u << 7;
inline constexpr uint32_t kApicRegisterVirtualization = 1u << 8;
inline constexpr uint32_t kVirtualInterruptDelivery = 1u << 9;
inline constexpr uint32_t kPauseLoopExiting = 1u << 10;
inline constexpr uint32_t kEnableInvpcid = 1u << 12;
inline constexpr uint32_t kEnableVmFunctions = 1u << 13;
inline constexpr uint32_t kVmcsShadowing = 1u << 14;
inline constexpr uint32_t kEnablePml = 1u << 17;
inline constexpr uint32_t kEptViolationVe = 1u << 18;
inline constexpr uint32_t kEnableXsaves = 1u << 20;
}  // namespace proc2

namespace exit_ctl {  // VM-exit controls
inline constexpr uint32_t kSaveDebugControls = 1u << 2;
inline constexpr uint32_t kHostAddressSpaceSize = 1u << 9;
inline constexpr uint32_t kLoadPerfGlobalCtrl = 1u << 12;
inline constexpr uint32_t kAckInterruptOnExit = 1u << 15;
inline constexpr uint32_t kSavePat = 1u << 18;
inline constexpr uint32_t kLoadPat = 1u << 19;
inline constexpr uint32_t kSaveEfer = 1u << 20;
inline constexpr uint32_t kLoadEfer = 1u << 21;
inline constexpr uint32_t kSavePreemptionTimer = 1u << 22;
// Default1 bits (0-8, 10, 11, 13, 14, 16, 17) minus bit 2 (TRUE MSR).
inline constexpr uint32_t kAlwaysOn = 0x00036dfb;
}  // namespace exit_ctl

namespace entry_ctl {  // VM-entry controls
inline constexpr uint32_t kLoadDebugControls = 1u << 2;
inline constexpr uint32_t kIa32eModeGuest = 1u << 9;
inline constexpr uint32_t kEntryToSmm = 1u << 10;
inline constexpr uint32_t kLoadPerfGlobalCtrl = 1u << 13;
inline constexpr uint32_t kLoadPat = 1u << 14;
inline constexpr uint32_t kLoadEfer = 1u << 15;
// Default1 bits (0-8, 12) minus bit 2 (TRUE MSR).
inline constexpr uint32_t kAlwaysOn = 0x000011fb;
}  // namespace entry_ctl

// EPT pointer (SDM 24.6.11).
namespace eptp {
inline constexpr uint64_t kMemTypeMask = 0x7;
inline constexpr uint64_t kMemTypeUc = 0;
inline constexpr uint64_t kMemTypeWb = 6;
inline constexpr uint64_t kWalkLengthShift = 3;  // bits 5:3 = page-walk length - 1
inline constexpr uint64_t kWalkLengthMask = 0x7ull << kWalkLengthShift;
inline constexpr uint64_t kWalkLength4 = 3ull << kWalkLengthShift;
inline constexpr uint64_t kAccessedDirty = 1ull << 6;
inline constexpr uint64_t kReservedLow = 0xf80;  // bits 11:7 (no supervisor shadow stacks)
}  // namespace eptp

// VM-entry / VM-exit interruption-information format (SDM 24.8.3, 24.9.2).
namespace intr_info {
inline constexpr uint32_t kVectorMask = 0xff;
inline constexpr uint32_t kTypeShift = 8;
inline constexpr uint32_t kTypeMask = 0x7u << kTypeShift;
inline constexpr uint32_t kDeliverErrorCode = 1u << 11;
inline constexpr uint32_t kNmiUnblockingDueToIret = 1u << 12;
inline constexpr uint32_t kReservedEntry = 0x7ffff000;  // bits 30:12 on entry
inline constexpr uint32_t kValid = 1u << 31;
// Event types, bits 10:8.
inline constexpr uint32_t kTypeExternalInterrupt = 0;
inline constexpr uint32_t kTypeReserved = 1;
inline constexpr uint32_t kTypeNmi = 2;
inline constexpr uint32_t kTypeHardwareException = 3;
inline constexpr uint32_t kTypeSoftwareInterrupt = 4;
inline constexpr uint32_t kTypePrivilegedSoftwareException = 5;
inline constexpr uint32_t kTypeSoftwareException = 6;
inline constexpr uint32_t kTypeOtherEvent = 7;
}  // namespace intr_info

// Guest activity states (SDM 24.4.2).
namespace activity {
inline constexpr uint32_t kActive = 0;
inline constexpr uint32_t kHlt = 1;
inline constexpr uint32_t kShutdown = 2;
inline constexpr uint32_t kWaitForSipi = 3;
}  // namespace activity

// Control-register and RFLAGS bits the checks look at.
inline constexpr uint64_t kCr0Pe = 1ull << 0;
inline constexpr uint64_t kCr0Ne = 1ull << 5;
inline constexpr uint64_t kCr0Pg = 1ull << 31;
inline constexpr uint64_t kCr4Pae = 1ull << 5;
inline constexpr uint64_t kCr4Vmxe = 1ull << 13;
inline constexpr uint64_t kRflagsFixed1 = 1ull << 1;
// Bits 63:22, 15, 5 and 3 of RFLAGS are reserved and must be 0.
inline constexpr uint64_t kRflagsReserved = ~((1ull << 22) - 1) | (1ull << 15) | (1ull << 5) | (1ull << 3);

// EPT paging-structure entries (SDM 28.2.2; 4 KiB pages only in nestcache).
namespace ept {
inline constexpr uint64_t kRead = 1ull << 0;
inline constexpr uint64_t kWrite = 1ull << 1;
inline constexpr uint64_t kExecute = 1ull << 2;
inline constexpr uint64_t kReadWriteExecute = kRead | kWrite | kExecute;
// Bits 51:12: the physical address of the next table or of the page.
inline constexpr uint64_t kAddressMask = 0x000ffffffffff000ull;
inline constexpr int kLevels = 4;
inline constexpr uint64_t kEntriesPerTable = 512;
// True if the entry maps something (any of read, write, execute).
constexpr bool present(uint64_t entry) { return (entry & kReadWriteExecute) != 0; }
// True if the entry is misconfigured (SDM 28.2.3.1): writable but not
// readable. A hypervisor gives an MMIO page such an entry, so every access
// exits with an EPT misconfiguration it can emulate (KVM's MMIO SPTEs).
constexpr bool misconfigured(uint64_t entry) { return (entry & (kRead | kWrite)) == kWrite; }
// The leaf L1 gives an emulated device's MMIO page.
inline constexpr uint64_t kMmioLeaf = kWrite;
// The index of `gpa`'s entry in the table of `level` (4 = PML4 ... 1 = PT).
constexpr uint64_t index(uint64_t gpa, int level) { return (gpa >> (12 + 9 * (level - 1))) & (kEntriesPerTable - 1); }
}  // namespace ept

// INVEPT and INVVPID types (SDM 30.3, "INVEPT" / "INVVPID"): the value in
// the register operand.
enum class InveptType : uint32_t { single_context = 1, global = 2 };
enum class InvvpidType : uint32_t {
  individual_address = 0,
  single_context = 1,
  all_context = 2,
  single_context_retaining_globals = 3,
};

// MSR bitmaps (SDM 24.6.9): one 4 KiB page, four 1 KiB bitmaps — reads of
// the low MSRs 0x0-0x1fff, reads of the high MSRs 0xc0000000-0xc0001fff,
// then writes of each. A set bit makes the access exit; an MSR outside both
// ranges always exits.
namespace msr_bitmap {
inline constexpr uint32_t kLowLast = 0x00001fff;
inline constexpr uint32_t kHighFirst = 0xc0000000;
inline constexpr uint32_t kHighLast = 0xc0001fff;
inline constexpr size_t kReadLow = 0, kReadHigh = 1024, kWriteLow = 2048, kWriteHigh = 3072;
// The byte of the bitmap page that holds `msr`'s bit for a read or a
// write, or -1 for an MSR no bitmap covers (the access always exits).
constexpr int64_t byte_of(uint32_t msr, bool write) {
  if (msr <= kLowLast) return static_cast<int64_t>((write ? kWriteLow : kReadLow) + msr / 8);
  if (msr >= kHighFirst && msr <= kHighLast)
    return static_cast<int64_t>((write ? kWriteHigh : kReadHigh) + (msr - kHighFirst) / 8);
  return -1;
}
// `msr`'s bit within its byte.
constexpr unsigned bit_of(uint32_t msr) { return msr % 8; }
// What the processor and KVM's exit routing both decide (SDM 25.1.3): true
// if an RDMSR (`write` false) or WRMSR of `msr` exits, given the bitmap
// page (4,096 bytes, indexable by byte_of()).
template <class Page>
constexpr bool intercepts(const Page& page, uint32_t msr, bool write) {
  int64_t byte = byte_of(msr, write);
  if (byte < 0) return true;
  return (static_cast<uint8_t>(page[static_cast<size_t>(byte)]) >> bit_of(msr)) & 1;
}
}  // namespace msr_bitmap

// The virtual-APIC page (SDM 29.1): register offsets of the APIC's MMIO
// layout. Interrupt-request, in-service and trigger-mode registers are eight
// 32-bit words, 16 bytes apart.
namespace vapic {
inline constexpr size_t kTpr = 0x80;   // VTPR: priority class in bits 7:4
inline constexpr size_t kPpr = 0xa0;
inline constexpr size_t kEoi = 0xb0;
inline constexpr size_t kIsr = 0x100;
inline constexpr size_t kTmr = 0x180;
inline constexpr size_t kIrr = 0x200;
inline constexpr size_t kRegisterStride = 0x10;
// The offset of the 32-bit word of the 256-bit register at `base` that holds
// `vector`'s bit (bit `vector % 32`).
constexpr size_t word_of(size_t base, unsigned vector) { return base + kRegisterStride * (vector / 32); }
// The VTPR byte for priority class `tpr` (CR8's bits 3:0).
constexpr uint8_t vtpr_of_cr8(uint64_t cr8) { return static_cast<uint8_t>((cr8 & 0xf) << 4); }
}  // namespace vapic

// The posted-interrupt descriptor (SDM 29.6): 64 bytes, 64-byte aligned. PIR
// is the 256-bit request bitmap; the control qword holds ON (outstanding
// notification), SN (suppress notification), the notification vector and the
// destination.
namespace pi_desc {
inline constexpr size_t kPir = 0;          // 4 qwords, vector v in qword v/64, bit v%64
inline constexpr size_t kControl = 32;     // bit 0 ON, bit 1 SN
inline constexpr uint64_t kOn = 1ull << 0;
inline constexpr uint64_t kSn = 1ull << 1;
inline constexpr size_t kNotificationVector = 34;  // byte
inline constexpr size_t kDestination = 36;         // 32 bits
inline constexpr size_t kSize = 64;
inline constexpr uint64_t kAlignment = 64;
// The offset of the PIR qword that holds `vector`'s bit (bit `vector % 64`).
constexpr size_t pir_word(unsigned vector) { return kPir + 8 * (vector / 64); }
}  // namespace pi_desc

// x2APIC registers as MSRs (SDM Vol. 3A 10.12.1.2): MSR 0x800 + MMIO offset / 16.
namespace x2apic {
inline constexpr uint32_t kTpr = 0x808;
inline constexpr uint32_t kPpr = 0x80a;
inline constexpr uint32_t kEoi = 0x80b;
inline constexpr uint32_t kIcr = 0x830;  // 64 bits: destination in 63:32, vector in 7:0
inline constexpr uint32_t kLvtTimer = 0x832;
inline constexpr uint32_t kTimerInitialCount = 0x838;
inline constexpr uint32_t kTimerCurrentCount = 0x839;
inline constexpr uint32_t kTimerDivide = 0x83e;
// An ICR value: a fixed interrupt `vector` to the APIC with id `dest`.
constexpr uint64_t icr(uint32_t dest, uint8_t vector) { return (uint64_t{dest} << 32) | vector; }
constexpr uint32_t icr_destination(uint64_t icr) { return static_cast<uint32_t>(icr >> 32); }
constexpr uint8_t icr_vector(uint64_t icr) { return static_cast<uint8_t>(icr); }
}  // namespace x2apic

// ---------------------------------------------------------------------------
// Exit reasons (SDM Appendix C). The exit-reason field holds the basic reason
// in bits 15:0 and flags above it.
// ---------------------------------------------------------------------------

enum class ExitReason : uint16_t {
  kExceptionOrNmi = 0,
  kExternalInterrupt = 1,
  kTripleFault = 2,
  kInitSignal = 3,
  kStartupIpi = 4,
  kInterruptWindow = 7,
  kNmiWindow = 8,
  kTaskSwitch = 9,
  kCpuid = 10,
  kHlt = 12,
  kInvlpg = 14,
  kRdtsc = 16,
  kVmcall = 18,
  kVmclear = 19,
  kVmlaunch = 20,
  kVmptrld = 21,
  kVmptrst = 22,
  kVmread = 23,
  kVmresume = 24,
  kVmwrite = 25,
  kVmxoff = 26,
  kVmxon = 27,
  kCrAccess = 28,
  kDrAccess = 29,
  kIoInstruction = 30,
  kMsrRead = 31,
  kMsrWrite = 32,
  kEntryFailInvalidGuestState = 33,
  kEntryFailMsrLoading = 34,
  kMwait = 36,
  kMonitorTrapFlag = 37,
  kMonitor = 39,
  kPause = 40,
  kEntryFailMachineCheck = 41,
  kTprBelowThreshold = 43,
  kApicAccess = 44,
  kVirtualizedEoi = 45,
  kEptViolation = 48,
  kEptMisconfig = 49,
  kInvept = 50,
  kPreemptionTimer = 52,
  kInvvpid = 53,
  kWbinvd = 54,
  kApicWrite = 56,
};

inline constexpr uint32_t kExitReasonBasicMask = 0xffff;
inline constexpr uint32_t kExitReasonEntryFailure = 1u << 31;  // VM-entry failure

// The basic exit reason (bits 15:0) of an exit-reason field value.
constexpr ExitReason basic_exit_reason(uint32_t exit_reason_field) {
  return static_cast<ExitReason>(exit_reason_field & kExitReasonBasicMask);
}
// "EPT_VIOLATION" etc.; "UNKNOWN" for values not listed above.
constexpr std::string_view exit_reason_name(ExitReason r) {
  switch (r) {
    case ExitReason::kExceptionOrNmi: return "EXCEPTION_NMI";
    case ExitReason::kExternalInterrupt: return "EXTERNAL_INTERRUPT";
    case ExitReason::kTripleFault: return "TRIPLE_FAULT";
    case ExitReason::kInitSignal: return "INIT_SIGNAL";
    case ExitReason::kStartupIpi: return "STARTUP_IPI";
    case ExitReason::kInterruptWindow: return "INTERRUPT_WINDOW";
    case ExitReason::kNmiWindow: return "NMI_WINDOW";
    case ExitReason::kTaskSwitch: return "TASK_SWITCH";
    case ExitReason::kCpuid: return "CPUID";
    case ExitReason::kHlt: return "HLT";
    case ExitReason::kInvlpg: return "INVLPG";
    case ExitReason::kRdtsc: return "RDTSC";
    case ExitReason::kVmcall: return "VMCALL";
    case ExitReason::kVmclear: return "VMCLEAR";
    case ExitReason::kVmlaunch: return "VMLAUNCH";
    case ExitReason::kVmptrld: return "VMPTRLD";
    case ExitReason::kVmptrst: return "VMPTRST";
    case ExitReason::kVmread: return "VMREAD";
    case ExitReason::kVmresume: return "VMRESUME";
    case ExitReason::kVmwrite: return "VMWRITE";
    case ExitReason::kVmxoff: return "VMXOFF";
    case ExitReason::kVmxon: return "VMXON";
    case ExitReason::kCrAccess: return "CR_ACCESS";
    case ExitReason::kDrAccess: return "DR_ACCESS";
    case ExitReason::kIoInstruction: return "IO_INSTRUCTION";
    case ExitReason::kMsrRead: return "MSR_READ";
    case ExitReason::kMsrWrite: return "MSR_WRITE";
    case ExitReason::kEntryFailInvalidGuestState: return "INVALID_GUEST_STATE";
    case ExitReason::kEntryFailMsrLoading: return "MSR_LOAD_FAIL";
    case ExitReason::kMwait: return "MWAIT";
    case ExitReason::kMonitorTrapFlag: return "MONITOR_TRAP_FLAG";
    case ExitReason::kMonitor: return "MONITOR";
    case ExitReason::kPause: return "PAUSE";
    case ExitReason::kEntryFailMachineCheck: return "MACHINE_CHECK_DURING_ENTRY";
    case ExitReason::kTprBelowThreshold: return "TPR_BELOW_THRESHOLD";
    case ExitReason::kApicAccess: return "APIC_ACCESS";
    case ExitReason::kVirtualizedEoi: return "VIRTUALIZED_EOI";
    case ExitReason::kEptViolation: return "EPT_VIOLATION";
    case ExitReason::kEptMisconfig: return "EPT_MISCONFIG";
    case ExitReason::kInvept: return "INVEPT";
    case ExitReason::kPreemptionTimer: return "PREEMPTION_TIMER";
    case ExitReason::kInvvpid: return "INVVPID";
    case ExitReason::kWbinvd: return "WBINVD";
    case ExitReason::kApicWrite: return "APIC_WRITE";
  }
  return "UNKNOWN";
}

// Exit qualification of an APIC-access exit (SDM 27.2.1, "Exit Qualification
// for APIC-Access VM Exits"): the offset in the APIC-access page in bits 11:0,
// the access type in bits 15:12.
namespace apic_access_qual {
inline constexpr uint64_t kOffsetMask = 0xfff;
inline constexpr unsigned kTypeShift = 12;
inline constexpr uint64_t kLinearRead = 0;   // linear access for a data read
inline constexpr uint64_t kLinearWrite = 1;  // linear access for a data write
// The qualification of an access of `type` at `offset`.
constexpr uint64_t make(uint64_t offset, uint64_t type) { return (offset & kOffsetMask) | (type << kTypeShift); }
}  // namespace apic_access_qual

// Exit qualification of a control-register access (SDM 27.2.1, "Exit
// Qualification for Control-Register Accesses"): the register in bits 3:0,
// the access type in bits 5:4, the general-purpose register in bits 11:8.
namespace cr_access_qual {
inline constexpr uint64_t kMovToCr = 0;
inline constexpr uint64_t kMovFromCr = 1;
constexpr uint64_t make(unsigned cr, uint64_t type, unsigned gpr = 0) {
  return (cr & 0xfu) | ((type & 3) << 4) | (uint64_t{gpr & 0xfu} << 8);
}
}  // namespace cr_access_qual

// Exit qualifications of a VM-entry failure due to invalid guest state (SDM 26.8).
namespace entry_fail_qual {
inline constexpr uint64_t kDefault = 0;
inline constexpr uint64_t kPdpte = 2;
inline constexpr uint64_t kNmiInjection = 3;
inline constexpr uint64_t kVmcsLinkPointer = 4;
}  // namespace entry_fail_qual

// ---------------------------------------------------------------------------
// VM-instruction error numbers (SDM Vol. 3C 30.4, "VM-Instruction Error
// Numbers"); 14, 21 and 27 are not assigned.
// ---------------------------------------------------------------------------

enum class VmInstructionError : uint32_t {
  kNone = 0,
  kVmcallInVmxRoot = 1,
  kVmclearInvalidAddress = 2,
  kVmclearVmxonPointer = 3,
  kVmlaunchNonClearVmcs = 4,
  kVmresumeNonLaunchedVmcs = 5,
  kVmresumeAfterVmxoff = 6,
  kEntryInvalidControlFields = 7,
  kEntryInvalidHostStateFields = 8,
  kVmptrldInvalidAddress = 9,
  kVmptrldVmxonPointer = 10,
  kVmptrldIncorrectRevision = 11,
  kUnsupportedVmcsComponent = 12,
  kVmwriteReadOnlyComponent = 13,
  kVmxonInVmxRoot = 15,
  kEntryInvalidExecutiveVmcsPointer = 16,
  kEntryNonLaunchedExecutiveVmcs = 17,
  kEntryExecutiveVmcsNotVmxon = 18,
  kVmcallNonClearVmcs = 19,
  kVmcallInvalidExitControls = 20,
  kVmcallIncorrectMsegRevision = 22,
  kVmxoffUnderDualMonitor = 23,
  kVmcallInvalidSmmMonitorFeatures = 24,
  kEntryInvalidExecControlsInExecutiveVmcs = 25,
  kEntryEventsBlockedByMovSs = 26,
  kInvalidInveptInvvpidOperand = 28,
};

// The SDM's description of an error number ("VMWRITE to read-only VMCS
// component"); "reserved" for the unassigned numbers.
constexpr std::string_view vm_instruction_error_text(VmInstructionError e) {
  using E = VmInstructionError;
  switch (e) {
    case E::kNone: return "no error";
    case E::kVmcallInVmxRoot: return "VMCALL executed in VMX root operation";
    case E::kVmclearInvalidAddress: return "VMCLEAR with invalid physical address";
    case E::kVmclearVmxonPointer: return "VMCLEAR with VMXON pointer";
    case E::kVmlaunchNonClearVmcs: return "VMLAUNCH with non-clear VMCS";
    case E::kVmresumeNonLaunchedVmcs: return "VMRESUME with non-launched VMCS";
    case E::kVmresumeAfterVmxoff: return "VMRESUME after VMXOFF";
    case E::kEntryInvalidControlFields: return "VM entry with invalid control field(s)";
    case E::kEntryInvalidHostStateFields: return "VM entry with invalid host-state field(s)";
    case E::kVmptrldInvalidAddress: return "VMPTRLD with invalid physical address";
    case E::kVmptrldVmxonPointer: return "VMPTRLD with VMXON pointer";
    case E::kVmptrldIncorrectRevision: return "VMPTRLD with incorrect VMCS revision identifier";
    case E::kUnsupportedVmcsComponent: return "VMREAD/VMWRITE from/to unsupported VMCS component";
    case E::kVmwriteReadOnlyComponent: return "VMWRITE to read-only VMCS component";
    case E::kVmxonInVmxRoot: return "VMXON executed in VMX root operation";
    case E::kEntryInvalidExecutiveVmcsPointer: return "VM entry with invalid executive-VMCS pointer";
    case E::kEntryNonLaunchedExecutiveVmcs: return "VM entry with non-launched executive VMCS";
    case E::kEntryExecutiveVmcsNotVmxon:
      return "VM entry with executive-VMCS pointer not VMXON pointer";
    case E::kVmcallNonClearVmcs: return "VMCALL with non-clear VMCS";
    case E::kVmcallInvalidExitControls: return "VMCALL with invalid VM-exit control fields";
    case E::kVmcallIncorrectMsegRevision: return "VMCALL with incorrect MSEG revision identifier";
    case E::kVmxoffUnderDualMonitor: return "VMXOFF under dual-monitor treatment of SMIs and SMM";
    case E::kVmcallInvalidSmmMonitorFeatures: return "VMCALL with invalid SMM-monitor features";
    case E::kEntryInvalidExecControlsInExecutiveVmcs:
      return "VM entry with invalid VM-execution control fields in executive VMCS";
    case E::kEntryEventsBlockedByMovSs: return "VM entry with events blocked by MOV SS";
    case E::kInvalidInveptInvvpidOperand: return "invalid operand to INVEPT/INVVPID";
  }
  return "reserved";
}

// ---------------------------------------------------------------------------
// Revision identifiers and region sizes.
// ---------------------------------------------------------------------------

// The VMCS revision identifier our modelled CPU reports in IA32_VMX_BASIC
// bits 30:0 ("NC" + 1). L1 writes it into VMXON and VMCS regions; VMPTRLD of
// a region with another value fails with error 11. Bit 31 (shadow-VMCS
// indicator) is clear: nestcache does not model VMCS shadowing.
inline constexpr uint32_t kVmcs12Revision = 0x4e430001;
inline constexpr uint32_t kVmcsShadowIndicator = 1u << 31;
inline constexpr size_t kVmcsRegionSize = kPageSize;  // IA32_VMX_BASIC bits 44:32

// ---------------------------------------------------------------------------
// MSR numbers.
// ---------------------------------------------------------------------------

namespace msr {
inline constexpr uint32_t kIa32TimeStampCounter = 0x10;
inline constexpr uint32_t kIa32PlatformId = 0x17;
inline constexpr uint32_t kIa32ApicBase = 0x1b;
inline constexpr uint32_t kIa32FeatureControl = 0x3a;
inline constexpr uint32_t kIa32Pat = 0x277;
inline constexpr uint32_t kIa32TscDeadline = 0x6e0;
inline constexpr uint32_t kIa32VmxBasic = 0x480;
inline constexpr uint32_t kIa32VmxPinbasedCtls = 0x481;
inline constexpr uint32_t kIa32VmxProcbasedCtls = 0x482;
inline constexpr uint32_t kIa32VmxExitCtls = 0x483;
inline constexpr uint32_t kIa32VmxEntryCtls = 0x484;
inline constexpr uint32_t kIa32VmxMisc = 0x485;
inline constexpr uint32_t kIa32VmxCr0Fixed0 = 0x486;
inline constexpr uint32_t kIa32VmxCr0Fixed1 = 0x487;
inline constexpr uint32_t kIa32VmxCr4Fixed0 = 0x488;
inline constexpr uint32_t kIa32VmxCr4Fixed1 = 0x489;
inline constexpr uint32_t kIa32VmxVmcsEnum = 0x48a;
inline constexpr uint32_t kIa32VmxProcbasedCtls2 = 0x48b;
inline constexpr uint32_t kIa32VmxEptVpidCap = 0x48c;
inline constexpr uint32_t kIa32VmxTruePinbasedCtls = 0x48d;
inline constexpr uint32_t kIa32VmxTrueProcbasedCtls = 0x48e;
inline constexpr uint32_t kIa32VmxTrueExitCtls = 0x48f;
inline constexpr uint32_t kIa32VmxTrueEntryCtls = 0x490;
inline constexpr uint32_t kIa32Efer = 0xc0000080;
inline constexpr uint32_t kIa32FsBase = 0xc0000100;
// x2APIC registers: MSR 0x800 + (xAPIC MMIO offset >> 4).
inline constexpr uint32_t kX2apicFirst = 0x800;
inline constexpr uint32_t kX2apicLast = 0x8ff;
inline constexpr uint32_t kX2apicTpr = 0x808;
inline constexpr uint32_t kX2apicPpr = 0x80a;
inline constexpr uint32_t kX2apicEoi = 0x80b;
inline constexpr uint32_t kX2apicIsr0 = 0x810;
inline constexpr uint32_t kX2apicIrr0 = 0x820;
inline constexpr uint32_t kX2apicIcr = 0x830;
inline constexpr uint32_t kX2apicSelfIpi = 0x83f;
// Hyper-V synthetic MSRs used by the enlightened-VMCS path (TLFS).
inline constexpr uint32_t kHvGuestOsId = 0x40000000;
inline constexpr uint32_t kHvHypercall = 0x40000001;
inline constexpr uint32_t kHvVpIndex = 0x40000002;
inline constexpr uint32_t kHvVpAssistPage = 0x40000073;  // bit 0 enable, 63:12 gpa
}  // namespace msr

// Offset of the TPR (VTPR) in the virtual-APIC page; bits 7:4 are the priority class.
inline constexpr uint32_t kApicTprOffset = 0x80;

// ---------------------------------------------------------------------------
// Outcome of an emulated VMX operation that did not succeed.
// ---------------------------------------------------------------------------

enum class VmxFailKind : uint8_t {
  // VMfailInvalid: CF=1; no current VMCS to hold an error number.
  kFailInvalid,
  // VMfailValid: ZF=1 and `error` goes to the VM-instruction error field.
  kFailValid,
  // A VM entry that got past the VMfail checks but failed on guest state:
  // the entry "fails" like a VM exit to L1 with exit reason `exit_reason`
  // (bit 31 set when written to the exit-reason field) and `qualification`.
  kEntryFailure,
};

struct VmxFail {
  VmxFailKind kind = VmxFailKind::kFailInvalid;
  VmInstructionError error = VmInstructionError::kNone;  // kFailValid only
  ExitReason exit_reason = ExitReason::kExceptionOrNmi;  // kEntryFailure only
  uint64_t qualification = 0;                            // kEntryFailure only
  // A short stable identifier of the rule that failed ("msr-bitmap-aligned"),
  // empty if the failure is not a named consistency check. Tests compare it.
  std::string_view rule;
  // What was wrong, for people: names the field, the value and the rule.
  std::string message;

  // Constructors for the three outcomes; `rule` must outlive the VmxFail
  // (pass a string literal).
  static VmxFail invalid(std::string message) {
    return VmxFail{VmxFailKind::kFailInvalid, VmInstructionError::kNone,
                   ExitReason::kExceptionOrNmi, 0, {}, std::move(message)};
  }
  static VmxFail valid(VmInstructionError e, std::string_view rule, std::string message) {
    return VmxFail{VmxFailKind::kFailValid, e, ExitReason::kExceptionOrNmi, 0, rule,
                   std::move(message)};
  }
  static VmxFail entry_failure(ExitReason r, uint64_t qual, std::string_view rule,
                               std::string message) {
    return VmxFail{VmxFailKind::kEntryFailure, VmInstructionError::kNone, r, qual, rule,
                   std::move(message)};
  }

  // "VMfailValid(12: VMREAD/VMWRITE from/to unsupported VMCS component): ..."
  std::string to_string() const {
    switch (kind) {
      case VmxFailKind::kFailInvalid: return fmt::format("VMfailInvalid: {}", message);
      case VmxFailKind::kFailValid:
        return fmt::format("VMfailValid({}: {}): {}", static_cast<uint32_t>(error),
                           vm_instruction_error_text(error), message);
      case VmxFailKind::kEntryFailure:
        return fmt::format("VM-entry failure (exit reason {} {}, qualification {}): {}",
                           static_cast<uint32_t>(exit_reason), exit_reason_name(exit_reason),
                           qualification, message);
    }
    return message;
  }
  // The same, as an errno-style Error (EINVAL) for API boundaries that
  // report to the VMM rather than to L1.
  Error to_error() const { return Error{EINVAL, to_string()}; }
};

template <class T>
using VmxResult = tl::expected<T, VmxFail>;
using VmxStatus = tl::expected<void, VmxFail>;

}  // namespace nestcache::vmx
