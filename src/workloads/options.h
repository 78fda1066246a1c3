// What a scenario is given: the options every selftest and benchmark shares
// (page strategy, memory kind, sizes, time limits), a selftest's own options
// declared as data, and the parsers both the command line and code use.
//
// A scenario never sees argv: the cli layer turns these declarations into
// command-line options, parses them with CLI11 and hands the values over in
// RunOptions / BenchOptions. Code (tests, the main job) builds the same
// structs directly.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "base/error.h"
#include "cpu/machine.h"
#include "host/phys_mem.h"
#include "vmx/page_strategy.h"

namespace nestcache::workloads {

class Progress;

// Scenarios name the page strategy by the vmx layer's enum.
using vmx::StrategyKind;

// The page strategies, in the order every report lists them.
inline constexpr std::array<vmx::StrategyKind, 3> kAllStrategies = {
    vmx::StrategyKind::map, vmx::StrategyKind::cache, vmx::StrategyKind::oracle};

// Which frames back guest memory (`--memory`): the host layer's FrameKind,
// named for the option that chooses it.
using MemoryKind = host::FrameKind;

// "managed", "unmanaged".
std::string_view memory_kind_name(MemoryKind m);

// Parses one strategy name. EINVAL: "unknown strategy 'x': expected map,
// cache or oracle".
Result<vmx::StrategyKind> parse_strategy(std::string_view text);
// Parses a comma-separated list ("map,cache,oracle"; "all" for all three),
// keeping the order given. EINVAL for an empty list, an empty item, an
// unknown name or a name given twice.
Result<std::vector<vmx::StrategyKind>> parse_strategy_list(std::string_view text);
// Parses "managed" or "unmanaged". EINVAL otherwise.
Result<MemoryKind> parse_memory_kind(std::string_view text);
// "a,b,c" -> {"a", "b", "c"}; surrounding spaces trimmed, empty items kept
// (as "") so callers can reject them.
std::vector<std::string> split_list(std::string_view text);
// "map, cache and oracle" / "map or cache": a list for messages.
std::string join_names(std::span<const std::string> names, std::string_view last_sep = "and");

// ---------------------------------------------------------------------------
// A selftest's own options
// ---------------------------------------------------------------------------

// One option of one selftest (`--delay-ms 10`, `--evmcs`), as data. The cli
// layer adds it to the test's sub-command and refuses a value outside
// `range` or `choices` before the test runs.
struct OptionSpec {
  std::string flag = {};           // "--delay-ms"
  std::string help = {};
  std::string default_value = {};  // shown in --help and used when not given; "" = none
  bool is_flag = false;            // takes no value; "true" when given
  std::optional<std::pair<int64_t, int64_t>> range = std::nullopt;  // integers in [first, second]
  std::vector<std::string> choices = {};                             // one of these words
  std::string type_name = {};      // the value's name in --help ("N"); empty: "VALUE"

  // The flag without its dashes: the key in RunOptions::extra.
  std::string name() const;
};

// An option taking any value.
OptionSpec value_option(std::string flag, std::string help, std::string default_value = {});
// An integer option in [min, max].
OptionSpec int_option(std::string flag, std::string help, std::string default_value, int64_t min, int64_t max);
// An option taking one of `choices`.
OptionSpec choice_option(std::string flag, std::string help, std::string default_value,
                         std::vector<std::string> choices);
// A flag without a value.
OptionSpec flag_option(std::string flag, std::string help);

// The values a command line without any of `specs` gives: each default, by
// name (flags and options without a default are left out).
std::map<std::string, std::string> default_values(std::span<const OptionSpec> specs);

// ---------------------------------------------------------------------------
// Selftests
// ---------------------------------------------------------------------------

// What every selftest run is given.
struct RunOptions {
  vmx::StrategyKind strategy = vmx::StrategyKind::cache;
  MemoryKind memory = MemoryKind::unmanaged;
  bool json = false;     // the caller prints JSON: scenarios print nothing either way
  bool verbose = false;  // scenarios may put more into details
  // Test-specific options by name without dashes ("delay-ms" -> "10"), as
  // declared by SelftestInfo::options. The CLI fills in every declared
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
  // The integer value of `spec`'s option: extra's, else spec's default.
  // EINVAL if it does not parse, or is outside spec.range ("--rounds: 0 is
  // out of range: 1 to 10000", as the command line says it).
  Result<int64_t> int_value(const OptionSpec& spec) const;
  // Forwards to progress->update() when there is a display.
  void report_progress(uint64_t done, uint64_t total, std::string_view label) const;
};

// ---------------------------------------------------------------------------
// Benchmarks (`nestcache bench`)
// ---------------------------------------------------------------------------

inline constexpr uint32_t kMinBenchSlots = 2;
inline constexpr uint32_t kMaxBenchSlots = 32764;     // KVM_USER_MEM_SLOTS
inline constexpr uint32_t kDefaultBenchSlots = 8192;  // the seed's table
inline constexpr double kDefaultBenchSeconds = 5.0;   // upstream memslot_perf_test -l
inline constexpr uint32_t kDefaultL1Hz = 250;         // L1 timer ticks (CONFIG_HZ=250)
inline constexpr uint64_t kMaxExitCostNs = 10'000'000;
inline constexpr uint64_t kMaxWindowCostNs = 10'000'000;
// --extra-caches: registered pfn caches beyond the strategy's own (one remap
// window each on unmanaged memory, well inside the process's map count).
inline constexpr uint32_t kMaxExtraCaches = 8192;
inline constexpr uint64_t kMaxGuestOpNs = 1'000'000;

// nested-io's own parameters (`nestcache bench --tests nested-io`; where
// each default comes from: docs/workloads.md).
inline constexpr uint32_t kDefaultIoRate = 10'000;     // requests per second, all L2 vCPUs together
inline constexpr uint32_t kMaxIoRate = 10'000'000;
inline constexpr uint32_t kDefaultIoWork = 256;        // memory operations per request
inline constexpr uint32_t kMaxIoWork = 1'000'000;
inline constexpr uint32_t kDefaultIoMsrEvery = 4;      // one request in N does an intercepted WRMSR
inline constexpr uint32_t kDefaultIoL1Hz = 1000;       // CONFIG_HZ=1000
inline constexpr uint32_t kMaxIoL1Vcpus = 8;
inline constexpr uint32_t kMaxIoL2Vcpus = 64;

struct IoOptions {
  uint32_t rate = kDefaultIoRate;  // offered load, requests per second (modelled), [1, kMaxIoRate]
  uint32_t work = kDefaultIoWork;  // L2 memory operations per request, [0, kMaxIoWork]
  uint32_t l2_vcpus = 1;           // L2 vCPUs serving requests, [1, kMaxIoL2Vcpus]
  uint32_t l1_vcpus = 1;           // L1 vCPUs they are spread over, [1, kMaxIoL1Vcpus], <= l2_vcpus
  uint32_t msr_every = kDefaultIoMsrEvery;  // 0: no MSR accesses
};

struct BenchOptions {
  // Strategies to compare, in the order given (default: all three).
  std::vector<vmx::StrategyKind> strategies{kAllStrategies.begin(), kAllStrategies.end()};
  MemoryKind memory = MemoryKind::unmanaged;
  uint32_t slots = kDefaultBenchSlots;    // L2 memslots, [kMinBenchSlots, kMaxBenchSlots]
  double seconds = kDefaultBenchSeconds;  // time limit per run (upstream -l)
  uint64_t iterations = 0;  // > 0: run exactly this many iterations instead
  uint32_t runs = 1;        // best of this many runs (upstream -r)
  // Hardware exit + entry cost; nullopt: the CPU model's published default
  // (the run reports the value it used in BenchRow::exit_cost_ns).
  std::optional<uint64_t> exit_cost_ns;
  // What modelled time charges a remap window (mmap + munmap); nullopt: the
  // cost calibrated once per process (host/window_cost.h).
  std::optional<uint64_t> window_cost_ns;
  // Idle pfn caches the VMM keeps registered on L1's memory during the run:
  // every MMU-notifier invalidation checks each, whatever the strategy.
  uint32_t extra_caches = 0;
  uint32_t l1_hz = kDefaultL1Hz;  // 0: no L1 timer ticks
  // False when l1_hz was chosen (--l1-hz): tests with a default rate of
  // their own (nested-io: kDefaultIoL1Hz) use it only then.
  bool l1_hz_is_default = true;
  IoOptions io = {};
  double scale = 1.0;             // (0, 1]: shrinks upstream's area sizes
  // What a result measures (DESIGN.md §5): modelled time by default, with
  // guest operations at these hardware costs; or the wall clock.
  cpu::ClockKind clock = cpu::ClockKind::modelled;
  cpu::GuestCosts costs = {};
  bool breakdown = false;  // the table prints each row's modelled time by part
  bool json = false;
  bool verify = false;  // upstream's -d value checks
  bool verbose = false;
  Progress* progress = nullptr;  // optional display; may be null

  void report_progress(uint64_t done, uint64_t total, std::string_view label) const;
};

// "modelled", "wall".
std::string_view clock_kind_name(cpu::ClockKind c);
// Parses "modelled" or "wall". EINVAL otherwise.
Result<cpu::ClockKind> parse_clock_kind(std::string_view text);

// EINVAL with the option's name if a field is outside its range (slots
// 2..32764, seconds > 0, runs >= 1, scale in (0, 1], exit cost <= 10 ms,
// guest operation costs <= 1 ms, nested-io's rate, work and vCPU counts,
// with no more L1 vCPUs than L2 vCPUs).
Status validate(const BenchOptions& o);

}  // namespace nestcache::workloads
