// The workload registry: every selftest and benchmark that `nestcache` can
// run, with the options they share and the shape of their results.
//
// The workloads layer (DESIGN.md §1) builds scenarios from every layer below
// it; the cli layer parses the command line, looks scenarios up here by
// name and prints what they return. A scenario never parses argv and never
// prints its result: it gets RunOptions / BenchOptions and returns a
// SelftestResult / BenchRow, so the same scenario runs from the CLI, from
// `nestcache` with no arguments and from GoogleTest.
//
// Adding a selftest (the same for a benchmark, with BenchInfo):
//
//   // src/workloads/my_selftest.cc
//   void register_my_selftest() {
//     register_selftest({
//         .name = "my-test",
//         .summary = "one line for `nestcache selftest`",
//         .description = "a paragraph for `nestcache selftest my-test --help`",
//         .add_options = [](CLI::App& app, SelftestOptions& o) {
//           o.add(app, "--delay-ms", "milliseconds between writes", "10")->check(CLI::Range(0, 10000));
//         },
//         .run = [](const RunOptions& opts) { ... return result; },
//     });
//   }
//
// and one line `register_my_selftest();` in register_all() (registry.cc).
// Registration is explicit on purpose: this layer is a static library, and
// the linker drops an object file nobody references, together with any
// static initialiser that would have registered it.
//
// Thread safety: register_*() and register_all() run on the main thread
// before any lookup; lookups may then run from any thread.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "base/counters.h"
#include "base/error.h"
#include "host/phys_mem.h"

namespace CLI {
class App;
class Option;
}  // namespace CLI

namespace nestcache::workloads {

class Progress;

// ---------------------------------------------------------------------------
// Options shared by every scenario
// ---------------------------------------------------------------------------

// How nested entry reaches L1's pages (DESIGN.md §4 "Page strategies").
enum class Strategy : uint8_t {
  map,     // HostMap on every nested entry, unmap on every exit (the kernel today)
  cache,   // persistent pfn caches (the seed)
  oracle,  // hardware-view pointers: the physical limit, unsafe by construction
};
inline constexpr std::array<Strategy, 3> kAllStrategies = {Strategy::map, Strategy::cache, Strategy::oracle};

// Which frames back guest memory (`--memory`). The host layer's own enum:
// the option chooses exactly what PhysMem carves, so there is nothing to map.
using MemoryKind = host::FrameKind;

// "map", "cache", "oracle".
std::string_view strategy_name(Strategy s);
// "managed", "unmanaged".
std::string_view memory_kind_name(MemoryKind m);

// Parses one strategy name. EINVAL: "unknown strategy 'x': expected map,
// cache or oracle".
Result<Strategy> parse_strategy(std::string_view text);
// Parses a comma-separated list ("map,cache,oracle"; "all" for all three),
// keeping the order given. EINVAL for an empty list, an empty item, an
// unknown name or a name given twice.
Result<std::vector<Strategy>> parse_strategy_list(std::string_view text);
// Parses "managed" or "unmanaged". EINVAL otherwise.
Result<MemoryKind> parse_memory_kind(std::string_view text);
// "a,b,c" -> {"a", "b", "c"}; surrounding spaces trimmed, empty items kept
// (as "") so callers can reject them.
std::vector<std::string> split_list(std::string_view text);
// "map, cache and oracle" / "map or cache": a list for messages.
std::string join_names(std::span<const std::string> names, std::string_view last_sep = "and");

// What every selftest run is given.
struct RunOptions {
  Strategy strategy = Strategy::cache;
  MemoryKind memory = MemoryKind::unmanaged;
  bool json = false;     // the caller prints JSON: scenarios print nothing either way
  bool verbose = false;  // scenarios may put more into details
  // Test-specific options by name without dashes ("delay-ms" -> "10"), as
  // declared by SelftestInfo::add_options. The CLI fills in every declared
  // option, given or defaulted; callers from code may leave them out.
  std::map<std::string, std::string> extra = {};
  // Optional progress display for long scenarios; may be null.
  Progress* progress = nullptr;

  // Typed views of `extra`. An absent option yields `fallback`; a value that
  // does not parse completely is EINVAL naming the option.
  Result<int64_t> int_option(const std::string& name, int64_t fallback) const;
  Result<double> double_option(const std::string& name, double fallback) const;
  std::string string_option(const std::string& name, std::string fallback) const;
  // True if the flag was given ("true" / "1").
  bool flag_option(const std::string& name) const;
  // Forwards to progress->update() when there is a display.
  void report_progress(uint64_t done, uint64_t total, std::string_view label) const;
};

// ---------------------------------------------------------------------------
// Selftests
// ---------------------------------------------------------------------------

// What a selftest found. `passed` is true exactly when `failures` is empty;
// fail() and check() keep the two in step.
struct SelftestResult {
  bool passed = true;
  // Assertion messages, one per failed check: "stale_accesses = 3, expected 0".
  std::vector<std::string> failures = {};
  // Plain sentences for the human summary: "map on unmanaged memory: 12 stale
  // accesses detected — the bug the seed fixes".
  std::vector<std::string> notes = {};
  // Anything else worth keeping in the JSON output (sizes, timings, ...).
  nlohmann::json details = nlohmann::json::object();
  // The run's counters, each event counted once (see merge_run_counters).
  CounterSnapshot counters = {};

  void fail(std::string message);
  void note(std::string sentence) { notes.push_back(std::move(sentence)); }
  // Records a failure formatted from `f` if `cond` is false (the message is
  // formatted only then). Returns `cond`, for early returns.
  template <class... Args>
  bool check(bool cond, fmt::format_string<Args...> f, Args&&... args) {
    if (!cond) fail(fmt::format(f, std::forward<Args>(args)...));
    return cond;
  }
};

// Test-specific options of one selftest, declared by its add_options. Each
// option is bound to a string; after parsing, values() becomes
// RunOptions::extra. Range and choice checks are CLI11 validators chained on
// the returned option, so a bad value is refused before the test runs.
class SelftestOptions {
 public:
  // Adds `flag` ("--delay-ms" or "-d,--delay-ms") taking a value, to `app`.
  // `default_value`, when not empty, is shown in --help and used when the
  // option is not given.
  CLI::Option* add(CLI::App& app, const std::string& flag, const std::string& help,
                   const std::string& default_value = "");
  // Adds a flag without a value; extra[name] is "true" when given.
  CLI::Option* add_flag(CLI::App& app, const std::string& flag, const std::string& help);
  // Every option given or defaulted, by name without dashes.
  std::map<std::string, std::string> values() const;

 private:
  // Heap-allocated so the addresses CLI11 writes to stay put.
  struct Entry {
    std::string name;
    std::string value;  // option value, written by CLI11
    bool flag = false;  // flag state, written by CLI11
    bool is_flag = false;
    std::string default_value;
    CLI::Option* option = nullptr;
  };
  std::vector<std::unique_ptr<Entry>> entries_;
};

struct SelftestInfo {
  // Every member has a default, so designated initialisers may leave any
  // out without -Wmissing-field-initializers.
  std::string name = {};         // command-line name, kebab-case
  std::string summary = {};      // one line, shown by `nestcache selftest`
  std::string description = {};  // a paragraph, shown by `nestcache selftest NAME --help`
  // Optional: declares test-specific options (--mode, --delay-ms, ...).
  std::function<void(CLI::App&, SelftestOptions&)> add_options = nullptr;
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
// The test-specific options' defaults, as the CLI would fill them in when
// none is given (for running a selftest from code or with --all).
std::map<std::string, std::string> default_extra(const SelftestInfo& info);

// Runs `info` with `opts`: turns an exception escaping the test into a
// failure, and makes `passed` agree with `failures`. Records the wall time
// in details["seconds"].
SelftestResult run_selftest(const SelftestInfo& info, const RunOptions& opts);

// {"test", "strategy", "memory", "passed", "failures", "notes", "counters",
//  "details", "options"}: the selftest JSON object (counters by snake_case
// name, CounterSnapshot::to_json).
nlohmann::json selftest_json(std::string_view test, const RunOptions& opts, const SelftestResult& r);

// ---------------------------------------------------------------------------
// Benchmarks (`nestcache bench`, issue 8's schema)
// ---------------------------------------------------------------------------

inline constexpr uint32_t kMinBenchSlots = 2;
inline constexpr uint32_t kMaxBenchSlots = 32764;  // KVM_USER_MEM_SLOTS
inline constexpr uint32_t kDefaultBenchSlots = 8192;  // the seed's table
inline constexpr double kDefaultBenchSeconds = 5.0;   // upstream memslot_perf_test -l
inline constexpr uint32_t kDefaultL1Hz = 250;         // L1 timer ticks (CONFIG_HZ=250)
inline constexpr uint64_t kMaxExitCostNs = 10'000'000;

struct BenchOptions {
  // Strategies to compare, in the order given (default: all three).
  std::vector<Strategy> strategies{kAllStrategies.begin(), kAllStrategies.end()};
  MemoryKind memory = MemoryKind::unmanaged;
  uint32_t slots = kDefaultBenchSlots;  // L2 memslots, [kMinBenchSlots, kMaxBenchSlots]
  double seconds = kDefaultBenchSeconds;  // time limit per run (upstream -l)
  uint64_t iterations = 0;  // > 0: run exactly this many iterations instead
  uint32_t runs = 1;        // best of this many runs (upstream -r)
  // Hardware exit + entry cost; nullopt: the CPU model's published default
  // (the run reports the value it used in BenchRow::exit_cost_ns).
  std::optional<uint64_t> exit_cost_ns;
  uint32_t l1_hz = kDefaultL1Hz;  // 0: no L1 timer ticks
  double scale = 1.0;             // (0, 1]: shrinks upstream's area sizes
  bool json = false;
  bool verify = false;  // upstream's -d value checks
  bool verbose = false;
  Progress* progress = nullptr;  // optional display; may be null

  void report_progress(uint64_t done, uint64_t total, std::string_view label) const;
};

// EINVAL with the option's name if a field is outside its range (the ranges
// of issue 8: slots 2..32764, seconds > 0, runs >= 1, scale in (0, 1], ...).
Status validate(const BenchOptions& o);

// One (test, strategy) result. The three views of DESIGN.md §6: upstream's
// average per iteration, the cold first iteration, the time per nested
// round trip; the counts come from `counters`.
struct BenchRow {
  std::string test = {};
  Strategy strategy = Strategy::cache;
  double seconds_per_iteration = 0;   // (1) average per iteration, best of --runs
  uint64_t iterations = 0;            //     iterations behind that average
  double cold_iteration_seconds = 0;  // (2) the first, cold iteration
  double seconds_per_round_trip = 0;  // (3) time per nested round trip
  uint64_t exit_cost_ns = 0;          // the exit cost the model used
  CounterSnapshot counters = {};      // of the best run (merge_run_counters)
  // Failed value checks (--verify) and broken invariants; empty = good.
  std::vector<std::string> failures = {};
  // Test-specific fields, merged into the row's JSON (must not reuse a
  // standard field's name).
  nlohmann::json extra = nlohmann::json::object();

  // {test, strategy, seconds_per_iteration, iterations, cold_iteration_seconds,
  //  seconds_per_round_trip, nested_round_trips, shootdowns, ept12_faults,
  //  maps, unmaps, remap_windows, stale_accesses, failures, counters, ...extra}.
  nlohmann::json to_json() const;
};

struct BenchInfo {
  std::string name = {};         // as in --tests, kebab-case ("unmap-chunked")
  // Tests that vary one parameter ("l2-switch-2", "l2-switch-8", ...) share a
  // group; --tests may name the group to run all of them, in registration order.
  std::string group = {};
  std::string summary = {};      // one line
  std::string description = {};  // a paragraph
  bool in_default_job = false;   // run by `nestcache` with no arguments
  // Runs the test once for one strategy (all --runs of it). An error means
  // the test could not run at all; failed checks go in BenchRow::failures.
  std::function<Result<BenchRow>(const BenchOptions&, Strategy)> run = nullptr;
  // Optional: plain sentences printed under the human table, given this
  // test's rows (all strategies): how to read them, the seed's figures
  // beside the view they correspond to. Not used with --json.
  std::function<std::vector<std::string>(std::span<const BenchRow>)> commentary = nullptr;
};

void register_bench(BenchInfo info);
const std::vector<BenchInfo>& benches();
const BenchInfo* find_bench(std::string_view name);
// The tests of a group (empty if `group` names none).
std::vector<const BenchInfo*> find_bench_group(std::string_view group);
std::vector<std::string> bench_names();

// A whole `nestcache bench` run: issue 8's JSON object.
struct BenchReport {
  BenchOptions options;
  std::vector<BenchRow> rows;

  // The exit cost to report: the option if given, else what the rows used.
  uint64_t exit_cost_ns() const;
  // {exit_cost_ns, l1_hz, slots, memory, seconds_limit, iterations_limit,
  //  runs, scale, strategies, results: [row...]}. Ratios are not stored:
  // every ratio derives from the rows.
  nlohmann::json to_json() const;
};

// ---------------------------------------------------------------------------
// Registration and shared helpers
// ---------------------------------------------------------------------------

// Registers every built-in scenario, once (later calls do nothing). The
// CLI calls it first thing; tests call it before looking names up.
void register_all();

// The counters of one run, each event once. PhysMem counts every remap
// window, pin and stale access in the pool, and a Vm or vCPU counts some of
// the same events again for its own report (HostMap passes it as `also`).
// So those pool counters are taken from `phys` alone, and every other
// counter is the sum over `others` (HostMm, Vm, vCPUs, ...).
CounterSnapshot merge_run_counters(const CounterSnapshot& phys, std::span<const CounterSnapshot> others);

}  // namespace nestcache::workloads
