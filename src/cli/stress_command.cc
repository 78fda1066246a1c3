// `nestcache stress`: the soak run (workloads/stress.h) for each strategy
// asked for, one after the other, with a summary or one JSON object.
#include <cstdio>

#include <CLI/CLI.hpp>

#include "cli/commands.h"
#include "workloads/progress.h"
#include "workloads/stress.h"

namespace nestcache::cli {

CLI::App* add_stress_command(CLI::App& app, StressArgs& a) {
  using namespace workloads;
  CLI::App* cmd = app.add_subcommand(
      "stress", "Soak: every kind of churn at once for a given time, asserting nothing stale, lost or leaked");
  a.command = cmd;
  cmd->add_option("--seconds", a.seconds, "Run each strategy this long (a started epoch finishes)")
      ->default_str(fmt::format("{}", kDefaultStressSeconds))
      ->check(CLI::Range(0.001, kMaxStressSeconds));
  cmd->add_option("--strategy", a.strategy, "Strategies to run, comma-separated, one after the other (or all)")
      ->type_name("map,cache,oracle")
      ->default_str("cache,oracle")
      ->check(registry_validator(parse_strategy_list, "strategies"));
  cmd->add_option("--memory", a.memory, "Frames backing guest memory: managed, or unmanaged (the seed's case)")
      ->type_name("managed|unmanaged")
      ->default_str("unmanaged")
      ->check(registry_validator(parse_memory_kind, "memory"));
  cmd->add_option("--rounds", a.rounds, "Rounds of the pages workload per epoch (one VM each)")
      ->default_str(std::to_string(kDefaultStressRounds))
      ->check(CLI::Range(int64_t{1}, int64_t{kMaxStressRounds}));
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
      "Exit status: 0 when every assertion held, 1 when one failed, 2 on a usage error."));
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

  workloads::Progress progress(!json);
  o.progress = &progress;
  nlohmann::json results = nlohmann::json::array();
  bool all_passed = true;
  for (vmx::StrategyKind s : o.strategies) {
    workloads::SelftestResult r = workloads::run_stress(o, s);
    progress.finish();
    all_passed = all_passed && r.passed;
    workloads::RunOptions shown;
    shown.strategy = s;
    shown.memory = o.memory;
    shown.verbose = a.verbose;
    shown.extra = {{"seconds", fmt::format("{}", o.seconds)}, {"rounds", std::to_string(o.rounds)}};
    if (json) {
      nlohmann::json j = workloads::selftest_json("stress", shown, r);
      j["teardown"] = r.details["teardown"];
      results.push_back(std::move(j));
    } else {
      print_selftest_summary("stress", shown, r);
      std::fflush(stdout);  // each strategy's result as it finishes
    }
  }
  if (json)
    print_json({{"command", "stress"},
                {"passed", all_passed},
                {"seconds", o.seconds},
                {"memory", workloads::memory_kind_name(o.memory)},
                {"results", results}});
  return all_passed ? kExitOk : kExitFailed;
}

}  // namespace nestcache::cli
