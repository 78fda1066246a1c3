#include "vm/host_map.h"

#include "base/model_time.h"

namespace nestcache::vm {

HostMap& HostMap::operator=(HostMap&& o) noexcept {
  if (this != &o) {
    unmap(false);
    vm_ = o.vm_;
    counters_ = o.counters_;
    gfn_ = o.gfn_;
    hva_ = o.hva_;
    generation_ = o.generation_;
    tag_ = o.tag_;
    data_ = o.data_;
    pin_ = std::move(o.pin_);
    window_ = std::move(o.window_);
    o.vm_ = nullptr;
    o.data_ = nullptr;
  }
  return *this;
}

Result<HostMap> HostMap::map_impl(Vm& vm, Gfn gfn, CounterSet* counters, bool writable) {
  ModelClock::PartScope scope(TimePart::remap_windows);  // modelled time: what a window costs L0
  HostMap m;
  m.gfn_ = gfn;
  {
    rcu::ReadLock rcu;
    const MemslotSet* set = vm.memslots().active();
    const Memslot* s = set->find(gfn);
    if (!s || s->invalid) return errorf(EFAULT, "gfn {:#x} is in no memslot", gfn);
    if (writable && (s->flags & kMemReadonly))
      return errorf(EFAULT, "gfn {:#x} is in read-only slot {}: no writable mapping", gfn, s->id);
    m.hva_ = s->gfn_to_hva(gfn);
    m.generation_ = set->generation();
  }
  auto kind = vm.mm().region_kind(m.hva_);
  if (!kind) return errorf(EFAULT, "gfn {:#x} maps to hva {:#x}, which is in no region", gfn, m.hva_);
  if (*kind == host::FrameKind::managed) {
    host::PinnedFrame f = NC_TRY(vm.mm().fault_in_pinned(m.hva_, true));
    m.tag_ = f.tag;
    m.pin_ = std::move(f.pin);
    m.data_ = vm.phys().direct(f.tag.pfn);
  } else {
    m.tag_ = NC_TRY(vm.mm().fault_in(m.hva_, true));
    m.window_ = NC_TRY(vm.phys().map_window(m.tag_.pfn));
    m.data_ = m.window_.data();
  }
  m.vm_ = &vm;
  m.counters_ = counters ? counters : &vm.counters();
  m.counters_->add(Counter::maps);
  if (*kind == host::FrameKind::unmanaged) m.counters_->add(Counter::remap_windows);
  return m;
}

void HostMap::unmap(bool dirty) {
  if (!vm_) return;
  ModelClock::PartScope scope(TimePart::remap_windows);
  counters_->add(Counter::unmaps);
  window_.reset();
  pin_.reset();
  vm_ = nullptr;
  data_ = nullptr;
}

bool HostMap::check() const {
  if (!vm_->phys().check(tag_, "host map", counters_)) return false;
  if (vm_->memslots().generation() == generation_) return true;
  // Memslots changed since the map: stale if the gfn no longer leads here.
  Result<Hva> now = vm_->gfn_to_hva(gfn_);
  if (now && *now == hva_) return true;
  vm_->phys().report_stale("host map (memslot changed)", counters_);
  return false;
}

}  // namespace nestcache::vm
