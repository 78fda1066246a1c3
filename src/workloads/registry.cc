// The workload registry: option parsing, the selftest and bench registries,
// result JSON, and the list of built-in scenarios (see registry.h).
#include "workloads/registry.h"

#include <algorithm>
#include <charconv>
#include <chrono>
#include <exception>
#include <mutex>

#include <CLI/CLI.hpp>

#include "base/check.h"
#include "workloads/progress.h"

namespace nestcache::workloads {

// ---------------------------------------------------------------------------
// The built-in scenarios. To add one, write src/workloads/<name>.cc defining
// `void register_<name>()` in namespace nestcache::workloads (it calls
// register_selftest or register_bench), and add one X(...) line here. The
// order here is the order of `nestcache selftest` and `nestcache bench`.
#define NC_BUILTIN_WORKLOADS(X)         \
  X(register_memslots_selftest)         \
  X(register_vmx_instructions_selftest) \
  X(register_nested_pages_selftest)     \
  X(register_migrate_under_l2_selftest) \
  X(register_apic_update_selftest)      \
  X(register_l2_switch_selftest)        \
  X(register_nested_state_selftest)     \
  X(register_evmcs_selftest)            \
  X(register_memslot_perf_bench)        \
  X(register_l2_switch_bench)           \
  /* one line per scenario file, above this comment */

#define NC_DECLARE_REGISTER(fn) void fn();
NC_BUILTIN_WORKLOADS(NC_DECLARE_REGISTER)
#undef NC_DECLARE_REGISTER

void register_all() {
  static std::once_flag once;
  std::call_once(once, [] {
#define NC_CALL_REGISTER(fn) fn();
    NC_BUILTIN_WORKLOADS(NC_CALL_REGISTER)
#undef NC_CALL_REGISTER
  });
}

// ---------------------------------------------------------------------------
// Names and parsing

namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

std::vector<std::string> strategy_names() {
  std::vector<std::string> v;
  for (Strategy s : kAllStrategies) v.emplace_back(strategy_name(s));
  return v;
}

}  // namespace

std::string_view strategy_name(Strategy s) {
  switch (s) {
    case Strategy::map: return "map";
    case Strategy::cache: return "cache";
    case Strategy::oracle: return "oracle";
  }
  return "?";
}

std::string_view memory_kind_name(MemoryKind m) { return host::frame_kind_name(m); }

std::string join_names(std::span<const std::string> names, std::string_view last_sep) {
  std::string out;
  for (size_t i = 0; i < names.size(); i++) {
    if (i > 0) out += i + 1 == names.size() ? fmt::format(" {} ", last_sep) : std::string(", ");
    out += names[i];
  }
  return out;
}

std::vector<std::string> split_list(std::string_view text) {
  std::vector<std::string> items;
  for (;;) {
    size_t comma = text.find(',');
    items.emplace_back(trim(text.substr(0, comma)));
    if (comma == std::string_view::npos) break;
    text.remove_prefix(comma + 1);
  }
  return items;
}

Result<Strategy> parse_strategy(std::string_view text) {
  for (Strategy s : kAllStrategies)
    if (text == strategy_name(s)) return s;
  auto names = strategy_names();
  return errorf(EINVAL, "unknown strategy '{}': expected {}", text, join_names(names, "or"));
}

Result<std::vector<Strategy>> parse_strategy_list(std::string_view text) {
  if (trim(text) == "all") return std::vector<Strategy>(kAllStrategies.begin(), kAllStrategies.end());
  std::vector<Strategy> out;
  for (const std::string& item : split_list(text)) {
    if (item.empty()) return errorf(EINVAL, "empty strategy in list '{}': expected e.g. map,cache,oracle", text);
    Strategy s = NC_TRY(parse_strategy(item));
    for (Strategy seen : out)
      if (seen == s) return errorf(EINVAL, "strategy '{}' given twice in '{}'", item, text);
    out.push_back(s);
  }
  return out;
}

Result<MemoryKind> parse_memory_kind(std::string_view text) {
  for (MemoryKind m : {MemoryKind::managed, MemoryKind::unmanaged})
    if (text == memory_kind_name(m)) return m;
  return errorf(EINVAL, "unknown memory kind '{}': expected managed or unmanaged", text);
}

// ---------------------------------------------------------------------------
// RunOptions

namespace {

template <class T>
Result<T> parse_number(const std::string& name, const std::string& text) {
  T v{};
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size() || text.empty())
    return errorf(EINVAL, "option --{}: '{}' is not a number", name, text);
  return v;
}

}  // namespace

Result<int64_t> RunOptions::int_option(const std::string& name, int64_t fallback) const {
  auto it = extra.find(name);
  if (it == extra.end()) return fallback;
  return parse_number<int64_t>(name, it->second);
}

Result<double> RunOptions::double_option(const std::string& name, double fallback) const {
  auto it = extra.find(name);
  if (it == extra.end()) return fallback;
  return parse_number<double>(name, it->second);
}

std::string RunOptions::string_option(const std::string& name, std::string fallback) const {
  auto it = extra.find(name);
  return it == extra.end() ? std::move(fallback) : it->second;
}

bool RunOptions::flag_option(const std::string& name) const {
  auto it = extra.find(name);
  return it != extra.end() && (it->second == "true" || it->second == "1");
}

void RunOptions::report_progress(uint64_t done, uint64_t total, std::string_view label) const {
  if (progress) progress->update(done, total, label);
}

void BenchOptions::report_progress(uint64_t done, uint64_t total, std::string_view label) const {
  if (progress) progress->update(done, total, label);
}

// ---------------------------------------------------------------------------
// Selftests

void SelftestResult::fail(std::string message) {
  failures.push_back(std::move(message));
  passed = false;
}

CLI::Option* SelftestOptions::add(CLI::App& app, const std::string& flag, const std::string& help,
                                  const std::string& default_value) {
  auto e = std::make_unique<Entry>();
  e->option = app.add_option(flag, e->value, help)->type_name("VALUE");
  e->name = e->option->get_single_name();
  e->default_value = default_value;
  if (!default_value.empty()) e->option->default_str(default_value);
  entries_.push_back(std::move(e));
  return entries_.back()->option;
}

CLI::Option* SelftestOptions::add_flag(CLI::App& app, const std::string& flag, const std::string& help) {
  auto e = std::make_unique<Entry>();
  e->option = app.add_flag(flag, e->flag, help);
  e->name = e->option->get_single_name();
  e->is_flag = true;
  entries_.push_back(std::move(e));
  return entries_.back()->option;
}

std::map<std::string, std::string> SelftestOptions::values() const {
  std::map<std::string, std::string> out;
  for (const auto& e : entries_) {
    if (e->option->count() > 0)
      out[e->name] = e->is_flag ? (e->flag ? "true" : "false") : e->value;
    else if (!e->default_value.empty())
      out[e->name] = e->default_value;
  }
  return out;
}

namespace {

std::vector<SelftestInfo>& selftest_registry() {
  static std::vector<SelftestInfo> r;
  return r;
}

std::vector<BenchInfo>& bench_registry() {
  static std::vector<BenchInfo> r;
  return r;
}

}  // namespace

void register_selftest(SelftestInfo info) {
  NC_CHECK(!info.name.empty());
  NC_CHECK(info.run != nullptr);
  NC_CHECK(find_selftest(info.name) == nullptr);
  selftest_registry().push_back(std::move(info));
}

const std::vector<SelftestInfo>& selftests() { return selftest_registry(); }

const SelftestInfo* find_selftest(std::string_view name) {
  for (const SelftestInfo& t : selftest_registry())
    if (t.name == name) return &t;
  return nullptr;
}

std::vector<std::string> selftest_names() {
  std::vector<std::string> v;
  for (const SelftestInfo& t : selftest_registry()) v.push_back(t.name);
  return v;
}

std::map<std::string, std::string> default_extra(const SelftestInfo& info) {
  if (!info.add_options) return {};
  // Declare the options on a throwaway app and parse nothing: every option
  // then reads as its default, exactly as on a command line without it.
  CLI::App app;
  SelftestOptions opts;
  info.add_options(app, opts);
  return opts.values();
}

SelftestResult run_selftest(const SelftestInfo& info, const RunOptions& opts) {
  SelftestResult r;
  auto start = std::chrono::steady_clock::now();
  try {
    r = info.run(opts);
  } catch (const std::exception& e) {
    r.fail(fmt::format("the test threw an exception: {}", e.what()));
  }
  std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
  if (!r.passed && r.failures.empty()) r.fail("the test reported failure without saying why");
  if (!r.failures.empty()) r.passed = false;
  if (!r.details.is_object()) r.details = nlohmann::json{{"value", r.details}};
  r.details["seconds"] = took.count();
  return r;
}

nlohmann::json selftest_json(std::string_view test, const RunOptions& opts, const SelftestResult& r) {
  return {
      {"test", test},
      {"strategy", strategy_name(opts.strategy)},
      {"memory", memory_kind_name(opts.memory)},
      {"passed", r.passed},
      {"failures", r.failures},
      {"notes", r.notes},
      {"counters", r.counters.to_json()},
      {"details", r.details},
      {"options", opts.extra},
  };
}

// ---------------------------------------------------------------------------
// Benchmarks

Status validate(const BenchOptions& o) {
  if (o.strategies.empty()) return errorf(EINVAL, "--strategy: no strategy given");
  if (o.slots < kMinBenchSlots || o.slots > kMaxBenchSlots)
    return errorf(EINVAL, "--slots: {} is outside {}..{}", o.slots, kMinBenchSlots, kMaxBenchSlots);
  if (!(o.seconds > 0)) return errorf(EINVAL, "--seconds: {} is not a positive time", o.seconds);
  if (o.runs < 1) return errorf(EINVAL, "--runs: at least one run is needed");
  if (o.exit_cost_ns && *o.exit_cost_ns > kMaxExitCostNs)
    return errorf(EINVAL, "--exit-cost-ns: {} is above {}", *o.exit_cost_ns, kMaxExitCostNs);
  if (!(o.scale > 0 && o.scale <= 1)) return errorf(EINVAL, "--scale: {} is outside (0, 1]", o.scale);
  return ok();
}

nlohmann::json BenchRow::to_json() const {
  nlohmann::json j = {
      {"test", test},
      {"strategy", strategy_name(strategy)},
      {"seconds_per_iteration", seconds_per_iteration},
      {"iterations", iterations},
      {"cold_iteration_seconds", cold_iteration_seconds},
      {"seconds_per_round_trip", seconds_per_round_trip},
      {"failures", failures},
      {"counters", counters.to_json()},
  };
  for (Counter c : {Counter::nested_round_trips, Counter::shootdowns, Counter::ept12_faults, Counter::maps,
                    Counter::unmaps, Counter::remap_windows, Counter::stale_accesses})
    j[std::string(counter_name(c))] = counters[c];
  for (const auto& [key, value] : extra.items()) {
    NC_CHECK(!j.contains(key));  // a test-specific field must not shadow a standard one
    j[key] = value;
  }
  return j;
}

void register_bench(BenchInfo info) {
  NC_CHECK(!info.name.empty());
  NC_CHECK(info.run != nullptr);
  NC_CHECK(find_bench(info.name) == nullptr);
  NC_CHECK(find_bench_group(info.name).empty());
  bench_registry().push_back(std::move(info));
}

const std::vector<BenchInfo>& benches() { return bench_registry(); }

const BenchInfo* find_bench(std::string_view name) {
  for (const BenchInfo& b : bench_registry())
    if (b.name == name) return &b;
  return nullptr;
}

std::vector<const BenchInfo*> find_bench_group(std::string_view group) {
  std::vector<const BenchInfo*> v;
  for (const BenchInfo& b : bench_registry())
    if (!group.empty() && b.group == group) v.push_back(&b);
  return v;
}

std::vector<std::string> bench_names() {
  std::vector<std::string> v;
  for (const BenchInfo& b : bench_registry()) {
    if (!b.group.empty() && std::find(v.begin(), v.end(), b.group) == v.end()) v.push_back(b.group);
    v.push_back(b.name);
  }
  return v;
}

uint64_t BenchReport::exit_cost_ns() const {
  if (options.exit_cost_ns) return *options.exit_cost_ns;
  return rows.empty() ? 0 : rows.front().exit_cost_ns;
}

nlohmann::json BenchReport::to_json() const {
  nlohmann::json strategies = nlohmann::json::array();
  for (Strategy s : options.strategies) strategies.push_back(strategy_name(s));
  nlohmann::json results = nlohmann::json::array();
  for (const BenchRow& row : rows) results.push_back(row.to_json());
  return {
      {"exit_cost_ns", exit_cost_ns()},
      {"l1_hz", options.l1_hz},
      {"slots", options.slots},
      {"memory", memory_kind_name(options.memory)},
      {"seconds_limit", options.seconds},
      {"iterations_limit", options.iterations > 0 ? nlohmann::json(options.iterations) : nlohmann::json()},
      {"runs", options.runs},
      {"scale", options.scale},
      {"verify", options.verify},
      {"strategies", strategies},
      {"results", results},
  };
}

// ---------------------------------------------------------------------------
// Counters

CounterSnapshot merge_run_counters(const CounterSnapshot& phys, std::span<const CounterSnapshot> others) {
  // The pool's own counters: every event in them reaches PhysMem, whichever
  // object also counted it.
  static constexpr Counter kPoolCounters[] = {Counter::remap_windows, Counter::remap_windows_closed, Counter::pins,
                                              Counter::unpins, Counter::stale_accesses};
  CounterSnapshot sum;
  for (const CounterSnapshot& o : others) sum += o;
  for (Counter c : kPoolCounters) sum[c] = phys[c];
  return sum;
}

}  // namespace nestcache::workloads
