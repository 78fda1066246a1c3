// The mid-L2 migration scenario (see nested_state_migration.h).
#include "workloads/nested_state_migration.h"

#include <algorithm>
#include <chrono>

#include "guest/enlightened.h"
#include "guest/ept12.h"
#include "guest/mailbox.h"
#include "guest/program.h"
#include "guest/stepping_l2.h"
#include "guest/vmcs12_pages.h"
#include "guest/vmx.h"
#include "host/fault_injection.h"
#include "vmx/evmcs.h"
#include "workloads/host_wait.h"
#include "workloads/results.h"

namespace nestcache::workloads::nested_state {

namespace {

using namespace guest::program;

constexpr size_t kL1Bytes = 8 << 20;
constexpr auto kRunTimeout = std::chrono::seconds(60);

// L1's own bookkeeping, below its page allocator (kL1PagesStart): its
// "registers" for this scenario live in memory so a restored L1 finds them.
constexpr Gpa kL1State = 0x80000;
constexpr Gpa kStateVmcs12 = kL1State + 0x00, kStateData = kL1State + 0x08, kStateCount = kL1State + 0x10,
              kStateSteps = kL1State + 0x18;
constexpr Gpa kTranscript = 0x90000;
constexpr size_t kMaxEntries = (kL1PagesStart - kTranscript) / guest::kTranscriptEntryBytes;

// L2's data page is its mailbox (an L2 address, mapped by EPT12 onto an L1
// page): L2's progress word is the step it is on, L1's acknowledgement the
// last step L1 saw through, and its data qwords L2's result of each step.
constexpr Gpa kL2Data = 0x200000;
constexpr Gpa kParked = Mailbox::user(guest::kParkedWord);  // L2 -> VMM: parked at the migration point
constexpr Gpa kGo = Mailbox::user(guest::kGoWord);          // VMM -> L2: go on

constexpr uint32_t kMsrIntercepted = vmx::msr::kIa32TimeStampCounter;  // read- and write-intercepted
constexpr uint32_t kMsrPassthrough = vmx::msr::kIa32PlatformId;        // not intercepted
constexpr uint64_t kInterruptWaitNs = 2'000'000'000;

// L2: the stepping program, parked half way for the migration.
GuestTask l2_program(const MigrationConfig& c) {
  return guest::stepping_l2({.mailbox = kL2Data,
                             .steps = c.steps,
                             .park_step = c.park_step(),
                             .hlt_and_wrmsr = c.evmcs,
                             .apic_access = kApicGpa,
                             .msr_passthrough = kMsrPassthrough,
                             .msr_intercepted = kMsrIntercepted,
                             .interrupt_wait_ns = kInterruptWaitNs});
}

// L1's side of the stepping L2, with its state in kL1State and its
// transcript at kTranscript.
GuestTask l1_exit_loop(bool evmcs, bool launch) {
  return guest::stepping_l1({.mailbox_l2 = kL2Data,
                             .mailbox_word = kStateData,
                             .steps_word = kStateSteps,
                             .count_word = kStateCount,
                             .transcript = kTranscript,
                             .max_entries = kMaxEntries,
                             .virtual_apic = kVapicGpa,
                             .pi_desc = kPiDesc,
                             .msr_intercepted = kMsrIntercepted,
                             .evmcs = evmcs ? kEvmcsGpa : kInvalidGpa},
                            launch);
}

// The source's L1: sets everything up and launches L2.
GuestTask l1_fresh(cpu::Machine& m, MigrationConfig c) {
  guest::L1Pages pages(kL1PagesStart, 4 << 20);
  Gpa vmcs = kEvmcsGpa;
  if (c.evmcs) {
    // Hyper-V: the VP-assist page names the eVMCS; no VMCLEAR or VMPTRLD.
    co_await guest::enter_vmx(pages);
    co_await guest::enable_vp_assist(kVpAssistGpa);
    co_await guest::init_evmcs(kEvmcsGpa);
    co_await guest::load_evmcs(kVpAssistGpa, kEvmcsGpa);
  } else {
    vmcs = co_await guest::enter_vmx_with_current_vmcs(pages);
  }
  guest::Ept12 ept(pages);
  Gpa data = pages.alloc();
  co_await ept.map(kL2Data, data);
  if (!c.evmcs) co_await ept.map(kApicGpa, kApicGpa);
  Gpa bitmap = pages.alloc();
  co_await guest::set_msr_intercept(bitmap, kMsrIntercepted, false, true);
  co_await guest::set_msr_intercept(bitmap, kMsrIntercepted, true, true);
  if (c.evmcs) {
    // What eVMCS v1 can express: TPR shadow, MSR bitmap, EPT, HLT exiting.
    vmx::Vmcs12 v = guest::vmcs12_for({.eptp = ept.eptp(), .msr_bitmap = bitmap, .virtual_apic = kVapicGpa});
    v.primary_proc_controls |= vmx::proc::kHltExiting;
    co_await guest::write_evmcs(kEvmcsGpa, v, vmx::evmcs_enlightenment::kMsrBitmap);
  } else {
    co_await guest::write_vmcs(guest::all_pages_vmcs12(ept.eptp(), bitmap, kApicGpa, kVapicGpa, kPiDesc));
  }
  co_await ops::write64(kStateVmcs12, vmcs);
  co_await ops::write64(kStateData, data);
  co_await ops::write64(kStateSteps, static_cast<uint64_t>(c.steps));
  m.bind_l2_program(vmcs, l2_program(c));
  co_await l1_exit_loop(c.evmcs, true);
}

struct SlotLayout {
  uint32_t slot;
  Gpa gpa;
  size_t bytes;
};
const SlotLayout kSlots[] = {{0, 0, kL1Bytes},
                             {kApicSlot, kApicGpa, kPageSize},
                             {kVapicSlot, kVapicGpa, kPageSize},
                             {kPiSlot, kPiPage, kPageSize},
                             {kEvmcsSlot, kEvmcsGpa, kPageSize}};

// The nested state of a vCPU whose run is over, or empty.
std::vector<std::byte> final_state(NestedEnv& env) {
  auto blob = env.machine->get_nested_state(0);
  return blob ? std::move(*blob) : std::vector<std::byte>{};
}

}  // namespace

namespace {
// The end of a run that got to the end: the run's counters (the frame
// pool's as PhysMem counted them, each event once), then the VM torn down
// and what it left.
void finish(NestedEnv& env, CounterSnapshot& counters, Leaks& leaks) {
  const CounterSnapshot machine = env.counters();
  leaks = env.tear_down();
  counters = env.run_counters(std::span(&machine, 1));
}
}  // namespace

Result<std::unique_ptr<NestedEnv>> make_vm(const MigrationConfig& c, std::vector<uint32_t> leave_out) {
  NestedEnvConfig ec{c.strategy, c.memory};
  ec.vcpus = 1;
  ec.l1_bytes = kL1Bytes;
  auto env = NC_TRY(NestedEnv::create(ec));
  for (const SlotLayout& s : kSlots) {
    if (s.slot == 0 || std::find(leave_out.begin(), leave_out.end(), s.slot) != leave_out.end()) continue;
    NC_TRY(env->add_page_slot(s.slot, s.gpa));
  }
  if (c.evmcs) env->machine->vcpu(0).nested().enable_evmcs();  // KVM_CAP_HYPERV_ENLIGHTENED_VMCS
  return env;
}

Transcript read_transcript(NestedEnv& env) {
  Transcript t;
  uint64_t n = std::min<uint64_t>(env.read_u64(kStateCount), kMaxEntries);
  for (uint64_t k = 0; k < n; k++) {
    uint64_t q[5] = {};
    (void)env.vm->read_guest(kTranscript + k * guest::kTranscriptEntryBytes, q, sizeof q);
    t.push_back({q[0], q[1], q[2], q[3], q[4]});
  }
  return t;
}

Result<std::unique_ptr<ParkedRun>> ParkedRun::start(NestedEnv& env, const MigrationConfig& c) {
  std::unique_ptr<ParkedRun> p(new ParkedRun(env));
  env.machine->set_l1_program(0, l1_fresh(*env.machine, c));
  ParkedRun* raw = p.get();
  auto runner = host::start_thread("the machine's runner thread", [raw] {
    raw->status_ = raw->env_.machine->run(kRunTimeout);
    raw->finished_.store(true);
  });
  if (!runner) return tl::unexpected(runner.error());
  p->runner_ = std::move(*runner);
  // The VMM polls L2's data page (its L1 address is in L1's state block once
  // L1 has set up) until L2 parks or the run ends.
  auto parked = [&env] {
    Gpa data = env.read_u64(kStateData);
    return data && env.read_u64(data + kParked);
  };
  host_wait_until([&] { return parked() || p->finished_.load(); }, std::chrono::microseconds(200));
  if (parked()) return p;
  p->runner_.join();
  if (!p->status_) return tl::unexpected(p->status_.error());
  return errorf(EPROTO, "the run ended before L2 reached the migration point");
}

Status ParkedRun::release() {
  if (!runner_.joinable()) return status_;
  Gpa data = env_.read_u64(kStateData);
  Status st = env_.write_u64(data + kGo, 1);
  runner_.join();
  if (!st) return st;
  return status_;
}

ParkedRun::~ParkedRun() { (void)release(); }

SourceRun run_source(const MigrationConfig& c, bool save) {
  SourceRun out;
  auto env_r = make_vm(c);
  if (!env_r) {
    out.run = tl::unexpected(env_r.error());
    return out;
  }
  NestedEnv& env = **env_r;
  auto parked = ParkedRun::start(env, c);
  if (!parked) {
    out.run = tl::unexpected(parked.error());
    out.transcript = read_transcript(env);
    return out;
  }
  out.parked = true;
  if (save) {
    // L2 is running (parked in a loop without exits): the get kicks it out
    // of guest mode and runs on the vCPU thread between two entries.
    auto blob = env.machine->get_nested_state(0);
    if (blob) out.blob = std::move(*blob);
    // An enlightened L1's VP-assist page is an MSR, not nested state: the
    // VMM moves it with KVM_GET_MSRS / KVM_SET_MSRS.
    if (c.evmcs) {
      auto msr = env.machine->get_vp_assist_msr(0);
      if (msr) out.vp_assist_msr = *msr;
    }
    // L2 only reads memory while parked, and L1 is not running: the memory
    // is quiescent, as a paused VM's is.
    for (const SlotLayout& s : kSlots) {
      MemoryImage::Slot m{s.slot, s.gpa, std::vector<std::byte>(s.bytes)};
      if (env.vm->read_guest(s.gpa, m.bytes.data(), m.bytes.size())) out.memory.slots.push_back(std::move(m));
    }
  }
  out.run = (*parked)->release();
  out.transcript = read_transcript(env);
  out.final_state = final_state(env);
  finish(env, out.counters, out.leaks);
  return out;
}

Status restore_memory(NestedEnv& env, const MemoryImage& image) {
  for (const MemoryImage::Slot& s : image.slots) {
    if (!env.vm->gfn_to_hva(gpa_to_gfn(s.gpa))) continue;  // a slot the destination does not have
    NC_TRY(env.vm->write_guest(s.gpa, s.bytes.data(), s.bytes.size()));
  }
  Gpa data = env.read_u64(kStateData);
  if (!data) return errorf(EINVAL, "the memory image has no L1 state block");
  return env.write_u64(data + kGo, 1);
}

Status bind_restored_programs(NestedEnv& env, const MigrationConfig& c, Gpa vmcs12) {
  if (vmcs12 == kInvalidGpa) return errorf(EINVAL, "the restored state has no current vmcs12");
  env.machine->bind_l2_program(vmcs12, l2_program(c));
  env.machine->set_l1_program(0, l1_exit_loop(c.evmcs, false));
  return ok();
}

RestoredRun run_restored(const MigrationConfig& c, const MemoryImage& memory, std::span<const std::byte> blob,
                         std::vector<uint32_t> leave_out, uint64_t vp_assist_msr,
                         const std::function<Status(NestedEnv&)>& before_run) {
  RestoredRun out;
  auto fail = [&](const Error& e) {
    out.set = tl::unexpected(e);
    out.run = tl::unexpected(e);
    return out;
  };
  auto env_r = make_vm(c, std::move(leave_out));
  if (!env_r) return fail(env_r.error());
  NestedEnv& env = **env_r;
  if (auto st = restore_memory(env, memory); !st) return fail(st.error());
  out.set = env.machine->set_nested_state(0, blob);
  if (!out.set) {
    out.run = out.set;
    return out;
  }
  if (c.evmcs) {
    if (auto st = env.machine->set_vp_assist_msr(0, vp_assist_msr); !st) return fail(st.error());
  }
  auto image = vmx::decode(blob);
  if (!image) return fail(image.error());
  if (auto st = bind_restored_programs(env, c, image->current_vmcs_gpa); !st) return fail(st.error());
  if (before_run) {
    if (auto st = before_run(env); !st) return fail(st.error());
  }
  out.run = env.machine->run(kRunTimeout);
  out.transcript = read_transcript(env);
  out.final_state = final_state(env);
  finish(env, out.counters, out.leaks);
  return out;
}

}  // namespace nestcache::workloads::nested_state
