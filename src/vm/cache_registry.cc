// CacheRegistry (see cache_registry.h).
#include "vm/cache_registry.h"

#include <algorithm>

#include "base/check.h"
#include "vm/cache_readers.h"
#include "vm/pfn_cache.h"

namespace nestcache::vm {

std::vector<Vcpu*> CacheRegistry::invalidate(Hva start, Hva end) {
  std::vector<Vcpu*> vcpus;
  std::vector<const void*> lockfree;
  const Hva first = start & kPageMask;
  auto mark = [&](PfnCache* c) {
    const PfnCache::Hit hit = c->notifier_invalidate(first, end);
    if (!hit.affected) return;
    if (hit.flipped) vm_.counters().add(Counter::cache_invalidations);
    // Wait for the readers and the bound vCPU even when the cache was
    // already invalid: an earlier, overlapping invalidation may have marked
    // it and still be waiting for them, with the old pfn in use. (The seed
    // collects only the vCPUs of caches it flips from valid, which leaves
    // that window open.)
    if (c->read_side() == CacheReadSide::lockfree) lockfree.push_back(c);
    if (!hit.flipped && !vm_.protocol().wait_for_already_invalid) return;  // model replays of FLIPPED_ONLY
    if (hit.vcpu && std::find(vcpus.begin(), vcpus.end(), hit.vcpu) == vcpus.end()) vcpus.push_back(hit.vcpu);
  };
  {
    MutexLock l(mu_);
    if (end > first && (end - first) / kPageSize <= kPagesLookedUpOneByOne) {
      for (Hva page = first; page < end; page += kPageSize)
        by_page_.for_each(page, [&](const void* v) {
          PfnCache* c = static_cast<PfnCache*>(const_cast<void*>(v));
          c->prefetch_for_writer();
          mark(c);
        });
    } else {
      for (auto it = by_hva_.lower_bound(first); it != by_hva_.end() && it->first < end; ++it) mark(it->second);
    }
    // A retired mapping of the range may still have readers: wait for them
    // too. Entries stay until a drain, so that an overlapping invalidation
    // waits as well. (A cache this thread reads is skipped: its read began
    // after the move, on the new mapping, or the caller broke the rule that
    // a thread never invalidates what it reads, which the frame tags catch.)
    for (const Retired& r : retired_) {
      if (r.hva < first || r.hva >= end || cache_readers::reading(r.cache)) continue;
      if (std::find(lockfree.begin(), lockfree.end(), r.cache) == lockfree.end()) lockfree.push_back(r.cache);
    }
  }
  // Outside the registry lock: a reader being waited for never needs it, but
  // an activation on another thread does.
  if (!lockfree.empty()) {
    if (cache_readers::wait_for_readers(lockfree)) vm_.counters().add(Counter::cache_reader_barriers);
    vm_.counters().add(Counter::cache_reader_waits);
  }
  return vcpus;
}

void CacheRegistry::prefetch(Hva start, Hva end) const {
  const Hva first = start & kPageMask;
  if (end <= first || (end - first) / kPageSize > kPagesLookedUpOneByOne) return;
  for (Hva page = first; page < end; page += kPageSize) by_page_.prefetch(page);
}

size_t CacheRegistry::active_count() const {
  MutexLock l(mu_);
  return by_hva_.size();
}

CacheRegistry::~CacheRegistry() { drain_retired(); }

void CacheRegistry::index(PfnCache* c, Hva old_hva, Hva new_hva) {
  bool full = false;
  {
    MutexLock l(mu_);
    if (old_hva) {
      unindex_locked(c, old_hva);
      // In the same critical section: an invalidation of old_hva finds the
      // cache or its retired mapping, never neither.
      if (c->read_side() == CacheReadSide::lockfree) full = retire_locked(c, old_hva, {});
    }
    by_hva_.emplace(new_hva, c);
    by_page_.insert(new_hva, c);
  }
  if (full) drain_retired();
}

void CacheRegistry::unindex(PfnCache* c, Hva hva) {
  bool full = false;
  {
    MutexLock l(mu_);
    unindex_locked(c, hva);
    if (c->read_side() == CacheReadSide::lockfree) full = retire_locked(c, hva, {});
  }
  if (full) drain_retired();
}

void CacheRegistry::retire_window(const PfnCache* c, host::RemapWindow window) {
  bool full = false;
  {
    MutexLock l(mu_);
    full = retire_locked(c, 0, std::move(window));
  }
  if (full) drain_retired();
}

bool CacheRegistry::retire_locked(const void* c, Hva hva, host::RemapWindow window) {
  mu_.assert_held();
  retired_.push_back({next_retired_id_++, c, hva, std::move(window)});
  vm_.counters().add(Counter::cache_mappings_retired);
  return retired_.size() >= kRetiredBatch;
}

size_t CacheRegistry::retired_count() const {
  MutexLock l(mu_);
  return retired_.size();
}

void CacheRegistry::drain_retired() {
  // The entries stay listed while their readers are waited for: an
  // invalidation of a retired hva meanwhile waits for them too.
  std::vector<uint64_t> ids;
  std::vector<const void*> caches;
  {
    MutexLock l(mu_);
    for (const Retired& r : retired_) {
      if (cache_readers::reading(r.cache)) continue;
      ids.push_back(r.id);
      if (std::find(caches.begin(), caches.end(), r.cache) == caches.end()) caches.push_back(r.cache);
    }
  }
  if (ids.empty()) return;
  if (cache_readers::wait_for_readers(caches)) vm_.counters().add(Counter::cache_reader_barriers);
  vm_.counters().add(Counter::cache_retired_drains);
  std::vector<Retired> drained;  // declared before the lock: unmapped after its release
  MutexLock l(mu_);
  auto done = [&](const Retired& r) { return std::binary_search(ids.begin(), ids.end(), r.id); };
  for (Retired& r : retired_)
    if (done(r)) drained.push_back(std::move(r));
  std::erase_if(retired_, done);
}

void CacheRegistry::unindex_locked(PfnCache* c, Hva hva) {
  mu_.assert_held();
  NC_CHECK(by_page_.erase(hva, c));
  auto [lo, hi] = by_hva_.equal_range(hva);
  for (auto it = lo; it != hi; ++it) {
    if (it->second == c) {
      by_hva_.erase(it);
      return;
    }
  }
  NC_CHECK(!"cache missing from the registry");
}

}  // namespace nestcache::vm
