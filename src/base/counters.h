// Event counters with one snake_case name everywhere: code, JSON, tests, README.
//
// A CounterSet is a fixed array of relaxed atomics indexed by Counter. PhysMem,
// each Vm and each vCPU own one; reports sum or print them by name.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <optional>
#include <string_view>

#include <nlohmann/json_fwd.hpp>

namespace nestcache {

// X(name, description): the description documents the counter here (the
// README points at this list); code and output use the name.
#define NC_COUNTERS(X)                                                                      \
  X(remap_windows, "remap windows opened (mmap of an unmanaged frame)")                   \
  X(remap_windows_closed, "remap windows closed (munmap)")                                \
  X(remap_window_unmap_failures, "munmaps of remap windows that failed (the window stays open until one succeeds)") \
  X(pins, "frame pins taken")                                                             \
  X(unpins, "frame pins dropped")                                                         \
  X(migrations, "pages migrated to a new frame")                                          \
  X(migrate_ebusy, "migrations refused because the frame was pinned")                     \
  X(discards, "pages discarded (MADV_DONTNEED analogue)")                                 \
  X(stale_accesses, "accesses through a mapping whose frame no longer backs its gfn")     \
  X(notifier_invalidations, "MMU-notifier invalidate_range_start calls")                  \
  X(ept01_zaps, "EPT01 entries zapped")                                                   \
  X(maps, "HostMap maps")                                                                 \
  X(unmaps, "HostMap unmaps")                                                             \
  X(cache_activations, "pfn-cache activations")                                           \
  X(cache_refreshes, "pfn-cache refreshes that (re)mapped a frame")                       \
  X(cache_refresh_retries, "refreshes retried because an invalidation raced them")        \
  X(cache_refresh_waits, "times a refresh waited for an in-flight invalidation of its page") \
  X(cache_refresh_wait_ns, "nanoseconds refreshes spent waiting for in-flight invalidations") \
  X(cache_reader_waits, "invalidations that waited for lock-free pfn-cache readers")     \
  X(cache_reader_barriers, "waits for lock-free readers that interrupted the other CPUs (membarrier)") \
  X(cache_mappings_retired, "old lock-free pfn-cache mappings left for a batched wait for readers") \
  X(cache_retired_drains, "batched waits for the readers of retired pfn-cache mappings")  \
  X(cache_invalidations, "pfn caches marked invalid by the notifier")                     \
  X(requests, "vCPU requests made")                                                       \
  X(kicks, "vCPU kicks")                                                                  \
  X(guest_mode_waits, "times a requester waited for a vCPU to leave guest mode")         \
  X(nested_entries, "nested VM entries (VMLAUNCH/VMRESUME reaching L2)")                  \
  X(entry_cancels, "entries cancelled by the last check before hardware entry")           \
  X(reflected_exits, "L2 exits reflected to L1")                                          \
  X(l0_exits, "L2 exits handled by L0 alone")                                             \
  X(nested_round_trips, "reflected exits followed by the VMRESUME that resumes L2")       \
  X(l1_exits, "exits from L1 to L0 (VMX instructions, MSRs, IPIs, HLT, EPT01 misses)")   \
  X(internal_errors, "KVM internal errors on nested entry (an L1 page L0 cannot reach)")\
  X(mmio_exits, "guest accesses to addresses without a memslot (MMIO exits to the VMM)")\
  X(posted_interrupts_delivered, "interrupts delivered to L2 through the PI descriptor") \
  X(lost_tpr_writes, "L2 CR8 writes not visible in L1's virtual-APIC page")               \
  X(lost_posted_interrupts, "posted interrupts not delivered to L2")                      \
  X(shootdowns, "synchronous TLB-shootdown IPIs sent by L1")                              \
  X(ept12_faults, "EPT12 violations handled by L1")                                       \
  X(nested_context_reuse, "nested contexts found by key and attached")                    \
  X(nested_context_recycle, "detached nested contexts recycled under a new key")       \
  X(nested_context_handovers, "contexts loaded while attached to another vCPU (L1 made one vmcs12 current on two)") \
  X(evmcs_map_failures, "eVMCS locks that failed: #UD on VMLAUNCH/VMRESUME, or exit information not written back")

enum class Counter : int {
#define NC_COUNTER_ENUM(name, desc) name,
  NC_COUNTERS(NC_COUNTER_ENUM)
#undef NC_COUNTER_ENUM
      kCount
};

inline constexpr int kNumCounters = static_cast<int>(Counter::kCount);

std::string_view counter_name(Counter c);
std::optional<Counter> counter_from_name(std::string_view name);

class CounterSet {
 public:
  void add(Counter c, uint64_t n = 1) { v_[idx(c)].fetch_add(n, std::memory_order_relaxed); }
  uint64_t get(Counter c) const { return v_[idx(c)].load(std::memory_order_relaxed); }
  void reset() {
    for (auto& x : v_) x.store(0, std::memory_order_relaxed);
  }

 private:
  static int idx(Counter c) { return static_cast<int>(c); }
  std::array<std::atomic<uint64_t>, kNumCounters> v_{};
};

// A plain copy of counters, for reports and arithmetic.
struct CounterSnapshot {
  std::array<uint64_t, kNumCounters> v{};

  static CounterSnapshot of(const CounterSet& s);
  uint64_t operator[](Counter c) const { return v[static_cast<int>(c)]; }
  uint64_t& operator[](Counter c) { return v[static_cast<int>(c)]; }
  CounterSnapshot& operator+=(const CounterSnapshot& o);
  CounterSnapshot operator-(const CounterSnapshot& o) const;
  // {"remap_windows": 3, ...}: every counter, by name.
  nlohmann::json to_json() const;
};

}  // namespace nestcache
