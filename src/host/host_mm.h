// HostMm: the VMM process's address space for guest memory (DESIGN.md §2),
// and the MMU notifier that reports every change of an hva -> pfn binding.
//
// A region is a real reserved range of this process's virtual addresses;
// each present page is mmap'ed (MAP_FIXED | MAP_SHARED) onto its frame in
// PhysMem's memfd, so the VMM reads and writes guest memory through plain
// pointers. Regions are mapped in runs of consecutive frames, so the kernel
// merges them into few mappings; only a page that moves to another frame is
// remapped on its own. Running into vm.max_map_count is an ENOMEM the caller
// sees, with nothing half done.
//
//   managed region    frames committed at creation, each page populated
//                     (mapped) on its first fault; frames can be pinned.
//   unmanaged region  every page mapped onto unmanaged frames at creation
//                     (a PFNMAP / guest_memfd range); nothing can be pinned.
//
// After a discard, a page is absent; its next fault maps a fresh zeroed frame
// of the region's kind.
//
// Thread safety: every public function may be called from any thread.
// Notifier callbacks run with no HostMm lock held. Raw pointer access to
// guest memory through an hva is the caller's business; copy_to/copy_from
// are safe against concurrent migration.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "base/huge_pages.h"
#include "host/phys_mem.h"

namespace nestcache::host {

// Subscribers hear about every change of an hva -> pfn binding.
class MmuNotifier {
 public:
  virtual ~MmuNotifier() = default;
  // Before bindings in [start, end) change. Must not return until no
  // subscriber can still use the old pfns: the caller frees them afterwards.
  virtual void invalidate_range_start(Hva start, Hva end) = 0;
  // After the change; faults may map the new frames from here on.
  virtual void invalidate_range_end(Hva start, Hva end) = 0;
};

// A pfn obtained by a fault, pinned (managed frames only).
struct PinnedFrame {
  FrameTag tag;
  FramePin pin;
};

class HostMm {
 public:
  explicit HostMm(PhysMem& phys) : phys_(phys) {}
  ~HostMm();
  HostMm(const HostMm&) = delete;
  HostMm& operator=(const HostMm&) = delete;

  PhysMem& phys() const { return phys_; }

  // Reserves `bytes` (a positive multiple of 4 KiB) of address space backed
  // by frames of `kind`. Returns the base hva. ENOMEM when PhysMem or the
  // address space runs out (nothing is left allocated).
  Result<Hva> create_region(size_t bytes, FrameKind kind) NC_EXCLUDES(mu_);
  // Unmaps the region and frees its frames, after notifying subscribers.
  Status destroy_region(Hva base) NC_EXCLUDES(mu_);
  // The kind of the region containing hva, if any.
  std::optional<FrameKind> region_kind(Hva hva) const NC_EXCLUDES(mu_);

  // get_user_pages: returns the frame backing hva, populating it if absent.
  // EFAULT if hva is in no region.
  Result<FrameTag> fault_in(Hva hva, bool write) NC_EXCLUDES(mu_);
  // As fault_in, and pins the frame in the same step (no migration can slip
  // in between). EINVAL for unmanaged regions: they cannot be pinned.
  Result<PinnedFrame> fault_in_pinned(Hva hva, bool write) NC_EXCLUDES(mu_);
  // The frame backing hva if the page is present; never faults.
  std::optional<FrameTag> lookup(Hva hva) const NC_EXCLUDES(mu_);

  // Moves the page at hva to a new frame: allocate, notifier start, copy,
  // remap, notifier end, free the old frame. EBUSY (counted as
  // migrate_ebusy) if the frame is pinned; EFAULT if hva is not present;
  // EAGAIN if the page changed under the migration.
  Status migrate(Hva hva) NC_EXCLUDES(mu_);
  // MADV_DONTNEED: drops every present page in [hva, hva + len) and frees
  // its frame (pinned frames are freed at their last unpin). The next fault
  // sees a zero page. hva and len must be page aligned.
  Status discard(Hva hva, size_t len) NC_EXCLUDES(mu_);

  // Copies guest memory in or out through the VMM's own mappings, faulting
  // pages in as needed; excluded against concurrent migration per page.
  Status copy_to(Hva hva, const void* src, size_t len) NC_EXCLUDES(mu_);
  Status copy_from(Hva hva, void* dst, size_t len) NC_EXCLUDES(mu_);

  // Both wait for every invalidation in flight to end (see notify_start), and
  // an invalidation waits for vCPUs to leave guest mode: so no code a vCPU
  // runs on its way out of guest mode may call them (Vm's constructor and
  // destructor are their only callers).
  void add_notifier(MmuNotifier* n) NC_EXCLUDES(notifiers_mu_);
  void remove_notifier(MmuNotifier* n) NC_EXCLUDES(notifiers_mu_);

  // migrations, migrate_ebusy, discards, notifier_invalidations.
  CounterSet& counters() const { return counters_; }

 private:
  struct Region {
    Hva base = 0;
    size_t npages = 0;
    FrameKind kind = FrameKind::managed;
    uint64_t serial = 0;  // unique per HostMm: tells a region from a later one at the same hva
    // Per page, read at random by faults and migrations (huge pages when
    // large: base/huge_pages.h).
    template <class T>
    using PageArray = std::vector<T, HugePageAllocator<T>>;
    PageArray<Pfn> pfn;       // current frame, kInvalidPfn when absent
    PageArray<Pfn> home;      // managed: frame committed for first fault
    PageArray<uint8_t> busy;  // page under migration
  };

  Region* find_locked(Hva hva) const NC_REQUIRES_SHARED(mu_);
  Result<FrameTag> populate_locked(Region& r, size_t idx) NC_REQUIRES(mu_);
  Status map_pages(Hva addr, PfnRun run);
  // One invalidation's two halves. notify_start takes notifiers_mu_ shared
  // and notify_end releases it, so the subscribers that get the end are
  // exactly those that got the start: add_notifier and remove_notifier wait
  // for invalidations in flight (Linux registers a notifier under the mmap
  // write lock, which excludes them). Call both on one thread, with nothing
  // between them that subscribes or unsubscribes.
  void notify_start(Hva start, Hva end) NC_ACQUIRE_SHARED(notifiers_mu_);
  void notify_end(Hva start, Hva end) NC_RELEASE_SHARED(notifiers_mu_);
  template <class Fn>
  Status copy_pages(Hva hva, size_t len, Fn&& fn) NC_EXCLUDES(mu_);

  PhysMem& phys_;
  mutable CounterSet counters_;
  mutable SharedMutex mu_{LockRank::kHostMm};
  std::map<Hva, std::unique_ptr<Region>> regions_ NC_GUARDED_BY(mu_);  // and each Region's vectors
  uint64_t next_serial_ NC_GUARDED_BY(mu_) = 0;
  mutable SharedMutex notifiers_mu_{LockRank::kMmNotifiers};
  std::vector<MmuNotifier*> notifiers_ NC_GUARDED_BY(notifiers_mu_);
};

}  // namespace nestcache::host
