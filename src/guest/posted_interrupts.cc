#include "guest/posted_interrupts.h"

#include "guest/locked_update.h"
#include "guest/wait.h"
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

cpu::GuestTask interrupt_poster(InterruptPosterConfig c, int& posted) {
  for (;;) {
    uint64_t req = co_await wait_while_eq(c.request, 0);
    if (req == kStopPosting) co_return;
    for (int k = 0; k < c.per_request; k++) {
      uint8_t vector = c.vector_of(posted);
      posted++;
      co_await post_interrupt(c.desc, vector, c.dest_apic_id, c.notification_vector, c.unbacked);
      co_await wait_until_at_least(c.received, static_cast<uint64_t>(posted), c.ack_timeout_ns);
    }
    co_await cpu::ops::write64(c.request, 0);
  }
}

}  // namespace nestcache::guest
