// CacheRegistry: the index of a VM's active pfn caches by host address, which
// the MMU notifier searches for the caches an invalidation affects
// (DESIGN.md §3, "Invalidation").
//
// KVM walks every cache of the VM on every notifier event. Here an
// invalidation costs what it affects, whatever the number of caches:
//   - a range of up to kPagesLookedUpOneByOne pages (a migration, a discard of
//     a few pages: nearly every event) is looked up page by page in a flat
//     hash index (PageIndex), one or two cache lines per page;
//   - a longer range walks an index ordered by hva from its first page:
//     O(log n + k) for the k caches in it.
// Both indexes hold every active cache; PfnCache keeps them current as it
// activates, moves to another hva and deactivates.
#pragma once

#include <map>
#include <vector>

#include "base/mutex.h"
#include "vm/page_index.h"
#include "vm/vm.h"

namespace nestcache::vm {

class PfnCache;

class CacheRegistry {
 public:
  // Longest range, in pages, looked up page by page (above it the ordered
  // index is cheaper than one hash probe per page).
  static constexpr uint64_t kPagesLookedUpOneByOne = 16;

  explicit CacheRegistry(Vm& vm) : vm_(vm) {}

  // Marks every active cache whose page lies in [start, end) invalid, then
  // waits until no lock-free reader is still inside one of them. Returns the
  // vCPUs bound to those caches, valid or already invalid (deduplicated): the
  // caller must wait for them to leave guest mode.
  std::vector<Vcpu*> invalidate(Hva start, Hva end) NC_EXCLUDES(mu_);
  size_t active_count() const NC_EXCLUDES(mu_);
  // Starts loading the index entries invalidate(start, end) will look up
  // first, without taking the lock: the notifier calls it on entry, so that
  // the lookup, which comes after the EPT01 zap, finds them in the
  // processor's cache. A hint only; it changes nothing. (Outside the
  // analysis: it reads by_page_ without mu_, through the one call of
  // PageIndex that allows it.)
  void prefetch(Hva start, Hva end) const NC_NO_THREAD_SAFETY_ANALYSIS;

 private:
  friend class PfnCache;
  // Moves c's entry from old_hva (0: none) to new_hva.
  void index(PfnCache* c, Hva old_hva, Hva new_hva) NC_EXCLUDES(mu_);
  void unindex(PfnCache* c, Hva hva) NC_EXCLUDES(mu_);
  void unindex_locked(PfnCache* c, Hva hva) NC_REQUIRES(mu_);

  Vm& vm_;
  mutable Mutex mu_{LockRank::kCacheRegistry};
  PageIndex by_page_ NC_GUARDED_BY(mu_);
  std::multimap<Hva, PfnCache*> by_hva_ NC_GUARDED_BY(mu_);
};

}  // namespace nestcache::vm
