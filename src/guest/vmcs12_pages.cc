#include "guest/vmcs12_pages.h"

#include "guest/locked_update.h"
#include "guest/posted_interrupts.h"
#include "vmx/entry_checks.h"
#include "vmx/vmx_defs.h"

namespace nestcache::guest {

vmx::Vmcs12 vmcs12_for(const Vmcs12Pages& p) {
  vmx::Vmcs12 v = vmx::minimal_vmcs12();
  auto secondary = [&v](uint32_t control) {
    v.primary_proc_controls |= vmx::proc::kActivateSecondaryControls;
    v.secondary_proc_controls |= control;
  };
  if (p.eptp) {
    secondary(vmx::proc2::kEnableEpt);
    v.ept_pointer = p.eptp;
  }
  if (p.msr_bitmap != kInvalidGpa) {
    v.primary_proc_controls |= vmx::proc::kUseMsrBitmaps;
    v.msr_bitmap = p.msr_bitmap;
  }
  if (p.apic_access != kInvalidGpa) {
    secondary(vmx::proc2::kVirtualizeApicAccesses);
    v.apic_access_addr = p.apic_access;
  }
  if (p.virtual_apic != kInvalidGpa) {
    v.primary_proc_controls |= vmx::proc::kUseTprShadow;
    v.virtual_apic_page_addr = p.virtual_apic;
  }
  if (p.pi_desc != kInvalidGpa || p.exit_on_interrupts) {
    v.pin_based_controls |= vmx::pin::kExternalInterruptExiting;
    v.exit_controls |= vmx::exit_ctl::kAckInterruptOnExit;
  }
  if (p.pi_desc != kInvalidGpa) {
    v.pin_based_controls |= vmx::pin::kPostedInterrupts;
    secondary(vmx::proc2::kVirtualInterruptDelivery);
    v.posted_intr_desc_addr = p.pi_desc;
    v.posted_intr_notification_vector = p.notification_vector;
  }
  return v;
}

vmx::Vmcs12 all_pages_vmcs12(uint64_t eptp, Gpa msr_bitmap, Gpa apic_access, Gpa virtual_apic, Gpa pi_desc) {
  return vmcs12_for({.eptp = eptp,
                     .msr_bitmap = msr_bitmap,
                     .apic_access = apic_access,
                     .virtual_apic = virtual_apic,
                     .pi_desc = pi_desc,
                     .notification_vector = kNotificationVector});
}

cpu::GuestTask set_msr_intercept(Gpa bitmap, uint32_t msr, bool write, bool on) {
  int64_t byte = vmx::msr_bitmap::byte_of(msr, write);
  if (byte < 0) co_return;
  Gpa at = bitmap + static_cast<Gpa>(byte);
  Gpa qword = at & ~Gpa{7};
  uint64_t bit = uint64_t{1} << (8 * (at - qword) + vmx::msr_bitmap::bit_of(msr));
  co_await locked_update(qword, on ? bit : 0, on ? 0 : bit, IfUnbacked::wait);
}

}  // namespace nestcache::guest
