#include "workloads/window_cost.h"

#include <map>
#include <mutex>

#include "base/model_time.h"
#include "host/host_mm.h"
#include "host/phys_mem.h"
#include "vm/host_map.h"
#include "vm/vm.h"

namespace nestcache::workloads {

namespace {

constexpr size_t kPages = 16;

Result<double> measure(MemoryKind memory, int count) {
  auto phys = NC_TRY(host::PhysMem::create({kPages + 16, kPages + 16}));
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

Result<double> remap_window_ns(MemoryKind memory, int count) {
  static std::mutex mu;
  static std::map<MemoryKind, double> measured;
  std::lock_guard l(mu);
  if (auto it = measured.find(memory); it != measured.end()) return it->second;
  double ns = NC_TRY(measure(memory, count));
  measured[memory] = ns;
  return ns;
}

}  // namespace nestcache::workloads
