// Every wait of guest code (see wait.h): each polls in a loop, as the
// upstream selftests' guest code does.
#include "guest/wait.h"

namespace nestcache::guest {

namespace ops = cpu::ops;
using cpu::GuestFn;
using cpu::GuestTask;

namespace {

// One poll of the word at `gpa` in the manner `poll` names; PAUSE comes
// after a poll that did not end the wait (poll_gap).
GuestFn<uint64_t> poll_word(Gpa gpa, Poll poll) {
  if (poll == Poll::locked) co_return co_await ops::cmpxchg64(gpa, 0, 0);
  co_return co_await ops::read64(gpa);
}

GuestTask poll_gap(Poll poll) {
  if (poll != Poll::tight) co_await ops::pause();
}

}  // namespace

GuestFn<uint64_t> wait_while_eq(Gpa gpa, uint64_t value, Poll poll) {
  for (;;) {
    uint64_t word = co_await poll_word(gpa, poll);
    if (word != value) co_return word;
    co_await poll_gap(poll);
  }
}

GuestTask wait_until_eq(Gpa gpa, uint64_t value, Poll poll) {
  for (;;) {
    uint64_t word = co_await poll_word(gpa, poll);
    if (word == value) co_return;
    co_await poll_gap(poll);
  }
}

GuestFn<bool> wait_until_at_least(Gpa gpa, uint64_t value, uint64_t timeout_ns) {
  uint64_t deadline = co_await ops::now() + timeout_ns;
  for (;;) {
    uint64_t word = co_await ops::read64(gpa);
    if (word >= value) co_return true;
    uint64_t now = co_await ops::now();
    if (now >= deadline) co_return false;
    co_await ops::pause();
  }
}

GuestFn<bool> wait_exchange(Gpa gpa, uint64_t expected, uint64_t desired, Gpa stop) {
  for (;;) {
    uint64_t stopped = co_await ops::read64(stop);
    if (stopped) co_return false;
    uint64_t old = co_await ops::cmpxchg64(gpa, expected, desired);
    if (old == expected) co_return true;
  }
}

GuestFn<uint64_t> read_backed(Gpa gpa) { co_return co_await wait_while_eq(gpa, kUnbackedRead); }

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

GuestTask delay(uint64_t ns) {
  uint64_t until = co_await ops::now() + ns;
  for (;;) {
    uint64_t now = co_await ops::now();
    if (now >= until) co_return;
    co_await ops::pause();
  }
}

GuestTask back_off() { co_await ops::pause(); }

GuestTask GuestLock::lock() const {
  for (;;) {
    uint64_t old = co_await ops::cmpxchg64(word_, 0, 1);
    if (old == 0) co_return;
    co_await ops::pause();
  }
}

GuestTask GuestLock::unlock() const { co_await ops::cmpxchg64(word_, 1, 0); }

}  // namespace nestcache::guest
