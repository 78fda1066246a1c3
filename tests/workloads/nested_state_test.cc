// Nested state through the public API (cpu::Machine::get/set_nested_state)
// and the `nested-state` selftest through the registry: get while L2 runs on
// the vCPU thread, restore into a fresh VM, pages that cannot be resolved at
// the first entry after a restore, and malformed blobs refused with nothing
// changed; the same for an enlightened L1 (eVMCS), whose eVMCS the request
// maps before the first entry.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <set>
#include <thread>

#include "support/params.h"
#include "support/selftests.h"
#include "vmx/evmcs.h"
#include "vmx/vmx_nested_contexts.h"
#include "vmx/nested_state_format.h"
#include "workloads/nested_state_migration.h"
#include "workloads/registry.h"

namespace nestcache::workloads {
namespace {

using namespace nested_state;

MigrationConfig config(StrategyKind s = StrategyKind::cache, MemoryKind m = MemoryKind::unmanaged) {
  MigrationConfig c;
  c.strategy = s;
  c.memory = m;
  return c;
}

TEST(NestedStateMachine, GetWorksWhileL2RunsOnTheVcpuThread) {
  const MigrationConfig c = config();
  auto env = make_vm(c);
  ASSERT_TRUE(env) << env.error().to_string();
  cpu::Machine& m = *(*env)->machine;

  // Another thread takes the state over and over from before L1's VMXON to
  // after L2 parks: every blob must be whole and valid, whatever the vCPU
  // was doing when the request reached it.
  std::atomic<bool> stop{false};
  std::atomic<int> gets{0}, guest_mode{0}, invalid{0};
  std::thread hammer([&] {
    while (!stop.load()) {
      auto blob = m.get_nested_state(0);
      if (!blob || !vmx::decode(*blob)) {
        invalid++;
      } else if (vmx::decode(*blob)->guest_mode) {
        guest_mode++;
      }
      gets++;
    }
  });
  auto parked = ParkedRun::start(**env, c);
  ASSERT_TRUE(parked) << parked.error().to_string();

  // L2 runs (parked in a loop without exits): the get kicks it out of guest
  // mode, and the vCPU goes back into L2 afterwards.
  const uint64_t kicks_before = (*env)->counters()[Counter::kicks];
  auto a = m.get_nested_state(0);
  auto b = m.get_nested_state(0);
  ASSERT_TRUE(a && b);
  EXPECT_EQ(*a, *b) << "nothing changes while L2 spins";
  auto image = vmx::decode(*a);
  ASSERT_TRUE(image) << image.error().to_string();
  EXPECT_TRUE(image->guest_mode);
  EXPECT_FALSE(image->run_pending);
  EXPECT_GT((*env)->counters()[Counter::kicks], kicks_before) << "the vCPU was kicked out of L2";

  // Let the other thread take some while L2 is parked too.
  for (auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
       guest_mode.load() < 3 && std::chrono::steady_clock::now() < deadline;)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  stop.store(true);
  hammer.join();
  Status st = (*parked)->release();
  ASSERT_TRUE(st) << st.error().to_string();
  EXPECT_EQ(invalid.load(), 0);
  EXPECT_GT(gets.load(), 0);
  EXPECT_GT(guest_mode.load(), 0);
  Transcript t = read_transcript(**env);
  ASSERT_FALSE(t.empty());
  EXPECT_EQ(t.back().step, static_cast<uint64_t>(c.steps) + 1) << "L2 finished";

  // A stopped vCPU is read directly.
  auto after = m.get_nested_state(0);
  ASSERT_TRUE(after);
  EXPECT_TRUE(vmx::decode(*after));
}

TEST(NestedStateMachine, BadVcpuIndexIsAnError) {
  auto env = make_vm(config());
  ASSERT_TRUE(env);
  auto g = (*env)->machine->get_nested_state(3);
  ASSERT_FALSE(g);
  EXPECT_EQ(g.error().code, EINVAL);
  auto s = (*env)->machine->set_nested_state(-1, std::vector<std::byte>(64));
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code, EINVAL);
}

TEST(NestedStateMachine, SetOnARunningVcpuRefusesAMalformedBlobAndL2GoesOn) {
  const MigrationConfig c = config(StrategyKind::map);
  auto env = make_vm(c);
  ASSERT_TRUE(env);
  cpu::Machine& m = *(*env)->machine;
  auto parked = ParkedRun::start(**env, c);
  ASSERT_TRUE(parked) << parked.error().to_string();
  auto good = m.get_nested_state(0);
  ASSERT_TRUE(good);
  std::vector<std::byte> bad = *good;
  bad[vmx::nested_state_offset::kVersion] = std::byte{9};
  auto st = m.set_nested_state(0, bad);
  ASSERT_FALSE(st);
  EXPECT_NE(st.error().message.find("version 9 is not supported"), std::string::npos) << st.error().message;
  EXPECT_EQ(*m.get_nested_state(0), *good);
  ASSERT_TRUE((*parked)->release());
}

TEST(NestedStateMigration, L2ContinuesInAFreshVmWithTheSameTranscript) {
  for (StrategyKind s : kAllStrategies) {
    const MigrationConfig c = config(s);
    SourceRun src = run_source(c, true);
    ASSERT_TRUE(src.run) << src.run.error().to_string();
    ASSERT_FALSE(src.blob.empty());
    RestoredRun dst = run_restored(c, src.memory, src.blob);
    ASSERT_TRUE(dst.set) << dst.set.error().to_string();
    ASSERT_TRUE(dst.run) << strategy_name(s) << ": " << dst.run.error().to_string();
    EXPECT_EQ(dst.transcript, src.transcript) << strategy_name(s);
    EXPECT_EQ(dst.counters[Counter::stale_accesses], 0u);
    EXPECT_GE(dst.counters[Counter::posted_interrupts_delivered], 2u) << "interrupts posted after the restore arrive";
  }
}

// The first entry after a restore needs the vmcs12 pages; KVM resolves them
// then (KVM_REQ_GET_NESTED_STATE_PAGES), not at set.
class UnresolvablePage : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    src_ = new SourceRun(run_source(config(), true));
    ASSERT_TRUE(src_->run) << src_->run.error().to_string();
  }
  static void TearDownTestSuite() {
    delete src_;
    src_ = nullptr;
  }
  static size_t entries_before_migration() {
    size_t n = 0;
    for (const TranscriptEntry& e : src_->transcript)
      if (e.step < static_cast<uint64_t>(config().park_step())) n++;
    return n;
  }
  static SourceRun* src_;
};
SourceRun* UnresolvablePage::src_ = nullptr;

TEST_F(UnresolvablePage, ApicAccessPageFailsTheFirstEntryWithAnInternalError) {
  RestoredRun dst = run_restored(config(), src_->memory, src_->blob, {kApicSlot});
  ASSERT_TRUE(dst.set) << "set does not look at the vmcs12's pages: " << dst.set.error().to_string();
  ASSERT_FALSE(dst.run);
  EXPECT_EQ(dst.run.error().code, EIO);
  EXPECT_NE(dst.run.error().message.find("KVM internal error on the first entry after a nested-state restore"),
            std::string::npos)
      << dst.run.error().message;
  EXPECT_NE(dst.run.error().message.find("no backing for APIC-access address 0xc0000000"), std::string::npos)
      << dst.run.error().message;
  EXPECT_EQ(dst.counters[Counter::internal_errors], 1u);
  EXPECT_EQ(dst.transcript.size(), entries_before_migration()) << "L2 never ran in the new VM";
}

TEST_F(UnresolvablePage, VirtualApicPageLeavesAnInvalidAddressSoTheEntryFails) {
  RestoredRun dst = run_restored(config(), src_->memory, src_->blob, {kVapicSlot});
  ASSERT_TRUE(dst.set);
  ASSERT_FALSE(dst.run);
  EXPECT_NE(dst.run.error().message.find("virtual-APIC page 0xd0000000 has no backing"), std::string::npos)
      << dst.run.error().message;
  EXPECT_EQ(dst.transcript.size(), entries_before_migration());
}

TEST_F(UnresolvablePage, DescriptorClearsPostedInterruptsAndFailsOnlyWhenL0NeedsIt) {
  RestoredRun dst = run_restored(config(), src_->memory, src_->blob, {kPiSlot});
  ASSERT_TRUE(dst.set);
  ASSERT_FALSE(dst.run) << "the first posted interrupt after the restore needs the descriptor";
  EXPECT_NE(dst.run.error().message.find("posted-interrupt descriptor unreachable"), std::string::npos)
      << dst.run.error().message;
  EXPECT_GT(dst.transcript.size(), entries_before_migration()) << "L2 ran until L0 needed the descriptor";
}

// --- an enlightened L1 (eVMCS) -------------------------------------------------

MigrationConfig evmcs_config(StrategyKind s = StrategyKind::cache) {
  MigrationConfig c = config(s);
  c.evmcs = true;
  return c;
}

TEST(NestedStateEvmcsMigration, L2ContinuesInAFreshVmWithTheSameTranscriptAndFinalState) {
  for (StrategyKind s : kAllStrategies) {
    SCOPED_TRACE(strategy_name(s));
    const MigrationConfig c = evmcs_config(s);
    SourceRun src = run_source(c, true);
    ASSERT_TRUE(src.run) << src.run.error().to_string();
    auto image = vmx::decode(src.blob);
    ASSERT_TRUE(image) << image.error().to_string();
    EXPECT_TRUE(image->evmcs);
    EXPECT_TRUE(image->guest_mode);
    EXPECT_EQ(image->current_vmcs_gpa, kEvmcsGpa);
    EXPECT_EQ(src.vp_assist_msr, kVpAssistGpa | 1);
    RestoredRun dst = run_restored(c, src.memory, src.blob, {}, src.vp_assist_msr);
    ASSERT_TRUE(dst.set) << dst.set.error().to_string();
    ASSERT_TRUE(dst.run) << dst.run.error().to_string();
    EXPECT_EQ(dst.transcript, src.transcript);
    EXPECT_FALSE(dst.final_state.empty());
    EXPECT_EQ(dst.final_state, src.final_state) << "the restored vCPU ends with the same eVMCS and vmcs12";
    EXPECT_EQ(dst.counters[Counter::stale_accesses], 0u);
    EXPECT_EQ(dst.counters[Counter::evmcs_map_failures], 0u);
  }
}

TEST(NestedStateEvmcsMigration, TheRestoredContextIsKeyedByTheEvmcsAddress) {
  const MigrationConfig c = evmcs_config(StrategyKind::cache);
  SourceRun src = run_source(c, true);
  ASSERT_TRUE(src.run) << src.run.error().to_string();
  auto env = make_vm(c);
  ASSERT_TRUE(env);
  ASSERT_TRUE(restore_memory(**env, src.memory));
  ASSERT_TRUE((*env)->machine->set_nested_state(0, src.blob));
  vmx::VmxNestedContexts* contexts = (*env)->machine->nested_contexts();
  ASSERT_NE(contexts, nullptr);
  const vmx::NestedContext* ctx = contexts->table().find(kEvmcsGpa);
  ASSERT_NE(ctx, nullptr) << "set loads the eVMCS's context, as an eVMCS address change does";
  EXPECT_EQ(ctx->vcpu_id(), 0);
  EXPECT_EQ((*env)->machine->vcpu(0).nested().context(), ctx);
}

TEST(NestedStateEvmcsMigration, AVcpuWithoutTheEnlightenedVmcsRefusesTheBlob) {
  SourceRun src = run_source(evmcs_config(), true);
  ASSERT_TRUE(src.run) << src.run.error().to_string();
  RestoredRun dst = run_restored(config(), src.memory, src.blob);  // evmcs = false: never enabled
  ASSERT_FALSE(dst.set);
  EXPECT_EQ(dst.set.error().code, EINVAL);
  EXPECT_NE(dst.set.error().message.find("vCPU 0 has not enabled the enlightened VMCS"), std::string::npos)
      << dst.set.error().message;
}

// The eVMCS is resolved by the request before the first entry: each way it
// cannot be fails that entry with a KVM internal error, and L2 never runs.
class UnresolvableEvmcs : public ::testing::TestWithParam<StrategyKind> {
 protected:
  static void SetUpTestSuite() {
    src_ = new SourceRun(run_source(evmcs_config(), true));
    ASSERT_TRUE(src_->run) << src_->run.error().to_string();
  }
  static void TearDownTestSuite() {
    delete src_;
    src_ = nullptr;
  }
  RestoredRun restore(const std::function<Status(NestedEnv&)>& before_run) {
    return run_restored(evmcs_config(GetParam()), src_->memory, src_->blob, {}, src_->vp_assist_msr, before_run);
  }
  void expect_entry_failed(const RestoredRun& dst, const std::string& why) {
    ASSERT_TRUE(dst.set) << "set does not map the eVMCS: " << dst.set.error().to_string();
    ASSERT_FALSE(dst.run);
    EXPECT_EQ(dst.run.error().code, EIO);
    EXPECT_NE(dst.run.error().message.find("KVM internal error on the first entry after a nested-state restore: "
                                           "nested state restored, but its enlightened VMCS cannot be used"),
              std::string::npos)
        << dst.run.error().message;
    EXPECT_NE(dst.run.error().message.find(why), std::string::npos) << dst.run.error().message;
    EXPECT_EQ(dst.counters[Counter::internal_errors], 1u);
    size_t before = 0;
    for (const TranscriptEntry& e : src_->transcript)
      if (e.step < static_cast<uint64_t>(evmcs_config().park_step())) before++;
    EXPECT_EQ(dst.transcript.size(), before) << "L2 never ran in the new VM";
  }
  static SourceRun* src_;
};
SourceRun* UnresolvableEvmcs::src_ = nullptr;

TEST_P(UnresolvableEvmcs, MemslotRemovedAfterTheRestore) {
  RestoredRun dst = restore([](NestedEnv& env) {
    return env.vm->set_memory_region({kEvmcsSlot, 0, kEvmcsGpa, 0, 0});
  });
  expect_entry_failed(dst, "the enlightened VMCS at 0xb0000000 cannot be mapped");
  EXPECT_GE(dst.counters[Counter::evmcs_map_failures], 1u);
}

TEST_P(UnresolvableEvmcs, VpAssistMsrNotRestored) {
  RestoredRun dst = restore([](NestedEnv& env) { return env.machine->set_vp_assist_msr(0, 0); });
  expect_entry_failed(dst, "the VP-assist page (MSR value 0x0) names no eVMCS");
}

TEST_P(UnresolvableEvmcs, VpAssistPageNamesAnotherEvmcs) {
  RestoredRun dst = restore([](NestedEnv& env) {
    const uint64_t other = kEvmcsGpa + kPageSize;
    return env.vm->write_guest(kVpAssistGpa + vmx::kVpAssistCurrentNestedVmcsOffset, &other, sizeof other);
  });
  expect_entry_failed(dst, "names eVMCS 0xb0001000, not the restored eVMCS 0xb0000000");
}

TEST_P(UnresolvableEvmcs, EvmcsRevisionOverwritten) {
  RestoredRun dst = restore([](NestedEnv& env) {
    const uint32_t bad = 0x77;
    return env.vm->write_guest(kEvmcsGpa, &bad, sizeof bad);
  });
  expect_entry_failed(dst, "the enlightened VMCS at 0xb0000000: ");
}

INSTANTIATE_TEST_SUITE_P(EveryStrategy, UnresolvableEvmcs, ::testing::ValuesIn(kAllStrategies),
                         test_support::strategy_case_name);

SelftestResult run_selftest_named(StrategyKind s, MemoryKind m, bool evmcs = false) {
  std::map<std::string, std::string> extra;
  if (evmcs) extra["evmcs"] = "true";
  return test_support::run_named_selftest("nested-state", s, m, extra);
}

TEST(NestedStateSelftest, PassesUnderEveryStrategyAndMemoryKind) {
  for (StrategyKind s : kAllStrategies) {
    for (MemoryKind m : {MemoryKind::managed, MemoryKind::unmanaged}) {
      SelftestResult r = run_selftest_named(s, m);
      for (const std::string& f : r.failures) ADD_FAILURE() << strategy_name(s) << "/" << memory_kind_name(m) << ": " << f;
      EXPECT_TRUE(r.passed);
    }
  }
}

TEST(NestedStateSelftest, JsonCarriesEachMalformedBlobsOutcome) {
  SelftestResult r = run_selftest_named(StrategyKind::cache, MemoryKind::unmanaged);
  ASSERT_TRUE(r.passed);
  const auto& bad = r.details["malformed"];
  ASSERT_GE(bad.size(), 20u);
  std::set<std::string> names, messages;
  for (const auto& b : bad) {
    EXPECT_TRUE(b["rejected"].get<bool>()) << b.dump();
    EXPECT_TRUE(b["state_unchanged"].get<bool>()) << b.dump();
    EXPECT_TRUE(b["expected_rule"].get<bool>()) << b.dump();
    EXPECT_TRUE(names.insert(b["name"].get<std::string>()).second);
    EXPECT_TRUE(messages.insert(b["message"].get<std::string>()).second) << b.dump();
  }
  EXPECT_TRUE(r.details["blob"]["guest_mode"].get<bool>());
  EXPECT_GT(r.details["entries_after_migration"].get<int>(), 0);
}

TEST(NestedStateSelftest, EvmcsPassesUnderEveryStrategy) {
  for (StrategyKind s : kAllStrategies) {
    SelftestResult r = run_selftest_named(s, MemoryKind::unmanaged, /*evmcs=*/true);
    for (const std::string& f : r.failures) ADD_FAILURE() << strategy_name(s) << ": " << f;
    EXPECT_TRUE(r.passed);
    EXPECT_TRUE(r.details["blob"]["evmcs"].get<bool>());
  }
}

TEST(NestedStateSelftest, EvmcsMalformedBlobsEachHaveTheirOwnError) {
  SelftestResult r = run_selftest_named(StrategyKind::cache, MemoryKind::managed, /*evmcs=*/true);
  ASSERT_TRUE(r.passed);
  std::set<std::string> names, messages;
  for (const auto& b : r.details["malformed"]) {
    EXPECT_TRUE(b["rejected"].get<bool>()) << b.dump();
    EXPECT_TRUE(b["state_unchanged"].get<bool>()) << b.dump();
    EXPECT_TRUE(b["expected_rule"].get<bool>()) << b.dump();
    names.insert(b["name"].get<std::string>());
    EXPECT_TRUE(messages.insert(b["message"].get<std::string>()).second) << b.dump();
  }
  for (const char* n : {"evmcs-on-vcpu-without-evmcs", "misaligned-evmcs", "evmcs-without-memslot",
                        "evmcs-beyond-width", "evmcs-is-vmxon", "evmcs-without-address", "evmcs-without-vmxon",
                        "evmcs-unsupported-controls"})
    EXPECT_TRUE(names.count(n)) << n;
}

}  // namespace
}  // namespace nestcache::workloads
