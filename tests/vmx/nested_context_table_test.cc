// NestedContextTable: the load/clear/recycle rules of seed patch 8, the
// l2-switch counter formulas of patch 10 on the table alone, and a threaded
// run that ThreadSanitizer checks.
#include "vmx/nested_context_table.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace nestcache::vmx {
namespace {

class CountingOps;

// What a vendor context would be; its plain fields belong to the holder.
class TestContext : public NestedContext {
 public:
  TestContext(CountingOps& ops, int vcpu_id) : allocated_by(vcpu_id), ops_(ops) {}
  ~TestContext() override;

  const int allocated_by;
  int resets = 0;
  int holder = kDetached;  // written by whoever uses the contents
  uint64_t uses = 0;

 private:
  CountingOps& ops_;
};

// Counts allocations, frees and resets; optional one-shot hooks run inside them.
class CountingOps : public NestedContextOps {
 public:
  std::unique_ptr<NestedContext> alloc(int vcpu_id) override {
    if (auto hook = std::exchange(on_alloc, nullptr)) hook();
    if (fail_alloc) return nullptr;
    allocs++;
    return std::make_unique<TestContext>(*this, vcpu_id);
  }
  void reset(NestedContext& ctx) override {
    resets++;
    static_cast<TestContext&>(ctx).resets++;
    if (on_reset) on_reset(ctx);
  }

  std::atomic<int> allocs{0};
  std::atomic<int> frees{0};
  std::atomic<int> resets{0};
  bool fail_alloc = false;
  std::function<void()> on_alloc;  // runs once, at the next alloc
  std::function<void(NestedContext&)> on_reset;
  std::function<void()> on_free;
};

TestContext::~TestContext() {
  ops_.frees++;
  if (ops_.on_free) ops_.on_free();
}

Gpa key(int i) { return Gpa{0x10000000} + Gpa(i) * kPageSize; }

class NestedContextTableTest : public ::testing::Test {
 protected:
  uint64_t reuse() const { return counters.get(Counter::nested_context_reuse); }
  uint64_t recycle() const { return counters.get(Counter::nested_context_recycle); }

  // Loads keys [0, n) on `vcpu`; returns the contexts, in key order.
  std::vector<NestedContext*> load_keys(int n, int vcpu = 0) {
    std::vector<NestedContext*> out;
    for (int i = 0; i < n; i++) out.push_back(table.load(vcpu, key(i)));
    return out;
  }

  CountingOps ops;
  CounterSet counters;
  std::atomic<int> online{1};
  NestedContextTable table{ops, counters, [this] { return online.load(); }};
};

// --- load -----------------------------------------------------------------

TEST_F(NestedContextTableTest, LoadOfNewKeyAllocatesAContextAttachedToTheLoadingVcpu) {
  NestedContext* ctx = table.load(3, key(0));
  ASSERT_NE(ctx, nullptr);
  EXPECT_EQ(ctx->key(), key(0));
  EXPECT_EQ(ctx->vcpu_id(), 3);
  EXPECT_EQ(static_cast<TestContext*>(ctx)->allocated_by, 3);
  EXPECT_EQ(ops.allocs, 1);
  EXPECT_EQ(table.size(), 1u);
  EXPECT_EQ(table.attached_count(), 1u);
  EXPECT_EQ(table.detached_count(), 0u);
  EXPECT_EQ(reuse(), 0u);
  EXPECT_EQ(recycle(), 0u);
}

TEST_F(NestedContextTableTest, LoadOfKeyAlreadyAttachedToTheSameVcpuCountsAReuse) {
  NestedContext* first = table.load(0, key(0));
  NestedContext* again = table.load(0, key(0));
  EXPECT_EQ(again, first);
  EXPECT_EQ(again->vcpu_id(), 0);
  EXPECT_EQ(reuse(), 1u);
  EXPECT_EQ(ops.allocs, 1);
  EXPECT_EQ(table.detached_count(), 0u);
}

TEST_F(NestedContextTableTest, LoadOfDetachedKeyReattachesItAndTakesItOffTheLru) {
  NestedContext* ctx = table.load(0, key(0));
  table.clear(0, key(0));
  ASSERT_EQ(table.detached_count(), 1u);
  EXPECT_EQ(table.load(0, key(0)), ctx);
  EXPECT_EQ(ctx->vcpu_id(), 0);
  EXPECT_EQ(table.detached_count(), 0u);
  EXPECT_EQ(table.attached_count(), 1u);
  EXPECT_EQ(reuse(), 1u);
  EXPECT_EQ(ops.allocs, 1);
  table.check_invariants();
}

TEST_F(NestedContextTableTest, ClearedContextFollowsItsKeyToAnotherVcpu) {
  online = 2;
  NestedContext* ctx = table.load(0, key(0));
  table.clear(0, key(0));
  EXPECT_EQ(table.load(1, key(0)), ctx);
  EXPECT_EQ(ctx->vcpu_id(), 1);
  EXPECT_EQ(reuse(), 1u);
}

TEST_F(NestedContextTableTest, ReuseAndFreshAllocationDoNotReset) {
  table.load(0, key(0));
  table.clear(0, key(0));
  table.load(0, key(0));
  EXPECT_EQ(ops.resets, 0);
}

TEST_F(NestedContextTableTest, AllocatesDistinctContextsUpToCapacity) {
  ASSERT_EQ(table.capacity(), size_t(kNestedOversubRatio));
  std::vector<NestedContext*> ctxs = load_keys(kNestedOversubRatio);
  std::set<NestedContext*> distinct(ctxs.begin(), ctxs.end());
  EXPECT_EQ(distinct.size(), size_t(kNestedOversubRatio));
  EXPECT_EQ(distinct.count(nullptr), 0u);
  EXPECT_EQ(ops.allocs, kNestedOversubRatio);
  EXPECT_EQ(table.size(), size_t(kNestedOversubRatio));
  EXPECT_EQ(reuse(), 0u);
  EXPECT_EQ(recycle(), 0u);
}

TEST_F(NestedContextTableTest, LoadReturnsNullWhenEveryContextIsAttachedAndCountsNothing) {
  load_keys(kNestedOversubRatio);
  EXPECT_EQ(table.load(0, key(100)), nullptr);
  EXPECT_EQ(table.find(key(100)), nullptr);
  EXPECT_EQ(ops.allocs, kNestedOversubRatio);  // no allocation attempted
  EXPECT_EQ(table.size(), size_t(kNestedOversubRatio));
  EXPECT_EQ(reuse(), 0u);
  EXPECT_EQ(recycle(), 0u);
}

TEST_F(NestedContextTableTest, CapacityFollowsOnlineVcpusOnEachLoad) {
  load_keys(kNestedOversubRatio);
  ASSERT_EQ(table.load(0, key(100)), nullptr);
  online = 2;  // a vCPU came online: room for eight more
  EXPECT_EQ(table.capacity(), size_t(2 * kNestedOversubRatio));
  NestedContext* ctx = table.load(1, key(100));
  ASSERT_NE(ctx, nullptr);
  EXPECT_EQ(ctx->vcpu_id(), 1);
  EXPECT_EQ(ops.allocs, kNestedOversubRatio + 1);
  EXPECT_EQ(recycle(), 0u);
}

TEST_F(NestedContextTableTest, AllocationFailureReturnsNullAndChangesNothing) {
  ops.fail_alloc = true;
  EXPECT_EQ(table.load(0, key(0)), nullptr);
  EXPECT_EQ(table.size(), 0u);
  EXPECT_EQ(table.find(key(0)), nullptr);
  EXPECT_EQ(reuse(), 0u);
  EXPECT_EQ(recycle(), 0u);
}

// --- recycle ----------------------------------------------------------------

TEST_F(NestedContextTableTest, RecycleTakesTheOldestClearedContextFirst) {
  std::vector<NestedContext*> ctxs = load_keys(kNestedOversubRatio);
  table.clear(0, key(5));
  table.clear(0, key(2));
  table.clear(0, key(7));
  EXPECT_EQ(table.load(0, key(100)), ctxs[5]);
  EXPECT_EQ(table.load(0, key(101)), ctxs[2]);
  EXPECT_EQ(table.load(0, key(102)), ctxs[7]);
  EXPECT_EQ(table.load(0, key(103)), nullptr);  // nothing detached is left
  EXPECT_EQ(recycle(), 3u);
  EXPECT_EQ(ops.allocs, kNestedOversubRatio);
  table.check_invariants();
}

TEST_F(NestedContextTableTest, RecycledContextIsResetAndFindableOnlyUnderItsNewKey) {
  std::vector<NestedContext*> ctxs = load_keys(kNestedOversubRatio);
  table.clear(0, key(3));
  NestedContext* reset_ctx = nullptr;
  Gpa key_at_reset = kInvalidGpa;
  int holder_at_reset = NestedContext::kDetached;
  ops.on_reset = [&](NestedContext& ctx) {
    reset_ctx = &ctx;
    key_at_reset = ctx.key();
    holder_at_reset = ctx.vcpu_id();
  };

  NestedContext* ctx = table.load(0, key(100));
  EXPECT_EQ(ctx, ctxs[3]);
  EXPECT_EQ(ops.resets, 1);
  EXPECT_EQ(reset_ctx, ctx);
  EXPECT_EQ(key_at_reset, key(100));  // reset sees the new key, already attached
  EXPECT_EQ(holder_at_reset, 0);
  EXPECT_EQ(ctx->key(), key(100));
  EXPECT_EQ(table.find(key(3)), nullptr);
  EXPECT_EQ(table.find(key(100)), ctx);
  EXPECT_EQ(recycle(), 1u);
  EXPECT_EQ(reuse(), 0u);
  table.check_invariants();
}

// --- clear ------------------------------------------------------------------

TEST_F(NestedContextTableTest, ClearDetachesButKeepsTheContextFindable) {
  NestedContext* ctx = table.load(0, key(0));
  table.clear(0, key(0));
  EXPECT_FALSE(ctx->attached());
  EXPECT_EQ(ctx->vcpu_id(), NestedContext::kDetached);
  EXPECT_EQ(table.find(key(0)), ctx);
  EXPECT_EQ(table.detached_count(), 1u);
  EXPECT_EQ(table.attached_count(), 0u);
}

// clear ignores the holder, as the seed; release detaches only the holder's.
TEST_F(NestedContextTableTest, ClearReturnsTheHolderAndReleaseDetachesOnlyTheHolders) {
  NestedContext* ctx = table.load(1, key(0));
  table.release(0, key(0));  // vCPU 0 does not hold it
  EXPECT_EQ(ctx->vcpu_id(), 1);
  EXPECT_EQ(table.detached_count(), 0u);
  table.release(1, key(0));
  EXPECT_FALSE(ctx->attached());
  EXPECT_EQ(table.find(key(0)), ctx);
  table.load(1, key(0));
  EXPECT_EQ(table.clear(0, key(0)), 1) << "a VMCLEAR on vCPU 0 detaches vCPU 1's context and says so";
  EXPECT_EQ(table.clear(0, key(0)), NestedContext::kDetached);
  table.check_invariants();
}

TEST_F(NestedContextTableTest, ClearOfUnknownKeyIsANoOp) {
  table.clear(0, key(0));  // empty table
  table.load(0, key(1));
  table.clear(0, key(2));
  table.clear(0, kInvalidGpa);  // VMXOFF with no current vmcs12
  EXPECT_EQ(table.size(), 1u);
  EXPECT_EQ(table.attached_count(), 1u);
  EXPECT_EQ(table.detached_count(), 0u);
  table.check_invariants();
}

TEST_F(NestedContextTableTest, ClearOfDetachedContextNeitherRelinksNorRefreshesIt) {
  std::vector<NestedContext*> ctxs = load_keys(kNestedOversubRatio);
  for (int i = 0; i < kNestedOversubRatio; i++) table.clear(0, key(i));
  table.clear(0, key(0));  // already detached: must stay at the LRU head
  EXPECT_EQ(table.detached_count(), size_t(kNestedOversubRatio));
  table.check_invariants();
  EXPECT_EQ(table.load(0, key(100)), ctxs[0]);
}

TEST_F(NestedContextTableTest, ClearDoesNotCheckWhichVcpuHoldsTheContext) {
  online = 4;
  NestedContext* ctx = table.load(0, key(0));
  EXPECT_EQ(table.clear(3, key(0)), 0) << "clear names the vCPU it detached the context from";
  EXPECT_EQ(table.clear(3, key(0)), NestedContext::kDetached) << "nothing detached";
  EXPECT_FALSE(ctx->attached());
  EXPECT_EQ(table.detached_count(), 1u);
}

// --- another vCPU's context -----------------------------------------------

// L1 can make one vmcs12 current on two vCPUs: every build hands the context
// over, as the seed does, and counts it; a load by the vCPU that holds it is
// no handover.
TEST_F(NestedContextTableTest, LoadOfContextAttachedToAnotherVcpuHandsItOverAndCountsIt) {
  online = 2;
  NestedContext* ctx = table.load(0, key(0));
  EXPECT_EQ(table.load(0, key(0)), ctx);
  EXPECT_EQ(counters.get(Counter::nested_context_handovers), 0u);
  int taken_from = 7;
  EXPECT_EQ(table.load(1, key(0), &taken_from), ctx);
  EXPECT_EQ(taken_from, 0) << "the caller learns whose context it took";
  EXPECT_EQ(ctx->vcpu_id(), 1);
  EXPECT_EQ(table.load(1, key(0), &taken_from), ctx);
  EXPECT_EQ(taken_from, NestedContext::kDetached) << "no handover";
  EXPECT_EQ(reuse(), 3u);
  EXPECT_EQ(counters.get(Counter::nested_context_handovers), 1u);
  table.check_invariants();
}

// --- the lock and the vendor hooks ------------------------------------------
// The hooks call back into the table: under the table lock that would abort
// (lock-order checks) or deadlock, so these also prove they run unlocked.

TEST_F(NestedContextTableTest, KeyInsertedWhileAllocatingIsReusedAndTheSpareFreed) {
  online = 2;
  NestedContext* other = nullptr;
  ops.on_alloc = [&] {  // vCPU 1 loads and clears the same key meanwhile
    other = table.load(1, key(0));
    table.clear(1, key(0));
  };
  NestedContext* ctx = table.load(0, key(0));
  ASSERT_NE(other, nullptr);
  EXPECT_EQ(ctx, other);
  EXPECT_EQ(ctx->vcpu_id(), 0);
  EXPECT_EQ(ops.allocs, 2);
  EXPECT_EQ(ops.frees, 1);  // vCPU 0's unused allocation
  EXPECT_EQ(table.size(), 1u);
  EXPECT_EQ(reuse(), 1u);
  table.check_invariants();
}

TEST_F(NestedContextTableTest, TableFilledWhileAllocatingRecyclesAndFreesTheSpare) {
  std::vector<NestedContext*> ctxs = load_keys(kNestedOversubRatio - 1);
  NestedContext* last = nullptr;
  ops.on_alloc = [&] {  // the last free slot is taken, then its context cleared
    last = table.load(0, key(50));
    table.clear(0, key(50));
  };
  NestedContext* ctx = table.load(0, key(100));
  ASSERT_NE(last, nullptr);
  EXPECT_EQ(ctx, last);
  EXPECT_EQ(ctx->key(), key(100));
  EXPECT_EQ(table.find(key(50)), nullptr);
  EXPECT_EQ(ops.allocs, kNestedOversubRatio + 1);
  EXPECT_EQ(ops.frees, 1);
  EXPECT_EQ(ops.resets, 1);
  EXPECT_EQ(recycle(), 1u);
  EXPECT_EQ(table.size(), size_t(kNestedOversubRatio));
}

TEST_F(NestedContextTableTest, ResetAndContextDestructorsRunWithoutTheTableLock) {
  int probes = 0;
  ops.on_reset = [&](NestedContext&) { probes += table.size() > 0; };
  ops.on_free = [&] {
    (void)table.detached_count();
    probes++;
  };
  load_keys(kNestedOversubRatio);
  table.clear(0, key(0));
  table.load(0, key(100));  // recycle: reset
  table.destroy();          // eight destructors
  ops.on_free = nullptr;
  EXPECT_EQ(probes, 1 + kNestedOversubRatio);
}

// --- teardown and introspection -------------------------------------------

TEST_F(NestedContextTableTest, DestroyFreesAttachedAndDetachedContexts) {
  load_keys(kNestedOversubRatio);
  for (int i = 0; i < 4; i++) table.clear(0, key(i));
  table.load(0, key(100));  // one recycled
  ASSERT_EQ(ops.frees, 0);
  table.destroy();
  EXPECT_EQ(ops.frees, ops.allocs.load());
  EXPECT_EQ(table.size(), 0u);
  EXPECT_EQ(table.detached_count(), 0u);
  table.check_invariants();
}

TEST_F(NestedContextTableTest, DestroyedTableCanBeFilledAgain) {
  load_keys(kNestedOversubRatio);
  table.destroy();
  EXPECT_NE(table.load(0, key(0)), nullptr);
  EXPECT_EQ(table.size(), 1u);
}

TEST_F(NestedContextTableTest, DestructorFreesEveryContext) {
  CountingOps local_ops;
  {
    NestedContextTable local(local_ops, counters, [] { return 1; });
    for (int i = 0; i < 5; i++) local.load(0, key(i));
    local.clear(0, key(1));
  }
  EXPECT_EQ(local_ops.allocs, 5);
  EXPECT_EQ(local_ops.frees, 5);
}

TEST_F(NestedContextTableTest, FindDoesNotAttachOrCount) {
  NestedContext* ctx = table.load(0, key(0));
  table.clear(0, key(0));
  EXPECT_EQ(table.find(key(0)), ctx);
  EXPECT_FALSE(ctx->attached());
  EXPECT_EQ(table.detached_count(), 1u);
  EXPECT_EQ(reuse(), 0u);
}

TEST_F(NestedContextTableTest, ForEachContextVisitsEveryContextOnce) {
  load_keys(5);
  table.clear(0, key(2));
  std::multiset<Gpa> seen;
  int detached = 0;
  table.for_each_context([&](const NestedContext& ctx) {
    seen.insert(ctx.key());
    detached += !ctx.attached();
  });
  EXPECT_EQ(seen, (std::multiset<Gpa>{key(0), key(1), key(2), key(3), key(4)}));
  EXPECT_EQ(detached, 1);
}

// --- seed patch 10: l2-switch on the table alone ----------------------------
// One L1 vCPU (capacity 8), N L2 vCPUs each with its own vmcs12 (or eVMCS),
// S rounds. The L1 vCPU only loads when VMPTRLD changes the current pointer,
// and a load that returns null leaves it on the cache set it had.

enum class L2Mode { kMigrate, kSched, kEvmcs };
constexpr int kSwitches = 4;

struct SeedFormula {
  uint64_t reuse;
  uint64_t recycle;
};

// The seed's check_stats(), verbatim in arithmetic.
SeedFormula seed_formula(L2Mode mode, int n, int s) {
  const int cap = kNestedOversubRatio;
  if (n <= cap) return {uint64_t(n) * (s - 1), 0};
  if (mode == L2Mode::kSched) return {uint64_t(cap) * (s - 1), 0};
  return {0, uint64_t(n) * s - cap};
}

class NestedContextL2SwitchTest : public NestedContextTableTest,
                                  public ::testing::WithParamInterface<int> {
 protected:
  // What L1's VMPTRLD does to the table (set_current_vmptr).
  void vmptrld(Gpa vmptr) {
    if (vmptr == current_vmptr_) return;
    current_vmptr_ = vmptr;
    if (NestedContext* ctx = table.load(0, vmptr)) cache_set_ = ctx;
  }
  // VMCLEAR (handle_vmclear).
  void vmclear(Gpa vmptr) {
    if (vmptr == current_vmptr_) current_vmptr_ = kInvalidGpa;
    table.clear(0, vmptr);
  }
  // Enlightened VMPTRLD of a new eVMCS: clear the old one, load the new one.
  void evmcs_switch(Gpa evmcs) {
    if (evmcs == current_vmptr_) return;
    table.clear(0, current_vmptr_);
    current_vmptr_ = evmcs;
    if (NestedContext* ctx = table.load(0, evmcs)) cache_set_ = ctx;
  }

  Gpa current_vmptr_ = kInvalidGpa;
  NestedContext* cache_set_ = nullptr;  // patch 9's five cache pointers
};

TEST_P(NestedContextL2SwitchTest, MigrateModeMatchesTheSeedFormula) {
  const int n = GetParam();
  for (int round = 0; round < kSwitches; round++) {
    for (int j = 0; j < n; j++) {
      if (round == 0) vmclear(key(j));  // load_vmcs: VMCLEAR, then VMPTRLD
      vmptrld(key(j));
      ASSERT_NE(cache_set_, nullptr);
      ASSERT_EQ(cache_set_->key(), key(j));  // never null: something is detached
      vmclear(key(j));
    }
  }
  SeedFormula want = seed_formula(L2Mode::kMigrate, n, kSwitches);
  EXPECT_EQ(reuse(), want.reuse);
  EXPECT_EQ(recycle(), want.recycle);
  EXPECT_EQ(table.size(), size_t(std::min(n, kNestedOversubRatio)));
  table.check_invariants();
}

TEST_P(NestedContextL2SwitchTest, SchedModeMatchesTheSeedFormula) {
  const int n = GetParam();
  std::vector<NestedContext*> ctx_of(n, nullptr);
  for (int round = 0; round < kSwitches; round++) {
    for (int j = 0; j < n; j++) {
      if (round == 0) vmclear(key(j));
      vmptrld(key(j));
      ASSERT_NE(cache_set_, nullptr);
      if (j < kNestedOversubRatio) {
        ASSERT_EQ(cache_set_->key(), key(j));
        if (round == 0) ctx_of[j] = cache_set_;
        ASSERT_EQ(cache_set_, ctx_of[j]);
      } else {
        // The 9th and later L2s get null (nothing is ever detached) and run
        // on the cache set of the 8th: loads that count neither reuse nor recycle.
        ASSERT_EQ(table.find(key(j)), nullptr);
        ASSERT_EQ(cache_set_, ctx_of[kNestedOversubRatio - 1]);
      }
    }
  }
  SeedFormula want = seed_formula(L2Mode::kSched, n, kSwitches);
  EXPECT_EQ(reuse(), want.reuse);
  EXPECT_EQ(recycle(), want.recycle);

  for (int j = 0; j < n; j++) vmclear(key(j));  // the end of the test
  EXPECT_EQ(reuse(), want.reuse);
  EXPECT_EQ(recycle(), want.recycle);
  EXPECT_EQ(table.detached_count(), size_t(std::min(n, kNestedOversubRatio)));
  table.check_invariants();
}

TEST_P(NestedContextL2SwitchTest, EvmcsModeMatchesTheSeedFormula) {
  const int n = GetParam();
  for (int round = 0; round < kSwitches; round++) {
    for (int j = 0; j < n; j++) {
      evmcs_switch(key(j));
      ASSERT_NE(cache_set_, nullptr);
      ASSERT_EQ(cache_set_->key(), key(j));
    }
  }
  SeedFormula want = seed_formula(L2Mode::kEvmcs, n, kSwitches);
  EXPECT_EQ(reuse(), want.reuse);
  EXPECT_EQ(recycle(), want.recycle);
  table.check_invariants();
}

INSTANTIATE_TEST_SUITE_P(NestedContextSeedSweep, NestedContextL2SwitchTest, ::testing::Range(2, 17),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return "L2s" + std::to_string(info.param);
                         });

// --- threads ----------------------------------------------------------------

// Four vCPUs load and clear keys from one pool while vCPUs come online. A key
// is "current" on at most one vCPU at a time (the owner array), as L1 keeps a
// vmcs12 active on one processor; contexts carry plain fields that only their
// holder writes, so ThreadSanitizer reports any context lent to two vCPUs.
TEST_F(NestedContextTableTest, ConcurrentLoadsAndClearsKeepEveryInvariant) {
  constexpr int kVcpus = 4;
  constexpr int kKeys = 48;  // more than the final capacity (32): recycling
  constexpr size_t kMaxHeld = 3;
  constexpr auto kRunTime = std::chrono::seconds(1);

  std::array<std::atomic<int>, kKeys> owner;
  for (auto& o : owner) o.store(NestedContext::kDetached);
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> loads{0}, nulls{0}, violations{0};
  auto violation = [&](const char* what) {
    if (violations++ == 0) ADD_FAILURE() << what;
  };

  auto vcpu = [&](int id) {
    std::mt19937 rng(id);
    std::vector<int> held;  // keys loaded on this vCPU and not yet cleared
    auto release = [&](size_t i) {
      const int k = held[i];
      auto* ctx = static_cast<TestContext*>(table.find(key(k)));
      if (ctx == nullptr || ctx->vcpu_id() != id || ctx->holder != id) {
        violation("lost a held context");
      }
      table.clear(id, key(k));
      owner[k].store(NestedContext::kDetached, std::memory_order_release);
      held.erase(held.begin() + i);
    };
    while (!stop.load(std::memory_order_relaxed)) {
      if (held.empty() || (held.size() < kMaxHeld && rng() % 2 == 0)) {
        const int k = int(rng() % kKeys);
        int none = NestedContext::kDetached;
        if (!owner[k].compare_exchange_strong(none, id, std::memory_order_acquire)) continue;
        loads++;
        auto* ctx = static_cast<TestContext*>(table.load(id, key(k)));
        if (ctx == nullptr) {
          nulls++;
          owner[k].store(NestedContext::kDetached, std::memory_order_release);
          continue;
        }
        if (ctx->vcpu_id() != id || ctx->key() != key(k)) {
          violation("load returned a foreign context");
        }
        ctx->holder = id;  // the contents are ours until clear()
        ctx->uses++;
        held.push_back(k);
      } else {
        release(rng() % held.size());
      }
    }
    while (!held.empty()) release(held.size() - 1);
  };

  std::vector<std::thread> threads;
  for (int id = 0; id < kVcpus; id++) threads.emplace_back(vcpu, id);
  // Meanwhile: bring vCPUs online one by one and check the table as we go.
  const auto start = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - start < kRunTime) {
    const auto elapsed = std::chrono::steady_clock::now() - start;
    online = std::min(kVcpus, 1 + int(elapsed * kVcpus / kRunTime));
    table.check_invariants();
    if (table.size() > table.capacity()) violation("more contexts than capacity");
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  online = kVcpus;
  stop = true;
  for (auto& t : threads) t.join();

  RecordProperty("loads", std::to_string(loads));
  RecordProperty("reuse", std::to_string(reuse()));
  RecordProperty("recycle", std::to_string(recycle()));
  RecordProperty("nulls", std::to_string(nulls));
  EXPECT_EQ(violations, 0u);
  table.check_invariants();
  EXPECT_EQ(table.attached_count(), 0u);
  EXPECT_EQ(table.attached_count() + table.detached_count(), table.size());
  EXPECT_LE(table.size(), table.capacity());
  // Every load ended one way: reuse, recycle, a new context, or null.
  EXPECT_EQ(loads, reuse() + recycle() + table.size() + nulls);
  EXPECT_EQ(size_t(ops.allocs - ops.frees), table.size());  // spares were freed
  EXPECT_GT(reuse(), 0u);
  EXPECT_GT(recycle(), 0u);
  table.destroy();
  EXPECT_EQ(ops.frees, ops.allocs.load());
}

}  // namespace
}  // namespace nestcache::vmx
