#include "host/host_mm.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstring>

#include "base/check.h"
#include "host/fault_injection.h"

namespace nestcache::host {

namespace {

// Replaces [addr, addr + len) with an inaccessible anonymous reservation.
bool unmap_pages(Hva addr, size_t len) {
  void* p = mmap(reinterpret_cast<void*>(addr), len, PROT_NONE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
  return p != MAP_FAILED;
}

}  // namespace

HostMm::~HostMm() {
  std::vector<Hva> bases;
  {
    ReaderLock l(mu_);
    for (auto& [base, r] : regions_) bases.push_back(base);
  }
  for (Hva b : bases) (void)destroy_region(b);
}

Status HostMm::map_pages(Hva addr, PfnRun run) {
  void* p = mmap_or_fault(reinterpret_cast<void*>(addr), run.count * kPageSize, PROT_READ | PROT_WRITE,
                          MAP_SHARED | MAP_FIXED, phys_.fd(), PhysMem::offset_of(run.first));
  if (p == MAP_FAILED) {
    const int e = errno;
    return errorf(e, "mapping {} page(s) at hva {:#x}: {}{}", run.count, addr, std::strerror(e),
                  e == ENOMEM ? " (vm.max_map_count or the address-space limit reached?)" : "");
  }
  return ok();
}

Result<Hva> HostMm::create_region(size_t bytes, FrameKind kind) {
  if (bytes == 0 || !page_aligned(bytes)) return errorf(EINVAL, "region size {:#x} is not a positive multiple of 4 KiB", bytes);
  size_t npages = bytes / kPageSize;
  void* va = mmap_or_fault(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (va == MAP_FAILED) {
    const int e = errno;
    return errorf(e, "reserving {} bytes of address space: {}", bytes, std::strerror(e));
  }
  auto r = std::make_unique<Region>();
  r->base = reinterpret_cast<Hva>(va);
  r->npages = npages;
  r->kind = kind;
  r->pfn.assign(npages, kInvalidPfn);
  r->home.assign(npages, kInvalidPfn);
  r->busy.assign(npages, 0);

  // Commit frames in runs of consecutive pfns.
  auto rollback = [&](Error e) -> Result<Hva> {
    for (size_t i = 0; i < npages; i++) {
      if (r->home[i] != kInvalidPfn) phys_.free(r->home[i]);
      if (r->pfn[i] != kInvalidPfn) phys_.free(r->pfn[i]);
    }
    munmap(va, bytes);
    return tl::unexpected(std::move(e));
  };
  for (size_t i = 0; i < npages;) {
    auto run = phys_.alloc_run(kind, npages - i);
    if (!run) return rollback(run.error());
    // Managed frames wait in `home` for the page's first fault; unmanaged
    // ones are mapped now.
    auto& slot = kind == FrameKind::managed ? r->home : r->pfn;
    for (size_t k = 0; k < run->count; k++) slot[i + k] = run->first + k;
    if (kind == FrameKind::unmanaged) {
      if (auto st = map_pages(r->base + i * kPageSize, *run); !st) return rollback(st.error());
    }
    i += run->count;
  }
  Hva base = r->base;
  WriterLock l(mu_);
  r->serial = ++next_serial_;
  regions_.emplace(base, std::move(r));
  return base;
}

Status HostMm::destroy_region(Hva base) {
  size_t npages;
  uint64_t serial;
  {
    ReaderLock l(mu_);
    auto it = regions_.find(base);
    if (it == regions_.end()) return errorf(EINVAL, "no region at hva {:#x}", base);
    npages = it->second->npages;
    serial = it->second->serial;
  }
  notify_start(base, base + npages * kPageSize);
  std::unique_ptr<Region> r;
  {
    WriterLock l(mu_);
    // Found again: with no lock held, another destroy_region may have taken
    // it (and a new region its place).
    auto it = regions_.find(base);
    if (it != regions_.end() && it->second->serial == serial) {
      r = std::move(it->second);
      regions_.erase(it);
    }
  }
  notify_end(base, base + npages * kPageSize);
  if (!r) return errorf(EINVAL, "the region at hva {:#x} was destroyed meanwhile", base);
  munmap(reinterpret_cast<void*>(base), npages * kPageSize);
  for (size_t i = 0; i < npages; i++) {
    if (r->pfn[i] != kInvalidPfn) phys_.free(r->pfn[i]);
    if (r->home[i] != kInvalidPfn) phys_.free(r->home[i]);
  }
  return ok();
}

HostMm::Region* HostMm::find_locked(Hva hva) const {
  mu_.assert_shared_held();
  auto it = regions_.upper_bound(hva);
  if (it == regions_.begin()) return nullptr;
  --it;
  Region* r = it->second.get();
  return hva < r->base + r->npages * kPageSize ? r : nullptr;
}

std::optional<FrameKind> HostMm::region_kind(Hva hva) const {
  ReaderLock l(mu_);
  Region* r = find_locked(hva);
  if (!r) return std::nullopt;
  return r->kind;
}

Result<FrameTag> HostMm::populate_locked(Region& r, size_t idx) {
  mu_.assert_held();
  if (r.pfn[idx] != kInvalidPfn) return phys_.tag(r.pfn[idx]);
  Pfn pfn = r.home[idx];
  if (pfn == kInvalidPfn) pfn = NC_TRY(phys_.alloc(r.kind));
  if (auto st = map_pages(r.base + idx * kPageSize, {pfn, 1}); !st) {
    if (pfn != r.home[idx]) phys_.free(pfn);
    return tl::unexpected(st.error());
  }
  r.home[idx] = kInvalidPfn;  // the committed frame is now the page's
  r.pfn[idx] = pfn;
  return phys_.tag(pfn);
}

Result<FrameTag> HostMm::fault_in(Hva hva, bool write) {
  {
    ReaderLock l(mu_);
    Region* r = find_locked(hva);
    if (!r) return errorf(EFAULT, "hva {:#x} is in no guest memory region", hva);
    size_t idx = (hva - r->base) / kPageSize;
    if (r->pfn[idx] != kInvalidPfn) return phys_.tag(r->pfn[idx]);
  }
  WriterLock l(mu_);
  Region* r = find_locked(hva);
  if (!r) return errorf(EFAULT, "hva {:#x} is in no guest memory region", hva);
  return populate_locked(*r, (hva - r->base) / kPageSize);
}

Result<PinnedFrame> HostMm::fault_in_pinned(Hva hva, bool write) {
  WriterLock l(mu_);
  Region* r = find_locked(hva);
  if (!r) return errorf(EFAULT, "hva {:#x} is in no guest memory region", hva);
  if (r->kind != FrameKind::managed) return errorf(EINVAL, "hva {:#x} is unmanaged memory and cannot be pinned", hva);
  FrameTag tag = NC_TRY(populate_locked(*r, (hva - r->base) / kPageSize));
  FramePin pin = NC_TRY(phys_.pin(tag.pfn));
  return PinnedFrame{tag, std::move(pin)};
}

std::optional<FrameTag> HostMm::lookup(Hva hva) const {
  ReaderLock l(mu_);
  Region* r = find_locked(hva);
  if (!r) return std::nullopt;
  Pfn pfn = r->pfn[(hva - r->base) / kPageSize];
  if (pfn == kInvalidPfn) return std::nullopt;
  return phys_.tag(pfn);
}

Status HostMm::migrate(Hva hva) {
  hva &= kPageMask;
  Pfn old_pfn, new_pfn;
  Region* r;
  size_t idx;
  uint64_t serial;
  {
    WriterLock l(mu_);
    r = find_locked(hva);
    if (!r) return errorf(EFAULT, "hva {:#x} is in no guest memory region", hva);
    idx = (hva - r->base) / kPageSize;
    old_pfn = r->pfn[idx];
    if (old_pfn == kInvalidPfn) return errorf(EFAULT, "page at hva {:#x} is not present", hva);
    if (r->busy[idx]) return errorf(EAGAIN, "page at hva {:#x} is already migrating", hva);
    if (phys_.pin_count(old_pfn) > 0) {
      counters_.add(Counter::migrate_ebusy);
      return errorf(EBUSY, "page at hva {:#x} (pfn {}) is pinned", hva, old_pfn);
    }
    new_pfn = NC_TRY(phys_.alloc(r->kind));
    r->busy[idx] = 1;
    serial = r->serial;
  }

  // Subscribers drop the old pfn before we copy: after this no mapping of
  // theirs can write the old frame, so the copy below is complete.
  notify_start(hva, hva + kPageSize);
  Status st = ok();
  {
    WriterLock l(mu_);
    // Found again: with no lock held, destroy_region may have freed the
    // region (and its frames, old_pfn among them), and another may have
    // taken its place.
    r = find_locked(hva);
    const bool same_region = r && r->serial == serial;
    if (same_region) r->busy[idx] = 0;
    if (!same_region) {
      st = errorf(EFAULT, "the region of hva {:#x} was destroyed during migration", hva);
    } else if (r->pfn[idx] != old_pfn) {
      st = errorf(EAGAIN, "page at hva {:#x} was discarded during migration", hva);
    } else if (phys_.pin_count(old_pfn) > 0) {
      counters_.add(Counter::migrate_ebusy);
      st = errorf(EBUSY, "page at hva {:#x} was pinned during migration", hva);
    } else {
      phys_.copy_frame(new_pfn, old_pfn);
      st = map_pages(hva, {new_pfn, 1});
      if (st) {
        r->pfn[idx] = new_pfn;
        // The old frame no longer backs this page: from here on every tag
        // recorded for it mismatches, even before the frame is freed.
        phys_.retag(old_pfn);
      }
    }
  }
  notify_end(hva, hva + kPageSize);
  if (!st) {
    phys_.free(new_pfn);
    return st;
  }
  phys_.free(old_pfn);
  counters_.add(Counter::migrations);
  return ok();
}

Status HostMm::discard(Hva hva, size_t len) {
  if (!page_aligned(hva) || !page_aligned(len)) return errorf(EINVAL, "discard range {:#x}+{:#x} is not page aligned", hva, len);
  if (len == 0) return ok();
  notify_start(hva, hva + len);
  std::vector<Pfn> to_free;
  Status st = ok();
  {
    WriterLock l(mu_);
    for (Hva a = hva; a < hva + len;) {
      Region* r = find_locked(a);
      if (!r) {
        st = errorf(EFAULT, "discard range reaches hva {:#x}, which is in no region", a);
        break;
      }
      size_t first = (a - r->base) / kPageSize;
      size_t last = std::min(r->npages, first + (hva + len - a) / kPageSize);
      bool any = false;
      for (size_t i = first; i < last; i++) {
        if (r->pfn[i] == kInvalidPfn) continue;
        phys_.retag(r->pfn[i]);
        to_free.push_back(r->pfn[i]);
        r->pfn[i] = kInvalidPfn;
        any = true;
      }
      if (any) NC_CHECK(unmap_pages(r->base + first * kPageSize, (last - first) * kPageSize));
      a = r->base + last * kPageSize;
    }
  }
  notify_end(hva, hva + len);
  for (Pfn p : to_free) phys_.free(p);
  counters_.add(Counter::discards, to_free.size());
  return st;
}

template <class Fn>
Status HostMm::copy_pages(Hva hva, size_t len, Fn&& fn) {
  size_t done = 0;
  while (done < len) {
    Hva a = hva + done;
    size_t chunk = std::min(len - done, kPageSize - page_offset(a));
    bool present = false;
    {
      // Shared: a migration's copy-and-remap takes mu_ exclusively, so it
      // cannot run while we touch the page.
      ReaderLock l(mu_);
      Region* r = find_locked(a);
      if (!r) return errorf(EFAULT, "hva {:#x} is in no guest memory region", a);
      if (r->pfn[(a - r->base) / kPageSize] != kInvalidPfn) {
        fn(reinterpret_cast<std::byte*>(a), done, chunk);
        present = true;
      }
    }
    if (!present) {
      NC_TRY(fault_in(a, true));
      continue;
    }
    done += chunk;
  }
  return ok();
}

Status HostMm::copy_to(Hva hva, const void* src, size_t len) {
  auto* s = static_cast<const std::byte*>(src);
  return copy_pages(hva, len, [&](std::byte* p, size_t off, size_t n) { std::memcpy(p, s + off, n); });
}

Status HostMm::copy_from(Hva hva, void* dst, size_t len) {
  auto* d = static_cast<std::byte*>(dst);
  return copy_pages(hva, len, [&](std::byte* p, size_t off, size_t n) { std::memcpy(d + off, p, n); });
}

void HostMm::add_notifier(MmuNotifier* n) {
  WriterLock l(notifiers_mu_);
  notifiers_.push_back(n);
}

void HostMm::remove_notifier(MmuNotifier* n) {
  WriterLock l(notifiers_mu_);
  std::erase(notifiers_, n);
}

void HostMm::notify_start(Hva start, Hva end) {
  counters_.add(Counter::notifier_invalidations);
  // Held until notify_end: taken again for the end, it let a subscriber
  // added in between get an end without its start (a Vm then ended another
  // invalidation of its own still in progress, or aborted on a zero count).
  notifiers_mu_.lock_shared();
  for (MmuNotifier* n : notifiers_) n->invalidate_range_start(start, end);
}

void HostMm::notify_end(Hva start, Hva end) {
  for (MmuNotifier* n : notifiers_) n->invalidate_range_end(start, end);
  notifiers_mu_.unlock_shared();
}

}  // namespace nestcache::host
