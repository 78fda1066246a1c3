// memslot_perf in nested mode (DESIGN.md §6): upstream KVM's
// memslot_perf_test run by an L1 "VMM" against one L2 vCPU, on the nested
// stack, so every discard, shootdown and EPT12 fault is a real nested round
// trip through L0's page strategy.
//
// Who runs where:
//   L1 vCPU 0  the VMM's vCPU thread: L1 KVM running the L2 vCPU. Its exit
//              handler serves EPT12 violations (map the page, allocating and
//              zeroing its backing if the VMM's own mapping is gone; retry a
//              fault that raced an invalidation), shootdown IPIs (ack through
//              an L1 memory word), flush kicks (INVEPT, then ack) and timer
//              ticks (nothing but the round trip).
//   L1 vCPU 1  the VMM's "host" thread: upstream's test loop. Discards
//              (MADV_DONTNEED) go through L1's notifier: clear the populated
//              pages, zap the ones in EPT12 (INVEPT + a waiting flush kick to
//              vCPU 0), then, if any page was populated, ONE synchronous
//              shootdown IPI to vCPU 0 per call. It also raises L1's timer
//              ticks at --l1-hz while the test runs.
//   L2         upstream's guest code: writes, and a sync page it spins on
//              with compare-exchange (no exits while it waits).
// L2 memory is split over the L2 memslots (L1 bookkeeping) as upstream splits
// it: slot 0 is reserved, the area goes over slots 1..N-1, the last slot takes
// the remainder. Every page is populated by the VMM at preparation.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "base/counters.h"
#include "base/error.h"
#include "base/model_time.h"
#include "cpu/machine.h"
#include "guest/memslot_perf_guest.h"
#include "workloads/stopwatch.h"
#include "workloads/registry.h"

namespace nestcache::workloads {

// Upstream's tests, in upstream's order (the guest code of each is the L2
// program, guest/memslot_perf_guest.h).
using guest::MemslotTest;

// "map", "unmap", "unmap-chunked", "move-active", "move-inactive", "rw".
std::string_view memslot_test_name(MemslotTest t);

struct MemslotPerfConfig {
  MemslotTest test = MemslotTest::unmap;
  StrategyKind strategy = StrategyKind::cache;
  MemoryKind memory = MemoryKind::unmanaged;
  uint32_t slots = kDefaultBenchSlots;  // upstream -s: slot 0 + slots-1 data slots
  double seconds = kDefaultBenchSeconds;  // iterate while elapsed < this (upstream -l)
  uint64_t iterations = 0;                // > 0: exactly this many instead
  uint64_t exit_cost_ns = 0;
  // Modelled time (DESIGN.md §5) unless wall: `seconds`, the iteration times
  // and the L1 timer run on it.
  cpu::ClockKind clock = cpu::ClockKind::modelled;
  cpu::GuestCosts costs = {};
  std::optional<uint64_t> window_cost_ns;  // NestedEnvConfig::window_cost_ns
  uint32_t extra_caches = 0;               // NestedEnvConfig::extra_caches
  uint32_t l1_hz = kDefaultL1Hz;  // L1 timer ticks per second (vCPU 0's APIC timer); 0: off
  double scale = 1.0;             // (0, 1]: shrinks upstream's area sizes
  bool verify = false;            // upstream -d: check the values written
  // The run's watchdog; unset: bench_watchdog() of `seconds` or `iterations`,
  // with kMemslotIterationAllowance per iteration.
  std::optional<std::chrono::milliseconds> timeout;
  // Called from the host thread after each iteration (may be empty).
  std::function<void(uint64_t iterations_done)> on_iteration = nullptr;
};

// What one iteration may take before the run counts as hung: a cold `map`
// iteration at --scale 1 takes about ten seconds here, and sanitizer builds
// are up to 20 times slower.
inline constexpr std::chrono::microseconds kMemslotIterationAllowance{600'000'000};

// The area a test works on, after --scale and the slot split.
struct MemslotLayout {
  uint64_t pages = 0;           // the whole L2 memory: 64 KiB sync/extra + test area
  uint64_t test_pages = 0;      // the test area
  uint32_t data_slots = 0;      // slots the memory is split over (upstream nslots)
  uint64_t pages_per_slot = 0;  // the last slot has the remainder on top
  // Fewer slots than asked, as the area cannot be split so (upstream
  // refuses): more slots than pages (then one page per slot), or move-active's
  // last slot too small for the half that moves (then slots that hold it).
  bool slots_capped = false;
};

// One run of one test: its timing and what happened, per phase.
struct MemslotPerfRun {
  MemslotLayout layout;
  std::vector<double> iteration_seconds;  // each iteration, in order, on the run's clock
  double loop_seconds = 0;                // upstream's guest_runtime: all iterations
  // The loop and its first iteration in modelled time, by part (the host
  // thread's clock, which the hand-shakes carry every other thread's time
  // into), and in wall time.
  LoopTime loop_time;
  LoopTime cold_time;
  // Every vCPU's own work over the whole run, by part, and the remap windows
  // it opened: their average cost in this run.
  TimeStamp work;
  uint64_t windows = 0;
  CounterSnapshot counters;               // the timed loop (L0 and L1 events)
  CounterSnapshot cold;                   // the first iteration alone
  uint64_t discard_calls = 0;             // host MADV_DONTNEED calls in the timed loop
  uint64_t cold_discard_calls = 0;        // ... in the first iteration
  uint64_t fault_retries = 0;             // EPT12 faults retried after racing a discard
  uint64_t flush_kicks = 0;               // waiting TLB-flush kicks to the L2 vCPU
  uint64_t timer_ticks = 0;               // L1 timer interrupts taken by the L2 vCPU
  std::vector<std::string> failures;      // value checks (--verify) and broken invariants

  double seconds_per_iteration() const {
    return iteration_seconds.empty() ? 0 : loop_seconds / static_cast<double>(iteration_seconds.size());
  }
};

// The layout `c` gives (no machine is built). EINVAL if the area cannot be
// split as the test needs (move-active with a last slot too small).
Result<MemslotLayout> memslot_layout(const MemslotPerfConfig& c);

// Builds the nested stack for `c`, prepares the VM (every page populated),
// runs the timed loop and tears everything down. An error means the run could
// not happen; failed checks are in the run's `failures`.
Result<MemslotPerfRun> run_memslot_perf(const MemslotPerfConfig& c);

}  // namespace nestcache::workloads
