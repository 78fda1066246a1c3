// The L1 VMM (DESIGN.md §6): L1 KVM and a VMM process running one L2 vCPU
// whose memory is pages of the VMM's own address space, split over L2
// memslots — with the mechanics that decide what reaches the hardware:
//
//   - per page, L1 tracks "populated" (in the VMM's page tables) and "in
//     EPT12"; an L2 touch of a page missing from EPT12 is an EPT12 violation
//     L1 serves (allocating and zeroing the page if its own mapping is gone),
//     retried when it raced an invalidation;
//   - a discard (MADV_DONTNEED) goes through L1's MMU notifier: it zaps the
//     pages in EPT12 (INVEPT here, then a waiting flush kick to the vCPU
//     running L2) and, when it cleared any populated page, sends ONE
//     synchronous TLB-shootdown IPI to that vCPU and waits for its ack;
//   - moving a memslot zaps what EPT12 maps of it; an L2 access to an
//     address without a memslot is MMIO, completed by the VMM;
//   - L1 timer ticks interrupt the vCPU running L2 at a fixed period: its
//     own APIC timer, in periodic mode, on the clock the machine runs on.
//
// Two L1 vCPUs run it: the vCPU thread (run_vcpu(): L1 KVM entering L2 and
// handling its exits) and the VMM's host thread (start_host(), then the
// caller's own work through discard() and move_slot()). The two hand-shake
// through its mailbox page, which the machine must watch (sync_page()). It knows
// nothing of the program L2 runs or of the work the host thread does: a
// benchmark drives it.
//
// The bookkeeping (memslots, page states, the invalidation sequence) lives in
// C++ objects, as a kernel's data; the words the two vCPUs hand-shake
// through and the lock the notifier and the fault handler take live in L1
// memory, so they cost what guest memory costs.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include "cpu/guest_task.h"
#include "cpu/machine.h"
#include "guest/ept12.h"
#include "guest/wait.h"

namespace nestcache::guest {

// Where the L1 VMM's pieces live, in L2 and in L1 physical memory.
struct L1VmmLayout {
  Gpa l2_base = 0;              // L2 address of L2 memory's first page
  uint64_t pages = 0;           // L2 memory, in pages
  uint32_t slots = 1;           // memslots it is split over, in order
  uint64_t pages_per_slot = 0;  // each slot's size; the last takes the remainder
  Gpa backing = 0;              // L1 address backing L2 page 0; page i at backing + i pages
  Gpa pages_start = 0;          // L1 page allocator of the vCPU thread: VMCS, EPT12 tables, ...
  Gpa pages_end = 0;
  Gpa mailbox = 0;              // one L1 page: the vCPUs' hand-shake words and the MMU lock
  Gpa host_vmxon = 0;           // the host thread's VMXON region (one L1 page)
  uint64_t tick_ns = 0;         // L1 timer period while ticking; 0: no ticks
};

// An L2 memslot as L1 keeps it.
struct L2Slot {
  Gpa base;             // L2 address; changes when the VMM moves the slot
  uint64_t first_page;  // its first page in the VMM's memory
  uint64_t pages;
};

// What the L1 VMM did, so far.
struct L1VmmCounts {
  uint64_t shootdowns = 0;     // synchronous TLB-shootdown IPIs sent
  uint64_t ept12_faults = 0;   // EPT12 violations served
  uint64_t fault_retries = 0;  // ... of which raced an invalidation and were retried
  uint64_t flush_kicks = 0;    // waiting TLB-flush kicks to the vCPU running L2
  uint64_t timer_ticks = 0;    // L1 timer interrupts taken by the vCPU running L2
  uint64_t discard_calls = 0;  // MADV_DONTNEED calls
  uint64_t mmio = 0;           // L2 accesses to addresses without a memslot
};

class L1Vmm {
 public:
  // Vectors as Linux x86 numbers them: local timer, call-function (the TLB
  // shootdown), reschedule (KVM's kick).
  static constexpr uint8_t kTimerVector = 0xec, kShootdownVector = 0xfb, kFlushVector = 0xfd;

  explicit L1Vmm(const L1VmmLayout& layout);

  // --- the vCPU thread (L1 vCPU 0) ---
  // VMX bring-up; EPT12's tables for the whole area (its leaves stay empty:
  // pages enter EPT12 through faults, as in a fresh VM); the vmcs12 with all
  // four pages L0 reaches per entry; `l2` bound to it; then tells the host
  // thread it is ready and runs L2, serving its exits, until L2's VMCALL.
  cpu::GuestTask run_vcpu(cpu::Machine& m, cpu::GuestTask l2);
  // L1's EPT-violation handler for the L2 vCPU (KVM's direct_page_fault).
  cpu::GuestTask handle_ept_violation(Gpa l2_gpa);

  // --- the host thread (L1 vCPU 1) ---
  // VMXON (the notifier runs INVEPT), every page written (upstream's
  // memset: every page starts populated), then waits for run_vcpu's ready.
  cpu::GuestTask start_host();
  // MADV_DONTNEED of the VMM's pages [first, first + count): one call.
  cpu::GuestTask discard(uint64_t first, uint64_t count);
  // KVM_SET_USER_MEMORY_REGION moving slot `slot` to L2 address `base`.
  cpu::GuestTask move_slot(uint32_t slot, Gpa base);

  // --- bookkeeping ---
  // The L1 page the two vCPUs hand-shake through (cpu::Machine::watch it).
  Gpa sync_page() const { return layout_.mailbox; }
  const std::vector<L2Slot>& slots() const { return slots_; }
  // The slot holding VMM page `page`.
  uint32_t slot_of_page(uint64_t page) const;
  // L1 address backing VMM page `page`.
  Gpa backing(uint64_t page) const { return layout_.backing + page * kPageSize; }
  // L2 address of VMM page `page`.
  Gpa page_gpa(uint64_t page) const;
  L1VmmCounts counts() const;

 private:
  // The slot holding L2 address `g`, or -1 (no memslot: MMIO).
  int find_slot(Gpa g) const;
  cpu::GuestTask map_mmio(Gpa g, uint64_t seq);
  // INVEPT here and a waiting flush kick to the vCPU running L2.
  cpu::GuestTask zap_flush();
  // One synchronous TLB-shootdown IPI to the vCPU running L2.
  cpu::GuestTask shootdown();
  cpu::GuestTask kick_and_wait(Gpa request, Gpa ack, uint8_t vector);
  // The invalidation of VMM pages [first, first + count): KVM's
  // invalidate_range_start marks, the end bumps the sequence.
  void begin_invalidation(uint64_t first, uint64_t count);
  void end_invalidation();
  // The vCPU thread's exits.
  cpu::GuestFn<bool> handle_exit(vmx::ExitReason reason);
  cpu::GuestTask handle_interrupt(uint8_t vector);

  L1VmmLayout layout_;
  GuestLock mmu_lock_;
  uint64_t eptp_ = 0;
  Ept12* ept_ = nullptr;          // the vCPU thread's, published through the ready word
  Gpa sink_ = 0;                  // where L1 completes L2's writes to an address without a memslot
  std::vector<Gpa> sink_mapped_;  // under the MMU lock

  // Changed under the MMU lock; read by the fault handler.
  std::vector<L2Slot> slots_;
  std::vector<std::atomic<uint8_t>> state_;
  // KVM's mmu_invalidate_seq / _in_progress / _range: a fault that snapshots
  // the sequence and then finds it moved, or finds its page inside a running
  // invalidation, retries.
  std::atomic<uint64_t> seq_{0};
  std::atomic<uint64_t> in_progress_{0};
  std::atomic<uint64_t> range_start_{0}, range_end_{0};

  std::atomic<uint64_t> shootdowns_{0}, ept12_faults_{0}, fault_retries_{0}, flush_kicks_{0}, timer_ticks_{0},
      discard_calls_{0}, mmio_{0};
};

}  // namespace nestcache::guest
