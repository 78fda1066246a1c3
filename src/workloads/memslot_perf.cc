// memslot_perf in nested mode: the L1 VMM (its vCPU thread and its host
// thread), the L2 guest code of each test, and the run (see memslot_perf.h).
#include "workloads/memslot_perf.h"

#include <algorithm>
#include <chrono>
#include <memory>

#include "guest/l1_vmm.h"
#include "guest/program.h"
#include "workloads/nested_env.h"
#include "workloads/stopwatch.h"

namespace nestcache::workloads {

namespace {

using namespace guest::program;

// Upstream's sizes (tools/testing/selftests/kvm/memslot_perf_test.c), in pages.
constexpr Gpa kMemGpa = 0x10000000;             // MEM_GPA: 256 MiB
constexpr uint64_t kExtraPages = 16;            // MEM_EXTRA_SIZE: 64 KiB, the sync page first
constexpr uint64_t kMapTestPages = 8192;        // MEM_TEST_MAP_SIZE: 32 MiB
constexpr uint64_t kUnmapTestPages = 32768;     // MEM_TEST_UNMAP_SIZE: 128 MiB
constexpr uint64_t kUnmapChunkPages = 512;      // MEM_TEST_UNMAP_CHUNK_SIZE: 2 MiB
constexpr uint64_t kDefaultTestPages = 131072;  // MEM_SIZE - MEM_EXTRA_SIZE: 512 MiB
constexpr uint64_t kMovePages = 48;             // MEM_TEST_MOVE_SIZE: 3 x 64 KiB
constexpr uint64_t kValue1 = guest::kMemslotValue1, kValue2 = guest::kMemslotValue2;

// L1 physical layout: the VMM's mailbox page and the host thread's VMXON
// region below L1's page allocator, the allocator (VMCS, vmcs12 pages,
// EPT12 tables), then the L2 memory's backing.
constexpr Gpa kVmmMailbox = 0x80000;
constexpr Gpa kHostVmxon = 0x81000;
constexpr Gpa kBackingBase = 0x2000000;  // 32 MiB

uint64_t even(double x) { return std::max<uint64_t>(4, static_cast<uint64_t>(x) / 2 * 2); }

guest::L1VmmLayout vmm_layout(const MemslotPerfConfig& c, const MemslotLayout& l) {
  return {.l2_base = kMemGpa,
          .pages = l.pages,
          .slots = l.data_slots,
          .pages_per_slot = l.pages_per_slot,
          .backing = kBackingBase,
          .pages_start = kL1PagesStart,
          .pages_end = kBackingBase,
          .mailbox = kVmmMailbox,
          .host_vmxon = kHostVmxon,
          .tick_ns = c.l1_hz ? 1'000'000'000ull / c.l1_hz : 0};
}

// Upstream's test, driving the L1 VMM: the host thread's loop and the L2
// guest code of each test.
class MemslotPerfDriver {
 public:
  MemslotPerfDriver(const MemslotPerfConfig& c, const MemslotLayout& l, NestedEnv& env, MemslotPerfRun& run)
      : c_(c), l_(l), env_(env), run_(run), vmm_(vmm_layout(c, l)) {}

  GuestTask vcpu_program() { return vmm_.run_vcpu(*env_.machine, l2_program()); }
  GuestTask host_program();
  uint64_t l2_failures() const { return l2_failures_.load(); }

 private:
  // --- the VMM's host thread: upstream's helpers ---
  GuestTask host_sync();
  GuestTask do_unmap(uint64_t test_page, uint64_t count);
  GuestTask check(uint64_t test_page, uint64_t expected);
  GuestTask iteration();
  GuestTask rw_iteration();
  CounterSnapshot snapshot() const;

  // L2: upstream's guest code, on this test's area.
  GuestTask l2_program();

  Gpa test_page_backing(uint64_t p) const { return vmm_.backing(kExtraPages + p); }

  const MemslotPerfConfig& c_;
  const MemslotLayout& l_;
  NestedEnv& env_;
  MemslotPerfRun& run_;
  guest::L1Vmm vmm_;
  std::atomic<uint64_t> l2_failures_{0};
};

// Upstream's host_perform_sync: raise the sync flag and wait until the
// guest takes it.
GuestTask MemslotPerfDriver::host_sync() {
  Gpa flag = vmm_.backing(0) + guest::kSyncFlag;
  co_await ops::write64(flag, 1);
  co_await guest::wait_until_eq(flag, 0);
}

// Upstream's test_memslot_do_unmap: one discard per slot the range crosses.
GuestTask MemslotPerfDriver::do_unmap(uint64_t test_page, uint64_t count) {
  uint64_t p = kExtraPages + test_page, end = p + count;
  while (p < end) {
    const guest::L2Slot& s = vmm_.slots()[vmm_.slot_of_page(p)];
    uint64_t n = std::min(end, s.first_page + s.pages) - p;
    co_await vmm_.discard(p, n);
    p += n;
  }
}

// Upstream's test_memslot_map_unmap_check (with -d): the guest's value, then 0.
GuestTask MemslotPerfDriver::check(uint64_t test_page, uint64_t expected) {
  if (!c_.verify) co_return;
  Gpa w = test_page_backing(test_page);
  uint64_t got = co_await ops::read64(w);
  if (got != expected && run_.failures.size() < 8)
    run_.failures.push_back(fmt::format("{}: page {} reads {:#x}, the guest wrote {:#x}", memslot_test_name(c_.test),
                                        test_page, got, expected));
  co_await ops::write64(w, 0);
}

GuestTask MemslotPerfDriver::rw_iteration() {
  const uint64_t n = l_.test_pages;
  for (uint64_t p = 0; p < n; p++) co_await ops::write64(test_page_backing(p) + kPageSize / 2, kValue2);
  co_await host_sync();
  for (uint64_t p = 0; p < n; p++) {
    Gpa w = test_page_backing(p);
    uint64_t got = co_await ops::read64(w);
    if (got != kValue1 && run_.failures.size() < 8)
      run_.failures.push_back(fmt::format("rw: page {} reads {:#x}, the guest wrote {:#x}", p, got, kValue1));
    co_await ops::write64(w, 0);
  }
  co_await host_sync();
}

GuestTask MemslotPerfDriver::iteration() {
  const uint64_t n = l_.test_pages, half = n / 2;
  switch (c_.test) {
    case MemslotTest::map:
      co_await do_unmap(half, half);
      co_await host_sync();
      co_await check(0, kValue1);
      co_await check(half - 1, kValue1);
      co_await do_unmap(0, half);
      co_await host_sync();
      co_await check(half, kValue2);
      co_await check(n - 1, kValue2);
      break;
    case MemslotTest::unmap:
    case MemslotTest::unmap_chunked: {
      uint64_t chunk = c_.test == MemslotTest::unmap ? 1 : std::min(kUnmapChunkPages, half);
      co_await host_sync();
      co_await check(0, kValue1);
      for (uint64_t p = 0; p < half; p += chunk) co_await do_unmap(p, chunk);
      co_await host_sync();
      co_await check(half, kValue2);
      for (uint64_t p = half; p < n; p += chunk) co_await do_unmap(p, chunk);
      break;
    }
    case MemslotTest::move_active:
    case MemslotTest::move_inactive: {
      uint32_t last = static_cast<uint32_t>(vmm_.slots().size() - 1);
      Gpa src = vmm_.slots()[last].base;
      co_await vmm_.move_slot(last, kMemGpa + l_.pages * kPageSize);
      co_await vmm_.move_slot(last, src);
      break;
    }
    case MemslotTest::rw:
      co_await rw_iteration();
      break;
  }
}

CounterSnapshot MemslotPerfDriver::snapshot() const {
  const guest::L1VmmCounts k = vmm_.counts();
  CounterSnapshot l1;
  l1[Counter::shootdowns] = k.shootdowns;
  l1[Counter::ept12_faults] = k.ept12_faults;
  CounterSnapshot others[] = {env_.machine->counters(), l1};
  return env_.run_counters(others);
}

GuestTask MemslotPerfDriver::host_program() {
  co_await vmm_.start_host();
  // Upstream's test_execute: iterate while the elapsed time is under the
  // limit; a started iteration finishes.
  const uint64_t limit_ns = static_cast<uint64_t>(c_.seconds * 1e9);
  uint64_t t0 = co_await ops::now();
  const Stopwatch watch;  // the loop in modelled time by part, and in wall time
  CounterSnapshot start = snapshot();
  uint64_t calls0 = vmm_.counts().discard_calls;
  co_await ops::write64(vmm_.backing(0) + guest::kSyncStartFlag, 1);
  // The move tests time moves under a guest that writes: wait for its first
  // write (see kSyncMovingFlag).
  if (c_.test == MemslotTest::move_active || c_.test == MemslotTest::move_inactive)
    co_await guest::wait_until_eq(vmm_.backing(0) + guest::kSyncMovingFlag, 1);
  for (uint64_t done = 0;; done++) {
    uint64_t now = co_await ops::now();
    if (c_.iterations ? done >= c_.iterations : now - t0 >= limit_ns) {
      run_.loop_seconds = static_cast<double>(now - t0) / 1e9;
      run_.loop_time = watch.elapsed();
      break;
    }
    co_await iteration();
    uint64_t end = co_await ops::now();
    // The cold iteration is timed from the loop's start, as its breakdown
    // (cold_time) and counters (cold) are: it takes in the start and, for
    // the move tests, the wait for the guest's first write, which the loop's
    // average counts too.
    run_.iteration_seconds.push_back(static_cast<double>(end - (done == 0 ? t0 : now)) / 1e9);
    if (done == 0) {
      run_.cold_time = watch.elapsed();
      run_.cold = snapshot() - start;
      run_.cold_discard_calls = vmm_.counts().discard_calls - calls0;
    }
    if (c_.on_iteration) c_.on_iteration(done + 1);
  }
  const guest::L1VmmCounts k = vmm_.counts();
  run_.counters = snapshot() - start;
  run_.discard_calls = k.discard_calls - calls0;
  run_.fault_retries = k.fault_retries;
  run_.flush_kicks = k.flush_kicks;
  run_.timer_ticks = k.timer_ticks;
  co_await ops::write64(vmm_.backing(0) + guest::kSyncExitFlag, 1);
}

GuestTask MemslotPerfDriver::l2_program() {
  // The move tests' area: 192 KiB ending where the last slot starts
  // (inactive) or half way into it (active).
  const guest::L2Slot& last = vmm_.slots().back();
  uint64_t back = c_.test == MemslotTest::move_active ? kMovePages / 2 : kMovePages;
  return guest::memslot_perf_guest({.test = c_.test,
                                    .sync_area = kMemGpa,
                                    .test_area = kMemGpa + kExtraPages * kPageSize,
                                    .test_pages = l_.test_pages,
                                    .move_area = kMemGpa + last.first_page * kPageSize - back * kPageSize,
                                    .move_pages = kMovePages},
                                   l2_failures_);
}

}  // namespace

std::string_view memslot_test_name(MemslotTest t) {
  switch (t) {
    case MemslotTest::map: return "map";
    case MemslotTest::unmap: return "unmap";
    case MemslotTest::unmap_chunked: return "unmap-chunked";
    case MemslotTest::move_active: return "move-active";
    case MemslotTest::move_inactive: return "move-inactive";
    case MemslotTest::rw: return "rw";
  }
  return "?";
}

Result<MemslotLayout> memslot_layout(const MemslotPerfConfig& c) {
  MemslotLayout l;
  switch (c.test) {
    case MemslotTest::map: l.test_pages = even(kMapTestPages * c.scale); break;
    case MemslotTest::unmap:
    case MemslotTest::unmap_chunked:
      l.test_pages = even(kUnmapTestPages * c.scale);
      // Upstream requires the area to be a multiple of two chunks.
      if (l.test_pages >= 2 * kUnmapChunkPages) l.test_pages = l.test_pages / (2 * kUnmapChunkPages) * 2 * kUnmapChunkPages;
      break;
    default: l.test_pages = std::max(2 * kMovePages, even(kDefaultTestPages * c.scale)); break;
  }
  l.pages = kExtraPages + l.test_pages;
  if (c.slots < kMinBenchSlots) return errorf(EINVAL, "--slots: at least {} are needed", kMinBenchSlots);
  l.data_slots = c.slots - 1;  // slot 0 is reserved, as upstream's
  if (l.pages / l.data_slots == 0) {
    // More slots than pages: upstream refuses ("decrease the cap"); we use
    // one page per slot and say so in the result.
    l.data_slots = static_cast<uint32_t>(l.pages);
    l.slots_capped = true;
  }
  l.pages_per_slot = l.pages / l.data_slots;
  const uint64_t last_pages = l.pages - (l.data_slots - 1) * l.pages_per_slot;
  if (c.test == MemslotTest::move_active && last_pages < kMovePages / 2) {
    // The last slot must hold the half of the area that moves: upstream
    // refuses ("decrease the cap"); we use fewer, larger slots, each able to
    // hold it, and say so in the result.
    l.data_slots = static_cast<uint32_t>(std::max<uint64_t>(1, l.pages / (kMovePages / 2)));
    l.pages_per_slot = l.pages / l.data_slots;
    l.slots_capped = true;
  }
  return l;
}

Result<MemslotPerfRun> run_memslot_perf(const MemslotPerfConfig& c) {
  MemslotPerfRun run;
  run.layout = NC_TRY(memslot_layout(c));
  NestedEnvConfig ec;
  ec.strategy = c.strategy;
  ec.memory = c.memory;
  ec.vcpus = 2;
  ec.l1_bytes = (kBackingBase + run.layout.pages * kPageSize + (2 << 20) - 1) & ~uint64_t{(2 << 20) - 1};
  take_run_model(ec, c);
  auto env = NC_TRY(NestedEnv::create(ec));
  MemslotPerfDriver perf(c, run.layout, *env, run);
  // The words the vCPUs hand-shake through: the VMM's mailbox, and the sync
  // page L2 and the host thread share (L2's first page).
  NC_TRY(env->machine->watch(kVmmMailbox, kPageSize));
  NC_TRY(env->machine->watch(kBackingBase, kPageSize));
  env->machine->set_l1_program(0, perf.vcpu_program());
  env->machine->set_l1_program(1, perf.host_program());
  const auto timeout = c.timeout.value_or(bench_watchdog(c.seconds, c.iterations, kMemslotIterationAllowance));
  if (auto st = env->machine->run(timeout); !st) return tl::unexpected(st.error());
  run.work = env->machine->work();
  run.windows = env->phys->counters().get(Counter::remap_windows) - env->extra_cache_windows;
  // Every stale access of the whole run, preparation included: none is harmless.
  run.counters[Counter::stale_accesses] = env->phys->counters().get(Counter::stale_accesses);
  if (uint64_t bad = perf.l2_failures())
    run.failures.push_back(fmt::format("rw: the guest read {} values the host did not write", bad));
  return run;
}

}  // namespace nestcache::workloads
