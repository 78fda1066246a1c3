// Selftest `nested-state`: the KVM_GET/SET_NESTED_STATE analogue end to end.
//
//   1. reference   the scenario of nested_state_migration.h without a save;
//   2. source      the same, but when L2 parks the VMM takes the nested state
//                  while L2 runs (the vCPU is kicked out of L2 for it) and
//                  copies the memory; the source then runs to the end too;
//   3. destination a fresh VM with the copied memory: the blob is restored,
//                  then every malformed variant (malformed_blobs) is refused
//                  with its own error and leaves the restored state as it
//                  was; then L2 continues from the migration point and
//                  finishes.
// All three transcripts must be the same, and each must be right on its own
// (every step, every exit, the VTPR of each step, every posted interrupt
// received).
//
// KVM's own selftest for this ioctl pair (vmx_set_nested_state_test) checks
// that invalid states are refused; this one also moves a running L2 to
// another VM under each page strategy.
#include <CLI/CLI.hpp>

#include <set>

#include "vmx/nested_state_format.h"
#include "workloads/nested_state_migration.h"
#include "workloads/selftests.h"

namespace nestcache::workloads {

namespace {

using namespace nested_state;

nlohmann::json entry_json(const TranscriptEntry& e) {
  return {{"step", e.step}, {"reason", e.reason}, {"info", e.info}, {"value", e.value}, {"vtpr", e.vtpr}};
}

// What a correct transcript of `steps` steps looks like, whoever ran it.
void check_transcript(const Transcript& t, int steps, std::string_view who, SelftestResult& r) {
  const auto vmcall = static_cast<uint64_t>(vmx::ExitReason::kVmcall);
  const auto apic = static_cast<uint64_t>(vmx::ExitReason::kApicAccess);
  const auto msr = static_cast<uint64_t>(vmx::ExitReason::kMsrRead);
  size_t k = 0;
  for (uint64_t i = 1; i <= static_cast<uint64_t>(steps); i++) {
    const int entries = i % 4 == 3 ? 2 : 1;
    if (!r.check(k + entries <= t.size(), "{}: transcript ends at step {} of {}", who, i, steps)) return;
    const TranscriptEntry& e = t[k];
    r.check(e.step == i, "{}: entry {} is for step {}, expected {}", who, k, e.step, i);
    r.check(e.vtpr == (i & 0xf) << 4, "{}: step {}: VTPR {:#x}, expected {:#x} (the TPR shadow)", who, i, e.vtpr,
            (i & 0xf) << 4);
    switch (i % 4) {
      case 0: r.check(e.reason == vmcall, "{}: step {}: exit {} is not VMCALL", who, i, e.reason); break;
      case 1:
        r.check(e.reason == apic && e.info == (0x80 | 1u << 12), "{}: step {}: exit {} qualification {:#x}, expected "
                "an APIC-access write at 0x80", who, i, e.reason, e.info);
        break;
      case 2: r.check(e.reason == msr, "{}: step {}: exit {} is not RDMSR", who, i, e.reason); break;
      case 3:
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

// Phase 3's malformed blobs against a vCPU holding `good`.
nlohmann::json reject_all(cpu::Machine& m, std::span<const std::byte> good, SelftestResult& r) {
  nlohmann::json out = nlohmann::json::array();
  std::set<std::string> messages;
  const std::vector<BadBlob> bad = malformed_blobs(good);
  r.check(bad.size() >= 20, "only {} malformed blobs", bad.size());
  for (const BadBlob& b : bad) {
    Status st = m.set_nested_state(0, b.blob);
    auto after = m.get_nested_state(0);
    const bool unchanged = after && std::equal(after->begin(), after->end(), good.begin(), good.end());
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

SelftestResult run_nested_state(const RunOptions& o) {
  SelftestResult r;
  MigrationConfig c{o.strategy, o.memory};
  auto steps = o.int_option("steps", c.steps);
  if (!steps) return r.fail(steps.error().to_string()), r;
  if (*steps < 4 || *steps > 256) return r.fail(fmt::format("--steps {} is out of range (4..256)", *steps)), r;
  c.steps = static_cast<int>(*steps);
  const std::string tag(strategy_name(o.strategy));

  // 1. Reference: the run nobody interrupts.
  SourceRun ref = run_source(c, false);
  r.counters += ref.counters;
  if (!r.check(static_cast<bool>(ref.run), "reference run failed: {}", ref.run ? "" : ref.run.error().to_string()))
    return r;
  check_transcript(ref.transcript, c.steps, "reference", r);

  // 2. Source: save mid-L2, then finish.
  SourceRun src = run_source(c, true);
  r.counters += src.counters;
  r.check(static_cast<bool>(src.run), "source run failed: {}", src.run ? "" : src.run.error().to_string());
  r.check(src.transcript == ref.transcript, "source: taking the nested state changed what L2 did");
  auto image = vmx::decode(src.blob);
  if (!r.check(static_cast<bool>(image), "the saved blob does not decode: {}",
               image ? "" : image.error().to_string()))
    return r;
  r.check(image->guest_mode, "the state was taken while L2 ran, but the blob is not in guest mode");
  r.check(!image->run_pending, "L2 had run: no entry can be pending");
  r.check(image->vmcs12 && image->vmcs12->launched(), "the saved vmcs12 is not launched");
  r.details["blob"] = {{"bytes", src.blob.size()},
                       {"flags", image->flags()},
                       {"guest_mode", image->guest_mode},
                       {"run_pending", image->run_pending},
                       {"vmxon_gpa", image->vmxon_gpa},
                       {"vmcs12_gpa", image->current_vmcs_gpa}};

  // 3. Destination: restore into a fresh VM, refuse the malformed blobs,
  // then let L2 finish there.
  auto dst_r = make_vm(c);
  if (!dst_r) return r.fail(dst_r.error().to_string()), r;
  NestedEnv& dst = **dst_r;
  if (auto st = restore_memory(dst, src.memory); !st) return r.fail("memory copy: " + st.error().to_string()), r;
  if (auto st = dst.machine->set_nested_state(0, src.blob); !st)
    return r.fail("restoring the saved state failed: " + st.error().to_string()), r;
  auto got = dst.machine->get_nested_state(0);
  r.check(got && *got == src.blob, "get after set does not return the blob that was set");
  r.details["malformed"] = reject_all(*dst.machine, src.blob, r);
  if (auto st = bind_restored_programs(dst, c, image->current_vmcs_gpa); !st) return r.fail(st.error().to_string()), r;
  Status run = dst.machine->run(std::chrono::seconds(60));
  CounterSnapshot k = dst.counters();
  r.counters += k;
  r.check(static_cast<bool>(run), "the restored L2 did not finish: {}", run ? "" : run.error().to_string());
  Transcript restored = read_transcript(dst);
  check_transcript(restored, c.steps, "restored", r);
  r.check(restored == ref.transcript, "the restored run's transcript differs from the uninterrupted run's");
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
  r.details["destination_counters"] = k.to_json();
  size_t rejected = 0;
  for (const auto& j : r.details["malformed"])
    if (j["rejected"].get<bool>() && j["state_unchanged"].get<bool>() && j.value("expected_rule", false)) rejected++;
  r.note(fmt::format("{}: L2 saved at step {} of {} while running, restored into a fresh VM, finished with the same "
                     "{}-entry transcript as the uninterrupted run ({} after the migration)",
                     tag, c.park_step(), c.steps, restored.size(), restored.size() - before));
  r.note(fmt::format("{} of {} malformed blobs refused, each with its own error, the restored state untouched", rejected,
                     r.details["malformed"].size()));
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
          "Asserts the transcript equals an uninterrupted run's. KVM's vmx_set_nested_state_test checks the "
          "refusals; the migration across VMs is ours.",
      .add_options =
          [](CLI::App& app, SelftestOptions& o) {
            o.add(app, "--steps", "L2 steps (the migration is half way)", "16")->check(CLI::Range(4, 256));
          },
      .run = run_nested_state,
  });
}

}  // namespace nestcache::workloads
