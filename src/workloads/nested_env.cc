#include "workloads/nested_env.h"

#include "workloads/window_cost.h"

namespace nestcache::workloads {

Result<std::unique_ptr<NestedEnv>> NestedEnv::create(const NestedEnvConfig& c) {
  auto env = std::make_unique<NestedEnv>();
  env->config = c;
  size_t frames = c.l1_bytes / kPageSize + c.extra_frames;
  env->phys = NC_TRY(host::PhysMem::create({c.memory == MemoryKind::managed ? frames : 64,
                                            c.memory == MemoryKind::unmanaged ? frames : 64}));
  env->phys->set_stale_access_fatal(c.stale_fatal);
  if (c.clock == cpu::ClockKind::modelled) env->phys->set_window_cost(NC_TRY(modelled_window_cost(c.window_cost_ns)));
  env->mm = std::make_unique<host::HostMm>(*env->phys);
  env->vm = std::make_unique<vm::Vm>(*env->mm, 1);
  env->l1_base = NC_TRY(env->mm->create_region(c.l1_bytes, c.memory));
  NC_TRY(env->vm->set_memory_region({0, 0, 0, c.l1_bytes, env->l1_base}));
  env->machine = std::make_unique<cpu::Machine>(
      *env->vm, cpu::MachineConfig{.vcpus = c.vcpus,
                                   .strategy = c.strategy,
                                   .exit_cost_ns = c.exit_cost_ns,
                                   .retry_internal_errors = c.retry_internal_errors,
                                   .costs = c.costs,
                                   .clock = c.clock});
  NC_TRY(env->add_extra_caches(c.extra_caches));
  return env;
}

Status NestedEnv::add_extra_caches(uint32_t count) {
  // Spread over a few pages so that they are distinct ranges, as a VMM's
  // caches are; the pages below kL1PagesStart are never discarded.
  constexpr uint64_t kPages = kL1PagesStart / kPageSize;
  const uint64_t windows_before = phys->counters().get(Counter::remap_windows);
  for (uint32_t i = 0; i < count; i++) {
    auto cache = std::make_unique<vm::PfnCache>(*vm);
    NC_TRY(cache->activate((i % kPages) * kPageSize, kPageSize));
    extra_caches.push_back(std::move(cache));
  }
  extra_cache_windows = phys->counters().get(Counter::remap_windows) - windows_before;
  return ok();
}

Result<Hva> NestedEnv::add_page_slot(uint32_t slot, Gpa gpa) {
  Hva h = NC_TRY(mm->create_region(kPageSize, config.memory));
  NC_TRY(vm->set_memory_region({slot, 0, gpa, kPageSize, h}));
  return h;
}

std::string Leaks::to_string() const {
  return fmt::format("{} remap windows, {} pins, {} active caches, {} attached contexts", open_windows, held_pins,
                     active_caches, attached_contexts);
}

std::string Leaks::resources_to_string() const {
  return fmt::format("{} remap windows, {} pins, {} active caches", open_windows, held_pins, active_caches);
}

Leaks resources_left(const host::PhysMem& phys, vm::Vm& vm) {
  Leaks l;
  const CounterSet& pc = phys.counters();
  l.open_windows = pc.get(Counter::remap_windows) - pc.get(Counter::remap_windows_closed);
  l.held_pins = pc.get(Counter::pins) - pc.get(Counter::unpins);
  l.active_caches = vm.caches().active_count();
  return l;
}

Leaks NestedEnv::tear_down() {
  size_t attached = 0;
  if (auto* table = machine->nested_contexts()) attached = table->table().attached_count();
  extra_caches.clear();
  machine.reset();
  Leaks l = resources_left(*phys, *vm);
  l.attached_contexts = attached;
  return l;
}

uint64_t NestedEnv::read_u64(Gpa gpa) const {
  uint64_t v = 0;
  (void)vm->read_guest(gpa, &v, sizeof v);
  return v;
}

Status NestedEnv::write_u64(Gpa gpa, uint64_t value) { return machine->store_qword(gpa, value); }

CounterSnapshot NestedEnv::counters() const { return machine->counters(); }

CounterSnapshot NestedEnv::run_counters(std::span<const CounterSnapshot> others) const {
  std::vector<CounterSnapshot> all(others.begin(), others.end());
  all.push_back(CounterSnapshot::of(mm->counters()));
  return merge_run_counters(CounterSnapshot::of(phys->counters()), all);
}

CounterSnapshot NestedEnv::counted_since_setup(const CounterSnapshot& total, const CounterSnapshot& setup) {
  CounterSnapshot run = total - setup;
  run[Counter::stale_accesses] = total[Counter::stale_accesses];
  return run;
}

nlohmann::json NestedEnv::counters_by_vcpu() const {
  nlohmann::json j = nlohmann::json::object();
  for (int i = 0; i < machine->num_vcpus(); i++)
    j[fmt::format("vcpu{}", i)] = CounterSnapshot::of(machine->vcpu(i).counters()).to_json();
  j["vm"] = CounterSnapshot::of(vm->counters()).to_json();
  return j;
}

}  // namespace nestcache::workloads
