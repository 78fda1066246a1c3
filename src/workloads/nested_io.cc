#include "workloads/nested_io.h"

#include <algorithm>
#include <random>

#include "guest/apic_timer.h"
#include "guest/ept12.h"
#include "guest/io_l2.h"
#include "guest/l1_pages.h"
#include "guest/l1_vmm.h"
#include "guest/posted_interrupts.h"
#include "guest/program.h"
#include "guest/vmcs12_pages.h"
#include "guest/vmx.h"
#include "guest/wait.h"
#include "workloads/nested_env.h"

namespace nestcache::workloads {

namespace {

using namespace guest::program;
using vmx::ExitReason;

// L1 memory: each L1 vCPU's page allocator (VMXON and VMCS regions, each L2's
// vmcs12 pages; vCPU 0's also holds EPT12), the page the vCPUs hand-shake
// through, and the L1 pages backing L2 memory.
constexpr size_t kL1Bytes = 32 << 20;
constexpr Gpa kPagesPerVcpu = 2 << 20;
constexpr Gpa kSyncPage = 0x1200000;
constexpr Gpa kReadyWord = kSyncPage, kEptpWord = kSyncPage + 8;
constexpr Gpa kBacking = 0x1400000;
// L2 memory: per L2 vCPU a ring page and its working set, from L2 address 0;
// the doorbell is an MMIO page above it.
constexpr uint64_t kWorkPages = 16;
constexpr uint64_t kPagesPerL2 = 1 + kWorkPages;
constexpr Gpa kDoorbell = 0xfeb00000;
constexpr uint8_t kCompletionVector = guest::kFirstPostedVector + 1;
// HLT exits of one L2 still waiting for its completion, after which L1 gives
// up on it: the completion was lost.
constexpr uint64_t kMaxWaitingHalts = 1000;

// One L2 vCPU as its L1 vCPU keeps it.
struct IoL2 {
  uint32_t index = 0;  // among all L2 vCPUs
  Gpa vmcs = 0, msr_bitmap = 0, apic_access = 0, virtual_apic = 0, pi_desc = 0;
  Gpa ring_l1 = 0;     // its ring page, L1 address
};

// What one L1 vCPU runs.
struct IoL1Setup {
  int vcpu = 0;
  std::vector<IoL2> l2;
  uint64_t l2_pages = 0;     // all of L2 memory (vCPU 0 maps it in EPT12)
  uint64_t interval_ns = 0;  // between two requests of one L2
  uint64_t stagger_ns = 0;   // between the first requests of L2 j and j + 1
  uint64_t tick_ns = 0;
};

Gpa l2_ring(uint32_t j) { return static_cast<Gpa>(j) * kPagesPerL2 * kPageSize; }

// Idles L1 until `target` on its own clock: time passes (TPAUSE), and each
// timer tick on the way is taken with HLT, as an idle L1 vCPU takes it.
// `timer_start` is a time read just after the timer was started, so each
// tick it predicts has fired by then. With `time_idle` (the wall clock,
// whose time has no idle part) the TPAUSEs' time is added to t.idle_ns; the
// ticks' HLT exits count as busy, as modelled time charges them.
GuestTask idle_until(uint64_t target, uint64_t timer_start, uint64_t tick_ns, IoVcpuTally& t, bool time_idle) {
  auto pause_until = [&t, time_idle](uint64_t until) -> GuestTask {
    const uint64_t from = time_idle ? co_await ops::now() : 0;
    co_await ops::tpause(until);
    if (time_idle) t.idle_ns += co_await ops::now() - from;
  };
  for (;;) {
    uint64_t now = co_await ops::now();
    if (now >= target) co_return;
    if (tick_ns) {
      uint64_t next_tick = timer_start + ((now - timer_start) / tick_ns + 1) * tick_ns;
      if (next_tick <= target) {
        co_await pause_until(next_tick);
        uint64_t vector = (co_await ops::exec(cpu::GuestOp::Hlt{})).value;
        if (vector == guest::L1Vmm::kTimerVector) t.idle_ticks++;
        continue;
      }
    }
    co_await pause_until(target);
  }
}

// Maps all of L2 memory and the doorbell in EPT12 (vCPU 0), publishes the EPT
// pointer; the other vCPUs wait for it. Returns the EPT pointer.
GuestFn<uint64_t> share_ept12(const IoL1Setup& s, guest::L1Pages& pages) {
  if (s.vcpu != 0) {
    co_await guest::wait_until_eq(kReadyWord, 1, guest::Poll::locked);
    co_return co_await ops::read64(kEptpWord);
  }
  guest::Ept12 ept(pages);
  for (uint64_t p = 0; p < s.l2_pages; p++) co_await ept.map(p * kPageSize, kBacking + p * kPageSize);
  co_await ept.map_mmio(kDoorbell);
  co_await ops::write64(kEptpWord, ept.eptp());
  co_await ops::cmpxchg64(kReadyWord, 0, 1);  // locked: orders the EPT pointer before it
  co_return ept.eptp();
}

// Prepares the vmcs12 of each L2 of this vCPU: every page L0 reaches per
// entry, HLT exiting (an idle L2 halts in L1), the TSC deadline intercepted.
GuestTask prepare_l2s(const IoL1Setup& s, uint64_t eptp) {
  for (const IoL2& x : s.l2) {
    co_await guest::init_region(x.vmcs);
    co_await guest::vmclear(x.vmcs);
    co_await guest::vmptrld(x.vmcs);
    vmx::Vmcs12 v = guest::all_pages_vmcs12(eptp, x.msr_bitmap, x.apic_access, x.virtual_apic, x.pi_desc);
    v.primary_proc_controls |= vmx::proc::kHltExiting;
    co_await guest::write_vmcs(v);
    co_await guest::set_msr_intercept(x.msr_bitmap, vmx::msr::kIa32TscDeadline, true, true);
  }
}

// Handles one exit of L2 `x`. Returns false when L1 leaves it: it halted
// with nothing to take (idle), or ended (`ended` set).
GuestFn<bool> handle_io_exit(const IoL2& x, uint32_t apic_id, uint64_t& posted, bool& ended, IoVcpuTally& t) {
  ExitReason reason = co_await guest::basic_exit_reason();
  switch (reason) {
    case ExitReason::kEptMisconfig: {
      uint64_t gpa = co_await guest::vmread(vmx::field::kGuestPhysicalAddress);
      if ((gpa & kPageMask) != kDoorbell) throw guest::VmxError(fmt::format("MMIO exit at {:#x}", gpa));
      co_await guest::io_complete(x.ring_l1, x.pi_desc, kCompletionVector, apic_id);
      t.doorbells++;
      t.posted++;
      posted++;
      co_return true;
    }
    case ExitReason::kMsrWrite:
      t.msr_exits++;  // L1 KVM arms its emulated TSC-deadline timer
      co_return true;
    case ExitReason::kExternalInterrupt: {
      uint64_t info = co_await guest::vmread(vmx::field::kExitInterruptionInfo);
      if ((info & vmx::intr_info::kVectorMask) != guest::L1Vmm::kTimerVector)
        throw guest::VmxError(fmt::format("unexpected interrupt {:#x} in L2", info & vmx::intr_info::kVectorMask));
      t.nested_ticks++;
      co_return true;
    }
    case ExitReason::kHlt: {
      uint64_t received = co_await ops::read64(x.ring_l1 + guest::io_ring::kReceived);
      if (received >= posted) {
        t.idle_halts++;
        co_return false;
      }
      // The completion is not in its virtual IRR yet: notify again, as KVM
      // re-checks a pending posted interrupt before it blocks a vCPU.
      t.waiting_halts++;
      co_await ops::send_ipi(apic_id, guest::kNotificationVector);
      co_return true;
    }
    case ExitReason::kVmcall:
      ended = true;
      co_return false;
    default:
      throw guest::VmxError(fmt::format("unexpected L2 exit: {}", vmx::exit_reason_name(reason)));
  }
}

GuestTask io_l1(const IoL1Setup& s, const NestedIoConfig& c, IoVcpuTally& t) {
  guest::L1Pages pages(kL1PagesStart + s.vcpu * kPagesPerVcpu, kL1PagesStart + (s.vcpu + 1) * kPagesPerVcpu);
  co_await guest::enter_vmx(pages);
  uint64_t eptp = co_await share_ept12(s, pages);
  co_await prepare_l2s(s, eptp);
  const size_t n = s.l2.size();
  if (s.tick_ns) co_await guest::start_timer(static_cast<uint32_t>(s.tick_ns), guest::L1Vmm::kTimerVector);
  const uint64_t start = co_await ops::now();
  const Stopwatch watch;
  std::vector<uint64_t> next(n), posted(n, 0);
  std::vector<char> launched(n, 0), ended(n, 0);
  // Poisson arrivals per L2 (exponential gaps, a fixed seed per L2), as an
  // open-loop load generator offers them: the L1 ticks then fall anywhere
  // in a request's life, not at one phase of it.
  std::vector<std::mt19937_64> rng;
  std::exponential_distribution<double> gap(1.0 / static_cast<double>(s.interval_ns));
  for (size_t k = 0; k < n; k++) {
    rng.emplace_back(s.l2[k].index + 1);
    next[k] = start + s.l2[k].index * s.stagger_ns;
  }
  size_t current = n, left = n;
  bool cold_done = false;
  while (left) {
    size_t k = n;
    for (size_t i = 0; i < n; i++)
      if (!ended[i] && (k == n || next[i] < next[k])) k = i;
    co_await idle_until(next[k], start, s.tick_ns, t, c.clock == cpu::ClockKind::wall);
    if (k != current) {
      co_await guest::vmptrld(s.l2[k].vmcs);
      if (current != n) t.switches++;
      current = k;
    }
    const uint64_t waits_before = t.waiting_halts;
    for (;;) {
      if (t.waiting_halts - waits_before > kMaxWaitingHalts)
        throw guest::VmxError(fmt::format("L2 {} never got its completion interrupt", s.l2[k].index));
      if (!launched[k]) {
        launched[k] = 1;
        co_await guest::vmlaunch();
      } else {
        co_await guest::vmresume();
      }
      bool done = false;
      bool again = co_await handle_io_exit(s.l2[k], static_cast<uint32_t>(s.vcpu), posted[k], done, t);
      if (done) {
        ended[k] = 1;
        left--;
      }
      if (!again) break;
    }
    next[k] += static_cast<uint64_t>(gap(rng[k]));
    if (!cold_done) {
      t.cold = watch.elapsed();
      cold_done = true;
    }
    if (s.vcpu == 0 && c.on_request) c.on_request(co_await ops::read64(s.l2[k].ring_l1 + guest::io_ring::kServed));
  }
  t.elapsed_ns = co_await ops::now() - start;
  t.loop = watch.elapsed();
  if (s.tick_ns) co_await guest::stop_timer();
  for (const IoL2& x : s.l2) {
    t.requests += co_await ops::read64(x.ring_l1 + guest::io_ring::kServed);
    t.received += co_await ops::read64(x.ring_l1 + guest::io_ring::kReceived);
    t.bad += co_await ops::read64(x.ring_l1 + guest::io_ring::kBad);
    co_await guest::vmclear(x.vmcs);
  }
  co_await guest::vmxoff();
}

// Lays out the L2s of each L1 vCPU (L2 j on L1 vCPU j mod l1_vcpus) and binds
// their programs.
std::vector<IoL1Setup> lay_out(const NestedIoConfig& c, cpu::Machine& m) {
  const IoOptions& io = c.io;
  std::vector<IoL1Setup> setups(io.l1_vcpus);
  for (uint32_t i = 0; i < io.l1_vcpus; i++) {
    setups[i].vcpu = static_cast<int>(i);
    setups[i].l2_pages = io.l2_vcpus * kPagesPerL2;
    setups[i].stagger_ns = 1'000'000'000ull / io.rate;
    setups[i].interval_ns = setups[i].stagger_ns * io.l2_vcpus;
    setups[i].tick_ns = c.l1_hz ? 1'000'000'000ull / c.l1_hz : 0;
  }
  // The L2s' vmcs12 pages come from the top of each vCPU's allocator range,
  // below what io_l1's allocator hands out from the bottom.
  std::vector<Gpa> top(io.l1_vcpus);
  for (uint32_t i = 0; i < io.l1_vcpus; i++) top[i] = kL1PagesStart + (i + 1) * kPagesPerVcpu;
  for (uint32_t j = 0; j < io.l2_vcpus; j++) {
    uint32_t i = j % io.l1_vcpus;
    top[i] -= 5 * kPageSize;
    Gpa b = top[i];
    IoL2 x{j, b, b + kPageSize, b + 2 * kPageSize, b + 3 * kPageSize, b + 4 * kPageSize, kBacking + l2_ring(j)};
    setups[i].l2.push_back(x);
    guest::IoL2Config l2{.ring = l2_ring(j),
                         .work_area = l2_ring(j) + kPageSize,
                         .work_pages = kWorkPages,
                         .work = io.work,
                         .requests = c.requests_per_l2,
                         .doorbell = kDoorbell,
                         .queue = j,
                         .msr_every = io.msr_every,
                         .vector = kCompletionVector};
    m.bind_l2_program(x.vmcs, guest::io_l2(l2));
  }
  return setups;
}

}  // namespace

IoVcpuTally NestedIoRun::total() const {
  IoVcpuTally s;
  for (const IoVcpuTally& t : vcpus) {
    for (auto f : {&IoVcpuTally::requests, &IoVcpuTally::received, &IoVcpuTally::bad, &IoVcpuTally::doorbells,
                   &IoVcpuTally::posted, &IoVcpuTally::msr_exits, &IoVcpuTally::nested_ticks, &IoVcpuTally::idle_ticks,
                   &IoVcpuTally::idle_halts, &IoVcpuTally::waiting_halts, &IoVcpuTally::switches})
      s.*f += t.*f;
    // The span of the run: the longest loop. idle_ns stays per vCPU
    // (busy time is each vCPU's elapsed_ns − idle_ns, summed).
    s.elapsed_ns = std::max(s.elapsed_ns, t.elapsed_ns);
  }
  return s;
}

TimeStamp NestedIoRun::loop_sum() const {
  TimeStamp sum;
  for (const IoVcpuTally& t : vcpus)
    for (int p = 0; p < kTimeParts; p++) sum.ns[p] += t.loop.modelled.ns[p];
  return sum;
}

Result<NestedIoRun> run_nested_io(const NestedIoConfig& c) {
  NestedEnvConfig ec{c.strategy, c.memory};
  ec.vcpus = static_cast<int>(c.io.l1_vcpus);
  ec.l1_bytes = kL1Bytes;
  take_run_model(ec, c);
  auto env = NC_TRY(NestedEnv::create(ec));
  // What the set-up counted (the activation of --extra-caches) is not the
  // run's: the run counts from here, as the memslot tests do.
  CounterSnapshot at_setup[] = {env->machine->counters()};
  const CounterSnapshot setup = env->run_counters(at_setup);
  NC_TRY(env->machine->watch(kSyncPage, kPageSize));
  std::vector<IoL1Setup> setups = lay_out(c, *env->machine);
  NestedIoRun run;
  run.vcpus.resize(setups.size());
  for (size_t i = 0; i < setups.size(); i++)
    env->machine->set_l1_program(static_cast<int>(i), io_l1(setups[i], c, run.vcpus[i]));
  // Generous: a sanitizer build interprets guest code many times slower.
  // On the wall clock the requests also arrive in real time, at the rate
  // offered, so the run lasts at least as long as the load.
  const uint64_t requests = c.requests_per_l2 * c.io.l2_vcpus;
  const uint64_t ops = requests * (c.io.work + 200);
  const uint64_t load_ms = c.clock == cpu::ClockKind::wall ? requests * 1000 / std::max<uint64_t>(c.io.rate, 1) : 0;
  Status st = env->machine->run(run_watchdog(ops / 100 + 2 * load_ms, std::chrono::microseconds(1'000)));
  if (!st) return tl::unexpected(st.error());
  CounterSnapshot others[] = {env->machine->counters()};
  run.counters = NestedEnv::counted_since_setup(env->run_counters(others), setup);
  Leaks leaks = env->tear_down();
  IoVcpuTally t = run.total();
  const uint64_t want = c.requests_per_l2 * c.io.l2_vcpus;
  auto check = [&run](bool cond, std::string message) {
    if (!cond) run.failures.push_back(std::move(message));
  };
  check(t.requests == want, fmt::format("{} requests served, {} expected", t.requests, want));
  check(t.doorbells == want, fmt::format("{} doorbell exits for {} requests", t.doorbells, want));
  check(t.posted == want && t.received == want,
        fmt::format("{} completion interrupts posted and {} taken for {} requests", t.posted, t.received, want));
  check(t.bad == 0, fmt::format("{} completions missing or wrong", t.bad));
  check(run.counters[Counter::lost_posted_interrupts] == 0,
        fmt::format("{} posted interrupts lost", run.counters[Counter::lost_posted_interrupts]));
  // Nothing moves L1 memory here, so even map must never touch a stale frame.
  check(run.counters[Counter::stale_accesses] == 0,
        fmt::format("{} stale accesses with {}", run.counters[Counter::stale_accesses], strategy_name(c.strategy)));
  check(leaks.none(), fmt::format("left behind: {}", leaks.to_string()));
  return run;
}

}  // namespace nestcache::workloads
