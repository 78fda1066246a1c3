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
//
// A lock-free cache that leaves a mapping (moves to another hva, deactivates,
// replaces a remap window) cannot know that no reader still uses it without
// waiting for its readers, and that wait interrupts every CPU running a
// reader (cache_readers.h). So the old mapping is *retired* instead: until a
// wait for the cache's readers has passed, an invalidation of the old hva
// waits for them as it would for the cache itself (the host cannot free the
// frame under a reader), and an old remap window stays mapped. Retired
// mappings are drained together, one wait for kRetiredBatch of them, and all
// at once when a cache deactivates, so a VM whose caches are all inactive has
// none left.
#pragma once

#include <map>
#include <vector>

#include "host/phys_mem.h"
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
  // Retired mappings not yet drained.
  size_t retired_count() const NC_EXCLUDES(mu_);
  // Waits for the readers of every retired mapping and unmaps their windows,
  // except those of caches the calling thread is reading (they stay retired).
  void drain_retired() NC_EXCLUDES(mu_);

  // Mappings retired before a drain waits for them all.
  static constexpr size_t kRetiredBatch = 16;

  ~CacheRegistry();

 private:
  friend class PfnCache;
  // An old mapping of a lock-free cache: its hva (0: none, a window only)
  // and remap window (maybe empty).
  struct Retired {
    uint64_t id;
    const void* cache;
    Hva hva;
    host::RemapWindow window;
  };

  // Moves c's entry from old_hva (0: none) to new_hva, retiring old_hva if
  // c is lock-free.
  void index(PfnCache* c, Hva old_hva, Hva new_hva) NC_EXCLUDES(mu_);
  // Removes c's entry, retiring hva if c is lock-free.
  void unindex(PfnCache* c, Hva hva) NC_EXCLUDES(mu_);
  void unindex_locked(PfnCache* c, Hva hva) NC_REQUIRES(mu_);
  // Retires a lock-free cache's old remap window.
  void retire_window(const PfnCache* c, host::RemapWindow window) NC_EXCLUDES(mu_);
  // Adds an entry; true if a batch is full and the caller should drain.
  bool retire_locked(const void* c, Hva hva, host::RemapWindow window) NC_REQUIRES(mu_);

  Vm& vm_;
  mutable Mutex mu_{LockRank::kCacheRegistry};
  PageIndex by_page_ NC_GUARDED_BY(mu_);
  std::multimap<Hva, PfnCache*> by_hva_ NC_GUARDED_BY(mu_);
  std::vector<Retired> retired_ NC_GUARDED_BY(mu_);
  uint64_t next_retired_id_ NC_GUARDED_BY(mu_) = 0;
};

}  // namespace nestcache::vm
