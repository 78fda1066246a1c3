// Scenario files: "what does KVM do when ..." written as data
// (docs/scenarios.md is the format's reference).
//
// A scenario file holds one or more cases. A case describes a VM (memory,
// memslots, L1 vCPUs, enlightened VMCS on or off, names for addresses) and
// a list of steps, each with the outcome KVM gives: memslot changes and
// guest-memory accesses by the VMM, L1 instructions (VMX instructions,
// loads, stores, MSRs), nested-state get and set, and the run of a restored
// L2. `nestcache run` parses files with parse_scenario_file(), runs each
// case with run_case() and prints the step-by-step outcome.
//
// Parsing checks the whole file before anything runs: every key, name,
// expression and expected outcome. A problem is an EINVAL Error whose
// message names the file, the case, the step and what is wrong.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "base/error.h"
#include "cpu/guest_ops.h"
#include "workloads/scenario_values.h"

namespace nestcache::workloads::scenario {

// The VM a case runs in. Every case gets a fresh one.
struct VmSpec {
  std::string memory = "unmanaged";  // frames behind the regions: managed | unmanaged
  std::string strategy = "cache";    // map | cache | oracle
  int vcpus = 1;                     // L1 vCPUs
  bool evmcs = false;                // KVM_CAP_HYPERV_ENLIGHTENED_VMCS on every vCPU
  // VMM address-space regions (HostMm::create_region), by name, in bytes.
  std::map<std::string, uint64_t> regions;
  struct Memslot {
    uint32_t slot = 0;
    uint32_t flags = 0;
    Expr gpa;
    Expr size;  // defaults to the region's size
    Expr hva;   // a region name (+ offset) or a raw address
  };
  std::vector<Memslot> memslots;
  // Names for guest-physical addresses, usable in every expression.
  std::map<std::string, uint64_t> pages;
};

// The VM a case gets when it says nothing: a 4 MiB region "ram" in memslot 0
// at gpa 0, one vCPU, the cache strategy, and the default page names
// (docs/scenarios.md lists them).
VmSpec default_vm();

enum class Verb {
  // VMM side
  set_memory_region, delete_memslot, move_memslot, set_memslot_flags, add_memslots,
  vmm_write, vmm_read, get_nested_state, set_nested_state, set_vp_assist_msr, run,
  // L1 side
  vmxon, vmxoff, vmclear, vmptrld, vmptrst, vmread, vmwrite, vmlaunch, vmresume, invept,
  invvpid, write, read, wrmsr, rdmsr, write_vmcs12, init_region, enter_vmx, init_evmcs,
  write_evmcs, evmcs_write, load_evmcs, enable_vp_assist,
};
// True for the verbs L1 guest code executes (through the vCPU's mailbox).
bool is_l1_verb(Verb v);

// A vmcs12 (or eVMCS) built from a base and field edits, in order: `set`
// assigns, `or` sets bits, `clear` clears bits.
struct Vmcs12Spec {
  std::string base = "minimal";  // minimal | zero
  struct Edit {
    char op;  // '=', '|', '&' (clear)
    uint32_t field;
    Expr value;
  };
  std::vector<Edit> edits;
};

// A nested-state blob built from scratch (vmx::encode of an image).
struct StateSpec {
  Expr vmxon;   // "invalid" for VMX off
  Expr vmcs;    // current vmcs12 or eVMCS; "invalid" for none
  bool guest_mode = false;
  bool run_pending = false;
  bool evmcs = false;
  std::optional<Vmcs12Spec> vmcs12;  // absent: no image
};

// One change to a blob before it is set.
struct Patch {
  enum class Kind { put, resize };
  Kind kind = Kind::put;
  size_t offset = 0;  // byte offset in the blob
  size_t size = 0;    // 1, 2, 4 or 8 bytes (put); new length (resize)
  Expr value;
  std::string what;   // "flags", "vmcs12.tpr_threshold", "offset 36"
};

// A check on a blob returned by get_nested_state.
struct BlobCheck {
  std::string what;
  size_t offset = 0;  // ~0: the blob's length
  size_t size = 0;
  Expr value;
};

// What a step must produce.
struct Expect {
  Outcome outcome;
  std::optional<Expr> value;          // vmread, vmptrst, read, rdmsr, vmm_read
  std::optional<Expr> qualification;  // vmlaunch / vmresume / run: the exit qualification
  std::vector<BlobCheck> checks;      // get_nested_state
  std::map<std::string, uint64_t> counters;  // counter deltas during the step
};

struct Step {
  size_t index = 0;   // 1-based, as printed
  Verb verb{};
  std::string label;  // "vmptrld gpa=vmcs", for output
  int vcpu = 0;
  std::map<std::string, Expr> operands;  // gpa, slot, value, field, ...
  std::optional<Vmcs12Spec> vmcs12;      // write_vmcs12, write_evmcs, set_nested_state.state
  std::optional<StateSpec> state;        // set_nested_state from scratch
  std::string blob;                      // set_nested_state from a saved blob
  std::string save_as;                   // get_nested_state
  std::vector<Patch> patches;            // set_nested_state
  std::vector<uint8_t> bytes;            // vmm_write of raw bytes
  Expect expect;

  // The operand `key`, which the parser guarantees for required keys.
  const Expr& operand(const std::string& key) const { return operands.at(key); }
  bool has(const std::string& key) const { return operands.count(key) != 0; }
};

struct Case {
  std::string name;
  std::string follows;      // the upstream function or SDM section
  std::string family;       // memslots | vmx-instructions | entry-checks | nested-state | nested-pages
  std::string kvm_differs;  // set: a deliberate difference (docs/kvm-differences.md)
  VmSpec vm;
  std::vector<cpu::GuestOp> l2;  // what every L2 runs, in a loop
  std::vector<Step> steps;
};

struct ScenarioFile {
  std::string path;
  std::vector<Case> cases;
};

// Parses a scenario file. EINVAL naming the file, case, step and problem;
// ENOENT/EIO when the file cannot be read.
Result<ScenarioFile> parse_scenario_file(const std::string& path);
// The same from text; `path` is only used in messages.
Result<ScenarioFile> parse_scenario_text(const std::string& text, const std::string& path);

// --- running -------------------------------------------------------------------------

struct StepResult {
  size_t index = 0;
  std::string label;
  std::string expected;  // "VMfailValid(11)", "ok, value 0x11000"
  std::string observed;
  bool ok = false;
  std::string detail;    // what the model said (error message, VM-instruction error ...)
};

struct CaseResult {
  std::string name;
  std::string follows;
  std::string family;
  std::string kvm_differs;
  std::string setup_error;  // the VM could not be built: nothing ran
  // Its errno: EINVAL when the case's VM is refused (its memslots), another
  // (ENOMEM, EMFILE, EAGAIN, ...) when a resource could not be had.
  int setup_errno = 0;
  std::vector<StepResult> steps;
  // What the VM still held once the machine stopped ("2 remap windows, 0
  // pins, 0 active caches"), "" for nothing: a failure of the case, as in
  // every selftest.
  std::string leaked;

  bool passed() const;
  size_t mismatches() const;
};

struct RunConfig {
  // How long one step may take before it counts as hung.
  std::chrono::milliseconds step_timeout{20000};
};

// Builds the case's VM, runs its steps in order on a real cpu::Machine and
// compares each outcome with the expectation. Never throws; a VM that cannot
// be built is reported in setup_error.
CaseResult run_case(const Case& c, const RunConfig& config = {});

}  // namespace nestcache::workloads::scenario
