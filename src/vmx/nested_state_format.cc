// Nested-state blob: encoding, decoding and validation (see
// nested_state_format.h and docs/nested-state.md).
#include "vmx/nested_state_format.h"

#include <bit>
#include <cstring>

#include "vmx/entry_checks.h"
#include "vmx/evmcs.h"

namespace nestcache::vmx {

static_assert(std::endian::native == std::endian::little);

namespace {

namespace off = nested_state_offset;
namespace flag = nested_state_flag;

constexpr size_t kReservedBytes = kNestedStateHeaderSize - off::kReserved;

template <class T>
T get(std::span<const std::byte> b, size_t at) {
  T x;
  std::memcpy(&x, b.data() + at, sizeof x);
  return x;
}

template <class T>
void put(std::vector<std::byte>& b, size_t at, T x) {
  std::memcpy(b.data() + at, &x, sizeof x);
}

template <class... Args>
tl::unexpected<Error> bad(fmt::format_string<Args...> f, Args&&... args) {
  return make_error(EINVAL, "nested state: " + fmt::format(f, std::forward<Args>(args)...));
}

// The two checks every address in the header gets.
Status check_address(std::string_view what, Gpa gpa) {
  if (!page_aligned(gpa)) return bad("{} {:#x} is not 4 KiB aligned", what, gpa);
  if (!page_address_valid(gpa))
    return bad("{} {:#x} exceeds the {}-bit physical-address width", what, gpa, kMaxPhysAddrBits);
  return {};
}

}  // namespace

uint32_t NestedStateImage::flags() const {
  return (guest_mode ? flag::kGuestMode : 0) | (run_pending ? flag::kRunPending : 0) |
         (evmcs ? flag::kEvmcs : 0);
}

std::vector<std::byte> encode(const NestedStateImage& s) {
  const uint32_t image_size = s.vmcs12 ? static_cast<uint32_t>(kVmcsRegionSize) : 0;
  std::vector<std::byte> b(kNestedStateHeaderSize + image_size, std::byte{0});
  put<uint32_t>(b, off::kMagic, kNestedStateMagic);
  put<uint16_t>(b, off::kVersion, kNestedStateVersion);
  put<uint16_t>(b, off::kHeaderSize, static_cast<uint16_t>(kNestedStateHeaderSize));
  put<uint32_t>(b, off::kTotalSize, static_cast<uint32_t>(b.size()));
  put<uint32_t>(b, off::kFlags, s.flags());
  put<uint64_t>(b, off::kVmxonGpa, s.vmxon_gpa);
  put<uint64_t>(b, off::kCurrentVmcsGpa, s.current_vmcs_gpa);
  put<uint32_t>(b, off::kVmcs12Size, image_size);
  if (s.vmcs12)
    s.vmcs12->serialize(std::span<std::byte, kPageSize>(b.data() + off::kVmcs12, kPageSize));
  return b;
}

Result<NestedStateImage> decode(std::span<const std::byte> blob, const EntryCheckEnv& env) {
  // Framing: everything needed to know where the parts are, before reading them.
  if (blob.size() < kNestedStateHeaderSize)
    return bad("blob of {} bytes is shorter than the {}-byte header", blob.size(),
               kNestedStateHeaderSize);
  if (const auto magic = get<uint32_t>(blob, off::kMagic); magic != kNestedStateMagic)
    return bad("bad magic {:#010x} (expected {:#010x}, \"NCNS\"): not a nestcache nested-state blob",
               magic, kNestedStateMagic);
  if (const auto version = get<uint16_t>(blob, off::kVersion); version != kNestedStateVersion)
    return bad("version {} is not supported (this build reads version {})", version,
               kNestedStateVersion);
  if (const auto hsize = get<uint16_t>(blob, off::kHeaderSize); hsize != kNestedStateHeaderSize)
    return bad("header size {} is wrong for version 1 (must be {})", hsize, kNestedStateHeaderSize);
  const auto total = get<uint32_t>(blob, off::kTotalSize);
  if (total > blob.size())
    return bad("total size field says {} bytes but the blob has {}: truncated", total, blob.size());
  if (total < blob.size())
    return bad("total size field says {} bytes but the blob has {}: {} trailing bytes", total, blob.size(),
               blob.size() - total);
  const auto image_size = get<uint32_t>(blob, off::kVmcs12Size);
  if (image_size != 0 && image_size != kVmcsRegionSize)
    return bad("vmcs12 image size {} is neither 0 nor {}", image_size, kVmcsRegionSize);
  if (total != kNestedStateHeaderSize + image_size)
    return bad("total size {} does not equal the header ({}) plus the vmcs12 image ({})", total,
               kNestedStateHeaderSize, image_size);
  for (size_t i = off::kReserved; i < off::kReserved + kReservedBytes; i++)
    if (blob[i] != std::byte{0})
      return bad("reserved header byte at offset {} is {:#x}, must be 0", i,
                 std::to_integer<unsigned>(blob[i]));
  const auto flags = get<uint32_t>(blob, off::kFlags);
  if (flags & ~flag::kAll)
    return bad("unknown flag bits {:#x} (this build knows {:#x})", flags & ~flag::kAll, flag::kAll);

  NestedStateImage s;
  s.guest_mode = flags & flag::kGuestMode;
  s.run_pending = flags & flag::kRunPending;
  s.evmcs = flags & flag::kEvmcs;
  s.vmxon_gpa = get<uint64_t>(blob, off::kVmxonGpa);
  s.current_vmcs_gpa = get<uint64_t>(blob, off::kCurrentVmcsGpa);
  if (image_size)
    s.vmcs12 = Vmcs12::deserialize(
        std::span<const std::byte, kPageSize>(blob.data() + off::kVmcs12, kPageSize));
  NC_TRY(validate_nested_state(s, env));
  return s;
}

Status validate_nested_state(const NestedStateImage& s, const EntryCheckEnv& env) {
  const bool has_current = s.current_vmcs_gpa != kInvalidGpa;
  const std::string_view current_name = s.evmcs ? "eVMCS address" : "current vmcs12 address";

  if (s.run_pending && !s.guest_mode)
    return bad("run-pending flag without guest mode (a pending VM entry is an entry into L2)");

  if (!s.vmx_on()) {
    // Outside VMX operation there is nothing else to restore. As in KVM, a
    // vmcs12 image is ignored (VMMs pass a buffer of the full size), and
    // the eVMCS flag, which once meant "enable the enlightened VMCS", is
    // accepted on a vCPU that has it enabled.
    if (s.guest_mode) return bad("guest-mode flag is set but VMX is off (VMXON address is invalid)");
    if (s.evmcs && !env.evmcs_enabled)
      return bad("eVMCS flag is set, VMX is off and the vCPU has not enabled the enlightened VMCS");
    if (has_current) return bad("{} {:#x} given but VMX is off", current_name, s.current_vmcs_gpa);
    return {};
  }

  NC_TRY(check_address("VMXON address", s.vmxon_gpa));
  if (has_current) {
    NC_TRY(check_address(current_name, s.current_vmcs_gpa));
    if (s.current_vmcs_gpa == s.vmxon_gpa)
      return bad("{} {:#x} is the VMXON region", current_name, s.current_vmcs_gpa);
  }
  if (s.evmcs && !has_current) return bad("eVMCS flag is set but no eVMCS address is given");
  if (s.guest_mode && !has_current) return bad("guest-mode flag is set but there is no current vmcs12");
  if (has_current && !s.vmcs12)
    return bad("{} {:#x} given without a vmcs12 image", current_name, s.current_vmcs_gpa);
  if (!has_current && s.vmcs12) return bad("vmcs12 image given without a current VMCS address");
  if (!s.vmcs12) return {};

  const Vmcs12& v = *s.vmcs12;
  if (v.revision_id & kVmcsShadowIndicator)
    return bad("vmcs12 image has the shadow-VMCS indicator set; nestcache models no VMCS shadowing");
  if (v.revision_id != kVmcs12Revision)
    return bad("vmcs12 image revision {:#x} is not this model's {:#x}", v.revision_id,
               kVmcs12Revision);
  if (v.launch_state != kLaunchStateClear && v.launch_state != kLaunchStateLaunched)
    return bad("vmcs12 image launch state {} is neither 0 (clear) nor 1 (launched)", v.launch_state);

  if (s.guest_mode) {
    // L2 is running (or about to): the vmcs12 must be one a VM entry accepts,
    // or restoring it would run L2 on state hardware would have refused.
    EntryCheckEnv e = env;
    e.evmcs_enabled = env.evmcs_enabled || s.evmcs;
    e.run_pending = s.run_pending;
    if (auto r = check_vm_entry(v, e); !r)
      return bad("in guest mode the vmcs12 must pass VM-entry checks; it fails {}: {}",
                 r.error().rule, r.error().message);
  }
  return {};
}

Status check_nested_state_addresses(const NestedStateImage& s, const GpaBackedFn& backed) {
  if (s.vmx_on() && !backed(s.vmxon_gpa, kPageSize))
    return bad("VMXON region {:#x} is not backed by a memslot", s.vmxon_gpa);
  if (s.current_vmcs_gpa != kInvalidGpa && !backed(s.current_vmcs_gpa, kPageSize))
    return bad("{} {:#x} is not backed by a memslot",
               s.evmcs ? "eVMCS page" : "current vmcs12 region", s.current_vmcs_gpa);
  return {};
}

}  // namespace nestcache::vmx
