#include "guest/locked_update.h"

#include "guest/wait.h"

namespace nestcache::guest {

cpu::GuestFn<uint64_t> locked_update(Gpa gpa, uint64_t set, uint64_t clear, IfUnbacked unbacked) {
  for (;;) {
    // Waiting matters: on a qword that is away the exchange below "succeeds"
    // against kUnbackedRead while its write is dropped.
    uint64_t old = unbacked == IfUnbacked::wait ? co_await read_backed(gpa) : co_await cpu::ops::read64(gpa);
    uint64_t want = (old | set) & ~clear;
    uint64_t seen = co_await cpu::ops::cmpxchg64(gpa, old, want);
    if (seen == old) co_return want;
  }
}

}  // namespace nestcache::guest
