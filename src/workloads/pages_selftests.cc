// Selftests `nested-pages` and `migrate-under-l2`: the pages workload
// (pages_workload.h) without and with the host changing the pages under L2.
#include "workloads/pages_workload.h"

namespace nestcache::workloads {

namespace {

OptionSpec rounds_option(const char* rounds) {
  return int_option("--rounds", "rounds of the workload (memory, CR8, APIC access, MSR, interrupts)", rounds, 1,
                    100000);
}
OptionSpec interrupts_option() { return int_option("--interrupts", "interrupts posted to L2 per round", "4", 0, 64); }
std::vector<OptionSpec> common_options(const char* rounds) { return {rounds_option(rounds), interrupts_option()}; }

Result<PagesWorkloadConfig> config_of(const RunOptions& o, const char* default_rounds, const char* test) {
  PagesWorkloadConfig c;
  c.rounds = static_cast<int>(NC_TRY(o.int_value(rounds_option(default_rounds))));
  c.interrupts_per_round = static_cast<int>(NC_TRY(o.int_value(interrupts_option())));
  std::string label = fmt::format("{}: rounds", test);
  c.on_round = [&o, rounds = c.rounds, label](int done) { o.report_progress(done, rounds, label); };
  return c;
}

uint64_t expected_vector_sum(const PagesWorkloadConfig& c) {
  uint64_t sum = 0;
  for (int i = 0; i < c.interrupts_per_round * c.rounds; i++) sum += posted_vector(i);
  return sum;
}

// Tears the VM down and fails `r` if it left a remap window, a pin or an
// active cache (Leaks::no_resources_left): unchecked, a window whose munmap
// kept failing would be unmapped by the VM's destructor outside the fault
// seam, and the run would pass with the failure unseen. Then takes the
// pool's counters from PhysMem (merge_run_counters): the machine's count
// the windows opened but not those closed at teardown, nor pins.
void check_teardown(NestedEnv& env, SelftestResult& r) {
  const Leaks leaks = env.tear_down();
  r.check(leaks.no_resources_left(), "leaked at teardown: {}", leaks.resources_to_string());
  r.counters = env.run_counters(std::span(&r.counters, 1));
}

SelftestResult run_nested_pages(const RunOptions& o) {
  SelftestResult r;
  auto c = config_of(o, "8", "nested-pages");
  if (!c) return r.refuse(c.error().to_string()), r;
  NestedEnvConfig ec{o.strategy, o.memory};
  ec.vcpus = 2;
  auto env = NestedEnv::create(ec);
  if (!env) return r.fail(env.error().to_string()), r;
  PagesTranscript t = run_pages_workload(**env, *c, r);
  check_teardown(**env, r);
  int n = c->rounds;
  r.check(t.rounds == n, "L2 completed {} rounds of {}", t.rounds, n);
  r.check(t.memory_mismatches == 0, "{} memory patterns L2 wrote were not seen by L1", t.memory_mismatches);
  r.check(t.tpr_checks == 3 * n, "{} TPR checks, expected {}", t.tpr_checks, 3 * n);
  r.check(t.lost_tpr_writes == 0, "{} CR8 writes did not reach the virtual-APIC page", t.lost_tpr_writes);
  r.check(t.apic_access_exits == n, "{} APIC-access exits, expected {}", t.apic_access_exits, n);
  r.check(t.msr_exits == (n + 1) / 2, "{} RDMSR exits, expected {} (intercepted on even rounds only)", t.msr_exits,
          (n + 1) / 2);
  r.check(t.interrupts_posted == c->interrupts_per_round * n, "{} interrupts posted, expected {}", t.interrupts_posted,
          c->interrupts_per_round * n);
  r.check(t.interrupts_received == t.interrupts_posted, "{} of {} posted interrupts received", t.interrupts_received,
          t.interrupts_posted);
  r.check(t.vector_sum == expected_vector_sum(*c), "vector sum {} != {}", t.vector_sum, expected_vector_sum(*c));
  r.check(r.counters[Counter::stale_accesses] == 0, "{} stale accesses", r.counters[Counter::stale_accesses]);
  r.note(fmt::format("{} nested entries, {} reflected exits, {} remap windows, {} maps", r.counters[Counter::nested_entries],
                     r.counters[Counter::reflected_exits], r.counters[Counter::remap_windows], r.counters[Counter::maps]));
  return r;
}

SelftestResult run_migrate_under_l2(const RunOptions& o) {
  SelftestResult r;
  auto c = config_of(o, "40", "migrate-under-l2");
  if (!c) return r.refuse(c.error().to_string()), r;
  c->churn = true;
  NestedEnvConfig ec{o.strategy, o.memory};
  ec.vcpus = 2;
  ec.retry_internal_errors = true;
  ec.stale_fatal = getenv("NESTCACHE_STALE_FATAL") != nullptr;
  auto env = NestedEnv::create(ec);
  if (!env) return r.fail(env.error().to_string()), r;
  PagesTranscript t = run_pages_workload(**env, *c, r);
  check_teardown(**env, r);
  uint64_t stale = r.counters[Counter::stale_accesses];
  uint64_t lost_tpr = r.counters[Counter::lost_tpr_writes];
  uint64_t lost_pi = r.counters[Counter::lost_posted_interrupts];
  r.check(t.rounds == c->rounds, "L2 completed {} rounds of {}", t.rounds, c->rounds);
  r.check(t.memory_mismatches == 0, "{} memory patterns L2 wrote were not seen by L1", t.memory_mismatches);
  r.check(t.churn_operations > 0, "the host changed nothing while L2 ran");
  r.details["migrations"] = (*env)->mm->counters().get(Counter::migrations);
  r.details["migrate_ebusy"] = (*env)->mm->counters().get(Counter::migrate_ebusy);
  if (o.strategy == StrategyKind::map) {
    // The kernel before the seed: nothing invalidates the maps. The scenario
    // passes by reporting what the detectors saw, and calls it the seed's
    // bug only when they saw something: a run of a round or two can end
    // before a change lands under a map L2 is using.
    const bool seen = stale + lost_tpr + lost_pi > 0;
    if (o.memory == MemoryKind::unmanaged)
      r.note(fmt::format("map on unmanaged memory: {} stale accesses, {} lost TPR writes, {} lost posted interrupts "
                         "detected{}",
                         stale, lost_tpr, lost_pi, seen ? " — the bug the seed fixes" : ""));
    else
      r.note(fmt::format("map on managed memory: pins made {} migrations fail with EBUSY; {} stale accesses",
                         (*env)->mm->counters().get(Counter::migrate_ebusy), stale));
  } else {
    r.check(stale == 0, "{} stale accesses", stale);
    r.check(lost_tpr == 0, "{} lost TPR writes", lost_tpr);
    r.check(lost_pi == 0, "{} lost posted interrupts", lost_pi);
    r.note(fmt::format("{}: {} cache invalidations, {} refreshes, {} cancelled entries, 0 stale accesses",
                       strategy_name(o.strategy), r.counters[Counter::cache_invalidations],
                       r.counters[Counter::cache_refreshes], r.counters[Counter::entry_cancels]));
  }
  return r;
}

}  // namespace

void register_nested_pages_selftest() {
  register_selftest({
      "nested-pages",
      "L2 uses memory, CR8, the APIC-access page, posted interrupts and MSRs; L1 checks what it saw",
      "One L2 under an L1 vmcs12 with EPT, TPR shadow, APIC-access virtualization, virtual-interrupt "
      "delivery, posted interrupts and MSR bitmaps. Each round L2 writes memory, writes CR8 (L1 checks "
      "the virtual-APIC page), touches the APIC-access page, reads an MSR that L1 intercepts on even "
      "rounds only (L1 changes its bitmap between entries), and receives interrupts L1's second vCPU "
      "posts. The guest-visible results are the same for every strategy.",
      common_options("8"),
      run_nested_pages,
  });
}

void register_migrate_under_l2_selftest() {
  register_selftest({
      "migrate-under-l2",
      "the host migrates the four vmcs02 pages and moves their memslots while L2 runs",
      "The nested-pages workload while a host thread migrates the MSR-bitmap, APIC-access, "
      "virtual-APIC and posted-interrupt-descriptor pages and moves their memslots away and back, "
      "over and over. With cache and oracle: zero stale accesses, zero lost TPR writes, zero lost "
      "posted interrupts. With map on unmanaged memory the stale accesses are detected and reported "
      "(that is the bug the seed fixes; the test passes by reporting them).",
      common_options("40"),
      run_migrate_under_l2,
  });
}

}  // namespace nestcache::workloads
