// NestedEnv: the set-up every nested scenario shares — host memory of the
// chosen kind, an L1 VM with its memory in memslot 0, and a Machine running
// the chosen page strategy — plus the counter and stale-access bookkeeping
// the reports need.
#pragma once

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>
#include <vector>

#include "base/check.h"
#include "cpu/machine.h"
#include "vm/pfn_cache.h"
#include "workloads/registry.h"

namespace nestcache::workloads {

struct NestedEnvConfig {
  StrategyKind strategy = StrategyKind::cache;
  MemoryKind memory = MemoryKind::unmanaged;
  int vcpus = 1;
  size_t l1_bytes = 32 << 20;       // L1's memory, memslot 0 at gpa 0
  size_t extra_frames = 1024;       // for regions scenarios add, migrations, windows
  uint64_t exit_cost_ns = 0;
  bool stale_fatal = false;         // scenarios count stale accesses instead
  bool retry_internal_errors = false;  // see cpu::MachineConfig
  // The time model (cpu::MachineConfig): benchmarks run on modelled time,
  // selftests on the wall clock their host threads share.
  cpu::ClockKind clock = cpu::ClockKind::wall;
  cpu::GuestCosts costs = {};
  // Modelled time only: the fixed cost charged per remap window; nullopt
  // charges the calibrated one (workloads/window_cost.h).
  std::optional<uint64_t> window_cost_ns = std::nullopt;
  // Idle pfn caches activated on L1's first pages before the run, held by the
  // VMM until tear_down(): more caches for the notifier to check.
  uint32_t extra_caches = 0;
};

// Copies what a benchmark run's config shares with its environment — the
// time model (exit cost, clock, guest costs, window cost) and the extra
// caches — so that each run config passes them on in one place.
template <class RunConfig>
void take_run_model(NestedEnvConfig& ec, const RunConfig& c) {
  ec.exit_cost_ns = c.exit_cost_ns;
  ec.clock = c.clock;
  ec.costs = c.costs;
  ec.window_cost_ns = c.window_cost_ns;
  ec.extra_caches = c.extra_caches;
}

// What a torn-down VM left behind (all zero when nothing leaked).
struct Leaks {
  uint64_t open_windows = 0;        // remap windows never closed
  uint64_t held_pins = 0;           // frame pins never dropped
  size_t active_caches = 0;         // pfn caches still active
  size_t attached_contexts = 0;     // nested contexts still attached when the machine went
  bool none() const { return !open_windows && !held_pins && !active_caches && !attached_contexts; }
  // "0 remap windows, 0 pins, 0 active caches, 0 attached contexts".
  std::string to_string() const;
  // No window, pin or active cache left: what every run must give back,
  // however its L1 ended. A context still attached because L1 never ran
  // VMCLEAR is not a leak: it goes with the machine, and the process-wide
  // teardown count sees one that does not. A window whose munmap kept
  // failing stays counted open here (RemapWindow), while PhysMem's
  // destructor would unmap it unseen.
  bool no_resources_left() const { return !open_windows && !held_pins && !active_caches; }
  // "0 remap windows, 0 pins, 0 active caches".
  std::string resources_to_string() const;
};

// The windows and pins `phys` has not had back and the caches of `vm` still
// active (attached_contexts left 0): what a VM holds once its machine is
// gone. NestedEnv::tear_down and `nestcache run`'s sessions both count so.
Leaks resources_left(const host::PhysMem& phys, vm::Vm& vm);

class NestedEnv {
 public:
  static Result<std::unique_ptr<NestedEnv>> create(const NestedEnvConfig& c);

  // Adds a one-page region of the configured kind as memslot `slot` at `gpa`
  // (scenarios give the pages they churn their own slots).
  Result<Hva> add_page_slot(uint32_t slot, Gpa gpa);
  // Activates `count` idle pfn caches on L1's first pages (extra_caches).
  // Errors: the activation's (ENOMEM when a window cannot be had).
  Status add_extra_caches(uint32_t count);
  // Destroys the machine (VM teardown frees the nested contexts and their
  // caches) and reports what was left: the attached contexts just before,
  // the windows, pins and active caches just after. The pool, HostMm and Vm
  // stay for reading their counters.
  Leaks tear_down();
  // The VMM's reads and writes of one qword of L1 memory (a word its
  // threads and the guest hand-shake through). A failed read gives 0.
  uint64_t read_u64(Gpa gpa) const;
  Status write_u64(Gpa gpa, uint64_t value);
  // Everything counted during the run: the machine's vCPUs and the VM.
  CounterSnapshot counters() const;
  // A run's counters, each event once (merge_run_counters): the pool's from
  // `phys`, every other one summed over `others` (the machine's, the guest's)
  // and the host's own (HostMm: migrations, discards, notifier
  // invalidations), which `others` must not hold.
  CounterSnapshot run_counters(std::span<const CounterSnapshot> others) const;
  // The same per vCPU ({"vcpu0": {...}, ...}; the VM's own events under "vm").
  nlohmann::json counters_by_vcpu() const;
  // A run's counters when the set-up counted some of its own (the activation
  // of --extra-caches): `total` less `setup`, except stale accesses, which
  // count over the whole run (none is harmless).
  static CounterSnapshot counted_since_setup(const CounterSnapshot& total, const CounterSnapshot& setup);

  NestedEnvConfig config;
  std::unique_ptr<host::PhysMem> phys;
  std::unique_ptr<host::HostMm> mm;
  std::unique_ptr<vm::Vm> vm;
  std::unique_ptr<cpu::Machine> machine;
  Hva l1_base = 0;
  std::vector<std::unique_ptr<vm::PfnCache>> extra_caches;
  uint64_t extra_cache_windows = 0;  // the remap windows their activation opened
};

// L1's memory layout for scenarios: its own page allocator starts here.
inline constexpr Gpa kL1PagesStart = 0x100000;

// The watchdog of a run (Machine::run's timeout) that does `units` units of
// work (rounds, round trips) each allowed `per_unit`: two minutes plus the
// units' allowance, so a run as long as its options allow finishes and only
// a run that stopped making progress reaches it. Saturates instead of
// overflowing.
inline std::chrono::milliseconds run_watchdog(uint64_t units, std::chrono::microseconds per_unit) {
  constexpr uint64_t kBaseMs = 120'000;
  constexpr uint64_t kMaxMs = uint64_t{1} << 40;  // decades
  uint64_t per_unit_us = static_cast<uint64_t>(per_unit.count());
  uint64_t extra_ms = per_unit_us == 0 || units <= kMaxMs * 1000 / per_unit_us ? units * per_unit_us / 1000 : kMaxMs;
  return std::chrono::milliseconds(static_cast<int64_t>(std::min(kBaseMs + extra_ms, kMaxMs)));
}

// The watchdog of a bench run that iterates `iterations` times (when > 0,
// each allowed `per_iteration`) or for `seconds` of its clock. A modelled
// millisecond is allowed a real second: it takes about 10 real milliseconds
// in a release build here and sanitizer builds are up to 20 times slower; a
// wall-clock millisecond takes one.
inline std::chrono::milliseconds bench_watchdog(double seconds, uint64_t iterations,
                                                std::chrono::microseconds per_iteration) {
  if (iterations > 0) return run_watchdog(iterations, per_iteration);
  const double ms = std::clamp(seconds * 1000, 0.0, 1e15);
  return run_watchdog(static_cast<uint64_t>(ms) + 1, std::chrono::seconds(1));
}

}  // namespace nestcache::workloads
