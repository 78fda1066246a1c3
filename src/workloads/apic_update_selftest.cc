// Selftest `apic-update`: the seed's vmx_apic_update_test (patch 5), plus the
// virtual-APIC and posted-interrupt variants (DESIGN.md §6).
//
// One L1 vCPU runs one L2 with APIC-access virtualization; the APIC-access
// page lives alone in memslot 1 at the seed's VAPIC_GPA. L2 writes 8 values
// (1<<0 ... 1<<6, then 0) to offset 0x80 of it, --delay-ms apart; each write
// is an APIC-access exit that L1 handles by resuming L2; L2 ends with VMCALL.
// Meanwhile a VMM thread, every delay/4, discards the page (--mode discard:
// the MMU-notifier path) or moves its memslot up by 0x10000 (--mode move: the
// memslot-generation path). After a move L2's write reaches an address with
// no memslot: an MMIO exit to the VMM, tolerated and counted as the seed does.
//
// --page vapic adds the TPR shadow (virtual-APIC page in memslot 2): after each
// write L2 sets CR8 and L1 checks the value in its virtual-APIC page. --page
// pi adds posted interrupts (descriptor in memslot 3): L1 posts one interrupt
// per write and L2 must receive it. A check that raced a discard of its own
// page (the VMM dropped the contents) is not a loss and is counted apart.
// While L1 keeps entering L2 these pages must exist at vmcs12's addresses, so
// in move mode they (and the APIC-access page with them) are moved away and
// back each period (the descriptor stays: see run_once); an entry that meets a
// page away is retried by L1 (VMfail) or by the VMM (internal error), and
// reported.
#include <atomic>
#include <thread>

#include "guest/ept12.h"
#include "guest/l2_run.h"
#include "guest/mailbox.h"
#include "guest/posted_interrupts.h"
#include "guest/program.h"
#include "guest/vmcs12_pages.h"
#include "guest/vmx.h"
#include "guest/wait.h"
#include "host/fault_injection.h"
#include "workloads/host_wait.h"
#include "workloads/nested_env.h"

namespace nestcache::workloads {

namespace {

using namespace guest::program;

constexpr Gpa kApicGpa = 0xc0000000;   // the seed's VAPIC_GPA (its slot 1)
constexpr Gpa kVapicGpa = 0xd0000000;  // virtual-APIC page, slot 2
constexpr Gpa kPiPage = 0xe0000000;    // descriptor page, slot 3
constexpr Gpa kPiDesc = kPiPage + 0x40;
constexpr Gpa kMoveStep = 0x10000;     // the seed's memslot move
constexpr Gpa kL2Data = 0x200000;      // L2 mailbox page

constexpr uint64_t kInterruptWaitNs = 10'000'000;
constexpr int kWrites = 8;

enum PageBits : unsigned { kPageApic = 1, kPageVapic = 2, kPagePi = 4 };

// The handshake between L2's delay and the VMM thread. The seed's host thread
// changes the page every delay/4 and so, in practice, inside L2's udelay; here
// that is made certain rather than likely:
//  - every delay of L2 contains at least one VMM change (L2 leaves its delay
//    only after the VMM's count moved), so a loaded machine cannot starve the
//    churn and make a run that tested nothing;
//  - in the seed's own move variant the slot moves away for good, and a move
//    that landed while L1 handles an exit would make L1's next VMRESUME meet
//    an APIC-access address with no memslot: KVM's internal error, which the
//    seed's test only avoids by timing. There the VMM moves only while L2 is
//    in its delay (gate kL2Delaying -> kVmmChanging), so after the first move
//    every write is an MMIO exit and no entry follows until the VMCALL.
enum Gate : int { kL2Busy, kL2Delaying, kVmmChanging };

struct Config {
  bool discard = true;
  unsigned pages = kPageApic;
  uint64_t delay_ns = 5'000'000;
  // Move mode with pages L1 keeps entering with: away and back each period.
  bool move_and_back() const { return !discard && pages != kPageApic; }
  // The seed's own move variant: the slot moves away for good.
  bool move_away() const { return !discard && pages == kPageApic; }
  // Whether, under map, the processor uses a discarded page's old pfn after
  // the discard: L2's APIC-page write and its CR8 write follow its delay
  // (when the VMM discards) in the same entry, through vmcs02's pfns. The
  // descriptor is read only when L1 posts, which it does while L2 is out;
  // the next entry maps the page again, so a discard of the descriptor alone
  // leaves no stale pfn in use.
  bool stale_pfn_used_after_discard() const { return (pages & (kPageApic | kPageVapic)) != 0; }
};

// What L1 and L2 saw, and the VMM thread's sequence: odd while it changes a
// page. A TPR or interrupt check whose sequence moved raced a change of its
// own page (the VMM dropped the contents) and is not counted as a loss.
struct Transcript {
  std::atomic<uint64_t> seq{0};
  std::atomic<bool> started{false};
  int apic_access_exits = 0, vmcalls = 0;
  int tpr_checks = 0, lost_tpr_writes = 0, tpr_raced = 0;
  int posted = 0, received = 0, lost_interrupts = 0, pi_raced = 0;
  int entries = 0, entry_retries = 0;
  uint64_t last_exit = 0;
  std::atomic<uint64_t> churn_operations{0};
  // L2's delay and the VMM's changes meet here (see l2_delay and churn).
  std::atomic<int> gate{kL2Busy};
};

// The seed's udelay, then the handshake with the VMM thread (see Gate).
GuestTask l2_delay(const Config& c, Transcript& t) {
  uint64_t changes = t.churn_operations.load();
  t.gate.store(kL2Delaying);
  co_await guest::delay(c.delay_ns);
  co_await guest::wait_until_host([&] { return t.churn_operations.load() != changes; });
  co_await guest::wait_until_host([&] {
    int open = kL2Delaying;
    return t.gate.compare_exchange_weak(open, kL2Busy);
  });
}

GuestTask l2_program(Config c, Mailbox mb, Transcript& t) {
  for (int i = 0; i < kWrites; i++) {
    uint32_t value = i < kWrites - 1 ? 1u << i : 0;
    if (c.pages & kPageApic) co_await ops::write32(kApicGpa + vmx::vapic::kTpr, value);  // APIC-access exit
    if (c.pages & kPageVapic) {
      uint64_t tpr = 1 + i % 15;
      // The test reads the VMM's sequence (an oracle, not a guest action).
      uint64_t arg = tpr | (t.seq.load() << 8);
      co_await ops::write_cr8(tpr);
      co_await mb.call(Call::tpr, arg);
    }
    if (c.pages & kPagePi) {
      co_await mb.call(Call::irq);  // L1 posts while L2 is out
      uint64_t got = co_await guest::wait_interrupt(co_await guest::deadline_in(kInterruptWaitNs));
      if (got) co_await ops::eoi();
      co_await mb.call(Call::irq_done, got);
    }
    co_await l2_delay(c, t);
  }
  co_await mb.finish();
}

// L1's side of L2's calls; false once L2 is done.
struct CallHandler {
  Mailbox mb;
  Transcript& t;
  uint64_t pi_seq = 0;
  int vector = 0;

  GuestFn<bool> handle() {
    t.vmcalls++;
    Call call = co_await mb.read_call();
    if (call == Call::done) co_return false;
    if (call == Call::tpr) {
      uint64_t word = co_await mb.read_arg();
      uint8_t vtpr = static_cast<uint8_t>(co_await guest::read_backed(kVapicGpa + vmx::vapic::kTpr));
      uint64_t seq0 = word >> 8;
      t.tpr_checks++;
      if (vtpr != vmx::vapic::vtpr_of_cr8(word)) {
        if (seq0 % 2 == 0 && t.seq.load() == seq0)
          t.lost_tpr_writes++;
        else
          t.tpr_raced++;
      }
    } else if (call == Call::irq) {
      pi_seq = t.seq.load();
      uint8_t vec = static_cast<uint8_t>(guest::kFirstPostedVector + vector++ % 32);
      // To ourselves: L0 completes the post at the next entry.
      co_await guest::post_interrupt(kPiDesc, vec, 0, guest::kNotificationVector, guest::IfUnbacked::wait);
      t.posted++;
    } else if (call == Call::irq_done) {
      if (co_await mb.read_arg())
        t.received++;
      else if (pi_seq % 2 == 0 && t.seq.load() == pi_seq)
        t.lost_interrupts++;
      else
        t.pi_raced++;
    }
    co_return true;
  }
};

GuestTask l1_program(cpu::Machine& m, Config c, Transcript& t) {
  guest::L1Pages pages(kL1PagesStart, 16 << 20);
  Gpa vmcs = co_await guest::enter_vmx_with_current_vmcs(pages);
  guest::Ept12 ept(pages);
  const Mailbox mb(kL2Data, pages.alloc());
  co_await ept.map(kL2Data, mb.l1_address(0));
  co_await ept.map(kApicGpa, kApicGpa);  // identity, as the seed's nested_map
  guest::Vmcs12Pages p{.eptp = ept.eptp()};
  if (c.pages & kPageApic) p.apic_access = kApicGpa;
  if (c.pages & (kPageVapic | kPagePi)) p.virtual_apic = kVapicGpa;
  if (c.pages & kPagePi) {
    p.pi_desc = kPiDesc;
    p.notification_vector = guest::kNotificationVector;
  }
  co_await guest::write_vmcs(guest::vmcs12_for(p));
  m.bind_l2_program(vmcs, l2_program(c, mb, t));

  CallHandler calls{mb, t};
  auto handle = [&](vmx::ExitReason reason) -> GuestFn<bool> {
    t.last_exit = static_cast<uint64_t>(reason);
    if (reason == vmx::ExitReason::kApicAccess) {
      t.apic_access_exits++;
      co_return true;
    }
    if (reason != vmx::ExitReason::kVmcall)
      throw guest::VmxError(fmt::format("unexpected L2 exit: {}", vmx::exit_reason_name(reason)));
    co_return co_await calls.handle();
  };
  t.started.store(true);  // the seed's GUEST_SYNC(0): the VMM thread starts
  // KVM's invalid-address fallback while the virtual-APIC page is away: L1
  // enters again.
  co_await guest::run_l2(handle, {.retry_while_page_away = c.move_and_back(),
                                  .retries = &t.entry_retries,
                                  .entries = &t.entries});
}

struct ChurnPage {
  uint32_t slot;
  Gpa gpa;
  Hva hva;
};

// The VMM thread (the seed's host pthread): one change per page per period.
void churn(NestedEnv& env, const Config& c, std::vector<ChurnPage>& pages, Transcript& t, std::atomic<bool>& stop) {
  constexpr auto kRetry = std::chrono::microseconds(100);
  host_wait_until([&] { return t.started.load() || stop.load(); }, kRetry);
  auto period = std::chrono::nanoseconds(c.delay_ns / 4);
  while (!stop.load()) {
    std::this_thread::sleep_for(period);
    if (stop.load()) break;
    // The seed's move variant moves only inside L2's delay; if L2 is not in
    // it, try again shortly rather than a whole period later.
    if (c.move_away()) {
      host_wait_until([&] {
        int open = kL2Delaying;
        return stop.load() || t.gate.compare_exchange_strong(open, kVmmChanging);
      }, kRetry);
      if (stop.load()) return;
    }
    for (ChurnPage& p : pages) {
      t.seq.fetch_add(1);
      if (c.discard) {
        (void)env.mm->discard(p.hva, kPageSize);
      } else if (!c.move_and_back()) {
        p.gpa += kMoveStep;  // away for good, as the seed does
        (void)env.vm->set_memory_region({p.slot, 0, p.gpa, kPageSize, p.hva});
      } else {
        (void)env.vm->set_memory_region({p.slot, 0, p.gpa + kMoveStep, kPageSize, p.hva});
        std::this_thread::sleep_for(std::chrono::microseconds(50));
        (void)env.vm->set_memory_region({p.slot, 0, p.gpa, kPageSize, p.hva});
      }
      t.seq.fetch_add(1);
      t.churn_operations.fetch_add(1);
    }
    if (c.move_away()) t.gate.store(kL2Delaying);
  }
}

const char* mode_name(bool discard) { return discard ? "discard" : "move"; }

OptionSpec delay_option() {
  return int_option("--delay-ms", "milliseconds between L2's writes (the seed: 100)", "5", 1, 10000);
}

// The pages the run uses, each in its own memslot; returns those the VMM
// thread churns.
Result<std::vector<ChurnPage>> add_pages(NestedEnv& env, const Config& c) {
  std::vector<ChurnPage> churned;
  struct {
    unsigned bit;
    uint32_t slot;
    Gpa gpa;
  } const layout[] = {{kPageApic, 1, kApicGpa}, {kPageVapic, 2, kVapicGpa}, {kPagePi, 3, kPiPage}};
  for (auto& l : layout) {
    bool used = (c.pages & l.bit) || (l.bit == kPageVapic && (c.pages & kPagePi));
    if (!used) continue;
    Hva h = NC_TRY(env.add_page_slot(l.slot, l.gpa));
    if (l.bit == kPageApic) {  // the seed fills the page with 0x45 first
      std::vector<uint8_t> fill(kPageSize, 0x45);
      (void)env.mm->copy_to(h, fill.data(), fill.size());
    }
    // Move mode leaves the descriptor in place and moves the virtual-APIC
    // page it delivers into: a descriptor away at an entry makes KVM clear
    // posted interrupts in vmcs02, and every notification after that is an
    // internal error until L1 enters again (mmio_needed) — KVM's behaviour,
    // which would stall this L2 for good.
    bool churn_it = c.discard ? (c.pages & l.bit) != 0 : (l.bit != kPagePi && used);
    if (churn_it) churned.push_back({l.slot, l.gpa, h});
  }
  return churned;
}

nlohmann::json run_json(const Transcript& t, const CounterSnapshot& k) {
  return {{"apic_access_exits", t.apic_access_exits}, {"mmio_exits", k[Counter::mmio_exits]},
          {"vmm_updates", t.churn_operations.load()},    {"entries", t.entries},
          {"entry_retries", t.entry_retries},     {"internal_errors", k[Counter::internal_errors]},
          {"stale_accesses", k[Counter::stale_accesses]}, {"tpr_checks", t.tpr_checks},
          {"lost_tpr_writes", t.lost_tpr_writes}, {"tpr_checks_raced_a_change", t.tpr_raced},
          {"interrupts_posted", t.posted},        {"interrupts_received", t.received},
          {"lost_posted_interrupts", t.lost_interrupts}, {"interrupts_raced_a_change", t.pi_raced},
          {"entry_cancels", k[Counter::entry_cancels]},  {"cache_invalidations", k[Counter::cache_invalidations]},
          {"remap_windows", k[Counter::remap_windows]}};
}

// The checks of one run whose VMM thread changed its pages.
void check_run(const RunOptions& o, const Config& c, const Transcript& t, const CounterSnapshot& k,
               const std::string& tag, SelftestResult& r) {
  uint64_t stale = k[Counter::stale_accesses];
  r.check(t.churn_operations > 0, "{}: the VMM thread changed nothing while L2 ran", tag);
  if ((c.pages & kPageVapic)) r.check(t.tpr_checks == kWrites, "{}: {} TPR checks of {}", tag, t.tpr_checks, kWrites);
  if ((c.pages & kPagePi)) r.check(t.posted == kWrites, "{}: {} interrupts posted of {}", tag, t.posted, kWrites);

  std::string counts = fmt::format(
      "{} APIC-access exits, {} MMIO exits, {} VMM updates, {} stale accesses, {} lost TPR writes, {} lost posted "
      "interrupts",
      t.apic_access_exits, k[Counter::mmio_exits], t.churn_operations.load(), stale, t.lost_tpr_writes, t.lost_interrupts);
  if (c.move_away()) {
    // The first write precedes every move; each delay holds a move (Gate).
    r.check(t.apic_access_exits == 1 && k[Counter::mmio_exits] == kWrites - 1,
            "{}: {} APIC-access and {} MMIO exits, expected 1 and {} (the slot moves away after the first write)", tag,
            t.apic_access_exits, k[Counter::mmio_exits], kWrites - 1);
  }
  if (o.strategy == StrategyKind::map) {
    // The kernel before the seed: nothing invalidates the maps. This run
    // passes by reporting what the detectors saw.
    // On unmanaged memory a stale access is certain (the window's frame is
    // gone); on managed memory map's pin keeps the old frame alive, and
    // whether L2 uses it after a discard depends on timing.
    const bool unmanaged = o.memory == MemoryKind::unmanaged;
    if (c.discard && c.stale_pfn_used_after_discard() && (unmanaged || stale > 0)) {
      if (unmanaged)
        r.check(stale > 0, "{}: map on unmanaged memory under discard: the stale-access detector saw nothing", tag);
      // Without the APIC-access page L2 makes no APIC-page write to count.
      std::string missed = (c.pages & kPageApic)
                               ? fmt::format(" ({} of {} APIC-page writes did not exit)", kWrites - t.apic_access_exits,
                                             kWrites)
                               : std::string();
      r.note(fmt::format("{}: {}{} — map keeps stale pfns in vmcs02 after a discard{}: the bug the seed fixes", tag,
                         counts, missed,
                         unmanaged ? "" : " (its pin keeps the old frame alive; the page gets a new one)"));
    } else {
      r.note(fmt::format("{}: {}", tag, counts));
    }
    return;
  }
  r.check(stale == 0, "{}: {} stale accesses", tag, stale);
  r.check(t.lost_tpr_writes == 0, "{}: {} lost TPR writes", tag, t.lost_tpr_writes);
  r.check(t.lost_interrupts == 0, "{}: {} lost posted interrupts", tag, t.lost_interrupts);
  if (c.discard && (c.pages & kPageApic))
    r.check(t.apic_access_exits == kWrites, "{}: {} APIC-access exits of {} writes", tag, t.apic_access_exits, kWrites);
  if (!c.move_and_back()) r.check(t.entry_retries == 0, "{}: {} entries failed", tag, t.entry_retries);
  r.note(fmt::format("{}: {}, {} cancelled entries", tag, counts, k[Counter::entry_cancels]));
}

// One run: one mode, one strategy.
void run_once(const RunOptions& o, const Config& c, SelftestResult& r) {
  const char* mode = mode_name(c.discard);
  NestedEnvConfig ec{o.strategy, o.memory};
  ec.vcpus = 1;
  ec.retry_internal_errors = c.move_and_back();
  auto env_r = NestedEnv::create(ec);
  if (!env_r) return r.fail(fmt::format("{}: {}", mode, env_r.error().to_string()));
  NestedEnv& env = **env_r;
  auto churned = add_pages(env, c);
  if (!churned) return r.fail(fmt::format("{}: {}", mode, churned.error().to_string()));

  Transcript t;
  env.machine->set_l1_program(0, l1_program(*env.machine, c, t));
  std::atomic<bool> stop{false};
  auto vmm = host::start_thread("the VMM thread", [&] { churn(env, c, *churned, t, stop); });
  if (!vmm) return r.fail(fmt::format("{}: {}", mode, vmm.error().to_string()));
  Status st = env.machine->run(std::chrono::milliseconds(60000));
  stop.store(true);
  vmm->join();
  CounterSnapshot k = env.counters();

  std::string tag = fmt::format("{} {}", mode, strategy_name(o.strategy));
  // Unchecked, a window whose munmap kept failing would be unmapped by the
  // VM's destructor outside the fault seam (Leaks::no_resources_left).
  const Leaks leaks = env.tear_down();
  r.check(leaks.no_resources_left(), "{}: leaked at teardown: {}", tag, leaks.resources_to_string());
  // The pool's counters from PhysMem once the VM is gone (merge_run_counters):
  // the machine's count no window closed at teardown and no pin.
  k = env.run_counters(std::span(&k, 1));
  r.counters += k;
  r.check(static_cast<bool>(st), "{}: the run failed (every entry must succeed): {}", tag,
          st ? std::string() : st.error().to_string());
  r.check(t.last_exit == static_cast<uint64_t>(vmx::ExitReason::kVmcall), "{}: last exit reason {} is not VMCALL", tag,
          t.last_exit);
  r.details["runs"][mode] = run_json(t, k);
  r.counters[Counter::lost_tpr_writes] += t.lost_tpr_writes;
  r.counters[Counter::lost_posted_interrupts] += t.lost_interrupts;
  check_run(o, c, t, k, tag, r);
}

SelftestResult run_apic_update(const RunOptions& o) {
  SelftestResult r;
  Config c;
  auto delay = o.int_value(delay_option());
  if (!delay) return r.refuse(delay.error().to_string()), r;
  c.delay_ns = static_cast<uint64_t>(*delay) * 1'000'000;
  std::string page = o.string_option("page", "apic-access");
  if (page == "apic-access")
    c.pages = kPageApic;
  else if (page == "vapic")
    c.pages = kPageVapic;
  else if (page == "pi")
    c.pages = kPagePi;
  else if (page == "all")
    c.pages = kPageApic | kPageVapic | kPagePi;
  else
    return r.refuse(fmt::format("unknown --page '{}': expected apic-access, vapic, pi or all", page)), r;
  std::string mode = o.string_option("mode", "both");
  if (mode != "discard" && mode != "move" && mode != "both")
    return r.refuse(fmt::format("unknown --mode '{}': expected discard, move or both", mode)), r;
  for (bool discard : {true, false}) {
    if (mode != "both" && mode != mode_name(discard)) continue;
    c.discard = discard;
    run_once(o, c, r);
  }
  return r;
}

}  // namespace

void register_apic_update_selftest() {
  register_selftest({
      .name = "apic-update",
      .summary = "seed patch 5: L2 writes the APIC-access page while the VMM discards it or moves its memslot",
      .description =
          "The seed's vmx_apic_update_test. One L1 vCPU; the APIC-access page alone in a one-page memslot; L2 "
          "writes 8 values to its offset 0x80, --delay-ms apart, each an APIC-access exit L1 resumes from, then "
          "VMCALLs. A VMM thread every delay/4 discards the page (--mode discard) or moves its memslot by "
          "0x10000 (--mode move); an access left without a memslot is an MMIO exit, tolerated and counted. "
          "--page vapic / pi / all add the virtual-APIC page (TPR shadow: lost TPR writes) and the posted-interrupt "
          "descriptor (lost interrupts); in move mode those pages move away and back. Asserts: every entry "
          "succeeds, the last exit is VMCALL; with cache and oracle zero stale accesses, lost TPR writes and lost "
          "interrupts. With map under discard on unmanaged memory the stale accesses are detected and reported.",
      .options = {choice_option("--mode", "discard, move or both", "both", {"discard", "move", "both"}),
                  delay_option(),
                  choice_option("--page", "apic-access, vapic, pi or all", "apic-access",
                                {"apic-access", "vapic", "pi", "all"})},
      .run = run_apic_update,
  });
}

}  // namespace nestcache::workloads
