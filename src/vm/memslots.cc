#include "vm/memslots.h"

#include "base/check.h"

namespace nestcache::vm {

// --- MemslotSet ---------------------------------------------------------------

const Memslot* MemslotSet::find(Gfn gfn) const {
  auto it = by_gfn_.upper_bound(gfn);
  if (it == by_gfn_.begin()) return nullptr;
  --it;
  return it->second.contains(gfn) ? &it->second : nullptr;
}

const Memslot* MemslotSet::find(Gfn gfn, LookupHint& hint) const {
  if (hint.generation == generation_ && hint.slot && hint.slot->contains(gfn)) return hint.slot;
  const Memslot* s = find(gfn);
  if (s) hint = {generation_, s};
  return s;
}

const Memslot* MemslotSet::by_id(uint32_t id) const { return id < by_id_.size() ? by_id_[id] : nullptr; }

void MemslotSet::apply(const MemslotUpdate& u, bool mark_invalid) {
  auto erase = [&](const Memslot& old) {
    auto it = by_gfn_.find(old.base_gfn);
    NC_CHECK(it != by_gfn_.end() && it->second.id == old.id);
    auto [lo, hi] = by_hva_.equal_range(old.userspace_addr);
    for (auto h = lo; h != hi; ++h) {
      if (h->second == &it->second) {
        by_hva_.erase(h);
        break;
      }
    }
    by_id_[old.id] = nullptr;
    by_gfn_.erase(it);
  };
  auto insert = [&](const Memslot& s) {
    auto [it, inserted] = by_gfn_.emplace(s.base_gfn, s);
    NC_CHECK(inserted);
    by_hva_.emplace(s.userspace_addr, &it->second);
    by_id_[s.id] = &it->second;
    max_bytes_ = std::max<uint64_t>(max_bytes_, s.npages * kPageSize);
  };

  if (mark_invalid) {
    auto it = by_gfn_.find(u.old_slot->base_gfn);
    NC_CHECK(it != by_gfn_.end());
    it->second.invalid = true;
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
      auto it = by_gfn_.find(u.old_slot->base_gfn);
      NC_CHECK(it != by_gfn_.end());
      it->second.flags = u.new_slot->flags;
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
    auto it = set.by_gfn_.upper_bound(s.base_gfn);
    if (it != set.by_gfn_.begin()) --it;
    for (; it != set.by_gfn_.end() && it->second.base_gfn < s.end_gfn(); ++it) {
      const Memslot& o = it->second;
      if (o.id != s.id && o.end_gfn() > s.base_gfn)
        return errorf(EEXIST, "guest range {:#x}+{:#x} overlaps slot {}", r.guest_phys_addr, r.memory_size, o.id);
    }
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
  next->apply(update, mark_invalid);
  next->generation_ = cur->generation_ + 1;
  active_.publish(next);
  generation_.store(next->generation_, std::memory_order_release);
  rcu::synchronize();
  update_retired_set(cur, update, mark_invalid);
}

// Brings the set readers stopped seeing up to date. Runs after a grace
// period, so no reader can still be inside it (tsan.supp names this function:
// TSan cannot see RCU's grace period).
void Memslots::update_retired_set(MemslotSet* set, const MemslotUpdate& update, bool mark_invalid) {
  set->apply(update, mark_invalid);
  set->generation_ = generation_.load(std::memory_order_relaxed);
}

}  // namespace nestcache::vm
