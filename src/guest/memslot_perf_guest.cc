#include "guest/memslot_perf_guest.h"

#include "guest/mailbox.h"
#include "guest/wait.h"

namespace nestcache::guest {

namespace ops = cpu::ops;
using cpu::GuestFn;
using cpu::GuestTask;

namespace {

Gpa page(const MemslotGuestConfig& c, uint64_t p) { return c.test_area + p * kPageSize; }

// guest_perform_sync: a locked compare-exchange loop, no PAUSE: no exits.
// False once the host has set exit.
GuestFn<bool> guest_sync(const MemslotGuestConfig& c) {
  co_return co_await wait_exchange(c.sync_area + kSyncFlag, 1, 0, c.sync_area + kSyncExitFlag);
}

// map: the guest writes one half while the host discards the other.
GuestTask map_test(MemslotGuestConfig c) {
  const uint64_t n = c.test_pages, half = n / 2;
  for (;;) {
    for (uint64_t p = 0; p < half; p++) co_await ops::write64(page(c, p), kMemslotValue1);
    if (bool go = co_await guest_sync(c); !go) break;
    for (uint64_t p = half; p < n; p++) co_await ops::write64(page(c, p), kMemslotValue2);
    if (bool go = co_await guest_sync(c); !go) break;
  }
}

// unmap, unmap-chunked: the guest touches the first page of each half.
GuestTask unmap_test(MemslotGuestConfig c) {
  for (;;) {
    co_await ops::write64(page(c, 0), kMemslotValue1);
    if (bool go = co_await guest_sync(c); !go) break;
    co_await ops::write64(page(c, c.test_pages / 2), kMemslotValue2);
    if (bool go = co_await guest_sync(c); !go) break;
  }
}

// The move tests: the guest writes its area, which does (active) or does
// not (inactive) overlap the moved slot, until the host says exit. After its
// first write it tells the host it is moving (kSyncMovingFlag).
GuestTask move_test(MemslotGuestConfig c) {
  bool moving = false;
  for (;;) {
    uint64_t exit = co_await ops::read64(c.sync_area + kSyncExitFlag);
    if (exit) break;
    for (uint64_t p = 0; p < c.move_pages; p++) {
      co_await ops::write64(c.move_area + p * kPageSize, kMemslotValue1);
      if (!moving) co_await ops::write64(c.sync_area + kSyncMovingFlag, 1);
      moving = true;
    }
  }
}

// rw: guest and host write and check every page in turns.
GuestTask rw_test(MemslotGuestConfig c, std::atomic<uint64_t>& bad_reads) {
  for (;;) {
    for (uint64_t p = 0; p < c.test_pages; p++) co_await ops::write64(page(c, p), kMemslotValue1);
    if (bool go = co_await guest_sync(c); !go) break;
    for (uint64_t p = 0; p < c.test_pages; p++) {
      Gpa w = page(c, p) + kPageSize / 2;
      uint64_t got = co_await ops::read64(w);
      if (got != kMemslotValue2) bad_reads++;
      co_await ops::write64(w, 0);
    }
    if (bool go = co_await guest_sync(c); !go) break;
  }
}

}  // namespace

GuestTask memslot_perf_guest(MemslotGuestConfig c, std::atomic<uint64_t>& bad_reads) {
  co_await wait_while_eq(c.sync_area + kSyncStartFlag, 0, Poll::tight);
  switch (c.test) {
    case MemslotTest::map: co_await map_test(c); break;
    case MemslotTest::unmap:
    case MemslotTest::unmap_chunked: co_await unmap_test(c); break;
    case MemslotTest::move_active:
    case MemslotTest::move_inactive: co_await move_test(c); break;
    case MemslotTest::rw: co_await rw_test(c, bad_reads); break;
  }
  co_await vmcall_forever(Call::done);
}

}  // namespace nestcache::guest
