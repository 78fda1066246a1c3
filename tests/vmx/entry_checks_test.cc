// Nested VM-entry consistency checks: every rule with a passing and a failing
// vmcs12, plus the order and class of failures.
#include "vmx/entry_checks.h"

#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

namespace nestcache::vmx {
namespace {

using Mutator = std::function<void(Vmcs12&, EntryCheckEnv&)>;

enum class Cls { kControl, kHost, kGuest };

struct RuleCase {
  std::string name;       // test name suffix
  std::string_view rule;  // the rule id the failing vmcs12 must report
  Cls cls;
  Mutator pass;  // applied to minimal_vmcs12(): must pass every check
  Mutator fail;  // applied to minimal_vmcs12(): must fail with `rule`
};

void secondary(Vmcs12& v, uint32_t bits) {
  v.primary_proc_controls |= proc::kActivateSecondaryControls;
  v.secondary_proc_controls |= bits;
}
void tpr_shadow(Vmcs12& v) {
  v.primary_proc_controls |= proc::kUseTprShadow;
  v.virtual_apic_page_addr = 0x6000;
}
void vid(Vmcs12& v) {
  tpr_shadow(v);
  secondary(v, proc2::kVirtualInterruptDelivery);
  v.pin_based_controls |= pin::kExternalInterruptExiting;
}
void posted_interrupts(Vmcs12& v) {
  vid(v);
  v.pin_based_controls |= pin::kPostedInterrupts;
  v.exit_controls |= exit_ctl::kAckInterruptOnExit;
  v.posted_intr_notification_vector = 0xf2;
  v.posted_intr_desc_addr = 0x8040;  // 64-byte aligned, not page aligned: fine
}
void ept(Vmcs12& v) {
  secondary(v, proc2::kEnableEpt);
  v.ept_pointer = 0x9000 | eptp::kMemTypeWb | eptp::kWalkLength4;
}
void inject(Vmcs12& v, uint32_t type, uint32_t vector) {
  v.entry_interruption_info = intr_info::kValid | (type << intr_info::kTypeShift) | vector;
}

constexpr uint64_t kBeyondWidth = uint64_t{1} << kMaxPhysAddrBits;

#define M(body) [](Vmcs12 & v, EntryCheckEnv & env) { (void)env; body; }

std::vector<RuleCase> rule_cases() {
  return {
      // 26.2.1.1 execution controls
      {"PinMissingAlwaysOn", "pin-reserved", Cls::kControl, M(v.pin_based_controls |= pin::kNmiExiting),
       M(v.pin_based_controls = 0)},
      {"PinUnsupportedBit", "pin-reserved", Cls::kControl, M(v.pin_based_controls |= pin::kNmiExiting),
       M(v.pin_based_controls |= pin::kPreemptionTimer)},
      {"ProcUnsupportedBit", "proc-reserved", Cls::kControl, M(v.primary_proc_controls |= proc::kHltExiting),
       M(v.primary_proc_controls |= proc::kMonitorTrapFlag)},
      {"ProcMissingAlwaysOn", "proc-reserved", Cls::kControl,
       M(v.primary_proc_controls &= ~proc::kCr3LoadExiting),
       M(v.primary_proc_controls &= ~(1u << 1))},
      {"Proc2UnsupportedBit", "proc2-reserved", Cls::kControl, M(secondary(v, proc2::kWbinvdExiting)),
       M(secondary(v, proc2::kVmcsShadowing))},
      {"MsrBitmapUnaligned", "msr-bitmap-address", Cls::kControl,
       M(v.primary_proc_controls |= proc::kUseMsrBitmaps; v.msr_bitmap = 0x5000),
       M(v.primary_proc_controls |= proc::kUseMsrBitmaps; v.msr_bitmap = 0x5008)},
      {"MsrBitmapBeyondWidth", "msr-bitmap-address", Cls::kControl,
       M(v.primary_proc_controls |= proc::kUseMsrBitmaps; v.msr_bitmap = kBeyondWidth - 0x1000),
       M(v.primary_proc_controls |= proc::kUseMsrBitmaps; v.msr_bitmap = kBeyondWidth)},
      {"VirtualApicUnaligned", "virtual-apic-address", Cls::kControl, M(tpr_shadow(v)),
       M(tpr_shadow(v); v.virtual_apic_page_addr = 0x6100)},
      {"VirtualApicBeyondWidth", "virtual-apic-address", Cls::kControl, M(tpr_shadow(v)),
       M(tpr_shadow(v); v.virtual_apic_page_addr = kBeyondWidth << 2)},
      {"TprThresholdReserved", "tpr-threshold-reserved", Cls::kControl,
       M(tpr_shadow(v); v.tpr_threshold = 0xf), M(tpr_shadow(v); v.tpr_threshold = 0x10)},
      {"TprThresholdAboveVtpr", "tpr-threshold-vtpr", Cls::kControl,
       M(tpr_shadow(v); v.tpr_threshold = 3; env.vtpr = 0x30),
       M(tpr_shadow(v); v.tpr_threshold = 4; env.vtpr = 0x3f)},
      {"TprShadowRequired", "tpr-shadow-required", Cls::kControl, M(secondary(v, proc2::kWbinvdExiting)),
       M(secondary(v, proc2::kVirtualizeX2apicMode))},
      {"VirtualNmisNeedNmiExiting", "virtual-nmis-need-nmi-exiting", Cls::kControl,
       M(v.pin_based_controls |= pin::kVirtualNmis | pin::kNmiExiting),
       M(v.pin_based_controls |= pin::kVirtualNmis)},
      {"NmiWindowNeedsVirtualNmis", "nmi-window-needs-virtual-nmis", Cls::kControl,
       M(v.pin_based_controls |= pin::kVirtualNmis | pin::kNmiExiting;
         v.primary_proc_controls |= proc::kNmiWindowExiting),
       M(v.primary_proc_controls |= proc::kNmiWindowExiting)},
      {"X2apicWithApicAccess", "x2apic-with-apic-access", Cls::kControl,
       M(tpr_shadow(v); secondary(v, proc2::kVirtualizeX2apicMode)),
       M(tpr_shadow(v); v.apic_access_addr = 0x7000;
         secondary(v, proc2::kVirtualizeX2apicMode | proc2::kVirtualizeApicAccesses))},
      {"ApicAccessUnaligned", "apic-access-address", Cls::kControl,
       M(secondary(v, proc2::kVirtualizeApicAccesses); v.apic_access_addr = 0x7000),
       M(secondary(v, proc2::kVirtualizeApicAccesses); v.apic_access_addr = 0x7004)},
      {"ApicAccessBeyondWidth", "apic-access-address", Cls::kControl,
       M(secondary(v, proc2::kVirtualizeApicAccesses); v.apic_access_addr = 0x7000),
       M(secondary(v, proc2::kVirtualizeApicAccesses); v.apic_access_addr = kBeyondWidth)},
      {"VidNeedsExternalInterruptExiting", "vid-needs-external-interrupt-exiting", Cls::kControl,
       M(vid(v)), M(vid(v); v.pin_based_controls &= ~pin::kExternalInterruptExiting)},
      {"PostedInterruptsNeedVid", "posted-interrupts-need-vid", Cls::kControl, M(posted_interrupts(v)),
       M(posted_interrupts(v); v.secondary_proc_controls &= ~proc2::kVirtualInterruptDelivery)},
      {"PostedInterruptsNeedAckOnExit", "posted-interrupts-need-ack-on-exit", Cls::kControl,
       M(posted_interrupts(v)),
       M(posted_interrupts(v); v.exit_controls &= ~exit_ctl::kAckInterruptOnExit)},
      {"PostedInterruptVector", "posted-interrupt-vector", Cls::kControl,
       M(posted_interrupts(v); v.posted_intr_notification_vector = 0xff),
       M(posted_interrupts(v); v.posted_intr_notification_vector = 0x1f2)},
      {"PostedInterruptDescriptorUnaligned", "posted-interrupt-descriptor", Cls::kControl,
       M(posted_interrupts(v); v.posted_intr_desc_addr = 0x8fc0),
       M(posted_interrupts(v); v.posted_intr_desc_addr = 0x8044)},
      {"PostedInterruptDescriptorBeyondWidth", "posted-interrupt-descriptor", Cls::kControl,
       M(posted_interrupts(v); v.posted_intr_desc_addr = kBeyondWidth - 64),
       M(posted_interrupts(v); v.posted_intr_desc_addr = kBeyondWidth)},
      {"VpidZero", "vpid-zero", Cls::kControl,
       M(secondary(v, proc2::kEnableVpid); v.virtual_processor_id = 1),
       M(secondary(v, proc2::kEnableVpid); v.virtual_processor_id = 0)},
      {"EptMemoryType", "ept-pointer", Cls::kControl,
       M(ept(v); v.ept_pointer = 0x9000 | eptp::kMemTypeUc | eptp::kWalkLength4),
       M(ept(v); v.ept_pointer = 0x9000 | 1 | eptp::kWalkLength4)},
      {"EptWalkLength", "ept-pointer", Cls::kControl, M(ept(v)),
       M(ept(v); v.ept_pointer = 0x9000 | eptp::kMemTypeWb | (4 << 3))},
      {"EptReservedBits", "ept-pointer", Cls::kControl, M(ept(v)), M(ept(v); v.ept_pointer |= 1u << 7)},
      {"EptBeyondWidth", "ept-pointer", Cls::kControl, M(ept(v)), M(ept(v); v.ept_pointer |= kBeyondWidth)},
      {"EptAccessedDirtyUnsupported", "ept-pointer", Cls::kControl,
       M(ept(v); v.ept_pointer |= eptp::kAccessedDirty),
       M(ept(v); v.ept_pointer |= eptp::kAccessedDirty; env.caps.ept_accessed_dirty = false)},
      {"UnrestrictedGuestNeedsEpt", "unrestricted-guest-needs-ept", Cls::kControl,
       M(ept(v); secondary(v, proc2::kUnrestrictedGuest)), M(secondary(v, proc2::kUnrestrictedGuest))},
      // 26.2.1.2 / 26.2.1.3 exit and entry controls
      {"ExitUnsupportedBit", "exit-reserved", Cls::kControl,
       M(v.exit_controls |= exit_ctl::kLoadEfer; v.host_ia32_efer = 0x500),
       M(v.exit_controls |= exit_ctl::kSavePreemptionTimer)},
      {"ExitMissingAlwaysOn", "exit-reserved", Cls::kControl,
       M(v.exit_controls |= exit_ctl::kSaveDebugControls), M(v.exit_controls &= ~1u)},
      {"EntryUnsupportedBit", "entry-reserved", Cls::kControl, M(v.entry_controls |= entry_ctl::kLoadPat),
       M(v.entry_controls |= entry_ctl::kEntryToSmm)},
      {"EventInjectionReserved", "event-injection-reserved", Cls::kControl,
       M(inject(v, intr_info::kTypeExternalInterrupt, 0x30)),
       M(inject(v, intr_info::kTypeExternalInterrupt, 0x30); v.entry_interruption_info |= 1u << 12)},
      {"EventInjectionReservedType", "event-injection-type", Cls::kControl,
       M(inject(v, intr_info::kTypeNmi, 2)), M(inject(v, intr_info::kTypeReserved, 2))},
      {"EventInjectionOtherEvent", "event-injection-type", Cls::kControl,
       M(inject(v, intr_info::kTypeNmi, 2)), M(inject(v, intr_info::kTypeOtherEvent, 0))},
      {"EventInjectionNmiVector", "event-injection-vector", Cls::kControl,
       M(inject(v, intr_info::kTypeNmi, 2)), M(inject(v, intr_info::kTypeNmi, 3))},
      {"EventInjectionExceptionVector", "event-injection-vector", Cls::kControl,
       M(inject(v, intr_info::kTypeHardwareException, 6)),
       M(inject(v, intr_info::kTypeHardwareException, 40))},
      {"EventInjectionMissingErrorCode", "event-injection-error-code", Cls::kControl,
       M(inject(v, intr_info::kTypeHardwareException, 13);
         v.entry_interruption_info |= intr_info::kDeliverErrorCode),
       M(inject(v, intr_info::kTypeHardwareException, 13))},
      {"EventInjectionSpuriousErrorCode", "event-injection-error-code", Cls::kControl,
       M(inject(v, intr_info::kTypeHardwareException, 6)),
       M(inject(v, intr_info::kTypeHardwareException, 6);
         v.entry_interruption_info |= intr_info::kDeliverErrorCode)},
      {"EventInjectionErrorCodeHighBits", "event-injection-error-code", Cls::kControl,
       M(inject(v, intr_info::kTypeHardwareException, 14);
         v.entry_interruption_info |= intr_info::kDeliverErrorCode; v.entry_exception_error_code = 0xffff),
       M(inject(v, intr_info::kTypeHardwareException, 14);
         v.entry_interruption_info |= intr_info::kDeliverErrorCode;
         v.entry_exception_error_code = 0x10000)},
      {"EventInjectionLengthZero", "event-injection-length", Cls::kControl,
       M(inject(v, intr_info::kTypeSoftwareInterrupt, 0x80); v.entry_instruction_length = 2),
       M(inject(v, intr_info::kTypeSoftwareInterrupt, 0x80); v.entry_instruction_length = 0)},
      {"EventInjectionLengthTooLong", "event-injection-length", Cls::kControl,
       M(inject(v, intr_info::kTypeSoftwareException, 3); v.entry_instruction_length = 15),
       M(inject(v, intr_info::kTypeSoftwareException, 3); v.entry_instruction_length = 16)},
      // 26.2.2 - 26.2.4 host state
      {"HostCr0Ne", "host-cr0-fixed", Cls::kHost, M(v.host_cr0 |= 1u << 16), M(v.host_cr0 &= ~kCr0Ne)},
      {"HostCr0HighBits", "host-cr0-fixed", Cls::kHost, M(v.host_cr0 |= 1u << 16),
       M(v.host_cr0 |= uint64_t{1} << 32)},
      {"HostCr4Vmxe", "host-cr4-fixed", Cls::kHost, M(v.host_cr4 |= 1u << 7), M(v.host_cr4 &= ~kCr4Vmxe)},
      {"HostCr3Width", "host-cr3-width", Cls::kHost, M(v.host_cr3 = 0x1000),
       M(v.host_cr3 = kBeyondWidth | 0x1000)},
      {"HostAddressSpaceSize", "host-address-space-size", Cls::kHost, M(),
       M(v.exit_controls &= ~exit_ctl::kHostAddressSpaceSize)},
      {"HostIa32eGuest", "host-ia32e-guest", Cls::kHost,
       M(env.l1_long_mode = false; v.exit_controls &= ~exit_ctl::kHostAddressSpaceSize;
         v.entry_controls &= ~entry_ctl::kIa32eModeGuest),
       M(env.l1_long_mode = false; v.exit_controls &= ~exit_ctl::kHostAddressSpaceSize)},
      {"HostRip32", "host-rip", Cls::kHost,
       M(env.l1_long_mode = false; v.exit_controls &= ~exit_ctl::kHostAddressSpaceSize;
         v.entry_controls &= ~entry_ctl::kIa32eModeGuest; v.host_rip = 0xffffffff),
       M(env.l1_long_mode = false; v.exit_controls &= ~exit_ctl::kHostAddressSpaceSize;
         v.entry_controls &= ~entry_ctl::kIa32eModeGuest; v.host_rip = uint64_t{1} << 32)},
      {"HostRipCanonical", "host-rip", Cls::kHost, M(v.host_rip = 0xffff800000001000ull),
       M(v.host_rip = 0x0000800000001000ull)},
      {"HostCr4Pae", "host-cr4-pae", Cls::kHost, M(), M(v.host_cr4 &= ~kCr4Pae)},
      // 26.3 guest state
      {"GuestRflagsBit1", "guest-rflags", Cls::kGuest, M(v.guest_rflags = 0x202), M(v.guest_rflags = 0)},
      {"GuestRflagsReserved", "guest-rflags", Cls::kGuest, M(v.guest_rflags = 0x202),
       M(v.guest_rflags = 0x2 | (1u << 22))},
      {"GuestActivityState", "guest-activity-state", Cls::kGuest,
       M(v.guest_activity_state = activity::kHlt), M(v.guest_activity_state = activity::kShutdown)},
      {"GuestInterruptibilityReserved", "guest-interruptibility", Cls::kGuest,
       M(v.guest_interruptibility = 1), M(v.guest_interruptibility = 0x20)},
      {"GuestInterruptibilityStiAndMovSs", "guest-interruptibility", Cls::kGuest,
       M(v.guest_interruptibility = 2), M(v.guest_interruptibility = 3)},
      {"VmcsLinkPointerZero", "vmcs-link-pointer", Cls::kGuest, M(), M(v.vmcs_link_pointer = 0)},
      {"VmcsLinkPointerUnaligned", "vmcs-link-pointer", Cls::kGuest, M(),
       M(v.vmcs_link_pointer = 0x1001)},
      {"VmcsLinkPointerBeyondWidth", "vmcs-link-pointer", Cls::kGuest, M(),
       M(v.vmcs_link_pointer = kBeyondWidth)},
  };
}
#undef M

class EntryRule : public testing::TestWithParam<RuleCase> {};

TEST_P(EntryRule, PassingCasePasses) {
  Vmcs12 v = minimal_vmcs12();
  EntryCheckEnv env;
  GetParam().pass(v, env);
  auto r = check_vm_entry(v, env);
  EXPECT_TRUE(r) << r.error().to_string();
}

TEST_P(EntryRule, FailingCaseFailsWithItsRule) {
  const RuleCase& c = GetParam();
  Vmcs12 v = minimal_vmcs12();
  EntryCheckEnv env;
  c.fail(v, env);
  auto r = check_vm_entry(v, env);
  ASSERT_FALSE(r);
  const VmxFail& f = r.error();
  EXPECT_EQ(f.rule, c.rule) << f.to_string();
  EXPECT_FALSE(f.message.empty());
  switch (c.cls) {
    case Cls::kControl:
      EXPECT_EQ(f.kind, VmxFailKind::kFailValid);
      EXPECT_EQ(f.error, VmInstructionError::kEntryInvalidControlFields);
      break;
    case Cls::kHost:
      EXPECT_EQ(f.kind, VmxFailKind::kFailValid);
      EXPECT_EQ(f.error, VmInstructionError::kEntryInvalidHostStateFields);
      break;
    case Cls::kGuest:
      EXPECT_EQ(f.kind, VmxFailKind::kEntryFailure);
      EXPECT_EQ(f.exit_reason, ExitReason::kEntryFailInvalidGuestState);
      EXPECT_EQ(f.qualification, c.rule == "vmcs-link-pointer" ? entry_fail_qual::kVmcsLinkPointer
                                                                : entry_fail_qual::kDefault);
      break;
  }
}

INSTANTIATE_TEST_SUITE_P(Sdm, EntryRule, testing::ValuesIn(rule_cases()),
                         [](const testing::TestParamInfo<RuleCase>& i) { return i.param.name; });

TEST(EntryChecks, MinimalVmcs12Passes) { EXPECT_TRUE(check_vm_entry(minimal_vmcs12())); }

TEST(EntryChecks, SecondaryControlsIgnoredWithoutActivate) {
  Vmcs12 v = minimal_vmcs12();
  v.secondary_proc_controls = proc2::kVmcsShadowing | proc2::kEnableVpid;  // VPID 0 too
  EXPECT_TRUE(check_vm_entry(v));
}

TEST(EntryChecks, AddressesUnusedByTheControlsAreNotChecked) {
  Vmcs12 v = minimal_vmcs12();
  v.msr_bitmap = 0x123;
  v.apic_access_addr = 0x456;
  v.virtual_apic_page_addr = kBeyondWidth;
  v.posted_intr_desc_addr = 1;
  v.ept_pointer = 0xfff;
  EXPECT_TRUE(check_vm_entry(v));
}

TEST(EntryChecks, TprThresholdHighBitsAllowedWithVirtualInterruptDelivery) {
  Vmcs12 v = minimal_vmcs12();
  vid(v);
  v.tpr_threshold = 0x30;
  EXPECT_TRUE(check_vm_entry(v));
}

TEST(EntryChecks, VtprRuleSkippedWithoutVtprOrWithApicVirtualization) {
  Vmcs12 v = minimal_vmcs12();
  tpr_shadow(v);
  v.tpr_threshold = 9;
  EXPECT_TRUE(check_entry_controls(v)) << "no VTPR given";
  EXPECT_FALSE(check_entry_controls_late(v, 0x80));
  EXPECT_TRUE(check_entry_controls_late(v, 0x90));
  secondary(v, proc2::kVirtualizeApicAccesses);
  v.apic_access_addr = 0x7000;
  EXPECT_TRUE(check_entry_controls_late(v, 0x00));
}

TEST(EntryChecks, ControlsAreCheckedBeforeHostAndHostBeforeGuest) {
  Vmcs12 v = minimal_vmcs12();
  v.vmcs_link_pointer = 0;
  v.host_cr4 = 0;
  v.pin_based_controls = 0;
  EXPECT_EQ(check_vm_entry(v).error().error, VmInstructionError::kEntryInvalidControlFields);
  v.pin_based_controls = pin::kAlwaysOn;
  EXPECT_EQ(check_vm_entry(v).error().error, VmInstructionError::kEntryInvalidHostStateFields);
  v.host_cr4 = kCr4Pae | kCr4Vmxe;
  EXPECT_EQ(check_vm_entry(v).error().kind, VmxFailKind::kEntryFailure);
}

TEST(EntryChecks, NarrowerPhysicalAddressWidthFromEnv) {
  Vmcs12 v = minimal_vmcs12();
  v.primary_proc_controls |= proc::kUseMsrBitmaps;
  v.msr_bitmap = uint64_t{1} << 40;
  EXPECT_TRUE(check_vm_entry(v));
  EntryCheckEnv narrow;
  narrow.phys_addr_bits = 39;
  EXPECT_EQ(check_vm_entry(v, narrow).error().rule, "msr-bitmap-address");
}

TEST(EntryChecks, PageAddressValid) {
  EXPECT_TRUE(page_address_valid(0));
  EXPECT_TRUE(page_address_valid(kBeyondWidth - kPageSize));
  EXPECT_FALSE(page_address_valid(kBeyondWidth));
  EXPECT_FALSE(page_address_valid(0x800));
  EXPECT_FALSE(page_address_valid(kInvalidGpa));
}

}  // namespace
}  // namespace nestcache::vmx
