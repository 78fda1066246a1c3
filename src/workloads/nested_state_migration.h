// Migrating an L1 vCPU mid-L2 across VMs with the nested-state blob: the
// pieces the `nested-state` selftest and its tests are built from.
//
// The guest: one L1 vCPU runs one L2 whose vmcs12 uses every page L0 gets
// for a nested guest (MSR bitmap, APIC-access page, virtual-APIC page with
// TPR shadow and virtual-interrupt delivery, posted-interrupt descriptor;
// the last three in one-page memslots of their own). L2 runs --steps steps;
// each computes a value into its memory, sets CR8, and ends with one exit L1
// handles: a VMCALL, an APIC-access write, an intercepted RDMSR, or a
// request for a posted interrupt which L2 then receives. L1 appends what it
// saw (exit, qualification or vector, L2's value, the VTPR in the
// virtual-APIC page) to a transcript in its memory.
//
// Migration: before step park_step() L2 parks (spins, without exits, on a
// "go" word in its memory). The VMM then takes the nested state while L2
// runs (Machine::get_nested_state kicks the vCPU out of L2), copies every
// memslot, and lets the source go on. A fresh VM gets the same memslots and
// the copied memory, the blob is restored (Machine::set_nested_state), and
// its L1 and L2 programs pick up from guest memory: a coroutine's stack is
// not in the blob, just as a real vCPU's registers are not in nested state.
// For that, the L2 program keeps its progress in its memory (the step L1
// acknowledged last), and the restored L1 program's first operation is the
// VMRESUME that the blob's guest mode has in flight.
//
// The enlightened variant (MigrationConfig::evmcs): L1 is a Hyper-V guest
// hypervisor. It names an eVMCS (alone in memslot 4) in its VP-assist page,
// writes the fields straight into the eVMCS with the MSR-bitmap
// enlightenment on, reads the exit information from the page, and after
// each exit changes one field of a clean-field group (the TSC offset) before
// its VMRESUME. eVMCS v1 has no APIC-access page and no posted interrupts,
// so its steps end with a VMCALL, a HLT, an intercepted RDMSR or an
// intercepted WRMSR (the TPR shadow and its VTPR stay). The blob then
// carries the eVMCS flag and address; the VMM also moves the VP-assist MSR
// (Machine::get/set_vp_assist_msr), and the destination vCPU enables the
// enlightened VMCS before the restore.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "guest/stepping_l2.h"
#include "workloads/nested_env.h"

namespace nestcache::workloads::nested_state {

inline constexpr Gpa kApicGpa = 0xc0000000;   // slot 1
inline constexpr Gpa kVapicGpa = 0xd0000000;  // slot 2
inline constexpr Gpa kPiPage = 0xe0000000;    // slot 3
inline constexpr Gpa kPiDesc = kPiPage + 0x40;
inline constexpr Gpa kEvmcsGpa = 0xb0000000;  // slot 4 (eVMCS variant)
inline constexpr Gpa kVpAssistGpa = 0x88000;  // L1 memory (eVMCS variant)
inline constexpr uint32_t kApicSlot = 1, kVapicSlot = 2, kPiSlot = 3, kEvmcsSlot = 4;

struct MigrationConfig {
  StrategyKind strategy = StrategyKind::cache;
  MemoryKind memory = MemoryKind::unmanaged;
  int steps = 16;  // 4..256
  // L1 uses the enlightened VMCS (the file comment's variant).
  bool evmcs = false;
  // L2 parks before this step (the migration point).
  int park_step() const { return steps / 2 + 1; }
};

// One transcript line: what L1 saw at one exit (guest/stepping_l2.h).
using guest::TranscriptEntry;
using Transcript = std::vector<TranscriptEntry>;

// The guest memory of a VM, memslot by memslot, as a VMM copies it.
struct MemoryImage {
  struct Slot {
    uint32_t slot;
    Gpa gpa;
    std::vector<std::byte> bytes;
  };
  std::vector<Slot> slots;
};

// A VM laid out for the scenario: L1 memory in slot 0, the APIC-access,
// virtual-APIC and descriptor pages in slots 1-3, the eVMCS page in slot 4
// (made in both variants, so both lay out memory alike). With c.evmcs the
// vCPU enables the enlightened VMCS (the VMM's
// KVM_CAP_HYPERV_ENLIGHTENED_VMCS). `leave_out` lists page slots not to
// create (tests of pages that cannot be resolved).
Result<std::unique_ptr<NestedEnv>> make_vm(const MigrationConfig& c, std::vector<uint32_t> leave_out = {});

// The source side. Runs the scenario from the start in a new VM; when L2
// parks, takes the nested state (if `save`) and the memory, then lets L2 go
// on to the end.
struct SourceRun {
  Status run;                    // Machine::run's result
  Transcript transcript;         // the whole run's
  std::vector<std::byte> blob;   // the state taken mid-L2 (save only)
  MemoryImage memory;            // the memory at that moment (save only)
  uint64_t vp_assist_msr = 0;    // eVMCS variant: the VP-assist MSR then (save only)
  std::vector<std::byte> final_state;  // the nested state after the run
  bool parked = false;           // L2 reached the migration point
  CounterSnapshot counters;      // the pool's (remap windows, pins, stale accesses) from PhysMem
  Leaks leaks;                   // what the VM left once torn down (a run that got to the end)
};
SourceRun run_source(const MigrationConfig& c, bool save);

// Copies `image` into `env` (each slot that exists there) and releases the
// parked L2 (the "go" word), as the VMM does before resuming a migrated VM.
Status restore_memory(NestedEnv& env, const MemoryImage& image);
// Gives `env`'s machine the programs that continue a restored run: the L2
// program bound at the restored vmcs12, and the L1 program on vCPU 0.
Status bind_restored_programs(NestedEnv& env, const MigrationConfig& c, Gpa vmcs12);
// What L1 wrote so far in `env`'s memory.
Transcript read_transcript(NestedEnv& env);

// The whole destination side: make_vm, restore_memory, set_nested_state,
// the VP-assist MSR (eVMCS variant: `vp_assist_msr`), bind_restored_programs,
// `before_run` if given (tests break something the first entry needs), run.
// Returns the run's status and transcript.
struct RestoredRun {
  Status set;
  Status run;
  Transcript transcript;
  CounterSnapshot counters;  // as SourceRun's
  std::vector<std::byte> final_state;  // the nested state after the run
  Leaks leaks;               // as SourceRun's
};
RestoredRun run_restored(const MigrationConfig& c, const MemoryImage& memory, std::span<const std::byte> blob,
                         std::vector<uint32_t> leave_out = {}, uint64_t vp_assist_msr = 0,
                         const std::function<Status(NestedEnv&)>& before_run = nullptr);

// Starts the scenario (no save) in `env` on another thread and returns once
// L2 has parked; `release()` lets it finish and returns the run's status.
class ParkedRun {
 public:
  static Result<std::unique_ptr<ParkedRun>> start(NestedEnv& env, const MigrationConfig& c);
  ~ParkedRun();
  Status release();

 private:
  explicit ParkedRun(NestedEnv& env) : env_(env) {}
  NestedEnv& env_;
  std::thread runner_;
  Status status_;
  std::atomic<bool> finished_{false};
};

// An address aligned and within the physical-address width, like the page
// after it in no memslot of a VM made by make_vm: what the malformed blobs
// (vmx::malformed_nested_states) point at to break the memslot rules.
inline constexpr Gpa kUnbacked = 0x40000000;

}  // namespace nestcache::workloads::nested_state
