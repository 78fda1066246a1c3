// Replays of the counterexamples SPIN finds in the protocol's model
// (model/protocol.pml, model/check.sh, model/README.md).
//
// For each variant of the protocol that drops one step, check.sh prints a run
// of the model that breaks a property, as numbered steps. Each replay here
// drives the C++ code through that run with the same step dropped
// (vm::ProtocolVariant) and must see the property break the same way; the
// same schedule on nestcache's protocol must keep it. The vCPU thread is not
// running: the test makes the vCPU's moves itself (NestedVmx, vm::Vcpu) in the
// trail's order and plays the CPU with the CPU model's frame-tag check, while
// host changes run on threads of their own. Comments give the trail's step
// numbers. Where the code has no pause point inside a host change, the change
// runs as one block where the trail needs its effect (model/README.md lists
// those places); the block is itself a run of the model.
#include <gtest/gtest.h>

#include <atomic>
#include <fstream>
#include <regex>
#include <thread>
#include <vector>

#include "vm/protocol_variant.h"
#include "vmx/entry_checks.h"
#include "workloads/nested_env.h"

namespace nestcache::workloads {
namespace {

using vm::Request;
using vmx::L1Page;

constexpr Gpa kVmxonGpa = 0x10000;
constexpr Gpa kVmcsGpa = 0x11000;
constexpr Gpa kVapicGpa = 0xd0000000;  // the model's page: its hva is the model's hva A
constexpr uint32_t kVapicSlot = 2;

// One L1 vCPU whose vmcs12 runs an L2 with the TPR shadow: the virtual-APIC
// page is the page the hardware uses through vmcs02 and L0 software reaches
// through the same vCPU-bound cache. CR8-load and CR8-store exiting make KVM's
// fallback for an unusable page "clear the TPR shadow" (the model's "vmcs02
// without the page").
class TrailReplay {
 public:
  // `vcpus`: the L1 vCPUs; vCPU 0 runs the trail's L2 (REBIND trails use
  // vCPU 1 as the vCPU that takes its cache over).
  explicit TrailReplay(std::string_view variant, int vcpus = 1) {
    NestedEnvConfig ec{StrategyKind::cache, MemoryKind::unmanaged};
    ec.vcpus = vcpus;
    ec.l1_bytes = 8 << 20;
    ec.stale_fatal = false;
    auto e = NestedEnv::create(ec);
    NC_CHECK(e);
    env = std::move(*e);
    std::optional<vm::ProtocolVariant> p = vm::ProtocolVariant::from_model(variant);
    NC_CHECK(p);
    env->vm->set_protocol_for_replay(*p);
    vapic_hva = *env->add_page_slot(kVapicSlot, kVapicGpa);

    uint32_t rev = vmx::kVmcs12Revision;
    NC_CHECK(env->vm->write_guest(kVmxonGpa, &rev, sizeof rev));
    vmx::Vmcs12 v = vmx::minimal_vmcs12();
    v.primary_proc_controls |= vmx::proc::kUseTprShadow | vmx::proc::kCr8LoadExiting | vmx::proc::kCr8StoreExiting;
    v.virtual_apic_page_addr = kVapicGpa;
    std::array<std::byte, kPageSize> image;
    v.serialize(image);
    NC_CHECK(env->vm->write_guest(kVmcsGpa, image.data(), image.size()));
    NC_CHECK(n().vmxon(kVmxonGpa).ok());
    NC_CHECK(n().vmptrld(kVmcsGpa).ok());
  }

  ~TrailReplay() {
    // A failed expectation may leave a host change waiting for this vCPU.
    if (vcpu().mode() != vm::VcpuMode::outside) vcpu().exit_guest_mode();
    join_hosts();
  }

  cpu::Vcpu& vcpu() { return env->machine->vcpu(0); }
  vmx::NestedVmx& n() { return vcpu().nested(); }
  vm::PfnCache& cache() { return *n().pages().cache(L1Page::vapic); }

  // "vmlaunch": L1's VMLAUNCH; NestedVmx::enter builds vmcs02.
  bool vmlaunch() { return n().enter(true).kind == vmx::EntryResult::Kind::entered; }

  // "requests", "mode_in" and the last check, as cpu::Vcpu's run loop makes
  // them: true if L2 runs (the vCPU is then in guest mode).
  bool enter_l2() {
    vcpu().check_request(Request::kOutsideGuestMode);
    if (vcpu().check_request(Request::kRefreshGuestPages)) refresh = n().refresh_guest_pages();
    if (!vcpu().enter_guest_mode()) return false;  // "cancel_req"
    if (!n().check_before_hardware_entry()) {       // "last_check_fail": requests kRefreshGuestPages
      vcpu().exit_guest_mode();
      return false;
    }
    return true;
  }

  // "l2_access": the CPU uses vmcs02's virtual-APIC pfn; true if the frame
  // still backs the page (the CPU model's check, which counts a stale access).
  bool cpu_access() {
    const vmx::HwPage& page = n().vmcs02().vapic;
    return !page.valid() || env->phys->check(page.tag, "virtual-APIC page", &vcpu().counters());
  }

  // "l2_kicked" / "l2_exit" + "mode_out".
  void leave_l2() { vcpu().exit_guest_mode(); }

  // "exit_sw": the posted-interrupt completion reaches the virtual-APIC page
  // through the page strategy (CachePageSet::access); reads through the view
  // count a stale access too.
  Status software_access() {
    return n().access_page(L1Page::vapic, kVapicGpa, [](const vmx::PageView& view) { (void)view.read<uint32_t>(0x80); });
  }

  // Runs a host change on a thread of its own, as the host's would.
  void host(std::function<void()> change) {
    hosts_.emplace_back([this, change = std::move(change)] {
      change();
      returned_.fetch_add(1);
    });
  }
  void discard_page() { EXPECT_TRUE(env->mm->discard(vapic_hva, kPageSize)); }
  void migrate_page() { EXPECT_TRUE(env->mm->migrate(vapic_hva)); }
  int hosts_returned() const { return returned_.load(); }
  // How many times a host change has waited for this vCPU to leave guest mode.
  uint64_t waits() { return vcpu().counters().get(Counter::guest_mode_waits); }
  // Blocks until `done()` holds: each use names a condition that one of the
  // variants must reach, so no replay waits on a timer.
  template <class Pred>
  void until(Pred done) {
    while (!done()) std::this_thread::yield();
  }
  void join_hosts() {
    for (auto& t : hosts_)
      if (t.joinable()) t.join();
  }

  std::unique_ptr<NestedEnv> env;
  Hva vapic_hva = 0;
  Status refresh = ok();

 private:
  std::vector<std::thread> hosts_;
  std::atomic<int> returned_{0};
};

// Each replay returns whether the property held on that schedule.

// SEED: a software refresh of a vCPU-bound cache leaves vmcs02 on the old pfn.
bool replay_seed(std::string_view variant) {
  TrailReplay r(variant);
  EXPECT_TRUE(r.vmlaunch());  // 1-10: vmcs02 holds frame 0 of hva A
  EXPECT_TRUE(r.enter_l2());  // 11-13
  // 2, 9, 14-17: the host discards hva A: the notifier marks the cache
  // invalid, requests kOutsideGuestMode, sees the vCPU in guest mode, kicks.
  r.host([&] { r.discard_page(); });
  r.until([&] { return r.vcpu().mode() == vm::VcpuMode::exiting; });
  r.leave_l2();     // 18-19: L2 exits at the next boundary
  r.join_hosts();   // 21-22: hva A unmapped, the notifier returns, frame 0 freed
  EXPECT_TRUE(r.software_access());  // 20, 23-29: refreshed (a new frame), then read
  EXPECT_TRUE(r.enter_l2());         // 30-32: ours rewrites vmcs02 first
  bool live = r.cpu_access();        // 33
  r.leave_l2();
  return live;
}

// SEED again, through a memslot move (check.sh's second SEED trail, host
// changes only after a memslot change): the software refresh follows the page
// to its new hva and files the cache there, while vmcs02 keeps the old hva's
// frame; a discard of the old hva then finds no cache to mark, no vCPU to kick.
bool replay_seed_memslot_move(std::string_view variant) {
  TrailReplay r(variant);
  EXPECT_TRUE(r.vmlaunch());  // 1-8: vmcs02 holds frame 0 of hva A
  // 9-10: the VMM moves the page's memslot to hva B (another region).
  Result<Hva> b = r.env->mm->create_region(kPageSize, r.env->config.memory);
  EXPECT_TRUE(b);
  EXPECT_TRUE(r.env->vm->set_memory_region({kVapicSlot, 0, kVapicGpa, 0, r.vapic_hva}));
  EXPECT_TRUE(r.env->vm->set_memory_region({kVapicSlot, 0, kVapicGpa, kPageSize, *b}));
  EXPECT_TRUE(r.enter_l2());  // 13-15: frame 0 still backs hva A; the last check passes
  r.leave_l2();               // 16-17
  // 18-21, 24-28: the generation moved: the refresh files the cache at hva
  // B and installs B's frame; ours requests the vmcs02 rewrite.
  EXPECT_TRUE(r.software_access());
  // 11-12, 22-23: the discard of hva A finds no cache filed there; frame 0
  // is freed.
  r.host([&] { r.discard_page(); });
  r.join_hosts();
  EXPECT_TRUE(r.enter_l2());   // 29-31: ours rewrites vmcs02 first
  bool live = r.cpu_access();  // 32
  r.leave_l2();
  return live;
}

// NO_WAIT: the notifier kicks the vCPU but returns before it left L2.
bool replay_no_wait(std::string_view variant) {
  TrailReplay r(variant);
  EXPECT_TRUE(r.vmlaunch());  // 1-10
  EXPECT_TRUE(r.enter_l2());  // 11-13
  // 2, 9, 14-17: the discard marks the cache, requests, sees the vCPU in
  // guest mode and kicks it; 18-19: it waits (ours) or returns at once and
  // unmaps hva A.
  r.host([&] { r.discard_page(); });
  r.until([&] { return r.waits() == 1 || r.hosts_returned() == 1; });
  bool live = r.cpu_access();  // 20: one more access before the operation boundary
  r.leave_l2();
  r.join_hosts();
  return live;
}

// NO_RETRY: refresh installs a frame an invalidation freed after the resolve.
bool replay_no_retry(std::string_view variant) {
  TrailReplay r(variant);
  // 1, 5-9: VMLAUNCH activates the cache; its refresh maps frame 0 of hva A.
  // The discard (2-4, 10) runs whole between that map and the install.
  int tries = 0;
  r.cache().set_refresh_hook([&] {
    if (tries++ == 0) std::thread([&] { r.discard_page(); }).join();
  });
  EXPECT_TRUE(r.vmlaunch());  // 11-12: install (ours: retry first), vmcs02
  r.cache().set_refresh_hook(nullptr);
  // 13-15 (the discard's kOutsideGuestMode goes with the other requests).
  EXPECT_TRUE(r.enter_l2());
  bool live = r.cpu_access();  // 16
  r.leave_l2();
  return live;
}

// NO_LAST_CHECK: nothing catches an invalidation between vmcs02 and entry.
bool replay_no_last_check(std::string_view variant) {
  TrailReplay r(variant);
  EXPECT_TRUE(r.vmlaunch());  // 1-10: vmcs02 holds frame 0
  // 2, 9, 11-13, 17-18: the discard marks the cache, requests, sees the vCPU
  // outside guest mode (no wait) and unmaps hva A.
  r.host([&] { r.discard_page(); });
  r.join_hosts();
  if (!r.enter_l2()) return true;  // 14-16: ours: the last check cancels the entry
  bool live = r.cpu_access();      // 19
  r.leave_l2();
  return live;
}

// FLIPPED_ONLY: a second, overlapping invalidation finds the cache already
// invalid and does not wait for the vCPU still using its pfn.
bool replay_flipped_only(std::string_view variant) {
  TrailReplay r(variant);
  EXPECT_TRUE(r.vmlaunch());  // 1-12
  EXPECT_TRUE(r.enter_l2());  // 13-15
  // 3, 11, 16: host0's discard marks the cache invalid (and waits for the vCPU).
  r.host([&] { r.discard_page(); });
  r.until([&] { return r.waits() == 1; });
  // 2, 10, 17-18: host1's discard finds it already invalid: ours waits as
  // well; FLIPPED_ONLY unmaps hva A and returns.
  r.host([&] { r.discard_page(); });
  r.until([&] { return r.waits() == 2 || r.hosts_returned() == 1; });
  bool live = r.cpu_access();  // 19
  r.leave_l2();
  r.join_hosts();
  return live;
}

// SW_DEACTIVATE: a failed software refresh takes the cache out of the
// registry while vmcs02 still holds its pfn.
bool replay_sw_deactivate(std::string_view variant) {
  TrailReplay r(variant);
  EXPECT_TRUE(r.vmlaunch());  // 1-10: vmcs02 holds frame 0
  // 11: the VMM deletes the page's memslot.
  EXPECT_TRUE(r.env->vm->set_memory_region({kVapicSlot, 0, kVapicGpa, 0, r.vapic_hva}));
  EXPECT_TRUE(r.enter_l2());  // 12-14: the last check does not look at generations
  r.leave_l2();               // 15-16
  // 17-21: the software access refreshes: no memslot (EFAULT). Ours leaves
  // the cache active and invalid; SW_DEACTIVATE deactivates it.
  EXPECT_FALSE(r.software_access());
  // 2, 9, 22-23: the discard of hva A finds the cache (ours) or nothing, and
  // unmaps hva A.
  r.host([&] { r.discard_page(); });
  r.join_hosts();
  if (!r.enter_l2()) return true;  // 24-26: ours: the last check cancels the entry
  bool live = r.cpu_access();      // 27
  r.leave_l2();
  return live;
}

// NO_DEACTIVATE: a vCPU-bound cache whose activation fails stays active and
// invalid, so every entry is cancelled. Holds if L2 is entered within three
// rounds; a round that comes back to the state it started from is the
// trail's cycle, which repeats forever.
bool replay_no_deactivate(std::string_view variant) {
  TrailReplay r(variant);
  // 2-5: no memslot holds the page when L1 launches (6-11 migrate a frame the
  // cache never mapped: nothing to replay).
  EXPECT_TRUE(r.env->vm->set_memory_region({kVapicSlot, 0, kVapicGpa, 0, r.vapic_hva}));
  EXPECT_TRUE(r.vmlaunch());  // 1, 12-16: activation fails; vmcs02 without the page
  auto state = [&] {
    return std::tuple{r.cache().active(), r.cache().invalid(), r.n().vmcs02().vapic.valid()};
  };
  for (int round = 0; round < 3; round++) {
    auto before = state();
    if (r.enter_l2()) {  // 17-18: L2 runs
      r.leave_l2();
      return true;
    }
    // 19-28: the last check cancelled; the next round's request rewrites
    // vmcs02 and fails to activate again.
    EXPECT_EQ(state(), before) << "a round of the cycle changes nothing";
  }
  return false;
}

// STALE_SNAPSHOT: once an invalidation ended after the snapshot, a refresh
// that never takes a new one retries forever. Holds if the refresh installs
// a frame; the third try of the replayed refresh is the second with no
// invalidation since the last: the loop has come back to its state (the
// trail's cycle), and the replay then restores ours so the test ends.
bool replay_stale_snapshot(std::string_view variant) {
  TrailReplay r(variant);
  int tries = 0;
  bool cycle = false;
  r.cache().set_refresh_hook([&] {
    // 6-9, 14-15: a migration of hva A ends after the snapshot (13).
    if (++tries == 1) std::thread([&] { r.migrate_page(); }).join();
    // 16-19: tries 2 and 3 map the same frame against the same snapshot.
    if (tries == 3) {
      cycle = true;
      vm::ProtocolVariant p = r.env->vm->protocol();
      p.snapshot_seq_per_try = true;
      r.env->vm->set_protocol_for_replay(p);
    }
  });
  EXPECT_TRUE(r.vmlaunch());  // 1, 10-13: activation and its refresh
  r.cache().set_refresh_hook(nullptr);
  return !cycle;
}

// NAME_FIRST (REBIND): the notifier names the cache's bound vCPU before
// marking it invalid; vCPU 1 takes the cache over in between, reads it valid
// and runs L2 on its pfn, and the notifier waits for vCPU 0 only. vCPU 1's
// moves run inside the invalidation hook (between naming and marking in
// either order), on a thread of its own, as CachePageSet::lock makes them.
bool replay_name_first(std::string_view variant) {
  TrailReplay r(variant, 2);
  cpu::Vcpu& b = r.env->machine->vcpu(1);
  EXPECT_TRUE(r.vmlaunch());  // 1-8, 11: vCPU 0's vmcs02 holds frame 0 of hva A
  EXPECT_TRUE(r.enter_l2());  // 12-14
  r.leave_l2();               // 15-16; 17: L1 clears the vmcs12 on vCPU 0
  std::optional<host::FrameTag> b_frame;  // the frame vCPU 1's vmcs02 takes
  r.cache().set_invalidate_hook([&] {
    std::thread([&] {
      r.cache().set_vcpu(&b);  // 18: vCPU 1's VMPTRLD binds the cache to it
      // 19-20: the check; a valid cache's pfn goes into vmcs02 (the read
      // ends with the statement, so the notifier need not wait for it).
      if (vm::CachePtr p = r.cache().read(sizeof(uint32_t))) b_frame = p.tag();
      if (b_frame) {
        EXPECT_TRUE(b.enter_guest_mode());  // 21-23: L2 runs on vCPU 1
      }
    }).join();
  });
  // 9-10, 24-27: the discard names the bound vCPU and marks the cache (ours:
  // marks, then names vCPU 1, which read it invalid), requests
  // kOutsideGuestMode of the vCPU named, and unmaps hva A once it is out.
  r.host([&] { r.discard_page(); });
  r.until([&] { return b.mode() == vm::VcpuMode::exiting || r.hosts_returned() == 1; });
  // 28: vCPU 1's L2 uses the frame its vmcs02 took.
  bool live = !b_frame || r.env->phys->check(*b_frame, "virtual-APIC page", &b.counters());
  if (b.mode() != vm::VcpuMode::outside) b.exit_guest_mode();
  r.join_hosts();
  r.cache().set_invalidate_hook(nullptr);
  return live;
}

// One replay per trail check.sh prints, in its order: the variant's macro
// name and the replay.
struct TrailCase {
  const char* variant;
  const char* trail;  // the test's name
  bool (*replay)(std::string_view variant);
};
constexpr TrailCase kTrails[] = {
    {"SEED", "SEED", replay_seed},
    {"SEED", "SEED_ThroughAMemslotMove", replay_seed_memslot_move},
    {"NO_WAIT", "NO_WAIT", replay_no_wait},
    {"NO_RETRY", "NO_RETRY", replay_no_retry},
    {"NO_LAST_CHECK", "NO_LAST_CHECK", replay_no_last_check},
    {"FLIPPED_ONLY", "FLIPPED_ONLY", replay_flipped_only},
    {"SW_DEACTIVATE", "SW_DEACTIVATE", replay_sw_deactivate},
    {"NO_DEACTIVATE", "NO_DEACTIVATE", replay_no_deactivate},
    {"STALE_SNAPSHOT", "STALE_SNAPSHOT", replay_stale_snapshot},
    {"NAME_FIRST", "NAME_FIRST", replay_name_first},
};

void PrintTo(const TrailCase& t, std::ostream* os) { *os << t.trail; }

class ModelTrailReplay : public ::testing::TestWithParam<TrailCase> {};

TEST_P(ModelTrailReplay, HoldsOnOursAndBreaksOnTheVariant) {
  const TrailCase& t = GetParam();
  EXPECT_TRUE(t.replay("OURS")) << "nestcache's protocol on the schedule of the " << t.trail << " trail";
  EXPECT_FALSE(t.replay(t.variant)) << "the " << t.variant << " variant of the code does not fail as the model does";
}

INSTANTIATE_TEST_SUITE_P(Trails, ModelTrailReplay, ::testing::ValuesIn(kTrails),
                         [](const auto& info) { return std::string(info.param.trail); });

// The trails model/check.sh prints and the replays here are the same list,
// and every variant has its switch: a variant or trail added to the model
// cannot go without its replay.
TEST(ModelTrailReplay, EveryTrailTheModelPrintsHasASwitchAndAReplay) {
  std::ifstream f(std::string(NESTCACHE_MODEL_DIR) + "/check.sh");
  ASSERT_TRUE(f) << NESTCACHE_MODEL_DIR "/check.sh";
  std::vector<std::string> model;
  std::regex entry(R"(^\s*"([A-Z_]+)\|(safety|progress)\|)");
  for (std::string line; std::getline(f, line);) {
    std::smatch m;
    if (std::regex_search(line, m, entry)) model.push_back(m[1]);
  }
  std::vector<std::string> replayed;
  for (const TrailCase& t : kTrails) replayed.push_back(t.variant);
  EXPECT_EQ(model, replayed) << "check.sh's variant list and kTrails, in order";
  for (const std::string& name : model)
    EXPECT_TRUE(vm::ProtocolVariant::from_model(name)) << name << " has no ProtocolVariant";
  EXPECT_FALSE(vm::ProtocolVariant::from_model("NO_SUCH_STEP"));
}

}  // namespace
}  // namespace nestcache::workloads
