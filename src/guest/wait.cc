// Every wait of guest code (see wait.h). A wait for a word parks the vCPU
// thread with MONITOR/MWAIT until the word's line is written, so no guest
// code spins on a core and, in modelled time, the waiter continues at the
// writer's clock. Waits for things outside guest memory (a host thread's
// progress, a memslot the VMM moves back) sleep a short while between looks.
#include "guest/wait.h"

#include <algorithm>

#include "base/check.h"

namespace nestcache::guest {

namespace ops = cpu::ops;
using cpu::GuestFn;
using cpu::GuestTask;

namespace {

// How long a guest waiting for something outside guest memory sleeps
// between two looks (real time).
constexpr uint64_t kOutsideLookNs = 20'000;
// The longest a wait for a word sleeps before it looks again (real time). A
// store wakes it at once; the bound only covers a store no monitor could see
// (a frame migrating under the waiter) with a late look instead of a hang.
constexpr uint64_t kMonitorBoundNs = 1'000'000;

// One look at the word at `gpa` in the manner `poll` names.
GuestFn<uint64_t> poll_word(Gpa gpa, Poll poll) {
  if (poll == Poll::locked) co_return co_await ops::cmpxchg64(gpa, 0, 0);
  co_return co_await ops::read64(gpa);
}

}  // namespace

GuestFn<uint64_t> wait_while_eq(Gpa gpa, uint64_t value, Poll poll) {
  for (;;) {
    uint64_t word = co_await poll_word(gpa, poll);
    if (word != value) co_return word;
    co_await ops::mwait(gpa, value, kMonitorBoundNs);
  }
}

GuestTask wait_until_eq(Gpa gpa, uint64_t value, Poll poll) {
  for (;;) {
    uint64_t word = co_await poll_word(gpa, poll);
    if (word == value) co_return;
    co_await ops::mwait(gpa, word, kMonitorBoundNs);
  }
}

GuestTask wait_until_at_least(Gpa gpa, uint64_t value) {
  for (;;) {
    uint64_t word = co_await ops::read64(gpa);
    if (word >= value) co_return;
    co_await ops::mwait(gpa, word, kMonitorBoundNs);
  }
}

GuestFn<bool> wait_until_at_least(Gpa gpa, uint64_t value, uint64_t timeout_ns) {
  uint64_t deadline = co_await ops::now() + timeout_ns;
  for (;;) {
    uint64_t word = co_await ops::read64(gpa);
    if (word >= value) co_return true;
    uint64_t now = co_await ops::now();
    if (now >= deadline) co_return false;
    co_await ops::mwait(gpa, word, std::min(deadline - now, kMonitorBoundNs));
  }
}

GuestFn<bool> wait_exchange(Gpa gpa, uint64_t expected, uint64_t desired, Gpa stop) {
  // One monitor covers both words only if they share a line.
  NC_CHECK(gpa / 64 == stop / 64);
  for (;;) {
    uint64_t stopped = co_await ops::read64(stop);
    if (stopped) co_return false;
    uint64_t old = co_await ops::cmpxchg64(gpa, expected, desired);
    if (old == expected) co_return true;
    co_await ops::mwait(gpa, old, kMonitorBoundNs);
  }
}

GuestFn<uint64_t> read_backed(Gpa gpa) {
  // The VMM moves the memslot back: no guest store tells us when.
  for (;;) {
    uint64_t word = co_await ops::read64(gpa);
    if (word != kUnbackedRead) co_return word;
    co_await back_off();
  }
}

GuestFn<uint64_t> deadline_in(uint64_t ns) { co_return co_await ops::now() + ns; }

GuestFn<uint64_t> wait_interrupt(uint64_t deadline) {
  for (;;) {
    uint64_t now = co_await ops::now();
    if (now >= deadline) co_return 0;
    // HLT completes with the vector that woke the vCPU, 0 if none.
    uint64_t vector = (co_await ops::exec(cpu::GuestOp::Hlt{})).value;
    if (vector) co_return vector;
  }
}

GuestTask delay(uint64_t ns) { co_await ops::tpause(co_await ops::now() + ns); }

GuestTask back_off() { co_await ops::mwait(kInvalidGpa, 0, kOutsideLookNs); }

GuestTask GuestLock::lock() const {
  for (;;) {
    uint64_t old = co_await ops::cmpxchg64(word_, 0, 1);
    if (old == 0) co_return;
    co_await ops::mwait(word_, old, kMonitorBoundNs);  // until unlock() writes it
  }
}

GuestTask GuestLock::unlock() const { co_await ops::cmpxchg64(word_, 1, 0); }

}  // namespace nestcache::guest
