// Nested state with an enlightened VMCS on one vCPU, without a machine: what
// a restore of an eVMCS blob checks, what it installs, how the request before
// the next entry maps the eVMCS through the strategy (KVM's
// nested_get_evmcs_page), and what get copies out of the page.
#include <gtest/gtest.h>

#include <functional>

#include "base/check.h"
#include "support/vm_env.h"
#include "vmx/entry_checks.h"
#include "vmx/nested.h"

namespace nestcache::vmx {
namespace {

constexpr size_t kPages = 64;  // memslot 0: [0, 256 KiB)
constexpr Gpa kVmxon = 0x10000, kVapicPage = 0x21000, kVpAssist = 0x22000, kMsrBitmap = 0x23000;
constexpr Gpa kEvmcs = 0x100000;  // memslot 1, one page
constexpr Gpa kOtherEvmcs = 0x24000;
constexpr Gpa kNoSlot = 0x800000;

struct Fixture : test_support::VmEnv {
  explicit Fixture(StrategyKind strategy = StrategyKind::cache, bool enable = true)
      : VmEnv({.kind = host::FrameKind::managed, .pages = kPages, .spare = 256}) {
    evmcs_hva = *mm->create_region(kPageSize, host::FrameKind::managed);
    NC_CHECK(vm->set_memory_region({1, 0, kEvmcs, kPageSize, evmcs_hva}));
    vcpu = std::make_unique<vm::Vcpu>(0);
    nested = std::make_unique<NestedVmx>(*vm, *vcpu, strategy, nullptr, counters);
    if (enable) nested->enable_evmcs();
  }
  ~Fixture() { nested.reset(); }

  // L1's memory as an enlightened L1 leaves it: the VP-assist page names
  // `evmcs` (enlightened entry on), and the page holds `v` with every
  // clean bit set, as L0 leaves it after an entry.
  void write_l1_memory(const Vmcs12& v, Gpa evmcs = kEvmcs) {
    VpAssistPage assist;
    assist.enlighten_vmentry = 1;
    assist.current_nested_vmcs = evmcs;
    std::array<std::byte, kPageSize> buf{};
    assist.store(buf);
    NC_CHECK(vm->write_guest(kVpAssist, buf.data(), buf.size()));
    EvmcsPage page;
    page.revision_id = kEvmcsRevision;
    for (const EvmcsFieldInfo& f : evmcs_fields()) NC_CHECK(evmcs_guest_write(page, f.encoding, v.read(f.encoding).value()));
    page.clean_fields = evmcs_clean::kAll;
    page.enlightenments_control = evmcs_enlightenment::kMsrBitmap;
    buf.fill(std::byte{0});
    page.store(buf);
    NC_CHECK(vm->write_guest(evmcs, buf.data(), buf.size()));
    NC_CHECK(nested->set_vp_assist_msr(kVpAssist | kVpAssistPageEnable));
  }
  EvmcsPage read_page(Gpa evmcs = kEvmcs) {
    std::array<std::byte, kPageSize> buf{};
    NC_CHECK(vm->read_guest(evmcs, buf.data(), buf.size()));
    return EvmcsPage::load(buf);
  }
  void write_page(const EvmcsPage& page, Gpa evmcs = kEvmcs) {
    std::array<std::byte, kPageSize> buf{};
    NC_CHECK(vm->read_guest(evmcs, buf.data(), buf.size()));
    page.store(buf);
    NC_CHECK(vm->write_guest(evmcs, buf.data(), buf.size()));
  }

  Hva evmcs_hva = 0;
  std::unique_ptr<vm::Vcpu> vcpu;
  CounterSet counters;
  std::unique_ptr<NestedVmx> nested;
};

// What eVMCS v1 can express: TPR shadow and the MSR bitmap.
Vmcs12 enlightened_vmcs12() {
  Vmcs12 v = minimal_vmcs12();
  v.launch_state = kLaunchStateLaunched;
  v.primary_proc_controls |= proc::kUseTprShadow | proc::kUseMsrBitmaps;
  v.virtual_apic_page_addr = kVapicPage;
  v.msr_bitmap = kMsrBitmap;
  v.tsc_offset = 0x1234;
  return v;
}

NestedStateImage evmcs_state(bool guest_mode, Vmcs12 v = enlightened_vmcs12()) {
  NestedStateImage s;
  s.vmxon_gpa = kVmxon;
  s.current_vmcs_gpa = kEvmcs;
  s.evmcs = true;
  s.vmcs12 = v;
  s.guest_mode = guest_mode;
  return s;
}

TEST(NestedStateEvmcs, NeedsTheEnlightenedVmcsEnabledOnTheVcpu) {
  Fixture f(StrategyKind::cache, /*enable=*/false);
  auto st = f.nested->set_nested_state(encode(evmcs_state(true)));
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, EINVAL);
  EXPECT_NE(st.error().message.find("vCPU 0 has not enabled the enlightened VMCS"), std::string::npos)
      << st.error().message;
  EXPECT_FALSE(f.nested->vmx_on()) << "nothing changed";
  EXPECT_FALSE(f.vcpu->test_request(vm::Request::kGetNestedStatePages));
}

TEST(NestedStateEvmcs, AddressRulesNameTheEvmcs) {
  Fixture f;
  NestedStateImage misaligned = evmcs_state(true), unbacked = evmcs_state(true);
  misaligned.current_vmcs_gpa += 0x40;
  unbacked.current_vmcs_gpa = kNoSlot;
  auto a = f.nested->set_nested_state(encode(misaligned));
  ASSERT_FALSE(a);
  EXPECT_NE(a.error().message.find("eVMCS address 0x100040 is not 4 KiB aligned"), std::string::npos)
      << a.error().message;
  auto b = f.nested->set_nested_state(encode(unbacked));
  ASSERT_FALSE(b);
  EXPECT_NE(b.error().message.find("eVMCS page 0x800000 is not backed by a memslot"), std::string::npos)
      << b.error().message;
  EXPECT_FALSE(f.nested->vmx_on());
}

// The eVMCS is installed by set and mapped by the request, through each
// strategy; the restored vmcs12 is kept, every clean bit goes down (in the
// page too), and the vmcs12 is written back into the page.
TEST(NestedStateEvmcs, SetInstallsTheEvmcsAndTheRequestMapsIt) {
  for (StrategyKind k : {StrategyKind::map, StrategyKind::cache}) {
    SCOPED_TRACE(strategy_name(k));
    Fixture f(k);
    Vmcs12 v = enlightened_vmcs12();
    f.write_l1_memory(v);
    v.exit_reason = static_cast<uint32_t>(ExitReason::kVmcall);  // newer than the page
    const NestedStateImage s = evmcs_state(true, v);
    ASSERT_TRUE(f.nested->set_nested_state(encode(s)));
    EXPECT_TRUE(f.nested->evmcs_in_use());
    EXPECT_TRUE(f.nested->evmcs_map_pending());
    EXPECT_EQ(f.nested->nested_vmptr(), kEvmcs);
    EXPECT_EQ(f.nested->current_vmptr(), kInvalidGpa) << "an eVMCS, not a VMPTRLD'd vmcs12";
    EXPECT_TRUE(f.vcpu->test_request(vm::Request::kGetNestedStatePages));
    EXPECT_EQ(f.nested->get_nested_state(), s) << "get returns what set installed";
    if (k == StrategyKind::cache) {
      EXPECT_FALSE(f.nested->pages().cache(L1Page::evmcs)->active()) << "set maps nothing";
    }
    EXPECT_EQ(f.read_page().clean_fields, evmcs_clean::kAll) << "set does not touch the page";

    ASSERT_TRUE(f.nested->get_nested_state_pages());
    EXPECT_FALSE(f.nested->evmcs_map_pending());
    if (k == StrategyKind::cache) {
      EXPECT_TRUE(f.nested->pages().cache(L1Page::evmcs)->active());
    }
    EXPECT_EQ(f.nested->vmcs12(), v) << "copy=false: the blob's vmcs12 is kept";
    EXPECT_EQ(f.nested->evmcs_snapshot().clean_fields, 0u) << "no clean bit of the page is trusted";
    EXPECT_TRUE(f.nested->evmcs_snapshot().msr_bitmap);
    const EvmcsPage page = f.read_page();
    EXPECT_EQ(page.clean_fields, 0u) << "L1's next VMRESUME copies every group";
    EXPECT_EQ(page.exit_reason, static_cast<uint32_t>(ExitReason::kVmcall)) << "vmcs12 written back into the eVMCS";
    EXPECT_TRUE(f.nested->vmcs02().vapic.valid());
    EXPECT_TRUE(f.nested->vmcs02().use_msr_bitmap) << "the bitmap is merged again, not taken as clean";
    EXPECT_EQ(f.counters.get(Counter::evmcs_map_failures), 0u);
  }
}

TEST(NestedStateEvmcs, OutsideGuestModeTheRequestMapsTheEvmcsToo) {
  Fixture f;
  f.write_l1_memory(enlightened_vmcs12());
  ASSERT_TRUE(f.nested->set_nested_state(encode(evmcs_state(false))));
  EXPECT_TRUE(f.vcpu->test_request(vm::Request::kGetNestedStatePages)) << "KVM raises it for an eVMCS in any mode";
  ASSERT_TRUE(f.nested->get_nested_state_pages());
  EXPECT_FALSE(f.nested->evmcs_map_pending());
  EXPECT_FALSE(f.nested->guest_mode());
  EXPECT_FALSE(f.nested->vmcs02().vapic.valid()) << "no vmcs12 pages outside guest mode";
}

// Outside guest mode get copies every carried field from the page, whatever
// the clean bits say (clean fields 0); in guest mode it returns the vmcs12
// L2 runs on, as KVM does.
TEST(NestedStateEvmcs, GetCopiesTheWholePageOutsideGuestModeOnly) {
  for (bool guest_mode : {false, true}) {
    SCOPED_TRACE(guest_mode ? "guest mode" : "L1");
    Fixture f;
    const Vmcs12 v = enlightened_vmcs12();
    f.write_l1_memory(v);
    ASSERT_TRUE(f.nested->set_nested_state(encode(evmcs_state(guest_mode, v))));
    ASSERT_TRUE(f.nested->get_nested_state_pages());
    // L1 changes a field and (wrongly, or long ago) leaves its group clean.
    EvmcsPage page = f.read_page();
    page.tsc_offset = 0xabcd;
    page.clean_fields = evmcs_clean::kAll;
    f.write_page(page);
    NestedStateImage got = f.nested->get_nested_state();
    ASSERT_TRUE(got.evmcs);
    EXPECT_EQ(got.current_vmcs_gpa, kEvmcs);
    ASSERT_TRUE(got.vmcs12);
    EXPECT_EQ(got.vmcs12->tsc_offset, guest_mode ? v.tsc_offset : 0xabcdu);
    EXPECT_TRUE(decode(encode(got))) << "a blob set accepts";
  }
}

// Each way the eVMCS cannot be used fails the request cleanly and leaves
// the restored state for a retry, which succeeds once the VMM fixed it.
TEST(NestedStateEvmcs, AnEvmcsThatCannotBeUsedFailsTheRequestAndStaysForARetry) {
  struct Case {
    const char* name;
    std::function<void(Fixture&)> fix_before, fix_after;
    const char* expect;
    int code;
  };
  const Case cases[] = {
      {"VP-assist MSR not restored",
       [](Fixture& f) { ASSERT_TRUE(f.nested->set_vp_assist_msr(0)); },
       [](Fixture& f) { ASSERT_TRUE(f.nested->set_vp_assist_msr(kVpAssist | kVpAssistPageEnable)); },
       "the VP-assist page (MSR value 0x0) names no eVMCS; the restored eVMCS is 0x100000", EINVAL},
      {"VP-assist page names another eVMCS",
       [](Fixture& f) { f.write_l1_memory(enlightened_vmcs12(), kOtherEvmcs); },
       [](Fixture& f) { f.write_l1_memory(enlightened_vmcs12()); },
       "the VP-assist page names eVMCS 0x24000, not the restored eVMCS 0x100000", EINVAL},
      {"bad revision",
       [](Fixture& f) {
         EvmcsPage p = f.read_page();
         p.revision_id = 7;
         f.write_page(p);
       },
       [](Fixture& f) { f.write_l1_memory(enlightened_vmcs12()); }, "the enlightened VMCS at 0x100000: ", EINVAL},
      {"memslot deleted",
       [](Fixture& f) { ASSERT_TRUE(f.vm->set_memory_region({1, 0, kEvmcs, 0, f.evmcs_hva})); },
       [](Fixture& f) { ASSERT_TRUE(f.vm->set_memory_region({1, 0, kEvmcs, kPageSize, f.evmcs_hva})); },
       "the enlightened VMCS at 0x100000 cannot be mapped", EFAULT},
  };
  for (StrategyKind k : {StrategyKind::map, StrategyKind::cache}) {
    for (const Case& c : cases) {
      SCOPED_TRACE(std::string(strategy_name(k)) + ": " + c.name);
      Fixture f(k);
      f.write_l1_memory(enlightened_vmcs12());
      const NestedStateImage s = evmcs_state(true);
      ASSERT_TRUE(f.nested->set_nested_state(encode(s)));
      c.fix_before(f);
      auto st = f.nested->get_nested_state_pages();
      ASSERT_FALSE(st);
      EXPECT_EQ(st.error().code, c.code) << st.error().to_string();
      EXPECT_NE(st.error().message.find("nested state restored, but its enlightened VMCS cannot be used"),
                std::string::npos);
      EXPECT_NE(st.error().message.find(c.expect), std::string::npos) << st.error().message;
      EXPECT_TRUE(f.nested->evmcs_map_pending());
      EXPECT_EQ(f.nested->get_nested_state(), s) << "the restored state stays";
      EXPECT_FALSE(f.nested->vmcs02().vapic.valid()) << "no vmcs02 without the eVMCS";

      c.fix_after(f);
      ASSERT_TRUE(f.nested->get_nested_state_pages()) << "the retry";
      EXPECT_FALSE(f.nested->evmcs_map_pending());
      EXPECT_TRUE(f.nested->vmcs02().vapic.valid());
    }
  }
}

TEST(NestedStateEvmcs, AVmcs12BlobReplacesARestoredEvmcs) {
  Fixture f;
  f.write_l1_memory(enlightened_vmcs12());
  ASSERT_TRUE(f.nested->set_nested_state(encode(evmcs_state(true))));
  ASSERT_TRUE(f.nested->get_nested_state_pages());
  NestedStateImage plain = evmcs_state(false);
  plain.evmcs = false;
  plain.current_vmcs_gpa = 0x11000;
  ASSERT_TRUE(f.nested->set_nested_state(encode(plain)));
  EXPECT_FALSE(f.nested->evmcs_in_use());
  EXPECT_FALSE(f.nested->evmcs_map_pending());
  EXPECT_EQ(f.nested->current_vmptr(), 0x11000u);
  EXPECT_EQ(f.nested->evmcs_snapshot().clean_fields, 0u);
}

}  // namespace
}  // namespace nestcache::vmx
