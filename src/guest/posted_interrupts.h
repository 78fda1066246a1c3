// Posting an interrupt to an L2 (SDM 29.6): what L1 KVM's
// vmx_deliver_posted_interrupt does for its nested guest.
#pragma once

#include <cstdint>

#include "cpu/guest_task.h"
#include "guest/locked_update.h"

namespace nestcache::guest {

// The vector L1 notifies a vCPU running L2 with (Linux's
// POSTED_INTR_VECTOR), and the first of the vectors the test programs post.
inline constexpr uint8_t kNotificationVector = 0xf2;
inline constexpr uint8_t kFirstPostedVector = 0x80;

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

// An L1 vCPU that posts interrupts to an L2 on request, as a device
// interrupting it would through L1 KVM.
struct InterruptPosterConfig {
  Gpa request = 0;   // L1 word: non-zero asks for a batch, kStopPosting ends the program
  Gpa desc = 0;      // the L2's posted-interrupt descriptor
  uint32_t dest_apic_id = 0;  // the L1 vCPU running the L2
  uint8_t notification_vector = 0;
  IfUnbacked unbacked = IfUnbacked::wait;
  int per_request = 1;        // interrupts per batch
  // The L1 address of L2's count of the interrupts it received: after each
  // post the poster waits until it reaches the count posted, or ack_timeout_ns.
  Gpa received = 0;
  uint64_t ack_timeout_ns = 0;
  uint8_t (*vector_of)(int index) = nullptr;  // the vector of the index-th post of the run
};
inline constexpr uint64_t kStopPosting = ~uint64_t{0};

// Waits for c.request, posts a batch, clears c.request, and again, until it
// reads kStopPosting. `posted` counts the posts of the run (read it once
// the program ended).
cpu::GuestTask interrupt_poster(InterruptPosterConfig c, int& posted);

}  // namespace nestcache::guest
