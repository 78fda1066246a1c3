// The simulated processor (DESIGN.md §5): vCPU threads running L0's loop,
// and the CPU model that executes guest operations against the VMCS the
// "hardware" is given.
//
//   Machine   one per VM: the vCPUs, the L2 programs (each belongs to its
//             vmcs12 address, so an L2 can move between L1 vCPUs), the
//             hardware view, the page strategy and the exit-cost model.
//   Vcpu      one OS thread: process requests -> enter L1 or L2 -> run
//             operations until a VM exit -> handle it (run_loop.cc). The CPU
//             model (execute.cc) translates addresses (EPT12 in L1 memory,
//             then EPT01, with a per-vCPU translation cache), checks MSR
//             bitmaps, writes the TPR shadow and processes posted interrupts
//             through the pfns in vmcs02, checking every frame tag.
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
#include "vm/vm.h"
#include "vmx/nested.h"
#include "vmx/vmx_nested_contexts.h"

namespace nestcache::cpu {

// Default cost of one hardware VM exit + entry, in nanoseconds: 1,530
// cycles measured for a single-level VMCALL round trip on a Skylake-SP
// server (KVM vmexit micro-benchmark, 2020), at 2.5 GHz = 612 ns.
inline constexpr uint64_t kDefaultExitCostNs = 612;

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
};

class Machine;

// An L2 program and what the CPU owes it: after a reflected exit of an
// instruction L1 emulates (VMCALL, an MSR access, an APIC access...), the
// operation completes when L1 resumes this L2. Touched only by the vCPU that
// has the L2's vmcs12 current.
struct L2Program {
  GuestTask task;
  bool complete_pending = false;
  uint64_t complete_value = 0;
};

class Vcpu final : public vm::Vcpu {
 public:
  Vcpu(Machine& m, int id);
  ~Vcpu() override;

  vmx::NestedVmx& nested() { return *nested_; }

  // What stopped the operations of one guest-mode episode.
  struct Exit {
    enum class Kind {
      none,          // the guest is done
      kick,          // a request or kick: L0 business only
      ept01_miss,    // L0 fills EPT01 and retries the operation
      l1_op,         // an L1 operation L0 emulates (VMX instruction, MSR, HLT...)
      l2,            // an L2 exit: reflected to L1 or handled by L0
      halt,          // the guest waits for an interrupt
      pi_software,   // a posted-interrupt notification L0 completes in software
    };
    Kind kind = Kind::none;
    Gfn gfn = 0;             // ept01_miss
    bool write = false;      // ept01_miss: the access writes (a read-only slot refuses it)
    vmx::ExitInfo info;      // l2
    uint32_t msr = 0;        // l2 MSR exits
    bool complete_op = false;  // l2: the exiting operation is done once L2 resumes
  };
  CounterSet& counters() { return vm::Vcpu::counters(); }
  // Delivers an interrupt vector to this vCPU's local APIC (x2APIC IPI).
  void deliver_interrupt(uint8_t vector);
  // Test hook: runs on the vCPU thread before each entry into L2, after vmcs02
  // is built and the vCPU is in guest mode, just before the last check (seed
  // patch 3). A test lands an invalidation there (from another thread: the
  // notifier waits for this vCPU to leave guest mode). Set before run().
  void set_before_last_check_hook(std::function<void()> hook) { before_last_check_ = std::move(hook); }

 protected:
  void wake() override;

 private:
  friend class Machine;
  friend class CpuModel;
  void run_loop();

  void process_requests();
  Exit run_guest();
  void handle_exit(const Exit& e);
  void handle_l1_op(const GuestOp& op);
  void handle_l2_exit(const Exit& e);
  void complete_nested_entry(const vmx::EntryResult& r);
  void complete_posted_interrupts_in_software();
  // VMM calls (vcpu_nested_state.cc): runs `fn` on this vCPU's thread
  // between two entries, out of guest mode, and waits for it; if the thread
  // is not running, runs it on the caller's thread (the vCPU cannot run
  // meanwhile). One call at a time.
  void call_on_vcpu(const std::function<void()>& fn) NC_EXCLUDES(call_mu_);
  // The vCPU thread's side: runs the pending call, if any.
  void serve_vmm_call() NC_EXCLUDES(call_mu_);
  // The vCPU thread leaves its loop: later calls run on their caller's thread.
  void stop_serving_vmm_calls() NC_EXCLUDES(call_mu_);
  // The kGetNestedStatePages request: resolve the restored vmcs12's pages
  // and bind its L2 program, or fail the entry with an internal error.
  void get_nested_state_pages();
  // Takes the posted-interrupt notification vector out of the APIC, if it
  // arrived; true if it did.
  bool take_notification();
  // The highest pending L1 interrupt other than `except` (-1: none).
  std::optional<uint8_t> take_l1_interrupt(int except = -1);
  // Blocks until an interrupt, request or kick arrives; with a timeout,
  // returns false if it passed first.
  bool block_until_event(std::chrono::microseconds timeout = std::chrono::microseconds::max());
  void fail_op(GuestTask& t);
  void burn_transition();
  GuestTask* current_task();

  Machine& m_;
  std::unique_ptr<vmx::NestedVmx> nested_;
  std::thread thread_;
  GuestTask l1_;
  bool l1_done_ = false;
  bool stop_ = false;
  bool reflected_since_entry_ = false;
  L2Program* l2_ = nullptr;  // the program of the current vmcs12, in guest mode
  std::function<void()> before_last_check_;

  // Translation caches (the vCPU's TLB): EPT01 and EPT02 (= EPT12 + EPT01).
  struct Tlb02Entry {
    host::FrameTag tag;
    Gfn l1_gfn;
  };
  struct Tlb01Entry {
    host::FrameTag tag;
    bool writable = true;  // false for a read-only memslot: writes fault to L0
  };
  std::unordered_map<Gfn, Tlb01Entry> tlb01_;
  std::unordered_map<Gfn, Tlb02Entry> tlb02_;
  Gpa tlb02_eptp_ = kInvalidGpa;
  std::unordered_map<uint32_t, uint64_t> l2_msrs_;  // MSRs L2 reaches without L1
  uint64_t l2_cr8_ = 0;

  // Local APIC and wake-up.
  Mutex apic_mu_{LockRank::kLeaf};
  CondVar apic_cv_;
  uint64_t l1_irr_[4] NC_GUARDED_BY(apic_mu_) = {};
  bool woken_ NC_GUARDED_BY(apic_mu_) = false;
  std::atomic<bool> irq_arrived_{false};  // an interrupt reached l1_irr_ since last looked

  // VMM calls (call_on_vcpu). `call_` points at the caller's function while
  // it waits; the vCPU thread runs it without the lock and then bumps
  // `calls_done_`.
  Mutex call_mu_{LockRank::kVcpuRun};
  CondVar call_cv_;
  bool thread_running_ NC_GUARDED_BY(call_mu_) = false;
  const std::function<void()>* call_ NC_GUARDED_BY(call_mu_) = nullptr;
  uint64_t calls_done_ NC_GUARDED_BY(call_mu_) = 0;
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
  std::vector<std::unique_ptr<Vcpu>> vcpus_;

  Mutex l2_mu_{LockRank::kLeaf};
  std::map<Gpa, std::unique_ptr<L2Program>> l2_programs_ NC_GUARDED_BY(l2_mu_);

  Mutex done_mu_{LockRank::kLeaf};
  CondVar done_cv_;
  int running_ NC_GUARDED_BY(done_mu_) = 0;
  std::string failure_ NC_GUARDED_BY(done_mu_);
};

}  // namespace nestcache::cpu
