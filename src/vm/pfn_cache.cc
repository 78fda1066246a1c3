#include "vm/pfn_cache.h"

#include <algorithm>
#include <thread>

#include "base/check.h"

namespace nestcache::vm {

// --- CacheRegistry -------------------------------------------------------------

std::vector<Vcpu*> CacheRegistry::invalidate(Hva start, Hva end) {
  std::vector<Vcpu*> vcpus;
  MutexLock l(mu_);
  for (auto it = by_hva_.lower_bound(start & kPageMask); it != by_hva_.end() && it->first < end; ++it) {
    PfnCache* c = it->second;
    WriterLock w(c->rw_);
    if (!c->active_ || c->hva_ < (start & kPageMask) || c->hva_ >= end) continue;
    bool flipped = c->valid_;
    if (flipped) {
      c->valid_ = false;
      c->valid_flag_.store(false);
      vm_.counters().add(Counter::cache_invalidations);
    }
    if (!flipped && !vm_.protocol().wait_for_already_invalid) continue;  // model replays of FLIPPED_ONLY
    // Wait for the bound vCPU even when the cache was already invalid: an
    // earlier, overlapping invalidation may have marked it and still be
    // waiting for that vCPU to leave guest mode, with the old pfn in use.
    // (The seed only collects vCPUs of caches it flips from valid, which
    // leaves that window open; frame tags showed it here.)
    if (Vcpu* v = c->vcpu_.load(); v && std::find(vcpus.begin(), vcpus.end(), v) == vcpus.end()) vcpus.push_back(v);
  }
  return vcpus;
}

size_t CacheRegistry::active_count() const {
  MutexLock l(mu_);
  return by_hva_.size();
}

void CacheRegistry::index(PfnCache* c, Hva old_hva, Hva new_hva) {
  MutexLock l(mu_);
  if (old_hva) unindex_locked(c, old_hva);
  by_hva_.emplace(new_hva, c);
}

void CacheRegistry::unindex(PfnCache* c, Hva hva) {
  MutexLock l(mu_);
  unindex_locked(c, hva);
}

void CacheRegistry::unindex_locked(PfnCache* c, Hva hva) {
  auto [lo, hi] = by_hva_.equal_range(hva);
  for (auto it = lo; it != hi; ++it) {
    if (it->second == c) {
      by_hva_.erase(it);
      return;
    }
  }
  NC_CHECK(!"cache missing from the registry");
}

// --- PfnCache --------------------------------------------------------------------

PfnCache::PfnCache(Vm& vm, Vcpu* guest_uses_pfn, const host::HardwareView* hw)
    : vm_(vm), vcpu_(guest_uses_pfn), hw_(hw) {}

PfnCache::~PfnCache() { deactivate(); }

Gpa PfnCache::current_gpa() const {
  ReaderLock l(rw_);
  return gpa_;
}

bool PfnCache::check(size_t len) const {
  return active_ && valid_ && generation_ == vm_.memslots().generation() && page_offset(gpa_) + len <= kPageSize;
}

bool PfnCache::check_tag(const char* what) const { return vm_.phys().check(tag_, what, &vm_.counters()); }

Status PfnCache::activate(Gpa gpa, size_t len) {
  MutexLock r(refresh_mu_);
  {
    WriterLock w(rw_);
    if (gpa_ != gpa) {
      gpa_ = gpa;
      valid_ = false;
      valid_flag_.store(false);
    }
    if (!active_) vm_.counters().add(Counter::cache_activations);
    active_ = true;
    active_flag_.store(true);
  }
  return refresh_locked(len);
}

void PfnCache::deactivate() {
  MutexLock r(refresh_mu_);
  host::RemapWindow old_window;
  {
    WriterLock w(rw_);
    if (!active_) return;
    active_ = false;
    valid_ = false;
    active_flag_.store(false);
    valid_flag_.store(false);
    khva_ = nullptr;
    tag_ = {};
    hva_ = 0;
    old_window = std::move(window_);
  }
  if (indexed_hva_) vm_.caches().unindex(this, indexed_hva_);
  indexed_hva_ = 0;
  // old_window unmaps here, outside the locks.
}

Status PfnCache::refresh(size_t len) {
  MutexLock r(refresh_mu_);
  return refresh_locked(len);
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

Status PfnCache::refresh_locked(size_t len) {
  Gpa gpa;
  {
    ReaderLock l(rw_);
    if (!active_) return errorf(EINVAL, "refresh of an inactive pfn cache");
    gpa = gpa_;
  }
  if (page_offset(gpa) + len > kPageSize)
    return errorf(EINVAL, "{} bytes at gpa {:#x} cross a page boundary", len, gpa);

  uint64_t generation;
  Result<Hva> hva = [&]() -> Result<Hva> {
    rcu::ReadLock rcu;
    const MemslotSet* set = vm_.memslots().active();
    generation = set->generation();
    const Memslot* s = set->find(gpa_to_gfn(gpa));
    if (!s || s->invalid) return errorf(EFAULT, "gpa {:#x} is in no memslot", gpa);
    return s->gfn_to_hva(gpa_to_gfn(gpa));
  }();
  if (!hva) {
    host::RemapWindow old_window;
    WriterLock w(rw_);
    valid_ = false;
    valid_flag_.store(false);
    khva_ = nullptr;
    tag_ = {};
    old_window = std::move(window_);
    return tl::unexpected(hva.error());
  }

  // Be findable at the new hva before snapshotting the sequence: from then
  // on an invalidation of that hva either bumps the sequence we compare
  // against or finds this cache and marks it invalid.
  if (*hva != indexed_hva_) {
    vm_.caches().index(this, indexed_hva_, *hva);
    indexed_hva_ = *hva;
    WriterLock w(rw_);
    hva_ = *hva;
    valid_ = false;
    valid_flag_.store(false);
  } else {
    // Same hva and still valid (only the memslot generation moved): the
    // mapping is good, as KVM keeps it; just adopt the new generation.
    WriterLock w(rw_);
    if (valid_) {
      generation_ = generation;
      return ok();
    }
  }

  // A new snapshot on every try (model replays of STALE_SNAPSHOT keep the
  // first, and retry forever once an invalidation has ended).
  const ProtocolVariant& variant = vm_.protocol();
  const uint64_t first_seq = vm_.mmu_invalidate_seq();
  for (;;) {
    uint64_t seq = variant.snapshot_seq_per_try ? vm_.mmu_invalidate_seq() : first_seq;
    Result<Mapping> m = map_frame(*hva);
    if (!m) return tl::unexpected(m.error());
    if (refresh_hook_) refresh_hook_();
    host::RemapWindow old_window;
    {
      WriterLock w(rw_);
      // An invalidation that started after our snapshot may have freed the
      // frame we just mapped: installing it would make a stale mapping look
      // valid. Drop it and resolve again. (Model replays of NO_RETRY don't.)
      if (!variant.refresh_retries || !vm_.mmu_invalidate_retry(*hva, seq)) {
        tag_ = m->tag;
        khva_ = m->khva;
        old_window = std::move(window_);  // released after the new one is in
        window_ = std::move(m->window);
        generation_ = generation;
        valid_ = true;
        valid_flag_.store(true);
        vm_.counters().add(Counter::cache_refreshes);
        return ok();
      }
    }
    vm_.counters().add(Counter::cache_refresh_retries);
    std::this_thread::yield();
  }
}

}  // namespace nestcache::vm
