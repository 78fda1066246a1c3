#include "guest/vmx.h"

#include <fmt/format.h>

namespace nestcache::guest {

namespace ops = cpu::ops;
using cpu::GuestOp;

GuestFn<uint64_t> vmx_ok(GuestOp op, const char* what) {
  OpResult r = co_await ops::exec(op);
  if (!r.ok()) throw VmxError(fmt::format("{} failed: {}", what, cpu::to_string(r)));
  co_return r.value;
}

GuestTask vmxon(Gpa region) { co_await vmx_ok(GuestOp::Vmxon{region}, "VMXON"); }
GuestTask vmxoff() { co_await vmx_ok(GuestOp::Vmxoff{}, "VMXOFF"); }
GuestTask vmclear(Gpa vmcs) { co_await vmx_ok(GuestOp::Vmclear{vmcs}, "VMCLEAR"); }
GuestTask vmptrld(Gpa vmcs) { co_await vmx_ok(GuestOp::Vmptrld{vmcs}, "VMPTRLD"); }
GuestFn<uint64_t> vmptrst() { co_return co_await vmx_ok(GuestOp::Vmptrst{}, "VMPTRST"); }
GuestFn<uint64_t> vmread(uint32_t field) { co_return co_await vmx_ok(GuestOp::Vmread{field}, "VMREAD"); }
GuestTask vmwrite(uint32_t field, uint64_t value) { co_await vmx_ok(GuestOp::Vmwrite{field, value}, "VMWRITE"); }
GuestTask vmlaunch() { co_await vmx_ok(GuestOp::Vmlaunch{}, "VMLAUNCH"); }
GuestTask vmresume() { co_await vmx_ok(GuestOp::Vmresume{}, "VMRESUME"); }
GuestTask invept(vmx::InveptType type, uint64_t eptp) { co_await vmx_ok(GuestOp::Invept{type, eptp}, "INVEPT"); }

GuestTask init_region(Gpa region) { co_await ops::write32(region, vmx::kVmcs12Revision); }

GuestTask enter_vmx(L1Pages& pages) {
  Gpa region = pages.alloc();
  co_await init_region(region);
  co_await vmxon(region);
}

GuestFn<Gpa> new_current_vmcs(L1Pages& pages) {
  Gpa vmcs = pages.alloc();
  co_await init_region(vmcs);
  co_await vmclear(vmcs);
  co_await vmptrld(vmcs);
  co_return vmcs;
}

GuestFn<Gpa> enter_vmx_with_current_vmcs(L1Pages& pages) {
  co_await enter_vmx(pages);
  co_return co_await new_current_vmcs(pages);
}

GuestTask write_vmcs(const vmx::Vmcs12& v) {
  for (const vmx::FieldInfo& f : vmx::vmcs12_fields()) {
    if (f.read_only()) continue;
    uint64_t value = v.read(f.encoding).value();
    if (value) co_await vmwrite(f.encoding, value);
  }
}

GuestFn<uint64_t> exit_reason() { co_return co_await vmread(vmx::field::kExitReason); }

GuestFn<vmx::ExitReason> basic_exit_reason() {
  co_return vmx::basic_exit_reason(static_cast<uint32_t>(co_await exit_reason()));
}

GuestTask expect_exit(vmx::ExitReason expected) {
  vmx::ExitReason reason = co_await basic_exit_reason();
  if (reason != expected)
    throw VmxError(fmt::format("L2 exited with {}, expected {}", vmx::exit_reason_name(reason),
                               vmx::exit_reason_name(expected)));
}

}  // namespace nestcache::guest
