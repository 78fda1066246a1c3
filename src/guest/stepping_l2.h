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

// One exit of the stepping L2 as its L1 records it.
struct TranscriptEntry {
  uint64_t step = 0;    // the step L2 was on
  uint64_t reason = 0;  // basic exit reason
  uint64_t info = 0;    // exit qualification, or the posted / received vector
  uint64_t value = 0;   // L2's value of that step, read by L1
  uint64_t vtpr = 0;    // the VTPR byte of the virtual-APIC page
  bool operator==(const TranscriptEntry&) const = default;
};
// A TranscriptEntry in L1 memory: five qwords, in the order above.
inline constexpr size_t kTranscriptEntryBytes = 5 * 8;

// The L1 side: L1's exit handling for the stepping L2, which a restored L1
// runs again. Its "registers" are words in L1 memory, so a restored L1 finds
// them: the L1 address of L2's mailbox page and the step count, set before
// the first entry; it appends a TranscriptEntry per exit to a transcript in
// L1 memory, acknowledges each finished step, and posts the interrupt L2
// asks for to itself (L0 completes the post at the next entry).
struct SteppingL1Config {
  Gpa mailbox_l2 = 0;     // L2 address of the L2's mailbox
  Gpa mailbox_word = 0;   // L1 word: the mailbox page's L1 address
  Gpa steps_word = 0;     // L1 word: the number of steps
  Gpa count_word = 0;     // L1 word: transcript entries so far
  Gpa transcript = 0;     // L1 address of the transcript
  size_t max_entries = 0;
  Gpa virtual_apic = 0;   // where L1 reads the VTPR of each step
  Gpa pi_desc = 0;        // the descriptor L1 posts through
  uint32_t msr_intercepted = 0;
  // An enlightened L1: reads the exits from this eVMCS, and changes a field
  // of a clean-field group in it after each exit.
  Gpa evmcs = kInvalidGpa;
};

// Runs the stepping L2 from its first entry (VMLAUNCH if `launch`, else the
// VMRESUME a restored guest mode has in flight: then that VMRESUME is this
// program's first operation) until its final VMCALL.
cpu::GuestTask stepping_l1(SteppingL1Config c, bool launch);

}  // namespace nestcache::guest
