// The guest side of a scenario: the L1 program that executes L1 steps, and
// the program every L2 runs.
//
// Each L1 vCPU runs l1_server(): it waits in HLT, and when the runner posts
// a command into its mailbox and sends it an IPI (one per command, which the
// halt consumes, so no wake vector stays pending) it executes the command as
// guest code (VMX instructions, loads and stores, MSRs, VMWRITEs of a whole
// vmcs12), reads back what L1 would read (the VM-instruction error after a
// VMfailValid, the exit reason after a VMLAUNCH), replies and halts again.
// Everything it does goes through GuestTask operations, so the CPU model and
// NestedVmx handle it exactly as they handle any L1 hypervisor.
//
// An HLT that completes with no vector is a reflected L2 exit: the vCPU was
// put into guest mode behind L1's back (a nested-state restore) and L2 has
// exited to L1. The server reads the exit reason and files it for the
// runner's `run` step.
#pragma once

#include <atomic>
#include <chrono>
#include <deque>
#include <optional>
#include <string>
#include <vector>

#include "base/mutex.h"
#include "cpu/guest_task.h"
#include "vmx/vmcs12.h"

namespace nestcache::workloads::scenario {

// The interrupt vector the runner wakes an L1 vCPU with.
inline constexpr uint8_t kWakeVector = 0xee;
// The VMCALL number an L2 uses after one of its operations faulted, so the
// fault ends the L1 step instead of repeating forever.
inline constexpr uint64_t kL2FaultVmcall = 0xfa17;

// One L1 step, as data.
struct L1Command {
  enum class Kind { op, write_vmcs12, write_evmcs, evmcs_write, load_evmcs, enter_vmx, quit };
  Kind kind = Kind::op;
  cpu::GuestOp op = cpu::GuestOp::Yield{};
  vmx::Vmcs12 image;            // write_vmcs12, write_evmcs
  Gpa gpa = 0;                  // write_evmcs, evmcs_write, load_evmcs: the eVMCS; enter_vmx: the VMXON region
  Gpa gpa2 = 0;                 // enter_vmx: the VMCS; load_evmcs: the VP-assist page
  uint32_t enlightenments = 0;  // write_evmcs
  uint32_t field = 0;           // evmcs_write (a field the eVMCS carries)
  uint64_t value = 0;           // evmcs_write
};

// What L1 observed.
struct L1Reply {
  cpu::OpResult result;
  // After VMfailValid: the VM-instruction error field, read back with VMREAD.
  std::optional<uint64_t> error_field;
  // After a VMLAUNCH/VMRESUME that completed: exit reason and qualification,
  // read back with VMREAD (from the eVMCS when one is in use).
  std::optional<uint32_t> exit_reason;
  std::optional<uint64_t> qualification;
  std::string failed_at;  // write_vmcs12 / enter_vmx: the part that failed
};

// An L2 exit L1 saw while it was not in one of its own VMLAUNCH/VMRESUMEs.
struct SeenExit {
  uint32_t exit_reason = 0;
  uint64_t qualification = 0;
};

// The runner <-> L1 hand-off for one vCPU. The runner posts one command at
// a time and waits for its reply; L1 takes, executes and replies. Thread
// safe; abandon() wakes every waiter for good (the machine stopped).
class L1Mailbox {
 public:
  // Runner side. post() requires that no command is outstanding.
  void post(L1Command c) NC_EXCLUDES(mu_);
  // The reply, or nullopt if `timeout` passed or the mailbox was abandoned.
  std::optional<L1Reply> wait_reply(std::chrono::milliseconds timeout) NC_EXCLUDES(mu_);
  // The oldest L2 exit L1 filed, waiting up to `timeout`.
  std::optional<SeenExit> wait_exit(std::chrono::milliseconds timeout) NC_EXCLUDES(mu_);
  void abandon() NC_EXCLUDES(mu_);

  // Guest side.
  std::optional<L1Command> take() NC_EXCLUDES(mu_);
  void reply(L1Reply r) NC_EXCLUDES(mu_);
  void file_exit(SeenExit e) NC_EXCLUDES(mu_);

 private:
  Mutex mu_{LockRank::kLeaf};
  CondVar cv_;
  std::optional<L1Command> command_ NC_GUARDED_BY(mu_);
  std::optional<L1Reply> reply_ NC_GUARDED_BY(mu_);
  std::deque<SeenExit> exits_ NC_GUARDED_BY(mu_);
  bool abandoned_ NC_GUARDED_BY(mu_) = false;
};

// What L2 programs report (how many of their operations faulted), and the
// runner's way to stop an L2 that never exits: with `abort` set, the next
// operation boundary ends the program with an exception, which stops the
// machine.
struct L2Faults {
  std::atomic<uint64_t> count{0};
  std::atomic<uint32_t> last_vector{0};
  std::atomic<bool> abort{false};
};

// The L1 program of one vCPU: serves `mb` until a quit command.
cpu::GuestTask l1_server(L1Mailbox& mb);

// An L2 program: runs `ops` in a loop. An operation that faults is counted
// in `faults` and followed by VMCALL kL2FaultVmcall. Throws once
// faults.abort is set.
cpu::GuestTask l2_program(std::vector<cpu::GuestOp> ops, L2Faults& faults);

}  // namespace nestcache::workloads::scenario
