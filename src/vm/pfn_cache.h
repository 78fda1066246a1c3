// PfnCache: a persistent gfn -> pfn mapping kept valid by invalidation
// (KVM's gfn_to_pfn_cache; the "after" of the seed, DESIGN.md §3).
//
// A cache maps one guest page (gpa, len within the page) and keeps it mapped
// across VM exits and entries: managed frames through the direct map, at no
// cost; unmanaged frames through one remap window that stays open until the
// pfn changes. Two things make a mapping go bad, and both are caught:
//   - the host changes the page's frame (migrate, discard): the MMU notifier
//     marks the cache invalid (CacheRegistry::invalidate) and waits for its
//     readers before the old frame is copied or freed;
//   - the VMM changes memslots: the cache's memslot generation no longer
//     matches, and the check fails.
// A cache bound to a vCPU ("guest uses pfn", seed patch 2) is one whose pfn
// the hardware uses (written into vmcs02). Invalidating it also forces that
// vCPU out of guest mode before the notifier returns.
//
// Use: `CachePtr p = cache.read(gpa, len)` checks the cache and, if it holds,
// returns a handle that keeps the mapping usable until it goes away (the
// read side is held for the handle's lifetime); an empty handle means
// refresh (or activate) with no handle held, and try again. lock(gpa, len)
// packages that loop (the seed's nested_gpc_lock).
//
// Read sides (CacheReadSide, chosen per cache; a VM's default in VmOptions):
//   rwlock    KVM's: a handle holds rw_ shared; invalidation and refresh
//             take it exclusive, so they wait for readers as they lock.
//             (read() tries the lock-free side first: a reader slot is
//             entered and left before rw_ is taken, see read().)
//   lockfree  a handle takes no lock: it names the cache in a per-thread
//             slot (cache_readers.h) and reads the mapping between two loads
//             of a sequence count. An invalidation flips the count to
//             invalid, then waits until no slot names the cache; a refresh
//             does the same before it unmaps a remap window a reader may
//             still use. A check costs a few loads, no atomic
//             read-modify-write; an invalidation that finds such a cache pays
//             one membarrier(2).
// Both read sides share everything else: the writers (activate, refresh,
// deactivate, the notifier) are serialised by rw_ held exclusive, and the
// refresh / invalidate protocol is the same.
//
// Refresh (KVM's hva_to_pfn_retry): resolve, fault in and map with no cache
// lock held, then install under rw_ unless an invalidation of this hva ran
// since the snapshot or is running. "Ran" is this cache's own count of
// invalidations that found it (the registry bumps it), so invalidations of
// other pages never force a retry; "running" makes the refresh block until
// that invalidation ends (Vm::wait_for_invalidation) instead of spinning.
// Retries, waits and time waited are counted (cache_refresh_retries,
// cache_refresh_waits, cache_refresh_wait_ns).
//
// Locks (base/lock_order.h): refresh_mu_ serialises activate / refresh /
// deactivate; rw_ serialises every change of the mapping fields. A CachePtr
// counts as holding rw_ shared in lock-checking builds, whatever the read side.
#pragma once

#include <atomic>
#include <cstring>
#include <functional>
#include <memory>
#include <span>
#include <utility>

#include "base/check.h"
#include "base/mutex.h"
#include "vm/cache_readers.h"
#include "vm/cache_registry.h"
#include "vm/vm.h"

namespace nestcache::vm {

class CacheRegistry;
class PfnCache;

// A checked, held mapping of [gpa(), gpa() + size()) of one pfn cache (the
// shape of Zircon's GuestPtr). While it lives, the cache's mapping stays
// usable: an invalidation or a refresh of the cache waits for it to go. Every
// access is bounds-checked (a violation aborts: it is a bug in L0, not bad
// guest input) and checks the frame tag (a mismatch is a counted stale
// access). Move-only; belongs to the thread that made it; must not outlive
// its cache. While holding one, do not refresh, activate or deactivate a
// cache, or invalidate host memory, on the same thread: those wait for it.
class CachePtr {
 public:
  CachePtr() = default;
  CachePtr(CachePtr&& o) noexcept
      : cache_(std::exchange(o.cache_, nullptr)),
        data_(o.data_),
        version_cell_(o.version_cell_),
        version_(o.version_),
        gpa_(o.gpa_),
        size_(o.size_),
        slot_(o.slot_) {}
  CachePtr& operator=(CachePtr&& o) noexcept;
  [[gnu::always_inline]] ~CachePtr() { reset(); }

  explicit operator bool() const { return cache_ != nullptr; }
  Gpa gpa() const { return gpa_; }
  size_t size() const { return size_; }
  // The frame and its version when the cache mapped it ({} if empty).
  host::FrameTag tag() const;
  Pfn pfn() const { return tag().pfn; }
  // True if the frame still backs the gpa; otherwise counts a stale access
  // (naming `what`) and returns false.
  // Always inlined (at() too): a compiler that outlined part of it would
  // pass it the handle's address and keep the handle in memory.
  [[gnu::always_inline]] bool check_tag(const char* what = "pfn cache") const;

  template <class T>
  T read(size_t off) const {
    T v;
    std::memcpy(&v, at(off, sizeof v), sizeof v);
    return v;
  }
  template <class T>
  void write(size_t off, T v) const {
    std::memcpy(at(off, sizeof v), &v, sizeof v);
  }
  // Atomic read-modify-writes, for pages other CPUs update concurrently (the
  // posted-interrupt descriptor, the virtual-APIC IRR). `off` must be
  // aligned to sizeof(T).
  template <class T>
  T exchange(size_t off, T v) const {
    return std::atomic_ref<T>(*reinterpret_cast<T*>(at(off, sizeof(T)))).exchange(v);
  }
  template <class T>
  T fetch_or(size_t off, T v) const {
    return std::atomic_ref<T>(*reinterpret_cast<T*>(at(off, sizeof(T)))).fetch_or(v);
  }
  template <class T>
  T fetch_and(size_t off, T v) const {
    return std::atomic_ref<T>(*reinterpret_cast<T*>(at(off, sizeof(T)))).fetch_and(v);
  }
  // [off, off + len) as bytes, tag checked once: for bulk copies (the
  // MSR-bitmap merge, the eVMCS image). Valid while the handle lives.
  std::span<std::byte> bytes(size_t off, size_t len) const { return {at(off, len), len}; }

  // Ends the read now (the destructor does it otherwise). Always inlined,
  // the destructor's call on an unwinding path too: a call that took the
  // handle's address would keep every handle in memory.
  [[gnu::always_inline]] void reset() {
    if (!cache_) return;
    if (slot_) {
      end_lockfree_read();
    } else {
      end_rwlock_read(cache_);
    }
    cache_ = nullptr;
  }

 private:
  friend class PfnCache;
  // The read side is held from PfnCache::read to these, across scopes the
  // compile-time analysis cannot follow (the handle is returned and moved),
  // so the pair is checked at run time instead (lock_checks, in
  // lock-checking builds).
  void end_lockfree_read() const {
#ifdef NESTCACHE_LOCK_CHECKS
    lock_checks::release(LockRank::kCacheRw, lock_id());
#endif
    cache_readers::exit(slot_);
  }
  // Static, so that the handle's address does not escape and the compiler
  // can keep a short-lived handle in registers.
  static void end_rwlock_read(const PfnCache* cache) NC_NO_THREAD_SAFETY_ANALYSIS;
  // check_tag()'s mismatch: PhysMem::check through the cache's PhysMem,
  // counted in its VM's counters too. Static and out of line for the same
  // reason, and so that the PhysMem and the counters are loaded only here.
  [[gnu::cold, gnu::noinline]] static bool report_stale(const PfnCache* cache, const host::VersionCell* cell,
                                                       uint64_t version, const char* what);
  const void* lock_id() const;
  [[gnu::always_inline]] std::byte* at(size_t off, size_t len) const {
    NC_CHECK(cache_ && off <= size_ && len <= size_ - off);
    check_tag();
    return data_ + off;
  }

  // Only what an access needs: a handle that lives in a caller's function
  // is kept in registers, and whatever the caller does not use is never
  // computed. The PhysMem and the counters a stale access is reported to
  // are reached through cache_, on that slow path only.
  const PfnCache* cache_ = nullptr;
  std::byte* data_ = nullptr;                       // the byte at gpa_
  const host::VersionCell* version_cell_ = nullptr;  // the frame's (PhysMem::version_cell)
  uint64_t version_ = 0;                            // its version when mapped
  Gpa gpa_ = kInvalidGpa;
  size_t size_ = 0;
  cache_readers::Slot* slot_ = nullptr;  // lockfree: the reader slot; null: rw_ held shared
};

class PfnCache {
 public:
  // kvm_gpc_init (vcpu == nullptr) / kvm_gpc_init_for_vcpu, with the VM's
  // read side (VmOptions::cache_read_side). With `hw`, the cache maps frames
  // through the hardware view instead of the direct map or a remap window:
  // mapping costs nothing, invalidation works as usual (the `oracle` page
  // strategy: the physical limit of the cache design).
  explicit PfnCache(Vm& vm, Vcpu* guest_uses_pfn = nullptr, const host::HardwareView* hw = nullptr)
      : PfnCache(vm, vm.options().cache_read_side, guest_uses_pfn, hw) {}
  // The same with a read side of its own (benchmarks compare the two).
  PfnCache(Vm& vm, CacheReadSide side, Vcpu* guest_uses_pfn = nullptr, const host::HardwareView* hw = nullptr);
  ~PfnCache();
  PfnCache(const PfnCache&) = delete;
  PfnCache& operator=(const PfnCache&) = delete;

  // Starts caching gpa (len bytes must fit in its page) and maps it
  // (kvm_gpc_activate). A gpa that resolves to the host page already mapped
  // (another offset in it, an aliasing memslot) keeps the mapping. Errors:
  // EINVAL if len crosses the page, and nothing changes (an inactive cache
  // stays inactive, a valid one keeps serving its old gpa); otherwise the
  // refresh error if the gpa cannot be resolved or mapped, and the cache
  // stays active and invalid at gpa.
  Status activate(Gpa gpa, size_t len) NC_EXCLUDES(refresh_mu_, rw_);
  // Unmaps and stops caching; a no-op on an inactive cache.
  void deactivate() NC_EXCLUDES(refresh_mu_, rw_);
  // Re-resolves the gpa and remaps it, retrying while an invalidation races
  // the resolve. EFAULT: no valid memslot holds the gpa, or a read-only one
  // (the mapping is writable); EINVAL: inactive or len crosses the page;
  // ENOMEM: out of mappings.
  Status refresh(size_t len) NC_EXCLUDES(refresh_mu_, rw_);

  // kvm_gpc_check plus the read side: a handle on [gpa, gpa + len) if the
  // cache is active, valid, of the current memslot generation, caches `gpa`
  // and len fits in the page; an empty handle otherwise (nothing held).
  CachePtr read(Gpa gpa, size_t len) const NC_EXCLUDES(rw_);
  // The same for whatever gpa the cache holds.
  CachePtr read(size_t len) const NC_EXCLUDES(rw_) { return read(kAnyGpa, len); }
  // read(len) succeeds right now (a test and report convenience).
  bool check(size_t len) const NC_EXCLUDES(rw_) { return static_cast<bool>(read(len)); }
  // The seed's nested_gpc_lock: read(gpa, len), activating the cache at gpa
  // (if it holds another) or refreshing it until the check holds. Returns the
  // activate / refresh error if the page cannot be mapped.
  Result<CachePtr> lock(Gpa gpa, size_t len) NC_EXCLUDES(refresh_mu_, rw_);

  // active && !valid: the hardware must not enter with this pfn (patch 4's
  // kvm_gpc_invalid). Lock-free; no generation check.
  bool invalid() const { return active() && (seq_.load() & kInvalidBit); }
  bool active() const { return active_.load(); }
  // The gpa the cache holds (kInvalidGpa before the first activation).
  // Lock-free; it changes only when activate names another gpa (which the
  // cache takes even if the refresh then fails, as KVM records it).
  Gpa gpa() const { return gpa_.load(std::memory_order_relaxed); }
  CacheReadSide read_side() const { return read_side_; }

  // The vCPU whose hardware uses the pfn; rebinding is seed patch 9 (v4).
  // set_vcpu is a seq_cst store, and read()'s first load of seq_ is seq_cst:
  // with the notifier's seq_cst store of the invalid bit before its seq_cst
  // load of vcpu_ (notifier_invalidate), a rebind followed by a read either
  // sees the cache invalid or is seen by the invalidation, which then kicks
  // and waits for the new vCPU.
  Vcpu* vcpu() const { return vcpu_.load(); }
  void set_vcpu(Vcpu* v) { vcpu_.store(v, std::memory_order_seq_cst); }

  // Test hooks, set before any other thread uses the cache (nullptr clears).
  // Refresh: runs inside refresh after the new frame is mapped and before
  // the cache lock is retaken, to land an invalidation deterministically.
  void set_refresh_hook(std::function<void()> hook) { test_hooks().refresh = std::move(hook); }
  // Invalidate: runs on the notifier's thread inside an invalidation that
  // finds the cache active in its range, with rw_ held exclusive, between
  // marking the cache invalid and naming its bound vCPU (naming and marking,
  // under the model's NAME_FIRST); to land a rebind (set_vcpu) and a read
  // there.
  void set_invalidate_hook(std::function<void()> hook) { test_hooks().invalidate = std::move(hook); }

  Vm& vm() const { return vm_; }

 private:
  friend class CacheRegistry;
  friend class CachePtr;
  static constexpr Gpa kAnyGpa = kInvalidGpa - 1;
  // seq_ = version << 2 | rwlock << 1 | invalid: the version moves on every
  // change of the mapping fields, which are written only while the invalid
  // bit is set. The read side is a constant bit of it, so that a lock-free
  // read tests both with one instruction, on a load it makes anyway: the low
  // two bits are zero for a valid cache of the lock-free side.
  static constexpr uint64_t kInvalidBit = 1;
  static constexpr uint64_t kRwlockBit = 2;
  static constexpr uint64_t kVersionStep = 4;
  struct Mapping {
    host::FrameTag tag;
    std::byte* khva = nullptr;
    host::RemapWindow window;  // unmanaged frames only
  };
  // What the notifier did to this cache (CacheRegistry::invalidate).
  struct Hit {
    bool affected = false;  // active and its page in the range
    bool flipped = false;   // it was valid
    Vcpu* vcpu = nullptr;   // bound vCPU, if any
  };

  // The mapping fields as one read saw them.
  struct Snapshot {
    Gpa gpa;
    uint64_t generation;
    std::byte* khva;
    const host::VersionCell* version_cell;
    uint64_t version;
  };
  // read()'s path when the lock-free check fails: leaves the slot and, for a
  // cache of the rwlock side, takes rw_ shared and checks again. True, with
  // rw_ left held shared for the handle, if that check holds; `s` is then the
  // mapping. Not filling the caller's handle itself, so that the handle of an
  // inlined read() never has its address taken. Out of line and cold, so that
  // the compiler lays the passing lock-free check out as one straight run of
  // code: with this path inline (or merely not cold), it placed the path
  // between the check's branches, a taken jump on every read (1.22 against
  // 1.01 ns, docs/vm-performance.md §6). For the rwlock side this is every
  // read, where the lock's atomics cost far more than the code's placement.
  [[gnu::cold, gnu::noinline]] bool read_after_failed_check(Gpa want, size_t len, cache_readers::Slot* slot,
                                                           Snapshot& s) const NC_NO_THREAD_SAFETY_ANALYSIS;
  // Fills a handle for a checked mapping.
  void fill(CachePtr& p, const Snapshot& s, size_t len, cache_readers::Slot* slot) const {
    p.cache_ = this;
    p.data_ = s.khva + page_offset(s.gpa);
    p.version_cell_ = s.version_cell;
    p.version_ = s.version;
    p.gpa_ = s.gpa;
    p.size_ = len;
    p.slot_ = slot;
  }
  // True if the mapping fields (read by the caller) pass the check. The
  // bounds use the gpa asked for when there is one (if it is not the cached
  // one the check fails anyway), so that a caller's constant gpa and length
  // fold them away.
  bool fits(Gpa want, size_t len, const Snapshot& s) const {
    const Gpa gpa = want == kAnyGpa ? s.gpa : want;
    return gpa == s.gpa && s.generation == memslots_.generation() && fits_in_page(gpa, len);
  }
  // Starts loading, for writing, every cache line of the cache: what the
  // notifier and the refresh after it touch (the registry calls it as it
  // matches the cache, before notifier_invalidate takes rw_). A hint only.
  void prefetch_for_writer() const {
    for (size_t off = 0; off < sizeof(PfnCache); off += 64) __builtin_prefetch(reinterpret_cast<const char*>(this) + off, 1);
  }
  // The registry's call for an invalidation of [start, end) (page aligned).
  Hit notifier_invalidate(Hva start, Hva end) NC_EXCLUDES(rw_);
  // refresh / activate: makes the cache map `gpa` (KVM's __kvm_gpc_refresh).
  Status refresh_locked(Gpa gpa, size_t len) NC_REQUIRES(refresh_mu_) NC_EXCLUDES(rw_);
  // gpa -> hva through the active memslots; `generation` is the set's.
  Result<Hva> resolve(Gpa gpa, uint64_t& generation) const;
  // Makes the cache invalid at `gpa` and unmaps it (gpa is in no memslot).
  void drop_mapping(Gpa gpa) NC_REQUIRES(refresh_mu_) NC_EXCLUDES(rw_);
  // The retry loop of refresh: waits out an in-flight invalidation of hva,
  // maps its frame and installs it unless an invalidation of hva raced.
  Status map_and_install(Hva hva, uint64_t generation) NC_REQUIRES(refresh_mu_) NC_EXCLUDES(rw_);
  Result<Mapping> map_frame(Hva hva);
  // Sets the invalid bit (moving the version on) if it is clear.
  void set_invalid_locked() NC_REQUIRES(rw_);
  // The notifier's mark: counts the invalidation that found the cache, then
  // set_invalid_locked().
  void mark_invalid_for_notifier() NC_REQUIRES(rw_);
  // Publishes new mapping fields and clears the invalid bit.
  void publish_locked(const host::FrameTag& tag, std::byte* khva, uint64_t generation) NC_REQUIRES(rw_);
  // Clears the invalid bit (moving the version on): the fields written
  // since set_invalid_locked() are the cache's.
  void revalidate_locked() NC_REQUIRES(rw_);
  // Unmaps a window taken out of the cache now (rwlock), or retires it to the
  // registry (lock-free), which unmaps it once no reader can still use it.
  void release_window(host::RemapWindow w) const;

  // What a read loads, together in one cache line (the writers' own state
  // lives elsewhere, and invalidations_ changes on every notifier hit): the
  // read side, the memslots whose generation the check compares, and the
  // mapping fields. The mapping fields are written with rw_ held exclusive
  // (see seq_); read under rw_ shared (rwlock) or lock-free between two
  // loads of seq_ (lockfree). Atomics so that a lock-free reader's racing
  // load is defined; stored with release after seq_ gains its invalid bit,
  // loaded with acquire before seq_ is loaded again (the seqcount's ordering
  // without fences).
  alignas(64) const CacheReadSide read_side_;
  const Memslots& memslots_;  // vm_.memslots()
  std::atomic<uint64_t> seq_;  // invalid, and kRwlockBit for the rwlock side: see above
  std::atomic<Gpa> gpa_{kInvalidGpa};
  std::atomic<uint64_t> generation_{0};
  std::atomic<std::byte*> khva_{nullptr};  // the mapped page
  // The frame's version cell (PhysMem::version_cell; null: no frame) and
  // the version the frame had when mapped: the tag, in the form the
  // per-access check uses.
  std::atomic<const host::VersionCell*> version_cell_{nullptr};
  std::atomic<uint64_t> tag_version_{0};

  // What the notifier and a refresh touch, in the three lines after the
  // read line, no cold field among them: a cache that an invalidation finds
  // among many is usually out of the processor's caches, and the registry
  // prefetches these four lines at once when it matches the cache
  // (prefetch_for_writer), so they cost about one miss instead of one per
  // line taken in turn (lock word, then flags, then mapping fields).
  // The lock the notifier takes first, a line of its own (64 bytes with
  // glibc): lock_shared of the rwlock side writes it, which must not
  // disturb the read line.
  alignas(64) mutable SharedMutex rw_{LockRank::kCacheRw};
  // The notifier's test and the refresh's inputs.
  std::atomic<bool> active_{false};
  // Invalidations that found this cache active in their range; a refresh
  // retries if it moved while the refresh resolved.
  std::atomic<uint64_t> invalidations_{0};
  Hva hva_ NC_GUARDED_BY(rw_) = 0;  // 0: not resolved
  std::atomic<Vcpu*> vcpu_;
  Vm& vm_;
  const host::HardwareView* hw_;
  Hva indexed_hva_ NC_GUARDED_BY(refresh_mu_) = 0;  // key in the registry
  // Test hooks (set_refresh_hook, set_invalidate_hook); null until one is
  // set, which is all a refresh or an invalidation loads of them.
  struct TestHooks {
    std::function<void()> refresh;
    std::function<void()> invalidate;
  };
  TestHooks& test_hooks() {
    if (!test_hooks_) test_hooks_ = std::make_unique<TestHooks>();
    return *test_hooks_;
  }
  std::unique_ptr<TestHooks> test_hooks_;
  // What only activate / refresh / deactivate take.
  mutable Mutex refresh_mu_{LockRank::kCacheRefresh};
  host::RemapWindow window_ NC_GUARDED_BY(rw_);
};

#if defined(__GLIBCXX__) && defined(__x86_64__)
// The read line and the three writer lines, nothing more (see the fields).
static_assert(sizeof(PfnCache) == 4 * 64);
#endif

inline const void* CachePtr::lock_id() const { return &cache_->rw_; }

inline host::FrameTag CachePtr::tag() const {
  if (!cache_) return {};
  return {cache_->vm_.phys().pfn_of(version_cell_), version_};
}

[[gnu::always_inline]] inline bool CachePtr::check_tag(const char* what) const {
  if (host::PhysMem::holds(version_cell_, version_)) [[likely]]
    return true;
  return report_stale(cache_, version_cell_, version_, what);
}

// Inlined into every caller: a handle that does not leave the caller then
// lives in registers, and the checks the caller's constants decide (the
// bounds, the gpa) fold away.
[[gnu::always_inline]] inline CachePtr PfnCache::read(Gpa want, size_t len) const {
  CachePtr p;
  // Every cache enters the lock-free side first: a cache of the rwlock side
  // fails the test of seq_ below and takes its lock on the cold path.
  cache_readers::Slot* const slot = cache_readers::enter(this);
  // The seqcount read: a valid version, the fields, the same version again.
  // An invalidation that flips seq_ after our first load waits for our slot.
  // Acquire loads throughout (plain loads on x86): none of the field loads
  // may move after the second load of seq_. The first is seq_cst (also a
  // plain load on x86), for a read right after set_vcpu (see there).
  const uint64_t seq = seq_.load(std::memory_order_seq_cst);
  const Snapshot s{gpa_.load(std::memory_order_acquire), generation_.load(std::memory_order_acquire),
                   khva_.load(std::memory_order_acquire), version_cell_.load(std::memory_order_acquire),
                   tag_version_.load(std::memory_order_acquire)};
  if ((seq & (kInvalidBit | kRwlockBit)) || seq_.load(std::memory_order_acquire) != seq || !fits(want, len, s))
      [[unlikely]] {
    Snapshot locked;
    if (read_after_failed_check(want, len, slot, locked)) fill(p, locked, len, nullptr);
    return p;
  }
#ifdef NESTCACHE_LOCK_CHECKS
  lock_checks::acquire(LockRank::kCacheRw, &rw_);
#endif
  fill(p, s, len, slot);
  return p;
}

}  // namespace nestcache::vm
