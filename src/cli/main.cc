// The `nestcache` program: builds the command line from the workload
// registry and dispatches to the commands (commands.h).
#include <cstdio>
#include <string>

#include <CLI/CLI.hpp>

#include "cli/commands.h"

namespace {

const std::string kAbout =
    "nestcache models a nested-VMX hypervisor stack (L0 -> L1 -> L2) in user space with real memory, real\n"
    "mappings and their real system-call and TLB costs, and a simulated processor. It compares how L0\n"
    "reaches the pages L1 names for L2 -- map (map and unmap on every nested entry and exit, the kernel\n"
    "today), cache (persistent pfn caches kept valid by invalidation, the seed) and oracle (no mapping,\n"
    "the physical limit) -- on cost, and on correctness when the host migrates pages or the VMM changes\n"
    "memslots.\n\n"
    "  nestcache selftest   list and run the correctness scenarios\n"
    "  nestcache bench      time the seed's benchmark for each strategy, side by side\n"
    "  nestcache run FILE   run scenario files: steps with the outcome KVM gives for each\n"
    "  nestcache            the main job: the seed's benchmark table, every strategy\n";

}  // namespace

int main(int argc, char** argv) {
  using namespace nestcache;
  workloads::register_all();

  CLI::App app(kAbout, "nestcache");
  app.require_subcommand(0, 1);
  app.set_help_all_flag("--help-all", "Print this help with every command's and selftest's options, and exit");
  bool json = false;
  app.add_flag("--json", json, "Print results as JSON (every command takes --json)");
  app.footer(
      "Every command has --help (e.g. `nestcache selftest memslots --help`). Counters have one snake_case\n"
      "name everywhere: in the output, the JSON and the tests.\n"
      "Exit status: 0 success, 1 a test failed or could not run, 2 a usage error.");

  cli::SelftestArgs selftest;
  cli::BenchArgs bench;
  CLI::App* selftest_cmd = cli::add_selftest_command(app, selftest);
  CLI::App* bench_cmd = cli::add_bench_command(app, bench);
  cli::RunArgs run;
  CLI::App* run_cmd = cli::add_run_command(app, run);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e);
    return code == 0 ? cli::kExitOk : cli::kExitUsage;
  }

  int status;
  if (selftest_cmd->parsed())
    status = cli::run_selftest_command(selftest, json || selftest.json);
  else if (bench_cmd->parsed())
    status = cli::run_bench_command(bench, json || bench.json);
  else if (run_cmd->parsed())
    status = cli::run_run_command(run, json || run.json);
  else
    status = cli::run_default_job(json);
  std::fflush(stdout);
  return status;
}
