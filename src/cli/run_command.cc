// `nestcache run FILE|DIR...`: runs scenario files (docs/scenarios.md) and
// prints every step's outcome beside the expected one.
//
// Every file is parsed before anything runs, so a bad file is reported (exit
// status 2) without half a run. A directory stands for the *.json files in
// it, in name order. Exit status: 0 every expectation held, 1 a step's
// outcome differed or a VM could not have a resource, 2 a usage error, a bad
// file or a VM the model refuses, 128 + the signal when SIGINT or SIGTERM
// ends the run (after the case under way; the cases that finished are
// reported first).
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>

#include <fmt/ranges.h>

#include "base/mutex.h"
#include "cli/commands.h"
#include "cli/interrupt.h"
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
    if (a.empty()) return errorf(ENOENT, "an empty path: give a scenario file or a directory of them");
    if (fs::is_directory(a, ec)) {
      std::vector<std::string> files;
      for (const auto& entry : fs::directory_iterator(a, ec)) {
        if (entry.path().extension() != ".json") continue;
        // A link to nothing is a scenario file that went missing, not a
        // name to pass over: say which.
        std::error_code target_ec;
        if (entry.is_symlink(target_ec) && !fs::exists(entry.path(), target_ec))
          return errorf(ENOENT, "{}: a symbolic link to {}, which does not exist", entry.path().string(),
                        fs::read_symlink(entry.path(), target_ec).string());
        if (entry.is_regular_file()) files.push_back(entry.path().string());
      }
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
  size_t cases = 0, passed = 0, refused_vms = 0, steps = 0, mismatched = 0, leaked = 0;
  std::map<std::string, std::pair<size_t, size_t>> by_family;  // family -> (cases, passed)

  void add(const sc::CaseResult& r) {
    cases++;
    passed += r.passed() ? 1 : 0;
    refused_vms += !r.setup_error.empty() && r.setup_errno == EINVAL ? 1 : 0;
    steps += r.steps.size();
    mismatched += r.mismatches();
    leaked += r.leaked.empty() ? 0 : 1;
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
  if (!r.leaked.empty()) fmt::print("       left at teardown: {}\n", r.leaked);
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
  if (!r.leaked.empty()) j["leaked"] = r.leaked;
  return j;
}

// What a run has finished, shared by the loop that runs the cases and the
// thread that prints the summary when a signal ends the run. Text is printed
// as each case ends; JSON at the end.
class RunReport {
 public:
  RunReport(bool json, bool quiet) : json_(json), quiet_(quiet) {}

  // Cases of `path` follow.
  void begin_file(const std::string& path) NC_EXCLUDES(mu_) {
    MutexLock l(mu_);
    if (finished_) return;
    if (json_) files_.push_back({{"file", path}, {"cases", nlohmann::json::array()}});
    if (!json_ && !quiet_) fmt::print("{}\n", path);
    std::fflush(stdout);
  }
  void add(const std::string& path, const sc::CaseResult& r) NC_EXCLUDES(mu_) {
    MutexLock l(mu_);
    if (finished_) return;  // a signal ended the run while this case ran
    tally_.add(r);
    if (json_) {
      files_.back()["cases"].push_back(case_json(r));
    } else {
      if (quiet_ && !r.passed()) fmt::print("{}\n", path);
      print_case(r, quiet_);
    }
    std::fflush(stdout);
  }
  // The summary; `interrupted_by` names the signal that ended the run early.
  Tally finish(const char* interrupted_by = nullptr) NC_EXCLUDES(mu_) {
    MutexLock l(mu_);
    if (finished_) return tally_;
    finished_ = true;
    const bool all_passed = !interrupted_by && tally_.passed == tally_.cases;
    if (json_) {
      nlohmann::json fam = nlohmann::json::object();
      for (const auto& [name, counts] : tally_.by_family)
        fam[name] = {{"cases", counts.first}, {"passed", counts.second}};
      nlohmann::json j = {{"files", files_},
                          {"summary",
                           {{"cases", tally_.cases},
                            {"passed", tally_.passed},
                            {"failed", tally_.cases - tally_.passed},
                            {"steps", tally_.steps},
                            {"mismatched_steps", tally_.mismatched},
                            {"leaked_at_teardown", tally_.leaked},
                            {"by_family", fam}}},
                          {"passed", all_passed}};
      if (interrupted_by) j["interrupted"] = interrupted_by;
      print_json(j);
    } else {
      std::string fam;
      for (const auto& [name, counts] : tally_.by_family)
        fam += fmt::format("{}{} {}/{}", fam.empty() ? "" : ", ", name, counts.second, counts.first);
      if (interrupted_by) fmt::print("\nInterrupted by {}: ", interrupted_by);
      fmt::print("{} cases{}: {} passed, {} failed ({} of {} steps did not hold{}){}{}\n", tally_.cases,
                 interrupted_by ? " finished" : "", tally_.passed, tally_.cases - tally_.passed, tally_.mismatched,
                 tally_.steps,
                 tally_.leaked ? fmt::format("; {} case{} left resources at teardown", tally_.leaked,
                                             tally_.leaked == 1 ? "" : "s")
                               : "",
                 fam.empty() ? "" : "; by family: ", fam);
    }
    std::fflush(stdout);
    return tally_;
  }

 private:
  const bool json_, quiet_;
  Mutex mu_{LockRank::kLeaf};
  Tally tally_ NC_GUARDED_BY(mu_);
  nlohmann::json files_ NC_GUARDED_BY(mu_) = nlohmann::json::array();
  bool finished_ NC_GUARDED_BY(mu_) = false;
};

}  // namespace

CLI::App* add_run_command(CLI::App& app, RunArgs& args) {
  CLI::App* cmd = app.add_subcommand("run", "Run scenario files: a VM, steps, and the outcome KVM gives for each");
  args.command = cmd;
  cmd->add_option("PATH", args.paths, "Scenario files, or directories of them (*.json)")->required();
  cmd->add_flag("--json", args.json, "Print the results as one JSON object");
  cmd->add_flag("-q,--quiet", args.quiet, "Print only the cases and steps that did not hold, and the summary");
  args.case_option = cmd->add_option("--case", args.case_filter, "Run only the cases whose name contains this text");
  cmd->footer(wrap_text(
      "The format is documented in docs/scenarios.md; tests/conformance holds the conformance suite. Every file is "
      "checked before anything runs.\nExit status: 0 when every expectation held, 1 when a step's outcome differed or "
      "a case's VM could not have a resource (memory, descriptors, threads), 2 on a usage error, a bad scenario file "
      "or a VM the model refuses (its memslots), 130 / 143 when SIGINT / SIGTERM ended the run (the case under way "
      "finishes, then the cases that finished are reported, marked as interrupted; a second signal ends the run at "
      "once)."));
  return cmd;
}

int run_run_command(const RunArgs& args, bool json) {
  RunReport report(json, args.quiet);
  // While cases run, the first SIGINT / SIGTERM stops the run after the case
  // under way, whose VM is torn down (and its threads joined) as at the end
  // of any case; the cases finished so far are reported, marked as
  // interrupted, and the run exits 130 / 143. A second signal ends the
  // process at once with what finished before it, as does a signal while
  // the files are read or once the last case ended (no VM is alive then).
  std::atomic<bool> cases_running{false};
  std::atomic<int> interrupted_by{0};
  auto watch = InterruptWatch::start_stoppable([&](int signo) {
    if (cases_running.load() && interrupted_by.exchange(signo) == 0) {
      std::fprintf(stderr, "\nnestcache run: %s: stopping after the case under way\n", signal_name(signo));
      return false;
    }
    report.finish(signal_name(signo));
    return true;
  });
  if (!watch) {
    return run_error(json, "nestcache run", watch.error().to_string());
  }
  // Every name contains the empty text: '' would run every case, which is
  // not what giving --case asks for.
  if (args.case_option->count() > 0 && args.case_filter.empty())
    return usage_error(json, "nestcache run", "--case: an empty pattern; give part of a case's name");
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

  cases_running.store(true);
  for (const sc::ScenarioFile& f : files) {
    if (interrupted_by.load()) break;
    // A file --case leaves no case of is not part of the run: no heading
    // for it (text), no entry (JSON).
    if (std::none_of(f.cases.begin(), f.cases.end(), selected)) continue;
    report.begin_file(f.path);
    for (const sc::Case& c : f.cases) {
      if (interrupted_by.load()) break;
      if (selected(c)) report.add(f.path, sc::run_case(c));
    }
  }
  cases_running.store(false);
  if (int signo = interrupted_by.load()) {
    report.finish(signal_name(signo));
    return 128 + signo;
  }
  const Tally tally = report.finish();  // a signal from here on finds the summary printed
  if (tally.refused_vms) return kExitUsage;
  return tally.passed == tally.cases ? kExitOk : kExitFailed;
}

}  // namespace nestcache::cli
