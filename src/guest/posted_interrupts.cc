#include "guest/posted_interrupts.h"

#include "guest/locked_update.h"
#include "vmx/vmx_defs.h"

namespace nestcache::guest {

cpu::GuestTask post_interrupt(Gpa desc, uint8_t vector, uint32_t dest_apic_id, uint8_t notification_vector,
                              IfUnbacked unbacked) {
  // PIR before ON: the processor (or L0) that sees ON set must find the
  // request it announces.
  co_await locked_update(desc + vmx::pi_desc::pir_word(vector), uint64_t{1} << (vector % 64), 0, unbacked);
  co_await locked_update(desc + vmx::pi_desc::kControl, vmx::pi_desc::kOn, 0, unbacked);
  co_await cpu::ops::send_ipi(dest_apic_id, notification_vector);
}

}  // namespace nestcache::guest
