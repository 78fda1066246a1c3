// PfnCache: a persistent gfn -> pfn mapping kept valid by invalidation
// (KVM's gfn_to_pfn_cache; the "after" of the seed, DESIGN.md §3).
//
// A cache maps one guest page (gpa, len within the page) and keeps it mapped
// across VM exits and entries: managed frames through the direct map, at no
// cost; unmanaged frames through one remap window that stays open until the
// pfn changes. Two things make a mapping go bad, and both are caught:
//   - the host changes the page's frame (migrate, discard): the MMU notifier
//     marks the cache invalid (CacheRegistry::invalidate) before the old
//     frame is freed;
//   - the VMM changes memslots: the cache's memslot generation no longer
//     matches, and check() fails.
// A cache bound to a vCPU ("guest uses pfn", seed patch 2) is one whose pfn
// the hardware uses (written into vmcs02). Invalidating it also forces that
// vCPU out of guest mode before the notifier returns.
//
// Use: under rcu::ReadLock and ReaderLock(cache.lock()), check(len); if it
// fails, drop the read lock and refresh(len) (or activate at a new gpa) and
// try again. with_read_lock() packages that loop.
//
// Locks (base/lock_order.h): refresh_mu_ serialises activate / refresh /
// deactivate; rw_ guards the mapping fields. Readers take rw_ shared.
#pragma once

#include <atomic>
#include <cstring>
#include <functional>
#include <map>
#include <vector>

#include "base/mutex.h"
#include "base/rcu.h"
#include "vm/vm.h"

namespace nestcache::vm {

class PfnCache;

// The index of active caches, ordered by hva, that invalidation searches in
// O(log n + k) instead of walking every cache.
class CacheRegistry {
 public:
  explicit CacheRegistry(Vm& vm) : vm_(vm) {}
  // Marks every active cache whose page lies in [start, end) invalid.
  // Returns the vCPUs bound to those caches, valid or already invalid
  // (deduplicated): the caller must wait for them to leave guest mode.
  std::vector<Vcpu*> invalidate(Hva start, Hva end) NC_EXCLUDES(mu_);
  size_t active_count() const NC_EXCLUDES(mu_);

 private:
  friend class PfnCache;
  void index(PfnCache* c, Hva old_hva, Hva new_hva) NC_EXCLUDES(mu_);
  void unindex(PfnCache* c, Hva hva) NC_EXCLUDES(mu_);
  void unindex_locked(PfnCache* c, Hva hva) NC_REQUIRES(mu_);

  Vm& vm_;
  mutable Mutex mu_{LockRank::kCacheRegistry};
  std::multimap<Hva, PfnCache*> by_hva_ NC_GUARDED_BY(mu_);
};

class PfnCache {
 public:
  // kvm_gpc_init (vcpu == nullptr) / kvm_gpc_init_for_vcpu. With `hw`, the
  // cache maps frames through the hardware view instead of the direct map or
  // a remap window: mapping costs nothing, invalidation works as usual (the
  // `oracle` page strategy: the physical limit of the cache design).
  explicit PfnCache(Vm& vm, Vcpu* guest_uses_pfn = nullptr, const host::HardwareView* hw = nullptr);
  ~PfnCache();
  PfnCache(const PfnCache&) = delete;
  PfnCache& operator=(const PfnCache&) = delete;

  // Starts caching gpa (len bytes must fit in its page) and maps it.
  // Returns the refresh error if the gpa cannot be resolved or mapped; the
  // cache then stays active and invalid.
  Status activate(Gpa gpa, size_t len) NC_EXCLUDES(refresh_mu_, rw_);
  // Unmaps and stops caching; a no-op on an inactive cache.
  void deactivate() NC_EXCLUDES(refresh_mu_, rw_);
  // Re-resolves the gpa and remaps it, retrying while an invalidation races
  // the resolve. EFAULT: no valid memslot holds the gpa; EINVAL: inactive
  // or len crosses the page; ENOMEM: out of mappings.
  Status refresh(size_t len) NC_EXCLUDES(refresh_mu_, rw_);

  // Requires rw_ held (shared suffices) inside an rcu::ReadLock: active,
  // valid, same memslot generation, and [gpa, gpa + len) within the page.
  bool check(size_t len) const NC_REQUIRES_SHARED(rw_);
  SharedMutex& lock() const NC_RETURN_CAPABILITY(rw_) { return rw_; }

  // active && !valid: the hardware must not enter with this pfn (patch 4's
  // kvm_gpc_invalid). Lock-free; no generation check.
  bool invalid() const { return active_flag_.load() && !valid_flag_.load(); }
  bool active() const { return active_flag_.load(); }

  // The vCPU whose hardware uses the pfn; rebinding is seed patch 9 (v4).
  Vcpu* vcpu() const { return vcpu_.load(); }
  void set_vcpu(Vcpu* v) { vcpu_.store(v); }

  // Mapping fields; require rw_.
  Gpa gpa() const NC_REQUIRES_SHARED(rw_) { return gpa_; }
  Pfn pfn() const NC_REQUIRES_SHARED(rw_) { return tag_.pfn; }
  host::FrameTag tag() const NC_REQUIRES_SHARED(rw_) { return tag_; }
  // The mapped page plus the gpa's offset. Callers access through read/write
  // below, which check the frame tag, or call check_tag() themselves.
  std::byte* khva() const NC_REQUIRES_SHARED(rw_) { return khva_ ? khva_ + page_offset(gpa_) : nullptr; }
  bool check_tag(const char* what) const NC_REQUIRES_SHARED(rw_);

  template <class T>
  T read(size_t offset) const NC_REQUIRES_SHARED(rw_) {
    T v;
    check_tag("pfn cache");
    std::memcpy(&v, khva() + offset, sizeof v);
    return v;
  }
  template <class T>
  void write(size_t offset, T v) const NC_REQUIRES_SHARED(rw_) {
    check_tag("pfn cache");
    std::memcpy(khva() + offset, &v, sizeof v);
  }

  // Runs fn() with rw_ held shared on a checked mapping of gpa (activating
  // the cache there if it caches another gpa), refreshing as needed.
  // Returns the activate/refresh error if the page cannot be mapped.
  template <class Fn>
  Status with_read_lock(Gpa gpa, size_t len, Fn&& fn) NC_EXCLUDES(refresh_mu_, rw_) {
    for (;;) {
      {
        rcu::ReadLock rcu;
        ReaderLock l(rw_);
        if (check(len) && gpa_ == gpa) {
          fn();
          return ok();
        }
      }
      Status st = active() && current_gpa() == gpa ? refresh(len) : activate(gpa, len);
      if (!st) return st;
    }
  }

  // Test hook: runs inside refresh after the new frame is mapped and before
  // the cache lock is retaken, to land an invalidation deterministically.
  void set_refresh_hook(std::function<void()> hook) { refresh_hook_ = std::move(hook); }

  Vm& vm() const { return vm_; }

 private:
  friend class CacheRegistry;
  struct Mapping {
    host::FrameTag tag;
    std::byte* khva = nullptr;
    host::RemapWindow window;  // unmanaged frames only
  };
  friend struct PfnCacheTestPeer;
  Gpa current_gpa() const NC_EXCLUDES(rw_);
  Status refresh_locked(size_t len) NC_REQUIRES(refresh_mu_) NC_EXCLUDES(rw_);
  Result<Mapping> map_frame(Hva hva);

  Vm& vm_;
  std::atomic<Vcpu*> vcpu_;
  const host::HardwareView* hw_;
  std::function<void()> refresh_hook_;

  mutable Mutex refresh_mu_{LockRank::kCacheRefresh};
  mutable SharedMutex rw_{LockRank::kCacheRw};
  Gpa gpa_ NC_GUARDED_BY(rw_) = kInvalidGpa;
  Hva hva_ NC_GUARDED_BY(rw_) = 0;         // 0: not resolved
  Hva indexed_hva_ NC_GUARDED_BY(refresh_mu_) = 0;  // key in the registry
  uint64_t generation_ NC_GUARDED_BY(rw_) = 0;
  host::FrameTag tag_ NC_GUARDED_BY(rw_);
  std::byte* khva_ NC_GUARDED_BY(rw_) = nullptr;
  host::RemapWindow window_ NC_GUARDED_BY(rw_);
  bool active_ NC_GUARDED_BY(rw_) = false;
  bool valid_ NC_GUARDED_BY(rw_) = false;
  // Lock-free copies for invalid() (the last check before hardware entry).
  std::atomic<bool> active_flag_{false};
  std::atomic<bool> valid_flag_{false};
};

}  // namespace nestcache::vm
