// An L2 test program that uses every page L0 reaches for it, round after
// round (the nested-pages workload). Per round it
//   1. waits, when `churn` is given, until that host counter moved (the
//      host changed something since the last round);
//   2. writes pattern(r) into its mailbox's data qword pattern_slot(r) and
//      calls Call::memory (L1 reads it back from its own view);
//   3. sets CR8 to 1, 8 and 15, each followed by Call::tpr with the value
//      (L1 finds it in its virtual-APIC page);
//   4. writes the APIC-access page (an APIC-access exit);
//   5. reads `intercepted_msr` (an exit whenever L1's bitmap intercepts it);
//   6. calls Call::irq, then receives the round's interrupts (HLT, up to
//      wait_ns per interrupt), publishing the count received so far as its
//      progress word, and calls Call::irq_done.
// Interrupts count over the whole run: one that arrives after its round's
// deadline still counts; a final drain waits 100 wait_ns for the last ones.
// It ends with finish(sum of the vectors received).
#pragma once

#include <atomic>
#include <cstdint>

#include "cpu/guest_task.h"
#include "guest/mailbox.h"

namespace nestcache::guest {

struct PagesL2Config {
  Gpa mailbox = 0;      // L2 address of its mailbox page
  int rounds = 8;
  int interrupts_per_round = 4;
  Gpa apic_access = 0;  // the APIC-access page, as L2 sees it
  uint32_t intercepted_msr = 0;
  uint64_t wait_ns = 0;
  const std::atomic<uint64_t>* churn = nullptr;  // must outlive the program
};

// The pattern of round `round` and the mailbox offset it goes to.
uint64_t pages_pattern(int round);
Gpa pages_pattern_slot(int round);

cpu::GuestTask pages_l2(PagesL2Config c);

}  // namespace nestcache::guest
