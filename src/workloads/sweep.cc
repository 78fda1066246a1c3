#include "workloads/sweep.h"

#include <algorithm>
#include <charconv>
#include <limits>

#include "workloads/progress.h"
#include "workloads/window_cost.h"

namespace nestcache::workloads {

namespace {

constexpr SweepParam kParams[] = {SweepParam::slots, SweepParam::l2_per_l1, SweepParam::exit_cost_ns,
                                  SweepParam::rate, SweepParam::work, SweepParam::caches};

Result<uint32_t> narrow(SweepParam p, uint64_t value) {
  if (value > std::numeric_limits<uint32_t>::max())
    return errorf(EINVAL, "--sweep {}={}: {} is above {}", sweep_param_name(p), value, value,
                  std::numeric_limits<uint32_t>::max());
  return static_cast<uint32_t>(value);
}

// The figures of one point, JSON and CSV alike.
nlohmann::json point_json(const SweepPoint& p) {
  const BenchRow& r = p.row;
  nlohmann::json j = {
      {"value", p.value},
      {"strategy", vmx::strategy_name(r.strategy)},
      {"seconds_per_iteration", r.time_json(&BenchRow::seconds_per_iteration)},
      {"seconds_per_round_trip", r.time_json(&BenchRow::seconds_per_round_trip)},
      {"iterations", r.iterations},
      {"nested_round_trips", r.counters[Counter::nested_round_trips]},
      {"remap_windows", r.counters[Counter::remap_windows]},
      {"stale_accesses", r.counters[Counter::stale_accesses]},
      {"exit_cost_ns", r.exit_cost_ns},
      {"failures", r.failures},
      {"breakdown_per_round_trip", r.breakdown()["per_round_trip"]},
  };
  for (const char* key : {"requests_per_second", "round_trips_per_request", "slots_used", "slots_capped"})
    if (r.extra.contains(key)) j[key] = r.extra[key];
  return j;
}

}  // namespace

std::string_view sweep_param_name(SweepParam p) {
  switch (p) {
    case SweepParam::slots: return "slots";
    case SweepParam::l2_per_l1: return "l2-per-l1";
    case SweepParam::exit_cost_ns: return "exit-cost-ns";
    case SweepParam::rate: return "rate";
    case SweepParam::work: return "work";
    case SweepParam::caches: return "caches";
  }
  return "?";
}

std::string_view sweep_option_name(SweepParam p) {
  switch (p) {
    case SweepParam::slots: return "--slots";
    case SweepParam::l2_per_l1: return "--l2-vcpus";
    case SweepParam::exit_cost_ns: return "--exit-cost-ns";
    case SweepParam::rate: return "--rate";
    case SweepParam::work: return "--work";
    case SweepParam::caches: return "--extra-caches";
  }
  return "?";
}

std::vector<std::string> sweep_param_names() {
  std::vector<std::string> v;
  for (SweepParam p : kParams) v.emplace_back(sweep_param_name(p));
  return v;
}

Result<SweepSpec> parse_sweep(std::string_view text) {
  size_t eq = text.find('=');
  if (eq == std::string_view::npos)
    return errorf(EINVAL, "--sweep '{}': expected PARAM=v1,v2,... with PARAM one of {}", text,
                  join_names(sweep_param_names(), "or"));
  std::string_view name = text.substr(0, eq);
  SweepSpec spec;
  auto it = std::find_if(std::begin(kParams), std::end(kParams), [&](SweepParam p) { return sweep_param_name(p) == name; });
  if (it == std::end(kParams))
    return errorf(EINVAL, "--sweep: unknown parameter '{}'; expected {}", name, join_names(sweep_param_names(), "or"));
  spec.param = *it;
  std::string_view list = text.substr(eq + 1);
  if (list.find_first_not_of(' ') == std::string_view::npos)
    return errorf(EINVAL, "--sweep {}: no values given", name);
  for (const std::string& item : split_list(list)) {
    if (item.empty()) return errorf(EINVAL, "--sweep {}: an empty value in '{}'", name, list);
    uint64_t v = 0;
    auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
    if (ec == std::errc::result_out_of_range && end == item.data() + item.size())
      return errorf(EINVAL, "--sweep {}: {} is out of range (above {})", name, item,
                    std::numeric_limits<uint64_t>::max());
    if (ec != std::errc() || end != item.data() + item.size())
      return errorf(EINVAL, "--sweep {}: '{}' is not a non-negative integer", name, item);
    if (std::find(spec.values.begin(), spec.values.end(), v) != spec.values.end())
      return errorf(EINVAL, "--sweep {}: {} is given twice", name, v);
    spec.values.push_back(v);
  }
  return spec;
}

Result<BenchOptions> sweep_options(const BenchOptions& base, SweepParam p, uint64_t value) {
  BenchOptions o = base;
  switch (p) {
    case SweepParam::slots: o.slots = NC_TRY(narrow(p, value)); break;
    case SweepParam::l2_per_l1: {
      uint32_t per = NC_TRY(narrow(p, value));
      if (per == 0 || per > kMaxIoL2Vcpus / o.io.l1_vcpus)
        return errorf(EINVAL, "--sweep l2-per-l1: {} is outside 1..{} for {} L1 vCPU(s)", value,
                      kMaxIoL2Vcpus / o.io.l1_vcpus, o.io.l1_vcpus);
      o.io.l2_vcpus = per * o.io.l1_vcpus;
      break;
    }
    case SweepParam::exit_cost_ns: o.exit_cost_ns = value; break;
    case SweepParam::rate: o.io.rate = NC_TRY(narrow(p, value)); break;
    case SweepParam::work: o.io.work = NC_TRY(narrow(p, value)); break;
    case SweepParam::caches: o.extra_caches = NC_TRY(narrow(p, value)); break;
  }
  if (auto st = validate(o); !st) return tl::unexpected(st.error());
  return o;
}

Status check_sweep_applies(const BenchInfo& test, SweepParam p) {
  const bool io = test.name == "nested-io";
  switch (p) {
    case SweepParam::l2_per_l1:
    case SweepParam::rate:
    case SweepParam::work:
      if (!io) return errorf(EINVAL, "--sweep {}: applies to nested-io only, not {}", sweep_param_name(p), test.name);
      return ok();
    case SweepParam::slots:
      if (io || test.group == "l2-switch")
        return errorf(EINVAL, "--sweep slots: {} has no L2 memslots to vary", test.name);
      return ok();
    case SweepParam::exit_cost_ns:
    case SweepParam::caches: return ok();
  }
  return ok();
}

Status validate_sweep(const BenchInfo& test, const BenchOptions& base, const SweepSpec& spec) {
  if (spec.values.empty()) return errorf(EINVAL, "--sweep {}: no values given", sweep_param_name(spec.param));
  // A message from the options' own checks names the option ("--slots: 1 is
  // outside 2..32764"); the prefix names what was given ("--sweep slots=1").
  auto named = [&](uint64_t v, const Error& e) {
    if (e.message.starts_with("--sweep ")) return make_error(e.code, e.message);
    return make_error(e.code, fmt::format("--sweep {}={}: {}", sweep_param_name(spec.param), v, e.message));
  };
  for (uint64_t v : spec.values) {
    const Result<BenchOptions> point = sweep_options(base, spec.param, v);
    if (!point) return named(v, point.error());
    if (Status st = validate_for(test, *point); !st) return named(v, st.error());
  }
  return ok();
}

Result<std::vector<SweepPoint>> run_sweep(const BenchInfo& test, const BenchOptions& base, const SweepSpec& spec,
                                          const std::function<void(const SweepPoint&)>& on_point) {
  NC_TRY(validate_sweep(test, base, spec));
  std::vector<SweepPoint> points;
  const uint64_t total = spec.values.size() * base.strategies.size();
  for (uint64_t v : spec.values) {
    BenchOptions o = NC_TRY(sweep_options(base, spec.param, v));
    for (vmx::StrategyKind s : base.strategies) {
      if (base.progress)
        base.progress->update(points.size(), total,
                              fmt::format("{} {}={} / {}", test.name, sweep_param_name(spec.param), v, strategy_name(s)));
      BenchRow row = NC_TRY(test.run(o, s));
      row.test = test.name;
      row.strategy = s;
      points.push_back({v, std::move(row)});
      if (on_point) on_point(points.back());
    }
  }
  if (base.progress) base.progress->finish();
  return points;
}

nlohmann::json sweep_window_cost(const BenchOptions& o) {
  if (o.clock != cpu::ClockKind::modelled) return nullptr;
  auto j = window_cost_json(o.window_cost_ns);
  return j ? *j : nlohmann::json(nullptr);
}

nlohmann::json sweep_json(std::string_view test, const SweepSpec& spec, const BenchOptions& base,
                          const std::vector<SweepPoint>& points) {
  nlohmann::json strategies = nlohmann::json::array();
  for (vmx::StrategyKind s : base.strategies) strategies.push_back(vmx::strategy_name(s));
  nlohmann::json list = nlohmann::json::array();
  for (const SweepPoint& p : points) list.push_back(point_json(p));
  return {{"test", test},
          {"parameter", sweep_param_name(spec.param)},
          {"values", spec.values},
          {"strategies", strategies},
          {"memory", memory_kind_name(base.memory)},
          {"clock", clock_kind_name(base.clock)},
          {"window_cost", sweep_window_cost(base)},
          {"points", list}};
}

std::string sweep_csv(const SweepSpec& spec, const std::vector<SweepPoint>& points) {
  std::string out = fmt::format(
      "{},strategy,seconds_per_iteration,seconds_per_round_trip,iterations,nested_round_trips,remap_windows,"
      "stale_accesses,requests_per_second,round_trips_per_request\n",
      sweep_param_name(spec.param));
  for (const SweepPoint& p : points) {
    nlohmann::json j = point_json(p);
    // A missing figure or a time the point has none for: an empty field.
    auto optional = [&](const char* key) {
      return j.contains(key) && j[key].is_number() ? fmt::format("{:.6g}", j[key].get<double>()) : "";
    };
    out += fmt::format("{},{},{},{},{},{},{},{},{},{}\n", p.value, j["strategy"].get<std::string>(),
                       optional("seconds_per_iteration"), optional("seconds_per_round_trip"), p.row.iterations,
                       j["nested_round_trips"].get<uint64_t>(), j["remap_windows"].get<uint64_t>(),
                       j["stale_accesses"].get<uint64_t>(), optional("requests_per_second"),
                       optional("round_trips_per_request"));
  }
  return out;
}

}  // namespace nestcache::workloads
