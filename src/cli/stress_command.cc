// `nestcache stress`: the soak run (workloads/stress.h) for each strategy
// asked for, one after the other, with a summary or one JSON object.
#include <atomic>
#include <cstdio>
#include <string_view>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/ranges.h>

#include "base/mutex.h"
#include "cli/commands.h"
#include "cli/interrupt.h"
#include "workloads/progress.h"
#include "workloads/stress.h"

namespace nestcache::cli {

namespace {

// The results of the strategies run so far, printed as each one finishes
// (text) or all at the end (JSON). The signal-watching thread may end the
// run, printing what finished, while the main thread adds results; the
// lock keeps the two apart.
class StressPrinter {
 public:
  StressPrinter(const workloads::StressOptions& o, bool json) : o_(o), json_(json) {}

  // One strategy's result, shown with the options it ran with.
  void add(vmx::StrategyKind s, const workloads::SelftestResult& r, bool verbose) NC_EXCLUDES(mu_) {
    workloads::RunOptions shown;
    shown.strategy = s;
    shown.memory = o_.memory;
    shown.verbose = verbose;
    shown.extra = {{"seconds", fmt::format("{}", o_.seconds)}, {"rounds", std::to_string(o_.rounds)}};
    MutexLock l(mu_);
    if (finished_) return;
    all_passed_ = all_passed_ && r.passed;
    if (r.details.value("stopped_early", false))
      stopped_early_ = true;
    else
      full_runs_++;
    if (json_) {
      nlohmann::json j = workloads::selftest_json("stress", shown, r);
      j["teardown"] = r.details["teardown"];
      results_.push_back(std::move(j));
    } else {
      print_selftest_summary("stress", shown, r);
      std::fflush(stdout);  // each strategy's result as it finishes
    }
  }

  // The end of the run: the JSON object, or the text's last line when a
  // signal (`interrupted_by`, else null) cut it short. Prints once.
  void finish(const char* interrupted_by = nullptr) NC_EXCLUDES(mu_) {
    MutexLock l(mu_);
    if (finished_) return;
    finished_ = true;
    if (json_) {
      nlohmann::json j = {{"command", "stress"},
                          {"passed", all_passed_},
                          {"seconds", o_.seconds},
                          {"memory", workloads::memory_kind_name(o_.memory)},
                          {"results", results_}};
      if (interrupted_by) j["interrupted"] = interrupted_by;
      print_json(j);
    } else if (interrupted_by) {
      fmt::print("\nInterrupted by {}: {} strateg{} ran for the full time{}.\n", interrupted_by, full_runs_,
                 full_runs_ == 1 ? "y" : "ies",
                 stopped_early_ ? "; the last one shown stopped after the epoch under way" : "");
    }
    std::fflush(stdout);
  }

  bool all_passed() NC_EXCLUDES(mu_) {
    MutexLock l(mu_);
    return all_passed_;
  }

 private:
  const workloads::StressOptions& o_;
  const bool json_;
  Mutex mu_{LockRank::kLeaf};
  nlohmann::json results_ NC_GUARDED_BY(mu_) = nlohmann::json::array();
  bool all_passed_ NC_GUARDED_BY(mu_) = true;
  int full_runs_ NC_GUARDED_BY(mu_) = 0;      // results that ran for --seconds
  bool stopped_early_ NC_GUARDED_BY(mu_) = false;  // a result cut short by a stop request
  bool finished_ NC_GUARDED_BY(mu_) = false;
};

}  // namespace

CLI::App* add_stress_command(CLI::App& app, StressArgs& a) {
  using namespace workloads;
  CLI::App* cmd = app.add_subcommand(
      "stress", "Soak: every kind of churn at once for a given time, asserting nothing stale, lost or leaked");
  a.command = cmd;
  cmd->add_option("--seconds", a.seconds, "Run each strategy this long (a started epoch finishes)")
      ->default_str(fmt::format("{}", kDefaultStressSeconds))
      ->transform(in_range(0.001, kMaxStressSeconds));
  cmd->add_option("--strategy", a.strategy, "Strategies to run, comma-separated, one after the other (or all)")
      ->type_name("map,cache,oracle")
      ->default_str("cache,oracle")
      ->check(registry_validator(parse_strategy_list, "strategies"));
  cmd->add_option("--memory", a.memory, "Frames backing guest memory: managed, or unmanaged (the seed's case)")
      ->type_name("managed|unmanaged")
      ->default_str("unmanaged")
      ->check(registry_validator(parse_memory_kind, "memory"));
  cmd->add_option("--rounds", a.rounds, "Rounds of the pages workload per epoch (one VM each); an epoch runs all its rounds "
                  "(milliseconds each), so a large value makes one epoch outlast --seconds")
      ->default_str(std::to_string(kDefaultStressRounds))
      ->transform(in_range(int64_t{1}, int64_t{kMaxStressRounds}));
  cmd->add_flag("--json", a.json, "Print one JSON object: a result per strategy, each with its teardown figures");
  cmd->add_flag("-v,--verbose", a.verbose, "Print every counter and the run's details");
  cmd->footer(wrap_text(
      "Each epoch is one VM with four L1 vCPUs: two run an L2 that uses every vmcs02 page (memory, CR8, "
      "APIC access, MSRs, posted interrupts) while a host thread migrates those pages and moves their "
      "memslots; two switch between 40 L2s, past the 32-context capacity, while a VMM thread migrates and "
      "discards the switched L2s' pages and takes vCPU 0's nested state. Beside the epochs, another thread "
      "migrates an L1 vCPU mid-L2 between two VMs with the nested state, over and over.\n"
      "Asserted for cache and oracle: no stale access, no lost TPR write or posted interrupt. For every "
      "strategy: every run finished, and nothing leaked after teardown (remap windows, pins, active caches, "
      "nested contexts, threads, file descriptors). With map the detectors' findings are reported, not failed.\n"
      "SIGINT or SIGTERM stops the run after the epoch under way: what finished is printed (the stopped "
      "strategy's epochs too, with their teardown figures), marked as interrupted; a second signal ends it at once.\n"
      "Exit status: 0 when every assertion held, 1 when one failed, 2 on a usage error, 130 / 143 when "
      "interrupted by SIGINT / SIGTERM."));
  return cmd;
}

int run_stress_command(const StressArgs& a, bool json) {
  workloads::StressOptions o;
  o.strategies = workloads::parse_strategy_list(a.strategy).value();  // validated by CLI11
  o.memory = workloads::parse_memory_kind(a.memory).value();
  o.seconds = a.seconds;
  o.rounds = a.rounds;
  o.verbose = a.verbose;
  if (auto st = workloads::validate(o); !st) return usage_error(json, "nestcache stress", st.error().message);

  StressPrinter printer(o, json);
  // The first SIGINT / SIGTERM stops the run after the epoch under way, so
  // that what was started is torn down and its leak check still runs; a
  // second one ends the process at once with what finished before.
  std::atomic<bool> stop{false};
  std::atomic<int> interrupted_by{0};
  auto watch = InterruptWatch::start_stoppable([&](int signo) {
    if (interrupted_by.exchange(signo) == 0) {
      stop.store(true);
      std::fprintf(stderr, "\nnestcache stress: %s: stopping after the epoch under way\n", signal_name(signo));
      return false;
    }
    printer.finish(signal_name(signo));
    return true;
  });
  if (!watch) {
    return run_error(json, "nestcache stress", watch.error().to_string());
  }
  o.stop = &stop;
  if (!json) {
    std::vector<std::string_view> names;
    for (vmx::StrategyKind s : o.strategies) names.push_back(vmx::strategy_name(s));
    fmt::print("nestcache stress: {} for {} s each, {} round{} per epoch, memory {}\n", fmt::join(names, ", "),
               o.seconds, o.rounds, o.rounds == 1 ? "" : "s", workloads::memory_kind_name(o.memory));
    std::fflush(stdout);
  }
  workloads::Progress progress(!json);
  o.progress = &progress;
  for (vmx::StrategyKind s : o.strategies) {
    workloads::SelftestResult r = workloads::run_stress(o, s);
    progress.finish();
    printer.add(s, r, a.verbose);
    if (stop.load()) break;  // the strategies after it are not run
  }
  if (int signo = interrupted_by.load()) {
    printer.finish(signal_name(signo));
    return 128 + signo;
  }
  printer.finish();
  return printer.all_passed() ? kExitOk : kExitFailed;
}

}  // namespace nestcache::cli
