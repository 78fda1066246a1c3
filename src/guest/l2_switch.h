// L1 switching one L1 vCPU between several L2 vCPUs, as the seed's
// vmx_l2_switch_test does (and L1 KVM does when it schedules L2 vCPUs on a
// physical CPU): the step that runs one L2 once, in each of the ways L1 can
// switch.
#pragma once

#include <vector>

#include "cpu/guest_task.h"

namespace nestcache::guest {

// One L2 vCPU among several: its vmcs12 region (an eVMCS page for an
// enlightened L1) and the pages its vmcs12 names. The region must carry the
// VMCS revision (the eVMCS version) before the first step.
struct SwitchedL2 {
  Gpa vmcs = kInvalidGpa;
  Gpa msr_bitmap = kInvalidGpa;
  Gpa apic_access = kInvalidGpa;
  Gpa virtual_apic = kInvalidGpa;
};

// `n` L2s laid out from L1 address `start`, four pages each: the vmcs12
// region, the MSR bitmap, the APIC-access page and the virtual-APIC page.
std::vector<SwitchedL2> lay_out_switched_l2s(Gpa start, int n);

// How L1 leaves an L2 after its turn.
enum class SwitchMode : uint8_t {
  migrate,  // VMCLEAR after every turn: the L2 may run on another L1 vCPU next
  sched,    // VMPTRLD + VMRESUME each turn; VMCLEAR only when it is done
};

// One turn of `l2` (whose program VMCALLs in a loop): VMCLEAR it first if
// `first` (a fresh region), VMPTRLD it, write its vmcs12 and VMLAUNCH it
// (every turn in migrate mode, the first in sched mode) or VMRESUME it,
// expect the VMCALL exit; in migrate mode check VMPTRST and VMCLEAR it.
// Throws VmxError when an instruction fails or L2 exits otherwise.
cpu::GuestTask switch_to(const SwitchedL2& l2, SwitchMode mode, bool first);

// One turn of `l2` for an enlightened L1 whose VP-assist page is at
// `vp_assist`: name l2's eVMCS in it, write the whole eVMCS (MSR-bitmap
// enlightenment on), VMLAUNCH, expect VMCALL, advance the guest RIP past it
// in the page, VMRESUME, expect VMCALL. No VMCLEAR: L0 switches because the
// eVMCS address changed.
cpu::GuestTask switch_to_enlightened(Gpa vp_assist, const SwitchedL2& l2);

}  // namespace nestcache::guest
