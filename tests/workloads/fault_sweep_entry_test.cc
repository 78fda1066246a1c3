// Fault sweeps over a nested entry and over a memslot change while the
// entry's caches are active: every mmap and munmap the step makes is failed
// in turn (once, and from it on), on unmanaged memory where each vmcs12
// page needs a remap window, with `map` and `cache`, with a vmcs12 and with
// an enlightened VMCS. Each run must end in a clean outcome — the entry
// goes in (a failed munmap was retried, or parked and unmapped later), or it
// ends as an internal error naming the resource and the errno — with no
// stale access, and once the fault is gone the next entry and exit work,
// nothing stays parked and, after teardown, nothing leaked.
//
// The vCPU's NestedVmx is driven directly on the test thread (no vCPU
// thread runs), so each run makes exactly the operations the count saw.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>

#include "guest/vmcs12_pages.h"
#include "support/fault_sweep.h"
#include "vmx/evmcs.h"
#include "workloads/nested_env.h"

namespace nestcache::workloads {
namespace {

using host::FaultSite;
using test_support::fault_label;

constexpr Gpa kVmxon = 0x10000, kVmcs = 0x11000, kVpAssist = 0x12000;
// Each page in its own one-page slot of unmanaged memory.
constexpr Gpa kMsrBitmap = 0x40000000, kApicAccess = 0x40001000, kVapic = 0x40002000, kPiPage = 0x40003000,
              kEvmcs = 0x40004000;
constexpr Gpa kPiDesc = kPiPage + 0x40;  // a descriptor need not be page aligned
constexpr uint8_t kVector = 0xf2;
constexpr uint32_t kFirstPageSlot = 1;

struct Case {
  StrategyKind strategy;
  bool evmcs;
};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  return std::string(vmx::strategy_name(info.param.strategy)) + (info.param.evmcs ? "_evmcs" : "_vmcs12");
}

// One VM with VMX on and the vmcs12 (or eVMCS) current, nothing mapped yet.
class Rig {
 public:
  static std::unique_ptr<Rig> make(const Case& c) {
    auto rig = std::unique_ptr<Rig>(new Rig());
    NestedEnvConfig ec{c.strategy, MemoryKind::unmanaged};
    ec.l1_bytes = 4 << 20;
    ec.extra_frames = 64;
    auto env = NestedEnv::create(ec);
    EXPECT_TRUE(env) << env.error().to_string();
    if (!env) return nullptr;
    rig->env = std::move(*env);
    rig->evmcs = c.evmcs;
    if (!rig->init()) return nullptr;
    return rig;
  }

  vmx::NestedVmx& n() { return env->machine->vcpu(0).nested(); }
  bool launched() { return n().vmcs12().launch_state == vmx::kLaunchStateLaunched; }

  // VMLAUNCH or VMRESUME, and when L2 is in, its VMCALL exit reflected.
  vmx::EntryResult entry_and_exit() {
    vmx::EntryResult e = n().enter(!launched());
    if (e.kind == vmx::EntryResult::Kind::entered) n().reflect_exit(vmx::ExitInfo::of(vmx::ExitReason::kVmcall));
    return e;
  }

  uint64_t stale() const { return env->phys->counters().get(Counter::stale_accesses); }

  // L1 leaves VMX operation (its context detaches), then the VM goes.
  Leaks finish() {
    EXPECT_TRUE(n().vmxoff().ok());
    return env->tear_down();
  }

  std::unique_ptr<NestedEnv> env;
  bool evmcs = false;
  std::vector<Hva> page_hvas;
  Hva spare_hva = 0;

 private:
  Rig() = default;

  bool init() {
    uint32_t slot = kFirstPageSlot;
    for (Gpa g : {kMsrBitmap, kApicAccess, kVapic, kPiPage, kEvmcs}) {
      auto hva = env->add_page_slot(slot++, g);
      EXPECT_TRUE(hva) << hva.error().to_string();
      if (!hva) return false;
      page_hvas.push_back(*hva);
    }
    // A region for a memslot a step creates.
    auto spare = env->mm->create_region(kPageSize, host::FrameKind::unmanaged);
    EXPECT_TRUE(spare);
    if (!spare) return false;
    spare_hva = *spare;
    // KVM's eVMCS filter allows neither APIC-access virtualization nor posted
    // interrupts: that case uses the MSR bitmap and the virtual-APIC page
    // (and the eVMCS page itself).
    vmx::Vmcs12 v = guest::vmcs12_for({.msr_bitmap = kMsrBitmap,
                                       .apic_access = evmcs ? kInvalidGpa : kApicAccess,
                                       .virtual_apic = kVapic,
                                       .pi_desc = evmcs ? kInvalidGpa : kPiDesc,
                                       .notification_vector = evmcs ? uint8_t{0} : kVector});
    std::array<std::byte, kPageSize> page{};
    uint32_t rev = vmx::kVmcs12Revision;
    EXPECT_TRUE(env->vm->write_guest(kVmxon, &rev, sizeof rev));
    if (!evmcs) {
      v.serialize(page);
      EXPECT_TRUE(env->vm->write_guest(kVmcs, page.data(), page.size()));
      return n().vmxon(kVmxon).ok() && n().vmptrld(kVmcs).ok();
    }
    vmx::EvmcsPage e;
    e.revision_id = vmx::kEvmcsRevision;
    for (const vmx::EvmcsFieldInfo& f : vmx::evmcs_fields()) {  // as an enlightened L1 writes it
      if (vmx::field_type(f.encoding) == vmx::FieldType::kReadOnly) continue;
      EXPECT_TRUE(vmx::evmcs_guest_write(e, f.encoding, v.read(f.encoding).value()));
    }
    e.clean_fields = 0;
    e.store(page);
    EXPECT_TRUE(env->vm->write_guest(kEvmcs, page.data(), page.size()));
    vmx::VpAssistPage vp;
    vp.enlighten_vmentry = 1;
    vp.current_nested_vmcs = kEvmcs;
    page.fill(std::byte{0});
    vp.store(page);
    EXPECT_TRUE(env->vm->write_guest(kVpAssist, page.data(), page.size()));
    n().enable_evmcs();
    return n().set_vp_assist_msr(kVpAssist | vmx::kVpAssistPageEnable) && n().vmxon(kVmxon).ok();
  }
};

// Windows in use (open minus parked) and parked.
struct PhysMemView {
  const host::PhysMem& phys;
  int64_t in_use() const { return phys.live_windows() - static_cast<int64_t>(phys.parked_windows()); }
  size_t parked() const { return phys.parked_windows(); }
};

// What a faultless run leaves: the windows open after the step and after the
// entry that follows it, and the vmcs02 controls of that entry.
struct Reference {
  int64_t windows_after_step = 0;
  int64_t windows_after_next = 0;
  uint32_t pin = 0, proc = 0, proc2 = 0;
  bool use_msr_bitmap = false;
};

class FaultSweep : public ::testing::TestWithParam<Case> {
 protected:
  void TearDown() override { host::clear_faults(); }

  // Runs `prepare` (unfaulted) then `step` on a fresh rig for a faultless
  // reference and the per-site counts, then once per fault of each sweep.
  // `step` returns the entry it ended with.
  // `cache_maps`: whether the step makes the cache strategy map anything
  // (it does not when every cache stays valid at its frame).
  template <class Prepare, class Step>
  void sweep(Prepare prepare, Step step, bool cache_maps = true) {
    Reference ref;
    std::map<FaultSite, uint64_t> counts;
    for (FaultSite site : {FaultSite::mmap, FaultSite::munmap}) {
      auto rig = Rig::make(GetParam());
      ASSERT_TRUE(rig);
      prepare(*rig);
      vmx::EntryResult e;
      counts[site] = test_support::count_site_operations(site, [&] { e = step(*rig); });
      ASSERT_EQ(e.kind, vmx::EntryResult::Kind::entered) << "faultless: " << e.result.why;
      // Windows counted with no old mapping left retired (a lock-free
      // cache's old window waits for a batched drain).
      rig->env->vm->caches().drain_retired();
      ref.windows_after_step = rig->env->phys->live_windows();
      ASSERT_EQ(rig->entry_and_exit().kind, vmx::EntryResult::Kind::entered);
      rig->env->vm->caches().drain_retired();
      ref.windows_after_next = rig->env->phys->live_windows();
      const vmx::Vmcs02& o = rig->n().vmcs02();
      ref = {ref.windows_after_step, ref.windows_after_next, o.pin, o.proc, o.proc2, o.use_msr_bitmap};
      EXPECT_EQ(rig->stale(), 0u);
      Leaks leaks = rig->finish();
      EXPECT_TRUE(leaks.none()) << leaks.to_string();
    }
    std::printf("[ sweep    ] %s: %llu mmap, %llu munmap\n", ::testing::UnitTest::GetInstance()->current_test_info()->name(),
                static_cast<unsigned long long>(counts[FaultSite::mmap]),
                static_cast<unsigned long long>(counts[FaultSite::munmap]));
    if (GetParam().strategy == StrategyKind::map) {
      EXPECT_GT(counts[FaultSite::mmap], 0u) << "unmanaged pages need windows";
      EXPECT_GT(counts[FaultSite::munmap], 0u) << "map unmaps at the exit";
      EXPECT_LE(counts[FaultSite::munmap], counts[FaultSite::mmap]) << "all but a current eVMCS";
    } else if (cache_maps) {
      EXPECT_GT(counts[FaultSite::mmap], 0u) << "unmanaged pages need windows";
    } else {
      EXPECT_EQ(counts[FaultSite::mmap] + counts[FaultSite::munmap], 0u) << "valid caches are not remapped";
    }
    for (FaultSite site : {FaultSite::mmap, FaultSite::munmap}) {
      for (const host::FaultSpec& f : test_support::sweep_faults(site, counts[site], true)) {
        SCOPED_TRACE(fault_label(f) + " of " + std::to_string(counts[site]));
        run_one(f, ref, prepare, step);
        if (HasFatalFailure()) return;
      }
    }
  }

  template <class Prepare, class Step>
  void run_one(const host::FaultSpec& f, const Reference& ref, Prepare& prepare, Step& step) {
    auto rig = Rig::make(GetParam());
    ASSERT_TRUE(rig);
    prepare(*rig);
    host::inject_fault(f);
    vmx::EntryResult e = step(*rig);
    const uint64_t injected = host::faults_injected(f.site);
    host::clear_faults();
    EXPECT_GE(injected, 1u) << "the step made the operation the count saw";
    using Kind = vmx::EntryResult::Kind;
    if (e.kind == Kind::internal_error) {
      EXPECT_EQ(e.error, f.error) << e.result.why;
      EXPECT_TRUE(test_support::names_resource(f.site, e.result.why)) << e.result.why;
      EXPECT_NE(e.result.why.find("ENOMEM"), std::string::npos) << e.result.why;
    } else {
      // Only a munmap can fail without failing the entry: retried at once,
      // or parked and unmapped by a later window.
      EXPECT_EQ(e.kind, Kind::entered) << e.result.why;
      EXPECT_EQ(f.site, FaultSite::munmap) << "an mmap failure went unreported";
    }
    EXPECT_EQ(rig->stale(), 0u);
    EXPECT_EQ(rig->env->phys->live_pins(), 0);
    // The fault is gone: the VM runs on, with every feature of a faultless
    // entry, and what the fault left parked is unmapped.
    vmx::EntryResult next = rig->entry_and_exit();
    ASSERT_EQ(next.kind, Kind::entered) << next.result.why;
    const vmx::Vmcs02& o = rig->n().vmcs02();
    EXPECT_EQ(o.pin, ref.pin);
    EXPECT_EQ(o.proc, ref.proc);
    EXPECT_EQ(o.proc2, ref.proc2);
    EXPECT_EQ(o.use_msr_bitmap, ref.use_msr_bitmap);
    // A window parked by a munmap fault is unmapped by the next window
    // opened or closed; an entry whose caches all stay valid does neither,
    // so one may still be parked here (and goes at teardown).
    rig->env->vm->caches().drain_retired();
    PhysMemView pm{*rig->env->phys};
    EXPECT_EQ(pm.in_use(), ref.windows_after_next);
    if (f.site == FaultSite::mmap) {
      EXPECT_EQ(pm.parked(), 0u);
    }
    EXPECT_EQ(rig->stale(), 0u);
    Leaks leaks = rig->finish();
    EXPECT_TRUE(leaks.none()) << leaks.to_string();
  }
};

TEST_P(FaultSweep, NestedEntryAndExit) {
  sweep([](Rig&) {}, [](Rig& r) { return r.entry_and_exit(); });
}

// The caches (or, with map, nothing) are live from a first entry; the VMM
// then changes memslots and L1 enters again, so every page is looked up
// anew (the generation moved). The change itself makes no mapping
// operation; the entry after it does: with `map` every page's window, with
// `cache` a refresh that remaps only a page whose frame changed.
TEST_P(FaultSweep, MemslotCreateWhileCachesAreActiveThenEntry) {
  auto prepare = [](Rig& r) { ASSERT_EQ(r.entry_and_exit().kind, vmx::EntryResult::Kind::entered); };
  sweep(prepare, [](Rig& r) {
    EXPECT_TRUE(r.env->vm->set_memory_region({20, 0, 0x50000000, kPageSize, r.spare_hva}));
    return r.entry_and_exit();
  }, /*cache_maps=*/false);
}

TEST_P(FaultSweep, MemslotMoveAwayAndBackWhileCachesAreActiveThenEntry) {
  auto prepare = [](Rig& r) { ASSERT_EQ(r.entry_and_exit().kind, vmx::EntryResult::Kind::entered); };
  sweep(prepare, [](Rig& r) {
    const uint32_t slot = kFirstPageSlot;  // the MSR bitmap's
    const Hva hva = r.page_hvas[0];
    EXPECT_TRUE(r.env->vm->set_memory_region({slot, 0, 0x60000000, kPageSize, hva}));
    EXPECT_TRUE(r.env->vm->set_memory_region({slot, 0, kMsrBitmap, kPageSize, hva}));
    return r.entry_and_exit();
  }, /*cache_maps=*/false);
}

// The virtual-APIC page's slot is deleted and made again over another
// region: the gpa now leads to another frame, which the vCPU-bound cache
// must map (and the old window unmap) before L2 runs.
TEST_P(FaultSweep, MemslotDeleteAndRecreateElsewhereWhileCachesAreActiveThenEntry) {
  auto prepare = [](Rig& r) { ASSERT_EQ(r.entry_and_exit().kind, vmx::EntryResult::Kind::entered); };
  sweep(prepare, [](Rig& r) {
    const uint32_t slot = kFirstPageSlot + 2;  // the virtual-APIC page's
    EXPECT_TRUE(r.env->vm->set_memory_region({slot, 0, kVapic, 0, r.page_hvas[2]}));
    EXPECT_TRUE(r.env->vm->set_memory_region({slot, 0, kVapic, kPageSize, r.spare_hva}));
    return r.entry_and_exit();
  });
}

INSTANTIATE_TEST_SUITE_P(Strategies, FaultSweep,
                         ::testing::Values(Case{StrategyKind::map, false}, Case{StrategyKind::cache, false},
                                           Case{StrategyKind::map, true}, Case{StrategyKind::cache, true}),
                         case_name);

}  // namespace
}  // namespace nestcache::workloads
