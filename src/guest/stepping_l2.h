// An L2 test program that can be migrated mid-run: numbered steps, each of
// which computes a value into L2's memory, sets CR8 (the TPR shadow puts it
// in the virtual-APIC page) and ends with one exit L1 handles, of four kinds
// in turn:
//   step % 4 == 0  VMCALL (Call::step)
//   step % 4 == 1  a write to the APIC-access page (an APIC-access exit),
//                  or with `hlt_and_wrmsr` a HLT (HLT exiting)
//   step % 4 == 2  RDMSR of an MSR L1's bitmap lets through, then of one it
//                  intercepts
//   step % 4 == 3  a request for a posted interrupt (Call::irq), which L2
//                  then waits for and reports (Call::irq_done); or with
//                  `hlt_and_wrmsr` an intercepted WRMSR
// Its progress lives in its mailbox (guest/mailbox.h): it publishes the step
// it is on and resumes after the last step L1 acknowledged, so a program
// started afresh on a restored VM picks up where the saved one was (a
// coroutine's stack is not in the nested state, as a vCPU's registers are
// not). Before `park_step` it parks — spins without exits — until the word
// user(kGoWord) of its mailbox is set, and says so in user(kParkedWord).
#pragma once

#include <cstdint>

#include "cpu/guest_task.h"
#include "guest/mailbox.h"

namespace nestcache::guest {

struct SteppingL2Config {
  Gpa mailbox = 0;       // L2 address of its mailbox page; step i's value is data(i)
  int steps = 16;
  int park_step = 0;     // 0: never parks
  bool hlt_and_wrmsr = false;  // steps 1 and 3 without APIC-access page or posted interrupts
  Gpa apic_access = 0;   // the APIC-access page, as L2 sees it
  uint32_t msr_passthrough = 0;
  uint32_t msr_intercepted = 0;
  uint64_t interrupt_wait_ns = 0;  // how long step 3 waits for its interrupt
};

// The mailbox words the VMM parks the program with (Mailbox::user indices).
inline constexpr unsigned kParkedWord = 0, kGoWord = 1;

cpu::GuestTask stepping_l2(SteppingL2Config c);

}  // namespace nestcache::guest
