// `nestcache bench`: the seed's benchmark (memslot_perf in nested mode) for
// each page strategy, side by side: option parsing and validation, dispatch
// to the registered bench tests, the comparison table and the JSON report.
#include <algorithm>
#include <cstdio>
#include <optional>

#include <CLI/CLI.hpp>
#include <fmt/ranges.h>

#include "base/check.h"
#include "cli/commands.h"
#include "cli/interrupt.h"
#include "workloads/progress.h"
#include "workloads/sweep.h"

namespace nestcache::cli {

namespace {

// Resolves --tests (`given`: the option was on the command line). EINVAL
// for an empty list or item or an unknown name, ENOENT when nothing is
// registered.
Result<std::vector<const workloads::BenchInfo*>> resolve_tests(const std::string& list, bool given) {
  std::vector<std::string> valid = workloads::bench_names();
  std::string known = fmt::format("valid tests: {}", workloads::join_names(valid));
  std::vector<const workloads::BenchInfo*> tests;
  if (!given) {
    for (const auto& b : workloads::benches()) tests.push_back(&b);
    if (tests.empty()) return errorf(ENOENT, "no bench test is registered");
    return tests;
  }
  const std::vector<std::string> names = workloads::split_list(list);
  for (auto it = names.begin(); it != names.end(); ++it) {
    const std::string& name = *it;
    if (name.empty()) return errorf(EINVAL, "--tests: an empty name in '{}'; {}", list, known);
    // As --strategy and --sweep refuse a repeated value; a test that is also
    // in a group named beside it runs once.
    if (std::find(names.begin(), it, name) != it)
      return errorf(EINVAL, "--tests: '{}' is given twice in '{}'", name, list);
    std::vector<const workloads::BenchInfo*> named = workloads::find_bench_group(name);
    if (const workloads::BenchInfo* b = workloads::find_bench(name)) named = {b};
    if (named.empty()) return errorf(EINVAL, "--tests: unknown test '{}'; {}", name, known);
    for (const workloads::BenchInfo* b : named)
      if (std::find(tests.begin(), tests.end(), b) == tests.end()) tests.push_back(b);
  }
  if (tests.empty()) return errorf(EINVAL, "--tests: the list names no test; {}", known);
  return tests;
}

// The table of one test: one line per strategy, then the ratios of each view.
// Each row's modelled time by part, per round trip and per iteration.
// On the wall clock the parts are still the model's accounting, which the
// wall times of the table do not split into; the heading says so.
void print_breakdown(std::span<const workloads::BenchRow> rows) {
  if (std::none_of(rows.begin(), rows.end(), [](const workloads::BenchRow& r) {
        return r.has_time(&workloads::BenchRow::seconds_per_iteration);
      })) {
    fmt::print("  modelled time by part: none (no row has a time to split)\n");
    return;
  }
  bool wall = rows.front().clock == cpu::ClockKind::wall;
  fmt::print("  modelled time by part{}:\n  {:<8} {:<14} {:>10} {:>11} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
             wall ? " (the model's accounting: the table above is wall time, which these totals do not match)" : "",
             "strategy", "per", "total", "transitions", "guest ops", "windows", "pfn cache", "other L0", "idle");
  for (const auto& r : rows) {
    nlohmann::json b = r.breakdown();
    for (const char* view : {"per_round_trip", "per_iteration"}) {
      const nlohmann::json& v = b[view];
      if (v.empty()) continue;  // a view the row has no time for (BenchRow::breakdown)
      auto us = [&](const char* part) { return format_seconds(v.value(part, 0.0) / 1e9); };
      fmt::print("  {:<8} {:<14} {:>10} {:>11} {:>10} {:>10} {:>10} {:>10} {:>10}\n", vmx::strategy_name(r.strategy),
                 std::string_view(view) == "per_round_trip" ? "round trip" : "iteration", us("total_ns"),
                 us("transitions_ns"), us("guest_ops_ns"), us("remap_windows_ns"), us("pfn_cache_ns"),
                 us("other_l0_ns"), us("idle_ns"));
    }
  }
}

void print_test_table(const workloads::BenchInfo& info, std::span<const workloads::BenchRow> rows, bool verbose,
                      bool breakdown) {
  using vmx::StrategyKind;
  fmt::print("\n{} — {}\n", info.name, info.summary);
  fmt::print("  {:<8} {:>13} {:>10} {:>13} {:>14} {:>11} {:>10} {:>8} {:>9} {:>9} {:>9} {:>6}\n", "strategy",
             "per iteration", "iterations", "cold iteration", "per round trip", "round trips", "shootdowns",
             "ept12", "maps", "unmaps", "windows", "stale");
  for (const auto& r : rows) {
    fmt::print("  {:<8} {:>13} {:>10} {:>13} {:>14} {:>11} {:>10} {:>8} {:>9} {:>9} {:>9} {:>6}\n",
               vmx::strategy_name(r.strategy), format_row_time(r, &workloads::BenchRow::seconds_per_iteration),
               r.iterations, format_row_time(r, &workloads::BenchRow::cold_iteration_seconds),
               format_row_time(r, &workloads::BenchRow::seconds_per_round_trip),
               r.counters[Counter::nested_round_trips], r.counters[Counter::shootdowns],
               r.counters[Counter::ept12_faults], r.counters[Counter::maps], r.counters[Counter::unmaps],
               r.counters[Counter::remap_windows], r.counters[Counter::stale_accesses]);
    if (verbose) fmt::print("           {}\n", dump_json(r.to_json()));
  }
  const auto* map = workloads::row_of(rows, StrategyKind::map);
  const auto* cache = workloads::row_of(rows, StrategyKind::cache);
  const auto* oracle = workloads::row_of(rows, StrategyKind::oracle);
  if (cache && (map || oracle)) {
    fmt::print("  ratios:  {:<16} {:>10} {:>13}\n", "view", "map/cache", "cache/oracle");
    struct View {
      const char* name;
      double workloads::BenchRow::*field;
    };
    for (View v : {View{"per iteration", &workloads::BenchRow::seconds_per_iteration},
                   View{"cold iteration", &workloads::BenchRow::cold_iteration_seconds},
                   View{"per round trip", &workloads::BenchRow::seconds_per_round_trip}}) {
      auto ratio = [&](const workloads::BenchRow* num, const workloads::BenchRow* den) {
        return num && num->has_time(v.field) && den->has_time(v.field) ? format_ratio(num->*v.field, den->*v.field)
                                                                       : std::string("-");
      };
      fmt::print("           {:<16} {:>10} {:>13}\n", v.name, ratio(map, cache), oracle ? ratio(cache, oracle) : "-");
    }
  }
  if (breakdown) print_breakdown(rows);
  for (const auto& r : rows)
    for (const auto& f : r.failures) fmt::print("  FAILED {}/{}: {}\n", r.test, vmx::strategy_name(r.strategy), f);
  if (info.commentary)
    for (const std::string& sentence : info.commentary(rows)) fmt::print("  {}\n", sentence);
}

void print_bench_list(bool json) {
  const auto& tests = workloads::benches();
  if (json) {
    nlohmann::json list = nlohmann::json::array();
    for (const auto& t : tests)
      list.push_back({{"name", t.name},
                      {"group", t.group},
                      {"summary", t.summary},
                      {"description", t.description},
                      {"in_default_job", t.in_default_job},
                      {"options", t.options}});
    print_json(list);
    return;
  }
  size_t width = 0;
  for (const auto& t : tests) width = std::max(width, t.name.size());
  fmt::print("Bench tests (run some with `nestcache bench --tests a,b`; * = part of the main job):\n");
  // Each test's description says what its views measure and is printed
  // under the summary line, followed by which of the options for some tests
  // only it takes (BenchInfo::options).
  for (const auto& t : tests) {
    fmt::print("  {:<{}} {} {}\n", t.name, width, t.in_default_job ? '*' : ' ', t.summary);
    std::vector<std::string> takes, not_taken;
    for (std::string_view opt : workloads::kTestOptions) (t.takes(opt) ? takes : not_taken).emplace_back(opt);
    const std::string options =
        takes.empty() ? fmt::format("Takes none of {}.", fmt::join(not_taken, ", "))
                      : fmt::format("Takes {}{}.", fmt::join(takes, ", "),
                                    not_taken.empty() ? "" : fmt::format("; not {}", fmt::join(not_taken, ", ")));
    const std::string text = wrap_text(t.description.empty() ? options : t.description + " " + options, 96 - width);
    for (size_t at = 0; at < text.size();) {
      size_t end = std::min(text.find('\n', at), text.size());
      fmt::print("  {:<{}}   {}\n", "", width, std::string_view(text).substr(at, end - at));
      at = end + 1;
    }
  }
  std::vector<std::string> groups;
  for (const auto& t : tests)
    if (!t.group.empty() && std::find(groups.begin(), groups.end(), t.group) == groups.end()) groups.push_back(t.group);
  for (const auto& g : groups) {
    std::vector<std::string> members;
    for (const auto* t : workloads::find_bench_group(g)) members.push_back(t->name);
    fmt::print("  {:<{}}   = {}\n", g, width, workloads::join_names(members));
  }
  if (tests.empty()) fmt::print("  (none registered)\n");
}

// Runs one row; what the run throws (memory or a thread it could not get
// outside the machine) is its error, so the rows already done still print.
Result<workloads::BenchRow> run_one(const workloads::BenchInfo& t, const workloads::BenchOptions& o,
                                    vmx::StrategyKind s) {
  try {
    return t.run(o, s);
  } catch (const std::bad_alloc&) {
    return make_error(ENOMEM, "out of memory");
  } catch (const std::system_error& e) {
    return make_error(e.code().value(), e.what());
  } catch (const std::exception& e) {
    return make_error(EIO, e.what());
  }
}

// nested-io's own options.
void add_nested_io_options(CLI::App* cmd, BenchArgs& a) {
  using namespace workloads;
  cmd->add_option("--rate", a.io.rate, "nested-io: requests per second offered, all L2 vCPUs together")
      ->default_str(std::to_string(kDefaultIoRate))
      ->transform(in_range(1u, kMaxIoRate));
  cmd->add_option("--work", a.io.work, "nested-io: L2 memory operations per request")
      ->default_str(std::to_string(kDefaultIoWork))
      ->transform(in_range(0u, kMaxIoWork));
  cmd->add_option("--l2-vcpus", a.io.l2_vcpus, "nested-io: L2 vCPUs serving requests")
      ->default_str("1")
      ->transform(in_range(1u, kMaxIoL2Vcpus));
  cmd->add_option("--l1-vcpus", a.io.l1_vcpus, "nested-io: L1 vCPUs the L2 vCPUs are spread over")
      ->default_str("1")
      ->transform(in_range(1u, kMaxIoL1Vcpus));
  cmd->add_option("--msr-every", a.io.msr_every, "nested-io: one request in N writes an MSR L1 intercepts (0: none)")
      ->default_str(std::to_string(kDefaultIoMsrEvery))
      ->transform(in_range(0u, 1'000'000u));
}

// What modelled time charges (DESIGN.md §5).
void add_time_model_options(CLI::App* cmd, BenchArgs& a) {
  using namespace workloads;
  cmd->add_option("--clock", a.clock,
                  "What the times measure: modelled (fixed hardware costs for exits and guest instructions, "
                  "measured CPU time for L0 work; independent of load and free cores) or wall")
      ->type_name("modelled|wall")
      ->default_str("modelled")
      ->check(registry_validator(parse_clock_kind, "clock"));
  cmd->add_option("--guest-op-ns", a.guest_op_ns, "Modelled cost of a guest instruction (an L1d-hit load at 2.5 GHz)")
      ->default_str(std::to_string(a.guest_op_ns))
      ->transform(in_range(uint64_t{0}, kMaxGuestOpNs));
  cmd->add_option("--locked-op-ns", a.locked_op_ns, "Modelled cost of a locked compare-exchange")
      ->default_str(std::to_string(a.locked_op_ns))
      ->transform(in_range(uint64_t{0}, kMaxGuestOpNs));
  cmd->add_option("--pause-ns", a.pause_ns, "Modelled cost of PAUSE (about 140 cycles since Skylake)")
      ->default_str(std::to_string(a.pause_ns))
      ->transform(in_range(uint64_t{0}, kMaxGuestOpNs));
  a.window_cost_option =
      cmd->add_option("--window-cost-ns", a.window_cost_ns,
                      "Modelled cost of one remap window, mmap + munmap (default: measured once at start while "
                      "another thread of the process runs on another CPU, so each munmap pays one TLB shootdown)")
          ->transform(in_range(uint64_t{0}, kMaxWindowCostNs));
}

}  // namespace

CLI::App* add_bench_command(CLI::App& app, BenchArgs& a) {
  using namespace workloads;
  CLI::App* cmd = app.add_subcommand("bench", "Time the seed's benchmark for each page strategy, side by side");
  a.command = cmd;
  a.tests_option = cmd->add_option("--tests", a.tests, "Comma-separated bench tests to run (default: every registered test)")
                       ->type_name("a,b,...");
  cmd->add_option("--strategy", a.strategy, "Strategies to compare, comma-separated, in this order (or all)")
      ->type_name("map,cache,oracle")
      ->default_str("map,cache,oracle")
      ->check(registry_validator(parse_strategy_list, "strategies"));
  cmd->add_option("--memory", a.memory, "Frames backing guest memory: managed, or unmanaged (the seed's case)")
      ->type_name("managed|unmanaged")
      ->default_str("unmanaged")
      ->check(registry_validator(parse_memory_kind, "memory"));
  cmd->add_option("--slots", a.slots, "L2 memslots the guest memory is split over")
      ->default_str(std::to_string(kDefaultBenchSlots))
      ->transform(in_range(kMinBenchSlots, kMaxBenchSlots));
  CLI::Option* seconds = cmd->add_option("--seconds", a.seconds,
                                         "Iterate while the elapsed time is under this, on --clock's clock: modelled "
                                         "time by default, not the run's real duration (upstream -l)")
                             ->default_str(fmt::format("{}", kDefaultBenchSeconds))
                             ->transform(in_range(0.001, 86400.0));
  cmd->add_option("--iterations", a.iterations,
                  "Run exactly this many iterations instead of a time limit (not with --seconds)")
      ->transform(in_range(uint64_t{1}, uint64_t{1'000'000'000}))
      ->excludes(seconds);
  cmd->add_option("--runs", a.runs, "Repeat each test this many times and keep the best (upstream -r)")
      ->default_str("1")
      ->transform(in_range(1u, 1000u));
  a.exit_cost_option =
      cmd->add_option("--exit-cost-ns", a.exit_cost_ns,
                      "Modelled cost of a hardware VM exit + entry, ns (default: the CPU model's published "
                      "figure, 1,530 cycles of a VMCALL round trip on Skylake-SP at 2.5 GHz)")
          ->default_str(std::to_string(cpu::kDefaultExitCostNs))
          ->transform(in_range(uint64_t{0}, kMaxExitCostNs));
  a.l1_hz_option = cmd->add_option("--l1-hz", a.l1_hz,
                                   "L1 timer ticks per second interrupting L2 (0: off; nested-io: 1000 unless given)")
                       ->default_str(std::to_string(kDefaultL1Hz))
                       ->transform(in_range(0u, 100000u));
  cmd->add_option("--extra-caches", a.extra_caches,
                  "Idle pfn caches the VMM keeps registered on L1 memory during the run: every MMU-notifier "
                  "invalidation checks each, whatever the strategy")
      ->default_str("0")
      ->transform(in_range(0u, kMaxExtraCaches));
  add_nested_io_options(cmd, a);
  cmd->add_option("--scale", a.scale, "Shrink upstream's area sizes by this factor (quick runs)")
      ->default_str("1")
      ->transform(in_range(0.0001, 1.0));
  add_time_model_options(cmd, a);
  a.sweep_option = cmd->add_option("--sweep", a.sweep,
                  "Run the one test named by --tests at each value of one parameter, every strategy at each: "
                  "slots, l2-per-l1, exit-cost-ns, rate, work or caches (--extra-caches)")
      ->type_name("PARAM=v1,v2,...");
  a.csv_option =
      cmd->add_option("--csv", a.csv, "With --sweep: also write the points as CSV to this file")->type_name("FILE");
  cmd->add_flag("--breakdown", a.breakdown,
                "Print each row's modelled time per round trip and per iteration by part: transitions, guest "
                "operations, remap windows, pfn-cache work, other L0 work, idle");
  cmd->add_flag("--json", a.json, "Print one JSON object: the parameters and a row per test and strategy");
  cmd->add_flag("--verify", a.verify, "Check the values guest and host write (upstream -d)");
  cmd->add_flag("-v,--verbose", a.verbose, "Print each row's full counters and its time breakdown");
  cmd->add_flag("--list", a.list,
                "List the registered bench tests and exit (no option for a run beside it; with --json, as JSON)");
  cmd->footer(wrap_text(
      "L1 runs memslot_perf's tests against an L2 guest whose memory is split over --slots L2 memslots, once "
      "per strategy. Each row shows three views: upstream's average time per iteration, the cold first "
      "iteration, and the time per nested round trip, with the ratios map/cache and cache/oracle of each. "
      "Times are modelled (DESIGN.md §5): each hardware exit costs --exit-cost-ns, each guest instruction "
      "--guest-op-ns (locked ones and PAUSE more), and L0's own work what it measurably costs in CPU time; a "
      "thread that waits continues at the time of whoever it waited for. So results do not depend on the "
      "machine's load or free cores; --clock wall times the simulator instead. --breakdown splits each row's "
      "time into its parts. The exit cost used is printed with every result. `nestcache bench --list` describes "
      "each test: what it runs and which options apply to it.\n"
      "Exit status: 0 when every run completed and its checks held, 1 otherwise, 2 on a usage error."));
  return cmd;
}

int run_bench_command(const BenchArgs& a, bool json) {
  if (a.list) {
    // An option for a run beside --list would change nothing: a mistake, not
    // a request for the list (as selftest's options without a test).
    for (const CLI::Option* opt : a.command->get_options()) {
      const std::string name = opt->get_name();
      if (opt->count() == 0 || name == "--list" || name == "--json" || name == "--help") continue;
      return usage_error(json, "nestcache bench",
                         fmt::format("{} applies to a run, not to --list (which lists every test)", name));
    }
    print_bench_list(json);
    return kExitOk;
  }
  if (a.csv_option->count() > 0 && a.csv.empty()) return usage_error(json, "nestcache bench", "--csv: an empty file name");
  if (a.sweep_option->count() > 0 && a.sweep.empty())
    return usage_error(json, "nestcache bench", "--sweep: an empty value; expected PARAM=v1,v2,...");
  if (!a.csv.empty() && a.sweep.empty()) return usage_error(json, "nestcache bench", "--csv needs --sweep");
  auto tests = resolve_tests(a.tests, a.tests_option->count() > 0);
  if (!tests) {
    if (tests.error().code != EINVAL) {
      return run_error(json, "nestcache bench", tests.error().message);
    }
    return usage_error(json, "nestcache bench", tests.error().message);
  }
  // An option of some tests only, given for a run of none of them, would
  // change nothing: refused, naming the tests it applies to.
  for (std::string_view opt : workloads::kTestOptions) {
    const CLI::Option* given = a.command->get_option_no_throw(std::string(opt));
    NC_CHECK(given != nullptr);  // every entry of kTestOptions is a bench option
    if (given->count() == 0) continue;
    if (std::any_of(tests->begin(), tests->end(), [&](const workloads::BenchInfo* t) { return t->takes(opt); }))
      continue;
    std::vector<std::string> named, takers;
    for (const workloads::BenchInfo* t : *tests) named.push_back(t->name);
    for (const workloads::BenchInfo& t : workloads::benches())
      if (t.takes(opt)) takers.push_back(t.name);
    return usage_error(json, "nestcache bench",
                       fmt::format("{} does not apply to {}; it applies to {}", opt, workloads::join_names(named),
                                   workloads::join_names(takers)));
  }
  if (!a.sweep.empty() && (a.tests_option->count() == 0 || tests->size() != 1))
    return usage_error(json, "nestcache bench", "--sweep needs exactly one test in --tests");
  if (!a.sweep.empty()) {
    // A sweep sets its parameter at each point: the option it replaces, given
    // as well, would be silently overridden. The table shows points, not
    // rows: --breakdown and -v have nothing to add to (--json and --csv carry
    // each point's figures).
    if (auto spec = workloads::parse_sweep(a.sweep)) {
      const std::string varied(workloads::sweep_option_name(spec->param));
      if (a.command->get_option(varied)->count() > 0)
        return usage_error(json, "nestcache bench",
                           fmt::format("--sweep {0} sets {1} at each point; {1} cannot be given as well",
                                       workloads::sweep_param_name(spec->param), varied));
    }
    if (a.breakdown || a.verbose)
      return usage_error(json, "nestcache bench",
                         fmt::format("{} prints a bench table's rows, not a sweep's points (--json and --csv give "
                                     "each point's figures)",
                                     a.breakdown ? "--breakdown" : "-v/--verbose"));
  }
  workloads::BenchOptions o;
  o.strategies = workloads::parse_strategy_list(a.strategy).value();  // validated by CLI11
  o.memory = workloads::parse_memory_kind(a.memory).value();
  o.slots = a.slots;
  o.seconds = a.seconds;
  o.iterations = a.iterations;
  o.runs = a.runs;
  if (a.exit_cost_option->count() > 0) o.exit_cost_ns = a.exit_cost_ns;
  if (a.window_cost_option->count() > 0) o.window_cost_ns = a.window_cost_ns;
  o.extra_caches = a.extra_caches;
  o.l1_hz = a.l1_hz;
  o.l1_hz_is_default = a.l1_hz_option->count() == 0;
  o.io = a.io;
  o.scale = a.scale;
  o.clock = workloads::parse_clock_kind(a.clock).value();  // validated by CLI11
  o.costs = {.op_ns = a.guest_op_ns, .locked_op_ns = a.locked_op_ns, .pause_ns = a.pause_ns};
  o.breakdown = a.breakdown || a.verbose;
  o.json = json;
  o.verify = a.verify;
  o.verbose = a.verbose;
  if (!a.sweep.empty()) return run_sweep(*tests->front(), o, a.sweep, a.csv);
  return run_bench(*tests, o);
}

namespace {

// What a bench run has finished, shared by the loop that runs the rows and
// the thread that prints them when a signal ends the run. Text output is
// written test by test as each test's rows are all done.
class BenchPrinter {
 public:
  BenchPrinter(std::span<const workloads::BenchInfo* const> tests, const workloads::BenchOptions& o)
      : tests_(tests.begin(), tests.end()) {
    report_.options = o;
    report_.options.progress = nullptr;
  }

  void add(workloads::BenchRow row) NC_EXCLUDES(mu_) {
    MutexLock l(mu_);
    report_.rows.push_back(std::move(row));
  }
  // A row that could not run: said on stderr as it happens, and in the JSON
  // report, which would otherwise only lack the row.
  void could_not_run(const std::string& test, vmx::StrategyKind s, const Error& error) NC_EXCLUDES(mu_) {
    MutexLock l(mu_);
    fmt::print(stderr, "nestcache bench: {} with {} could not run: {}\n", test, vmx::strategy_name(s),
               error.to_string());
    report_.could_not_run.push_back({{"test", test}, {"strategy", vmx::strategy_name(s)}, {"error", error.to_string()}});
  }
  // Test `index` has all its rows: its comparison, if it has one, and the
  // tables of the tests done so far (text only).
  void test_done(size_t index) NC_EXCLUDES(mu_) {
    MutexLock l(mu_);
    const workloads::BenchInfo* t = tests_[index];
    if (t->compare) {
      std::vector<workloads::BenchRow> rows = rows_of_locked(*t);
      if (!rows.empty()) report_.comparisons[t->name] = t->compare(rows);
    }
    if (!report_.options.json) print_tests_locked(index + 1);
  }
  // The end of the run: the JSON report, or what text is left.
  void finish(bool ok, const char* interrupted_by = nullptr) NC_EXCLUDES(mu_) {
    MutexLock l(mu_);
    if (finished_) return;
    finished_ = true;
    if (report_.options.json) {
      nlohmann::json j = report_.to_json();
      if (interrupted_by) j["interrupted"] = interrupted_by;
      print_json(j);
    } else {
      print_tests_locked(tests_.size());
      if (interrupted_by)
        fmt::print("\nInterrupted by {}: {} row{} finished.\n", interrupted_by, report_.rows.size(),
                   report_.rows.size() == 1 ? "" : "s");
      else if (!ok)
        fmt::print("\nSome runs failed; see above.\n");
    }
    std::fflush(stdout);
  }

 private:
  void print_header_locked() NC_REQUIRES(mu_) {
    const workloads::BenchOptions& o = report_.options;
    // Only what applies to the tests of this run: the slot count if a memslot
    // test runs, the L1 timer if a test has one (l2-switch has none), with
    // the tests whose rate differs from --l1-hz named (nested-io's default).
    bool slots = false;
    std::vector<const workloads::BenchInfo*> timed;
    for (const workloads::BenchInfo* t : tests_) {
      slots |= t->takes("--slots");
      if (t->l1_hz) timed.push_back(t);
    }
    auto rate = [](uint32_t hz) { return hz ? fmt::format("{} Hz", hz) : std::string("off"); };
    std::string timer_part;
    if (!timed.empty()) {
      const uint32_t first = timed.front()->l1_hz(o);
      const bool same = std::all_of(timed.begin(), timed.end(), [&](auto* t) { return t->l1_hz(o) == first; });
      if (same) {
        timer_part = ", L1 timer " + rate(first);
      } else {
        std::vector<std::string> others;
        for (const workloads::BenchInfo* t : timed)
          if (t->l1_hz(o) != o.l1_hz) others.push_back(fmt::format("{}: {}", t->name, rate(t->l1_hz(o))));
        timer_part = fmt::format(", L1 timer {} ({})", rate(o.l1_hz), fmt::join(others, ", "));
      }
    }
    fmt::print("nestcache bench: {} time (guest instruction {} ns, locked {} ns, PAUSE {} ns), memory {}{}, "
               "exit cost {} ns per VM exit + entry{}{}, {}, best of {} run{}\n",
               workloads::clock_kind_name(o.clock), o.costs.op_ns, o.costs.locked_op_ns, o.costs.pause_ns,
               workloads::memory_kind_name(o.memory), slots ? fmt::format(", {} slots", o.slots) : "",
               report_.exit_cost_ns(), o.exit_cost_ns ? "" : " (model default)", timer_part,
               o.iterations ? fmt::format("{} iteration{} per run", o.iterations, o.iterations == 1 ? "" : "s")
                            : fmt::format("{} s per run", o.seconds),
               o.runs, o.runs == 1 ? "" : "s");
    if (o.scale != 1) fmt::print("areas scaled by {}\n", o.scale);
    if (nlohmann::json w = report_.window_cost(); w.is_object()) fmt::print("{}\n", format_window_cost(w));
  }
  // Prints tests [printed_, end) that have rows.
  void print_tests_locked(size_t end) NC_REQUIRES(mu_) {
    for (; printed_ < end; printed_++) {
      const workloads::BenchInfo* t = tests_[printed_];
      std::vector<workloads::BenchRow> rows = rows_of_locked(*t);
      if (rows.empty()) continue;
      if (!header_printed_) print_header_locked();
      header_printed_ = true;
      print_test_table(*t, rows, report_.options.verbose, report_.options.breakdown);
    }
    std::fflush(stdout);
  }

  std::vector<workloads::BenchRow> rows_of_locked(const workloads::BenchInfo& t) NC_REQUIRES(mu_) {
    std::vector<workloads::BenchRow> rows;
    for (const auto& r : report_.rows)
      if (r.test == t.name) rows.push_back(r);
    return rows;
  }

  const std::vector<const workloads::BenchInfo*> tests_;
  Mutex mu_{LockRank::kLeaf};
  workloads::BenchReport report_ NC_GUARDED_BY(mu_);
  size_t printed_ NC_GUARDED_BY(mu_) = 0;
  bool header_printed_ NC_GUARDED_BY(mu_) = false;
  bool finished_ NC_GUARDED_BY(mu_) = false;
};

}  // namespace

int run_bench(std::span<const workloads::BenchInfo* const> tests, workloads::BenchOptions o) {
  if (auto st = workloads::validate(o); !st) return usage_error(o.json, "nestcache bench", st.error().message);
  for (const workloads::BenchInfo* t : tests)
    if (auto st = workloads::validate_for(*t, o); !st) return usage_error(o.json, "nestcache bench", st.error().message);
  BenchPrinter printer(tests, o);
  // SIGINT / SIGTERM: the rows finished so far are printed, marked as
  // interrupted, and the run exits 130 / 143.
  auto watch = InterruptWatch::start([&printer](int signo) {
    std::fputs("\n", stderr);  // past the progress line
    printer.finish(false, signal_name(signo));
  });
  if (!watch) {
    return run_error(o.json, "nestcache bench", watch.error().to_string());
  }
  workloads::Progress progress(!o.json);
  o.progress = &progress;
  bool ok = true;
  size_t total = tests.size() * o.strategies.size(), done = 0;
  for (size_t i = 0; i < tests.size(); i++) {
    const workloads::BenchInfo* t = tests[i];
    for (vmx::StrategyKind s : o.strategies) {
      progress.update(done++, total, fmt::format("{} / {}", t->name, vmx::strategy_name(s)));
      auto row = run_one(*t, o, s);
      if (!row) {
        progress.finish();
        printer.could_not_run(t->name, s, row.error());
        ok = false;
        continue;
      }
      row->test = t->name;
      row->strategy = s;
      ok = ok && row->failures.empty();
      printer.add(std::move(*row));
    }
    progress.finish();
    printer.test_done(i);
  }
  printer.finish(ok);
  return ok ? kExitOk : kExitFailed;
}

}  // namespace nestcache::cli
