// The scenario-file parser's internals, shared by scenario_parse.cc (file,
// cases, steps, expectations) and scenario_parse_specs.cc (the VM, L2
// programs, vmcs12 and nested-state specs). Not an API: scenario.h is.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>

#include <nlohmann/json.hpp>

#include "workloads/scenario.h"

namespace nestcache::workloads::scenario::detail {

using nlohmann::json;

// The most vCPUs a scenario's VM may have.
inline constexpr uint64_t kMaxVcpus = 16;

// The VM every case starts from; a file's "vm" and a case's "vm" override
// it key by key ("pages" name by name).
const json& default_vm_json();
// Applies the keys of `over` to `into` ("pages" merged name by name).
void merge_vm(json& into, const json& over);
// "a, b, c": the keys of a JSON object.
std::string names_of(const json& obj);

class Parser {
 public:
  explicit Parser(std::string path) : path_(std::move(path)) {}

  Result<ScenarioFile> file(const json& root);
  // A complete VM description (every key present: default_vm_json merged).
  Result<VmSpec> vm_spec(const json& merged);

 private:
  // "<path>: case 'x', step 3 (vmptrld): <what>"
  template <class... Args>
  tl::unexpected<Error> fail(fmt::format_string<Args...> f, Args&&... args) const {
    std::string where = path_;
    if (!case_.empty()) where += fmt::format(": case '{}'", case_);
    if (step_) where += fmt::format(", step {}{}", step_, verb_.empty() ? "" : fmt::format(" ({})", verb_));
    return make_error(EINVAL, where + ": " + fmt::format(f, std::forward<Args>(args)...));
  }

  Result<Case> one_case(const json& c, const json& file_vm, const std::string& file_family, size_t n);
  Result<std::vector<cpu::GuestOp>> l2_program(const json& l2);
  Result<Step> step(const json& s);
  Status step_specials(const json& s, Step& st);
  Status operand_widths(const Step& st);
  // An operand's value as a number: refused when it names a region (its
  // value would be a host address). `where` starts the message
  // ("vm.memslots: ").
  Result<uint64_t> number(const Expr& e, std::string_view key, std::string_view where = {});
  // The same for a field KVM holds in 32 bits (a memslot's slot and flags,
  // ...): refused when wider, never cut short (slot 0x100000000 would be 0).
  Result<uint32_t> u32_field(const Expr& e, std::string_view key, std::string_view where = {});
  Result<Expect> expectation(const json& s, const Step& st);
  Result<Expr> expr(const json& v, std::string_view key);
  Result<Vmcs12Spec> vmcs12_spec(const json& s);
  Result<StateSpec> state_spec(const json& s);
  Result<std::vector<Patch>> patches(const json& p);
  Result<std::vector<BlobCheck>> checks(const json& c);
  // Where `what` ("flags", "vmcs12.guest_rip", a number) is in a blob.
  Result<HeaderField> blob_location(const std::string& what);

  std::string path_;
  std::string case_;
  size_t step_ = 0;
  std::string verb_;
  NameScope scope_;
  std::map<std::string, uint64_t> pages_;
  std::map<std::string, uint64_t> regions_;
  std::set<std::string> saved_blobs_;
};


}  // namespace nestcache::workloads::scenario::detail
