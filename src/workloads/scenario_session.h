// One running scenario case: its VM, its machine and the runner's side of
// every step (scenario_run.cc: lifecycle and L1 steps; scenario_vmm.cc: the
// VMM's steps). Internal to the scenario runner; scenario.h is the API.
//
// The machine runs on its own thread for the whole case (cpu::Machine::run)
// with one l1_server per vCPU. The runner thread executes the steps in
// order: a VMM step calls the public API directly (vm::Vm memslots and guest
// memory, cpu::Machine nested state and VP-assist MSR), an L1 step is posted
// to the vCPU's mailbox and answered by guest code.
#pragma once

#include <map>
#include <memory>
#include <thread>
#include <vector>

#include "cpu/machine.h"
#include "host/host_mm.h"
#include "workloads/scenario.h"
#include "workloads/scenario_l1.h"

namespace nestcache::workloads::scenario {

// What a step produced, before it is compared with the expectation.
struct Observation {
  Outcome outcome;
  std::optional<uint64_t> value;
  std::optional<uint64_t> qualification;
  std::vector<std::byte> blob;  // get_nested_state
  std::string detail;           // the model's message, for people
  std::string problem;          // an inconsistency found while observing
};

class Session {
 public:
  // Builds the VM (regions, memslots), the machine (vCPUs, eVMCS, L2
  // programs for every address the case names) and starts it. EINVAL with
  // the reason when the VM description cannot be built.
  static Result<std::unique_ptr<Session>> start(const Case& c, const RunConfig& config);
  // Stops the machine (every L1 program quits) and tears the VM down.
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Executes one step and judges it.
  StepResult run_step(const Step& s);
  // After the last step: stops the machine and returns what it left that it
  // should have given back (remap windows, pins, active caches), or "" for
  // nothing. A window whose munmap kept failing stays counted open here,
  // while PhysMem's destructor would unmap it unseen.
  std::string tear_down();

 private:
  Session(const Case& c, const RunConfig& config) : case_(c), config_(config) {}
  Status build();
  void bind_l2_programs();
  void stop_machine();
  bool machine_done() NC_EXCLUDES(done_mu_);
  // "machine stopped: ..." or internal_error, for a step that needs L1.
  Observation stopped_observation() NC_EXCLUDES(done_mu_);

  uint64_t eval(const Expr& e) const { return e.eval(regions_); }
  uint64_t operand(const Step& s, const std::string& key, uint64_t def) const {
    return s.has(key) ? eval(s.operand(key)) : def;
  }
  uint64_t page(const std::string& name) const { return case_.vm.pages.at(name); }
  vmx::Vmcs12 build_vmcs12(const Vmcs12Spec& spec) const;

  // L1 steps (scenario_run.cc).
  Observation l1_step(const Step& s);
  Observation post_and_wait(int vcpu, L1Command cmd);
  Observation run_restored(const Step& s);

  // VMM steps (scenario_vmm.cc).
  Observation vmm_step(const Step& s);
  Observation memslot_step(const Step& s);
  Observation add_memslots(const Step& s);
  Observation guest_memory_step(const Step& s);
  Observation get_nested_state(const Step& s);
  Observation set_nested_state(const Step& s);
  Result<std::vector<std::byte>> blob_for(const Step& s);

  const Case& case_;
  RunConfig config_;
  std::unique_ptr<host::PhysMem> phys_;
  std::unique_ptr<host::HostMm> mm_;
  std::unique_ptr<vm::Vm> vm_;
  std::map<std::string, Hva> regions_;  // region name -> hva
  L2Faults l2_faults_;                  // outlives machine_ (its L2 programs report here)
  std::vector<std::unique_ptr<L1Mailbox>> mailboxes_;
  std::unique_ptr<cpu::Machine> machine_;
  std::thread machine_thread_;
  std::map<std::string, std::vector<std::byte>> blobs_;  // saved by get_nested_state

  Mutex done_mu_{LockRank::kLeaf};
  bool done_ NC_GUARDED_BY(done_mu_) = false;
  Status status_ NC_GUARDED_BY(done_mu_);
};

// Compares an observation with a step's expectation.
StepResult judge(const Step& s, const Observation& o, const std::map<std::string, Hva>& regions,
                 const std::map<std::string, uint64_t>& counter_deltas);

}  // namespace nestcache::workloads::scenario
