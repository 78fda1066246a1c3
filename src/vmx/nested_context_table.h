// The VM-wide table of nested contexts (seed patch 8): per-vmcs12 state that
// outlives VMCLEAR, so page caches stay mapped while L1 switches L2s.
//
// A NestedContext is keyed by the guest-physical address of a vmcs12 (or of an
// eVMCS). Vendor code derives from it to hold what must persist per L2 (the
// five page caches of patch 9); this table only files, lends and recycles
// contexts and never looks inside one.
//
// A context is either
//   attached  in use by one L1 vCPU (vcpu_id() >= 0), not on the LRU list, or
//   detached  vcpu_id() == NestedContext::kDetached, on the LRU list and still
//             findable by its key, so a later VMPTRLD of that key reuses it.
// VMPTRLD loads (reuse, allocate below capacity, or recycle the oldest detached
// context); VMCLEAR clears (detach). Contexts are freed only by destroy().
//
// Who may touch a context's contents (the vendor's fields):
//   - only the vCPU it is attached to, from load() until its clear();
//   - after clear() the context belongs to the table: another vCPU's load() may
//     recycle it under a new key at any moment. The clearing vCPU may keep its
//     pointer (the memory lives until destroy()) but must not use the contents
//     until it loads the context again.
//   - the table lock orders the hand-over: what the previous holder wrote
//     before clear() is visible to the next holder after load().
// A context can therefore reach a vCPU other than the one that allocated it
// (a recycle, or an L2 migrated between L1 vCPUs); state bound to a vCPU
// inside it (patch 9's vCPU-bound page caches) must be re-bound to the loading
// vCPU by its user. The table exposes nothing for that: vcpu_id() says who
// holds the context now.
//
// Locking: one Mutex of rank kNestedContexts guards the table and every
// context's key, attachment and LRU links. Vendor hooks (alloc, reset, the
// contexts' destructors) always run with it released.
#pragma once

#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <unordered_map>

#include "base/counters.h"
#include "base/mutex.h"
#include "base/thread_annotations.h"
#include "base/types.h"

namespace nestcache::vmx {

// Contexts per online vCPU before the table recycles (KVM_NESTED_OVERSUB_RATIO).
inline constexpr int kNestedOversubRatio = 8;

class NestedContextTable;

// Base of every nested context. Vendor code derives from it; the table owns
// the objects (through std::unique_ptr) and sets the fields below.
class NestedContext {
 public:
  // vcpu_id() of a context no vCPU holds.
  static constexpr int kDetached = -1;

  virtual ~NestedContext() = default;
  NestedContext(const NestedContext&) = delete;
  NestedContext& operator=(const NestedContext&) = delete;

  // The gpa this context is filed under. Stable while attached: only a
  // detached context can be recycled under another key.
  Gpa key() const { return key_.load(std::memory_order_relaxed); }
  // The vCPU holding the context, or kDetached.
  int vcpu_id() const { return vcpu_id_.load(std::memory_order_relaxed); }
  bool attached() const { return vcpu_id() != kDetached; }

 protected:
  NestedContext() = default;

 private:
  friend class NestedContextTable;

  // Written only by the table under its lock. Atomic so that the holder, and
  // tests looking through find(), can read them without the lock.
  std::atomic<Gpa> key_{kInvalidGpa};
  std::atomic<int> vcpu_id_{kDetached};
  // Intrusive LRU links, meaningful only while detached. Touched only by the
  // table's *_locked helpers, which require its lock.
  NestedContext* lru_prev_ = nullptr;
  NestedContext* lru_next_ = nullptr;
};

// What the vendor provides: how to make and recycle its contexts. Destruction
// is the context's virtual destructor (it must release whatever it holds,
// e.g. deactivate its page caches). Every hook runs without the table lock and
// may block.
class NestedContextOps {
 public:
  virtual ~NestedContextOps() = default;
  // A new, empty context for `vcpu_id` (the loading vCPU), or nullptr when
  // none can be made (the load then returns nullptr).
  virtual std::unique_ptr<NestedContext> alloc(int vcpu_id) = 0;
  // Called on a context just recycled under a new key, attached to the loading
  // vCPU, before load() returns it. ctx.key() is already the new key.
  virtual void reset(NestedContext& ctx) = 0;
};

// One per VM. Thread-safe: every public function takes the table lock.
class NestedContextTable {
 public:
  // The number of online vCPUs now. Called under the table lock on each load,
  // so capacity follows vCPU hot-plug; it must be cheap, must not block and
  // must not call back into the table (an atomic load is the intended shape).
  using OnlineVcpus = std::function<int()>;

  // `ops` and `counters` must outlive the table. Counts nested_context_reuse
  // and nested_context_recycle into `counters` (the VM's).
  NestedContextTable(NestedContextOps& ops, CounterSet& counters, OnlineVcpus online_vcpus);
  // destroy().
  ~NestedContextTable();
  NestedContextTable(const NestedContextTable&) = delete;
  NestedContextTable& operator=(const NestedContextTable&) = delete;

  // VMPTRLD of `key` on `vcpu_id` (>= 0; key != kInvalidGpa). Returns the
  // context now attached to `vcpu_id` for `key`:
  //   - found: attached (taken off the LRU if it was detached); counts a reuse,
  //     also when it was already attached to `vcpu_id`. Found attached to
  //     another vCPU is a caller bug: asserted in debug builds; release builds
  //     move it to `vcpu_id`, as the seed does after its warning.
  //   - not found, fewer contexts than capacity(): a new one from ops.alloc().
  //   - not found, at capacity: the least recently cleared context, re-keyed
  //     and reset (ops.reset); counts a recycle.
  // Returns nullptr when every context is attached or ops.alloc() failed; the
  // caller then keeps the caches it has. Counters are unchanged in that case.
  // The pointer stays valid until destroy(); see the file comment for when its
  // contents may be used. With `taken_from`, a handover stores there the vCPU
  // the context was taken from (kDetached otherwise): that vCPU may still be
  // using the contents, and its user must stop it before using them.
  NestedContext* load(int vcpu_id, Gpa key, int* taken_from = nullptr) NC_EXCLUDES(mu_);

  // VMCLEAR of `key`: if a context has `key` and is attached, detaches it
  // and appends it to the LRU tail; it stays findable by `key`. Otherwise
  // does nothing (an unknown key, kInvalidGpa, or an already detached
  // context, which keeps its LRU place). Like the seed, does not check that
  // `vcpu_id` is the holder. Returns the vCPU the context was detached from,
  // kDetached if nothing was detached (a holder other than `vcpu_id` may
  // still be using the contents: see load).
  int clear(int vcpu_id, Gpa key) NC_EXCLUDES(mu_);

  // VMXOFF, vCPU teardown, a switch to another eVMCS: `vcpu_id` stops using
  // `key`. As clear, but only if `vcpu_id` holds the context: one another
  // vCPU took over (a handover, or a foreign VMCLEAR and a load) is that
  // vCPU's and stays attached to it.
  void release(int vcpu_id, Gpa key) NC_EXCLUDES(mu_);

  // VM teardown: frees every context, attached or not (their destructors run
  // without the lock). Requires that no vCPU uses the table or any context any
  // more. The table is empty afterwards and may be used again.
  void destroy() NC_EXCLUDES(mu_);

  // --- Introspection (tests, reports, teardown leak checks). Each call is one
  // consistent look under the lock; under concurrent loads, separate calls
  // may disagree with each other.

  // Contexts in the table. None is freed before destroy(), so this is also
  // the number ever allocated (the seed's `count`).
  size_t size() const NC_EXCLUDES(mu_);
  size_t attached_count() const NC_EXCLUDES(mu_);
  // Contexts on the LRU list.
  size_t detached_count() const NC_EXCLUDES(mu_);
  // kNestedOversubRatio × online vCPUs, as load() computes it now.
  size_t capacity() const NC_EXCLUDES(mu_);
  // The context filed under `key`, without attaching it or counting anything;
  // nullptr if none.
  NestedContext* find(Gpa key) const NC_EXCLUDES(mu_);
  // Calls fn on every context, in no particular order, with the lock held:
  // fn must not call into the table.
  void for_each_context(const std::function<void(const NestedContext&)>& fn) const NC_EXCLUDES(mu_);
  // Walks the hash and the LRU and aborts (NC_CHECK) unless: each context is
  // filed under its own key; the LRU holds exactly the detached contexts,
  // with consistent links; attached + detached == size().
  void check_invariants() const NC_EXCLUDES(mu_);

 private:
  enum class Outcome { kAttached, kRecycled, kNone, kNeedAlloc };

  // One pass of load() under the lock. Consumes `spare` (a context allocated
  // outside the lock) when it inserts a new context.
  Outcome load_locked(int vcpu_id, Gpa key, std::unique_ptr<NestedContext>& spare,
                      NestedContext** out, int* taken_from) NC_REQUIRES(mu_);
  // clear and release under the lock: detaches the context of `key` if it is
  // attached (to `only_from`, when given); returns the vCPU it was detached
  // from, or kDetached.
  int detach_locked(Gpa key, std::optional<int> only_from) NC_REQUIRES(mu_);
  size_t capacity_locked() const NC_REQUIRES(mu_);
  void attach_locked(NestedContext* ctx, int vcpu_id) NC_REQUIRES(mu_);
  void lru_append_locked(NestedContext* ctx) NC_REQUIRES(mu_);
  void lru_remove_locked(NestedContext* ctx) NC_REQUIRES(mu_);

  NestedContextOps& ops_;
  CounterSet& counters_;
  const OnlineVcpus online_vcpus_;

  mutable Mutex mu_{LockRank::kNestedContexts};
  std::unordered_map<Gpa, std::unique_ptr<NestedContext>> by_key_ NC_GUARDED_BY(mu_);
  // Detached contexts, oldest clear() at the head (the next to recycle).
  NestedContext* lru_head_ NC_GUARDED_BY(mu_) = nullptr;
  NestedContext* lru_tail_ NC_GUARDED_BY(mu_) = nullptr;
  size_t lru_size_ NC_GUARDED_BY(mu_) = 0;
};

}  // namespace nestcache::vmx
