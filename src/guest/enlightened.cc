#include "guest/enlightened.h"

#include <cstddef>

#include <fmt/format.h>

#include "guest/vmx.h"
#include "vmx/evmcs.h"
#include "vmx/vmx_defs.h"

namespace nestcache::guest {

namespace ops = cpu::ops;

GuestTask enable_vp_assist(Gpa page) {
  co_await ops::wrmsr(vmx::kHvX64MsrVpAssistPage, (page & kPageMask) | vmx::kVpAssistPageEnable);
}

GuestTask load_evmcs(Gpa vp_assist, Gpa evmcs) {
  co_await ops::write64(vp_assist + vmx::kVpAssistCurrentNestedVmcsOffset, evmcs);
  co_await ops::write8(vp_assist + vmx::kVpAssistEnlightenVmentryOffset, 1);
}

GuestTask init_evmcs(Gpa evmcs) { co_await ops::write32(evmcs + offsetof(vmx::EvmcsPage, revision_id), vmx::kEvmcsRevision); }

namespace {

cpu::GuestFn<uint64_t> load_field(Gpa at, uint8_t size) {
  switch (size) {
    case 2: co_return co_await ops::read16(at);
    case 4: co_return co_await ops::read32(at);
    default: co_return co_await ops::read64(at);
  }
}

GuestTask store_field(Gpa at, uint8_t size, uint64_t value) {
  switch (size) {
    case 2: co_await ops::write16(at, static_cast<uint16_t>(value)); break;
    case 4: co_await ops::write32(at, static_cast<uint32_t>(value)); break;
    default: co_await ops::write64(at, value); break;
  }
}

const vmx::EvmcsFieldInfo& carried(uint32_t field) {
  const vmx::EvmcsFieldInfo* f = vmx::find_evmcs_field(field);
  if (!f) throw VmxError(fmt::format("VMCS field {:#x} is not carried by the eVMCS", field));
  return *f;
}

}  // namespace

GuestTask evmcs_write(Gpa evmcs, uint32_t field, uint64_t value) {
  const vmx::EvmcsFieldInfo& f = carried(field);
  co_await store_field(evmcs + f.page_offset, f.size, value);
  if (f.clean_group) {
    Gpa clean = evmcs + vmx::kEvmcsCleanFieldsOffset;
    uint32_t bits = co_await ops::read32(clean);
    co_await ops::write32(clean, bits & ~f.clean_group);
  }
}

GuestFn<uint64_t> evmcs_read(Gpa evmcs, uint32_t field) {
  const vmx::EvmcsFieldInfo& f = carried(field);
  co_return co_await load_field(evmcs + f.page_offset, f.size);
}

GuestTask write_evmcs(Gpa evmcs, const vmx::Vmcs12& v, uint32_t enlightenments) {
  for (const vmx::EvmcsFieldInfo& f : vmx::evmcs_fields()) {
    if (vmx::field_type(f.encoding) == vmx::FieldType::kReadOnly) continue;
    co_await evmcs_write(evmcs, f.encoding, v.read(f.encoding).value());
  }
  Gpa ctl = evmcs + vmx::kEvmcsEnlightenmentsOffset;
  uint32_t on = co_await ops::read32(ctl);
  co_await ops::write32(ctl, on | enlightenments);
  // The enlightenments control has its own clean bit.
  Gpa clean = evmcs + vmx::kEvmcsCleanFieldsOffset;
  uint32_t bits = co_await ops::read32(clean);
  co_await ops::write32(clean, bits & ~vmx::evmcs_clean::kEnlightenmentsControl);
}

}  // namespace nestcache::guest
