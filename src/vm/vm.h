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
//   2. Mark every pfn cache mapping the range invalid (CacheRegistry).
//   3. If EPT01 entries went, every vCPU gets a TLB flush; every vCPU that
//      uses an invalidated cache's pfn in hardware gets kOutsideGuestMode;
//      both wait until the vCPUs have left guest mode.
//   4. invalidate_range_end: bump mmu_invalidate_seq, end the in-progress
//      count. Faults and refreshes that snapshot the sequence before step 1
//      and check it after step 4 (or during) retry.
//
// Thread safety: all public functions may be called from any thread, except
// where noted. Lock order: base/lock_order.h.
#pragma once

#include <map>
#include <memory>
#include <vector>

#include "base/counters.h"
#include "base/mutex.h"
#include "host/host_mm.h"
#include "vm/memslots.h"
#include "vm/protocol_variant.h"
#include "vm/vcpu.h"

namespace nestcache::vm {

class CacheRegistry;

// One EPT01 leaf: the frame that backs a gfn, as of when it was filled.
struct Ept01Entry {
  host::FrameTag tag;
  bool writable = true;
};

class Vm : public host::MmuNotifier {
 public:
  // `id` names the VM in messages; it must be unique per HostMm.
  Vm(host::HostMm& mm, uint32_t id);
  ~Vm() override;

  uint32_t id() const { return id_; }
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
  // the entry, retrying while an invalidation of that hva races it.
  // EFAULT when no memslot covers gfn (an MMIO exit for the VMM).
  Result<Ept01Entry> ept01_fault(Gfn gfn, bool write) NC_EXCLUDES(mmu_lock_);
  size_t ept01_size() const NC_EXCLUDES(mmu_lock_);

  // --- invalidation sequence (for PfnCache) ---------------------------------
  uint64_t mmu_invalidate_seq() const { return mmu_invalidate_seq_.load(std::memory_order_acquire); }
  // True if a fault that snapshotted `seq` for `hva` must retry: an
  // invalidation covering hva is in progress, or one ran since the snapshot.
  // Lock-free; callable under any lock.
  bool mmu_invalidate_retry(Hva hva, uint64_t seq) const;

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

  ProtocolVariant protocol_;

  mutable Mutex vcpus_mu_{LockRank::kLeaf};
  std::vector<Vcpu*> vcpus_ NC_GUARDED_BY(vcpus_mu_);
};

}  // namespace nestcache::vm
