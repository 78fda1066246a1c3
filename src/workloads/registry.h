// The workload registry: every selftest and benchmark that `nestcache` can
// run, found by name.
//
// The workloads layer (DESIGN.md §1) builds scenarios from every layer below
// it; the cli layer parses the command line, looks scenarios up here by name
// and prints what they return. A scenario never parses argv and never prints
// its result: it gets RunOptions / BenchOptions (options.h) and returns a
// SelftestResult / BenchRow (results.h), so the same scenario runs from the
// CLI, from `nestcache` with no arguments and from GoogleTest.
//
// Adding a selftest (the same for a benchmark, with BenchInfo):
//
//   // src/workloads/my_selftest.cc
//   void register_my_selftest() {
//     register_selftest({
//         .name = "my-test",
//         .summary = "one line for `nestcache selftest`",
//         .description = "a paragraph for `nestcache selftest my-test --help`",
//         .options = {int_option("--delay-ms", "milliseconds between writes", "10", 0, 10000)},
//         .run = [](const RunOptions& opts) { ... return result; },
//     });
//   }
//
// and one line X(register_my_selftest) in registry.cc. Registration is
// explicit on purpose: this layer is a static library, and the linker drops
// an object file nobody references, together with any static initialiser
// that would have registered it.
//
// Thread safety: register_*() and register_all() run on the main thread
// before any lookup; lookups may then run from any thread.
#pragma once

#include <algorithm>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "workloads/options.h"
#include "workloads/results.h"

namespace nestcache::workloads {

struct SelftestInfo {
  // Every member has a default, so designated initialisers may leave any
  // out without -Wmissing-field-initializers.
  std::string name = {};         // command-line name, kebab-case
  std::string summary = {};      // one line, shown by `nestcache selftest`
  std::string description = {};  // a paragraph, shown by `nestcache selftest NAME --help`
  std::vector<OptionSpec> options = {};  // the test's own options (--mode, --delay-ms, ...)
  std::function<SelftestResult(const RunOptions&)> run = nullptr;
};

// Adds a selftest. Aborts on an empty name, a missing run function or a
// name registered twice (a programming error, found at start-up).
void register_selftest(SelftestInfo info);
// Every registered selftest, in registration order.
const std::vector<SelftestInfo>& selftests();
const SelftestInfo* find_selftest(std::string_view name);
// The names, for messages and lists.
std::vector<std::string> selftest_names();
// The test-specific options' defaults, as the CLI fills them in when none
// is given (for running a selftest from code or with --all).
std::map<std::string, std::string> default_extra(const SelftestInfo& info);

// Runs `info` with `opts`: turns an exception escaping the test into a
// failure, and makes `passed` agree with `failures`. Records the wall time
// in details["seconds"], and in details["teardown"] the nested contexts,
// threads and file descriptors the test left (teardown.h,
// process_teardown_json); anything left is a failure.
SelftestResult run_selftest(const SelftestInfo& info, const RunOptions& opts);

// The bench options that apply to some tests only. The rest (--runs,
// --seconds, --iterations, --exit-cost-ns, --extra-caches, the time model)
// apply to every test.
inline constexpr std::string_view kTestOptions[] = {"--slots",    "--scale",    "--verify",   "--l1-hz",   "--rate",
                                                    "--work",     "--l2-vcpus", "--l1-vcpus", "--msr-every"};

struct BenchInfo {
  std::string name = {};         // as in --tests, kebab-case ("unmap-chunked")
  // Tests that vary one parameter ("l2-switch-2", "l2-switch-8", ...) share a
  // group; --tests may name the group to run all of them, in registration order.
  std::string group = {};
  std::string summary = {};      // one line
  std::string description = {};  // a paragraph
  bool in_default_job = false;   // run by `nestcache` with no arguments
  // The test-specific bench options (kTestOptions) that apply to this test;
  // the others, given, are refused when no test of the run takes them.
  std::vector<std::string_view> options = {};
  // Runs the test once for one strategy (all --runs of it). An error means
  // the test could not run at all; failed checks go in BenchRow::failures.
  std::function<Result<BenchRow>(const BenchOptions&, vmx::StrategyKind)> run = nullptr;
  // Optional: plain sentences printed under the human table, given this
  // test's rows (all strategies): how to read them, the seed's figures
  // beside the view they correspond to. Not used with --json.
  std::function<std::vector<std::string>(std::span<const BenchRow>)> commentary = nullptr;
  // Optional: figures that compare this test's rows (all strategies), put
  // into the JSON report under comparisons[name].
  std::function<nlohmann::json(std::span<const BenchRow>)> compare = nullptr;
  // Optional: the rate of the L1 timer ticks that interrupt L2 in this test
  // under these options (null or 0: no ticks), for validate_for().
  std::function<uint32_t(const BenchOptions&)> l1_hz = nullptr;

  // `option` (one of kTestOptions) applies to this test.
  bool takes(std::string_view option) const {
    return std::find(options.begin(), options.end(), option) != options.end();
  }
};

// validate(o), and then what `test` needs of it: its L1 timer must leave L2
// time to run. A tick that interrupts L2 costs four exits, each charged
// --exit-cost-ns for the exit and the entry after it: L2's external-interrupt
// exit (reflected to L1), L1's two VMREADs of the exit (its reason and the
// interruption information; the model has no VMCS shadowing) and its
// VMRESUME. When those cost the whole tick period, every entry into L2
// finds the next tick pending and L2 never runs another instruction, and
// near it L2 runs a few instructions per tick, so the run takes as many more
// ticks as there are instructions to run. With map on unmanaged memory in
// modelled time the round trip also opens four remap windows (at
// --window-cost-ns or the calibrated cost), which count the same way. EINVAL
// naming the options when the ticks would take more than 90 % of L2's time.
Status validate_for(const BenchInfo& test, const BenchOptions& o);

// The failures a row of --runs N reports: those of the run it keeps (`kept`,
// the fastest), then every other run's, each marked "run I of N: ". A bench
// keeps one run's figures, but a check that failed in any run fails the row.
std::vector<std::string> failures_of_runs(const std::vector<std::vector<std::string>>& per_run, size_t kept);

// --runs N for a bench test: calls `one(r)` for r = 0..runs-1, each giving
// run r's row with its checks, and returns the row with the least time per
// iteration, as upstream ranks its runs (a run with no iteration never
// displaces one that has some), carrying every run's failures
// (failures_of_runs), and a failure when no run completed an iteration. The
// first error ends it.
Result<BenchRow> fastest_of_runs(uint32_t runs, const std::function<Result<BenchRow>(uint32_t)>& one);

void register_bench(BenchInfo info);
const std::vector<BenchInfo>& benches();
const BenchInfo* find_bench(std::string_view name);
// The tests of a group (empty if `group` names none).
std::vector<const BenchInfo*> find_bench_group(std::string_view group);
std::vector<std::string> bench_names();

// Registers every built-in scenario, once (later calls do nothing). The
// CLI calls it first thing; tests call it before looking names up.
void register_all();

}  // namespace nestcache::workloads
