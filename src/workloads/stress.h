// The soak run (`nestcache stress`): every kind of churn the model has, at
// once, for a given time, with the detectors on and a leak check at the end.
//
// Per strategy, until --seconds have passed (a started epoch finishes), the
// run repeats epochs; if by then the scheduler has not let every churn below
// happen at least once (a save while L2 runs, a host change under the pages
// workload), up to 50 more epochs run until it has. An epoch is one VM with
// four L1 vCPUs:
//   vCPUs 0, 1  the pages workload (pages_workload.h): L2 writes memory and
//               CR8, touches the APIC-access page, reads an intercepted MSR
//               and receives posted interrupts, while its host thread
//               migrates the four vmcs02 pages and moves their memslots away
//               and back;
//   vCPUs 2, 3  L1 switching between L2 vCPUs (guest/l2_switch.h, migrate
//               mode: VMPTRLD, VMLAUNCH, VMCLEAR each turn), 8 more L2s than
//               the VM's nested-context capacity (8 per L1 vCPU), so
//               contexts are recycled, until the pages workload is done;
//   a VMM thread  migrates and discards the switched L2s' MSR-bitmap,
//               APIC-access and virtual-APIC pages (so contexts' caches,
//               attached and detached, are invalidated) and takes vCPU 0's
//               nested state mid-L2, checking that the blob decodes.
// Beside the epochs, all the time, one more thread migrates an L1 vCPU
// mid-L2 between two VMs over and over (nested_state_migration.h: save in
// the source, restore in a fresh VM, the restored run's transcript must be
// the source's). Restoring needs a VM of its own, so that churn runs in its
// own pair of VMs rather than inside the epoch's.
//
// Asserted for cache and oracle: zero stale accesses, zero lost TPR writes,
// zero lost posted interrupts, every workload round complete, every restored
// transcript right, contexts recycled. For every strategy: every run
// finished without error, and nothing leaked at the end (teardown.h). With
// map the detectors report what they see (stale accesses on pages the host
// changed are the bug the seed fixes), and that is not a failure.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include "workloads/registry.h"
#include "workloads/teardown.h"

namespace nestcache::workloads {

inline constexpr double kDefaultStressSeconds = 60;
inline constexpr double kMaxStressSeconds = 7 * 24 * 3600;
inline constexpr int kDefaultStressRounds = 40;
inline constexpr int kMaxStressRounds = 100000;

struct StressOptions {
  // Strategies to run, one after the other (default cache, oracle).
  std::vector<StrategyKind> strategies{StrategyKind::cache, StrategyKind::oracle};
  MemoryKind memory = MemoryKind::unmanaged;
  double seconds = kDefaultStressSeconds;  // per strategy, (0, kMaxStressSeconds]
  int64_t rounds = kDefaultStressRounds;   // pages-workload rounds per epoch, [1, kMaxStressRounds]
  bool verbose = false;                    // per-epoch details in the result
  Progress* progress = nullptr;            // optional display; may be null
  // Optional: once it holds true, the run ends after the epoch under way
  // (which finishes and is torn down as usual), before `seconds` are up.
  const std::atomic<bool>* stop = nullptr;
};

// EINVAL naming the option: seconds outside (0, 7 days], rounds outside
// [1, 100000], no strategy.
Status validate(const StressOptions& o);

// Runs the soak for one strategy. The result's counters are every epoch's
// summed; details hold "epochs", "seconds", "migrations", "discards",
// "memslot_moves", "nested_state_saves", "nested_state_migrations",
// "l2_vcpus", "l1_vcpus", "context_capacity", "stopped_early" (true when
// `o.stop` ended the run before its time) and "teardown" (Teardown, taken
// after every VM and thread of the run is gone). A run stopped early is
// judged like any other on the epochs it finished, except that it need not
// show every churn. A usage error (validate) comes back refused.
SelftestResult run_stress(const StressOptions& o, StrategyKind strategy);

}  // namespace nestcache::workloads
