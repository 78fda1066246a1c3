// The project's lock order, in one place.
//
// A thread may only acquire a lock whose rank is strictly greater than every
// ranked lock it already holds. Debug, sanitizer and thread-safety builds
// (NESTCACHE_LOCK_CHECKS) check this at every acquisition and abort with both
// lock names on a violation; release builds compile the checks out.
//
// Outermost first:
//
//   kSlots          Vm::slots_lock_        memslot updates (KVM slots_lock)
//   kMmNotifiers    HostMm::notifiers_mu_  notifier list (held shared from an invalidation's start to its end)
//   kMmu            Vm::mmu_lock_          EPT01 map, invalidation counters
//   kCacheRefresh   PfnCache::refresh_mu_  one refresh/activate at a time
//   kCacheRegistry  CacheRegistry::mu_     index of active caches by hva
//   kCacheRw        PfnCache::rw_          the cache's pfn/pointer/valid
//   kMonitor        MonitorTable::mu_      armed monitors, line times; a watched
//                                          access runs under it (it may resolve an
//                                          hva) and a store wakes the waiters' APICs
//   kHostMm         HostMm::mu_            hva -> pfn bindings of regions
//   kPhysMem        PhysMem::mu_           free lists, pins
//   kLeaf           anything that calls nothing while held (counters, queues)
//
// DESIGN.md §7 lists the registry before the refresh mutex; we follow KVM
// (refresh_lock -> gpc_lock -> gpc->lock), because activate and refresh must
// update the registry's hva index while their refresh mutex is held, and the
// notifier never takes a refresh mutex, so this order has no cycle.
//
// A CachePtr (PfnCache::read) counts as holding kCacheRw for as long as it
// lives, under both read sides: the lock-free side takes no lock, but an
// invalidation or a refresh of that cache waits for the handle to go just as
// it would for a reader of rw_, so the same order applies (lock-checking
// builds track the handle under that rank). A refresh that waits for an
// in-flight invalidation to end blocks on Vm::invalidation_wait_mu_, a leaf.
//
// Nested-VMX and CPU locks (vCPU run state, nested-context table) rank below
// kSlots: a vCPU thread may call into the vm layer while holding them, never
// the reverse. The notifier waits for vCPUs to leave guest mode holding only
// kMmNotifiers, shared, from an invalidation's start to its end: no path a
// vCPU takes to leave guest mode subscribes or unsubscribes a notifier (only
// Vm's constructor and destructor do), so nothing it waits for needs it.
#pragma once

namespace nestcache {

enum class LockRank : int {
  kNone = 0,  // unranked: not checked (use for locks that nest nothing)
  kVcpuRun = 10,
  kNestedContexts = 20,
  kSlots = 30,
  kMmNotifiers = 35,
  kMmu = 40,
  kCacheRefresh = 50,
  kCacheRegistry = 60,
  kCacheRw = 70,
  kMonitor = 75,
  kHostMm = 80,
  kPhysMem = 90,
  kLeaf = 100,
};

const char* lock_rank_name(LockRank rank);

}  // namespace nestcache
