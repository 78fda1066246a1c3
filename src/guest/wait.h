// Every wait of guest code, in one place.
//
// Guest code shares data across vCPUs through words in guest memory and
// waits for another vCPU (or a host thread) to change one. Each such wait is
// one of the helpers below, so the way a guest waits can change here alone —
// today each polls the word in a loop, as the upstream selftests' guest code
// does. The same holds for the other things guest code waits for: an
// interrupt (HLT with a deadline), time passing (udelay), a word that is
// away while the VMM moves its memslot, and the back-off before retrying an
// operation another thread made fail. Nothing outside this file's .cc calls
// ops::pause() or ops::now() to wait.
//
// Polling in GCC 12 coroutines: a co_await inside a loop condition is
// miscompiled at some optimisation levels, so every loop here reads into a
// local first.
#pragma once

#include <cstdint>

#include "cpu/guest_task.h"

namespace nestcache::guest {

// What a guest read of an address with no memslot returns: the MMIO exit
// completes it with all ones.
inline constexpr uint64_t kUnbackedRead = ~uint64_t{0};

// How a waiter polls a word.
enum class Poll : uint8_t {
  pause,   // a load, then PAUSE between polls
  tight,   // loads only: no PAUSE and so no exit while it waits (upstream's guest loops)
  locked,  // LOCK CMPXCHG of the word with itself, then PAUSE: a read that also
           // orders the data the writer published before the word
};

// Polls the qword at `gpa` until it differs from `value`; returns what it read.
cpu::GuestFn<uint64_t> wait_while_eq(Gpa gpa, uint64_t value, Poll poll = Poll::pause);
// Polls the qword at `gpa` until it equals `value`.
cpu::GuestTask wait_until_eq(Gpa gpa, uint64_t value, Poll poll = Poll::pause);
// Polls the qword at `gpa` until it is at least `value`, or `timeout_ns`
// passed. True if it got there.
cpu::GuestFn<bool> wait_until_at_least(Gpa gpa, uint64_t value, uint64_t timeout_ns);

// Polls the qword at `gpa` (loads, no PAUSE) until `pred(word)` holds and
// returns the word; runs `between()` — a callable returning a GuestTask,
// e.g. a timer tick the waiter owes — after each poll that failed. `pred`
// and `between` are copied into the coroutine, so lambdas capturing by
// reference are fine (they must not capture objects with destructors).
template <class Pred, class Between>
cpu::GuestFn<uint64_t> wait_until(Gpa gpa, Pred pred, Between between) {
  for (;;) {
    uint64_t word = co_await cpu::ops::read64(gpa);
    if (pred(word)) co_return word;
    co_await between();
  }
}

// Upstream's guest sync: LOCK CMPXCHG of the qword at `gpa` from `expected`
// to `desired`, retried without PAUSE (no exit while it waits) until it
// succeeds — true — or the qword at `stop` is non-zero — false.
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
