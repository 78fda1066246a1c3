#include "workloads/pages_workload.h"

#include <atomic>
#include <thread>

#include "guest/ept12.h"
#include "guest/l2_run.h"
#include "guest/mailbox.h"
#include "guest/pages_l2.h"
#include "guest/posted_interrupts.h"
#include "guest/program.h"
#include "guest/vmcs12_pages.h"
#include "guest/vmx.h"
#include "guest/wait.h"
#include "host/fault_injection.h"

namespace nestcache::workloads {

namespace {

using namespace guest::program;

// L1 physical layout: the four pages vmcs02 points to, each in a memslot.
constexpr Gpa kPageSlotsBase = 0x4000000;
constexpr Gpa kPageSlotStride = 0x100000;
constexpr Gpa kMovedOffset = 0x10000000;  // where the VMM moves a slot to, and back
constexpr int kNumSlotPages = 4;  // msr bitmap, APIC-access, virtual APIC, PI descriptor
constexpr Gpa slot_gpa(int i) { return kPageSlotsBase + i * kPageSlotStride; }
constexpr Gpa kMsrBitmap = slot_gpa(0), kApicAccess = slot_gpa(1), kVapic = slot_gpa(2);
constexpr Gpa kPiDesc = slot_gpa(3) + 0x40;  // need not be page aligned
// Below L1's page allocator: the word L1 asks its poster with (round+1 to
// post, ~0 to stop) and the page that backs L2's data page.
constexpr Gpa kIrqRequest = kPagesDoneWord;
constexpr Gpa kL2DataBacking = 0x81000;

// L2 physical layout (guest/pages_l2.h): its data page is the mailbox.
constexpr Gpa kL2Data = 0x200000;
constexpr Gpa kL2Apic = 0xfee00000;

constexpr uint32_t kInterceptedMsr = vmx::msr::kIa32TimeStampCounter;  // a low MSR L1 may intercept
constexpr uint64_t kWaitNs = 20'000'000;

// Shared between L2 and the host thread: the host thread's changes so far
// (a test oracle, not guest state). With churn, L2 starts each round only
// after at least one more change, so every round runs under churn however
// the threads are scheduled.
struct L1Shared {
  std::atomic<uint64_t> churn_operations{0};
};

// L1's handling of one VMCALL of L2's; false when L2 is done.
GuestFn<bool> handle_call(Mailbox mb, int& round, PagesTranscript& t, const std::function<void(int)>& on_round) {
  Call call = co_await mb.read_call();
  if (call == Call::done) {
    t.interrupts_received = static_cast<int>(co_await mb.read_progress());
    t.vector_sum = co_await mb.read_arg();
    co_return false;
  }
  if (call == Call::memory) {
    uint64_t got = co_await ops::read64(mb.l1_address(guest::pages_pattern_slot(round)));
    if (got != guest::pages_pattern(round)) t.memory_mismatches++;
  } else if (call == Call::tpr) {
    uint64_t want = vmx::vapic::vtpr_of_cr8(co_await mb.read_arg());
    uint8_t vtpr = static_cast<uint8_t>(co_await guest::read_backed(kVapic + vmx::vapic::kTpr));
    t.tpr_checks++;
    if (vtpr != want) t.lost_tpr_writes++;
  } else if (call == Call::irq) {
    co_await ops::write64(kIrqRequest, round + 1);
  } else if (call == Call::irq_done) {
    // Wait for the poster to finish the round before the next one.
    co_await guest::wait_until_eq(kIrqRequest, 0);
    round++;
    t.rounds = round;
    if (on_round) on_round(round);
    co_await guest::set_msr_intercept(kMsrBitmap, kInterceptedMsr, false, round % 2 == 0);
  }
  co_return true;
}

GuestTask l1_main(cpu::Machine& m, PagesWorkloadConfig c, PagesTranscript& t, L1Shared& shared) {
  guest::L1Pages pages(kL1PagesStart, kPagesL1End);
  Gpa vmcs = co_await guest::enter_vmx_with_current_vmcs(pages);
  guest::Ept12 ept(pages);
  const Mailbox mb(kL2Data, kL2DataBacking);
  co_await ept.map(kL2Data, kL2DataBacking);
  co_await ept.map(kL2Apic, kApicAccess);
  co_await guest::write_vmcs(guest::all_pages_vmcs12(ept.eptp(), kMsrBitmap, kApicAccess, kVapic, kPiDesc));
  m.bind_l2_program(vmcs, guest::pages_l2({.mailbox = kL2Data,
                                           .rounds = c.rounds,
                                           .interrupts_per_round = c.interrupts_per_round,
                                           .apic_access = kL2Apic,
                                           .intercepted_msr = kInterceptedMsr,
                                           .wait_ns = kWaitNs,
                                           .churn = c.churn ? &shared.churn_operations : nullptr}));
  co_await guest::set_msr_intercept(kMsrBitmap, kInterceptedMsr, false, true);

  int round = 0;
  auto handle = [&](vmx::ExitReason reason) -> GuestFn<bool> {
    switch (reason) {
      case vmx::ExitReason::kVmcall: co_return co_await handle_call(mb, round, t, c.on_round);
      case vmx::ExitReason::kApicAccess: t.apic_access_exits++; co_return true;
      case vmx::ExitReason::kMsrRead: t.msr_exits++; co_return true;
      default: throw guest::VmxError(fmt::format("unexpected L2 exit: {}", vmx::exit_reason_name(reason)));
    }
  };
  // While the VMM moves the virtual-APIC page's memslot away, L0 cannot back
  // it and the entry fails with VMfailValid(7) (KVM's invalid-address
  // fallback). Under churn that is expected: L1 tries again.
  co_await guest::run_l2(handle, {.retry_while_page_away = c.churn, .retries = &t.entry_retries});
  co_await ops::write64(kIrqRequest, guest::kStopPosting);
}

// The host thread: migrates the four pages and moves their memslots away
// and back, until `stop`.
void churn(NestedEnv& env, const std::vector<Hva>& hvas, PagesTranscript& t, L1Shared& shared,
           const std::atomic<bool>& stop) {
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
}

// Where the missing interrupts stopped: still posted (PIR/ON: a notification
// was consumed without processing), in the virtual IRR (L2 never took them),
// or nowhere (the bits were lost).
void report_missing_interrupts(NestedEnv& env, const PagesTranscript& t, SelftestResult& result) {
  uint64_t desc[vmx::pi_desc::kSize / 8] = {};
  uint32_t virr[8] = {};
  (void)env.vm->read_guest(kPiDesc, desc, sizeof desc);
  for (unsigned i = 0; i < 8; i++)
    (void)env.vm->read_guest(kVapic + vmx::vapic::word_of(vmx::vapic::kIrr, 32 * i), &virr[i], sizeof virr[i]);
  const uint64_t on = desc[vmx::pi_desc::kControl / 8] & vmx::pi_desc::kOn;
  result.details["pending_at_end"] = {{"pir", {desc[0], desc[1], desc[2], desc[3]}}, {"on", on}, {"virtual_irr", virr}};
  result.note(fmt::format("{} interrupts missing: PIR {:#x} {:#x} {:#x} {:#x} ON {}, virtual IRR {:#x} {:#x} {:#x} "
                          "{:#x} {:#x} {:#x} {:#x} {:#x}",
                          t.interrupts_posted - t.interrupts_received, desc[0], desc[1], desc[2], desc[3], on, virr[0],
                          virr[1], virr[2], virr[3], virr[4], virr[5], virr[6], virr[7]));
}

}  // namespace

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
  L1Shared shared;
  env.machine->set_l1_program(0, l1_main(*env.machine, c, t, shared));
  env.machine->set_l1_program(1, guest::interrupt_poster({.request = kIrqRequest,
                                                          .desc = kPiDesc,
                                                          .dest_apic_id = 0,
                                                          .notification_vector = guest::kNotificationVector,
                                                          .unbacked = guest::IfUnbacked::wait,
                                                          .per_request = c.interrupts_per_round,
                                                          .received = kL2DataBacking + Mailbox::kProgress,
                                                          .ack_timeout_ns = 0,  // back to back
                                                          .vector_of = posted_vector},
                                                         t.interrupts_posted));

  std::atomic<bool> stop{false};
  std::thread host;
  if (c.churn) {
    auto started = host::start_thread("the host churn thread", [&] { churn(env, hvas, t, shared, stop); });
    if (!started) {
      result.fail(started.error().to_string());
      return t;
    }
    host = std::move(*started);
  }
  Status st = env.machine->run(c.timeout.value_or(run_watchdog(c.rounds, kPagesRoundAllowance)));
  stop.store(true);
  if (host.joinable()) host.join();
  if (!st) result.fail(st.error().to_string());
  result.counters = env.counters();
  result.counters[Counter::lost_tpr_writes] += t.lost_tpr_writes;
  result.counters[Counter::lost_posted_interrupts] += t.interrupts_posted - t.interrupts_received;
  result.details["transcript"] = t;
  if (t.interrupts_posted != t.interrupts_received) report_missing_interrupts(env, t, result);
  result.details["counters_by_vcpu"] = env.counters_by_vcpu();
  return t;
}

}  // namespace nestcache::workloads
