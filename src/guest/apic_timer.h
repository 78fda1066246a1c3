// L1's local APIC timer (x2APIC MSRs, SDM Vol. 3A 10.5.4): the periodic tick
// a guest kernel runs on. The model's timer counts at 1 GHz, as KVM's
// emulated APIC timer does, on the clock the machine runs on (modelled or
// wall time).
#pragma once

#include <cstdint>

#include "cpu/guest_task.h"

namespace nestcache::guest {

// Programs a periodic timer: `vector` every `period_ns` nanoseconds (divide
// by 1). Each WRMSR exits to L0, which emulates the APIC.
cpu::GuestTask start_timer(uint32_t period_ns, uint8_t vector);
// Stops it (an initial count of 0).
cpu::GuestTask stop_timer();

}  // namespace nestcache::guest
