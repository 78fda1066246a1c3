// vmcs12: field table, VMREAD/VMWRITE semantics, the region image.
#include "vmx/vmcs12.h"

#include <gtest/gtest.h>

#include <array>
#include <cstring>
#include <set>

namespace nestcache::vmx {
namespace {

using Page = std::array<std::byte, kPageSize>;

TEST(Vmcs12Fields, EveryDesignFieldIsSupported) {
  for (uint32_t enc :
       {field::kPinBasedControls, field::kPrimaryProcControls, field::kSecondaryProcControls,
        field::kExitControls, field::kEntryControls, field::kMsrBitmap, field::kApicAccessAddr,
        field::kVirtualApicPageAddr, field::kTprThreshold, field::kPostedIntrNotificationVector,
        field::kPostedIntrDescAddr, field::kEptPointer, field::kVirtualProcessorId,
        field::kVmcsLinkPointer, field::kGuestRip, field::kGuestRsp, field::kGuestRflags,
        field::kGuestInterruptibility, field::kGuestCr0, field::kGuestCr3, field::kGuestCr4,
        field::kHostRip, field::kHostRsp, field::kExitReason, field::kExitQualification,
        field::kGuestPhysicalAddress, field::kExitInterruptionInfo,
        field::kExitInstructionLength, field::kVmInstructionError,
        field::kGuestInterruptStatus, field::kEoiExitBitmap0}) {
    EXPECT_NE(find_vmcs12_field(enc), nullptr) << std::hex << enc;
  }
}

TEST(Vmcs12Fields, TableAgreesWithEncodingBits) {
  for (const FieldInfo& f : vmcs12_fields()) {
    const size_t want = f.width() == FieldWidth::k16 ? 2 : f.width() == FieldWidth::k32 ? 4 : 8;
    EXPECT_EQ(f.size, want) << f.name;
    EXPECT_EQ(find_vmcs12_field(f.encoding), &*find_vmcs12_field(f.encoding));
    EXPECT_EQ(find_vmcs12_field(f.encoding)->name, f.name);
  }
  EXPECT_EQ(find_vmcs12_field(field::kExitReason)->type(), FieldType::kReadOnly);
  EXPECT_EQ(find_vmcs12_field(field::kGuestRip)->type(), FieldType::kGuestState);
  EXPECT_EQ(find_vmcs12_field(field::kHostRip)->type(), FieldType::kHostState);
  EXPECT_EQ(find_vmcs12_field(field::kMsrBitmap)->type(), FieldType::kControl);
  EXPECT_EQ(find_vmcs12_field(field::kGuestRip)->width(), FieldWidth::kNatural);
}

TEST(Vmcs12Fields, FieldsDoNotOverlapAndFitAfterTheHeader) {
  std::set<int> used;
  for (const FieldInfo& f : vmcs12_fields()) {
    EXPECT_GE(f.page_offset, 16) << f.name;
    EXPECT_LE(f.page_offset + f.size, static_cast<int>(kPageSize)) << f.name;
    EXPECT_EQ(f.page_offset % f.size, 0) << f.name << " misaligned";
    for (int b = f.page_offset; b < f.page_offset + f.size; b++)
      EXPECT_TRUE(used.insert(b).second) << f.name << " overlaps at byte " << b;
  }
}

// The region layout is a format (guest memory, nested-state blobs): pin it.
TEST(Vmcs12Fields, LayoutIsStable) {
  EXPECT_EQ(find_vmcs12_field(field::kMsrBitmap)->page_offset, 16);
  EXPECT_EQ(find_vmcs12_field(field::kHostRip)->page_offset, 16 + 8 * 34);
  EXPECT_EQ(find_vmcs12_field(field::kPinBasedControls)->page_offset, 296);
  EXPECT_EQ(find_vmcs12_field(field::kGuestActivityState)->page_offset, 296 + 4 * 21);
  EXPECT_EQ(find_vmcs12_field(field::kVirtualProcessorId)->page_offset, 384);
  EXPECT_EQ(find_vmcs12_field(field::kHostCsSelector)->page_offset, 392);
  EXPECT_EQ(vmcs12_fields().size(), 62u);
}

TEST(Vmcs12Access, WriteThenReadEveryWritableField) {
  Vmcs12 v;
  for (const FieldInfo& f : vmcs12_fields()) {
    if (f.read_only()) continue;
    ASSERT_TRUE(v.write(f.encoding, 0x1122334455667788ull)) << f.name;
    uint64_t want = f.size == 8 ? 0x1122334455667788ull
                    : f.size == 4 ? 0x55667788ull
                                  : 0x7788ull;
    if (f.encoding == field::kGuestCsArBytes) want &= 0x1f0ff;  // the CPU drops the reserved AR bits
    EXPECT_EQ(v.read(f.encoding).value(), want) << f.name;
  }
}

TEST(Vmcs12Access, WriteReachesTheNamedMember) {
  Vmcs12 v;
  ASSERT_TRUE(v.write(field::kMsrBitmap, 0x5000));
  ASSERT_TRUE(v.write(field::kTprThreshold, 3));
  ASSERT_TRUE(v.write(field::kVirtualProcessorId, 7));
  EXPECT_EQ(v.msr_bitmap, 0x5000u);
  EXPECT_EQ(v.tpr_threshold, 3u);
  EXPECT_EQ(v.virtual_processor_id, 7u);
  v.guest_rip = 0xabc;
  EXPECT_EQ(v.read(field::kGuestRip).value(), 0xabcu);
}

TEST(Vmcs12Access, UnsupportedComponentIsError12) {
  Vmcs12 v;
  for (uint32_t enc : {0x0004u /* EPTP index */, 0x4020u /* PLE gap */, 0x2000u /* I/O bitmap A */,
                       0x80002004u /* reserved bits */, 0x3004u /* bit 12 set */}) {
    auto r = v.read(enc);
    ASSERT_FALSE(r) << std::hex << enc;
    EXPECT_EQ(r.error().kind, VmxFailKind::kFailValid);
    EXPECT_EQ(r.error().error, VmInstructionError::kUnsupportedVmcsComponent);
    auto w = v.write(enc, 1);
    ASSERT_FALSE(w);
    EXPECT_EQ(w.error().error, VmInstructionError::kUnsupportedVmcsComponent);
  }
}

TEST(Vmcs12Access, HighAccessOfA64BitField) {
  Vmcs12 v;
  v.ept_pointer = 0x1111222233334444ull;
  EXPECT_EQ(v.read(field::kEptPointer | 1).value(), 0x11112222u);
  ASSERT_TRUE(v.write(field::kEptPointer | 1, 0xaaaabbbb));
  EXPECT_EQ(v.ept_pointer, 0xaaaabbbb33334444ull);
}

TEST(Vmcs12Access, HighAccessOfANonDoubleFieldIsUnsupported) {
  Vmcs12 v;
  // Natural-width and 32-bit fields have no high half.
  for (uint32_t enc : {field::kGuestRip | 1, field::kTprThreshold | 1, field::kVirtualProcessorId | 1}) {
    auto r = v.read(enc);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().error, VmInstructionError::kUnsupportedVmcsComponent);
  }
}

TEST(Vmcs12Access, VmwriteToReadOnlyFieldIsError13AndChangesNothing) {
  Vmcs12 v;
  v.exit_reason = 12;
  auto w = v.write(field::kExitReason, 30);
  ASSERT_FALSE(w);
  EXPECT_EQ(w.error().kind, VmxFailKind::kFailValid);
  EXPECT_EQ(w.error().error, VmInstructionError::kVmwriteReadOnlyComponent);
  EXPECT_EQ(v.exit_reason, 12u);
  EXPECT_FALSE(v.write(field::kGuestPhysicalAddress | 1, 1));  // high half too
}

TEST(Vmcs12Access, VmwriteAnyFieldOptionAllowsReadOnlyFields) {
  Vmcs12 v;
  ASSERT_TRUE(v.write(field::kExitQualification, 99, {.vmwrite_any_field = true}));
  EXPECT_EQ(v.exit_qualification, 99u);
}

TEST(Vmcs12Access, WriteAnyBypassesReadOnlyButNotUnsupported) {
  Vmcs12 v;
  ASSERT_TRUE(v.write_any(field::kVmInstructionError, 7));
  EXPECT_EQ(v.vm_instruction_error, 7u);
  EXPECT_FALSE(v.write_any(0x4020, 1));
}

TEST(Vmcs12Access, ReadOnlyFieldsAreReadable) {
  Vmcs12 v;
  v.set_vm_instruction_error(VmInstructionError::kVmlaunchNonClearVmcs);
  EXPECT_EQ(v.read(field::kVmInstructionError).value(), 4u);
}

TEST(Vmcs12ExitInfo, SetExitInfoWritesEveryExitField) {
  Vmcs12 v;
  v.exit_interruption_info = 0xdead;  // stale from an earlier exit
  v.vm_instruction_error = 5;
  ExitInfo e = ExitInfo::of(ExitReason::kEptViolation, 0x181);
  e.guest_physical_address = 0x12345000;
  e.instruction_length = 0;
  v.set_exit_info(e);
  EXPECT_EQ(basic_exit_reason(v.exit_reason), ExitReason::kEptViolation);
  EXPECT_EQ(v.exit_qualification, 0x181u);
  EXPECT_EQ(v.guest_physical_address, 0x12345000u);
  EXPECT_EQ(v.exit_interruption_info, 0u);
  EXPECT_EQ(v.vm_instruction_error, 5u) << "not an exit-information field";
}

TEST(Vmcs12Image, RoundTripsEveryField) {
  Vmcs12 v;
  v.revision_id = kVmcs12Revision;
  v.abort_indicator = 3;
  v.launch_state = kLaunchStateLaunched;
  uint64_t x = 0x0102030405060708ull;
  for (const FieldInfo& f : vmcs12_fields()) {
    ASSERT_TRUE(v.write_any(f.encoding, x));
    x = x * 6364136223846793005ull + 1442695040888963407ull;
  }
  Page page;
  v.serialize(page);
  EXPECT_EQ(Vmcs12::deserialize(page), v);
}

TEST(Vmcs12Image, HeaderIsWhereTheSdmPutsIt) {
  Vmcs12 v;
  v.revision_id = kVmcs12Revision;
  v.abort_indicator = 0x55;
  Page page;
  v.serialize(page);
  uint32_t rev, abort;
  std::memcpy(&rev, page.data(), 4);
  std::memcpy(&abort, page.data() + 4, 4);
  EXPECT_EQ(rev, kVmcs12Revision);
  EXPECT_EQ(abort, 0x55u);
}

TEST(Vmcs12Image, SerializeWritesEveryByte) {
  Page page;
  page.fill(std::byte{0xcc});
  Vmcs12{}.serialize(page);
  for (std::byte b : page) ASSERT_EQ(b, std::byte{0});
}

TEST(Vmcs12Image, FieldLandsAtItsOffsetLittleEndian) {
  Vmcs12 v;
  v.msr_bitmap = 0x0000123456789000ull;
  Page page;
  v.serialize(page);
  const size_t off = find_vmcs12_field(field::kMsrBitmap)->page_offset;
  EXPECT_EQ(page[off + 1], std::byte{0x90});
  EXPECT_EQ(page[off + 5], std::byte{0x12});
}

TEST(Vmcs12Image, DeserializeTakesAnyLaunchStateAsIs) {
  Page page{};
  page[8] = std::byte{7};
  Vmcs12 v = Vmcs12::deserialize(page);
  EXPECT_EQ(v.launch_state, 7u);
  EXPECT_FALSE(v.launched());
}

TEST(VmxFailText, NamesTheErrorNumber) {
  VmxFail f = VmxFail::valid(VmInstructionError::kVmwriteReadOnlyComponent, "r", "x");
  EXPECT_EQ(f.to_string(), "VMfailValid(13: VMWRITE to read-only VMCS component): x");
  EXPECT_EQ(f.to_error().code, EINVAL);
  EXPECT_EQ(vm_instruction_error_text(static_cast<VmInstructionError>(14)), "reserved");
  EXPECT_EQ(exit_reason_name(ExitReason::kEptViolation), "EPT_VIOLATION");
}

// The MSR-bitmap rule the processor and the exit routing share (SDM 24.6.9).
TEST(MsrBitmap, CoversTheLowAndHighRangesForReadsAndWrites) {
  std::array<uint8_t, kPageSize> page{};
  const uint32_t low = 0x10, high = 0xc0000080, outside = 0x4b564d00;
  EXPECT_FALSE(msr_bitmap::intercepts(page, low, false));
  EXPECT_FALSE(msr_bitmap::intercepts(page, high, true));
  EXPECT_TRUE(msr_bitmap::intercepts(page, outside, false)) << "no bitmap covers it: always exits";
  EXPECT_EQ(msr_bitmap::byte_of(low, false), 2);
  EXPECT_EQ(msr_bitmap::byte_of(low, true), 2048 + 2);
  EXPECT_EQ(msr_bitmap::byte_of(high, false), 1024 + 0x10);
  EXPECT_EQ(msr_bitmap::byte_of(high, true), 3072 + 0x10);
  EXPECT_EQ(msr_bitmap::byte_of(outside, true), -1);
  page[3072 + 0x10] = 1;  // write of 0xc0000080 (EFER)
  EXPECT_TRUE(msr_bitmap::intercepts(page, high, true));
  EXPECT_FALSE(msr_bitmap::intercepts(page, high, false)) << "the read bitmap is separate";
  EXPECT_FALSE(msr_bitmap::intercepts(page, high + 1, true)) << "one bit per MSR";
}

}  // namespace
}  // namespace nestcache::vmx
