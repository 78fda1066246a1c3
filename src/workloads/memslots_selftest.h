// The `memslots` selftest: the host and vm layers end to end, through their
// public API only, on the memory kind chosen with --memory.
//
//   1. Fill N memslots (--slots, 1..32,764, default 512), one page each at
//      every other gfn, and check that every gfn resolves to its page with
//      its data, and that the holes between slots and the gfn past the last
//      slot resolve to nothing (EFAULT).
//   2. Activate pfn caches on a few pages, migrate half of them and discard
//      the others (with one slot: migrate its page, then discard it in a
//      second pass): every cache must be invalidated by the MMU notifier, and
//      refresh must land on the new frame with the data intact (migrate) or
//      on a zero page (discard), with zero stale accesses.
//   3. Move a cached page's memslot: the cache fails its check by
//      generation, refresh reports the old gpa as unmapped, activation at
//      the new gpa finds the page.
//   4. Keep a HostMap across a migration of its page. Unmanaged memory: the
//      migration goes through and the stale access is detected (> 0, the
//      bug the seed fixes, reported as a note). Managed memory: the map's
//      pin makes the migration fail with EBUSY.
//   5. Check nothing leaked: no remap window, pin or active cache remains.
//
// The result's counters are PhysMem's, HostMm's and the Vm's, each event
// once (merge_run_counters). The test drives the vm layer directly, so
// --strategy does not change what it does.
#pragma once

#include "workloads/registry.h"

namespace nestcache::workloads {

inline constexpr int64_t kMemslotsDefaultSlots = 512;

// Runs the test (RunOptions::extra["slots"] overrides the slot count).
SelftestResult run_memslots_selftest(const RunOptions& opts);

// Registers `memslots`; called from register_all().
void register_memslots_selftest();

}  // namespace nestcache::workloads
