// The vmcs12 L1 gives an L2 vCPU, from the pages it hands it (DESIGN.md §4:
// the MSR bitmap, APIC-access page, virtual-APIC page and posted-interrupt
// descriptor L0 reaches through its page strategy on every nested entry),
// and L1's control of one of them, the MSR bitmap.
#pragma once

#include <cstdint>

#include "cpu/guest_task.h"
#include "vmx/vmcs12.h"

namespace nestcache::guest {

// The pages of one L2's vmcs12 and the features they turn on. An address
// left kInvalidGpa (an EPT pointer left 0) leaves its feature off.
struct Vmcs12Pages {
  uint64_t eptp = 0;                // EPT (secondary controls)
  Gpa msr_bitmap = kInvalidGpa;     // MSR bitmaps
  Gpa apic_access = kInvalidGpa;    // APIC-access virtualization (secondary controls)
  Gpa virtual_apic = kInvalidGpa;   // TPR shadow
  // Posted interrupts, with virtual-interrupt delivery, external-interrupt
  // exiting and acknowledge-interrupt-on-exit; needs `virtual_apic`.
  Gpa pi_desc = kInvalidGpa;
  uint8_t notification_vector = 0;  // with pi_desc
  // External-interrupt exiting and acknowledge-interrupt-on-exit without
  // posted interrupts (L1 takes its own interrupts while L2 runs).
  bool exit_on_interrupts = false;
};

// vmx::minimal_vmcs12() with the controls and addresses of `p`.
vmx::Vmcs12 vmcs12_for(const Vmcs12Pages& p);

// The profile of an L2 that uses every page L0 reaches on each entry: EPT
// (`eptp`), the MSR bitmap, APIC-access virtualization, the TPR shadow, and
// posted interrupts notified with kNotificationVector.
vmx::Vmcs12 all_pages_vmcs12(uint64_t eptp, Gpa msr_bitmap, Gpa apic_access, Gpa virtual_apic, Gpa pi_desc);

// Makes L2's RDMSR (`write` false) or WRMSR of `msr` exit to L1 (`on`) or
// not, in the MSR bitmap at `bitmap`, with a locked update: L0 may be
// reading the bitmap for an entry at the same time, and the VMM may be
// moving its memslot. An MSR no bitmap covers always exits: nothing to do.
cpu::GuestTask set_msr_intercept(Gpa bitmap, uint32_t msr, bool write, bool on);

}  // namespace nestcache::guest
