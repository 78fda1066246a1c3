// Every wait of guest code, in one place.
//
// Guest code shares data across vCPUs through words in guest memory and
// waits for another vCPU (or a host thread) to change one. Each such wait is
// one of the helpers below: a wait for a word MONITORs its line and MWAITs
// (cpu::GuestOp::Mwait), so the vCPU thread parks instead of spinning and, in
// modelled time, continues at the writer's clock — provided the word lies in
// memory the machine watches (cpu::Machine::watch) or the waiter armed a
// monitor before the writer wrote. The same holds for the other things guest
// code waits for: an interrupt (HLT with a deadline), time passing (TPAUSE),
// a word that is away while the VMM moves its memslot, and the back-off
// before retrying an operation another thread made fail (both sleep a short
// while between looks). Nothing outside this file's .cc waits on its own.
//
// GCC 12 coroutines: a co_await inside a loop condition is miscompiled at
// some optimisation levels, so every loop here reads into a local first.
#pragma once

#include <cstdint>

#include "cpu/guest_task.h"

namespace nestcache::guest {

// What a guest read of an address with no memslot returns: the MMIO exit
// completes it with all ones.
inline constexpr uint64_t kUnbackedRead = ~uint64_t{0};

// How a waiter looks at the word between two sleeps.
enum class Poll : uint8_t {
  pause,   // a load
  tight,   // a load (upstream's guest loops, which never exit while they wait)
  locked,  // LOCK CMPXCHG of the word with itself: a read that also orders the
           // data the writer published before the word
};

// Waits while the qword at `gpa` equals `value`; returns the new value.
cpu::GuestFn<uint64_t> wait_while_eq(Gpa gpa, uint64_t value, Poll poll = Poll::pause);
// Waits until the qword at `gpa` equals `value`.
cpu::GuestTask wait_until_eq(Gpa gpa, uint64_t value, Poll poll = Poll::pause);
// Waits until the qword at `gpa` is at least `value`, or `timeout_ns` passed
// (on the clock ops::now() reads; 0: looks once). True if it got there.
cpu::GuestFn<bool> wait_until_at_least(Gpa gpa, uint64_t value, uint64_t timeout_ns);
// The same without a time limit.
cpu::GuestTask wait_until_at_least(Gpa gpa, uint64_t value);

// Upstream's guest sync: LOCK CMPXCHG of the qword at `gpa` from `expected`
// to `desired`, retried (never exiting: upstream's guest loop spins without
// PAUSE) until it succeeds — true — or the qword at `stop` is non-zero —
// false. `stop` must share `gpa`'s 64-byte line: one monitor watches both.
cpu::GuestFn<bool> wait_exchange(Gpa gpa, uint64_t expected, uint64_t desired, Gpa stop);

// Reads a qword that may sit in a memslot the VMM is moving: waits while the
// read comes back as kUnbackedRead, and returns the first other value.
cpu::GuestFn<uint64_t> read_backed(Gpa gpa);

// A deadline `ns` from now, for wait_interrupt().
cpu::GuestFn<uint64_t> deadline_in(uint64_t ns);
// HLT until an interrupt arrives (returns its vector; the guest owes the
// EOI) or the deadline passed (returns 0). A wake-up without a vector halts
// again.
cpu::GuestFn<uint64_t> wait_interrupt(uint64_t deadline);
// Busy-waits `ns` nanoseconds (udelay).
cpu::GuestTask delay(uint64_t ns);
// The pause before retrying an operation that failed because another thread
// had changed something it needs (an entry while the VMM moves a page away).
cpu::GuestTask back_off();

// Guest code waiting for a host thread's test oracle (a counter the host
// bumps, a gate it holds): polls `pred()` with PAUSE until it holds. For
// scenarios that make sure a host change happened, never for guest state.
template <class Pred>
cpu::GuestTask wait_until_host(Pred pred) {
  for (;;) {
    if (pred()) co_return;
    co_await back_off();
  }
}

// A lock in guest memory: the qword at `word` is 0 when free, 1 when held.
// lock() spins (LOCK CMPXCHG, PAUSE) until it takes it.
class GuestLock {
 public:
  explicit GuestLock(Gpa word) : word_(word) {}
  cpu::GuestTask lock() const;
  cpu::GuestTask unlock() const;

 private:
  Gpa word_;
};

}  // namespace nestcache::guest
