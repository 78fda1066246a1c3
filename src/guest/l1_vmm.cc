// The L1 VMM: its vCPU thread, its MMU notifier and fault handler, and the
// kicks between its two vCPUs (see l1_vmm.h).
#include "guest/l1_vmm.h"

#include <algorithm>

#include <fmt/format.h>

#include "guest/apic_timer.h"
#include "guest/l2_run.h"
#include "guest/posted_interrupts.h"
#include "guest/vmcs12_pages.h"
#include "guest/vmx.h"

namespace nestcache::guest {

namespace ops = cpu::ops;
using cpu::GuestFn;
using cpu::GuestTask;

namespace {

// The hand-shake words in the mailbox page: a request count and its ack for
// each kick, the ready word run_vcpu publishes, and the MMU lock.
constexpr Gpa kShootReq = 0, kShootAck = 8, kFlushReq = 16, kFlushAck = 24, kReady = 32, kMmuLock = 64;

// Per-page state the VMM's kernel (L1) keeps.
constexpr uint8_t kPopulated = 1;  // present in the VMM's page tables
constexpr uint8_t kInEpt12 = 2;    // mapped for L2 in EPT12

constexpr uint64_t kPagesPerTable = vmx::ept::kEntriesPerTable;

}  // namespace

L1Vmm::L1Vmm(const L1VmmLayout& layout)
    : layout_(layout), mmu_lock_(layout.mailbox + kMmuLock), state_(layout.pages) {
  for (uint32_t s = 0; s < layout.slots; s++) {
    uint64_t first = s * layout.pages_per_slot;
    uint64_t n = s + 1 == layout.slots ? layout.pages - first : layout.pages_per_slot;
    slots_.push_back({layout.l2_base + first * kPageSize, first, n});
  }
}

int L1Vmm::find_slot(Gpa g) const {
  for (int lo = 0, hi = static_cast<int>(slots_.size()) - 1; lo <= hi;) {
    // Sorted by base: the benchmarks move the last slot above all others.
    int mid = (lo + hi) / 2;
    const L2Slot& s = slots_[mid];
    if (g < s.base) hi = mid - 1;
    else if (g >= s.base + s.pages * kPageSize) lo = mid + 1;
    else return mid;
  }
  return -1;
}

uint32_t L1Vmm::slot_of_page(uint64_t page) const {
  return static_cast<uint32_t>(std::min<uint64_t>(page / layout_.pages_per_slot, slots_.size() - 1));
}

Gpa L1Vmm::page_gpa(uint64_t page) const {
  const L2Slot& s = slots_[slot_of_page(page)];
  return s.base + (page - s.first_page) * kPageSize;
}

L1VmmCounts L1Vmm::counts() const {
  return {shootdowns_.load(),  ept12_faults_.load(), fault_retries_.load(), flush_kicks_.load(),
          timer_ticks_.load(), discard_calls_.load(), mmio_.load()};
}

// --- the fault handler --------------------------------------------------------

GuestTask L1Vmm::map_mmio(Gpa g, uint64_t seq) {
  // No memslot: KVM reports MMIO to the VMM, which completes the write.
  // Modelled by backing the address with a sink page until the slot
  // returns (a move zaps it then).
  mmio_++;
  co_await mmu_lock_.lock();
  if (seq_.load() == seq && !in_progress_.load()) {
    co_await ept_->map(g & kPageMask, sink_);
    sink_mapped_.push_back(g & kPageMask);
  }
  co_await mmu_lock_.unlock();
}

GuestTask L1Vmm::handle_ept_violation(Gpa g) {
  ept12_faults_++;
  uint64_t seq = seq_.load();
  co_await mmu_lock_.lock();  // slots_ changes under it (a move)
  int s = find_slot(g);
  uint64_t page = s < 0 ? 0 : slots_[s].first_page + (g - slots_[s].base) / kPageSize;
  co_await mmu_lock_.unlock();
  if (s < 0) {
    co_await map_mmio(g, seq);
    co_return;
  }
  if (!(state_[page].load() & kPopulated)) {
    // The VMM's own mapping is gone (discarded): get_user_pages allocates a
    // page and clears it.
    for (Gpa off = 0; off < kPageSize; off += 8) co_await ops::write64(backing(page) + off, 0);
    state_[page].fetch_or(kPopulated);
  }
  co_await mmu_lock_.lock();
  bool raced = seq_.load() != seq ||
               (in_progress_.load() && page >= range_start_.load() && page < range_end_.load());
  if (raced) {
    // mmu_invalidate_retry: resume L2, which faults again.
    fault_retries_++;
  } else {
    co_await ept_->map(g & kPageMask, backing(page));
    state_[page].fetch_or(kInEpt12);
  }
  co_await mmu_lock_.unlock();
}

// --- kicks between the two vCPUs ------------------------------------------------

GuestTask L1Vmm::kick_and_wait(Gpa request, Gpa ack, uint8_t vector) {
  uint64_t req = co_await ops::read64(request) + 1;
  co_await ops::write64(request, req);
  co_await ops::send_ipi(0, vector);
  co_await wait_until_at_least(ack, req);
}

// After EPT12 entries were zapped: INVEPT here, and a waiting flush kick to
// the vCPU running L2 (KVM's kvm_flush_remote_tlbs), whose L1 runs INVEPT.
GuestTask L1Vmm::zap_flush() {
  co_await invept(vmx::InveptType::single_context, eptp_);
  flush_kicks_++;
  co_await kick_and_wait(layout_.mailbox + kFlushReq, layout_.mailbox + kFlushAck, kFlushVector);
}

// The VMM's page tables lost a present page: one synchronous TLB-shootdown
// IPI to every CPU with the VMM's mm loaded — the one running L2 — and the
// host thread waits for its ack.
GuestTask L1Vmm::shootdown() {
  shootdowns_++;
  co_await kick_and_wait(layout_.mailbox + kShootReq, layout_.mailbox + kShootAck, kShootdownVector);
}

// --- the host thread ------------------------------------------------------------

void L1Vmm::begin_invalidation(uint64_t first, uint64_t count) {
  range_start_.store(first);
  range_end_.store(first + count);
  in_progress_.fetch_add(1);
}

void L1Vmm::end_invalidation() {
  seq_.fetch_add(1);
  in_progress_.fetch_sub(1);
}

GuestTask L1Vmm::discard(uint64_t first, uint64_t count) {
  discard_calls_++;
  // mmu_notifier invalidate_range_start: KVM marks the range, zaps EPT12.
  co_await mmu_lock_.lock();
  begin_invalidation(first, count);
  bool populated = false, zapped = false;
  for (uint64_t p = first; p < first + count; p++) {
    uint8_t old = state_[p].exchange(0);
    populated |= (old & kPopulated) != 0;
    if (old & kInEpt12) {
      co_await ept_->unmap(page_gpa(p));
      zapped = true;
    }
  }
  co_await mmu_lock_.unlock();
  if (zapped) co_await zap_flush();
  if (populated) co_await shootdown();
  end_invalidation();  // invalidate_range_end
}

GuestTask L1Vmm::move_slot(uint32_t slot, Gpa base) {
  co_await mmu_lock_.lock();
  L2Slot& s = slots_[slot];
  begin_invalidation(s.first_page, s.pages);
  bool zapped = false;
  for (uint64_t p = s.first_page; p < s.first_page + s.pages; p++) {
    if (state_[p].fetch_and(static_cast<uint8_t>(~kInEpt12)) & kInEpt12) {
      co_await ept_->unmap(page_gpa(p));
      zapped = true;
    }
  }
  for (Gpa g : sink_mapped_) co_await ept_->unmap(g);  // and of the MMIO sink
  zapped |= !sink_mapped_.empty();
  sink_mapped_.clear();
  s.base = base;
  co_await mmu_lock_.unlock();
  if (zapped) co_await zap_flush();
  end_invalidation();
}

GuestTask L1Vmm::start_host() {
  // KVM enables VMX on every CPU at load: this one runs INVEPT in the notifier.
  L1Pages own(layout_.host_vmxon, layout_.host_vmxon + kPageSize);
  co_await enter_vmx(own);
  for (uint64_t p = 0; p < layout_.pages; p++) {
    co_await ops::write64(backing(p), 0);
    state_[p].fetch_or(kPopulated);
  }
  co_await wait_until_eq(layout_.mailbox + kReady, 1, Poll::locked);
}

// --- the vCPU thread --------------------------------------------------------------

GuestTask L1Vmm::handle_interrupt(uint8_t vector) {
  if (vector == kShootdownVector) {
    // flush_tlb_func: this CPU's TLB holds nothing of the VMM's that the
    // model keeps; the ack is what the sender waits for.
    uint64_t req = co_await ops::read64(layout_.mailbox + kShootReq);
    co_await ops::write64(layout_.mailbox + kShootAck, req);
  } else if (vector == kFlushVector) {
    co_await invept(vmx::InveptType::single_context, eptp_);
    uint64_t req = co_await ops::read64(layout_.mailbox + kFlushReq);
    co_await ops::write64(layout_.mailbox + kFlushAck, req);
  } else if (vector == kTimerVector) {
    timer_ticks_++;  // the tick itself is the round trip
  } else {
    throw VmxError(fmt::format("unexpected interrupt vector {:#x}", vector));
  }
}

GuestFn<bool> L1Vmm::handle_exit(vmx::ExitReason reason) {
  switch (reason) {
    case vmx::ExitReason::kEptViolation:
      co_await handle_ept_violation(co_await vmread(vmx::field::kGuestPhysicalAddress));
      co_return true;
    case vmx::ExitReason::kExternalInterrupt:
      co_await handle_interrupt(static_cast<uint8_t>(co_await vmread(vmx::field::kExitInterruptionInfo)));
      co_return true;
    case vmx::ExitReason::kVmcall:
      co_return false;
    default:
      throw VmxError(fmt::format("unexpected L2 exit: {}", vmx::exit_reason_name(reason)));
  }
}

GuestTask L1Vmm::run_vcpu(cpu::Machine& m, GuestTask l2) {
  L1Pages pages(layout_.pages_start, layout_.pages_end);
  Gpa vmcs = co_await enter_vmx_with_current_vmcs(pages);
  Ept12 ept(pages);
  ept_ = &ept;
  eptp_ = ept.eptp();
  sink_ = pages.alloc();
  // EPT12's intermediate tables for the whole area, built now so that the
  // fault handler and the notifier never allocate.
  for (uint64_t p = 0; p < layout_.pages; p += kPagesPerTable) {
    co_await ept.map(page_gpa(p), backing(p));
    co_await ept.unmap(page_gpa(p));
  }
  // The vmcs12 L1 KVM gives an L2 vCPU: every page L0 gets on every nested
  // entry through its page strategy.
  Gpa msr_bitmap = pages.alloc(), apic_access = pages.alloc(), vapic = pages.alloc(), pi_desc = pages.alloc();
  co_await write_vmcs(all_pages_vmcs12(eptp_, msr_bitmap, apic_access, vapic, pi_desc));
  m.bind_l2_program(vmcs, std::move(l2));
  // Published with a locked instruction: the host thread reads ept_, eptp_
  // and sink_ after it sees the word.
  co_await ops::cmpxchg64(layout_.mailbox + kReady, 0, 1);
  if (layout_.tick_ns) co_await start_timer(static_cast<uint32_t>(layout_.tick_ns), kTimerVector);
  auto handle = [this](vmx::ExitReason reason) -> GuestFn<bool> { co_return co_await handle_exit(reason); };
  co_await run_l2(handle);
}

}  // namespace nestcache::guest
