// Enlightened VMCS: field table, copies to and from vmcs12, VMREAD/VMWRITE
// and control checks while an eVMCS is current (see evmcs.h).
#include "vmx/evmcs.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <type_traits>

namespace nestcache::vmx {

static_assert(std::endian::native == std::endian::little);
static_assert(std::is_standard_layout_v<EvmcsPage> && std::is_trivially_copyable_v<EvmcsPage>);
static_assert(std::is_standard_layout_v<VpAssistPage> &&
              std::is_trivially_copyable_v<VpAssistPage>);
static_assert(sizeof(EvmcsPage) <= kPageSize && sizeof(VpAssistPage) <= kPageSize);

namespace {

// load()/store() copy raw bytes, so every byte must belong to a member.
constexpr size_t kEvmcsHeaderBytes = 4 * 6 + 8;
constexpr size_t kEvmcsMemberBytes = kEvmcsHeaderBytes
#define NC_EVMCS_SIZE(name, enc, group) +sizeof(EvmcsPage::name)
    NC_EVMCS_FIELDS(NC_EVMCS_SIZE)
#undef NC_EVMCS_SIZE
    + sizeof(EvmcsPage::tail_reserved);
static_assert(sizeof(EvmcsPage) == kEvmcsMemberBytes,
              "EvmcsPage has implicit padding: resize tail_reserved");
static_assert(sizeof(VpAssistPage) == 56, "VpAssistPage has implicit padding");

// Each carried field keeps its vmcs12 type, and the encoding listed with it
// is a full-field encoding of the same width.
#define NC_EVMCS_CHECK(name, enc, group)                                        \
  static_assert(std::is_same_v<decltype(EvmcsPage::name), decltype(Vmcs12::name)>); \
  static_assert(!field_is_high_access(enc));                                    \
  static_assert(std::popcount(uint32_t{group}) <= 1, #name ": one group per field");
NC_EVMCS_FIELDS(NC_EVMCS_CHECK)
#undef NC_EVMCS_CHECK

constexpr EvmcsFieldInfo kFields[] = {
#define NC_EVMCS_ROW(name, enc, group)                                            \
  {enc, #name, static_cast<uint16_t>(offsetof(EvmcsPage, name)),                 \
   static_cast<uint8_t>(sizeof(EvmcsPage::name)), group},
    NC_EVMCS_FIELDS(NC_EVMCS_ROW)
#undef NC_EVMCS_ROW
};

constexpr bool is_read_only(uint32_t enc) { return field_type(enc) == FieldType::kReadOnly; }
constexpr bool is_guest_state(uint32_t enc) { return field_type(enc) == FieldType::kGuestState; }

VmxFail not_carried(uint32_t encoding, std::string_view why) {
  return VmxFail::valid(VmInstructionError::kUnsupportedVmcsComponent, "evmcs-component",
                        fmt::format("VMCS field encoding {:#x} {}", encoding, why));
}

}  // namespace

EvmcsPage EvmcsPage::load(std::span<const std::byte, kPageSize> page) {
  EvmcsPage p;
  std::memcpy(&p, page.data(), sizeof p);
  return p;
}

void EvmcsPage::store(std::span<std::byte, kPageSize> page) const {
  std::memcpy(page.data(), this, sizeof *this);
}

VpAssistPage VpAssistPage::load(std::span<const std::byte, kPageSize> page) {
  VpAssistPage p;
  std::memcpy(&p, page.data(), sizeof p);
  return p;
}

void VpAssistPage::store(std::span<std::byte, kPageSize> page) const {
  std::memcpy(page.data(), this, sizeof *this);
}

std::span<const EvmcsFieldInfo> evmcs_fields() { return kFields; }

const EvmcsFieldInfo* find_evmcs_field(uint32_t encoding) {
  for (const EvmcsFieldInfo& f : kFields)
    if (f.encoding == encoding) return &f;
  return nullptr;
}

EvmcsSnapshot EvmcsSnapshot::take(const EvmcsPage& page, bool force_dirty) {
  // One read of each word: later decisions of the entry use these copies.
  const uint32_t clean = page.clean_fields;
  const uint32_t ctl = page.enlightenments_control;
  EvmcsSnapshot s;
  s.clean_fields = force_dirty ? 0 : clean;
  s.msr_bitmap = (ctl & evmcs_enlightenment::kMsrBitmap) != 0;
  s.flush_hypercall = (ctl & evmcs_enlightenment::kNestedFlushHypercall) != 0;
  return s;
}

VmxStatus check_evmcs_revision(const EvmcsPage& page) {
  if (page.revision_id != kEvmcsRevision)
    return tl::unexpected(VmxFail::invalid(fmt::format(
        "eVMCS revision {:#x} is not the supported version {}", page.revision_id, kEvmcsRevision)));
  return {};
}

void copy_evmcs_to_vmcs12(const EvmcsPage& src, Vmcs12& dst, uint32_t clean_fields) {
  // A group's fields are copied when its clean bit is clear; kNone fields
  // (guest RIP, TPR threshold) have no bit and are copied every time.
#define NC_EVMCS_COPY_IN(name, enc, group) \
  if (!is_read_only(enc) && ((group) == 0 || !(clean_fields & (group)))) dst.name = src.name;
  NC_EVMCS_FIELDS(NC_EVMCS_COPY_IN)
#undef NC_EVMCS_COPY_IN
}

void copy_vmcs12_to_evmcs(const Vmcs12& src, EvmcsPage& dst) {
#define NC_EVMCS_COPY_OUT(name, enc, group) \
  if (is_read_only(enc) || is_guest_state(enc)) dst.name = src.name;
  NC_EVMCS_FIELDS(NC_EVMCS_COPY_OUT)
#undef NC_EVMCS_COPY_OUT
}

VmxStatus evmcs_guest_write(EvmcsPage& page, uint32_t encoding, uint64_t value) {
  switch (encoding) {
#define NC_EVMCS_WRITE(name, enc, group)                                \
  case enc:                                                             \
    page.name = static_cast<decltype(page.name)>(value);                \
    page.clean_fields &= ~uint32_t{group};                              \
    return {};
    NC_EVMCS_FIELDS(NC_EVMCS_WRITE)
#undef NC_EVMCS_WRITE
  }
  return tl::unexpected(not_carried(encoding, "is not carried by the eVMCS"));
}

VmxResult<uint64_t> evmcs_vmread(const EvmcsPage& page, uint32_t encoding) {
  switch (encoding) {
#define NC_EVMCS_READ(name, enc, group) \
  case enc:                             \
    return static_cast<uint64_t>(page.name);
    NC_EVMCS_FIELDS(NC_EVMCS_READ)
#undef NC_EVMCS_READ
  }
  if (field_is_high_access(encoding))
    return tl::unexpected(not_carried(encoding, "is a high access, which eVMCS VMREAD does not offer"));
  return tl::unexpected(not_carried(encoding, "is not carried by the eVMCS"));
}

VmxStatus evmcs_vmwrite(uint32_t encoding) {
  return tl::unexpected(VmxFail::invalid(fmt::format(
      "VMWRITE of field {:#x} while an enlightened VMCS is current: L1 must write the eVMCS "
      "page itself",
      encoding)));
}

VmxStatus check_evmcs_controls(const Vmcs12& v) {
  constexpr uint32_t kPinUnsupported = pin::kPostedInterrupts | pin::kPreemptionTimer;
  constexpr uint32_t kProc2Unsupported =
      proc2::kVirtualizeApicAccesses | proc2::kApicRegisterVirtualization |
      proc2::kVirtualInterruptDelivery | proc2::kPauseLoopExiting | proc2::kEnableVmFunctions |
      proc2::kVmcsShadowing | proc2::kEnablePml | proc2::kEptViolationVe;
  // The secondary controls as written, whether or not they are active (KVM's
  // nested_evmcs_check_controls filters the field itself).
  const uint32_t proc2c = v.secondary_proc_controls;
  if (uint32_t bad = v.pin_based_controls & kPinUnsupported)
    return tl::unexpected(VmxFail::valid(
        VmInstructionError::kEntryInvalidControlFields, "evmcs-unsupported-control",
        fmt::format("pin-based controls {:#x}: bits {:#x} cannot be used with an enlightened VMCS",
                    v.pin_based_controls, bad)));
  if (uint32_t bad = proc2c & kProc2Unsupported)
    return tl::unexpected(VmxFail::valid(
        VmInstructionError::kEntryInvalidControlFields, "evmcs-unsupported-control",
        fmt::format("secondary controls {:#x}: bits {:#x} cannot be used with an enlightened VMCS",
                    proc2c, bad)));
  if (v.exit_controls & exit_ctl::kSavePreemptionTimer)
    return tl::unexpected(VmxFail::valid(
        VmInstructionError::kEntryInvalidControlFields, "evmcs-unsupported-control",
        "VM-exit control \"save VMX-preemption timer\" cannot be used with an enlightened VMCS"));
  return {};
}

}  // namespace nestcache::vmx
