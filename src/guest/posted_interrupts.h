// Posting an interrupt to an L2 (SDM 29.6): what L1 KVM's
// vmx_deliver_posted_interrupt does for its nested guest.
#pragma once

#include <cstdint>

#include "cpu/guest_task.h"
#include "guest/locked_update.h"

namespace nestcache::guest {

// Posts `vector` to the L2 whose posted-interrupt descriptor is at `desc`
// (an L1 address): sets the vector's PIR bit, then ON, each with a locked
// update (the processor and L0 clear them while L2 runs, and a plain store
// could undo their clearing), then sends `notification_vector` to the L1
// vCPU with APIC id `dest_apic_id` — the one running that L2, which
// processes the descriptor at once, or this one, whose L0 completes the post
// in software at its next entry. `unbacked` says what to do with a
// descriptor that has no memslot: wait for the VMM to bring it back, or go
// on (the notification then makes L0 find no descriptor).
cpu::GuestTask post_interrupt(Gpa desc, uint8_t vector, uint32_t dest_apic_id, uint8_t notification_vector,
                              IfUnbacked unbacked);

}  // namespace nestcache::guest
