// `nestcache selftest`: lists the registered selftests, runs one by name or
// all of them, and prints a summary or the JSON result.
//
// Each registered selftest is a CLI11 sub-command of `selftest`, so its own
// options (--mode, --delay-ms, ...) are parsed and range-checked by CLI11
// and listed by `nestcache selftest NAME --help`. A NAME that is no
// registered test lands in the positional argument instead and is reported
// with the list of valid names.
#include <CLI/CLI.hpp>
#include <fmt/ranges.h>

#include "base/mutex.h"
#include "cli/commands.h"
#include "cli/interrupt.h"
#include "workloads/progress.h"

namespace nestcache::cli {

namespace {

constexpr const char* kCommonGroup = "Common options";

// --strategy, --memory, --json, --verbose: on `selftest` and on every test.
void add_common_options(CLI::App& cmd, SelftestArgs& args) {
  cmd.add_option("--strategy", args.strategy,
                 "How L0 reaches L1's pages: map (per entry, the kernel today), cache (the seed), oracle (limit)")
      ->type_name("map|cache|oracle")
      ->default_str("cache")
      ->check(registry_validator(workloads::parse_strategy, "strategy"))
      ->group(kCommonGroup);
  cmd.add_option("--memory", args.memory,
                 "Frames backing guest memory: managed (direct map, pinnable) or unmanaged (the seed's case)")
      ->type_name("managed|unmanaged")
      ->default_str("unmanaged")
      ->check(registry_validator(workloads::parse_memory_kind, "memory"))
      ->group(kCommonGroup);
  cmd.add_flag("--json", args.json, "Print the result as one JSON object, counters by snake_case name")
      ->group(kCommonGroup);
  cmd.add_flag("-v,--verbose", args.verbose, "Print every counter and the test's details")->group(kCommonGroup);
}

void print_list(bool json) {
  const auto& tests = workloads::selftests();
  if (json) {
    nlohmann::json list = nlohmann::json::array();
    for (const auto& t : tests) list.push_back({{"name", t.name}, {"summary", t.summary}});
    print_json(list);
    return;
  }
  size_t width = 0;
  for (const auto& t : tests) width = std::max(width, t.name.size());
  fmt::print("Selftests (run one with `nestcache selftest NAME`, all with `nestcache selftest --all`;\n"
             "`nestcache selftest NAME --help` shows a test's options):\n");
  for (const auto& t : tests) fmt::print("  {:<{}}  {}\n", t.name, width, t.summary);
  if (tests.empty()) fmt::print("  (none registered)\n");
}

int print_unknown(std::string_view name, bool json) {
  auto names = workloads::selftest_names();
  if (names.empty())
    return usage_error(json, "nestcache selftest", fmt::format("unknown selftest '{}': no selftest is registered", name));
  return usage_error(json, "nestcache selftest",
                     fmt::format("unknown selftest '{}'; valid names: {}", name, workloads::join_names(names)));
}

// What `selftest --all` has finished, shared by the loop that runs the tests
// and the thread that prints the summary when a signal ends the run. Text
// results are printed as each test ends; JSON ones at the end.
class SelftestReport {
 public:
  SelftestReport(const workloads::RunOptions& opts, size_t total) : opts_(opts), total_(total) {}

  void add(std::string_view name, const workloads::RunOptions& one, const workloads::SelftestResult& r)
      NC_EXCLUDES(mu_) {
    MutexLock l(mu_);
    if (finished_) return;  // a signal ended the run while this test ran
    passed_ += r.passed;
    ran_++;
    if (opts_.json)
      results_.push_back(workloads::selftest_json(std::string(name), one, r));
    else
      print_selftest_summary(name, one, r);
    std::fflush(stdout);
  }
  // The summary; `interrupted_by` names the signal that ended the run early.
  // Returns true if every test ran and passed.
  bool finish(const char* interrupted_by = nullptr) NC_EXCLUDES(mu_) {
    MutexLock l(mu_);
    const bool all_passed = !interrupted_by && ran_ == total_ && passed_ == total_;
    if (finished_) return all_passed;
    finished_ = true;
    if (opts_.json) {
      nlohmann::json j = {{"passed", all_passed},
                          {"summary",
                           {{"selftests", total_},
                            {"finished", ran_},
                            {"passed", passed_},
                            {"failed", ran_ - passed_},
                            {"strategy", vmx::strategy_name(opts_.strategy)},
                            {"memory", workloads::memory_kind_name(opts_.memory)}}},
                          {"results", results_}};
      if (interrupted_by) j["interrupted"] = interrupted_by;
      print_json(j);
    } else if (interrupted_by) {
      fmt::print("\nInterrupted by {}: {} of {} selftests finished, {} passed (strategy {}, memory {}).\n",
                 interrupted_by, ran_, total_, passed_, vmx::strategy_name(opts_.strategy),
                 workloads::memory_kind_name(opts_.memory));
    } else {
      fmt::print("\n{} of {} selftests passed (strategy {}, memory {}).\n", passed_, total_,
                 vmx::strategy_name(opts_.strategy), workloads::memory_kind_name(opts_.memory));
    }
    std::fflush(stdout);
    return all_passed;
  }

 private:
  const workloads::RunOptions opts_;
  const size_t total_;
  Mutex mu_{LockRank::kLeaf};
  nlohmann::json results_ NC_GUARDED_BY(mu_) = nlohmann::json::array();
  size_t ran_ NC_GUARDED_BY(mu_) = 0;
  size_t passed_ NC_GUARDED_BY(mu_) = 0;
  bool finished_ NC_GUARDED_BY(mu_) = false;
};

}  // namespace

void TestOptions::add(CLI::App& app, std::span<const workloads::OptionSpec> specs) {
  for (const workloads::OptionSpec& spec : specs) {
    auto e = std::make_unique<Entry>();
    e->spec = spec;
    if (spec.is_flag) {
      e->option = app.add_flag(spec.flag, e->flag, spec.help);
    } else {
      e->option = app.add_option(spec.flag, e->value, spec.help)->type_name(spec.type_name.empty() ? "VALUE" : spec.type_name);
      if (!spec.default_value.empty()) e->option->default_str(spec.default_value);
      if (spec.range) e->option->transform(in_range(spec.range->first, spec.range->second));
      if (!spec.choices.empty()) e->option->check(CLI::IsMember(spec.choices));
    }
    entries_.push_back(std::move(e));
  }
}

std::map<std::string, std::string> TestOptions::values() const {
  std::map<std::string, std::string> out;
  for (const auto& e : entries_) {
    if (e->option->count() > 0)
      out[e->spec.name()] = e->spec.is_flag ? (e->flag ? "true" : "false") : e->value;
    else if (!e->spec.is_flag && !e->spec.default_value.empty())
      out[e->spec.name()] = e->spec.default_value;
  }
  return out;
}

CLI::App* add_selftest_command(CLI::App& app, SelftestArgs& args) {
  CLI::App* cmd = app.add_subcommand("selftest", "List and run the correctness scenarios");
  args.command = cmd;
  cmd->require_subcommand(0, 1);
  args.name_option =
      cmd->add_option("NAME", args.name, "The selftest to run (without NAME and --all: list the selftests)");
  cmd->add_flag("--all", args.all, "Run every selftest with its default options");
  add_common_options(*cmd, args);
  cmd->footer(wrap_text(
      "A selftest runs one scenario and checks it: no stale access through a cache, no lost TPR write or "
      "posted interrupt, the seed's own counts. Each test has its own options (`nestcache selftest NAME "
      "--help`); the common options go before or after NAME.\n"
      "Exit status: 0 when every assertion held, 1 when one failed, 2 on a usage error, 130 / 143 when SIGINT / "
      "SIGTERM ended the run (the tests that finished are reported first, marked as interrupted)."));

  for (const workloads::SelftestInfo& t : workloads::selftests()) {
    CLI::App* sub = cmd->add_subcommand(t.name, t.summary);
    sub->footer(wrap_text(t.description));
    add_common_options(*sub, args);
    auto opts = std::make_unique<TestOptions>();
    opts->add(*sub, t.options);
    args.test_commands.push_back(sub);
    args.test_options.push_back(std::move(opts));
  }
  return cmd;
}

int run_selftest_command(SelftestArgs& args, bool json) {
  workloads::RunOptions opts;
  // Validated by CLI11 already; value() cannot fail here.
  opts.strategy = workloads::parse_strategy(args.strategy).value();
  opts.memory = workloads::parse_memory_kind(args.memory).value();
  opts.json = json;
  opts.verbose = args.verbose;

  const auto& tests = workloads::selftests();
  for (size_t i = 0; i < args.test_commands.size(); i++) {
    if (!args.test_commands[i]->parsed()) continue;
    if (args.all) return usage_error(json, "nestcache selftest", "give a test NAME or --all, not both");
    opts.extra = args.test_options[i]->values();
    // SIGINT / SIGTERM: the test did not finish; said so (a JSON result
    // under --json), and the run exits 130 / 143.
    const std::string& name = tests[i].name;
    auto watch = InterruptWatch::start([&name, json](int signo) {
      std::fputs("\n", stderr);  // past the progress line
      if (json)
        print_json({{"name", name}, {"passed", false}, {"interrupted", signal_name(signo)}});
      else
        fmt::print("\nInterrupted by {}: selftest {} did not finish.\n", signal_name(signo), name);
    });
    if (!watch) return run_error(json, "nestcache selftest", watch.error().to_string());
    workloads::Progress progress(!json);
    opts.progress = &progress;
    workloads::SelftestResult r = workloads::run_selftest(tests[i], opts);
    progress.finish();
    watch->reset();  // the result below is the whole output: a signal now ends the run as by default
    // A refused option is a usage error, not a failed test: reported as
    // every usage error is (on stderr, or one JSON error object).
    if (r.usage_error) {
      const std::string command = "nestcache selftest " + tests[i].name;
      if (json) return usage_error(true, command, fmt::format("{}", fmt::join(r.failures, "; ")));
      for (const std::string& f : r.failures) usage_error(false, command, f);
      return kExitUsage;
    }
    if (json)
      print_json(workloads::selftest_json(tests[i].name, opts, r));
    else
      print_selftest_summary(tests[i].name, opts, r);
    return r.passed ? kExitOk : kExitFailed;
  }
  if (!args.name.empty() || args.name_option->count() > 0) return print_unknown(args.name, json);
  if (args.all) {
    std::vector<const workloads::SelftestInfo*> all;
    for (const auto& t : tests) all.push_back(&t);
    return run_selftests(all, opts);
  }
  // Options for a run with nothing to run are a mistake, not a request for
  // the list.
  for (const char* option : {"--strategy", "--memory", "--verbose"}) {
    if (args.command->count(option) > 0)
      return usage_error(json, "nestcache selftest",
                         fmt::format("{} applies to a run: give a test NAME or --all (without either, selftest lists "
                                     "the tests)",
                                     option));
  }
  print_list(json);
  return kExitOk;
}

int run_selftests(std::span<const workloads::SelftestInfo* const> tests, workloads::RunOptions opts) {
  if (tests.empty()) {
    return run_error(opts.json, "nestcache selftest", "no selftest is registered");
  }
  SelftestReport report(opts, tests.size());
  // SIGINT / SIGTERM: the tests finished so far are reported, marked as
  // interrupted, and the run exits 130 / 143.
  auto watch = InterruptWatch::start([&report](int signo) {
    std::fputs("\n", stderr);  // past the progress line
    report.finish(signal_name(signo));
  });
  if (!watch) return run_error(opts.json, "nestcache selftest", watch.error().to_string());
  workloads::Progress progress(!opts.json);
  for (size_t i = 0; i < tests.size(); i++) {
    const workloads::SelftestInfo& t = *tests[i];
    workloads::RunOptions one = opts;
    one.extra = workloads::default_extra(t);
    one.progress = &progress;
    progress.update(i, tests.size(), t.name);
    workloads::SelftestResult r = workloads::run_selftest(t, one);
    progress.finish();
    report.add(t.name, one, r);
  }
  const bool all_passed = report.finish();  // a signal from here on finds the summary printed
  return all_passed ? kExitOk : kExitFailed;
}

}  // namespace nestcache::cli
