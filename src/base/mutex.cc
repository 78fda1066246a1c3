// Run-time lock-order checking (see base/lock_order.h).
#include "base/mutex.h"

#include <cstdio>
#include <cstdlib>

namespace nestcache {

const char* lock_rank_name(LockRank rank) {
  switch (rank) {
    case LockRank::kNone: return "unranked";
    case LockRank::kVcpuRun: return "vcpu_run";
    case LockRank::kNestedContexts: return "nested_contexts";
    case LockRank::kSlots: return "slots_lock";
    case LockRank::kMmNotifiers: return "mm_notifiers";
    case LockRank::kMmu: return "mmu_lock";
    case LockRank::kCacheRefresh: return "cache_refresh";
    case LockRank::kCacheRegistry: return "cache_registry";
    case LockRank::kCacheRw: return "cache_rw";
    case LockRank::kHostMm: return "host_mm";
    case LockRank::kPhysMem: return "phys_mem";
    case LockRank::kMonitor: return "monitor";
    case LockRank::kLeaf: return "leaf";
  }
  return "?";
}

namespace lock_checks {

#ifdef NESTCACHE_LOCK_CHECKS
namespace {
struct Held {
  LockRank rank;
  const void* lock;
};
constexpr int kMaxHeld = 32;
thread_local Held held[kMaxHeld];
thread_local int nheld = 0;
}  // namespace

void acquire(LockRank rank, const void* lock) {
  if (rank == LockRank::kNone) return;
  for (int i = 0; i < nheld; i++) {
    if (held[i].rank >= rank) {
      std::fprintf(stderr, "nestcache: lock order violation: taking %s while holding %s\n",
                   lock_rank_name(rank), lock_rank_name(held[i].rank));
      std::abort();
    }
  }
  if (nheld == kMaxHeld) std::abort();
  held[nheld++] = {rank, lock};
}

void release(LockRank rank, const void* lock) {
  if (rank == LockRank::kNone) return;
  for (int i = nheld - 1; i >= 0; i--) {
    if (held[i].lock == lock) {
      for (int j = i; j + 1 < nheld; j++) held[j] = held[j + 1];
      nheld--;
      return;
    }
  }
  std::fprintf(stderr, "nestcache: releasing %s lock not held\n", lock_rank_name(rank));
  std::abort();
}

#else
void acquire(LockRank, const void*) {}
void release(LockRank, const void*) {}
#endif

}  // namespace lock_checks
}  // namespace nestcache
