#include "vm/vm.h"

#include <algorithm>
#include <chrono>

#include "base/check.h"
#include "vm/cache_registry.h"

namespace nestcache::vm {

const char* cache_read_side_name(CacheReadSide side) {
  switch (side) {
    case CacheReadSide::rwlock: return "rwlock";
    case CacheReadSide::lockfree: return "lockfree";
  }
  return "?";
}

std::optional<CacheReadSide> parse_cache_read_side(std::string_view name) {
  for (CacheReadSide s : {CacheReadSide::rwlock, CacheReadSide::lockfree})
    if (name == cache_read_side_name(s)) return s;
  return std::nullopt;
}

Vm::Vm(host::HostMm& mm, uint32_t id, VmOptions options)
    : mm_(mm), id_(id), options_(options), caches_(std::make_unique<CacheRegistry>(*this)) {
  mm_.add_notifier(this);
}

Vm::~Vm() {
  mm_.remove_notifier(this);
  NC_CHECK(caches_->active_count() == 0);  // every PfnCache must be gone first
}

// --- memslots ---------------------------------------------------------------------

Status Vm::set_memory_region(const MemoryRegion& r) {
  MutexLock l(slots_lock_);
  MemslotUpdate u = NC_TRY(memslots_.validate(r));
  return apply_update_locked(u);
}

Status Vm::set_memory_regions(std::span<const MemoryRegion> rs) {
  MutexLock l(slots_lock_);
  for (const MemoryRegion& r : rs) {
    MemslotUpdate u = NC_TRY(memslots_.validate(r));
    NC_TRY(apply_update_locked(u));
  }
  return ok();
}

Status Vm::apply_update_locked(const MemslotUpdate& u) {
  slots_lock_.assert_held();
  if (u.change == MemslotChange::none) return ok();
  if (u.change == MemslotChange::remove || u.change == MemslotChange::move) {
    // Publish the old slot invalid first. Once the grace period inside
    // publish_invalid has passed, no EPT01 fault that saw the slot valid is
    // still running (faults hold the RCU read lock throughout), so what we
    // zap now cannot be re-created from the old slot.
    memslots_.publish_invalid(u);
    size_t zapped;
    {
      WriterLock l(mmu_lock_);
      zapped = zap_gfn_range_locked(u.old_slot->base_gfn, u.old_slot->end_gfn());
    }
    if (zapped) flush_all_tlbs();
  }
  memslots_.commit(u);
  return ok();
}

Result<Hva> Vm::gfn_to_hva(Gfn gfn) const {
  LookupHint hint;
  return gfn_to_hva(gfn, hint);
}

Result<Hva> Vm::gfn_to_hva(Gfn gfn, LookupHint& hint) const {
  rcu::ReadLock rcu;
  const Memslot* s = memslots_.active()->find(gfn, hint);
  if (!s || s->invalid) return errorf(EFAULT, "gfn {:#x} is in no memslot", gfn);
  return s->gfn_to_hva(gfn);
}

// --- guest memory --------------------------------------------------------------------

namespace {
// Walks [gpa, gpa + len) page by page: fn(hva, done, chunk) for each piece.
template <class Fn>
Status for_each_guest_chunk(const Vm& vm, Gpa gpa, size_t len, Fn&& fn) {
  for (size_t done = 0; done < len;) {
    Gpa g = gpa + done;
    size_t chunk = std::min(len - done, kPageSize - page_offset(g));
    Hva hva = NC_TRY(vm.gfn_to_hva(gpa_to_gfn(g)));
    NC_TRY(fn(hva + page_offset(g), done, chunk));
    done += chunk;
  }
  return ok();
}
}  // namespace

Status Vm::read_guest(Gpa gpa, void* dst, size_t len) const {
  auto* d = static_cast<std::byte*>(dst);
  return for_each_guest_chunk(*this, gpa, len,
                              [&](Hva hva, size_t done, size_t n) { return mm_.copy_from(hva, d + done, n); });
}

Status Vm::write_guest(Gpa gpa, const void* src, size_t len) {
  auto* s = static_cast<const std::byte*>(src);
  return for_each_guest_chunk(*this, gpa, len,
                              [&](Hva hva, size_t done, size_t n) { return mm_.copy_to(hva, s + done, n); });
}

// --- EPT01 ---------------------------------------------------------------------------

std::optional<Ept01Entry> Vm::ept01_lookup(Gfn gfn) const {
  ReaderLock l(mmu_lock_);
  auto it = ept01_.find(gfn);
  if (it == ept01_.end()) return std::nullopt;
  return it->second;
}

Result<Ept01Entry> Vm::ept01_fault(Gfn gfn, bool write, LookupHint* hint) {
  for (;;) {
    uint64_t seq = mmu_invalidate_seq();
    // The RCU read lock covers the whole fault, so a memslot delete or move
    // (which waits for a grace period before zapping) never misses an entry
    // made from the old slot.
    rcu::ReadLock rcu;
    const MemslotSet* set = memslots_.active();
    const Memslot* s = hint ? set->find(gfn, *hint) : set->find(gfn);
    if (!s || s->invalid) return errorf(EFAULT, "gfn {:#x} is in no memslot", gfn);
    if (write && (s->flags & kMemReadonly)) return errorf(EFAULT, "gfn {:#x} is in read-only slot {}", gfn, s->id);
    Hva hva = s->gfn_to_hva(gfn);
    host::FrameTag tag = NC_TRY(mm_.fault_in(hva, write));
    WriterLock l(mmu_lock_);
    if (mmu_invalidate_retry(hva, seq)) continue;  // an invalidation raced the resolve: the frame may be gone
    Ept01Entry e{tag, !(s->flags & kMemReadonly)};
    ept01_[gfn] = e;
    return e;
  }
}

bool Vm::invalidation_in_progress(Hva hva) const {
  return invalidate_in_progress_.load() && hva >= invalidate_range_start_.load() && hva < invalidate_range_end_.load();
}

bool Vm::mmu_invalidate_retry(Hva hva, uint64_t seq) const {
  return invalidation_in_progress(hva) || mmu_invalidate_seq_.load() != seq;
}

uint64_t Vm::wait_for_invalidation(Hva hva) {
  if (!invalidation_in_progress(hva)) return 0;
  const auto start = std::chrono::steady_clock::now();
  {
    MutexLock l(invalidation_wait_mu_);
    invalidation_waiters_.fetch_add(1);
    invalidation_done_.wait(invalidation_wait_mu_, [&] { return !invalidation_in_progress(hva); });
    invalidation_waiters_.fetch_sub(1);
  }
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count());
}

size_t Vm::zap_gfn_range_locked(Gfn first, Gfn end) {
  mmu_lock_.assert_held();
  auto lo = ept01_.lower_bound(first);
  auto hi = ept01_.lower_bound(end);
  size_t n = std::distance(lo, hi);
  ept01_.erase(lo, hi);
  counters_.add(Counter::ept01_zaps, n);
  return n;
}

void Vm::flush_all_tlbs() {
  std::vector<Vcpu*> all = vcpus();
  Vcpu::make_request_and_wait(all, Request::kTlbFlush);
}

// --- MMU notifier ----------------------------------------------------------------------

void Vm::invalidate_range_start(Hva start, Hva end) {
  // The registry's entries for the range load while the EPT01 zap runs.
  caches_->prefetch(start, end);
  size_t zapped = 0;
  {
    WriterLock l(mmu_lock_);
    if (invalidate_in_progress_.load() == 0) {
      invalidate_range_start_.store(start);
      invalidate_range_end_.store(end);
    } else {
      invalidate_range_start_.store(std::min(invalidate_range_start_.load(), start));
      invalidate_range_end_.store(std::max(invalidate_range_end_.load(), end));
    }
    invalidate_in_progress_.fetch_add(1);
    rcu::ReadLock rcu;
    // (The lambda runs under mmu_lock_, which the analysis cannot see into.)
    memslots_.active()->for_each_in_hva_range(start, end, [&](const Memslot& s) NC_NO_THREAD_SAFETY_ANALYSIS {
      Hva lo = std::max(start, s.userspace_addr), hi = std::min(end, s.end_hva());
      Gfn first = s.base_gfn + (lo - s.userspace_addr) / kPageSize;
      Gfn last = s.base_gfn + (hi - s.userspace_addr + kPageSize - 1) / kPageSize;
      zapped += zap_gfn_range_locked(first, last);
    });
  }
  // No lock of the vm layer is held from here (the host holds its notifier
  // list, which no vCPU's way out of guest mode takes): the vCPUs we wait
  // for may need any of them on their way out of guest mode.
  if (zapped) flush_all_tlbs();
  // Marks the caches, waits for their lock-free readers, and names the
  // vCPUs whose hardware may still use the old pfns.
  std::vector<Vcpu*> users = caches_->invalidate(start, end);
  if (users.empty()) return;
  if (protocol_.notifier_waits_for_vcpus) {
    Vcpu::make_request_and_wait(users, Request::kOutsideGuestMode);
  } else {  // the NO_WAIT variant, for model replays only
    for (Vcpu* v : users) {
      v->make_request(Request::kOutsideGuestMode);
      v->kick();
    }
  }
}

void Vm::invalidate_range_end(Hva start, Hva end) {
  {
    WriterLock l(mmu_lock_);
    mmu_invalidate_seq_.fetch_add(1);
    NC_CHECK(invalidate_in_progress_.load() > 0);
    invalidate_in_progress_.fetch_sub(1);
  }
  // A refresh blocked on this range looks again. Taking the mutex orders the
  // notify after its check of the range, so the wake-up cannot fall between
  // that check and its wait.
  if (invalidation_waiters_.load() > 0) {
    { MutexLock l(invalidation_wait_mu_); }
    invalidation_done_.notify_all();
  }
}

// --- vCPUs -------------------------------------------------------------------------------

void Vm::add_vcpu(Vcpu* v) {
  MutexLock l(vcpus_mu_);
  vcpus_.push_back(v);
}

void Vm::remove_vcpu(Vcpu* v) {
  MutexLock l(vcpus_mu_);
  std::erase(vcpus_, v);
}

std::vector<Vcpu*> Vm::vcpus() const {
  MutexLock l(vcpus_mu_);
  return vcpus_;
}

size_t Vm::online_vcpus() const {
  MutexLock l(vcpus_mu_);
  return vcpus_.size();
}

}  // namespace nestcache::vm
