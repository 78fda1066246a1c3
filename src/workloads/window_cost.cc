#include "workloads/window_cost.h"

#include <map>
#include <mutex>
#include <tuple>

#include "base/model_time.h"
#include "host/host_mm.h"
#include "host/phys_mem.h"
#include "vm/host_map.h"
#include "vm/vm.h"

namespace nestcache::workloads {

namespace {

constexpr size_t kPages = 16;

Result<double> measure(MemoryKind memory, std::optional<host::WindowCost> cost, int count) {
  auto phys = NC_TRY(host::PhysMem::create({kPages + 16, kPages + 16}));
  phys->set_window_cost(cost);
  host::HostMm mm(*phys);
  vm::Vm vm(mm, 1);
  Hva base = NC_TRY(mm.create_region(kPages * kPageSize, memory));
  NC_TRY(vm.set_memory_region({0, 0, 0, kPages * kPageSize, base}));
  ModelClock clock;
  ModelClock::Binding bind(clock);
  clock.begin_measured();
  for (int i = 0; i < count; i++) {
    auto m = vm::HostMap::map(vm, static_cast<Gfn>(i % kPages));
    if (!m) return tl::unexpected(m.error());
    m->unmap(false);
  }
  clock.end_measured();
  return static_cast<double>(clock.now()) / count;
}

}  // namespace

Result<host::WindowCost> modelled_window_cost(std::optional<uint64_t> override_ns) {
  if (override_ns) return host::WindowCost{*override_ns / 2, *override_ns - *override_ns / 2};
  return NC_TRY(host::calibrated_window_cost()).cost;
}

Result<double> remap_window_ns(const BenchOptions& o, int count) {
  static std::mutex mu;
  static std::map<std::tuple<MemoryKind, bool, uint64_t, uint64_t>, double> measured;
  std::optional<host::WindowCost> cost;
  if (o.clock == cpu::ClockKind::modelled) cost = NC_TRY(modelled_window_cost(o.window_cost_ns));
  std::lock_guard l(mu);
  auto key = std::tuple{o.memory, cost.has_value(), cost ? cost->open_ns : 0, cost ? cost->close_ns : 0};
  if (auto it = measured.find(key); it != measured.end()) return it->second;
  double ns = NC_TRY(measure(o.memory, cost, count));
  measured[key] = ns;
  return ns;
}

Result<nlohmann::json> window_cost_json(std::optional<uint64_t> override_ns) {
  if (override_ns) {
    host::WindowCost cost = NC_TRY(modelled_window_cost(override_ns));
    return nlohmann::json{{"open_ns", cost.open_ns}, {"close_ns", cost.close_ns}, {"source", "--window-cost-ns"}};
  }
  host::WindowCalibration c = NC_TRY(host::calibrated_window_cost());
  return nlohmann::json{{"open_ns", c.cost.open_ns},   {"close_ns", c.cost.close_ns},
                        {"source", "calibrated"},      {"samples", c.samples},
                        {"concurrent_samples", c.concurrent}, {"sibling_ran", c.condition_met}};
}

}  // namespace nestcache::workloads
