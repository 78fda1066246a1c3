// The workload registry: the selftest and bench registries and the list of
// built-in scenarios (see registry.h).
#include "workloads/registry.h"

#include <algorithm>
#include <chrono>
#include <exception>
#include <mutex>
#include <optional>

#include "base/check.h"
#include "workloads/teardown.h"
#include "workloads/window_cost.h"

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
  X(register_nested_io_bench)           \
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

// ---------------------------------------------------------------------------
// Selftests

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

std::map<std::string, std::string> default_extra(const SelftestInfo& info) { return default_values(info.options); }

SelftestResult run_selftest(const SelftestInfo& info, const RunOptions& opts) {
  SelftestResult r;
  const ProcessResources before = ProcessResources::now();
  auto start = std::chrono::steady_clock::now();
  try {
    r = info.run(opts);
  } catch (const std::exception& e) {
    r.fail(fmt::format("the test threw an exception: {}", e.what()));
  }
  // A test's VMs and threads are gone once it returns: what is still there
  // now, it leaked.
  Teardown left;
  left.take_process(before);
  r.check(left.none(), "left after the test: {} nested contexts, {} threads, {} file descriptors", left.contexts,
          left.threads, left.fds_leaked);
  std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
  if (!r.passed && r.failures.empty()) r.fail("the test reported failure without saying why");
  if (!r.failures.empty()) r.passed = false;
  if (!r.details.is_object()) r.details = nlohmann::json{{"value", r.details}};
  r.details["seconds"] = took.count();
  r.details["teardown"] = process_teardown_json(left);
  return r;
}

// ---------------------------------------------------------------------------
// Benchmarks

void register_bench(BenchInfo info) {
  NC_CHECK(!info.name.empty());
  NC_CHECK(info.run != nullptr);
  NC_CHECK(find_bench(info.name) == nullptr);
  NC_CHECK(find_bench_group(info.name).empty());
  for (std::string_view opt : info.options)
    NC_CHECK(std::find(std::begin(kTestOptions), std::end(kTestOptions), opt) != std::end(kTestOptions));
  NC_CHECK(info.takes("--l1-hz") == (info.l1_hz != nullptr));  // a timer's rate comes from its function
  bench_registry().push_back(std::move(info));
}

namespace {

// What the remap windows of one tick's round trip cost when the run includes
// map on unmanaged memory, in modelled time: map opens a window for each of
// the four vmcs12 pages (MSR bitmap, APIC-access, virtual-APIC, descriptor)
// on every nested entry. 0 when no strategy of the run opens windows, or
// when the calibration fails (the run then reports that failure itself).
uint64_t tick_window_ns(const BenchOptions& o) {
  constexpr uint64_t kMapWindowsPerRoundTrip = 4;
  bool map = std::find(o.strategies.begin(), o.strategies.end(), vmx::StrategyKind::map) != o.strategies.end();
  if (!map || o.memory != MemoryKind::unmanaged || o.clock != cpu::ClockKind::modelled) return 0;
  auto cost = modelled_window_cost(o.window_cost_ns);
  return cost ? kMapWindowsPerRoundTrip * cost->total() : 0;
}

}  // namespace

std::vector<std::string> failures_of_runs(const std::vector<std::vector<std::string>>& per_run, size_t kept) {
  std::vector<std::string> out;
  if (kept < per_run.size()) out = per_run[kept];
  for (size_t i = 0; i < per_run.size(); i++) {
    if (i == kept) continue;
    for (const std::string& f : per_run[i]) out.push_back(fmt::format("run {} of {}: {}", i + 1, per_run.size(), f));
  }
  return out;
}

Result<BenchRow> fastest_of_runs(uint32_t runs, const std::function<Result<BenchRow>(uint32_t)>& one) {
  std::optional<BenchRow> best;
  size_t best_index = 0;
  std::vector<std::vector<std::string>> failures;
  for (uint32_t r = 0; r < runs; r++) {
    BenchRow row = NC_TRY(one(r));
    failures.push_back(row.failures);
    // A run with no iteration has 0 s per iteration: it never displaces
    // one that has some, and any run with some displaces it.
    if (!best || (row.iterations > 0 &&
                  (best->iterations == 0 || row.seconds_per_iteration < best->seconds_per_iteration))) {
      best = std::move(row);
      best_index = r;
    }
  }
  if (!best) return errorf(EINVAL, "--runs 0: no run to keep");
  best->failures = failures_of_runs(failures, best_index);
  // No run completed an iteration (the time limit ran out first): the row
  // has no time to show, which is a failed run, not a result of 0 s.
  if (best->iterations == 0)
    best->failures.push_back(fmt::format("no iteration completed in {}, so the row has no result: give a longer "
                                         "--seconds or use --iterations",
                                         runs == 1 ? "the run" : "any run"));
  return std::move(*best);
}

Status validate_for(const BenchInfo& test, const BenchOptions& o) {
  NC_TRY(validate(o));
  const uint32_t hz = test.l1_hz ? test.l1_hz(o) : 0;
  if (hz == 0) return ok();
  constexpr uint64_t kExitsPerTick = 4;  // see the header: L2's exit, two VMREADs, VMRESUME
  constexpr uint64_t kMaxTickSharePercent = 90;
  const uint64_t exit_cost = o.exit_cost_ns.value_or(cpu::kDefaultExitCostNs);
  const uint64_t period_ns = 1'000'000'000ull / hz;
  const uint64_t transitions_ns = exit_cost * kExitsPerTick;  // at most 4e7: no overflow below
  if (transitions_ns * 100 > period_ns * kMaxTickSharePercent)
    return errorf(EINVAL,
                  "--exit-cost-ns {} with L1 timer ticks at {} Hz: a tick that interrupts L2 costs {} exits, "
                  "{} ns of each {} ns period, which leaves L2 {} (the test {} needs --exit-cost-ns at most {} at {} "
                  "Hz, or a lower --l1-hz)",
                  exit_cost, hz, kExitsPerTick, transitions_ns, period_ns,
                  transitions_ns >= period_ns ? "no time at all" : "less than a tenth of its time", test.name,
                  period_ns * kMaxTickSharePercent / 100 / kExitsPerTick, hz);
  // map's windows come on top: four per tick, each --window-cost-ns (at most
  // 1e7 ns) or the calibrated cost, so the sum stays far below overflow.
  const uint64_t windows_ns = tick_window_ns(o);
  const uint64_t tick_ns = transitions_ns + windows_ns;
  auto fits = [&](uint64_t rate) { return tick_ns * 100 <= 1'000'000'000ull / rate * kMaxTickSharePercent; };
  if (!fits(hz)) {
    uint64_t max_hz = hz;
    while (max_hz > 1 && !fits(max_hz))
      max_hz = std::min<uint64_t>(max_hz - 1, 1'000'000'000ull * kMaxTickSharePercent / 100 / tick_ns);
    return errorf(EINVAL,
                  "map on unmanaged memory with L1 timer ticks at {} Hz: a tick that interrupts L2 costs {} ns of "
                  "transitions and {} ns of remap windows ({}), {} ns of each {} ns period, which leaves L2 {} (the "
                  "test {} needs --l1-hz at most {}, or a lower --window-cost-ns, or no map in --strategy)",
                  hz, transitions_ns, windows_ns,
                  o.window_cost_ns ? "--window-cost-ns" : "the calibrated cost", tick_ns, period_ns,
                  tick_ns >= period_ns ? "no time at all" : "less than a tenth of its time", test.name, max_hz);
  }
  return ok();
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

}  // namespace nestcache::workloads
