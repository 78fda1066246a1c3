// The soak run: the pages workload, L2 switching past the context capacity,
// VMM page churn and nested-state migration, all at once (see stress.h).
#include "workloads/stress.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <string>
#include <thread>

#include "guest/l1_pages.h"
#include "guest/l2_switch.h"
#include "guest/mailbox.h"
#include "guest/posted_interrupts.h"
#include "guest/program.h"
#include "guest/vmx.h"
#include "host/fault_injection.h"
#include "vmx/nested_state_format.h"
#include "workloads/nested_state_migration.h"
#include "workloads/pages_workload.h"
#include "workloads/progress.h"

namespace nestcache::workloads {

namespace {

using namespace guest::program;
using guest::SwitchedL2;
using Clock = std::chrono::steady_clock;

constexpr int kPagesVcpus = 2;   // the pages workload's L2 and its interrupt poster
constexpr int kSwitchVcpus = 2;  // L1 vCPUs switching between L2s
constexpr int kL1Vcpus = kPagesVcpus + kSwitchVcpus;
constexpr int kContextCapacity = vmx::kNestedOversubRatio * kL1Vcpus;
// Past the capacity, so that loads find every context attached or recycle one.
constexpr int kSwitchedL2s = kContextCapacity + 8;
// L1 memory of the switching vCPUs, above the pages workload's: each vCPU's
// page allocator (its VMXON region), then the switched L2s' pages.
constexpr Gpa kSwitchVcpuPages = 0x20000;
constexpr Gpa kSwitchPagesStart = kPagesL1End;
constexpr Gpa kSwitchL2Start = kSwitchPagesStart + kSwitchVcpus * kSwitchVcpuPages;
constexpr auto kVmmPause = std::chrono::microseconds(50);
constexpr int kSaveEvery = 16;  // VMM operations between two nested-state saves
constexpr int kMigrationSteps = 16;
// Whether an epoch's VMM thread catches L2 running for a save, or its pages
// workload's host thread gets a change in, depends on the scheduler: a run
// whose time is up goes on for up to this many more epochs until both have
// happened at least once.
constexpr int kEpochsPastTheTime = 50;

// One switching L1 vCPU: turns of its L2s in migrate mode (each a fresh
// VMPTRLD, so past the capacity every load recycles a context), round after
// round, until the pages workload's L1 is done.
GuestTask switch_program(std::vector<SwitchedL2> mine, Gpa pages_start) {
  guest::L1Pages pages(pages_start, pages_start + kSwitchVcpuPages);
  co_await guest::enter_vmx(pages);
  for (bool first = true;; first = false) {
    for (const SwitchedL2& l2 : mine) co_await guest::switch_to(l2, guest::SwitchMode::migrate, first);
    if (co_await ops::read64(kPagesDoneWord) == guest::kStopPosting) break;
  }
  co_await guest::vmxoff();
}

// What an epoch's VMM thread did.
struct VmmChurn {
  uint64_t saves = 0;
  std::string error;  // empty: no failure
};

// The epoch's VMM thread: migrates and discards the switched L2s' pages in
// turn (a migration of a page a discard left absent is EFAULT, and one of a
// pinned page EBUSY: both are part of the churn), and every kSaveEvery
// operations, while L2 runs, takes vCPU 0's nested state, which must decode.
void vmm_churn(NestedEnv& env, const std::vector<Hva>& pages, VmmChurn& out, const std::atomic<bool>& stop) {
  // Saves only while vCPU 0 runs nested (it has entered L2 and the pages
  // workload is not done): that is when a VMM's save must catch L2 mid-run.
  auto l2_running = [&env] {
    return env.machine->vcpu(0).counters().get(Counter::nested_entries) > 0 &&
           env.read_u64(kPagesDoneWord) != guest::kStopPosting;
  };
  for (uint64_t n = 0; !stop.load(); n++) {
    if (n % kSaveEvery == 0 && l2_running()) {
      auto blob = env.machine->get_nested_state(0);
      if (!blob) {
        out.error = fmt::format("taking vCPU 0's nested state: {}", blob.error().to_string());
        return;
      }
      if (auto image = vmx::decode(*blob); !image) {
        out.error = fmt::format("vCPU 0's nested state does not decode: {}", image.error().to_string());
        return;
      }
      out.saves++;
    }
    Hva page = pages[n % pages.size()];
    if (n % 2)
      (void)env.mm->migrate(page);
    else
      (void)env.mm->discard(page, kPageSize);
    std::this_thread::sleep_for(kVmmPause);
  }
}

// Everything one strategy's epochs add up to.
struct Totals {
  int epochs = 0;
  uint64_t churn_operations = 0;  // the pages workload's migrations and memslot moves
  uint64_t saves = 0;
  uint64_t migrations = 0, migrate_ebusy = 0, discards = 0;
  CounterSnapshot counters;
  Teardown teardown;
  bool stopped_early = false;  // a stop request ended the run before its time

  // Every churn the soak is made of has happened at least once (the
  // migration thread sees to its own).
  bool every_churn_ran() const { return churn_operations > 0 && saves > 0; }
};

// Lays out the switched L2s in `env` and gives vCPUs 2 and up their
// programs; returns the hvas of the pages the VMM thread churns.
Result<std::vector<Hva>> set_up_switching(NestedEnv& env) {
  std::vector<SwitchedL2> l2s = guest::lay_out_switched_l2s(kSwitchL2Start, kSwitchedL2s);
  std::vector<std::vector<SwitchedL2>> by_vcpu(kSwitchVcpus);
  std::vector<Hva> churned;
  for (size_t j = 0; j < l2s.size(); j++) {
    const SwitchedL2& p = l2s[j];
    uint32_t rev = vmx::kVmcs12Revision;  // a fresh vmcs12 region carries the revision
    NC_TRY(env.vm->write_guest(p.vmcs, &rev, sizeof rev));
    env.machine->bind_l2_program(p.vmcs, guest::vmcall_forever());
    by_vcpu[j % kSwitchVcpus].push_back(p);
    for (Gpa g : {p.msr_bitmap, p.apic_access, p.virtual_apic}) churned.push_back(env.l1_base + g);
  }
  for (int i = 0; i < kSwitchVcpus; i++)
    env.machine->set_l1_program(kPagesVcpus + i, switch_program(by_vcpu[i], kSwitchPagesStart + i * kSwitchVcpuPages));
  return churned;
}

// One epoch: a VM, its programs and its VMM thread, run to the end of the
// pages workload and torn down. Failures go into `r` prefixed with the epoch.
// `show_progress` draws the progress line for round `rounds_done` of it.
void run_epoch(const StressOptions& o, StrategyKind s, Totals& tot, SelftestResult& r,
               const std::function<void(int epoch, int rounds_done)>& show_progress) {
  const int epoch = ++tot.epochs;
  NestedEnvConfig ec{s, o.memory};
  ec.vcpus = kL1Vcpus;
  ec.retry_internal_errors = true;  // as migrate-under-l2: L1 retries entries a moved slot made fail
  auto env_r = NestedEnv::create(ec);
  if (!env_r) return r.fail(fmt::format("epoch {}: {}", epoch, env_r.error().to_string()));
  NestedEnv& env = **env_r;

  auto churned = set_up_switching(env);
  VmmChurn vmm;
  std::atomic<bool> stop{false};
  std::thread vmm_thread;
  SelftestResult e;
  PagesTranscript t;
  if (!churned) {
    e.fail(churned.error().to_string());
  } else if (auto started = host::start_thread("the stress VMM thread",
                                               [&] { vmm_churn(env, *churned, vmm, stop); });
             !started) {
    e.fail(started.error().to_string());
  } else {
    vmm_thread = std::move(*started);
    PagesWorkloadConfig pc;
    pc.rounds = static_cast<int>(o.rounds);
    pc.churn = true;
    // An epoch of many rounds lasts minutes: the line follows its rounds, a
    // hundred steps an epoch at most.
    const int step = std::max(1, pc.rounds / 100);
    pc.on_round = [&, epoch, step](int done) {
      if (done % step == 0 || done == pc.rounds) show_progress(epoch, done);
    };
    // The VMM thread is joined whatever happens to the run.
    try {
      t = run_pages_workload(env, pc, e);
    } catch (const std::exception& ex) {
      e.fail(fmt::format("the pages workload: {}", ex.what()));
    }
    stop.store(true);
    vmm_thread.join();
    e.check(t.rounds == pc.rounds, "L2 completed {} rounds of {}", t.rounds, pc.rounds);
    e.check(t.memory_mismatches == 0, "{} memory patterns L2 wrote were not seen by L1", t.memory_mismatches);
    e.check(vmm.error.empty(), "{}", vmm.error);
  }
  tot.teardown.add(env.tear_down());

  const CounterSnapshot mm = CounterSnapshot::of(env.mm->counters());
  tot.counters += env.run_counters(std::span(&e.counters, 1));
  tot.churn_operations += t.churn_operations;
  tot.saves += vmm.saves;
  tot.migrations += mm[Counter::migrations];
  tot.migrate_ebusy += mm[Counter::migrate_ebusy];
  tot.discards += mm[Counter::discards];
  for (const std::string& f : e.failures) r.fail(fmt::format("epoch {}: {}", epoch, f));
  if (o.verbose) r.details["epoch_transcripts"].push_back(t);
}

// What the nested-state migration thread did.
struct MigrationChurn {
  uint64_t migrations = 0;
  CounterSnapshot counters;
  Teardown teardown;  // what the source and destination VMs left
  std::string error;  // empty: no failure
};

// One mid-L2 migration from a source VM to a fresh one; the restored run
// must end with the source's transcript. Returns what went wrong, or "".
std::string migrate_once(const nested_state::MigrationConfig& c, MigrationChurn& out) {
  nested_state::SourceRun src = nested_state::run_source(c, true);
  out.counters += src.counters;
  out.teardown.add(src.leaks);
  if (!src.run) return fmt::format("source: {}", src.run.error().to_string());
  if (src.blob.empty()) return "source: no nested state was taken";
  nested_state::RestoredRun dst = nested_state::run_restored(c, src.memory, src.blob, {}, src.vp_assist_msr);
  out.counters += dst.counters;
  out.teardown.add(dst.leaks);
  if (!dst.set) return fmt::format("restore: {}", dst.set.error().to_string());
  if (!dst.run) return fmt::format("restored run: {}", dst.run.error().to_string());
  if (dst.transcript != src.transcript) return "the restored run's transcript differs from the source's";
  out.migrations++;
  return {};
}

// The nested-state migration thread: migrate_once over and over until
// `stop` or a failure. Nothing escapes the thread.
void migrate_mid_l2(StrategyKind s, MemoryKind m, MigrationChurn& out, const std::atomic<bool>& stop) {
  const nested_state::MigrationConfig c{.strategy = s, .memory = m, .steps = kMigrationSteps};
  try {
    // At least one migration completes, however short the run.
    while ((!stop.load() || out.migrations == 0) && out.error.empty()) out.error = migrate_once(c, out);
  } catch (const std::exception& ex) {
    out.error = ex.what();
  }
  if (!out.error.empty()) out.error = fmt::format("nested-state migration {}: {}", out.migrations + 1, out.error);
}

bool stop_requested(const StressOptions& o) { return o.stop && o.stop->load(); }

// The checks of a finished run and its summary sentences.
void judge(const StressOptions& o, StrategyKind s, const Totals& tot, const MigrationChurn& mig, SelftestResult& r) {
  const uint64_t stale = r.counters[Counter::stale_accesses];
  const uint64_t lost_tpr = r.counters[Counter::lost_tpr_writes];
  const uint64_t lost_pi = r.counters[Counter::lost_posted_interrupts];
  r.check(tot.teardown.none(), "leaked at teardown: {}", tot.teardown.to_string());
  // A run stopped early may have been too short for every churn to happen;
  // one that ran its time (and the epochs past it) must show each.
  if (!tot.stopped_early) {
    r.check(tot.churn_operations > 0, "the pages workload's host thread changed nothing");
    r.check(tot.saves > 0, "no nested state was taken during the epochs");
  }
  r.check(mig.migrations > 0, "no mid-L2 nested-state migration completed");
  if (s == StrategyKind::map) {
    // Only what was seen is called the seed's bug: on managed memory the
    // pins of map's mappings can keep every page in place for a whole run.
    const bool seen = stale + lost_tpr + lost_pi > 0;
    r.note(fmt::format("map on {} memory: {} stale accesses, {} lost TPR writes, {} lost posted interrupts detected{}",
                       memory_kind_name(o.memory), stale, lost_tpr, lost_pi,
                       seen ? " — the bug the seed fixes, reported, not a failure" : ""));
  } else {
    r.check(stale == 0, "{} stale accesses", stale);
    r.check(lost_tpr == 0, "{} lost TPR writes", lost_tpr);
    r.check(lost_pi == 0, "{} lost posted interrupts", lost_pi);
    r.check(r.counters[Counter::nested_context_recycle] > 0, "no nested context was recycled past the capacity");
  }
  r.note(fmt::format("{} epochs, {} migrations ({} EBUSY), {} discards, {} pages-workload churn operations, {} "
                     "nested-state saves, {} mid-L2 migrations, {} context recycles",
                     tot.epochs, tot.migrations, tot.migrate_ebusy, tot.discards, tot.churn_operations, tot.saves,
                     mig.migrations, r.counters[Counter::nested_context_recycle]));
  if (tot.stopped_early) r.note(fmt::format("stopped early, as asked, after {} epochs", tot.epochs));
  r.note(fmt::format("teardown: {}", tot.teardown.to_string()));
}

}  // namespace

Status validate(const StressOptions& o) {
  if (!(o.seconds > 0) || !(o.seconds <= kMaxStressSeconds))
    return errorf(EINVAL, "--seconds: {} is out of range: more than 0, at most {}", o.seconds, kMaxStressSeconds);
  if (o.rounds < 1 || o.rounds > kMaxStressRounds)
    return errorf(EINVAL, "--rounds: {} is out of range: 1 to {}", o.rounds, kMaxStressRounds);
  if (o.strategies.empty()) return errorf(EINVAL, "--strategy names no strategy");
  return ok();
}

SelftestResult run_stress(const StressOptions& o, StrategyKind s) {
  SelftestResult r;
  if (auto st = validate(o); !st) return r.refuse(st.error().to_string()), r;
  const ProcessResources before = ProcessResources::now();
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.seconds));
  Totals tot;
  MigrationChurn mig;
  {
    std::atomic<bool> stop{false};
    auto migrator = host::start_thread("the nested-state migration thread",
                                       [&] { migrate_mid_l2(s, o.memory, mig, stop); });
    if (!migrator) {
      r.fail(migrator.error().to_string());
    } else {
      // A started epoch always finishes; a failed one ends the run, and so
      // does a stop request. Past the time, the run goes on only until every
      // churn has run.
      // The bar is the strategy's time; the label names the epoch and,
      // once one has run, the round it is on.
      auto show_progress = [&](int epoch, int rounds_done) {
        if (!o.progress) return;
        const std::chrono::duration<double> done = Clock::now() - start;
        const std::string label =
            rounds_done == 0 ? fmt::format("stress {}: epoch {}", strategy_name(s), epoch)
                             : fmt::format("stress {}: epoch {}, round {} of {}", strategy_name(s), epoch,
                                           rounds_done, o.rounds);
        o.progress->update(static_cast<uint64_t>(std::min(done.count(), o.seconds) * 1000),
                           static_cast<uint64_t>(o.seconds * 1000), label);
      };
      int past_the_time = 0;
      do {
        show_progress(tot.epochs + 1, 0);
        run_epoch(o, s, tot, r, show_progress);
        const bool in_time = Clock::now() < deadline;
        tot.stopped_early = stop_requested(o) && (in_time || !tot.every_churn_ran());
        if (!in_time) past_the_time++;
      } while (r.passed && !stop_requested(o) &&
               (Clock::now() < deadline || (!tot.every_churn_ran() && past_the_time < kEpochsPastTheTime)));
      stop.store(true);
      migrator->join();
    }
  }
  if (!mig.error.empty()) r.fail(mig.error);
  tot.teardown.add(mig.teardown);
  tot.teardown.take_process(before);
  r.counters = tot.counters;
  r.counters += mig.counters;
  std::chrono::duration<double> took = Clock::now() - start;
  r.details["epochs"] = tot.epochs;
  r.details["seconds"] = took.count();
  r.details["stopped_early"] = tot.stopped_early;
  r.details["rounds_per_epoch"] = o.rounds;
  r.details["l1_vcpus"] = kL1Vcpus;
  r.details["l2_vcpus"] = kSwitchedL2s + 1;
  r.details["context_capacity"] = kContextCapacity;
  r.details["migrations"] = tot.migrations;
  r.details["migrate_ebusy"] = tot.migrate_ebusy;
  r.details["discards"] = tot.discards;
  r.details["pages_churn_operations"] = tot.churn_operations;
  r.details["nested_state_saves"] = tot.saves;
  r.details["nested_state_migrations"] = mig.migrations;
  r.details["teardown"] = tot.teardown;
  judge(o, s, tot, mig, r);
  return r;
}

}  // namespace nestcache::workloads
