#include "vmx/page_strategy.h"

#include <optional>

#include "base/check.h"
#include "base/model_time.h"

namespace nestcache::vmx {

const char* strategy_name(StrategyKind kind) {
  switch (kind) {
    case StrategyKind::map: return "map";
    case StrategyKind::cache: return "cache";
    case StrategyKind::oracle: return "oracle";
  }
  return "?";
}

std::optional<StrategyKind> parse_strategy(std::string_view name) {
  for (StrategyKind k : {StrategyKind::map, StrategyKind::cache, StrategyKind::oracle})
    if (name == strategy_name(k)) return k;
  return std::nullopt;
}

const char* l1_page_name(L1Page p) {
  switch (p) {
    case L1Page::msr_bitmap: return "msr_bitmap";
    case L1Page::apic_access: return "apic_access";
    case L1Page::vapic: return "virtual_apic";
    case L1Page::pi_desc: return "posted_interrupt_descriptor";
    case L1Page::evmcs: return "evmcs";
    case L1Page::kCount: break;
  }
  return "?";
}

CacheBundle::CacheBundle(vm::Vm& vm, vm::Vcpu* vcpu, const host::HardwareView* hw) {
  for (int i = 0; i < kNumL1Pages; i++)
    caches[i] = std::make_unique<vm::PfnCache>(vm, hardware_uses(static_cast<L1Page>(i)) ? vcpu : nullptr, hw);
}

namespace {

// --- map: the kernel before the seed ---------------------------------------

class MapPageSet final : public PageSet {
 public:
  MapPageSet(vm::Vm& vm, CounterSet& counters) : vm_(vm), counters_(counters) {}
  StrategyKind kind() const override { return StrategyKind::map; }

  Result<HwPage> get_hw(L1Page p, Gpa gpa) override {
    vm::HostMap& m = maps_[static_cast<int>(p)];
    m.unmap(true);
    m = NC_TRY(vm::HostMap::map(vm_, gpa_to_gfn(gpa), &counters_));
    return HwPage{m.tag(), page_offset(gpa)};
  }

  Status access(L1Page p, Gpa gpa, const std::function<void(const PageView&)>& fn) override {
    vm::HostMap& held = maps_[static_cast<int>(p)];
    if (held.mapped() && held.gfn() == gpa_to_gfn(gpa)) {
      fn(view(held));
      return ok();
    }
    // Not held (the MSR bitmap): map for this access only, as the kernel's
    // merge does, and for reading only (kvm_vcpu_map_readonly), so that a
    // read-only memslot serves it.
    vm::HostMap m = NC_TRY(p == L1Page::msr_bitmap ? vm::HostMap::map_readonly(vm_, gpa_to_gfn(gpa), &counters_)
                                                   : vm::HostMap::map(vm_, gpa_to_gfn(gpa), &counters_));
    fn(view(m));
    m.unmap(false);
    return ok();
  }

  void put() override {
    for (int i = 0; i < kNumL1Pages; i++)
      if (static_cast<L1Page>(i) != L1Page::evmcs) maps_[i].unmap(true);
  }
  bool any_invalid() const override { return false; }  // nothing invalidates a map
  void release() override {
    for (auto& m : maps_) m.unmap(false);
  }

  Status lock_evmcs(Gpa gpa, const std::function<void(const PageView&)>& fn) override {
    vm::HostMap& held = maps_[static_cast<int>(L1Page::evmcs)];
    // The kernel today maps the eVMCS only when its address changes and then
    // trusts the map for as long as it stays current.
    if (!held.mapped() || held.gfn() != gpa_to_gfn(gpa)) {
      held.unmap(true);
      held = NC_TRY(vm::HostMap::map(vm_, gpa_to_gfn(gpa), &counters_));
    }
    fn(view(held));
    return ok();
  }
  void release_evmcs() override { maps_[static_cast<int>(L1Page::evmcs)].unmap(true); }

 private:
  static PageView view(const vm::HostMap& m) {
    return PageView(m.data(), [](const void* c) { return static_cast<const vm::HostMap*>(c)->check(); }, &m);
  }
  vm::Vm& vm_;
  CounterSet& counters_;
  std::array<vm::HostMap, kNumL1Pages> maps_;
};

// --- cache / oracle: the seed -------------------------------------------------

class CachePageSet final : public PageSet {
 public:
  CachePageSet(StrategyKind kind, vm::Vm& vm, vm::Vcpu& vcpu, const host::HardwareView* hw)
      : kind_(kind), vm_(vm), vcpu_(vcpu), own_(vm, &vcpu, hw), bundle_(&own_) {}
  StrategyKind kind() const override { return kind_; }

  Result<HwPage> get_hw(L1Page p, Gpa gpa) override {
    vm::CachePtr ptr = NC_TRY(lock(p, gpa));
    return HwPage{ptr.tag(), page_offset(gpa)};
  }

  Status access(L1Page p, Gpa gpa, const std::function<void(const PageView&)>& fn) override {
    if (!hardware_uses(p)) {
      vm::CachePtr ptr = NC_TRY(lock(p, gpa));
      fn(view(ptr, &check_cache));
      return ok();
    }
    // The seed's nested_gpc_lock_if_active: L0 software reaching a page the
    // hardware uses (posted-interrupt completion) refreshes an active cache
    // but never activates or deactivates one. A failed refresh leaves it
    // active and invalid, so the last check before entry keeps L2 off the
    // hardware until the pages are refreshed; deactivating it here would
    // take it out of the registry while vmcs02 still holds its pfn.
    vm::PfnCache& c = (*bundle_)[p];
    Gpa page = gpa & kPageMask;
    for (;;) {
      // Modelled time: the check and any refresh are the cache's cost; what
      // fn does with the page is the caller's.
      std::optional<ModelClock::PartScope> scope(std::in_place, TimePart::pfn_cache);
      if (!c.active() || c.gpa() != page) return errorf(ENOENT, "{} is not mapped", l1_page_name(p));
      if (vm::CachePtr ptr = c.read(page, kPageSize)) {
        scope.reset();
        fn(view(ptr, &check_cache));
        return ok();
      }
      const vm::ProtocolVariant& variant = vm_.protocol();
      if (Status st = c.refresh(kPageSize); !st) {
        if (variant.software_refresh_failure_deactivates) c.deactivate();  // model replays of SW_DEACTIVATE
        return st;
      }
      // The refresh may have moved the cache to a new pfn while vmcs02
      // still holds the old one, and the cache is valid again, so the last
      // check before entry would let the hardware use the old pfn. Rewrite
      // vmcs02 before the next entry. (The seed's software paths refresh
      // without this: model replays of SEED.)
      if (variant.software_refresh_requests_rewrite) vcpu_.make_request(vm::Request::kRefreshGuestPages);
    }
  }

  void put() override {}  // the caches stay mapped: the seed's speed-up

  bool any_invalid() const override {
    if (!vm_.protocol().last_check) return false;  // model replays of NO_LAST_CHECK
    for (L1Page p : {L1Page::apic_access, L1Page::vapic, L1Page::pi_desc})
      if ((*bundle_)[p].invalid()) return true;
    return false;
  }

  void release() override {
    bundle_ = &own_;
    for (auto& c : own_.caches) c->deactivate();
  }

  void use_bundle(CacheBundle* b) override { bundle_ = b ? b : &own_; }
  vm::PfnCache* cache(L1Page p) override { return &(*bundle_)[p]; }

  Status lock_evmcs(Gpa gpa, const std::function<void(const PageView&)>& fn) override {
    // Patch 7: nested_gpc_lock on every VMLAUNCH/VMRESUME. A memslot move is
    // caught by the generation check, a migration by the invalidation: the
    // lock refreshes (or fails: the caller's #UD) and fn never sees a stale
    // mapping. The eVMCS cache is not vCPU-bound, so a failure leaves it
    // active; the next lock tries again.
    vm::CachePtr ptr = NC_TRY(lock(L1Page::evmcs, gpa));
    fn(view(ptr, &check_evmcs_cache));
    return ok();
  }
  void release_evmcs() override {}

 private:
  static bool check_cache(const void* p) { return static_cast<const vm::CachePtr*>(p)->check_tag("pfn cache"); }
  static bool check_evmcs_cache(const void* p) {
    return static_cast<const vm::CachePtr*>(p)->check_tag("eVMCS cache");
  }
  // A view of the whole page `ptr` holds, valid while ptr is.
  static PageView view(const vm::CachePtr& ptr, PageView::CheckFn check) {
    return PageView(ptr.bytes(0, ptr.size()).data(), check, &ptr);
  }

  // The seed's nested_gpc_lock: a held, checked mapping of the page at gpa,
  // (re)activating or refreshing the cache as needed.
  Result<vm::CachePtr> lock(L1Page p, Gpa gpa) {
    ModelClock::PartScope scope(TimePart::pfn_cache);  // modelled time: the check, or the refresh
    vm::PfnCache& c = (*bundle_)[p];
    // Patch 9 (v4): a cache taken over from another vCPU's context is
    // re-bound so that invalidations kick the vCPU that really uses it.
    if (c.vcpu() && c.vcpu() != &vcpu_) c.set_vcpu(&vcpu_);
    Result<vm::CachePtr> ptr = c.lock(gpa & kPageMask, kPageSize);
    if (!ptr && c.vcpu() && vm_.protocol().deactivate_failed_activation /* model replays of NO_DEACTIVATE */) {
      // Patch 4: a vCPU-bound cache that cannot be activated is deactivated,
      // or invalid() would cancel every entry forever.
      c.deactivate();
    }
    return ptr;
  }

  StrategyKind kind_;
  vm::Vm& vm_;
  vm::Vcpu& vcpu_;
  CacheBundle own_;
  CacheBundle* bundle_;
};

}  // namespace

std::unique_ptr<PageSet> make_page_set(StrategyKind kind, vm::Vm& vm, vm::Vcpu& vcpu, CounterSet& vcpu_counters,
                                       const host::HardwareView* hw) {
  if (kind == StrategyKind::map) return std::make_unique<MapPageSet>(vm, vcpu_counters);
  NC_CHECK(kind == StrategyKind::cache || hw);
  return std::make_unique<CachePageSet>(kind, vm, vcpu, kind == StrategyKind::oracle ? hw : nullptr);
}

}  // namespace nestcache::vmx
