// The L1<->L2 mailbox: how an L2 test program asks its L1 for something and
// tells it what it saw.
//
// The mailbox is one page of L2 memory that L1 maps (EPT12) onto a page of
// its own. To make a call, L2 stores the call's argument, then the call,
// then executes VMCALL with the call as its number; L1, handling the VMCALL
// exit, reads both from its own view of the page. Two more words carry
// progress that outlives a call: L2's (how far it got: the step it is on,
// the interrupts it received) and L1's acknowledgement. A scenario keeps its
// own words in the rest of the page (user(), data()).
#pragma once

#include <cstdint>

#include "cpu/guest_task.h"

namespace nestcache::guest {

// What L2 asks for. The values are the VMCALL numbers.
enum class Call : uint64_t {
  none = 0,  // a bare VMCALL: an exit L1 only resumes from
  done,      // L2 is finished (the argument: its result)
  step,      // one step of the program is over
  memory,    // check the pattern L2 wrote into its memory
  tpr,       // check the TPR L2 set (the argument: what it set)
  irq,       // post interrupts to me now
  irq_done,  // the interrupts arrived (the argument: what L2 received)
};

class Mailbox {
 public:
  // Word offsets in the page.
  static constexpr Gpa kCall = 0x00;      // L2 -> L1: the Call
  static constexpr Gpa kArg = 0x08;       // L2 -> L1: its argument
  static constexpr Gpa kProgress = 0x10;  // L2 -> L1: how far L2 got
  static constexpr Gpa kAck = 0x18;       // L1 -> L2: what L1 acknowledged
  static constexpr Gpa kUser = 0x20;      // scenario words, up to kData
  static constexpr Gpa kData = 0x100;     // scenario data, to the end of the page

  // The page at L2 address `l2` that EPT12 maps onto L1 address `l1`. L2
  // programs use only the L2 side; L1 only the L1 side.
  Mailbox(Gpa l2, Gpa l1) : l2_(l2), l1_(l1) {}

  Gpa l2_address(Gpa offset) const { return l2_ + offset; }
  Gpa l1_address(Gpa offset) const { return l1_ + offset; }
  // Scenario word `i` (below kData) and data qword `i`, as offsets.
  static constexpr Gpa user(unsigned i) { return kUser + 8 * Gpa{i}; }
  static constexpr Gpa data(uint64_t i) { return kData + 8 * i; }

  // --- L2 side ---
  // Stores `arg`, then `c`, then VMCALL(c); returns once L1 resumed L2.
  cpu::GuestTask call(Call c, uint64_t arg = 0) const;
  // call(done, result), repeated forever: L1 ends the run at the first.
  cpu::GuestTask finish(uint64_t result = 0) const;
  // Publishes L2's progress word.
  cpu::GuestTask report_progress(uint64_t value) const;

  // --- L1 side ---
  // The call and argument L2 made (after a VMCALL exit).
  cpu::GuestFn<Call> read_call() const;
  cpu::GuestFn<uint64_t> read_arg() const;
  cpu::GuestFn<uint64_t> read_progress() const;
  cpu::GuestTask acknowledge(uint64_t value) const;

 private:
  Gpa l2_;
  Gpa l1_;
};

// An L2 that only executes VMCALL(c), forever: each entry of L1's is one
// exit (the L2 of the VMX-instruction and L2-switch scenarios).
cpu::GuestTask vmcall_forever(Call c = Call::none);

}  // namespace nestcache::guest
