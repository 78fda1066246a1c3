#include "guest/l2_switch.h"

#include <fmt/format.h>

#include "guest/enlightened.h"
#include "guest/l2_run.h"
#include "guest/vmcs12_pages.h"
#include "guest/vmx.h"
#include "vmx/evmcs.h"

namespace nestcache::guest {

namespace {
// VMCALL's length: the RIP advance after a VMCALL exit.
constexpr uint64_t kVmcallLength = 3;
}  // namespace

std::vector<SwitchedL2> lay_out_switched_l2s(Gpa start, int n) {
  std::vector<SwitchedL2> l2;
  for (int j = 0; j < n; j++) {
    Gpa base = start + static_cast<Gpa>(j) * 4 * kPageSize;
    l2.push_back({base, base + kPageSize, base + 2 * kPageSize, base + 3 * kPageSize});
  }
  return l2;
}

cpu::GuestTask switch_to(const SwitchedL2& l2, SwitchMode mode, bool first) {
  if (first) co_await vmclear(l2.vmcs);
  co_await vmptrld(l2.vmcs);
  if (mode == SwitchMode::migrate || first) {
    co_await write_vmcs(vmcs12_for(
        {.msr_bitmap = l2.msr_bitmap, .apic_access = l2.apic_access, .virtual_apic = l2.virtual_apic}));
    co_await vmlaunch();
  } else {
    co_await vmresume();
  }
  co_await expect_exit(vmx::ExitReason::kVmcall);
  if (mode == SwitchMode::migrate) {
    uint64_t current = co_await vmptrst();
    if (current != l2.vmcs) throw VmxError(fmt::format("VMPTRST {:#x}, expected {:#x}", current, l2.vmcs));
    co_await vmclear(l2.vmcs);
  }
}

cpu::GuestTask switch_to_enlightened(Gpa vp_assist, const SwitchedL2& l2) {
  const ExitInfo exits = ExitInfo::from_evmcs(l2.vmcs);
  auto expect_vmcall = [&exits]() -> cpu::GuestTask {
    vmx::ExitReason reason = co_await exits.reason();
    if (reason != vmx::ExitReason::kVmcall)
      throw VmxError(fmt::format("L2 exited with {}, expected VMCALL", vmx::exit_reason_name(reason)));
  };
  co_await load_evmcs(vp_assist, l2.vmcs);
  // No APIC-access virtualization: eVMCS v1 cannot express it.
  co_await write_evmcs(l2.vmcs, vmcs12_for({.msr_bitmap = l2.msr_bitmap, .virtual_apic = l2.virtual_apic}),
                       vmx::evmcs_enlightenment::kMsrBitmap);
  co_await vmlaunch();
  co_await expect_vmcall();
  uint64_t rip = co_await evmcs_read(l2.vmcs, vmx::field::kGuestRip);
  co_await evmcs_write(l2.vmcs, vmx::field::kGuestRip, rip + kVmcallLength);
  co_await vmresume();
  co_await expect_vmcall();
}

}  // namespace nestcache::guest
