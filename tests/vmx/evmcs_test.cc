// Enlightened VMCS: page formats, clean-field groups, the copies between the
// eVMCS and vmcs12, the per-entry snapshot, VMREAD/VMWRITE, control checks.
#include "vmx/evmcs.h"

#include <gtest/gtest.h>

#include <array>
#include <cstring>
#include <set>

#include "vmx/entry_checks.h"

namespace nestcache::vmx {
namespace {

using Page = std::array<std::byte, kPageSize>;

TEST(EvmcsFields, EveryFieldIsAVmcs12FieldOfTheSameName) {
  for (const EvmcsFieldInfo& f : evmcs_fields()) {
    const FieldInfo* v = find_vmcs12_field(f.encoding);
    ASSERT_NE(v, nullptr) << f.name;
    EXPECT_EQ(v->name, f.name);
    EXPECT_EQ(v->size, f.size) << f.name;
    EXPECT_EQ(find_evmcs_field(f.encoding), &f);
  }
}

TEST(EvmcsFields, GroupsFollowTheTlfs) {
  auto group = [](uint32_t enc) { return find_evmcs_field(enc)->clean_group; };
  EXPECT_EQ(group(field::kGuestRip), evmcs_clean::kNone);
  EXPECT_EQ(group(field::kTprThreshold), evmcs_clean::kNone);
  EXPECT_EQ(group(field::kGuestRsp), evmcs_clean::kGuestBasic);
  EXPECT_EQ(group(field::kPrimaryProcControls), evmcs_clean::kControlProc);
  EXPECT_EQ(group(field::kPinBasedControls), evmcs_clean::kControlGrp1);
  EXPECT_EQ(group(field::kSecondaryProcControls), evmcs_clean::kControlGrp1);
  EXPECT_EQ(group(field::kVirtualApicPageAddr), evmcs_clean::kControlGrp2);
  EXPECT_EQ(group(field::kMsrBitmap), evmcs_clean::kMsrBitmap);
  EXPECT_EQ(group(field::kEptPointer), evmcs_clean::kControlXlat);
  EXPECT_EQ(group(field::kVirtualProcessorId), evmcs_clean::kControlXlat);
  EXPECT_EQ(group(field::kHostRip), evmcs_clean::kHostGrp1);
  EXPECT_EQ(group(field::kHostRsp), evmcs_clean::kHostPointer);
  EXPECT_EQ(group(field::kGuestCr3), evmcs_clean::kCrdr);
  EXPECT_EQ(group(field::kVmcsLinkPointer), evmcs_clean::kGuestGrp1);
  EXPECT_EQ(group(field::kGuestCsSelector), evmcs_clean::kGuestGrp2);
  EXPECT_EQ(group(field::kExitReason), evmcs_clean::kNone);
}

TEST(EvmcsFields, ApicVirtualizationFieldsAreNotCarried) {
  for (uint32_t enc : {field::kApicAccessAddr, field::kPostedIntrDescAddr,
                       field::kPostedIntrNotificationVector, field::kGuestInterruptStatus,
                       field::kEoiExitBitmap0})
    EXPECT_EQ(find_evmcs_field(enc), nullptr) << std::hex << enc;
}

TEST(EvmcsFields, FieldsDoNotOverlapTheHeaderOrEachOther) {
  std::set<int> used;
  for (const EvmcsFieldInfo& f : evmcs_fields()) {
    EXPECT_GE(f.page_offset, 32) << f.name;
    EXPECT_EQ(f.page_offset % f.size, 0) << f.name;
    for (int b = f.page_offset; b < f.page_offset + f.size; b++)
      EXPECT_TRUE(used.insert(b).second) << f.name;
  }
  EXPECT_EQ(kEvmcsCleanFieldsOffset, 8u);
  EXPECT_EQ(kEvmcsEnlightenmentsOffset, 12u);
}

TEST(EvmcsPageFormat, LoadStoreRoundTrip) {
  EvmcsPage p;
  p.revision_id = kEvmcsRevision;
  p.clean_fields = 0x1234;
  p.guest_rip = 0xfeed;
  p.virtual_processor_id = 9;
  Page page{};
  p.store(page);
  EXPECT_EQ(EvmcsPage::load(page), p);
  uint32_t clean;
  std::memcpy(&clean, page.data() + kEvmcsCleanFieldsOffset, 4);
  EXPECT_EQ(clean, 0x1234u);
}

TEST(VpAssist, OffsetsAndCurrentEvmcs) {
  VpAssistPage a;
  EXPECT_EQ(a.current_evmcs(), std::nullopt);
  a.enlighten_vmentry = 1;
  a.current_nested_vmcs = 0x42000;
  Page page{};
  a.store(page);
  EXPECT_EQ(page[kVpAssistEnlightenVmentryOffset], std::byte{1});
  uint64_t gpa;
  std::memcpy(&gpa, page.data() + kVpAssistCurrentNestedVmcsOffset, 8);
  EXPECT_EQ(gpa, 0x42000u);
  EXPECT_EQ(VpAssistPage::load(page).current_evmcs(), Gpa{0x42000});
}

EvmcsPage filled_page() {
  EvmcsPage p;
  p.revision_id = kEvmcsRevision;
  uint64_t x = 1;
  for (const EvmcsFieldInfo& f : evmcs_fields()) EXPECT_TRUE(evmcs_guest_write(p, f.encoding, x++));
  return p;
}

TEST(EvmcsCopy, FullCopyTakesEveryWritableField) {
  EvmcsPage p = filled_page();
  Vmcs12 v;
  copy_evmcs_to_vmcs12(p, v, 0);
  for (const EvmcsFieldInfo& f : evmcs_fields()) {
    const uint64_t want = evmcs_vmread(p, f.encoding).value();
    if (field_type(f.encoding) == FieldType::kReadOnly)
      EXPECT_EQ(v.read(f.encoding).value(), 0u) << f.name << " is L0's, not L1's";
    else
      EXPECT_EQ(v.read(f.encoding).value(), want) << f.name;
  }
}

TEST(EvmcsCopy, CleanGroupsAreSkippedAndNoneGroupAlwaysCopied) {
  EvmcsPage p = filled_page();
  Vmcs12 v;
  const uint32_t clean = evmcs_clean::kAll;  // everything unchanged
  copy_evmcs_to_vmcs12(p, v, clean);
  EXPECT_EQ(v.guest_rip, p.guest_rip);
  EXPECT_EQ(v.tpr_threshold, p.tpr_threshold);
  EXPECT_EQ(v.guest_rsp, 0u);
  EXPECT_EQ(v.msr_bitmap, 0u);
  EXPECT_EQ(v.pin_based_controls, 0u);
}

TEST(EvmcsCopy, OnlyTheDirtyGroupIsCopied) {
  EvmcsPage p = filled_page();
  Vmcs12 v;
  copy_evmcs_to_vmcs12(p, v, evmcs_clean::kAll & ~evmcs_clean::kControlGrp1);
  EXPECT_EQ(v.pin_based_controls, p.pin_based_controls);
  EXPECT_EQ(v.exit_controls, p.exit_controls);
  EXPECT_EQ(v.secondary_proc_controls, p.secondary_proc_controls);
  EXPECT_EQ(v.primary_proc_controls, 0u) << "CONTROL_PROC is clean";
  EXPECT_EQ(v.ept_pointer, 0u) << "CONTROL_XLAT is clean";
}

TEST(EvmcsCopy, UncarriedFieldsKeepTheirVmcs12Values) {
  EvmcsPage p = filled_page();
  Vmcs12 v;
  v.apic_access_addr = 0x7000;
  v.posted_intr_notification_vector = 0xf2;
  copy_evmcs_to_vmcs12(p, v, 0);
  EXPECT_EQ(v.apic_access_addr, 0x7000u);
  EXPECT_EQ(v.posted_intr_notification_vector, 0xf2u);
}

TEST(EvmcsCopy, GuestWriteDirtiesOnlyItsGroup) {
  EvmcsPage p;
  p.clean_fields = evmcs_clean::kAll;
  ASSERT_TRUE(evmcs_guest_write(p, field::kMsrBitmap, 0x5000));
  EXPECT_EQ(p.clean_fields, evmcs_clean::kAll & ~evmcs_clean::kMsrBitmap);
  ASSERT_TRUE(evmcs_guest_write(p, field::kGuestRip, 0x10));  // no group: nothing to clear
  EXPECT_EQ(p.clean_fields, evmcs_clean::kAll & ~evmcs_clean::kMsrBitmap);
  EXPECT_EQ(evmcs_guest_write(p, field::kApicAccessAddr, 1).error().error,
            VmInstructionError::kUnsupportedVmcsComponent);
}

TEST(EvmcsCopy, ExitWritesGuestStateAndExitInfoButNotControlsOrHost) {
  Vmcs12 v;
  v.guest_rip = 0x1234;
  v.guest_interruptibility = 1;
  v.guest_cr3 = 0x8000;
  v.set_exit_info(ExitInfo::of(ExitReason::kVmcall));
  v.exit_instruction_length = 3;
  v.vm_instruction_error = 7;
  v.pin_based_controls = 0xffff;
  v.host_rip = 0xdead;
  EvmcsPage p;
  p.clean_fields = evmcs_clean::kAll;
  copy_vmcs12_to_evmcs(v, p);
  EXPECT_EQ(p.guest_rip, 0x1234u);
  EXPECT_EQ(p.guest_interruptibility, 1u);
  EXPECT_EQ(p.guest_cr3, 0x8000u);
  EXPECT_EQ(p.exit_reason, static_cast<uint32_t>(ExitReason::kVmcall));
  EXPECT_EQ(p.exit_instruction_length, 3u);
  EXPECT_EQ(p.vm_instruction_error, 7u);
  EXPECT_EQ(p.pin_based_controls, 0u);
  EXPECT_EQ(p.host_rip, 0u);
  EXPECT_EQ(p.clean_fields, evmcs_clean::kAll) << "header is L1's";
}

TEST(EvmcsSnapshotTest, TakesTheThreeValuesOnce) {
  EvmcsPage p;
  p.clean_fields = evmcs_clean::kMsrBitmap | evmcs_clean::kHostGrp1;
  p.enlightenments_control = evmcs_enlightenment::kMsrBitmap;
  EvmcsSnapshot s = EvmcsSnapshot::take(p, false);
  // The guest changes the page after the snapshot: the snapshot must not move.
  p.clean_fields = 0;
  p.enlightenments_control = evmcs_enlightenment::kNestedFlushHypercall;
  EXPECT_EQ(s.clean_fields, evmcs_clean::kMsrBitmap | evmcs_clean::kHostGrp1);
  EXPECT_TRUE(s.msr_bitmap);
  EXPECT_FALSE(s.flush_hypercall);
  EXPECT_TRUE(s.msr_bitmap_unchanged());
  EXPECT_TRUE(s.group_clean(evmcs_clean::kHostGrp1));
  EXPECT_FALSE(s.group_clean(evmcs_clean::kNone));
}

TEST(EvmcsSnapshotTest, ForceDirtyOnLaunchOrNewAddress) {
  EvmcsPage p;
  p.clean_fields = evmcs_clean::kAll;
  p.enlightenments_control = evmcs_enlightenment::kMsrBitmap | evmcs_enlightenment::kNestedFlushHypercall;
  EvmcsSnapshot s = EvmcsSnapshot::take(p, true);
  EXPECT_EQ(s.clean_fields, 0u);
  EXPECT_TRUE(s.flush_hypercall);
  EXPECT_FALSE(s.msr_bitmap_unchanged()) << "bitmap must be re-merged";
}

TEST(EvmcsSnapshotTest, MsrBitmapSkipNeedsTheEnlightenment) {
  EvmcsPage p;
  p.clean_fields = evmcs_clean::kAll;
  EXPECT_FALSE(EvmcsSnapshot::take(p, false).msr_bitmap_unchanged());
}

TEST(EvmcsRevision, OnlyVersionOneIsAccepted) {
  EvmcsPage p;
  p.revision_id = kEvmcsRevision;
  EXPECT_TRUE(check_evmcs_revision(p));
  p.revision_id = kVmcs12Revision;
  auto r = check_evmcs_revision(p);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, VmxFailKind::kFailInvalid);
}

TEST(EvmcsInstructions, VmreadReadsThePage) {
  EvmcsPage p;
  p.exit_qualification = 0x99;
  p.virtual_processor_id = 4;
  EXPECT_EQ(evmcs_vmread(p, field::kExitQualification).value(), 0x99u);
  EXPECT_EQ(evmcs_vmread(p, field::kVirtualProcessorId).value(), 4u);
}

TEST(EvmcsInstructions, VmreadOfUncarriedOrHighFieldIsError12) {
  EvmcsPage p;
  for (uint32_t enc : {field::kPostedIntrDescAddr, field::kEptPointer | 1, 0x4020u}) {
    auto r = evmcs_vmread(p, enc);
    ASSERT_FALSE(r) << std::hex << enc;
    EXPECT_EQ(r.error().kind, VmxFailKind::kFailValid);
    EXPECT_EQ(r.error().error, VmInstructionError::kUnsupportedVmcsComponent);
  }
}

TEST(EvmcsInstructions, VmwriteIsVmfailInvalid) {
  auto r = evmcs_vmwrite(field::kGuestRip);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().kind, VmxFailKind::kFailInvalid);
}

TEST(EvmcsControls, MinimalVmcs12IsAllowed) { EXPECT_TRUE(check_evmcs_controls(minimal_vmcs12())); }

TEST(EvmcsControls, ApicVirtualizationAndPostedInterruptsAreRejected) {
  Vmcs12 v = minimal_vmcs12();
  v.pin_based_controls |= pin::kPostedInterrupts;
  auto r = check_evmcs_controls(v);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().error, VmInstructionError::kEntryInvalidControlFields);
  EXPECT_EQ(r.error().rule, "evmcs-unsupported-control");

  v = minimal_vmcs12();
  v.primary_proc_controls |= proc::kActivateSecondaryControls;
  v.secondary_proc_controls = proc2::kVirtualizeApicAccesses;
  EXPECT_FALSE(check_evmcs_controls(v));
  v.secondary_proc_controls = proc2::kEnableEpt | proc2::kEnableVpid | proc2::kVirtualizeX2apicMode;
  EXPECT_TRUE(check_evmcs_controls(v));
  // KVM's filter reads the secondary controls as written, active or not.
  v.primary_proc_controls &= ~proc::kActivateSecondaryControls;
  v.secondary_proc_controls = proc2::kVirtualInterruptDelivery;
  EXPECT_FALSE(check_evmcs_controls(v));
}

// A whole entry as L0 runs it: snapshot, copy, entry checks on the result.
TEST(EvmcsEntry, CopiedVmcs12PassesEntryChecks) {
  const Vmcs12 want = minimal_vmcs12();
  EvmcsPage p;
  p.revision_id = kEvmcsRevision;
  for (const EvmcsFieldInfo& f : evmcs_fields()) {
    if (field_type(f.encoding) == FieldType::kReadOnly) continue;
    ASSERT_TRUE(evmcs_guest_write(p, f.encoding, want.read(f.encoding).value()));
  }
  ASSERT_TRUE(check_evmcs_revision(p));
  EvmcsSnapshot s = EvmcsSnapshot::take(p, /*force_dirty=*/true);
  Vmcs12 cached;
  copy_evmcs_to_vmcs12(p, cached, s.clean_fields);
  cached.revision_id = kVmcs12Revision;
  EXPECT_TRUE(check_vm_entry(cached));
  EXPECT_TRUE(check_evmcs_controls(cached));
}

}  // namespace
}  // namespace nestcache::vmx
