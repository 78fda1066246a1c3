// Option parsing and the typed views of a scenario's options (see options.h).
#include "workloads/options.h"

#include <charconv>

#include <fmt/format.h>

#include "workloads/progress.h"

namespace nestcache::workloads {

namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

template <class T>
Result<T> parse_number(const std::string& name, const std::string& text) {
  T v{};
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size() || text.empty())
    return errorf(EINVAL, "option --{}: '{}' is not a number", name, text);
  return v;
}

}  // namespace

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

Result<vmx::StrategyKind> parse_strategy(std::string_view text) {
  if (auto s = vmx::parse_strategy(text)) return *s;
  std::vector<std::string> names;
  for (vmx::StrategyKind s : kAllStrategies) names.emplace_back(vmx::strategy_name(s));
  return errorf(EINVAL, "unknown strategy '{}': expected {}", text, join_names(names, "or"));
}

Result<std::vector<vmx::StrategyKind>> parse_strategy_list(std::string_view text) {
  if (trim(text) == "all") return std::vector<vmx::StrategyKind>(kAllStrategies.begin(), kAllStrategies.end());
  std::vector<vmx::StrategyKind> out;
  for (const std::string& item : split_list(text)) {
    if (item.empty()) return errorf(EINVAL, "empty strategy in list '{}': expected e.g. map,cache,oracle", text);
    if (item == "all") return errorf(EINVAL, "'all' (every strategy) stands alone, not in a list: '{}'", text);
    vmx::StrategyKind s = NC_TRY(parse_strategy(item));
    for (vmx::StrategyKind seen : out)
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
// Option declarations

std::string OptionSpec::name() const {
  std::string_view f = flag;
  if (size_t comma = f.rfind(','); comma != std::string_view::npos) f.remove_prefix(comma + 1);
  while (!f.empty() && f.front() == '-') f.remove_prefix(1);
  return std::string(f);
}

OptionSpec value_option(std::string flag, std::string help, std::string default_value) {
  return {.flag = std::move(flag), .help = std::move(help), .default_value = std::move(default_value)};
}

OptionSpec int_option(std::string flag, std::string help, std::string default_value, int64_t min, int64_t max) {
  OptionSpec o = value_option(std::move(flag), std::move(help), std::move(default_value));
  o.range = std::pair{min, max};
  return o;
}

OptionSpec choice_option(std::string flag, std::string help, std::string default_value,
                         std::vector<std::string> choices) {
  OptionSpec o = value_option(std::move(flag), std::move(help), std::move(default_value));
  o.choices = std::move(choices);
  return o;
}

OptionSpec flag_option(std::string flag, std::string help) {
  return {.flag = std::move(flag), .help = std::move(help), .is_flag = true};
}

std::map<std::string, std::string> default_values(std::span<const OptionSpec> specs) {
  std::map<std::string, std::string> out;
  for (const OptionSpec& s : specs)
    if (!s.is_flag && !s.default_value.empty()) out[s.name()] = s.default_value;
  return out;
}

// ---------------------------------------------------------------------------
// RunOptions and BenchOptions

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

Result<int64_t> RunOptions::int_value(const OptionSpec& spec) const {
  const std::string name = spec.name();
  auto it = extra.find(name);
  int64_t v = NC_TRY(parse_number<int64_t>(name, it == extra.end() ? spec.default_value : it->second));
  if (spec.range && (v < spec.range->first || v > spec.range->second))
    return errorf(EINVAL, "--{}: {} is out of range: {} to {}", name, v, spec.range->first, spec.range->second);
  return v;
}

void RunOptions::report_progress(uint64_t done, uint64_t total, std::string_view label) const {
  if (progress) progress->update(done, total, label);
}

void BenchOptions::report_progress(uint64_t done, uint64_t total, std::string_view label) const {
  if (progress) progress->update(done, total, label);
}

Status validate(const BenchOptions& o) {
  if (o.strategies.empty()) return errorf(EINVAL, "--strategy: no strategy given");
  if (o.slots < kMinBenchSlots || o.slots > kMaxBenchSlots)
    return errorf(EINVAL, "--slots: {} is outside {}..{}", o.slots, kMinBenchSlots, kMaxBenchSlots);
  if (!(o.seconds > 0)) return errorf(EINVAL, "--seconds: {} is not a positive time", o.seconds);
  if (o.runs < 1) return errorf(EINVAL, "--runs: at least one run is needed");
  if (o.exit_cost_ns && *o.exit_cost_ns > kMaxExitCostNs)
    return errorf(EINVAL, "--exit-cost-ns: {} is above {}", *o.exit_cost_ns, kMaxExitCostNs);
  if (o.extra_caches > kMaxExtraCaches)
    return errorf(EINVAL, "--extra-caches: {} is above {}", o.extra_caches, kMaxExtraCaches);
  if (o.window_cost_ns && *o.window_cost_ns > kMaxWindowCostNs)
    return errorf(EINVAL, "--window-cost-ns: {} is above {}", *o.window_cost_ns, kMaxWindowCostNs);
  if (o.window_cost_ns && o.clock == cpu::ClockKind::wall)
    return errorf(EINVAL, "--window-cost-ns: only modelled time charges a fixed window cost (--clock wall measures it)");
  if (!(o.scale > 0 && o.scale <= 1)) return errorf(EINVAL, "--scale: {} is outside (0, 1]", o.scale);
  for (auto [name, ns] : {std::pair{"--guest-op-ns", o.costs.op_ns}, std::pair{"--locked-op-ns", o.costs.locked_op_ns},
                          std::pair{"--pause-ns", o.costs.pause_ns}})
    if (ns > kMaxGuestOpNs) return errorf(EINVAL, "{}: {} is above {}", name, ns, kMaxGuestOpNs);
  const IoOptions& io = o.io;
  if (io.rate < 1 || io.rate > kMaxIoRate) return errorf(EINVAL, "--rate: {} is outside 1..{}", io.rate, kMaxIoRate);
  if (io.work > kMaxIoWork) return errorf(EINVAL, "--work: {} is above {}", io.work, kMaxIoWork);
  if (io.l2_vcpus < 1 || io.l2_vcpus > kMaxIoL2Vcpus)
    return errorf(EINVAL, "--l2-vcpus: {} is outside 1..{}", io.l2_vcpus, kMaxIoL2Vcpus);
  if (io.l1_vcpus < 1 || io.l1_vcpus > kMaxIoL1Vcpus)
    return errorf(EINVAL, "--l1-vcpus: {} is outside 1..{}", io.l1_vcpus, kMaxIoL1Vcpus);
  if (io.l1_vcpus > io.l2_vcpus)
    return errorf(EINVAL, "--l1-vcpus: {} L1 vCPUs for {} L2 vCPUs leaves one idle", io.l1_vcpus, io.l2_vcpus);
  return ok();
}

std::string_view clock_kind_name(cpu::ClockKind c) { return c == cpu::ClockKind::modelled ? "modelled" : "wall"; }

Result<cpu::ClockKind> parse_clock_kind(std::string_view text) {
  for (cpu::ClockKind c : {cpu::ClockKind::modelled, cpu::ClockKind::wall})
    if (text == clock_kind_name(c)) return c;
  return errorf(EINVAL, "unknown clock '{}': expected modelled or wall", text);
}

}  // namespace nestcache::workloads
