// `nestcache run FILE|DIR...`: runs scenario files (docs/scenarios.md) and
// prints every step's outcome beside the expected one.
//
// Every file is parsed before anything runs, so a bad file is reported (exit
// status 2) without half a run. A directory stands for the *.json files in
// it, in name order. Exit status: 0 every expectation held, 1 a step's
// outcome differed or a VM could not have a resource, 2 a usage error, a bad
// file or a VM the model refuses.
#include <algorithm>
#include <filesystem>

#include <fmt/ranges.h>

#include "cli/commands.h"
#include "workloads/scenario.h"

namespace nestcache::cli {

namespace {

namespace sc = workloads::scenario;
namespace fs = std::filesystem;

// FILE|DIR arguments -> scenario file paths; an error message on failure.
Result<std::vector<std::string>> expand_paths(const std::vector<std::string>& args) {
  std::vector<std::string> out;
  for (const std::string& a : args) {
    std::error_code ec;
    if (fs::is_directory(a, ec)) {
      std::vector<std::string> files;
      for (const auto& entry : fs::directory_iterator(a, ec))
        if (entry.is_regular_file() && entry.path().extension() == ".json") files.push_back(entry.path().string());
      if (ec) return errorf(EIO, "{}: cannot list the directory: {}", a, ec.message());
      if (files.empty()) return errorf(ENOENT, "{}: the directory holds no .json scenario file", a);
      std::sort(files.begin(), files.end());
      out.insert(out.end(), files.begin(), files.end());
    } else if (fs::exists(a, ec)) {
      out.push_back(a);
    } else {
      return errorf(ENOENT, "{}: no such file or directory", a);
    }
  }
  return out;
}

struct Tally {
  // Cases whose VM was refused (a bad file: exit status 2), and those whose
  // VM could not have a resource (could not run: 1).
  size_t cases = 0, passed = 0, refused_vms = 0, steps = 0, mismatched = 0;
  std::map<std::string, std::pair<size_t, size_t>> by_family;  // family -> (cases, passed)

  void add(const sc::CaseResult& r) {
    cases++;
    passed += r.passed() ? 1 : 0;
    refused_vms += !r.setup_error.empty() && r.setup_errno == EINVAL ? 1 : 0;
    steps += r.steps.size();
    mismatched += r.mismatches();
    auto& f = by_family[r.family.empty() ? "other" : r.family];
    f.first++;
    f.second += r.passed() ? 1 : 0;
  }
};

void print_case(const sc::CaseResult& r, bool quiet) {
  if (quiet && r.passed()) return;
  fmt::print("  {} {}  ({})\n", r.passed() ? "PASS" : "FAIL", r.name, r.follows);
  if (!r.kvm_differs.empty() && !quiet) fmt::print("       deliberate difference from KVM: {}\n", r.kvm_differs);
  if (!r.setup_error.empty()) fmt::print("       the VM could not be built: {}\n", r.setup_error);
  for (const sc::StepResult& s : r.steps) {
    if (quiet && s.ok) continue;
    if (s.ok) {
      fmt::print("       {:>2} {:<48} {}\n", s.index, s.label, s.observed);
    } else {
      fmt::print("       {:>2} {:<48} {}   <-- MISMATCH: expected {}\n", s.index, s.label, s.observed, s.expected);
    }
    if (!s.detail.empty() && (!s.ok || !quiet)) fmt::print("          {}\n", s.detail);
  }
}

nlohmann::json case_json(const sc::CaseResult& r) {
  nlohmann::json steps = nlohmann::json::array();
  for (const sc::StepResult& s : r.steps)
    steps.push_back({{"step", s.index}, {"do", s.label}, {"expected", s.expected}, {"observed", s.observed},
                     {"ok", s.ok}, {"detail", s.detail}});
  nlohmann::json j = {{"name", r.name}, {"follows", r.follows}, {"family", r.family}, {"passed", r.passed()},
                      {"steps", steps}};
  if (!r.kvm_differs.empty()) j["kvm_differs"] = r.kvm_differs;
  if (!r.setup_error.empty()) j["setup_error"] = r.setup_error;
  return j;
}

}  // namespace

CLI::App* add_run_command(CLI::App& app, RunArgs& args) {
  CLI::App* cmd = app.add_subcommand("run", "Run scenario files: a VM, steps, and the outcome KVM gives for each");
  args.command = cmd;
  cmd->add_option("PATH", args.paths, "Scenario files, or directories of them (*.json)")->required();
  cmd->add_flag("--json", args.json, "Print the results as one JSON object");
  cmd->add_flag("-q,--quiet", args.quiet, "Print only the cases and steps that did not hold, and the summary");
  cmd->add_option("--case", args.case_filter, "Run only the cases whose name contains this text");
  cmd->footer(wrap_text(
      "The format is documented in docs/scenarios.md; tests/conformance holds the conformance suite. Every file is "
      "checked before anything runs.\nExit status: 0 when every expectation held, 1 when a step's outcome differed or "
      "a case's VM could not have a resource (memory, descriptors, threads), 2 on a usage error, a bad scenario file "
      "or a VM the model refuses (its memslots)."));
  return cmd;
}

int run_run_command(const RunArgs& args, bool json) {
  auto paths = expand_paths(args.paths);
  if (!paths) return usage_error(json, "nestcache run", paths.error().message);
  std::vector<sc::ScenarioFile> files;
  std::vector<std::string> bad_files;
  for (const std::string& p : *paths) {
    auto f = sc::parse_scenario_file(p);
    if (!f) {
      bad_files.push_back(f.error().message);
      continue;
    }
    files.push_back(std::move(*f));
  }
  if (!bad_files.empty()) {
    // One line per bad file; under --json one error object naming them all.
    if (json) return usage_error(json, "nestcache run", fmt::format("{}", fmt::join(bad_files, "\n")));
    for (const std::string& m : bad_files) usage_error(json, "nestcache run", m);
    return kExitUsage;
  }

  // A filter that matches nothing, or files without cases, is a usage error
  // found before anything runs, as a bad file is.
  auto selected = [&](const sc::Case& c) {
    return args.case_filter.empty() || c.name.find(args.case_filter) != std::string::npos;
  };
  size_t matching = 0;
  for (const sc::ScenarioFile& f : files) matching += std::count_if(f.cases.begin(), f.cases.end(), selected);
  if (matching == 0) {
    const std::string where = fmt::format("{} file{}", files.size(), files.size() == 1 ? "" : "s");
    return usage_error(json, "nestcache run",
                       args.case_filter.empty() ? fmt::format("no case in the {}", where)
                                                : fmt::format("--case '{}' matches no case in the {}", args.case_filter,
                                                              where));
  }

  Tally tally;
  nlohmann::json out_files = nlohmann::json::array();
  for (const sc::ScenarioFile& f : files) {
    if (!json && !args.quiet) fmt::print("{}\n", f.path);
    nlohmann::json cases = nlohmann::json::array();
    for (const sc::Case& c : f.cases) {
      if (!selected(c)) continue;
      sc::CaseResult r = sc::run_case(c);
      tally.add(r);
      if (json) {
        cases.push_back(case_json(r));
      } else {
        if (args.quiet && !r.passed()) fmt::print("{}\n", f.path);
        print_case(r, args.quiet);
      }
    }
    if (json) out_files.push_back({{"file", f.path}, {"cases", cases}});
  }

  const bool all_passed = tally.passed == tally.cases;
  if (json) {
    nlohmann::json fam = nlohmann::json::object();
    for (const auto& [name, counts] : tally.by_family) fam[name] = {{"cases", counts.first}, {"passed", counts.second}};
    print_json({{"files", out_files},
                {"summary", {{"cases", tally.cases}, {"passed", tally.passed}, {"failed", tally.cases - tally.passed},
                             {"steps", tally.steps}, {"mismatched_steps", tally.mismatched}, {"by_family", fam}}},
                {"passed", all_passed}});
  } else {
    std::string fam;
    for (const auto& [name, counts] : tally.by_family)
      fam += fmt::format("{}{} {}/{}", fam.empty() ? "" : ", ", name, counts.second, counts.first);
    fmt::print("{} cases: {} passed, {} failed ({} of {} steps did not hold){}{}\n", tally.cases, tally.passed,
               tally.cases - tally.passed, tally.mismatched, tally.steps, fam.empty() ? "" : "; by family: ", fam);
  }
  if (tally.refused_vms) return kExitUsage;
  return all_passed ? kExitOk : kExitFailed;
}

}  // namespace nestcache::cli
