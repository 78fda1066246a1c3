// Selftest `evmcs`: an enlightened L1 (Hyper-V eVMCS) runs an L2 while the
// host migrates the eVMCS page and the VMM moves its memslot (DESIGN.md §4
// "Enlightened VMCS"; seed patches 6-7).
//
// L1 names its eVMCS (alone in memslot 1) in its VP-assist page, writes the
// fields straight into the page with the MSR-bitmap enlightenment on, and
// launches an L2 that VMCALLs in a loop. Then, for --rounds rounds:
//   1. --entries round trips: L1 writes a new guest RIP into the page,
//      VMRESUMEs, reads the exit reason from the page (must be VMCALL) and
//      VMREADs the guest RIP back (L0 reads it from the eVMCS: it must be the
//      value L1 wrote, else L0 worked on a copy L1 no longer writes);
//   2. in lockstep with the VMM (L1 writes a request word and spins until the
//      VMM acknowledges it): the VMM moves the eVMCS memslot away, L1
//      tries one VMRESUME, the VMM moves the memslot back.
// All along, a host thread migrates the eVMCS page every ~100 µs (at most
// kMaxMigrations times).
//
// Expected, per strategy:
//   cache, oracle  the eVMCS cache is locked on every entry: zero stale
//                  accesses; the entry with the memslot away is #UD (no
//                  memslot holds the eVMCS), every other one sees L1's page.
//   map            the kernel today keeps its HostMap while the eVMCS is
//                  current: the entry with the memslot away goes ahead on the
//                  kept map, and the stale-access detector reports it (and, on
//                  unmanaged memory, every access after a migration). The test
//                  passes by reporting, like migrate-under-l2.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <thread>

#include "guest/enlightened.h"
#include "guest/l1_pages.h"
#include "guest/l2_run.h"
#include "guest/mailbox.h"
#include "guest/program.h"
#include "guest/vmcs12_pages.h"
#include "guest/vmx.h"
#include "guest/wait.h"
#include "host/fault_injection.h"
#include "vmx/evmcs.h"
#include "workloads/host_wait.h"
#include "workloads/nested_env.h"

namespace nestcache::workloads {

namespace {

using namespace guest::program;

constexpr Gpa kEvmcs = 0xc0000000;      // memslot 1, one page
constexpr uint32_t kEvmcsSlot = 1;
constexpr Gpa kMoveStep = 0x10000;      // the VMM's move, as the seed's apic-update
constexpr Gpa kVpAssist = 0x90000;      // L1 memory
constexpr Gpa kMsrBitmap = 0x91000;     // L1 memory, no intercepts
// Mailbox words in L1 memory, shared by L1 and the VMM thread.
constexpr Gpa kMailbox = 0x80000;
constexpr Gpa kRequest = kMailbox;         // L1 -> VMM: 2r+1 move away, 2r+2 move back
constexpr Gpa kAck = kMailbox + 8;         // VMM -> L1: the last request done
constexpr Gpa kStarted = kMailbox + 16;    // L1 -> VMM: launched, start migrating
constexpr Gpa kAttempts = kMailbox + 24;   // VMM -> L1: migrations tried so far
// Migrations per run. Each takes a never-used frame while the pool has them
// (1024 spare), so a map kept on an old frame reads an old copy of the
// eVMCS rather than a frame reused for something else mid-run.
constexpr uint64_t kMaxMigrations = 512;

struct Config {
  int rounds = 20;
  int entries = 8;
  // Called on the L1 vCPU's thread after each round (progress).
  std::function<void(int rounds_done)> on_round = nullptr;
};

// What one round trip may take before the run counts as hung (about 12 µs in
// a release build here; sanitizer builds are up to 20 times slower), and
// what each round's memslot move away and back may take.
constexpr std::chrono::microseconds kRoundTripAllowance{1'000};
constexpr std::chrono::microseconds kRoundAllowance{100'000};

// What L1 saw.
struct Transcript {
  int round_trips = 0;
  int lost_exit_info = 0;     // an exit reason other than VMCALL in the page
  int lost_evmcs_writes = 0;  // VMREAD of guest RIP != what L1 wrote
  int ud_while_away = 0;      // VMRESUME with the memslot away: #UD
  int entered_while_away = 0; // ... or entered on a kept (stale) map
};
void to_json(nlohmann::json& j, const Transcript& t) {
  j = {{"round_trips", t.round_trips},
       {"lost_exit_info", t.lost_exit_info},
       {"lost_evmcs_writes", t.lost_evmcs_writes},
       {"ud_while_away", t.ud_while_away},
       {"entered_while_away", t.entered_while_away}};
}

// One round trip: a new guest RIP into the page, VMRESUME, then what L1
// finds after the exit — the reason in the page, the RIP through VMREAD.
GuestTask round_trip(uint64_t rip, Transcript& t) {
  co_await guest::evmcs_write(kEvmcs, vmx::field::kGuestRip, rip);
  co_await guest::vmresume();
  t.round_trips++;
  vmx::ExitReason reason = co_await guest::ExitInfo::from_evmcs(kEvmcs).reason();
  if (reason != vmx::ExitReason::kVmcall) t.lost_exit_info++;
  if (co_await guest::vmread(vmx::field::kGuestRip) != rip) t.lost_evmcs_writes++;
}

// The VMM moves the eVMCS memslot away; one entry; and back.
GuestTask entry_while_away(int round, Transcript& t) {
  uint64_t away = 2 * round + 1;
  co_await ops::write64(kRequest, away);
  co_await guest::wait_until_eq(kAck, away);
  cpu::OpResult r = co_await ops::vmresume();
  if (r.outcome == cpu::Outcome::fault && r.vector == cpu::kVectorUD)
    t.ud_while_away++;
  else if (r.ok())
    t.entered_while_away++;
  else
    throw guest::VmxError("VMRESUME with the eVMCS memslot away: " + cpu::to_string(r));
  co_await ops::write64(kRequest, away + 1);
  co_await guest::wait_until_eq(kAck, away + 1);
}

GuestTask l1_program(Config c, Transcript& t) {
  guest::L1Pages pages(kL1PagesStart, kL1PagesStart + 0x20000);
  co_await guest::enter_vmx(pages);
  co_await guest::enable_vp_assist(kVpAssist);
  co_await guest::init_evmcs(kEvmcs);
  co_await guest::load_evmcs(kVpAssist, kEvmcs);
  co_await guest::write_evmcs(kEvmcs, guest::vmcs12_for({.msr_bitmap = kMsrBitmap}),
                              vmx::evmcs_enlightenment::kMsrBitmap);
  co_await guest::vmlaunch();
  co_await ops::write64(kStarted, 1);
  // The first migration attempt before any check: from here on a kept map
  // is stale on unmanaged memory.
  co_await guest::wait_while_eq(kAttempts, 0);
  for (int round = 0; round < c.rounds; round++) {
    for (int k = 0; k < c.entries; k++)
      co_await round_trip(0x100000 + static_cast<uint64_t>(round) * 0x1000 + static_cast<uint64_t>(k) * 3, t);
    co_await entry_while_away(round, t);
    if (c.on_round) c.on_round(round + 1);
  }
  co_await guest::vmxoff();
}

// The VMM thread: memslot moves when L1 asks, migrations all along.
struct Vmm {
  NestedEnv& env;
  Hva evmcs_hva;
  uint64_t attempts = 0, moves = 0;
  uint64_t done = 0;  // the last request served
  std::chrono::steady_clock::time_point next_migration = std::chrono::steady_clock::now();

  void serve_once() {
    uint64_t req = env.read_u64(kRequest);
    if (req != done) {
      Gpa at = (req % 2) ? kEvmcs + kMoveStep : kEvmcs;
      Status st = env.vm->set_memory_region({kEvmcsSlot, 0, at, kPageSize, evmcs_hva});
      if (st) moves++;
      done = req;
      (void)env.write_u64(kAck, done);
    }
    if (attempts < kMaxMigrations && env.read_u64(kStarted) && std::chrono::steady_clock::now() >= next_migration) {
      (void)env.mm->migrate(evmcs_hva);  // EBUSY on managed memory while map pins it
      attempts++;
      (void)env.write_u64(kAttempts, attempts);
      next_migration = std::chrono::steady_clock::now() + std::chrono::microseconds(100);
    }
  }
  // Serves until `stop`, polling L1's request every 20 µs.
  void run(const std::atomic<bool>& stop) {
    host_wait_until([&] {
      if (stop.load()) return true;
      serve_once();
      return false;
    }, std::chrono::microseconds(20));
  }
};

void check_strategy(const RunOptions& o, const Config& c, const Transcript& t, const Vmm& vmm, SelftestResult& r) {
  uint64_t stale = r.counters[Counter::stale_accesses];
  uint64_t migrations = vmm.env.mm->counters().get(Counter::migrations);
  if (o.strategy == StrategyKind::map) {
    r.check(t.entered_while_away == c.rounds, "map: {} entries with the memslot away went ahead, expected {}",
            t.entered_while_away, c.rounds);
    r.check(stale > 0, "map: the kept eVMCS map was used after its memslot moved, yet no stale access was seen");
    r.note(fmt::format("map on {} memory: {} stale accesses through the kept eVMCS map ({} entries made with its "
                       "memslot away, {} VMREADs of a guest RIP L1 had changed, {} migrations, {} refused with EBUSY) "
                       "— the bug the seed fixes",
                       memory_kind_name(o.memory), stale, t.entered_while_away, t.lost_evmcs_writes, migrations,
                       vmm.env.mm->counters().get(Counter::migrate_ebusy)));
    return;
  }
  r.check(stale == 0, "{} stale accesses", stale);
  r.check(t.ud_while_away == c.rounds, "{} of {} entries with the eVMCS memslot away were #UD", t.ud_while_away,
          c.rounds);
  r.check(t.lost_exit_info == 0, "{} exits whose reason L1 did not find in its eVMCS", t.lost_exit_info);
  r.check(t.lost_evmcs_writes == 0, "{} guest RIPs L1 wrote that L0 did not see", t.lost_evmcs_writes);
  r.note(fmt::format("{}: {} round trips, {} migrations, {} memslot moves, {} cache refreshes, {} #UD with the "
                     "memslot away, 0 stale accesses",
                     strategy_name(o.strategy), t.round_trips, migrations, vmm.moves,
                     r.counters[Counter::cache_refreshes], t.ud_while_away));
}

void run_evmcs(const RunOptions& o, const Config& c, SelftestResult& r) {
  NestedEnvConfig ec{o.strategy, o.memory};
  ec.vcpus = 1;
  ec.l1_bytes = 8 << 20;
  auto env_r = NestedEnv::create(ec);
  if (!env_r) return r.fail(env_r.error().to_string());
  NestedEnv& env = **env_r;
  auto evmcs_hva = env.add_page_slot(kEvmcsSlot, kEvmcs);
  if (!evmcs_hva) return r.fail(evmcs_hva.error().to_string());

  Transcript t;
  env.machine->vcpu(0).nested().enable_evmcs();  // the VMM's KVM_CAP_HYPERV_ENLIGHTENED_VMCS
  env.machine->bind_l2_program(kEvmcs, guest::vmcall_forever());
  env.machine->set_l1_program(0, l1_program(c, t));
  std::atomic<bool> stop{false};
  Vmm vmm{env, *evmcs_hva};
  auto vmm_thread = host::start_thread("the VMM thread", [&] { vmm.run(stop); });
  if (!vmm_thread) return r.fail(vmm_thread.error().to_string());
  const uint64_t rounds = static_cast<uint64_t>(c.rounds), entries = static_cast<uint64_t>(c.entries);
  Status st = env.machine->run(std::max(run_watchdog(rounds * entries, kRoundTripAllowance),
                                        run_watchdog(rounds, kRoundAllowance)));
  stop.store(true);
  vmm_thread->join();

  CounterSnapshot k = env.counters();
  Leaks leaks = env.tear_down();
  r.counters = env.run_counters(std::span(&k, 1));
  r.details["transcript"] = t;
  r.details["migrations"] = env.mm->counters().get(Counter::migrations);
  r.details["migrate_ebusy"] = env.mm->counters().get(Counter::migrate_ebusy);
  r.details["migration_attempts"] = vmm.attempts;
  r.details["memslot_moves"] = vmm.moves;

  if (!r.check(static_cast<bool>(st), "{}", st ? std::string() : st.error().to_string())) return;
  r.check(t.round_trips == c.rounds * c.entries, "{} round trips, expected {}", t.round_trips, c.rounds * c.entries);
  r.check(vmm.moves == static_cast<uint64_t>(2 * c.rounds), "the VMM moved the eVMCS memslot {} times, expected {}",
          vmm.moves, 2 * c.rounds);
  r.check(vmm.attempts > 0, "the host tried no migration while L2 ran");
  r.check(leaks.none(), "leaked at teardown: {}", leaks.to_string());
  check_strategy(o, c, t, vmm, r);
}

OptionSpec rounds_option() {
  return int_option("--rounds", "rounds (each ends with a memslot move away and back)", "20", 1, 10000);
}
OptionSpec entries_option() { return int_option("--entries", "nested round trips per round", "8", 1, 10000); }

SelftestResult run(const RunOptions& o) {
  SelftestResult r;
  auto rounds = o.int_value(rounds_option());
  auto entries = o.int_value(entries_option());
  if (!rounds) return r.refuse(rounds.error().to_string()), r;
  if (!entries) return r.refuse(entries.error().to_string()), r;
  Config c{static_cast<int>(*rounds), static_cast<int>(*entries)};
  c.on_round = [&o, total = c.rounds](int done) { o.report_progress(done, total, "evmcs: rounds"); };
  run_evmcs(o, c, r);
  return r;
}

}  // namespace

void register_evmcs_selftest() {
  register_selftest({
      .name = "evmcs",
      .summary = "an enlightened L1 runs L2 while the host migrates the eVMCS page and the VMM moves its memslot",
      .description =
          "Seed patches 6-7. L1 uses the Hyper-V enlightened VMCS (VP-assist page, fields written straight into "
          "the eVMCS page, MSR-bitmap enlightenment) and runs an L2 for --rounds rounds of --entries round trips, "
          "checking each exit reason and guest RIP through the eVMCS; each round the VMM moves the eVMCS memslot "
          "away for one entry and back, and a host thread migrates the page all along. cache and oracle: zero "
          "stale accesses and #UD for the entry with the memslot away. map keeps its HostMap while the eVMCS is "
          "current: the stale accesses are detected and reported (the test passes by reporting them).",
      .options = {rounds_option(), entries_option()},
      .run = run,
  });
}

}  // namespace nestcache::workloads
