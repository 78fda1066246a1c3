// Nested-state blob: round trips of valid states, and every malformed blob
// rejected with its own message.
#include "vmx/nested_state_format.h"

#include <gtest/gtest.h>

#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "vmx/entry_checks.h"
#include "vmx/evmcs.h"
#include "vmx/nested_state_malformed.h"

namespace nestcache::vmx {
namespace {

namespace off = nested_state_offset;
using Blob = std::vector<std::byte>;

constexpr Gpa kVmxon = 0x10000;
constexpr Gpa kVmcs = 0x11000;
constexpr Gpa kEvmcsGpa = 0x12000;
constexpr Gpa kNoSlot = 0x40000000;  // for the restore rules, which decode() leaves alone

NestedStateImage vmx_off() { return {}; }

NestedStateImage vmxon_only() {
  NestedStateImage s;
  s.vmxon_gpa = kVmxon;
  return s;
}

NestedStateImage with_vmcs12() {
  NestedStateImage s = vmxon_only();
  s.current_vmcs_gpa = kVmcs;
  Vmcs12 v = minimal_vmcs12();
  v.guest_rip = 0x401000;
  v.exit_reason = static_cast<uint32_t>(ExitReason::kVmcall);
  s.vmcs12 = v;
  return s;
}

NestedStateImage in_guest_mode() {
  NestedStateImage s = with_vmcs12();
  s.guest_mode = true;
  s.run_pending = true;
  s.vmcs12->launch_state = kLaunchStateLaunched;
  s.vmcs12->primary_proc_controls |= proc::kUseMsrBitmaps | proc::kUseTprShadow;
  s.vmcs12->msr_bitmap = 0x20000;
  s.vmcs12->virtual_apic_page_addr = 0x21000;
  return s;
}

NestedStateImage with_evmcs() {
  // L0's full copy of the eVMCS (clean fields 0) as the image.
  EvmcsPage page;
  page.revision_id = kEvmcsRevision;
  page.clean_fields = evmcs_clean::kAll;  // must not matter: the copy ignores it
  const Vmcs12 l1 = minimal_vmcs12();
  for (const EvmcsFieldInfo& f : evmcs_fields()) {
    if (field_type(f.encoding) == FieldType::kReadOnly) continue;
    EXPECT_TRUE(evmcs_guest_write(page, f.encoding, l1.read(f.encoding).value()));
  }
  Vmcs12 v;
  v.revision_id = kVmcs12Revision;
  copy_evmcs_to_vmcs12(page, v, 0);
  NestedStateImage s = vmxon_only();
  s.evmcs = true;
  s.guest_mode = true;
  s.current_vmcs_gpa = kEvmcsGpa;
  s.vmcs12 = v;
  return s;
}

// The message decode() gives, or "" when it accepts the blob.
std::string decode_error(const Blob& b) {
  auto r = decode(b);
  return r ? std::string() : r.error().message;
}

TEST(NestedStateRoundTrip, ValidStatesSurviveEncodeDecode) {
  for (const NestedStateImage& s :
       {vmx_off(), vmxon_only(), with_vmcs12(), in_guest_mode(), with_evmcs()}) {
    const Blob b = encode(s);
    auto r = decode(b);
    ASSERT_TRUE(r) << r.error().to_string();
    EXPECT_EQ(*r, s);
    EXPECT_EQ(encode(*r), b);
  }
}

TEST(NestedStateRoundTrip, HeaderIsWhereTheDocumentSaysAndSizesAddUp) {
  const Blob b = encode(in_guest_mode());
  ASSERT_EQ(b.size(), kNestedStateHeaderSize + kPageSize);
  EXPECT_EQ(std::memcmp(b.data(), "NCNS", 4), 0);
  uint32_t flags, total, image;
  uint64_t vmxon, vmcs;
  std::memcpy(&flags, b.data() + off::kFlags, 4);
  std::memcpy(&total, b.data() + off::kTotalSize, 4);
  std::memcpy(&image, b.data() + off::kVmcs12Size, 4);
  std::memcpy(&vmxon, b.data() + off::kVmxonGpa, 8);
  std::memcpy(&vmcs, b.data() + off::kCurrentVmcsGpa, 8);
  EXPECT_EQ(flags, nested_state_flag::kGuestMode | nested_state_flag::kRunPending);
  EXPECT_EQ(total, b.size());
  EXPECT_EQ(image, kPageSize);
  EXPECT_EQ(vmxon, kVmxon);
  EXPECT_EQ(vmcs, kVmcs);
  EXPECT_EQ(encode(vmx_off()).size(), kNestedStateHeaderSize);
}

TEST(NestedStateRoundTrip, EvmcsImageIgnoresTheSavedCleanBits) {
  const NestedStateImage s = with_evmcs();
  auto r = decode(encode(s));
  ASSERT_TRUE(r) << r.error().to_string();
  EXPECT_TRUE(r->evmcs);
  EXPECT_EQ(r->current_vmcs_gpa, kEvmcsGpa);
  EXPECT_EQ(r->vmcs12->pin_based_controls, pin::kAlwaysOn) << "copied though marked clean";
}

// Every prefix of a good blob is refused (the header states the size), and
// a blob with any one byte corrupted decodes to a value either way: refused
// with EINVAL, or accepted as a state that itself round-trips. Nothing a
// migration stream can deliver makes decode() read past the blob or crash
// (the sanitizer builds check the reads).
TEST(NestedStateRobustness, EveryTruncationIsRefusedAndEveryCorruptedByteDecodesToAValue) {
  for (const NestedStateImage& s : {vmx_off(), vmxon_only(), with_vmcs12(), in_guest_mode(), with_evmcs()}) {
    const Blob good = encode(s);
    for (size_t len = 0; len < good.size(); len++) {
      auto r = decode(std::span<const std::byte>(good.data(), len));
      ASSERT_FALSE(r) << "a " << len << "-byte prefix of a " << good.size() << "-byte blob was accepted";
      EXPECT_EQ(r.error().code, EINVAL);
    }
    for (size_t at = 0; at < good.size(); at++) {
      for (uint8_t x : {uint8_t{0x01}, uint8_t{0x80}, uint8_t{0xff}}) {
        Blob bad = good;
        bad[at] ^= std::byte{x};
        auto r = decode(bad);
        if (!r) {
          EXPECT_EQ(r.error().code, EINVAL) << "byte " << at;
          continue;
        }
        auto again = decode(encode(*r));
        ASSERT_TRUE(again) << "byte " << at << ": " << again.error().to_string();
        EXPECT_EQ(*again, *r) << "byte " << at;
      }
    }
  }
}

// The shared catalogue (vmx/nested_state_malformed.h), made from a good
// plain and a good enlightened guest-mode state: every variant decode()
// refuses, once per name.
std::vector<MalformedBlob> format_cases() {
  std::vector<MalformedBlob> out;
  std::set<std::string> names;
  for (const NestedStateImage& good : {in_guest_mode(), with_evmcs()}) {
    for (MalformedBlob& m : malformed_nested_states(encode(good), kNoSlot)) {
      if (m.refused_by != RefusedBy::format || !names.insert(m.name).second) continue;
      out.push_back(std::move(m));
    }
  }
  return out;
}

std::string case_name(const testing::TestParamInfo<MalformedBlob>& i) {
  std::string n = i.param.name;
  for (char& c : n)
    if (c == '-') c = '_';
  return n;
}

class MalformedBlobs : public testing::TestWithParam<MalformedBlob> {};

TEST_P(MalformedBlobs, IsRejectedWithItsMessage) {
  const MalformedBlob& m = GetParam();
  auto r = decode(m.blob);
  ASSERT_FALSE(r) << m.name << " was accepted";
  EXPECT_EQ(r.error().code, m.code);
  EXPECT_EQ(r.error().code, EINVAL);
  EXPECT_NE(r.error().message.find(m.expect), std::string::npos) << r.error().message;
  EXPECT_EQ(r.error().message.rfind("nested state: ", 0), 0u) << r.error().message;
}

INSTANTIATE_TEST_SUITE_P(Format, MalformedBlobs, testing::ValuesIn(format_cases()), case_name);

TEST(NestedStateMalformed, EveryRejectionHasADistinctMessage) {
  const auto cases = format_cases();
  ASSERT_GE(cases.size(), 20u);
  std::set<std::string> messages;
  for (const MalformedBlob& m : cases) {
    const std::string e = decode_error(m.blob);
    ASSERT_FALSE(e.empty()) << m.name;
    EXPECT_TRUE(messages.insert(e).second) << m.name << " repeats: " << e;
  }
}

TEST(NestedStateMalformed, TheCatalogueCoversEveryRule) {
  std::set<std::string> names;
  for (const MalformedBlob& m : format_cases()) names.insert(m.name);
  for (const char* n : {"truncated-header", "bad-magic", "wrong-version", "wrong-header-size", "trailing-bytes",
                        "odd-image-size", "image-size-disagrees", "reserved-byte", "unknown-flag",
                        "run-pending-without-guest-mode", "guest-mode-without-vmxon", "evmcs-without-vmxon",
                        "vmcs12-without-vmxon", "misaligned-vmxon", "vmxon-beyond-width",
                        "misaligned-vmcs12", "vmcs12-beyond-width", "misaligned-evmcs", "vmcs12-is-vmxon",
                        "evmcs-without-address", "guest-mode-without-vmcs12", "vmcs12-address-without-image",
                        "image-without-address", "shadow-vmcs-indicator", "wrong-revision", "bad-launch-state",
                        "entry-check-controls", "entry-check-host-state", "entry-check-guest-state",
                        "evmcs-unsupported-controls"})
    EXPECT_TRUE(names.count(n)) << n;
}

TEST(NestedStateMalformed, RestoreRulesAreLeftToTheVcpu) {
  // The size limit, memslots and the vCPU's eVMCS capability: decode() alone
  // accepts these (the selftest sets them on a restored vCPU).
  for (const MalformedBlob& m : malformed_nested_states(encode(in_guest_mode()), kNoSlot)) {
    if (m.refused_by != RefusedBy::restore || m.name == "oversized") continue;
    EXPECT_TRUE(decode(m.blob)) << m.name;
  }
}

TEST(NestedStateValidate, WorksOnInMemoryImagesToo) {
  EXPECT_TRUE(validate_nested_state(in_guest_mode()));
  NestedStateImage s = in_guest_mode();
  s.current_vmcs_gpa = kInvalidGpa;
  s.vmcs12.reset();
  EXPECT_FALSE(validate_nested_state(s));
}

TEST(NestedStateValidate, VmxOffIgnoresAnImageAndAcceptsTheEvmcsFlagWhenEnabled) {
  // KVM's vmx_set_nested_state with vmxon_pa == -1 never looks at the data
  // (VMMs pass a buffer of the full size), and keeps accepting the eVMCS
  // flag on a vCPU with the enlightened VMCS enabled.
  NestedStateImage s = vmx_off();
  s.vmcs12 = minimal_vmcs12();
  EXPECT_TRUE(decode(encode(s)));
  s.evmcs = true;
  EXPECT_FALSE(validate_nested_state(s));
  EntryCheckEnv enabled;
  enabled.evmcs_enabled = true;
  EXPECT_TRUE(validate_nested_state(s, enabled));
  s.guest_mode = true;
  EXPECT_FALSE(validate_nested_state(s, enabled));
}

TEST(NestedStateValidate, GuestModeChecksUseTheVcpusEnvironment) {
  // The eVMCS filter applies to a plain vmcs12 on a vCPU with the
  // enlightened VMCS enabled; a link pointer is checked through L1 memory.
  NestedStateImage s = in_guest_mode();
  s.vmcs12->primary_proc_controls |= proc::kActivateSecondaryControls;
  s.vmcs12->secondary_proc_controls |= proc2::kVirtualizeApicAccesses;
  s.vmcs12->apic_access_addr = 0x30000;
  EXPECT_TRUE(validate_nested_state(s));
  EntryCheckEnv evmcs;
  evmcs.evmcs_enabled = true;
  EXPECT_NE(validate_nested_state(s, evmcs).error().message.find("evmcs-unsupported-control"), std::string::npos);
  s = in_guest_mode();
  s.vmcs12->vmcs_link_pointer = 0x20000;
  EXPECT_FALSE(validate_nested_state(s));
  EntryCheckEnv memory;
  memory.read_guest32 = [](Gpa g) -> std::optional<uint32_t> {
    if (g == 0x20000) return kVmcs12Revision;
    return std::nullopt;
  };
  EXPECT_TRUE(validate_nested_state(s, memory));
}

TEST(NestedStateValidate, PagesNamedByTheVmcs12AreNotResolvedHere) {
  // An MSR bitmap outside any memslot is fine for the format; the entry
  // after restore is what fails, cleanly.
  NestedStateImage s = in_guest_mode();
  s.vmcs12->msr_bitmap = 0x3fff'ffff'f000;
  EXPECT_TRUE(validate_nested_state(s));
  EXPECT_TRUE(check_nested_state_addresses(s, [](Gpa g, uint64_t) { return g < 0x100000; }));
}

TEST(NestedStateAddresses, EveryNamedRegionMustBeBacked) {
  auto backed_below = [](Gpa limit) {
    return [limit](Gpa g, uint64_t len) { return g + len <= limit; };
  };
  EXPECT_TRUE(check_nested_state_addresses(with_vmcs12(), backed_below(0x100000)));
  EXPECT_TRUE(check_nested_state_addresses(vmx_off(), backed_below(0)));

  auto r = check_nested_state_addresses(with_vmcs12(), backed_below(0x10000));
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("VMXON region 0x10000 is not backed"), std::string::npos);

  r = check_nested_state_addresses(with_vmcs12(), backed_below(0x11000));
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("current vmcs12 region 0x11000 is not backed"), std::string::npos);

  r = check_nested_state_addresses(with_evmcs(), backed_below(0x12000));
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("eVMCS page 0x12000 is not backed"), std::string::npos);
}

}  // namespace
}  // namespace nestcache::vmx
