// Vm: one guest (L1) as L0 sees it (DESIGN.md §3).
//
// Owns the memslots, the EPT01 map (gfn -> frame, filled on EPT01 misses and
// zapped by the MMU notifier), the invalidation sequence that lets faults and
// pfn-cache refreshes detect a racing invalidation, the list of vCPUs and the
// registry of pfn caches. It subscribes to HostMm's MMU notifier.
//
// An invalidation, top to bottom (HostMm::migrate -> here):
//   1. invalidate_range_start: under mmu_lock, count the invalidation in
//      progress and widen the in-progress range; zap EPT01 entries of every
//      gfn whose hva is in the range.
//   2. Mark every pfn cache mapping the range invalid (CacheRegistry), and
//      wait for the lock-free readers still inside those caches.
//   3. If EPT01 entries went, every vCPU gets a TLB flush; every vCPU that
//      uses an invalidated cache's pfn in hardware gets kOutsideGuestMode;
//      both wait until the vCPUs have left guest mode.
//   4. invalidate_range_end: bump mmu_invalidate_seq, end the in-progress
//      count, and wake the refreshes waiting for it. Faults that snapshot the
//      sequence before step 1 and check it after step 4 (or during) retry.
//
// Thread safety: all public functions may be called from any thread, except
// where noted. Lock order: base/lock_order.h.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

#include "base/counters.h"
#include "base/mutex.h"
#include "host/host_mm.h"
#include "vm/memslots.h"
#include "vm/protocol_variant.h"
#include "vm/vcpu.h"

namespace nestcache::vm {

class CacheRegistry;

// How the pfn caches of a VM let readers in (vm/pfn_cache.h, "Read sides"):
// KVM's reader-writer lock, or a lock-free check that invalidations wait out.
enum class CacheReadSide { rwlock, lockfree };
const char* cache_read_side_name(CacheReadSide side);
// "rwlock" / "lockfree"; nullopt for anything else.
std::optional<CacheReadSide> parse_cache_read_side(std::string_view name);

// What a Vm is made with.
struct VmOptions {
  // The read side of every PfnCache made for this VM without one of its own
  // (the page strategies' caches). lockfree is the faster one
  // (BM_PfnCacheAccess in bench/micro_bench.cc).
  CacheReadSide cache_read_side = CacheReadSide::lockfree;
};

// One EPT01 leaf: the frame that backs a gfn, as of when it was filled.
struct Ept01Entry {
  host::FrameTag tag;
  bool writable = true;
};

class Vm : public host::MmuNotifier {
 public:
  // `id` names the VM in messages; it must be unique per HostMm.
  Vm(host::HostMm& mm, uint32_t id, VmOptions options = {});
  ~Vm() override;

  uint32_t id() const { return id_; }
  const VmOptions& options() const { return options_; }
  host::HostMm& mm() const { return mm_; }
  host::PhysMem& phys() const { return mm_.phys(); }
  Memslots& memslots() { return memslots_; }
  const Memslots& memslots() const { return memslots_; }
  CacheRegistry& caches() { return *caches_; }
  // Per-VM counters (summed over its vCPUs where both count).
  CounterSet& counters() const { return counters_; }

  // --- memslots --------------------------------------------------------
  // KVM_SET_USER_MEMORY_REGION: validates, then creates, deletes, moves or
  // changes flags of a slot. Delete and move publish the slot invalid first,
  // zap EPT01 mappings of the old range, then publish the final set.
  Status set_memory_region(const MemoryRegion& r) NC_EXCLUDES(slots_lock_);
  // Creates many slots under one lock hold (used by tests and set-up code).
  Status set_memory_regions(std::span<const MemoryRegion> rs) NC_EXCLUDES(slots_lock_);

  // gfn -> hva through the active memslots. EFAULT if no valid slot holds gfn.
  Result<Hva> gfn_to_hva(Gfn gfn) const;
  // The same, trying the caller's last-used slot first (a vCPU passes its
  // Vcpu::memslot_hint()) and updating it.
  Result<Hva> gfn_to_hva(Gfn gfn, LookupHint& hint) const;

  // --- guest memory through the VMM's mappings (kvm_read_guest) -----------
  // For emulation paths only (VMPTRLD reading vmcs12, nested state, eVMCS
  // copies): never a way around a map or a cache.
  Status read_guest(Gpa gpa, void* dst, size_t len) const;
  Status write_guest(Gpa gpa, const void* src, size_t len);

  // --- EPT01 -------------------------------------------------------------
  // The EPT01 entry for gfn, if present.
  std::optional<Ept01Entry> ept01_lookup(Gfn gfn) const NC_EXCLUDES(mmu_lock_);
  // The EPT01-violation handler: resolves gfn -> hva -> frame and installs
  // the entry, retrying while an invalidation of that hva races it. A vCPU
  // passes its memslot hint. EFAULT when no memslot covers gfn (an MMIO exit
  // for the VMM).
  Result<Ept01Entry> ept01_fault(Gfn gfn, bool write, LookupHint* hint = nullptr) NC_EXCLUDES(mmu_lock_);

  // --- invalidations in flight ----------------------------------------------------
  uint64_t mmu_invalidate_seq() const { return mmu_invalidate_seq_.load(std::memory_order_seq_cst); }
  // True if a fault that snapshotted `seq` for `hva` must retry: an
  // invalidation covering hva is in progress, or one ran since the snapshot.
  // Lock-free; callable under any lock.
  bool mmu_invalidate_retry(Hva hva, uint64_t seq) const;
  // True while an invalidation whose range covers hva is between
  // invalidate_range_start and _end (the range of overlapping invalidations
  // only widens until none is left). Lock-free; callable under any lock.
  bool invalidation_in_progress(Hva hva) const;
  // Blocks, without spinning, until invalidation_in_progress(hva) is false;
  // invalidate_range_end wakes it. Returns the nanoseconds it blocked (0 if
  // it did not). Must not be called with mmu_lock_ held or from a thread
  // that is itself inside an invalidation.
  uint64_t wait_for_invalidation(Hva hva) NC_EXCLUDES(mmu_lock_, invalidation_wait_mu_);

  // --- vCPUs ---------------------------------------------------------------
  void add_vcpu(Vcpu* v) NC_EXCLUDES(vcpus_mu_);
  void remove_vcpu(Vcpu* v) NC_EXCLUDES(vcpus_mu_);
  std::vector<Vcpu*> vcpus() const NC_EXCLUDES(vcpus_mu_);
  size_t online_vcpus() const NC_EXCLUDES(vcpus_mu_);

  // --- MmuNotifier -----------------------------------------------------------
  void invalidate_range_start(Hva start, Hva end) override;
  void invalidate_range_end(Hva start, Hva end) override;

  // --- protocol variants (tests only) -------------------------------------------
  // The protocol this VM's notifier, caches and page strategies follow:
  // nestcache's unless a test replaying a model counterexample set another
  // (vm/protocol_variant.h). Set it before any vCPU or host thread runs.
  const ProtocolVariant& protocol() const { return protocol_; }
  void set_protocol_for_replay(const ProtocolVariant& p) { protocol_ = p; }

 private:
  // Zaps EPT01 entries for gfns in [first, last]; returns how many went.
  size_t zap_gfn_range_locked(Gfn first, Gfn end) NC_REQUIRES(mmu_lock_);
  Status apply_update_locked(const MemslotUpdate& u) NC_REQUIRES(slots_lock_);
  void flush_all_tlbs();

  host::HostMm& mm_;
  const uint32_t id_;
  const VmOptions options_;
  mutable CounterSet counters_;
  Memslots memslots_;
  std::unique_ptr<CacheRegistry> caches_;

  Mutex slots_lock_{LockRank::kSlots};

  mutable SharedMutex mmu_lock_{LockRank::kMmu};
  std::map<Gfn, Ept01Entry> ept01_ NC_GUARDED_BY(mmu_lock_);
  // Written under mmu_lock_, read lock-free by mmu_invalidate_retry() (pfn
  // caches call it under their own locks, which rank below mmu_lock_). While
  // an invalidation is in progress its range only widens, and the range is
  // stored before the count goes up, so a reader that sees the count sees a
  // range covering every invalidation that had started.
  std::atomic<uint64_t> mmu_invalidate_seq_{0};
  std::atomic<uint64_t> invalidate_in_progress_{0};
  std::atomic<Hva> invalidate_range_start_{0};
  std::atomic<Hva> invalidate_range_end_{0};
  // Refreshes blocked in wait_for_invalidation(). invalidate_range_end takes
  // the mutex and notifies only when the count is non-zero; the count is
  // raised before the waiter looks at the range (both seq_cst), so either the
  // ender sees the waiter or the waiter sees the ended invalidation.
  std::atomic<uint32_t> invalidation_waiters_{0};
  Mutex invalidation_wait_mu_{LockRank::kLeaf};
  CondVar invalidation_done_;

  ProtocolVariant protocol_;

  mutable Mutex vcpus_mu_{LockRank::kLeaf};
  std::vector<Vcpu*> vcpus_ NC_GUARDED_BY(vcpus_mu_);
};

}  // namespace nestcache::vm
