// The nested-pages workload shared by the `nested-pages` and
// `migrate-under-l2` selftests: L1 runs one L2 that uses every page the seed
// names, and checks what L2 observes, round after round.
//
// Per round, L2 (under L1's vmcs12 with EPT, TPR shadow, APIC-access
// virtualization, virtual-interrupt delivery, posted interrupts and MSR
// bitmaps):
//   1. writes a pattern into its memory; L1 reads it back from its own view;
//   2. writes CR8 values; the processor puts each into the virtual-APIC page
//      through vmcs02's pfn, and L1 reads it back there (a mismatch is a lost
//      TPR write);
//   3. touches the APIC-access page (an APIC-access exit to L1);
//   4. reads an MSR that L1's bitmap intercepts on even rounds only (L1
//      changes its bitmap between entries; the change must be honoured);
//   5. waits for interrupts that L1's second vCPU posts through the
//      posted-interrupt descriptor (each one not received is lost).
// The four L1 pages vmcs02 points to (MSR bitmap, APIC-access, virtual-APIC,
// descriptor) each live in their own one-page memslot so that a host thread
// can migrate them and move their memslots while L2 runs.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <optional>

#include "guest/posted_interrupts.h"
#include "workloads/nested_env.h"

namespace nestcache::workloads {

struct PagesWorkloadConfig {
  int rounds = 8;
  int interrupts_per_round = 4;
  // Churn: a host thread migrates the four pages and moves their memslots
  // away and back while the workload runs.
  bool churn = false;
  // The run's watchdog; unset: run_watchdog() with kPagesRoundAllowance per
  // round.
  std::optional<std::chrono::milliseconds> timeout;
  // Called on L1 vCPU 0's thread after each round L2 completed (progress).
  std::function<void(int rounds_done)> on_round = nullptr;
};

// What one round of the workload may take before the run counts as hung: a
// round with churn under map takes about 7 ms in a release build here, and
// sanitizer builds are up to 20 times slower.
inline constexpr std::chrono::microseconds kPagesRoundAllowance{500'000};

// What L2 and L1 observed: identical for every strategy when nothing is lost.
// The vector of the i-th interrupt L1 posts in a run (0-based). The poster
// posts a round's interrupts back to back, without waiting for L2 to take
// each one, so vectors cycle through 64 values: an interrupt still pending
// when the next is posted is never merged with it (a pending vector is one
// IRR bit, and two posts of it while pending deliver once, architecturally).
inline uint8_t posted_vector(int i) { return static_cast<uint8_t>(guest::kFirstPostedVector + i % 64); }

struct PagesTranscript {
  int rounds = 0;
  int memory_mismatches = 0;
  int tpr_checks = 0;
  int lost_tpr_writes = 0;
  int apic_access_exits = 0;
  int msr_exits = 0;
  int interrupts_posted = 0;
  int interrupts_received = 0;
  uint64_t vector_sum = 0;
  uint64_t churn_operations = 0;  // migrations and memslot moves done
  int entry_retries = 0;          // entries L1 repeated after VMfail(7) under churn
};
// {"rounds": ..., "memory_mismatches": ...}: every field by its name.
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(PagesTranscript, rounds, memory_mismatches, tpr_checks, lost_tpr_writes,
                                   apic_access_exits, msr_exits, interrupts_posted, interrupts_received, vector_sum,
                                   churn_operations, entry_retries)

// The L1 word L1's vCPU 0 asks its interrupt poster with; it holds
// guest::kStopPosting once the workload's L1 program is done, so other L1
// programs sharing the VM (on vCPUs 2 and up) can poll it to end with it.
inline constexpr Gpa kPagesDoneWord = 0x80000;
// L1 memory the workload's own programs use: [0x80000, 0x82000) for its
// words and L2's data page, [kL1PagesStart, kPagesL1End) for page tables and
// its vmcs12. Programs sharing the VM keep out of both.
inline constexpr Gpa kPagesL1End = 16 << 20;

// Runs the workload on `env` (2 L1 vCPUs; any further vCPU must already
// have its L1 program). Fills `result` (counters,
// failures for a run that could not complete) and returns the transcript.
PagesTranscript run_pages_workload(NestedEnv& env, const PagesWorkloadConfig& c, SelftestResult& result);

}  // namespace nestcache::workloads
