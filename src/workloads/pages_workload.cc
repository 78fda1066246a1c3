#include "workloads/pages_workload.h"

#include <atomic>
#include <thread>

#include "vmx/entry_checks.h"

namespace nestcache::workloads {

namespace {

namespace ops = cpu::ops;
using cpu::GuestOp;
using cpu::GuestTask;
using guest::L1Pages;

// L1 physical layout: the four pages vmcs02 points to, each in a memslot.
constexpr Gpa kPageSlotsBase = 0x4000000;
constexpr Gpa kPageSlotStride = 0x100000;
constexpr Gpa kMovedOffset = 0x10000000;  // where the VMM moves a slot to, and back
constexpr int kNumSlotPages = 4;  // msr bitmap, APIC-access, virtual APIC, PI descriptor
constexpr Gpa slot_gpa(int i) { return kPageSlotsBase + i * kPageSlotStride; }
constexpr Gpa kMsrBitmap = slot_gpa(0), kApicAccess = slot_gpa(1), kVapic = slot_gpa(2);
constexpr Gpa kPiDesc = slot_gpa(3) + 0x40;  // need not be page aligned

// L2 physical layout.
constexpr Gpa kL2Data = 0x200000;
constexpr Gpa kL2Apic = 0xfee00000;
// L2 data page: mailbox words L2 fills before each VMCALL.
constexpr Gpa kCall = 0x0, kTprValue = 0x10, kAck = 0x28, kVectorSum = 0x30, kPattern = 0x100;
enum Call : uint64_t { kCallMemory = 1, kCallTpr, kCallIrq, kCallIrqDone, kCallDone };

constexpr uint8_t kNotificationVector = 0xf2;
constexpr uint32_t kInterceptedMsr = 0x10;
constexpr uint64_t kMmio = ~uint64_t{0};  // what a read of an address without memslot returns
constexpr uint64_t kWaitNs = 20'000'000;

uint64_t pattern(int round) { return 0x5157000000000000ull | (uint64_t(round) << 8) | 0xa5; }

// Shared between the two L1 programs through L1 memory.
struct L1Shared {
  Gpa irq_request;  // round+1 when L2 waits for interrupts; ~0: stop
  Gpa l2_data;      // L1 address of L2's data page
  // The host thread's changes so far (a test oracle, not guest state): with
  // churn, L2 starts each round only after at least one more change, so
  // every round runs under churn however the threads are scheduled.
  std::atomic<uint64_t> churn_operations{0};
};

GuestTask l2_program(PagesWorkloadConfig c, const std::atomic<uint64_t>& churn_operations) {
  // Interrupts are counted over the whole run: one that arrives after its
  // round's deadline (delayed, e.g. while a memslot was away) still counts;
  // one that never arrives by the final drain is lost.
  uint64_t got = 0, sum = 0;
  auto wait_interrupts = [&](uint64_t until_count, uint64_t wait_ns) -> cpu::GuestTask {
    uint64_t deadline = co_await ops::now() + wait_ns;
    while (got < until_count && co_await ops::now() < deadline) {
      uint64_t vec = (co_await ops::exec(GuestOp{GuestOp::Hlt{}})).value;  // the vector, 0 if woken without one
      if (!vec) continue;
      got++;
      sum += vec;
      co_await ops::write64(kL2Data + kAck, got);
      co_await ops::eoi();
    }
  };
  const uint64_t per_round = c.interrupts_per_round;
  uint64_t changes = 0;
  for (int r = 0; r < c.rounds; r++) {
    if (c.churn) {
      while (churn_operations.load() == changes) co_await ops::pause();
      changes = churn_operations.load();
    }
    co_await ops::write64(kL2Data + kPattern + 8 * (r % 32), pattern(r));
    co_await ops::write64(kL2Data + kCall, kCallMemory);
    co_await ops::vmcall(kCallMemory);
    for (uint64_t t = 1; t <= 15; t += 7) {
      co_await ops::write_cr8(t);
      co_await ops::write64(kL2Data + kTprValue, t);
      co_await ops::write64(kL2Data + kCall, kCallTpr);
      co_await ops::vmcall(kCallTpr);
    }
    co_await ops::write32(kL2Apic + 0x80, static_cast<uint32_t>(r));  // APIC-access exit
    co_await ops::rdmsr(kInterceptedMsr);
    // Interrupts: announce, then collect this round's before the deadline.
    co_await ops::write64(kL2Data + kCall, kCallIrq);
    co_await ops::vmcall(kCallIrq);
    co_await wait_interrupts(per_round * (r + 1), kWaitNs * per_round);
    co_await ops::write64(kL2Data + kCall, kCallIrqDone);
    co_await ops::vmcall(kCallIrqDone);
  }
  // The final drain: generous, since a loaded or sanitizer build can take a while to
  // deliver the last notifications; it only costs time when interrupts are really lost.
  co_await wait_interrupts(per_round * c.rounds, 100 * kWaitNs);
  co_await ops::write64(kL2Data + kVectorSum, sum);
  co_await ops::write64(kL2Data + kCall, kCallDone);
  for (;;) co_await ops::vmcall(kCallDone);
}

// Reads an L1 word that may sit in a memslot the VMM is moving: retries
// while the read comes back as MMIO.
cpu::GuestFn<uint64_t> read_settled(Gpa gpa) {
  for (;;) {
    uint64_t v = co_await ops::read64(gpa);
    if (v != kMmio) co_return v;
    co_await ops::pause();
  }
}

GuestTask l1_main(cpu::Machine& m, PagesWorkloadConfig c, PagesTranscript& t, L1Shared& shared, SelftestResult& result) {
  L1Pages pages(kL1PagesStart, 16 << 20);
  co_await guest::enter_vmx(pages);
  Gpa vmcs = pages.alloc();
  co_await guest::init_region(vmcs);
  co_await guest::vmx_ok(GuestOp{GuestOp::Vmclear{vmcs}}, "VMCLEAR");
  co_await guest::vmx_ok(GuestOp{GuestOp::Vmptrld{vmcs}}, "VMPTRLD");
  guest::Ept12 ept(pages);
  Gpa data = pages.alloc();
  shared.l2_data = data;
  co_await ept.map(kL2Data, data);
  co_await ept.map(kL2Apic, kApicAccess);

  vmx::Vmcs12 v = vmx::minimal_vmcs12();
  v.pin_based_controls |= vmx::pin::kPostedInterrupts | vmx::pin::kExternalInterruptExiting;
  v.primary_proc_controls |= vmx::proc::kActivateSecondaryControls | vmx::proc::kUseTprShadow | vmx::proc::kUseMsrBitmaps;
  v.secondary_proc_controls |= vmx::proc2::kEnableEpt | vmx::proc2::kVirtualizeApicAccesses |
                               vmx::proc2::kVirtualInterruptDelivery;
  v.exit_controls |= vmx::exit_ctl::kAckInterruptOnExit;
  v.ept_pointer = ept.eptp();
  v.msr_bitmap = kMsrBitmap;
  v.apic_access_addr = kApicAccess;
  v.virtual_apic_page_addr = kVapic;
  v.posted_intr_desc_addr = kPiDesc;
  v.posted_intr_notification_vector = kNotificationVector;
  co_await guest::write_vmcs(v);
  m.bind_l2_program(vmcs, l2_program(c, shared.churn_operations));

  auto set_msr_intercept = [](bool on) -> GuestTask {
    Gpa byte = kMsrBitmap + kInterceptedMsr / 8;
    for (;;) {  // the bitmap's memslot may be moving: retry until it lands
      uint64_t word = co_await read_settled(byte & ~7ull);
      uint64_t bit = uint64_t{1} << (8 * (byte & 7) + kInterceptedMsr % 8);
      uint64_t want = on ? (word | bit) : (word & ~bit);
      if (co_await ops::cmpxchg64(byte & ~7ull, word, want) == word) co_return;
    }
  };
  co_await set_msr_intercept(true);

  // While the VMM moves the virtual-APIC page's memslot away, L0 cannot back
  // it and the entry fails with VMfailValid(7) (KVM's invalid-address
  // fallback). Under churn that is expected: L1 tries again.
  auto enter = [&](bool launch) -> cpu::GuestFn<cpu::OpResult> {
    for (;;) {
      cpu::OpResult e = co_await (launch ? ops::vmlaunch() : ops::vmresume());
      if (c.churn && e.outcome == cpu::Outcome::fail_valid &&
          e.vm_instruction_error == static_cast<uint32_t>(vmx::VmInstructionError::kEntryInvalidControlFields)) {
        t.entry_retries++;
        co_await ops::pause();
        continue;
      }
      co_return e;
    }
  };
  int round = 0;
  cpu::OpResult r = co_await enter(true);
  for (;;) {
    if (!r.ok()) throw guest::VmxError("nested entry failed: " + cpu::to_string(r));
    auto reason = static_cast<vmx::ExitReason>(co_await guest::exit_reason() & 0xffff);
    if (reason == vmx::ExitReason::kVmcall) {
      uint64_t call = co_await ops::read64(data + kCall);
      if (call == kCallDone) {
        t.interrupts_received = static_cast<int>(co_await ops::read64(data + kAck));
        t.vector_sum = co_await ops::read64(data + kVectorSum);
        break;
      }
      if (call == kCallMemory) {
        uint64_t got = co_await ops::read64(data + kPattern + 8 * (round % 32));
        if (got != pattern(round)) t.memory_mismatches++;
      } else if (call == kCallTpr) {
        uint64_t want = (co_await ops::read64(data + kTprValue)) << 4;
        uint64_t vtpr = (co_await read_settled(kVapic + 0x80)) & 0xff;
        t.tpr_checks++;
        if (vtpr != want) t.lost_tpr_writes++;
      } else if (call == kCallIrq) {
        co_await ops::write64(shared.irq_request, round + 1);
      } else if (call == kCallIrqDone) {
        // Wait for the poster to finish the round before the next one.
        while (co_await ops::read64(shared.irq_request) != 0) co_await ops::pause();
        round++;
        t.rounds = round;
        co_await set_msr_intercept(round % 2 == 0);
      }
    } else if (reason == vmx::ExitReason::kApicAccess) {
      t.apic_access_exits++;
    } else if (reason == vmx::ExitReason::kMsrRead) {
      t.msr_exits++;
    } else {
      throw guest::VmxError(fmt::format("unexpected L2 exit: {}", vmx::exit_reason_name(reason)));
    }
    r = co_await enter(false);
  }
  co_await ops::write64(shared.irq_request, ~uint64_t{0});
  (void)result;
}

// L1's second vCPU: posts interrupts to L2 through the descriptor.
GuestTask l1_poster(PagesWorkloadConfig c, PagesTranscript& t, L1Shared& shared) {
  for (;;) {
    uint64_t req = co_await ops::read64(shared.irq_request);
    if (req == ~uint64_t{0}) co_return;
    if (req == 0) {
      co_await ops::pause();
      continue;
    }
    for (int k = 0; k < c.interrupts_per_round; k++) {
      uint8_t vec = posted_vector(t.interrupts_posted);
      Gpa pir = kPiDesc + 8 * (vec / 64);
      for (;;) {  // set the PIR bit (the slot may be moving: MMIO reads retry)
        uint64_t old = co_await read_settled(pir);
        if (co_await ops::cmpxchg64(pir, old, old | (uint64_t{1} << (vec % 64))) == old) break;
      }
      for (;;) {  // then ON
        Gpa on = kPiDesc + 32;
        uint64_t old = co_await read_settled(on);
        if (co_await ops::cmpxchg64(on, old, old | 1) == old) break;
      }
      t.interrupts_posted++;
      co_await ops::send_ipi(0, kNotificationVector);
      uint64_t deadline = co_await ops::now() + kWaitNs;
      while (co_await ops::read64(shared.l2_data + kAck) < uint64_t(t.interrupts_posted) &&
             co_await ops::now() < deadline)
        co_await ops::pause();
    }
    co_await ops::write64(shared.irq_request, 0);
  }
}

}  // namespace

nlohmann::json PagesTranscript::to_json() const {
  return {{"rounds", rounds},
          {"memory_mismatches", memory_mismatches},
          {"tpr_checks", tpr_checks},
          {"lost_tpr_writes", lost_tpr_writes},
          {"apic_access_exits", apic_access_exits},
          {"msr_exits", msr_exits},
          {"interrupts_posted", interrupts_posted},
          {"interrupts_received", interrupts_received},
          {"vector_sum", vector_sum},
          {"churn_operations", churn_operations},
          {"entry_retries", entry_retries}};
}

PagesTranscript run_pages_workload(NestedEnv& env, const PagesWorkloadConfig& c, SelftestResult& result) {
  PagesTranscript t;
  std::vector<Hva> hvas;
  for (int i = 0; i < kNumSlotPages; i++) {
    auto h = env.add_page_slot(1 + i, slot_gpa(i));
    if (!h) {
      result.fail(h.error().to_string());
      return t;
    }
    hvas.push_back(*h);
  }
  L1Shared shared{0x80000, 0};  // irq_request: a word in L1 memory below its page allocator
  env.machine->set_l1_program(0, l1_main(*env.machine, c, t, shared, result));
  env.machine->set_l1_program(1, l1_poster(c, t, shared));

  std::atomic<bool> stop{false};
  std::thread churn;
  if (c.churn) {
    churn = std::thread([&] {
      for (int n = 0; !stop.load(); n++) {
        int i = n % kNumSlotPages;
        (void)env.mm->migrate(hvas[i]);  // EBUSY while a map pins it is the point
        if (n % 3 == 0) {  // move the slot away and back: two generations
          (void)env.vm->set_memory_region({uint32_t(1 + i), 0, slot_gpa(i) + kMovedOffset, kPageSize, hvas[i]});
          std::this_thread::sleep_for(std::chrono::microseconds(50));
          (void)env.vm->set_memory_region({uint32_t(1 + i), 0, slot_gpa(i), kPageSize, hvas[i]});
        }
        t.churn_operations++;
        shared.churn_operations.fetch_add(1);
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
    });
  }
  Status st = env.machine->run(c.timeout);
  stop.store(true);
  if (churn.joinable()) churn.join();
  if (!st) result.fail(st.error().to_string());
  result.counters = env.counters();
  result.counters[Counter::lost_tpr_writes] += t.lost_tpr_writes;
  result.counters[Counter::lost_posted_interrupts] += t.interrupts_posted - t.interrupts_received;
  result.details["transcript"] = t.to_json();
  if (t.interrupts_posted != t.interrupts_received) {
    // Where did the missing interrupts stop? Still posted (PIR/ON: a
    // notification was consumed without processing), in the virtual IRR (L2
    // never took them), or nowhere (the bits were lost).
    uint64_t desc[5] = {};
    uint32_t virr[8] = {};
    (void)env.vm->read_guest(kPiDesc, desc, sizeof desc);
    for (int i = 0; i < 8; i++) (void)env.vm->read_guest(kVapic + 0x200 + 0x10 * i, &virr[i], 4);
    result.details["pending_at_end"] = {{"pir", {desc[0], desc[1], desc[2], desc[3]}},
                                        {"on", desc[4] & 1},
                                        {"virtual_irr", virr}};
    result.note(fmt::format("{} interrupts missing: PIR {:#x} {:#x} {:#x} {:#x} ON {}, virtual IRR {:#x} {:#x} {:#x} {:#x} {:#x} {:#x} {:#x} {:#x}",
                            t.interrupts_posted - t.interrupts_received, desc[0], desc[1], desc[2], desc[3], desc[4] & 1,
                            virr[0], virr[1], virr[2], virr[3], virr[4], virr[5], virr[6], virr[7]));
  }
  result.details["counters_by_vcpu"] = env.counters_by_vcpu();
  return t;
}

}  // namespace nestcache::workloads
