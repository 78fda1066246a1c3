// memslot_perf in nested mode: the L1 VMM (its vCPU thread and its host
// thread), the L2 guest code of each test, and the run (see memslot_perf.h).
#include "workloads/memslot_perf.h"

#include <algorithm>
#include <atomic>
#include <memory>

#include "vmx/entry_checks.h"
#include "vmx/vmx_defs.h"
#include "workloads/nested_env.h"

namespace nestcache::workloads {

namespace {

namespace ops = cpu::ops;
using cpu::GuestFn;
using cpu::GuestOp;
using cpu::GuestTask;

// Upstream's sizes (tools/testing/selftests/kvm/memslot_perf_test.c), in pages.
constexpr Gpa kMemGpa = 0x10000000;             // MEM_GPA: 256 MiB
constexpr uint64_t kExtraPages = 16;            // MEM_EXTRA_SIZE: 64 KiB, the sync page first
constexpr uint64_t kMapTestPages = 8192;        // MEM_TEST_MAP_SIZE: 32 MiB
constexpr uint64_t kUnmapTestPages = 32768;     // MEM_TEST_UNMAP_SIZE: 128 MiB
constexpr uint64_t kUnmapChunkPages = 512;      // MEM_TEST_UNMAP_CHUNK_SIZE: 2 MiB
constexpr uint64_t kDefaultTestPages = 131072;  // MEM_SIZE - MEM_EXTRA_SIZE: 512 MiB
constexpr uint64_t kMovePages = 48;             // MEM_TEST_MOVE_SIZE: 3 x 64 KiB
constexpr uint64_t kValue1 = 0x1122334455667788;  // MEM_TEST_VAL_1
constexpr uint64_t kValue2 = 0x99aabbccddeeff00;  // MEM_TEST_VAL_2

// Words of the sync page (the first L2 page), as upstream's struct sync_area.
constexpr Gpa kStartFlag = 0, kExitFlag = 8, kSyncFlag = 16;

// L1 physical layout: a mailbox page below L1's page allocator, the
// allocator (VMCS, vmcs12 pages, EPT12 tables), then the L2 memory's backing.
constexpr Gpa kMailbox = 0x80000;
constexpr Gpa kShootReq = kMailbox + 0, kShootAck = kMailbox + 8, kFlushReq = kMailbox + 16,
              kFlushAck = kMailbox + 24, kReady = kMailbox + 32, kMmuLock = kMailbox + 64;
constexpr Gpa kVmxonRegion1 = 0x81000;  // L1 vCPU 1's VMXON region
constexpr Gpa kBackingBase = 0x2000000;  // 32 MiB

// Vectors as Linux x86 numbers them: local timer, call-function (the TLB
// shootdown), reschedule (KVM's kick), posted-interrupt notification.
constexpr uint8_t kTimerVector = 0xec, kShootdownVector = 0xfb, kFlushVector = 0xfd, kPiVector = 0xf2;

// Per-page state the VMM's kernel (L1) keeps.
constexpr uint8_t kPopulated = 1;  // present in the VMM's page tables
constexpr uint8_t kInEpt12 = 2;    // mapped for L2 in EPT12

enum Call : uint64_t { kCallDone = 1 };

uint64_t even(double x) { return std::max<uint64_t>(4, static_cast<uint64_t>(x) / 2 * 2); }

struct Slot {
  Gpa base;             // L2 gpa; changes only when the VMM moves the slot
  uint64_t first_page;  // index of its first page in the VMM's memory
  uint64_t pages;
};

// Everything the two L1 programs and the L2 program share. The VMM's
// bookkeeping lives in C++ objects (L1 kernel data); the words the vCPUs
// hand-shake through and the lock L1's notifier and fault handler take live
// in L1 memory, so they cost what guest memory costs.
class NestedMemslotPerf {
 public:
  NestedMemslotPerf(const MemslotPerfConfig& c, const MemslotLayout& l, NestedEnv& env, MemslotPerfRun& run)
      : c_(c), l_(l), env_(env), run_(run), state_(l.pages) {
    for (uint32_t s = 0; s < l.data_slots; s++) {
      uint64_t first = s * l.pages_per_slot;
      uint64_t n = s + 1 == l.data_slots ? l.pages - first : l.pages_per_slot;
      slots_.push_back({kMemGpa + first * kPageSize, first, n});
    }
    test_base_ = kMemGpa + kExtraPages * kPageSize;
  }

  GuestTask vcpu_program();
  GuestTask host_program();
  GuestTask l2_program();

  uint64_t l2_failures() const { return l2_failures_.load(); }

 private:
  // --- L1 kernel: memslots, notifier, EPT12 fault handler ---
  // The slot holding L2 gpa `g`, or -1 (an address without a memslot: MMIO).
  int find_slot(Gpa g) const;
  Gpa page_gpa(uint64_t page) const;
  Gpa backing(uint64_t page) const { return kBackingBase + page * kPageSize; }
  GuestTask lock();
  GuestTask unlock();
  GuestTask handle_ept_violation(Gpa g);
  GuestTask discard(uint64_t first_page, uint64_t pages);
  GuestTask move_slot(uint32_t slot, Gpa new_base);
  GuestTask zap_flush();
  GuestTask wait_ack(Gpa ack, uint64_t req);
  GuestTask tick();

  // --- the VMM's host thread: upstream's helpers ---
  GuestTask host_sync();
  GuestTask do_unmap(uint64_t test_page, uint64_t count);
  GuestTask check(uint64_t test_page, uint64_t expected);
  GuestTask iteration();
  CounterSnapshot snapshot() const;

  // --- L2 ---
  GuestFn<bool> guest_sync();

  const MemslotPerfConfig& c_;
  const MemslotLayout& l_;
  NestedEnv& env_;
  MemslotPerfRun& run_;
  Gpa test_base_ = 0;
  uint64_t eptp_ = 0;
  guest::Ept12* ept_ = nullptr;
  Gpa sink_ = 0;                  // where L1 completes L2's writes to an address without a memslot
  std::vector<Gpa> sink_mapped_;  // under the L1 lock

  // Under the L1 lock (kMmuLock) when changed; read by the fault handler.
  std::vector<Slot> slots_;
  std::vector<std::atomic<uint8_t>> state_;
  // KVM's mmu_invalidate_seq / _in_progress / _range: a fault that snapshots
  // the sequence and then finds it moved, or finds its page inside a running
  // invalidation, retries.
  std::atomic<uint64_t> seq_{0};
  std::atomic<uint64_t> in_progress_{0};
  std::atomic<uint64_t> range_start_{0}, range_end_{0};

  std::atomic<uint64_t> shootdowns_{0}, ept12_faults_{0}, fault_retries_{0}, flush_kicks_{0}, timer_ticks_{0},
      discard_calls_{0}, mmio_{0}, l2_failures_{0};
  uint64_t next_tick_ = 0;
  uint64_t tick_ns_ = 0;
};

int NestedMemslotPerf::find_slot(Gpa g) const {
  for (int lo = 0, hi = static_cast<int>(slots_.size()) - 1; lo <= hi;) {
    // Sorted by base: the move tests move the last slot above all others.
    int mid = (lo + hi) / 2;
    const Slot& s = slots_[mid];
    if (g < s.base) hi = mid - 1;
    else if (g >= s.base + s.pages * kPageSize) lo = mid + 1;
    else return mid;
  }
  return -1;
}

Gpa NestedMemslotPerf::page_gpa(uint64_t page) const {
  uint64_t s = std::min<uint64_t>(page / l_.pages_per_slot, slots_.size() - 1);
  return slots_[s].base + (page - slots_[s].first_page) * kPageSize;
}

GuestTask NestedMemslotPerf::lock() {
  for (;;) {
    uint64_t old = co_await ops::cmpxchg64(kMmuLock, 0, 1);
    if (old == 0) co_return;
    co_await ops::pause();
  }
}

GuestTask NestedMemslotPerf::unlock() { co_await ops::cmpxchg64(kMmuLock, 1, 0); }

// L1's EPT-violation handler for the L2 vCPU (KVM's direct_page_fault).
GuestTask NestedMemslotPerf::handle_ept_violation(Gpa g) {
  ept12_faults_++;
  uint64_t seq = seq_.load();
  co_await lock();  // slots_ changes under it (a move)
  int s = find_slot(g);
  uint64_t page = s < 0 ? 0 : slots_[s].first_page + (g - slots_[s].base) / kPageSize;
  co_await unlock();
  if (s < 0) {
    // No memslot: KVM reports MMIO to the VMM, which completes the write.
    // Modelled by backing the address with a sink page until the slot
    // returns (the move tests zap it then).
    mmio_++;
    co_await lock();
    if (seq_.load() == seq && !in_progress_.load()) {
      co_await ept_->map(g & kPageMask, sink_);
      sink_mapped_.push_back(g & kPageMask);
    }
    co_await unlock();
    co_return;
  }
  if (!(state_[page].load() & kPopulated)) {
    // The VMM's own mapping is gone (discarded): get_user_pages allocates a
    // page and clears it.
    for (Gpa off = 0; off < kPageSize; off += 8) co_await ops::write64(backing(page) + off, 0);
    state_[page].fetch_or(kPopulated);
  }
  co_await lock();
  bool raced = seq_.load() != seq ||
               (in_progress_.load() && page >= range_start_.load() && page < range_end_.load());
  if (raced) {
    // mmu_invalidate_retry: resume L2, which faults again.
    fault_retries_++;
  } else {
    co_await ept_->map(g & kPageMask, backing(page));
    state_[page].fetch_or(kInEpt12);
  }
  co_await unlock();
}

GuestTask NestedMemslotPerf::wait_ack(Gpa ack, uint64_t req) {
  // (GCC 12 miscompiles a co_await inside a while condition: locals instead.)
  for (;;) {
    uint64_t got = co_await ops::read64(ack);
    if (got >= req) co_return;
    co_await tick();
  }
}

// After EPT12 entries were zapped: INVEPT here, and a waiting flush kick to
// the vCPU running L2 (KVM's kvm_flush_remote_tlbs), whose L1 runs INVEPT.
GuestTask NestedMemslotPerf::zap_flush() {
  co_await guest::vmx_ok(GuestOp{GuestOp::Invept{vmx::InveptType::single_context, eptp_}}, "INVEPT");
  uint64_t req = co_await ops::read64(kFlushReq) + 1;
  co_await ops::write64(kFlushReq, req);
  flush_kicks_++;
  co_await ops::send_ipi(0, kFlushVector);
  co_await wait_ack(kFlushAck, req);
}

// MADV_DONTNEED of the VMM's pages [first, first + pages): one call.
GuestTask NestedMemslotPerf::discard(uint64_t first, uint64_t pages) {
  discard_calls_++;
  // mmu_notifier invalidate_range_start: KVM marks the range, zaps EPT12.
  co_await lock();
  range_start_.store(first);
  range_end_.store(first + pages);
  in_progress_.fetch_add(1);
  bool populated = false, zapped = false;
  for (uint64_t p = first; p < first + pages; p++) {
    uint8_t old = state_[p].exchange(0);
    populated |= (old & kPopulated) != 0;
    if (old & kInEpt12) {
      co_await ept_->unmap(page_gpa(p));
      zapped = true;
    }
  }
  co_await unlock();
  if (zapped) co_await zap_flush();
  // The VMM's page tables lose the pages: if any was present, one
  // synchronous TLB-shootdown IPI to every CPU with the VMM's mm loaded —
  // the one running L2 — and the host thread waits for its ack.
  if (populated) {
    uint64_t req = co_await ops::read64(kShootReq) + 1;
    co_await ops::write64(kShootReq, req);
    shootdowns_++;
    co_await ops::send_ipi(0, kShootdownVector);
    co_await wait_ack(kShootAck, req);
  }
  // invalidate_range_end.
  seq_.fetch_add(1);
  in_progress_.fetch_sub(1);
}

// KVM_SET_USER_MEMORY_REGION moving `slot`: zap what EPT12 maps of it (and
// of the MMIO sink), flush, publish the new base.
GuestTask NestedMemslotPerf::move_slot(uint32_t slot, Gpa new_base) {
  co_await lock();
  Slot& s = slots_[slot];
  range_start_.store(s.first_page);
  range_end_.store(s.first_page + s.pages);
  in_progress_.fetch_add(1);
  bool zapped = false;
  for (uint64_t p = s.first_page; p < s.first_page + s.pages; p++) {
    if (state_[p].fetch_and(static_cast<uint8_t>(~kInEpt12)) & kInEpt12) {
      co_await ept_->unmap(page_gpa(p));
      zapped = true;
    }
  }
  for (Gpa g : sink_mapped_) co_await ept_->unmap(g);
  zapped |= !sink_mapped_.empty();
  sink_mapped_.clear();
  s.base = new_base;
  co_await unlock();
  if (zapped) co_await zap_flush();
  seq_.fetch_add(1);
  in_progress_.fetch_sub(1);
}

GuestTask NestedMemslotPerf::tick() {
  if (!tick_ns_) co_return;
  uint64_t now = co_await ops::now();
  if (now < next_tick_) co_return;
  next_tick_ = now + tick_ns_;
  timer_ticks_++;
  co_await ops::send_ipi(0, kTimerVector);
}

// --- L1 vCPU 0: L1 KVM running the L2 vCPU -------------------------------------------------

GuestTask NestedMemslotPerf::vcpu_program() {
  guest::L1Pages pages(kL1PagesStart, kBackingBase);
  co_await guest::enter_vmx(pages);
  Gpa vmcs = pages.alloc();
  co_await guest::init_region(vmcs);
  co_await guest::vmx_ok(GuestOp{GuestOp::Vmclear{vmcs}}, "VMCLEAR");
  co_await guest::vmx_ok(GuestOp{GuestOp::Vmptrld{vmcs}}, "VMPTRLD");
  guest::Ept12 ept(pages);
  ept_ = &ept;
  eptp_ = ept.eptp();
  sink_ = pages.alloc();
  // EPT12's intermediate tables for the whole area, built now so that the
  // fault handler and the notifier never allocate (leaves stay empty: L2
  // pages enter EPT12 only through faults, as with upstream's fresh VM).
  for (uint64_t p = 0; p < l_.pages; p += 512) {
    co_await ept.map(page_gpa(p), backing(p));
    co_await ept.unmap(page_gpa(p));
  }
  // The vmcs12 L1 KVM gives an L2 vCPU: EPT, MSR bitmap, TPR shadow,
  // APIC-access virtualization, posted interrupts: the pages L0 gets on
  // every nested entry through its page strategy.
  Gpa msr_bitmap = pages.alloc(), apic_access = pages.alloc(), vapic = pages.alloc(), pi_desc = pages.alloc();
  vmx::Vmcs12 v = vmx::minimal_vmcs12();
  v.pin_based_controls |= vmx::pin::kPostedInterrupts | vmx::pin::kExternalInterruptExiting;
  v.primary_proc_controls |=
      vmx::proc::kActivateSecondaryControls | vmx::proc::kUseTprShadow | vmx::proc::kUseMsrBitmaps;
  v.secondary_proc_controls |=
      vmx::proc2::kEnableEpt | vmx::proc2::kVirtualizeApicAccesses | vmx::proc2::kVirtualInterruptDelivery;
  v.exit_controls |= vmx::exit_ctl::kAckInterruptOnExit;
  v.ept_pointer = eptp_;
  v.msr_bitmap = msr_bitmap;
  v.apic_access_addr = apic_access;
  v.virtual_apic_page_addr = vapic;
  v.posted_intr_desc_addr = pi_desc;
  v.posted_intr_notification_vector = kPiVector;
  co_await guest::write_vmcs(v);
  env_.machine->bind_l2_program(vmcs, l2_program());
  // Published with a locked instruction: the host thread reads ept_, eptp_
  // and sink_ after it sees the flag.
  co_await ops::cmpxchg64(kReady, 0, 1);

  cpu::OpResult r = co_await ops::vmlaunch();
  for (;;) {
    if (!r.ok()) throw guest::VmxError("nested entry failed: " + cpu::to_string(r));
    auto reason = static_cast<vmx::ExitReason>(co_await guest::exit_reason() & 0xffff);
    if (reason == vmx::ExitReason::kEptViolation) {
      Gpa g = co_await guest::vmread(vmx::field::kGuestPhysicalAddress);
      co_await handle_ept_violation(g);
    } else if (reason == vmx::ExitReason::kExternalInterrupt) {
      auto vector = static_cast<uint8_t>(co_await guest::vmread(vmx::field::kExitInterruptionInfo));
      if (vector == kShootdownVector) {
        // flush_tlb_func: this CPU's TLB holds nothing of the VMM's that
        // the model keeps; the ack is what the sender waits for.
        uint64_t req = co_await ops::read64(kShootReq);
        co_await ops::write64(kShootAck, req);
      } else if (vector == kFlushVector) {
        co_await guest::vmx_ok(GuestOp{GuestOp::Invept{vmx::InveptType::single_context, eptp_}}, "INVEPT");
        uint64_t req = co_await ops::read64(kFlushReq);
        co_await ops::write64(kFlushAck, req);
      } else if (vector != kTimerVector) {
        throw guest::VmxError(fmt::format("unexpected interrupt vector {:#x}", vector));
      }
    } else if (reason == vmx::ExitReason::kVmcall) {
      break;
    } else {
      throw guest::VmxError(fmt::format("unexpected L2 exit: {}", vmx::exit_reason_name(reason)));
    }
    r = co_await ops::vmresume();
  }
}

// --- L1 vCPU 1: the VMM's host thread ------------------------------------------------------

GuestTask NestedMemslotPerf::host_sync() {
  Gpa flag = backing(0) + kSyncFlag;
  co_await ops::write64(flag, 1);
  for (;;) {
    uint64_t v = co_await ops::read64(flag);
    if (v == 0) co_return;
    co_await tick();
  }
}

// Upstream's test_memslot_do_unmap: one discard per slot the range crosses.
GuestTask NestedMemslotPerf::do_unmap(uint64_t test_page, uint64_t count) {
  uint64_t p = kExtraPages + test_page, end = p + count;
  while (p < end) {
    uint64_t s = std::min<uint64_t>(p / l_.pages_per_slot, slots_.size() - 1);
    uint64_t n = std::min(end, slots_[s].first_page + slots_[s].pages) - p;
    co_await discard(p, n);
    co_await tick();
    p += n;
  }
}

// Upstream's test_memslot_map_unmap_check (with -d): the guest's value, then 0.
GuestTask NestedMemslotPerf::check(uint64_t test_page, uint64_t expected) {
  if (!c_.verify) co_return;
  Gpa w = backing(kExtraPages + test_page);
  uint64_t got = co_await ops::read64(w);
  if (got != expected && run_.failures.size() < 8)
    run_.failures.push_back(fmt::format("{}: page {} reads {:#x}, the guest wrote {:#x}", memslot_test_name(c_.test),
                                        test_page, got, expected));
  co_await ops::write64(w, 0);
}

GuestTask NestedMemslotPerf::iteration() {
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
      uint32_t last = static_cast<uint32_t>(slots_.size() - 1);
      Gpa src = slots_[last].base;
      co_await move_slot(last, kMemGpa + l_.pages * kPageSize);
      co_await tick();
      co_await move_slot(last, src);
      co_await tick();
      break;
    }
    case MemslotTest::rw:
      for (uint64_t p = 0; p < n; p++) co_await ops::write64(backing(kExtraPages + p) + kPageSize / 2, kValue2);
      co_await host_sync();
      for (uint64_t p = 0; p < n; p++) {
        Gpa w = backing(kExtraPages + p);
        uint64_t got = co_await ops::read64(w);
        if (got != kValue1 && run_.failures.size() < 8)
          run_.failures.push_back(fmt::format("rw: page {} reads {:#x}, the guest wrote {:#x}", p, got, kValue1));
        co_await ops::write64(w, 0);
      }
      co_await host_sync();
      break;
  }
}

CounterSnapshot NestedMemslotPerf::snapshot() const {
  CounterSnapshot l1;
  l1[Counter::shootdowns] = shootdowns_.load();
  l1[Counter::ept12_faults] = ept12_faults_.load();
  CounterSnapshot others[] = {env_.machine->counters(), l1};
  return merge_run_counters(CounterSnapshot::of(env_.phys->counters()), others);
}

GuestTask NestedMemslotPerf::host_program() {
  // KVM enables VMX on every CPU at load: this one runs INVEPT in the notifier.
  guest::L1Pages own(kVmxonRegion1, kVmxonRegion1 + kPageSize);
  co_await guest::enter_vmx(own);
  // Preparation: the VMM writes every page (upstream's memset), so every
  // page starts populated in L1.
  for (uint64_t p = 0; p < l_.pages; p++) {
    co_await ops::write64(backing(p), 0);
    state_[p].fetch_or(kPopulated);
  }
  for (;;) {
    uint64_t ready = co_await ops::cmpxchg64(kReady, 1, 1);
    if (ready == 1) break;
    co_await ops::pause();
  }
  tick_ns_ = c_.l1_hz ? 1'000'000'000ull / c_.l1_hz : 0;

  // Upstream's test_execute: iterate while the elapsed time is under the
  // limit; a started iteration finishes.
  const uint64_t limit_ns = static_cast<uint64_t>(c_.seconds * 1e9);
  uint64_t t0 = co_await ops::now();
  next_tick_ = t0 + tick_ns_;
  CounterSnapshot start = snapshot();
  uint64_t calls0 = discard_calls_.load();
  co_await ops::write64(backing(0) + kStartFlag, 1);
  for (uint64_t done = 0;; done++) {
    uint64_t now = co_await ops::now();
    if (c_.iterations ? done >= c_.iterations : now - t0 >= limit_ns) {
      run_.loop_seconds = static_cast<double>(now - t0) / 1e9;
      break;
    }
    co_await iteration();
    uint64_t end = co_await ops::now();
    run_.iteration_seconds.push_back(static_cast<double>(end - now) / 1e9);
    if (done == 0) {
      run_.cold = snapshot() - start;
      run_.cold_discard_calls = discard_calls_.load() - calls0;
    }
    if (c_.on_iteration) c_.on_iteration(done + 1);
  }
  run_.counters = snapshot() - start;
  run_.discard_calls = discard_calls_.load() - calls0;
  run_.fault_retries = fault_retries_.load();
  run_.flush_kicks = flush_kicks_.load();
  run_.timer_ticks = timer_ticks_.load();
  co_await ops::write64(backing(0) + kExitFlag, 1);
}

// --- L2: upstream's guest code ---------------------------------------------------------------

// guest_perform_sync: a locked compare-exchange loop, no PAUSE: no exits.
GuestFn<bool> NestedMemslotPerf::guest_sync() {
  for (;;) {
    uint64_t exit = co_await ops::read64(kMemGpa + kExitFlag);
    if (exit) co_return false;
    uint64_t old = co_await ops::cmpxchg64(kMemGpa + kSyncFlag, 1, 0);
    if (old == 1) co_return true;
  }
}

GuestTask NestedMemslotPerf::l2_program() {
  const uint64_t n = l_.test_pages, half = n / 2;
  const Gpa base = test_base_;
  for (;;) {
    uint64_t start = co_await ops::read64(kMemGpa + kStartFlag);
    if (start) break;
  }
  switch (c_.test) {
    case MemslotTest::map:
      for (;;) {
        for (uint64_t p = 0; p < half; p++) co_await ops::write64(base + p * kPageSize, kValue1);
        if (bool go = co_await guest_sync(); !go) break;
        for (uint64_t p = half; p < n; p++) co_await ops::write64(base + p * kPageSize, kValue2);
        if (bool go = co_await guest_sync(); !go) break;
      }
      break;
    case MemslotTest::unmap:
    case MemslotTest::unmap_chunked:
      for (;;) {
        co_await ops::write64(base, kValue1);
        if (bool go = co_await guest_sync(); !go) break;
        co_await ops::write64(base + half * kPageSize, kValue2);
        if (bool go = co_await guest_sync(); !go) break;
      }
      break;
    case MemslotTest::move_active:
    case MemslotTest::move_inactive: {
      const Slot& last = slots_.back();
      uint64_t back = c_.test == MemslotTest::move_active ? kMovePages / 2 : kMovePages;
      Gpa area = kMemGpa + last.first_page * kPageSize - back * kPageSize;
      for (;;) {
        uint64_t exit = co_await ops::read64(kMemGpa + kExitFlag);
        if (exit) break;
        for (uint64_t p = 0; p < kMovePages; p++) co_await ops::write64(area + p * kPageSize, kValue1);
      }
      break;
    }
    case MemslotTest::rw:
      for (;;) {
        for (uint64_t p = 0; p < n; p++) co_await ops::write64(base + p * kPageSize, kValue1);
        if (bool go = co_await guest_sync(); !go) break;
        for (uint64_t p = 0; p < n; p++) {
          Gpa w = base + p * kPageSize + kPageSize / 2;
          uint64_t got = co_await ops::read64(w);
          if (got != kValue2) l2_failures_++;
          co_await ops::write64(w, 0);
        }
        if (bool go = co_await guest_sync(); !go) break;
      }
      break;
  }
  for (;;) co_await ops::vmcall(kCallDone);
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
  uint64_t last_pages = l.pages - (l.data_slots - 1) * l.pages_per_slot;
  if (c.test == MemslotTest::move_active && last_pages < kMovePages / 2)
    return errorf(EINVAL, "move-active: the last slot has {} pages, the moved half of the area needs {}", last_pages,
                  kMovePages / 2);
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
  ec.exit_cost_ns = c.exit_cost_ns;
  auto env = NC_TRY(NestedEnv::create(ec));
  NestedMemslotPerf perf(c, run.layout, *env, run);
  env->machine->set_l1_program(0, perf.vcpu_program());
  env->machine->set_l1_program(1, perf.host_program());
  if (auto st = env->machine->run(c.timeout); !st) return tl::unexpected(st.error());
  // Every stale access of the whole run, preparation included: none is harmless.
  run.counters[Counter::stale_accesses] = env->phys->counters().get(Counter::stale_accesses);
  if (uint64_t bad = perf.l2_failures())
    run.failures.push_back(fmt::format("rw: the guest read {} values the host did not write", bad));
  return run;
}

}  // namespace nestcache::workloads
