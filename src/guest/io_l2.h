// The nested-io workload's guest side: an L2 vCPU serving requests the way
// a virtio guest does, and the device model of its L1 (DESIGN.md §6).
//
// Per request the L2 program
//   1. does `work` memory operations over its working set (a load and a
//      store per cache line, line after line);
//   2. puts the request in its ring page (a payload, then the sequence
//      number) and writes the doorbell: an MMIO register L1 maps with a
//      misconfigured EPT12 leaf, so the write exits to L0, which reflects it
//      to L1 as an EPT misconfiguration;
//   3. on one request in `msr_every`, writes IA32_TSC_DEADLINE (re-arming
//      its timer, as a tickless kernel does), which L1's MSR bitmap
//      intercepts;
//   4. takes the completion interrupt L1 posted through the posted-interrupt
//      descriptor (HLT returns it: L0 put it in the virtual IRR at entry),
//      reads the virtual-APIC state (MOV from CR8 reads the VTPR of the
//      virtual-APIC page), EOIs, and checks the completion L1 wrote;
//   5. halts until the next request arrives (HLT exits to L1).
// It ends with a VMCALL once it served `requests`.
#pragma once

#include <cstdint>

#include "cpu/guest_task.h"

namespace nestcache::guest {

// The words of one L2 vCPU's ring page (offsets); L2 writes the first ones,
// L1's device model the completion, L2 again its own tallies.
namespace io_ring {
inline constexpr Gpa kRequest = 0x00;     // L2: sequence number of the request (1, 2, ...)
inline constexpr Gpa kPayload = 0x08;     // L2: what the request carries
inline constexpr Gpa kCompletion = 0x10;  // L1: sequence number of the request completed
inline constexpr Gpa kStatus = 0x18;      // L1: io_status(payload)
inline constexpr Gpa kReceived = 0x20;    // L2: completion interrupts taken
inline constexpr Gpa kServed = 0x28;      // L2: requests finished
inline constexpr Gpa kBad = 0x30;         // L2: completions that were missing or wrong
}  // namespace io_ring

// The status the device model returns for a request carrying `payload`.
constexpr uint64_t io_status(uint64_t payload) { return payload ^ 0x10c0'ffee'0000'0001ull; }

struct IoL2Config {
  Gpa ring = 0;             // L2 address of its ring page
  Gpa work_area = 0;        // L2 address of its working set
  uint64_t work_pages = 1;  // the working set, in pages (>= 1)
  uint32_t work = 0;        // memory operations per request
  uint64_t requests = 0;    // requests to serve
  Gpa doorbell = 0;         // L2 address of the MMIO doorbell
  uint64_t queue = 0;       // what it writes to the doorbell (its queue index)
  uint32_t msr_every = 0;   // 0: never writes the MSR
  uint8_t vector = 0;       // the completion interrupt's vector
};

cpu::GuestTask io_l2(IoL2Config c);

// L1's device model for one doorbell of the L2 whose ring page is at L1
// address `ring`: completes the request in the ring (kCompletion, kStatus)
// and posts `vector` through the descriptor at `pi_desc` to the L1 vCPU
// with APIC id `apic_id` (the one running that L2). Returns the sequence
// number completed.
cpu::GuestFn<uint64_t> io_complete(Gpa ring, Gpa pi_desc, uint8_t vector, uint32_t apic_id);

}  // namespace nestcache::guest
