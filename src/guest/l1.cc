#include "guest/l1.h"

#include <fmt/format.h>

#include "cpu/cpu_model.h"
#include "vmx/evmcs.h"
#include "vmx/vmx_defs.h"

namespace nestcache::guest {

namespace ops = cpu::ops;

Gpa L1Pages::alloc() { return alloc(1); }

Gpa L1Pages::alloc(size_t pages) {
  if (next_ + pages * kPageSize > end_) throw std::runtime_error("L1 is out of memory for its own pages");
  Gpa g = next_;
  next_ += pages * kPageSize;
  return g;
}

GuestFn<uint64_t> vmx_ok(cpu::GuestOp op, const char* what) {
  OpResult r = co_await ops::exec(op);
  if (!r.ok()) throw VmxError(fmt::format("{} failed: {}", what, cpu::to_string(r)));
  co_return r.value;
}

GuestTask vmwrite(uint32_t field, uint64_t value) {
  co_await vmx_ok(cpu::GuestOp{cpu::GuestOp::Vmwrite{field, value}}, "VMWRITE");
}

GuestFn<uint64_t> vmread(uint32_t field) {
  co_return co_await vmx_ok(cpu::GuestOp{cpu::GuestOp::Vmread{field}}, "VMREAD");
}

GuestTask init_region(Gpa region) { co_await ops::write32(region, vmx::kVmcs12Revision); }

GuestTask enter_vmx(L1Pages& pages) {
  Gpa region = pages.alloc();
  co_await init_region(region);
  co_await vmx_ok(cpu::GuestOp{cpu::GuestOp::Vmxon{region}}, "VMXON");
}

GuestTask write_vmcs(const vmx::Vmcs12& v) {
  for (const vmx::FieldInfo& f : vmx::vmcs12_fields()) {
    if (f.read_only()) continue;
    uint64_t value = v.read(f.encoding).value();
    if (value) co_await vmwrite(f.encoding, value);
  }
}

uint64_t Ept12::eptp() const { return root_ | vmx::eptp::kMemTypeWb | vmx::eptp::kWalkLength4; }

GuestFn<uint64_t> Ept12::leaf_entry(Gpa l2_gpa, bool create) {
  Gpa table = root_;
  for (int level = 4; level > 1; level--) {
    Gpa entry_gpa = table + ((l2_gpa >> (12 + 9 * (level - 1))) & 0x1ff) * 8;
    uint64_t entry = co_await ops::read64(entry_gpa);
    if (!vmx::ept::present(entry)) {
      if (!create) co_return 0;
      Gpa next = pages_.alloc();
      entry = next | vmx::ept::kReadWriteExecute;
      co_await ops::write64(entry_gpa, entry);
    }
    table = entry & vmx::ept::kAddressMask;
  }
  co_return table + ((l2_gpa >> 12) & 0x1ff) * 8;
}

GuestTask Ept12::map(Gpa l2_gpa, Gpa l1_gpa) {
  Gpa e = co_await leaf_entry(l2_gpa, true);
  co_await ops::write64(e, (l1_gpa & kPageMask) | vmx::ept::kReadWriteExecute);
}

GuestTask Ept12::unmap(Gpa l2_gpa) {
  Gpa e = co_await leaf_entry(l2_gpa, false);
  if (e) co_await ops::write64(e, 0);
}

GuestFn<uint64_t> Ept12::lookup(Gpa l2_gpa) {
  Gpa e = co_await leaf_entry(l2_gpa, false);
  if (!e) co_return 0;
  uint64_t entry = co_await ops::read64(e);
  co_return vmx::ept::present(entry) ? (entry & vmx::ept::kAddressMask) : 0;
}

GuestFn<uint64_t> exit_reason() { co_return co_await vmread(vmx::field::kExitReason); }

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
