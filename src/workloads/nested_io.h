// nested-io: a representative nested workload (`nestcache bench --tests
// nested-io`). L2 vCPUs serve requests as a virtio guest does (the L2 side
// and L1's device model: guest/io_l2.h); L1 KVM runs them, several per L1
// vCPU if asked, and schedules them:
//
//   - each L2 vCPU gets requests at rate/l2_vcpus per second of modelled
//     time, as a Poisson process (a fixed seed per L2: runs repeat), the
//     first ones staggered by 1/rate; a request that arrives while its L2 is
//     still busy waits (an open-loop load: past saturation requests/s is the
//     capacity);
//   - an L2 that halts with nothing left to take is idle until its next
//     request: L1 runs another of its L2s whose request has arrived
//     (VMPTRLD + VMRESUME, the nested contexts' case), or idles itself until
//     the earliest arrival (taking its own timer ticks meanwhile, which cost
//     no nested round trip);
//   - L1's timer ticks at l1_hz on every L1 vCPU; a tick while L2 runs is an
//     external-interrupt exit reflected to L1.
// The vmcs12 of each L2 names all four pages L0 reaches on every nested
// entry (MSR bitmap, APIC-access, virtual-APIC, posted-interrupt
// descriptor), so the page strategy decides what every round trip costs.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "workloads/options.h"
#include "workloads/results.h"
#include "workloads/stopwatch.h"

namespace nestcache::workloads {

struct NestedIoConfig {
  StrategyKind strategy = StrategyKind::cache;
  MemoryKind memory = MemoryKind::unmanaged;
  IoOptions io = {};
  uint64_t requests_per_l2 = 100;  // each L2 vCPU serves this many
  uint32_t l1_hz = kDefaultIoL1Hz;  // 0: no ticks
  uint64_t exit_cost_ns = 0;
  cpu::ClockKind clock = cpu::ClockKind::modelled;
  cpu::GuestCosts costs = {};
  std::optional<uint64_t> window_cost_ns;  // NestedEnvConfig::window_cost_ns
  uint32_t extra_caches = 0;               // NestedEnvConfig::extra_caches
  // Called on the L1 vCPU 0 thread after each of its requests (progress).
  std::function<void(uint64_t served)> on_request = nullptr;
};

// What one L1 vCPU counted while it ran its L2s.
struct IoVcpuTally {
  uint64_t requests = 0;       // requests its L2s served (each L2's kServed)
  uint64_t received = 0;       // completion interrupts its L2s took
  uint64_t bad = 0;            // completions its L2s found missing or wrong
  uint64_t doorbells = 0;      // MMIO doorbell exits (EPT misconfigurations)
  uint64_t posted = 0;         // completion interrupts posted
  uint64_t msr_exits = 0;      // intercepted WRMSRs
  uint64_t nested_ticks = 0;   // L1 timer ticks that interrupted an L2
  uint64_t idle_ticks = 0;     // ... that came while L1 idled
  uint64_t idle_halts = 0;     // HLT exits of an L2 with nothing left to take
  uint64_t waiting_halts = 0;  // HLT exits of an L2 waiting for its completion
  uint64_t switches = 0;       // VMPTRLDs of another L2
  uint64_t elapsed_ns = 0;     // the loop on the machine's clock (Now)
  uint64_t idle_ns = 0;        // ... of it paused waiting for requests (wall clock only: modelled time has its idle part)
  LoopTime loop;               // the loop, modelled by part and wall
  LoopTime cold;               // up to its first L2's first request served
};

struct NestedIoRun {
  std::vector<IoVcpuTally> vcpus;  // per L1 vCPU
  CounterSnapshot counters;
  std::vector<std::string> failures;

  IoVcpuTally total() const;           // the sums (elapsed: the longest)
  TimeStamp loop_sum() const;          // every vCPU's loop, added part by part
};

// Builds the machine (l1_vcpus vCPUs), runs every L2 to its last request and
// checks what the run must show whatever the timing: every request served,
// exactly one completion interrupt posted and taken per request, none
// wrong, one doorbell exit per request. Failed checks go into failures; an
// error means the run could not happen.
Result<NestedIoRun> run_nested_io(const NestedIoConfig& c);

// nested-io's comparison of strategies, from its bench rows: per strategy
// {cost_per_request_ns, round_trips_per_request,
// overhead_over_oracle_percent (with an oracle row)}.
nlohmann::json nested_io_comparison(std::span<const BenchRow> rows);

}  // namespace nestcache::workloads
