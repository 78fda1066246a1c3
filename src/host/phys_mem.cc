#include "host/phys_mem.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "base/check.h"
#include "base/model_time.h"
#include "host/fault_injection.h"

namespace nestcache::host {

namespace {
enum FrameState : uint8_t {
  kFree = 0,       // on a free list or never handed out
  kAllocated = 1,  // owned by someone
  kFreePending = 2 // freed while pinned: goes back at the last unpin
};
int pool_index(FrameKind kind) { return kind == FrameKind::managed ? 0 : 1; }
// munmaps of one window before it is parked: the first, and one retry at
// once (a transient failure costs no more than that).
constexpr int kUnmapAttempts = 2;
std::atomic<int64_t> g_windows_open{0};
}  // namespace

int64_t windows_open_in_process() { return g_windows_open.load(); }

const char* frame_kind_name(FrameKind kind) {
  return kind == FrameKind::managed ? "managed" : "unmanaged";
}

// --- RemapWindow / FramePin -----------------------------------------------

RemapWindow& RemapWindow::operator=(RemapWindow&& o) noexcept {
  if (this != &o) {
    reset();
    mem_ = o.mem_;
    data_ = o.data_;
    o.mem_ = nullptr;
    o.data_ = nullptr;
  }
  return *this;
}

void RemapWindow::reset() {
  if (data_) mem_->close_window(data_);
  mem_ = nullptr;
  data_ = nullptr;
}

FramePin& FramePin::operator=(FramePin&& o) noexcept {
  if (this != &o) {
    reset();
    mem_ = o.mem_;
    pfn_ = o.pfn_;
    o.mem_ = nullptr;
    o.pfn_ = kInvalidPfn;
  }
  return *this;
}

void FramePin::reset() {
  if (mem_) mem_->unpin(pfn_);
  mem_ = nullptr;
  pfn_ = kInvalidPfn;
}

// --- PhysMem ----------------------------------------------------------------

Result<std::unique_ptr<PhysMem>> PhysMem::create(const PhysMemConfig& config) {
  size_t total = config.managed_frames + config.unmanaged_frames;
  if (total == 0) return errorf(EINVAL, "physical memory needs at least one frame");
  std::unique_ptr<PhysMem> m(new PhysMem());
  m->total_ = total;
  m->managed_ = config.managed_frames;
  if (int e = take_fault(FaultSite::memfd)) return errorf(e, "memfd_create: {} (injected)", std::strerror(e));
  m->fd_ = memfd_create("nestcache-physmem", MFD_CLOEXEC);
  if (m->fd_ < 0) return errorf(errno, "memfd_create: {}", std::strerror(errno));
  if (int e = take_fault(FaultSite::memfd))
    return errorf(e, "sizing physical memory to {} frames: {} (injected)", total, std::strerror(e));
  if (ftruncate(m->fd_, static_cast<off_t>(total * kPageSize)) != 0)
    return errorf(errno, "sizing physical memory to {} frames: {}", total, std::strerror(errno));
  void* pool = mmap_or_fault(nullptr, total * kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, m->fd_, 0);
  if (pool == MAP_FAILED) return errorf(errno, "mapping the hardware view: {}", std::strerror(errno));
  m->pool_ = static_cast<std::byte*>(pool);
  if (m->managed_ > 0) {
    void* direct = mmap_or_fault(nullptr, m->managed_ * kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, m->fd_, 0);
    if (direct == MAP_FAILED) return errorf(errno, "mapping the direct map: {}", std::strerror(errno));
    m->direct_ = static_cast<std::byte*>(direct);
  }
  m->versions_ = decltype(m->versions_)(total);
  MutexLock l(m->mu_);
  m->pools_[0] = Pool{0, m->managed_, {}};
  m->pools_[1] = Pool{m->managed_, total, {}};
  m->pins_.assign(total, 0);
  m->state_.assign(total, kFree);
  return m;
}

PhysMem::~PhysMem() {
  {
    MutexLock l(parked_mu_);
    for (std::byte* data : parked_) {
      if (munmap(data, kPageSize) == 0) {
        counters_.add(Counter::remap_windows_closed);
        g_windows_open.fetch_sub(1);
      } else {
        std::fprintf(stderr, "nestcache: a remap window at %p stays mapped: munmap: %s (%s)\n", static_cast<void*>(data),
                     strerrorname_np(errno), std::strerror(errno));
      }
    }
    parked_.clear();
  }
  if (direct_) munmap(direct_, managed_ * kPageSize);
  if (pool_) munmap(pool_, total_ * kPageSize);
  if (fd_ >= 0) close(fd_);
}

void PhysMem::zero_frame(Pfn pfn) { std::memset(pool_ + pfn * kPageSize, 0, kPageSize); }

Result<Pfn> PhysMem::alloc(FrameKind kind) {
  auto run = NC_TRY(alloc_run(kind, 1));
  return run.first;
}

Result<PfnRun> PhysMem::alloc_run(FrameKind kind, size_t max) {
  NC_CHECK(max > 0);
  PfnRun run;
  bool needs_zero = false;
  {
    MutexLock l(mu_);
    Pool& p = pools_[pool_index(kind)];
    if (p.fresh_next < p.fresh_end) {
      // Never-used frames are still holes in the memfd, hence already zero.
      run = {p.fresh_next, std::min<size_t>(max, p.fresh_end - p.fresh_next)};
      p.fresh_next += run.count;
    } else if (!p.free.empty()) {
      run = {p.free.back(), 1};
      p.free.pop_back();
      needs_zero = true;
    } else {
      return errorf(ENOMEM, "out of {} frames", frame_kind_name(kind));
    }
    for (size_t i = 0; i < run.count; i++) {
      NC_CHECK(state_[run.first + i] == kFree);
      state_[run.first + i] = kAllocated;
    }
  }
  if (needs_zero) zero_frame(run.first);
  return run;
}

void PhysMem::free(Pfn pfn) {
  NC_CHECK(pfn < total_);
  retag(pfn);
  MutexLock l(mu_);
  NC_CHECK(state_[pfn] == kAllocated);
  if (pins_[pfn] > 0) {
    state_[pfn] = kFreePending;
    return;
  }
  release_locked(pfn);
}

void PhysMem::release_locked(Pfn pfn) {
  mu_.assert_held();
  state_[pfn] = kFree;
  pools_[pool_index(kind(pfn))].free.push_back(pfn);
}

size_t PhysMem::free_frames(FrameKind kind) const {
  MutexLock l(mu_);
  const Pool& p = pools_[pool_index(kind)];
  return p.free.size() + (p.fresh_end - p.fresh_next);
}

bool PhysMem::report_mismatch(FrameTag t, const char* what, CounterSet* also) const {
  if (stale_fatal_.load(std::memory_order_relaxed))
    std::fprintf(stderr, "nestcache: pfn %llu: tag version %llu, frame now at %llu\n",
                 static_cast<unsigned long long>(t.pfn), static_cast<unsigned long long>(t.version),
                 static_cast<unsigned long long>(versions_[t.pfn].load()));
  report_stale(what, also);
  return false;
}

void PhysMem::report_stale(const char* what, CounterSet* also) const {
  counters_.add(Counter::stale_accesses);
  if (also) also->add(Counter::stale_accesses);
  if (stale_fatal_.load(std::memory_order_relaxed)) {
    std::fprintf(stderr, "nestcache: stale access through %s\n", what);
    std::abort();
  }
}

std::byte* PhysMem::direct(Pfn pfn) const {
  NC_CHECK(pfn < managed_);
  return direct_ + pfn * kPageSize;
}

Result<RemapWindow> PhysMem::map_window(Pfn pfn) {
  NC_CHECK(pfn < total_);
  // No new window while earlier ones could not be unmapped: the failure
  // reaches whoever needs a mapping, and the leak stays bounded.
  if (parked_count_.load(std::memory_order_acquire) != 0) {
    if (Status st = close_parked_windows(); !st)
      return errorf(st.error().code, "remap window on pfn {}: {}", pfn, st.error().message);
  }
  // MAP_POPULATE: the page-table entry is made now, as memremap makes the
  // kernel's, so the window's whole cost is in this call and the first
  // access does not fault.
  void* p;
  {
    std::optional<ModelClock::FixedCost> fixed;
    if (window_cost_set_.load(std::memory_order_acquire)) fixed.emplace(window_open_ns_.load(std::memory_order_relaxed));
    p = mmap_or_fault(nullptr, kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, offset_of(pfn));
  }
  if (p == MAP_FAILED) {
    const int e = errno;
    return errorf(e, "remap window on pfn {}: {}", pfn, std::strerror(e));
  }
  counters_.add(Counter::remap_windows);
  g_windows_open.fetch_add(1);
  RemapWindow w;
  w.mem_ = this;
  w.data_ = static_cast<std::byte*>(p);
  return w;
}

void PhysMem::close_window(std::byte* data) {
  int error = 0;
  bool closed = false;
  {
    // Modelled time: a window's close is charged its fixed cost, failed
    // attempts included (see set_window_cost).
    std::optional<ModelClock::FixedCost> fixed;
    if (window_cost_set_.load(std::memory_order_acquire)) fixed.emplace(window_close_ns_.load(std::memory_order_relaxed));
    for (int attempt = 0; attempt < kUnmapAttempts && !closed; attempt++) {
      if (munmap_or_fault(data, kPageSize) == 0) {
        closed = true;
        break;
      }
      error = errno;
      NC_CHECK(error != EINVAL);  // a window is one whole page mapping of ours
      counters_.add(Counter::remap_window_unmap_failures);
    }
  }
  if (closed) {
    counters_.add(Counter::remap_windows_closed);
    g_windows_open.fetch_sub(1);
    // munmap works again: the windows parked earlier go now too.
    if (parked_count_.load(std::memory_order_acquire) != 0) (void)close_parked_windows();
    return;
  }
  // Still mapped: it stays counted open until a later munmap succeeds.
  MutexLock l(parked_mu_);
  parked_.push_back(data);
  parked_error_ = error;
  parked_count_.store(parked_.size(), std::memory_order_release);
}

Status PhysMem::close_parked_windows() {
  MutexLock l(parked_mu_);
  // A plain loop, not erase_if with a lambda: the thread-safety analysis
  // cannot see that a lambda runs under parked_mu_.
  size_t kept = 0;
  for (std::byte* data : parked_) {
    if (munmap_or_fault(data, kPageSize) == 0) {
      counters_.add(Counter::remap_windows_closed);
      g_windows_open.fetch_sub(1);
      continue;
    }
    parked_error_ = errno;
    counters_.add(Counter::remap_window_unmap_failures);
    parked_[kept++] = data;
  }
  parked_.resize(kept);
  parked_count_.store(parked_.size(), std::memory_order_release);
  if (parked_.empty()) return ok();
  return errorf(parked_error_, "{} earlier remap window(s) still mapped, munmap failed: {}", parked_.size(),
                std::strerror(parked_error_));
}

void PhysMem::set_window_cost(std::optional<WindowCost> cost) {
  window_cost_set_.store(false, std::memory_order_release);
  if (!cost) return;
  window_open_ns_.store(cost->open_ns, std::memory_order_relaxed);
  window_close_ns_.store(cost->close_ns, std::memory_order_relaxed);
  window_cost_set_.store(true, std::memory_order_release);
}

std::optional<WindowCost> PhysMem::window_cost() const {
  if (!window_cost_set_.load(std::memory_order_acquire)) return std::nullopt;
  return WindowCost{window_open_ns_.load(std::memory_order_relaxed), window_close_ns_.load(std::memory_order_relaxed)};
}

Result<FramePin> PhysMem::pin(Pfn pfn) {
  NC_CHECK(pfn < total_);
  if (kind(pfn) != FrameKind::managed) return errorf(EINVAL, "pfn {} is unmanaged and cannot be pinned", pfn);
  MutexLock l(mu_);
  if (state_[pfn] != kAllocated) return errorf(EFAULT, "pfn {} is not allocated", pfn);
  pins_[pfn]++;
  counters_.add(Counter::pins);
  FramePin p;
  p.mem_ = this;
  p.pfn_ = pfn;
  return p;
}

void PhysMem::unpin(Pfn pfn) {
  MutexLock l(mu_);
  NC_CHECK(pins_[pfn] > 0);
  counters_.add(Counter::unpins);
  if (--pins_[pfn] == 0 && state_[pfn] == kFreePending) release_locked(pfn);
}

uint32_t PhysMem::pin_count(Pfn pfn) const {
  MutexLock l(mu_);
  return pins_[pfn];
}

void PhysMem::copy_frame(Pfn dst, Pfn src) {
  std::memcpy(pool_ + dst * kPageSize, pool_ + src * kPageSize, kPageSize);
}

int64_t PhysMem::live_windows() const {
  return static_cast<int64_t>(counters_.get(Counter::remap_windows)) -
         static_cast<int64_t>(counters_.get(Counter::remap_windows_closed));
}

int64_t PhysMem::live_pins() const {
  return static_cast<int64_t>(counters_.get(Counter::pins)) - static_cast<int64_t>(counters_.get(Counter::unpins));
}

}  // namespace nestcache::host
