// The nested-context table: load/clear/recycle under one lock, vendor hooks
// outside it (see nested_context_table.h for the rules).
#include "vmx/nested_context_table.h"

#include <utility>

#include "base/check.h"

namespace nestcache::vmx {

NestedContextTable::NestedContextTable(NestedContextOps& ops, CounterSet& counters,
                                       OnlineVcpus online_vcpus)
    : ops_(ops), counters_(counters), online_vcpus_(std::move(online_vcpus)) {
  NC_CHECK(online_vcpus_);
}

NestedContextTable::~NestedContextTable() { destroy(); }

NestedContext* NestedContextTable::load(int vcpu_id, Gpa key, int* taken_from) {
  NC_CHECK(vcpu_id >= 0);
  NC_CHECK(key != kInvalidGpa);
  std::unique_ptr<NestedContext> spare;
  NestedContext* ctx = nullptr;
  Outcome outcome = Outcome::kNone;
  int from = NestedContext::kDetached;
  for (;;) {
    {
      MutexLock lock(mu_);
      outcome = load_locked(vcpu_id, key, spare, &ctx, &from);
    }
    if (outcome != Outcome::kNeedAlloc) break;
    // Allocation runs vendor code that may block, so the lock is dropped; the
    // key may be inserted, or capacity reached, meanwhile: hence the new pass.
    spare = ops_.alloc(vcpu_id);
    if (!spare) return nullptr;
  }
  // A spare left over (another vCPU inserted the key first, or the table filled
  // up) is freed here, after the unlock: its destructor is vendor code too.
  spare.reset();
  // The recycled context is already attached to us, so no other vCPU can take
  // it before the reset; resetting outside the lock keeps other loads moving.
  if (outcome == Outcome::kRecycled) ops_.reset(*ctx);
  if (taken_from) *taken_from = from;
  return ctx;
}

NestedContextTable::Outcome NestedContextTable::load_locked(int vcpu_id, Gpa key,
                                                            std::unique_ptr<NestedContext>& spare,
                                                            NestedContext** out, int* taken_from) {
  mu_.assert_held();
  if (auto it = by_key_.find(key); it != by_key_.end()) {
    NestedContext* ctx = it->second.get();
    // One vmcs12 current on two vCPUs is L1's doing (the SDM leaves it
    // undefined), so it must not stop L0: the context is handed over, as
    // the seed does after its WARN, and counted. The vCPU it leaves may
    // still be using its contents: the caller learns which (taken_from).
    if (ctx->attached() && ctx->vcpu_id() != vcpu_id) {
      counters_.add(Counter::nested_context_handovers);
      *taken_from = ctx->vcpu_id();
    }
    if (!ctx->attached()) lru_remove_locked(ctx);
    attach_locked(ctx, vcpu_id);
    counters_.add(Counter::nested_context_reuse);
    *out = ctx;
    return Outcome::kAttached;
  }

  if (by_key_.size() < capacity_locked()) {
    if (!spare) return Outcome::kNeedAlloc;
    NestedContext* ctx = spare.get();
    ctx->key_.store(key, std::memory_order_relaxed);
    by_key_.emplace(key, std::move(spare));
    attach_locked(ctx, vcpu_id);
    *out = ctx;
    return Outcome::kAttached;
  }

  NestedContext* ctx = lru_head_;
  if (ctx == nullptr) return Outcome::kNone;  // every context is attached
  lru_remove_locked(ctx);
  // Re-key through the map's node handle: no allocation, same object.
  auto node = by_key_.extract(ctx->key());
  NC_CHECK(!node.empty() && node.mapped().get() == ctx);
  node.key() = key;
  ctx->key_.store(key, std::memory_order_relaxed);
  by_key_.insert(std::move(node));
  attach_locked(ctx, vcpu_id);
  counters_.add(Counter::nested_context_recycle);
  *out = ctx;
  return Outcome::kRecycled;
}

int NestedContextTable::clear(int /*vcpu_id: not checked, as in the seed*/, Gpa key) {
  MutexLock lock(mu_);
  return detach_locked(key, std::nullopt);
}

void NestedContextTable::release(int vcpu_id, Gpa key) {
  MutexLock lock(mu_);
  detach_locked(key, vcpu_id);
}

int NestedContextTable::detach_locked(Gpa key, std::optional<int> only_from) {
  mu_.assert_held();
  auto it = by_key_.find(key);
  if (it == by_key_.end()) return NestedContext::kDetached;
  NestedContext* ctx = it->second.get();
  // A detached context keeps its LRU place: a second VMCLEAR must not make it
  // look recently used, nor link it twice.
  if (!ctx->attached()) return NestedContext::kDetached;
  const int holder = ctx->vcpu_id();
  if (only_from && holder != *only_from) return NestedContext::kDetached;
  ctx->vcpu_id_.store(NestedContext::kDetached, std::memory_order_relaxed);
  lru_append_locked(ctx);
  return holder;
}

void NestedContextTable::destroy() {
  std::unordered_map<Gpa, std::unique_ptr<NestedContext>> doomed;
  {
    MutexLock lock(mu_);
    doomed.swap(by_key_);
    lru_head_ = lru_tail_ = nullptr;
    lru_size_ = 0;
  }
  // The destructors are vendor code (they deactivate page caches, taking
  // cache locks): run them after the unlock.
  doomed.clear();
}

size_t NestedContextTable::size() const {
  MutexLock lock(mu_);
  return by_key_.size();
}

size_t NestedContextTable::attached_count() const {
  MutexLock lock(mu_);
  return by_key_.size() - lru_size_;
}

size_t NestedContextTable::detached_count() const {
  MutexLock lock(mu_);
  return lru_size_;
}

size_t NestedContextTable::capacity() const {
  MutexLock lock(mu_);
  return capacity_locked();
}

NestedContext* NestedContextTable::find(Gpa key) const {
  MutexLock lock(mu_);
  auto it = by_key_.find(key);
  return it == by_key_.end() ? nullptr : it->second.get();
}

void NestedContextTable::for_each_context(
    const std::function<void(const NestedContext&)>& fn) const {
  MutexLock lock(mu_);
  for (const auto& [key, ctx] : by_key_) fn(*ctx);
}

void NestedContextTable::check_invariants() const {
  MutexLock lock(mu_);
  size_t detached = 0;
  for (const auto& [key, ctx] : by_key_) {
    NC_CHECK(ctx != nullptr);
    NC_CHECK(ctx->key() == key);
    if (!ctx->attached()) detached++;
  }
  NC_CHECK(detached == lru_size_);
  size_t walked = 0;
  const NestedContext* prev = nullptr;
  for (const NestedContext* ctx = lru_head_; ctx != nullptr; ctx = ctx->lru_next_) {
    NC_CHECK(walked < lru_size_);  // a cycle would walk forever
    NC_CHECK(ctx->lru_prev_ == prev);
    NC_CHECK(!ctx->attached());
    auto it = by_key_.find(ctx->key());
    NC_CHECK(it != by_key_.end() && it->second.get() == ctx);
    prev = ctx;
    walked++;
  }
  NC_CHECK(prev == lru_tail_);
  NC_CHECK(walked == lru_size_);
}

size_t NestedContextTable::capacity_locked() const {
  mu_.assert_held();
  const int online = online_vcpus_();
  NC_CHECK(online >= 0);
  return static_cast<size_t>(kNestedOversubRatio) * static_cast<size_t>(online);
}

void NestedContextTable::attach_locked(NestedContext* ctx, int vcpu_id) {
  mu_.assert_held();
  ctx->vcpu_id_.store(vcpu_id, std::memory_order_relaxed);
}

void NestedContextTable::lru_append_locked(NestedContext* ctx) {
  mu_.assert_held();
  ctx->lru_prev_ = lru_tail_;
  ctx->lru_next_ = nullptr;
  if (lru_tail_ != nullptr) {
    lru_tail_->lru_next_ = ctx;
  } else {
    lru_head_ = ctx;
  }
  lru_tail_ = ctx;
  lru_size_++;
}

void NestedContextTable::lru_remove_locked(NestedContext* ctx) {
  mu_.assert_held();
  NC_DCHECK(lru_size_ > 0);
  if (ctx->lru_prev_ != nullptr) {
    ctx->lru_prev_->lru_next_ = ctx->lru_next_;
  } else {
    lru_head_ = ctx->lru_next_;
  }
  if (ctx->lru_next_ != nullptr) {
    ctx->lru_next_->lru_prev_ = ctx->lru_prev_;
  } else {
    lru_tail_ = ctx->lru_prev_;
  }
  ctx->lru_prev_ = ctx->lru_next_ = nullptr;
  lru_size_--;
}

}  // namespace nestcache::vmx
