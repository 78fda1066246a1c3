// Running scenario cases on a real machine: outcomes are observed, not
// assumed, so a wrong expectation is a mismatch and a VM that cannot be
// built is a setup error.
#include <gtest/gtest.h>

#include "workloads/scenario.h"

namespace nestcache::workloads::scenario {
namespace {

CaseResult run_one(const std::string& case_json) {
  auto f = parse_scenario_text(case_json, "t.json");
  EXPECT_TRUE(f) << f.error().message;
  if (!f) return {};
  return run_case(f->cases.at(0));
}

std::string describe(const CaseResult& r) {
  std::string s = r.setup_error;
  for (const StepResult& st : r.steps)
    s += fmt::format("\n{} {}: {} (expected {}) {}", st.index, st.label, st.observed, st.expected, st.detail);
  return s;
}

TEST(ScenarioRun, VmxInstructionsAndAnL2RoundTrip) {
  CaseResult r = run_one(R"J({"name": "x", "follows": "t", "steps": [
      {"do": "vmxoff", "expect": "#UD"},
      {"do": "init_region", "gpa": "vmxon"},
      {"do": "vmxon", "gpa": "vmxon"},
      {"do": "vmread", "field": "guest_rip", "expect": "VMfailInvalid"},
      {"do": "init_region", "gpa": "vmcs"},
      {"do": "vmptrld", "gpa": "vmcs"},
      {"do": "vmptrst", "value": "vmcs"},
      {"do": "vmptrld", "gpa": "vmxon", "expect": "VMfailValid(10)"},
      {"do": "write_vmcs12", "set": {"guest_rip": "0x4000"}},
      {"do": "vmread", "field": "guest_rip", "value": "0x4000"},
      {"do": "vmlaunch", "expect": "exit(VMCALL)", "counters": {"nested_entries": 1, "reflected_exits": 1}},
      {"do": "vmlaunch", "expect": "VMfailValid(4)"},
      {"do": "vmresume", "expect": "exit(VMCALL)"}]})J");
  EXPECT_TRUE(r.passed()) << describe(r);
  EXPECT_EQ(r.steps.size(), 13u);
}

TEST(ScenarioRun, AWrongExpectationIsAMismatchWithWhatWasSeen) {
  CaseResult r = run_one(R"J({"name": "x", "follows": "t", "steps": [
      {"do": "enter_vmx"},
      {"do": "vmptrld", "gpa": "vmxon", "expect": "ok"},
      {"do": "vmread", "field": "guest_rip", "value": 7}]})J");
  EXPECT_FALSE(r.passed());
  ASSERT_EQ(r.steps.size(), 3u);
  EXPECT_TRUE(r.steps[0].ok);
  EXPECT_FALSE(r.steps[1].ok);
  EXPECT_EQ(r.steps[1].observed, "VMfailValid(10)");
  EXPECT_EQ(r.steps[1].expected, "ok");
  EXPECT_FALSE(r.steps[2].ok);
  EXPECT_EQ(r.steps[2].observed, "ok, value 0x0");
  EXPECT_NE(r.steps[2].detail.find("value"), std::string::npos);
  EXPECT_EQ(r.mismatches(), 2u);
}

TEST(ScenarioRun, EntryFailuresReportReasonAndQualification) {
  CaseResult r = run_one(R"J({"name": "x", "follows": "t", "steps": [
      {"do": "enter_vmx"},
      {"do": "write_vmcs12", "set": {"guest_activity_state": 9}},
      {"do": "vmlaunch", "expect": "entry_failure(INVALID_GUEST_STATE)", "qualification": 0}]})J");
  EXPECT_TRUE(r.passed()) << describe(r);
}

TEST(ScenarioRun, MemslotsAndGuestMemoryThroughTheVmm) {
  CaseResult r = run_one(R"J({"name": "x", "follows": "t",
      "vm": {"regions": {"ram": "4M", "r1": "2M"},
             "memslots": [{"slot": 0, "gpa": 0, "region": "ram"}, {"slot": 10, "gpa": "0xc0000000", "region": "r1"}]},
      "steps": [
      {"do": "set_memory_region", "slot": 11, "gpa": "0xc0000000", "size": "2M", "hva": "r1", "expect": "EEXIST"},
      {"do": "vmm_write", "hva": "r1+8", "value": "0x55"},
      {"do": "read", "gpa": "0xc0000008", "value": "0x55"},
      {"do": "move_memslot", "slot": 10, "gpa": "0xd0000000"},
      {"do": "read", "gpa": "0xd0000008", "value": "0x55"},
      {"do": "vmm_read", "gpa": "0xc0000008", "expect": "EFAULT"},
      {"do": "delete_memslot", "slot": 10},
      {"do": "read", "gpa": "0xd0000008", "value": "invalid", "counters": {"mmio_exits": 1}},
      {"do": "delete_memslot", "slot": 10, "expect": "EINVAL"}]})J");
  EXPECT_TRUE(r.passed()) << describe(r);
}

// With managed memory a region's pages are mapped by their first fault, so
// the VMM's hva accesses must go through HostMm (a raw pointer would hit an
// unpopulated page).
TEST(ScenarioRun, VmmAccessByHvaWorksWithManagedMemory) {
  CaseResult r = run_one(R"J({"name": "x", "follows": "t",
      "vm": {"memory": "managed", "regions": {"ram": "4M", "r1": "2M"},
             "memslots": [{"slot": 0, "gpa": 0, "region": "ram"}]},
      "steps": [
      {"do": "vmm_write", "hva": "r1+8", "value": "0x55"},
      {"do": "vmm_read", "hva": "r1+8", "value": "0x55"},
      {"do": "vmm_read", "hva": "r1+0x1000", "value": 0},
      {"do": "set_memory_region", "slot": 10, "gpa": "0xc0000000", "size": "2M", "hva": "r1"},
      {"do": "read", "gpa": "0xc0000008", "value": "0x55"},
      {"do": "write", "gpa": "0xc0001000", "value": 7},
      {"do": "vmm_read", "hva": "r1+0x1000", "value": 7}]})J");
  EXPECT_TRUE(r.passed()) << describe(r);
  // An hva whose range wraps past all ones is in no region: the runner says so.
  CaseResult wrap = run_one(R"J({"name": "x", "follows": "t", "vm": {"memory": "managed"}, "steps": [
      {"do": "vmm_write", "hva": "invalid", "value": 1}, {"do": "vmm_read", "hva": "-4", "size": 8}]})J");
  ASSERT_EQ(wrap.steps.size(), 2u);
  for (const StepResult& st : wrap.steps)
    EXPECT_NE(st.detail.find("is not inside a region of this VM"), std::string::npos) << describe(wrap);
}

TEST(ScenarioRun, NestedStateGetPatchSetAndRun) {
  CaseResult r = run_one(R"J({"name": "x", "follows": "t", "steps": [
      {"do": "enter_vmx"},
      {"do": "write_vmcs12"},
      {"do": "vmlaunch", "expect": "exit(VMCALL)"},
      {"do": "get_nested_state", "save_as": "s", "check": {"flags": 0, "vmxon_gpa": "vmxon", "current_vmcs_gpa": "vmcs",
                                                           "size": 4160, "vmcs12.launch_state": 1,
                                                           "vmcs12.revision": "vmcs12_revision"}},
      {"do": "set_nested_state", "blob": "s", "patch": [{"at": "flags", "value": "ns.run_pending"}], "expect": "EINVAL"},
      {"do": "set_nested_state", "blob": "s", "patch": [{"at": "flags", "value": "ns.guest_mode"}]},
      {"do": "run", "expect": "exit(VMCALL)"},
      {"do": "set_nested_state", "state": {"vmxon": "invalid", "vmcs": "invalid"}},
      {"do": "get_nested_state", "check": {"vmxon_gpa": "invalid", "flags": 0, "size": 64}}]})J");
  EXPECT_TRUE(r.passed()) << describe(r);
}

// A patch whose offset is near 2^64 is beyond the blob: refused, never
// written before the blob's start (offset + size wrapped past zero).
TEST(ScenarioRun, APatchOffsetNearTwoToTheSixtyFourIsBeyondTheBlob) {
  CaseResult r = run_one(R"J({"name": "x", "follows": "t", "steps": [
      {"do": "get_nested_state", "save_as": "s"},
      {"do": "set_nested_state", "blob": "s", "patch": [{"at": 18446744073709551615, "value": 1}]},
      {"do": "set_nested_state", "blob": "s", "patch": [{"at": 18446744073709551612, "size": 8, "value": 1}]},
      {"do": "set_nested_state", "state": {}, "patch": [{"at": 60, "size": 8, "value": 1}]}]})J");
  ASSERT_EQ(r.steps.size(), 4u) << describe(r);
  for (size_t i = 1; i < 4; i++) {
    EXPECT_EQ(r.steps[i].observed, "error") << describe(r);
    EXPECT_NE(r.steps[i].detail.find("is beyond the blob's 64 bytes"), std::string::npos) << describe(r);
  }
}

TEST(ScenarioRun, AKvmInternalErrorStopsTheMachineAndLaterL1StepsSaySo) {
  CaseResult r = run_one(R"J({"name": "x", "follows": "t", "steps": [
      {"do": "enter_vmx"},
      {"do": "write_vmcs12", "or": {"primary_proc_controls": "proc.activate_secondary_controls",
                                    "secondary_proc_controls": "proc2.virtualize_apic_accesses"},
                             "set": {"apic_access_addr": "unbacked"}},
      {"do": "vmlaunch", "expect": "internal_error"},
      {"do": "vmxoff"}]})J");
  ASSERT_EQ(r.steps.size(), 4u) << describe(r);
  EXPECT_TRUE(r.steps[2].ok) << describe(r);
  EXPECT_NE(r.steps[2].detail.find("no backing for APIC-access address"), std::string::npos);
  EXPECT_FALSE(r.steps[3].ok);
  EXPECT_EQ(r.steps[3].observed, "internal_error");
}

TEST(ScenarioRun, AnL2InstructionEndsTheStepWhetherItExitsOrFaults) {
  // L2's VMREAD either exits to L1 (what KVM does) or faults in L2; a fault
  // is followed by a VMCALL, so the VMLAUNCH completes instead of hanging,
  // and the step's detail names the exception.
  CaseResult r = run_one(R"J({"name": "x", "follows": "t", "l2": [{"op": "vmread", "field": "guest_rip"}],
      "steps": [{"do": "enter_vmx"}, {"do": "write_vmcs12"}, {"do": "vmlaunch", "expect": "exit(VMREAD)"}]})J");
  ASSERT_EQ(r.steps.size(), 3u);
  const StepResult& launch = r.steps[2];
  if (launch.ok) {
    EXPECT_EQ(launch.observed, "exit(VMREAD)");
  } else {
    EXPECT_EQ(launch.observed, "exit(VMCALL)") << describe(r);
    EXPECT_NE(launch.detail.find("L2 took exception #6"), std::string::npos) << describe(r);
  }
}

TEST(ScenarioRun, AVmThatCannotBeBuiltIsASetupError) {
  CaseResult r = run_one(R"J({"name": "x", "follows": "t",
      "vm": {"regions": {"ram": "4M"}, "memslots": [{"slot": 0, "gpa": 0, "region": "ram"},
                                                    {"slot": 1, "gpa": "0x1000", "region": "ram"}]},
      "steps": [{"do": "vmxoff", "expect": "#UD"}]})J");
  EXPECT_FALSE(r.passed());
  EXPECT_TRUE(r.steps.empty());
  EXPECT_NE(r.setup_error.find("vm.memslots: slot 1 is refused: EEXIST"), std::string::npos) << r.setup_error;
  EXPECT_EQ(r.setup_errno, EINVAL);  // refused by the model, not short of a resource
}

TEST(ScenarioRun, EveryVcpuHasItsOwnL1) {
  CaseResult r = run_one(R"J({"name": "x", "follows": "t", "vm": {"vcpus": 2}, "steps": [
      {"do": "enter_vmx", "vcpu": 0},
      {"do": "vmptrst", "vcpu": 1, "expect": "#UD"},
      {"do": "enter_vmx", "vcpu": 1, "vmxon": "scratch", "vmcs": "vmcs2"},
      {"do": "vmptrst", "vcpu": 1, "value": "vmcs2"},
      {"do": "vmptrst", "vcpu": 0, "value": "vmcs"}]})J");
  EXPECT_TRUE(r.passed()) << describe(r);
}

}  // namespace
}  // namespace nestcache::workloads::scenario
