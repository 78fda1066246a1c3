// The simulated processor (DESIGN.md §5): vCPU threads running L0's loop,
// and the CPU model that executes guest operations against the VMCS the
// "hardware" is given.
//
//   Machine   one per VM: the vCPUs, the L2 programs (each belongs to its
//             vmcs12 address, so an L2 can move between L1 vCPUs), the
//             hardware view, the page strategy, the time model and the
//             MONITOR/MWAIT table.
//   Vcpu      one OS thread (cpu/vcpu.h): process requests -> enter L1 or L2
//             -> run operations until a VM exit -> handle it. The CPU model
//             (cpu_model.h) translates addresses (EPT12 in L1 memory, then
//             EPT01, with a per-vCPU translation cache), checks MSR bitmaps,
//             writes the TPR shadow and processes posted interrupts through
//             the pfns in vmcs02, checking every frame tag.
//
// Guest code drives it through GuestTask coroutines (guest_task.h): one L1
// program per vCPU (set_l1_program) and one L2 program per vmcs12 address
// (bind_l2_program). The machine runs until every L1 program returns.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <optional>
#include <memory>
#include <span>
#include <thread>
#include <unordered_map>
#include <vector>

#include "base/counters.h"
#include "base/mutex.h"
#include "cpu/guest_task.h"
#include "cpu/monitor.h"
#include "cpu/vcpu.h"
#include "vm/vm.h"
#include "vmx/nested.h"
#include "vmx/vmx_nested_contexts.h"

namespace nestcache::cpu {

// Default cost of one hardware VM exit + entry, in nanoseconds: 1,530
// cycles measured for a single-level VMCALL round trip on a Skylake-SP
// server (KVM vmexit micro-benchmark, 2020), at 2.5 GHz = 612 ns.
inline constexpr uint64_t kDefaultExitCostNs = 612;

// What a guest instruction costs in modelled time (DESIGN.md §5): what it
// would cost on the hardware the exit cost comes from (Skylake-SP, 2.5 GHz),
// not what interpreting it costs here.
struct GuestCosts {
  // Any operation not listed below: 5 cycles, the load-to-use latency of an
  // L1 data-cache hit on Skylake (Intel 64 and IA-32 Architectures
  // Optimization Reference Manual, "Cache parameters").
  uint64_t op_ns = 2;
  // A locked read-modify-write (LOCK CMPXCHG): about 20 cycles on Skylake
  // (Agner Fog's instruction tables list 18-20).
  uint64_t locked_op_ns = 8;
  // PAUSE: up to 140 cycles since Skylake (the optimization manual's "Pause
  // latency in Skylake microarchitecture").
  uint64_t pause_ns = 56;
};

// Which clock guest code reads (Now, Tpause, the APIC timer) and a run is
// timed by. Both clocks always run; see DESIGN.md §5.
enum class ClockKind : uint8_t {
  modelled,  // each vCPU's ModelClock: results measure the design
  wall,      // the steady clock; each exit also burns its cost on the CPU
};

// Issues the hardware-view capability (host::HardwareKey): only the CPU, and
// the oracle strategy it hands the view to, may reach frames without mappings.
class HardwareKeys {
 public:
  static host::HardwareView view(const host::PhysMem& mem) { return mem.hardware_view(host::HardwareKey()); }
};

struct MachineConfig {
  int vcpus = 1;
  vmx::StrategyKind strategy = vmx::StrategyKind::cache;
  uint64_t exit_cost_ns = kDefaultExitCostNs;
  // What L0's VMM does with a KVM internal error on a nested entry (an L1
  // page with no memslot): stop the run (false), or count it and run the
  // vCPU again (true), which re-executes L1's VMLAUNCH/VMRESUME — as a VMM
  // that calls KVM_RUN again after KVM_EXIT_INTERNAL_ERROR does.
  bool retry_internal_errors = false;
  GuestCosts costs = {};
  ClockKind clock = ClockKind::wall;
};

class Machine {
 public:
  // `vm` must outlive the machine; its memslots describe L1's memory.
  Machine(vm::Vm& vm, const MachineConfig& config);
  ~Machine();
  Machine(const Machine&) = delete;
  Machine& operator=(const Machine&) = delete;

  vm::Vm& vm() const { return vm_; }
  const MachineConfig& config() const { return config_; }
  int num_vcpus() const { return static_cast<int>(vcpus_.size()); }
  Vcpu& vcpu(int i) { return *vcpus_.at(i); }
  const host::HardwareView& hardware() const { return hw_; }

  // The program L1 runs on vCPU `i`.
  void set_l1_program(int i, GuestTask task);
  // The program of the L2 whose vmcs12 lives at `vmcs12` (or whose eVMCS,
  // for an enlightened L1); it runs whenever some L1 vCPU enters it.
  void bind_l2_program(Gpa vmcs12, GuestTask task) NC_EXCLUDES(l2_mu_);

  // Starts every vCPU thread and waits until every L1 program has returned,
  // or `timeout` passed, or a guest failed. Returns the first failure
  // (a guest exception, a KVM internal error, a timeout).
  Status run(std::chrono::milliseconds timeout);

  // Sends `vector` from `from` to the vCPU with APIC id `dest` (x2APIC ICR).
  void send_ipi(int from, uint32_t dest, uint8_t vector);

  // The sum of every vCPU's counters and the VM's (the VM's include
  // nested_context_reuse and nested_context_recycle).
  CounterSnapshot counters() const;

  MonitorTable& monitors() { return monitors_; }
  // Every vCPU's own work by part (ModelClock::work), summed; read it once
  // run() has returned.
  TimeStamp work() const;
  // Declares [gpa, gpa + bytes) of L1 memory as memory guest programs
  // synchronize through (MonitorTable): every access to it hands clocks
  // over, so a vCPU that finds a word another wrote continues at the
  // writer's time. Call before run(). EFAULT for a page in no memslot.
  Status watch(Gpa gpa, uint64_t bytes);
  // A host thread's store of the qword at L1 address `gpa` (8-aligned),
  // through the VMM's mapping as KVM's VMM writes guest memory, seen by any
  // vCPU that MWAITs on its line: how a VMM thread hands a word to a guest
  // that waits for it. EFAULT if `gpa` is not guest memory.
  Status store_qword(Gpa gpa, uint64_t value);

  // --- nested state (KVM_GET/SET_NESTED_STATE; vcpu_nested_state.cc) -----------
  // Both work at any time. While run() is active the vCPU thread is asked
  // (kVmmCall + kick) to leave guest mode and do the work between two
  // entries, as KVM's ioctls run with the vCPU out of KVM_RUN, and the
  // caller waits; a vCPU whose thread is not running is used directly.
  //
  // vCPU `i`'s nested state as a version-1 blob (docs/nested-state.md).
  // EINVAL for a bad vCPU index.
  Result<std::vector<std::byte>> get_nested_state(int i);
  // Restores vCPU `i`'s nested state from `blob`. Everything is validated
  // first (vmx::NestedVmx::set_nested_state: E2BIG for an oversized blob,
  // EINVAL naming the broken rule otherwise), and on error nothing changed.
  // In guest mode the vmcs12 pages are resolved by kGetNestedStatePages
  // before the next entry, which then binds the L2 program of the restored
  // vmcs12 (bind_l2_program it before run()); a page that cannot be had
  // fails that entry with a KVM internal error (run() returns it). A blob
  // with the eVMCS flag needs the vCPU's eVMCS enabled
  // (vcpu(i).nested().enable_evmcs(), before run()); the same request maps
  // the eVMCS, which the VP-assist page must name (set_vp_assist_msr), and
  // the L2 program is the one bound at the eVMCS address.
  Status set_nested_state(int i, std::span<const std::byte> blob);
  // HV_X64_MSR_VP_ASSIST_PAGE of vCPU `i`, as a VMM's KVM_GET_MSRS /
  // KVM_SET_MSRS moves it with a migrated enlightened L1 (it is not nested
  // state). Same threading as get/set_nested_state. EINVAL for a bad index,
  // a vCPU without the enlightened VMCS, or a value the MSR refuses
  // (vmx::NestedVmx::set_vp_assist_msr: reserved bits, no memslot).
  Result<uint64_t> get_vp_assist_msr(int i);
  Status set_vp_assist_msr(int i, uint64_t value);

  // The VM's nested-context table (seed patches 8-9): made for the cache and
  // oracle strategies, nullptr for map (the kernel today has none).
  vmx::VmxNestedContexts* nested_contexts() { return contexts_.get(); }

 private:
  friend class Vcpu;
  friend class CpuModel;
  L2Program* l2_program(Gpa vmcs12) NC_EXCLUDES(l2_mu_);
  void fail(std::string message) NC_EXCLUDES(done_mu_);
  void vcpu_finished() NC_EXCLUDES(done_mu_);

  vm::Vm& vm_;
  MachineConfig config_;
  host::HardwareView hw_;
  // Declared before vcpus_: every vCPU's NestedVmx refers to it, so it is
  // destroyed after them (its contexts are freed earlier, in ~Machine).
  std::unique_ptr<vmx::VmxNestedContexts> contexts_;
  MonitorTable monitors_;
  std::vector<std::unique_ptr<Vcpu>> vcpus_;

  Mutex l2_mu_{LockRank::kLeaf};
  std::map<Gpa, std::unique_ptr<L2Program>> l2_programs_ NC_GUARDED_BY(l2_mu_);

  Mutex done_mu_{LockRank::kLeaf};
  CondVar done_cv_;
  int running_ NC_GUARDED_BY(done_mu_) = 0;
  std::string failure_ NC_GUARDED_BY(done_mu_);
};

}  // namespace nestcache::cpu
