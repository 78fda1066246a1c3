// vmcs12 field table, VMREAD/VMWRITE and the region image (see vmcs12.h).
#include "vmx/vmcs12.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <type_traits>

namespace nestcache::vmx {

static_assert(std::endian::native == std::endian::little,
              "the region image is little-endian and copied byte for byte");
static_assert(std::is_standard_layout_v<Vmcs12> && std::is_trivially_copyable_v<Vmcs12>,
              "page offsets are member offsets");

namespace {

constexpr size_t width_bytes(FieldWidth w) {
  switch (w) {
    case FieldWidth::k16: return 2;
    case FieldWidth::k32: return 4;
    case FieldWidth::k64:
    case FieldWidth::kNatural: return 8;
  }
  return 0;
}

// Each member's C++ type must match the width its encoding names, and each
// encoding must be a full-field access (bit 0 clear) with no reserved bits.
#define NC_VMCS12_CHECK(name, enc, type)                                               \
  static_assert(sizeof(type) == width_bytes(field_width(enc)), #name ": wrong width"); \
  static_assert(!field_is_high_access(enc) && (enc) < 0x8000, #name ": bad encoding");
NC_VMCS12_FIELDS(NC_VMCS12_CHECK)
#undef NC_VMCS12_CHECK

constexpr FieldInfo kFields[] = {
#define NC_VMCS12_ROW(name, enc, type) \
  {enc, #name, static_cast<uint16_t>(offsetof(Vmcs12, name)), static_cast<uint8_t>(sizeof(type))},
    NC_VMCS12_FIELDS(NC_VMCS12_ROW)
#undef NC_VMCS12_ROW
};
constexpr size_t kNumFields = std::size(kFields);

// The same rows sorted by encoding, for the binary search of VMREAD/VMWRITE.
constexpr std::array<FieldInfo, kNumFields> sorted_by_encoding() {
  std::array<FieldInfo, kNumFields> a{};
  for (size_t i = 0; i < kNumFields; i++) a[i] = kFields[i];
  std::sort(a.begin(), a.end(),
            [](const FieldInfo& x, const FieldInfo& y) { return x.encoding < y.encoding; });
  return a;
}
constexpr auto kByEncoding = sorted_by_encoding();

constexpr bool encodings_unique() {
  for (size_t i = 1; i < kNumFields; i++)
    if (kByEncoding[i - 1].encoding == kByEncoding[i].encoding) return false;
  return true;
}
static_assert(encodings_unique(), "a VMCS field is listed twice");

constexpr uint64_t mask_for(size_t bytes) {
  return bytes >= 8 ? ~uint64_t{0} : (uint64_t{1} << (8 * bytes)) - 1;
}

// Byte-level access to a member through the table's offset. Vmcs12 is
// trivially copyable and standard-layout, so its members' bytes may be copied.
uint64_t load(const Vmcs12& v, const FieldInfo& f) {
  uint64_t x = 0;
  std::memcpy(&x, reinterpret_cast<const std::byte*>(&v) + f.page_offset, f.size);
  return x;
}
void store(Vmcs12& v, const FieldInfo& f, uint64_t x) {
  std::memcpy(reinterpret_cast<std::byte*>(&v) + f.page_offset, &x, f.size);
}

VmxFail unsupported(uint32_t encoding, std::string_view why) {
  return VmxFail::valid(VmInstructionError::kUnsupportedVmcsComponent, "vmcs-component",
                        fmt::format("VMCS field encoding {:#x}: {}", encoding, why));
}

// Resolves `encoding` to its row; for a high access, the row of the full field.
VmxResult<const FieldInfo*> resolve(uint32_t encoding) {
  if (encoding >= 0x8000 || (encoding & (1u << 12)))
    return tl::unexpected(unsupported(encoding, "reserved encoding bits are set"));
  const bool high = field_is_high_access(encoding);
  const FieldInfo* f = find_vmcs12_field(encoding & ~1u);
  if (!f) return tl::unexpected(unsupported(encoding, "not a field this model supports"));
  if (high && f->width() != FieldWidth::k64)
    return tl::unexpected(
        unsupported(encoding, fmt::format("high access to {}, which is not a 64-bit field", f->name)));
  return f;
}

VmxStatus write_field(Vmcs12& v, uint32_t encoding, uint64_t value, bool bypass_read_only) {
  const FieldInfo* f = NC_TRY(resolve(encoding));
  if (f->read_only() && !bypass_read_only)
    return tl::unexpected(VmxFail::valid(
        VmInstructionError::kVmwriteReadOnlyComponent, "vmwrite-read-only",
        fmt::format("VMWRITE to {} ({:#x}), a read-only exit-information field", f->name,
                    encoding & ~1u)));
  if (field_is_high_access(encoding)) {
    const uint64_t low = load(v, *f) & 0xffffffffu;
    store(v, *f, low | (value << 32));
  } else {
    store(v, *f, value & mask_for(f->size));
  }
  return {};
}

}  // namespace

std::span<const FieldInfo> vmcs12_fields() { return kFields; }

const FieldInfo* find_vmcs12_field(uint32_t encoding) {
  auto it = std::lower_bound(kByEncoding.begin(), kByEncoding.end(), encoding,
                             [](const FieldInfo& f, uint32_t e) { return f.encoding < e; });
  if (it == kByEncoding.end() || it->encoding != encoding) return nullptr;
  return &*it;
}

VmxResult<uint64_t> Vmcs12::read(uint32_t encoding) const {
  const FieldInfo* f = NC_TRY(resolve(encoding));
  const uint64_t x = load(*this, *f);
  return field_is_high_access(encoding) ? x >> 32 : x;
}

VmxStatus Vmcs12::write(uint32_t encoding, uint64_t value, VmcsAccessOptions opts) {
  // Guest ES..TR access rights (0x4814-0x4822): only bits 16:12 and 7:0 are
  // defined; the CPU drops the others on VMWRITE.
  constexpr uint32_t kGuestEsArBytes = 0x4814, kGuestTrArBytes = 0x4822;
  if (encoding >= kGuestEsArBytes && encoding <= kGuestTrArBytes) value &= 0x1f0ff;
  return write_field(*this, encoding, value, opts.vmwrite_any_field);
}

VmxStatus Vmcs12::write_any(uint32_t encoding, uint64_t value) {
  return write_field(*this, encoding, value, /*bypass_read_only=*/true);
}

void Vmcs12::set_exit_info(const ExitInfo& info) {
  exit_reason = info.exit_reason;
  exit_qualification = info.qualification;
  guest_physical_address = info.guest_physical_address;
  guest_linear_address = info.guest_linear_address;
  exit_interruption_info = info.interruption_info;
  exit_interruption_error_code = info.interruption_error_code;
  idt_vectoring_info = info.idt_vectoring_info;
  idt_vectoring_error_code = info.idt_vectoring_error_code;
  exit_instruction_length = info.instruction_length;
  vmx_instruction_info = info.instruction_info;
}

namespace {
constexpr size_t kRevisionOffset = 0;
constexpr size_t kAbortOffset = 4;
constexpr size_t kLaunchStateOffset = 8;
static_assert(offsetof(Vmcs12, revision_id) == kRevisionOffset);
static_assert(offsetof(Vmcs12, abort_indicator) == kAbortOffset);
static_assert(offsetof(Vmcs12, launch_state) == kLaunchStateOffset);

void put32(std::span<std::byte, kPageSize> page, size_t off, uint32_t x) {
  std::memcpy(page.data() + off, &x, sizeof x);
}
uint32_t get32(std::span<const std::byte, kPageSize> page, size_t off) {
  uint32_t x;
  std::memcpy(&x, page.data() + off, sizeof x);
  return x;
}
}  // namespace

void Vmcs12::serialize(std::span<std::byte, kPageSize> page) const {
  // Field by field rather than one memcpy of the struct: padding bytes, if a
  // future field ever introduced some, must not leak indeterminate values
  // into guest memory or make equal images compare unequal.
  std::fill(page.begin(), page.end(), std::byte{0});
  put32(page, kRevisionOffset, revision_id);
  put32(page, kAbortOffset, abort_indicator);
  put32(page, kLaunchStateOffset, launch_state);
  for (const FieldInfo& f : kFields) {
    const uint64_t x = load(*this, f);
    std::memcpy(page.data() + f.page_offset, &x, f.size);
  }
}

Vmcs12 Vmcs12::deserialize(std::span<const std::byte, kPageSize> page) {
  Vmcs12 v;
  v.revision_id = get32(page, kRevisionOffset);
  v.abort_indicator = get32(page, kAbortOffset);
  v.launch_state = get32(page, kLaunchStateOffset);
  for (const FieldInfo& f : kFields) {
    uint64_t x = 0;
    std::memcpy(&x, page.data() + f.page_offset, f.size);
    store(v, f, x);
  }
  return v;
}

}  // namespace nestcache::vmx
