// Set-up shared by the micro-benchmarks (bench/micro_bench.cc): the guest
// memory environment built before the timed loop, helpers that turn counter
// deltas into per-iteration benchmark counters, and the machine-wide count of
// TLB-shootdown interrupts read from /proc/interrupts.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdint>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>

#include "base/counters.h"
#include "base/error.h"
#include "support/vm_env.h"

namespace nestcache::bench {

// The guest-memory environment of tests/support (a PhysMem, a HostMm and a
// Vm with `pages` guest pages of one kind in memslot 0), with 16 spare
// frames of that kind for faults after a discard or a migration's new frame
// (the benchmarks here need none). Stale accesses abort: a benchmark that
// made one would be timing a bug, not a cost.
inline Result<std::unique_ptr<test_support::VmEnv>> bench_env(host::FrameKind kind, size_t pages) {
  return test_support::VmEnv::create({.kind = kind, .pages = pages, .spare = 16, .other_kind = 0, .stale_fatal = true});
}

// Reports `n` events spread over the run's iterations as a per-iteration
// counter named `name` (JSON and console show the average).
inline void per_iteration(benchmark::State& state, const char* name, uint64_t n) {
  state.counters[name] = benchmark::Counter(static_cast<double>(n), benchmark::Counter::kAvgIterations);
}

// The per-iteration delta of counter `c` between two snapshots.
inline void per_iteration(benchmark::State& state, Counter c, const CounterSnapshot& before,
                          const CounterSnapshot& after) {
  state.counters[std::string(counter_name(c))] =
      benchmark::Counter(static_cast<double>(after[c] - before[c]), benchmark::Counter::kAvgIterations);
}

// TLB-shootdown interrupts received so far, summed over every CPU (the "TLB:"
// line of /proc/interrupts on x86). Machine-wide: other processes' shootdowns
// count too, so a per-iteration figure from it is an upper bound on ours.
// Empty where the line does not exist.
inline std::optional<uint64_t> tlb_shootdown_interrupts() {
  std::ifstream in("/proc/interrupts");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string label;
    fields >> label;
    if (label != "TLB:") continue;
    uint64_t total = 0, n = 0;
    while (fields >> n) total += n;  // stops at the text "TLB shootdowns"
    return total;
  }
  return std::nullopt;
}

}  // namespace nestcache::bench
