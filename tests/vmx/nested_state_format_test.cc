// Nested-state blob: round trips of valid states, and every malformed blob
// rejected with its own message.
#include "vmx/nested_state_format.h"

#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "vmx/entry_checks.h"
#include "vmx/evmcs.h"

namespace nestcache::vmx {
namespace {

namespace off = nested_state_offset;
using Blob = std::vector<std::byte>;

constexpr Gpa kVmxon = 0x10000;
constexpr Gpa kVmcs = 0x11000;
constexpr Gpa kEvmcsGpa = 0x12000;

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

template <class T>
void poke(Blob& b, size_t at, T x) {
  std::memcpy(b.data() + at, &x, sizeof x);
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

struct Malformed {
  std::string name;
  std::function<Blob()> make;
  std::string expect;  // a substring of the message
};

Blob image_blob(std::function<void(NestedStateImage&)> edit, NestedStateImage base = with_vmcs12()) {
  edit(base);
  return encode(base);
}

std::vector<Malformed> malformed_blobs() {
  using S = NestedStateImage;
  return {
      {"Truncated", [] { return Blob(10); }, "shorter than the 64-byte header"},
      {"BadMagic", [] { Blob b = encode(with_vmcs12()); b[0] = std::byte{'X'}; return b; },
       "bad magic"},
      {"FutureVersion", [] { Blob b = encode(with_vmcs12()); poke<uint16_t>(b, off::kVersion, 2); return b; },
       "version 2 is not supported"},
      {"WrongHeaderSize",
       [] { Blob b = encode(with_vmcs12()); poke<uint16_t>(b, off::kHeaderSize, 32); return b; },
       "header size 32"},
      {"TrailingBytes", [] { Blob b = encode(with_vmcs12()); b.push_back(std::byte{0}); return b; },
       "total size field says"},
      {"OddImageSize",
       [] {
         Blob b = encode(vmxon_only());
         b.resize(64 + 100);
         poke<uint32_t>(b, off::kTotalSize, 164);
         poke<uint32_t>(b, off::kVmcs12Size, 100);
         return b;
       },
       "neither 0 nor 4096"},
      {"ImageSizeDisagreesWithTotal",
       [] { Blob b = encode(with_vmcs12()); poke<uint32_t>(b, off::kVmcs12Size, 0); return b; },
       "does not equal the header"},
      {"ReservedHeaderByte", [] { Blob b = encode(with_vmcs12()); b[50] = std::byte{1}; return b; },
       "reserved header byte at offset 50"},
      {"UnknownFlag",
       [] { Blob b = encode(with_vmcs12()); poke<uint32_t>(b, off::kFlags, 1u << 5); return b; },
       "unknown flag bits 0x20"},
      {"RunPendingWithoutGuestMode", [] { return image_blob([](S& s) { s.run_pending = true; }); },
       "run-pending flag without guest mode"},
      {"GuestModeWithVmxOff", [] { return image_blob([](S& s) { s.guest_mode = true; }, vmx_off()); },
       "guest-mode flag is set but VMX is off"},
      {"EvmcsWithVmxOff", [] { return image_blob([](S& s) { s.evmcs = true; }, vmx_off()); },
       "eVMCS flag is set, VMX is off and the vCPU has not enabled the enlightened VMCS"},
      {"CurrentVmcsWithVmxOff",
       [] { return image_blob([](S& s) { s.current_vmcs_gpa = kVmcs; }, vmx_off()); },
       "current vmcs12 address 0x11000 given but VMX is off"},
      {"VmxonUnaligned", [] { return image_blob([](S& s) { s.vmxon_gpa = kVmxon + 8; }); },
       "VMXON address 0x10008 is not 4 KiB aligned"},
      {"VmxonBeyondWidth",
       [] { return image_blob([](S& s) { s.vmxon_gpa = uint64_t{1} << kMaxPhysAddrBits; }); },
       "VMXON address 0x400000000000 exceeds"},
      {"Vmcs12Unaligned", [] { return image_blob([](S& s) { s.current_vmcs_gpa = kVmcs + 0x10; }); },
       "current vmcs12 address 0x11010 is not 4 KiB aligned"},
      {"Vmcs12BeyondWidth",
       [] { return image_blob([](S& s) { s.current_vmcs_gpa = uint64_t{1} << 50; }); },
       "current vmcs12 address 0x4000000000000 exceeds"},
      {"EvmcsUnaligned",
       [] { return image_blob([](S& s) { s.current_vmcs_gpa = kEvmcsGpa + 1; }, with_evmcs()); },
       "eVMCS address 0x12001 is not 4 KiB aligned"},
      {"Vmcs12IsVmxonRegion", [] { return image_blob([](S& s) { s.current_vmcs_gpa = kVmxon; }); },
       "is the VMXON region"},
      {"EvmcsWithoutAddress",
       [] {
         return image_blob([](S& s) {
           s.evmcs = true;
           s.vmcs12.reset();
         }, vmxon_only());
       },
       "eVMCS flag is set but no eVMCS address"},
      {"GuestModeWithoutVmcs12", [] { return image_blob([](S& s) { s.guest_mode = true; }, vmxon_only()); },
       "guest-mode flag is set but there is no current vmcs12"},
      {"Vmcs12AddressWithoutImage", [] { return image_blob([](S& s) { s.vmcs12.reset(); }); },
       "given without a vmcs12 image"},
      {"ImageWithoutVmcs12Address",
       [] { return image_blob([](S& s) { s.current_vmcs_gpa = kInvalidGpa; }); },
       "vmcs12 image given without a current VMCS address"},
      {"ShadowIndicator",
       [] { return image_blob([](S& s) { s.vmcs12->revision_id |= kVmcsShadowIndicator; }); },
       "shadow-VMCS indicator"},
      {"WrongRevision", [] { return image_blob([](S& s) { s.vmcs12->revision_id = 0x11e57ed0; }); },
       "revision 0x11e57ed0 is not this model's"},
      {"BadLaunchState", [] { return image_blob([](S& s) { s.vmcs12->launch_state = 2; }); },
       "launch state 2"},
      {"GuestModeVmcs12FailsControls",
       [] { return image_blob([](S& s) { s.vmcs12->msr_bitmap = 0x20010; }, in_guest_mode()); },
       "fails msr-bitmap-address"},
      {"GuestModeVmcs12FailsHostState",
       [] { return image_blob([](S& s) { s.vmcs12->host_cr4 = 0; }, in_guest_mode()); },
       "fails host-cr4-fixed"},
      {"GuestModeVmcs12FailsGuestState",
       [] { return image_blob([](S& s) { s.vmcs12->vmcs_link_pointer = 0; }, in_guest_mode()); },
       "fails vmcs-link-pointer"},
      {"GuestModeEvmcsUnsupportedControl",
       [] {
         return image_blob([](S& s) {
           Vmcs12& v = *s.vmcs12;
           v.primary_proc_controls |= proc::kActivateSecondaryControls;
           v.secondary_proc_controls |= proc2::kVirtualizeApicAccesses;
           v.apic_access_addr = 0x30000;
         }, with_evmcs());
       },
       "in guest mode the vmcs12 must pass VM-entry checks; it fails evmcs-unsupported-control"},
  };
}

class MalformedBlob : public testing::TestWithParam<Malformed> {};

TEST_P(MalformedBlob, IsRejectedWithItsMessage) {
  const Malformed& m = GetParam();
  auto r = decode(m.make());
  ASSERT_FALSE(r) << m.name << " was accepted";
  EXPECT_EQ(r.error().code, EINVAL);
  EXPECT_NE(r.error().message.find(m.expect), std::string::npos) << r.error().message;
  EXPECT_EQ(r.error().message.rfind("nested state: ", 0), 0u) << r.error().message;
}

INSTANTIATE_TEST_SUITE_P(Format, MalformedBlob, testing::ValuesIn(malformed_blobs()),
                         [](const testing::TestParamInfo<Malformed>& i) { return i.param.name; });

TEST(NestedStateMalformed, EveryRejectionHasADistinctMessage) {
  const auto cases = malformed_blobs();
  ASSERT_GE(cases.size(), 20u);
  std::set<std::string> messages;
  for (const Malformed& m : cases) {
    const std::string e = decode_error(m.make());
    ASSERT_FALSE(e.empty()) << m.name;
    EXPECT_TRUE(messages.insert(e).second) << m.name << " repeats: " << e;
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
