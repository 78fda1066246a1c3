// PhysMem: host physical memory with real mapping costs (DESIGN.md §2).
//
// Frames are 4 KiB pages of one memfd; a frame number is a pfn. Frames
// [0, managed_frames) are *managed*: permanently mapped in the direct map, so
// L0 code turns such a pfn into a pointer for free. The rest are *unmanaged*:
// L0 code reaches them only through a RemapWindow, a real mmap/munmap of that
// frame (the memremap/memunmap the seed removes from the nested entry path).
//
// Every frame carries a version. The version changes whenever the frame stops
// backing the guest page it backed (freed, migrated away, discarded, its
// memslot moved or deleted), even while a pin keeps the frame alive. Every L0
// mapping, cached pfn and pfn written into vmcs02 records a FrameTag (pfn +
// version) when it is made and checks it on each access: a mismatch is a
// *stale access*, counted always and fatal where a test asks for it.
//
// The whole pool is also mapped once as the *hardware view*, the way the CPU
// reaches physical memory without mappings. Only the cpu layer can obtain it
// (HardwareKey); L0 software never uses it.
//
// Thread safety: all public functions may be called from any thread.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "base/counters.h"
#include "base/error.h"
#include "base/huge_pages.h"
#include "base/mutex.h"
#include "base/types.h"
#include "host/window_cost.h"

namespace nestcache {
namespace cpu {
class HardwareKeys;
}
namespace host {

enum class FrameKind : uint8_t { managed, unmanaged };
const char* frame_kind_name(FrameKind kind);

// Identifies one binding of one frame: the pfn and the frame's version when
// the binding was observed. Two tags are equal only if the frame has not
// changed hands in between (versions are unique across the whole pool).
struct FrameTag {
  Pfn pfn = kInvalidPfn;
  uint64_t version = 0;
  bool operator==(const FrameTag&) const = default;
  bool valid() const { return pfn != kInvalidPfn; }
};

// Where a frame's version lives (PhysMem::version_cell).
using VersionCell = std::atomic<uint64_t>;

// A run of consecutive frames [first, first + count).
struct PfnRun {
  Pfn first = kInvalidPfn;
  size_t count = 0;
};

struct PhysMemConfig {
  size_t managed_frames = 0;
  size_t unmanaged_frames = 0;
};

class PhysMem;

// Remap windows open now in the whole process, over every PhysMem (parked
// ones included): 0 once every VM is gone, however its windows closed.
int64_t windows_open_in_process();

// A real mmap of one unmanaged (or managed) frame, released by munmap when
// the window is destroyed. Move-only. Opening and closing are counted.
//
// munmap can fail (ENOMEM when the kernel must split a mapping and the
// process is at vm.max_map_count). A window is counted closed only once its
// munmap succeeded: a failed munmap is retried once at once; if that fails
// too, the mapping is parked in its PhysMem, still counted open (a leak
// report shows it), and no pointer to it remains outside. The next
// map_window retries the parked munmaps first and, while any still fails,
// refuses to open a window, with the munmap's errno: the error reaches the
// caller that needs a mapping, and the leak stays bounded by the windows open
// when munmap began to fail. The next window that closes retries them too,
// so teardown (which closes every window) unmaps them once munmap works.
// The PhysMem's destructor unmaps what is still parked as the host layer's
// other teardown unmaps are made (outside the fault seam), and reports on
// stderr, with the errno, a window even that cannot unmap.
class RemapWindow {
 public:
  RemapWindow() = default;
  RemapWindow(RemapWindow&& o) noexcept { *this = std::move(o); }
  RemapWindow& operator=(RemapWindow&& o) noexcept;
  ~RemapWindow() { reset(); }

  std::byte* data() const { return data_; }
  explicit operator bool() const { return data_ != nullptr; }
  // munmap now (the destructor does it otherwise). Never fails: a munmap
  // that keeps failing parks the mapping in its PhysMem (see above).
  void reset();

 private:
  friend class PhysMem;
  PhysMem* mem_ = nullptr;
  std::byte* data_ = nullptr;
};

// A pin on a managed frame (get_user_pages analogue). While any pin is held
// the frame is neither migrated nor returned to the free list. Move-only.
class FramePin {
 public:
  FramePin() = default;
  FramePin(FramePin&& o) noexcept { *this = std::move(o); }
  FramePin& operator=(FramePin&& o) noexcept;
  ~FramePin() { reset(); }

  Pfn pfn() const { return pfn_; }
  explicit operator bool() const { return mem_ != nullptr; }
  void reset();

 private:
  friend class PhysMem;
  PhysMem* mem_ = nullptr;
  Pfn pfn_ = kInvalidPfn;
};

// The capability to reach any frame without a mapping. Constructible only by
// cpu::HardwareKeys (the simulated processor) and by tests.
class HardwareKey {
 private:
  friend class cpu::HardwareKeys;
  friend struct HardwareKeyForTests;
  HardwareKey() = default;
};

class HardwareView {
 public:
  std::byte* frame(Pfn pfn) const { return base_ + pfn * kPageSize; }

 private:
  friend class PhysMem;
  explicit HardwareView(std::byte* base) : base_(base) {}
  std::byte* base_;
};

class PhysMem {
 public:
  // Creates the memfd, sizes it, maps the direct map and the hardware view.
  // Memory is sparse: the kernel backs a frame only once it is touched.
  static Result<std::unique_ptr<PhysMem>> create(const PhysMemConfig& config);
  ~PhysMem();
  PhysMem(const PhysMem&) = delete;
  PhysMem& operator=(const PhysMem&) = delete;

  size_t num_frames() const { return total_; }
  size_t managed_frames() const { return managed_; }
  FrameKind kind(Pfn pfn) const { return pfn < managed_ ? FrameKind::managed : FrameKind::unmanaged; }
  int fd() const { return fd_; }
  static off_t offset_of(Pfn pfn) { return static_cast<off_t>(pfn * kPageSize); }

  // --- allocation -------------------------------------------------------
  // Allocates one zeroed frame of `kind`. ENOMEM when none is free.
  Result<Pfn> alloc(FrameKind kind) NC_EXCLUDES(mu_);
  // Allocates up to `max` zeroed consecutive frames (at least one). Callers
  // that need n frames loop; consecutive frames let HostMm map many pages
  // with one mmap and keep the process's mapping count low.
  Result<PfnRun> alloc_run(FrameKind kind, size_t max) NC_EXCLUDES(mu_);
  // Returns a frame to its free list and bumps its version. If the frame is
  // pinned, it goes back only when the last pin is dropped.
  void free(Pfn pfn) NC_EXCLUDES(mu_);
  size_t free_frames(FrameKind kind) const NC_EXCLUDES(mu_);

  // --- tags -------------------------------------------------------------
  FrameTag tag(Pfn pfn) const { return {pfn, versions_[pfn].load(std::memory_order_acquire)}; }
  // The frame stops backing what it backed: gives it a new, unique version.
  void retag(Pfn pfn) { versions_[pfn].store(next_version_.fetch_add(1) + 1, std::memory_order_release); }
  // True if `t` still names the current binding of its frame. Otherwise counts
  // a stale access (here and in `also`, if given) and, when stale accesses
  // are fatal, aborts with a message naming `what`.
  // Inline on the match: every access through a cache or a map pays it.
  bool check(const FrameTag& t, const char* what, CounterSet* also = nullptr) const {
    return check(version_cell(t.pfn), t.version, what, also);
  }
  // A frame's version cell: where check() finds the frame's current version.
  // A reader that checks the same frame on every access (a pfn cache) keeps
  // the cell and checks through it, one load instead of three (the PhysMem,
  // its table, the entry). Cells live as long as the PhysMem; pfn_of() maps
  // one back to its pfn.
  const VersionCell* version_cell(Pfn pfn) const { return &versions_[pfn]; }
  Pfn pfn_of(const VersionCell* cell) const { return static_cast<Pfn>(cell - versions_.data()); }
  // True if the frame of `cell` still has `version`: check()'s test, with
  // nothing counted. Static, so that a caller that reports a mismatch out of
  // line needs no PhysMem on the path where the tag holds.
  static bool holds(const VersionCell* cell, uint64_t version) {
    return cell->load(std::memory_order_acquire) == version;
  }
  // check({pfn_of(cell), version}, what, also) with the cell already found;
  // the same result and the same report on a mismatch.
  bool check(const VersionCell* cell, uint64_t version, const char* what, CounterSet* also = nullptr) const {
    if (holds(cell, version)) [[likely]]
      return true;
    return report_mismatch({pfn_of(cell), version}, what, also);
  }
  // Counts a stale access found by other means (a memslot no longer leads to
  // the mapping), with the same fatal-mode handling as check().
  void report_stale(const char* what, CounterSet* also = nullptr) const;
  // Makes stale accesses abort the process (tests that must see none).
  void set_stale_access_fatal(bool fatal) { stale_fatal_.store(fatal); }

  // --- L0 software access -------------------------------------------------
  // Pointer into the direct map. Requires a managed frame.
  std::byte* direct(Pfn pfn) const;
  // Opens a remap window on any frame. Fails with mmap's errno, or with
  // munmap's when windows closed earlier are still mapped (parked) and
  // unmapping them fails again; the message names which.
  Result<RemapWindow> map_window(Pfn pfn) NC_EXCLUDES(parked_mu_);
  // Retries the munmap of every parked window (see RemapWindow). OK when none
  // is left; otherwise the errno of the last failed munmap, with a message
  // saying how many windows are still mapped.
  Status close_parked_windows() NC_EXCLUDES(parked_mu_);
  // Windows whose munmap failed and that are still mapped (counted open).
  size_t parked_windows() const { return parked_count_.load(std::memory_order_acquire); }
  // Modelled time: with a cost set, each window's mmap and munmap charge the
  // calling thread's clock that fixed cost instead of their CPU time (see
  // host/window_cost.h); nullopt (the default) measures them. Set it before
  // the threads that open windows start.
  void set_window_cost(std::optional<WindowCost> cost);
  std::optional<WindowCost> window_cost() const;
  // Pins a managed frame; EINVAL for unmanaged frames (they cannot be pinned).
  Result<FramePin> pin(Pfn pfn) NC_EXCLUDES(mu_);
  uint32_t pin_count(Pfn pfn) const NC_EXCLUDES(mu_);

  // Copies one frame into another (page migration's copy). Host-internal: the
  // migration code's own access, not an L0 mapping.
  void copy_frame(Pfn dst, Pfn src);

  // --- hardware -----------------------------------------------------------
  HardwareView hardware_view(const HardwareKey&) const { return HardwareView(pool_); }

  // remap_windows, remap_windows_closed, remap_window_unmap_failures, pins,
  // unpins, stale_accesses.
  CounterSet& counters() const { return counters_; }
  // Windows open now (opened - closed) and pins held now: both 0 when idle.
  int64_t live_windows() const;
  int64_t live_pins() const;

 private:
  friend class RemapWindow;
  friend class FramePin;
  PhysMem() = default;
  void close_window(std::byte* data) NC_EXCLUDES(parked_mu_);
  void unpin(Pfn pfn) NC_EXCLUDES(mu_);
  void zero_frame(Pfn pfn);
  void release_locked(Pfn pfn) NC_REQUIRES(mu_);
  // check()'s slow path: reports a stale access of `t` and returns false.
  // (By value: a caller's tag can then stay in registers.)
  bool report_mismatch(FrameTag t, const char* what, CounterSet* also) const;

  int fd_ = -1;
  size_t total_ = 0;
  size_t managed_ = 0;
  std::byte* pool_ = nullptr;     // hardware view: the whole memfd
  std::byte* direct_ = nullptr;   // direct map: managed frames only
  std::vector<VersionCell, HugePageAllocator<VersionCell>> versions_;  // per frame; huge pages when large
  std::atomic<uint64_t> next_version_{0};
  std::atomic<bool> stale_fatal_{false};
  // The fixed window cost, if set (window_cost_set_ published last).
  std::atomic<uint64_t> window_open_ns_{0};
  std::atomic<uint64_t> window_close_ns_{0};
  std::atomic<bool> window_cost_set_{false};
  mutable CounterSet counters_;

  struct Pool {
    Pfn fresh_next = 0;   // frames never handed out yet: [fresh_next, fresh_end)
    Pfn fresh_end = 0;
    std::vector<Pfn> free;  // frames handed out and given back
  };
  mutable Mutex mu_{LockRank::kPhysMem};
  Pool pools_[2] NC_GUARDED_BY(mu_);
  std::vector<uint32_t> pins_ NC_GUARDED_BY(mu_);
  std::vector<uint8_t> state_ NC_GUARDED_BY(mu_);  // FrameState

  // Remap windows whose munmap failed (see RemapWindow), and the errno of
  // the last failure. parked_count_ mirrors the vector's size, so
  // map_window's common case reads one atomic and takes no lock.
  mutable Mutex parked_mu_{LockRank::kLeaf};
  std::vector<std::byte*> parked_ NC_GUARDED_BY(parked_mu_);
  int parked_error_ NC_GUARDED_BY(parked_mu_) = 0;
  std::atomic<size_t> parked_count_{0};
};

}  // namespace host
}  // namespace nestcache
