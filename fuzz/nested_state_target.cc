// The nested-state fuzz target's world (nested_state_target.h).
#include "fuzz/nested_state_target.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "guest/vmcs12_pages.h"
#include "vmx/evmcs.h"
#include "vmx/nested_state_format.h"
#include "vmx/nested_state_malformed.h"

namespace nestcache::fuzz {

namespace {

using vmx::NestedStateImage;

[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "nested-state fuzz finding: %s\n", what.c_str());
  std::abort();
}

// Blob equality by memcmp: std::equal over std::byte compares byte by byte,
// and in this instrumented file each byte would be a traced comparison (a
// third of the target's time).
bool same(const std::vector<std::byte>& a, const std::vector<std::byte>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0);
}

uint64_t eptp() { return kEptRoot | vmx::eptp::kMemTypeWb | vmx::eptp::kWalkLength4; }

NestedStateImage guest_mode(vmx::Vmcs12 v, bool run_pending = false) {
  v.launch_state = vmx::kLaunchStateLaunched;
  NestedStateImage s;
  s.vmxon_gpa = kVmxon;
  s.current_vmcs_gpa = kVmcs;
  s.vmcs12 = v;
  s.guest_mode = true;
  s.run_pending = run_pending;
  return s;
}

// What an enlightened L1's blob holds: the eVMCS flag and address, and a
// vmcs12 eVMCS v1 can express (no APIC-access page, no posted interrupts).
NestedStateImage evmcs_guest_mode() {
  NestedStateImage s = guest_mode(guest::vmcs12_for({.eptp = eptp(), .msr_bitmap = kMsrBitmap, .virtual_apic = kVapic}));
  s.current_vmcs_gpa = kEvmcs;
  s.evmcs = true;
  return s;
}

}  // namespace

std::vector<Seed> nested_state_seeds() {
  std::vector<Seed> seeds;
  NestedStateImage off;
  seeds.push_back({"vmx-off", vmx::encode(off)});
  NestedStateImage on;
  on.vmxon_gpa = kVmxon;
  seeds.push_back({"vmx-on", vmx::encode(on)});
  NestedStateImage current = on;
  current.current_vmcs_gpa = kVmcs;
  current.vmcs12 = vmx::minimal_vmcs12();
  seeds.push_back({"current-vmcs", vmx::encode(current)});
  const NestedStateImage minimal = guest_mode(vmx::minimal_vmcs12());
  const NestedStateImage pages =
      guest_mode(guest::all_pages_vmcs12(eptp(), kMsrBitmap, kApicAccess, kVapic, kPiDesc));
  const NestedStateImage pending = guest_mode(guest::all_pages_vmcs12(eptp(), kMsrBitmap, kApicAccess, kVapic, kPiDesc), true);
  const NestedStateImage evmcs = evmcs_guest_mode();
  for (const auto& [name, s] : {std::pair{"guest-mode-minimal", minimal}, std::pair{"guest-mode-all-pages", pages},
                                std::pair{"run-pending", pending}, std::pair{"evmcs-guest-mode", evmcs}}) {
    std::vector<std::byte> good = vmx::encode(s);
    seeds.push_back({name, good});
    for (vmx::MalformedBlob& b : vmx::malformed_nested_states(good, kUnbacked))
      seeds.push_back({std::string(name) + "-" + b.name, std::move(b.blob)});
  }
  return seeds;
}

LiveVcpu::LiveVcpu(workloads::StrategyKind strategy, workloads::MemoryKind memory, bool evmcs) {
  name_ = fmt::format("{}/{}{}", vmx::strategy_name(strategy), workloads::memory_kind_name(memory),
                      evmcs ? "/evmcs" : "");
  workloads::NestedEnvConfig c{strategy, memory};
  c.l1_bytes = kL1Bytes;
  c.extra_frames = 64;
  c.stale_fatal = true;  // a restore must never leave a stale pfn behind
  auto env = workloads::NestedEnv::create(c);
  if (!env) finding("cannot build the VM: " + env.error().to_string());
  env_ = std::move(*env);
  cpu::Machine& m = *env_->machine;
  if (evmcs) {
    m.vcpu(0).nested().enable_evmcs();
    vmx::VpAssistPage assist;
    assist.enlighten_vmentry = 1;
    assist.current_nested_vmcs = kEvmcs;
    std::vector<std::byte> page(kPageSize);
    assist.store(std::span<std::byte, kPageSize>(page.data(), kPageSize));
    vmx::EvmcsPage e{};
    e.revision_id = vmx::kEvmcsRevision;
    std::vector<std::byte> epage(kPageSize);
    e.store(std::span<std::byte, kPageSize>(epage.data(), kPageSize));
    if (!env_->vm->write_guest(kVpAssist, page.data(), kPageSize) || !env_->vm->write_guest(kEvmcs, epage.data(), kPageSize) ||
        !m.set_vp_assist_msr(0, kVpAssist | vmx::kVpAssistPageEnable))
      finding("cannot set up the VP-assist page");
  }
  baseline_ = vmx::encode(guest_mode(guest::all_pages_vmcs12(eptp(), kMsrBitmap, kApicAccess, kVapic, kPiDesc)));
  if (evmcs) baseline_ = vmx::encode(evmcs_guest_mode());
  restore_baseline();
  baseline_state_ = get();
}

LiveVcpu::~LiveVcpu() {
  if (env_) env_->tear_down();
}

std::vector<std::byte> LiveVcpu::get() const {
  auto blob = env_->machine->get_nested_state(0);
  if (!blob) finding(name_ + ": get_nested_state failed: " + blob.error().to_string());
  return std::move(*blob);
}

void LiveVcpu::restore_baseline() {
  cpu::Machine& m = *env_->machine;
  if (auto st = m.set_nested_state(0, baseline_); !st) finding(name_ + ": the baseline is refused: " + st.error().to_string());
  if (vmx::NestedVmx& nested = m.vcpu(0).nested(); nested.guest_mode()) (void)nested.get_nested_state_pages();
}

void LiveVcpu::run_one(std::span<const std::byte> blob) {
  cpu::Machine& m = *env_->machine;
  vmx::NestedVmx& nested = m.vcpu(0).nested();
  // Every input starts from the same state; that it reads back as the state
  // the constructor recorded is part of the refusal check below.
  restore_baseline();
  Status st = m.set_nested_state(0, blob);
  if (!st) {
    if (st.error().message.empty()) finding(name_ + ": a refusal without a message");
    if (!same(get(), baseline_state_)) finding(name_ + ": a refused blob changed the state: " + st.error().to_string());
    return;
  }
  // The request before the next entry: resolves the pages or refuses them
  // cleanly (an internal error), and then the state still reads back.
  if (nested.guest_mode()) (void)nested.get_nested_state_pages();
  const std::vector<std::byte> installed = get();
  if (auto again = m.set_nested_state(0, installed); !again)
    finding(name_ + ": the state's own blob is refused: " + again.error().to_string());
  if (!same(get(), installed)) finding(name_ + ": setting the state's own blob changed it");
}

}  // namespace nestcache::fuzz
