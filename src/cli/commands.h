// The commands of the `nestcache` program (the cli layer, DESIGN.md §1).
//
// main.cc builds one CLI11 app from the pieces declared here: each command
// adds its options to the app, bound to its own Args struct, and after
// parsing runs through the workload registry (workloads/registry.h). The
// commands never know a scenario by name; everything they list and run
// comes from the registry.
//
// Exit status, everywhere: 0 success, 1 a test failed or could not run,
// 2 a usage error (bad option value, unknown test name).
#pragma once

#include <charconv>
#include <cmath>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "workloads/registry.h"
#include "workloads/stress.h"

namespace nestcache::cli {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailed = 1;
inline constexpr int kExitUsage = 2;

// CLI11's Range, with messages that say what is wrong with the value: "'abc'
// is not a number", "1.5 is not a whole number", "-5 is out of range: 1 to
// 100" (CLI11 says "Value abc not in range 1 to 100" for all three, and lets
// "nan" through a floating-point range). Its help text is Range's ("UINT in
// [1 - 100]").
//
// A number is written in decimal, as --sweep's values and a selftest's own
// options are read: "016" is 16, "1e-3" a thousandth; "0x10", "0x1p-3" and
// "+16" are refused with the decimal to write. A whole number's text is
// rewritten in plain digits ("016" -> "16"), because CLI11 reads a leading 0
// as octal once the check passed: add it with Option::transform
// (Option::check gets a copy).
template <class T>
CLI::Validator in_range(T lo, T hi) {
  auto check = [lo, hi](std::string& text) -> std::string {
    T v{};
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    const bool whole = end == text.data() + text.size();
    // A decimal too large or too small for a double (1e400, 1e-400).
    if (std::is_floating_point_v<T> && ec == std::errc::result_out_of_range && whole)
      return fmt::format("{} is out of range: {} to {}", text, lo, hi);
    const bool parsed = ec == std::errc() && whole && !std::isnan(static_cast<double>(v));
    if (std::is_integral_v<T> && parsed) text = std::to_string(v);
    if (!parsed) {
      double d = 0;
      if (CLI::detail::lexical_cast(text, d) && std::isfinite(d)) {
        if constexpr (std::is_integral_v<T>) {
          if (d != std::trunc(d)) return fmt::format("{} is not a whole number", text);
          if (d < static_cast<double>(lo) || d > static_cast<double>(hi))
            return fmt::format("{} is out of range: {} to {}", text, lo, hi);
          return fmt::format("'{}': write a whole number in digits ({:.0f})", text, d);
        } else {
          return fmt::format("'{}': write the number in decimal ({})", text, d);
        }
      }
      return fmt::format("'{}' is not a number", text);
    }
    if (v < lo || v > hi) return fmt::format("{} is out of range: {} to {}", text, lo, hi);
    return {};
  };
  return CLI::Validator(check, CLI::Range(lo, hi).get_description(), "RANGE");
}

// ---------------------------------------------------------------------------
// nestcache selftest [NAME | --all] [options]

// A selftest's own options on the command line: one CLI11 option per
// workloads::OptionSpec, bound to a string; after parsing, values() becomes
// RunOptions::extra. Ranges and choices are CLI11 checks, so a bad value is
// refused before the test runs.
class TestOptions {
 public:
  // Adds each of `specs` to `app` ("--delay-ms" taking a value, or a flag),
  // with its default shown in --help and its range or choices checked.
  void add(CLI::App& app, std::span<const workloads::OptionSpec> specs);
  // Every option given or defaulted, by name without dashes; a flag is
  // "true" or "false" when given, absent otherwise.
  std::map<std::string, std::string> values() const;

 private:
  // Heap-allocated so the addresses CLI11 writes to stay put.
  struct Entry {
    workloads::OptionSpec spec;
    std::string value;  // written by CLI11
    bool flag = false;  // written by CLI11
    CLI::Option* option = nullptr;
  };
  std::vector<std::unique_ptr<Entry>> entries_;
};

struct SelftestArgs {
  std::string name;  // a NAME that is no registered test (the known ones are sub-commands)
  CLI::Option* name_option = nullptr;  // given (perhaps empty) or not
  bool all = false;
  std::string strategy = "cache";
  std::string memory = "unmanaged";
  bool json = false;
  bool verbose = false;

  // One sub-command and one option set per registered selftest, in
  // registry order; filled by add_selftest_command.
  CLI::App* command = nullptr;
  std::vector<CLI::App*> test_commands;
  std::vector<std::unique_ptr<TestOptions>> test_options;
};

// Adds `selftest` to `app`, with one sub-command per registered selftest
// carrying the common options and the test's own.
CLI::App* add_selftest_command(CLI::App& app, SelftestArgs& args);
// Runs what the parsed command line asks for; returns the exit status.
// `json` is true when --json was given anywhere on the line.
int run_selftest_command(SelftestArgs& args, bool json);

// Runs each of `tests` with `opts` plus the test's default options, prints
// a summary per test (or one JSON object for all), returns the exit status.
int run_selftests(std::span<const workloads::SelftestInfo* const> tests, workloads::RunOptions opts);

// ---------------------------------------------------------------------------
// nestcache bench [options]

struct BenchArgs {
  std::string tests;  // not given: every registered bench test
  CLI::Option* tests_option = nullptr;  // given or not
  std::string strategy = "map,cache,oracle";
  std::string memory = "unmanaged";
  uint32_t slots = workloads::kDefaultBenchSlots;
  double seconds = workloads::kDefaultBenchSeconds;
  uint64_t iterations = 0;
  uint32_t runs = 1;
  uint64_t exit_cost_ns = 0;
  CLI::Option* exit_cost_option = nullptr;  // given or not
  uint64_t window_cost_ns = 0;
  uint32_t extra_caches = 0;
  CLI::Option* window_cost_option = nullptr;  // given or not
  uint32_t l1_hz = workloads::kDefaultL1Hz;
  CLI::Option* l1_hz_option = nullptr;  // given or not
  workloads::IoOptions io = {};
  std::string sweep;  // PARAM=v1,v2,...; empty: no sweep
  CLI::Option* sweep_option = nullptr;  // given or not
  std::string csv;    // with --sweep: also write the points here
  CLI::Option* csv_option = nullptr;  // given or not
  double scale = 1.0;
  std::string clock = "modelled";
  uint64_t guest_op_ns = cpu::GuestCosts{}.op_ns;
  uint64_t locked_op_ns = cpu::GuestCosts{}.locked_op_ns;
  uint64_t pause_ns = cpu::GuestCosts{}.pause_ns;
  bool breakdown = false;
  bool json = false;
  bool verify = false;
  bool verbose = false;
  bool list = false;
  CLI::App* command = nullptr;
};

CLI::App* add_bench_command(CLI::App& app, BenchArgs& args);
int run_bench_command(const BenchArgs& args, bool json);

// Runs every (test, strategy) pair with a progress display, prints the
// table (or the JSON report, BenchReport::to_json), returns the exit status.
int run_bench(std::span<const workloads::BenchInfo* const> tests, workloads::BenchOptions opts);
// `nestcache bench --tests T --sweep PARAM=v1,...`: `test` at each value for
// every strategy of `opts`; a table (or, with opts.json, only the JSON of
// workloads::sweep_json on stdout), and the CSV into `csv_path` if not
// empty. Progress goes to stderr. 2 on bad input, 1 if a run failed.
int run_sweep(const workloads::BenchInfo& test, workloads::BenchOptions opts, const std::string& sweep,
              const std::string& csv_path);

// ---------------------------------------------------------------------------
// nestcache run FILE|DIR... [options]   (run_command.cc)

struct RunArgs {
  std::vector<std::string> paths;
  bool json = false;
  bool quiet = false;
  std::string case_filter;
  CLI::Option* case_option = nullptr;  // given (perhaps empty) or not
  CLI::App* command = nullptr;
};

// Adds `run`: scenario files (docs/scenarios.md) with their expected outcomes.
CLI::App* add_run_command(CLI::App& app, RunArgs& args);
// Parses every file, runs every case, prints each step's outcome; returns
// 0 (all held), 1 (a step differed, a VM lacked a resource) or 2 (usage, bad
// file, a VM the model refuses).
int run_run_command(const RunArgs& args, bool json);

// ---------------------------------------------------------------------------
// nestcache stress [options]   (stress_command.cc)

struct StressArgs {
  double seconds = workloads::kDefaultStressSeconds;
  std::string strategy = "cache,oracle";
  std::string memory = "unmanaged";
  int64_t rounds = workloads::kDefaultStressRounds;
  bool json = false;
  bool verbose = false;
  CLI::App* command = nullptr;
};

// Adds `stress`: the soak run of workloads/stress.h.
CLI::App* add_stress_command(CLI::App& app, StressArgs& args);
// Runs the soak for each strategy in turn, printing each result as it
// finishes (or one JSON object at the end); returns 0 (every assertion
// held), 1 (one failed) or 2 (usage).
int run_stress_command(const StressArgs& args, bool json);

// ---------------------------------------------------------------------------
// nestcache (no command)

// The main job (DESIGN.md §8): the benchmarks registered for it
// (BenchInfo::in_default_job). One small function in default_job.cc.
int run_default_job(bool json);

// ---------------------------------------------------------------------------
// Helpers (output.cc)

// A CLI11 validator running one of the registry's parsers (parse_strategy,
// parse_memory_kind, ...), so the command line and code calling the
// registry report a bad value with the same message.
template <class Parse>
CLI::Validator registry_validator(Parse parse, const std::string& name) {
  return CLI::Validator(
      [parse](std::string& text) -> std::string {
        auto r = parse(text);
        return r ? std::string() : r.error().message;
      },
      "", name);
}

// "1.23 ms", "870 ns", "4.20 s": three significant digits.
std::string format_seconds(double seconds);
// A bench row's time for the view `field` (BenchRow::seconds_per_iteration,
// ...) as tables print it: format_seconds, or "-" for a view the row has no
// time for (no iteration, or no round trip), never 0 s.
std::string format_row_time(const workloads::BenchRow& row, double workloads::BenchRow::*field);
// The remap window's cost as bench and sweep headers print it, from
// BenchReport::window_cost's object: "remap window 17900 ns (mmap 2000 +
// munmap 15900), calibrated with another thread ..." or "..., --window-cost-ns".
std::string format_window_cost(const nlohmann::json& w);
// "17.2x", or "-" when the denominator is zero.
std::string format_ratio(double num, double den);
// Prints a selftest's human summary to stdout.
void print_selftest_summary(std::string_view test, const workloads::RunOptions& opts,
                            const workloads::SelftestResult& r);
// Breaks `text` into lines of at most `width` columns at spaces (for help
// paragraphs; CLI11 does not wrap them). Existing newlines are kept.
std::string wrap_text(std::string_view text, size_t width = 100);
// `j` as text (indented by `indent` spaces, -1: on one line); a string byte
// that is not UTF-8 becomes U+FFFD instead of an exception.
std::string dump_json(const nlohmann::json& j, int indent = -1);
// Prints JSON to stdout, indented, with a trailing newline (dump_json).
void print_json(const nlohmann::json& j);
// Reports a usage error of `command` ("nestcache bench"): `message` on
// stderr, or with `json` the object {"error": {"kind": "usage", "message",
// "exit_status": 2}} on stdout. Returns kExitUsage.
int usage_error(bool json, std::string_view command, const std::string& message);
// Reports that `command` could not run (a resource it could not have, a file
// it could not write): `message` on stderr, or with `json` the object
// {"error": {"kind": "failed", "message", "exit_status": 1}} on stdout.
// Returns kExitFailed.
int run_error(bool json, std::string_view command, const std::string& message);
// The end of every command: flushes stdout and returns `status`, or 1 (0
// becomes 1; a failure's status is kept) with "nestcache: cannot write the
// output: ENOSPC: ..." on stderr when what was printed could not be written
// (a full disk, /dev/full; `write_errno`, if not 0, is why an earlier write
// failed) or stdout was closed (`stdout_closed`). A reader that leaves a
// pipe ends the process with SIGPIPE first, as it does `cat`.
int finish_output(int status, bool stdout_closed, int write_errno = 0);

}  // namespace nestcache::cli
