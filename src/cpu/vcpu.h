// cpu::Vcpu: one simulated vCPU — an OS thread running L0's loop (DESIGN.md
// §5), its local APIC, its translation caches and its modelled clock.
//
//   vcpu.cc           the loop: requests -> enter L1 or L2 (the last check
//                     before entering L2 is the vmx layer's) -> run guest
//                     operations until a VM exit -> handle it
//   exit_handlers.cc  what L0 does with each exit: L1 instructions it
//                     emulates (VMX, MSRs, HLT, IPIs), L2 exits it reflects to
//                     L1 or handles, posted interrupts completed in software
//   vmm_calls.cc      the VMM's calls into a running vCPU (nested state)
//   cpu_model.cc      the processor executing one guest operation
//
// Time: the vCPU thread owns a ModelClock. Guest operations and hardware
// transitions are charged fixed costs; everything L0 does between an exit
// and the next entry is measured (thread CPU time); a vCPU that parks takes,
// when it wakes, the clock of whoever woke it (vm::Vcpu::carry_time, the
// MonitorTable).
#pragma once

#include <chrono>
#include <functional>
#include <optional>
#include <thread>
#include <unordered_map>

#include "base/counters.h"
#include "base/model_time.h"
#include "base/mutex.h"
#include "cpu/guest_task.h"
#include "cpu/local_apic.h"
#include "host/phys_mem.h"
#include "vm/vcpu.h"
#include "vmx/nested.h"

namespace nestcache::cpu {

class Machine;

// An L2 program and what the CPU owes it: the answer its pending operation
// completes with when it next runs (after a reflected exit of an instruction
// L1 emulates, the operation completes when L1 resumes this L2). Touched only
// by the vCPU that has the L2's vmcs12 current.
struct L2Program {
  GuestTask task;
  std::optional<OpResult> answer;
};

class Vcpu final : public vm::Vcpu {
 public:
  Vcpu(Machine& m, int id);
  ~Vcpu() override;

  vmx::NestedVmx& nested() { return *nested_; }
  CounterSet& counters() { return vm::Vcpu::counters(); }

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

  // Any thread: delivers an interrupt vector to this vCPU's local APIC (an
  // x2APIC IPI); the calling thread's clock, if any, goes with it.
  void deliver_interrupt(uint8_t vector);
  // Any thread, MonitorTable: a line this vCPU monitors was written.
  void monitor_fired() { apic_.wake(); }

  // This vCPU's modelled clock. Read it on the vCPU thread, or once
  // Machine::run() has returned.
  const ModelClock& clock() const { return clock_; }

  // Test hook: runs on the vCPU thread before each entry into L2, after vmcs02
  // is built and the vCPU is in guest mode, just before the last check (seed
  // patch 3). A test lands an invalidation there (from another thread: the
  // notifier waits for this vCPU to leave guest mode). Set before run().
  void set_before_last_check_hook(std::function<void()> hook) { before_last_check_ = std::move(hook); }

 protected:
  void wake() override { apic_.wake(); }

 private:
  friend class Machine;
  friend class CpuModel;

  // --- the loop (vcpu.cc) ---------------------------------------------------------
  // The thread's body: loop() with every failure turned into the run's.
  void run_loop();
  void loop();
  // A KVM internal error (an L1 page L0 cannot reach, memory L0 cannot get):
  // counted; retried with backoff when the machine retries internal errors
  // (for at most kRetryLimit of failures in a row), else the end of the run
  // with `cause`.
  void internal_error(const std::string& cause, int code = EIO);
  // The retry part of internal_error(): false when the machine does not retry.
  bool retry_internal_error(const std::string& cause, int code);
  static constexpr std::chrono::seconds kRetryLimit{5};
  void process_requests();
  Exit run_guest();
  // The program of the current guest: L1's, or the current L2's (null if no
  // L2 program is bound to its vmcs12).
  GuestTask* current_task();
  // Starts the task if it has not run yet, and completes its pending
  // operation with the answer L0 left for it.
  void deliver_answer(GuestTask& t);
  void fail_op(GuestTask& t);

  // --- time (vcpu.cc) -------------------------------------------------------------
  // The clock guest code sees (Now, Tpause, the APIC timer): modelled or wall.
  uint64_t now_ns() const;
  // One hardware exit and entry: its cost charged (and burnt in wall time).
  void charge_transition();
  // Takes the clocks carried by whatever woke or interrupted this vCPU.
  void absorb_carried_time() { merge_carried_time(clock_); }
  // Raises the APIC timer's interrupt if it has fired by now_ns().
  void run_timer();
  // Parks the thread until an event (see LocalApic::park); `until_pending`
  // also ends it on an interrupt already pending. The deadline is the APIC
  // timer's in wall time (in modelled time a parked clock does not move; the
  // timer fires when the vCPU next runs). Takes the waker's clock on return.
  bool park(bool until_pending, std::optional<std::chrono::steady_clock::time_point> deadline = std::nullopt);

  // --- exits (exit_handlers.cc) -----------------------------------------------------
  void handle_exit(const Exit& e);
  void handle_l1_op(const GuestOp& op);
  // WRMSR/RDMSR from L1: the x2APIC (ICR, timer) and Hyper-V's VP-assist page.
  OpResult l1_wrmsr(uint32_t msr, uint64_t value);
  OpResult l1_rdmsr(uint32_t msr);
  void handle_l2_exit(const Exit& e);
  void complete_nested_entry(const vmx::EntryResult& r);
  void complete_posted_interrupts_in_software();
  // Takes the posted-interrupt notification vector out of the APIC, if it
  // arrived; true if it did.
  bool take_notification();
  // The answer L1's pending operation completes with when L1 next runs.
  void answer_l1(OpResult r) { l1_answer_ = std::move(r); }

  // --- VMM calls (vmm_calls.cc) -------------------------------------------------------
  // Runs `fn` on this vCPU's thread between two entries, out of guest mode,
  // and waits for it; if the thread is not running, runs it on the caller's
  // thread (the vCPU cannot run meanwhile). One call at a time.
  void call_on_vcpu(const std::function<void()>& fn) NC_EXCLUDES(call_mu_);
  // The vCPU thread's side: runs the pending call, if any.
  void serve_vmm_call() NC_EXCLUDES(call_mu_);
  // The vCPU thread leaves its loop: later calls run on their caller's thread.
  void stop_serving_vmm_calls() NC_EXCLUDES(call_mu_);
  // The kGetNestedStatePages request: resolve the restored vmcs12's pages
  // and bind its L2 program, or fail the entry with an internal error.
  void get_nested_state_pages();

  Machine& m_;
  std::unique_ptr<vmx::NestedVmx> nested_;
  std::thread thread_;
  GuestTask l1_;
  std::optional<OpResult> l1_answer_;
  bool stop_ = false;
  bool reflected_since_entry_ = false;
  uint64_t internal_error_streak_ = 0;  // internal errors since the last nested entry
  std::chrono::steady_clock::time_point internal_error_since_;
  L2Program* l2_ = nullptr;  // the program of the current vmcs12, in guest mode
  std::function<void()> before_last_check_;
  ModelClock clock_;
  LocalApic apic_;

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

  // VMM calls (call_on_vcpu). `call_` points at the caller's function while
  // it waits; the vCPU thread runs it without the lock and then bumps
  // `calls_done_`.
  Mutex call_mu_{LockRank::kVcpuRun};
  CondVar call_cv_;
  bool thread_running_ NC_GUARDED_BY(call_mu_) = false;
  const std::function<void()>* call_ NC_GUARDED_BY(call_mu_) = nullptr;
  uint64_t calls_done_ NC_GUARDED_BY(call_mu_) = 0;
};

}  // namespace nestcache::cpu
