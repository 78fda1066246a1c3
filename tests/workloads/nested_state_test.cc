// Nested state through the public API (cpu::Machine::get/set_nested_state)
// and the `nested-state` selftest through the registry: get while L2 runs on
// the vCPU thread, restore into a fresh VM, pages that cannot be resolved at
// the first entry after a restore, and malformed blobs refused with nothing
// changed.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <set>
#include <thread>

#include "vmx/nested_state_format.h"
#include "workloads/nested_state_migration.h"
#include "workloads/registry.h"

namespace nestcache::workloads {
namespace {

using namespace nested_state;

MigrationConfig config(Strategy s = Strategy::cache, MemoryKind m = MemoryKind::unmanaged) {
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
  const MigrationConfig c = config(Strategy::map);
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
  for (Strategy s : kAllStrategies) {
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

SelftestResult run_selftest_named(Strategy s, MemoryKind m) {
  register_all();
  const SelftestInfo* info = find_selftest("nested-state");
  EXPECT_NE(info, nullptr);
  if (!info) return {};
  RunOptions o;
  o.strategy = s;
  o.memory = m;
  o.extra = default_extra(*info);
  return run_selftest(*info, o);
}

TEST(NestedStateSelftest, PassesUnderEveryStrategyAndMemoryKind) {
  for (Strategy s : kAllStrategies) {
    for (MemoryKind m : {MemoryKind::managed, MemoryKind::unmanaged}) {
      SelftestResult r = run_selftest_named(s, m);
      for (const std::string& f : r.failures) ADD_FAILURE() << strategy_name(s) << "/" << memory_kind_name(m) << ": " << f;
      EXPECT_TRUE(r.passed);
    }
  }
}

TEST(NestedStateSelftest, JsonCarriesEachMalformedBlobsOutcome) {
  SelftestResult r = run_selftest_named(Strategy::cache, MemoryKind::unmanaged);
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

}  // namespace
}  // namespace nestcache::workloads
