// The L2 program of the memslot benchmark: the guest code of upstream KVM's
// memslot_perf_test (tools/testing/selftests/kvm/memslot_perf_test.c), each
// test's access pattern, and the sync area it shares with the host thread.
#pragma once

#include <atomic>
#include <cstdint>

#include "cpu/guest_task.h"

namespace nestcache::guest {

// Upstream's tests, in upstream's order.
enum class MemslotTest : uint8_t { map, unmap, unmap_chunked, move_active, move_inactive, rw };

// The values upstream's guest and host write (MEM_TEST_VAL_1 and _2).
inline constexpr uint64_t kMemslotValue1 = 0x1122334455667788;
inline constexpr uint64_t kMemslotValue2 = 0x99aabbccddeeff00;

// Upstream's struct sync_area, in the first page of L2 memory: the host sets
// start once, sets sync for each exchange (the guest takes it back to 0),
// and sets exit at the end. Ours adds moving: the move tests' guest sets it
// once its first write to its area completed, and the host starts moving
// the slot only then (their guest never syncs, and a host thread faster
// than its first faults would time moves while the guest wrote nothing).
inline constexpr Gpa kSyncStartFlag = 0, kSyncExitFlag = 8, kSyncFlag = 16, kSyncMovingFlag = 24;

struct MemslotGuestConfig {
  MemslotTest test = MemslotTest::unmap;
  Gpa sync_area = 0;        // L2 address of the sync area
  Gpa test_area = 0;        // L2 address of the test area's first page
  uint64_t test_pages = 0;  // the test area
  Gpa move_area = 0;        // move tests: where the guest writes, move_pages pages
  uint64_t move_pages = 0;
};

// The guest code of test c.test, until the host sets exit; then VMCALL
// (Call::done) forever. In rw it counts the values it reads that the host
// did not write in `bad_reads`, which must outlive the program.
cpu::GuestTask memslot_perf_guest(MemslotGuestConfig c, std::atomic<uint64_t>& bad_reads);

}  // namespace nestcache::guest
