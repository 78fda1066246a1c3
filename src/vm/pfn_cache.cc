#include "vm/pfn_cache.h"

namespace nestcache::vm {

// --- CachePtr ----------------------------------------------------------------------

CachePtr& CachePtr::operator=(CachePtr&& o) noexcept {
  if (this != &o) {
    reset();
    cache_ = o.cache_;
    data_ = o.data_;
    version_cell_ = o.version_cell_;
    version_ = o.version_;
    gpa_ = o.gpa_;
    size_ = o.size_;
    slot_ = o.slot_;
    o.cache_ = nullptr;
  }
  return *this;
}

void CachePtr::end_rwlock_read(const PfnCache* cache) { cache->rw_.unlock_shared(); }

bool CachePtr::report_stale(const PfnCache* cache, const host::VersionCell* cell, uint64_t version,
                            const char* what) {
  return cache->vm_.phys().check(cell, version, what, &cache->vm_.counters());
}

// --- PfnCache: reading ----------------------------------------------------------------

bool PfnCache::read_after_failed_check(Gpa want, size_t len, cache_readers::Slot* slot, Snapshot& s) const {
  cache_readers::exit(slot);
  if (read_side_ != CacheReadSide::rwlock) return false;
  rw_.lock_shared();  // held past this function by the handle (CachePtr::reset)
  const uint64_t seq = seq_.load(std::memory_order_relaxed);
  s = {gpa_.load(std::memory_order_relaxed), generation_.load(std::memory_order_relaxed),
       khva_.load(std::memory_order_relaxed), version_cell_.load(std::memory_order_relaxed),
       tag_version_.load(std::memory_order_relaxed)};
  if ((seq & kInvalidBit) || !fits(want, len, s)) {
    rw_.unlock_shared();
    return false;
  }
  return true;
}

Result<CachePtr> PfnCache::lock(Gpa gpa, size_t len) {
  for (;;) {
    if (CachePtr p = read(gpa, len)) return p;
    Status st = active() && this->gpa() == gpa ? refresh(len) : activate(gpa, len);
    if (!st) return tl::unexpected(st.error());
  }
}

// --- PfnCache: the mapping fields ---------------------------------------------------------

void PfnCache::set_invalid_locked() {
  rw_.assert_held();
  const uint64_t seq = seq_.load(std::memory_order_relaxed);
  if (seq & kInvalidBit) return;
  // seq_cst: an invalidation looks for lock-free readers right after this,
  // and a reader that names the cache before this store must be found, one
  // that names it after must see the bit set (cache_readers.h).
  // (Field stores that follow are release stores: none is seen before this.)
  seq_.store((seq | kInvalidBit) + kVersionStep, std::memory_order_seq_cst);
}

void PfnCache::publish_locked(const host::FrameTag& tag, std::byte* khva, uint64_t generation) {
  rw_.assert_held();
  NC_CHECK(seq_.load(std::memory_order_relaxed) & kInvalidBit);
  generation_.store(generation, std::memory_order_release);
  khva_.store(khva, std::memory_order_release);
  version_cell_.store(vm_.phys().version_cell(tag.pfn), std::memory_order_release);
  tag_version_.store(tag.version, std::memory_order_release);
  revalidate_locked();
}

void PfnCache::revalidate_locked() {
  rw_.assert_held();
  const uint64_t seq = seq_.load(std::memory_order_relaxed);
  NC_CHECK(seq & kInvalidBit);
  seq_.store((seq & ~kInvalidBit) + kVersionStep, std::memory_order_release);  // valid, a new version
}

void PfnCache::release_window(host::RemapWindow w) const {
  // A lock-free reader that checked the old mapping may still be copying
  // through the window: munmap under it would fault. The registry keeps it
  // mapped until a wait for this cache's readers has passed. Under the
  // rwlock no reader can be inside: it goes now.
  if (w && read_side_ == CacheReadSide::lockfree) vm_.caches().retire_window(this, std::move(w));
}

PfnCache::Hit PfnCache::notifier_invalidate(Hva start, Hva end) {
  WriterLock w(rw_);
  if (!active_.load() || hva_ < start || hva_ >= end) return {};
  const bool flipped = !(seq_.load() & kInvalidBit);
  // The bound vCPU is named only after the invalid bit: a vCPU that takes
  // the cache over (set_vcpu, then read, both seq_cst: CachePageSet::lock)
  // either reads it invalid or is the vCPU named here, and waited for. Named
  // first, a rebind and a read of the old pfn could both land before the
  // bit, and the notifier would wait for the previous vCPU while the new one
  // entered the guest with the pfn. (Neither lock orders set_vcpu: it takes
  // none.) model/protocol.pml checks this with REBIND; the other order is
  // there only for the replay of its NAME_FIRST counterexample.
  Vcpu* named;
  if (vm_.protocol().name_vcpu_after_marking) {
    mark_invalid_for_notifier();
    if (test_hooks_ && test_hooks_->invalidate) test_hooks_->invalidate();
    named = vcpu_.load(std::memory_order_seq_cst);
  } else {
    named = vcpu_.load(std::memory_order_seq_cst);
    if (test_hooks_ && test_hooks_->invalidate) test_hooks_->invalidate();
    mark_invalid_for_notifier();
  }
  return {true, flipped, named};
}

void PfnCache::mark_invalid_for_notifier() {
  invalidations_.fetch_add(1);
  set_invalid_locked();
}

// --- PfnCache: activate, refresh, deactivate -------------------------------------------------

PfnCache::PfnCache(Vm& vm, CacheReadSide side, Vcpu* guest_uses_pfn, const host::HardwareView* hw)
    : read_side_(side),
      memslots_(vm.memslots()),
      seq_(kInvalidBit | (side == CacheReadSide::rwlock ? kRwlockBit : 0)),
      vcpu_(guest_uses_pfn),
      vm_(vm),
      hw_(hw) {}

PfnCache::~PfnCache() { deactivate(); }

Status PfnCache::activate(Gpa gpa, size_t len) {
  // Checked before the cache is touched, as kvm_gpc_activate does: a length
  // that does not fit leaves an inactive cache inactive and a valid one
  // serving its old gpa.
  if (!fits_in_page(gpa, len)) return errorf(EINVAL, "{} bytes at gpa {:#x} cross a page boundary", len, gpa);
  MutexLock r(refresh_mu_);
  if (!active_.load()) {
    WriterLock w(rw_);
    vm_.counters().add(Counter::cache_activations);
    active_.store(true);
  }
  // The gpa is taken by the refresh, not here.
  return refresh_locked(gpa, len);
}

void PfnCache::deactivate() {
  MutexLock r(refresh_mu_);
  host::RemapWindow old_window;
  {
    WriterLock w(rw_);
    if (!active_.load()) return;
    active_.store(false);
    set_invalid_locked();
    khva_.store(nullptr, std::memory_order_release);
    version_cell_.store(nullptr, std::memory_order_release);
    hva_ = 0;
    old_window = std::move(window_);
  }
  if (indexed_hva_) vm_.caches().unindex(this, indexed_hva_);
  indexed_hva_ = 0;
  release_window(std::move(old_window));  // outside the locks
  // Nothing of an inactive cache stays mapped: drain what it (and any other
  // cache) retired.
  if (read_side_ == CacheReadSide::lockfree) vm_.caches().drain_retired();
}

Status PfnCache::refresh(size_t len) {
  MutexLock r(refresh_mu_);
  return refresh_locked(gpa_.load(std::memory_order_relaxed), len);  // gpa_ changes only under refresh_mu_
}

Result<PfnCache::Mapping> PfnCache::map_frame(Hva hva) {
  host::FrameTag tag = NC_TRY(vm_.mm().fault_in(hva, true));
  Mapping m;
  m.tag = tag;
  if (hw_) {
    m.khva = hw_->frame(tag.pfn);
  } else if (vm_.phys().kind(tag.pfn) == host::FrameKind::managed) {
    // No pin: like KVM's cache, we rely on invalidation, not a page
    // reference, to stop using the frame before it is freed.
    m.khva = vm_.phys().direct(tag.pfn);
  } else {
    m.window = NC_TRY(vm_.phys().map_window(tag.pfn));
    m.khva = m.window.data();
    vm_.counters().add(Counter::remap_windows);
  }
  return m;
}

Result<Hva> PfnCache::resolve(Gpa gpa, uint64_t& generation) const {
  rcu::ReadLock rcu;
  const MemslotSet* set = vm_.memslots().active();
  generation = set->generation();
  const Memslot* s = set->find(gpa_to_gfn(gpa));
  if (!s || s->invalid) return errorf(EFAULT, "gpa {:#x} is in no memslot", gpa);
  // Every cache maps its page writable, and KVM resolves the hva for
  // writing (gfn_to_hva_memslot): a read-only memslot has none to give.
  if (s->flags & kMemReadonly) return errorf(EFAULT, "gpa {:#x} is in read-only slot {}", gpa, s->id);
  return s->gfn_to_hva(gpa_to_gfn(gpa));
}

void PfnCache::drop_mapping(Gpa gpa) {
  host::RemapWindow old_window;
  {
    WriterLock w(rw_);
    set_invalid_locked();
    gpa_.store(gpa, std::memory_order_release);
    khva_.store(nullptr, std::memory_order_release);
    version_cell_.store(nullptr, std::memory_order_release);
    old_window = std::move(window_);
  }
  release_window(std::move(old_window));
}

Status PfnCache::refresh_locked(Gpa gpa, size_t len) {
  refresh_mu_.assert_held();
  if (!active_.load()) return errorf(EINVAL, "refresh of an inactive pfn cache");
  // Before anything changes: a length that crosses the page is the caller's
  // error and leaves the cache as it was (kvm_gpc_refresh).
  if (!fits_in_page(gpa, len)) return errorf(EINVAL, "{} bytes at gpa {:#x} cross a page boundary", len, gpa);

  uint64_t generation;
  Result<Hva> hva = resolve(gpa, generation);
  if (!hva) {
    drop_mapping(gpa);
    return tl::unexpected(hva.error());
  }

  // Be findable at the new hva before the loop: from then on an invalidation
  // of that hva finds this cache (and bumps invalidations_) or, if its search
  // ran before, is still in progress when the loop first waits.
  //
  // Invalid first, while still indexed (and matched, hva_ unchanged) at the
  // old hva: until the index moves, an invalidation of the old page finds
  // the cache and waits for the readers of its old mapping, and no reader
  // starts on that mapping once the cache is indexed elsewhere. (The rwlock
  // side's writer lock here also waits for the handles on it.) The registry
  // takes its lock before rw_, so the two steps cannot be one.
  if (*hva != indexed_hva_) {
    {
      WriterLock w(rw_);
      set_invalid_locked();
      gpa_.store(gpa, std::memory_order_release);
    }
    vm_.caches().index(this, indexed_hva_, *hva);
    indexed_hva_ = *hva;
    WriterLock w(rw_);
    hva_ = *hva;
  } else {
    // Same hva and still valid: the mapping is good, as KVM keeps it, whether
    // only the memslot generation moved or the gpa did too (another offset
    // in the page, or a memslot aliasing the same host page). A new gpa is
    // published while the cache reads as invalid, so that no reader pairs it
    // with the old one's fields; the generation alone needs no such care: a
    // lock-free reader sees its old or new value with the same mapping.
    WriterLock w(rw_);
    if (!(seq_.load() & kInvalidBit)) {
      if (gpa_.load() != gpa) {
        set_invalid_locked();
        gpa_.store(gpa, std::memory_order_release);
        generation_.store(generation, std::memory_order_release);
        revalidate_locked();
      } else {
        generation_.store(generation, std::memory_order_release);
      }
      return ok();
    }
    gpa_.store(gpa, std::memory_order_release);
  }
  return map_and_install(*hva, generation);
}

Status PfnCache::map_and_install(Hva hva, uint64_t generation) {
  // A new snapshot on every try (model replays of STALE_SNAPSHOT keep the
  // first, and retry forever once an invalidation has found the cache).
  const uint64_t first_seen = invalidations_.load();
  for (;;) {
    const ProtocolVariant& variant = vm_.protocol();
    // Read before waiting: an invalidation that found the cache before this
    // load began before the wait below, which then outlasts it.
    const uint64_t seen = variant.snapshot_seq_per_try ? invalidations_.load() : first_seen;
    if (const uint64_t ns = vm_.wait_for_invalidation(hva)) {
      vm_.counters().add(Counter::cache_refresh_waits);
      vm_.counters().add(Counter::cache_refresh_wait_ns, ns);
    }
    Result<Mapping> m = map_frame(hva);
    if (!m) return tl::unexpected(m.error());
    if (test_hooks_ && test_hooks_->refresh) test_hooks_->refresh();
    host::RemapWindow old_window;
    bool installed = false;
    {
      WriterLock w(rw_);
      // An invalidation of this hva that found the cache since `seen`, or one
      // still running, may have freed the frame we just mapped: installing it
      // would make a stale mapping look valid. Drop it and resolve again.
      // (Model replays of NO_RETRY don't.)
      if (!variant.refresh_retries || (invalidations_.load() == seen && !vm_.invalidation_in_progress(hva))) {
        old_window = std::move(window_);  // released after the new one is in
        window_ = std::move(m->window);
        publish_locked(m->tag, m->khva, generation);
        vm_.counters().add(Counter::cache_refreshes);
        installed = true;
      }
    }
    if (installed) {
      release_window(std::move(old_window));
      return ok();
    }
    vm_.counters().add(Counter::cache_refresh_retries);
  }
}

}  // namespace nestcache::vm
