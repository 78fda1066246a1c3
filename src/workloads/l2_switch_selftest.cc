// Selftest `l2-switch`: the seed's vmx_l2_switch_test (patch 10), which
// checks the nested-context counters while L1 switches between L2 vCPUs
// (DESIGN.md §6).
//
// L1 runs N L2s (each its own vmcs12, MSR bitmap, APIC-access page and
// virtual-APIC page; each L2 runs VMCALL in a loop) for S rounds:
//   migrate  VMPTRLD, write the vmcs, VMLAUNCH, VMCALL exit, VMPTRST, VMCLEAR
//            (round 0 starts with VMCLEAR): an L2 vCPU migrating;
//   sched    round 0: VMCLEAR, VMPTRLD, write the vmcs, VMLAUNCH; later rounds
//            VMPTRLD + VMRESUME; VMCLEAR of every vmcs at the end: L2s
//            multiplexed on one L1 vCPU.
//   evmcs    an enlightened L1 (Hyper-V eVMCS): one VP-assist page, one eVMCS
//            per L2; each step names the L2's eVMCS in the VP-assist page,
//            writes every field into the page with the MSR-bitmap
//            enlightenment on, VMLAUNCH, VMCALL exit, guest RIP += 3 in the
//            page, VMRESUME, VMCALL exit. No VMCLEAR: L0 switches contexts
//            because the eVMCS address changes (clear the old, load the new).
//            One L1 vCPU, as the seed's (the eVMCS stays current on the L1
//            vCPU that last entered it).
// With --l1-vcpus M the steps are spread over M L1 vCPUs, one at a time in a
// fixed order (a token in L1 memory): L2 j runs its round r on L1 vCPU
// (j + r) mod M in migrate mode (it moves between L1 vCPUs), j mod M in sched.
// Capacity C = 8·M contexts. The seed's formulas, with C for 8:
//   N <= C            reuse = N·(S−1), recycle = 0
//   N > C, sched      reuse = C·(S−1), recycle = 0
// except that in sched mode an L1 vCPU that owns a single L2 never switches
// (its vmcs stays current): its L2 is left out of N.
//   N > C, migrate    reuse = 0,       recycle = N·S − C
//   N > C, evmcs      reuse = 0,       recycle = N·S − C
// Ours too: with cache on unmanaged memory and N <= C no remap window opens
// in rounds after the first (the contexts keep the caches mapped); after
// teardown no window, pin, context or active cache is left. With map there is
// no table: reuse and recycle are 0, and the windows per switch are reported.
#include <algorithm>

#include "guest/enlightened.h"
#include "guest/l1_pages.h"
#include "guest/l2_switch.h"
#include "guest/mailbox.h"
#include "guest/program.h"
#include "guest/vmx.h"
#include "guest/wait.h"
#include "vmx/evmcs.h"
#include "workloads/nested_env.h"

namespace nestcache::workloads {

namespace {

using namespace guest::program;
using guest::SwitchedL2;

constexpr int kMaxL2 = 16;
constexpr Gpa kToken = 0x80000;  // L1 word: the next step to run
constexpr Gpa kVpAssist = 0x90000;  // evmcs mode: the L1 vCPU's VP-assist page
constexpr Gpa kL2PagesStart = 0x400000;  // above the L1 vCPUs' allocators
constexpr Gpa kL1VcpuPages = 0x20000;    // each L1 vCPU's allocator: its VMXON region
constexpr size_t kL1Bytes = 8 << 20;

enum class Mode { migrate, sched, evmcs };
const char* mode_name(Mode m) {
  switch (m) {
    case Mode::migrate: return "migrate";
    case Mode::sched: return "sched";
    case Mode::evmcs: return "evmcs";
  }
  return "?";
}

struct Config {
  int l2 = 2, switches = 4, l1_vcpus = 1;
  Mode mode = Mode::migrate;
  int capacity() const { return vmx::kNestedOversubRatio * l1_vcpus; }
  int l1_vcpu_of(int j, int round) const { return mode == Mode::migrate ? (j + round) % l1_vcpus : j % l1_vcpus; }
  guest::SwitchMode switch_mode() const { return mode == Mode::migrate ? guest::SwitchMode::migrate : guest::SwitchMode::sched; }
};

// Host-side bookkeeping the L1 programs fill in as they go (test oracles).
struct Shared {
  std::vector<SwitchedL2> l2;
  // Remap windows and frame pins when each round began: map's cost of a
  // switch on unmanaged memory (windows) and on managed memory (pins).
  std::vector<uint64_t> windows_at_round, pins_at_round;
  host::PhysMem* phys = nullptr;
  void round_begins(int round) {
    windows_at_round[round] = phys->counters().get(Counter::remap_windows);
    pins_at_round[round] = phys->counters().get(Counter::pins);
  }
};

// The seed's eVMCS mode: each round, each L2's turn (guest::switch_to_enlightened).
GuestTask l1_evmcs_program(Config c, Shared& s) {
  guest::L1Pages pages(kL1PagesStart, kL1PagesStart + kL1VcpuPages);
  co_await guest::enter_vmx(pages);
  co_await guest::enable_vp_assist(kVpAssist);
  for (int round = 0; round < c.switches; round++) {
    for (int j = 0; j < c.l2; j++) {
      if (j == 0) s.round_begins(round);
      co_await guest::switch_to_enlightened(kVpAssist, s.l2[j]);
    }
  }
  co_await guest::vmxoff();
}

// L1 vCPU `me`: the steps (round, L2) it owns, in the order a token in L1
// memory hands them out.
GuestTask l1_program(Config c, Shared& s, int me) {
  guest::L1Pages pages(kL1PagesStart + static_cast<Gpa>(me) * kL1VcpuPages,
                       kL1PagesStart + static_cast<Gpa>(me + 1) * kL1VcpuPages);
  co_await guest::enter_vmx(pages);
  const int steps = c.l2 * c.switches;
  for (int k = 0; k < steps; k++) {
    int round = k / c.l2, j = k % c.l2;
    if (c.l1_vcpu_of(j, round) != me) continue;
    co_await guest::wait_until_eq(kToken, static_cast<uint64_t>(k));
    if (j == 0) s.round_begins(round);
    co_await guest::switch_to(s.l2[j], c.switch_mode(), round == 0);
    co_await cpu::ops::write64(kToken, k + 1);
  }
  co_await guest::wait_until_eq(kToken, static_cast<uint64_t>(steps));
  if (c.mode == Mode::sched)
    for (int j = me; j < c.l2; j += c.l1_vcpus) co_await guest::vmclear(s.l2[j].vmcs);
  co_await guest::vmxoff();
}

struct Expected {
  uint64_t reuse, recycle;
};

// The L2s that sched mode switches to on later rounds: those of every L1
// vCPU that owns two or more. An L1 vCPU that owns one L2 finds its vmcs
// still current, and a VMPTRLD of the current VMCS switches nothing.
uint64_t sched_switched_l2s(const Config& c) {
  uint64_t switched = 0;
  for (int me = 0; me < c.l1_vcpus; me++) {
    uint64_t owned = 0;
    for (int j = 0; j < c.l2; j++) owned += c.l1_vcpu_of(j, 0) == me ? 1 : 0;
    if (owned >= 2) switched += owned;
  }
  return switched;
}

// The seed's check_stats, with capacity C for its 8.
Expected expected(const Config& c) {
  uint64_t n = c.l2, s = c.switches, cap = c.capacity();
  if (c.mode == Mode::sched) return {std::min(sched_switched_l2s(c), cap) * (s - 1), 0};
  if (n <= cap) return {n * (s - 1), 0};
  return {0, n * s - cap};  // migrate and evmcs
}

void run_once(const RunOptions& o, const Config& c, SelftestResult& r) {
  std::string tag = fmt::format("{} N={} S={} M={} {}", mode_name(c.mode), c.l2, c.switches, c.l1_vcpus,
                                strategy_name(o.strategy));
  NestedEnvConfig ec{o.strategy, o.memory};
  ec.vcpus = c.l1_vcpus;
  ec.l1_bytes = kL1Bytes;
  auto env_r = NestedEnv::create(ec);
  if (!env_r) return r.fail(fmt::format("{}: {}", tag, env_r.error().to_string()));
  NestedEnv& env = **env_r;

  // The L2s' pages, from an area of L1 memory above the L1 vCPUs' allocators.
  Shared s;
  s.phys = env.phys.get();
  s.windows_at_round.assign(c.switches, 0);
  s.pins_at_round.assign(c.switches, 0);
  s.l2 = guest::lay_out_switched_l2s(kL2PagesStart, c.l2);
  for (const SwitchedL2& p : s.l2) {
    // A fresh vmcs12 region carries the VMCS revision; a fresh eVMCS its version.
    uint32_t rev = c.mode == Mode::evmcs ? vmx::kEvmcsRevision : vmx::kVmcs12Revision;
    if (auto st = env.vm->write_guest(p.vmcs, &rev, sizeof rev); !st) return r.fail(st.error().to_string());
    env.machine->bind_l2_program(p.vmcs, guest::vmcall_forever());
  }
  if (c.mode == Mode::evmcs) {
    // The VMM enables the capability (the seed's vcpu_enable_evmcs).
    env.machine->vcpu(0).nested().enable_evmcs();
    env.machine->set_l1_program(0, l1_evmcs_program(c, s));
  } else {
    for (int i = 0; i < c.l1_vcpus; i++) env.machine->set_l1_program(i, l1_program(c, s, i));
  }
  Status st = env.machine->run(std::chrono::milliseconds(60000));
  CounterSnapshot k = env.counters();
  uint64_t windows_end = env.phys->counters().get(Counter::remap_windows);
  uint64_t pins_end = env.phys->counters().get(Counter::pins);
  size_t contexts = 0;
  if (auto* t = env.machine->nested_contexts()) contexts = t->table().size();
  Leaks leaks = env.tear_down();
  // The pool's counters from PhysMem once the VM is gone (merge_run_counters):
  // the machine's count no window closed at teardown and no pin.
  k = env.run_counters(std::span(&k, 1));
  r.counters += k;

  if (!r.check(static_cast<bool>(st), "{}: {}", tag, st ? std::string() : st.error().to_string())) return;
  uint64_t reuse = k[Counter::nested_context_reuse], recycle = k[Counter::nested_context_recycle];
  uint64_t later_windows = windows_end - (c.switches > 1 ? s.windows_at_round[1] : windows_end);
  uint64_t later_pins = pins_end - (c.switches > 1 ? s.pins_at_round[1] : pins_end);
  uint64_t later_switches = static_cast<uint64_t>(c.l2) * (c.switches - 1);
  // With one round there is no switch after the first to measure: null, not 0.
  nlohmann::json per_switch, pins_per_switch;
  if (later_switches) {
    per_switch = double(later_windows) / double(later_switches);
    pins_per_switch = double(later_pins) / double(later_switches);
  }
  nlohmann::json d = {{"mode", mode_name(c.mode)},       {"l2", c.l2},
                      {"switches", c.switches},          {"l1_vcpus", c.l1_vcpus},
                      {"nested_context_reuse", reuse},   {"nested_context_recycle", recycle},
                      {"contexts", contexts},            {"remap_windows", windows_end},
                      {"remap_windows_after_round_0", later_windows},
                      {"remap_windows_per_switch", per_switch},
                      {"pins_per_switch", pins_per_switch}};
  r.check(leaks.none(), "{}: leaked at teardown: {}", tag, leaks.to_string());
  if (o.strategy == StrategyKind::map) {
    r.check(reuse == 0 && recycle == 0 && contexts == 0, "{}: map uses no nested contexts", tag);
    r.details["runs"].push_back(d);
    return;
  }
  Expected e = expected(c);
  d["expected_reuse"] = e.reuse;
  d["expected_recycle"] = e.recycle;
  r.details["runs"].push_back(d);
  r.check(reuse == e.reuse && recycle == e.recycle, "{}: reuse {} recycle {}, the seed's formula says {} and {}", tag,
          reuse, recycle, e.reuse, e.recycle);
  r.check(contexts <= static_cast<size_t>(c.capacity()), "{}: {} contexts above capacity {}", tag, contexts,
          c.capacity());
  if (o.strategy == StrategyKind::cache && o.memory == MemoryKind::unmanaged && c.l2 <= c.capacity())
    r.check(later_windows == 0, "{}: {} remap windows in switch rounds after the first (contexts should keep them)",
            tag, later_windows);
}

OptionSpec switches_option() { return int_option("--switches", "rounds over every L2", "4", 1, 1000); }
OptionSpec l1_vcpus_option() { return int_option("--l1-vcpus", "L1 vCPUs sharing the L2s", "1", 1, 8); }

SelftestResult run_l2_switch(const RunOptions& o) {
  SelftestResult r;
  auto switches = o.int_value(switches_option());
  auto l1_vcpus = o.int_value(l1_vcpus_option());
  if (!switches) return r.refuse(switches.error().to_string()), r;
  if (!l1_vcpus) return r.refuse(l1_vcpus.error().to_string()), r;
  std::vector<Mode> modes;
  std::string mode = o.string_option("mode", "all");
  if (mode == "migrate") modes = {Mode::migrate};
  else if (mode == "sched") modes = {Mode::sched};
  else if (mode == "evmcs") modes = {Mode::evmcs};
  else if (mode == "all") modes = {Mode::migrate, Mode::sched, Mode::evmcs};
  else return r.refuse(fmt::format("unknown --mode '{}': expected migrate, sched, evmcs or all", mode)), r;
  if (mode == "evmcs" && *l1_vcpus > 1)
    return r.refuse(fmt::format("--mode evmcs runs on one L1 vCPU, as the seed's (--l1-vcpus {} given)", *l1_vcpus)), r;
  if (mode == "all" && *l1_vcpus > 1) {
    modes.pop_back();
    r.note("evmcs mode runs on one L1 vCPU, as the seed's: left out of this sweep with --l1-vcpus > 1");
  }
  std::vector<int> counts;
  std::string l2 = o.string_option("l2", "sweep");
  if (l2 == "sweep") {
    for (int n = 2; n <= kMaxL2; n++) counts.push_back(n);
  } else {
    auto n = o.int_option("l2", 2);
    if (!n) return r.refuse(fmt::format("--l2 '{}' is neither a number of L2s (2..{}) nor 'sweep'", l2, kMaxL2)), r;
    if (*n < 2 || *n > kMaxL2) return r.refuse(fmt::format("--l2: {} is out of range: 2 to {}", l2, kMaxL2)), r;
    counts.push_back(static_cast<int>(*n));
  }
  uint64_t total = modes.size() * counts.size(), done = 0;
  for (Mode m : modes) {
    for (int n : counts) {
      Config c{n, static_cast<int>(*switches), static_cast<int>(*l1_vcpus), m};
      o.report_progress(done++, total, fmt::format("{} N={}", mode_name(m), n));
      run_once(o, c, r);
    }
  }
  uint64_t reuse = r.counters[Counter::nested_context_reuse], recycle = r.counters[Counter::nested_context_recycle];
  // Map's cost per entry: a remap window per page on unmanaged memory; on
  // managed memory, whose frames are permanently mapped, a pin instead.
  const bool managed = o.memory == MemoryKind::managed;
  const char* cost = managed ? "frame pins" : "remap windows";
  if (o.strategy == StrategyKind::map && *switches == 1) {
    // Round 0 loads every L2 for the first time: no switch after it to measure.
    r.note(fmt::format("map: no nested contexts (reuse 0, recycle 0); {} per L2 switch not measured: --switches 1 "
                       "runs no round after the first ({} {} in all on {} memory)",
                       cost, r.counters[managed ? Counter::pins : Counter::remap_windows], cost,
                       memory_kind_name(o.memory)));
  } else if (o.strategy == StrategyKind::map) {
    const char* field = managed ? "pins_per_switch" : "remap_windows_per_switch";
    double worst = 0;
    for (auto& d : r.details["runs"]) worst = std::max(worst, d[field].get<double>());
    r.note(fmt::format("map: no nested contexts (reuse 0, recycle 0); up to {:.1f} {} per L2 switch on {} memory{}",
                       worst, cost, memory_kind_name(o.memory),
                       managed ? " (no remap window: its frames are permanently mapped)" : ""));
  } else {
    r.note(fmt::format("{}: {} run{}, the seed's reuse/recycle formulas checked in {} ({} reuses, {} recycles in "
                       "all)",
                       strategy_name(o.strategy), total, total == 1 ? "" : "s", total == 1 ? "it" : "each", reuse,
                       recycle));
  }
  return r;
}

}  // namespace

void register_l2_switch_selftest() {
  register_selftest({
      .name = "l2-switch",
      .summary = "seed patch 10: L1 switches between N L2s; nested-context reuse and recycle counts",
      .description =
          "The seed's vmx_l2_switch_test. One L1 vCPU (8 contexts) runs N L2s (each VMCALLs in a loop) for S "
          "rounds, in migrate mode (VMPTRLD, VMLAUNCH, VMCLEAR each run) or sched mode (VMPTRLD + VMRESUME, "
          "VMCLEAR at the end), and checks the seed's nested_context_reuse / nested_context_recycle formulas. "
          "Also: no remap window after the first round with cache (N <= capacity), nothing leaked at teardown, "
          "and --l1-vcpus M spreading the L2s over M L1 vCPUs (capacity 8·M; migrate and sched only). evmcs mode "
          "runs an enlightened L1 (one eVMCS per L2, named in the VP-assist page; contexts keyed by the eVMCS "
          "address, switched when that address changes). Default: N = 2..16 in migrate, sched and evmcs.",
      .options = {value_option("--l2", "L2 vCPUs, 2..16, or 'sweep' for all of them", "sweep"),
                  switches_option(),
                  choice_option("--mode", "migrate, sched, evmcs or all", "all", {"migrate", "sched", "evmcs", "all"}),
                  l1_vcpus_option()},
      .run = run_l2_switch,
  });
}

}  // namespace nestcache::workloads
