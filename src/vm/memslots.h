// Memslots: the guest-physical memory map (KVM_SET_USER_MEMORY_REGION).
//
// A memslot maps guest frames [base_gfn, base_gfn + npages) onto the VMM's
// addresses [userspace_addr, ...). The active set is published with RCU:
// vCPUs look up gfns without ever blocking, inside an rcu::ReadLock. Every
// publish bumps the generation, which is how pfn caches notice memslot
// changes without any notifier.
//
// A lookup is KVM's first step, then one of our own: the caller's last-used
// slot (a per-vCPU LookupHint; callers without one use the set's own
// last-used slot), then a gfn index instead of KVM's tree walk. The index
// cuts the guest-physical space into equal buckets (a power of two of gfns
// each, about one or two per slot) and records, per bucket, how many slots
// start below it; the slot holding a gfn is then the last one starting below
// its bucket or, nearly always, the bucket's first. A lookup therefore reads
// one bucket entry and the two adjacent (base, end) pairs it names: two
// dependent cache lines at any number of slots, where a binary search of
// 32,764 slots reads fifteen. Buckets holding several slots that start at or
// below the gfn (a dense cluster in a sparse layout) fall back to a binary
// search of that bucket alone. The slots themselves sit in a parallel array
// in the same order, next to one another.
//
// Updates are double-buffered as in KVM: the change is applied to the
// inactive set, which is published; after a grace period the same change is
// applied to the set readers have just stopped seeing. Keeping the arrays
// sorted makes an update O(n) moves in the worst case (an insert at the
// front); appending in gfn order, the usual way to fill many slots, is O(1).
// The index follows each update in place (the buckets from the changed slot's
// up to the last) and is rebuilt, in O(n), only when the slot count or the
// highest base gfn has moved by a factor of two since the bucket size was
// chosen; its size stays within 4 entries per slot (64 at least) however
// sparse the layout.
//
// Deleting or moving a slot publishes twice: first with the old slot marked
// invalid (lookups find it but translate nothing), so the caller can zap
// mappings of the old range while no new ones can be made, then the final set.
//
// Thread safety: updates must be serialised by the caller (Vm::slots_lock);
// lookups may run concurrently from any thread inside an rcu::ReadLock.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <optional>
#include <vector>

#include "base/error.h"
#include "base/rcu.h"
#include "base/types.h"

namespace nestcache::vm {

inline constexpr uint32_t kMaxUserMemslots = 32764;  // KVM_USER_MEM_SLOTS on x86
inline constexpr uint64_t kMaxSlotPages = (uint64_t{1} << 31) - 1;  // KVM_MEM_MAX_NR_PAGES
// x86-64 with 4-level paging: TASK_SIZE_MAX, where user space ends. A
// memslot's userspace range must end below it (access_ok).
inline constexpr Hva kUserSpaceEnd = (Hva{1} << 47) - 4096;
inline constexpr uint32_t kMemLogDirtyPages = 1u << 0;
inline constexpr uint32_t kMemReadonly = 1u << 1;

// The argument of KVM_SET_USER_MEMORY_REGION.
struct MemoryRegion {
  uint32_t slot = 0;
  uint32_t flags = 0;
  Gpa guest_phys_addr = 0;
  uint64_t memory_size = 0;  // 0 deletes the slot
  Hva userspace_addr = 0;
};

struct Memslot {
  uint32_t id = 0;
  Gfn base_gfn = 0;
  uint64_t npages = 0;
  Hva userspace_addr = 0;
  uint32_t flags = 0;
  bool invalid = false;  // being deleted or moved: translates nothing

  Gfn end_gfn() const { return base_gfn + npages; }
  bool contains(Gfn gfn) const { return gfn >= base_gfn && gfn < end_gfn(); }
  Hva gfn_to_hva(Gfn gfn) const { return userspace_addr + (gfn - base_gfn) * kPageSize; }
  Hva end_hva() const { return userspace_addr + npages * kPageSize; }
};

enum class MemslotChange { none, create, remove, move, flags_only };

// What a validated MemoryRegion will do.
struct MemslotUpdate {
  MemslotChange change;
  std::optional<Memslot> old_slot;  // remove, move, flags_only
  std::optional<Memslot> new_slot;  // create, move, flags_only
};

// A per-reader memo of the last slot found (KVM's vcpu->last_used_slot);
// valid only for the generation it was taken in. Each vCPU keeps one
// (vm::Vcpu::memslot_hint) and passes it to its lookups.
struct LookupHint {
  uint64_t generation = ~uint64_t{0};
  const Memslot* slot = nullptr;
};

// One published state of the memslots. Readers get it from Memslots::active()
// inside an rcu::ReadLock and must not keep pointers past it.
class MemslotSet {
 public:
  MemslotSet();
  uint64_t generation() const { return generation_; }
  size_t size() const { return slots_.size(); }
  // The gfn index's bucket count and the log2 of the gfns per bucket (for
  // tests and diagnostics).
  size_t index_buckets() const { return starts_.size() - 1; }
  unsigned index_shift() const { return shift_; }
  // The slot containing gfn (possibly marked invalid), or null: the set's
  // last-used slot if it holds gfn, else a binary search (which then becomes
  // the last-used slot).
  const Memslot* find(Gfn gfn) const;
  // As find, trying the caller's hint instead of the set's last-used slot and
  // updating the hint.
  const Memslot* find(Gfn gfn, LookupHint& hint) const;
  const Memslot* by_id(uint32_t id) const;
  // Calls fn(slot) for every slot whose hva range meets [start, end).
  template <class Fn>
  void for_each_in_hva_range(Hva start, Hva end, Fn&& fn) const {
    auto it = by_hva_.lower_bound(start > max_bytes_ ? start - max_bytes_ : 0);
    for (; it != by_hva_.end() && it->first < end; ++it) {
      const Memslot& s = slots_[index_of_id_[it->second]];
      if (s.end_hva() > start) fn(s);
    }
  }

 private:
  friend class Memslots;
  static constexpr int32_t kNoIndex = -1;
  // Bucket counts: at most kMaxBucketsPerSlot per slot, with kMinSlotsForIndex
  // standing in for the slot count of a smaller set.
  static constexpr size_t kMaxBucketsPerSlot = 4;
  static constexpr size_t kMinSlotsForIndex = 16;
  // A slot's gfns [base, end), as the index and the search read them.
  struct GfnRange {
    Gfn base;
    Gfn end;
  };
  // Index in slots_ of the last slot with base_gfn <= gfn, or kNoIndex.
  int32_t search(Gfn gfn) const;
  // search's rare case: the last slot in [lo, hi) with base_gfn <= gfn,
  // given that slot lo starts at or below gfn.
  int32_t search_bucket(Gfn gfn, uint32_t lo, uint32_t hi) const;
  // The slot overlapping [base, end) other than slot `id`, or null.
  const Memslot* overlap(Gfn base, Gfn end, uint32_t id) const;
  void apply(const MemslotUpdate& u, bool mark_invalid);
  void insert(const Memslot& s);
  void erase(const Memslot& old);
  void reindex_from(size_t first);
  // Bring the gfn index up to date after a slot starting at `base` was
  // inserted or erased, rebuilding it when its bucket size no longer fits.
  void index_inserted(Gfn base);
  void index_erased(Gfn base);
  void rebuild_index();
  // True if an index of `buckets` buckets no longer fits size() slots: more
  // than kMaxBucketsPerSlot per slot, or fewer than one per two.
  bool index_misfits(size_t buckets) const;
  const GfnRange& range(int32_t i) const { return ranges_[static_cast<size_t>(i + 1)]; }

  uint64_t generation_ = 0;
  // The slots' gfn ranges by ascending base, what a lookup reads, framed by
  // sentinels: ranges_[0] = {0, 0} stands for "no slot" (index -1; it holds
  // no gfn), then slot i's range at i + 1, then two {kNoGfn, kNoGfn} so that
  // the lookup can read the two ranges after any bucket's first slot.
  std::vector<GfnRange> ranges_;
  std::vector<Memslot> slots_;  // the slots in the same order
  // The gfn index: bucket b holds gfns [b << shift_, (b + 1) << shift_);
  // starts_[b] counts the slots whose base lies below bucket b. The last
  // bucket holds the highest base (gfns beyond it are looked up there), and
  // starts_ has one entry more than there are buckets, equal to size().
  std::vector<uint32_t> starts_;
  unsigned shift_ = 0;
  std::vector<int32_t> index_of_id_;         // slot id -> index in slots_
  std::multimap<Hva, uint32_t> by_hva_;      // userspace_addr -> slot id
  uint64_t max_bytes_ = 0;  // largest slot ever, bounds the hva-range search
  // KVM's slots->last_used_slot: an index into slots_, shared by the lookups
  // that bring no hint of their own. Racy by design (relaxed): a stale value
  // only costs a search.
  mutable std::atomic<int32_t> last_used_{kNoIndex};
};

class Memslots {
 public:
  Memslots();
  ~Memslots();
  Memslots(const Memslots&) = delete;
  Memslots& operator=(const Memslots&) = delete;

  // The published set. Requires an rcu::ReadLock for as long as it is used.
  const MemslotSet* active() const {
    rcu::assert_read_locked();
    return active_.read();
  }
  // The generation of the published set; no lock needed.
  uint64_t generation() const { return generation_.load(std::memory_order_acquire); }

  // Checks `r` against KVM's rules and the current slots; says what it would
  // do. EINVAL: bad flags, misaligned address or size, a userspace range
  // that is not all user space, bad slot id, size change of an existing
  // slot, delete of a missing slot, range beyond the physical-address width;
  // EEXIST: overlap with another slot.
  // Requires the caller to serialise updates.
  Result<MemslotUpdate> validate(const MemoryRegion& r) const;
  // Publishes the set with update.old_slot marked invalid (remove/move only).
  void publish_invalid(const MemslotUpdate& update);
  // Publishes the final set.
  void commit(const MemslotUpdate& update);

 private:
  void publish(const MemslotUpdate& update, bool mark_invalid);
  void update_retired_set(MemslotSet* set, const MemslotUpdate& update, bool mark_invalid);

  MemslotSet sets_[2];
  rcu::Pointer<MemslotSet> active_;
  std::atomic<uint64_t> generation_{0};
};

}  // namespace nestcache::vm
