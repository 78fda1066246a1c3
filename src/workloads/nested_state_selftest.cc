// Selftest `nested-state`: the KVM_GET/SET_NESTED_STATE analogue end to end.
//
//   1. reference   the scenario of nested_state_migration.h without a save;
//   2. source      the same, but when L2 parks the VMM takes the nested state
//                  while L2 runs (the vCPU is kicked out of L2 for it) and
//                  copies the memory; the source then runs to the end too;
//   3. destination a fresh VM with the copied memory: the blob is restored,
//                  then every malformed variant (vmx::malformed_nested_states) is refused
//                  with its own error and leaves the restored state as it
//                  was; then L2 continues from the migration point and
//                  finishes.
// All three transcripts must be the same, and each must be right on its own
// (every step, every exit, the VTPR of each step, every posted interrupt
// received).
//
// With --evmcs L1 uses the enlightened VMCS (nested_state_migration.h): the
// blob carries the eVMCS flag and address, the restored vCPU maps the eVMCS
// through the strategy in the request before its first entry, and the
// malformed blobs include the eVMCS rules (the flag on a vCPU without the
// enlightened VMCS, a misaligned or unbacked eVMCS address, ...). Both
// variants also check that the source and the restored vCPU end with the
// same nested state.
//
// KVM's own selftest for this ioctl pair (vmx_set_nested_state_test) checks
// that invalid states are refused; this one also moves a running L2 to
// another VM under each page strategy.
#include <set>

#include "vmx/evmcs.h"
#include "vmx/nested_state_format.h"
#include "vmx/nested_state_malformed.h"
#include "workloads/nested_state_migration.h"
#include "workloads/registry.h"

namespace nestcache::workloads {

namespace {

using namespace nested_state;

nlohmann::json entry_json(const TranscriptEntry& e) {
  return {{"step", e.step}, {"reason", e.reason}, {"info", e.info}, {"value", e.value}, {"vtpr", e.vtpr}};
}

// What L1 sees when L2 writes the TPR's offset of the APIC-access page.
constexpr uint64_t kApicWriteAtTpr = vmx::apic_access_qual::make(vmx::vapic::kTpr, vmx::apic_access_qual::kLinearWrite);

// What a correct transcript of `steps` steps looks like, whoever ran it.
void check_transcript(const Transcript& t, int steps, bool evmcs, std::string_view who, SelftestResult& r) {
  const auto vmcall = static_cast<uint64_t>(vmx::ExitReason::kVmcall);
  const auto apic = static_cast<uint64_t>(vmx::ExitReason::kApicAccess);
  const auto msr = static_cast<uint64_t>(vmx::ExitReason::kMsrRead);
  const auto msr_write = static_cast<uint64_t>(vmx::ExitReason::kMsrWrite);
  const auto hlt = static_cast<uint64_t>(vmx::ExitReason::kHlt);
  size_t k = 0;
  for (uint64_t i = 1; i <= static_cast<uint64_t>(steps); i++) {
    const int entries = i % 4 == 3 && !evmcs ? 2 : 1;
    if (!r.check(k + entries <= t.size(), "{}: transcript ends at step {} of {}", who, i, steps)) return;
    const TranscriptEntry& e = t[k];
    r.check(e.step == i, "{}: entry {} is for step {}, expected {}", who, k, e.step, i);
    r.check(e.vtpr == vmx::vapic::vtpr_of_cr8(i), "{}: step {}: VTPR {:#x}, expected {:#x} (the TPR shadow)", who, i,
            e.vtpr, vmx::vapic::vtpr_of_cr8(i));
    switch (i % 4) {
      case 0: r.check(e.reason == vmcall, "{}: step {}: exit {} is not VMCALL", who, i, e.reason); break;
      case 1:
        if (evmcs)
          r.check(e.reason == hlt, "{}: step {}: exit {} is not HLT", who, i, e.reason);
        else
          r.check(e.reason == apic && e.info == kApicWriteAtTpr, "{}: step {}: exit {} qualification {:#x}, "
                  "expected an APIC-access write at {:#x}", who, i, e.reason, e.info, vmx::vapic::kTpr);
        break;
      case 2: r.check(e.reason == msr, "{}: step {}: exit {} is not RDMSR", who, i, e.reason); break;
      case 3:
        if (evmcs)
          r.check(e.reason == msr_write, "{}: step {}: exit {} is not WRMSR", who, i, e.reason);
        else
          r.check(t[k + 1].step == i && t[k + 1].info == e.info && e.info != 0,
                  "{}: step {}: posted vector {:#x}, received {:#x}", who, i, e.info, t[k + 1].info);
        break;
    }
    k += entries;
  }
  if (r.check(k < t.size(), "{}: no final VMCALL", who))
    r.check(t[k].reason == vmcall && t[k].step == static_cast<uint64_t>(steps) + 1, "{}: last entry is not L2's "
            "final VMCALL", who);
}

// Phase 3's malformed blobs against a vCPU holding `good`; those refused
// only by a vCPU without the enlightened VMCS against `plain` (vCPU 0 of a
// VM that never enabled it), when given.
nlohmann::json reject_all(cpu::Machine& m, cpu::Machine* plain, std::span<const std::byte> good, SelftestResult& r) {
  nlohmann::json out = nlohmann::json::array();
  std::set<std::string> messages;
  const std::vector<vmx::MalformedBlob> bad = vmx::malformed_nested_states(good, kUnbacked);
  r.check(bad.size() >= 20, "only {} malformed blobs", bad.size());
  for (const vmx::MalformedBlob& b : bad) {
    cpu::Machine& target = b.needs_plain_vcpu && plain ? *plain : m;
    auto before = target.get_nested_state(0);
    Status st = target.set_nested_state(0, b.blob);
    auto after = target.get_nested_state(0);
    const bool unchanged = before && after && *after == *before;
    nlohmann::json j = {{"name", b.name}, {"bytes", b.blob.size()}, {"rejected", !st}, {"state_unchanged", unchanged}};
    if (!st) {
      j["errno"] = st.error().code_name();
      j["message"] = st.error().message;
      const bool right = st.error().code == b.code && st.error().message.find(b.expect) != std::string::npos;
      j["expected_rule"] = right;
      r.check(right, "malformed blob {}: {} is not the expected {} \"{}\"", b.name, st.error().to_string(),
              Error{b.code, ""}.code_name(), b.expect);
      r.check(messages.insert(st.error().message).second, "malformed blob {}: same error as another blob: {}",
              b.name, st.error().message);
    } else {
      r.fail(fmt::format("malformed blob {} was accepted", b.name));
    }
    r.check(unchanged, "malformed blob {}: the vCPU's nested state changed", b.name);
    out.push_back(std::move(j));
  }
  return out;
}

// The eVMCS variant's blob: the flag, the eVMCS address, and an image that
// is a full copy of the eVMCS page as the VMM copied it (every carried field
// equal to the page's, whatever its clean bits say).
void check_evmcs_blob(const vmx::NestedStateImage& image, const SourceRun& src, SelftestResult& r) {
  r.check(image.evmcs, "L1 uses an eVMCS, but the blob has no eVMCS flag");
  r.check(image.current_vmcs_gpa == kEvmcsGpa, "the blob's current VMCS {:#x} is not the eVMCS {:#x}",
          image.current_vmcs_gpa, kEvmcsGpa);
  r.check(src.vp_assist_msr == (kVpAssistGpa | vmx::kVpAssistPageEnable), "the VP-assist MSR read {:#x}",
          src.vp_assist_msr);
  for (const MemoryImage::Slot& s : src.memory.slots) {
    if (s.slot != kEvmcsSlot || !image.vmcs12) continue;
    const vmx::EvmcsPage page = vmx::EvmcsPage::load(std::span<const std::byte, kPageSize>(s.bytes.data(), kPageSize));
    vmx::Vmcs12 full = *image.vmcs12;
    vmx::copy_evmcs_to_vmcs12(page, full, vmx::evmcs_clean::kNone);
    r.check(full == *image.vmcs12, "the blob's vmcs12 is not a full copy of the eVMCS page");
    r.details["evmcs_page_clean_fields"] = page.clean_fields;
    return;
  }
  r.fail("the memory image has no eVMCS page");
}

// Phase 2's blob: taken while L2 ran, so in guest mode with no entry pending.
std::optional<vmx::NestedStateImage> check_saved_blob(const MigrationConfig& c, const SourceRun& src,
                                                      SelftestResult& r) {
  auto image = vmx::decode(src.blob);
  if (!r.check(static_cast<bool>(image), "the saved blob does not decode: {}",
               image ? "" : image.error().to_string()))
    return std::nullopt;
  r.check(image->guest_mode, "the state was taken while L2 ran, but the blob is not in guest mode");
  r.check(!image->run_pending, "L2 had run: no entry can be pending");
  r.check(image->vmcs12 && image->vmcs12->launched(), "the saved vmcs12 is not launched");
  r.details["blob"] = {{"bytes", src.blob.size()},
                       {"flags", image->flags()},
                       {"guest_mode", image->guest_mode},
                       {"run_pending", image->run_pending},
                       {"evmcs", image->evmcs},
                       {"vmxon_gpa", image->vmxon_gpa},
                       {image->evmcs ? "evmcs_gpa" : "vmcs12_gpa", image->current_vmcs_gpa}};
  if (c.evmcs) check_evmcs_blob(*image, src, r);
  return *image;
}

// Phase 3 between the restore and the run, on the fresh VM `dst`: the state
// is the blob that was set, and every malformed blob is refused.
Status check_restored_then_refuse(const MigrationConfig& c, const SourceRun& src, NestedEnv& dst,
                                  SelftestResult& r) {
  if (c.evmcs)
    r.check(dst.machine->vcpu(0).nested().evmcs_map_pending(), "the restored eVMCS was mapped before the request");
  auto got = dst.machine->get_nested_state(0);
  r.check(got && *got == src.blob, "get after set does not return the blob that was set");
  // eVMCS: the flag on a vCPU that never enabled the enlightened VMCS is
  // refused by such a vCPU, in a VM of its own.
  std::unique_ptr<NestedEnv> plain;
  if (c.evmcs) {
    MigrationConfig pc = c;
    pc.evmcs = false;
    plain = NC_TRY(make_vm(pc));
  }
  r.details["malformed"] = reject_all(*dst.machine, plain ? plain->machine.get() : nullptr, src.blob, r);
  return ok();
}

// The restored run against the uninterrupted one, and the summary.
void report_restored(const MigrationConfig& c, const SourceRun& ref, const RestoredRun& dst, const std::string& tag,
                     SelftestResult& r) {
  const Transcript& restored = dst.transcript;
  check_transcript(restored, c.steps, c.evmcs, "restored", r);
  r.check(restored == ref.transcript, "the restored run's transcript differs from the uninterrupted run's");
  // The vCPU ends where the uninterrupted one did: same VMCS, same vmcs12
  // (for an enlightened L1 a full copy of its eVMCS, which L1 changed after
  // every exit).
  r.check(!dst.final_state.empty() && dst.final_state == ref.final_state,
          "the restored vCPU's final nested state differs from the uninterrupted run's");
  for (size_t i = 0; i < std::min(restored.size(), ref.transcript.size()); i++) {
    if (restored[i] == ref.transcript[i]) continue;
    r.details["first_difference"] = {{"entry", i}, {"restored", entry_json(restored[i])},
                                     {"reference", entry_json(ref.transcript[i])}};
    break;
  }
  r.check(r.counters[Counter::stale_accesses] == 0, "{} stale accesses", r.counters[Counter::stale_accesses]);
  size_t before = 0;
  for (const TranscriptEntry& e : restored)
    if (e.step < static_cast<uint64_t>(c.park_step())) before++;
  r.details["transcript_entries"] = restored.size();
  r.details["entries_before_migration"] = before;
  r.details["entries_after_migration"] = restored.size() - before;
  r.details["steps"] = c.steps;
  r.details["park_step"] = c.park_step();
  size_t rejected = 0;
  for (const auto& j : r.details["malformed"])
    if (j["rejected"].get<bool>() && j["state_unchanged"].get<bool>() && j.value("expected_rule", false)) rejected++;
  r.note(fmt::format("{}: L2 saved at step {} of {} while running, restored into a fresh VM, finished with the same "
                     "{}-entry transcript as the uninterrupted run ({} after the migration)",
                     tag, c.park_step(), c.steps, restored.size(), restored.size() - before));
  r.note(fmt::format("{} of {} malformed blobs refused, each with its own error, the restored state untouched", rejected,
                     r.details["malformed"].size()));
}

OptionSpec steps_option() { return int_option("--steps", "L2 steps (the migration is half way)", "16", 4, 256); }

SelftestResult run_nested_state(const RunOptions& o) {
  SelftestResult r;
  MigrationConfig c{o.strategy, o.memory};
  auto steps = o.int_value(steps_option());
  if (!steps) return r.refuse(steps.error().to_string()), r;
  c.steps = static_cast<int>(*steps);
  c.evmcs = o.flag_option("evmcs");
  const std::string tag = std::string(strategy_name(o.strategy)) + (c.evmcs ? " with eVMCS" : "");

  // 1. Reference: the run nobody interrupts.
  SourceRun ref = run_source(c, false);
  r.counters += ref.counters;
  if (!r.check(static_cast<bool>(ref.run), "reference run failed: {}", ref.run ? "" : ref.run.error().to_string()))
    return r;
  check_transcript(ref.transcript, c.steps, c.evmcs, "reference", r);

  // 2. Source: save mid-L2, then finish.
  SourceRun src = run_source(c, true);
  r.counters += src.counters;
  r.check(static_cast<bool>(src.run), "source run failed: {}", src.run ? "" : src.run.error().to_string());
  r.check(src.transcript == ref.transcript, "source: taking the nested state changed what L2 did");
  std::optional<vmx::NestedStateImage> image = check_saved_blob(c, src, r);
  if (!image) return r;

  // 3. Destination: restore into a fresh VM, refuse the malformed blobs,
  // then let L2 finish there.
  RestoredRun dst = run_restored(c, src.memory, src.blob, {}, src.vp_assist_msr,
                                 [&](NestedEnv& env) { return check_restored_then_refuse(c, src, env, r); });
  if (!r.check(static_cast<bool>(dst.set), "restoring the saved state failed: {}",
               dst.set ? "" : dst.set.error().to_string()))
    return r;
  const CounterSnapshot& k = dst.counters;
  r.counters += k;
  r.check(static_cast<bool>(dst.run), "the restored L2 did not finish: {}", dst.run ? "" : dst.run.error().to_string());
  // Each VM was torn down at the end of its run; a window, pin or cache it
  // left (Leaks::no_resources_left) is a failure.
  const std::pair<const char*, const Leaks*> vms[] = {{"reference", &ref.leaks}, {"source", &src.leaks},
                                                      {"destination", &dst.leaks}};
  for (const auto& [vm, leaks] : vms)
    r.check(leaks->no_resources_left(), "{} VM leaked at teardown: {}", vm, leaks->resources_to_string());
  report_restored(c, ref, dst, tag, r);
  r.details["destination_counters"] = k.to_json();
  if (c.evmcs)
    r.note(fmt::format("eVMCS {:#x}: flag and address in the blob, the image a full copy of the page, mapped by the "
                       "request before the first entry ({} eVMCS map failures)",
                       image->current_vmcs_gpa, k[Counter::evmcs_map_failures]));
  return r;
}

}  // namespace

void register_nested_state_selftest() {
  register_selftest({
      .name = "nested-state",
      .summary = "save an L1 vCPU mid-L2, restore it into a fresh VM, finish L2 there; refuse malformed blobs",
      .description =
          "The KVM_GET/SET_NESTED_STATE analogue end to end. One L1 vCPU runs an L2 whose vmcs12 uses the MSR "
          "bitmap, the APIC-access page, the virtual-APIC page and the posted-interrupt descriptor; each step "
          "ends with an exit L1 records (VMCALL, APIC access, RDMSR, a posted interrupt). Half way the VMM takes "
          "the nested state while L2 runs and copies the memory; a fresh VM gets both, then more than 20 "
          "malformed blobs (truncated, wrong version, bad magic, misaligned addresses, inconsistent flags, guest "
          "mode without VMXON, addresses with no memslot, vmcs12 failing entry checks, trailing bytes, oversized, "
          "eVMCS...), each refused with its own error and nothing changed; then L2 finishes in the new VM. "
          "Asserts the transcript and the final nested state equal an uninterrupted run's. With --evmcs L1 uses "
          "the enlightened VMCS (VMCALL, HLT, RDMSR and WRMSR exits; the exit information read from the eVMCS): "
          "the blob carries the eVMCS address and a full copy, the restored vCPU maps the eVMCS through the "
          "strategy before its first entry, and the eVMCS blobs (flag on a vCPU without eVMCS, misaligned, "
          "no memslot, ...) are refused too. KVM's vmx_set_nested_state_test checks the refusals; the "
          "migration across VMs is ours.",
      .options = {steps_option(),
                  flag_option("--evmcs", "L1 uses the Hyper-V enlightened VMCS (the blob carries the eVMCS)")},
      .run = run_nested_state,
  });
}

}  // namespace nestcache::workloads
