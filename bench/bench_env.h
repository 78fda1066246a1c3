// Set-up shared by the micro-benchmarks (bench/micro_bench.cc): a guest
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
#include "host/host_mm.h"
#include "host/phys_mem.h"
#include "vm/vm.h"

namespace nestcache::bench {

// A PhysMem, a HostMm and a Vm with one region of `pages` guest pages of one
// frame kind, mapped by memslot 0 at gpa 0. Stale accesses abort: a benchmark
// that made one would be timing a bug, not a cost.
struct GuestEnv {
  // `spare` extra frames of the region's kind stay free (for faults after a
  // discard or a migration's new frame; the benchmarks here need none).
  static Result<std::unique_ptr<GuestEnv>> create(host::FrameKind kind, size_t pages, size_t spare = 16) {
    auto env = std::make_unique<GuestEnv>();
    const bool managed = kind == host::FrameKind::managed;
    env->phys = NC_TRY(host::PhysMem::create({managed ? pages + spare : 0, managed ? 0 : pages + spare}));
    env->phys->set_stale_access_fatal(true);
    env->mm = std::make_unique<host::HostMm>(*env->phys);
    env->vm = std::make_unique<vm::Vm>(*env->mm, 1);
    env->base = NC_TRY(env->mm->create_region(pages * kPageSize, kind));
    NC_TRY(env->vm->set_memory_region({0, 0, 0, pages * kPageSize, env->base}));
    return env;
  }

  // Declared in construction order, so the Vm goes before the HostMm it
  // subscribes to, and the HostMm before the frames it maps.
  std::unique_ptr<host::PhysMem> phys;
  std::unique_ptr<host::HostMm> mm;
  std::unique_ptr<vm::Vm> vm;
  Hva base = 0;
};

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
