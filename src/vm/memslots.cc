#include "vm/memslots.h"

#include <algorithm>

#include "base/check.h"

namespace nestcache::vm {

// --- MemslotSet ---------------------------------------------------------------

namespace {
constexpr Gfn kNoGfn = ~Gfn{0};  // the back sentinels' base: above every gfn
}  // namespace

MemslotSet::MemslotSet()
    : ranges_{{0, 0}, {kNoGfn, kNoGfn}, {kNoGfn, kNoGfn}}, starts_{0, 0}, index_of_id_(kMaxUserMemslots, kNoIndex) {}

int32_t MemslotSet::search(Gfn gfn) const {
  const size_t bucket = std::min<Gfn>(gfn >> shift_, starts_.size() - 2);
  const uint32_t below = starts_[bucket];  // slots starting below the bucket
  // r[0]: the last slot starting below the bucket (or "no slot"); r[1], r[2]:
  // the bucket's first two slots (or sentinels). Slots past the bucket start
  // above gfn, unless the bucket is the last, where none follow.
  const GfnRange* r = &ranges_[below];
  int32_t i = static_cast<int32_t>(below) - 1 + (r[1].base <= gfn);  // a cmov, not a branch
  if (r[2].base <= gfn) [[unlikely]]
    i = search_bucket(gfn, below + 1, starts_[bucket + 1]);
  return i;
}

int32_t MemslotSet::search_bucket(Gfn gfn, uint32_t lo, uint32_t hi) const {
  // Branch-free halving: the compiler turns the conditional into a cmov.
  const GfnRange* first = &range(static_cast<int32_t>(lo));
  for (size_t len = hi - lo; len > 1;) {
    const size_t half = len / 2;
    first = first[half].base <= gfn ? first + half : first;
    len -= half;
  }
  return static_cast<int32_t>(first - &range(0));
}

const Memslot* MemslotSet::find(Gfn gfn) const {
  const int32_t last = last_used_.load(std::memory_order_relaxed);
  if (last != kNoIndex && static_cast<size_t>(last) < slots_.size() && slots_[last].contains(gfn)) return &slots_[last];
  const int32_t i = search(gfn);
  if (gfn >= range(i).end) return nullptr;  // also "no slot", whose range is empty
  last_used_.store(i, std::memory_order_relaxed);
  return &slots_[i];
}

const Memslot* MemslotSet::find(Gfn gfn, LookupHint& hint) const {
  if (hint.generation == generation_ && hint.slot->contains(gfn)) return hint.slot;
  const int32_t i = search(gfn);
  if (gfn >= range(i).end) return nullptr;
  hint = {generation_, &slots_[i]};
  return &slots_[i];
}

const Memslot* MemslotSet::by_id(uint32_t id) const {
  if (id >= index_of_id_.size() || index_of_id_[id] == kNoIndex) return nullptr;
  return &slots_[index_of_id_[id]];
}

const Memslot* MemslotSet::overlap(Gfn base, Gfn end, uint32_t id) const {
  // Slots do not overlap one another, so their ends ascend with their bases:
  // walking back from the last slot that starts before `end`, the first one
  // that ends at or before `base` ends the search.
  for (int32_t i = search(end - 1); i != kNoIndex && slots_[i].end_gfn() > base; i--)
    if (slots_[i].id != id) return &slots_[i];
  return nullptr;
}

void MemslotSet::reindex_from(size_t first) {
  for (size_t i = first; i < slots_.size(); i++) index_of_id_[slots_[i].id] = static_cast<int32_t>(i);
}

void MemslotSet::insert(const Memslot& s) {
  NC_CHECK(index_of_id_[s.id] == kNoIndex);
  const size_t at = static_cast<size_t>(search(s.base_gfn) + 1);  // after every slot starting below s
  ranges_.insert(ranges_.begin() + 1 + at, GfnRange{s.base_gfn, s.end_gfn()});
  slots_.insert(slots_.begin() + at, s);
  reindex_from(at);
  index_inserted(s.base_gfn);
  by_hva_.emplace(s.userspace_addr, s.id);
  max_bytes_ = std::max<uint64_t>(max_bytes_, s.npages * kPageSize);
}

void MemslotSet::erase(const Memslot& old) {
  const int32_t at = index_of_id_[old.id];
  NC_CHECK(at != kNoIndex && slots_[at].base_gfn == old.base_gfn);
  auto [lo, hi] = by_hva_.equal_range(old.userspace_addr);
  for (auto h = lo; h != hi; ++h) {
    if (h->second == old.id) {
      by_hva_.erase(h);
      break;
    }
  }
  ranges_.erase(ranges_.begin() + 1 + at);
  slots_.erase(slots_.begin() + at);
  index_of_id_[old.id] = kNoIndex;
  reindex_from(static_cast<size_t>(at));
  index_erased(old.base_gfn);
}

void MemslotSet::index_inserted(Gfn base) {
  const size_t n = size();
  const Gfn bucket = base >> shift_;
  size_t buckets = index_buckets();
  if (bucket >= buckets) {  // a new highest base, beyond the last bucket
    if (index_misfits(bucket + 1)) return rebuild_index();  // before growing the table to it
    buckets = bucket + 1;
    starts_.resize(buckets + 1, static_cast<uint32_t>(n - 1));  // every other slot starts below them
  }
  for (size_t b = bucket + 1; b <= buckets; b++) starts_[b]++;
  if (index_misfits(buckets)) rebuild_index();
}

void MemslotSet::index_erased(Gfn base) {
  const size_t n = size();
  for (size_t b = (base >> shift_) + 1; b < starts_.size(); b++) starts_[b]--;
  // The last bucket is the highest remaining base's: drop the ones above it.
  const size_t buckets = n ? (range(static_cast<int32_t>(n) - 1).base >> shift_) + 1 : 1;
  starts_.resize(buckets + 1);
  if (index_misfits(buckets)) rebuild_index();
}

bool MemslotSet::index_misfits(size_t buckets) const {
  const size_t n = size();
  // Too many buckets for the slots, or too few: buckets this wide hold
  // several slots each.
  return buckets > kMaxBucketsPerSlot * std::max(n, kMinSlotsForIndex) || n > 2 * buckets;
}

void MemslotSet::rebuild_index() {
  // The smallest bucket size that keeps the buckets within two per slot.
  const size_t n = size();
  const size_t most = 2 * std::max(n, kMinSlotsForIndex);
  const Gfn highest = n ? range(static_cast<int32_t>(n) - 1).base : 0;
  shift_ = 0;
  while ((highest >> shift_) + 1 > most) shift_++;
  const size_t buckets = (highest >> shift_) + 1;
  starts_.assign(buckets + 1, 0);
  uint32_t below = 0;
  for (size_t b = 0; b <= buckets; b++) {
    const Gfn start = Gfn{b} << shift_;  // beyond the highest base for b == buckets
    while (below < n && range(static_cast<int32_t>(below)).base < start) below++;
    starts_[b] = below;
  }
}

void MemslotSet::apply(const MemslotUpdate& u, bool mark_invalid) {
  // Indices move with inserts and erases; a stale last-used index would only
  // cost a search, but start clean.
  last_used_.store(kNoIndex, std::memory_order_relaxed);
  if (mark_invalid) {
    const int32_t at = index_of_id_[u.old_slot->id];
    NC_CHECK(at != kNoIndex);
    slots_[at].invalid = true;
    return;
  }
  switch (u.change) {
    case MemslotChange::none: break;
    case MemslotChange::create: insert(*u.new_slot); break;
    case MemslotChange::remove: erase(*u.old_slot); break;
    case MemslotChange::move:
      erase(*u.old_slot);
      insert(*u.new_slot);
      break;
    case MemslotChange::flags_only: {
      const int32_t at = index_of_id_[u.old_slot->id];
      NC_CHECK(at != kNoIndex);
      slots_[at].flags = u.new_slot->flags;
      break;
    }
  }
}

// --- Memslots -----------------------------------------------------------------

Memslots::Memslots() { active_.publish(&sets_[0]); }
Memslots::~Memslots() = default;

Result<MemslotUpdate> Memslots::validate(const MemoryRegion& r) const {
  if (r.flags & ~(kMemLogDirtyPages | kMemReadonly)) return errorf(EINVAL, "memslot flags {:#x} are not supported", r.flags);
  if (r.slot >= kMaxUserMemslots)
    return errorf(EINVAL, "slot id {} is out of range (0..{})", r.slot, kMaxUserMemslots - 1);
  if (!page_aligned(r.memory_size)) return errorf(EINVAL, "memory size {:#x} is not page aligned", r.memory_size);
  if (!page_aligned(r.guest_phys_addr))
    return errorf(EINVAL, "guest physical address {:#x} is not page aligned", r.guest_phys_addr);
  if (!page_aligned(r.userspace_addr))
    return errorf(EINVAL, "userspace address {:#x} is not page aligned", r.userspace_addr);
  if (r.guest_phys_addr + r.memory_size < r.guest_phys_addr)
    return errorf(EINVAL, "guest range {:#x}+{:#x} wraps around", r.guest_phys_addr, r.memory_size);
  if (r.userspace_addr + r.memory_size < r.userspace_addr)
    return errorf(EINVAL, "userspace range {:#x}+{:#x} wraps around", r.userspace_addr, r.memory_size);
  // KVM's access_ok(): the whole range must be user space.
  if (r.userspace_addr + r.memory_size >= kUserSpaceEnd)
    return errorf(EINVAL, "userspace range {:#x}+{:#x} is not below the end of user space {:#x}", r.userspace_addr,
                  r.memory_size, kUserSpaceEnd);
  uint64_t npages = r.memory_size / kPageSize;
  if (npages > kMaxSlotPages) return errorf(EINVAL, "{} pages exceed the per-slot maximum of {}", npages, kMaxSlotPages);

  const MemslotSet& set = *active_.read();
  const Memslot* old = set.by_id(r.slot);
  MemslotUpdate u;
  if (npages == 0) {
    if (!old) return errorf(EINVAL, "slot {} does not exist and cannot be deleted", r.slot);
    u.change = MemslotChange::remove;
    u.old_slot = *old;
    return u;
  }
  if ((r.guest_phys_addr + r.memory_size - 1) >> kMaxPhysAddrBits)
    return errorf(EINVAL, "guest range {:#x}+{:#x} is beyond the {}-bit physical address width", r.guest_phys_addr,
                  r.memory_size, kMaxPhysAddrBits);
  Memslot s{r.slot, gpa_to_gfn(r.guest_phys_addr), npages, r.userspace_addr, r.flags, false};
  if (!old) {
    u.change = MemslotChange::create;
  } else {
    if (r.userspace_addr != old->userspace_addr || npages != old->npages || ((r.flags ^ old->flags) & kMemReadonly))
      return errorf(EINVAL, "slot {} exists: only its base address or its dirty-logging flag may change", r.slot);
    if (s.base_gfn != old->base_gfn) {
      u.change = MemslotChange::move;
    } else if (r.flags != old->flags) {
      u.change = MemslotChange::flags_only;
    } else {
      u.change = MemslotChange::none;  // KVM accepts this and does nothing
    }
    u.old_slot = *old;
  }
  if (u.change == MemslotChange::create || u.change == MemslotChange::move) {
    if (const Memslot* o = set.overlap(s.base_gfn, s.end_gfn(), s.id))
      return errorf(EEXIST, "guest range {:#x}+{:#x} overlaps slot {}", r.guest_phys_addr, r.memory_size, o->id);
  }
  u.new_slot = s;
  return u;
}

void Memslots::publish_invalid(const MemslotUpdate& update) {
  NC_CHECK(update.change == MemslotChange::remove || update.change == MemslotChange::move);
  publish(update, true);
}

void Memslots::commit(const MemslotUpdate& update) { publish(update, false); }

void Memslots::publish(const MemslotUpdate& update, bool mark_invalid) {
  MemslotSet* cur = active_.read();
  MemslotSet* next = cur == &sets_[0] ? &sets_[1] : &sets_[0];
  // `next` has not been published since the grace period that ended the
  // previous publish, so no reader can be looking at it while it changes.
  next->apply(update, mark_invalid);
  next->generation_ = cur->generation_ + 1;
  active_.publish(next);
  generation_.store(next->generation_, std::memory_order_release);
  // Readers that took `cur` before the publish finish before `cur` changes.
  rcu::synchronize();
  update_retired_set(cur, update, mark_invalid);
}

// Brings the set readers stopped seeing up to date. Runs after a grace
// period, so no reader can still be inside it: every reader takes the set
// (and compares its generation with a LookupHint's) inside its ReadLock.
void Memslots::update_retired_set(MemslotSet* set, const MemslotUpdate& update, bool mark_invalid) {
  set->apply(update, mark_invalid);
  set->generation_ = generation_.load(std::memory_order_relaxed);
}

}  // namespace nestcache::vm
